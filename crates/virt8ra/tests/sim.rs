//! The simulated driver end to end: the real control plane and real agents
//! (separate processes, real WebSocket channels) whose VMs exist only in
//! memory. A small run of what the scale benchmark does at size.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{assert_error, wait_until, Cluster, TOPOLOGY};
use serde_json::json;

#[test]
fn simulated_agents_run_many_vms_through_the_real_control_plane() {
    let mut c = Cluster::start();
    c.create_topology();
    for (i, (_, _, site, ..)) in TOPOLOGY.iter().enumerate() {
        c.start_agent_with(&format!("sim-{i}"), Some(site), &["--driver", "sim"]);
    }
    c.wait_hosts_ready(3);
    for h in c.ok("GET", "/api/v1/hosts", None)["items"]
        .as_array()
        .unwrap()
    {
        assert_eq!(h["inventory"]["qemu_version"], "simulated");
    }
    c.import_tiny_image();

    // Label selectors: no site carries rack=a, so every host is excluded by
    // that rule.
    let spec = json!({"name": "x", "image": "tiny", "memory_mib": 128,
                      "placement": {"labels": {"rack": "a"}}});
    let plan = c.ok("POST", "/api/v1/vms/plan", Some(spec.clone()));
    assert_eq!(plan["placed"], false);
    assert_eq!(plan["excluded"], json!({"labels": 3}), "{plan}");

    // A watcher sees a VM go from created to running, without polling.
    let watch = {
        let (url, token) = (c.url.clone(), c.token.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            use std::io::BufRead;
            let resp = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap()
                .get(format!("{url}/api/v1/watch?name=s0"))
                .bearer_auth(token)
                .send()
                .unwrap();
            assert_eq!(resp.status().as_u16(), 200);
            ready_tx.send(()).unwrap();
            let mut phases = Vec::new();
            for line in std::io::BufReader::new(resp).lines() {
                let line = line.unwrap();
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let ev: serde_json::Value = serde_json::from_str(data.trim()).unwrap();
                assert_eq!(ev["type"], "vm");
                assert_eq!(ev["vm"]["name"], "s0", "the filter lets other VMs through");
                let phase = ev["vm"]["status"]["phase"].as_str().unwrap().to_string();
                phases.push(phase.clone());
                if phase == "running" {
                    break;
                }
            }
            phases
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        h
    };

    // 30 VMs of 128 MiB: 3 hosts × 2048 MiB hold them all.
    for i in 0..30 {
        c.ok(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": format!("s{i}"), "image": "tiny", "memory_mib": 128})),
        );
    }
    wait_until("30 running VMs", Duration::from_secs(60), || {
        let v = c.ok("GET", "/api/v1/vms?phase=running", None);
        (v["items"].as_array().unwrap().len() == 30).then_some(())
    });
    let phases = watch.join().unwrap();
    // A VM that fits is placed by its create call: it is first seen
    // scheduled (created and placed in one durable write), never pending.
    assert_eq!(
        phases.first().map(String::as_str),
        Some("scheduled"),
        "{phases:?}"
    );
    assert!(!phases.contains(&"pending".to_string()), "{phases:?}");
    assert_eq!(
        phases.last().map(String::as_str),
        Some("running"),
        "{phases:?}"
    );

    // Every host got some (spread by the default policy's balance and pack rules
    // or not) and the control plane's accounting matches what was created.
    let hosts = c.ok("GET", "/api/v1/hosts", None);
    let placed: u64 = hosts["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["allocated"]["vms"].as_u64().unwrap())
        .sum();
    assert_eq!(placed, 30);
    // The agents' view: the simulated console says the VM booted.
    let con = c.ok("GET", "/api/v1/vms/s7/console", None);
    assert!(con["data"]
        .as_str()
        .unwrap()
        .contains("VIRT8RA-SIM-BOOTED name=s7"));
    // Filters and cursor pagination over the list.
    let page = c.ok("GET", "/api/v1/vms?limit=7", None);
    assert_eq!(page["items"].as_array().unwrap().len(), 7);
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let rest = c.ok(
        "GET",
        &format!("/api/v1/vms?limit=1000&cursor={cursor}"),
        None,
    );
    assert_eq!(rest["items"].as_array().unwrap().len(), 23);
    assert!(rest["next_cursor"].is_null());
    let pl = c.ok("GET", "/api/v1/vms?country=PL", None);
    for v in pl["items"].as_array().unwrap() {
        assert_eq!(v["status"]["country"], "PL");
    }

    // A migration moves the VM's allocation from its host to the target, and
    // the target's reservation goes with the migration's end. (That this
    // happens in place rather than by a rebuild is not visible from here.)
    let alloc = |c: &Cluster| -> std::collections::HashMap<String, u64> {
        c.ok("GET", "/api/v1/hosts", None)["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                let n = h["allocated"]["memory_mib"].as_u64().unwrap();
                (h["name"].as_str().unwrap().to_string(), n)
            })
            .collect()
    };
    let before = alloc(&c);
    let src = c.vm("s3")["status"]["host"].as_str().unwrap().to_string();
    let dst = before.keys().find(|h| **h != src).unwrap().clone();
    let out = c.cli_ok(&[
        "vm",
        "migrate",
        "s3",
        "--to-host",
        &dst,
        "--wait",
        "-o",
        "json",
    ]);
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(m["phase"], "completed", "{m}");
    assert_eq!(c.vm("s3")["status"]["host"], dst.as_str());
    let after = alloc(&c);
    assert_eq!(after[&src], before[&src] - 128, "{before:?} -> {after:?}");
    assert_eq!(after[&dst], before[&dst] + 128, "{before:?} -> {after:?}");
    assert_eq!(
        after.values().sum::<u64>(),
        before.values().sum::<u64>(),
        "the target's reservation was not freed: {before:?} -> {after:?}"
    );

    // Stop, then delete everything.
    c.cli_ok(&["vm", "stop", "s0", "--wait"]);
    for i in 0..30 {
        c.ok("DELETE", &format!("/api/v1/vms/s{i}"), None);
    }
    wait_until("all deleted", Duration::from_secs(60), || {
        let v = c.ok("GET", "/api/v1/vms", None);
        v["items"].as_array().unwrap().is_empty().then_some(())
    });
    assert!(
        c.qemu_pids().is_empty(),
        "the simulated driver started a QEMU"
    );
}

/// `virt8ra bench scale` at a tiny size: many simulated hosts in one process,
/// five to a connection (the mux protocol extension: each host's own
/// session, authenticated by its own token, on a shared WebSocket), VMs
/// through the API with stop/start/delete, migrations (cold, through the
/// control plane's staging) and list reads, and the contract's figures; the
/// agents' view matches the control plane's.
#[test]
fn the_scale_benchmark_runs_and_reports_its_contract() {
    let out = std::process::Command::new(common::bin())
        .args([
            "bench",
            "scale",
            "--hosts",
            "12",
            "--vms",
            "60",
            "--hosts-per-connection",
            "5",
            "--migrations",
            "10",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in [
        "hosts_connected",
        "missed_heartbeat_ratio",
        "vms",
        "create_per_s",
        "create_p99_ms",
        "get_p99_ms",
        "list_page_p99_ms",
        "server_rss_bytes",
        "mismatches",
    ] {
        assert!(r.get(k).is_some(), "missing {k} in {r}");
    }
    assert_eq!(r["hosts_connected"], 12);
    assert_eq!(
        r["agent_connections"], 3,
        "12 hosts, 5 to a connection: {r}"
    );
    assert_eq!(r["vms_running"], 60);
    assert_eq!(r["mismatches"], 0);
    // 60 VMs are one page: the reads follow the cursor until it ends.
    assert_eq!(r["list_pages"], 1, "{r}");
    // The lifecycle load stopped and started every VM and deleted half.
    assert_eq!(r["ops"], 150, "{r}");
    assert_eq!(r["deleted"], 30, "{r}");
    assert_eq!(r["delete_mismatches"], 0, "{r}");
    assert_eq!(
        r["sampled"], 30,
        "the deleted VMs are no longer listed: {r}"
    );
    // Ten VMs that were not deleted moved to other hosts: each runs on the
    // host the control plane names, not on its source.
    assert_eq!(r["migrations"], 10, "{r}");
    assert_eq!(r["migrations_completed"], 10, "{r}");
    assert_eq!(r["migrations_failed"], 0, "{r}");
    assert_eq!(r["migration_mismatches"], 0, "{r}");
    assert!(r["migration_p99_ms"].as_f64().unwrap() > 0.0, "{r}");
    let rss = |k: &str| r[k].as_u64().unwrap();
    assert!(rss("server_rss_bytes") > 1 << 20, "{r}");
    assert!(rss("server_rss_after_create_bytes") > 1 << 20, "{r}");
    // The high-water mark is the most the control plane held.
    assert!(
        rss("server_peak_rss_bytes")
            >= rss("server_rss_bytes").max(rss("server_rss_after_create_bytes")),
        "{r}"
    );
}

/// Interrupted, `bench scale` stops the control plane it started and removes
/// its scratch directories (left behind, the simulated hosts' directories
/// fill a tmpfs's inodes after a few large runs).
#[test]
fn an_interrupted_scale_benchmark_leaves_nothing_behind() {
    use std::io::BufRead;
    /// Stops the benchmark if the test fails before it has: SIGTERM, so
    /// that it stops its control plane too, then SIGKILL if it lingers.
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            if !matches!(self.0.try_wait(), Ok(None)) {
                return;
            }
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .status();
            for _ in 0..100 {
                if !matches!(self.0.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Stop(
        std::process::Command::new(common::bin())
            .args(["bench", "scale", "--hosts", "6", "--vms", "100000"])
            .args(["--create-rate", "5", "--hosts-per-connection", "3"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = std::io::BufReader::new(child.0.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let (mut url, mut dirs) = (String::new(), Vec::new());
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("bench scale: control plane at ") {
            let (u, d) = rest.split_once(", scratch directories ").unwrap();
            url = u.to_string();
            dirs = d.split(" and ").map(std::path::PathBuf::from).collect();
        }
        let creating = line.contains("creating 100000 VMs");
        seen.push(line);
        if creating {
            break;
        }
    }
    assert_eq!(dirs.len(), 2, "{seen:?}");
    assert!(dirs.iter().all(|d| d.is_dir()), "{dirs:?}");
    let addr = url.trim_start_matches("http://").to_string();
    assert!(std::net::TcpStream::connect(&addr).is_ok(), "{addr}");
    let st = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.0.wait().unwrap();
    assert!(!status.success(), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("interrupted (SIGTERM)")),
        "{rest:?}"
    );
    for d in &dirs {
        assert!(!d.exists(), "{} is left behind", d.display());
    }
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "the control plane at {addr} still answers"
    );
}

/// The mux extension against the real control plane: two hosts' sessions on
/// one connection, each welcomed as itself; a channel with a credential that
/// is not a host's is closed, and the others carry on.
#[test]
fn hosts_share_one_connection_and_each_needs_its_own_credential() {
    use virt8ra_agent::simhost::Mux;
    use virt8ra_api::protocol::{
        AgentMessage, ServerMessage, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
    };

    let c = Cluster::start();
    c.create_topology();
    let jt = c.ok(
        "POST",
        "/api/v1/join-tokens",
        Some(json!({"site": TOPOLOGY[0].2, "max_uses": 2})),
    );
    let inventory = virt8ra_api::HostInventory {
        hostname: "m".into(),
        arch: "x86_64".into(),
        vcpus: 4,
        memory_mib: 4096,
        disk_gib: 100,
        cpu_model: "simulated".into(),
        cpu_flags: vec![],
        accelerators: vec![],
        hypervisor: virt8ra_api::Hypervisor::Emulation,
        agent_version: "test".into(),
        qemu_version: "simulated".into(),
        machine_types: vec![],
        migration_address: None,
        protocol: 0,
        image_service: None,
        tunnel_public_key: None,
        migration_relay: false,
    };
    let join = |name: &str| {
        let (status, v) = c.api_raw(
            "POST",
            "/api/v1/agent/join",
            Some(json!({"name": name, "inventory": inventory}).to_string()),
            Some(jt["token"].as_str().unwrap()),
        );
        assert_eq!(status, 201, "{v}");
        (
            v["host_id"].as_str().unwrap().to_string(),
            v["host_token"].as_str().unwrap().to_string(),
        )
    };
    let (id_a, tok_a) = join("mux-a");
    let (id_b, tok_b) = join("mux-b");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let mux = Mux::new(&c.url);
    let hello = AgentMessage::Hello {
        protocol: PROTOCOL_VERSION,
        min_protocol: MIN_PROTOCOL_VERSION,
        inventory: Box::new(inventory.clone()),
        networks: false,
    };
    let (a, b) = rt.block_on(async {
        let mut links = Vec::new();
        for (id, tok) in [(&id_a, &tok_a), (&id_b, &tok_b)] {
            let mut l = mux.open(tok).await.unwrap();
            (l.tx)(hello.clone()).unwrap();
            match tokio::time::timeout(Duration::from_secs(10), l.rx.recv())
                .await
                .map(|m| m.map(|b| *b))
            {
                Ok(Some(ServerMessage::Welcome { host_id, .. })) => assert_eq!(&host_id, id),
                other => panic!("expected welcome, got {other:?}"),
            }
            links.push(l);
        }
        let b = links.pop().unwrap();
        (links.pop().unwrap(), b)
    });
    assert!(!mux.fell_back(), "this control plane speaks mux");
    wait_until("both hosts connected", Duration::from_secs(10), || {
        (c.ok("GET", "/api/v1/metrics", None)["agents_connected"] == 2).then_some(())
    });

    // A credential that is not a host's: the channel is closed, on the same
    // connection, without touching the others.
    rt.block_on(async {
        let mut bad = mux.open("v8a_not-a-real-token").await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(10), bad.rx.recv()).await;
        assert!(matches!(closed, Ok(None)), "{closed:?}");
    });
    let h = c.ok("GET", &format!("/api/v1/hosts/{id_b}"), None);
    assert_eq!(h["connected"], true, "{h}");
    assert_eq!(c.ok("GET", "/api/v1/metrics", None)["agents_connected"], 2);

    // Detaching one host ends its session only.
    drop(a);
    wait_until("host a disconnected", Duration::from_secs(10), || {
        (c.ok("GET", "/api/v1/metrics", None)["agents_connected"] == 1).then_some(())
    });
    let h = c.ok("GET", &format!("/api/v1/hosts/{id_b}"), None);
    assert_eq!(h["connected"], true, "{h}");

    // Host a again, heartbeating every second, while b says nothing more:
    // b's session is closed once it has been silent for twice the liveness
    // window (3 heartbeat intervals of 1 s here), and a's, whose silence
    // timer fired meanwhile and found it recent, stays. After its first
    // beat a's are quiet (nothing changed), which the mux reader records
    // itself without the session seeing them: they must count all the same.
    let mut b = b;
    let (a, beats) = rt.block_on(async {
        let a = mux.open(&tok_a).await.unwrap();
        (a.tx)(hello.clone()).unwrap();
        let beat = a.tx.clone();
        let beats = tokio::spawn(async move {
            for seq in 1.. {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let hb = AgentMessage::Heartbeat {
                    seq,
                    usage: Default::default(),
                    vms: vec![],
                    vms_unchanged: seq > 1,
                    migrations: vec![],
                };
                if beat(hb).is_err() {
                    break;
                }
            }
        });
        loop {
            match tokio::time::timeout(Duration::from_secs(20), b.rx.recv()).await {
                Ok(None) => break,
                Ok(Some(_)) => continue,
                Err(_) => panic!("a silent host's session was not closed within 20 s"),
            }
        }
        (a, beats)
    });
    // a's session, begun before b was closed, is now older than the 6 s of
    // silence that closed b.
    let before = c.ok("GET", &format!("/api/v1/hosts/{id_a}"), None)["last_heartbeat"].clone();
    std::thread::sleep(Duration::from_secs(7));
    let h = c.ok("GET", &format!("/api/v1/hosts/{id_a}"), None);
    assert_eq!(h["connected"], true, "the heartbeating host stays: {h}");
    assert!(before.is_string(), "{before}");
    assert_ne!(
        h["last_heartbeat"], before,
        "quiet heartbeats move the host's last heartbeat on"
    );
    let h = c.ok("GET", &format!("/api/v1/hosts/{id_b}"), None);
    assert_eq!(h["connected"], false, "the silent host is gone: {h}");
    beats.abort();
    drop(a);
}

/// Host deletion counts the host's VMs in the control plane's memory (the
/// store keeps no index of VMs by host): refused while one is there, and
/// the host then takes new VMs again; done once they are gone, and the
/// host then takes none.
#[test]
fn a_host_is_deleted_only_without_vms_and_placement_follows() {
    let mut c = Cluster::start();
    c.create_topology();
    c.start_agent_with("sim-0", Some(TOPOLOGY[0].2), &["--driver", "sim"]);
    c.wait_hosts_ready(1);
    c.import_tiny_image();
    let create = |name: &str| {
        c.ok(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": name, "image": "tiny", "memory_mib": 128})),
        )
    };
    create("d0");
    c.wait_phase("d0", "running", Duration::from_secs(30));

    assert_error(
        c.api("DELETE", "/api/v1/hosts/sim-0", None),
        409,
        "still has 1 VM(s)",
    );
    assert_eq!(c.ok("GET", "/api/v1/hosts/sim-0", None)["state"], "ready");
    // Refused, the host is back in placement.
    create("d1");
    let d1 = c.wait_phase("d1", "running", Duration::from_secs(30));
    assert_eq!(d1["status"]["host"], "sim-0", "{d1}");

    for name in ["d0", "d1"] {
        c.ok("DELETE", &format!("/api/v1/vms/{name}"), None);
    }
    for name in ["d0", "d1"] {
        c.wait_phase(name, "deleted", Duration::from_secs(30));
    }
    let (status, body) = c.api("DELETE", "/api/v1/hosts/sim-0", None);
    assert_eq!(status, 204, "{body}");
    let (status, _) = c.api("GET", "/api/v1/hosts/sim-0", None);
    assert_eq!(status, 404);
    // Deleted, it takes no new VM: the VM waits for a host.
    let d2 = create("d2");
    assert_eq!(d2["status"]["phase"], "pending", "{d2}");
    assert!(d2["status"]["host"].is_null(), "{d2}");
}
