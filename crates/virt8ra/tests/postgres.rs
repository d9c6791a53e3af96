//! The control plane on PostgreSQL end to end: a real `virt8ra server
//! --database postgres://...` process on a PostgreSQL 15 of the test's own
//! (`virt8ra_store::pgtest`), simulated agents (real processes and
//! channels, VMs in memory), the CLI and the API; the control plane
//! killed and started again on the same database. And what an operator
//! sees when the URL is bad or the database is not there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, wait_until, Cluster, TOPOLOGY};
use serde_json::{json, Value};
use virt8ra_store::pgtest::PgCluster;

/// The VMs `virt8ra vm list -o json` shows: name -> phase.
fn listed(c: &Cluster) -> Vec<(String, String)> {
    let out: Value = serde_json::from_str(&c.cli_ok(&["vm", "list", "-o", "json"])).unwrap();
    let items = out
        .get("items")
        .and_then(Value::as_array)
        .or(out.as_array())
        .unwrap()
        .clone();
    let mut vms: Vec<(String, String)> = items
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["status"]["phase"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    vms.sort();
    vms
}

/// `n` VM creates at once through the API, each from a thread of its own;
/// their answers' status codes, in order.
fn create_at_once(c: &Cluster, names: &[String]) -> Vec<u16> {
    std::thread::scope(|s| {
        let handles: Vec<_> = names
            .iter()
            .map(|name| {
                s.spawn(move || {
                    c.api(
                        "POST",
                        "/api/v1/vms",
                        Some(json!({"name": name, "image": "tiny", "memory_mib": 64})),
                    )
                    .0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn pg_control_plane_keeps_everything_across_restarts_and_concurrent_creates() {
    let pg = PgCluster::start();
    let url = pg.create_database();
    let mut c = Cluster::start_args(&["--database", &url]);
    // The state is in PostgreSQL, not in a SQLite file beside it.
    assert!(!c.server_dir().join("virt8ra.db").exists());
    let (provider, country, site, city, lat, lon) = TOPOLOGY[0];
    c.cli_ok(&["provider", "create", provider, "--country", country]);
    c.cli_ok(&[
        "site",
        "create",
        site,
        "--provider",
        provider,
        "--country",
        country,
        "--city",
        city,
        "--lat",
        &lat.to_string(),
        "--lon",
        &lon.to_string(),
    ]);
    for i in 0..2 {
        c.start_agent_with(&format!("sim-{i}"), Some(site), &["--driver", "sim"]);
    }
    c.wait_hosts_ready(2);
    c.import_tiny_image();
    for name in ["web", "db", "cache"] {
        c.cli_ok(&[
            "vm",
            "create",
            name,
            "--image",
            "tiny",
            "--memory-mib",
            "64",
            "--wait",
        ]);
    }

    // Many creates at once, every name new: all stored, none twice.
    let names: Vec<String> = (0..24).map(|i| format!("c{i}")).collect();
    let codes = create_at_once(&c, &names);
    assert!(codes.iter().all(|s| (200..300).contains(s)), "{codes:?}");
    // One name from many clients at once: one create wins, the others
    // are told 409.
    let dup: Vec<String> = (0..8).map(|_| "dup".to_string()).collect();
    let mut codes = create_at_once(&c, &dup);
    codes.sort();
    assert_eq!(codes[1..], [409; 7], "{codes:?}");
    assert!((200..300).contains(&codes[0]), "{codes:?}");
    let (status, body) = c.api(
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "web", "image": "tiny", "memory_mib": 64})),
    );
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "conflict", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("web"),
        "{body}"
    );

    let want: BTreeSet<String> = ["web", "db", "cache", "dup"]
        .iter()
        .map(|s| s.to_string())
        .chain(names.iter().cloned())
        .collect();
    wait_until("28 running VMs", Duration::from_secs(90), || {
        let vms = listed(&c);
        vms.iter().all(|(_, p)| p == "running").then_some(())
    });
    let before = listed(&c);
    let got: BTreeSet<String> = before.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(got, want);
    assert_eq!(before.len(), want.len(), "a name listed twice: {before:?}");
    // Each of them is one row in PostgreSQL, with its events.
    assert_eq!(
        pg.psql(&url, "SELECT COUNT(*) FROM vms WHERE phase <> 'deleted'"),
        "28"
    );
    assert_eq!(
        pg.psql(
            &url,
            "SELECT COUNT(DISTINCT vm_id) FROM vm_events e JOIN vms v ON v.id = e.vm_id"
        ),
        "28"
    );

    // A SIGKILL of the control plane loses nothing it acknowledged: started
    // again on the same database, it lists the same VMs, still running (its
    // agents come back to it), and the same admin token works.
    c.kill_server();
    c.start_server();
    c.wait_hosts_ready(2);
    assert_eq!(listed(&c), before);
    let providers = c.ok("GET", "/api/v1/providers", None);
    assert_eq!(providers["items"][0]["name"], provider);
    let sites = c.ok("GET", "/api/v1/sites", None);
    assert_eq!(sites["items"][0]["name"], site);
    // And it goes on writing: a delete, and the name taken again.
    c.cli_ok(&["vm", "delete", "c0", "--wait"]);
    c.cli_ok(&[
        "vm",
        "create",
        "c0",
        "--image",
        "tiny",
        "--memory-mib",
        "64",
        "--wait",
    ]);
    assert_eq!(
        pg.psql(&url, "SELECT COUNT(*) FROM vms WHERE name = 'c0'"),
        "2"
    );
}

/// What `virt8ra server --database` says and does for a URL it cannot use:
/// one line saying what is wrong, a non-zero exit, soon, and never the
/// password.
#[test]
fn pg_a_bad_url_or_an_unreachable_database_stops_the_start_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    for (url, want) in [
        (
            "postgres://virt8ra:s3cret@127.0.0.1:1/virt8ra",
            "cannot connect to PostgreSQL at postgres://virt8ra:***@127.0.0.1:1/virt8ra: \
             Connection refused",
        ),
        (
            "mysql://virt8ra:s3cret@127.0.0.1/virt8ra",
            "is not a PostgreSQL URL",
        ),
        (
            "postgresql://virt8ra:s3cret@127.0.0.1:port/virt8ra",
            "invalid value for option `port`",
        ),
    ] {
        let started = Instant::now();
        let out = Command::new(bin())
            .args(["server", "--listen", "127.0.0.1:0", "--database", url])
            .arg("--data-dir")
            .arg(dir.path().join("server"))
            .env("VIRT8RA_LOG", "info")
            .output()
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(20), "{url}");
        assert!(!out.status.success(), "{url}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let last = lines.last().copied().unwrap_or_default();
        assert!(last.starts_with("error: "), "{url}: {stderr}");
        assert!(last.contains(want), "{url}: {stderr}");
        assert!(!stderr.contains("s3cret"), "{url}: {stderr}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("s3cret"),
            "{url}"
        );
    }
    // Nothing was made for it in the data directory but the keys.
    assert!(!dir.path().join("server/virt8ra.db").exists());
}
