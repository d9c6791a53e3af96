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

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use virt8ra_api::{
    device_names, mac_for_nic, tap_name, FdbEntry, HostNetwork, HostNetworkState, LocalNic,
    NetworkSpec, Peer,
};

const BIN: &str = env!("CARGO_BIN_EXE_virt8ra");

fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {args:?}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
fn must(args: &[&str]) -> String {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// One test's namespaces and files; dropping it removes them all.
struct World {
    prefix: String,
    namespaces: Vec<String>,
    dir: tempfile::TempDir,
    hosts: Vec<String>,
    next_port: usize,
}

impl Drop for World {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            // Processes we started in it (DHCP servers, udhcpc): by pid.
            let pids = sh(&["ip", "netns", "pids", ns]);
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = sh(&["kill", "-9", pid]);
            }
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

fn underlay(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 77, i as u8 + 1)
}

impl World {
    /// Three hosts on one underlay, or `None` without the privileges to
    /// make namespaces.
    fn new(tag: &str) -> Option<World> {
        let prefix = format!("v8n{}{tag}", std::process::id() % 100_000);
        let ul = format!("{prefix}-ul");
        let o = sh(&["ip", "netns", "add", &ul]);
        if !o.status.success() {
            eprintln!(
                "SKIPPED: cannot create a network namespace ({}); these tests need root",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return None;
        }
        let mut w = World {
            prefix,
            namespaces: vec![ul.clone()],
            dir: tempfile::tempdir().unwrap(),
            hosts: Vec::new(),
            next_port: 0,
        };
        must(&["ip", "-n", &ul, "link", "add", "ul", "type", "bridge"]);
        must(&["ip", "-n", &ul, "link", "set", "ul", "up"]);
        for i in 0..3 {
            let h = w.add_ns(&format!("h{}", i + 1));
            let port = format!("p{i}");
            must(&[
                "ip", "-n", &h, "link", "add", "eth0", "type", "veth", "peer", "name", &port,
                "netns", &ul,
            ]);
            must(&["ip", "-n", &ul, "link", "set", &port, "master", "ul", "up"]);
            let addr = format!("{}/24", underlay(i));
            must(&["ip", "-n", &h, "addr", "add", &addr, "dev", "eth0"]);
            must(&["ip", "-n", &h, "link", "set", "eth0", "up"]);
            must(&["ip", "-n", &h, "link", "set", "lo", "up"]);
            w.hosts.push(h);
        }
        Some(w)
    }

    fn add_ns(&mut self, name: &str) -> String {
        let ns = format!("{}-{name}", self.prefix);
        must(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ns
    }

    fn data_dir(&self, host: usize) -> PathBuf {
        self.dir.path().join(format!("host{host}"))
    }

    /// Runs the data plane on `host` with `state`; returns what it changed.
    fn apply(&self, host: usize, state: &HostNetworkState) -> Vec<String> {
        let o = self.try_apply(host, state);
        assert!(
            o.status.success(),
            "apply on host {host} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn try_apply(&self, host: usize, state: &HostNetworkState) -> std::process::Output {
        let file = self.dir.path().join(format!("desired-{host}.json"));
        std::fs::write(&file, serde_json::to_vec_pretty(state).unwrap()).unwrap();
        let data = self.data_dir(host);
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.hosts[host],
            BIN,
            "agent-network-apply",
            "--desired",
            file.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ])
    }

    /// A stand-in guest for NIC `nic` of network `net` on `host`: a
    /// namespace whose `eth0` has the NIC's MAC and is plugged into the
    /// network's bridge. `addr`: a static address (with the gateway as
    /// default route, if any); `None` leaves it to DHCP.
    fn guest(
        &mut self,
        host: usize,
        nic: &str,
        net: &NetworkSpec,
        addr: Option<Ipv4Addr>,
    ) -> String {
        let g = self.add_ns(&format!("g-{nic}"));
        let port = format!("gp{}", self.next_port);
        self.next_port += 1;
        let h = self.hosts[host].clone();
        must(&[
            "ip", "-n", &g, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
            &h,
        ]);
        let mac = mac_for_nic(nic).to_string();
        let mtu = net.mtu.to_string();
        must(&[
            "ip", "-n", &g, "link", "set", "eth0", "address", &mac, "mtu", &mtu, "up",
        ]);
        must(&["ip", "-n", &g, "link", "set", "lo", "up"]);
        must(&["ip", "-n", &h, "link", "set", &port, "mtu", &mtu, "up"]);
        self.plug(host, &port, net);
        if let Some(a) = addr {
            let cidr = format!("{a}/{}", net.cidr.prefix());
            must(&["ip", "-n", &g, "addr", "add", &cidr, "dev", "eth0"]);
            if let Some(gw) = net.gateway {
                must(&[
                    "ip",
                    "-n",
                    &g,
                    "route",
                    "add",
                    "default",
                    "via",
                    &gw.to_string(),
                ]);
            }
        }
        g
    }

    /// Plugs host port `port` into `net`'s bridge (what QEMU's tap is).
    fn plug(&self, host: usize, port: &str, net: &NetworkSpec) {
        let br = device_names(&net.id).bridge;
        must(&[
            "ip",
            "-n",
            &self.hosts[host],
            "link",
            "set",
            port,
            "master",
            &br,
        ]);
    }

    /// What the host's data plane looks like: devices with their kinds,
    /// settings and indexes (a recreated one differs), static forwarding
    /// entries, IPv4 addresses, rules. Timers, learned entries and IPv6
    /// address states, which move by themselves, are left out.
    fn snapshot(&self, host: usize) -> Vec<String> {
        let h = &self.hosts[host];
        let mut s = Vec::new();
        for l in must(&["ip", "-n", h, "-d", "-o", "link", "show"]).lines() {
            let mut out = Vec::new();
            let mut words = l.split_whitespace();
            while let Some(w) = words.next() {
                if w.ends_with("_timer") {
                    words.next();
                } else {
                    out.push(w);
                }
            }
            s.push(out.join(" "));
        }
        let fdb = must(&["bridge", "-n", h, "fdb", "show"]);
        s.extend(
            fdb.lines()
                .filter(|l| l.contains("permanent"))
                .map(str::to_string),
        );
        s.extend(
            must(&["ip", "-n", h, "-4", "-o", "addr", "show"])
                .lines()
                .map(str::to_string),
        );
        let nft = must(&["ip", "netns", "exec", h, "nft", "list", "ruleset"]);
        s.extend(nft.lines().map(str::to_string));
        s
    }
}

/// The lines in which two snapshots differ.
fn diff(a: &[String], b: &[String]) -> Vec<String> {
    let gone = a
        .iter()
        .filter(|l| !b.contains(l))
        .map(|l| format!("- {l}"));
    let new = b
        .iter()
        .filter(|l| !a.contains(l))
        .map(|l| format!("+ {l}"));
    gone.chain(new).collect()
}

fn ping(from: &str, to: Ipv4Addr) -> bool {
    sh(&[
        "ip",
        "netns",
        "exec",
        from,
        "busybox",
        "ping",
        "-c",
        "3",
        "-i",
        "0.2",
        "-w",
        "3",
        &to.to_string(),
    ])
    .status
    .success()
}

fn spec(id: &str, cidr: &str, vni: u32, gateway: Option<&str>) -> NetworkSpec {
    NetworkSpec {
        id: id.into(),
        name: id.into(),
        cidr: cidr.parse().unwrap(),
        gateway: gateway.map(|g| g.parse().unwrap()),
        dns: vec![Ipv4Addr::new(192, 0, 2, 53)],
        vni,
        mtu: 1450,
    }
}

/// A network as the control plane will describe it: its spec, whether it
/// NATs, its hosts, and its NICs as (host, NIC id, address).
struct Net {
    spec: NetworkSpec,
    nat: bool,
    hosts: Vec<usize>,
    nics: Vec<(usize, &'static str, &'static str)>,
}

/// The state of `host`: each network it carries, its NICs there, the
/// other hosts as peers and their NICs as forwarding entries.
fn host_state(host: usize, nets: &[&Net]) -> HostNetworkState {
    let networks = nets
        .iter()
        .filter(|n| n.hosts.contains(&host))
        .map(|n| HostNetwork {
            network: n.spec.clone(),
            nat: n.nat,
            nics: n
                .nics
                .iter()
                .filter(|(h, ..)| *h == host)
                .map(|(_, id, ip)| LocalNic {
                    id: id.to_string(),
                    vm: format!("vm-{id}"),
                    tap: tap_name(id),
                    mac: mac_for_nic(id),
                    ip: ip.parse().unwrap(),
                    ingress: None,
                    publish: vec![],
                })
                .collect(),
            peers: n
                .hosts
                .iter()
                .filter(|h| **h != host)
                .map(|h| Peer {
                    host: format!("host{h}"),
                    underlay: underlay(*h),
                })
                .collect(),
            fdb: n
                .nics
                .iter()
                .filter(|(h, ..)| *h != host)
                .map(|(h, id, _)| FdbEntry {
                    mac: mac_for_nic(id),
                    peer: underlay(*h),
                })
                .collect(),
        })
        .collect();
    HostNetworkState {
        underlay: underlay(host),
        networks,
        tunnel: None,
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// A stand-in guest for each of `net`'s NICs, at its static address;
/// asserts that each pings every other. Returns their namespaces.
fn guests_ping_each_other(w: &mut World, net: &Net) -> Vec<String> {
    let guests: Vec<String> = net
        .nics
        .iter()
        .map(|(h, id, a)| w.guest(*h, id, &net.spec, Some(ip(a))))
        .collect();
    for (i, g) in guests.iter().enumerate() {
        for (j, (_, _, a)) in net.nics.iter().enumerate() {
            if i != j {
                assert!(ping(g, ip(a)), "guest {i} cannot ping {a}");
            }
        }
    }
    guests
}

fn blue() -> Net {
    Net {
        spec: spec("net-blue", "10.50.0.0/24", 5001, Some("10.50.0.1")),
        nat: true,
        hosts: vec![0, 1, 2],
        nics: vec![
            (0, "nic-a", "10.50.0.11"),
            (1, "nic-b", "10.50.0.12"),
            (2, "nic-c", "10.50.0.13"),
        ],
    }
}

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

/// (e) A host that lost every device and rule (a reboot) is rebuilt by
/// the next apply, and its guests reach the others again; its DHCP server
/// is restarted on the new bridge.
#[test]
fn a_rebooted_host_is_rebuilt() {
    let Some(mut w) = World::new("e") else { return };
    let net = blue();
    for h in 0..3 {
        w.apply(h, &host_state(h, &[&net]));
    }
    let g0 = w.guest(0, "nic-a", &net.spec, Some(ip("10.50.0.11")));
    let _g1 = w.guest(1, "nic-b", &net.spec, Some(ip("10.50.0.12")));
    assert!(ping(&g0, ip("10.50.0.12")));

    // "Reboot" host 1: its devices and rules are gone (the guest's port
    // stays, as QEMU would reopen its tap).
    let h1 = w.hosts[1].clone();
    let names = device_names("net-blue");
    for dev in [&names.vxlan, &names.bridge, &tap_name("nic-b")] {
        must(&["ip", "-n", &h1, "link", "del", dev]);
    }
    must(&["ip", "netns", "exec", &h1, "nft", "flush", "ruleset"]);
    assert!(!ping(&g0, ip("10.50.0.12")), "host 1 is down");

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
    for h in 0..3 {
        w.apply(h, &host_state(h, &[&net]));
    }
    let g0 = w.guest(0, "nic-a", &net.spec, Some(ip("10.50.0.11")));
    let _g1 = w.guest(1, "nic-b", &net.spec, Some(ip("10.50.0.12")));
    assert!(ping(&g0, ip("10.50.0.12")));
    let h1 = w.hosts[1].clone();
    let names = device_names("net-blue");
    for dev in [&names.vxlan, &names.bridge, &tap_name("nic-b")] {
        must(&["ip", "-n", &h1, "link", "del", dev]);
    }
    must(&["ip", "netns", "exec", &h1, "nft", "flush", "ruleset"]);
    assert!(!ping(&g0, ip("10.50.0.12")), "host 1 is down");

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

/// Sites for the tunnel test: hosts 0 and 2 share site A (a trusted
/// fabric: plain VXLAN between them), host 1 is at site B (encrypted).
fn site_of(host: usize) -> char {
    if host == 1 {
        'B'
    } else {
        'A'
    }
}

fn tunnel_address(host: usize) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, 0, host as u8 + 1)
}

/// Where `from` sends VXLAN traffic for `to`: its underlay address within
/// a site, its tunnel address between sites.
fn vxlan_remote(from: usize, to: usize) -> Ipv4Addr {
    if site_of(from) == site_of(to) {
        underlay(to)
    } else {
        tunnel_address(to)
    }
}

/// `host_state`, with a tunnel to every host at another site and the
/// peers there reached through it.
fn tunnel_host_state(host: usize, nets: &[&Net], keys: &[String]) -> HostNetworkState {
    let mut s = host_state(host, nets);
    for hn in &mut s.networks {
        for p in &mut hn.peers {
            let to: usize = p.host.trim_start_matches("host").parse().unwrap();
            p.underlay = vxlan_remote(host, to);
        }
        for f in &mut hn.fdb {
            let to = (0..3).find(|h| underlay(*h) == f.peer).unwrap();
            f.peer = vxlan_remote(host, to);
        }
    }
    s.tunnel = Some(virt8ra_api::TunnelState {
        address: tunnel_address(host),
        prefix: 24,
        listen_port: virt8ra_api::TUNNEL_PORT,
        peers: (0..3)
            .filter(|h| site_of(*h) != site_of(host))
            .map(|h| virt8ra_api::TunnelPeer {
                host: format!("host{h}"),
                public_key: keys[h].clone(),
                endpoint: Some(std::net::SocketAddrV4::new(
                    underlay(h),
                    virt8ra_api::TUNNEL_PORT,
                )),
                address: tunnel_address(h),
                relays_for: vec![],
                keepalive: None,
            })
            .collect(),
        relay: false,
    });
    s
}

/// Captures the frames on `dev` of namespace `ns` for `secs` seconds
/// (an AF_PACKET socket, as tcpdump uses) and counts those carrying
/// `marker`, and the UDP datagrams to or from the tunnel port.
fn capture(ns: &str, dev: &str, secs: f64, marker: &str) -> std::process::Child {
    const SNIFF: &str = r#"
import socket, sys, time, json
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
s.bind((sys.argv[1], 0))
s.settimeout(0.1)
marker, port = sys.argv[3].encode(), int(sys.argv[4])
end = time.time() + float(sys.argv[2])
frames = hits = tunnel = 0
print("capturing", flush=True)
while time.time() < end:
    try:
        d = s.recv(65535)
    except socket.timeout:
        continue
    frames += 1
    hits += marker in d
    if d[12:14] == b"\x08\x00" and d[23] == 17:
        o = 14 + (d[14] & 15) * 4
        if port in (int.from_bytes(d[o:o+2], "big"), int.from_bytes(d[o+2:o+4], "big")):
            tunnel += 1
print(json.dumps({"frames": frames, "marker": hits, "tunnel": tunnel}), flush=True)
"#;
    Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", SNIFF, dev])
        .arg(secs.to_string())
        .arg(marker)
        .arg(virt8ra_api::TUNNEL_PORT.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn capture_result(mut c: std::process::Child) -> serde_json::Value {
    use std::io::Read;
    c.wait().unwrap();
    let mut out = String::new();
    c.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let last = out.lines().last().unwrap_or_default().to_string();
    serde_json::from_str(&last).unwrap_or_else(|e| panic!("capture printed {out:?}: {e}"))
}

/// Sends `marker` in UDP datagrams from guest namespace `from` to `to`.
fn send_marker(from: &str, to: Ipv4Addr, marker: &str) {
    let script = "import socket,sys,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor _ in range(20):\n    s.sendto(sys.argv[2].encode()*4,(sys.argv[1],9999)); time.sleep(0.02)\n";
    must(&[
        "ip",
        "netns",
        "exec",
        from,
        "python3",
        "-c",
        script,
        &to.to_string(),
        marker,
    ]);
}

/// Issue 27, item 3: traffic that leaves a site travels encrypted. Host 1
/// is at another site than hosts 0 and 2: the network's frames to and
/// from it go through the hosts' tunnels (userspace WireGuard, the
/// agent's own data path), while hosts 0 and 2 talk plain VXLAN. Guests
/// reach each other either way; a capture on host 1's underlay link sees
/// the tunnel's datagrams and never the marker the guests send, while the
/// same capture on host 2's link (the plain path, the control) does.
#[test]
fn traffic_between_sites_is_encrypted_and_within_a_site_is_not() {
    let Some(mut w) = World::new("t") else { return };
    let mut net = blue();
    net.spec.mtu = virt8ra_api::DEFAULT_MTU;
    let mut keys = Vec::new();
    for h in 0..3 {
        let dir = w.data_dir(h).join("network");
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("tunnel.key");
        let out = must(&[BIN, "tunnel", "genkey", key.to_str().unwrap()]);
        keys.push(out.trim().to_string());
    }
    // Each host's data plane stays up (`--hold`): the tunnel lives in its
    // process, as in the agent's.
    let held: Vec<Served> = (0..3)
        .map(|h| hold_apply(&w, h, &tunnel_host_state(h, &[&net], &keys)))
        .collect();
    let guests = guests_ping_each_other(&mut w, &net);
    let tunnel = must(&["ip", "-n", &w.hosts[0], "-o", "addr", "show", "dev", "v8w0"]);
    assert!(tunnel.contains("100.64.0.1/24"), "{tunnel}");

    let marker = format!("V8-PLAINTEXT-{}", std::process::id());
    let ul = w.namespaces[0].clone();
    let site_b = capture(&ul, "p1", 4.0, &marker);
    let site_a = capture(&ul, "p2", 4.0, &marker);
    std::thread::sleep(std::time::Duration::from_millis(800));
    send_marker(&guests[0], ip("10.50.0.12"), &marker);
    send_marker(&guests[0], ip("10.50.0.13"), &marker);
    send_marker(&guests[2], ip("10.50.0.12"), &marker);
    let (b, a) = (capture_result(site_b), capture_result(site_a));
    assert_eq!(b["marker"], 0, "plaintext on the link between sites: {b}");
    assert!(
        b["tunnel"].as_u64().unwrap() >= 40,
        "the guests' datagrams to host 1 went through the tunnel: {b}"
    );
    assert!(
        a["marker"].as_u64().unwrap() >= 20,
        "the control: the plain VXLAN path within site A carries the marker: {a}"
    );

    // Each tunnel's counters, printed when it stops: it had peers.
    for mut c in held {
        must(&["kill", "-TERM", &c.0.id().to_string()]);
        c.0.wait().unwrap();
        let mut out = String::new();
        use std::io::Read;
        c.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        let stats: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or("{}"))
            .unwrap_or_else(|e| panic!("stats {out:?}: {e}"));
        let peers = stats["peers"].as_array().cloned().unwrap_or_default();
        assert!(!peers.is_empty(), "{stats}");
    }
}

/// A server started in a namespace; stopped when dropped.
struct Served(std::process::Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Serves TCP `ports` in namespace `ns`: each connection gets `PORT` back.
fn serve_tcp(ns: &str, ports: &[u16]) -> Served {
    const SERVE: &str = r#"
import socket, sys, threading
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16)
    while True:
        c, _ = s.accept(); c.sendall(str(port).encode()); c.close()
for p in sys.argv[1:]:
    threading.Thread(target=serve, args=(int(p),)).start()
print("serving", flush=True)
"#;
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "python3", "-c", SERVE]);
    c.args(ports.iter().map(|p| p.to_string()));
    let mut child = c.stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "serving");
    Served(child)
}

