//! The QEMU driver against real QEMU and the test appliance built by
//! `scripts/test-image.sh`: boot, re-attach from a second driver instance (an
//! agent restart), reboot, graceful ACPI power-off, restart, a lost pid file,
//! destroy without orphans, and QEMU's own error reaching the caller.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use virt8ra_agent::driver::qemu::{AccelChoice, QemuDriver};
use virt8ra_agent::driver::{read_tail, Driver, DriverError, DriverVmState, VmConfig};

fn test_image() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/test-image.sh");
    let out = std::process::Command::new(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "{} failed", script.display());
    let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(
        path.is_absolute() && path.is_file(),
        "bad image path {path:?}"
    );
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn count(console: &Path, needle: &str) -> usize {
    let (text, _) = read_tail(console, 1 << 20).unwrap();
    text.matches(needle).count()
}

/// Waits until `needle` has appeared `n` times in the console log.
async fn wait_for(console: &Path, needle: &str, n: usize, timeout: Duration) {
    let start = Instant::now();
    while count(console, needle) < n {
        if start.elapsed() > timeout {
            let (tail, _) = read_tail(console, 3000).unwrap();
            panic!("no {n}x {needle:?} within {timeout:?}; console:\n{tail}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Pids of all processes whose command line mentions `dir`, found
/// independently of the driver.
fn processes_naming(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.to_string_lossy().to_string();
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&needle) {
                out.push((pid, cmd));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_vm_lifecycle_with_reattach_and_graceful_stop() {
    let image = test_image();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("vms");
    let d = QemuDriver::new(root.clone(), AccelChoice::Auto)
        .await
        .unwrap();
    eprintln!("hypervisor: {:?}, {}", d.hypervisor(), d.version());
    assert!(d.version().starts_with("QEMU "), "{}", d.version());
    assert!(
        tmp.path().join("kvm-probe.json").is_file(),
        "probe result cached next to the root"
    );

    let cfg = VmConfig {
        id: "vm-1".into(),
        name: "lifecycle".into(),
        vcpus: 1,
        memory_mib: 128,
        disk_gib: 1,
        base_image: image,
        ports: vec![(22, free_port())],
        context: Default::default(),
        machine: None,
        data_disks: vec![],
        nics: vec![],
    };
    let dir = d.vm_dir(&cfg.id);
    let console = d.console_path(&cfg.id);
    assert_eq!(d.state(&cfg.id).await.unwrap(), DriverVmState::Absent);
    assert!(matches!(
        d.start(&cfg).await,
        Err(DriverError::Start(m)) if m.contains("prepare")
    ));

    d.prepare(&cfg).await.unwrap();
    let disk = dir.join("disk.qcow2");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&disk)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"].as_u64(), Some(1 << 30));
    assert_eq!(
        info["backing-filename"].as_str().map(PathBuf::from),
        Some(std::fs::canonicalize(&cfg.base_image).unwrap())
    );
    let before = std::fs::metadata(&disk).unwrap().modified().unwrap();
    d.prepare(&cfg).await.unwrap();
    assert_eq!(
        std::fs::metadata(&disk).unwrap().modified().unwrap(),
        before,
        "prepare keeps an existing disk"
    );
    assert_eq!(d.state(&cfg.id).await.unwrap(), DriverVmState::Stopped);
    assert_eq!(d.list().await.unwrap(), vec!["vm-1".to_string()]);

    // Boot.
    let t0 = Instant::now();
    d.start(&cfg).await.unwrap();
    let pid = std::fs::read_to_string(dir.join("qemu.pid")).unwrap();
    d.start(&cfg).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("qemu.pid")).unwrap(),
        pid,
        "a second start leaves the running QEMU alone"
    );
    wait_for(&console, "VIRT8RA-GUEST-BOOTED", 1, Duration::from_secs(60)).await;
    eprintln!("booted in {:?}", t0.elapsed());
    assert_eq!(d.state(&cfg.id).await.unwrap(), DriverVmState::Running);
    assert_eq!(d.qmp_status(&cfg.id).await.unwrap(), "running");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("vm.json")).unwrap()).unwrap();
    assert_eq!(record["id"], "vm-1");
    assert_eq!(record["memory_mib"], 128);
    wait_for(&console, "VIRT8RA-TICK 2 ", 1, Duration::from_secs(30)).await;

    // The agent restarts: a new driver on the same root re-attaches.
    drop(d);
    let d = QemuDriver::new(root.clone(), AccelChoice::Auto)
        .await
        .unwrap();
    assert_eq!(d.state(&cfg.id).await.unwrap(), DriverVmState::Running);
    d.reboot(&cfg.id).await.unwrap();
    wait_for(&console, "VIRT8RA-GUEST-BOOTED", 2, Duration::from_secs(60)).await;
    assert_eq!(
        std::fs::read_to_string(dir.join("qemu.pid")).unwrap(),
        pid,
        "a reboot keeps the process"
    );

    // Graceful stop: the guest sees the power button and powers off.
    let t = Instant::now();
    d.stop(&cfg.id, Duration::from_secs(20)).await.unwrap();
    eprintln!("stopped in {:?}", t.elapsed());
    // At least once: the driver presses again every 5 s until the guest is off.
    assert!(
        count(&console, "VIRT8RA-GUEST-POWEROFF") >= 1,
        "the ACPI power-down reached the guest"
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "stopped by the guest, not by the timeout"
    );
    assert_eq!(d.state(&cfg.id).await.unwrap(), DriverVmState::Stopped);
    d.stop(&cfg.id, Duration::from_secs(20)).await.unwrap();
    assert!(
        d.reboot(&cfg.id).await.is_err(),
        "no reboot of a stopped VM"
    );

    // Start again, lose the pid file, destroy: nothing may survive.
    d.start(&cfg).await.unwrap();
    wait_for(&console, "VIRT8RA-GUEST-BOOTED", 3, Duration::from_secs(60)).await;
    std::fs::remove_file(dir.join("qemu.pid")).unwrap();
    assert_eq!(
        d.state(&cfg.id).await.unwrap(),
        DriverVmState::Running,
        "found without its pid file"
    );
    assert!(!processes_naming(&dir).is_empty());
    d.destroy(&cfg.id).await.unwrap();
    let left = processes_naming(&dir);
    assert!(left.is_empty(), "orphans: {left:?}");
    assert!(!dir.exists());
    assert_eq!(d.state(&cfg.id).await.unwrap(), DriverVmState::Absent);
    d.destroy(&cfg.id).await.unwrap();
    assert!(d.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn qemu_errors_reach_the_caller() {
    let image = test_image();
    let tmp = tempfile::tempdir().unwrap();
    let d = QemuDriver::new(tmp.path().join("vms"), AccelChoice::Emulation)
        .await
        .unwrap();
    let mut cfg = VmConfig {
        id: "bad".into(),
        name: "bad".into(),
        vcpus: 1,
        memory_mib: 64,
        disk_gib: 1,
        base_image: tmp.path().join("missing.qcow2"),
        ports: vec![],
        context: Default::default(),
        machine: None,
        data_disks: vec![],
        nics: vec![],
    };
    assert!(d.prepare(&cfg).await.is_err(), "missing base image");
    cfg.base_image = image;
    d.prepare(&cfg).await.unwrap();
    std::fs::write(d.vm_dir("bad").join("disk.qcow2"), b"not a disk image").unwrap();
    match d.start(&cfg).await {
        Err(DriverError::Start(m)) => {
            assert!(m.contains("qcow2"), "QEMU's stderr is in the error: {m}")
        }
        other => panic!("expected a start error, got {other:?}"),
    }
    assert_eq!(d.state("bad").await.unwrap(), DriverVmState::Stopped);
    d.destroy("bad").await.unwrap();
    assert!(processes_naming(&d.vm_dir("bad")).is_empty());
}
