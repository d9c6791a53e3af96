//! Property tests: on random topologies and random requests, the engine
//! never places a VM where a hard rule forbids it, never calls a VM
//! unplaceable when some host fits, and explains every host of an
//! unplaceable VM. The rules are re-checked here by a deliberately plain
//! checker that shares no code with the engine's fast path.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use virt8ra_api::{GroupRule, LatencyBound, Level, PlacementConstraints, Tier};
use virt8ra_placement::geo;
use virt8ra_placement::{Engine, HostInfo, Request, Resources, SiteInfo, Weights};

const COUNTRIES: [&str; 5] = ["ES", "DE", "PL", "FR", "CH"];
const CITIES: [&str; 5] = ["Madrid", "Berlin", "Warsaw", "Paris", "Zurich"];

fn site_strategy() -> impl Strategy<Value = (usize, usize, bool, f64, f64)> {
    (
        0..5usize,
        0..4usize,
        any::<bool>(),
        36.0..60.0f64,
        -9.0..25.0f64,
    )
}

fn host_strategy() -> impl Strategy<Value = (usize, u32, u64, bool, bool, bool, u64)> {
    (
        0..8usize,
        1..32u32,
        1..64u64,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0..48u64,
    )
}

#[derive(Debug, Clone)]
struct Req {
    vcpus: u32,
    mem_gib: u64,
    countries: Vec<usize>,
    deny: Vec<usize>,
    tier: Option<bool>,
    kvm: bool,
    flag: bool,
    latency: Option<(usize, f64)>,
    anti: Option<u8>,
}

fn req_strategy() -> impl Strategy<Value = Req> {
    (
        1..16u32,
        1..48u64,
        proptest::collection::vec(0..5usize, 0..3),
        proptest::collection::vec(0..5usize, 0..2),
        proptest::option::of(any::<bool>()),
        any::<bool>(),
        any::<bool>(),
        proptest::option::of((0..5usize, 1.0..40.0f64)),
        proptest::option::of(0..4u8),
    )
        .prop_map(
            |(vcpus, mem_gib, countries, deny, tier, kvm, flag, latency, anti)| Req {
                vcpus,
                mem_gib,
                countries,
                deny,
                tier,
                kvm,
                flag,
                latency,
                anti,
            },
        )
}

fn build(
    sites: &[(usize, usize, bool, f64, f64)],
    hosts: &[(usize, u32, u64, bool, bool, bool, u64)],
) -> (Vec<SiteInfo>, Vec<HostInfo>) {
    let s: Vec<SiteInfo> = sites
        .iter()
        .enumerate()
        .map(|(i, (c, p, edge, lat, lon))| SiteInfo {
            name: format!("s{i}"),
            provider: format!("p{p}"),
            provider_country: COUNTRIES[*p % 5].into(),
            provider_jurisdiction: "EU".into(),
            country: COUNTRIES[*c].into(),
            tier: if *edge { Tier::Edge } else { Tier::Core },
            lat: *lat,
            lon: *lon,
            carbon: Some(100.0 + 50.0 * i as f64),
            pue: None,
            price_vcpu_hour: None,
            price_gib_hour: None,
            access_latency_ms: None,
            labels: Default::default(),
        })
        .collect();
    let h: Vec<HostInfo> = hosts
        .iter()
        .enumerate()
        .map(|(i, (site, vcpus, mem, kvm, flag, ready, _))| HostInfo {
            name: format!("h{i}"),
            site: format!("s{}", site % s.len()),
            arch: "x86_64".into(),
            vcpus: *vcpus,
            memory_mib: mem * 1024,
            disk_gib: 500,
            cpu_flags: if *flag {
                vec!["avx512f".into()]
            } else {
                vec![]
            },
            accelerators: vec![],
            kvm: *kvm,
            confidential: vec![],
            ready: *ready || i % 3 != 0,
            cpu_ratio: 1.0,
            mem_ratio: 1.0,
        })
        .collect();
    (s, h)
}

