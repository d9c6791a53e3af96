//! The network data plane of a host (issue 27): turns the desired
//! [`HostNetworkState`] into Linux devices and rules, and removes ours
//! that are not desired.
//!
//! Per network: a bridge `v8b-HASH` carrying the gateway address (with the
//! same MAC on every host: an anycast gateway), a VXLAN device `v8x-HASH`
//! (the network's VNI, this host's underlay address as source, UDP 4789,
//! no learning) attached to it, with head-end replication to the network's
//! other hosts ([`fdb`]), a tap `v8t-HASH` per local NIC for QEMU, DHCP
//! with static leases ([`dhcp`]) and nftables rules for outbound NAT and
//! isolation ([`firewall`]). Names and the rules that derive them live in
//! `virt8ra_api::network`, shared with the control plane.
//!
//! [`reconcile`] is idempotent and complete: it observes what the host has,
//! changes only what differs (a second run changes nothing and says so),
//! and deletes every device, forwarding entry, DHCP server and rule of
//! ours (the `v8` prefix, our nftables tables, our data directory) that the
//! desired state does not name. So an agent restart or a host reboot (all
//! devices gone) is handled by running it again, and after a network or a
//! NIC is removed nothing of it is left. Devices of others are never
//! touched, not even ones attached to our bridges.
//!
//! The agent keeps the last state the control plane sent
//! ([`ServerMessage::NetworkState`](virt8ra_api::protocol::ServerMessage))
//! in `DATA/network/desired.json` ([`store`]) and applies it again when it
//! starts ([`apply_stored`]), before any VM, whose taps it makes.
//!
//! It runs the `ip`, `bridge`, `nft` and `dnsmasq` commands (iproute2,
//! nftables, dnsmasq-base) in the network namespace it is called in, and is
//! synchronous: the agent calls it off its async threads.

use std::path::Path;

use virt8ra_api::{device_names, HostNetworkState};

pub mod cmd;
pub mod dhcp;
pub mod fdb;
pub mod firewall;
pub mod links;
pub mod tunnel;
pub mod wg_kernel;

pub use cmd::{Changes, NetError};

/// Where the data plane keeps its files under the agent's data directory.
pub const DIR: &str = "network";

/// Applies `desired` to this host (this network namespace). Refuses an
/// invalid state before changing anything. Returns what it changed.
pub fn reconcile(desired: &HostNetworkState, data_dir: &Path) -> cmd::Result<Changes> {
    desired
        .validate()
        .map_err(|e| NetError(format!("invalid network state: {e}")))?;
    let dhcp_root = data_dir.join(DIR).join("dhcp");
    let mut changes = Changes::default();
    let mut links = links::observe()?;
    let vxlan = links::Vxlan::of(desired);
    let wanted = links::wanted(&desired.networks, vxlan);
    links::remove_unwanted(&mut links, &wanted, &mut changes)?;
    let mut bridges = Vec::new();
    // The tunnel first: VXLAN devices send to peers behind it.
    tunnel::ensure(&data_dir.join(DIR), desired.tunnel.as_ref(), &mut changes)?;
    for hn in &desired.networks {
        let created = links::ensure_network(&links, hn, vxlan, &mut changes)?;
        links::ensure_address(hn, &mut changes)?;
        if vxlan != links::Vxlan::Off {
            fdb::ensure(hn, &mut changes)?;
        }
        let bridge = device_names(&hn.network.id).bridge;
        let index = if created {
            links::observe()?
                .get(&bridge)
                .map(|l| l.ifindex)
                .unwrap_or(0)
        } else {
            links.get(&bridge).map(|l| l.ifindex).unwrap_or(0)
        };
        bridges.push(bridge);
        dhcp::ensure(&dhcp_root, hn, index, &mut changes)?;
    }
    dhcp::remove_unwanted(&dhcp_root, &bridges, &mut changes)?;
    firewall::ensure(&desired.networks, &mut changes)?;
    let relay = desired.tunnel.as_ref().is_some_and(|t| t.relay);
    firewall::ensure_forwarding(&desired.networks, relay, &mut changes)?;
    firewall::ensure_bridge_filtering(&desired.networks, &mut changes)?;
    Ok(changes)
}

