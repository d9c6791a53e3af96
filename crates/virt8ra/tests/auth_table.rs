//! The authentication table: every route of the control plane's route table
//! (`virt8ra_server::http::routes`, the only source the router is built from)
//! is called on a real control plane with no credential, a malformed
//! `Authorization` header, an unknown token, a join token, a host token,
//! the admin token, and user tokens of a project's admin, member and
//! viewer and of a provider's operator, and the answer must match who the
//! table says may call it (the table names the permission every route
//! needs; the router is built from the table alone, so a route cannot
//! ship without one). A route that lets a credential through that its table entry does not
//! accept, or refuses one it does, fails the test, whatever the route.
//!
//! Path parameters are filled with values that name nothing, and bodies are
//! left out: an accepted call then fails after authentication (400, 404) and
//! changes nothing. WebSocket routes are called without upgrade headers; they
//! must still authenticate first.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Cluster, TOPOLOGY};
use serde_json::{json, Value};
use virt8ra_server::http::{routes, Access};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cred {
    None,
    Malformed,
    Unknown,
    Join,
    Host,
    Admin,
    ProjectAdmin,
    Member,
    Viewer,
    Operator,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// 401 with the error body.
    Unauthorized,
    /// 403 with the error body saying the token's kind cannot do this.
    Forbidden,
    /// Authentication lets it through: neither 401 nor a 403 for the
    /// token's kind, nor a server error on the dummy values; an error after
    /// authentication (400, 404) has the JSON error body.
    Allowed,
}

/// What the table promises for a credential, written out case by case
/// rather than derived from the server's own code.
fn expect(access: Access, cred: Cred) -> Expect {
    use Access::*;
    let accepted = match cred {
        Cred::None | Cred::Malformed | Cred::Unknown => {
            return if access == Anyone {
                Expect::Allowed
            } else {
                Expect::Unauthorized
            };
        }
        Cred::Join => matches!(access, Anyone | Join),
        Cred::Host => matches!(access, Anyone | Host | AdminOrHost | ReadOrHost),
        Cred::Admin => !matches!(access, Join | Host),
        Cred::ProjectAdmin => matches!(
            access,
            Anyone | Read | VmRead | Write | ProjectAdmin | ReadOrHost
        ),
        Cred::Member => matches!(access, Anyone | Read | VmRead | Write | ReadOrHost),
        Cred::Viewer => matches!(access, Anyone | Read | VmRead | ReadOrHost),
        Cred::Operator => matches!(access, Anyone | VmRead | Infra),
    };
    if accepted {
        Expect::Allowed
    } else {
        Expect::Forbidden
    }
}

/// A plausible value for a path segment that names nothing that exists.
fn fill(path: &str) -> String {
    path.split('/')
        .map(
            |seg| match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                None => seg.to_string(),
                Some("sha256") => "0".repeat(64),
                Some("id" | "migration_id") => "00000000-0000-4000-8000-000000000000".into(),
                Some("stream") => "migrate".into(),
                Some("conn_id") => "c1".into(),
                Some(_) => "auth-table-nothing".into(),
            },
        )
        .collect::<Vec<_>>()
        .join("/")
}

/// Joins a host through the API (no agent process is needed for a token).
fn host_token(c: &Cluster) -> String {
    let jt = c.ok(
        "POST",
        "/api/v1/join-tokens",
        Some(json!({"site": TOPOLOGY[0].2})),
    );
    let inventory = json!({
        "hostname": "auth-table", "arch": "x86_64", "vcpus": 4, "memory_mib": 4096,
        "disk_gib": 100, "cpu_model": "simulated", "cpu_flags": [], "accelerators": [],
        "hypervisor": "emulation", "agent_version": "test", "qemu_version": "simulated",
        "machine_types": [], "protocol": 0, "migration_relay": false
    });
    let (status, v) = c.api_raw(
        "POST",
        "/api/v1/agent/join",
        Some(json!({"name": "auth-table-host", "inventory": inventory}).to_string()),
        jt["token"].as_str(),
    );
    assert_eq!(status, 201, "join: {v}");
    v["host_token"].as_str().unwrap().to_string()
}

