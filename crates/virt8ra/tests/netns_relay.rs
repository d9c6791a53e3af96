//! End to end (issue 27, item 3): a host behind NAT joins the overlay
//! through a relay the control plane chose, and the API says so.
//!
//! Three hosts at three providers in three countries (the harness's
//! topology: Logroño, Frankfurt, Gdańsk), each an agent in a network
//! namespace of its own (`netns/world.rs`'s). Hosts 0 and 1 have underlay
//! addresses (`--address`); host 2 sits behind a masquerading router
//! namespace, reaches the others only through it, and its agent has no
//! `--address`. The control plane listens on the underlay (a veth from
//! the root namespace into the underlay bridge), so host 2's agent dials
//! it through the NAT too. Nothing is sent by hand: the control plane
//! chooses host 2's relay (no host at its site or provider: the nearest,
//! host 1 in Frankfurt), computes every host's state, and the guests (the
//! test appliance under QEMU, one per host) ping each other at the
//! addresses it gave them; captures on host 2's link out of its NAT and on
//! the relay's link see only tunnel datagrams, never the pings' payload.
//! Then host 1's agent stops: the control plane chooses host 0, and host
//! 2's guest and host 0's reach each other again.
//!
//! Needs root; without it the test says so and passes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "netns/world.rs"]
mod world;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{bin, wait_until_explained, Cluster, Proc, TOPOLOGY};
use serde_json::Value;
use world::{must, underlay, World};

/// Three TCG guests booting at once on a loaded two-core machine.
const BOOT: Duration = Duration::from_secs(900);
/// The control plane's address on the underlay.
const CONTROL_PLANE: &str = "192.168.77.200";
/// The guests' addresses, one per host.
const IPS: [&str; 3] = ["10.78.0.11", "10.78.0.12", "10.78.0.13"];

/// A veth from the root namespace into the underlay bridge, with the
/// control plane's address (removed with the underlay's namespace).
fn control_plane_link(w: &World) {
    let ul = &w.namespaces[0];
    let dev = format!("{}-cp", w.prefix);
    must(&[
        "ip", "link", "add", &dev, "type", "veth", "peer", "name", "cp", "netns", ul,
    ]);
    must(&["ip", "-n", ul, "link", "set", "cp", "master", "ul", "up"]);
    let a = format!("{CONTROL_PLANE}/24");
    must(&["ip", "addr", "add", &a, "dev", &dev]);
    must(&["ip", "link", "set", &dev, "up"]);
}

/// Moves host 2 behind a NAT router: a private link 10.9.0.0/24, the
/// router masquerading onto the underlay at 192.168.77.50. Host 2 then
/// reaches the others; they cannot reach it.
fn behind_nat(w: &mut World) {
    let h2 = w.hosts[2].clone();
    let ul = w.namespaces[0].clone();
    let r = w.add_ns("rtr");
    let run = |args: &str| {
        let v: Vec<&str> = args.split_whitespace().collect();
        must(&v);
    };
    run(&format!("ip -n {h2} link del eth0"));
    run(&format!(
        "ip -n {r} link add eth0 type veth peer name pr netns {ul}"
    ));
    run(&format!("ip -n {ul} link set pr master ul up"));
    run(&format!("ip -n {r} addr add 192.168.77.50/24 dev eth0"));
    run(&format!("ip -n {r} link set eth0 up"));
    run(&format!(
        "ip -n {r} link add lan type veth peer name eth0 netns {h2}"
    ));
    run(&format!("ip -n {r} addr add 10.9.0.1/24 dev lan"));
    run(&format!("ip -n {r} link set lan up"));
    run(&format!("ip -n {h2} addr add 10.9.0.2/24 dev eth0"));
    run(&format!("ip -n {h2} link set eth0 up"));
    run(&format!("ip -n {h2} route add default via 10.9.0.1"));
    run(&format!(
        "ip netns exec {r} sysctl -qw net.ipv4.ip_forward=1"
    ));
    must(&[
        "ip", "netns", "exec", &r, "nft",
        "add table ip nat; add chain ip nat post { type nat hook postrouting priority srcnat; }; add rule ip nat post oifname eth0 masquerade",
    ]);
    assert!(world::ping(&h2, underlay(0)), "host 2 reaches host 0");
    assert!(
        !world::ping(&w.hosts[0], "10.9.0.2".parse().unwrap()),
        "host 0 cannot reach host 2"
    );
}

