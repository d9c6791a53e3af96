//! End to end: the agent's network data plane (issue 27) in real network
//! namespaces.
//!
//! Each test builds its own small world: an "underlay" namespace with a
//! bridge, and three "hosts", each a namespace with a veth on that bridge
//! and its own underlay address. The data plane runs inside each host
//! (`ip netns exec HOST virt8ra agent-network-apply`), exactly as the agent
//! runs it. Guests are stand-ins: a namespace per NIC whose veth, carrying
//! the NIC's MAC, is plugged into the network's bridge on its host where
//! QEMU's tap would be; one test runs the real test appliance under QEMU
//! on its tap. Then the tests check what a user of the network sees: pings
//! across hosts over VXLAN, isolation, DHCP leases, NAT; and what the
//! operator sees: a second apply changes nothing, removals leave nothing,
//! a "rebooted" host is rebuilt (by the next apply, or by the agent when
//! it starts).
//!
//! They need root (network namespaces); without it they say so and pass.
//! Every namespace a test creates is removed when it ends, also on
//! failure (a Drop guard), with the DHCP servers started in them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "netns/world.rs"]
mod world;

use std::path::{Path, PathBuf};
use std::process::Command;

use virt8ra_api::{device_names, mac_for_nic, tap_name, HostNetwork, HostNetworkState};
use world::*;

/// (a) three hosts, one network: every guest pings every other over
/// VXLAN with head-end replication, and its gateway; outbound traffic is
/// masqueraded (a guest reaches another host's underlay address, which has
/// no route back to the guest's subnet). (c) A second apply changes
/// nothing.
#[test]
fn three_hosts_ping_over_vxlan_and_a_second_apply_changes_nothing() {
    let Some(mut w) = World::new("a") else { return };
    let net = blue();
    for h in 0..3 {
        let changes = w.apply(h, &host_state(h, &[&net]));
        assert!(!changes.is_empty(), "the first apply creates the devices");
    }
    let guests = guests_ping_each_other(&mut w, &net);
    for (i, g) in guests.iter().enumerate() {
        assert!(
            ping(g, ip("10.50.0.1")),
            "guest {i} cannot ping its gateway"
        );
    }
    // Outbound NAT: host 1's underlay address, which routes 10.50.0.0/24
    // to its own bridge, answers guest 0 only because the request came
    // from host 0's address.
    assert!(
        ping(&guests[0], underlay(1)),
        "NAT to another host's address"
    );

    // Each host sends a remote MAC only to the host it is on.
    let fdb = must(&[
        "bridge",
        "-n",
        &w.hosts[0],
        "fdb",
        "show",
        "dev",
        &device_names("net-blue").vxlan,
    ]);
    let b_mac = mac_for_nic("nic-b").to_string();
    assert!(
        fdb.lines()
            .any(|l| l.contains(&b_mac) && l.contains(&format!("dst {}", underlay(1)))),
        "no forwarding entry for nic-b: {fdb}"
    );

    let before: Vec<Vec<String>> = (0..3).map(|h| w.snapshot(h)).collect();
    for (h, before) in before.iter().enumerate() {
        let changes = w.apply(h, &host_state(h, &[&net]));
        assert!(
            changes.is_empty(),
            "second apply on host {h} changed: {changes:?}"
        );
        let d = diff(before, &w.snapshot(h));
        assert!(d.is_empty(), "host {h} changed on the second apply: {d:#?}");
    }
    assert!(ping(&guests[2], ip("10.50.0.11")));
}

