//! End to end: data disks. A VM gets disks after its boot disk, copies of
//! images or blank, and the guest (the test appliance under real QEMU)
//! sees each with its size and content; an appliance of several images
//! deploys its VMs with the others as data disks. Bad requests are refused
//! and change nothing; what cannot carry data disks yet (migration, export)
//! says so instead of moving only the boot disk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{assert_error, Cluster, TOPOLOGY};
use serde_json::{json, Value};

const BOOT: Duration = Duration::from_secs(180);

/// A 4 MiB qcow2 whose first bytes are `marker`: a data set to copy.
fn data_image(dir: &Path, marker: &str) -> PathBuf {
    let raw = dir.join(format!("{marker}.raw"));
    let mut bytes = marker.as_bytes().to_vec();
    bytes.resize(4 << 20, 0);
    std::fs::write(&raw, &bytes).unwrap();
    let out = dir.join(format!("{marker}.qcow2"));
    let o = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&out)
        .output()
        .expect("run qemu-img");
    assert!(o.status.success(), "qemu-img: {o:?}");
    out
}

/// The guest's `VIRT8RA-DISK` lines: device -> (serial, size, head).
fn guest_disks(console: &str) -> Vec<(String, String, u64, String)> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("VIRT8RA-DISK "))
        .map(|rest| {
            let mut f = rest.split_whitespace();
            let dev = f.next().unwrap_or_default().to_string();
            let mut get = |k: &str| {
                f.next()
                    .and_then(|kv| kv.strip_prefix(k))
                    .unwrap_or_default()
                    .to_string()
            };
            let serial = get("serial=");
            let size = get("size=").parse().unwrap_or(0);
            let head = get("head=");
            (dev, serial, size, head)
        })
        .collect()
}

fn wait_disks(c: &Cluster, vm: &str, n: usize) -> Vec<(String, String, u64, String)> {
    common::wait_until_explained(
        &format!("{vm} to list {n} data disks"),
        BOOT,
        || {
            let con = c.console(vm);
            let d = guest_disks(&con);
            (con.contains("VIRT8RA-GUEST-BOOTED") && d.len() == n).then_some(d)
        },
        || format!("console:\n{}\n{}", c.console(vm), c.logs_tail(40)),
    )
}

/// `vm migrate VM --to-host HOST --mode MODE --wait`; the migration record.
fn migrate(c: &Cluster, vm: &str, host: &str, mode: &str) -> Value {
    let out = c.cli_ok(&[
        "vm",
        "migrate",
        vm,
        "--to-host",
        host,
        "--mode",
        mode,
        "--wait",
        "-o",
        "json",
    ]);
    serde_json::from_str(&out).unwrap()
}

fn wait_console(c: &Cluster, vm: &str, line: &str) {
    common::wait_until_explained(
        &format!("{vm} to print {line}"),
        BOOT,
        || c.console(vm).contains(line).then_some(()),
        || format!("console:\n{}", c.console(vm)),
    )
}

fn vm_count(c: &Cluster) -> usize {
    c.ok("GET", "/api/v1/vms", None)["items"]
        .as_array()
        .unwrap()
        .len()
}

