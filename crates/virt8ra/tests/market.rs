//! End to end: the marketplace, multi-location apps and image distribution,
//! with the real binary (control planes and agents as separate processes),
//! real QEMU guests where guests matter, and real sockets throughout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{wait_until, Cluster, TOPOLOGY};
use serde_json::{json, Value};

const BOOT: Duration = Duration::from_secs(180);

/// An operator's SSH public key, given to every replica of an app.
const OPS_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOiakisE7iP/Y3q4YCqhXcGDKYvynw8ekG2NX341waDN ops@example";

fn web_image() -> PathBuf {
    common::test_image();
    let out = std::process::Command::new("bash")
        .arg(common::repo_root().join("scripts/web-image.sh"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run scripts/web-image.sh");
    assert!(out.status.success(), "scripts/web-image.sh failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn appliance_file(name: &str) -> String {
    common::repo_root()
        .join(format!("appliances/{name}.json"))
        .to_string_lossy()
        .to_string()
}

fn json_out(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// Runs the CLI expecting failure; returns its stderr.
fn cli_err(c: &Cluster, args: &[&str]) -> String {
    let out = c.cli(args);
    assert!(
        !out.status.success(),
        "virt8ra {} should have failed",
        args.join(" ")
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn web_appliance_deployed_at_three_countries_in_one_command() {
    let image = web_image();
    let mut c = Cluster::start();
    c.create_topology();
    for (i, (_, _, site, ..)) in TOPOLOGY.iter().enumerate() {
        c.start_agent(&format!("host-{i}"), Some(site));
    }
    c.wait_hosts_ready(3);
    c.cli_ok(&[
        "image",
        "import",
        image.to_str().unwrap(),
        "--name",
        "web-appliance-1-0-0",
        "--version",
        "1.0.0",
    ]);
    let published =
        json_out(&c.cli_ok(&["appliance", "publish", &appliance_file("web"), "-o", "json"]));
    let sha = published["images"][0]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(sha.len(), 64);

    // Bad input: one clear line, non-zero exit, nothing created.
    let e = cli_err(
        &c,
        &[
            "app",
            "deploy",
            "web",
            "--name",
            "shop",
            "--locations",
            "es,xx",
        ],
    );
    assert!(
        e.contains("location 'xx' is not a site, a provider or a country code"),
        "{e}"
    );
    let e = cli_err(
        &c,
        &[
            "app",
            "deploy",
            "web",
            "--name",
            "shop",
            "--locations",
            "es",
            "--param",
            "memory_mib=9999",
        ],
    );
    assert!(
        e.contains("memory_mib: 9999 is above the maximum 2048"),
        "{e}"
    );
    let e = cli_err(
        &c,
        &[
            "app",
            "deploy",
            "web",
            "--name",
            "shop",
            "--locations",
            "es",
            "--param",
            "colour=red",
        ],
    );
    assert!(e.contains("has no parameter \"colour\""), "{e}");
    let e = cli_err(
        &c,
        &[
            "app",
            "deploy",
            "nginx",
            "--name",
            "shop",
            "--locations",
            "es",
        ],
    );
    assert!(e.contains("appliance 'nginx' not found"), "{e}");
    let e = cli_err(
        &c,
        &[
            "app",
            "deploy",
            "web",
            "--name",
            "shop",
            "--locations",
            "fr",
        ],
    );
    assert!(e.contains("no site is in country FR"), "{e}");
    // More replicas than the hosts of a site can hold: refused whole.
    let e = cli_err(
        &c,
        &[
            "app",
            "deploy",
            "web",
            "--name",
            "shop",
            "--locations",
            "es,de",
            "--replicas-per-location",
            "16",
            "--param",
            "memory_mib=2048",
        ],
    );
    assert!(
        e.contains("cannot be deployed") && e.contains("nothing was created"),
        "{e}"
    );
    assert_eq!(c.ok("GET", "/api/v1/vms", None)["items"], json!([]));
    assert_eq!(c.ok("GET", "/api/v1/apps", None), json!([]));

    // One command: three countries, given as a country, a provider and a site.
    let start = Instant::now();
    let app = json_out(&c.cli_ok(&[
        "app",
        "deploy",
        "web",
        "--name",
        "shop",
        "--locations",
        "es,provider-de,pl-gdansk",
        "--param",
        "greeting=Hola from the edge",
        "--ssh-key",
        OPS_KEY,
        "--wait",
        "-o",
        "json",
    ]));
    let deploy_s = start.elapsed().as_secs_f64();
    assert_eq!(app["status"], "running", "{app}");
    assert_eq!(app["appliance"], "local/web@1.0.0");
    let vms = app["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 3, "{app}");
    let want: BTreeMap<&str, (&str, &str)> = [
        ("es", ("es-logrono", "ES")),
        ("provider-de", ("de-frankfurt", "DE")),
        ("pl-gdansk", ("pl-gdansk", "PL")),
    ]
    .into_iter()
    .collect();
    let mut sites = BTreeSet::new();
    for v in vms {
        let loc = v["location"].as_str().unwrap();
        let (site, country) = want[loc];
        assert_eq!(v["site"], site, "{v}");
        assert_eq!(v["country"], country, "{v}");
        assert_eq!(v["phase"], "running");
        sites.insert(site);
    }
    assert_eq!(sites.len(), 3);
    for l in app["locations"].as_array().unwrap() {
        assert_eq!(l["status"], "running", "{l}");
        assert_eq!(l["running"], 1);
    }
    let kinds: Vec<&str> = app["locations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["country", "provider", "site"]);

    // Every replica's page, through its agent's port forward, names the VM
    // and its own site (from its cloud-init context) and the parameter.
    for v in vms {
        let name = v["name"].as_str().unwrap();
        let site = v["site"].as_str().unwrap();
        let fwd = v["ports"][0]["host_addr"].as_str().unwrap().to_string();
        let page = wait_until(&format!("{name}'s page"), BOOT, || {
            reqwest::blocking::get(format!("http://{fwd}/"))
                .ok()
                .and_then(|r| r.text().ok())
                .filter(|t| t.contains("virt8ra web appliance") && t.contains("Hola"))
        });
        assert!(
            page.contains(&format!("vm={name} site={site}")),
            "{name}: {page}"
        );
        assert!(page.contains("<p>Hola from the edge</p>"), "{page}");
        // The app's SSH key reached every replica and its guest.
        assert_eq!(c.vm(name)["spec"]["ssh_authorized_keys"], json!([OPS_KEY]));
        assert!(
            c.console(name).contains("VIRT8RA-SSH port=22 keys=1 "),
            "{name}: {}",
            c.console(name)
        );
    }
    assert_eq!(app["ssh_authorized_keys"], json!([OPS_KEY]));
    let pages_s = start.elapsed().as_secs_f64();
    eprintln!(
        "BENCH deploy web at 3 locations: command with --wait returned after {deploy_s:.1} s \
         (every VM running); every guest's page answered after {pages_s:.1} s"
    );
    assert_eq!(c.qemu_pids().len(), 3);

    // Managed as one unit.
    let list = json_out(&c.cli_ok(&["app", "list", "-o", "json"]));
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["name"], "shop");
    let table = c.cli_ok(&["app", "show", "shop"]);
    assert!(
        table.contains("pl-gdansk") && table.contains("running"),
        "{table}"
    );
    let e = cli_err(
        &c,
        &[
            "app",
            "deploy",
            "web",
            "--name",
            "shop",
            "--locations",
            "de",
        ],
    );
    assert!(e.contains("app 'shop' already exists"), "{e}");

    // Deleting the app removes every VM and keeps the cached images.
    c.cli_ok(&["app", "delete", "shop", "--wait"]);
    for v in vms {
        let vm = c.ok(
            "GET",
            &format!("/api/v1/vms/{}", v["id"].as_str().unwrap()),
            None,
        );
        assert_eq!(vm["status"]["phase"], "deleted");
    }
    assert_eq!(c.ok("GET", "/api/v1/vms", None)["items"], json!([]));
    wait_until("every guest to stop", Duration::from_secs(60), || {
        c.qemu_pids().is_empty().then_some(())
    });
    let (s, _) = c.api("GET", "/api/v1/apps/shop", None);
    assert_eq!(s, 404);
    for i in 0..3 {
        let cached = c
            .agent_dir(&format!("host-{i}"))
            .join(format!("images/{sha}.qcow2"));
        assert!(cached.is_file(), "{} was removed", cached.display());
    }
    c.ok("GET", "/api/v1/images/web-appliance-1-0-0", None);
}

// ------------------------------------------------------------ static server

#[derive(Clone, Default)]
struct Files {
    /// path -> body
    files: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    /// path -> how many more responses to cut at half the body
    cut: Arc<Mutex<BTreeMap<String, usize>>>,
    /// (path, range start, bytes sent)
    log: Arc<Mutex<Vec<(String, u64, u64)>>>,
}

/// A small HTTP/1.1 file server on loopback (a static catalog mirror).
fn serve_files(files: Files) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let files = files.clone();
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&req).to_string();
                let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
                let path = path.split('?').next().unwrap().to_string();
                let start: u64 = text
                    .lines()
                    .find_map(|l| {
                        l.to_lowercase()
                            .strip_prefix("range: bytes=")
                            .map(|v| v.to_string())
                    })
                    .and_then(|v| v.trim().trim_end_matches('-').parse().ok())
                    .unwrap_or(0);
                let body = files.files.lock().unwrap().get(&path).cloned();
                let Some(body) = body else {
                    let _ = s.write_all(
                        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    );
                    return;
                };
                let rest = &body[start as usize..];
                let status = if start > 0 {
                    "206 Partial Content"
                } else {
                    "200 OK"
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\ncontent-type: application/octet-stream\r\nconnection: close\r\n\r\n",
                    rest.len()
                );
                let _ = s.write_all(head.as_bytes());
                let cut = {
                    let mut c = files.cut.lock().unwrap();
                    match c.get_mut(&path) {
                        Some(n) if *n > 0 => {
                            *n -= 1;
                            true
                        }
                        _ => false,
                    }
                };
                let send = if cut { &rest[..rest.len() / 2] } else { rest };
                let _ = s.write_all(send);
                let _ = s.flush();
                files
                    .log
                    .lock()
                    .unwrap()
                    .push((path, start, send.len() as u64));
            });
        }
    });
    url
}

