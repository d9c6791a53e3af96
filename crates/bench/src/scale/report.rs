//! The report of `bench scale`: its JSON fields are a contract (tests and
//! the figures in BENCHMARKS.md read them by name), and its table is what
//! people read. Every figure is computed here from what the phases
//! measured, so the phases only measure.

use serde::Serialize;

use super::control_plane::Footprint;
use super::creates::Created;
use super::lifecycle::Lifecycle;
use super::measure::percentile;
use super::reads::Reads;
use super::verify::Heartbeats;

#[derive(Debug, Serialize)]
pub struct ScaleReport {
    pub hosts: usize,
    pub hosts_connected: u64,
    /// Connections the simulated hosts hold to the control plane.
    pub agent_connections: usize,
    pub heartbeat_interval_s: u64,
    pub missed_heartbeat_ratio: f64,
    pub vms: usize,
    pub vms_running: usize,
    pub create_per_s: f64,
    pub create_p50_ms: f64,
    pub create_p99_ms: f64,
    /// CPU time the control plane used per VM over the create phase (create
    /// call to running), in milliseconds: a figure that, unlike the rate,
    /// does not depend on what else the machine was doing.
    pub server_cpu_ms_per_vm: f64,
    /// The same for this process: the simulated hosts and the load generator.
    pub bench_cpu_ms_per_vm: f64,
    /// The machine's 1-minute load average over the create phase (2 means
    /// both cores busy): above about 2.5, something else competed.
    pub create_load_1m: f64,
    /// 2,000 GETs of one VM by name, from the request to the last byte.
    pub get_p99_ms: f64,
    /// From the request to the last byte of the response, over
    /// `list_pages` pages of 1,000 read one after the other once every VM
    /// runs.
    pub list_page_p99_ms: f64,
    pub list_pages: usize,
    /// The load generator's parsing of such a page into a JSON value,
    /// after its last byte (not part of `list_page_p99_ms`).
    pub list_page_parse_p99_ms: f64,
    /// Lifecycle operations (stop, start, delete) after every VM ran.
    pub ops: usize,
    pub ops_per_s: f64,
    pub stop_p99_ms: f64,
    pub start_p99_ms: f64,
    pub delete_p99_ms: f64,
    /// Filtered list pages read while the lifecycle operations ran.
    pub list_page_under_load_p99_ms: f64,
    /// VMs deleted by the lifecycle operations that the agents still run
    /// or the control plane does not show as deleted after the run.
    pub delete_mismatches: usize,
    /// VMs deleted by the lifecycle operations.
    pub deleted: usize,
    /// Migrations asked for, completed, and failed (rolled back) or not
    /// finished within the time allowed.
    pub migrations: usize,
    pub migrations_completed: usize,
    pub migrations_failed: usize,
    /// Migration requests' latency (the call), and from the request to the
    /// workflow's completion.
    pub migrate_call_p99_ms: f64,
    pub migration_p50_ms: f64,
    pub migration_p99_ms: f64,
    /// Migrated VMs that are not running on exactly the host the control
    /// plane names, a different one from where they were.
    pub migration_mismatches: usize,
    /// The control plane's resident memory at the end of the run (after
    /// the lifecycle operations and migrations).
    pub server_rss_bytes: u64,
    /// ... right after the last VM created runs.
    pub server_rss_after_create_bytes: u64,
    /// ... at its highest during the run (the kernel's high-water mark).
    pub server_peak_rss_bytes: u64,
    /// This process (simulated hosts and load generator), for planning runs.
    pub bench_rss_bytes: u64,
    /// The database file and its WAL.
    pub db_bytes: u64,
    /// The WAL's part of `db_bytes` (the store keeps the WAL's disk space
    /// between restarts, up to a limit).
    pub wal_bytes: u64,
    pub restart_to_serving_ms: f64,
    pub sampled: usize,
    pub mismatches: usize,
}

/// What every phase of one run measured.
pub struct Phases {
    pub hosts: usize,
    pub vms: usize,
    /// Connections the simulated hosts held.
    pub agent_connections: usize,
    pub created: Created,
    pub reads: Reads,
    pub lifecycle: Lifecycle,
    pub delete_mismatches: usize,
    pub heartbeats: Heartbeats,
    /// VMs compared between the control plane and the agents, and how many
    /// differed.
    pub sampled: usize,
    pub mismatches: usize,
    pub footprint: Footprint,
    /// This process's resident memory at the end.
    pub bench_rss_bytes: u64,
    pub restart_to_serving_ms: f64,
}

