//! A second, stricter property test: the engine against an independent
//! model of the whole state.
//!
//! `properties.rs` re-checks residency, latency, features and capacity. This
//! one widens the ground the fast path must agree on: overcommit ratios,
//! provider deny lists and provider nationality (with a non-EU and an
//! EEA-only country in the mix), accelerators, affinity and anti-affinity at
//! every level, hosts going out of service, and VMs being released. The test
//! keeps its own record of what is allocated where and of every group's
//! members, computes feasibility and the first broken rule of every host with
//! code that shares nothing with the engine (its own haversine, its own rule
//! order), and requires:
//!
//! - a placement is on a host the model finds feasible;
//! - "unplaceable" only when the model finds no feasible host;
//! - the explanation's per-rule counts equal the model's, rule by rule, so
//!   they account for every host and name the first rule each host breaks;
//! - batch placement is all or nothing: a failed batch leaves the engine's
//!   allocations exactly as they were, and a successful one honours spread.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use virt8ra_api::{GroupRule, LatencyBound, Level, PlacementConstraints, Tier};
use virt8ra_placement::batch::Spread;
use virt8ra_placement::{Engine, HostInfo, Request, Resources, Rule, SiteInfo, Weights};

/// CH is outside the EU and EEA; NO is in the EEA only.
const COUNTRIES: [&str; 6] = ["ES", "DE", "PL", "FR", "CH", "NO"];
const CITIES: [(&str, f64, f64); 4] = [
    ("Madrid", 40.4168, -3.7038),
    ("Berlin", 52.5200, 13.4050),
    ("Warsaw", 52.2297, 21.0122),
    ("Paris", 48.8566, 2.3522),
];
const LEVELS: [Level; 4] = [Level::Host, Level::Site, Level::Provider, Level::Country];

#[derive(Debug, Clone)]
struct S {
    country: usize,
    provider: usize,
    edge: bool,
    lat: f64,
    lon: f64,
}

#[derive(Debug, Clone)]
struct H {
    site: usize,
    vcpus: u32,
    mem_gib: u64,
    kvm: bool,
    gpu: bool,
    cpu_ratio: f64,
    mem_ratio: f64,
}

#[derive(Debug, Clone)]
struct Q {
    vcpus: u32,
    mem_gib: u64,
    countries: Vec<usize>,
    deny_providers: Vec<usize>,
    /// 0 none, 1 EU, 2 EEA.
    provider_jurisdiction: u8,
    tier: Option<bool>,
    kvm: bool,
    gpu: bool,
    latency: Option<(usize, f64)>,
    /// (affinity?, group, level)
    group: Option<(bool, u8, usize)>,
}

#[derive(Debug, Clone)]
enum Op {
    Place(Q),
    Release(usize),
    Toggle(usize),
    Batch(Vec<Q>, Option<(usize, usize)>),
}

fn sites() -> impl Strategy<Value = Vec<S>> {
    proptest::collection::vec(
        (
            0..6usize,
            0..5usize,
            any::<bool>(),
            38.0..56.0f64,
            -6.0..24.0f64,
        )
            .prop_map(|(country, provider, edge, lat, lon)| S {
                country,
                provider,
                edge,
                lat,
                lon,
            }),
        1..7,
    )
}

fn hosts() -> impl Strategy<Value = Vec<H>> {
    proptest::collection::vec(
        (
            0..7usize,
            1..24u32,
            1..48u64,
            prop::bool::weighted(0.8),
            prop::bool::weighted(0.2),
            prop_oneof![Just(1.0), Just(2.0), Just(4.0)],
            prop_oneof![Just(1.0), Just(1.5)],
        )
            .prop_map(|(site, vcpus, mem_gib, kvm, gpu, cpu_ratio, mem_ratio)| H {
                site,
                vcpus,
                mem_gib,
                kvm,
                gpu,
                cpu_ratio,
                mem_ratio,
            }),
        1..30,
    )
}

