//! The API against bad input: every bad request gets a 4xx with a JSON error
//! body that names the problem, and changes nothing. Runs the real control
//! plane (no agents needed).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{assert_error, Cluster};
use serde_json::{json, Value};

/// Everything the store holds, to check that bad requests change nothing.
fn snapshot(c: &Cluster) -> Value {
    json!({
        "providers": c.ok("GET", "/api/v1/providers", None)["items"],
        "sites": c.ok("GET", "/api/v1/sites", None)["items"],
        "images": c.ok("GET", "/api/v1/images", None)["items"],
        "vms": c.ok("GET", "/api/v1/vms?include_deleted=true", None)["items"],
        "hosts": c.ok("GET", "/api/v1/hosts", None)["items"],
    })
}

/// SIGKILL the control plane in the middle of a stream of writes, three
/// times: every write it acknowledged is there after the restart.
#[test]
fn acknowledged_writes_survive_sigkill() {
    let mut c = Cluster::start();
    let mut acked: Vec<String> = Vec::new();
    for round in 0..3 {
        let url = c.url.clone();
        let token = c.token.clone();
        let writer = std::thread::spawn(move || {
            let http = reqwest::blocking::Client::new();
            let mut ok = Vec::new();
            for i in 0..10_000 {
                let name = format!("p{round}-{i}");
                let r = http
                    .post(format!("{url}/api/v1/providers"))
                    .bearer_auth(&token)
                    .json(&json!({"name": name, "country": "DE"}))
                    .send();
                match r {
                    Ok(r) if r.status().as_u16() == 201 => ok.push(name),
                    _ => break, // the server is gone
                }
            }
            ok
        });
        std::thread::sleep(std::time::Duration::from_millis(300 + 200 * round));
        c.kill_server();
        let ok = writer.join().unwrap();
        assert!(!ok.is_empty(), "no write was acknowledged in round {round}");
        acked.extend(ok);
        c.start_server();
    }
    let stored: Vec<String> = c.ok("GET", "/api/v1/providers", None)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    for name in &acked {
        assert!(
            stored.contains(name),
            "acknowledged provider {name} was lost"
        );
    }
}