/// Joins agent `name` at `site` inside `ns`, reached by the others at
/// `address` (none: behind NAT). The child is `ip netns exec`, which
/// execs the agent, so killing it kills the agent.
fn start_agent_in(c: &mut Cluster, name: &str, ns: &str, site: &str, address: Option<String>) {
    let t = c.ok(
        "POST",
        "/api/v1/join-tokens",
        Some(serde_json::json!({"site": site})),
    );
    let file = c.dir.path().join(format!("agent-{name}.join-token"));
    std::fs::write(&file, t["token"].as_str().unwrap()).unwrap();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(c.dir.path().join(format!("agent-{name}.log")))
        .unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", ns, bin(), "agent", "--server", &c.url])
        .args(["--name", name, "--data-dir"])
        .arg(c.agent_dir(name))
        .args(["--vcpus", "2", "--memory-mib", "1024", "--disk-gib", "20"])
        .args(["--accel", "emulation"])
        .args(address.iter().flat_map(|a| ["--address", a.as_str()]))
        .arg("--join-token-file")
        .arg(file)
        .env("VIRT8RA_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    c.agents.push((
        name.to_string(),
        Some(Proc {
            child,
            name: name.into(),
        }),
    ));
}

/// A user-data script: pings every guest's address every two seconds and
/// prints which answered, numbered. Each ping carries 200 bytes of 0xa5,
/// the marker the captures look for.
fn pinger() -> String {
    format!(
        "#!/bin/sh\nn=0\nwhile true; do\n  n=$((n + 1))\n  up=\"\"\n  for ip in {}; do\n    \
         if ping -c 1 -W 1 -p a5 -s 200 $ip >/dev/null 2>&1; then up=\"$up,$ip\"; fi\n  done\n  \
         echo \"RLY-PING $n up=${{up#,}}\"\n  sleep 2\ndone\n",
        IPS.join(" ")
    )
}

/// The last `RLY-PING` round of a console: its number and who answered.
fn last_ping(console: &str) -> Option<(u64, Vec<String>)> {
    let line = console.lines().rev().find(|l| l.starts_with("RLY-PING "))?;
    let mut w = line.split_whitespace().skip(1);
    let n = w.next()?.parse().ok()?;
    let up = w.next()?.strip_prefix("up=")?;
    Some((
        n,
        up.split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
    ))
}

/// Waits until a ping round of guest `vm` numbered past `after` reaches
/// every address of `up`; returns its number.
fn wait_pings(c: &Cluster, vm: &str, after: u64, up: &[&str]) -> u64 {
    wait_until_explained(
        &format!("a round of {vm}'s pings past {after} to reach {up:?}"),
        BOOT,
        || {
            let (n, got) = last_ping(&c.console(vm))?;
            (n > after && up.iter().all(|a| got.iter().any(|g| g == a))).then_some(n)
        },
        || format!("{}\n{}", c.console(vm), c.logs_tail(40)),
    )
}

