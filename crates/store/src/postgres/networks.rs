//! Virtual networks, and the leases of their addresses.
//!
//! As in SQLite's: a lease row (`nic_leases`) exists for every NIC of a VM
//! that is not deleted, and its primary key `(network, ip)` is what makes
//! IPAM safe: an address another create took in the meantime fails the
//! insert as a conflict, whatever the concurrency. Leases are written with
//! the VM ([`sync_leases`], called from the VM writes, in their
//! transaction).

use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;

use deadpool_postgres::{GenericClient, Transaction};
use virt8ra_api::{Network, Vm, VmPhase};

use super::engine::{commit, retry, Lock, PgStore};
use super::rows::{conflict_or_db, db, delete_row, get_body, list_bodies, texts, to_json};
use crate::error::{Result, StoreError};

/// The largest VXLAN network identifier (24 bits).
const MAX_VNI: i64 = (1 << 24) - 1;

/// Creates the network; when `n.vni` is 0 it gets the lowest VNI no other
/// network has. Runs alone ([`Lock::Exclusive`]): two creates at once do
/// not pick the same free VNI. Returns it as stored.
pub(super) async fn create_network(store: &PgStore, n: &Network) -> Result<Network> {
    retry(|| async {
        let mut n = n.clone();
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Exclusive).await?;
        if n.vni == 0 {
            n.vni = free_vni(&tx).await?;
        }
        tx.execute(
            "INSERT INTO networks (id, name, vni, body) VALUES ($1, $2, $3, $4)",
            &[&n.id, &n.name, &i64::from(n.vni), &to_json(&n)?],
        )
        .await
        .map_err(|e| {
            conflict_or_db(e, "create_network", || {
                format!("network '{}' (or VNI {}) already exists", n.name, n.vni)
            })
        })?;
        commit(tx, "create_network").await?;
        Ok(n)
    })
    .await
}

async fn free_vni(tx: &Transaction<'_>) -> Result<u32> {
    let rows = tx
        .query("SELECT vni FROM networks ORDER BY vni", &[])
        .await
        .map_err(db("free_vni"))?;
    let mut want = 1i64;
    for r in &rows {
        let v: i64 = r.try_get(0).map_err(db("free_vni"))?;
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
    Ok(want as u32)
}

pub(super) async fn list_networks(store: &PgStore) -> Result<Vec<Network>> {
    list_bodies(&store.client().await?, "networks").await
}

pub(super) async fn get_network(store: &PgStore, key: &str) -> Result<Network> {
    get_body(&store.client().await?, "networks", "network", key).await
}

/// Refused while NICs hold addresses on it. Runs alone
/// ([`Lock::Exclusive`]): no NIC can take an address between the check
/// and the delete.
pub(super) async fn delete_network(store: &PgStore, id: &str) -> Result<()> {
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Exclusive).await?;
        let n: Network = get_body(&tx, "networks", "network", id).await?;
        let vms = vms_on(&tx, &n.id).await?;
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
        delete_row(&tx, "networks", "network", &n.id).await?;
        commit(tx, "delete_network").await
    })
    .await
}

/// The names of the VMs with a NIC on `network`, by name.
async fn vms_on(tx: &Transaction<'_>, network: &str) -> Result<Vec<String>> {
    let rows = tx
        .query(
            "SELECT DISTINCT v.name FROM nic_leases l JOIN vms v ON v.id = l.vm
             WHERE l.network = $1 ORDER BY v.name",
            &[&network],
        )
        .await
        .map_err(db("delete_network"))?;
    texts(&rows, "delete_network")
}

/// The addresses NICs hold on `network`.
pub(super) async fn used_ips(store: &PgStore, network: &str) -> Result<BTreeSet<Ipv4Addr>> {
    let c = store.client().await?;
    let st = c
        .prepare_cached("SELECT ip FROM nic_leases WHERE network = $1")
        .await
        .map_err(db("used_ips"))?;
    let rows = c.query(&st, &[&network]).await.map_err(db("used_ips"))?;
    texts(&rows, "used_ips")?
        .iter()
        .map(|s| s.parse().map_err(|e| StoreError::db("corrupt lease", e)))
        .collect()
}

/// Makes the leases of `vm` what its NICs say: none once it is deleted,
/// else one per NIC. A NIC whose address another NIC holds is a conflict
/// that names the address; it fails the transaction, so it changes nothing.
pub(super) async fn sync_leases(tx: &Transaction<'_>, vm: &Vm) -> Result<()> {
    let held = held_by(tx, &vm.id).await?;
    let want: HashSet<&str> = if vm.status.phase == VmPhase::Deleted {
        HashSet::new()
    } else {
        vm.status.nics.iter().map(|n| n.id.as_str()).collect()
    };
    for nic in held.iter().filter(|n| !want.contains(n.as_str())) {
        tx.execute("DELETE FROM nic_leases WHERE nic = $1", &[nic])
            .await
            .map_err(db("sync_leases"))?;
    }
    for n in vm
        .status
        .nics
        .iter()
        .filter(|n| want.contains(n.id.as_str()) && !held.contains(&n.id))
    {
        tx.execute(
            "INSERT INTO nic_leases (network, ip, vm, nic, mac) VALUES ($1, $2, $3, $4, $5)",
            &[&n.network_id, &n.ip.to_string(), &vm.id, &n.id, &n.mac],
        )
        .await
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

async fn held_by(tx: &Transaction<'_>, vm: &str) -> Result<HashSet<String>> {
    let st = tx
        .prepare_cached("SELECT nic FROM nic_leases WHERE vm = $1")
        .await
        .map_err(db("sync_leases"))?;
    let rows = tx.query(&st, &[&vm]).await.map_err(db("sync_leases"))?;
    Ok(texts(&rows, "sync_leases")?.into_iter().collect())
}
