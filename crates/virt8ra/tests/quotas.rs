//! Projects' quotas end to end: concurrent creates cannot exceed them,
//! migrations respect the per-country limits, and the use is shown
//! against each limit.
//!
//! The concurrent test needs no host: a VM counts against its project's
//! quota from its creation (pending included), and what is checked is the
//! control plane's booking. The migration test uses simulated agents: a
//! migration needs hosts in several countries, not guests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Cluster, TOPOLOGY};
use serde_json::{json, Value};

fn member_token(c: &Cluster, user: &str, project: &str) -> String {
    c.ok("POST", "/api/v1/users", Some(json!({"name": user})));
    c.ok(
        "POST",
        "/api/v1/tokens",
        Some(json!({"user": user, "project": project, "role": "member"})),
    )["token"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn fifty_concurrent_creates_admit_exactly_what_fits_the_quota() {
    let c = Cluster::start();
    c.import_tiny_image();
    for p in ["q", "free"] {
        c.cli_ok(&["project", "create", p]);
    }
    // 2 vCPUs each: 15 VMs fit in 30 (and 15 in the VM count of 40 too).
    let set = c.cli_ok(&[
        "quota", "set", "q", "--vcpus", "30", "--vms", "40", "-o", "json",
    ]);
    let set: Value = serde_json::from_str(&set).unwrap();
    assert_eq!(
        set["quota"]["total"],
        json!({"vcpus": 30, "vms": 40}),
        "{set}"
    );
    let token = member_token(&c, "quinn", "q");

    let results: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let (c, token) = (&c, &token);
                s.spawn(move || {
                    c.api_raw(
                        "POST",
                        "/api/v1/vms",
                        Some(
                            json!({"name": format!("q-{i}"), "image": "tiny", "vcpus": 2,
                                   "memory_mib": 64})
                            .to_string(),
                        ),
                        Some(token),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let created = results.iter().filter(|(s, _)| *s == 201).count();
    let statuses: Vec<u16> = results.iter().map(|(s, _)| *s).collect();
    assert_eq!(created, 15, "{statuses:?}");
    for (s, v) in results.iter().filter(|(s, _)| *s != 201) {
        assert_eq!(*s, 409, "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("quota of project 'q' exceeded: vcpus: 30 of 30 in use, 2 more asked"),
            "{msg}"
        );
    }
    // The use, against each limit.
    let r = c.ok("GET", "/api/v1/projects/q/quota", None);
    assert_eq!(r["usage"]["vcpus"], 30, "{r}");
    assert_eq!(r["usage"]["vms"], 15, "{r}");
    assert_eq!(r["usage"]["memory_mib"], 15 * 64, "{r}");
    let (s, v) = c.api_raw("GET", "/api/v1/projects/q/quota", None, Some(&token));
    assert_eq!((s, &v["usage"]), (200, &r["usage"]), "{v}");
    let table = c.cli_ok(&["quota", "show", "q"]);
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["all", "vcpus", "30", "30"]),
        "{table}"
    );
    // Exactly 15 exist in the project.
    let (_, vms) = c.api_raw("GET", "/api/v1/vms", None, Some(&token));
    assert_eq!(vms["items"].as_array().unwrap().len(), 15);
    // Another project has no quota; deleting one of q's frees its share.
    let (s, v) = c.api_raw(
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "q-more", "image": "tiny", "vcpus": 2}).to_string()),
        Some(&token),
    );
    assert_eq!(s, 409, "{v}");
    c.cli_ok(&[
        "--project",
        "free",
        "vm",
        "create",
        "f-1",
        "--image",
        "tiny",
        "--vcpus",
        "8",
    ]);
    let gone = vms["items"][0]["name"].as_str().unwrap().to_string();
    let (s, v) = c.api_raw("DELETE", &format!("/api/v1/vms/{gone}"), None, Some(&token));
    assert_eq!(s, 202, "{v}");
    let (s, v) = c.api_raw(
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "q-more", "image": "tiny", "vcpus": 2}).to_string()),
        Some(&token),
    );
    assert_eq!(s, 201, "{v}");
    // Only the platform sets quotas; bad ones are refused and change nothing.
    let (s, _) = c.api_raw(
        "PUT",
        "/api/v1/projects/q/quota",
        Some(json!({"total": {"vcpus": 1000}}).to_string()),
        Some(&token),
    );
    assert_eq!(s, 403);
    let (s, v) = c.api(
        "PUT",
        "/api/v1/projects/q/quota",
        Some(json!({"countries": {"Spain": {"vms": 1}}})),
    );
    assert_eq!(s, 400, "{v}");
    let (s, v) = c.api(
        "PUT",
        "/api/v1/projects/q/quota",
        Some(json!({"total": {"cpus": 1}})),
    );
    assert_eq!(s, 400, "{v}");
    assert_eq!(
        c.ok("GET", "/api/v1/projects/q/quota", None)["quota"],
        set["quota"]
    );
}

/// A small VM of project `token`'s, pinned to `country` if given.
fn create(c: &Cluster, token: &str, name: &str, country: Option<&str>) -> (u16, Value) {
    let mut spec = json!({"name": name, "image": "tiny", "memory_mib": 64});
    if let Some(cc) = country {
        spec["placement"] = json!({"country": cc});
    }
    c.api_raw("POST", "/api/v1/vms", Some(spec.to_string()), Some(token))
}