fn query() -> impl Strategy<Value = Q> {
    (
        (1..20u32, 1..40u64),
        proptest::collection::vec(0..6usize, 0..3),
        proptest::collection::vec(0..5usize, 0..2),
        0..3u8,
        proptest::option::of(any::<bool>()),
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.1),
        proptest::option::weighted(0.3, (0..4usize, 2.0..30.0f64)),
        proptest::option::weighted(0.5, (any::<bool>(), 0..3u8, 0..4usize)),
    )
        .prop_map(
            |(
                (vcpus, mem_gib),
                countries,
                deny_providers,
                provider_jurisdiction,
                tier,
                kvm,
                gpu,
                latency,
                group,
            )| Q {
                vcpus,
                mem_gib,
                countries,
                deny_providers,
                provider_jurisdiction,
                tier,
                kvm,
                gpu,
                latency,
                group,
            },
        )
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(
        prop_oneof![
            6 => query().prop_map(Op::Place),
            1 => (0..40usize).prop_map(Op::Release),
            1 => (0..30usize).prop_map(Op::Toggle),
            1 => (
                proptest::collection::vec(query(), 1..5),
                proptest::option::of((0..4usize, 1..4usize)),
            )
                .prop_map(|(qs, s)| Op::Batch(qs, s)),
        ],
        1..25,
    )
}

fn provider_country(p: usize) -> &'static str {
    // p4's seat is in Switzerland: outside EU and EEA.
    ["ES", "DE", "NO", "FR", "CH"][p]
}

fn build(ss: &[S], hs: &[H]) -> (Vec<SiteInfo>, Vec<HostInfo>) {
    let sites = ss
        .iter()
        .enumerate()
        .map(|(i, s)| SiteInfo {
            name: format!("s{i}"),
            provider: format!("p{}", s.provider),
            provider_country: provider_country(s.provider).into(),
            provider_jurisdiction: String::new(),
            country: COUNTRIES[s.country].into(),
            tier: if s.edge { Tier::Edge } else { Tier::Core },
            lat: s.lat,
            lon: s.lon,
            carbon: Some(50.0 + 97.0 * i as f64),
            pue: None,
            price_vcpu_hour: Some(0.01 * (1 + i % 3) as f64),
            price_gib_hour: None,
            access_latency_ms: None,
            labels: Default::default(),
        })
        .collect();
    let hosts = hs
        .iter()
        .enumerate()
        .map(|(i, h)| HostInfo {
            name: format!("h{i}"),
            site: format!("s{}", h.site % ss.len()),
            arch: "x86_64".into(),
            vcpus: h.vcpus,
            memory_mib: h.mem_gib * 1024,
            disk_gib: 100,
            cpu_flags: vec![],
            accelerators: if h.gpu { vec!["gpu".into()] } else { vec![] },
            kvm: h.kvm,
            confidential: vec![],
            ready: true,
            cpu_ratio: h.cpu_ratio,
            mem_ratio: h.mem_ratio,
        })
        .collect();
    (sites, hosts)
}

fn level(i: usize) -> Level {
    LEVELS[i]
}

fn to_request(q: &Q) -> Option<Request> {
    let c = PlacementConstraints {
        countries: q.countries.iter().map(|i| COUNTRIES[*i].into()).collect(),
        deny_providers: q.deny_providers.iter().map(|p| format!("p{p}")).collect(),
        provider_jurisdictions: match q.provider_jurisdiction {
            1 => vec!["EU".into()],
            2 => vec!["EEA".into()],
            _ => vec![],
        },
        tier: q.tier.map(|e| if e { Tier::Edge } else { Tier::Core }),
        require_kvm: q.kvm,
        accelerators: if q.gpu { vec!["gpu".into()] } else { vec![] },
        max_latency: q.latency.map(|(c, ms)| LatencyBound {
            from: Some(CITIES[c].0.into()),
            latitude: None,
            longitude: None,
            max_rtt_ms: ms,
        }),
        anti_affinity: q.group.filter(|g| !g.0).map(|(_, g, l)| GroupRule {
            group: format!("g{g}"),
            level: level(l),
        }),
        affinity: q.group.filter(|g| g.0).map(|(_, g, l)| GroupRule {
            group: format!("g{g}"),
            level: level(l),
        }),
        ..Default::default()
    };
    Request::new(
        Resources {
            vcpus: q.vcpus,
            memory_mib: q.mem_gib * 1024,
            disk_gib: 10,
        },
        c,
        Weights::default(),
    )
    .ok()
}

/// The model: what the test believes is allocated and who is in which group.
#[derive(Debug, Clone, Default)]
struct Model {
    /// vm -> (host index, query)
    vms: BTreeMap<String, (usize, Q)>,
    down: Vec<bool>,
}

fn haversine_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let r = 6371.0_f64;
    let (la1, la2) = (a.0.to_radians(), b.0.to_radians());
    let dla = la2 - la1;
    let dlo = (b.1 - a.1).to_radians();
    let h = (dla / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlo / 2.0).sin().powi(2);
    2.0 * r * h.sqrt().asin()
}

