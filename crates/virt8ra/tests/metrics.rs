//! Prometheus metrics end to end: a real control plane with simulated
//! agents (separate processes, real channels, no QEMU) runs a small
//! workload; `GET /metrics` is scraped on the main listener (admin token)
//! and on `--metrics-listen` (no token), checked with Prometheus's own
//! `promtool check metrics`, and its series are compared with what the API
//! lists.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{assert_error, free_port, Cluster, TOPOLOGY};
use serde_json::json;

/// One sample: its name, its labels, its value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses the samples of the text format (comments skipped; promtool checks
/// the rest of the format).
fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').unwrap();
                let labels = inner
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p.split_once("=\"").unwrap();
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (name, labels)
            }
        };
        out.push((name.to_string(), labels, value));
    }
    out
}

/// The value of the sample `name` whose labels include `want`.
fn value(s: &[Sample], name: &str, want: &[(&str, &str)]) -> Option<f64> {
    s.iter()
        .find(|(n, l, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
}

/// `promtool check metrics` (Debian's `prometheus` package) on `text`.
fn promtool_check(text: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => panic!(
            "promtool is needed to check the exposition ({e}): install it with \
             `apt-get install prometheus` (scripts/deps.sh does)"
        ),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics refused the exposition ({}): {}{}\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn scrape(url: &str, token: Option<&str>) -> (u16, String, String) {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut rb = client.get(url);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    let resp = rb.send().unwrap();
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, ctype, resp.text().unwrap())
}

#[test]
fn metrics_count_the_workload_with_bounded_labels() {
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let agent_metrics = format!("127.0.0.1:{}", free_port());
    let mut c = Cluster::start_args(&["--metrics-listen", &metrics_addr]);
    c.create_topology();
    for (i, (_, _, site, ..)) in TOPOLOGY.iter().enumerate() {
        let mut args = vec!["--driver", "sim"];
        if i == 0 {
            args.extend(["--metrics-listen", agent_metrics.as_str()]);
        }
        c.start_agent_with(&format!("sim-{i}"), Some(site), &args);
    }
    c.wait_hosts_ready(3);
    c.import_tiny_image();

    // Four VMs that fit (two pinned to Spain, one to Germany, one free),
    // one that fits nowhere (more memory than any host has); the free one
    // is migrated (cold: simulated hosts move VMs cold) and deleted; and a
    // lookup of a VM that does not exist, by a name only that lookup uses.
    let mut names = Vec::new();
    for (i, country) in ["ES", "ES", "DE", ""].iter().enumerate() {
        let name = format!("metrics-vm-{i}");
        let placement = if country.is_empty() {
            json!({"countries": ["DE", "PL"]})
        } else {
            json!({"countries": [country]})
        };
        let (s, v) = c.api(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": name, "image": "tiny", "memory_mib": 128,
                        "placement": placement})),
        );
        assert_eq!(s, 201, "{v}");
        names.push(name);
    }
    let (s, v) = c.api(
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "metrics-vm-huge", "image": "tiny", "memory_mib": 65536})),
    );
    assert_eq!(s, 201, "{v}");
    names.push("metrics-vm-huge".into());
    for n in &names[..4] {
        c.wait_phase(n, "running", Duration::from_secs(60));
    }
    let from = c.vm("metrics-vm-3")["status"]["site"]
        .as_str()
        .unwrap()
        .to_string();
    let to = if from == "pl-gdansk" {
        "de-frankfurt"
    } else {
        "pl-gdansk"
    };
    let out = c.cli_ok(&[
        "vm",
        "migrate",
        "metrics-vm-3",
        "--to-site",
        to,
        "--wait",
        "-o",
        "json",
    ]);
    let mig: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(mig["phase"], "completed", "{mig}");
    assert_eq!(mig["mode"], "cold", "{mig}");
    c.ok("DELETE", "/api/v1/vms/metrics-vm-3", None);
    c.wait_phase("metrics-vm-3", "deleted", Duration::from_secs(60));
    assert_error(
        c.api("GET", "/api/v1/vms/metrics-vm-missing", None),
        404,
        "metrics-vm-missing",
    );
    assert_error(
        c.api("GET", "/api/v1/no-such-thing-metrics-vm-0", None),
        404,
        "no such endpoint",
    );
    let ids: Vec<String> = names
        .iter()
        .filter(|n| *n != "metrics-vm-3")
        .map(|n| c.vm(n)["id"].as_str().unwrap().to_string())
        .collect();

    // Without the token the main listener refuses, as for the rest of the API.
    let main = format!("{}/metrics", c.url);
    assert_error(
        c.api_raw("GET", "/metrics", None, None),
        401,
        "bearer token",
    );
    let (s, ctype, text) = scrape(&main, Some(&c.token));
    assert_eq!(s, 200, "{text}");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    promtool_check(&text);
    let m = samples(&text);

    // VMs by phase: what the API lists, phase by phase.
    for phase in [
        "pending",
        "scheduled",
        "provisioning",
        "running",
        "stopping",
        "stopped",
        "failed",
        "deleting",
        "deleted",
    ] {
        let listed = c.ok("GET", &format!("/api/v1/vms?phase={phase}"), None)["items"]
            .as_array()
            .unwrap()
            .len() as f64;
        assert_eq!(
            value(&m, "virt8ra_vms", &[("phase", phase)]),
            Some(listed),
            "VMs in phase {phase}"
        );
    }
    assert_eq!(value(&m, "virt8ra_vms", &[("phase", "running")]), Some(3.0));
    // By site: the deleted VM no longer counts; the pending one has no site.
    assert_eq!(
        value(
            &m,
            "virt8ra_site_vms",
            &[
                ("site", "es-logrono"),
                ("provider", "provider-es"),
                ("country", "ES")
            ]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(&m, "virt8ra_site_vms", &[("site", "de-frankfurt")]),
        Some(1.0)
    );
    assert_eq!(
        value(&m, "virt8ra_site_vms", &[("site", "pl-gdansk")]),
        None,
        "a site whose VMs are all deleted has no series"
    );

    // Requests by route template and status.
    let req = |method: &str, route: &str, status: &str| {
        value(
            &m,
            "virt8ra_api_requests_total",
            &[("method", method), ("route", route), ("status", status)],
        )
    };
    assert_eq!(req("POST", "/api/v1/vms", "201"), Some(5.0));
    assert_eq!(req("GET", "/api/v1/vms/{key}", "404"), Some(1.0));
    assert_eq!(req("GET", "unmatched", "404"), Some(1.0));
    assert_eq!(req("GET", "/metrics", "401"), Some(1.0));
    assert!(req("GET", "/api/v1/vms/{key}", "200").unwrap() >= 4.0);
    assert_eq!(
        value(
            &m,
            "virt8ra_api_request_duration_seconds_count",
            &[("method", "POST"), ("route", "/api/v1/vms")]
        ),
        Some(5.0)
    );

    // Hosts by state, as the API lists them; heartbeats; placement.
    assert_eq!(value(&m, "virt8ra_hosts", &[("state", "ready")]), Some(3.0));
    assert_eq!(
        value(&m, "virt8ra_hosts", &[("state", "unreachable")]),
        Some(0.0)
    );
    assert_eq!(value(&m, "virt8ra_agents_connected", &[]), Some(3.0));
    assert!(value(&m, "virt8ra_heartbeats_received_total", &[]).unwrap() >= 3.0);
    let lag = value(&m, "virt8ra_heartbeat_age_max_seconds", &[]).unwrap();
    assert!((0.0..3.0).contains(&lag), "agents beat every second: {lag}");
    // Simulated agents never download the image: nothing was served yet.
    assert_eq!(
        value(&m, "virt8ra_image_served_bytes_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        value(
            &m,
            "virt8ra_placement_decisions_total",
            &[("purpose", "schedule")]
        ),
        Some(4.0)
    );
    assert!(
        value(
            &m,
            "virt8ra_placement_refusals_total",
            &[("purpose", "schedule"), ("rule", "memory")]
        )
        .unwrap()
            >= 1.0,
        "the huge VM is refused for memory"
    );
    assert!(value(&m, "virt8ra_store_commit_duration_seconds_count", &[]).unwrap() >= 5.0);

    // The migration: its target chosen by the engine, started and ended.
    assert_eq!(
        value(
            &m,
            "virt8ra_placement_decisions_total",
            &[("purpose", "migrate")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&m, "virt8ra_migrations_started_total", &[("mode", "cold")]),
        Some(1.0)
    );
    let done = [("mode", "cold"), ("outcome", "completed")];
    assert_eq!(
        value(&m, "virt8ra_migrations_finished_total", &done),
        Some(1.0)
    );
    assert_eq!(
        value(&m, "virt8ra_migration_duration_seconds_count", &done),
        Some(1.0)
    );
    assert_eq!(
        value(
            &m,
            "virt8ra_migrations_finished_total",
            &[("outcome", "failed")]
        ),
        None
    );

    // No label value names a VM, whatever paths were asked for.
    for (name, labels, _) in &m {
        for v in labels.values() {
            for vm in names.iter().chain(&ids) {
                assert!(
                    !v.contains(vm.as_str()),
                    "{name} has a label value {v:?} naming VM {vm}"
                );
            }
        }
    }

    // The metrics listener: the same exposition without a token, nothing else.
    let open = format!("http://{metrics_addr}/metrics");
    let (s, ctype, text) = scrape(&open, None);
    assert_eq!(s, 200, "{text}");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    promtool_check(&text);
    let again = samples(&text);
    assert_eq!(
        value(&again, "virt8ra_vms", &[("phase", "running")]),
        Some(3.0)
    );
    let (s, _, body) = scrape(&format!("http://{metrics_addr}/api/v1/vms"), None);
    assert_eq!(s, 404, "{body}");
    assert!(body.contains("GET /metrics only"), "{body}");

    // The agent's own metrics (sim-0 is the host in Spain, with both ES
    // VMs): its capacity as it joined, and what runs there. Simulated VMs
    // have no QEMU, so no per-VM series.
    let (s, ctype, text) = scrape(&format!("http://{agent_metrics}/metrics"), None);
    assert_eq!(s, 200, "{text}");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    promtool_check(&text);
    let a = samples(&text);
    assert_eq!(value(&a, "virt8ra_agent_host_vcpus", &[]), Some(4.0));
    assert_eq!(
        value(&a, "virt8ra_agent_host_memory_bytes", &[]),
        Some(2048.0 * 1024.0 * 1024.0)
    );
    let free = value(&a, "virt8ra_agent_host_memory_free_bytes", &[]).unwrap();
    assert!(
        free <= (2048.0 - 256.0) * 1024.0 * 1024.0,
        "two 128 MiB VMs run there: {free}"
    );
    assert_eq!(value(&a, "virt8ra_agent_vms_running", &[]), Some(2.0));
    assert!(
        !a.iter().any(|(n, _, _)| n.starts_with("virt8ra_agent_vm_")),
        "{text}"
    );
}

#[test]
fn the_agent_reports_its_qemu_cpu_time_and_memory_per_vm() {
    let image = common::test_image();
    let agent_metrics = format!("127.0.0.1:{}", free_port());
    let mut c = Cluster::start();
    c.create_topology();
    let site = TOPOLOGY[0].2;
    c.start_agent_with("qemu-0", Some(site), &["--metrics-listen", &agent_metrics]);
    c.wait_hosts_ready(1);
    c.cli_ok(&["image", "import", image.to_str().unwrap(), "--name", "test"]);
    c.ok(
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "metrics-qemu", "image": "test", "memory_mib": 128})),
    );
    let vm = c.wait_phase("metrics-qemu", "running", Duration::from_secs(120));
    let id = vm["id"].as_str().unwrap().to_string();
    // The agent fetched the image from the control plane: long-link bytes.
    let (s, _, cp) = scrape(&format!("{}/metrics", c.url), Some(&c.token));
    assert_eq!(s, 200, "{cp}");
    let served = value(&samples(&cp), "virt8ra_image_served_bytes_total", &[]).unwrap();
    let size = std::fs::metadata(&image).unwrap().len() as f64;
    assert!(served >= size, "served {served} of a {size}-byte image");
    // QEMU boots the guest: its CPU time grows from one scrape to the next.
    let cpu = |text: &str| {
        value(
            &samples(text),
            "virt8ra_agent_vm_cpu_seconds_total",
            &[("vm", id.as_str())],
        )
    };
    let url = format!("http://{agent_metrics}/metrics");
    let (s, _, first) = scrape(&url, None);
    assert_eq!(s, 200, "{first}");
    promtool_check(&first);
    let before = cpu(&first).unwrap_or_else(|| panic!("no CPU time of {id}:\n{first}"));
    assert!(before > 0.0, "{first}");
    let rss = value(
        &samples(&first),
        "virt8ra_agent_vm_memory_resident_bytes",
        &[("vm", id.as_str())],
    )
    .unwrap();
    assert!(
        rss > 16.0 * 1024.0 * 1024.0,
        "QEMU holds a 128 MiB guest: {rss}"
    );
    let after = common::wait_until(
        "the guest's CPU time to grow",
        Duration::from_secs(30),
        || {
            let (_, _, text) = scrape(&url, None);
            cpu(&text).filter(|v| *v > before)
        },
    );
    assert!(after > before);
    assert_eq!(
        value(&samples(&first), "virt8ra_agent_vms_running", &[]),
        Some(1.0)
    );

    // Deleted: its series go with it.
    c.ok("DELETE", "/api/v1/vms/metrics-qemu", None);
    c.wait_phase("metrics-qemu", "deleted", Duration::from_secs(60));
    common::wait_until("the VM's series to go", Duration::from_secs(30), || {
        let (_, _, text) = scrape(&url, None);
        cpu(&text).is_none().then_some(())
    });
}