#[test]
fn country_limits_hold_at_create_and_for_migrations() {
    let mut c = Cluster::start();
    c.create_topology();
    c.import_tiny_image();
    c.cli_ok(&["project", "create", "q"]);
    let token = member_token(&c, "quinn", "q");
    c.cli_ok(&["quota", "set", "q", "--country", "DE", "--vms", "1"]);
    // Only the Spanish host at first: e1 goes there, and two VMs pinned to
    // DE wait (a pending VM is in no country yet, so both are admitted).
    c.start_agent_with("sim-es", Some(TOPOLOGY[0].2), &["--driver", "sim"]);
    c.wait_hosts_ready(1);
    assert_eq!(create(&c, &token, "e1", None).0, 201);
    c.wait_phase("e1", "running", Duration::from_secs(60));
    for name in ["late1", "late2"] {
        assert_eq!(create(&c, &token, name, Some("DE")).0, 201);
    }
    for (i, (_, _, site, ..)) in TOPOLOGY.iter().enumerate().skip(1) {
        c.start_agent_with(&format!("sim-{i}"), Some(site), &["--driver", "sim"]);
    }
    c.wait_hosts_ready(3);
    // The scheduler places one of them in DE; the other stays pending,
    // saying which quota holds it.
    let held = common::wait_until("one late VM placed", Duration::from_secs(60), || {
        let phases: Vec<Value> = ["late1", "late2"].iter().map(|n| c.vm(n)).collect();
        let running = phases
            .iter()
            .filter(|v| v["status"]["phase"] == "running")
            .count();
        let pending: Vec<&Value> = phases
            .iter()
            .filter(|v| v["status"]["phase"] == "pending")
            .collect();
        (running == 1 && pending.len() == 1).then(|| pending[0].clone())
    });
    assert!(
        held["status"]["placement_reason"]
            .as_str()
            .unwrap()
            .contains("quota of project 'q' in DE exceeded: vms: 1 of 1"),
        "{held}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        c.vm(held["name"].as_str().unwrap())["status"]["phase"],
        "pending"
    );
    let (s, v) = c.api_raw(
        "DELETE",
        &format!("/api/v1/vms/{}", held["name"].as_str().unwrap()),
        None,
        Some(&token),
    );
    assert_eq!(s, 202, "{v}");

    // At create: a VM pinned to DE does not fit any more.
    let (s, v) = create(&c, &token, "d2", Some("DE"));
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("quota of project 'q' in DE exceeded: vms: 1 of 1"),
        "{v}"
    );

    // A migration into DE would exceed it: refused, and e1 stays where it is.
    let (s, v) = c.api_raw(
        "POST",
        "/api/v1/vms/e1/migrate",
        Some(json!({"to_country": "DE", "mode": "cold"}).to_string()),
        Some(&token),
    );
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("in DE exceeded"),
        "{v}"
    );
    let e1 = c.vm("e1");
    assert_eq!(e1["status"]["country"], "ES");
    assert!(e1["status"]["migration"].is_null(), "{e1}");
    assert!(c
        .ok("GET", "/api/v1/vms/e1/migrations", None)
        .as_array()
        .unwrap()
        .is_empty());
    // Into PL, with no limit, it moves.
    let (s, v) = c.api_raw(
        "POST",
        "/api/v1/vms/e1/migrate",
        Some(json!({"to_country": "PL", "mode": "cold"}).to_string()),
        Some(&token),
    );
    assert_eq!(s, 202, "{v}");
    // The project follows its migration (as `vm migrate --wait` does);
    // another project does not see it.
    let mig = v["id"].as_str().unwrap().to_string();
    let (s, m) = c.api_raw(
        "GET",
        &format!("/api/v1/migrations/{mig}"),
        None,
        Some(&token),
    );
    assert_eq!(s, 200, "{m}");
    let (s, l) = c.api_raw("GET", "/api/v1/migrations", None, Some(&token));
    assert_eq!((s, l["items"].as_array().unwrap().len()), (200, 1), "{l}");
    c.cli_ok(&["project", "create", "other"]);
    let other = member_token(&c, "otto", "other");
    let (s, _) = c.api_raw(
        "GET",
        &format!("/api/v1/migrations/{mig}"),
        None,
        Some(&other),
    );
    assert_eq!(s, 404);
    let (s, l) = c.api_raw("GET", "/api/v1/migrations", None, Some(&other));
    assert_eq!((s, l["items"].as_array().unwrap().len()), (200, 0), "{l}");
    common::wait_until("e1 in PL", Duration::from_secs(120), || {
        (c.vm("e1")["status"]["country"] == "PL").then_some(())
    });
    let r = c.ok("GET", "/api/v1/projects/q/quota", None);
    assert_eq!(r["usage_by_country"]["DE"]["vms"], 1, "{r}");
    assert_eq!(r["usage_by_country"]["PL"]["vms"], 1, "{r}");
    assert_eq!(r["quota"]["countries"]["DE"]["vms"], 1, "{r}");
}