/// The last network state the control plane sent, as the agent keeps it
/// (`DATA/network/desired.json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Stored {
    pub generation: u64,
    pub state: HostNetworkState,
}

fn stored_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join(DIR).join("desired.json")
}

/// The stored network state, if any.
pub fn load(data_dir: &Path) -> cmd::Result<Option<Stored>> {
    let path = stored_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| NetError(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(NetError(format!("read {}: {e}", path.display()))),
    }
}

/// Keeps `new` as the network state to apply (durably, before it is
/// applied, so a crash in between re-applies it at start), unless the
/// stored one is newer: then returns `false` and keeps that.
pub fn store(data_dir: &Path, new: &Stored) -> cmd::Result<bool> {
    if load(data_dir)?.is_some_and(|old| old.generation > new.generation) {
        return Ok(false);
    }
    let dir = data_dir.join(DIR);
    crate::private::make_dir(&dir)
        .map_err(|e| NetError(format!("create {}: {e}", dir.display())))?;
    let path = stored_path(data_dir);
    let text = serde_json::to_vec_pretty(new).map_err(|e| NetError(e.to_string()))?;
    crate::durable::write_atomic(&path, &text)
        .map_err(|e| NetError(format!("write {}: {e}", path.display())))?;
    Ok(true)
}

/// Applies the stored network state, if there is one (agent start: after
/// a reboot every device is gone). Returns what changed.
pub fn apply_stored(data_dir: &Path) -> cmd::Result<Changes> {
    match load(data_dir)? {
        Some(s) => reconcile(&s.state, data_dir),
        None => Ok(Changes::default()),
    }
}

/// Whether the host carries virtual networks: its kept network state has
/// some (told to the control plane in `hello`).
pub fn carries_networks(data_dir: &Path) -> bool {
    matches!(load(data_dir), Ok(Some(s)) if !s.state.networks.is_empty())
}

/// Whether network device `name` exists in this network namespace (a
/// VM's tap, before QEMU opens it).
pub fn tap_exists(name: &str) -> bool {
    // Interface names never hold '/', but a name is data: do not let one
    // walk out of the directory.
    !name.is_empty()
        && !name.contains(['/', '\0'])
        && name != "."
        && name != ".."
        && Path::new("/sys/class/net").join(name).exists()
}

/// Reads a desired state from a JSON file (the `agent network-apply`
/// command), with errors that name the file.
pub fn read_state(path: &Path) -> cmd::Result<HostNetworkState> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| NetError(format!("read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| NetError(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(underlay: &str) -> HostNetworkState {
        HostNetworkState {
            underlay: underlay.parse().unwrap_or(std::net::Ipv4Addr::LOCALHOST),
            networks: vec![],
            tunnel: None,
        }
    }

    #[test]
    fn the_stored_state_keeps_the_newest_generation() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(load(d.path()).ok(), Some(None));
        let s5 = Stored {
            generation: 5,
            state: state("10.0.0.5"),
        };
        assert_eq!(store(d.path(), &s5).ok(), Some(true));
        let s4 = Stored {
            generation: 4,
            state: state("10.0.0.4"),
        };
        assert_eq!(
            store(d.path(), &s4).ok(),
            Some(false),
            "an older one is ignored"
        );
        assert_eq!(load(d.path()).ok(), Some(Some(s5.clone())));
        let s6 = Stored {
            generation: 6,
            state: state("10.0.0.6"),
        };
        assert_eq!(store(d.path(), &s6).ok(), Some(true));
        assert_eq!(load(d.path()).ok(), Some(Some(s6)));
        // Nothing stored, nothing applied (and no command run).
        let empty = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(apply_stored(empty.path()).ok(), Some(Changes::default()));
        // A damaged file is an error that names it, not a panic.
        std::fs::write(d.path().join(DIR).join("desired.json"), "{").unwrap_or_default();
        let e = load(d.path()).err().map(|e| e.0).unwrap_or_default();
        assert!(e.contains("desired.json"), "{e}");
    }
}
