//! The example topology and the placement benchmark.
//!
//! The example topology is modelled on the public virt8ra testbed: eleven
//! providers in seven EU member states (`shared/data/eu-sites.csv`), core and
//! edge sites. The benchmark grows it to any number of hosts by adding edge
//! sites around each city (about 100 hosts per site), and runs a mixed load:
//! country allow-lists, latency bounds from user cities, anti-affinity
//! groups, and unconstrained VMs, so that between about 4% and 50% of the
//! hosts are feasible for any one request. Deterministic for a given seed.

use std::time::Instant;

use serde::Serialize;
use virt8ra_api::{
    GroupRule, LatencyBound, Level, PlacementConstraints, PlacementPolicy, Strategy, Tier,
};

use crate::engine::Engine;
use crate::model::{HostInfo, Resources, SiteInfo};
use crate::rules::{Request, Weights};

/// site, provider, country, city, lat, lon, tier, gCO2/kWh
pub type SiteRow = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    f64,
    f64,
    Tier,
    f64,
);

pub const EU_SITES: &[SiteRow] = &[
    (
        "es-logrono",
        "provider-a",
        "ES",
        "Logroño",
        42.4627,
        -2.4449,
        Tier::Core,
        130.0,
    ),
    (
        "es-mondragon",
        "provider-b",
        "ES",
        "Mondragón",
        43.0643,
        -2.4899,
        Tier::Edge,
        130.0,
    ),
    (
        "es-madrid",
        "provider-c",
        "ES",
        "Madrid",
        40.4168,
        -3.7038,
        Tier::Core,
        130.0,
    ),
    (
        "nl-ede",
        "provider-d",
        "NL",
        "Ede",
        52.0402,
        5.6649,
        Tier::Core,
        270.0,
    ),
    (
        "nl-amsterdam",
        "provider-e",
        "NL",
        "Amsterdam",
        52.3676,
        4.9041,
        Tier::Edge,
        270.0,
    ),
    (
        "de-karlsruhe",
        "provider-f",
        "DE",
        "Karlsruhe",
        49.0069,
        8.4037,
        Tier::Core,
        380.0,
    ),
    (
        "de-berlin",
        "provider-f",
        "DE",
        "Berlin",
        52.5200,
        13.4050,
        Tier::Edge,
        380.0,
    ),
    (
        "pl-gdansk",
        "provider-g",
        "PL",
        "Gdańsk",
        54.3520,
        18.6466,
        Tier::Edge,
        660.0,
    ),
    (
        "pl-warsaw",
        "provider-h",
        "PL",
        "Warsaw",
        52.2297,
        21.0122,
        Tier::Core,
        660.0,
    ),
    (
        "si-ljubljana",
        "provider-i",
        "SI",
        "Ljubljana",
        46.0569,
        14.5058,
        Tier::Edge,
        240.0,
    ),
    (
        "hr-zagreb",
        "provider-j",
        "HR",
        "Zagreb",
        45.8150,
        15.9819,
        Tier::Core,
        180.0,
    ),
    (
        "fr-paris",
        "provider-k",
        "FR",
        "Paris",
        48.8566,
        2.3522,
        Tier::Core,
        55.0,
    ),
];

fn site_info(i: usize, name: String, lat: f64, lon: f64, tier: Tier) -> SiteInfo {
    let (_, provider, country, _, _, _, _, carbon) = EU_SITES[i % EU_SITES.len()];
    SiteInfo {
        name,
        provider: provider.to_string(),
        provider_country: country.to_string(),
        provider_jurisdiction: "EU".into(),
        country: country.to_string(),
        tier,
        lat,
        lon,
        carbon: Some(carbon),
        pue: Some(if tier == Tier::Core { 1.2 } else { 1.5 }),
        price_vcpu_hour: Some(0.02 + 0.002 * (i % 7) as f64),
        price_gib_hour: Some(0.004 + 0.0005 * (i % 5) as f64),
        access_latency_ms: None,
        labels: Default::default(),
    }
}

/// The example topology's sites (no hosts).
pub fn example_sites() -> Vec<SiteInfo> {
    EU_SITES
        .iter()
        .enumerate()
        .map(|(i, (name, _, _, _, lat, lon, tier, _))| {
            site_info(i, name.to_string(), *lat, *lon, *tier)
        })
        .collect()
}

