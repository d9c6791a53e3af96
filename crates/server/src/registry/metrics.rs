//! The control plane's Prometheus metrics: the counters and histograms
//! that code on hot paths bumps (API requests, placement decisions,
//! migrations, store commits), and the exposition of them together with
//! the gauges computed at scrape time from the in-memory indexes.
//!
//! Built with `prometheus-client` (the Prometheus project's Rust client),
//! not by hand, so the text is what Prometheus parses. Every label value is
//! bounded: a route template (never a raw path), a status code, a method,
//! a placement rule, a migration mode or outcome, a VM phase, a host state,
//! or a site with its provider and country (bounded by the topology). No
//! label names a VM: a million VMs make the same series as ten.
//!
//! The counters are atomics; a histogram takes the crate's own short lock
//! per observation; a labelled family takes a read lock on its map to find
//! the series (a write lock only the first time a label set is seen). The
//! values computed from the indexes cost nothing until a scrape.
//!
//! Held in the control plane's state (not a process-wide static), so two
//! control planes in one process (the in-process test harness) count their
//! own.

use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use virt8ra_placement::Unplaceable;

/// The `Content-Type` of [`Metrics::encode`]'s text (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// What every metric's name starts with.
const PREFIX: &str = "virt8ra";

/// Route label of a request no route matched (its raw path is never a label).
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Seconds: request latency (0.5 ms .. 5 s; watches and channels are
/// measured to their first byte, see `http::metrics`).
const REQUEST_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Seconds: one placement decision in the engine (microseconds to ms).
const PLACEMENT_BUCKETS: [f64; 11] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.05, 0.25,
];
/// Seconds: a store commit (one fsync'd group of writes).
const COMMIT_BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// Seconds: a migration from request to end, and a guest's downtime.
const MIGRATION_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    route: String,
}

/// What a placement decision was for.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Purpose {
    /// A new or pending VM (`POST /vms`, the scheduler's passes).
    Schedule,
    /// The target of a migration the engine chooses.
    Migrate,
}

