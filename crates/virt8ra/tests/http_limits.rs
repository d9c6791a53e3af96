//! The HTTP boundary under abuse (issue 25): staged disks are read only by
//! the host they are for; connections that never finish a request head are
//! closed after `--header-timeout` while requests, streams and WebSocket
//! channels go on; `--max-connections` refuses what is past it without
//! taking the server down; and every refusal (405, 413, 415, a bad cursor)
//! has the JSON error body. The real control plane (and simulated agents),
//! raw TCP where a well-behaved client would not do.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{assert_error, wait_until, Cluster, TOPOLOGY};
use serde_json::{json, Value};

/// Restarts the cluster's control plane with `args`.
fn restart_with(c: &mut Cluster, args: &[&str]) {
    c.kill_server();
    c.server_args = args.iter().map(|s| s.to_string()).collect();
    c.start_server();
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A request with any body and content type (None: no Content-Type).
fn send(
    c: &Cluster,
    method: &str,
    path: &str,
    token: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (u16, Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut rb = client()
        .request(m, format!("{}{path}", c.url))
        .bearer_auth(token)
        .body(body);
    if let Some(ct) = content_type {
        rb = rb.header("content-type", ct);
    }
    let resp = rb.send().unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn qcow2(c: &Cluster, name: &str) -> Vec<u8> {
    let img = c.dir.path().join(name);
    assert!(std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M")
        .status()
        .unwrap()
        .success());
    std::fs::read(img).unwrap()
}

fn host_token(c: &Cluster, agent: &str) -> String {
    let creds: Value = serde_json::from_slice(
        &std::fs::read(c.agent_dir(agent).join("credentials.json")).unwrap(),
    )
    .unwrap();
    creds["host_token"].as_str().unwrap().to_string()
}

fn images(c: &Cluster) -> usize {
    c.ok("GET", "/api/v1/images", None)["items"]
        .as_array()
        .unwrap()
        .len()
}

#[test]
fn every_refusal_has_the_json_error_and_its_own_status() {
    let c = Cluster::start();
    let t = c.token.clone();

    // 405, with the Allow header, under /api/v1 and outside it.
    let resp = client()
        .delete(format!("{}/api/v1/vms", c.url))
        .bearer_auth(&t)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    let allow = resp.headers()["allow"].to_str().unwrap().to_string();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    let body: Value = resp.json().unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
    let r = send(&c, "PUT", "/healthz", &t, None, vec![]);
    assert_error(r.clone(), 405, "/healthz does not take PUT");
    assert_eq!(r.1["error"]["code"], "method_not_allowed");

    // 413: a JSON body over the 1 MiB limit.
    let big = json!({"name": "p", "country": "ES", "pad": "x".repeat(2 << 20)}).to_string();
    let r = send(
        &c,
        "POST",
        "/api/v1/providers",
        &t,
        Some("application/json"),
        big.into_bytes(),
    );
    assert_error(r.clone(), 413, "larger than the 1024 KiB");
    assert_eq!(r.1["error"]["code"], "payload_too_large");

    // 415: JSON endpoints want JSON.
    let ok_body = json!({"name": "p", "country": "ES"})
        .to_string()
        .into_bytes();
    for ct in [Some("text/plain"), None] {
        let r = send(&c, "POST", "/api/v1/providers", &t, ct, ok_body.clone());
        assert_error(r.clone(), 415, "Content-Type: application/json");
        assert_eq!(r.1["error"]["code"], "unsupported_media_type");
    }
    // 400 stays for what is wrong in the JSON itself.
    let r = send(
        &c,
        "POST",
        "/api/v1/providers",
        &t,
        Some("application/json"),
        b"{\"name\": ".to_vec(),
    );
    assert_eq!(r.0, 400, "{r:?}");
    assert_eq!(r.1["error"]["code"], "invalid_request");
    assert_eq!(c.ok("GET", "/api/v1/providers", None)["items"], json!([]));

    // 415: an image upload must be binary (curl --data-binary sends a
    // form type unless told otherwise). Nothing is stored.
    let disk = qcow2(&c, "tiny.qcow2");
    for ct in ["application/json", "application/x-www-form-urlencoded"] {
        let r = send(
            &c,
            "POST",
            "/api/v1/images?name=tiny",
            &t,
            Some(ct),
            disk.clone(),
        );
        assert_error(r.clone(), 415, "application/octet-stream");
        assert_eq!(r.1["error"]["code"], "unsupported_media_type");
    }
    assert_eq!(images(&c), 0, "a refused upload stored an image");
    // Binary, or no type at all (taken as binary), is accepted.
    let r = send(
        &c,
        "POST",
        "/api/v1/images?name=tiny",
        &t,
        Some("application/octet-stream; charset=binary"),
        disk.clone(),
    );
    assert_eq!(r.0, 201, "{r:?}");
    let r = send(&c, "POST", "/api/v1/images?name=tiny2", &t, None, disk);
    assert_eq!(r.0, 201, "{r:?}");
    assert_eq!(images(&c), 2);
}

#[test]
fn a_cursor_not_handed_out_is_refused_and_paging_goes_on() {
    let c = Cluster::start();
    let disk = qcow2(&c, "tiny.qcow2");
    let r = send(
        &c,
        "POST",
        "/api/v1/images?name=tiny",
        &c.token,
        Some("application/octet-stream"),
        disk,
    );
    assert_eq!(r.0, 201, "{r:?}");
    // No hosts: the VMs stay pending, which is enough to list them.
    for n in ["a", "b", "c"] {
        c.ok(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": n, "image": "tiny", "memory_mib": 128})),
        );
    }
    let mut names = Vec::new();
    let mut cursors = Vec::new();
    let mut path = "/api/v1/vms?limit=1".to_string();
    loop {
        let page = c.ok("GET", &path, None);
        for v in page["items"].as_array().unwrap() {
            names.push(v["name"].as_str().unwrap().to_string());
        }
        let Some(next) = page["next_cursor"].as_str() else {
            break;
        };
        cursors.push(next.to_string());
        path = format!("/api/v1/vms?limit=1&cursor={next}");
    }
    names.sort();
    assert_eq!(names, ["a", "b", "c"]);

    let first = cursors[0].clone();
    for bad in [
        "garbage".to_string(),
        first.to_uppercase(),
        first.replace('-', ""),
        format!("{first}x"),
        String::new(),
    ] {
        assert_error(
            c.api("GET", &format!("/api/v1/vms?cursor={bad}"), None),
            400,
            "is not one this server handed out",
        );
    }
    // A page's last VM deleted before the next page is asked for: paging
    // goes on from its place.
    let last_of_first = c.ok("GET", "/api/v1/vms?limit=1", None)["items"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    c.ok("DELETE", &format!("/api/v1/vms/{last_of_first}"), None);
    let page = c.ok("GET", &format!("/api/v1/vms?limit=5&cursor={first}"), None);
    assert_eq!(page["items"].as_array().unwrap().len(), 2, "{page}");
}

/// Resident memory (KiB) and open file descriptors of a process.
fn rss_and_fds(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (rss, fds)
}

/// Whether the server has closed `s` (EOF or reset), without blocking.
fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

fn connected_count(c: &Cluster, agent: &str) -> usize {
    std::fs::read_to_string(c.dir.path().join(format!("agent-{agent}.log")))
        .unwrap_or_default()
        .matches("connected to the control plane")
        .count()
}

#[test]
fn half_open_connections_are_closed_after_the_header_timeout() {
    const N: usize = 2000;
    const TIMEOUT: f64 = 5.0;
    let mut c = Cluster::start();
    restart_with(&mut c, &["--header-timeout", "5"]);
    c.create_topology();
    c.start_agent_with("sim-0", Some(TOPOLOGY[0].2), &["--driver", "sim"]);
    c.wait_hosts_ready(1);
    let pid = c.server.as_ref().unwrap().child.id();

    // A watch stream that sends nothing for longer than the timeout (its
    // keep-alive comes every 15 s): a request being served is never cut.
    let mut watch = TcpStream::connect(("127.0.0.1", c.port)).unwrap();
    write!(
        watch,
        "GET /api/v1/watch?name=nothing-here HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        c.token
    )
    .unwrap();
    let mut head = [0u8; 12];
    watch.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    watch.set_nonblocking(true).unwrap();

    let before = rss_and_fds(pid);
    let start = Instant::now();
    // Each with the time it was opened.
    let mut conns: Vec<(Instant, TcpStream, Option<Duration>)> = (0..N)
        .map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", c.port)).unwrap();
            // Half a request head; one in ten sends nothing at all.
            if i % 10 != 0 {
                s.write_all(b"GET /api/v1/vms HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    .unwrap();
            }
            s.set_nonblocking(true).unwrap();
            (Instant::now(), s, None)
        })
        .collect();
    let opened = start.elapsed();
    // Requests are served while they are open.
    let t = Instant::now();
    assert_eq!(c.ok("GET", "/healthz", None)["status"], "ok");
    let served = t.elapsed();
    let during = rss_and_fds(pid);
    // Poll every connection until each is closed, noting how old it was.
    wait_until(
        "the half-open connections to be closed",
        Duration::from_secs(30),
        || {
            for (at, s, seen) in conns.iter_mut() {
                if seen.is_none() && closed(s) {
                    *seen = Some(at.elapsed());
                }
            }
            conns.iter().all(|c| c.2.is_some()).then_some(())
        },
    );
    let ages: Vec<f64> = conns.iter().map(|c| c.2.unwrap().as_secs_f64()).collect();
    let min = ages.iter().cloned().fold(f64::MAX, f64::min);
    let max = ages.iter().cloned().fold(0.0, f64::max);
    drop(conns);
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_and_fds(pid);
    eprintln!(
        "{N} half-open connections (opened in {:.1} s; /healthz answered in {} ms meanwhile): \
         RSS {} -> {} -> {} KiB, fds {} -> {} -> {}; each closed {min:.1}..{max:.1} s after it opened",
        opened.as_secs_f64(),
        served.as_millis(),
        before.0,
        during.0,
        after.0,
        before.1,
        during.1,
        after.1,
    );
    assert!(
        min >= TIMEOUT - 0.5,
        "a connection closed {min:.1} s after it opened"
    );
    assert!(max < TIMEOUT + 10.0, "a connection stayed {max:.1} s");
    assert!(served < Duration::from_secs(2), "{served:?}");
    assert!(
        after.1 <= before.1 + 5,
        "descriptors kept: {before:?} {after:?}"
    );

    // The agent's WebSocket channel outlived the timeout several times
    // over, on its first connection; the silent stream is still open.
    assert_eq!(connected_count(&c, "sim-0"), 1, "the agent reconnected");
    assert_eq!(c.ok("GET", "/api/v1/hosts/sim-0", None)["connected"], true);
    assert!(!closed(&mut watch), "the watch stream was cut");
    drop(watch);

    // An idle keep-alive connection is closed once the timeout passed.
    let mut s = TcpStream::connect(("127.0.0.1", c.port)).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let t = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    assert!(
        t.elapsed() >= Duration::from_secs_f64(TIMEOUT - 0.5)
            && t.elapsed() < Duration::from_secs(8),
        "idle connection closed after {:?}",
        t.elapsed()
    );
}

#[test]
fn connections_past_the_cap_are_refused_and_the_server_stays_up() {
    const CAP: usize = 40;
    let mut c = Cluster::start();
    restart_with(
        &mut c,
        &["--max-connections", "40", "--header-timeout", "60"],
    );
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..CAP + 20 {
        let mut s = TcpStream::connect(("127.0.0.1", c.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        if buf.is_empty() {
            held.push(s);
            continue;
        }
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
        assert!(text.contains("--max-connections"), "{text}");
        refused += 1;
    }
    // The test's own pooled connection may hold a slot too.
    assert!(held.len() <= CAP && held.len() >= CAP - 2, "{}", held.len());
    assert!(refused >= 18, "{refused} refused");
    // The server is up and serves again as soon as slots are free.
    drop(held);
    wait_until("a request to be served", Duration::from_secs(5), || {
        client()
            .get(format!("{}/healthz", c.url))
            .send()
            .ok()
            .filter(|r| r.status().is_success())
    });
    assert!(c
        .server
        .as_mut()
        .unwrap()
        .child
        .try_wait()
        .unwrap()
        .is_none());
}

/// Staged disks: the host a cold migration's disk is for reads it, and no
/// other host does; an export's disk is read by the admin only; uploads
/// come from the host that stages them, as binary.
#[test]
fn staged_disks_are_read_only_by_the_host_they_are_for() {
    let mut c = Cluster::start();
    c.create_topology();
    let sim = ["--driver", "sim"];
    c.start_agent_with("sim-es", Some(TOPOLOGY[0].2), &sim);
    // The target exits right after downloading the disk, so the migration
    // waits in preparing_target with its disk staged.
    c.start_agent_env(
        "sim-de",
        Some(TOPOLOGY[1].2),
        &sim,
        &[("VIRT8RA_AGENT_FAIL_AT", "agent-cold-downloaded")],
    );
    // This host exits after staging an export, before uploading it.
    c.start_agent_env(
        "sim-pl",
        Some(TOPOLOGY[2].2),
        &sim,
        &[("VIRT8RA_AGENT_FAIL_AT", "agent-staged")],
    );
    c.wait_hosts_ready(3);
    let (es, de, pl) = (
        host_token(&c, "sim-es"),
        host_token(&c, "sim-de"),
        host_token(&c, "sim-pl"),
    );
    let disk = qcow2(&c, "tiny.qcow2");
    let r = send(
        &c,
        "POST",
        "/api/v1/images?name=tiny",
        &c.token,
        Some("application/octet-stream"),
        disk,
    );
    assert_eq!(r.0, 201, "{r:?}");
    // "mover" may live in ES or DE and starts in ES (DE is in maintenance
    // meanwhile); "kept" lives in PL.
    let state = |h: &str, s: &str| {
        c.ok(
            "PATCH",
            &format!("/api/v1/hosts/{h}"),
            Some(json!({"state": s})),
        );
    };
    state("sim-de", "maintenance");
    for (name, countries) in [("mover", json!(["ES", "DE"])), ("kept", json!(["PL"]))] {
        c.ok(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": name, "image": "tiny", "memory_mib": 128,
                        "placement": {"countries": countries}})),
        );
        c.wait_phase(name, "running", Duration::from_secs(60));
    }
    state("sim-de", "ready");

    // A cold migration ES -> DE, held in preparing_target.
    let m = c.ok(
        "POST",
        "/api/v1/vms/mover/migrate",
        Some(json!({"to_host": "sim-de", "mode": "cold"})),
    );
    let id = m["id"].as_str().unwrap().to_string();
    wait_until(
        "the target to have fetched the disk",
        Duration::from_secs(60),
        || {
            // It exits (at its injected failure) once it has the disk.
            let m = c.ok("GET", &format!("/api/v1/migrations/{id}"), None);
            (m["phase"] == "preparing_target"
                && c.ok("GET", "/api/v1/hosts/sim-de", None)["connected"] == false)
                .then_some(())
        },
    );
    let staging = format!("/api/v1/staging/{id}");
    let status = format!("{staging}/status");
    // The target reads it, and so does the admin.
    for tok in [&de, &c.token] {
        let r = client()
            .get(format!("{}{staging}", c.url))
            .bearer_auth(tok)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(!r.bytes().unwrap().is_empty());
        assert_eq!(send(&c, "GET", &status, tok, None, vec![]).0, 200);
    }
    // Any other host, the source included, gets 403 for the disk, its
    // data disks' keys and its status.
    for tok in [&es, &pl] {
        for path in [&staging, &format!("{staging}.0"), &status] {
            assert_error(
                send(&c, "GET", path, tok, None, vec![]),
                403,
                "not for this host",
            );
        }
    }

    // An export of a stopped VM on PL: its host staged the disk and exited
    // before uploading it.
    c.ok(
        "POST",
        "/api/v1/vms/kept/actions",
        Some(json!({"action": "stop"})),
    );
    c.wait_phase("kept", "stopped", Duration::from_secs(60));
    let e = c.ok("POST", "/api/v1/vms/kept/export", None);
    let eid = e["id"].as_str().unwrap().to_string();
    wait_until("the export host to exit", Duration::from_secs(60), || {
        (c.ok("GET", "/api/v1/hosts/sim-pl", None)["connected"] == false).then_some(())
    });
    let up = format!("/api/v1/staging/{eid}?offset=0");
    // Only the VM's host uploads, and only binary.
    assert_error(
        send(&c, "PUT", &up, &es, None, b"abc".to_vec()),
        403,
        "no upload",
    );
    assert_error(
        send(&c, "PUT", &up, &pl, Some("text/plain"), b"abc".to_vec()),
        415,
        "application/octet-stream",
    );
    assert_eq!(
        send(&c, "PUT", &up, &pl, None, b"abc".to_vec()),
        (200, json!({"bytes": 3}))
    );
    let up = format!("/api/v1/staging/{eid}?offset=3");
    assert_eq!(
        send(
            &c,
            "PUT",
            &up,
            &pl,
            Some("application/octet-stream"),
            b"def".to_vec()
        ),
        (200, json!({"bytes": 6}))
    );
    let est = format!("/api/v1/staging/{eid}/status");
    assert_eq!(
        send(&c, "GET", &est, &pl, None, vec![]),
        (200, json!({"bytes": 6}))
    );
    assert_error(
        send(&c, "GET", &est, &es, None, vec![]),
        403,
        "not for this host",
    );
    // No host reads an export; the admin does.
    for tok in [&pl, &es, &de] {
        assert_error(
            send(
                &c,
                "GET",
                &format!("/api/v1/staging/{eid}"),
                tok,
                None,
                vec![],
            ),
            403,
            "not for this host",
        );
    }
    let r = client()
        .get(format!("{}/api/v1/staging/{eid}", c.url))
        .bearer_auth(&c.token)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(&r.bytes().unwrap()[..], b"abcdef");
}

/// SIGTERM: no new connections; an idle connection is closed and a
/// request that never ends (a watch stream) is cut after the grace
/// period, so the server exits cleanly instead of running on.
#[test]
fn sigterm_stops_the_server_despite_an_endless_stream() {
    let mut c = Cluster::start();
    let mut watch = TcpStream::connect(("127.0.0.1", c.port)).unwrap();
    write!(
        watch,
        "GET /api/v1/watch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        c.token
    )
    .unwrap();
    let mut head = [0u8; 12];
    watch.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let _idle = TcpStream::connect(("127.0.0.1", c.port)).unwrap();
    let server = c.server.as_mut().unwrap();
    let t = Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = wait_until("the server to exit", Duration::from_secs(30), || {
        server.child.try_wait().unwrap()
    });
    assert!(status.success(), "{status}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "exit took {:?}",
        t.elapsed()
    );
    assert!(TcpStream::connect(("127.0.0.1", c.port)).is_err());
}

#[test]
fn limits_out_of_range_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    for (args, want) in [
        (
            ["--header-timeout", "0"],
            "--header-timeout 0 is outside 0.1..3600",
        ),
        (
            ["--header-timeout", "nan"],
            "--header-timeout NaN is outside",
        ),
        (
            ["--max-connections", "0"],
            "--max-connections must be at least 1",
        ),
    ] {
        let out = std::process::Command::new(common::bin())
            .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("s"))
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!dir.path().join("s").exists(), "{args:?} created its data");
    }
}