fn in_eu(c: &str) -> bool {
    ["ES", "DE", "PL", "FR"].contains(&c)
}

impl Model {
    /// The value of a level for host `h`.
    fn key(ss: &[S], hs: &[H], h: usize, l: usize) -> String {
        let s = &ss[hs[h].site % ss.len()];
        match l {
            0 => format!("h{h}"),
            1 => format!("s{}", hs[h].site % ss.len()),
            2 => format!("p{}", s.provider),
            _ => COUNTRIES[s.country].to_string(),
        }
    }

    /// The first rule host `h` breaks for `q`, in the documented order, or
    /// `None` when it is feasible.
    fn first_broken(&self, ss: &[S], hs: &[H], h: usize, q: &Q) -> Option<Rule> {
        let host = &hs[h];
        let s = &ss[host.site % ss.len()];
        if q.deny_providers.contains(&s.provider) {
            return Some(Rule::Provider);
        }
        let pc = provider_country(s.provider);
        match q.provider_jurisdiction {
            1 if !in_eu(pc) => return Some(Rule::ProviderNationality),
            2 if !(in_eu(pc) || pc == "NO") => return Some(Rule::ProviderNationality),
            _ => {}
        }
        if !q.countries.is_empty() && !q.countries.contains(&s.country) {
            return Some(Rule::Country);
        }
        if q.tier.is_some_and(|edge| edge != s.edge) {
            return Some(Rule::Tier);
        }
        if let Some((c, max)) = q.latency {
            let (_, lat, lon) = CITIES[c];
            let km = haversine_km((lat, lon), (s.lat, s.lon));
            let access = if s.edge { 0.5 } else { 1.0 };
            // 200 km/ms in fibre, route factor 1.5, there and back.
            if km * 1.5 * 2.0 / 200.0 + access > max {
                return Some(Rule::Latency);
            }
        }
        if self.down[h] {
            return Some(Rule::NotReady);
        }
        if let Some((affine, g, l)) = q.group {
            let me = Self::key(ss, hs, h, l);
            let members: Vec<String> = self
                .vms
                .values()
                .filter(|(_, o)| o.group.is_some_and(|og| og.1 == g))
                .map(|(oh, _)| Self::key(ss, hs, *oh, l))
                .collect();
            let clash = if affine {
                !members.is_empty() && !members.contains(&me)
            } else {
                members.contains(&me)
            };
            if clash {
                return Some(Rule::Group);
            }
        }
        if q.kvm && !host.kvm {
            return Some(Rule::Kvm);
        }
        if q.gpu && !host.gpu {
            return Some(Rule::Accelerators);
        }
        let (mut uc, mut um) = (0u64, 0u64);
        for (oh, o) in self.vms.values() {
            if *oh == h {
                uc += u64::from(o.vcpus);
                um += o.mem_gib * 1024;
            }
        }
        let cap_c = (f64::from(host.vcpus) * host.cpu_ratio).floor() as u64;
        let cap_m = ((host.mem_gib * 1024) as f64 * host.mem_ratio).floor() as u64;
        if uc + u64::from(q.vcpus) > cap_c {
            return Some(Rule::Vcpus);
        }
        if um + q.mem_gib * 1024 > cap_m {
            return Some(Rule::Memory);
        }
        None
    }
}

fn host_index(name: &str) -> usize {
    name.trim_start_matches('h').parse().unwrap()
}

/// Allocations as the engine reports them, for all-or-nothing checks.
fn snapshot(e: &Engine) -> Vec<(String, u32, u64, u32)> {
    e.hosts()
        .map(|h| (h.info.name.clone(), h.used.vcpus, h.used.memory_mib, h.vms))
        .collect()
}

