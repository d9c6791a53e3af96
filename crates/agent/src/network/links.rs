//! The network devices: a bridge per network, its VXLAN device, a tap per
//! local NIC. Observed with `ip -j -d link show`, changed with `ip link`.
//!
//! A device that exists with the wrong kind or settings (another VNI,
//! another local address, learning on) is deleted and created again; a
//! device that is merely down, detached or of another MTU is fixed in
//! place, so a tap a running QEMU holds is never recreated for that.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use virt8ra_api::{device_names, gateway_mac, HostNetwork, VXLAN_PORT};

use super::cmd::{self, Changes, Result};

/// What `ip -d link` says of one device.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    pub ifindex: u64,
    /// `bridge`, `vxlan`, `tun`, `veth`, ... (empty: a plain device).
    pub kind: String,
    pub master: Option<String>,
    pub mtu: u64,
    pub up: bool,
    pub address: String,
    /// (VNI, local address, UDP port, learning) of a VXLAN device.
    pub vxlan: Option<(u64, String, u64, bool)>,
    /// A tun device in tap mode.
    pub tap: bool,
}

/// Every device in this network namespace, by name.
pub fn observe() -> Result<BTreeMap<String, Link>> {
    let text = cmd::output("ip", &["-j", "-d", "link", "show"])?;
    let mut out = BTreeMap::new();
    for v in cmd::json_list("ip -j -d link show", &text)? {
        let Some(name) = v["ifname"].as_str() else {
            continue;
        };
        let info = &v["linkinfo"];
        let data = &info["info_data"];
        let kind = info["info_kind"].as_str().unwrap_or("").to_string();
        let vxlan = (kind == "vxlan").then(|| {
            (
                data["id"].as_u64().unwrap_or(0),
                data["local"].as_str().unwrap_or("").to_string(),
                data["port"].as_u64().unwrap_or(0),
                data["learning"].as_bool().unwrap_or(true),
            )
        });
        let flags = v["flags"].as_array().cloned().unwrap_or_default();
        out.insert(
            name.to_string(),
            Link {
                ifindex: v["ifindex"].as_u64().unwrap_or(0),
                tap: kind == "tun" && data["type"].as_str() == Some("tap"),
                kind,
                master: v["master"].as_str().map(str::to_string),
                mtu: v["mtu"].as_u64().unwrap_or(0),
                up: flags.iter().any(|f| f.as_str() == Some("UP")),
                address: v["address"].as_str().unwrap_or("").to_string(),
                vxlan,
            },
        );
    }
    Ok(out)
}

/// Whether `name` is one of ours: `v8b-`, `v8x-` or `v8t-`.
pub fn is_ours(name: &str) -> bool {
    ["v8b-", "v8x-", virt8ra_api::TAP_PREFIX]
        .iter()
        .any(|p| name.starts_with(p))
}

/// The names of the devices the desired networks need.
/// Whether and from where a host's networks send VXLAN to other hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vxlan {
    /// No overlay: the host has no underlay address (its agent has no
    /// `--address`) and no tunnel, so no VXLAN device.
    Off,
    /// From this, the host's underlay address.
    From(Ipv4Addr),
    /// From the address the route picks: with a tunnel, the underlay
    /// address or the tunnel address for a peer behind the tunnel.
    Routed,
}

impl Vxlan {
    pub fn of(state: &virt8ra_api::HostNetworkState) -> Vxlan {
        if state.tunnel.is_some() {
            Vxlan::Routed
        } else if state.underlay.is_unspecified() {
            Vxlan::Off
        } else {
            Vxlan::From(state.underlay)
        }
    }
}

pub fn wanted(networks: &[HostNetwork], vxlan: Vxlan) -> Vec<String> {
    let mut out = Vec::new();
    for hn in networks {
        let n = device_names(&hn.network.id);
        out.push(n.bridge);
        if vxlan != Vxlan::Off {
            out.push(n.vxlan);
        }
        out.extend(hn.nics.iter().map(|nic| nic.tap.clone()));
    }
    out
}

/// Deletes our devices that are not wanted: taps first, then VXLAN
/// devices, then bridges (so nothing is left attached to a deleted
/// bridge); drops them from `links`.
pub fn remove_unwanted(
    links: &mut BTreeMap<String, Link>,
    wanted: &[String],
    changes: &mut Changes,
) -> Result<()> {
    for prefix in [virt8ra_api::TAP_PREFIX, "v8x-", "v8b-"] {
        let stale: Vec<String> = links
            .keys()
            .filter(|n| n.starts_with(prefix) && !wanted.contains(n))
            .cloned()
            .collect();
        for name in stale {
            changes.run("ip", &["link", "del", "dev", &name])?;
            links.remove(&name);
        }
    }
    Ok(())
}

