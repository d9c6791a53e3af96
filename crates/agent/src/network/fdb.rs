//! Head-end replication: the VXLAN device's forwarding entries.
//!
//! No multicast underlay is needed: for every other host carrying the
//! network the VXLAN device has an all-zeros entry (`bridge fdb append
//! 00:00:00:00:00:00 dev VX dst PEER`), so broadcast, multicast and
//! unknown unicast frames are copied to each peer; and for every remote
//! NIC an entry sending its MAC to the one host it is on. The device
//! learns nothing (`nolearning`): the control plane's list is the truth,
//! and an entry follows a VM when the list changes.

use std::collections::BTreeSet;

use virt8ra_api::{device_names, HostNetwork};

use super::cmd::{self, Changes, Result};

const ZERO: &str = "00:00:00:00:00:00";

/// The (MAC, destination) entries the device has now (only those with a
/// destination: the bridge's own entries for the port are not ours).
fn observe(vxlan: &str) -> Result<BTreeSet<(String, String)>> {
    let text = cmd::output("bridge", &["-j", "fdb", "show", "dev", vxlan])?;
    let mut out = BTreeSet::new();
    for v in cmd::json_list("bridge -j fdb show", &text)? {
        if let (Some(mac), Some(dst)) = (v["mac"].as_str(), v["dst"].as_str()) {
            out.insert((mac.to_ascii_lowercase(), dst.to_string()));
        }
    }
    Ok(out)
}

/// Makes the VXLAN device's entries exactly the network's peers and
/// remote MACs.
pub fn ensure(hn: &HostNetwork, changes: &mut Changes) -> Result<()> {
    let vx = device_names(&hn.network.id).vxlan;
    let mut want = BTreeSet::new();
    for p in &hn.peers {
        want.insert((ZERO.to_string(), p.underlay.to_string()));
    }
    for f in &hn.fdb {
        want.insert((f.mac.to_string(), f.peer.to_string()));
    }
    let have = observe(&vx)?;
    for (mac, dst) in have.difference(&want) {
        changes.run("bridge", &["fdb", "del", mac, "dev", &vx, "dst", dst])?;
    }
    for (mac, dst) in want.difference(&have) {
        let verb = if mac == ZERO { "append" } else { "add" };
        changes.run(
            "bridge",
            &[
                "fdb",
                verb,
                mac,
                "dev",
                &vx,
                "dst",
                dst,
                "self",
                "permanent",
            ],
        )?;
    }
    Ok(())
}
