//! The control plane's shared state: the store, the agent hub, and the
//! scheduler's wake-up signal.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Notify};
use virt8ra_store::Store;

use crate::hub::Hub;
use crate::placement::Placement;

pub type App = Arc<AppState>;

pub struct AppState {
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
    pub placement: Placement,
    pub started: std::time::Instant,
    /// Hosts whose desired state may have changed since the last pass.
    pub marked_hosts: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Hosts with VMs in phase `deleting`, whose heartbeats must be checked
    /// against the store.
    pub deleting_hosts: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Every durable VM change, for watchers (`GET /api/v1/watch`).
    pub changes: tokio::sync::broadcast::Sender<virt8ra_api::WatchEvent>,
    /// Migrations and exports under way.
    pub migrations: crate::migration::Migrations,
}

impl AppState {
    /// Stores a new VM and tells watchers.
    pub async fn create_vm(&self, vm: &virt8ra_api::Vm, event: &str) -> virt8ra_store::Result<()> {
        self.store.create_vm(vm, event).await?;
        self.publish_vm(vm);
        Ok(())
    }

    /// Stores a VM's new state and tells watchers.
    pub async fn update_vm(
        &self,
        vm: &virt8ra_api::Vm,
        event: Option<&str>,
    ) -> virt8ra_store::Result<()> {
        self.store.update_vm(vm, event).await?;
        self.publish_vm(vm);
        Ok(())
    }

    /// Tells watchers about a VM's new state (already stored).
    pub fn publish_vm(&self, vm: &virt8ra_api::Vm) {
        // No receiver is not an error: nobody is watching.
        let _ = self.changes.send(virt8ra_api::WatchEvent::Vm {
            vm: Box::new(vm.clone()),
        });
    }

    /// Notes that a host's VMs changed, so the scheduler sends it its
    /// desired state on the next pass.
    pub fn mark_host(&self, host_id: &str) {
        self.marked_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host_id.to_string());
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

    pub fn take_marked_hosts(&self) -> Vec<String> {
        let mut m = self.marked_hosts.lock().unwrap_or_else(|p| p.into_inner());
        m.drain().collect()
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
