//! The read phases. [`run`], once every VM runs: 2,000 GETs of one VM by
//! name and up to 100 list pages of 1,000, one call after the other, so
//! that each latency is the control plane's alone. [`Lister`], during the
//! lifecycle operations: filtered list pages at a fixed rate, to show what
//! writes do to reads.
//!
//! A call's latency runs from the request to the last byte of its
//! response; the client's parsing of the JSON comes after (it is the load
//! generator's work, on cores it shares with the control plane, and for a
//! page of 1,000 VMs into a `serde_json::Value` it was several
//! milliseconds). The pages' parse times are reported on their own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

use super::api::Api;
use super::measure::ms_since;

/// List pages of 1,000 VMs read, one after the other, once every VM runs.
const LIST_PAGES: usize = 100;

/// Latencies of the read phase, in milliseconds.
pub struct Reads {
    pub get_ms: Vec<f64>,
    pub list_ms: Vec<f64>,
    /// Parsing each list page after its last byte (not in `list_ms`).
    pub list_parse_ms: Vec<f64>,
}

/// Reads single VMs, then list pages, one call at a time.
pub async fn run(api: &Api, vms: usize) -> anyhow::Result<Reads> {
    let mut get_ms = Vec::new();
    for i in 0..2000usize {
        let t = Instant::now();
        api.send("GET", &format!("/vms/v{}", (i * 7919) % vms.max(1)), None)
            .await?;
        get_ms.push(ms_since(t));
    }
    let (mut list_ms, mut list_parse_ms) = (Vec::new(), Vec::new());
    let mut cursor: Option<String> = None;
    // 100 pages, so that the 99th percentile is not simply the slowest.
    for _ in 0..LIST_PAGES {
        let path = match &cursor {
            Some(c) => format!("/vms?limit=1000&cursor={c}"),
            None => "/vms?limit=1000".to_string(),
        };
        let t = Instant::now();
        let r = api.send("GET", &path, None).await?;
        list_ms.push(ms_since(t));
        let t = Instant::now();
        let page: Value = serde_json::from_slice(&r.body).context("a list page")?;
        list_parse_ms.push(ms_since(t));
        cursor = page["next_cursor"].as_str().map(str::to_string);
        if cursor.is_none() {
            break;
        }
    }
    Ok(Reads {
        get_ms,
        list_ms,
        list_parse_ms,
    })
}

/// Filtered list pages read in the background at a fixed rate, until
/// [`Lister::finish`].
pub struct Lister {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<f64>>,
}

impl Lister {
    /// Starts reading `rate` pages a second (none at 0), cycling through
    /// all VMs, a site's, a country's running ones and the stopped ones.
    pub fn start(api: Arc<Api>, rate: f64, sites: Vec<String>, countries: Vec<String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut ms = Vec::new();
            if rate <= 0.0 {
                return ms;
            }
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            let mut i = 0usize;
            while !stopped.load(Ordering::Relaxed) {
                tick.tick().await;
                i += 1;
                let path = match i % 4 {
                    0 => "/vms?limit=1000".to_string(),
                    1 => format!("/vms?limit=1000&site={}", sites[i % sites.len().max(1)]),
                    2 => format!(
                        "/vms?limit=1000&country={}&phase=running",
                        countries[i % countries.len().max(1)]
                    ),
                    _ => "/vms?limit=1000&phase=stopped".to_string(),
                };
                let t = Instant::now();
                if api.send("GET", &path, None).await.is_ok() {
                    ms.push(ms_since(t));
                }
            }
            ms
        });
        Self { stop, task }
    }

    /// Stops the reads; each successful page's latency, in milliseconds.
    pub async fn finish(self) -> Vec<f64> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}
