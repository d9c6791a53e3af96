//! The namespaces of the network end-to-end tests (`tests/netns.rs`,
//! `tests/netns_secure.rs`): an underlay bridge and three "hosts", each a
//! namespace with its own underlay address, the data plane applied in
//! them as the agent applies it, stand-in guests, and helpers to check
//! what they see. Each file includes it with `#[path]`; not every file
//! uses every helper.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use virt8ra_api::{
    device_names, mac_for_nic, tap_name, FdbEntry, HostNetwork, HostNetworkState, LocalNic,
    NetworkSpec, Peer,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_virt8ra");

pub fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {args:?}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn must(args: &[&str]) -> String {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// One test's namespaces and files; dropping it removes them all.
pub struct World {
    pub prefix: String,
    pub namespaces: Vec<String>,
    pub dir: tempfile::TempDir,
    pub hosts: Vec<String>,
    pub next_port: usize,
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

pub fn underlay(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 77, i as u8 + 1)
}

impl World {
    /// Three hosts on one underlay, or `None` without the privileges to
    /// make namespaces.
    pub fn new(tag: &str) -> Option<World> {
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

    pub fn add_ns(&mut self, name: &str) -> String {
        let ns = format!("{}-{name}", self.prefix);
        must(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ns
    }

    pub fn data_dir(&self, host: usize) -> PathBuf {
        self.dir.path().join(format!("host{host}"))
    }

    /// Runs the data plane on `host` with `state`; returns what it changed.
    pub fn apply(&self, host: usize, state: &HostNetworkState) -> Vec<String> {
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

    pub fn try_apply(&self, host: usize, state: &HostNetworkState) -> std::process::Output {
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
    pub fn guest(
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
    pub fn plug(&self, host: usize, port: &str, net: &NetworkSpec) {
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
    pub fn snapshot(&self, host: usize) -> Vec<String> {
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
pub fn diff(a: &[String], b: &[String]) -> Vec<String> {
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

pub fn ping(from: &str, to: Ipv4Addr) -> bool {
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

pub fn spec(id: &str, cidr: &str, vni: u32, gateway: Option<&str>) -> NetworkSpec {
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
pub struct Net {
    pub spec: NetworkSpec,
    pub nat: bool,
    pub hosts: Vec<usize>,
    pub nics: Vec<(usize, &'static str, &'static str)>,
}

/// The state of `host`: each network it carries, its NICs there, the
/// other hosts as peers and their NICs as forwarding entries.
pub fn host_state(host: usize, nets: &[&Net]) -> HostNetworkState {
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

pub fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// A stand-in guest for each of `net`'s NICs, at its static address;
/// asserts that each pings every other. Returns their namespaces.
pub fn guests_ping_each_other(w: &mut World, net: &Net) -> Vec<String> {
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

pub fn blue() -> Net {
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

/// A server started in a namespace; stopped when dropped.
pub struct Served(pub std::process::Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the data plane on `host` with `state` and keeps it running
/// (`--hold`: the tunnel lives in its process); returns once applied.
pub fn hold_apply(w: &World, host: usize, state: &HostNetworkState) -> Served {
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