/// (b) Two networks with the same CIDR and the same addresses, on the same
/// hosts: each guest reaches only its own network's guests.
#[test]
fn two_networks_with_the_same_cidr_stay_isolated() {
    let Some(mut w) = World::new("b") else { return };
    let red = Net {
        spec: spec("net-red", "10.60.0.0/24", 6001, Some("10.60.0.1")),
        nat: false,
        hosts: vec![0, 1],
        nics: vec![(0, "red-0", "10.60.0.10"), (1, "red-1", "10.60.0.20")],
    };
    // Same CIDR, same first address, no gateway (a host routes to one
    // network of a CIDR only: validation allows one gateway per CIDR).
    let green = Net {
        spec: spec("net-green", "10.60.0.0/24", 6002, None),
        nat: false,
        hosts: vec![0, 1],
        nics: vec![(0, "green-0", "10.60.0.10"), (1, "green-1", "10.60.0.30")],
    };
    for h in 0..2 {
        w.apply(h, &host_state(h, &[&red, &green]));
    }
    let r0 = w.guest(0, "red-0", &red.spec, Some(ip("10.60.0.10")));
    let _r1 = w.guest(1, "red-1", &red.spec, Some(ip("10.60.0.20")));
    let g0 = w.guest(0, "green-0", &green.spec, Some(ip("10.60.0.10")));
    let _g1 = w.guest(1, "green-1", &green.spec, Some(ip("10.60.0.30")));
    assert!(ping(&r0, ip("10.60.0.20")), "red reaches red across hosts");
    assert!(
        ping(&g0, ip("10.60.0.30")),
        "green reaches green across hosts"
    );
    assert!(
        !ping(&r0, ip("10.60.0.30")),
        "red must not reach green's guest"
    );
    assert!(
        !ping(&g0, ip("10.60.0.20")),
        "green must not reach red's guest"
    );
    // Green has no gateway: red's gateway address is not there.
    assert!(
        !ping(&g0, ip("10.60.0.1")),
        "green must not reach red's gateway"
    );
    // The guest that answered red-0's ARP for .20 is red-1 (its MAC).
    let neigh = must(&["ip", "-n", &r0, "neigh", "show", "10.60.0.20"]);
    assert!(neigh.contains(&mac_for_nic("red-1").to_string()), "{neigh}");
}

/// Our devices, DHCP servers and rules on a host (with the network's
/// names), for "nothing is left" checks.
fn ours(w: &World, host: usize) -> String {
    let links = must(&["ip", "-n", &w.hosts[host], "-o", "link", "show"]);
    let mut s: Vec<String> = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("v8"))
        .collect();
    s.push(must(&[
        "ip",
        "netns",
        "exec",
        &w.hosts[host],
        "nft",
        "list",
        "ruleset",
    ]));
    let dhcp = w.data_dir(host).join("network/dhcp");
    if let Ok(rd) = std::fs::read_dir(&dhcp) {
        for e in rd.flatten() {
            s.push(format!("dhcp:{}", e.file_name().to_string_lossy()));
        }
    }
    s.push(must(&["ip", "netns", "pids", &w.hosts[host]]));
    s.join("\n")
}

/// (d) Removing a NIC removes its tap and its forwarding entries on the
/// other hosts; removing a network removes its bridge, VXLAN device, DHCP
/// server and rules; with no networks nothing of ours is left.
#[test]
fn removals_leave_nothing_behind() {
    let Some(w) = World::new("d") else { return };
    let mut net = blue();
    let red = Net {
        spec: spec("net-red", "10.61.0.0/24", 6101, Some("10.61.0.1")),
        nat: true,
        hosts: vec![0, 1],
        nics: vec![(0, "red-0", "10.61.0.10")],
    };
    for h in 0..3 {
        w.apply(h, &host_state(h, &[&net, &red]));
    }
    let h0 = ours(&w, 0);
    let red_names = device_names("net-red");
    assert!(
        h0.contains(&red_names.bridge) && h0.contains(&tap_name("red-0")),
        "{h0}"
    );
    assert!(h0.contains("dhcp:v8b-"), "{h0}");
    assert!(h0.contains("10.61.0.0/24"), "red's NAT rule: {h0}");

    // NIC nic-b goes: its tap on host 1, its entries on hosts 0 and 2.
    net.nics.retain(|(_, id, _)| *id != "nic-b");
    for h in 0..3 {
        w.apply(h, &host_state(h, &[&net, &red]));
    }
    assert!(!ours(&w, 1).contains(&tap_name("nic-b")));
    let b_mac = mac_for_nic("nic-b").to_string();
    for h in [0, 2] {
        let fdb = must(&["bridge", "-n", &w.hosts[h], "fdb", "show"]);
        assert!(
            !fdb.contains(&b_mac),
            "host {h} still forwards nic-b: {fdb}"
        );
    }

    // Network red goes.
    for h in 0..3 {
        w.apply(h, &host_state(h, &[&net]));
    }
    for h in 0..3 {
        let o = ours(&w, h);
        assert!(
            !o.contains(&red_names.bridge) && !o.contains(&red_names.vxlan),
            "{o}"
        );
        assert!(
            !o.contains(&tap_name("red-0")) && !o.contains("10.61.0.0/24"),
            "{o}"
        );
        assert!(!o.contains(&format!("dhcp:{}", red_names.bridge)), "{o}");
    }
    let blue_dhcp = ours(&w, 0);
    assert!(blue_dhcp.contains(&format!("dhcp:{}", device_names("net-blue").bridge)));

    // Everything goes.
    let empty = HostNetworkState {
        underlay: underlay(0),
        networks: vec![],
        tunnel: None,
    };
    for h in 0..3 {
        let empty = HostNetworkState {
            underlay: underlay(h),
            ..empty.clone()
        };
        w.apply(h, &empty);
        let o = ours(&w, h);
        assert_eq!(o.trim(), "", "host {h} keeps: {o}");
        assert!(w.apply(h, &empty).is_empty());
    }
}