/// A tiny deterministic PRNG (xorshift64*), so the crate needs no `rand`.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Sites and hosts for `hosts` hosts: the example sites plus edge sites
/// around their cities, about 100 hosts per site.
pub fn topology(hosts: usize, seed: u64) -> (Vec<SiteInfo>, Vec<HostInfo>) {
    let mut rng = Rng::new(seed);
    let mut sites = example_sites();
    let want_sites = (hosts / 100).max(EU_SITES.len());
    let mut i = 0;
    while sites.len() < want_sites {
        let base = i % EU_SITES.len();
        let (name, _, _, _, lat, lon, ..) = EU_SITES[base];
        let jlat = lat + (rng.unit() - 0.5) * 2.0;
        let jlon = lon + (rng.unit() - 0.5) * 3.0;
        sites.push(site_info(
            base,
            format!("{name}-edge-{i}"),
            jlat,
            jlon,
            Tier::Edge,
        ));
        i += 1;
    }
    let classes: [(u32, u64, u64); 3] = [
        (16, 64 * 1024, 1000),
        (32, 128 * 1024, 2000),
        (64, 256 * 1024, 4000),
    ];
    let mut out = Vec::with_capacity(hosts);
    for h in 0..hosts {
        let site = &sites[h % sites.len()];
        let (vcpus, mem, disk) = classes[(rng.below(3)) as usize];
        out.push(HostInfo {
            name: format!("h{h}"),
            site: site.name.clone(),
            arch: "x86_64".into(),
            vcpus,
            memory_mib: mem,
            disk_gib: disk,
            cpu_flags: vec!["avx2".into()],
            accelerators: if h % 50 == 0 {
                vec!["gpu-nvidia".into()]
            } else {
                vec![]
            },
            kvm: true,
            confidential: vec![],
            ready: h % 97 != 0,
            cpu_ratio: 4.0,
            mem_ratio: 1.0,
        });
    }
    (sites, out)
}

const COUNTRIES: [&str; 7] = ["ES", "NL", "DE", "PL", "SI", "HR", "FR"];
const USERS: [&str; 8] = [
    "Barcelona",
    "Munich",
    "Kraków",
    "Rotterdam",
    "Lyon",
    "Split",
    "Hamburg",
    "Seville",
];