#[test]
fn data_disks_from_images_and_blank_reach_the_guest() {
    let image = common::test_image();
    let mut c = Cluster::start();
    c.create_topology();
    let site = TOPOLOGY[0].2;
    // Hosts that take live migrations (on loopback).
    let live = ["--migration-address", "127.0.0.1"];
    c.start_agent_with("host-0", Some(site), &live);
    c.start_agent_with("host-1", Some(TOPOLOGY[1].2), &live);
    c.wait_hosts_ready(2);
    c.cli_ok(&["image", "import", image.to_str().unwrap(), "--name", "test"]);
    let marker = "VIRT8RA-DATA-IMAGE-dataset-v1";
    let data = data_image(c.dir.path(), marker);
    c.cli_ok(&[
        "image",
        "import",
        data.to_str().unwrap(),
        "--name",
        "dataset",
    ]);

    // Bad requests: a 400 that names the disk, and nothing created.
    let base = json!({"name": "bad", "image": "test"});
    for (disks, want) in [
        (
            json!([{"image": "nope"}]),
            "data_disks[0]: image 'nope' not found",
        ),
        (json!([{}]), "data_disks[0]: a blank disk needs size_gib"),
        (
            json!([{"image": "dataset"}, {"size_gib": 0}]),
            "data_disks[1].size_gib 0 is outside",
        ),
        (json!([{"img": "dataset"}]), "unknown field `img`"),
        (
            json!((0..9).map(|_| json!({"size_gib": 1})).collect::<Vec<_>>()),
            "at most 8 are allowed",
        ),
    ] {
        let mut body = base.clone();
        body["data_disks"] = disks;
        assert_error(c.api("POST", "/api/v1/vms", Some(body)), 400, want);
    }
    let out = c.cli(&[
        "vm",
        "create",
        "bad",
        "--image",
        "test",
        "--data-disk",
        "size=3",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("--data-disk size=3: expected image=NAME"),
        "{err}"
    );
    assert_eq!(vm_count(&c), 0);

    // A copy of the data set and a blank 2 GiB disk, in that order.
    // The guest writes its mark on the blank disk at its first boot.
    let script = c.dir.path().join("mark.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n\
         if [ \"$(head -c 11 /dev/vdd)\" != GUEST-WROTE ]; then\n\
         \x20 printf GUEST-WROTE-%s \"$(hostname)\" | dd of=/dev/vdd conv=fsync 2>/dev/null\n\
         \x20 echo DISK-MARKED\n\
         fi\n\
         while true; do\n\
         \x20 echo 3 > /proc/sys/vm/drop_caches\n\
         \x20 echo \"DISKS-NOW vdc=$(head -c 24 /dev/vdc) vdd=$(head -c 14 /dev/vdd)\"\n\
         \x20 sleep 1\n\
         done\n",
    )
    .unwrap();
    c.cli_ok(&[
        "vm",
        "create",
        "db",
        "--image",
        "test",
        "--data-disk",
        "image=dataset",
        "--data-disk",
        "size_gib=2",
        "--user-data",
        script.to_str().unwrap(),
    ]);
    c.wait_phase("db", "running", BOOT);
    let disks = wait_disks(&c, "db", 2);
    assert_eq!(disks[0].0, "vdc", "{disks:?}");
    assert_eq!(disks[0].1, "data-0");
    assert_eq!(disks[0].2, 4 << 20, "the copy has the image's size");
    assert!(disks[0].3.starts_with(marker), "{disks:?}");
    assert_eq!(disks[1].0, "vdd", "{disks:?}");
    assert_eq!(disks[1].1, "data-1");
    assert_eq!(disks[1].2, 2 << 30);
    assert_eq!(disks[1].3, "-", "a blank disk reads as zeros");
    let vm = c.vm("db");
    let dataset = c.ok("GET", "/api/v1/images/dataset", None);
    assert_eq!(
        vm["status"]["data_image_ids"],
        json!([dataset["id"], Value::Null])
    );
    let show = c.cli_ok(&["vm", "show", "db"]);
    assert!(
        show.contains("vdc: image dataset, vdd: blank 2 GiB"),
        "{show}"
    );
    // The copy is an overlay over the host's cached image, not a second copy.
    let vm_dir = c
        .agent_dir(vm["status"]["host"].as_str().unwrap())
        .join("vms")
        .join(vm["id"].as_str().unwrap());
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(vm_dir.join("data-0.qcow2"))
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    let backing = info["backing-filename"].as_str().unwrap_or_default();
    assert!(
        backing.ends_with(&format!("{}.qcow2", dataset["sha256"].as_str().unwrap())),
        "{info}"
    );

    // Still in use: the image stays; what cannot carry data disks yet says so.
    assert_error(
        c.api("DELETE", "/api/v1/images/dataset", None),
        409,
        "is the data disk of 1 VM(s)",
    );
    assert_eq!(c.vm("db")["status"]["migration"], Value::Null);

    // Live migration to the other provider mirrors every disk: the guest
    // keeps running (no boot on the target) and reads, from the target's
    // disks, the copy of the data set and what it wrote on the blank one.
    wait_console(&c, "db", "DISK-MARKED");
    // Behind NAT (joins now, so db is on host-0 or host-1): its live
    // migrations are relayed through the control plane.
    c.start_agent("host-2", Some(TOPOLOGY[2].2));
    c.wait_hosts_ready(3);
    let first = c.vm("db")["status"]["host"].as_str().unwrap().to_string();
    let second = if first == "host-0" {
        "host-1"
    } else {
        "host-0"
    };
    let m = migrate(&c, "db", second, "live");
    assert_eq!(m["phase"], "completed", "{m}");
    assert_eq!(m["mode"], "live", "{m}");
    assert_eq!(c.vm("db")["status"]["host"], second);
    let want = format!("DISKS-NOW vdc={} vdd=GUEST-WROTE-db", &marker[..24]);
    wait_console(&c, "db", &want);
    let con = c.console("db");
    assert!(
        !con.contains("VIRT8RA-GUEST-BOOTED"),
        "the guest was booted again instead of moved: {con}"
    );
    // Relayed (the target has no migration address): every disk's mirror
    // goes through the control plane too.
    let m = migrate(&c, "db", "host-2", "live");
    assert_eq!(m["phase"], "completed", "{m}");
    assert_eq!(m["relay"], true, "{m}");
    wait_console(&c, "db", &want);
    assert!(!c.console("db").contains("VIRT8RA-GUEST-BOOTED"));

    // Cold migration back carries every disk: the copy of the data set
    // (over the target's own cached image) and what the guest wrote on the
    // blank one.
    let from = "host-2".to_string();
    let to = first.as_str();
    let m = migrate(&c, "db", to, "cold");
    assert_eq!(m["phase"], "completed", "{m}");
    assert_eq!(m["mode"], "cold", "{m}");
    assert_eq!(m["data_disks"].as_array().map(Vec::len), Some(2), "{m}");
    let vm = c.wait_phase("db", "running", BOOT);
    assert_eq!(vm["status"]["host"], to);
    let disks = wait_disks(&c, "db", 2);
    assert!(disks[0].3.starts_with(marker), "{disks:?}");
    assert_eq!(disks[0].2, 4 << 20);
    assert_eq!(disks[1].3, "GUEST-WROTE-db", "{disks:?}");
    assert_eq!(disks[1].2, 2 << 30);
    let moved = c.agent_dir(to).join("vms").join(vm["id"].as_str().unwrap());
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(moved.join("data-0.qcow2"))
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(
        info["backing-filename"]
            .as_str()
            .unwrap_or_default()
            .starts_with(c.agent_dir(to).to_str().unwrap()),
        "the copy sits on the target's cached image: {info}"
    );
    assert!(
        !c.agent_dir(&from)
            .join("vms")
            .join(vm["id"].as_str().unwrap())
            .exists(),
        "the source copy is gone"
    );
    let staging = c.server_dir().join("staging");
    let left: Vec<_> = std::fs::read_dir(&staging)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "staged disks left behind: {left:?}");

    // Export carries every disk; import makes a VM with the same disks.
    c.cli_ok(&["vm", "stop", "db", "--wait"]);
    let bundle = c.dir.path().join("db-bundle");
    c.cli_ok(&["vm", "export", "db", "-o", bundle.to_str().unwrap()]);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(bundle.join("manifest.json")).unwrap()).unwrap();
    let files: Vec<&str> = manifest["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["file"].as_str().unwrap())
        .collect();
    assert_eq!(files, ["disk.qcow2", "data-0.qcow2", "data-1.qcow2"]);
    for f in &files {
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(bundle.join(f))
            .output()
            .unwrap();
        let info: Value = serde_json::from_slice(&info.stdout).unwrap();
        assert!(
            info["backing-filename"].is_null(),
            "{f} is standalone: {info}"
        );
    }
    // A damaged data disk is refused, and nothing is created.
    let damaged = c.dir.path().join("damaged");
    std::fs::create_dir_all(&damaged).unwrap();
    for f in [
        "manifest.json",
        "disk.qcow2",
        "data-0.qcow2",
        "data-1.qcow2",
    ] {
        std::fs::copy(bundle.join(f), damaged.join(f)).unwrap();
    }
    let mut bytes = std::fs::read(damaged.join("data-1.qcow2")).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    std::fs::write(damaged.join("data-1.qcow2"), bytes).unwrap();
    let before = vm_count(&c);
    let out = c.cli(&["vm", "import", damaged.to_str().unwrap(), "--name", "db3"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("data-1.qcow2 is corrupt"), "{err}");
    assert_eq!(vm_count(&c), before);
    c.cli_ok(&["vm", "import", bundle.to_str().unwrap(), "--name", "db2"]);
    c.wait_phase("db2", "running", BOOT);
    let disks = wait_disks(&c, "db2", 2);
    assert!(disks[0].3.starts_with(marker), "{disks:?}");
    assert_eq!(disks[1].3, "GUEST-WROTE-db", "{disks:?}");
    assert_eq!(disks[1].2, 2 << 30);
    c.cli_ok(&["vm", "delete", "db2", "--wait"]);

    // An appliance of two images: its VMs get the second as a data disk.
    let appliance = c.dir.path().join("dataset-app.json");
    std::fs::write(
        &appliance,
        json!({
            "name": "dataset-app", "version": "1.0.0",
            "description": "The test appliance with a data set on its second disk.",
            "images": [{"name": "test"}, {"name": "dataset"}],
            "template": {"vcpus": 1, "memory_mib": 128, "disk_gib": 1},
        })
        .to_string(),
    )
    .unwrap();
    let published = c.cli_ok(&["appliance", "publish", appliance.to_str().unwrap()]);
    assert!(
        published.contains("data disk: dataset sha256"),
        "{published}"
    );
    let app: Value = serde_json::from_str(&c.cli_ok(&[
        "app",
        "deploy",
        "dataset-app",
        "--name",
        "lab",
        "--locations",
        site,
        "--wait",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(app["status"], "running", "{app}");
    let replica = app["vms"][0]["name"].as_str().unwrap().to_string();
    let disks = wait_disks(&c, &replica, 1);
    assert_eq!(disks[0].1, "data-0", "{disks:?}");
    assert!(disks[0].3.starts_with(marker), "{disks:?}");
    assert_eq!(
        c.vm(&replica)["spec"]["data_disks"],
        json!([{"image": "dataset"}])
    );

    // Once no VM uses it, the image can go.
    c.cli_ok(&["app", "delete", "lab", "--wait"]);
    c.cli_ok(&["vm", "delete", "db", "--wait"]);
    let (status, err) = c.api("DELETE", "/api/v1/images/dataset", None);
    assert_eq!(status, 204, "{err}");
}
