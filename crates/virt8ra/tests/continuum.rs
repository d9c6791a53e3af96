//! End to end with real QEMU guests: a control plane and three agents as
//! separate processes, modelled as three providers in three EU countries.
//!
//! One cluster serves the whole scenario, since booting guests under
//! emulation on a two-core machine is the expensive part.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{wait_until, Cluster, TOPOLOGY};
use serde_json::json;

const BOOT_LINE: &str = "VIRT8RA-GUEST-BOOTED";
const BOOT: Duration = Duration::from_secs(120);

fn boots(console: &str) -> usize {
    console.matches(BOOT_LINE).count()
}

#[test]
fn vms_run_across_three_providers_and_survive_restarts() {
    let image = common::test_image();
    let mut c = Cluster::start();
    c.create_topology();
    for (i, (_, _, site, ..)) in TOPOLOGY.iter().enumerate() {
        c.start_agent(&format!("host-{i}"), Some(site));
    }
    c.wait_hosts_ready(3);
    let hosts = c.ok("GET", "/api/v1/hosts", None);
    for h in hosts["items"].as_array().unwrap() {
        assert!(h["connected"].as_bool().unwrap());
        let hv = h["inventory"]["hypervisor"].as_str().unwrap();
        assert!(hv == "kvm" || hv == "emulation");
    }
    c.cli_ok(&["image", "import", image.to_str().unwrap(), "--name", "test"]);

    // --- a VM that must stay in Poland, within 20 ms of Gdańsk: first a dry
    // run, then for real through the CLI with a YAML spec.
    let spec = c.dir.path().join("web-pl.yaml");
    std::fs::write(
        &spec,
        "name: web-pl\nimage: test\nmemory_mib: 128\nports: [80]\nplacement:\n  countries: [PL]\n  max_latency: {from: Gdańsk, max_rtt_ms: 20}\nuser_data: |\n  #!/bin/sh\n  echo VIRT8RA-USERDATA-RAN $(hostname)\n",
    )
    .unwrap();
    let plan: serde_json::Value = serde_json::from_str(&c.cli_ok(&[
        "vm",
        "plan",
        "-f",
        spec.to_str().unwrap(),
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(plan["placed"], true, "{plan}");
    assert_eq!(plan["site"], "pl-gdansk");
    assert!(plan["rtt_ms"].as_f64().unwrap() <= 20.0);
    assert_eq!(
        c.ok("GET", "/api/v1/vms", None)["items"]
            .as_array()
            .unwrap()
            .len(),
        0,
        "a plan creates nothing"
    );
    let out = c.cli_ok(&[
        "vm",
        "create",
        "-f",
        spec.to_str().unwrap(),
        "--wait",
        "-o",
        "json",
    ]);
    let vm: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(vm["status"]["phase"], "running");
    assert_eq!(vm["status"]["country"], "PL");
    assert_eq!(vm["status"]["site"], "pl-gdansk");
    assert_eq!(vm["status"]["provider"], "provider-pl");
    let why = vm["status"]["placement_reason"].as_str().unwrap();
    assert!(
        why.contains("pl-gdansk") && why.contains("ms from the users"),
        "{why}"
    );
    assert!(why.contains("1 of 3 sites pass the hard rules"), "{why}");
    let fwd = vm["status"]["ports"][0]["host_addr"].as_str().unwrap();
    assert!(fwd.starts_with("127.0.0.1:"), "{fwd}");

    // The guest really booted: its boot line is on the console.
    wait_until("the boot line", BOOT, || {
        (boots(&c.console("web-pl")) == 1).then_some(())
    });
    let out = c.cli_ok(&["vm", "console", "web-pl"]);
    assert!(out.contains(BOOT_LINE));
    // The guest's web server answers through the agent's port forward.
    let page = wait_until("the guest's page", Duration::from_secs(30), || {
        reqwest::blocking::get(format!("http://{fwd}/"))
            .ok()
            .and_then(|r| r.text().ok())
            .filter(|t| t.contains("virt8ra test appliance"))
    });
    // ... and knows its name and site from its cloud-init context, whose
    // user-data script ran.
    assert!(page.contains("hostname=web-pl site=pl-gdansk"), "{page}");
    // (The guest starts its web server and runs the user data side by side:
    // the page can answer before the script's line reaches the console.)
    wait_until("the user data's line", Duration::from_secs(30), || {
        c.console("web-pl")
            .contains("VIRT8RA-USERDATA-RAN web-pl")
            .then_some(())
    });
    assert_eq!(c.qemu_pids().len(), 1);

    // --- VMs that cannot be placed stay pending and say why.
    c.ok(
        "POST",
        "/api/v1/vms",
        Some(
            json!({"name": "in-france", "image": "test", "memory_mib": 128,
                    "placement": {"countries": ["FR"]}}),
        ),
    );
    c.ok(
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "too-big", "image": "test", "memory_mib": 65536})),
    );
    for (name, why_expected) in [
        (
            "in-france",
            "0 of 3 hosts fit: 3 outside the allowed countries",
        ),
        ("too-big", "0 of 3 hosts fit: 3 short of memory"),
    ] {
        let v = wait_until("an explanation", Duration::from_secs(20), || {
            let v = c.vm(name);
            v["status"]["placement_reason"].is_string().then_some(v)
        });
        assert_eq!(v["status"]["phase"], "pending");
        assert_eq!(v["status"]["placement_reason"], why_expected);
        let show = c.cli_ok(&["vm", "show", name]);
        assert!(show.contains(why_expected), "{show}");
        c.ok("DELETE", &format!("/api/v1/vms/{name}"), None);
        assert_eq!(c.vm(name)["status"]["phase"], "deleted");
    }

    // --- per-host overcommit: host-0 (4 vCPUs) at 0.5 holds at most 2 vCPUs.
    c.cli_ok(&["host", "set-overcommit", "host-0", "--cpu", "0.5"]);
    let plan = c.ok(
        "POST",
        "/api/v1/vms/plan",
        Some(
            json!({"name": "x", "image": "test", "vcpus": 3, "memory_mib": 128,
                    "placement": {"site": "es-logrono"}}),
        ),
    );
    assert_eq!(plan["placed"], false, "{plan}");
    assert_eq!(plan["excluded"], json!({"site": 2, "vcpus": 1}), "{plan}");
    c.cli_ok(&["host", "set-overcommit", "host-0", "--cpu", "4"]);
    let plan = c.ok(
        "POST",
        "/api/v1/vms/plan",
        Some(
            json!({"name": "x", "image": "test", "vcpus": 3, "memory_mib": 128,
                    "placement": {"site": "es-logrono"}}),
        ),
    );
    assert_eq!(plan["placed"], true, "{plan}");

    // --- graceful stop, start again, reboot.
    let out = c.cli_ok(&["vm", "stop", "web-pl", "--wait", "-o", "json"]);
    assert!(out.contains("\"stopped\""));
    assert!(c.qemu_pids().is_empty(), "QEMU still running after stop");
    let console = c.console("web-pl");
    assert!(
        console.contains("VIRT8RA-GUEST-POWEROFF"),
        "the guest was not powered down gracefully: {console}"
    );
    c.cli_ok(&["vm", "start", "web-pl", "--wait"]);
    wait_until("the second boot", BOOT, || {
        (boots(&c.console("web-pl")) == 2).then_some(())
    });
    c.cli_ok(&["vm", "reboot", "web-pl"]);
    wait_until("the boot after reboot", BOOT, || {
        (boots(&c.console("web-pl")) == 3).then_some(())
    });
    let events = c.cli_ok(&["vm", "events", "web-pl"]);
    for e in [
        "created",
        "scheduled",
        "provisioning",
        "running",
        "stop requested",
        "stopped",
        "reboot requested",
    ] {
        assert!(events.contains(e), "event {e:?} missing from:\n{events}");
    }

    // --- restart the agent: the VM keeps running and is re-attached.
    let host = c.vm("web-pl")["status"]["host"]
        .as_str()
        .unwrap()
        .to_string();
    let pids = c.qemu_pids();
    assert_eq!(pids.len(), 1);
    c.kill_agent(&host);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.qemu_pids(), pids, "the VM must survive its agent");
    c.start_agent(&host, None);
    c.wait_hosts_ready(3);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        c.qemu_pids(),
        pids,
        "the restarted agent must re-attach, not restart"
    );
    assert_eq!(c.vm("web-pl")["status"]["phase"], "running");
    assert_eq!(boots(&c.console("web-pl")), 3, "the guest did not reboot");

    // --- a host reboot: agent and guests die together. The agent comes back
    // and starts the VM again from its local desired state.
    c.kill_agent(&host);
    for pid in &pids {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    wait_until("the guest to die", Duration::from_secs(10), || {
        c.qemu_pids().is_empty().then_some(())
    });
    c.kill_server(); // the control plane is unreachable too
    c.start_agent(&host, None);
    wait_until("the VM to be started again", BOOT, || {
        (c.qemu_pids().len() == 1).then_some(())
    });
    c.start_server();
    wait_until("the boot after the host reboot", BOOT, || {
        (boots(&c.console("web-pl")) == 4).then_some(())
    });
    c.wait_phase("web-pl", "running", BOOT);

    // --- SIGKILL the control plane while VMs run: nothing is lost.
    c.ok(
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "web-de", "image": "test", "memory_mib": 128,
                    "placement": {"provider": "provider-de"}})),
    );
    c.wait_phase("web-de", "running", BOOT);
    let before = (
        c.ok("GET", "/api/v1/providers", None)["items"].clone(),
        c.ok("GET", "/api/v1/sites", None)["items"].clone(),
        c.ok("GET", "/api/v1/images", None)["items"].clone(),
        c.ok("GET", "/api/v1/vms?include_deleted=true", None)["items"].clone(),
    );
    let pids = c.qemu_pids();
    assert_eq!(pids.len(), 2);
    c.kill_server();
    // Work acknowledged while... nothing: the server is gone. Restart it.
    std::thread::sleep(Duration::from_secs(1));
    c.start_server();
    let after = (
        c.ok("GET", "/api/v1/providers", None)["items"].clone(),
        c.ok("GET", "/api/v1/sites", None)["items"].clone(),
        c.ok("GET", "/api/v1/images", None)["items"].clone(),
        c.ok("GET", "/api/v1/vms?include_deleted=true", None)["items"].clone(),
    );
    assert_eq!(before, after, "state changed across a SIGKILL");
    assert_eq!(
        c.qemu_pids(),
        pids,
        "VMs must keep running while the control plane is down"
    );
    c.wait_hosts_ready(3);
    // It carries on: a VM created now is placed and runs.
    c.ok(
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "web-es", "image": "test", "memory_mib": 128,
                    "placement": {"site": "es-logrono"}})),
    );
    c.wait_phase("web-es", "running", BOOT);
    assert_eq!(c.vm("web-pl")["status"]["phase"], "running");
    assert_eq!(c.vm("web-de")["status"]["phase"], "running");

    // --- delete everything: no QEMU process is left.
    for name in ["web-pl", "web-de", "web-es"] {
        c.cli_ok(&["vm", "delete", name, "--wait"]);
        assert_eq!(c.vm(name)["status"]["phase"], "deleted");
    }
    wait_until("all QEMU processes to end", Duration::from_secs(30), || {
        c.qemu_pids().is_empty().then_some(())
    });
    for (name, _) in &c.agents {
        let vms = c.agent_dir(name).join("vms");
        let left: Vec<_> = std::fs::read_dir(&vms)
            .map(|d| d.flatten().collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "VM directories left on {name}: {left:?}");
    }
    // The VM list is empty, the history is kept.
    assert_eq!(
        c.ok("GET", "/api/v1/vms", None)["items"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let ev = c.ok("GET", "/api/v1/vms/web-pl/events", None);
    assert!(ev.as_array().unwrap().len() > 5);
}
