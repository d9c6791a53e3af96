//! End to end, in real network namespaces (issue 27, items 3 and 4): the
//! agent's data plane between sites (traffic that leaves a site travels
//! encrypted in its tunnels; a host behind NAT joins through a relay) and
//! at the host's edge (security groups, published ports). The world is
//! `tests/netns.rs`'s (`netns/world.rs`); each host's data plane runs with
//! `--hold`, since a tunnel lives in its process. They need root; without
//! it they say so and pass.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "netns/world.rs"]
mod world;

use std::net::Ipv4Addr;
use std::process::Command;

use virt8ra_api::HostNetworkState;
use world::*;

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
