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
    /// Serialises read-modify-write of VMs between API handlers, agent
    /// reports and the scheduler, so no update is lost between them.
    pub vm_lock: Mutex<()>,
    /// The placement engine, loaded with the topology.
    pub placement: Placement,
    pub started: std::time::Instant,
}

impl AppState {
    /// A host counts as alive when it heartbeated within three intervals.
    pub fn liveness_window(&self) -> Duration {
        self.heartbeat_interval * 3
    }
}