/// `net` on all three hosts, a guest on hosts 0 and 1 that reach each
/// other, then host 1 "reboots": its devices and rules are gone (the
/// guest's port stays, as QEMU would reopen its tap). Returns guest 0.
fn guests_then_host_1_reboots(w: &mut World, net: &Net) -> String {
    for h in 0..3 {
        w.apply(h, &host_state(h, &[net]));
    }
    let g0 = w.guest(0, "nic-a", &net.spec, Some(ip("10.50.0.11")));
    w.guest(1, "nic-b", &net.spec, Some(ip("10.50.0.12")));
    assert!(ping(&g0, ip("10.50.0.12")));
    let h1 = w.hosts[1].clone();
    let names = device_names("net-blue");
    for dev in [&names.vxlan, &names.bridge, &tap_name("nic-b")] {
        must(&["ip", "-n", &h1, "link", "del", dev]);
    }
    must(&["ip", "netns", "exec", &h1, "nft", "flush", "ruleset"]);
    assert!(!ping(&g0, ip("10.50.0.12")), "host 1 is down");
    g0
}

/// (e) A host that lost every device and rule (a reboot) is rebuilt by
/// the next apply, and its guests reach the others again; its DHCP server
/// is restarted on the new bridge.
#[test]
fn a_rebooted_host_is_rebuilt() {
    let Some(mut w) = World::new("e") else { return };
    let net = blue();
    let g0 = guests_then_host_1_reboots(&mut w, &net);

    let changes = w.apply(1, &host_state(1, &[&net]));
    assert!(
        changes.iter().any(|c| c.contains("type vxlan")),
        "{changes:?}"
    );
    assert!(
        changes.iter().any(|c| c.contains("dnsmasq: started")),
        "{changes:?}"
    );
    assert!(changes.iter().any(|c| c.contains("nft")), "{changes:?}");
    w.plug(1, "gp1", &net.spec);
    assert!(
        ping(&g0, ip("10.50.0.12")),
        "rebuilt host 1 is reached again"
    );
    assert!(w.apply(1, &host_state(1, &[&net])).is_empty());
}