/// Places one query on the engine and checks it against the model.
fn check_one(
    e: &mut Engine,
    m: &mut Model,
    ss: &[S],
    hs: &[H],
    vm: String,
    q: &Q,
) -> Result<(), TestCaseError> {
    let Some(req) = to_request(q) else {
        return Ok(());
    };
    let verdicts: Vec<Option<Rule>> = (0..hs.len())
        .map(|h| m.first_broken(ss, hs, h, q))
        .collect();
    match e.place(&req) {
        Ok(d) => {
            let h = host_index(&d.host);
            prop_assert!(
                verdicts[h].is_none(),
                "placed {q:?} on {} which breaks {:?}",
                d.host,
                verdicts[h]
            );
            e.commit(&vm, &d.host, &req).unwrap();
            m.vms.insert(vm, (h, q.clone()));
        }
        Err(u) => {
            let fit: Vec<usize> = (0..hs.len()).filter(|h| verdicts[*h].is_none()).collect();
            prop_assert!(
                fit.is_empty(),
                "unplaceable but hosts {fit:?} fit {q:?}: {u}"
            );
            let mut want: BTreeMap<Rule, usize> = BTreeMap::new();
            for r in verdicts.into_iter().flatten() {
                *want.entry(r).or_default() += 1;
            }
            let got: BTreeMap<Rule, usize> = u.counts.iter().copied().collect();
            prop_assert_eq!(&got, &want, "explanation {} for {:?}", u, q);
            prop_assert_eq!(u.total_hosts, hs.len());
            prop_assert_eq!(u.counts.iter().map(|c| c.1).sum::<usize>(), hs.len());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn the_engine_agrees_with_an_independent_model(
        ss in sites(),
        hs in hosts(),
        ops in ops(),
    ) {
        let (si, hi) = build(&ss, &hs);
        let mut e = Engine::new(si, hi).unwrap();
        let mut m = Model { down: vec![false; hs.len()], ..Default::default() };
        let mut n = 0usize;
        for op in ops {
            match op {
                Op::Place(q) => {
                    n += 1;
                    check_one(&mut e, &mut m, &ss, &hs, format!("vm{n}"), &q)?;
                }
                Op::Release(i) => {
                    let vm = m.vms.keys().nth(i % m.vms.len().max(1)).cloned();
                    if let Some(vm) = vm {
                        e.release(&vm);
                        m.vms.remove(&vm);
                    }
                }
                Op::Toggle(h) => {
                    let h = h % hs.len();
                    m.down[h] = !m.down[h];
                    e.set_ready(&format!("h{h}"), !m.down[h]).unwrap();
                }
                Op::Batch(qs, spread) => {
                    let reqs: Option<Vec<(String, Request)>> = qs
                        .iter()
                        .map(|q| {
                            n += 1;
                            to_request(q).map(|r| (format!("vm{n}"), r))
                        })
                        .collect();
                    let Some(reqs) = reqs else { continue };
                    let spread = spread.map(|(l, min)| Spread { level: level(l), min });
                    let before = snapshot(&e);
                    match e.place_batch(&reqs, spread) {
                        Err(_) => {
                            prop_assert_eq!(snapshot(&e), before, "a failed batch left allocations behind");
                        }
                        Ok(ds) => {
                            prop_assert_eq!(ds.len(), reqs.len());
                            if let Some(s) = spread {
                                let mut seen: Vec<String> = ds
                                    .iter()
                                    .map(|d| match s.level {
                                        Level::Host => d.host.clone(),
                                        Level::Site => d.site.clone(),
                                        Level::Provider => d.provider.clone(),
                                        Level::Country => d.country.clone(),
                                    })
                                    .collect();
                                seen.sort();
                                seen.dedup();
                                prop_assert!(
                                    seen.len() >= s.min.min(reqs.len()),
                                    "spread {:?} not honoured: {:?}", s, seen
                                );
                            }
                            // Every replica must satisfy its own rules given the
                            // replicas before it: replay them through the model.
                            for ((vm, _), (d, q)) in reqs.iter().zip(ds.iter().zip(qs.iter())) {
                                let h = host_index(&d.host);
                                prop_assert!(
                                    m.first_broken(&ss, &hs, h, q).is_none(),
                                    "batch replica {} on {} breaks {:?}",
                                    vm, d.host, m.first_broken(&ss, &hs, h, q)
                                );
                                m.vms.insert(vm.clone(), (h, q.clone()));
                            }
                        }
                    }
                }
            }
        }
        // Whatever happened, the engine's books match the model's.
        let mut used: HashMap<usize, (u32, u64)> = HashMap::new();
        for (h, q) in m.vms.values() {
            let u = used.entry(*h).or_default();
            u.0 += q.vcpus;
            u.1 += q.mem_gib * 1024;
        }
        for h in e.hosts() {
            let i = host_index(&h.info.name);
            let (c, mem) = used.get(&i).copied().unwrap_or((0, 0));
            prop_assert_eq!((h.used.vcpus, h.used.memory_mib), (c, mem), "books of {}", h.info.name);
        }
    }
}
