//! End to end: the guest context (cloud-init NoCloud) carries SSH keys and a
//! network configuration, and the test appliance honours them. Real guests
//! under QEMU, logged in to with OpenSSH through the agent's port forward;
//! and the API, the CLI and `apply` refusing bad keys and networks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{assert_error, wait_until, Cluster};
use serde_json::{json, Value};

const BOOT: Duration = Duration::from_secs(240);

/// An ed25519 key pair made by ssh-keygen; returns (private key, public line).
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C"])
        .arg(format!("{name}@virt8ra-test"))
        .arg("-f")
        .arg(&key)
        .output()
        .expect("run ssh-keygen (install openssh-client: scripts/deps.sh)");
    assert!(out.status.success(), "ssh-keygen: {out:?}");
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    (key, public.trim().to_string())
}

/// `ssh root@127.0.0.1 -p PORT CMD` with `key`, keys only, no prompts.
fn ssh(key: &Path, port: &str, cmd: &str) -> Output {
    Command::new("ssh")
        .arg("-i")
        .arg(key)
        .args([
            "-p",
            port,
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=20",
            "-o",
            "LogLevel=ERROR",
            "root@127.0.0.1",
            cmd,
        ])
        .output()
        .expect("run ssh")
}

/// The host port the agent forwards to the VM's guest port 22.
fn ssh_port(vm: &Value) -> String {
    let fwd = vm["status"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["guest_port"] == 22)
        .unwrap_or_else(|| panic!("no forward for port 22: {vm}"))["host_addr"]
        .as_str()
        .unwrap()
        .to_string();
    fwd.rsplit(':').next().unwrap().to_string()
}