/// (e) An agent that starts on a rebooted host applies the network state
/// it kept before it does anything else (here it stops right after, at
/// "not joined yet": no control plane is needed for the rebuild).
#[test]
fn an_agent_start_rebuilds_the_kept_network_state() {
    let Some(mut w) = World::new("r") else { return };
    let net = blue();
    let g0 = guests_then_host_1_reboots(&mut w, &net);
    let h1 = w.hosts[1].clone();

    let data = w.data_dir(1);
    let o = sh(&[
        "ip",
        "netns",
        "exec",
        &h1,
        BIN,
        "agent",
        "--server",
        "http://127.0.0.1:9",
        "--data-dir",
        data.to_str().unwrap(),
        // The simulated driver: no QEMU needed to get to "not joined"
        // (and none of the QEMU test's PATH wrapper).
        "--driver",
        "sim",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not joined yet"),
        "{err}"
    );
    assert!(err.contains("network state re-applied"), "{err}");
    w.plug(1, "gp1", &net.spec);
    assert!(ping(&g0, ip("10.50.0.12")), "host 1 rebuilt at agent start");
    assert!(w.apply(1, &host_state(1, &[&net])).is_empty());
}

/// A NIC that moves to another host (what a migration will do) keeps its
/// MAC and address; every host's forwarding entry follows it, its old
/// tap goes, and it is reached at its new host.
#[test]
fn a_nic_that_moves_is_followed_by_the_forwarding_entries() {
    let Some(mut w) = World::new("m") else { return };
    let mut net = blue();
    for h in 0..3 {
        w.apply(h, &host_state(h, &[&net]));
    }
    let g0 = w.guest(0, "nic-a", &net.spec, Some(ip("10.50.0.11")));
    let old = w.guest(1, "nic-b", &net.spec, Some(ip("10.50.0.12")));
    assert!(ping(&g0, ip("10.50.0.12")));
    // nic-b's VM moves from host 1 to host 2.
    must(&["ip", "netns", "del", &old]);
    net.nics[1].0 = 2;
    for h in 0..3 {
        w.apply(h, &host_state(h, &[&net]));
    }
    let _new = w.guest(2, "nic-b-moved", &net.spec, None);
    // The stand-in's MAC is nic-b's (the guest keeps it).
    let moved = format!("{}-g-nic-b-moved", w.prefix);
    let mac = mac_for_nic("nic-b").to_string();
    must(&["ip", "-n", &moved, "link", "set", "eth0", "address", &mac]);
    must(&[
        "ip",
        "-n",
        &moved,
        "addr",
        "add",
        "10.50.0.12/24",
        "dev",
        "eth0",
    ]);
    let vx = device_names("net-blue").vxlan;
    let fdb = must(&["bridge", "-n", &w.hosts[0], "fdb", "show", "dev", &vx]);
    let to = |h: usize| format!("{mac} dst {}", underlay(h));
    assert!(fdb.contains(&to(2)) && !fdb.contains(&to(1)), "{fdb}");
    assert!(
        !ours(&w, 1).contains(&tap_name("nic-b")),
        "the old tap is gone"
    );
    assert!(
        ours(&w, 2).contains(&tap_name("nic-b")),
        "the new tap is there"
    );
    // A migrated guest announces itself (QEMU sends its MAC out after a
    // live migration); the stand-in does the same by sending first, so
    // host 2's bridge learns the MAC on its port instead of keeping what
    // it learned before the move (the VXLAN port). Without that the
    // test depended on the stand-in happening to send something.
    let _ = ping(&moved, ip("10.50.0.11"));
    // Host 0's guest may still have the old neighbour entry: same MAC, so
    // it goes on working once the overlay sends the MAC to host 2.
    assert!(
        ping(&g0, ip("10.50.0.12")),
        "the moved NIC is reached at host 2"
    );
}

/// (f) A guest without a configured address gets its static lease from
/// the DHCP server on its host's bridge (busybox udhcpc), with the
/// gateway, and then reaches a guest on another host.
#[test]
fn dhcp_hands_out_the_static_lease() {
    let Some(mut w) = World::new("f") else { return };
    let net = blue();
    for h in 0..3 {
        w.apply(h, &host_state(h, &[&net]));
    }
    let g2 = w.guest(2, "nic-c", &net.spec, None);
    let _g0 = w.guest(0, "nic-a", &net.spec, Some(ip("10.50.0.11")));
    let script = w.dir.path().join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\ncase \"$1\" in bound|renew)\n  ip addr add \"$ip/${mask:-24}\" dev \"$interface\"\n  \
         for r in $router; do ip route add default via \"$r\"; break; done\n  \
         echo \"ip=$ip mask=$mask router=$router dns=$dns mtu=$mtu\" ;;\nesac\n",
    )
    .unwrap();
    must(&["chmod", "+x", script.to_str().unwrap()]);
    let out = must(&[
        "ip",
        "netns",
        "exec",
        &g2,
        "busybox",
        "udhcpc",
        "-i",
        "eth0",
        "-n",
        "-q",
        "-t",
        "5",
        "-T",
        "1",
        "-O",
        "mtu",
        "-s",
        script.to_str().unwrap(),
    ]);
    assert!(
        out.contains("ip=10.50.0.13 mask=24 router=10.50.0.1 dns=192.0.2.53 mtu=1450"),
        "lease: {out}"
    );
    assert!(
        ping(&g2, ip("10.50.0.11")),
        "the leased guest reaches host 0's"
    );
    // A MAC without a lease gets nothing (and no other host's server
    // answers across the overlay).
    let stranger = w.guest(2, "nic-unknown", &net.spec, None);
    let o = sh(&[
        "ip",
        "netns",
        "exec",
        &stranger,
        "busybox",
        "udhcpc",
        "-i",
        "eth0",
        "-n",
        "-q",
        "-t",
        "3",
        "-T",
        "1",
        "-s",
        script.to_str().unwrap(),
    ]);
    assert!(
        !o.status.success(),
        "a stranger got a lease: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

/// Bad input: an invalid state is refused with a message naming the
/// problem, and nothing changes on the host.
#[test]
fn an_invalid_state_is_refused_and_changes_nothing() {
    let Some(w) = World::new("v") else { return };
    let net = blue();
    w.apply(0, &host_state(0, &[&net]));
    let before = w.snapshot(0);
    let mut bad = host_state(0, &[&net]);
    bad.networks[0].nics[0].ip = ip("10.99.0.5");
    bad.networks.push(HostNetwork {
        network: spec("net-new", "10.70.0.0/24", 7001, Some("10.70.0.1")),
        nat: false,
        nics: vec![],
        peers: vec![],
        fdb: vec![],
    });
    let o = w.try_apply(0, &bad);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("10.99.0.5 is not a host address of network net-blue"),
        "{err}"
    );
    let d = diff(&before, &w.snapshot(0));
    assert!(d.is_empty(), "a refused state changed the host: {d:#?}");

    let file: &Path = &w.dir.path().join("junk.json");
    std::fs::write(
        file,
        r#"{"underlay":"192.168.77.1","networks":[{"network":{}}]}"#,
    )
    .unwrap();
    let o = sh(&[
        "ip",
        "netns",
        "exec",
        &w.hosts[0],
        BIN,
        "agent-network-apply",
        "--desired",
        file.to_str().unwrap(),
        "--data-dir",
        w.data_dir(0).to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("junk.json") && err.contains("missing field"),
        "{err}"
    );
    let d = diff(&before, &w.snapshot(0));
    assert!(d.is_empty(), "a refused file changed the host: {d:#?}");
}

/// The test appliance (scripts/test-image.sh builds it once, cached).
fn test_image() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("bash")
        .arg(root.join("scripts/test-image.sh"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run scripts/test-image.sh");
    assert!(out.status.success(), "scripts/test-image.sh failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A real guest: the test appliance under QEMU (the agent's QEMU driver)
/// with one NIC on the network's tap on host 0 and no network
/// configuration, so it asks DHCP; it gets its static lease from host 0's
/// server, and a guest on host 1 reaches it across VXLAN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_guest_on_a_tap_gets_its_lease_and_is_reached_across_vxlan() {
    use virt8ra_agent::driver::qemu::{AccelChoice, QemuDriver};
    use virt8ra_agent::driver::{Driver, GuestContext, NicConfig, VmConfig};

    let Some(mut w) = World::new("q") else { return };
    let image = test_image();
    let net = blue();
    for h in 0..3 {
        w.apply(h, &host_state(h, &[&net]));
    }
    // QEMU must open its tap in host 0's namespace: the driver runs
    // `qemu-system-x86_64` through PATH, here a wrapper that enters it.
    // (Only this test runs QEMU in this file; the others' commands are
    // not in the wrapper's directory.)
    let qemu = must(&["sh", "-c", "command -v qemu-system-x86_64"]);
    let bin = w.dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let wrapper = bin.join("qemu-system-x86_64");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec ip netns exec {} {} \"$@\"\n",
            w.hosts[0],
            qemu.trim()
        ),
    )
    .unwrap();
    must(&["chmod", "+x", wrapper.to_str().unwrap()]);
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::set_var("PATH", format!("{}:{path}", bin.display()));

    let d = QemuDriver::new(w.dir.path().join("vms"), AccelChoice::Emulation)
        .await
        .unwrap();
    let cfg = VmConfig {
        id: "vm-a".into(),
        name: "guest-a".into(),
        vcpus: 1,
        memory_mib: 128,
        disk_gib: 1,
        base_image: image,
        ports: vec![],
        context: GuestContext {
            instance_id: "vm-a".into(),
            hostname: "guest-a".into(),
            ..Default::default()
        },
        machine: None,
        data_disks: vec![],
        nics: vec![NicConfig {
            tap: tap_name("nic-a"),
            mac: mac_for_nic("nic-a"),
        }],
    };
    d.prepare(&cfg).await.unwrap();
    d.start(&cfg).await.unwrap();
    std::env::set_var("PATH", path);
    let cmd = std::fs::read_to_string(d.vm_dir("vm-a").join("vm.json")).unwrap();
    assert!(
        cmd.contains(&format!("ifname={}", tap_name("nic-a"))),
        "{cmd}"
    );
    assert!(!cmd.contains("user,id=net0"), "{cmd}");

    let start = std::time::Instant::now();
    let console = loop {
        let c = std::fs::read_to_string(d.console_path("vm-a")).unwrap_or_default();
        if c.contains("VIRT8RA-GUEST-BOOTED") {
            break c;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(300),
            "the guest did not boot: {c}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    let line = console
        .lines()
        .find(|l| l.starts_with("VIRT8RA-NET eth0"))
        .unwrap_or_default()
        .to_string();
    assert!(
        line.contains("addr=10.50.0.11/24")
            && line.contains("gw=10.50.0.1")
            && line.contains("dhcp4=true"),
        "the guest's network: {line:?}\n{console}"
    );
    let g1 = w.guest(1, "nic-b", &net.spec, Some(ip("10.50.0.12")));
    let reached = ping(&g1, ip("10.50.0.11"));
    d.destroy("vm-a").await.unwrap();
    assert!(
        reached,
        "a guest on host 1 cannot reach the QEMU guest on host 0"
    );
}
