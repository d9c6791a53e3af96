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
    links::remove_unwanted(&mut links, &links::wanted(&desired.networks), &mut changes)?;
    let mut bridges = Vec::new();
    for hn in &desired.networks {
        let created = links::ensure_network(&links, hn, desired.underlay, &mut changes)?;
        links::ensure_address(hn, &mut changes)?;
        fdb::ensure(hn, &mut changes)?;
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
    firewall::ensure_forwarding(&desired.networks, &mut changes)?;
    Ok(changes)
}

/// Reads a desired state from a JSON file (the `agent network-apply`
/// command), with errors that name the file.
pub fn read_state(path: &Path) -> cmd::Result<HostNetworkState> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| NetError(format!("read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| NetError(format!("{}: {e}", path.display())))
}
