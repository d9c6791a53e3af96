//! End to end (issue 27, item 4, through the control plane): published
//! ports and security groups asked for at `vm create`, placed so that no
//! two VMs publish one host port on a host, and enforced by the host that
//! runs the VM; and conntrack zones per network on the agent.
//!
//! - `a_published_port_and_a_security_group_through_the_control_plane`:
//!   two agents in namespaces of their own at one site (`--address` on a
//!   test-made bridge where the control plane listens), one real guest
//!   (the test appliance, emulated) created with the CLI with `--network`,
//!   `--publish 8080:80` and `--allow 0.0.0.0/0:tcp:80`. A client in
//!   another namespace reaches the guest's web page at the host's address,
//!   port 8080, and not at the other host's; routed to the guest's own
//!   address, port 80 (allowed) answers and port 81 (served, not allowed)
//!   does not. A second VM asking for host port 8080 is placed on the
//!   other host, a third is left pending with a reason naming the port,
//!   and moving the second onto the first's host is refused naming the
//!   port and the VM that holds it. Once the second is gone, the guest
//!   moves live to the other host, and its published port and security
//!   group move with it.
//! - `bad_publish_and_ingress_requests_are_refused_and_change_nothing`:
//!   the API's 400s (no namespaces, no guest).
//! - `apply_declares_published_ports_and_security_groups`: `apply -f`.
//! - `evacuation_and_cold_migration_keep_published_ports_apart`: with
//!   simulated agents (no namespace, no guest).
//! - `networks_with_the_same_cidr_keep_separate_conntrack_entries`: the
//!   agent's data plane alone (`tests/netns/world.rs`), identical flows in
//!   two networks with the same CIDR on one host are two entries, one per
//!   network's zone.
//!
//! The namespace tests need root; without it they say so and pass.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[path = "netns/underlay.rs"]
mod underlay;
#[path = "netns/world.rs"]
mod world;

use std::time::Duration;

use common::{wait_until_explained, Cluster, TOPOLOGY};
use serde_json::{json, Value};
use underlay::{must, sh, start_agent_in, Underlay};

/// One TCG guest booting on a loaded two-core machine.
const BOOT: Duration = Duration::from_secs(600);

/// What an HTTP GET of `http://ADDR:PORT/` from namespace `ns` returns
/// (`None`: no answer within 3 s).
fn http_get(ns: &str, addr: &str, port: u16) -> Option<String> {
    let url = format!("http://{addr}:{port}/");
    let o = sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "curl",
        "-s",
        "--max-time",
        "3",
        &url,
    ]);
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Waits until a GET from `ns` answers with the guest's page.
fn wait_page(c: &Cluster, ns: &str, addr: &str, port: u16, vm: &str) -> String {
    wait_until_explained(
        &format!("{vm}'s page at {addr}:{port}"),
        BOOT,
        || http_get(ns, addr, port).filter(|p| p.contains("virt8ra test appliance")),
        || format!("{}\n{}", c.console(vm), c.logs_tail(40)),
    )
}

