//! Migration end to end, with real QEMU guests: live and cold moves between
//! agents of two providers in two countries, residency enforced, a failure
//! injected at every step, and export/import through the open bundle.
//!
//! The guest runs a user-data script that writes 1 MiB of random data at
//! 512 MiB into its disk (once: it keeps what it finds there), and prints a
//! counter every 100 ms and the checksum of that data every 2 s, so the
//! console shows whether the guest kept running and kept its disk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{procs_under, wait_until, wait_until_explained, Cluster};
use serde_json::{json, Value};

const BOOT: Duration = Duration::from_secs(120);

/// An SSH public key for guests' context.
const OPS_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOiakisE7iP/Y3q4YCqhXcGDKYvynw8ekG2NX341waDN ops@example";

const SCRIPT: &str = r#"#!/bin/sh
sha() { echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=1048576 skip=512 count=1 2>/dev/null | sha256sum | cut -c1-16; }
magic=$(dd if=/dev/vda bs=1048576 skip=512 count=1 2>/dev/null | head -c 12)
if [ "$magic" != "VIRT8RA-DATA" ]; then
  { printf 'VIRT8RA-DATA'; head -c 1048564 /dev/urandom; } | dd of=/dev/vda bs=1048576 seek=512 count=1 iflag=fullblock conv=fsync 2>/dev/null
  sync
  echo "DATA-WRITTEN"
fi
echo "DATA-SHA $(sha)"
# A watchdog for diagnosis: requests in flight on the disk, and processes
# in uninterruptible sleep (stuck on I/O).
( while true; do
    sleep 5
    echo "WATCH inflight=$(tr -s ' ' < /sys/block/vda/inflight) dstate=$(awk '$3=="D"{printf "%s,", $2}' /proc/[0-9]*/stat 2>/dev/null) clock=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource) up=$(cut -d' ' -f1 /proc/uptime)"
    for d in /proc/[0-9]*; do
      c=$(cat $d/comm 2>/dev/null)
      case "$c" in sh|sleep|dd|sha256sum) echo "WATCHP ${d#/proc/} $c $(cut -d' ' -f3 $d/stat) $(cat $d/wchan 2>/dev/null)";; esac
    done
    dmesg | grep -i -e clocksource -e tsc -e hung | tail -n 2 | sed 's/^/WATCHK /'
  done ) &
i=0
while true; do
  i=$((i+1))
  echo "COUNT $i"
  [ $((i % 20)) = 0 ] && { echo "SHA-BEGIN $i"; echo "DATA-SHA $(sha)"; }
  sleep 0.1
done
"#;

/// Two providers in two countries, an agent at each that takes live
/// migrations on loopback, the test image imported.
fn cluster() -> Cluster {
    cluster_with(&["--migration-address", "127.0.0.1"])
}

/// The same with the agents started with `agent_args`.
fn cluster_with(agent_args: &[&str]) -> Cluster {
    let image = common::test_image();
    let mut c = Cluster::start();
    c.create_topology();
    for (name, site) in [("host-es", "es-logrono"), ("host-de", "de-frankfurt")] {
        c.start_agent_with(name, Some(site), agent_args);
    }
    c.wait_hosts_ready(2);
    c.cli_ok(&["image", "import", image.to_str().unwrap(), "--name", "test"]);
    c
}

/// Creates a VM that may live in `countries`, placed on `host` (the other
/// host is in maintenance meanwhile, so nothing pins the VM to its site).
fn create_vm(c: &Cluster, name: &str, countries: &[&str], host: &str) {
    create_vm_with(c, name, countries, host, json!({}));
}

/// Same, with more fields of the create request (e.g. the guest context).
fn create_vm_with(c: &Cluster, name: &str, countries: &[&str], host: &str, extra: Value) {
    let mut body = json!({"name": name, "image": "test", "memory_mib": 256, "disk_gib": 1,
                          "ports": [80], "user_data": SCRIPT,
                          "placement": {"countries": countries}});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let other = if host == "host-es" {
        "host-de"
    } else {
        "host-es"
    };
    c.cli_ok(&["host", "set-state", other, "maintenance"]);
    c.ok("POST", "/api/v1/vms", Some(body));
    wait_until("the VM to be placed", Duration::from_secs(30), || {
        (c.vm(name)["status"]["host"] == host).then_some(())
    });
    c.cli_ok(&["host", "set-state", other, "ready"]);
}