/// What a TCP connection from `ns` to `to:port` reads (`None`: it could
/// not connect within 2 s).
fn tcp_read(ns: &str, to: Ipv4Addr, port: u16) -> Option<String> {
    const CONNECT: &str = r#"
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
    print("ok", s.recv(64).decode())
except Exception as e:
    print("fail", e)
"#;
    let out = must(&[
        "ip",
        "netns",
        "exec",
        ns,
        "python3",
        "-c",
        CONNECT,
        &to.to_string(),
        &port.to_string(),
    ]);
    out.trim().strip_prefix("ok ").map(str::to_string)
}

/// Issue 27, item 4: a published port is reached from another namespace
/// through the host's address, and a security group lets in what its
/// rules name and drops the rest, from guests of the same network too
/// (bridged frames); a NIC without rules takes its network's members.
#[test]
fn a_published_port_is_reached_and_a_security_group_filters() {
    let Some(mut w) = World::new("s") else { return };
    let mut net = blue();
    net.hosts = vec![0, 1];
    net.nics.truncate(2);
    let guarded = |h: usize| {
        let mut s = host_state(h, &[&net]);
        for nic in &mut s.networks[0].nics {
            if nic.id == "nic-a" {
                nic.ingress = Some(vec![serde_json::from_str(
                    r#"{"protocol":"tcp","ports":"22"}"#,
                )
                .unwrap()]);
                nic.publish = vec!["8080:80".parse().unwrap()];
            }
        }
        s
    };
    // As on a host where br_netfilter is off: the data plane turns it on.
    let nf = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    for h in 0..2 {
        let off = format!("echo 0 > {nf}");
        must(&["ip", "netns", "exec", &w.hosts[h], "sh", "-c", &off]);
        w.apply(h, &guarded(h));
        let now = must(&["ip", "netns", "exec", &w.hosts[h], "cat", nf]);
        assert_eq!(now.trim(), "1", "host {h}");
    }
    let a = w.guest(0, "nic-a", &net.spec, Some(ip("10.50.0.11")));
    let b = w.guest(1, "nic-b", &net.spec, Some(ip("10.50.0.12")));
    let _served_a = serve_tcp(&a, &[22, 23, 80]);
    let _served_b = serve_tcp(&b, &[22]);

    // Let in: tcp/22 from anyone, replies to a's own connections.
    assert_eq!(tcp_read(&b, ip("10.50.0.11"), 22).as_deref(), Some("22"));
    assert_eq!(tcp_read(&a, ip("10.50.0.12"), 22).as_deref(), Some("22"));
    assert!(ping(&a, ip("10.50.0.12")), "b takes its network's members");
    // Dropped: another port, ICMP, and port 80 unless published.
    assert_eq!(
        tcp_read(&b, ip("10.50.0.11"), 23),
        None,
        "tcp/23 is not let in"
    );
    assert_eq!(
        tcp_read(&b, ip("10.50.0.11"), 80),
        None,
        "80 only published"
    );
    assert!(!ping(&b, ip("10.50.0.11")), "ICMP is not let in");

    // Published: a client outside every network reaches a's port 80
    // through host 0's underlay address, port 8080.
    let ul = w.namespaces[0].clone();
    must(&[
        "ip",
        "-n",
        &ul,
        "addr",
        "add",
        "192.168.77.100/24",
        "dev",
        "ul",
    ]);
    assert_eq!(tcp_read(&ul, underlay(0), 8080).as_deref(), Some("80"));
    assert_eq!(tcp_read(&ul, underlay(0), 8081), None);
    assert_eq!(
        tcp_read(&ul, underlay(1), 8080),
        None,
        "host 1 publishes nothing"
    );

    // Without the rules, a takes its members again (ICMP, port 23) and
    // the published port is gone; nothing else changed on a second apply.
    w.apply(0, &host_state(0, &[&net]));
    assert!(ping(&b, ip("10.50.0.11")), "members reach a again");
    assert_eq!(tcp_read(&b, ip("10.50.0.11"), 23).as_deref(), Some("23"));
    assert_eq!(
        tcp_read(&ul, underlay(0), 8080),
        None,
        "no longer published"
    );
    assert!(w.apply(0, &host_state(0, &[&net])).is_empty());
}

