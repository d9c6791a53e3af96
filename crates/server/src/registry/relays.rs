//! Live-migration streams being relayed between agents (see
//! [`crate::http::relay`]): the source sides waiting for their target to
//! dial in, and the counters `/api/v1/metrics` reports.
//!
//! Generic over the connection type so that this in-memory state does not
//! name the HTTP layer's WebSocket; the state instantiates it with it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::oneshot;

/// A relayed connection: (migration id, stream, connection id).
pub type Key = (String, String, String);

/// Connections waiting for their target side, and counters.
pub struct Relays<C> {
    pending: Mutex<HashMap<Key, oneshot::Sender<C>>>,
    bytes: AtomicU64,
    connections: AtomicU64,
}

impl<C> Default for Relays<C> {
    fn default() -> Self {
        Relays {
            pending: Mutex::new(HashMap::new()),
            bytes: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        }
    }
}

impl<C> Relays<C> {
    /// Bytes relayed (both directions) since the control plane started.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Connections relayed (both sides joined) since the control plane started.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Counts a connection whose both sides joined.
    pub fn connected(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// The counter of bytes relayed, added to as they pass.
    pub fn byte_counter(&self) -> &AtomicU64 {
        &self.bytes
    }

    /// The source sides waiting for their target, by key.
    pub fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<Key, oneshot::Sender<C>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}
