//! Virtual networks, and the leases of their addresses.
//!
//! A lease row (`nic_leases`) exists for every NIC of a VM that is not
//! deleted. Its primary key `(network, ip)` is what makes IPAM safe: the
//! control plane picks an address from [`used_ips`], and if another
//! create took it in the meantime the insert fails as a conflict, which
//! the caller answers by picking again; no address is ever handed out
//! twice. Leases are written with the VM ([`sync_leases`], called from
//! the VM writes): created with it, released when it is deleted.

use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;

use rusqlite::{params, Connection};
use virt8ra_api::{Network, Vm, VmPhase};

use super::engine::{atomic, SqliteStore};
use super::rows::{conflict_or_db, db, delete_row, get_body, list_bodies, to_json};
use crate::error::{Result, StoreError};

/// The largest VXLAN network identifier (24 bits).
const MAX_VNI: u32 = (1 << 24) - 1;

/// Creates the network; when `n.vni` is 0 it gets the lowest VNI no other
/// network has. Returns it as stored.
pub(super) async fn create_network(store: &SqliteStore, n: &Network) -> Result<Network> {
    let mut n = n.clone();
    store
        .write(move |c| {
            atomic(c, |tx| {
                if n.vni == 0 {
                    n.vni = free_vni(tx)?;
                }
                tx.execute(
                    "INSERT INTO networks (id, name, vni, body) VALUES (?1, ?2, ?3, ?4)",
                    params![n.id, n.name, n.vni, to_json(&n)?],
                )
                .map_err(|e| {
                    conflict_or_db(e, "create_network", || {
                        format!("network '{}' (or VNI {}) already exists", n.name, n.vni)
                    })
                })?;
                Ok(n)
            })
        })
        .await
}

fn free_vni(tx: &Connection) -> Result<u32> {
    let mut st = tx
        .prepare("SELECT vni FROM networks ORDER BY vni")
        .map_err(db("free_vni"))?;
    let used = st
        .query_map([], |r| r.get::<_, u32>(0))
        .map_err(db("free_vni"))?;
    let mut want = 1u32;
    for v in used {
        let v = v.map_err(db("free_vni"))?;
        if v > want {
            break;
        }
        want = want.max(v + 1);
    }
    if want > MAX_VNI {
        return Err(StoreError::Conflict(
            "every VXLAN network identifier is taken".into(),
        ));
    }
    Ok(want)
}

pub(super) async fn list_networks(store: &SqliteStore) -> Result<Vec<Network>> {
    store.read(|c| list_bodies(c, "networks")).await
}

pub(super) async fn get_network(store: &SqliteStore, key: &str) -> Result<Network> {
    let key = key.to_string();
    store
        .read(move |c| get_body(c, "networks", "network", &key))
        .await
}

/// Refused while NICs hold addresses on it.
pub(super) async fn delete_network(store: &SqliteStore, id: &str) -> Result<()> {
    let id = id.to_string();
    store
        .write(move |c| {
            atomic(c, |tx| {
                let n: Network = get_body(tx, "networks", "network", &id)?;
                let vms = vms_on(tx, &n.id)?;
                if !vms.is_empty() {
                    let shown: Vec<&str> = vms.iter().take(5).map(String::as_str).collect();
                    return Err(StoreError::Conflict(format!(
                        "network '{}' still has NICs of {} VM(s) ({}{}); delete them first",
                        n.name,
                        vms.len(),
                        shown.join(", "),
                        if vms.len() > 5 { ", ..." } else { "" }
                    )));
                }
                delete_row(tx, "networks", "network", &n.id)
            })
        })
        .await
}

/// The names of the VMs with a NIC on `network`, by name.
fn vms_on(tx: &Connection, network: &str) -> Result<Vec<String>> {
    let mut st = tx
        .prepare(
            "SELECT DISTINCT v.name FROM nic_leases l JOIN vms v ON v.id = l.vm
             WHERE l.network = ?1 ORDER BY v.name",
        )
        .map_err(db("delete_network"))?;
    let rows = st
        .query_map([network], |r| r.get::<_, String>(0))
        .map_err(db("delete_network"))?;
    rows.map(|r| r.map_err(db("delete_network"))).collect()
}

/// The addresses NICs hold on `network`.
pub(super) async fn used_ips(store: &SqliteStore, network: &str) -> Result<BTreeSet<Ipv4Addr>> {
    let network = network.to_string();
    store
        .read(move |c| {
            let mut st = c
                .prepare_cached("SELECT ip FROM nic_leases WHERE network = ?1")
                .map_err(db("used_ips"))?;
            let rows = st
                .query_map([&network], |r| r.get::<_, String>(0))
                .map_err(db("used_ips"))?;
            let mut out = BTreeSet::new();
            for r in rows {
                let s = r.map_err(db("used_ips"))?;
                let ip = s.parse().map_err(|e| StoreError::db("corrupt lease", e))?;
                out.insert(ip);
            }
            Ok(out)
        })
        .await
}

/// Makes the leases of `vm` what its NICs say: none once it is deleted,
/// else one per NIC. A NIC whose address another NIC holds is a conflict
/// that names the address; the caller runs this in a savepoint, so a
/// conflict changes nothing.
pub(super) fn sync_leases(tx: &Connection, vm: &Vm) -> Result<()> {
    let held = held_by(tx, &vm.id)?;
    let want: HashSet<&str> = if vm.status.phase == VmPhase::Deleted {
        HashSet::new()
    } else {
        vm.status.nics.iter().map(|n| n.id.as_str()).collect()
    };
    for nic in held.iter().filter(|n| !want.contains(n.as_str())) {
        tx.execute("DELETE FROM nic_leases WHERE nic = ?1", [nic])
            .map_err(db("sync_leases"))?;
    }
    for n in vm
        .status
        .nics
        .iter()
        .filter(|n| want.contains(n.id.as_str()))
    {
        if held.contains(&n.id) {
            continue;
        }
        tx.execute(
            "INSERT INTO nic_leases (network, ip, vm, nic, mac) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![n.network_id, n.ip.to_string(), vm.id, n.id, n.mac],
        )
        .map_err(|e| {
            conflict_or_db(e, "sync_leases", || {
                format!(
                    "address {} (or MAC {}) is already taken on network '{}'",
                    n.ip, n.mac, n.network
                )
            })
        })?;
    }
    Ok(())
}

fn held_by(tx: &Connection, vm: &str) -> Result<HashSet<String>> {
    let mut st = tx
        .prepare_cached("SELECT nic FROM nic_leases WHERE vm = ?1")
        .map_err(db("sync_leases"))?;
    let rows = st
        .query_map([vm], |r| r.get::<_, String>(0))
        .map_err(db("sync_leases"))?;
    rows.map(|r| r.map_err(db("sync_leases"))).collect()
}
