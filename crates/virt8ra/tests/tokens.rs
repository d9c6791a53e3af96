//! Secrets and data files (issue 25): the catalog key made once at start-up,
//! data directories private to their owner, join tokens listed, revoked and
//! purged, the join token from a file, the admin token rotated, and the
//! agents' image services serving the hosts of their own site only.
//!
//! Real processes throughout: a control plane, real agents (QEMU driver,
//! VMs prepared but not booted where only their files matter).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{wait_until, Cluster};
use serde_json::{json, Value};

/// Every entry under `dir` (itself included) whose mode gives the group or
/// others any permission, with its mode; symbolic links are skipped (their
/// mode means nothing).
fn open_entries(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue; // gone meanwhile (a temporary file)
        };
        if md.file_type().is_symlink() {
            continue;
        }
        let mode = md.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            out.push((p.clone(), mode));
        }
        if md.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    out
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn join_tokens(c: &Cluster) -> Vec<Value> {
    c.ok("GET", "/api/v1/join-tokens", None)["items"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn concurrent_first_catalog_calls_all_sign_with_the_one_saved_key() {
    let c = Cluster::start();
    // Made at start-up, before any request asked for it.
    let key_file = c.server_dir().join("catalog.key");
    assert!(key_file.is_file(), "no catalog key after start-up");
    assert_eq!(mode(&key_file), 0o600);
    let url = format!("{}/api/v1/catalog", c.url);
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..16)
            .map(|_| {
                s.spawn(|| {
                    let r = reqwest::blocking::get(&url).unwrap();
                    let status = r.status().as_u16();
                    (status, r.json::<Value>().unwrap_or(Value::Null))
                })
            })
            .collect();
        calls.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let saved = virt8ra_server::keys::catalog_key(&c.server_dir()).unwrap();
    let saved = hex::encode(saved.verifying_key().to_bytes());
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["public_key"], saved.as_str(), "{body}");
        let text = body.to_string();
        assert!(!text.contains(c.dir.path().to_str().unwrap()), "{text}");
    }
    let shown = c.ok("GET", "/api/v1/catalog/key", None);
    assert_eq!(shown["public_key"], saved.as_str());
    // The same key after a restart: it was saved, not made per process.
    let mut c = c;
    c.kill_server();
    c.start_server();
    let again: Value = reqwest::blocking::get(&url).unwrap().json().unwrap();
    assert_eq!(again["public_key"], saved.as_str());
}