/// Logs in once the guest's SSH server answers; returns stdout.
fn ssh_ok(key: &Path, port: &str, cmd: &str) -> String {
    let start = std::time::Instant::now();
    loop {
        let o = ssh(key, port, cmd);
        if o.status.success() {
            return String::from_utf8(o.stdout).unwrap();
        }
        if start.elapsed() > Duration::from_secs(90) {
            panic!(
                "ssh -p {port} {cmd:?} failed for 90 s: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn console_line(c: &Cluster, vm: &str, prefix: &str) -> String {
    wait_until(&format!("{prefix} on {vm}'s console"), BOOT, || {
        c.console(vm)
            .lines()
            .find(|l| l.starts_with(prefix))
            .map(str::to_string)
    })
}

#[test]
fn guests_accept_only_their_keys_and_take_their_network() {
    let image = common::test_image();
    let mut c = Cluster::start();
    c.create_topology();
    c.start_agent("host-0", Some("es-logrono"));
    c.wait_hosts_ready(1);
    c.cli_ok(&["image", "import", image.to_str().unwrap(), "--name", "test"]);
    let keys = tempfile::tempdir().unwrap();
    let (alice, alice_pub) = keygen(keys.path(), "alice");
    let (mallory, _) = keygen(keys.path(), "mallory");

    // A static network, from a YAML spec, with the key from its .pub file
    // (through the CLI); the first NIC, matched by the MAC the agent gives it.
    let spec = c.dir.path().join("ctx-static.yaml");
    std::fs::write(
        &spec,
        "name: ctx-static\nimage: test\nmemory_mib: 128\nports: [22]\nnetwork:\n  ethernets:\n    - addresses: [10.0.2.15/24, 10.0.2.77/24]\n      gateway4: 10.0.2.2\n      nameservers: {addresses: [10.0.2.3], search: [example.test]}\n      mtu: 1400\n",
    )
    .unwrap();
    let alice_file = alice.with_extension("pub");
    c.cli_ok(&[
        "vm",
        "create",
        "-f",
        spec.to_str().unwrap(),
        "--ssh-key",
        alice_file.to_str().unwrap(),
    ]);
    // DHCP on the interface named eth0, with the key line itself (API).
    c.ok(
        "POST",
        "/api/v1/vms",
        Some(json!({
            "name": "ctx-dhcp", "image": "test", "memory_mib": 128, "ports": [22],
            "ssh_authorized_keys": [alice_pub],
            "network": {"ethernets": [{"match": {"name": "eth0"}, "dhcp4": true,
                                       "nameservers": {"search": ["dhcp.test"]}}]},
        })),
    );
    let stat = c.wait_phase("ctx-static", "running", BOOT);
    let dhcp = c.wait_phase("ctx-dhcp", "running", BOOT);
    assert_eq!(stat["spec"]["ssh_authorized_keys"][0], alice_pub.as_str());
    assert_eq!(
        stat["spec"]["network"]["ethernets"][0]["addresses"][1],
        "10.0.2.77/24"
    );
    let shown = c.cli_ok(&["vm", "show", "ctx-static"]);
    assert!(
        shown.contains("alice@virt8ra-test (ssh-ed25519)"),
        "{shown}"
    );
    assert!(
        shown.contains("first NIC: 10.0.2.15/24 10.0.2.77/24, via 10.0.2.2, dns 10.0.2.3"),
        "{shown}"
    );

    // What the guest applied, as it says on its console.
    let net = console_line(&c, "ctx-static", "VIRT8RA-NET ");
    assert_eq!(
        net,
        "VIRT8RA-NET eth0 addr=10.0.2.15/24,10.0.2.77/24 gw=10.0.2.2 dns=10.0.2.3 search=example.test mtu=1400 dhcp4=false"
    );
    let sshd = console_line(&c, "ctx-static", "VIRT8RA-SSH ");
    assert!(
        sshd.starts_with("VIRT8RA-SSH port=22 keys=1 hostkey=SHA256:"),
        "{sshd}"
    );

    // Logged in with the key it was given: its name, both addresses, DNS.
    let port = ssh_port(&stat);
    let out = ssh_ok(
        &alice,
        &port,
        "hostname; ip -4 addr; cat /etc/resolv.conf; cat /sys/class/net/eth0/mtu",
    );
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("ctx-static"), "{out}");
    for want in [
        "inet 10.0.2.15/24",
        "inet 10.0.2.77/24",
        "nameserver 10.0.2.3",
        "search example.test",
    ] {
        assert!(out.contains(want), "{want:?} not in:\n{out}");
    }
    assert_eq!(out.lines().last(), Some("1400"), "{out}");
    // A key it was not given is refused.
    let refused = ssh(&mallory, &port, "true");
    assert!(
        !refused.status.success(),
        "a key the VM was not given logged in: {refused:?}"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Permission denied"),
        "{refused:?}"
    );

    // The DHCP guest got QEMU's lease (10.0.2.15) and kept its search domain.
    let net = console_line(&c, "ctx-dhcp", "VIRT8RA-NET ");
    assert!(
        net.starts_with("VIRT8RA-NET eth0 addr=10.0.2.15/24 gw=10.0.2.2")
            && net.contains("search=dhcp.test")
            && net.ends_with("dhcp4=true"),
        "{net}"
    );
    let out = ssh_ok(
        &alice,
        &ssh_port(&dhcp),
        "hostname; ip -4 addr show eth0; cat /etc/resolv.conf",
    );
    assert!(out.starts_with("ctx-dhcp\n"), "{out}");
    assert!(out.contains("inet 10.0.2.15/24"), "{out}");
    assert!(!out.contains("10.0.2.77"), "{out}");
    assert!(out.contains("search dhcp.test"), "{out}");
}

fn vm_count(c: &Cluster) -> usize {
    c.ok("GET", "/api/v1/vms?include_deleted=true", None)["items"]
        .as_array()
        .unwrap()
        .len()
}

/// Bad keys and networks: 400s naming the field (API), one-line errors
/// (CLI), `FILE:LINE` errors (apply); nothing is created. No agents.
#[test]
fn bad_keys_and_networks_are_refused_and_create_nothing() {
    let image = common::test_image();
    let c = Cluster::start();
    c.cli_ok(&["image", "import", image.to_str().unwrap(), "--name", "test"]);
    let keys = tempfile::tempdir().unwrap();
    let (_, good) = keygen(keys.path(), "alice");
    let (_, other) = keygen(keys.path(), "bob");
    let vm = |extra: Value| {
        let mut b = json!({"name": "v", "image": "test"});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c.api("POST", "/api/v1/vms", Some(b))
    };
    let truncated = good[..good.len() - 20].to_string();
    for (extra, needle) in [
        (
            json!({"ssh_authorized_keys": [good, "ssh-ed25519 AAAA"]}),
            "ssh_authorized_keys[1]: \"ssh-ed25519 AAAA\" is not an OpenSSH public key line",
        ),
        (
            json!({"ssh_authorized_keys": [truncated]}),
            "ssh_authorized_keys[0]: ",
        ),
        (
            json!({"ssh_authorized_keys": ["-----BEGIN OPENSSH PRIVATE KEY-----"]}),
            "this is a private key",
        ),
        (
            json!({"network": {"ethernets": [{"addresses": ["10.0.2.15/33"]}]}}),
            "network.ethernets[0].addresses[0]: \"10.0.2.15/33\": the prefix length 33 is above 32",
        ),
        (
            json!({"network": {"ethernets": [{"addresses": ["10.0.2.999/24"]}]}}),
            "is not an address in CIDR notation",
        ),
        (
            json!({"network": {"ethernets": [{"dhcp4": true, "gateway4": "gw"}]}}),
            "network.ethernets[0].gateway4",
        ),
        (
            json!({"network": {"ethernets": [{"dhcp6": true}]}}),
            "unknown field `dhcp6`",
        ),
        (
            json!({"network": {"ethernets": vec![json!({"dhcp4": true, "match": {"name": "e"}}); 9]}}),
            "at most 8",
        ),
    ] {
        assert_error(vm(extra), 400, needle);
    }
    assert_error(
        c.api(
            "POST",
            "/api/v1/apps",
            Some(
                json!({"name": "shop", "appliance": "web", "locations": ["es"],
                        "ssh_authorized_keys": ["nope"]}),
            ),
        ),
        400,
        "ssh_authorized_keys[0]: \"nope\" is not an OpenSSH public key line",
    );
    assert_eq!(vm_count(&c), 0, "a refused request creates nothing");

    // The CLI: one line naming the argument or the file's line, exit non-zero.
    let bad_file = keys.path().join("bad.pub");
    std::fs::write(&bad_file, format!("{good}\nssh-rsa AAAA x\n")).unwrap();
    for (arg, needle) in [
        (
            "/nonexistent/id.pub".to_string(),
            "--ssh-key /nonexistent/id.pub: not a public key line".to_string(),
        ),
        (
            bad_file.display().to_string(),
            format!("--ssh-key {}:2: ", bad_file.display()),
        ),
    ] {
        for cmd in [
            vec!["vm", "create", "v", "--image", "test", "--ssh-key", &arg],
            vec![
                "app",
                "deploy",
                "web",
                "--name",
                "s",
                "--locations",
                "es",
                "--ssh-key",
                &arg,
            ],
        ] {
            let out = c.cli(&cmd);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{cmd:?} succeeded");
            assert!(err.contains(&needle), "{cmd:?}: {err}");
            assert_eq!(err.trim().lines().count(), 1, "{err}");
        }
    }
    assert_eq!(vm_count(&c), 0);

    // apply: invalid values with their line; a changed key list or network
    // is an immutable change (error, or replace with --replace).
    let file = c.dir.path().join("ctx.yaml");
    let estate = |keys: &str, addr: &str| {
        format!(
            "vms:\n  - name: ctx\n    image: test\n    start: false\n    ssh_authorized_keys:\n{keys}    network:\n      ethernets:\n        - addresses: [{addr}]\n"
        )
    };
    let apply = |args: &[&str]| {
        let mut a = vec!["apply", "-f", file.to_str().unwrap()];
        a.extend_from_slice(args);
        c.cli(&a)
    };
    std::fs::write(&file, estate("      - ssh-ed25519 AAAA\n", "10.0.2.15/24")).unwrap();
    let out = apply(&["--dry-run"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "{}:5: vm ctx: ssh_authorized_keys[0]: ",
            file.display()
        )),
        "{err}"
    );
    let first = estate(&format!("      - {good}\n"), "10.0.2.15/24");
    std::fs::write(&file, &first).unwrap();
    assert!(apply(&[]).status.success());
    assert_eq!(vm_count(&c), 1);
    assert_eq!(c.vm("ctx")["spec"]["ssh_authorized_keys"][0], good.as_str());
    let again = apply(&["-o", "json"]);
    let plan: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(plan["changed"], false, "{plan}");
    let id = c.vm("ctx")["id"].clone();
    for (text, field, line) in [
        (
            estate(&format!("      - {other}\n"), "10.0.2.15/24"),
            "ssh_authorized_keys",
            5,
        ),
        (
            estate(&format!("      - {good}\n"), "10.0.2.16/24"),
            "network.ethernets",
            8,
        ),
    ] {
        std::fs::write(&file, &text).unwrap();
        let out = apply(&[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}");
        assert!(
            err.contains(&format!(
                "{}:{line}: vm ctx: {field} cannot change in place",
                file.display()
            )),
            "{err}"
        );
        assert!(err.contains("--replace"), "{err}");
        assert_eq!(c.vm("ctx")["id"], id, "nothing changed");
        let out = apply(&["--replace", "--dry-run", "-o", "json"]);
        let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(plan["plan"][0]["action"], "replace", "{plan}");
    }
    std::fs::write(&file, estate(&format!("      - {other}\n"), "10.0.2.16/24")).unwrap();
    assert!(apply(&["--replace"]).status.success());
    let v = c.vm("ctx");
    assert_ne!(v["id"], id);
    assert_eq!(v["spec"]["ssh_authorized_keys"][0], other.as_str());
    assert_eq!(
        v["spec"]["network"]["ethernets"][0]["addresses"][0],
        "10.0.2.16/24"
    );
}
