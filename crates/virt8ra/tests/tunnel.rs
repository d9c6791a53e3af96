//! The encrypted data path between sites (issue 27, item 3), end to end:
//! two network namespaces joined by a veth (two hosts and the link between
//! their sites), a `virt8ra tunnel run` in each, real TUN devices, real UDP,
//! real tcpdump. Checked: ping and a TCP transfer arrive intact; a capture
//! on the link holds no plaintext; a peer whose key is not configured gets
//! nothing through; garbage datagrams change nothing; and our tunnel talks
//! to boringtun-cli as it comes, which proves the wire format is
//! WireGuard's.
//!
//! Needs root (namespaces, TUN); without it each test says so and passes.
//! Every namespace is removed by a Drop guard, also when a test fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

const MARKER: &str = "VIRT8RA-PLAINTEXT-MARKER-7f3a9c";
const A_UNDER: &str = "192.168.77.1";
const B_UNDER: &str = "192.168.77.2";

/// Two namespaces `<tag>a` and `<tag>b` with a veth between them; the
/// processes started in them are killed and the namespaces deleted on drop.
struct Net {
    a: String,
    b: String,
    dir: tempfile::TempDir,
    procs: Vec<Child>,
}

impl Drop for Net {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn ok(args: &[&str]) -> String {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Net {
    /// The namespaces, or `None` (after saying why) where they cannot be made.
    fn new(tag: &str) -> Option<Net> {
        let tag = format!("v8t{}{tag}", std::process::id() % 10000);
        let (a, b) = (format!("{tag}a"), format!("{tag}b"));
        let made = Command::new("ip")
            .args(["netns", "add", &a])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !made {
            eprintln!("SKIP: cannot create network namespaces (needs root and iproute2)");
            return None;
        }
        let net = Net {
            b: b.clone(),
            a: a.clone(),
            dir: tempfile::tempdir().expect("tempdir"),
            procs: Vec::new(),
        };
        ok(&["ip", "netns", "add", &b]);
        ok(&[
            "ip", "link", "add", "va", "netns", &a, "type", "veth", "peer", "name", "vb", "netns",
            &b,
        ]);
        for (ns, dev, addr) in [(&a, "va", A_UNDER), (&b, "vb", B_UNDER)] {
            ok(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                dev,
            ]);
            ok(&["ip", "-n", ns, "link", "set", dev, "up"]);
            ok(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        Some(net)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn exec(&self, ns: &str, args: &[&str]) -> Output {
        let mut all = vec!["ip", "netns", "exec", ns];
        all.extend_from_slice(args);
        sh(&all)
    }

    fn spawn(&mut self, ns: &str, args: &[&str], stdout: Stdio) -> usize {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        self.procs.push(child);
        self.procs.len() - 1
    }

    /// A key pair: the private key file and the public key.
    fn key(&self, name: &str) -> (PathBuf, String) {
        let path = self.path(name);
        let out = ok(&[common::bin(), "tunnel", "genkey", path.to_str().unwrap()]);
        (path, out.trim().to_string())
    }

    /// Starts `virt8ra tunnel run` in `ns`; waits until its interface is up.
    fn tunnel(&mut self, ns: &str, name: &str, config: &str) -> usize {
        let file = self.path(&format!("{name}.yaml"));
        std::fs::write(&file, config).unwrap();
        let i = self.spawn(
            ns,
            &[
                common::bin(),
                "tunnel",
                "run",
                "--config",
                file.to_str().unwrap(),
            ],
            Stdio::piped(),
        );
        let iface = config
            .lines()
            .find_map(|l| l.strip_prefix("interface: "))
            .unwrap()
            .to_string();
        let ns = ns.to_string();
        common::wait_until(
            &format!("interface {iface} in {ns}"),
            Duration::from_secs(20),
            || {
                let out = self.exec(&ns, &["ip", "link", "show", &iface]);
                if let Ok(Some(status)) = self.procs[i].try_wait() {
                    let mut err = String::new();
                    let _ = self.procs[i]
                        .stderr
                        .take()
                        .unwrap()
                        .read_to_string(&mut err);
                    panic!("tunnel {iface} exited ({status}): {err}");
                }
                out.status.success().then_some(())
            },
        );
        i
    }

    /// Stops a tunnel with SIGTERM and returns the stats it prints.
    fn stop_tunnel(&mut self, i: usize) -> Value {
        let p = &mut self.procs[i];
        // `ip netns exec` execs the command, so the pid is the tunnel's.
        ok(&["kill", "-TERM", &p.id().to_string()]);
        let mut out = String::new();
        p.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        let status = p.wait().unwrap();
        let mut err = String::new();
        let _ = p.stderr.take().unwrap().read_to_string(&mut err);
        assert!(status.success(), "tunnel exit {status}: {err}");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("stats {out:?}: {e}\n{err}"))
    }

    fn alive(&mut self, i: usize) -> bool {
        matches!(self.procs[i].try_wait(), Ok(None))
    }

    fn ping(&self, ns: &str, addr: &str) -> bool {
        self.exec(ns, &["ping", "-c", "3", "-i", "0.2", "-W", "2", addr])
            .status
            .success()
    }

    /// Sends `data` over TCP from `from` to `to_addr`:5001 in `to`; returns
    /// what the receiver got.
    fn tcp_transfer(&mut self, from: &str, to: &str, to_addr: &str, data: &[u8]) -> Vec<u8> {
        let input = self.path("send.bin");
        let output = self.path("recv.bin");
        std::fs::write(&input, data).unwrap();
        let recv = format!(
            "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('{to_addr}',5001))\ns.listen(1)\nprint('ready',flush=True)\nc,_=s.accept()\nf=open('{}','wb')\nwhile True:\n  b=c.recv(65536)\n  if not b: break\n  f.write(b)\nf.close()\n",
            output.display()
        );
        let i = self.spawn(to, &["python3", "-c", &recv], Stdio::piped());
        let mut line = [0u8; 6];
        self.procs[i]
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut line)
            .unwrap();
        let send = format!(
            "import socket\ns=socket.create_connection(('{to_addr}',5001),timeout=20)\ns.sendall(open('{}','rb').read())\ns.close()\n",
            input.display()
        );
        let out = self.exec(from, &["python3", "-c", &send]);
        assert!(
            out.status.success(),
            "send: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status = common::wait_until("the receiver to finish", Duration::from_secs(30), || {
            self.procs[i].try_wait().ok().flatten()
        });
        assert!(status.success());
        std::fs::read(&output).unwrap()
    }
}

fn config(
    iface: &str,
    key: &Path,
    port: u16,
    addr: &str,
    peers: &[(&str, Option<String>, &str)],
) -> String {
    let mut s = format!(
        "interface: {iface}\nprivate_key_file: {}\nlisten_port: {port}\naddress: {addr}\npeers:\n",
        key.display()
    );
    for (key, endpoint, allowed) in peers {
        s += &format!("  - public_key: \"{key}\"\n    allowed_ips: [{allowed}]\n");
        if let Some(e) = endpoint {
            s += &format!("    endpoint: {e}\n");
        }
    }
    s
}

/// A pair of our tunnels: A dials B; B knows A's key but not its endpoint
/// (the peer connects to us).
fn pair(net: &mut Net) -> (usize, usize, String) {
    let (ka, pa) = net.key("a.key");
    let (kb, pb) = net.key("b.key");
    let b = net.tunnel(
        &net.b.clone(),
        "b",
        &config(
            "wgt0",
            &kb,
            51820,
            "10.99.0.2/24",
            &[(&pa, None, "10.99.0.1/32")],
        ),
    );
    let a = net.tunnel(
        &net.a.clone(),
        "a",
        &config(
            "wgt0",
            &ka,
            51820,
            "10.99.0.1/24",
            &[(&pb, Some(format!("{B_UNDER}:51820")), "10.99.0.0/24")],
        ),
    );
    (a, b, pb)
}

fn test_data() -> Vec<u8> {
    let mut data = Vec::new();
    let mut x: u32 = 12345;
    while data.len() < 4 << 20 {
        data.extend_from_slice(MARKER.as_bytes());
        for _ in 0..64 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            data.push((x >> 16) as u8);
        }
    }
    data
}