fn last_count(console: &str) -> Option<u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("COUNT "))
        .filter_map(|n| n.trim().parse().ok())
        .next_back()
}

fn first_count(console: &str) -> Option<u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("COUNT "))
        .find_map(|n| n.trim().parse().ok())
}

fn data_shas(console: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("DATA-SHA "))
        .map(|s| s.trim().to_string())
        .filter(|s| s.len() == 16)
        .collect()
}

/// Waits until the guest printed its data checksum; returns it.
fn wait_data(c: &Cluster, vm: &str) -> String {
    wait_until(&format!("{vm} to report its data"), BOOT, || {
        data_shas(&c.console(vm)).last().cloned()
    })
}

/// The guest disk's I/O status and counters on `host` (QMP query-block and
/// query-blockstats), for a failing test's message.
fn disk_stats(c: &Cluster, host: &str, vm_id: &str) -> String {
    let sock = c.agent_dir(host).join("vms").join(vm_id).join("qmp.sock");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let q = |cmd: &str| rt.block_on(virt8ra_agent::driver::qmp::execute(&sock, cmd, None));
    let block = match q("query-block") {
        Ok(v) => v
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                format!(
                    "{} io-status={} locked={} ro={}",
                    d["qdev"].as_str().or(d["device"].as_str()).unwrap_or("?"),
                    d["io-status"].as_str().unwrap_or("-"),
                    d["locked"],
                    d["inserted"]["ro"]
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        Err(e) => format!("query-block: {e}"),
    };
    let stats = match q("query-blockstats") {
        Ok(v) => v
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                let s = &d["stats"];
                format!(
                    "{} rd={} wr={} flush={} failed_rd={} invalid_rd={}",
                    d["qdev"].as_str().or(d["device"].as_str()).unwrap_or("?"),
                    s["rd_operations"],
                    s["wr_operations"],
                    s["flush_operations"],
                    s["failed_rd_operations"],
                    s["invalid_rd_operations"]
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        Err(e) => format!("query-blockstats: {e}"),
    };
    format!("{block} | {stats}")
}

/// What QEMU says about the VM's run state on `host` (QMP query-status), for
/// a failing test's message.
fn qemu_status(c: &Cluster, host: &str, vm_id: &str) -> String {
    let sock = c.agent_dir(host).join("vms").join(vm_id).join("qmp.sock");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match rt.block_on(virt8ra_agent::driver::qmp::query_status(&sock)) {
        Ok(status) => status,
        Err(e) => format!("{}: {e}", sock.display()),
    }
}

fn host_of(c: &Cluster, vm: &str) -> String {
    c.vm(vm)["status"]["host"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Exactly one QEMU runs the VM, on `host`, and nothing of it is left on
/// `other` (no process, no directory, no qemu-nbd).
fn assert_one_copy(c: &Cluster, vm_id: &str, host: &str, other: &str) {
    let here = c.agent_dir(host).join("vms").join(vm_id);
    let there = c.agent_dir(other).join("vms").join(vm_id);
    wait_until(
        &format!("one copy of {vm_id} on {host} and none on {other}"),
        Duration::from_secs(60),
        || {
            let n_here = common::qemu_pids_under(&here).len();
            let n_there = common::qemu_pids_under(&there).len();
            let nbd = procs_under(c.dir.path(), "qemu-nbd").len();
            (n_here == 1 && n_there == 0 && !there.exists() && nbd == 0).then_some(())
        },
    );
}

fn migrate_json(c: &Cluster, args: &[&str]) -> Value {
    let out = c.cli_ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn live_migration_between_providers_keeps_the_guest_and_its_disk() {
    let c = cluster();
    create_vm(&c, "counter", &["ES", "DE"], "host-es");
    c.wait_phase("counter", "running", BOOT);
    let id = c.vm("counter")["id"].as_str().unwrap().to_string();
    let sha_before = wait_data(&c, "counter");
    assert_eq!(host_of(&c, "counter"), "host-es");

    // A target that would break residency is refused, and nothing changes.
    let out = c.cli(&["vm", "migrate", "counter", "--to-country", "PL"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("country") && err.lines().count() == 1,
        "unclear refusal: {err}"
    );
    assert!(c.vm("counter")["status"]["migration"].is_null());
    let history = c.ok("GET", "/api/v1/vms/counter/migrations", None);
    assert_eq!(history.as_array().unwrap().len(), 0);

    // Live, to the other provider in the other country.
    let before = c.console("counter");
    let count_before = last_count(&before).expect("the counter runs");
    let m = migrate_json(
        &c,
        &[
            "vm",
            "migrate",
            "counter",
            "--to-site",
            "de-frankfurt",
            "--mode",
            "live",
            "--wait",
            "-o",
            "json",
        ],
    );
    assert_eq!(m["phase"], "completed", "{m}");
    assert_eq!(m["mode"], "live");
    assert_eq!(m["source"]["site"], "es-logrono");
    assert_eq!(m["source"]["provider"], "provider-es");
    assert_eq!(m["target"]["site"], "de-frankfurt");
    assert_eq!(m["target"]["provider"], "provider-de");
    let downtime = m["downtime_ms"].as_u64().unwrap();
    assert!(downtime < 5000, "downtime {downtime} ms");
    assert!(m["total_ms"].as_u64().unwrap() >= downtime);
    assert!(m["bytes"].as_u64().unwrap() > 1 << 20, "{m}");
    assert_eq!(host_of(&c, "counter"), "host-de");
    assert_eq!(c.vm("counter")["status"]["site"], "de-frankfurt");

    // The guest kept running: no boot on the target, and the counter goes
    // on from where it was.
    let after = wait_until("the counter to go on at the target", BOOT, || {
        let con = c.console("counter");
        (last_count(&con).unwrap_or(0) > count_before + 20).then_some(con)
    });
    assert!(
        !after.contains("VIRT8RA-GUEST-BOOTED"),
        "the guest rebooted: {after}"
    );
    let first = first_count(&after).unwrap();
    assert!(
        first > count_before && first < count_before + 100,
        "the counter jumped from {count_before} to {first}"
    );
    // Its disk came along: the same data, read back from the target's disk.
    let sha_after = wait_until("a data checksum at the target", BOOT, || {
        data_shas(&c.console("counter")).last().cloned()
    });
    assert_eq!(sha_after, sha_before);
    assert_one_copy(&c, &id, "host-de", "host-es");
    c.wait_phase("counter", "running", BOOT);

    // The history is the audit trail of where the data has been.
    let history = c.ok("GET", "/api/v1/vms/counter/migrations", None);
    let h = history.as_array().unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0]["target"]["country"], "DE");
    let table = c.cli_ok(&["vm", "migrations", "counter"]);
    assert!(
        table.contains("de-frankfurt") && table.contains("live"),
        "{table}"
    );

    // Leaving the German provider: its hosts go into maintenance and the VM
    // moves back under its rules (ES or DE: the Spanish host).
    let ev = migrate_json(
        &c,
        &[
            "provider",
            "evacuate",
            "provider-de",
            "--wait",
            "-o",
            "json",
        ],
    );
    let moved = ev["migrations"].as_array().unwrap();
    assert_eq!(moved.len(), 1, "{ev}");
    assert_eq!(moved[0]["phase"], "completed", "{ev}");
    assert_eq!(moved[0]["target"]["host"], "host-es");
    assert_eq!(host_of(&c, "counter"), "host-es");
    let h = c.ok("GET", "/api/v1/hosts/host-de", None);
    assert_eq!(h["state"], "maintenance");
    assert_one_copy(&c, &id, "host-es", "host-de");

    // A second VM lands on the Spanish host too; with the German host back,
    // the rebalance planner evens the load out, first as a plan, then for real.
    create_vm(&c, "second", &["ES", "DE"], "host-es");
    c.wait_phase("second", "running", BOOT);
    let args = ["rebalance", "--goal", "even-load", "--tolerance", "0.05"];
    let plan: Value =
        serde_json::from_str(&c.cli_ok(&[&args[..], &["-o", "json"]].concat())).unwrap();
    let moves = plan["moves"].as_array().unwrap();
    assert_eq!(moves.len(), 1, "{plan}");
    assert_eq!(moves[0]["to"], "host-de");
    assert!(plan["migrations"].as_array().unwrap().is_empty());
    let done = migrate_json(
        &c,
        &[&args[..], &["--execute", "--wait", "-o", "json"]].concat(),
    );
    let ms = done["migrations"].as_array().unwrap();
    assert_eq!(ms.len(), 1, "{done}");
    assert_eq!(ms[0]["phase"], "completed", "{done}");
    let hosts: Vec<String> = ["counter", "second"]
        .iter()
        .map(|v| host_of(&c, v))
        .collect();
    assert!(
        hosts.contains(&"host-es".to_string()) && hosts.contains(&"host-de".to_string()),
        "{hosts:?}"
    );
}

/// Agents without a migration address (as behind NAT): the live streams
/// are relayed through the control plane, and the guest moves without a
/// reboot and with its disk.
#[test]
fn relayed_live_migration_keeps_the_guest() {
    let c = cluster_with(&[]);
    create_vm(&c, "edge", &["ES", "DE"], "host-es");
    c.wait_phase("edge", "running", BOOT);
    let id = c.vm("edge")["id"].as_str().unwrap().to_string();
    let sha_before = wait_data(&c, "edge");

    let count_before = last_count(&c.console("edge")).expect("the counter runs");
    let m = migrate_json(
        &c,
        &[
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
        ],
    );
    assert_eq!(m["phase"], "completed", "{m}");
    assert_eq!(m["mode"], "live");
    assert_eq!(m["relay"], true, "{m}");
    let reason = m["mode_reason"].as_str().unwrap();
    assert!(
        reason.contains("relayed through the control plane"),
        "{reason}"
    );
    assert!(m["bytes"].as_u64().unwrap() > 1 << 20, "{m}");
    assert_eq!(host_of(&c, "edge"), "host-de");
    let metrics = c.ok("GET", "/api/v1/metrics", None);
    assert!(
        metrics["relay_bytes"].as_u64().unwrap() > 1 << 20,
        "{metrics}"
    );
    assert!(metrics["relay_connections"].as_u64().unwrap() >= 2);

    // The guest kept running: no boot, the counter goes on.
    let after = wait_until("the counter to go on at the target", BOOT, || {
        let con = c.console("edge");
        (last_count(&con).unwrap_or(0) > count_before + 20).then_some(con)
    });
    assert!(
        !after.contains("VIRT8RA-GUEST-BOOTED"),
        "the guest rebooted: {after}"
    );
    let first = first_count(&after).unwrap();
    assert!(
        first > count_before && first < count_before + 100,
        "the counter jumped from {count_before} to {first}"
    );
    let sha_after = wait_until("a data checksum at the target", BOOT, || {
        data_shas(&c.console("edge")).last().cloned()
    });
    assert_eq!(sha_after, sha_before);
    assert_one_copy(&c, &id, "host-de", "host-es");
    c.wait_phase("edge", "running", BOOT);

    // The control plane (the relay) restarts as the transfer begins: the
    // migration resumes or rolls back, and the guest runs exactly once.
    let mut c = c;
    c.kill_server();
    c.start_server_env(&[("VIRT8RA_FAIL_AT", "migration:transferring")]);
    c.wait_hosts_ready(2);
    let _ = c.cli(&[
        "vm",
        "migrate",
        "edge",
        "--to-host",
        "host-es",
        "--mode",
        "live",
    ]);
    wait_until("the control plane to exit", Duration::from_secs(60), || {
        c.server
            .as_mut()
            .and_then(|s| s.child.try_wait().ok().flatten())
    });
    c.kill_server();
    c.start_server();
    let m = wait_until("the migration to end", Duration::from_secs(180), || {
        let h = c.ok("GET", "/api/v1/vms/edge/migrations", None);
        let last = h.as_array().unwrap().last().cloned()?;
        let done = last["phase"] == "completed" || last["phase"] == "failed";
        (h.as_array().unwrap().len() == 2 && done).then_some(last)
    });
    let (now, other) = if m["phase"] == "completed" {
        ("host-es", "host-de")
    } else {
        ("host-de", "host-es")
    };
    assert_eq!(host_of(&c, "edge"), now, "{m}");
    assert_one_copy(&c, &id, now, other);
    c.wait_phase("edge", "running", BOOT);
    let con = wait_until("the guest to report its data", BOOT, || {
        let con = c.console("edge");
        (!data_shas(&con).is_empty() && last_count(&con).is_some()).then_some(con)
    });
    assert_eq!(data_shas(&con).last().unwrap(), &sha_before);
    eprintln!(
        "relayed migration across a control-plane restart: {}",
        m["phase"]
    );
}

#[test]
fn cold_migration_then_export_and_import_keep_the_disk() {
    let c = cluster();
    // With a guest context beyond the name: it must be the same after the
    // move and after an import (the seed is written anew on each path).
    let context = json!({
        "ssh_authorized_keys": [OPS_KEY],
        "network": {"ethernets": [{"addresses": ["10.0.2.15/24", "10.0.2.77/24"],
                                   "gateway4": "10.0.2.2"}]},
    });
    create_vm_with(&c, "cold", &["ES", "DE"], "host-es", context);
    c.wait_phase("cold", "running", BOOT);
    let context_lines = |con: &str| {
        con.contains("VIRT8RA-NET eth0 addr=10.0.2.15/24,10.0.2.77/24 gw=10.0.2.2 ")
            && con.contains("VIRT8RA-SSH port=22 keys=1 ")
    };
    wait_until("the guest to apply its context", BOOT, || {
        context_lines(&c.console("cold")).then_some(())
    });
    let id = c.vm("cold")["id"].as_str().unwrap().to_string();
    let sha_before = wait_data(&c, "cold");

    let m = migrate_json(
        &c,
        &[
            "vm",
            "migrate",
            "cold",
            "--to-host",
            "host-de",
            "--mode",
            "cold",
            "--wait",
            "-o",
            "json",
        ],
    );
    assert_eq!(m["phase"], "completed", "{m}");
    assert_eq!(m["mode"], "cold");
    assert_eq!(m["target"]["site"], "de-frankfurt");
    assert!(m["downtime_ms"].as_u64().is_some());
    c.wait_phase("cold", "running", BOOT);
    let con = wait_until("the cold-migrated guest to boot", BOOT, || {
        let con = c.console("cold");
        (!data_shas(&con).is_empty()).then_some(con)
    });
    assert!(con.contains("VIRT8RA-GUEST-BOOTED"));
    assert!(!con.contains("DATA-WRITTEN"), "the disk came empty: {con}");
    assert_eq!(data_shas(&con).last().unwrap(), &sha_before);
    assert!(context_lines(&con), "the context did not move along: {con}");
    assert_one_copy(&c, &id, "host-de", "host-es");

    // Export: refused while running, then a bundle anyone can read.
    let out = c.cli(&["vm", "export", "cold", "-o", "/tmp/never"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stop it first"));
    c.cli_ok(&["vm", "stop", "cold", "--wait"]);
    let bundle = c.dir.path().join("bundle");
    c.cli_ok(&["vm", "export", "cold", "-o", bundle.to_str().unwrap()]);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(bundle.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["format"], "virt8ra-vm-export");
    assert_eq!(manifest["vm"]["name"], "cold");
    assert_eq!(manifest["provenance"]["country"], "DE");
    assert_eq!(
        manifest["provenance"]["migrations"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let disk_sha = manifest["disks"][0]["sha256"].as_str().unwrap().to_string();
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(bundle.join("disk.qcow2"))
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert!(info.get("backing-filename").is_none(), "standalone: {info}");

    // Delete, import, boot: same disk, same data.
    c.cli_ok(&["vm", "delete", "cold", "--wait"]);
    let vm: Value = serde_json::from_str(&c.cli_ok(&[
        "vm",
        "import",
        bundle.to_str().unwrap(),
        "--wait",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(vm["name"], "cold");
    let image = c.ok(
        "GET",
        &format!("/api/v1/images/{}", vm["spec"]["image"].as_str().unwrap()),
        None,
    );
    assert_eq!(image["sha256"], disk_sha.as_str());
    let con = wait_until("the imported guest to read its data", BOOT, || {
        let con = c.console("cold");
        (!data_shas(&con).is_empty()).then_some(con)
    });
    assert!(!con.contains("DATA-WRITTEN"), "{con}");
    assert_eq!(data_shas(&con).last().unwrap(), &sha_before);
    assert_eq!(vm["spec"]["ssh_authorized_keys"], json!([OPS_KEY]));
    assert!(context_lines(&con), "the import lost the context: {con}");

    // A corrupt bundle and files in no known format are refused, clearly.
    let bad = c.dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(bundle.join("manifest.json"), bad.join("manifest.json")).unwrap();
    let mut d = std::fs::read(bundle.join("disk.qcow2")).unwrap();
    let mid = d.len() / 2;
    d[mid] ^= 0xff;
    std::fs::write(bad.join("disk.qcow2"), d).unwrap();
    refused(
        &c,
        &["vm", "import", bad.to_str().unwrap(), "--name", "bad1"],
        "corrupt",
    );
    let junk = c.dir.path().join("notes.txt");
    std::fs::write(&junk, "not a disk at all\n".repeat(100)).unwrap();
    refused(
        &c,
        &["vm", "import", junk.to_str().unwrap()],
        "unknown disk format",
    );
    let fake = c.dir.path().join("fake.qcow2");
    std::fs::write(&fake, b"QFI\xfbgarbage-after-the-magic").unwrap();
    refused(
        &c,
        &["vm", "import", fake.to_str().unwrap()],
        "not a readable disk image",
    );
    let names: Vec<String> = c.ok("GET", "/api/v1/vms", None)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        vec!["cold".to_string()],
        "a refused import created something"
    );
}

/// Restarts agent `name` with failure injection at `point`.
fn restart_failing(c: &mut Cluster, name: &str, point: &str) {
    c.kill_agent(name);
    c.start_agent_env(
        name,
        None,
        &["--migration-address", "127.0.0.1"],
        &[("VIRT8RA_AGENT_FAIL_AT", point)],
    );
    c.wait_hosts_ready(2);
}

/// Waits until agent `name` exited (at its injected failure).
fn wait_agent_exit(c: &mut Cluster, name: &str) {
    wait_until(
        &format!("agent {name} to exit"),
        Duration::from_secs(120),
        || {
            let (_, Some(p)) = c.agents.iter_mut().find(|(n, _)| n == name)? else {
                return None;
            };
            p.child.try_wait().ok().flatten()
        },
    );
}

/// Waits for the control plane to stop at fail point `point`; if it does
/// not, says why: what `vm migrate` answered, the VM's migrations, the logs.
fn wait_server_exit(c: &mut Cluster, point: &str, migrate: &std::process::Output) {
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let exited = c
            .server
            .as_mut()
            .and_then(|s| s.child.try_wait().ok().flatten());
        if exited.is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let (_, history) = c.api("GET", "/api/v1/vms/phoenix/migrations", None);
    panic!(
        "the control plane did not stop at {point} within 60 s\n`vm migrate` said: {} {}\nmigrations: {history:#}\n{}",
        String::from_utf8_lossy(&migrate.stdout),
        String::from_utf8_lossy(&migrate.stderr),
        c.logs_tail(40)
    );
}

fn refused(c: &Cluster, args: &[&str], want: &str) {
    let out = c.cli(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} was accepted");
    assert!(err.contains(want), "{args:?}: expected {want:?} in {err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "not one error line: {err}");
    assert!(errors[0].contains(want), "{err}");
}

/// Kills the control plane or an agent at each step of a live migration in
/// turn and checks the VM ends up running exactly once, where the workflow
/// says it is, with nothing left behind on the other host.
#[test]
fn a_migration_killed_at_any_step_recovers_to_exactly_one_copy() {
    let mut c = cluster();
    create_vm(&c, "phoenix", &["ES", "DE"], "host-es");
    c.wait_phase("phoenix", "running", BOOT);
    let id = c.vm("phoenix")["id"].as_str().unwrap().to_string();
    let sha = wait_data(&c, "phoenix");

    enum Kill {
        Server(&'static str),
        Agent(&'static str),
        /// The source's step fails (it does not die): a rollback.
        SourceError(&'static str),
        /// The source agent dies during a cold migration, then comes back.
        SourceDiesCold(&'static str),
    }
    let cases = [
        Kill::Server("migration:preparing_target"),
        Kill::Server("migration:transferring"),
        Kill::Server("migration:switching_over"),
        Kill::Server("migration:cleaning_up"),
        Kill::Agent("agent-job-start"),
        Kill::SourceError("error:agent-send"),
        Kill::SourceDiesCold("agent-upload-chunk"),
    ];
    for (i, case) in cases.iter().enumerate() {
        let from = host_of(&c, "phoenix");
        let to = if from == "host-es" {
            "host-de"
        } else {
            "host-es"
        };
        match case {
            Kill::Server(point) => {
                c.kill_server();
                c.start_server_env(&[("VIRT8RA_FAIL_AT", point)]);
                c.wait_hosts_ready(2);
                // The control plane dies right after recording the step.
                let out = c.cli(&[
                    "vm",
                    "migrate",
                    "phoenix",
                    "--to-host",
                    to,
                    "--mode",
                    "live",
                ]);
                wait_server_exit(&mut c, point, &out);
                c.kill_server();
                c.start_server();
            }
            Kill::Agent(point) => {
                // The target agent dies as its job starts, then comes back.
                restart_failing(&mut c, to, point);
                c.cli_ok(&[
                    "vm",
                    "migrate",
                    "phoenix",
                    "--to-host",
                    to,
                    "--mode",
                    "live",
                ]);
                wait_agent_exit(&mut c, to);
                c.start_agent_with(to, None, &["--migration-address", "127.0.0.1"]);
            }
            Kill::SourceDiesCold(point) => {
                restart_failing(&mut c, &from, point);
                c.cli_ok(&[
                    "vm",
                    "migrate",
                    "phoenix",
                    "--to-host",
                    to,
                    "--mode",
                    "cold",
                ]);
                wait_agent_exit(&mut c, &from);
                c.start_agent_with(&from, None, &["--migration-address", "127.0.0.1"]);
            }
            Kill::SourceError(point) => {
                restart_failing(&mut c, &from, point);
                c.cli_ok(&[
                    "vm",
                    "migrate",
                    "phoenix",
                    "--to-host",
                    to,
                    "--mode",
                    "live",
                ]);
            }
        }
        // The workflow finishes one way or the other.
        let m = wait_until("the migration to end", Duration::from_secs(180), || {
            let h = c.ok("GET", "/api/v1/vms/phoenix/migrations", None);
            let last = h.as_array().unwrap().last().cloned()?;
            let done = last["phase"] == "completed" || last["phase"] == "failed";
            (h.as_array().unwrap().len() == i + 1 && done).then_some(last)
        });
        let now = host_of(&c, "phoenix");
        let expect = if m["phase"] == "completed" {
            to
        } else {
            from.as_str()
        };
        assert_eq!(now, expect, "case {i}: {m}");
        let other = if now == "host-es" {
            "host-de"
        } else {
            "host-es"
        };
        assert_one_copy(&c, &id, &now, other);
        c.wait_phase("phoenix", "running", BOOT);
        // Still the same guest with the same disk.
        let con = wait_until_explained(
            &format!("case {i}: the guest to report its data"),
            BOOT,
            || {
                let con = c.console("phoenix");
                (!data_shas(&con).is_empty() && last_count(&con).is_some()).then_some(con)
            },
            || {
                // The summary first: CI shows the start and the end of a
                // long message only.
                let con = c.console("phoenix");
                let tail = &con[con.floor_char_boundary(con.len().saturating_sub(600))..];
                let last = |prefix: &str| {
                    con.lines()
                        .rfind(|l| l.trim().starts_with(prefix))
                        .unwrap_or("-")
                        .to_string()
                };
                format!(
                    "guest state: {}\nlast COUNT: {}, last SHA-BEGIN: {}, last DATA-SHA: {}, watchdog: {}, first line: {}\n\
                     target disk: {}\nVM: {}\nmigration: {m}\nconsole tail: {tail}\n{}",
                    qemu_status(&c, &now, &id),
                    last("COUNT "),
                    last("SHA-BEGIN "),
                    last("DATA-SHA "),
                    {
                        // The watchdog's last round: processes, clock, kernel.
                        let w: Vec<&str> =
                            con.lines().filter(|l| l.starts_with("WATCH")).collect();
                        w[w.len().saturating_sub(10)..].join(" | ")
                    },
                    con.lines().next().unwrap_or("-"),
                    disk_stats(&c, &now, &id),
                    c.vm("phoenix"),
                    c.logs_tail(60)
                )
            },
        );
        assert_eq!(data_shas(&con).last().unwrap(), &sha, "case {i}");
        eprintln!("case {i}: {} -> {}", m["phase"], now);
        if let Kill::SourceError(_) = case {
            assert_eq!(m["phase"], "failed", "{m}");
            assert!(m["error"].as_str().unwrap().contains("failure injected"));
        }
    }
}
