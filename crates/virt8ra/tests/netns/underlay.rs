//! The control plane's network world for end-to-end tests: a bridge in
//! the root namespace where the control plane listens, one namespace per
//! host on it with its own underlay address, and agents started inside
//! them (`tests/netns_publish.rs`; the same as `tests/overlay.rs` uses,
//! which could include this file instead of its own copy). Included with
//! `#[path]` by a test that has `mod common;`.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};

use super::common::{bin, Cluster, Proc};

pub fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {args:?}: {e}"))
}

pub fn must(args: &[&str]) -> String {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The test's underlay: a bridge in the root namespace with the control
/// plane's address, and one namespace per host on it. Dropping it removes
/// all of it, and kills what runs in the namespaces (agents, QEMU, DHCP).
pub struct Underlay {
    pub bridge: String,
    pub prefix: String,
    /// The /24's third byte: 198.18.N.0/24 (a range for benchmarks, never
    /// routed; the namespaces reach nothing else).
    pub net: u8,
    pub namespaces: Vec<String>,
}

impl Drop for Underlay {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let pids = sh(&["ip", "netns", "pids", ns]);
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = sh(&["kill", "-9", pid]);
            }
            let _ = sh(&["ip", "netns", "del", ns]);
        }
        let _ = sh(&["ip", "link", "del", &self.bridge]);
    }
}

impl Underlay {
    /// The bridge, or `None` without the privileges for namespaces.
    pub fn new(tag: &str) -> Option<Underlay> {
        let id = std::process::id() % 10_000;
        let prefix = format!("{tag}{id}");
        let probe = format!("{prefix}-probe");
        let o = sh(&["ip", "netns", "add", &probe]);
        if !o.status.success() {
            eprintln!(
                "SKIPPED: cannot create a network namespace ({}); this test needs root",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return None;
        }
        let _ = sh(&["ip", "netns", "del", &probe]);
        let u = Underlay {
            bridge: format!("{prefix}-ul"),
            prefix,
            net: (id % 200 + 20) as u8,
            namespaces: Vec::new(),
        };
        must(&["ip", "link", "add", &u.bridge, "type", "bridge"]);
        must(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", u.addr(1)),
            "dev",
            &u.bridge,
        ]);
        must(&["ip", "link", "set", &u.bridge, "up"]);
        Some(u)
    }

    pub fn addr(&self, last: u8) -> String {
        format!("198.18.{}.{last}", self.net)
    }

    /// Host `i`'s namespace, with `eth0` on the bridge at `addr(10 + i)`.
    pub fn add_host(&mut self, i: usize) -> String {
        let ns = format!("{}-h{i}", self.prefix);
        must(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        let port = format!("{}-p{i}", self.prefix);
        must(&[
            "ip", "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        must(&["ip", "link", "set", &port, "master", &self.bridge, "up"]);
        let a = format!("{}/24", self.addr(10 + i as u8));
        must(&["ip", "-n", &ns, "addr", "add", &a, "dev", "eth0"]);
        must(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        ns
    }
}

/// Joins (with `site`) or restarts (without) agent `name` inside `ns`,
/// reached by the others at `address`. The child is `ip netns exec`,
/// which execs the agent, so killing it kills the agent.
pub fn start_agent_in(
    c: &mut Cluster,
    name: &str,
    ns: &str,
    site: Option<&str>,
    address: Option<&str>,
) {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, bin(), "agent", "--server", &c.url])
        .args(["--name", name, "--data-dir"])
        .arg(c.agent_dir(name))
        .args(["--vcpus", "2", "--memory-mib", "1024", "--disk-gib", "20"])
        .args(["--accel", "emulation"])
        .args(address.iter().flat_map(|a| ["--address", a]))
        .env("VIRT8RA_LOG", "info");
    if let Some(site) = site {
        let t = c.ok(
            "POST",
            "/api/v1/join-tokens",
            Some(serde_json::json!({"site": site})),
        );
        let file = c.dir.path().join(format!("agent-{name}.join-token"));
        std::fs::write(&file, t["token"].as_str().unwrap()).unwrap();
        cmd.arg("--join-token-file").arg(file);
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(c.dir.path().join(format!("agent-{name}.log")))
        .unwrap();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let p = Proc {
        child,
        name: name.into(),
    };
    match c.agents.iter_mut().find(|(n, _)| n == name) {
        Some(slot) => slot.1 = Some(p),
        None => c.agents.push((name.to_string(), Some(p))),
    }
}