/// Captures the frames on `dev` of namespace `ns` for `secs` seconds (an
/// AF_PACKET socket, as tcpdump uses) and counts those carrying the
/// pings' payload (64 bytes of 0xa5) and the UDP datagrams to or from the
/// tunnel port. Returns the capture to read with [`capture_result`].
fn capture(ns: &str, dev: &str, secs: f64) -> std::process::Child {
    const SNIFF: &str = r#"
import socket, sys, time, json
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
s.bind((sys.argv[1], 0))
s.settimeout(0.1)
marker, port = b"\xa5" * 64, int(sys.argv[3])
end = time.time() + float(sys.argv[2])
frames = hits = tunnel = 0
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
        .arg(virt8ra_api::TUNNEL_PORT.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn capture_result(c: std::process::Child) -> Value {
    let out = c.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default().to_string();
    serde_json::from_str(&last).unwrap_or_else(|e| panic!("capture printed {text:?}: {e}"))
}

/// The guests' pings cross the underlay only encrypted: on host 2's link
/// out of its NAT and on the relay's link, the captures see tunnel
/// datagrams and never the pings' payload, which host 2's tap (the
/// control) shows in the clear.
fn no_plaintext_on_the_underlay(w: &World, c: &Cluster) {
    let vm = c.vm("g2");
    let tap = virt8ra_api::tap_name(vm["status"]["nics"][0]["id"].as_str().unwrap());
    let ul = &w.namespaces[0];
    let nat_link = capture(ul, "pr", 6.0);
    let relay_link = capture(ul, "p1", 6.0);
    let control = capture(&w.hosts[2], &tap, 6.0);
    let (n, r, t) = (
        capture_result(nat_link),
        capture_result(relay_link),
        capture_result(control),
    );
    for (what, got) in [("host 2's NAT link", &n), ("the relay's link", &r)] {
        assert_eq!(got["marker"], 0, "plaintext on {what}: {got}");
        assert!(
            got["tunnel"].as_u64().unwrap() > 0,
            "no tunnel datagrams on {what}: {got}"
        );
    }
    assert!(
        t["marker"].as_u64().unwrap() > 0,
        "the control: g2's tap carries its pings in the clear: {t}"
    );
}

/// How the API says the others reach `host`: (reachable, relayed_via).
fn reached(c: &Cluster, host: &str) -> (String, Option<String>) {
    let h = c.ok("GET", &format!("/api/v1/hosts/{host}"), None);
    let o = &h["overlay"];
    (
        o["reachable"]
            .as_str()
            .unwrap_or_else(|| panic!("{h}"))
            .to_string(),
        o["relayed_via"].as_str().map(str::to_string),
    )
}

fn relayed(via: &str) -> (String, Option<String>) {
    ("relayed".into(), Some(via.into()))
}

#[test]
fn a_host_behind_nat_joins_through_the_relay_the_control_plane_chose() {
    let Some(mut w) = World::new("r") else { return };
    control_plane_link(&w);
    behind_nat(&mut w);
    let image = common::test_image();
    let mut c = Cluster::start_on(CONTROL_PLANE);
    c.create_topology();
    for (i, (_, _, site, ..)) in TOPOLOGY.iter().enumerate() {
        let address = (i < 2).then(|| underlay(i).to_string());
        let ns = w.hosts[i].clone();
        start_agent_in(&mut c, &format!("host-{i}"), &ns, site, address);
    }
    c.wait_hosts_ready(3);
    c.cli_ok(&["image", "import", image.to_str().unwrap(), "--name", "test"]);
    c.cli_ok(&["network", "create", "rly", "--cidr", "10.78.0.0/24"]);
    let script = c.dir.path().join("pinger.sh");
    std::fs::write(&script, pinger()).unwrap();
    for (i, (_, _, site, ..)) in TOPOLOGY.iter().enumerate() {
        let vm: Value = serde_json::from_str(&c.cli_ok(&[
            "vm",
            "create",
            &format!("g{i}"),
            "--image",
            "test",
            "--memory-mib",
            "128",
            "--site",
            site,
            "--network",
            &format!("rly,ip={}", IPS[i]),
            "--user-data",
            script.to_str().unwrap(),
            "--wait",
            "-o",
            "json",
        ]))
        .unwrap();
        assert_eq!(vm["status"]["host"], format!("host-{i}"), "{vm}");
    }

    // Every guest reaches every other, host 2's through the relay.
    for g in ["g0", "g1", "g2"] {
        wait_pings(&c, g, 0, &IPS);
    }
    // The API says which path is relayed, and through which host.
    assert_eq!(reached(&c, "host-0"), ("direct".into(), None));
    assert_eq!(reached(&c, "host-2"), relayed("host-1"));
    let h2 = c.ok("GET", "/api/v1/hosts/host-2", None);
    assert!(h2["overlay"]["tunnel_address"]
        .as_str()
        .is_some_and(|a| a.starts_with("100.")));
    let hosts = c.ok("GET", "/api/v1/networks/rly/hosts", None);
    let paths: Vec<(String, String, String)> = hosts["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["host"].as_str().unwrap().to_string(),
                h["reachable"].as_str().unwrap().to_string(),
                h["relayed_via"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect();
    let want = |h: &str, r: &str, v: &str| (h.to_string(), r.to_string(), v.to_string());
    assert_eq!(
        paths,
        vec![
            want("host-0", "direct", "-"),
            want("host-1", "direct", "-"),
            want("host-2", "relayed", "host-1"),
        ],
        "{hosts}"
    );
    let shown = c.cli_ok(&["network", "show", "rly"]);
    assert!(shown.contains("relayed via host-1"), "{shown}");
    let shown: Value =
        serde_json::from_str(&c.cli_ok(&["network", "show", "rly", "-o", "json"])).unwrap();
    assert_eq!(shown["hosts"], hosts["items"], "{shown}");
    let shown = c.cli_ok(&["host", "show", "host-2"]);
    assert!(shown.contains("relayed via host-1"), "{shown}");
    // Host 2 sends nothing to the others' underlay addresses: its only
    // overlay peers are tunnel addresses, behind its one tunnel peer.
    let fdb = must(&["bridge", "-n", &w.hosts[2], "fdb", "show"]);
    assert!(
        fdb.lines()
            .filter(|l| l.contains(" dst "))
            .all(|l| l.contains(" dst 100.")),
        "{fdb}"
    );

    no_plaintext_on_the_underlay(&w, &c);
    the_relay_goes_and_another_is_chosen(&mut c);
    drop(c);
    drop(w);
}

/// Host 1's agent stops (its tunnel goes with it): the control plane
/// chooses host 0, the next nearest, and host 2's guest and host 0's
/// reach each other through it.
fn the_relay_goes_and_another_is_chosen(c: &mut Cluster) {
    c.kill_agent("host-1");
    wait_until_explained(
        "host 2's relay to be host 0",
        Duration::from_secs(60),
        || (reached(c, "host-2") == relayed("host-0")).then_some(()),
        || format!("{:?}\n{}", reached(c, "host-2"), c.logs_tail(30)),
    );
    let server = std::fs::read_to_string(c.dir.path().join("server.log")).unwrap();
    assert!(
        server.contains("overlay relay chosen"),
        "{}",
        c.logs_tail(20)
    );
    for g in ["g0", "g2"] {
        let now = last_ping(&c.console(g)).map_or(0, |(n, _)| n);
        wait_pings(c, g, now, &[IPS[0], IPS[2]]);
    }
}
