//! DHCP on each network's bridge, so images without cloud-init get their
//! address: one dnsmasq per network with a gateway, serving only the
//! static leases of this host's NICs (MAC -> address, from the desired
//! state), with the gateway, the DNS servers and the MTU. It does no DNS
//! (`port=0`) and keeps no lease database (`leasefile-ro`: the leases are
//! the desired state's).
//!
//! Each server has a directory `DATA/network/dhcp/<bridge>/` holding its
//! configuration, its pid file and the index of the bridge it was started
//! on. It is (re)started when its configuration changed, when it is not
//! running, or when its bridge is not the one it bound to (a deleted and
//! recreated bridge: an agent restart after a host reboot); directories of
//! networks no longer desired have their server stopped and are removed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use virt8ra_api::{device_names, HostNetwork};

use super::cmd::{Changes, NetError, Result};

const DNSMASQ: &str = "dnsmasq";

fn config(hn: &HostNetwork, dir: &Path) -> Option<String> {
    let net = &hn.network;
    let gw = net.gateway?;
    let br = device_names(&net.id).bridge;
    let mut c = format!(
        "# virt8ra network {} ({})\nport=0\ninterface={br}\nbind-interfaces\nexcept-interface=lo\n\
         leasefile-ro\ndhcp-authoritative\npid-file={}\n\
         dhcp-range={},static,{},infinite\ndhcp-option=option:router,{gw}\ndhcp-option=option:mtu,{}\n",
        net.name,
        net.id,
        dir.join("dnsmasq.pid").display(),
        net.cidr.network(),
        net.cidr.netmask(),
        net.mtu
    );
    if !net.dns.is_empty() {
        let dns: Vec<String> = net.dns.iter().map(|d| d.to_string()).collect();
        c.push_str(&format!(
            "dhcp-option=option:dns-server,{}\n",
            dns.join(",")
        ));
    }
    for nic in &hn.nics {
        c.push_str(&format!("dhcp-host={},{}\n", nic.mac, nic.ip));
    }
    Some(c)
}

/// The pid of the dnsmasq serving `dir`, if it runs.
fn running(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join("dnsmasq.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let conf = dir.join("dnsmasq.conf");
    let want = format!("--conf-file={}", conf.display());
    cmdline
        .split(|b| *b == 0)
        .any(|a| a == want.as_bytes())
        .then_some(pid)
}

fn stop(dir: &Path, changes: &mut Changes) -> Result<()> {
    let Some(pid) = running(dir) else {
        return Ok(());
    };
    if let Some(p) = rustix::process::Pid::from_raw(pid) {
        // Already gone between the check and the signal is fine.
        let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
    }
    let start = Instant::now();
    while running(dir).is_some() {
        if start.elapsed() > Duration::from_secs(5) {
            return Err(NetError(format!(
                "dnsmasq {pid} ({}) does not stop after SIGTERM",
                dir.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    changes.note(format!("dnsmasq: stopped {pid} ({})", dir.display()));
    Ok(())
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> NetError {
    move |e| NetError(format!("{what}: {e}"))
}

/// Makes network `hn`'s DHCP server run with the current leases;
/// `bridge_index`: the interface index of its bridge now.
pub fn ensure(
    root: &Path,
    hn: &HostNetwork,
    bridge_index: u64,
    changes: &mut Changes,
) -> Result<()> {
    let br = device_names(&hn.network.id).bridge;
    let dir = root.join(&br);
    let Some(conf) = config(hn, &dir) else {
        if dir.exists() {
            stop(&dir, changes)?;
            std::fs::remove_dir_all(&dir).map_err(io(format!("remove {}", dir.display())))?;
        }
        return Ok(());
    };
    let conf_path = dir.join("dnsmasq.conf");
    let index_path = dir.join("bridge.ifindex");
    let same_conf = std::fs::read_to_string(&conf_path).ok().as_deref() == Some(conf.as_str());
    let same_bridge = std::fs::read_to_string(&index_path).ok().as_deref()
        == Some(bridge_index.to_string().as_str());
    if same_conf && same_bridge && running(&dir).is_some() {
        return Ok(());
    }
    stop(&dir, changes)?;
    crate::private::make_dir(&dir).map_err(io(format!("create {}", dir.display())))?;
    std::fs::write(&conf_path, &conf).map_err(io(format!("write {}", conf_path.display())))?;
    std::fs::write(&index_path, bridge_index.to_string())
        .map_err(io(format!("write {}", index_path.display())))?;
    let arg = format!("--conf-file={}", conf_path.display());
    // dnsmasq forks into the background once it has bound its sockets: a
    // zero exit means it serves.
    super::cmd::output(DNSMASQ, &[&arg])?;
    changes.note(format!("dnsmasq: started for {br}"));
    Ok(())
}

/// Stops and removes the servers of bridges not in `keep`.
pub fn remove_unwanted(root: &Path, keep: &[String], changes: &mut Changes) -> Result<()> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(NetError(format!("read {}: {e}", root.display()))),
    };
    for e in entries {
        let e = e.map_err(io(format!("read {}", root.display())))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if keep.contains(&name) {
            continue;
        }
        let dir: PathBuf = e.path();
        stop(&dir, changes)?;
        std::fs::remove_dir_all(&dir).map_err(io(format!("remove {}", dir.display())))?;
        changes.note(format!("dnsmasq: removed {}", dir.display()));
    }
    Ok(())
}
