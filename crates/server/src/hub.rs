//! The agent hub: who is connected, their live heartbeat data, and a way to
//! send each one a message.
//!
//! Heartbeats land here, in memory, and are not written to the database on
//! every beat: a host's liveness (ready or unreachable) is derived from the
//! time of its last beat. Only connects and disconnects are persisted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};
use virt8ra_api::protocol::{ServerMessage, VmReport};
use virt8ra_api::HostUsage;

use crate::error::ApiError;

#[derive(Debug, Clone)]
pub struct ConsoleReply {
    pub data: String,
    pub truncated: bool,
    pub error: Option<String>,
}

/// Where a host's messages go: its own WebSocket's writer, or its channel
/// of a multiplexed connection (the frame carries the channel number), so
/// a mux host needs no queue and task of its own.
#[derive(Clone)]
pub enum Outbox {
    Direct(mpsc::UnboundedSender<ServerMessage>),
    Mux {
        ch: u32,
        down: mpsc::UnboundedSender<virt8ra_api::mux::MuxDown>,
    },
}

impl Outbox {
    /// False when the transport is gone.
    pub fn send(&self, msg: ServerMessage) -> bool {
        match self {
            Outbox::Direct(tx) => tx.send(msg).is_ok(),
            Outbox::Mux { ch, down } => down
                .send(virt8ra_api::mux::MuxDown::Msg { ch: *ch, msg })
                .is_ok(),
        }
    }
}

struct Live {
    conn_id: u64,
    tx: Outbox,
    last_beat: Instant,
    last_beat_at: DateTime<Utc>,
    usage: HostUsage,
    /// Fingerprint of the last desired state sent on this connection.
    last_desired: Option<u64>,
    /// A hash of the last report per VM, to skip unchanged ones (a hash,
    /// not the report: at a million VMs the copies would cost 100 MB).
    reports: HashMap<String, u64>,
    /// Protocol version negotiated on this connection.
    protocol: u32,
}

#[derive(Default)]
pub struct Hub {
    live: Mutex<HashMap<String, Live>>,
    next_id: AtomicU64,
    heartbeats: AtomicU64,
    console: Mutex<HashMap<u64, oneshot::Sender<ConsoleReply>>>,
}