#[test]
fn bad_input_is_refused_with_a_clear_error_and_changes_nothing() {
    let c = Cluster::start();

    // Liveness and the API description need no token.
    let (s, v) = c.api_raw("GET", "/healthz", None, None);
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")));
    let (s, v) = c.api_raw("GET", "/api/v1/openapi.json", None, None);
    assert_eq!(s, 200);
    assert!(v["openapi"].as_str().unwrap().starts_with("3."));
    assert!(v["paths"]["/api/v1/vms"].is_object());

    // The admin token file is the owner's only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(c.server_dir().join("admin.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "admin.token mode {mode:o}");

    c.create_topology();
    // A tiny valid image.
    let img = c.dir.path().join("tiny.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success());
    let out = c.cli_ok(&[
        "image",
        "import",
        img.to_str().unwrap(),
        "--name",
        "tiny",
        "-o",
        "json",
    ]);
    let image: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(image["format"], "qcow2");
    assert_eq!(image["sha256"].as_str().unwrap().len(), 64);

    let out = c.cli_ok(&[
        "site",
        "create",
        "es-edge",
        "--provider",
        "provider-es",
        "--country",
        "ES",
        "--city",
        "Bilbao",
        "--lat",
        "43.26",
        "--lon",
        "-2.93",
        "--tier",
        "edge",
        "--label",
        "rack=a",
        "-o",
        "json",
    ]);
    let site: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(site["labels"], json!({"rack": "a"}));
    assert_eq!(site["tier"], "edge");
    let out = c.cli(&[
        "site",
        "create",
        "x",
        "--provider",
        "provider-es",
        "--country",
        "ES",
        "--city",
        "x",
        "--lat",
        "1",
        "--lon",
        "1",
        "--label",
        "norack",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be KEY=VALUE"));

    let before = snapshot(&c);

    // Authentication.
    assert_error(
        c.api_raw("GET", "/api/v1/vms", None, None),
        401,
        "missing bearer token",
    );
    assert_error(
        c.api_raw("GET", "/api/v1/vms", None, Some("v8a_wrong")),
        401,
        "invalid token",
    );
    let join = c.ok(
        "POST",
        "/api/v1/join-tokens",
        Some(json!({"site": "es-logrono"})),
    );
    assert_error(
        c.api_raw("GET", "/api/v1/vms", None, join["token"].as_str()),
        403,
        "join token cannot",
    );

    // Malformed and unknown.
    let tok = Some(c.token.as_str());
    assert_error(
        c.api_raw("POST", "/api/v1/vms", Some("{\"name\": ".into()), tok),
        400,
        "EOF",
    );
    assert_error(
        c.api(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": "a", "image": "tiny", "vcpu": 2})),
        ),
        400,
        "unknown field `vcpu`",
    );
    assert_error(
        c.api(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": "a", "image": "tiny", "vcpus": -1})),
        ),
        400,
        "vcpus",
    );
    assert_error(
        c.api(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": "a", "image": "tiny", "memory_mib": 1u64 << 40})),
        ),
        400,
        "memory_mib",
    );
    assert_error(
        c.api(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": "a", "image": "tiny", "disk_gib": 0})),
        ),
        400,
        "disk_gib",
    );
    assert_error(
        c.api(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": "a", "image": "debian-13"})),
        ),
        400,
        "image 'debian-13' not found",
    );
    assert_error(
        c.api(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": "Bad Name", "image": "tiny"})),
        ),
        400,
        "invalid vm name",
    );
    assert_error(
        c.api(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": "a", "image": "tiny", "placement": {"country": "XX"}})),
        ),
        400,
        "unknown country code \"XX\"",
    );
    assert_error(
        c.api(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": "a", "image": "tiny", "placement": {"site": "nowhere"}})),
        ),
        400,
        "site 'nowhere' not found",
    );
    assert_error(
        c.api(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": "a", "image": "tiny", "placement": {"countries": ["PL", "QQ"]}})),
        ),
        400,
        "unknown country code \"QQ\"",
    );
    assert_error(
        c.api(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": "a", "image": "tiny",
                        "placement": {"max_latency": {"from": "Gdańsk", "max_rtt_ms": -1}}})),
        ),
        400,
        "max_rtt_ms must be a positive number",
    );
    assert_error(
        c.api(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": "a", "image": "tiny",
                        "placement": {"countries": ["PL"], "deny_countries": ["PL"]}})),
        ),
        400,
        "both allowed and denied",
    );
    assert_error(
        c.api(
            "POST",
            "/api/v1/vms/plan",
            Some(json!({"name": "a", "image": "tiny", "placement": {"tier": "orbit"}})),
        ),
        400,
        "unknown variant `orbit`",
    );
    assert_error(
        c.api(
            "POST",
            "/api/v1/providers",
            Some(json!({"name": "provider-es", "country": "ES"})),
        ),
        409,
        "already exists",
    );
    assert_error(
        c.api(
            "POST",
            "/api/v1/sites",
            Some(
                json!({"name": "s", "provider": "provider-es", "country": "ES",
                        "city": "x", "latitude": 123.0, "longitude": 0.0}),
            ),
        ),
        400,
        "latitude",
    );
    assert_error(
        c.api(
            "POST",
            "/api/v1/sites",
            Some(json!({"name": "s", "provider": "ghost", "country": "ES",
                        "city": "x", "latitude": 1.0, "longitude": 0.0})),
        ),
        400,
        "provider 'ghost' not found",
    );
    assert_error(c.api("GET", "/api/v1/vms?limit=0", None), 400, "limit");
    assert_error(c.api("GET", "/api/v1/vms/nope", None), 404, "not found");
    assert_error(
        c.api("DELETE", "/api/v1/providers/provider-es", None),
        409,
        "still has 2 site",
    );
    assert_error(
        c.api(
            "POST",
            "/api/v1/join-tokens",
            Some(json!({"site": "es-logrono", "ttl_s": 0})),
        ),
        400,
        "ttl_s",
    );

    // An upload that is not a disk image.
    let junk = c.dir.path().join("junk.txt");
    std::fs::write(&junk, "this is not a disk image\n").unwrap();
    let out = c.cli(&["image", "import", junk.to_str().unwrap(), "--name", "junk"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line: {err}");
    assert!(errors[0].contains("not a disk image"), "{err}");

    // The CLI: one line, non-zero exit.
    let out = c.cli(&["vm", "show", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim(), "error: VM 'nope' not found");
    let out = c.cli(&["vm", "create", "x", "--image", "tiny", "--vcpus", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("vcpus 0 is outside"));

    // Nothing changed.
    assert_eq!(snapshot(&c), before);
}