#[test]
fn catalogs_are_verified_and_image_transfers_resume() {
    let image = common::test_image();
    let image_bytes = std::fs::read(&image).unwrap();
    // B: another provider's control plane, publishing the test appliance.
    let b = Cluster::start();
    b.cli_ok(&[
        "image",
        "import",
        image.to_str().unwrap(),
        "--name",
        "test-appliance-1-0-0",
    ]);
    b.cli_ok(&["appliance", "publish", &appliance_file("test")]);
    let key = json_out(&b.cli_ok(&["catalog", "key", "-o", "json"]));
    let b_key = key["public_key"].as_str().unwrap().to_string();
    let b_url = key["url"].as_str().unwrap().to_string();
    assert_eq!(b_url, format!("{}/api/v1/catalog", b.url));
    // The catalog is public: no token.
    let (s, signed) = b.api_raw("GET", "/api/v1/catalog", None, None);
    assert_eq!(s, 200);

    // A: this provider, with one (simulated) host in Germany.
    let mut a = Cluster::start();
    a.create_topology();
    a.start_agent_with("sim-de", Some("de-frankfurt"), &["--driver", "sim"]);
    a.wait_hosts_ready(1);
    let a_key = json_out(&a.cli_ok(&["catalog", "key", "-o", "json"]))["public_key"]
        .as_str()
        .unwrap()
        .to_string();

    // Bad requests are 400s that say what was wrong, and change nothing.
    let bad = |path: &str, body: Value, want: &str| {
        let (st, v) = a.api("POST", path, Some(body));
        assert_eq!(st, 400, "{path}: {v}");
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(msg.contains(want), "{path}: {msg}");
    };
    bad(
        "/api/v1/apps",
        json!({"name": "x", "appliance": "test", "locations": ["de"], "colour": 1}),
        "unknown field `colour`",
    );
    bad(
        "/api/v1/apps",
        json!({"name": "x", "appliance": "test", "locations": []}),
        "name at least one location",
    );
    bad(
        "/api/v1/apps",
        json!({"name": "x", "appliance": "test", "locations": ["de"], "replicas_per_location": 0}),
        "replicas_per_location 0 is outside",
    );
    bad(
        "/api/v1/appliances",
        json!({"name": "w", "version": "1", "images": [{"name": "nope"}], "template": {}}),
        "image 'nope' not found",
    );
    bad(
        "/api/v1/appliances",
        json!({"name": "w", "version": "1 0", "images": [{"name": "nope"}], "template": {}}),
        "invalid version",
    );
    bad(
        "/api/v1/appliances",
        json!({"name": "w", "version": "1", "images": [{"name": "nope"}], "template": {},
               "parameters": [{"name": "n", "type": "integer", "default": "x"}]}),
        "default of parameter n: \"x\" is not an integer",
    );
    bad(
        "/api/v1/catalogs",
        json!({"name": "c", "url": "ftp://example.org/x", "public_key": "00"}),
        "invalid public key",
    );
    bad(
        "/api/v1/catalogs",
        json!({"name": "c", "url": "ftp://example.org/x", "public_key": b_key}),
        "only http and https",
    );
    bad(
        "/api/v1/images/import",
        json!({"name": "etc", "url": "file:///etc/passwd"}),
        "only http and https are supported",
    );
    bad(
        "/api/v1/images/import",
        json!({"name": "etc", "url": "http://127.0.0.1:1/x", "sha256": "abc"}),
        "invalid sha256",
    );
    assert_eq!(a.ok("GET", "/api/v1/appliances", None), json!([]));
    assert_eq!(a.ok("GET", "/api/v1/images", None)["items"], json!([]));
    let (st, v) = b.api(
        "POST",
        "/api/v1/appliances",
        Some(
            serde_json::from_str(&std::fs::read_to_string(appliance_file("test")).unwrap())
                .unwrap(),
        ),
    );
    assert_eq!(st, 409, "publishing a version twice: {v}");

    // Signed by another key than the one trusted: refused.
    let e = cli_err(&a, &["catalog", "add", "b", &b_url, "--key", &a_key]);
    assert!(
        e.contains("signature does not verify with the trusted key"),
        "{e}"
    );
    let e = cli_err(&a, &["catalog", "add", "b", &b_url, "--key", "abc"]);
    assert!(e.contains("invalid public key"), "{e}");

    // A mirror of B's catalog whose entry was changed after signing: refused.
    let files = Files::default();
    let mirror = serve_files(files.clone());
    let payload = signed["payload"].as_str().unwrap();
    let mut tampered = signed.clone();
    tampered["payload"] = json!(payload.replace("\"memory_mib\":128", "\"memory_mib\":4096"));
    assert_ne!(tampered["payload"], signed["payload"]);
    files
        .files
        .lock()
        .unwrap()
        .insert("/tampered.json".into(), tampered.to_string().into_bytes());
    let e = cli_err(
        &a,
        &[
            "catalog",
            "add",
            "evil",
            &format!("{mirror}/tampered.json"),
            "--key",
            &b_key,
        ],
    );
    assert!(e.contains("signature does not verify"), "{e}");
    assert_eq!(a.ok("GET", "/api/v1/catalogs", None), json!([]));

    // A faithful mirror (static index) of B's catalog, but with a corrupt
    // image: the catalog verifies, the image is refused at deployment.
    let sha = json_out(&b.cli_ok(&["appliance", "show", "test", "-o", "json"]))["appliance"]
        ["images"][0]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let mut corrupt = image_bytes.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0xff;
    files
        .files
        .lock()
        .unwrap()
        .insert("/index.json".into(), signed.to_string().into_bytes());
    files
        .files
        .lock()
        .unwrap()
        .insert(format!("/catalog/images/{sha}"), corrupt);
    a.cli_ok(&[
        "catalog",
        "add",
        "mirror",
        &format!("{mirror}/index.json"),
        "--key",
        &b_key,
    ]);
    let e = cli_err(
        &a,
        &[
            "app",
            "deploy",
            "mirror/test",
            "--name",
            "x",
            "--locations",
            "de",
        ],
    );
    assert!(e.contains("checksum mismatch"), "{e}");
    assert!(e.contains(&format!("expected {sha}")), "{e}");
    assert_eq!(a.ok("GET", "/api/v1/images", None)["items"], json!([]));
    assert_eq!(a.ok("GET", "/api/v1/apps", None), json!([]));
    assert_eq!(a.ok("GET", "/api/v1/vms", None)["items"], json!([]));

    // B's own catalog verifies; its appliance deploys here, its image
    // imported from B with provenance and the signed checksum.
    let added =
        json_out(&a.cli_ok(&["catalog", "add", "b", &b_url, "--key", &b_key, "-o", "json"]));
    assert_eq!(added["appliances"][0]["name"], "test");
    let list = json_out(&a.cli_ok(&["appliance", "list", "-o", "json"]));
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    let app = json_out(&a.cli_ok(&[
        "app",
        "deploy",
        "b/test",
        "--name",
        "probe",
        "--locations",
        "de",
        "--wait",
        "-o",
        "json",
    ]));
    assert_eq!(app["appliance"], "b/test@1.0.0");
    assert_eq!(app["vms"][0]["site"], "de-frankfurt");
    let imported = &a.ok("GET", "/api/v1/images", None)["items"][0];
    assert_eq!(imported["sha256"], sha);
    assert_eq!(imported["version"], "1.0.0");
    assert!(
        imported["provenance"]
            .as_str()
            .unwrap()
            .starts_with("catalog b: http"),
        "{imported}"
    );
    a.cli_ok(&["app", "delete", "probe", "--wait"]);

    // A static catalog, signed offline with `catalog keygen` and `catalog
    // sign`, served as plain files next to its image.
    let tmp = a.dir.path().join("static");
    std::fs::create_dir_all(&tmp).unwrap();
    let disk = tmp.join("tiny.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("1M")
        .status()
        .unwrap();
    assert!(st.success());
    let disk_bytes = std::fs::read(&disk).unwrap();
    let disk_sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&disk_bytes))
    };
    // Its second image: the replicas' data disk.
    let data = tmp.join("tiny-data.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&data)
        .arg("2M")
        .status()
        .unwrap();
    assert!(st.success());
    let data_bytes = std::fs::read(&data).unwrap();
    let data_sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&data_bytes))
    };
    let keyfile = tmp.join("static.key");
    let static_pub =
        json_out(&a.cli_ok(&["catalog", "keygen", keyfile.to_str().unwrap(), "-o", "json"]))
            ["public_key"]
            .as_str()
            .unwrap()
            .to_string();
    let index = tmp.join("index.yaml");
    std::fs::write(
        &index,
        format!(
            "publisher: static-provider\nappliances:\n- name: tiny\n  version: 0.1.0\n  images:\n  - name: tiny-disk\n    sha256: {disk_sha}\n    size_bytes: {}\n    url: tiny.qcow2\n  - name: tiny-data\n    sha256: {data_sha}\n    size_bytes: {}\n    url: tiny-data.qcow2\n  template: {{memory_mib: 64}}\n",
            disk_bytes.len(),
            data_bytes.len()
        ),
    )
    .unwrap();
    let signed_static = a.cli_ok(&[
        "catalog",
        "sign",
        index.to_str().unwrap(),
        "--key",
        keyfile.to_str().unwrap(),
    ]);
    {
        let mut f = files.files.lock().unwrap();
        f.insert("/static/index.json".into(), signed_static.into_bytes());
        f.insert("/static/tiny.qcow2".into(), disk_bytes.clone());
        // Tampered at first: a data image that is not the signed one.
        let mut bad = data_bytes.clone();
        bad[100] ^= 0xff;
        f.insert("/static/tiny-data.qcow2".into(), bad);
    }
    let static_url = format!("{mirror}/static/index.json");
    let e = cli_err(
        &a,
        &["catalog", "add", "static", &static_url, "--key", &b_key],
    );
    assert!(e.contains("signature does not verify"), "{e}");
    a.cli_ok(&[
        "catalog",
        "add",
        "static",
        &static_url,
        "--key",
        &static_pub,
    ]);
    let e = cli_err(
        &a,
        &[
            "app",
            "deploy",
            "static/tiny",
            "--name",
            "tiny",
            "--locations",
            "de-frankfurt",
        ],
    );
    assert!(e.contains("checksum mismatch"), "{e}");
    assert!(e.contains(&format!("expected {data_sha}")), "{e}");
    assert_eq!(a.ok("GET", "/api/v1/apps", None), json!([]));
    files
        .files
        .lock()
        .unwrap()
        .insert("/static/tiny-data.qcow2".into(), data_bytes.clone());
    let app = json_out(&a.cli_ok(&[
        "app",
        "deploy",
        "static/tiny",
        "--name",
        "tiny",
        "--locations",
        "de-frankfurt",
        "--wait",
        "-o",
        "json",
    ]));
    assert_eq!(app["appliance"], "static/tiny@0.1.0");
    assert_eq!(app["status"], "running");
    let tiny = a.ok("GET", "/api/v1/images/tiny-disk", None);
    assert_eq!(tiny["sha256"], disk_sha);
    assert_eq!(
        tiny["provenance"],
        format!("catalog static: {mirror}/static/tiny.qcow2")
    );
    let tiny_data = a.ok("GET", "/api/v1/images/tiny-data", None);
    assert_eq!(tiny_data["sha256"], data_sha);
    let replica = app["vms"][0]["name"].as_str().unwrap();
    let vm = a.vm(replica);
    assert_eq!(vm["spec"]["data_disks"], json!([{"image": "tiny-data"}]));
    assert_eq!(vm["status"]["data_image_ids"], json!([tiny_data["id"]]));
    a.cli_ok(&["app", "delete", "tiny", "--wait"]);

    // An interrupted image transfer resumes instead of starting over.
    let path = "/disk.qcow2".to_string();
    files
        .files
        .lock()
        .unwrap()
        .insert(path.clone(), image_bytes.clone());
    files.cut.lock().unwrap().insert(path.clone(), 1);
    files.log.lock().unwrap().clear();
    let i = json_out(&a.cli_ok(&[
        "image",
        "import",
        "--name",
        "resumed",
        "--from-url",
        &format!("{mirror}{path}"),
        "--sha256",
        &sha,
        "-o",
        "json",
    ]));
    assert_eq!(i["sha256"], sha);
    assert_eq!(i["provenance"], format!("{mirror}{path}"));
    let log = files.log.lock().unwrap().clone();
    let size = image_bytes.len() as u64;
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[0].1, 0);
    assert_eq!(
        log[1].1,
        size / 2,
        "the second request resumes at the break"
    );
    let sent: u64 = log.iter().map(|l| l.2).sum();
    assert_eq!(sent, size, "no byte was sent twice");
    // A wrong checksum is refused and stores nothing.
    let e = cli_err(
        &a,
        &[
            "image",
            "import",
            "--name",
            "bad",
            "--from-url",
            &format!("{mirror}{path}"),
            "--sha256",
            &"0".repeat(64),
        ],
    );
    assert!(e.contains("checksum mismatch"), "{e}");
    let (s, _) = a.api("GET", "/api/v1/images/bad", None);
    assert_eq!(s, 404);
}