/// The mixed load, as requests.
pub fn requests(n: usize, seed: u64, pack_only: bool) -> Vec<(String, Request)> {
    let mut rng = Rng::new(seed ^ 0xABCD);
    let weights = if pack_only {
        Weights {
            pack: true,
            capacity: 1.0,
            energy: 0.0,
            cost: 0.0,
            latency: 0.0,
            balance: 0.0,
        }
    } else {
        Weights::default()
    };
    (0..n)
        .map(|i| {
            let res = Resources {
                vcpus: 1 << rng.below(4),
                memory_mib: 1024 << rng.below(5),
                disk_gib: 10 << rng.below(3),
            };
            let mut c = PlacementConstraints::default();
            match rng.below(10) {
                0..=3 => c.countries = vec![COUNTRIES[rng.below(7) as usize].to_string()],
                4..=5 => {
                    let a = rng.below(7) as usize;
                    c.countries = vec![
                        COUNTRIES[a].to_string(),
                        COUNTRIES[(a + 1 + rng.below(6) as usize) % 7].to_string(),
                    ];
                }
                6..=7 => {
                    c.max_latency = Some(LatencyBound {
                        from: Some(USERS[rng.below(8) as usize].to_string()),
                        latitude: None,
                        longitude: None,
                        max_rtt_ms: 8.0 + rng.below(12) as f64,
                    })
                }
                8 => {
                    c.anti_affinity = Some(GroupRule {
                        group: format!("g{}", i / 4),
                        level: Level::Host,
                    });
                    c.countries = vec![COUNTRIES[rng.below(7) as usize].to_string()];
                }
                _ => {}
            }
            if pack_only {
                c.policy = Some(PlacementPolicy {
                    strategy: Some(Strategy::Pack),
                    ..Default::default()
                });
            }
            let r = Request::new(res, c, weights).unwrap_or_else(|e| panic!("bench request: {e}"));
            (format!("vm{i}"), r)
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub hosts: usize,
    pub sites: usize,
    pub placements: usize,
    pub placed: usize,
    pub unplaceable: usize,
    pub placements_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Hosts with at least one VM, packing policy.
    pub hosts_used: usize,
    /// Hosts used by first-fit-decreasing on the same input and rules.
    pub ffd_hosts_used: usize,
    /// hosts_used / ffd_hosts_used - 1.
    pub pack_overhead_vs_ffd: f64,
    pub index_bytes_per_host: usize,
    /// Share of hosts (%) that pass every hard rule, over a sample of the
    /// load's requests on the empty topology: the least, median and most
    /// constrained request (unconstrained ones give 100).
    pub feasible_pct_min: f64,
    pub feasible_pct_median: f64,
    pub feasible_pct_max: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// First-fit decreasing over the same hosts and hard rules: the baseline for
/// packing quality. VMs largest first; hosts largest first (so the baseline,
/// like the engine, opens big hosts before small ones).
pub fn ffd_hosts_used(sites: &[SiteInfo], hosts: &[HostInfo], reqs: &[(String, Request)]) -> usize {
    let Ok(mut e) = Engine::new(sites.to_vec(), hosts.to_vec()) else {
        return 0;
    };
    let mut order: Vec<&(String, Request)> = reqs.iter().collect();
    order.sort_by_key(|(_, r)| std::cmp::Reverse((r.res.memory_mib, r.res.vcpus)));
    let mut by_size: Vec<&HostInfo> = hosts.iter().collect();
    by_size.sort_by_key(|h| std::cmp::Reverse(h.memory_mib));
    let names: Vec<String> = by_size.iter().map(|h| h.name.clone()).collect();
    for (vm, r) in order {
        let found = names
            .iter()
            .find(|n| e.host(n).is_some_and(|h| e.check_host(h, r).is_ok()))
            .cloned();
        if let Some(h) = found {
            let _ = e.commit(vm, &h, r);
        }
    }
    e.hosts().filter(|h| h.vms > 0).count()
}

/// Runs the benchmark: `placements` decisions (each committed) over a
/// generated topology of `hosts` hosts.
pub fn run_bench(hosts: usize, placements: usize, seed: u64) -> BenchReport {
    run_bench_with(hosts, placements, seed, true)
}

/// [`run_bench`] with a choice of scoring: `pack_only` scores by packing
/// alone (the quality comparison with first-fit decreasing is meaningful
/// only then); otherwise the requests carry the operator defaults
/// ([`Weights::default`]: pack plus energy, cost, latency and balance), as
/// the control plane schedules them.
pub fn run_bench_with(hosts: usize, placements: usize, seed: u64, pack_only: bool) -> BenchReport {
    let (sites, hinfo) = topology(hosts, seed);
    let reqs = requests(placements, seed, pack_only);
    let mut e = match Engine::new(sites.clone(), hinfo.clone()) {
        Ok(e) => e,
        Err(err) => panic!("generated topology is invalid: {err}"),
    };
    // How selective the load is, measured on the empty topology before the
    // timed run (a brute-force check of every host for a sample of requests).
    let mut feasible: Vec<f64> = reqs
        .iter()
        .step_by((reqs.len() / 100).max(1))
        .map(|(_, r)| {
            let n = e.hosts().filter(|h| e.check_host(h, r).is_ok()).count();
            100.0 * n as f64 / e.host_count().max(1) as f64
        })
        .collect();
    feasible.sort_by(f64::total_cmp);
    let mut lat = Vec::with_capacity(placements);
    let mut placed = 0;
    let start = Instant::now();
    for (vm, r) in &reqs {
        let t = Instant::now();
        if let Ok(d) = e.place(r) {
            let _ = e.commit(vm, &d.host, r);
            placed += 1;
        }
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let hosts_used = e.hosts().filter(|h| h.vms > 0).count();
    let ffd = ffd_hosts_used(&sites, &hinfo, &reqs);
    BenchReport {
        hosts,
        sites: sites.len(),
        placements,
        placed,
        unplaceable: placements - placed,
        placements_per_s: placements as f64 / elapsed.max(1e-9),
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
        max_us: lat.last().copied().unwrap_or(0.0),
        hosts_used,
        ffd_hosts_used: ffd,
        pack_overhead_vs_ffd: if ffd == 0 {
            0.0
        } else {
            hosts_used as f64 / ffd as f64 - 1.0
        },
        index_bytes_per_host: e.bytes_per_host(),
        feasible_pct_min: feasible.first().copied().unwrap_or(0.0),
        feasible_pct_median: percentile(&feasible, 0.5),
        feasible_pct_max: feasible.last().copied().unwrap_or(0.0),
    }
}
