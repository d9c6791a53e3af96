//! Tenants end to end: projects, users and scoped tokens through the real
//! control plane, CLI and (simulated) agents.
//!
//! The agents run the simulated driver: what these tests check is who may
//! see and change what, which happens in the control plane; the VMs need
//! a host, a site and a provider (for operators' views), not a guest.
//!
//! - two projects cannot see each other through the same CLI commands and
//!   API paths as the admin's;
//! - a member of project A calls every route of the route table against
//!   project B's resources and gets 403 or 404, and nothing of B changes;
//! - a viewer changes nothing; an operator of one provider cannot touch
//!   another provider's hosts and sees VMs on its own hosts as metadata;
//! - expired, revoked and deleted-user tokens get 401.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Output;
use std::time::Duration;

use common::{bin, Cluster, TOPOLOGY};
use serde_json::{json, Value};
use virt8ra_server::http::{routes, Access};

/// The CLI with `token` as VIRT8RA_TOKEN (and `project` as VIRT8RA_PROJECT).
fn cli_as(c: &Cluster, token: &str, project: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(bin());
    cmd.args(args)
        .env("VIRT8RA_URL", &c.url)
        .env("VIRT8RA_TOKEN", token)
        .env("HOME", c.dir.path())
        .env_remove("VIRT8RA_PROJECT");
    if let Some(p) = project {
        cmd.env("VIRT8RA_PROJECT", p);
    }
    cmd.output().unwrap()
}

fn cli_json(c: &Cluster, token: &str, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let out = cli_as(c, token, None, &a);
    assert!(
        out.status.success(),
        "virt8ra {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn names(v: &Value) -> Vec<String> {
    let items = v.get("items").unwrap_or(v);
    let mut n: Vec<String> = items
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap().to_string())
        .collect();
    n.sort();
    n
}

/// A user and a token of `role` in `project`, made with the admin's CLI.
fn token_for(c: &Cluster, user: &str, project: &str, role: &str) -> Value {
    c.cli_ok(&["user", "create", user, "-o", "json"]);
    cli_json(
        c,
        &c.token,
        &[
            "token",
            "create",
            "--user",
            user,
            "--project",
            project,
            "--role",
            role,
        ],
    )
}

fn secret(t: &Value) -> String {
    t["token"].as_str().unwrap().to_string()
}

/// The world every test starts from: the topology with one simulated host
/// per site, the tiny image, projects `a` and `b`, a member of each.
struct World {
    c: Cluster,
    a: String,
    b: String,
}

fn world() -> World {
    let mut c = Cluster::start();
    c.create_topology();
    for (i, (_, _, site, ..)) in TOPOLOGY.iter().enumerate() {
        c.start_agent_with(&format!("sim-{i}"), Some(site), &["--driver", "sim"]);
    }
    c.import_tiny_image();
    for p in ["a", "b"] {
        let v = cli_json(&c, &c.token, &["project", "create", p]);
        assert_eq!(v["name"], p, "{v}");
        assert_eq!(v["org"], "default", "{v}");
    }
    let a = secret(&token_for(&c, "alice", "a", "member"));
    let b = secret(&token_for(&c, "bob", "b", "member"));
    c.wait_hosts_ready(TOPOLOGY.len());
    World { c, a, b }
}