fn capture_start(net: &mut Net, ns: &str, dev: &str, file: &Path) -> usize {
    let i = net.spawn(
        ns,
        &[
            "tcpdump",
            "-i",
            dev,
            "-U",
            "-s",
            "0",
            "-w",
            file.to_str().unwrap(),
        ],
        Stdio::null(),
    );
    // tcpdump says "listening on" on stderr once the capture runs.
    let mut buf = [0u8; 1];
    let mut seen = Vec::new();
    let err = net.procs[i].stderr.as_mut().unwrap();
    while !String::from_utf8_lossy(&seen).contains("listening on") {
        assert_eq!(
            err.read(&mut buf).unwrap(),
            1,
            "tcpdump ended: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.push(buf[0]);
    }
    i
}

fn capture_stop(net: &mut Net, i: usize, file: &Path) -> Vec<u8> {
    ok(&["kill", "-INT", &net.procs[i].id().to_string()]);
    let _ = net.procs[i].wait();
    std::fs::read(file).unwrap()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn tunnel_carries_ping_and_tcp_and_the_link_sees_no_plaintext() {
    let Some(mut net) = Net::new("d") else { return };
    let (a, b, _) = pair(&mut net);
    let (na, nb) = (net.a.clone(), net.b.clone());
    assert!(net.ping(&na, "10.99.0.2"), "ping through the tunnel failed");

    let link = net.path("link.pcap");
    let inner = net.path("inner.pcap");
    let cap_link = capture_start(&mut net, &nb, "vb", &link);
    let cap_inner = capture_start(&mut net, &nb, "wgt0", &inner);
    let data = test_data();
    let got = net.tcp_transfer(&na, &nb, "10.99.0.2", &data);
    assert!(
        got == data,
        "TCP data differs: sent {} bytes, got {}",
        data.len(),
        got.len()
    );
    let link = capture_stop(&mut net, cap_link, &link);
    let inner = capture_stop(&mut net, cap_inner, &inner);

    // The capture on the TUN shows the marker (so the check can see it),
    // the one on the link between the sites carried the bytes but not it.
    assert!(
        contains(&inner, MARKER.as_bytes()),
        "marker not seen inside the tunnel"
    );
    assert!(
        link.len() > data.len(),
        "the link capture is too small: {} bytes",
        link.len()
    );
    assert!(
        !contains(&link, MARKER.as_bytes()),
        "plaintext marker on the link"
    );

    let sb = net.stop_tunnel(b);
    let sa = net.stop_tunnel(a);
    let peer_a = &sa["peers"][0];
    assert!(
        peer_a["tx_bytes"].as_u64().unwrap() >= data.len() as u64,
        "{sa}"
    );
    assert!(peer_a["last_handshake"].is_number(), "{sa}");
    // B learnt A's endpoint from its authenticated packets (roaming).
    assert_eq!(
        sb["peers"][0]["endpoint"],
        format!("{A_UNDER}:51820"),
        "{sb}"
    );
    assert!(
        sb["peers"][0]["rx_bytes"].as_u64().unwrap() >= data.len() as u64,
        "{sb}"
    );
    // The interface is gone after stop.
    assert!(!net
        .exec(&nb, &["ip", "link", "show", "wgt0"])
        .status
        .success());
}

#[test]
fn unknown_peer_gets_nothing_through_and_garbage_changes_nothing() {
    let Some(mut net) = Net::new("u") else { return };
    let (a, b, pb) = pair(&mut net);
    let na = net.a.clone();
    assert!(net.ping(&na, "10.99.0.2"));

    // A rogue in A's namespace with a key B does not know.
    let (kr, _) = net.key("rogue.key");
    let rogue = net.tunnel(
        &na,
        "rogue",
        &config(
            "wgr0",
            &kr,
            51821,
            "10.98.0.1/24",
            &[(&pb, Some(format!("{B_UNDER}:51820")), "10.98.0.0/24")],
        ),
    );
    assert!(!net.ping(&na, "10.98.0.2"));

    // Garbage: random datagrams and truncated or forged WireGuard headers.
    let junk = format!(
        "import socket,os,struct\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor i in range(3000):\n  t=struct.pack('<I',1+i%4)\n  n=[0,1,3,4,16,31,32,64,92,147,148,149,1500,9000][i%14]\n  s.sendto((t+os.urandom(n))[:max(n,1)] if i%3 else os.urandom(n), ('{B_UNDER}',51820))\n"
    );
    let out = net.exec(&na, &["python3", "-c", &junk]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(net.alive(b), "the tunnel died on garbage");
    assert!(
        net.ping(&na, "10.99.0.2"),
        "the tunnel stopped working after garbage"
    );

    let sr = net.stop_tunnel(rogue);
    let sb = net.stop_tunnel(b);
    net.stop_tunnel(a);
    assert!(sb["dropped"]["unknown_peer"].as_u64().unwrap() > 0, "{sb}");
    assert!(sb["dropped"]["invalid"].as_u64().unwrap() > 100, "{sb}");
    assert!(
        sr["peers"][0]["last_handshake"].is_null(),
        "the rogue completed a handshake: {sr}"
    );
    assert_eq!(sr["peers"][0]["rx_packets"], 0, "{sr}");
    assert_eq!(sb["peers"].as_array().unwrap().len(), 1, "{sb}");
}

#[test]
fn bad_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    ok(&[common::bin(), "tunnel", "genkey", key.to_str().unwrap()]);
    let file = dir.path().join("c.yaml");
    std::fs::write(
        &file,
        format!(
            "interface: wgx0\nprivate_key_file: {}\nmtu: 70000\n",
            key.display()
        ),
    )
    .unwrap();
    let out = sh(&[
        common::bin(),
        "tunnel",
        "run",
        "--config",
        file.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mtu"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// boringtun-cli as it comes on one end, ours on the other.
#[test]
fn interoperates_with_boringtun_cli() {
    let Ok(bt) = which("boringtun-cli") else {
        eprintln!("SKIP: boringtun-cli not installed (scripts/deps.sh installs it)");
        return;
    };
    let Some(mut net) = Net::new("i") else { return };
    let (na, nb) = (net.a.clone(), net.b.clone());
    let (ka, pa) = net.key("a.key");
    let (kb, pb) = net.key("b.key");
    let iface = format!("wgb{}", std::process::id() % 10000);
    let sock = format!("/var/run/wireguard/{iface}.sock");
    let i = net.spawn(
        &nb,
        &[
            &bt,
            "--foreground",
            "--disable-drop-privileges",
            "--threads",
            "1",
            &iface,
        ],
        Stdio::null(),
    );
    common::wait_until("boringtun's UAPI socket", Duration::from_secs(20), || {
        Path::new(&sock).exists().then_some(())
    });
    assert!(net.alive(i));
    let hex = |b64: &str| -> String {
        let out = ok(&[
            "sh",
            "-c",
            &format!("echo '{b64}' | base64 -d | od -An -tx1 | tr -d ' \\n'"),
        ]);
        out.trim().to_string()
    };
    let kb_b64 = std::fs::read_to_string(&kb).unwrap();
    let set = format!(
        "set=1\nprivate_key={}\nlisten_port=51820\npublic_key={}\nallowed_ip=10.99.0.1/32\n\n",
        hex(kb_b64.trim()),
        hex(&pa)
    );
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.write_all(set.as_bytes()).unwrap();
    let mut answer = [0u8; 64];
    let n = s.read(&mut answer).unwrap();
    assert!(
        String::from_utf8_lossy(&answer[..n]).contains("errno=0"),
        "UAPI said {:?}",
        String::from_utf8_lossy(&answer[..n])
    );
    ok(&[
        "ip",
        "-n",
        &nb,
        "addr",
        "add",
        "10.99.0.2/24",
        "dev",
        &iface,
    ]);
    ok(&["ip", "-n", &nb, "link", "set", &iface, "up"]);

    let a = net.tunnel(
        &na,
        "a",
        &config(
            "wgt0",
            &ka,
            51820,
            "10.99.0.1/24",
            &[(&pb, Some(format!("{B_UNDER}:51820")), "10.99.0.0/24")],
        ),
    );
    assert!(net.ping(&na, "10.99.0.2"), "ping to boringtun-cli failed");
    let data = test_data();
    let got = net.tcp_transfer(&na, &nb, "10.99.0.2", &data);
    assert!(
        got == data,
        "TCP data differs: sent {}, got {}",
        data.len(),
        got.len()
    );
    let got = net.tcp_transfer(&nb, &na, "10.99.0.1", &data);
    assert!(
        got == data,
        "TCP data (reverse) differs: sent {}, got {}",
        data.len(),
        got.len()
    );
    let sa = net.stop_tunnel(a);
    assert!(sa["peers"][0]["last_handshake"].is_number(), "{sa}");
}

fn which(name: &str) -> Result<String, ()> {
    let out = Command::new("sh")
        .args([
            "-c",
            &format!("command -v {name} || ls ~/.cargo/bin/{name}"),
        ])
        .output()
        .map_err(|_| ())?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && !p.is_empty() {
        Ok(p)
    } else {
        Err(())
    }
}