impl ScaleReport {
    /// The figures of a run.
    pub fn new(p: Phases) -> Self {
        let Phases {
            hosts,
            vms,
            agent_connections,
            created: mut c,
            reads: mut r,
            lifecycle: mut l,
            delete_mismatches,
            heartbeats,
            sampled,
            mismatches,
            footprint,
            bench_rss_bytes,
            restart_to_serving_ms,
        } = p;
        let m = &mut l.migrations;
        ScaleReport {
            hosts,
            hosts_connected: heartbeats.connected,
            agent_connections,
            heartbeat_interval_s: heartbeats.interval_s,
            missed_heartbeat_ratio: heartbeats.missed_ratio,
            vms,
            vms_running: c.vms_running,
            create_per_s: vms as f64 / c.all_running_s.max(1e-9),
            create_p50_ms: percentile(&mut c.call_ms, 0.5),
            create_p99_ms: percentile(&mut c.call_ms, 0.99),
            server_cpu_ms_per_vm: c.server_cpu_s * 1000.0 / vms.max(1) as f64,
            bench_cpu_ms_per_vm: c.bench_cpu_s * 1000.0 / vms.max(1) as f64,
            create_load_1m: c.load_1m,
            get_p99_ms: percentile(&mut r.get_ms, 0.99),
            list_page_p99_ms: percentile(&mut r.list_ms, 0.99),
            list_pages: r.list_ms.len(),
            list_page_parse_p99_ms: percentile(&mut r.list_parse_ms, 0.99),
            ops: l.stop_ms.len() + l.start_ms.len() + l.delete_ms.len(),
            ops_per_s: l.ops_per_s,
            stop_p99_ms: percentile(&mut l.stop_ms, 0.99),
            start_p99_ms: percentile(&mut l.start_ms, 0.99),
            delete_p99_ms: percentile(&mut l.delete_ms, 0.99),
            list_page_under_load_p99_ms: percentile(&mut l.list_ms, 0.99),
            delete_mismatches,
            deleted: l.deleted.len(),
            migrations: m.asked,
            migrations_completed: m.completed,
            migrations_failed: m.failed,
            migrate_call_p99_ms: percentile(&mut m.call_ms, 0.99),
            migration_p50_ms: percentile(&mut m.done_ms, 0.5),
            migration_p99_ms: percentile(&mut m.done_ms, 0.99),
            migration_mismatches: m.mismatches,
            server_rss_bytes: footprint.rss_bytes,
            server_rss_after_create_bytes: c.server_rss_bytes,
            server_peak_rss_bytes: footprint.peak_rss_bytes,
            bench_rss_bytes,
            db_bytes: footprint.db_bytes,
            wal_bytes: footprint.wal_bytes,
            restart_to_serving_ms,
            sampled,
            mismatches,
        }
    }

    /// The report as a table's rows, for people.
    pub fn table(&self) -> Vec<(&'static str, String)> {
        let r = self;
        vec![
            (
                "hosts connected",
                format!("{} of {}", r.hosts_connected, r.hosts),
            ),
            (
                "missed heartbeats",
                format!("{:.3}%", r.missed_heartbeat_ratio * 100.0),
            ),
            ("VMs running", format!("{} of {}", r.vms_running, r.vms)),
            ("create → running", format!("{:.0} VMs/s", r.create_per_s)),
            ("create call p99", format!("{:.1} ms", r.create_p99_ms)),
            (
                "CPU per VM created",
                format!(
                    "control plane {:.3} ms, simulated hosts + load {:.3} ms (load average {:.1})",
                    r.server_cpu_ms_per_vm, r.bench_cpu_ms_per_vm, r.create_load_1m
                ),
            ),
            ("GET one VM p99", format!("{:.1} ms", r.get_p99_ms)),
            (
                "list page (1000) p99",
                format!(
                    "{:.1} ms over {} pages (then parsing one: p99 {:.1} ms)",
                    r.list_page_p99_ms, r.list_pages, r.list_page_parse_p99_ms
                ),
            ),
            (
                "lifecycle ops (stop/start/delete)",
                format!(
                    "{} at {:.0}/s; p99 stop {:.1} ms, start {:.1} ms, delete {:.1} ms",
                    r.ops, r.ops_per_s, r.stop_p99_ms, r.start_p99_ms, r.delete_p99_ms
                ),
            ),
            (
                "migrations (cold, simulated hosts)",
                format!(
                    "{} of {} completed ({} failed); p50 {:.0} ms, p99 {:.0} ms to complete; {} mismatches",
                    r.migrations_completed,
                    r.migrations,
                    r.migrations_failed,
                    r.migration_p50_ms,
                    r.migration_p99_ms,
                    r.migration_mismatches
                ),
            ),
            (
                "list page under load p99",
                format!("{:.1} ms", r.list_page_under_load_p99_ms),
            ),
            (
                "server RSS",
                format!(
                    "{:.1} MiB at the end, {:.1} MiB after the creates, {:.1} MiB at most",
                    r.server_rss_bytes as f64 / 1048576.0,
                    r.server_rss_after_create_bytes as f64 / 1048576.0,
                    r.server_peak_rss_bytes as f64 / 1048576.0
                ),
            ),
            (
                "simulated hosts' process RSS",
                format!("{:.1} MiB", r.bench_rss_bytes as f64 / 1048576.0),
            ),
            (
                "database",
                format!(
                    "{:.1} MiB (WAL {:.1} MiB)",
                    r.db_bytes as f64 / 1048576.0,
                    r.wal_bytes as f64 / 1048576.0
                ),
            ),
            (
                "restart to serving",
                format!("{:.0} ms", r.restart_to_serving_ms),
            ),
            (
                "mismatches",
                format!("{} of {} sampled", r.mismatches, r.sampled),
            ),
                ]
    }
}
