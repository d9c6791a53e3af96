//! Placement scenarios on the example topology (11 providers, 7 countries).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use virt8ra_api::{GroupRule, Level, PlacementConstraints};
use virt8ra_placement::batch::Spread;
use virt8ra_placement::bench::{example_sites, run_bench};
use virt8ra_placement::rebalance::Goal;
use virt8ra_placement::{Engine, HostInfo, Request, Resources, Rule, Weights};

fn host(name: &str, site: &str, mem_gib: u64) -> HostInfo {
    HostInfo {
        name: name.into(),
        site: site.into(),
        arch: "x86_64".into(),
        vcpus: 32,
        memory_mib: mem_gib * 1024,
        disk_gib: 1000,
        cpu_flags: vec!["avx2".into()],
        accelerators: vec![],
        kvm: true,
        confidential: vec![],
        ready: true,
        cpu_ratio: 1.0,
        mem_ratio: 1.0,
    }
}

/// Two hosts at every site of the example topology.
fn engine() -> Engine {
    let sites = example_sites();
    let mut hosts = Vec::new();
    for s in &sites {
        hosts.push(host(&format!("{}-1", s.name), &s.name, 64));
        hosts.push(host(&format!("{}-2", s.name), &s.name, 64));
    }
    Engine::new(sites, hosts).unwrap()
}

fn req(mem_gib: u64, c: PlacementConstraints) -> Request {
    Request::new(
        Resources {
            vcpus: 2,
            memory_mib: mem_gib * 1024,
            disk_gib: 10,
        },
        c,
        Weights::default(),
    )
    .unwrap()
}

fn json(v: serde_json::Value) -> PlacementConstraints {
    serde_json::from_value(v).unwrap()
}

#[test]
fn poland_within_20_ms_of_gdansk_lands_on_the_gdansk_site_and_says_why() {
    let mut e = engine();
    let r = req(
        4,
        json(serde_json::json!({
            "countries": ["PL"],
            "max_latency": {"from": "Gdańsk", "max_rtt_ms": 20.0}
        })),
    );
    let d = e.place(&r).unwrap();
    assert_eq!(d.country, "PL");
    assert_eq!(d.site, "pl-gdansk", "the closest Polish site: {}", d.reason);
    assert!(d.rtt_ms.unwrap() <= 20.0);
    assert!(d.reason.contains("pl-gdansk"), "{}", d.reason);
    assert!(d.reason.contains("ms from the users"), "{}", d.reason);
    assert!(d.reason.contains("2 of 12 sites pass"), "{}", d.reason);
}

#[test]
fn a_country_without_capacity_is_unplaceable_and_says_so() {
    let mut e = engine();
    let r = req(4, json(serde_json::json!({"countries": ["AT"]})));
    let u = e.place(&r).unwrap_err();
    assert_eq!(u.total_hosts, 24);
    assert_eq!(u.counts, vec![(Rule::Country, 24)]);
    assert_eq!(
        u.message,
        "0 of 24 hosts fit: 24 outside the allowed countries"
    );

    // Mixed reasons add up to every host.
    let r = req(
        100,
        json(serde_json::json!({"countries": ["ES", "PL"],
                                "max_latency": {"from": "Bilbao", "max_rtt_ms": 10.0}})),
    );
    let u = e.place(&r).unwrap_err();
    let sum: usize = u.counts.iter().map(|(_, n)| n).sum();
    assert_eq!(sum, 24, "{}", u.message);
    assert!(
        u.message.contains("14 outside the allowed countries"),
        "{}",
        u.message
    );
    assert!(
        u.message.contains("over the latency bound"),
        "{}",
        u.message
    );
    assert!(u.message.contains("short of memory"), "{}", u.message);
}