#[test]
fn data_directories_and_files_are_private_to_their_owner() {
    let image = common::test_image();
    let mut c = Cluster::start();
    // An older version's directory: world-readable, tightened on start.
    c.kill_server();
    let server = c.server_dir();
    for p in [&server, &server.join("images")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(
        server.join("virt8ra.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    c.start_server();
    assert_eq!(open_entries(&server), vec![], "not tightened on start");

    // The same for an agent's.
    let agent = c.agent_dir("host-de");
    std::fs::create_dir_all(agent.join("old")).unwrap();
    std::fs::write(agent.join("old/left-over"), b"x").unwrap();
    for (p, m) in [(&agent, 0o755), (&agent.join("old"), 0o755)] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }
    std::fs::set_permissions(
        agent.join("old/left-over"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    c.create_topology();
    c.start_agent_with("host-de", Some("de-frankfurt"), &["--accel", "emulation"]);
    c.wait_hosts_ready(1);
    c.cli_ok(&["image", "import", image.to_str().unwrap(), "--name", "test"]);
    // A VM with user data (it lands in the database, its WAL, the agent's
    // desired state and the guest's seed), prepared, not booted.
    c.ok(
        "POST",
        "/api/v1/vms",
        Some(
            json!({"name": "secret", "image": "test", "memory_mib": 64, "start": false,
                     "user_data": "#cloud-config\npassword: hunter2\n",
                     "placement": {"site": "de-frankfurt"}}),
        ),
    );
    c.wait_phase("secret", "stopped", Duration::from_secs(120));
    // A staged export on the control plane.
    let e = c.ok("POST", "/api/v1/vms/secret/export", None);
    let id = e["id"].as_str().unwrap().to_string();
    wait_until("the export", Duration::from_secs(120), || {
        let e = c.ok("GET", &format!("/api/v1/exports/{id}"), None);
        assert_ne!(e["state"], "failed", "{e}");
        (e["state"] == "ready").then_some(())
    });

    let present = |p: PathBuf| {
        assert!(p.exists(), "{} is missing", p.display());
        p
    };
    for f in [
        present(server.join("virt8ra.db")),
        present(server.join("virt8ra.db-wal")),
        present(server.join("admin.token")),
        present(server.join("catalog.key")),
        present(server.join("site.key")),
        present(agent.join("credentials.json")),
        present(agent.join("desired.log")),
    ] {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    let has_file = |dir: PathBuf| {
        let n = std::fs::read_dir(&dir).unwrap().count();
        assert!(n > 0, "nothing in {}", dir.display());
    };
    has_file(server.join("images"));
    has_file(server.join("staging"));
    has_file(agent.join("images"));
    has_file(agent.join("vms"));
    assert_eq!(mode(&server), 0o700);
    assert_eq!(mode(&agent), 0o700);
    assert_eq!(open_entries(&server), vec![]);
    assert_eq!(open_entries(&agent), vec![]);
}

#[test]
fn join_tokens_are_listed_revoked_and_purged() {
    let mut c = Cluster::start();
    c.create_topology();
    let create = |body: Value| c.ok("POST", "/api/v1/join-tokens", Some(body));
    let once = create(json!({"site": "de-frankfurt"}));
    let short = create(json!({"site": "pl-gdansk", "ttl_s": 1}));
    let revoked = create(json!({"site": "es-logrono", "max_uses": 3}));
    let listed = join_tokens(&c);
    let ids: Vec<&str> = listed.iter().map(|t| t["id"].as_str().unwrap()).collect();
    for t in [&once, &short, &revoked] {
        assert!(ids.contains(&t["id"].as_str().unwrap()), "{listed:?}");
    }
    // Never the secret, nor its hash.
    let text = serde_json::to_string(&listed).unwrap();
    for t in [&once, &short, &revoked] {
        let secret = t["token"].as_str().unwrap();
        assert!(!text.contains(secret), "{text}");
        let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(secret.as_bytes()));
        assert!(!text.contains(&hash), "{text}");
    }
    let r = listed.iter().find(|t| t["id"] == revoked["id"]).unwrap();
    assert_eq!(r["site"], "es-logrono");
    assert_eq!(r["uses_left"], 3);
    assert!(
        r["created_at"].is_string() && r["expires_at"].is_string(),
        "{r}"
    );

    // Revoked: gone from the list, and no host joins with it.
    let rid = revoked["id"].as_str().unwrap();
    let table = c.cli_ok(&["host", "join-token", "list"]);
    assert!(table.starts_with("ID") && table.contains(rid), "{table}");
    let out = c.cli_ok(&["host", "join-token", "revoke", rid]);
    assert!(out.contains("revoked"), "{out}");
    common::assert_error(
        c.api("DELETE", &format!("/api/v1/join-tokens/{rid}"), None),
        404,
        "not found",
    );
    let (s, _) = c.api_raw(
        "POST",
        "/api/v1/agent/join",
        Some(json!({"name": "x", "inventory": {}}).to_string()),
        revoked["token"].as_str(),
    );
    assert_eq!(s, 401);
    // Only the admin lists or revokes.
    let (s, _) = c.api_raw("GET", "/api/v1/join-tokens", None, None);
    assert_eq!(s, 401);
    let (s, _) = c.api_raw("GET", "/api/v1/join-tokens", None, once["token"].as_str());
    assert_eq!(s, 403);

    // Used up by a real agent joining with the file form: purged at once.
    let file = c.dir.path().join("once.token");
    std::fs::write(&file, format!("{}\n", once["token"].as_str().unwrap())).unwrap();
    c.start_agent_with(
        "host-de",
        None,
        &[
            "--join-token-file",
            file.to_str().unwrap(),
            "--driver",
            "sim",
        ],
    );
    c.wait_hosts_ready(1);
    // The token is on no command line (ps shows command lines to everyone).
    for (_, p) in &c.agents {
        let pid = p.as_ref().unwrap().child.id();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(
            !cmdline.contains(once["token"].as_str().unwrap()),
            "{cmdline}"
        );
    }
    // Expired meanwhile (1 s): purged too.
    std::thread::sleep(Duration::from_millis(1500));
    let left: Vec<Value> = join_tokens(&c);
    assert_eq!(
        left,
        Vec::<Value>::new(),
        "used up, expired, revoked: none left"
    );
    let json_out = c.cli_ok(&["host", "join-token", "list", "-o", "json"]);
    assert_eq!(serde_json::from_str::<Value>(&json_out).unwrap(), json!([]));
    // And out of the database, not only out of the list.
    let rows = std::process::Command::new("sqlite3")
        .arg(c.server_dir().join("virt8ra.db"))
        .arg("SELECT count(*) FROM tokens WHERE kind = 'join'")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&rows.stdout).trim(), "0");
}

#[test]
fn the_join_token_comes_from_a_file_or_the_environment() {
    let mut c = Cluster::start();
    c.create_topology();
    // From the environment.
    let t = c.ok(
        "POST",
        "/api/v1/join-tokens",
        Some(json!({"site": "pl-gdansk"})),
    );
    c.start_agent_env(
        "host-pl",
        None,
        &["--driver", "sim"],
        &[("VIRT8RA_JOIN_TOKEN", t["token"].as_str().unwrap())],
    );
    c.wait_hosts_ready(1);
    // A missing or empty file: a clear error, nothing joined.
    let run = |args: &[&str]| {
        let out = std::process::Command::new(common::bin())
            .args([
                "agent", "--server", &c.url, "--driver", "sim", "--name", "bad",
            ])
            .arg("--data-dir")
            .arg(c.dir.path().join("agent-bad"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = run(&["--join-token-file", "/nonexistent/token"]);
    assert!(
        e.contains("read the join token from /nonexistent/token"),
        "{e}"
    );
    let empty = c.dir.path().join("empty.token");
    std::fs::write(&empty, "\n").unwrap();
    let e = run(&["--join-token-file", empty.to_str().unwrap()]);
    assert!(e.contains("must hold one join token"), "{e}");
    let e = run(&[
        "--join-token-file",
        empty.to_str().unwrap(),
        "--join-token",
        "x",
    ]);
    assert!(e.contains("cannot be used with"), "{e}");
    assert_eq!(
        c.ok("GET", "/api/v1/hosts", None)["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn the_admin_token_rotates_and_the_old_one_stops_at_once() {
    let mut c = Cluster::start();
    let old = c.token.clone();
    // Only the admin rotates.
    let (s, _) = c.api_raw("POST", "/api/v1/admin-token/rotate", None, None);
    assert_eq!(s, 401);
    c.create_topology();
    let join = c.ok(
        "POST",
        "/api/v1/join-tokens",
        Some(json!({"site": "pl-gdansk"})),
    );
    let (s, _) = c.api_raw(
        "POST",
        "/api/v1/admin-token/rotate",
        None,
        join["token"].as_str(),
    );
    assert_eq!(s, 403);

    let out = c.cli(&["admin-token", "rotate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(new.starts_with("v8a_") && new != old, "{new}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("DATA_DIR/admin.token"));
    let file = c.server_dir().join("admin.token");
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), new);
    assert_eq!(mode(&file), 0o600);
    // The old token was in use (cached); it is refused from now on.
    common::assert_error(
        c.api_raw("GET", "/api/v1/providers", None, Some(&old)),
        401,
        "invalid token",
    );
    let (s, _) = c.api_raw("GET", "/api/v1/providers", None, Some(&new));
    assert_eq!(s, 200);

    // Again through the API; it lasts across a restart.
    let (s, v) = c.api_raw("POST", "/api/v1/admin-token/rotate", None, Some(&new));
    assert_eq!(s, 200, "{v}");
    let newer = v["token"].as_str().unwrap().to_string();
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), newer);
    c.kill_server();
    c.start_server();
    for (t, want) in [(&old, 401), (&new, 401), (&newer, 200)] {
        let (s, _) = c.api_raw("GET", "/api/v1/providers", None, Some(t));
        assert_eq!(s, want);
    }
    let leftovers: Vec<_> = std::fs::read_dir(c.server_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("admin") && n != "admin.token")
        .collect();
    assert_eq!(leftovers, Vec::<String>::new());
}

#[test]
fn an_image_service_serves_the_hosts_of_its_site_only() {
    let image = common::test_image();
    let mut c = Cluster::start();
    c.create_topology();
    c.start_agent_with(
        "de-0",
        Some("de-frankfurt"),
        &[
            "--image-service-listen",
            "127.0.0.1:0",
            "--accel",
            "emulation",
        ],
    );
    c.wait_hosts_ready(1);
    let service = wait_until("the image service", Duration::from_secs(30), || {
        c.ok("GET", "/api/v1/hosts/de-0", None)["inventory"]["image_service"]
            .as_str()
            .map(str::to_string)
    });
    let img: Value = serde_json::from_str(&c.cli_ok(&[
        "image",
        "import",
        image.to_str().unwrap(),
        "--name",
        "test",
        "-o",
        "json",
    ]))
    .unwrap();
    let (id, sha) = (img["id"].as_str().unwrap(), img["sha256"].as_str().unwrap());
    let size = img["size_bytes"].as_u64().unwrap();
    c.cli_ok(&["image", "replicate", "test", "--sites", "de-frankfurt"]);
    let cached = c.agent_dir("de-0").join(format!("images/{sha}.qcow2"));
    wait_until("pre-staging", Duration::from_secs(60), || {
        (std::fs::metadata(&cached).map(|m| m.len()).ok() == Some(size)).then_some(())
    });

    let url = format!("{service}/images/{sha}?id={id}&size={size}");
    let get = |bearer: Option<&str>| {
        let mut rb = reqwest::blocking::Client::new().get(&url);
        if let Some(b) = bearer {
            rb = rb.bearer_auth(b);
        }
        let r = rb.send().unwrap();
        let status = r.status().as_u16();
        (status, r.bytes().unwrap().to_vec())
    };
    let key = virt8ra_server::keys::site_key(&c.server_dir()).unwrap();
    let secret_of = |site: &str| {
        let s = c.ok("GET", &format!("/api/v1/sites/{site}"), None);
        virt8ra_server::keys::site_secret(&key, s["id"].as_str().unwrap())
    };
    // Nobody outside the site: no secret, a wrong one, another site's, or
    // a host token of this very site.
    let host_token: Value = serde_json::from_slice(
        &std::fs::read(c.agent_dir("de-0").join("credentials.json")).unwrap(),
    )
    .unwrap();
    for bearer in [
        None,
        Some("v8a_wrong".to_string()),
        Some(secret_of("es-logrono")),
        Some(host_token["host_token"].as_str().unwrap().to_string()),
    ] {
        let (status, body) = get(bearer.as_deref());
        assert_eq!(
            status,
            401,
            "{bearer:?}: {}",
            String::from_utf8_lossy(&body)
        );
        assert!(body.len() < 1000, "image bytes sent to {bearer:?}");
    }
    // A host of the site.
    let (status, body) = get(Some(&secret_of("de-frankfurt")));
    assert_eq!(status, 200);
    assert_eq!(body.len() as u64, size);
    let got = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body));
    assert_eq!(got, sha);
}
