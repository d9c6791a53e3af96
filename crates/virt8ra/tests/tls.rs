//! HTTPS end to end: control planes serving TLS with certificates from test
//! CAs made at test time, and every client — the CLI, agents (join, the WSS
//! channel, image downloads, relays, staging), and a control plane fetching
//! from another one (catalogs, image imports) — trusting exactly what it is
//! told to. Real processes and real sockets on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, wait_until, Cluster};
use serde_json::{json, Value};

fn json_out(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// Runs the CLI against `c` without any CA (no flag, no environment, no
/// config file); returns (success, stderr).
fn cli_without_ca(c: &Cluster, url: &str, args: &[&str]) -> (bool, String) {
    let home = c.dir.path().join("empty-home");
    std::fs::create_dir_all(&home).unwrap();
    let out = Command::new(bin())
        .args(args)
        .env("VIRT8RA_URL", url)
        .env("VIRT8RA_TOKEN", &c.token)
        .env("HOME", &home)
        .env_remove("VIRT8RA_CA_CERT")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn cli_err(c: &Cluster, args: &[&str]) -> String {
    let out = c.cli(args);
    assert!(
        !out.status.success(),
        "virt8ra {} should have failed",
        args.join(" ")
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn tiny_disk(path: &std::path::Path) -> String {
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg("1M")
        .status()
        .unwrap();
    assert!(st.success());
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

#[test]
fn https_control_planes_cli_agents_catalogs_and_imports() {
    // B: another provider's control plane on HTTPS (its own CA), publishing
    // an appliance.
    let b = Cluster::start_tls(&[]);
    assert!(b.url.starts_with("https://"));
    let disk = b.dir.path().join("tiny.qcow2");
    let sha = tiny_disk(&disk);
    b.cli_ok(&[
        "image",
        "import",
        disk.to_str().unwrap(),
        "--name",
        "tiny-disk",
    ]);
    b.ok(
        "POST",
        "/api/v1/appliances",
        Some(
            json!({"name": "tiny", "version": "0.1.0", "images": [{"name": "tiny-disk"}],
                    "template": {"memory_mib": 64}}),
        ),
    );
    let key = json_out(&b.cli_ok(&["catalog", "key", "-o", "json"]));
    let b_key = key["public_key"].as_str().unwrap().to_string();
    let b_url = key["url"].as_str().unwrap().to_string();
    assert_eq!(b_url, format!("{}/api/v1/catalog", b.url));

    // A: this provider's control plane on HTTPS with a CA of its own; its
    // outbound fetches trust B's CA (and not its own).
    let b_ca = b.tls.as_ref().unwrap().ca.to_str().unwrap().to_string();
    let mut a = Cluster::start_tls(&["--ca-cert", &b_ca]);
    let a_tls = a.tls.clone().unwrap();

    // The CLI with the CA works (VIRT8RA_CA_CERT); without it, it fails in
    // one line that names the certificate problem.
    a.create_topology();
    let providers = json_out(&a.cli_ok(&["provider", "list", "-o", "json"]));
    assert_eq!(providers.as_array().unwrap().len(), 3, "{providers}");
    let (ok, err) = cli_without_ca(&a, &a.url, &["provider", "list"]);
    assert!(!ok);
    assert_eq!(
        err.trim(),
        "error: TLS: the certificate of 127.0.0.1 is not trusted (pass --ca-cert FILE, set \
         VIRT8RA_CA_CERT or put ca_cert: in ~/.config/virt8ra/config.yaml: the CA that signed it)"
    );
    // Another CA (B's) does not vouch for A, and the message says which file was tried.
    let (ok, err) = cli_without_ca(&a, &a.url, &["--ca-cert", &b_ca, "provider", "list"]);
    assert!(!ok);
    assert!(
        err.contains("is not trusted: neither a public root nor the CA in") && err.contains(&b_ca),
        "{err}"
    );
    // An unreadable CA file is a one-line error too.
    let (ok, err) = cli_without_ca(
        &a,
        &a.url,
        &["--ca-cert", "/nonexistent.pem", "site", "list"],
    );
    assert!(!ok);
    assert!(
        err.starts_with("error: CA certificate /nonexistent.pem: ")
            && err.trim().lines().count() == 1,
        "{err}"
    );
    // `ca_cert:` in the config file, relative to its directory.
    let cfg_dir = a.dir.path().join("cfg-home/.config/virt8ra");
    std::fs::create_dir_all(&cfg_dir).unwrap();
    std::fs::copy(&a_tls.ca, cfg_dir.join("a-ca.pem")).unwrap();
    std::fs::write(
        cfg_dir.join("config.yaml"),
        format!("url: {}\ntoken: {}\nca_cert: a-ca.pem\n", a.url, a.token),
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["site", "list", "-o", "json"])
        .env("HOME", a.dir.path().join("cfg-home"))
        .env_remove("VIRT8RA_URL")
        .env_remove("VIRT8RA_TOKEN")
        .env_remove("VIRT8RA_CA_CERT")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        json_out(&String::from_utf8_lossy(&out.stdout))
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // Plain HTTP on the HTTPS port: a 400 that says to use https (no hang),
    // for the CLI as for any HTTP client.
    let http_url = format!("http://127.0.0.1:{}", a.port);
    let t = Instant::now();
    let resp = common::https_client(None)
        .get(format!("{http_url}/healthz"))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().unwrap();
    assert_eq!(body["error"]["code"], "https_required", "{body}");
    assert!(t.elapsed() < Duration::from_secs(5));
    let (ok, err) = cli_without_ca(&a, &http_url, &["provider", "list"]);
    assert!(!ok);
    assert!(err.contains("use an https:// URL"), "{err}");

    // A client that fails its handshake, or never finishes it, does not
    // hold up anyone else.
    let mut garbage = TcpStream::connect(("127.0.0.1", a.port)).unwrap();
    garbage
        .write_all(b"\x16\x03\x01\x00\x05garbage-that-is-not-a-client-hello")
        .unwrap();
    let _silent = TcpStream::connect(("127.0.0.1", a.port)).unwrap();
    let _half = {
        let mut s = TcpStream::connect(("127.0.0.1", a.port)).unwrap();
        s.write_all(b"\x16\x03\x01").unwrap();
        s
    };
    let t = Instant::now();
    a.ok("GET", "/api/v1/providers", None);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "an API call waited {:?} behind stalled handshakes",
        t.elapsed()
    );
    garbage
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut buf = Vec::new();
    let _ = garbage.read_to_end(&mut buf); // closed by the server, not left hanging

    // An agent without the CA cannot join, and says why; with it (the
    // harness passes --ca-cert) it joins and holds its channel over WSS.
    let t = a.ok(
        "POST",
        "/api/v1/join-tokens",
        Some(json!({"site": "de-frankfurt"})),
    );
    let out = Command::new(bin())
        .args([
            "agent", "--server", &a.url, "--driver", "sim", "--name", "no-ca",
        ])
        .args(["--join-token", t["token"].as_str().unwrap()])
        .arg("--data-dir")
        .arg(a.dir.path().join("agent-no-ca"))
        .env_remove("VIRT8RA_CA_CERT")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "TLS: the certificate of 127.0.0.1 is not trusted (start the agent with --ca-cert FILE"
        ),
        "{err}"
    );
    a.start_agent_with("sim-de", Some("de-frankfurt"), &["--driver", "sim"]);
    a.wait_hosts_ready(1);
    let hosts = a.ok("GET", "/api/v1/hosts", None);
    assert_eq!(hosts["items"].as_array().unwrap().len(), 1, "{hosts}");

    // `image import --from-url https://…` from B: fetched by A's control
    // plane, which trusts B's CA, and checked against the sha256.
    let from_b = format!("{}/api/v1/catalog/images/{sha}", b.url);
    let i = json_out(&a.cli_ok(&[
        "image",
        "import",
        "--name",
        "from-b",
        "--from-url",
        &from_b,
        "--sha256",
        &sha,
        "-o",
        "json",
    ]));
    assert_eq!(i["sha256"], sha);
    assert_eq!(i["provenance"], from_b);
    let e = cli_err(
        &a,
        &[
            "image",
            "import",
            "--name",
            "bad-sum",
            "--from-url",
            &from_b,
            "--sha256",
            &"0".repeat(64),
        ],
    );
    assert!(e.contains("checksum mismatch"), "{e}");
    // A's control plane does not trust A's own CA: an https URL on A is
    // refused, saying which CA it tried.
    let e = cli_err(
        &a,
        &[
            "image",
            "import",
            "--name",
            "self",
            "--from-url",
            &format!("{}/api/v1/catalog/images/{sha}", a.url),
        ],
    );
    assert!(
        e.contains(&format!(
            "TLS: the certificate of 127.0.0.1 is not trusted: neither a public root nor the CA in {b_ca} signed it"
        )),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    let (s, _) = a.api("GET", "/api/v1/images/self", None);
    assert_eq!(s, 404);

    // A VM on the imported image reaches running on the host behind WSS.
    a.cli_ok(&[
        "vm",
        "create",
        "v1",
        "--image",
        "from-b",
        "--memory-mib",
        "64",
        "--wait",
    ]);
    assert_eq!(a.vm("v1")["status"]["phase"], "running");

    // B's catalog, added by its https URL, verifies; its appliance deploys
    // here, the image fetched from B over HTTPS.
    // (By the name localhost too, which B's certificate also names: the
    // fetch succeeds and the signature check, with a key that is not B's,
    // refuses it.)
    let a_key = json_out(&a.cli_ok(&["catalog", "key", "-o", "json"]))["public_key"]
        .as_str()
        .unwrap()
        .to_string();
    let e = cli_err(
        &a,
        &[
            "catalog",
            "add",
            "b",
            &b_url.replace("127.0.0.1", "localhost"),
            "--key",
            &a_key,
        ],
    );
    assert!(e.contains("signature does not verify"), "{e}");
    let added =
        json_out(&a.cli_ok(&["catalog", "add", "b", &b_url, "--key", &b_key, "-o", "json"]));
    assert_eq!(added["appliances"][0]["name"], "tiny");
    let app = json_out(&a.cli_ok(&[
        "app",
        "deploy",
        "b/tiny",
        "--name",
        "t",
        "--locations",
        "de",
        "--wait",
        "-o",
        "json",
    ]));
    assert_eq!(app["appliance"], "b/tiny@0.1.0");
    assert_eq!(app["status"], "running", "{app}");
    assert_eq!(app["vms"][0]["site"], "de-frankfurt");

    // SIGHUP reads the certificate again: a renewal signed by another CA
    // takes effect for new connections without a restart.
    let ca2 = virt8ra_tls::testing::TestCa::new("renewed CA");
    let ca2_file = ca2.write(&a.dir.path().join("ca2.pem"));
    let renewed = ca2.issue(a.dir.path(), "renewed", &["127.0.0.1"]);
    std::fs::copy(&renewed.cert, &a_tls.cert).unwrap();
    std::fs::copy(&renewed.key, &a_tls.key).unwrap();
    let pid = a.server.as_ref().unwrap().child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let ca2_arg = ca2_file.to_str().unwrap().to_string();
    wait_until("the renewed certificate", Duration::from_secs(10), || {
        cli_without_ca(&a, &a.url, &["--ca-cert", &ca2_arg, "provider", "list"])
            .0
            .then_some(())
    });
    let e = cli_err(&a, &["provider", "list"]);
    assert!(e.contains("is not trusted"), "{e}");
    // The agent's channel survives (established connections keep theirs).
    let ready = common::https_client(Some(&ca2_file))
        .get(format!("{}/api/v1/hosts?state=ready", a.url))
        .bearer_auth(&a.token)
        .send()
        .unwrap()
        .json::<Value>()
        .unwrap();
    assert_eq!(ready["items"].as_array().unwrap().len(), 1, "{ready}");

    // SIGTERM: a graceful shutdown with agents connected over WSS.
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = wait_until(
        "the control plane to shut down",
        Duration::from_secs(20),
        || {
            a.server
                .as_mut()
                .and_then(|s| s.child.try_wait().ok().flatten())
        },
    );
    assert!(status.success(), "{status:?}");
}

/// The test appliance's user-data: a counter every 100 ms, so the console
/// shows whether the guest kept running.
const COUNTER: &str =
    "#!/bin/sh\ni=0\nwhile true; do i=$((i+1)); echo \"COUNT $i\"; sleep 0.1; done\n";

fn last_count(console: &str) -> Option<u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("COUNT "))
        .filter_map(|n| n.trim().parse().ok())
        .next_back()
}

/// Real guests behind an HTTPS control plane: the agent downloads the image
/// over HTTPS, a live migration between two hosts without migration
/// addresses is relayed over WSS, and a cold one stages the disk over HTTPS.
#[test]
fn real_guests_migrate_through_an_https_control_plane() {
    const BOOT: Duration = Duration::from_secs(180);
    let image = common::test_image();
    let mut c = Cluster::start_tls(&[]);
    c.create_topology();
    for (name, site) in [("host-es", "es-logrono"), ("host-de", "de-frankfurt")] {
        c.start_agent(name, Some(site));
    }
    c.wait_hosts_ready(2);
    c.cli_ok(&["image", "import", image.to_str().unwrap(), "--name", "test"]);
    c.cli_ok(&["host", "set-state", "host-de", "maintenance"]);
    c.ok(
        "POST",
        "/api/v1/vms",
        Some(
            json!({"name": "edge", "image": "test", "memory_mib": 128, "disk_gib": 1,
                    "user_data": COUNTER, "placement": {"countries": ["ES", "DE"]}}),
        ),
    );
    c.wait_phase("edge", "running", BOOT);
    assert_eq!(c.vm("edge")["status"]["host"], "host-es");
    c.cli_ok(&["host", "set-state", "host-de", "ready"]);
    let before = wait_until("the guest's counter", BOOT, || {
        last_count(&c.console("edge")).filter(|n| *n > 5)
    });

    let m = json_out(&c.cli_ok(&[
        "vm",
        "migrate",
        "edge",
        "--to-host",
        "host-de",
        "--mode",
        "live",
        "--wait",
        "-o",
        "json",
    ]));
    assert_eq!(m["phase"], "completed", "{m}");
    assert_eq!(m["relay"], true, "{m}");
    assert_eq!(c.vm("edge")["status"]["host"], "host-de");
    let metrics = c.ok("GET", "/api/v1/metrics", None);
    assert!(
        metrics["relay_bytes"].as_u64().unwrap() > 1 << 20,
        "{metrics}"
    );
    // The guest went on counting at the target: it moved, it did not boot.
    let con = wait_until("the counter to go on at the target", BOOT, || {
        let con = c.console("edge");
        (last_count(&con).unwrap_or(0) > before + 10).then_some(con)
    });
    assert!(!con.contains("VIRT8RA-GUEST-BOOTED"), "the guest rebooted");

    // Cold: the disk goes up to the staging area and down again over HTTPS.
    let m = json_out(&c.cli_ok(&[
        "vm",
        "migrate",
        "edge",
        "--to-host",
        "host-es",
        "--mode",
        "cold",
        "--wait",
        "-o",
        "json",
    ]));
    assert_eq!(m["phase"], "completed", "{m}");
    assert_eq!(m["mode"], "cold");
    c.wait_phase("edge", "running", BOOT);
    assert_eq!(c.vm("edge")["status"]["host"], "host-es");
}

/// A control plane given unusable certificate files does not start, says
/// what is wrong in one line, and creates nothing.
#[test]
fn server_refuses_unusable_certificates_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let ca = virt8ra_tls::testing::TestCa::new("test CA");
    let a = ca.issue(dir.path(), "a", &["127.0.0.1"]);
    let b = ca.issue(dir.path(), "b", &["127.0.0.1"]);
    let data = dir.path().join("data");
    let port = common::free_port().to_string();
    let start = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(bin())
            .args(["server", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(&data)
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        err
    };
    let os = |p: &std::path::Path| p.as_os_str().to_owned();
    let (cert, key) = (os(&a.cert), os(&a.key));
    let e = start(&[
        "--tls-cert".as_ref(),
        &cert,
        "--tls-key".as_ref(),
        &os(&b.key),
    ]);
    assert!(e.contains("does not belong to the certificate"), "{e}");
    let e = start(&["--tls-cert".as_ref(), &cert]);
    assert!(e.contains("--tls-cert needs --tls-key"), "{e}");
    let e = start(&[
        "--tls-cert".as_ref(),
        "/nonexistent.crt".as_ref(),
        "--tls-key".as_ref(),
        &key,
    ]);
    assert!(e.starts_with("error: --tls-cert /nonexistent.crt: "), "{e}");
    let e = start(&["--tls-cert".as_ref(), &key, "--tls-key".as_ref(), &cert]);
    assert!(e.contains("no CERTIFICATE block"), "{e}");
    assert!(!data.exists(), "a refused start created the data directory");
}