#[test]
fn bad_specs_are_rejected_with_clear_errors() {
    let bad = |v: serde_json::Value| {
        let c: PlacementConstraints = serde_json::from_value(v).unwrap();
        Request::new(Resources::default(), c, Weights::default()).unwrap_err()
    };
    assert!(bad(serde_json::json!({"countries": ["XX"]})).contains("unknown country code \"XX\""));
    assert!(
        bad(serde_json::json!({"max_latency": {"from": "Gdańsk", "max_rtt_ms": -5.0}}))
            .contains("positive number")
    );
    assert!(
        bad(serde_json::json!({"max_latency": {"from": "Atlantis", "max_rtt_ms": 5.0}}))
            .contains("unknown user location")
    );
    assert!(
        bad(serde_json::json!({"countries": ["PL"], "deny_countries": ["PL"]}))
            .contains("both allowed and denied")
    );
    assert!(
        bad(serde_json::json!({"countries": ["CH"], "jurisdictions": ["EU"]}))
            .contains("no allowed country lies in the allowed jurisdictions")
    );
    assert!(bad(serde_json::json!({"policy": {"energy": 11.0}})).contains("outside 0..10"));
    // Unknown fields are refused by the wire type itself.
    let r: Result<PlacementConstraints, _> =
        serde_json::from_value(serde_json::json!({"contries": ["PL"]}));
    assert!(r
        .unwrap_err()
        .to_string()
        .contains("unknown field `contries`"));
}

#[test]
fn residency_by_jurisdiction_and_provider_nationality() {
    let mut e = engine();
    let r = req(
        4,
        json(
            serde_json::json!({"jurisdictions": ["EU"], "deny_countries": ["DE", "FR", "NL", "ES", "PL"]}),
        ),
    );
    let d = e.place(&r).unwrap();
    assert!(["SI", "HR"].contains(&d.country.as_str()), "{}", d.country);
    let r = req(
        4,
        json(serde_json::json!({"provider_jurisdictions": ["US"]})),
    );
    let u = e.place(&r).unwrap_err();
    assert_eq!(u.counts, vec![(Rule::ProviderNationality, 24)]);
}

fn db_group() -> PlacementConstraints {
    PlacementConstraints {
        anti_affinity: Some(GroupRule {
            group: "db".into(),
            level: Level::Country,
        }),
        ..Default::default()
    }
}

#[test]
fn anti_affinity_keeps_group_members_apart() {
    let mut e = engine();
    let mut countries = std::collections::BTreeSet::new();
    for i in 0..7 {
        let c = db_group();
        let r = req(4, c);
        let d = e.place(&r).unwrap();
        assert!(
            countries.insert(d.country.clone()),
            "country reused: {}",
            d.country
        );
        e.commit(&format!("db{i}"), &d.host, &r).unwrap();
    }
    // An eighth member has no country left.
    let c = db_group();
    let u = e.place(&req(4, c)).unwrap_err();
    assert_eq!(u.counts, vec![(Rule::Group, 24)]);
    // Releasing one frees its country again.
    e.release("db0");
    let c = db_group();
    assert!(e.place(&req(4, c)).is_ok());
}

#[test]
fn batch_placement_is_all_or_nothing_and_spreads() {
    let mut e = engine();
    let reps: Vec<(String, Request)> = (0..3)
        .map(|i| (format!("web{i}"), req(4, PlacementConstraints::default())))
        .collect();
    let ds = e
        .place_batch(
            &reps,
            Some(Spread {
                level: Level::Country,
                min: 3,
            }),
        )
        .unwrap();
    let countries: std::collections::BTreeSet<_> = ds.iter().map(|d| d.country.clone()).collect();
    assert_eq!(countries.len(), 3);
    assert_eq!(e.placements().count(), 3);

    // Eight replicas over eight countries cannot work: nothing is allocated.
    let reps: Vec<(String, Request)> = (0..8)
        .map(|i| (format!("api{i}"), req(4, PlacementConstraints::default())))
        .collect();
    let err = e
        .place_batch(
            &reps,
            Some(Spread {
                level: Level::Country,
                min: 8,
            }),
        )
        .unwrap_err();
    assert_eq!(err.replica, 7);
    assert_eq!(
        e.placements().count(),
        3,
        "a failed batch must leave nothing behind"
    );

    // Too big as a whole: the fourth replica does not fit anywhere in ES.
    let reps: Vec<(String, Request)> = (0..9)
        .map(|i| {
            (
                format!("big{i}"),
                req(60, json(serde_json::json!({"countries": ["ES"]}))),
            )
        })
        .collect();
    assert!(e.place_batch(&reps, None).is_err());
    assert_eq!(e.placements().count(), 3);
}

