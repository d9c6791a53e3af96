//! The audit log, the residency trail and showback, end to end: a scripted
//! session of changing calls is in the audit log in order, with who made
//! each and how it ended (refusals too), and survives a kill -9 of the
//! control plane; a real guest moved across three countries (a cold
//! migration, then an evacuation) shows all three in its history, with
//! its export and its re-import, and its usage agrees with that history.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{wait_until, Cluster};
use serde_json::{json, Value};

const BOOT: Duration = Duration::from_secs(120);

/// A call with its request id; returns (status, request id echoed).
fn call(c: &Cluster, method: &str, path: &str, body: Option<Value>, id: &str) -> (u16, String) {
    let http = reqwest::blocking::Client::new();
    let mut rb = http
        .request(method.parse().unwrap(), format!("{}{path}", c.url))
        .header("x-request-id", id)
        .bearer_auth(&c.token);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = rb.send().unwrap();
    let echoed = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    (resp.status().as_u16(), echoed)
}

fn audit_list(c: &Cluster, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["audit", "list", "-o", "json"];
    all.extend_from_slice(args);
    serde_json::from_str(&c.cli_ok(&all)).unwrap()
}

#[test]
fn changing_calls_are_audited_in_order_and_survive_a_kill() {
    let mut c = Cluster::start();
    let admin_id = {
        // The admin token's id, as the token list would show it: from the
        // first record of a call made with it.
        let (s, _) = call(
            &c,
            "POST",
            "/api/v1/providers",
            Some(json!({"name": "p-es", "country": "ES"})),
            "s1",
        );
        assert_eq!(s, 201);
        audit_list(&c, &[])[0]["actor"]["token_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // The scripted session: created, refused (conflict, bad input, unknown
    // field), changed, deleted, and one without a valid token.
    let script: &[(&str, &str, Option<Value>, u16)] = &[
        (
            "POST",
            "/api/v1/providers",
            Some(json!({"name": "p-es", "country": "ES"})),
            409,
        ),
        (
            "POST",
            "/api/v1/sites",
            Some(json!({"name": "es-1", "provider": "p-es", "country": "ES",
            "city": "Logroño", "latitude": 42.46, "longitude": -2.44})),
            201,
        ),
        (
            "PATCH",
            "/api/v1/sites/es-1",
            Some(json!({"facts": {"price_vcpu_hour": 0.02}})),
            200,
        ),
        (
            "PATCH",
            "/api/v1/sites/es-1",
            Some(json!({"bogus": 1})),
            400,
        ),
        (
            "POST",
            "/api/v1/sites",
            Some(json!({"name": "Bad Name"})),
            400,
        ),
        ("DELETE", "/api/v1/sites/es-1", None, 204),
        ("DELETE", "/api/v1/sites/es-1", None, 404),
        ("GET", "/api/v1/providers", None, 200),
    ];
    for (i, (m, p, b, want)) in script.iter().enumerate() {
        let id = format!("s{}", i + 2);
        let (s, echoed) = call(&c, m, p, b.clone(), &id);
        assert_eq!(s, *want, "{m} {p}");
        assert_eq!(echoed, id);
    }
    // Without a valid token: recorded with no actor.
    let (s, _) = c.api_raw(
        "DELETE",
        "/api/v1/providers/p-es",
        None,
        Some("not-a-token"),
    );
    assert_eq!(s, 401);
    // A body over the limit: refused by the handler, its caller known.
    let big = json!({"name": "p-big", "country": "ES", "pad": "x".repeat(2 << 20)});
    let (s, _) = call(&c, "POST", "/api/v1/providers", Some(big), "big");
    assert_eq!(s, 413);
    // The last call before the kill is a success; kill -9 right after it.
    let (s, _) = call(
        &c,
        "POST",
        "/api/v1/providers",
        Some(json!({"name": "p-de", "country": "DE"})),
        "last",
    );
    assert_eq!(s, 201);
    c.kill_server();
    c.start_server();

    let recs = audit_list(&c, &["--all"]);
    let got: Vec<(String, String, u64)> = recs
        .iter()
        .map(|r| {
            (
                r["method"].as_str().unwrap().to_string(),
                r["resource"].as_str().unwrap().to_string(),
                r["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, String, u64)> = [
        ("POST", "providers/p-es", 201),
        ("POST", "providers/p-es", 409),
        ("POST", "sites/es-1", 201),
        ("PATCH", "sites/es-1", 200),
        ("PATCH", "sites/es-1", 400),
        ("POST", "sites/Bad Name", 400),
        ("DELETE", "sites/es-1", 204),
        ("DELETE", "sites/es-1", 404),
        ("DELETE", "providers/p-es", 401),
        ("POST", "providers", 413),
        ("POST", "providers/p-de", 201),
    ]
    .iter()
    .map(|(m, r, s)| (m.to_string(), r.to_string(), *s))
    .collect();
    assert_eq!(got, want, "{recs:#?}");
    // In order, with the request ids the calls carried, the admin as the
    // actor of every call with its token, and the caller's address.
    let seqs: Vec<u64> = recs.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(recs[1]["request_id"], "s2");
    assert_eq!(recs[10]["request_id"], "last");
    assert_eq!(recs[3]["route"], "/api/v1/sites/{key}");
    for (i, r) in recs.iter().enumerate() {
        assert!(
            r["remote_addr"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{r}"
        );
        if i == 8 {
            assert!(r["actor"].get("token_id").is_none(), "{r}");
        } else {
            assert_eq!(r["actor"]["token_id"], admin_id.as_str(), "{r}");
            assert_eq!(r["actor"]["token_kind"], "admin", "{r}");
        }
    }
    // Filters: by resource (and what is under it), by actor kind, by time.
    assert_eq!(audit_list(&c, &["--resource", "sites/es-1"]).len(), 5);
    assert_eq!(audit_list(&c, &["--actor", "admin"]).len(), 10);
    let mid = recs[5]["at"].as_str().unwrap();
    assert_eq!(audit_list(&c, &["--all", "--since", mid]).len(), 6);
    let page = c.ok("GET", "/api/v1/audit?limit=4", None);
    assert_eq!(page["items"].as_array().unwrap().len(), 4);
    let next = page["next_cursor"].as_str().unwrap();
    let page2 = c.ok("GET", &format!("/api/v1/audit?limit=4&cursor={next}"), None);
    assert_eq!(page2["items"][0]["seq"], recs[4]["seq"]);
    // Bad queries are 400s that say which parameter.
    common::assert_error(
        c.api("GET", "/api/v1/audit?since=yesterday", None),
        400,
        "since",
    );
    common::assert_error(
        c.api("GET", "/api/v1/audit?format=xml", None),
        400,
        "format",
    );
    // The JSON-lines export: every record, one per line, the same ones.
    let lines = reqwest::blocking::Client::new()
        .get(format!("{}/api/v1/audit?format=jsonl", c.url))
        .bearer_auth(&c.token)
        .send()
        .unwrap()
        .text()
        .unwrap();
    let exported: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(exported.len(), 11, "queries are not recorded: {lines}");
    assert_eq!(exported[..], recs[..]);
    let cli_export = c.cli_ok(&["audit", "export", "--resource", "providers/p-de"]);
    assert_eq!(cli_export.lines().count(), 1);
    // Only the admin reads it.
    let (s, _) = c.api_raw("GET", "/api/v1/audit", None, Some("not-a-token"));
    assert_eq!(s, 401);
}

/// Three providers in three countries, an agent at each, the test image.
fn three_country_cluster() -> Cluster {
    let image = common::test_image();
    let mut c = Cluster::start();
    c.create_topology();
    for (name, site) in [
        ("host-es", "es-logrono"),
        ("host-de", "de-frankfurt"),
        ("host-pl", "pl-gdansk"),
    ] {
        c.start_agent(name, Some(site));
    }
    c.wait_hosts_ready(3);
    c.cli_ok(&["image", "import", image.to_str().unwrap(), "--name", "test"]);
    // Prices and grid intensities that differ per site.
    for (site, price, gco2) in [
        ("es-logrono", 0.02, 150.0),
        ("de-frankfurt", 0.03, 350.0),
        ("pl-gdansk", 0.01, 700.0),
    ] {
        c.ok(
            "PATCH",
            &format!("/api/v1/sites/{site}"),
            Some(
                json!({"facts": {"price_vcpu_hour": price, "price_gib_hour": 0.004,
                "price_disk_gib_hour": 0.0001, "grid_gco2_per_kwh": gco2, "pue": 1.2}}),
            ),
        );
    }
    c
}

fn cold_migrate(c: &Cluster, vm: &str, host: &str) {
    let out = c.cli_ok(&[
        "vm",
        "migrate",
        vm,
        "--to-host",
        host,
        "--mode",
        "cold",
        "--wait",
        "-o",
        "json",
    ]);
    let m: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(m["phase"], "completed", "{m}");
    c.wait_phase(vm, "running", BOOT);
}

fn time(v: &Value) -> DateTime<Utc> {
    v.as_str().unwrap().parse().unwrap()
}

#[test]
fn a_vm_moved_across_three_countries_shows_them_all_and_its_usage_agrees() {
    let c = three_country_cluster();
    // Placed in Spain (the other hosts in maintenance meanwhile).
    for h in ["host-de", "host-pl"] {
        c.cli_ok(&["host", "set-state", h, "maintenance"]);
    }
    c.ok(
        "POST",
        "/api/v1/vms",
        Some(
            json!({"name": "nomad", "image": "test", "vcpus": 1, "memory_mib": 256,
            "disk_gib": 1, "placement": {"countries": ["ES", "DE", "PL"]}}),
        ),
    );
    c.wait_phase("nomad", "running", BOOT);
    for h in ["host-de", "host-pl"] {
        c.cli_ok(&["host", "set-state", h, "ready"]);
    }
    cold_migrate(&c, "nomad", "host-de");
    // Then to Poland by evacuating its host (Spain closed meanwhile).
    c.cli_ok(&["host", "set-state", "host-es", "maintenance"]);
    c.cli_ok(&["host", "evacuate", "host-de", "--mode", "cold", "--wait"]);
    c.wait_phase("nomad", "running", BOOT);
    c.cli_ok(&["host", "set-state", "host-es", "ready"]);

    let h: Value =
        serde_json::from_str(&c.cli_ok(&["vm", "history", "nomad", "-o", "json"])).unwrap();
    assert_eq!(h["countries"], json!(["DE", "ES", "PL"]), "{h:#}");
    let iv = h["intervals"].as_array().unwrap();
    let places: Vec<(&str, &str, &str)> = iv
        .iter()
        .map(|i| {
            (
                i["country"].as_str().unwrap(),
                i["site"].as_str().unwrap(),
                i["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        places,
        [
            ("ES", "es-logrono", "created"),
            ("DE", "de-frankfurt", "cold_migration"),
            ("PL", "pl-gdansk", "evacuation"),
        ],
        "{h:#}"
    );
    assert_eq!(iv[1]["provider"], "provider-de");
    assert_eq!(iv[2]["host"], "host-pl");
    let why = iv[2]["detail"].as_str().unwrap();
    assert!(why.contains("evacuating host(s) host-de"), "{why}");
    assert_eq!(
        (iv[0]["vcpus"].as_u64(), iv[0]["memory_mib"].as_u64()),
        (Some(1), Some(256))
    );
    // Contiguous: each move ends one interval where the next begins.
    for w in iv.windows(2) {
        assert_eq!(w[0]["to"], w[1]["from"], "{h:#}");
        assert!(w[0]["ended_by"]
            .as_str()
            .unwrap()
            .starts_with("cold migration"));
    }
    assert!(iv[2].get("to").is_none());

    // Exported: a copy staged on the control plane for as long as the
    // export is kept (the CLI removes it once downloaded).
    c.cli_ok(&["vm", "stop", "nomad", "--wait"]);
    let bundle = c.dir.path().join("bundle");
    c.cli_ok(&["vm", "export", "nomad", "-o", bundle.to_str().unwrap()]);
    // Deleted: the trail stays, its last interval closed.
    c.cli_ok(&["vm", "delete", "nomad", "--wait"]);
    let h = c.ok("GET", "/api/v1/vms/nomad/history", None);
    let all = h["intervals"].as_array().unwrap();
    assert_eq!(all.len(), 4, "{h:#}");
    let export = &all[3];
    assert!(
        export["copy"].as_str().unwrap().starts_with("export:"),
        "{h:#}"
    );
    assert_eq!(export["reason"], "export");
    assert!(
        export.get("site").is_none() && export.get("to").is_some(),
        "{h:#}"
    );
    let iv: Vec<Value> = all.iter().filter(|i| i["copy"] == "vm").cloned().collect();
    assert_eq!(iv[2]["ended_by"], "deleted");
    // Imported again: a new VM whose trail starts by saying where from.
    c.cli_ok(&[
        "vm",
        "import",
        bundle.to_str().unwrap(),
        "--name",
        "again",
        "--no-start",
    ]);
    let again = wait_until("the import to be placed", Duration::from_secs(60), || {
        let h = c.ok("GET", "/api/v1/vms/again/history", None);
        (!h["intervals"].as_array().unwrap().is_empty()).then_some(h)
    });
    let first = &again["intervals"][0];
    assert_eq!(first["reason"], "imported", "{again:#}");
    let detail = first["detail"].as_str().unwrap();
    assert!(
        detail.contains("VM nomad") && detail.contains("pl-gdansk"),
        "{detail}"
    );

    // Usage agrees with the trail: per site, hours = to - from, and the
    // price and carbon follow from the site's facts.
    let month = time(&iv[0]["from"]).format("%Y-%m").to_string();
    let u: Value =
        serde_json::from_str(&c.cli_ok(&["usage", "--month", &month, "-o", "json"])).unwrap();
    let row = u["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vm"] == "nomad")
        .unwrap_or_else(|| panic!("no usage row for nomad: {u:#}"));
    let sites = row["sites"].as_array().unwrap();
    assert_eq!(sites.len(), 3, "{row:#}");
    let pm = &u["power_model"];
    let facts = [(0.02, 150.0), (0.03, 350.0), (0.01, 700.0)];
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs() + 1e-12;
    let mut total_vcpu_h = 0.0;
    for (i, (price, gco2)) in iv.iter().zip(facts) {
        let site = i["site"].as_str().unwrap();
        let hours = (time(&i["to"]) - time(&i["from"])).num_milliseconds() as f64 / 3.6e6;
        let s = sites.iter().find(|s| s["site"] == site).unwrap();
        assert!(
            close(s["hours"].as_f64().unwrap(), hours),
            "{site}: {s} vs {hours}"
        );
        let size = |k: &str| i[k].as_f64().unwrap();
        let vcpu_h = size("vcpus") * hours;
        let gib_h = size("memory_mib") / 1024.0 * hours;
        let disk_h = size("disk_gib") * hours;
        let cost = vcpu_h * price + gib_h * 0.004 + disk_h * 0.0001;
        assert!(
            close(s["cost_eur"].as_f64().unwrap(), cost),
            "{site}: {s} vs {cost}"
        );
        let w = |k: &str| pm[k].as_f64().unwrap();
        let watt_h = vcpu_h * w("watts_per_vcpu")
            + gib_h * w("watts_per_gib_memory")
            + disk_h * w("watts_per_gib_disk");
        let carbon = watt_h / 1000.0 * 1.2 * gco2;
        assert!(
            close(s["carbon_g"].as_f64().unwrap(), carbon),
            "{site}: {s} vs {carbon}"
        );
        total_vcpu_h += vcpu_h;
    }
    let t = row["vcpu_hours"].as_f64().unwrap();
    assert!((t - total_vcpu_h).abs() < 1e-9, "{t} vs {total_vcpu_h}");
    assert!(u["total"]["vcpu_hours"].as_f64().unwrap() >= t);
    // The moves are in the audit log under the VM.
    let moves: Vec<Value> = audit_list(&c, &["--resource", "vms/nomad/migrate"]);
    assert_eq!(moves.len(), 1);
    let evac = audit_list(&c, &["--resource", "hosts/host-de/evacuate"]);
    assert_eq!(evac.len(), 1);
    c.cli_ok(&["vm", "delete", "again", "--wait"]);
    assert_eq!(moves[0]["status"], 202, "{moves:#?}");
    assert_eq!(evac[0]["status"], 202, "{evac:#?}");
    common::assert_error(
        c.api("GET", "/api/v1/usage?month=2026-13", None),
        400,
        "YYYY-MM",
    );
    wait_until("nothing left running", Duration::from_secs(30), || {
        c.qemu_pids().is_empty().then_some(())
    });
}