impl Purpose {
    fn as_str(self) -> &'static str {
        match self {
            Purpose::Schedule => "schedule",
            Purpose::Migrate => "migrate",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PurposeLabels {
    purpose: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    purpose: &'static str,
    /// The rule that excluded the last candidates (`placement::Rule::key`),
    /// or `no_hosts`.
    rule: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    mode: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SiteLabels {
    site: String,
    provider: String,
    country: String,
}

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

fn requests_histogram() -> Histogram {
    Histogram::new(REQUEST_BUCKETS)
}
fn placement_histogram() -> Histogram {
    Histogram::new(PLACEMENT_BUCKETS)
}
fn migration_histogram() -> Histogram {
    Histogram::new(MIGRATION_BUCKETS)
}

/// The control plane's metrics. Cheap to bump from any thread.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_seconds: HistogramFamily<RouteLabels>,
    placements: Family<PurposeLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    placement_seconds: HistogramFamily<PurposeLabels>,
    migrations_started: Family<ModeLabels, Counter>,
    migrations_finished: Family<OutcomeLabels, Counter>,
    migration_seconds: HistogramFamily<OutcomeLabels>,
    migration_downtime: HistogramFamily<ModeLabels>,
    commit_seconds: Histogram,
    commit_writes: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Values read from the rest of the control plane at scrape time.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// VMs by phase (every phase, zeros included).
    pub vms_by_phase: Vec<(&'static str, u64)>,
    /// VMs not deleted that have a site, by (site, provider, country).
    pub vms_by_site: Vec<((String, String, String), u64)>,
    /// Hosts by state as the API shows it (every state, zeros included).
    pub hosts_by_state: Vec<(&'static str, u64)>,
    pub agents_connected: u64,
    pub heartbeats: u64,
    pub relay_bytes: u64,
    /// The longest time since a connected agent's last heartbeat.
    pub oldest_heartbeat: Duration,
    /// Image bytes the control plane served (over the long link).
    pub image_bytes_served: u64,
    pub uptime: Duration,
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::with_prefix(PREFIX),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(requests_histogram),
            placements: Family::default(),
            refusals: Family::default(),
            placement_seconds: Family::new_with_constructor(placement_histogram),
            migrations_started: Family::default(),
            migrations_finished: Family::default(),
            migration_seconds: Family::new_with_constructor(migration_histogram),
            migration_downtime: Family::new_with_constructor(migration_histogram),
            commit_seconds: Histogram::new(COMMIT_BUCKETS),
            commit_writes: Counter::default(),
        };
        m.register()
    }

    fn register(mut self) -> Metrics {
        let r = &mut self.registry;
        r.register(
            "api_requests",
            "API requests answered, by method, route template and status",
            self.requests.clone(),
        );
        r.register_with_unit(
            "api_request_duration",
            "Time to answer an API request (to the response head), by method and route template",
            Unit::Seconds,
            self.request_seconds.clone(),
        );
        r.register(
            "placement_decisions",
            "Placement decisions that found a host, by purpose",
            self.placements.clone(),
        );
        r.register(
            "placement_refusals",
            "Placement decisions that found no host, by purpose and the rule that excluded the \
             last candidates (every attempt counts: a pending VM is tried again on each pass)",
            self.refusals.clone(),
        );
        r.register_with_unit(
            "placement_duration",
            "Time the placement engine took for one decision, by purpose",
            Unit::Seconds,
            self.placement_seconds.clone(),
        );
        r.register(
            "migrations_started",
            "Migrations started, by mode",
            self.migrations_started.clone(),
        );
        r.register(
            "migrations_finished",
            "Migrations ended, by mode and outcome (completed or failed)",
            self.migrations_finished.clone(),
        );
        r.register_with_unit(
            "migration_duration",
            "Migrations from request to end, by mode and outcome",
            Unit::Seconds,
            self.migration_seconds.clone(),
        );
        r.register_with_unit(
            "migration_downtime",
            "How long a completed migration's guest did not run, by mode",
            Unit::Seconds,
            self.migration_downtime.clone(),
        );
        r.register_with_unit(
            "store_commit_duration",
            "Time of one store commit (a group of writes, made durable together)",
            Unit::Seconds,
            self.commit_seconds.clone(),
        );
        r.register(
            "store_commit_writes",
            "Writes made durable by the store's commits",
            self.commit_writes.clone(),
        );
        self
    }

    /// One API request answered.
    pub fn request(&self, method: &'static str, route: &str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                method,
                route: route.to_string(),
                status,
            })
            .inc();
        self.request_seconds
            .get_or_create(&RouteLabels {
                method,
                route: route.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// One placement decision: `Ok` found a host; `Err` names the rule
    /// that refused it.
    pub fn placement(&self, purpose: Purpose, outcome: Result<(), &'static str>, took: Duration) {
        let purpose = purpose.as_str();
        let labels = PurposeLabels { purpose };
        match outcome {
            Ok(()) => {
                self.placements.get_or_create(&labels).inc();
            }
            Err(rule) => {
                self.refusals
                    .get_or_create(&RefusalLabels { purpose, rule })
                    .inc();
            }
        }
        self.placement_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// A migration started in `mode` (`live`, `cold`).
    pub fn migration_started(&self, mode: &'static str) {
        self.migrations_started
            .get_or_create(&ModeLabels { mode })
            .inc();
    }

    /// A migration ended (`completed` or `failed`) after `total`, its guest
    /// down for `downtime` when known.
    pub fn migration_finished(
        &self,
        mode: &'static str,
        outcome: &'static str,
        total: Duration,
        downtime: Option<Duration>,
    ) {
        let labels = OutcomeLabels { mode, outcome };
        self.migrations_finished.get_or_create(&labels).inc();
        self.migration_seconds
            .get_or_create(&labels)
            .observe(total.as_secs_f64());
        if let Some(d) = downtime {
            self.migration_downtime
                .get_or_create(&ModeLabels { mode })
                .observe(d.as_secs_f64());
        }
    }

    /// One store commit of `writes` writes that took `took` (called on the
    /// store's writer thread).
    pub fn commit(&self, took: Duration, writes: usize) {
        self.commit_seconds.observe(took.as_secs_f64());
        self.commit_writes.inc_by(writes as u64);
    }

    /// The whole exposition: the counters and histograms, then the values
    /// of `s` (computed by the caller at scrape time).
    pub fn encode(&self, s: Snapshot) -> Result<String, std::fmt::Error> {
        use prometheus_client::encoding::prometheus_text::encode;
        let mut out = String::with_capacity(16 * 1024);
        encode(&mut out, &self.registry)?;
        encode(&mut out, &scraped(s))?;
        Ok(out)
    }
}

/// Runs one placement decision of the engine, timed and counted: a
/// refusal under the rule that excluded the last candidates (hosts are
/// counted under the first rule they break, in a fixed order, so the last
/// rule with a count is the one no remaining host passed), `no_hosts` when
/// no host has joined.
pub fn timed<T>(
    m: &Metrics,
    purpose: Purpose,
    place: impl FnOnce() -> Result<T, Unplaceable>,
) -> Result<T, Unplaceable> {
    let started = Instant::now();
    let out = place();
    let took = started.elapsed();
    let outcome = match &out {
        Ok(_) => Ok(()),
        Err(u) => Err(u.counts.last().map_or("no_hosts", |(rule, _)| rule.key())),
    };
    m.placement(purpose, outcome, took);
    out
}

/// A registry of the values read at scrape time, made for one scrape (so a
/// site that went away leaves no stale series behind).
fn scraped(s: Snapshot) -> Registry {
    let mut r = Registry::with_prefix(PREFIX);
    let phases = Family::<PhaseLabels, Gauge>::default();
    for (phase, n) in s.vms_by_phase {
        phases.get_or_create(&PhaseLabels { phase }).set(n as i64);
    }
    r.register(
        "vms",
        "VMs by phase (deleted ones are kept as history)",
        phases,
    );
    let sites = Family::<SiteLabels, Gauge>::default();
    for ((site, provider, country), n) in s.vms_by_site {
        sites
            .get_or_create(&SiteLabels {
                site,
                provider,
                country,
            })
            .set(n as i64);
    }
    r.register(
        "site_vms",
        "VMs placed at a site and not deleted, by site, provider and country",
        sites,
    );
    let states = Family::<StateLabels, Gauge>::default();
    for (state, n) in s.hosts_by_state {
        states.get_or_create(&StateLabels { state }).set(n as i64);
    }
    r.register(
        "hosts",
        "Hosts by state (unreachable: no heartbeat within three intervals)",
        states,
    );
    r.register(
        "agents_connected",
        "Agents whose channel is open",
        Gauge::<i64>::default().tap(s.agents_connected as i64),
    );
    r.register(
        "heartbeats_received",
        "Agent heartbeats received since the control plane started",
        ConstCounter::new(s.heartbeats),
    );
    r.register_with_unit(
        "heartbeat_age_max",
        "The longest time since a connected agent's last heartbeat (its lag; \
         unreachable past three heartbeat intervals)",
        Unit::Seconds,
        Gauge::<f64, std::sync::atomic::AtomicU64>::default().tap(s.oldest_heartbeat.as_secs_f64()),
    );
    r.register_with_unit(
        "image_served",
        "Image bytes the control plane served, to hosts, the admin and other control planes: \
         the long-link traffic that site-local distribution saves",
        Unit::Bytes,
        ConstCounter::new(s.image_bytes_served),
    );
    r.register_with_unit(
        "relay",
        "Bytes of live migrations relayed through the control plane",
        Unit::Bytes,
        ConstCounter::new(s.relay_bytes),
    );
    r.register_with_unit(
        "uptime",
        "Seconds since the control plane started",
        Unit::Seconds,
        Gauge::<f64, std::sync::atomic::AtomicU64>::default().tap(s.uptime.as_secs_f64()),
    );
    r
}

/// Sets a gauge and hands it back.
trait Tap<N> {
    fn tap(self, v: N) -> Self;
}

impl Tap<i64> for Gauge<i64> {
    fn tap(self, v: i64) -> Self {
        self.set(v);
        self
    }
}

impl Tap<f64> for Gauge<f64, std::sync::atomic::AtomicU64> {
    fn tap(self, v: f64) -> Self {
        self.set(v);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Parses the text format as Prometheus reads it: `# HELP` and
    /// `# TYPE` lines, and samples `name{label="value",...} number`, each
    /// sample of a family declared before it. Returns sample -> value.
    fn parse(text: &str) -> BTreeMap<String, f64> {
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut samples = BTreeMap::new();
        let valid_name = |n: &str| {
            !n.is_empty()
                && n.chars().enumerate().all(|(i, c)| {
                    c == '_' || c == ':' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())
                })
        };
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                let mut p = rest.splitn(3, ' ');
                let (kind, name, what) = (p.next(), p.next(), p.next());
                let (Some(kind), Some(name), Some(what)) = (kind, name, what) else {
                    panic!("bad comment line: {line}");
                };
                assert!(valid_name(name), "{line}");
                match kind {
                    "HELP" => {}
                    "TYPE" => {
                        assert!(["counter", "gauge", "histogram"].contains(&what), "{line}");
                        assert!(
                            types.insert(name.into(), what.into()).is_none(),
                            "twice: {line}"
                        );
                    }
                    _ => panic!("unknown comment: {line}"),
                }
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
            let v: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
            };
            let name = series.split('{').next().unwrap_or_default();
            assert!(valid_name(name), "{line}");
            if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
                let inner = labels
                    .strip_prefix('{')
                    .and_then(|l| l.strip_suffix('}'))
                    .unwrap_or_else(|| panic!("{line}"));
                for pair in inner.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
                    assert!(valid_name(k), "{line}");
                    assert!(!v.trim_end_matches('"').contains('"'), "{line}");
                }
            }
            let family = types.keys().find(|f| {
                name == f.as_str()
                    || ["_total", "_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| name.strip_suffix(s) == Some(f.as_str()))
            });
            assert!(family.is_some(), "sample of no declared family: {line}");
            assert!(
                samples.insert(series.to_string(), v).is_none(),
                "twice: {line}"
            );
        }
        samples
    }

    #[test]
    fn the_exposition_parses_and_counts_what_happened() {
        let m = Metrics::new();
        let ms = Duration::from_millis;
        m.request("POST", "/api/v1/vms", 201, ms(3));
        m.request("GET", "/api/v1/vms/{key}", 404, ms(1));
        m.request("GET", "/api/v1/vms/{key}", 404, ms(2));
        m.placement(Purpose::Schedule, Ok(()), Duration::from_micros(40));
        m.placement(Purpose::Schedule, Err("memory"), Duration::from_micros(60));
        m.migration_started("live");
        m.migration_finished("live", "completed", ms(2500), Some(ms(80)));
        m.commit(ms(2), 7);
        let text = m
            .encode(Snapshot {
                vms_by_phase: vec![("running", 2), ("deleted", 1)],
                vms_by_site: vec![(("es-1".into(), "acme".into(), "ES".into()), 2)],
                hosts_by_state: vec![("ready", 3), ("unreachable", 0)],
                agents_connected: 3,
                heartbeats: 42,
                relay_bytes: 1000,
                oldest_heartbeat: ms(700),
                image_bytes_served: 16 << 20,
                uptime: ms(1500),
            })
            .unwrap();
        let s = parse(&text);
        let get = |k: &str| {
            s.get(k)
                .copied()
                .unwrap_or_else(|| panic!("no {k} in\n{text}"))
        };
        assert_eq!(
            get(
                r#"virt8ra_api_requests_total{method="GET",route="/api/v1/vms/{key}",status="404"}"#
            ),
            2.0
        );
        assert_eq!(
            get(r#"virt8ra_api_request_duration_seconds_count{method="POST",route="/api/v1/vms"}"#),
            1.0
        );
        assert_eq!(
            get(
                r#"virt8ra_api_request_duration_seconds_bucket{method="GET",route="/api/v1/vms/{key}",le="0.001"}"#
            ),
            1.0
        );
        assert_eq!(
            get(r#"virt8ra_placement_decisions_total{purpose="schedule"}"#),
            1.0
        );
        assert_eq!(
            get(r#"virt8ra_placement_refusals_total{purpose="schedule",rule="memory"}"#),
            1.0
        );
        assert_eq!(
            get(r#"virt8ra_placement_duration_seconds_count{purpose="schedule"}"#),
            2.0
        );
        assert_eq!(get(r#"virt8ra_migrations_started_total{mode="live"}"#), 1.0);
        assert_eq!(
            get(r#"virt8ra_migrations_finished_total{mode="live",outcome="completed"}"#),
            1.0
        );
        assert_eq!(
            get(r#"virt8ra_migration_downtime_seconds_sum{mode="live"}"#),
            0.08
        );
        assert_eq!(get("virt8ra_store_commit_writes_total"), 7.0);
        assert_eq!(get("virt8ra_store_commit_duration_seconds_count"), 1.0);
        assert_eq!(get(r#"virt8ra_vms{phase="running"}"#), 2.0);
        assert_eq!(
            get(r#"virt8ra_site_vms{site="es-1",provider="acme",country="ES"}"#),
            2.0
        );
        assert_eq!(get(r#"virt8ra_hosts{state="unreachable"}"#), 0.0);
        assert_eq!(get("virt8ra_heartbeats_received_total"), 42.0);
        assert_eq!(get("virt8ra_relay_bytes_total"), 1000.0);
        assert_eq!(get("virt8ra_heartbeat_age_max_seconds"), 0.7);
        assert_eq!(
            get("virt8ra_image_served_bytes_total"),
            16.0 * 1024.0 * 1024.0
        );
        assert_eq!(get("virt8ra_uptime_seconds"), 1.5);
    }
}