#[test]
fn draining_a_site_keeps_residency_and_reports_what_cannot_move() {
    let mut e = engine();
    let es = req(8, json(serde_json::json!({"countries": ["ES"]})));
    let pinned = req(8, json(serde_json::json!({"site": "es-madrid"})));
    e.commit("a", "es-madrid-1", &es).unwrap();
    e.commit("b", "es-madrid-2", &es).unwrap();
    e.commit("c", "es-madrid-1", &pinned).unwrap();
    e.commit("d", "pl-gdansk-1", &req(8, PlacementConstraints::default()))
        .unwrap();
    let plan = e.plan_rebalance(&Goal::DrainSite("es-madrid".into()));
    assert_eq!(plan.moves.len(), 2, "{plan:?}");
    for m in &plan.moves {
        let to = e.host(&m.to).unwrap();
        assert_eq!(e.site_of(to).country, "ES", "residency broken by {m:?}");
        assert_ne!(e.site_of(to).name, "es-madrid");
    }
    assert_eq!(plan.stuck.len(), 1);
    assert_eq!(plan.stuck[0].0, "c");
    assert!(
        plan.stuck[0].1.contains("sites the VM may not use"),
        "{:?}",
        plan.stuck
    );
    // The plan is pure: the engine did not change.
    assert_eq!(
        e.placements()
            .filter(|(_, h)| h.starts_with("es-madrid"))
            .count(),
        3
    );
}

#[test]
fn lower_carbon_moves_to_greener_sites_within_the_rules() {
    let mut e = engine();
    let eu = req(4, json(serde_json::json!({"jurisdictions": ["EU"]})));
    let pl = req(4, json(serde_json::json!({"countries": ["PL"]})));
    e.commit("free", "pl-warsaw-1", &eu).unwrap();
    e.commit("bound", "pl-warsaw-2", &pl).unwrap();
    let plan = e.plan_rebalance(&Goal::LowerCarbon { min_gain: 0.2 });
    assert_eq!(plan.moves.len(), 1, "{plan:?}");
    assert_eq!(plan.moves[0].vm, "free");
    let to = e.host(&plan.moves[0].to).unwrap();
    assert_eq!(
        e.site_of(to).country,
        "FR",
        "the greenest grid of the topology"
    );
}

#[test]
fn packing_is_within_five_percent_of_first_fit_decreasing() {
    let r = run_bench(2000, 10000, 7);
    assert_eq!(r.placed + r.unplaceable, 10000);
    assert!(r.placed > 9000, "{r:?}");
    assert!(
        r.hosts_used as f64 <= r.ffd_hosts_used as f64 * 1.05,
        "hosts used {} vs FFD {}",
        r.hosts_used,
        r.ffd_hosts_used
    );
}

#[test]
fn measured_rtt_overrides_the_model() {
    let mut e = engine();
    let r = req(
        4,
        json(serde_json::json!({"max_latency": {"from": "Gdańsk", "max_rtt_ms": 3.0}})),
    );
    assert_eq!(e.place(&r).unwrap().site, "pl-gdansk");
    e.set_measured_rtt("pl-gdansk", "Gdańsk", 9.0).unwrap();
    let u = e.place(&r).unwrap_err();
    assert_eq!(u.counts, vec![(Rule::Latency, 24)]);
}

/// Packing fills a host until its vCPUs run out, with memory to spare. Such
/// a host is no candidate for a request that needs a vCPU (the next one
/// goes to the other host), still takes a request for none, and is
/// explained as short of vCPUs, not as not ready.
#[test]
fn hosts_without_a_free_vcpu_are_skipped_and_explained() {
    let sites = example_sites();
    let site = sites[0].name.clone();
    let hosts = vec![host("a", &site, 64), host("b", &site, 64)];
    let mut e = Engine::new(sites, hosts).unwrap();
    let only_here = || json(serde_json::json!({"site": site}));
    let vm = |vcpus: u32| {
        Request::new(
            Resources {
                vcpus,
                memory_mib: 1024,
                disk_gib: 1,
            },
            only_here(),
            Weights::default(),
        )
        .unwrap()
    };
    // 32 vCPUs a host: 16 VMs of 2 fill the first one's (16 GiB of 64 used).
    let mut on = std::collections::BTreeMap::<String, u32>::new();
    for i in 0..16 {
        let r = vm(2);
        let d = e.place(&r).unwrap();
        e.commit(&format!("v{i}"), &d.host, &r).unwrap();
        *on.entry(d.host).or_default() += 1;
    }
    assert_eq!(on.len(), 1, "packing fills one host first: {on:?}");
    let first = on.keys().next().unwrap().clone();
    let other = if first == "a" { "b" } else { "a" };
    let d = e.place(&vm(2)).unwrap();
    assert_eq!(d.host, other, "{}", d.reason);
    // A request for no vCPU still fits the full host, tightest first.
    assert_eq!(e.place(&vm(0)).unwrap().host, first);
    // Fill the other one too: nothing with a vCPU fits, and both are
    // counted as short of vCPUs.
    for i in 16..32 {
        let r = vm(2);
        let d = e.place(&r).unwrap();
        assert_eq!(d.host, other);
        e.commit(&format!("v{i}"), &d.host, &r).unwrap();
    }
    let u = e.place(&vm(1)).unwrap_err();
    assert_eq!(u.counts, vec![(Rule::Vcpus, 2)], "{}", u.message);
    // A release gives the host its vCPUs back: it is a candidate again.
    e.release("v0");
    assert_eq!(e.place(&vm(2)).unwrap().host, first);
}