/// Makes `name` up, of `mtu`, attached to `master` (if given), touching
/// only what differs.
fn settle(
    link: Option<&Link>,
    name: &str,
    mtu: u32,
    master: Option<&str>,
    changes: &mut Changes,
) -> Result<()> {
    let mtu_s = mtu.to_string();
    if link.is_none_or(|l| l.mtu != u64::from(mtu)) {
        changes.run("ip", &["link", "set", "dev", name, "mtu", &mtu_s])?;
    }
    if let Some(m) = master {
        if link.is_none_or(|l| l.master.as_deref() != Some(m)) {
            changes.run("ip", &["link", "set", "dev", name, "master", m])?;
        }
    }
    if link.is_none_or(|l| !l.up) {
        changes.run("ip", &["link", "set", "dev", name, "up"])?;
    }
    Ok(())
}

/// Deletes `name` if it exists but is not what it should be; returns the
/// device if it can stay.
fn keep_if<'a>(
    links: &'a BTreeMap<String, Link>,
    name: &str,
    right: impl Fn(&Link) -> bool,
    changes: &mut Changes,
) -> Result<Option<&'a Link>> {
    match links.get(name) {
        Some(l) if right(l) => Ok(Some(l)),
        Some(_) => {
            changes.run("ip", &["link", "del", "dev", name])?;
            Ok(None)
        }
        None => Ok(None),
    }
}

/// One network's bridge, VXLAN device and taps. Returns whether the
/// bridge was created now (a DHCP server bound to an older one must be
/// restarted).
pub fn ensure_network(
    links: &BTreeMap<String, Link>,
    hn: &HostNetwork,
    vxlan: Vxlan,
    changes: &mut Changes,
) -> Result<bool> {
    let net = &hn.network;
    let names = device_names(&net.id);
    let gw_mac = gateway_mac(&net.id).to_string();
    let br = keep_if(links, &names.bridge, |l| l.kind == "bridge", changes)?;
    let created = br.is_none();
    if created {
        changes.run(
            "ip",
            &[
                "link",
                "add",
                "name",
                &names.bridge,
                "type",
                "bridge",
                "stp_state",
                "0",
            ],
        )?;
    }
    if br.is_none_or(|l| l.address != gw_mac) {
        changes.run(
            "ip",
            &["link", "set", "dev", &names.bridge, "address", &gw_mac],
        )?;
    }
    settle(br, &names.bridge, net.mtu, None, changes)?;
    match vxlan {
        Vxlan::Off => {}
        Vxlan::From(a) => ensure_vxlan(links, hn, Some(a), changes)?,
        Vxlan::Routed => ensure_vxlan(links, hn, None, changes)?,
    }
    for nic in &hn.nics {
        let tap = keep_if(links, &nic.tap, |l| l.tap, changes)?;
        if tap.is_none() {
            changes.run("ip", &["tuntap", "add", "dev", &nic.tap, "mode", "tap"])?;
        }
        settle(tap, &nic.tap, net.mtu, Some(&names.bridge), changes)?;
    }
    Ok(created)
}

/// The network's VXLAN device on its bridge, sending from `local`, or
/// without a local address, from the one the route picks (the underlay
/// address, or the tunnel address for a peer behind the tunnel).
fn ensure_vxlan(
    links: &BTreeMap<String, Link>,
    hn: &HostNetwork,
    local: Option<Ipv4Addr>,
    changes: &mut Changes,
) -> Result<()> {
    let net = &hn.network;
    let names = device_names(&net.id);
    let local = local.map(|a| a.to_string()).unwrap_or_default();
    let want = (
        u64::from(net.vni),
        local.clone(),
        u64::from(VXLAN_PORT),
        false,
    );
    let vx = keep_if(
        links,
        &names.vxlan,
        |l| l.vxlan.as_ref() == Some(&want),
        changes,
    )?;
    if vx.is_none() {
        let vni = net.vni.to_string();
        let port = VXLAN_PORT.to_string();
        let mut args = vec![
            "link",
            "add",
            "name",
            &names.vxlan,
            "type",
            "vxlan",
            "id",
            &vni,
            "dstport",
            &port,
            "nolearning",
        ];
        if !local.is_empty() {
            args.extend(["local", local.as_str()]);
        }
        changes.run("ip", &args)?;
    }
    settle(vx, &names.vxlan, net.mtu, Some(&names.bridge), changes)
}

/// The bridge carries the gateway's address (and nothing else of ours).
pub fn ensure_address(hn: &HostNetwork, changes: &mut Changes) -> Result<()> {
    let bridge = device_names(&hn.network.id).bridge;
    let want = hn
        .network
        .gateway
        .map(|g| format!("{g}/{}", hn.network.cidr.prefix()));
    let text = cmd::output("ip", &["-j", "-4", "addr", "show", "dev", &bridge])?;
    let mut have = Vec::new();
    for v in cmd::json_list("ip -j addr show", &text)? {
        for a in v["addr_info"].as_array().cloned().unwrap_or_default() {
            if let (Some(ip), Some(p)) = (a["local"].as_str(), a["prefixlen"].as_u64()) {
                have.push(format!("{ip}/{p}"));
            }
        }
    }
    for a in &have {
        if Some(a) != want.as_ref() {
            changes.run("ip", &["addr", "del", a, "dev", &bridge])?;
        }
    }
    if let Some(w) = want {
        if !have.contains(&w) {
            changes.run("ip", &["addr", "add", &w, "dev", &bridge])?;
        }
    }
    Ok(())
}