/// As `who`: a VM (with user data and a key), a network and a private image.
fn make_resources(w: &World, who: &str, token: &str) {
    let c = &w.c;
    let ud = c.dir.path().join(format!("user-data-{who}"));
    std::fs::write(&ud, "#cloud-config\nsecret: hush\n").unwrap();
    let out = cli_as(
        c,
        token,
        None,
        &[
            "vm",
            "create",
            &format!("vm-{who}"),
            "--image",
            "tiny",
            "--memory-mib",
            "128",
            "--country",
            if who == "a" { "ES" } else { "DE" },
            "--user-data",
            ud.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (s, v) = c.api_raw(
        "POST",
        "/api/v1/networks",
        Some(json!({"name": format!("net-{who}"), "cidr": "10.30.0.0/24"}).to_string()),
        Some(token),
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["project"], who, "{v}");
    let img = c.dir.path().join(format!("img-{who}.qcow2"));
    assert!(std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M")
        .status()
        .unwrap()
        .success());
    let out = cli_as(
        c,
        token,
        None,
        &[
            "image",
            "import",
            img.to_str().unwrap(),
            "--name",
            &format!("img-{who}"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Watches with `token` until the VM `last` shows up; returns the names of
/// the VMs whose events came.
fn watch_until(c: &Cluster, token: &str, last: &str) -> std::thread::JoinHandle<Vec<String>> {
    let (url, token, last) = (c.url.clone(), token.to_string(), last.to_string());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        use std::io::BufRead;
        let resp = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap()
            .get(format!("{url}/api/v1/watch"))
            .bearer_auth(token)
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        ready_tx.send(()).unwrap();
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(resp).lines() {
            let line = line.unwrap();
            let Some(data) = line.strip_prefix("data:") else {
                continue;
            };
            let ev: Value = serde_json::from_str(data.trim()).unwrap();
            let name = ev["vm"]["name"].as_str().unwrap_or_default().to_string();
            seen.push(name.clone());
            if name == last {
                break;
            }
        }
        seen
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    h
}

#[test]
fn two_projects_see_only_their_own_resources_through_the_same_cli_and_api() {
    let w = world();
    let c = &w.c;
    // A's watcher sees A's VMs' events, never B's (B's VM is made first).
    let watcher = watch_until(c, &w.a, "vm-a");
    make_resources(&w, "b", &w.b);
    make_resources(&w, "a", &w.a);
    let seen = watcher.join().unwrap();
    assert!(seen.iter().all(|n| n == "vm-a"), "{seen:?}");
    // And one the admin makes without a project: the default project's.
    c.cli_ok(&[
        "vm",
        "create",
        "vm-admin",
        "--image",
        "tiny",
        "--memory-mib",
        "128",
    ]);

    for (token, me, other) in [(&w.a, "a", "b"), (&w.b, "b", "a")] {
        let vms = cli_json(c, token, &["vm", "list"]);
        assert_eq!(names(&vms), [format!("vm-{me}")], "{vms}");
        assert_eq!(vms[0]["project"], me);
        let nets = cli_json(c, token, &["network", "list"]);
        assert_eq!(names(&nets), [format!("net-{me}")], "{nets}");
        // Public images and its own; never the other project's.
        let imgs = names(&cli_json(c, token, &["image", "list"]));
        assert!(imgs.contains(&format!("img-{me}")), "{imgs:?}");
        assert!(imgs.contains(&"tiny".to_string()), "{imgs:?}");
        assert!(!imgs.contains(&format!("img-{other}")), "{imgs:?}");
        let projects = cli_json(c, token, &["project", "list"]);
        assert_eq!(names(&projects), [me.to_string()], "{projects}");
        // The other project's VM does not exist, to this token.
        let out = cli_as(c, token, None, &["vm", "show", &format!("vm-{other}")]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not found"), "{err}");
        // The audit log of its own project's calls: its user's, no other.
        let log = cli_json(c, token, &["audit", "list"]);
        let users: std::collections::BTreeSet<&str> = log
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["actor"]["user"].as_str().unwrap_or("-"))
            .collect();
        let mine = if me == "a" { "alice" } else { "bob" };
        assert_eq!(users, [mine].into(), "{log}");
        // Showback of its own VMs only, totalled as its own.
        let u = cli_json(c, token, &["usage"]);
        let rows = u["vms"].as_array().unwrap();
        assert!(!rows.is_empty(), "{u}");
        assert!(rows.iter().all(|v| v["group"] == me), "{u}");
        assert_eq!(u["total"], u["groups"][me], "{u}");
        // Its own VM's residency trail, not the other's.
        let h = cli_json(c, token, &["vm", "history", &format!("vm-{me}")]);
        assert_eq!(h["vm"], format!("vm-{me}"), "{h}");
        let (s, v) = c.api_raw(
            "GET",
            &format!("/api/v1/vms/vm-{other}/history"),
            None,
            Some(token),
        );
        assert_eq!(s, 404, "{v}");
        // Nor can its image or network be used.
        let (s, v) = c.api_raw(
            "POST",
            "/api/v1/vms",
            Some(
                json!({"name": format!("steal-{me}"), "image": format!("img-{other}")}).to_string(),
            ),
            Some(token),
        );
        assert_eq!(s, 400, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not found"),
            "{v}"
        );
        let (s, v) = c.api_raw(
            "POST",
            "/api/v1/vms",
            Some(
                json!({"name": format!("steal-{me}"), "image": "tiny",
                       "nics": [{"network": format!("net-{other}")}]})
                .to_string(),
            ),
            Some(token),
        );
        assert_eq!(s, 400, "{v}");
        // Naming the other project in the header is a 404 for that project.
        let out = cli_as(c, token, Some(other), &["vm", "list"]);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&format!("project '{other}' not found")),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The admin reads one project's calls with --project, one user's with
    // --user.
    let out = cli_as(c, &c.token, Some("b"), &["audit", "list", "-o", "json"]);
    assert!(out.status.success());
    let log: Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = log.as_array().unwrap();
    assert!(
        !items.is_empty() && items.iter().all(|r| r["actor"]["project"] == "b"),
        "{log}"
    );
    let log = cli_json(c, &c.token, &["audit", "list", "--user", "alice"]);
    let items = log.as_array().unwrap();
    assert!(
        !items.is_empty() && items.iter().all(|r| r["actor"]["user"] == "alice"),
        "{log}"
    );
    // The admin sees every VM, and one project's with --project.
    let all = names(&cli_json(c, &c.token, &["vm", "list"]));
    assert_eq!(all, ["vm-a", "vm-admin", "vm-b"]);
    assert_eq!(c.vm("vm-admin")["project"], "default");
    let out = cli_as(c, &c.token, Some("b"), &["vm", "list", "-o", "json"]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(names(&v), ["vm-b"]);
    // Admin creates with --project belong to that project.
    let out = cli_as(
        c,
        &c.token,
        Some("a"),
        &[
            "vm",
            "create",
            "vm-a2",
            "--image",
            "tiny",
            "--memory-mib",
            "128",
            "-o",
            "json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.vm("vm-a2")["project"], "a");
    assert_eq!(
        names(&cli_json(c, &w.a, &["vm", "list"])),
        ["vm-a", "vm-a2"]
    );
    // A project that owns resources cannot be deleted.
    let (s, v) = c.api("DELETE", "/api/v1/projects/a", None);
    assert_eq!(s, 409, "{v}");
}

/// A plausible body for each route that takes one, so that the answer is
/// about the resource, not about a malformed request.
fn body_for(method: &str, path: &str) -> Option<Value> {
    if method == "GET" || method == "DELETE" {
        return None;
    }
    Some(if path.ends_with("/actions") {
        json!({"action": "stop"})
    } else if path.ends_with("/replicate") {
        json!({"sites": [TOPOLOGY[1].2]})
    } else if path.starts_with("/api/v1/hosts/") && method == "PATCH" {
        json!({"state": "maintenance"})
    } else {
        json!({})
    })
}

/// Project B's resource (or the thing B's token would touch) for a path's
/// parameter.
fn b_value(path: &str, param: &str, b: &BKeys) -> String {
    let noun = path
        .trim_start_matches("/api/v1/")
        .split('/')
        .next()
        .unwrap();
    match (noun, param) {
        ("vms", _) => "vm-b".into(),
        ("networks", _) => "net-b".into(),
        ("images", _) => "img-b".into(),
        ("projects", _) => "b".into(),
        ("users", _) => "bob".into(),
        ("tokens", _) => b.token_id.clone(),
        ("hosts", _) => "sim-1".into(),
        ("sites", _) => TOPOLOGY[1].2.into(),
        ("providers", _) => TOPOLOGY[1].0.into(),
        ("orgs", _) => "default".into(),
        ("migrations" | "exports" | "staging", _) => b.migration_id.clone(),
        (_, "sha256") => "0".repeat(64),
        (_, "migration_id" | "id") => b.migration_id.clone(),
        (_, "stream") => "migrate".into(),
        (_, "conn_id") => "c1".into(),
        _ => "b".into(),
    }
}

struct BKeys {
    token_id: String,
    migration_id: String,
}

/// What an observer can read of project B with the admin token: if any of
/// it changes, a call of A's changed B.
fn b_state(c: &Cluster) -> Value {
    let mut vm = c.vm("vm-b");
    // Agents' reports move these along without anyone asking.
    vm["status"]["started_at"] = Value::Null;
    json!({
        "vm": [vm["power"].clone(), vm["status"]["phase"].clone(), vm["status"]["host"].clone(),
               vm["updated_at"].clone(), vm["reboot_generation"].clone()],
        "events": c.ok("GET", "/api/v1/vms/vm-b/events", None).as_array().unwrap().len(),
        "net": c.ok("GET", "/api/v1/networks/net-b", None)["id"].clone(),
        "img": c.ok("GET", "/api/v1/images/img-b", None)["id"].clone(),
        "project": c.ok("GET", "/api/v1/projects/b", None),
        "tokens": c.ok("GET", "/api/v1/tokens", None)["items"].as_array().unwrap().len(),
        "users": names(&c.ok("GET", "/api/v1/users", None)),
        "hosts": c.ok("GET", "/api/v1/hosts", None)["items"].as_array().unwrap().iter()
            .map(|h| (h["name"].clone(), h["state"].clone())).collect::<Vec<_>>(),
    })
}

#[test]
fn a_member_of_one_project_cannot_reach_another_projects_resources_by_any_route() {
    let w = world();
    let c = &w.c;
    make_resources(&w, "a", &w.a);
    make_resources(&w, "b", &w.b);
    c.wait_phase("vm-b", "running", Duration::from_secs(60));
    let bt = cli_json(c, &c.token, &["token", "list"]);
    let b_token = bt
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["user"] == "bob")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let keys = BKeys {
        token_id: b_token,
        migration_id: "00000000-0000-4000-8000-000000000000".into(),
    };
    let before = b_state(c);
    let http = common::https_client(None);
    let mut wrong = Vec::new();
    let mut probed = 0;
    for r in routes() {
        if r.access == Access::Anyone || !r.path.contains('{') {
            continue;
        }
        let path: String = r
            .path
            .split('/')
            .map(
                |seg| match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(p) => b_value(r.path, p, &keys),
                    None => seg.to_string(),
                },
            )
            .collect::<Vec<_>>()
            .join("/");
        let mut rb = http
            .request(r.method.clone(), format!("{}{}", c.url, path))
            .bearer_auth(&w.a);
        if let Some(b) = body_for(r.method.as_str(), r.path) {
            rb = rb
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = rb.send().unwrap();
        let status = resp.status().as_u16();
        probed += 1;
        if status != 403 && status != 404 {
            wrong.push(format!(
                "{} {path}: {status} {}",
                r.method,
                resp.text().unwrap_or_default()
            ));
        }
    }
    assert!(wrong.is_empty(), "A reached B:\n{}", wrong.join("\n"));
    assert!(probed > 40, "only {probed} routes probed");
    // Lists: nothing of B's.
    for path in [
        "/api/v1/vms?include_deleted=true",
        "/api/v1/networks",
        "/api/v1/images",
        "/api/v1/apps",
        "/api/v1/projects",
    ] {
        let (s, v) = c.api_raw("GET", path, None, Some(&w.a));
        assert_eq!(s, 200, "{path}: {v}");
        let text = v.to_string();
        assert!(
            !text.contains("vm-b")
                && !text.contains("net-b")
                && !text.contains("img-b")
                && !text.contains("\"b\""),
            "{path}: {v}"
        );
    }
    // Nothing of B changed, and B's token still works.
    assert_eq!(b_state(c), before);
    let (s, v) = c.api_raw("GET", "/api/v1/vms/vm-b", None, Some(&w.b));
    assert_eq!(s, 200, "{v}");
}

#[test]
fn a_viewer_changes_nothing_and_an_operator_touches_only_its_providers_hosts() {
    let w = world();
    let c = &w.c;
    make_resources(&w, "a", &w.a);
    make_resources(&w, "b", &w.b);
    c.wait_phase("vm-a", "running", Duration::from_secs(60));
    c.wait_phase("vm-b", "running", Duration::from_secs(60));

    // A viewer of a: reads, and every changing call is refused.
    let viewer = secret(&token_for(c, "vera", "a", "viewer"));
    assert_eq!(names(&cli_json(c, &viewer, &["vm", "list"])), ["vm-a"]);
    let before = c.vm("vm-a");
    for (m, path, body) in [
        (
            "POST",
            "/api/v1/vms/vm-a/actions",
            json!({"action": "stop"}),
        ),
        ("DELETE", "/api/v1/vms/vm-a", Value::Null),
        (
            "POST",
            "/api/v1/vms",
            json!({"name": "v2", "image": "tiny"}),
        ),
        ("POST", "/api/v1/vms/vm-a/migrate", json!({})),
        ("POST", "/api/v1/vms/vm-a/export", json!({})),
        ("DELETE", "/api/v1/networks/net-a", Value::Null),
        (
            "POST",
            "/api/v1/networks",
            json!({"name": "n2", "cidr": "10.9.0.0/24"}),
        ),
        ("DELETE", "/api/v1/images/img-a", Value::Null),
        (
            "POST",
            "/api/v1/tokens",
            json!({"user": "vera", "project": "a", "role": "admin"}),
        ),
        ("POST", "/api/v1/projects", json!({"name": "p2"})),
    ] {
        let body = (!body.is_null()).then(|| body.to_string());
        let (s, v) = c.api_raw(m, path, body, Some(&viewer));
        assert_eq!(s, 403, "{m} {path}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("viewer"),
            "{v}"
        );
    }
    let out = cli_as(c, &viewer, None, &["vm", "stop", "vm-a"]);
    assert!(!out.status.success());
    let after = c.vm("vm-a");
    assert_eq!(before["updated_at"], after["updated_at"]);
    assert_eq!(after["power"], "running");
    assert!(c.api("GET", "/api/v1/networks/net-a", None).0 == 200);
    assert!(c.api("GET", "/api/v1/images/img-a", None).0 == 200);

    // An operator of the Spanish provider: its hosts and sites only.
    c.cli_ok(&["user", "create", "olga"]);
    let op = cli_json(
        c,
        &c.token,
        &[
            "token",
            "create",
            "--user",
            "olga",
            "--provider",
            TOPOLOGY[0].0,
        ],
    );
    assert_eq!(op["scope"], format!("provider:{}", TOPOLOGY[0].0));
    assert_eq!(op["role"], "operator");
    let op = secret(&op);
    assert_eq!(names(&cli_json(c, &op, &["host", "list"])), ["sim-0"]);
    assert_eq!(
        names(&cli_json(c, &op, &["site", "list"])),
        [TOPOLOGY[0].2.to_string()]
    );
    assert_eq!(
        names(&cli_json(c, &op, &["provider", "list"])),
        [TOPOLOGY[0].0.to_string()]
    );
    let de_host = c.ok("GET", "/api/v1/hosts/sim-1", None);
    for (m, path, body) in [
        ("GET", "/api/v1/hosts/sim-1", None),
        (
            "PATCH",
            "/api/v1/hosts/sim-1",
            Some(json!({"state": "maintenance"})),
        ),
        ("DELETE", "/api/v1/hosts/sim-1", None),
        ("POST", "/api/v1/hosts/sim-1/evacuate", Some(json!({}))),
        ("GET", &format!("/api/v1/sites/{}", TOPOLOGY[1].2), None),
        ("DELETE", &format!("/api/v1/sites/{}", TOPOLOGY[1].2), None),
        (
            "POST",
            &format!("/api/v1/sites/{}/evacuate", TOPOLOGY[1].2),
            Some(json!({})),
        ),
        (
            "PATCH",
            &format!("/api/v1/providers/{}", TOPOLOGY[1].0),
            Some(json!({})),
        ),
        (
            "POST",
            &format!("/api/v1/providers/{}/evacuate", TOPOLOGY[1].0),
            Some(json!({})),
        ),
    ] {
        let (s, v) = c.api_raw(m, path, body.map(|b| b.to_string()), Some(&op));
        assert_eq!(s, 404, "{m} {path}: {v}");
    }
    let (s, v) = c.api_raw(
        "POST",
        "/api/v1/join-tokens",
        Some(json!({"site": TOPOLOGY[1].2}).to_string()),
        Some(&op),
    );
    assert_eq!(s, 400, "{v}");
    assert_eq!(
        c.ok("GET", "/api/v1/hosts/sim-1", None)["state"],
        de_host["state"]
    );
    // Its own host it manages.
    let (s, v) = c.api_raw(
        "PATCH",
        "/api/v1/hosts/sim-0",
        Some(json!({"state": "maintenance"}).to_string()),
        Some(&op),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "maintenance");
    // The VMs on its hosts, as metadata: no user data, console or events.
    let vms = cli_json(c, &op, &["vm", "list"]);
    assert_eq!(names(&vms), ["vm-a"], "{vms}");
    assert_eq!(vms[0]["project"], "a");
    assert!(vms[0]["spec"]["user_data"].is_null(), "{vms}");
    assert!(c.vm("vm-a")["spec"]["user_data"]
        .as_str()
        .unwrap()
        .contains("hush"));
    let (s, v) = c.api_raw("GET", "/api/v1/vms/vm-a", None, Some(&op));
    assert_eq!(s, 200, "{v}");
    assert!(v["spec"]["user_data"].is_null(), "{v}");
    let (s, _) = c.api_raw("GET", "/api/v1/vms/vm-b", None, Some(&op));
    assert_eq!(s, 404);
    for path in ["/api/v1/vms/vm-a/console", "/api/v1/vms/vm-a/events"] {
        let (s, v) = c.api_raw("GET", path, None, Some(&op));
        assert_eq!(s, 403, "{path}: {v}");
    }
    let (s, _) = c.api_raw(
        "POST",
        "/api/v1/vms/vm-a/actions",
        Some(json!({"action": "stop"}).to_string()),
        Some(&op),
    );
    assert_eq!(s, 403);
}

#[test]
fn expired_revoked_and_orphaned_tokens_are_refused() {
    let c = Cluster::start();
    c.cli_ok(&["project", "create", "p"]);
    c.cli_ok(&["user", "create", "u"]);
    let short = cli_json(
        &c,
        &c.token,
        &[
            "token",
            "create",
            "--user",
            "u",
            "--project",
            "p",
            "--ttl",
            "2s",
        ],
    );
    assert!(short["expires_at"].is_string(), "{short}");
    let long = cli_json(
        &c,
        &c.token,
        &[
            "token",
            "create",
            "--user",
            "u",
            "--project",
            "p",
            "--ttl",
            "30d",
            "--name",
            "ci",
        ],
    );
    assert_eq!(long["name"], "ci");
    for t in [&short, &long] {
        let (s, v) = c.api_raw("GET", "/api/v1/vms", None, t["token"].as_str());
        assert_eq!(s, 200, "{v}");
    }
    // The list shows ids, never secrets.
    let listed = c.cli_ok(&["token", "list", "-o", "json"]);
    assert!(!listed.contains(short["token"].as_str().unwrap()));
    assert!(listed.contains(short["id"].as_str().unwrap()));

    std::thread::sleep(Duration::from_secs(3));
    let (s, v) = c.api_raw("GET", "/api/v1/vms", None, short["token"].as_str());
    assert_eq!(s, 401, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("expired"),
        "{v}"
    );

    c.cli_ok(&["token", "revoke", long["id"].as_str().unwrap()]);
    let (s, v) = c.api_raw("GET", "/api/v1/vms", None, long["token"].as_str());
    assert_eq!(s, 401, "{v}");
    let (s, _) = c.api(
        "DELETE",
        &format!("/api/v1/tokens/{}", long["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(s, 404);

    // A deleted user's tokens go with it.
    let third = cli_json(
        &c,
        &c.token,
        &["token", "create", "--user", "u", "--project", "p"],
    );
    let (s, _) = c.api_raw("GET", "/api/v1/vms", None, third["token"].as_str());
    assert_eq!(s, 200);
    c.cli_ok(&["user", "delete", "u"]);
    let (s, _) = c.api_raw("GET", "/api/v1/vms", None, third["token"].as_str());
    assert_eq!(s, 401);

    // Bad input is a 4xx that says what was wrong, and makes nothing.
    for (body, needle) in [
        (
            json!({"user": "nobody", "project": "p"}),
            "user 'nobody' not found",
        ),
        (
            json!({"user": "v", "project": "nope"}),
            "project 'nope' not found",
        ),
        (
            json!({"user": "v", "project": "p", "role": "operator"}),
            "operator",
        ),
        (json!({"user": "v", "project": "p", "ttl_s": 0}), "ttl_s"),
        (json!({"user": "v"}), "--project or --provider"),
    ] {
        c.ok("POST", "/api/v1/users", Some(json!({"name": "v"})));
        let (s, v) = c.api("POST", "/api/v1/tokens", Some(body.clone()));
        assert_eq!(s, 400, "{body}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{body}: {v}"
        );
        c.ok("DELETE", "/api/v1/users/v", None);
    }
    let left = c.ok("GET", "/api/v1/tokens", None);
    assert!(
        left["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["user"] != "v"),
        "{left}"
    );
}

#[test]
fn a_project_admin_manages_its_projects_tokens_only() {
    let c = Cluster::start();
    for p in ["a", "b"] {
        c.cli_ok(&["project", "create", p]);
    }
    let admin_a = secret(&token_for(&c, "ada", "a", "admin"));
    let member_b = token_for(&c, "ben", "b", "member");
    c.cli_ok(&["user", "create", "amy"]);
    // A token of a for amy: amy becomes a member of a.
    let t = cli_json(
        &c,
        &admin_a,
        &[
            "token",
            "create",
            "--user",
            "amy",
            "--role",
            "viewer",
            "--project",
            "a",
        ],
    );
    assert_eq!(t["scope"], "project:a");
    let members = c.ok("GET", "/api/v1/projects/a", None)["members"].clone();
    assert!(
        members
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["user"] == "amy" && m["role"] == "viewer"),
        "{members}"
    );
    // Not of b (b does not exist, to a's admin), nor of a provider or the platform.
    let (s, v) = c.api_raw(
        "POST",
        "/api/v1/tokens",
        Some(json!({"user": "amy", "project": "b"}).to_string()),
        Some(&admin_a),
    );
    assert_eq!(s, 400, "{v}");
    let (s, v) = c.api_raw(
        "POST",
        "/api/v1/tokens",
        Some(json!({"user": "amy", "provider": "x"}).to_string()),
        Some(&admin_a),
    );
    assert_eq!(s, 403, "{v}");
    // It lists and revokes a's tokens, never b's.
    let listed = cli_json(&c, &admin_a, &["token", "list"]);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["scope"] == "project:a"),
        "{listed}"
    );
    let (s, _) = c.api_raw(
        "DELETE",
        &format!("/api/v1/tokens/{}", member_b["id"].as_str().unwrap()),
        None,
        Some(&admin_a),
    );
    assert_eq!(s, 404);
    let (s, _) = c.api_raw("GET", "/api/v1/whoami", None, member_b["token"].as_str());
    assert_eq!(s, 200);
    let who = cli_json(&c, &admin_a, &["whoami"]);
    assert_eq!(
        who,
        json!({"user": "ada", "scope": "project:a", "role": "admin"})
    );
    // Users and projects are the platform's.
    let (s, _) = c.api_raw(
        "POST",
        "/api/v1/users",
        Some(json!({"name": "x"}).to_string()),
        Some(&admin_a),
    );
    assert_eq!(s, 403);
    // A platform admin's token is the platform's: it does what the admin
    // token does. Only platform admins may hold one.
    c.cli_ok(&["user", "create", "pat", "--platform-admin"]);
    let pat = cli_json(&c, &c.token, &["token", "create", "--user", "pat"]);
    assert_eq!(pat["scope"], "platform", "{pat}");
    let (s, v) = c.api_raw(
        "POST",
        "/api/v1/providers",
        Some(json!({"name": "pat-provider", "country": "FR"}).to_string()),
        pat["token"].as_str(),
    );
    assert_eq!(s, 201, "{v}");
    let (s, v) = c.api("POST", "/api/v1/tokens", Some(json!({"user": "amy"})));
    assert_eq!(s, 400, "{v}");
}

/// A project exports its VM and downloads the disk; another project
/// cannot see the export nor download it.
#[test]
fn a_project_downloads_its_own_exports_only() {
    let w = world();
    let c = &w.c;
    make_resources(&w, "a", &w.a);
    c.wait_phase("vm-a", "running", Duration::from_secs(60));
    let out = cli_as(c, &w.a, None, &["vm", "stop", "vm-a", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (s, e) = c.api_raw("POST", "/api/v1/vms/vm-a/export", None, Some(&w.a));
    assert_eq!(s, 202, "{e}");
    let id = e["id"].as_str().unwrap().to_string();
    let ready = common::wait_until("the export", Duration::from_secs(120), || {
        let (s, e) = c.api_raw("GET", &format!("/api/v1/exports/{id}"), None, Some(&w.a));
        assert_eq!(s, 200, "{e}");
        assert_ne!(e["state"], "failed", "{e}");
        (e["state"] == "ready").then_some(e)
    });
    let url = format!("{}{}", c.url, ready["url_path"].as_str().unwrap());
    let http = common::https_client(None);
    let get = |token: &str| http.get(&url).bearer_auth(token).send().unwrap();
    let mine = get(&w.a);
    assert_eq!(mine.status().as_u16(), 200);
    let bytes = mine.bytes().unwrap();
    assert_eq!(bytes.len() as u64, ready["size_bytes"].as_u64().unwrap());
    // B: the export and its disk do not exist.
    let (s, _) = c.api_raw("GET", &format!("/api/v1/exports/{id}"), None, Some(&w.b));
    assert_eq!(s, 404);
    assert_eq!(get(&w.b).status().as_u16(), 404);
    let (s, _) = c.api_raw("DELETE", &format!("/api/v1/exports/{id}"), None, Some(&w.b));
    assert_eq!(s, 404);
    // A's export is still there.
    let (s, _) = c.api_raw("GET", &format!("/api/v1/exports/{id}"), None, Some(&w.a));
    assert_eq!(s, 200);
}
