//! The create phase, the benchmark's headline: every VM created through
//! the API at the configured concurrency and rate, timed from the first
//! create call until the simulated hosts run them all, with the CPU time
//! the control plane and this process spent on it. Before it, the image the
//! VMs name is uploaded ([`upload_image`]).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::api::Api;
use super::args::LoadArgs;
use super::measure::{cpu_seconds, drive, load_1m, rss_bytes};
use super::topology::Fleet;
use super::Progress;

/// Makes a small qcow2 image in `dir` and uploads it as `tiny` (agents of
/// the simulated driver never download it).
pub async fn upload_image(api: &Api, dir: &Path) -> anyhow::Result<()> {
    let img = dir.join("tiny.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M")
        .status()
        .context("qemu-img")?;
    if !st.success() {
        bail!("qemu-img create failed");
    }
    let bytes = tokio::fs::read(&img).await?;
    let r = api
        .client
        .request_as(
            "POST",
            "/api/v1/images?name=tiny",
            Some(("application/octet-stream", &bytes)),
        )
        .await?;
    if !r.is_success() {
        bail!(
            "image upload: {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }
    Ok(())
}

/// What the create phase measured.
pub struct Created {
    /// Each create call's latency, in milliseconds.
    pub call_ms: Vec<f64>,
    /// Seconds from the first call until every VM ran (or ten minutes).
    pub all_running_s: f64,
    pub vms_running: usize,
    /// The control plane's resident memory once they ran.
    pub server_rss_bytes: u64,
    /// CPU seconds over the phase: the control plane's and this process's.
    pub server_cpu_s: f64,
    pub bench_cpu_s: f64,
    /// The machine's 1-minute load average, at the start and end averaged.
    pub load_1m: f64,
}

/// Creates VMs `v0`..`v{vms-1}` from the image `tiny` and waits (ten
/// minutes at most) until the simulated hosts run them all.
pub async fn run(
    api: &Arc<Api>,
    fleet: &Fleet,
    server_pid: u32,
    vms: usize,
    load: &LoadArgs,
    p: Progress,
) -> anyhow::Result<Created> {
    p.say(format!("creating {vms} VMs"));
    let (server_cpu0, own_cpu0, load0) =
        (cpu_seconds(Some(server_pid)), cpu_seconds(None), load_1m());
    let t0 = Instant::now();
    let creator = api.clone();
    let call_ms = drive(vms, load.concurrency, load.create_rate, move |i| {
        let api = creator.clone();
        async move {
            // Written directly: the name is `v` and digits, nothing to escape.
            let body = format!(r#"{{"name":"v{i}","image":"tiny","memory_mib":512,"vcpus":1}}"#);
            api.call_unread("POST", "/vms", Some(body.as_bytes())).await
        }
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while fleet.running() < vms && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_running_s = t0.elapsed().as_secs_f64();
    let vms_running = fleet.running();
    let out = Created {
        call_ms,
        all_running_s,
        vms_running,
        server_rss_bytes: rss_bytes(server_pid),
        server_cpu_s: cpu_seconds(Some(server_pid)) - server_cpu0,
        bench_cpu_s: cpu_seconds(None) - own_cpu0,
        load_1m: (load0 + load_1m()) / 2.0,
    };
    p.say(format!(
        "{vms_running} VMs running after {all_running_s:.1} s"
    ));
    Ok(out)
}