fn to_request(r: &Req) -> Request {
    let c = PlacementConstraints {
        countries: r
            .countries
            .iter()
            .map(|i| COUNTRIES[*i].to_string())
            .collect(),
        deny_countries: r
            .deny
            .iter()
            .filter(|d| !r.countries.contains(d))
            .map(|i| COUNTRIES[*i].to_string())
            .collect(),
        tier: r.tier.map(|e| if e { Tier::Edge } else { Tier::Core }),
        require_kvm: r.kvm,
        cpu_flags: if r.flag {
            vec!["avx512f".into()]
        } else {
            vec![]
        },
        max_latency: r.latency.map(|(c, ms)| LatencyBound {
            from: Some(CITIES[c].into()),
            latitude: None,
            longitude: None,
            max_rtt_ms: ms,
        }),
        anti_affinity: r.anti.map(|g| GroupRule {
            group: format!("g{g}"),
            level: Level::Site,
        }),
        ..Default::default()
    };
    Request::new(
        Resources {
            vcpus: r.vcpus,
            memory_mib: r.mem_gib * 1024,
            disk_gib: 10,
        },
        c,
        Weights::default(),
    )
    .unwrap()
}

/// The plain checker. `group_sites[g]` = sites holding members of group g.
fn plain_ok(
    e: &Engine,
    host: &str,
    r: &Req,
    used: &std::collections::HashMap<String, (u32, u64)>,
    group_sites: &std::collections::HashMap<u8, Vec<String>>,
) -> bool {
    let h = e.host(host).unwrap();
    let s = e.site_of(h);
    let ci = COUNTRIES.iter().position(|c| *c == s.country).unwrap();
    if !r.countries.is_empty() && !r.countries.contains(&ci) {
        return false;
    }
    if r.deny.contains(&ci) && !r.countries.contains(&ci) {
        return false;
    }
    if let Some(edge) = r.tier {
        if (s.tier == Tier::Edge) != edge {
            return false;
        }
    }
    if !h.info.ready || (r.kvm && !h.info.kvm) {
        return false;
    }
    if r.flag && !h.info.cpu_flags.iter().any(|f| f == "avx512f") {
        return false;
    }
    if let Some((c, ms)) = r.latency {
        let (lat, lon) = geo::city(CITIES[c]).unwrap();
        let d = geo::distance_km(lat, lon, s.lat, s.lon);
        let access = if s.tier == Tier::Edge { 0.5 } else { 1.0 };
        if d * 2.0 * 1.5 / 200.0 + access > ms {
            return false;
        }
    }
    if let Some(g) = r.anti {
        if group_sites.get(&g).is_some_and(|v| v.contains(&s.name)) {
            return false;
        }
    }
    let (uc, um) = used.get(host).copied().unwrap_or((0, 0));
    uc + r.vcpus <= h.info.vcpus && um + r.mem_gib * 1024 <= h.info.memory_mib
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn placements_never_break_a_hard_rule(
        sites in proptest::collection::vec(site_strategy(), 1..6),
        hosts in proptest::collection::vec(host_strategy(), 1..24),
        reqs in proptest::collection::vec(req_strategy(), 1..12),
    ) {
        let (s, h) = build(&sites, &hosts);
        let mut e = Engine::new(s, h).unwrap();
        let mut used: std::collections::HashMap<String, (u32, u64)> = Default::default();
        let mut group_sites: std::collections::HashMap<u8, Vec<String>> = Default::default();
        for (i, r) in reqs.iter().enumerate() {
            let req = to_request(r);
            let feasible: Vec<String> = e
                .hosts()
                .map(|h| h.info.name.clone())
                .filter(|n| plain_ok(&e, n, r, &used, &group_sites))
                .collect();
            match e.place(&req) {
                Ok(d) => {
                    prop_assert!(
                        feasible.contains(&d.host),
                        "placed on {} which breaks a rule; feasible: {:?}", d.host, feasible
                    );
                    e.commit(&format!("vm{i}"), &d.host, &req).unwrap();
                    let u = used.entry(d.host.clone()).or_default();
                    u.0 += r.vcpus;
                    u.1 += r.mem_gib * 1024;
                    if let Some(g) = r.anti {
                        group_sites.entry(g).or_default().push(d.site.clone());
                    }
                }
                Err(u) => {
                    prop_assert!(feasible.is_empty(), "unplaceable but {:?} fit: {}", feasible, u.message);
                    let sum: usize = u.counts.iter().map(|(_, n)| n).sum();
                    prop_assert_eq!(sum, e.host_count(), "explanation does not account for every host: {}", u.message);
                }
            }
        }
    }
}