/// Two VMs never publish one host port on one host: the second goes to
/// the other host of the site, the third finds none and the refusal names
/// the port; another protocol or another address of the host is another
/// port, and a released VM frees its ports. Also with group rules (the
/// explanation's per-host path) and in the oracle (`check_host`).
#[test]
fn published_host_ports_keep_vms_apart_and_name_the_port() {
    let mut e = engine();
    let p = |s: &str| s.parse::<virt8ra_api::PublishedPort>().unwrap();
    let at = |ports: &[&str]| {
        req(1, json(serde_json::json!({"site": "pl-gdansk"})))
            .with_ports(ports.iter().map(|s| p(s)).collect())
    };
    let web = at(&["8080:80"]);
    let first = e.place(&web).unwrap().host;
    e.commit("web-1", &first, &web).unwrap();
    let second = e.place(&web).unwrap().host;
    assert_ne!(first, second, "packing would have chosen the same host");
    e.commit("web-2", &second, &web).unwrap();
    let u = e.place(&web).unwrap_err();
    assert_eq!(u.counts, vec![(Rule::Site, 22), (Rule::Ports, 2)]);
    assert!(
        u.message
            .ends_with("2 where host port 8080/tcp is already published"),
        "{}",
        u.message
    );
    // Only the clashing one is named, once.
    let u = e.place(&at(&["9000:90", "8080:81"])).unwrap_err();
    assert!(
        u.message
            .ends_with("host port 8080/tcp is already published"),
        "{}",
        u.message
    );
    // The same port by another protocol, or on one address while the
    // taken one is on every address (clash) versus two addresses (none).
    e.place(&at(&["8080:80/udp"])).unwrap();
    e.place(&at(&["192.0.2.7:8080:80"])).unwrap_err();
    let one = at(&["192.0.2.7:7000:70"]);
    let h = e.place(&one).unwrap().host;
    e.commit("one", &h, &one).unwrap();
    let other = at(&["192.0.2.8:7000:70"]);
    assert_eq!(e.place(&other).unwrap().host, h, "another address, packed");
    // The oracle agrees, and names the holder.
    let host = e.host(&first).unwrap();
    assert_eq!(e.check_host(host, &web), Err(Rule::Ports));
    let (port, holder) = e.port_clash(&first, &web).unwrap();
    assert_eq!(
        (port.host_side().as_str(), holder.as_str()),
        ("8080/tcp", "web-1")
    );
    // With a group rule the explanation counts host by host: same answer.
    let mut grouped = web.clone();
    grouped.c.anti_affinity = Some(GroupRule {
        group: "g".into(),
        level: Level::Host,
    });
    let u = e.place(&grouped).unwrap_err();
    assert!(u.message.contains("8080/tcp"), "{}", u.message);
    // Released (deleted, or moved away): the port is free there again.
    e.release("web-1");
    assert_eq!(e.place(&web).unwrap().host, first);
    assert_eq!(e.port_clash(&first, &web), None);
    // Committing again (a rebook) does not count its own ports twice.
    e.commit("web-2", &second, &web).unwrap();
    e.release("web-2");
    assert_eq!(e.port_clash(&second, &web), None);
}
