//! `--metrics-listen ADDR`: the agent's Prometheus metrics, `GET /metrics`
//! on a listener of its own (plain HTTP, no token: bind it where only the
//! monitoring network reaches), encoded by `prometheus-client`.
//!
//! Everything is read at scrape time, so the agent does no work for metrics
//! between scrapes: each VM's QEMU (found through the driver) by its
//! `/proc` entries, CPU time from `stat` and resident memory from `status`;
//! the host's capacity (its inventory, as it joined) and what is free of it
//! (the usage its heartbeats send). Unlike the control plane's, these
//! series carry the VM's id as a label: an agent runs a few VMs, not a
//! million. A simulated VM has no process and so no per-VM series.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use virt8ra_api::HostInventory;

use crate::driver::Driver;
use crate::reconciler::Reports;

/// `/proc/PID/stat` counts CPU time in these ticks a second (`USER_HZ`,
/// fixed at 100 by the kernel's ABI whatever the kernel's own tick rate).
const USER_HZ: f64 = 100.0;

/// What a scrape reads.
pub struct Source {
    pub driver: Arc<dyn Driver>,
    pub reports: Arc<Reports>,
    pub inventory: HostInventory,
    pub data_dir: PathBuf,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    vm: String,
}

/// One QEMU process as `/proc` shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcStats {
    /// User plus system CPU time.
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

/// Reads process `pid`'s CPU time and resident memory; `None` when it is
/// gone (or `/proc` says something unexpected).
pub fn proc_stats(pid: i32) -> Option<ProcStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: the fields
    // counted are after its closing one (state is the first, utime the
    // 12th, stime the 13th).
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    let cpu_seconds = (ticks(11)? + ticks(12)?) as f64 / USER_HZ;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(ProcStats {
        cpu_seconds,
        rss_bytes: rss_kib * 1024,
    })
}

/// Serves `GET /metrics` on `listen` in a task of its own; returns the
/// address bound.
pub async fn start(source: Arc<Source>, listen: &str) -> anyhow::Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics-listen: cannot listen on {listen}: {e}"))?;
    let addr = l.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(source);
    let limits = virt8ra_serve::Limits {
        header_timeout: std::time::Duration::from_secs(10),
        max_connections: 64,
        busy_message: "too many connections to the agent's metrics; try again later",
        tcp_keepalive: None,
    };
    tokio::spawn(virt8ra_serve::serve(
        l,
        None,
        app,
        limits,
        std::future::pending(),
    ));
    tracing::info!(%addr, "serving metrics");
    Ok(addr)
}

async fn scrape(State(s): State<Arc<Source>>) -> Response {
    let ids = s.driver.list().await.unwrap_or_default();
    let pids: Vec<(String, i32)> = ids
        .into_iter()
        .filter_map(|id| s.driver.pid(&id).map(|p| (id, p)))
        .collect();
    let src = s.clone();
    // /proc and statvfs reads: off the async workers.
    let text = tokio::task::spawn_blocking(move || encode(&src, &pids)).await;
    match text {
        Ok(Ok(text)) => (
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            text,
        )
            .into_response(),
        _ => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(virt8ra_api::ErrorBody {
                error: virt8ra_api::ErrorDetail {
                    code: "internal".into(),
                    message: "the metrics could not be encoded".into(),
                },
            }),
        )
            .into_response(),
    }
}

fn gauge(v: i64) -> Gauge {
    let g = Gauge::default();
    g.set(v);
    g
}

/// The exposition: per-VM QEMU figures for `pids` (VM id, QEMU pid), and
/// the host's capacity and what is free of it.
fn encode(s: &Source, pids: &[(String, i32)]) -> Result<String, std::fmt::Error> {
    let mut r = Registry::with_prefix("virt8ra_agent");
    // Made for this scrape: a counter from zero raised to the process's
    // total, so a VM that went away leaves no series behind.
    let cpu = Family::<VmLabels, Counter<f64, AtomicU64>>::default();
    let rss = Family::<VmLabels, Gauge>::default();
    for (id, pid) in pids {
        let Some(p) = proc_stats(*pid) else { continue };
        let l = VmLabels { vm: id.clone() };
        cpu.get_or_create(&l).inc_by(p.cpu_seconds);
        rss.get_or_create(&l).set(p.rss_bytes as i64);
    }
    r.register_with_unit(
        "vm_cpu",
        "CPU time (user and system) of each VM's QEMU process",
        Unit::Seconds,
        cpu,
    );
    r.register_with_unit(
        "vm_memory_resident",
        "Resident memory of each VM's QEMU process",
        Unit::Bytes,
        rss,
    );
    let running = s.reports.running();
    let usage = s
        .driver
        .usage(running)
        .unwrap_or_else(|| crate::inventory::usage(&s.data_dir, running));
    let inv = &s.inventory;
    let mib = |m: u64| (m as i64).saturating_mul(1 << 20);
    let gib = |g: u64| (g as i64).saturating_mul(1 << 30);
    r.register(
        "vms_running",
        "VMs running on this host",
        gauge(running as i64),
    );
    r.register("host_vcpus", "vCPUs of this host", gauge(inv.vcpus as i64));
    r.register_with_unit(
        "host_memory",
        "Memory of this host",
        Unit::Bytes,
        gauge(mib(inv.memory_mib)),
    );
    r.register_with_unit(
        "host_memory_free",
        "Memory of this host not in use",
        Unit::Bytes,
        gauge(mib(inv.memory_mib.saturating_sub(usage.memory_used_mib))),
    );
    r.register_with_unit(
        "host_disk",
        "Disk of this host's data directory",
        Unit::Bytes,
        gauge(gib(inv.disk_gib)),
    );
    r.register_with_unit(
        "host_disk_free",
        "Disk of this host's data directory not in use",
        Unit::Bytes,
        gauge(gib(inv.disk_gib.saturating_sub(usage.disk_used_gib))),
    );
    r.register("host_load1", "One-minute load average of this host", {
        let g = Gauge::<f64, AtomicU64>::default();
        g.set(usage.load_1m);
        g
    });
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &r)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_real_process_cpu_time_and_memory() {
        // This test's own process: it has run and holds memory.
        let me = std::process::id() as i32;
        let mut spin = 0u64;
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_millis(50) {
            spin = spin.wrapping_add(1);
        }
        let p = proc_stats(me).expect("our own /proc entry");
        assert!(spin > 0);
        assert!(p.cpu_seconds > 0.0 && p.cpu_seconds < 3600.0, "{p:?}");
        assert!(p.rss_bytes > 1 << 20, "{p:?}");
        // A pid that does not exist: nothing, no panic.
        assert_eq!(proc_stats(i32::MAX), None);
    }
}
