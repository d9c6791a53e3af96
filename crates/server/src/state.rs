//! The control plane's shared state ([`ControlPlane`], shared as [`Ctx`]):
//! the store, the registry's in-memory state (hub, indexes, migrations in
//! flight, the loaded placement engine), and the scheduler's wake-up
//! signal. Every layer above takes a `&Ctx`.
//!
//! Its layer is between the services and the registry: it may use the
//! registry and the store, never a service, a workflow or the HTTP layer.
//! (Named so as not to be confused with `virt8ra_api::App`, a deployed
//! appliance.)

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Notify};
use virt8ra_api::protocol::ImageRef;
use virt8ra_store::Store;

use crate::registry::distribution::ViewCache;
use crate::registry::hub::Hub;
use crate::registry::marks::Marks;
use crate::registry::migrations::Migrations;
use crate::registry::placement::LoadedPlacement;
use crate::registry::staging::StagingLocks;
use crate::registry::transfers::Transfers;

/// The shared state as every handler, service and workflow holds it.
pub type Ctx = Arc<ControlPlane>;

pub struct ControlPlane {
    pub store: Arc<dyn Store>,
    pub hub: Hub,
    pub data_dir: PathBuf,
    /// Content-addressed image files: `<sha256>.qcow2`.
    pub images_dir: PathBuf,
    pub heartbeat_interval: Duration,
    /// Wakes the scheduler early (a VM was created, a host connected).
    pub wake: Notify,
    /// Serialise read-modify-write of one VM between API handlers, agent
    /// reports and the scheduler, so no update is lost between them. Striped
    /// by VM id, so updates of different VMs run concurrently (and share the
    /// store's group commits).
    pub vm_locks: Vec<Mutex<()>>,
    /// The placement engine, loaded with the topology.
    pub placement: LoadedPlacement,
    /// Addresses being given to NICs of VMs not yet written.
    pub ipam: crate::registry::networks::Ipam,
    /// Hosts' addresses inside the tunnels between sites.
    pub tunnels: crate::registry::tunnels::TunnelAddresses,
    pub started: std::time::Instant,
    /// Hosts whose desired state may have changed since the last pass, and
    /// which of their VMs (see [`Marks`]).
    pub marked_hosts: std::sync::Mutex<std::collections::HashMap<String, Marks>>,
    /// Hosts with VMs in phase `deleting`, whose heartbeats must be checked
    /// against the store.
    pub deleting_hosts: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Every durable VM change, for watchers (`GET /api/v1/watch`).
    pub changes: tokio::sync::broadcast::Sender<virt8ra_api::WatchEvent>,
    /// Migrations and exports under way.
    pub migrations: Migrations,
    /// The locks of staged disk files (see [`crate::services::staging`]).
    pub staging: StagingLocks,
    /// Image bytes served, by who fetched them.
    pub transfers: Transfers,
    /// The last view of site-local image distribution.
    pub distribution: ViewCache,
    /// One admin-token rotation at a time, so that the token file always
    /// holds the token the database has.
    pub token_rotation: tokio::sync::Mutex<()>,
    /// Every VM, in memory: serves reads; written through after each
    /// durable write (see [`crate::registry::index`]).
    pub vms: crate::registry::index::VmIndex,
    /// Every host, in memory, written through like `vms`.
    pub hosts: crate::registry::index::HostIndex,
    /// What the network plane computed last (see `services::netplane`).
    pub netplane: crate::registry::netplane::NetPlane,
    /// Images as the agent protocol names them, by image id. An image id
    /// always names the same bytes, so entries never go stale.
    pub image_refs: std::sync::Mutex<std::collections::HashMap<String, ImageRef>>,
    /// Certificates the control plane's own outbound fetches trust (catalog
    /// URLs, image imports): the public web roots plus `--ca-cert`.
    pub trust: virt8ra_tls::Trust,
    /// The catalog's signing key (`DATA_DIR/catalog.key`), loaded or made
    /// once at start-up, never in a request (see [`crate::keys`]).
    pub catalog_key: ed25519_dalek::SigningKey,
    /// The key each site's shared secret is derived from
    /// (`DATA_DIR/site.key`; see [`crate::keys::site_secret`]).
    pub site_key: [u8; 32],
    /// The largest virtual size (bytes) of an image accepted on upload or
    /// import (`--max-image-virtual-size-gib`).
    pub max_image_virtual_size: u64,
    /// Prometheus metrics (`GET /metrics`; see [`crate::registry::metrics`]).
    pub metrics: Arc<crate::registry::metrics::Metrics>,
    /// The showback's power model, when the operator set one (`--power-*`;
    /// else `services::usage::DEFAULT_POWER`).
    pub power: std::sync::OnceLock<virt8ra_api::PowerModel>,
    /// Projects' quotas (see [`crate::registry::quotas`]).
    pub quotas: crate::registry::quotas::Quotas,
}