#[test]
fn a_published_port_and_a_security_group_through_the_control_plane() {
    let Some(mut u) = Underlay::new("pub") else {
        return;
    };
    let hosts: Vec<String> = (0..2).map(|i| u.add_host(i)).collect();
    // The client: another namespace on the underlay, outside every
    // virtual network.
    let client = u.add_host(5);
    let image = common::test_image();
    let mut c = Cluster::start_on(&u.addr(1));
    c.create_topology();
    let site = TOPOLOGY[0].2;
    for (i, ns) in hosts.iter().enumerate() {
        let addr = u.addr(10 + i as u8);
        start_agent_in(&mut c, &format!("host-{i}"), ns, Some(site), Some(&addr));
    }
    c.wait_hosts_ready(2);
    c.cli_ok(&["image", "import", image.to_str().unwrap(), "--name", "test"]);
    c.cli_ok(&["network", "create", "pub", "--cidr", "10.78.0.0/24"]);

    // A NIC-less VM cannot publish: one line, saying what to do instead.
    let out = c.cli(&[
        "vm",
        "create",
        "bare",
        "--image",
        "test",
        "--publish",
        "8080:80",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.trim().lines().count() == 1 && err.contains("--network") && err.contains("--port"),
        "{err}"
    );

    // The guest serves port 80 (the appliance's page) and, from its user
    // data, port 81; its security group lets in tcp/80 only.
    let script = c.dir.path().join("serve81.sh");
    std::fs::write(&script, "#!/bin/sh\nhttpd -p 81 -h /www\necho SERVING-81\n").unwrap();
    let vm: Value = serde_json::from_str(&c.cli_ok(&[
        "vm",
        "create",
        "web",
        "--image",
        "test",
        "--memory-mib",
        "128",
        "--site",
        site,
        "--network",
        "pub,ip=10.78.0.10",
        "--publish",
        "8080:80",
        "--allow",
        "0.0.0.0/0:tcp:80",
        "--user-data",
        script.to_str().unwrap(),
        "--wait",
        "-o",
        "json",
    ]))
    .unwrap();
    let web_host = vm["status"]["host"].as_str().unwrap().to_string();
    let w: usize = web_host.trim_start_matches("host-").parse().unwrap();
    let (here, there) = (u.addr(10 + w as u8), u.addr(11 - w as u8));
    let nic = &vm["status"]["nics"][0];
    assert_eq!(
        nic["publish"],
        json!([{"host_port": 8080, "guest_port": 80, "protocol": "tcp"}]),
        "{vm}"
    );
    assert_eq!(vm["spec"]["ingress"][0]["ports"], "80", "{vm}");
    let shown = c.cli_ok(&["vm", "show", "web"]);
    assert!(
        shown.contains(&format!("{web_host}:8080 -> 80/tcp")) && shown.contains("0.0.0.0/0:tcp:80"),
        "{shown}"
    );

    // Published: the page at the host's address, port 8080; not at the
    // other host's.
    let page = wait_page(&c, &client, &here, 8080, "web");
    assert!(page.contains("hostname=web"), "{page}");
    assert_eq!(
        http_get(&client, &there, 8080),
        None,
        "the other host publishes nothing"
    );

    // The security group, from outside the network: routed to the
    // guest's own address through its host, tcp/80 is let in and tcp/81
    // (served: the guest said so) is dropped.
    must(&[
        "ip",
        "-n",
        &client,
        "route",
        "add",
        "10.78.0.0/24",
        "via",
        &here,
    ]);
    wait_until_explained(
        "web to serve port 81",
        BOOT,
        || c.console("web").contains("SERVING-81").then_some(()),
        || c.console("web"),
    );
    let page = wait_page(&c, &client, "10.78.0.10", 80, "web");
    assert!(page.contains("hostname=web"), "{page}");
    assert_eq!(
        http_get(&client, "10.78.0.10", 81),
        None,
        "tcp/81 is not in web's security group"
    );

    // A second VM asking for host port 8080 is placed on the other host.
    let vm2: Value = serde_json::from_str(&c.cli_ok(&[
        "vm",
        "create",
        "web2",
        "--image",
        "test",
        "--memory-mib",
        "128",
        "--site",
        site,
        "--network",
        "pub",
        "--publish",
        "8080:80",
        "--no-start",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(
        vm2["status"]["host"],
        format!("host-{}", 1 - w),
        "web holds 8080 on {web_host}: {vm2}"
    );
    // A third finds no host and says which port.
    let vm3: Value = serde_json::from_str(&c.cli_ok(&[
        "vm",
        "create",
        "web3",
        "--image",
        "test",
        "--site",
        site,
        "--network",
        "pub",
        "--publish",
        "8080:80",
        "--no-start",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(vm3["status"]["phase"], "pending", "{vm3}");
    let why = vm3["status"]["placement_reason"].as_str().unwrap();
    assert!(
        why.contains("2 where host port 8080/tcp is already published"),
        "{why}"
    );
    c.cli_ok(&["vm", "delete", "web3", "--wait"]);
    // Moving web2 onto web's host is refused, naming the port and web.
    c.wait_phase("web2", "stopped", BOOT);
    let out = c.cli(&["vm", "migrate", "web2", "--to-host", &web_host]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("host port 8080/tcp is already published there by VM 'web'"),
        "{err}"
    );
    assert_eq!(c.vm("web2")["status"]["host"], format!("host-{}", 1 - w));
    // The page is still served where it was.
    assert!(http_get(&client, &here, 8080).is_some_and(|p| p.contains("hostname=web")));

    // With web2 gone, web moves live to the other host, and its published
    // port and security group go with it: the page is at the new host's
    // address, no longer at the old one's, and tcp/81 is still dropped.
    c.cli_ok(&["vm", "delete", "web2", "--wait"]);
    let other = format!("host-{}", 1 - w);
    c.cli_ok(&[
        "vm",
        "migrate",
        "web",
        "--to-host",
        &other,
        "--mode",
        "live",
        "--wait",
    ]);
    assert_eq!(c.vm("web")["status"]["host"], other.as_str());
    let page = wait_page(&c, &client, &there, 8080, "web");
    assert!(page.contains("hostname=web"), "{page}");
    wait_until_explained(
        "the old host to stop publishing 8080",
        Duration::from_secs(60),
        || http_get(&client, &here, 8080).is_none().then_some(()),
        || c.logs_tail(40),
    );
    must(&[
        "ip",
        "-n",
        &client,
        "route",
        "replace",
        "10.78.0.0/24",
        "via",
        &there,
    ]);
    wait_page(&c, &client, "10.78.0.10", 80, "web");
    assert_eq!(
        http_get(&client, "10.78.0.10", 81),
        None,
        "the security group moved with web"
    );
}

#[test]
fn bad_publish_and_ingress_requests_are_refused_and_change_nothing() {
    let c = Cluster::start();
    c.import_tiny_image();
    c.ok(
        "POST",
        "/api/v1/networks",
        Some(json!({"name": "routed", "cidr": "10.81.0.0/24"})),
    );
    c.ok(
        "POST",
        "/api/v1/networks",
        Some(json!({"name": "flat", "cidr": "10.82.0.0/24", "no_gateway": true})),
    );
    let nic = json!([{"network": "routed"}]);
    let flat = json!([{"network": "flat"}]);
    let p8080 = json!({"host_port": 8080, "guest_port": 80});
    for (body, want) in [
        (
            json!({"publish": [p8080]}),
            "publish: a VM without NICs has no address a host can publish",
        ),
        (
            json!({"ingress": [{"protocol": "tcp", "ports": "22"}]}),
            "ingress: a security group applies to a VM's NICs",
        ),
        (
            json!({"nics": flat, "publish": [p8080]}),
            "publish[0]: none of the VM's networks has a gateway",
        ),
        (
            json!({"nics": [{"network": "flat"}, {"network": "routed"}],
                   "publish": [{"host_port": 1, "guest_port": 1, "network": "flat"}]}),
            "publish[0]: network 'flat' has no gateway",
        ),
        (
            json!({"nics": nic, "publish": [{"host_port": 1, "guest_port": 1, "network": "other"}]}),
            "publish[0]: network 'other' is not the network of any of the VM's NICs",
        ),
        (
            json!({"nics": nic, "publish": [p8080, {"host_port": 8080, "guest_port": 81}]}),
            "publish[1]: host port 8080/tcp is already published by publish[0]",
        ),
        (
            json!({"nics": nic, "publish": [{"host_port": 0, "guest_port": 80}]}),
            "publish[0]: ports must be 1-65535",
        ),
        (
            json!({"nics": nic, "publish": [{"host_port": 53, "guest_port": 53, "protocol": "icmp"}]}),
            "publish[0]: protocol icmp has no ports",
        ),
        (
            json!({"nics": nic, "ingress": [{"protocol": "icmp", "ports": "8"}]}),
            "ingress[0]: an ingress rule with ports must be tcp or udp",
        ),
        (
            json!({"nics": nic, "ingress": vec![json!({"protocol": "tcp"}); 65]}),
            "ingress: 65 rules; at most 64",
        ),
        (
            json!({"nics": nic,
                   "publish": (1..=33).map(|p| json!({"host_port": p, "guest_port": 80})).collect::<Vec<_>>()}),
            "publish: 33 ports; at most 32",
        ),
        (
            json!({"nics": nic, "ingress": [{"from": "10.0.0.1/8"}]}),
            "host bits",
        ),
    ] {
        let mut req = json!({"name": "bad", "image": "tiny"});
        for (k, v) in body.as_object().unwrap() {
            req[k] = v.clone();
        }
        let (s, v) = c.api("POST", "/api/v1/vms", Some(req.clone()));
        assert_eq!(s, 400, "{req}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(want), "{req}: {msg}");
        assert!(v["error"]["code"].is_string(), "{v}");
    }
    let (s, _) = c.api("GET", "/api/v1/vms/bad", None);
    assert_eq!(s, 404, "no bad request left a VM behind");
    let leases = c.ok("GET", "/api/v1/vms", None);
    assert_eq!(leases["items"], json!([]));
    // The good one of the same shape is accepted (pending: no host).
    let (s, v) = c.api(
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "good", "image": "tiny", "nics": [{"network": "flat"}, {"network": "routed"}],
                    "publish": [p8080], "ingress": []})),
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["status"]["nics"][0]["publish"], Value::Null, "{v}");
    assert_eq!(
        v["status"]["nics"][1]["publish"][0]["host_port"], 8080,
        "{v}"
    );
}

/// Two networks with the same CIDR and the same addresses on hosts 0 and
/// 1; the same UDP flow (addresses and ports) in each. Host 0 tracks them
/// as two connections, one in each network's zone; with one zone for
/// both they would be one entry, and one network's replies would count as
/// the other's.
#[test]
fn networks_with_the_same_cidr_keep_separate_conntrack_entries() {
    use world::*;
    let Some(mut w) = World::new("z") else { return };
    let net = |id: &str, vni: u32, gw: Option<&str>, nics: [&'static str; 2]| Net {
        spec: spec(id, "10.61.0.0/24", vni, gw),
        nat: false,
        hosts: vec![0, 1],
        nics: vec![(0, nics[0], "10.61.0.10"), (1, nics[1], "10.61.0.20")],
    };
    let red = net("net-red", 6101, Some("10.61.0.1"), ["red-0", "red-1"]);
    let green = net("net-green", 6102, None, ["green-0", "green-1"]);
    for h in 0..2 {
        w.apply(h, &host_state(h, &[&red, &green]));
    }
    let r0 = w.guest(0, "red-0", &red.spec, Some(ip("10.61.0.10")));
    let _r1 = w.guest(1, "red-1", &red.spec, Some(ip("10.61.0.20")));
    let g0 = w.guest(0, "green-0", &green.spec, Some(ip("10.61.0.10")));
    let _g1 = w.guest(1, "green-1", &green.spec, Some(ip("10.61.0.20")));
    assert!(ping(&r0, ip("10.61.0.20")) && ping(&g0, ip("10.61.0.20")));
    const SEND: &str = "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
                        s.bind(('0.0.0.0', 40123)); s.sendto(b'x', ('10.61.0.20', 40124))";
    for g in [&r0, &g0] {
        must(&["ip", "netns", "exec", g, "python3", "-c", SEND]);
    }
    let table = must(&[
        "ip",
        "netns",
        "exec",
        &w.hosts[0],
        "cat",
        "/proc/net/nf_conntrack",
    ]);
    let flow: Vec<&str> = table
        .lines()
        .filter(|l| l.contains("src=10.61.0.10 dst=10.61.0.20 sport=40123 dport=40124"))
        .collect();
    let mut zones: Vec<&str> = flow
        .iter()
        .filter_map(|l| l.split_whitespace().find(|f| f.starts_with("zone=")))
        .collect();
    zones.sort();
    assert_eq!(zones, ["zone=6101", "zone=6102"], "{flow:#?}\n{table}");
}

/// `apply -f` declares a VM's published ports and security group: created
/// as declared, a second run changes nothing (the fields read back as
/// written), and a changed rule is an error naming the field, changing
/// nothing. A bad rule in the file is an error with its line.
#[test]
fn apply_declares_published_ports_and_security_groups() {
    let c = Cluster::start();
    c.import_tiny_image();
    let file = c.dir.path().join("estate.yaml");
    let text = "networks:\n  - {name: front, cidr: 10.83.0.0/24}\n\
                vms:\n  - name: web\n    image: tiny\n    nics: [{network: front}]\n    \
                publish:\n      - {host_port: 8080, guest_port: 80}\n      \
                - {host_port: 5353, guest_port: 53, protocol: udp, network: front}\n    \
                ingress:\n      - {from: 0.0.0.0/0, protocol: tcp, ports: 80}\n      \
                - {from: 192.0.2.0/24, protocol: icmp}\n";
    std::fs::write(&file, text).unwrap();
    let f = file.to_str().unwrap();
    c.cli_ok(&["apply", "-f", f]);
    let vm = c.vm("web");
    assert_eq!(vm["spec"]["publish"][1]["protocol"], "udp", "{vm}");
    assert_eq!(vm["spec"]["ingress"][0]["ports"], "80", "{vm}");
    assert_eq!(
        vm["status"]["nics"][0]["publish"][1]["host_port"], 5353,
        "{vm}"
    );
    let again = c.cli_ok(&["apply", "-f", f]);
    assert!(again.contains("no changes"), "{again}");

    std::fs::write(&file, text.replace("ports: 80", "ports: 443")).unwrap();
    let out = c.cli(&["apply", "-f", f]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("vm web: ingress cannot change in place"),
        "{err}"
    );
    assert_eq!(c.vm("web")["spec"]["ingress"][0]["ports"], "80");

    std::fs::write(
        &file,
        text.replace("protocol: icmp", "protocol: icmp, ports: 8"),
    )
    .unwrap();
    let out = c.cli(&["apply", "-f", f, "--dry-run"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("estate.yaml:")
            && err.contains("vm web: ingress[1]: an ingress rule with ports"),
        "{err}"
    );
}

/// Evacuation and cold migration keep published host ports apart too,
/// through the real control plane with simulated agents (their VMs exist
/// in memory; no namespace, no guest). Three hosts at one site; two VMs
/// publish host port 8080, so they sit on two of them. Evacuating the
/// first's host sends it to the third, not to the second (where packing
/// would put it); with the third evacuated too it has nowhere to go, and
/// the refusal names the port; a cold move onto a host holding the port
/// is refused naming the port and its holder.
#[test]
fn evacuation_and_cold_migration_keep_published_ports_apart() {
    let mut c = Cluster::start();
    c.create_topology();
    let site = TOPOLOGY[0].2;
    for i in 0..3 {
        c.start_agent_with(&format!("sim-{i}"), Some(site), &["--driver", "sim"]);
    }
    c.wait_hosts_ready(3);
    c.import_tiny_image();
    c.ok(
        "POST",
        "/api/v1/networks",
        Some(json!({"name": "front", "cidr": "10.84.0.0/24"})),
    );
    let make = |name: &str| {
        c.ok(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": name, "image": "tiny", "memory_mib": 64,
                        "placement": {"site": site}, "nics": [{"network": "front"}],
                        "publish": [{"host_port": 8080, "guest_port": 80}]})),
        );
        c.wait_phase(name, "running", Duration::from_secs(60))["status"]["host"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (x, y) = (make("a"), make("b"));
    assert_ne!(x, y, "two VMs publishing 8080 on one host");
    let z = (0..3)
        .map(|i| format!("sim-{i}"))
        .find(|h| *h != x && *h != y)
        .unwrap();

    let ev = c.ok(
        "POST",
        &format!("/api/v1/hosts/{x}/evacuate"),
        Some(json!({})),
    );
    assert_eq!(ev["refused"], json!({}), "{ev}");
    wait_until_explained(
        "a to move off its evacuated host",
        Duration::from_secs(120),
        || {
            let v = c.vm("a");
            (v["status"]["host"] == z.as_str() && v["status"]["migration"].is_null()).then_some(())
        },
        || format!("{}\n{}", c.vm("a"), c.logs_tail(30)),
    );

    let ev = c.ok(
        "POST",
        &format!("/api/v1/hosts/{z}/evacuate"),
        Some(json!({})),
    );
    let why = ev["refused"]["a"].as_str().unwrap_or_default();
    assert!(
        why.contains("where host port 8080/tcp is already published"),
        "{ev}"
    );
    assert_eq!(c.vm("a")["status"]["host"], z.as_str());

    c.ok(
        "PATCH",
        &format!("/api/v1/hosts/{x}"),
        Some(json!({"state": "ready"})),
    );
    let (s, v) = c.api(
        "POST",
        "/api/v1/vms/b/migrate",
        Some(json!({"to_host": z, "mode": "cold"})),
    );
    assert_eq!(s, 409, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("host port 8080/tcp is already published there by VM 'a'"),
        "{msg}"
    );
    assert_eq!(c.vm("b")["status"]["host"], y.as_str());
}
