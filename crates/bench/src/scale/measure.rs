//! How the phases measure: [`drive`] runs a phase's calls at a bounded
//! concurrency and rate and times each; the `/proc` readers give CPU time,
//! resident memory and the load average, figures that (unlike a rate) say
//! what a run cost whatever else the machine was doing.

use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs `n` calls of `f`, at most `concurrency` at a time and, when `rate`
/// is positive, started at that many per second; returns each call's
/// latency in milliseconds (in no particular order).
///
/// `concurrency` tasks each take the next call when their last one is
/// done. (A loop that spawned a task per call behind a semaphore ran on the
/// main thread, which every finished call had to wake through a futex: a
/// few percent of the whole machine at thousands of creates a second.)
pub async fn drive<F, Fut>(
    n: usize,
    concurrency: usize,
    rate: f64,
    f: F,
) -> anyhow::Result<Vec<f64>>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    use std::sync::atomic::{AtomicUsize, Ordering};
    let f = Arc::new(f);
    let next = Arc::new(AtomicUsize::new(0));
    // Paced calls share one ticker; unpaced ones take no lock.
    let tick = (rate > 0.0).then(|| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        Arc::new(tokio::sync::Mutex::new(t))
    });
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(n) {
        let (f, next, tick) = (f.clone(), next.clone(), tick.clone());
        workers.spawn(async move {
            let mut ms = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(ms);
                }
                if let Some(t) = &tick {
                    t.lock().await.tick().await;
                }
                let t = Instant::now();
                f(i).await?;
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = workers.join_next().await {
        out.extend(r??);
    }
    Ok(out)
}

/// Milliseconds since `t`.
pub fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[(((v.len() - 1) as f64) * p).round() as usize]
}

/// CPU time (user + system) a process used so far, in seconds; `None`
/// for this process.
pub fn cpu_seconds(pid: Option<u32>) -> f64 {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let Ok(s) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses and may hold
    // spaces): state is the 3rd field, utime the 14th, stime the 15th.
    let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// The 1-minute load average, to tell a busy machine from a slow program.
pub fn load_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Resident memory of a process now.
pub fn rss_bytes(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:") * 1024
}

/// The most resident memory a process had so far (its high-water mark).
pub fn peak_rss_bytes(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:") * 1024
}

/// A field of `/proc/<pid>/status` given in kB (0 when it cannot be read).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::bail;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drive_makes_every_call_once_at_most_concurrency_at_a_time() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (s, n, m) = (seen.clone(), now.clone(), most.clone());
        let ms = drive(100, 8, 0.0, move |i| {
            let (s, n, m) = (s.clone(), n.clone(), m.clone());
            async move {
                let in_flight = n.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(in_flight, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                s.lock().unwrap().push(i);
                n.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .await
        .unwrap();
        assert_eq!(ms.len(), 100);
        assert!(ms.iter().all(|&l| l >= 2.0), "{ms:?}");
        let mut seen = seen.lock().unwrap().clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        let most = most.load(Ordering::SeqCst);
        assert!((2..=8).contains(&most), "{most} calls at once");
    }

    #[tokio::test]
    async fn drive_fails_with_a_failed_call_and_keeps_to_its_rate() {
        let e = drive(20, 4, 0.0, |i| async move {
            if i == 13 {
                bail!("call {i} failed");
            }
            Ok(())
        })
        .await
        .expect_err("a call failed");
        assert!(e.to_string().contains("call 13 failed"), "{e}");
        // 10 calls at 200 a second: the first at once, the last 45 ms later.
        let t = Instant::now();
        let ms = drive(10, 4, 200.0, |_| async { Ok(()) }).await.unwrap();
        assert_eq!(ms.len(), 10);
        assert!(
            t.elapsed() >= Duration::from_millis(40),
            "{:?}",
            t.elapsed()
        );
    }
}