/// A user token of `role` in project `auth-table`, or of the operator of
/// the first provider.
fn user_token(c: &Cluster, role: &str) -> String {
    let user = format!("auth-table-{role}");
    c.ok("POST", "/api/v1/users", Some(json!({"name": user})));
    let body = if role == "operator" {
        json!({"user": user, "provider": TOPOLOGY[0].0})
    } else {
        json!({"user": user, "project": "auth-table", "role": role})
    };
    c.ok("POST", "/api/v1/tokens", Some(body))["token"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn every_route_answers_each_credential_as_its_table_entry_says() {
    let c = Cluster::start();
    c.create_topology();
    c.ok(
        "POST",
        "/api/v1/projects",
        Some(json!({"name": "auth-table"})),
    );
    let [project_admin, member, viewer, operator] =
        ["admin", "member", "viewer", "operator"].map(|r| user_token(&c, r));
    let host = host_token(&c);
    let join = c.ok(
        "POST",
        "/api/v1/join-tokens",
        Some(json!({"site": TOPOLOGY[0].2})),
    )["token"]
        .as_str()
        .unwrap()
        .to_string();
    // The admin token in force: the table's rotation route, called with it,
    // replaces it (and the old one stops working at once).
    let mut admin = c.token.clone();
    let header = |cred: Cred, admin: &str| -> Option<String> {
        match cred {
            Cred::None => None,
            Cred::Malformed => Some("Basic dmlydDhyYTp2aXJ0OHJh".into()),
            Cred::Unknown => Some(format!("Bearer v8a_{}", "0".repeat(64))),
            Cred::Join => Some(format!("Bearer {join}")),
            Cred::Host => Some(format!("Bearer {host}")),
            Cred::Admin => Some(format!("Bearer {admin}")),
            Cred::ProjectAdmin => Some(format!("Bearer {project_admin}")),
            Cred::Member => Some(format!("Bearer {member}")),
            Cred::Viewer => Some(format!("Bearer {viewer}")),
            Cred::Operator => Some(format!("Bearer {operator}")),
        }
    };
    let http = common::https_client(None);
    let creds = [
        Cred::None,
        Cred::Malformed,
        Cred::Unknown,
        Cred::Join,
        Cred::Host,
        Cred::Admin,
        Cred::ProjectAdmin,
        Cred::Member,
        Cred::Viewer,
        Cred::Operator,
    ];

    let table = routes();
    let mut wrong = Vec::new();
    let mut calls = 0;
    for r in &table {
        let url = format!("{}{}", c.url, fill(r.path));
        for cred in creds {
            let mut rb = http.request(r.method.clone(), &url);
            if let Some(h) = header(cred, &admin) {
                rb = rb.header("authorization", h);
            }
            let resp = rb.send().unwrap();
            calls += 1;
            let status = resp.status().as_u16();
            let rotated = r.path == "/api/v1/admin-token/rotate" && status == 200;
            // Streams (the watch) answer 200 and never end: read only errors
            // (and the rotation's answer, which holds the new admin token).
            let body: Value = if status >= 400 || rotated {
                serde_json::from_str(&resp.text().unwrap_or_default()).unwrap_or(Value::Null)
            } else {
                Value::Null
            };
            if rotated {
                admin = body["token"].as_str().unwrap().to_string();
            }
            let code = body["error"]["code"].as_str().unwrap_or_default();
            let msg = body["error"]["message"].as_str().unwrap_or_default();
            let kind_refused = status == 403 && msg.contains("token cannot do this");
            let want = expect(r.access, cred);
            let ok = match want {
                Expect::Unauthorized => status == 401 && code == "unauthorized",
                Expect::Forbidden => kind_refused && code == "forbidden",
                // Refused after authentication, with our error body too
                // (WebSocket routes called without an upgrade included).
                Expect::Allowed => {
                    status != 401
                        && !kind_refused
                        && status < 500
                        && (status < 400 || !code.is_empty())
                }
            };
            if !ok {
                wrong.push(format!(
                    "{} {} ({:?}) with {cred:?}: expected {want:?}, got {status} {body}",
                    r.method, r.path, r.access
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {calls} calls answered differently from the route table:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    // Every kind of access is exercised, so a table that lost one shows.
    for a in [
        Access::Anyone,
        Access::Join,
        Access::Host,
        Access::Admin,
        Access::AdminOrHost,
        Access::Read,
        Access::VmRead,
        Access::Write,
        Access::ProjectAdmin,
        Access::Infra,
        Access::ReadOrHost,
    ] {
        assert!(table.iter().any(|r| r.access == a), "no route with {a:?}");
    }
    assert_eq!(calls, table.len() * creds.len());

    // The credentials were real to the end: the calls changed nothing.
    assert_ne!(
        admin, c.token,
        "the rotation route was called with the admin token"
    );
    let (s, v) = c.api_raw("GET", "/api/v1/hosts/auth-table-host", None, Some(&admin));
    assert_eq!(s, 200, "{v}");
    let (s, v) = c.api_raw("GET", "/api/v1/images", None, Some(&host));
    assert_eq!(s, 403, "{v}");
    let (s, v) = c.api_raw("GET", "/api/v1/providers", None, Some(&admin));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["items"].as_array().unwrap().len(), TOPOLOGY.len(), "{v}");
}

/// A path outside the table is not found whatever the credential: the
/// router has no route but the table's.
#[test]
fn a_path_outside_the_table_is_not_found() {
    let c = Cluster::start();
    for token in [None, Some(c.token.as_str())] {
        let (s, v) = c.api_raw("GET", "/api/v1/auth-table-nothing", None, token);
        assert_eq!(s, 404, "{v}");
        assert_eq!(v["error"]["code"], "not_found", "{v}");
    }
    assert!(
        !routes()
            .iter()
            .any(|r| r.path == "/api/v1/auth-table-nothing"),
        "the probe path is a route"
    );
}