/// Image service stats of an agent.
fn stats(url: &str) -> Value {
    reqwest::blocking::get(format!("{url}/stats"))
        .unwrap()
        .json()
        .unwrap()
}

#[test]
fn site_local_distribution_sends_an_image_once_over_the_long_link() {
    let hosts: usize = std::env::var("VIRT8RA_BENCH_HOSTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let per_host: usize = std::env::var("VIRT8RA_BENCH_VMS_PER_HOST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let image = common::test_image();
    let size = std::fs::metadata(&image).unwrap().len();
    let mut c = Cluster::start();
    c.create_topology();
    for i in 0..hosts {
        c.start_agent_with(
            &format!("de-{i}"),
            Some("de-frankfurt"),
            &[
                "--image-service-listen",
                "127.0.0.1:0",
                "--accel",
                "emulation",
            ],
        );
    }
    c.wait_hosts_ready(hosts);
    let services: BTreeMap<String, String> =
        wait_until("the image services", Duration::from_secs(30), || {
            let h = c.ok("GET", "/api/v1/hosts", None);
            let m: BTreeMap<String, String> = h["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|h| {
                    Some((
                        h["name"].as_str()?.to_string(),
                        h["inventory"]["image_service"].as_str()?.to_string(),
                    ))
                })
                .collect();
            (m.len() == hosts).then_some(m)
        });
    let sha = json_out(&c.cli_ok(&[
        "image",
        "import",
        image.to_str().unwrap(),
        "--name",
        "test",
        "-o",
        "json",
    ]))["sha256"]
        .as_str()
        .unwrap()
        .to_string();

    // Pre-stage at the site: its image cache host (the first by name) fetches it.
    let e = cli_err(&c, &["image", "replicate", "test", "--sites", "nowhere"]);
    assert!(e.contains("site 'nowhere' not found"), "{e}");
    c.cli_ok(&["image", "replicate", "test", "--sites", "de-frankfurt"]);
    let cache_host = services["de-0"].clone();
    // The bytes are counted as they arrive; the file is in place once
    // they are synced, checked and inspected: wait for both.
    let cached = c.agent_dir("de-0").join(format!("images/{sha}.qcow2"));
    wait_until("pre-staging", Duration::from_secs(60), || {
        (stats(&cache_host)["received_bytes"]["control-plane"].as_u64() == Some(size)
            && cached.is_file())
        .then_some(())
    });

    // VMs on every host of the site (prepared, not booted: the image is
    // what matters here).
    let start = Instant::now();
    let n = hosts * per_host;
    for i in 0..n {
        c.ok(
            "POST",
            "/api/v1/vms",
            Some(
                json!({"name": format!("vm-{i}"), "image": "test", "memory_mib": 64,
                        "start": false,
                        "placement": {"site": "de-frankfurt", "policy": {"strategy": "spread"}}}),
            ),
        );
    }
    for i in 0..n {
        c.wait_phase(&format!("vm-{i}"), "stopped", Duration::from_secs(120));
    }
    let elapsed = start.elapsed().as_secs_f64();
    let used: BTreeSet<String> = (0..n)
        .map(|i| {
            c.vm(&format!("vm-{i}"))["status"]["host"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(used.len(), hosts, "spread over every host: {used:?}");

    let t = c.ok("GET", "/api/v1/images/transfers", None);
    let long_link = t["long_link_bytes"].as_u64().unwrap();
    let mut site_local = 0;
    for (name, url) in &services {
        let s = stats(url);
        let from_cp = s["received_bytes"]["control-plane"].as_u64().unwrap_or(0);
        if name == "de-0" {
            assert_eq!(from_cp, size, "the cache host fetched it once");
            assert_eq!(
                s["served_bytes"].as_u64().unwrap(),
                size * (hosts as u64 - 1)
            );
        } else {
            assert_eq!(from_cp, 0, "{name} used the long link: {s}");
            assert_eq!(
                s["received_bytes"][&cache_host].as_u64(),
                Some(size),
                "{name}: {s}"
            );
            site_local += size;
        }
    }
    assert_eq!(long_link, size, "one copy over the long link: {t}");
    eprintln!(
        "BENCH site-local distribution: {n} VMs on {hosts} hosts at one site, image {size} bytes: \
         long link {long_link} bytes, site-local {site_local} bytes, without distribution {} bytes; \
         VMs created -> all prepared in {elapsed:.1} s",
        size * hosts as u64
    );

    // Without pre-staging: VMs of another image created at once on every
    // host; the site's other hosts ask the cache host, which pulls the image
    // through once for all of them.
    let web = web_image();
    let web_size = std::fs::metadata(&web).unwrap().len();
    c.cli_ok(&["image", "import", web.to_str().unwrap(), "--name", "web"]);
    let before = stats(&cache_host)["served_bytes"].as_u64().unwrap();
    let start = Instant::now();
    for i in 0..n {
        c.ok(
            "POST",
            "/api/v1/vms",
            Some(
                json!({"name": format!("web-{i}"), "image": "web", "memory_mib": 64,
                        "start": false,
                        "placement": {"site": "de-frankfurt", "policy": {"strategy": "spread"}}}),
            ),
        );
    }
    for i in 0..n {
        c.wait_phase(&format!("web-{i}"), "stopped", Duration::from_secs(120));
    }
    let t = c.ok("GET", "/api/v1/images/transfers", None);
    assert_eq!(
        t["long_link_bytes"].as_u64().unwrap(),
        size + web_size,
        "the second image also crossed the long link once: {t}"
    );
    let served = stats(&cache_host)["served_bytes"].as_u64().unwrap() - before;
    assert_eq!(served, web_size * (hosts as u64 - 1));
    eprintln!(
        "BENCH pull-through (no pre-staging): {n} VMs on {hosts} hosts, image {web_size} bytes: \
         long link {web_size} bytes, site-local {served} bytes; VMs created -> all prepared in {:.1} s",
        start.elapsed().as_secs_f64()
    );
}