impl ControlPlane {
    /// Stores a new VM with its first events, indexes it and tells watchers.
    pub async fn create_vm(
        &self,
        vm: &virt8ra_api::Vm,
        events: &[&str],
    ) -> virt8ra_store::Result<()> {
        self.store.create_vm(vm, events).await?;
        self.vms.put(vm);
        self.publish_vm(vm);
        Ok(())
    }

    /// Stores a VM's new state, indexes it and tells watchers. Callers hold
    /// the VM's lock, so the index sees the VM's writes in their durable order.
    pub async fn update_vm(
        &self,
        vm: &virt8ra_api::Vm,
        event: Option<&str>,
    ) -> virt8ra_store::Result<()> {
        self.store.update_vm(vm, event).await?;
        self.vms.put(vm);
        self.publish_vm(vm);
        Ok(())
    }

    /// Tells watchers about a VM's new state (already stored).
    pub fn publish_vm(&self, vm: &virt8ra_api::Vm) {
        // Nobody watching is the common case under load: skip the copy.
        // (A watcher that subscribes meanwhile starts after this change,
        // as it would had the send come first.)
        if self.changes.receiver_count() == 0 {
            return;
        }
        let _ = self.changes.send(virt8ra_api::WatchEvent::Vm {
            vm: Box::new(vm.clone()),
        });
    }

    /// Notes that a host's VMs changed, so the scheduler recomputes its
    /// whole desired state on the next pass.
    pub fn mark_host(&self, host_id: &str) {
        self.marked_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host_id.to_string(), Marks::All);
    }

    /// Notes that one VM of a host changed (created, placed, an action,
    /// deleted), so the scheduler sends the host that change on the next
    /// pass without recomputing the others.
    pub fn mark_vm(&self, host_id: &str, vm_id: &str) {
        let mut m = self.marked_hosts.lock().unwrap_or_else(|p| p.into_inner());
        match m
            .entry(host_id.to_string())
            .or_insert_with(|| Marks::Vms(Default::default()))
        {
            Marks::All => {}
            Marks::Vms(v) => {
                v.insert(vm_id.to_string());
            }
        }
    }

    pub fn note_deletion(&self, host_id: &str) {
        self.deleting_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host_id.to_string());
    }

    pub fn has_deletions(&self, host_id: &str) -> bool {
        self.deleting_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(host_id)
    }

    pub fn deletions_done(&self, host_id: &str) {
        self.deleting_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(host_id);
    }

    pub fn take_marked_hosts(&self) -> Vec<(String, Marks)> {
        let mut m = self.marked_hosts.lock().unwrap_or_else(|p| p.into_inner());
        m.drain().collect()
    }

    pub fn image_ref(&self, image_id: &str) -> Option<ImageRef> {
        self.image_refs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(image_id)
            .cloned()
    }

    pub fn remember_image_ref(&self, r: &ImageRef) {
        self.image_refs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(r.id.clone(), r.clone());
    }

    /// A host by id or name, from memory.
    pub fn host(&self, key: &str) -> Result<virt8ra_api::Host, virt8ra_store::StoreError> {
        self.hosts
            .get(key)
            .map(|h| (*h).clone())
            .ok_or_else(|| virt8ra_store::StoreError::not_found("host", key))
    }

    /// Stores a host's new state and indexes it.
    pub async fn update_host(&self, h: &virt8ra_api::Host) -> virt8ra_store::Result<()> {
        self.store.update_host(h).await?;
        self.hosts.put(h);
        Ok(())
    }

    /// A VM by id or name, from memory.
    pub fn vm(&self, key: &str) -> Result<virt8ra_api::Vm, virt8ra_store::StoreError> {
        self.vms
            .get(key)
            .map(|v| (*v).clone())
            .ok_or_else(|| virt8ra_store::StoreError::not_found("VM", key))
    }

    /// The lock of VM `id`. Hold at most one at a time.
    pub async fn lock_vm(&self, id: &str) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        id.hash(&mut h);
        let i = (h.finish() as usize) % self.vm_locks.len().max(1);
        self.vm_locks[i].lock().await
    }

    /// A host counts as alive when it heartbeated within three intervals.
    pub fn liveness_window(&self) -> Duration {
        self.heartbeat_interval * 3
    }
}