/// Over TLS the same limit applies twice: to the handshake, and then to
/// the request head inside the encrypted connection.
#[test]
fn tls_handshakes_and_heads_have_the_header_timeout() {
    const TIMEOUT: f64 = 2.0;
    let c = Cluster::start_tls(&["--header-timeout", "2"]);
    let ca = &c.tls.as_ref().unwrap().ca;
    let trust = virt8ra_tls::Trust::new(Some(ca), "test").unwrap();
    // How long the server takes to close a connection `start` made.
    let time_to_close = |mut read: Box<dyn FnMut() -> bool>| {
        let t = Instant::now();
        while !read() {
            assert!(t.elapsed() < Duration::from_secs(20), "never closed");
        }
        t.elapsed().as_secs_f64()
    };

    // Nothing sent: no handshake.
    let mut raw = TcpStream::connect(("127.0.0.1", c.port)).unwrap();
    raw.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let waited = time_to_close(Box::new(move || {
        let mut b = [0u8; 64];
        match raw.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        }
    }));
    assert!(
        (TIMEOUT - 0.5..TIMEOUT + 5.0).contains(&waited),
        "a silent TLS client was closed after {waited:.1} s"
    );

    // A handshake, then half a request head.
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(trust.client_config(), name).unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", c.port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    tls.flush().unwrap();
    let waited = time_to_close(Box::new(move || {
        let mut b = [0u8; 64];
        match tls.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        }
    }));
    assert!(
        (TIMEOUT - 0.5..TIMEOUT + 5.0).contains(&waited),
        "a half request head over TLS was closed after {waited:.1} s"
    );
    // Meanwhile and after, HTTPS is served.
    assert_eq!(c.ok("GET", "/healthz", None)["status"], "ok");
}