/// Runs the data plane on `host` with `state` and keeps it running
/// (`--hold`: the tunnel lives in its process); returns once applied.
fn hold_apply(w: &World, host: usize, state: &HostNetworkState) -> Served {
    use std::io::BufRead;
    let file = w.dir.path().join(format!("desired-{host}.json"));
    std::fs::write(&file, serde_json::to_vec_pretty(state).unwrap()).unwrap();
    let mut served = Served(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &w.hosts[host],
                BIN,
                "agent-network-apply",
                "--hold",
            ])
            .arg("--desired")
            .arg(&file)
            .arg("--data-dir")
            .arg(w.data_dir(host))
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut err = std::io::BufReader::new(served.0.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            panic!("apply on host {host} ended: {seen}");
        }
        seen.push_str(&line);
        if line.contains("change(s)") {
            return served;
        }
    }
}

/// Issue 27, item 3: a host behind NAT (no address its peers can reach)
/// joins through a relay. Host 2 sits behind a NAT router; it dials host 0
/// (keepalives hold the mapping open), host 0 learns its endpoint from its
/// packets and forwards between it and host 1, which reaches host 2 only
/// through host 0. Every guest pings every other, all encrypted.
#[test]
fn a_host_behind_nat_joins_through_a_relay() {
    let Some(mut w) = World::new("n") else { return };
    // Host 2 moves behind a NAT router: a private link 10.9.0.0/24, the
    // router masquerading onto the underlay at 192.168.77.50.
    let h2 = w.hosts[2].clone();
    let ul = w.namespaces[0].clone();
    let r = w.add_ns("rtr");
    must(&["ip", "-n", &h2, "link", "del", "eth0"]);
    must(&[
        "ip", "-n", &r, "link", "add", "eth0", "type", "veth", "peer", "name", "pr", "netns", &ul,
    ]);
    must(&["ip", "-n", &ul, "link", "set", "pr", "master", "ul", "up"]);
    must(&[
        "ip",
        "-n",
        &r,
        "addr",
        "add",
        "192.168.77.50/24",
        "dev",
        "eth0",
    ]);
    must(&["ip", "-n", &r, "link", "set", "eth0", "up"]);
    must(&[
        "ip", "-n", &r, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", &h2,
    ]);
    must(&["ip", "-n", &r, "addr", "add", "10.9.0.1/24", "dev", "lan"]);
    must(&["ip", "-n", &r, "link", "set", "lan", "up"]);
    must(&["ip", "-n", &h2, "addr", "add", "10.9.0.2/24", "dev", "eth0"]);
    must(&["ip", "-n", &h2, "link", "set", "eth0", "up"]);
    must(&[
        "ip", "-n", &h2, "route", "add", "default", "via", "10.9.0.1",
    ]);
    must(&[
        "ip",
        "netns",
        "exec",
        &r,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    must(&[
        "ip", "netns", "exec", &r, "nft",
        "add table ip nat; add chain ip nat post { type nat hook postrouting priority srcnat; }; add rule ip nat post oifname eth0 masquerade",
    ]);
    let private = ip("10.9.0.2");
    // Host 2 reaches host 0, host 0 cannot reach host 2.
    assert!(ping(&h2, underlay(0)));
    assert!(!ping(&w.hosts[0], private));

    let mut net = blue();
    net.spec.mtu = virt8ra_api::DEFAULT_MTU;
    // No NAT, which would turn forwarding on by itself: the relay must.
    net.nat = false;
    let keys: Vec<String> = (0..3)
        .map(|h| {
            let dir = w.data_dir(h).join("network");
            std::fs::create_dir_all(&dir).unwrap();
            let key = dir.join("tunnel.key");
            must(&[BIN, "tunnel", "genkey", key.to_str().unwrap()])
                .trim()
                .to_string()
        })
        .collect();
    let peer =
        |h: usize, reachable: bool, relays_for: Vec<Ipv4Addr>, keepalive| virt8ra_api::TunnelPeer {
            host: format!("host{h}"),
            public_key: keys[h].clone(),
            endpoint: reachable
                .then(|| std::net::SocketAddrV4::new(underlay(h), virt8ra_api::TUNNEL_PORT)),
            address: tunnel_address(h),
            relays_for,
            keepalive,
        };
    // Every peer at another site: reached at its tunnel address.
    let state = |h: usize, peers: Vec<virt8ra_api::TunnelPeer>, relay: bool| {
        let mut s = host_state(h, &[&net]);
        if h == 2 {
            s.underlay = private;
        }
        for hn in &mut s.networks {
            for p in &mut hn.peers {
                let to: usize = p.host.trim_start_matches("host").parse().unwrap();
                p.underlay = tunnel_address(to);
            }
            for f in &mut hn.fdb {
                let to = (0..3).find(|h| underlay(*h) == f.peer).unwrap();
                f.peer = tunnel_address(to);
            }
        }
        s.tunnel = Some(virt8ra_api::TunnelState {
            address: tunnel_address(h),
            prefix: 24,
            listen_port: virt8ra_api::TUNNEL_PORT,
            peers,
            relay,
        });
        s
    };
    let _held = [
        hold_apply(
            &w,
            0,
            &state(
                0,
                vec![peer(1, true, vec![], None), peer(2, false, vec![], None)],
                true,
            ),
        ),
        hold_apply(
            &w,
            1,
            &state(1, vec![peer(0, true, vec![tunnel_address(2)], None)], false),
        ),
        hold_apply(
            &w,
            2,
            &state(
                2,
                vec![peer(0, true, vec![tunnel_address(1)], Some(1))],
                false,
            ),
        ),
    ];
    guests_ping_each_other(&mut w, &net);
    let fwd = must(&[
        "ip",
        "netns",
        "exec",
        &w.hosts[0],
        "cat",
        "/proc/sys/net/ipv4/ip_forward",
    ]);
    assert_eq!(fwd.trim(), "1", "the relay forwards");
}