/// What the API shows of a host's connection.
#[derive(Debug, Clone)]
pub struct LiveView {
    pub connected: bool,
    pub alive: bool,
    pub last_beat_at: DateTime<Utc>,
    pub usage: HostUsage,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        // A panic while holding this lock cannot leave the map half-updated
        // (every update is a single insert/remove/field write), so recover.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection of `host_id`, replacing an older one.
    pub fn register(&self, host_id: &str, tx: Outbox) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.lock().insert(
            host_id.to_string(),
            Live {
                conn_id: id,
                tx,
                last_beat: Instant::now(),
                last_beat_at: Utc::now(),
                usage: HostUsage::default(),
                last_desired: None,
                reports: HashMap::new(),
                protocol: 0,
            },
        );
        id
    }

    /// Removes the connection, if it is still the current one.
    pub fn unregister(&self, host_id: &str, conn_id: u64) -> bool {
        let mut m = self.lock();
        if m.get(host_id).map(|l| l.conn_id) == Some(conn_id) {
            m.remove(host_id);
            true
        } else {
            false
        }
    }

    /// Records the protocol version of a host's current connection.
    pub fn set_protocol(&self, host_id: &str, version: u32) {
        if let Some(l) = self.lock().get_mut(host_id) {
            l.protocol = version;
        }
    }

    /// The protocol version a connected host speaks.
    pub fn protocol(&self, host_id: &str) -> Option<u32> {
        self.lock().get(host_id).map(|l| l.protocol)
    }

    /// Heartbeats received so far.
    pub fn heartbeats(&self) -> u64 {
        self.heartbeats.load(Ordering::Relaxed)
    }

    pub fn connected_count(&self) -> usize {
        self.lock().len()
    }

    pub fn heartbeat(&self, host_id: &str, usage: HostUsage) {
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
        if let Some(l) = self.lock().get_mut(host_id) {
            l.last_beat = Instant::now();
            l.last_beat_at = Utc::now();
            l.usage = usage;
        }
    }

    /// True when the report differs from the last one seen for this VM.
    pub fn report_changed(&self, host_id: &str, r: &VmReport) -> bool {
        let mut m = self.lock();
        let Some(l) = m.get_mut(host_id) else {
            return true;
        };
        let h = report_hash(r);
        if l.reports.get(&r.id) == Some(&h) {
            return false;
        }
        l.reports.insert(r.id.clone(), h);
        true
    }

    /// Forget the cached report of a VM so that the next one is processed.
    pub fn forget_report(&self, host_id: &str, vm_id: &str) {
        if let Some(l) = self.lock().get_mut(host_id) {
            l.reports.remove(vm_id);
        }
    }

    pub fn view(&self, host_id: &str, window: Duration) -> Option<LiveView> {
        self.lock().get(host_id).map(|l| LiveView {
            connected: true,
            alive: l.last_beat.elapsed() <= window,
            last_beat_at: l.last_beat_at,
            usage: l.usage.clone(),
        })
    }

    /// Runs `f` with a test of whether a host (by id) heartbeated within
    /// `window`, under the lock (keep `f` short: heartbeats wait for it).
    pub fn with_alive<T>(&self, window: Duration, f: impl FnOnce(&dyn Fn(&str) -> bool) -> T) -> T {
        let m = self.lock();
        let now = Instant::now();
        let alive = |id: &str| {
            m.get(id)
                .is_some_and(|l| now.saturating_duration_since(l.last_beat) <= window)
        };
        f(&alive)
    }

    pub fn connected_hosts(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    pub fn send(&self, host_id: &str, msg: ServerMessage) -> bool {
        self.lock()
            .get(host_id)
            .map(|l| l.tx.send(msg))
            .unwrap_or(false)
    }

    /// Sends a desired state unless the same one (by fingerprint) was
    /// already sent on the current connection.
    pub fn send_desired(&self, host_id: &str, fingerprint: u64, msg: ServerMessage) -> bool {
        let mut m = self.lock();
        let Some(l) = m.get_mut(host_id) else {
            return false;
        };
        if l.last_desired == Some(fingerprint) {
            return false;
        }
        if l.tx.send(msg) {
            l.last_desired = Some(fingerprint);
            true
        } else {
            false
        }
    }

    /// Asks an agent for the tail of a VM's console log.
    pub async fn console(
        &self,
        host_id: &str,
        vm_id: &str,
        max_bytes: u64,
    ) -> Result<ConsoleReply, ApiError> {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        self.console
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(request_id, tx);
        let sent = self.send(
            host_id,
            ServerMessage::ConsoleRequest {
                request_id,
                vm_id: vm_id.to_string(),
                max_bytes,
            },
        );
        let result = if !sent {
            Err(ApiError::Unavailable(
                "the VM's host agent is not connected; try again when it is back".into(),
            ))
        } else {
            match tokio::time::timeout(Duration::from_secs(10), rx).await {
                Ok(Ok(r)) => Ok(r),
                _ => Err(ApiError::Unavailable(
                    "the VM's host agent did not answer in 10 s".into(),
                )),
            }
        };
        self.console
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&request_id);
        result
    }

    pub fn console_reply(&self, request_id: u64, reply: ConsoleReply) {
        if let Some(tx) = self
            .console
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&request_id)
        {
            let _ = tx.send(reply);
        }
    }
}

/// A 64-bit hash of a report's content (its JSON, which covers every field).
fn report_hash(r: &VmReport) -> u64 {
    use std::hash::Hasher;
    struct W(std::collections::hash_map::DefaultHasher);
    impl std::io::Write for W {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.write(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut w = W(Default::default());
    // Serializing a report into a hasher cannot fail.
    let _ = serde_json::to_writer(&mut w, r);
    w.0.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_connection_replaces_the_old_and_survives_its_close() {
        let hub = Hub::default();
        let (tx1, _rx1) = mpsc::unbounded_channel();
        let (tx2, mut rx2) = mpsc::unbounded_channel();
        let c1 = hub.register("h", Outbox::Direct(tx1));
        let c2 = hub.register("h", Outbox::Direct(tx2));
        assert!(
            !hub.unregister("h", c1),
            "old connection must not evict the new"
        );
        assert!(hub.send("h", ServerMessage::Reject { reason: "x".into() }));
        assert!(rx2.try_recv().is_ok());
        assert!(hub.unregister("h", c2));
        assert!(hub.view("h", Duration::from_secs(1)).is_none());
    }

    #[test]
    fn desired_state_is_sent_once_per_fingerprint() {
        let hub = Hub::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        hub.register("h", Outbox::Direct(tx));
        let msg = || ServerMessage::DesiredState {
            generation: 1,
            vms: vec![],
            prestage: vec![],
        };
        assert!(hub.send_desired("h", 7, msg()));
        assert!(!hub.send_desired("h", 7, msg()));
        assert!(hub.send_desired("h", 8, msg()));
        assert!(rx.try_recv().is_ok() && rx.try_recv().is_ok() && rx.try_recv().is_err());
    }
}
