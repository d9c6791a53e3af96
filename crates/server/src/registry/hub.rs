//! The agent hub: who is connected, their live heartbeat data, and a way to
//! send each one a message.
//!
//! Heartbeats land here, in memory, and are not written to the database on
//! every beat: a host's liveness (ready or unreachable) is derived from the
//! time of its last beat. Only connects and disconnects are persisted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use foldhash::{HashMap, HashMapExt};
use tokio::sync::{mpsc, oneshot};
use virt8ra_api::protocol::{
    DesiredVm, ImageRef, ServerMessage, VmReport, DESIRED_CHANGES_PROTOCOL_VERSION,
};
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
    /// The `seq` of the heartbeat whose usage `usage` is.
    usage_seq: u64,
    /// Fingerprint of the last desired state sent on this connection
    /// (protocol 1 and 2, which get the whole state every time).
    last_desired: Option<u64>,
    /// What the agent was sent on this connection (protocol 3, which gets
    /// changes): the generation and a hash of each VM.
    sent: Option<Sent>,
    /// A hash of the last report per VM, to skip unchanged ones (a hash,
    /// not the report: at a million VMs the copies would cost 100 MB).
    reports: HashMap<String, u64>,
    /// Protocol version negotiated on this connection.
    protocol: u32,
    /// Liveness as last handed out by [`Hub::liveness_changes`].
    judged_alive: bool,
    /// A hash of the network state last sent on this connection.
    net_sent: Option<u64>,
    /// The agent said in its hello that it carries virtual networks.
    net_reported: bool,
}

impl Live {
    /// Records heartbeat `seq` of this connection. An agent numbers its
    /// heartbeats upwards on each connection, but two of them can be
    /// recorded out of order: a mux connection's reader records a quiet one
    /// itself while the host's session may still be applying a batch that
    /// holds an older one. The older one still shows the host alive; its
    /// usage does not replace the newer one's.
    fn beat(&mut self, seq: u64, usage: HostUsage) {
        self.last_beat = Instant::now();
        self.last_beat_at = Utc::now();
        if seq >= self.usage_seq {
            self.usage_seq = seq;
            self.usage = usage;
        }
    }
}

#[derive(Default)]
pub struct Hub {
    live: Mutex<HashMap<String, Live>>,
    next_id: AtomicU64,
    heartbeats: AtomicU64,
    /// Hosts whose liveness the next [`Hub::liveness_changes`] reports
    /// whatever it was judged before (they disconnected, or a reader of
    /// liveness asked for it).
    /// A set, so that it stays bounded by the number of hosts however long
    /// nobody reads liveness.
    rejudge: Mutex<std::collections::HashSet<String>>,
    console: Mutex<HashMap<u64, oneshot::Sender<ConsoleReply>>>,
    /// Numbers the computations of desired states in the order they
    /// began ([`Hub::ticket`]).
    tickets: AtomicU64,
}

/// What became of a desired state handed to [`Hub::deliver_desired_vms`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Sent,
    /// Nothing differs from what the host was sent, or it is not connected.
    NotSent,
    /// Its computation began before that of the state the host was last
    /// sent: it may be older than that one (read before a change that one
    /// saw), so it was dropped; the caller computes the host again.
    Stale,
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
                usage_seq: 0,
                last_desired: None,
                sent: None,
                reports: HashMap::new(),
                protocol: 0,
                judged_alive: false,
                net_sent: None,
                net_reported: false,
            },
        );
        id
    }

    /// Removes the connection, if it is still the current one.
    pub fn unregister(&self, host_id: &str, conn_id: u64) -> bool {
        let mut m = self.lock();
        if m.get(host_id).map(|l| l.conn_id) == Some(conn_id) {
            m.remove(host_id);
            drop(m);
            self.rejudge_later(host_id);
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

    /// Records whether the host's agent said it carries virtual networks.
    pub fn set_network_reported(&self, host_id: &str, carries: bool) {
        if let Some(l) = self.lock().get_mut(host_id) {
            l.net_reported = carries;
        }
    }

    /// Whether the host's agent said on connect that it carries virtual
    /// networks.
    pub fn network_reported(&self, host_id: &str) -> bool {
        self.lock().get(host_id).is_some_and(|l| l.net_reported)
    }

    /// Sends the host its network state unless the same state went out on
    /// this connection already; `generation` is asked for only when it
    /// goes. False when nothing was sent (the same, or not connected).
    pub fn send_network_state(
        &self,
        host_id: &str,
        state: virt8ra_api::HostNetworkState,
        generation: impl FnOnce() -> u64,
    ) -> bool {
        let h = json_hash(&state);
        let mut m = self.lock();
        let Some(l) = m.get_mut(host_id) else {
            return false;
        };
        if l.net_sent == Some(h) {
            return false;
        }
        let ok = l.tx.send(ServerMessage::NetworkState {
            generation: generation(),
            state,
        });
        if ok {
            l.net_sent = Some(h);
        }
        ok
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

    /// Records heartbeat `seq` of the host's current connection.
    pub fn heartbeat(&self, host_id: &str, seq: u64, usage: HostUsage) {
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
        if let Some(l) = self.lock().get_mut(host_id) {
            l.beat(seq, usage);
        }
    }

    /// Records heartbeat `seq` on connection `conn_id` of the host; an
    /// error (nothing recorded, the usage given back) when that is not the
    /// host's current connection.
    pub fn heartbeat_on(
        &self,
        host_id: &str,
        conn_id: u64,
        seq: u64,
        usage: HostUsage,
    ) -> Result<(), HostUsage> {
        let mut m = self.lock();
        let Some(l) = m.get_mut(host_id).filter(|l| l.conn_id == conn_id) else {
            return Err(usage);
        };
        l.beat(seq, usage);
        drop(m);
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// When connection `conn_id` of the host last heartbeated, if it is
    /// still the host's current connection.
    pub fn last_beat(&self, host_id: &str, conn_id: u64) -> Option<Instant> {
        self.lock()
            .get(host_id)
            .filter(|l| l.conn_id == conn_id)
            .map(|l| l.last_beat)
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

    /// The connected hosts (by id) that heartbeated within `window`, and
    /// the longest time since a connected host's last heartbeat: one pass
    /// under one lock (metrics count hosts by state at each scrape).
    pub fn alive_hosts(&self, window: Duration) -> (std::collections::HashSet<String>, Duration) {
        let now = Instant::now();
        let mut oldest = Duration::ZERO;
        let mut alive = std::collections::HashSet::new();
        for (id, l) in self.lock().iter() {
            let age = now.saturating_duration_since(l.last_beat);
            oldest = oldest.max(age);
            if age <= window {
                alive.insert(id.clone());
            }
        }
        (alive, oldest)
    }

    pub fn view(&self, host_id: &str, window: Duration) -> Option<LiveView> {
        self.lock().get(host_id).map(|l| LiveView {
            connected: true,
            alive: l.last_beat.elapsed() <= window,
            last_beat_at: l.last_beat_at,
            usage: l.usage.clone(),
        })
    }

    /// The hosts (by id) whose liveness changed since the last call: a
    /// connected host is alive when it heartbeated within `window`, any
    /// other is not. `all` reports every connected host instead (for a
    /// reader starting afresh); hosts passed to [`Hub::rejudge_later`] are
    /// reported either way. One pass over the connections comparing times
    /// (no lookups by name, no allocation but for the changes), so that
    /// keeping 100,000 hosts' readiness current every second costs a reader
    /// the changes, not a lookup of every host.
    pub fn liveness_changes(&self, window: Duration, all: bool) -> Vec<(String, bool)> {
        let rejudge = std::mem::take(&mut *self.rejudge.lock().unwrap_or_else(|p| p.into_inner()));
        let mut m = self.lock();
        let now = Instant::now();
        let mut out = Vec::new();
        for (id, l) in m.iter_mut() {
            let alive = now.saturating_duration_since(l.last_beat) <= window;
            if all || alive != l.judged_alive {
                l.judged_alive = alive;
                out.push((id.clone(), alive));
            }
        }
        for id in rejudge {
            match m.get(&id) {
                None => out.push((id, false)),
                Some(l) if !all => out.push((id, l.judged_alive)),
                Some(_) => {}
            }
        }
        out
    }

    /// Makes the next [`Hub::liveness_changes`] report this host.
    pub fn rejudge_later(&self, host_id: &str) {
        self.rejudge
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host_id.to_string());
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

    /// Sends a host its desired state. `vms` is the whole state when
    /// `whole`, else only the VMs `changed` names (those of them absent from
    /// `vms` are no longer wanted). A protocol 3 agent that was sent a state
    /// on this connection gets only the differences from what it was sent
    /// (nothing when there are none); others get the whole state (when it
    /// is not `whole`, the caller must compute it: see `needs_whole`).
    /// Diffing, sending and recording happen under the lock, so the record
    /// always matches what went out.
    pub fn send_desired_vms(
        &self,
        host_id: &str,
        generation: u64,
        vms: Vec<DesiredVm>,
        changed: Option<&std::collections::HashSet<String>>,
        prestage: Vec<ImageRef>,
    ) -> bool {
        let ticket = self.ticket();
        self.deliver_desired_vms(ticket, host_id, generation, vms, changed, prestage)
            == Delivery::Sent
    }

    /// A number for a computation of a desired state that begins now:
    /// later computations get larger ones.
    pub fn ticket(&self) -> u64 {
        self.tickets.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// [`Hub::send_desired_vms`] for a state whose computation began with
    /// `ticket`. Two computations for one host may run at once (a
    /// scheduler pass, a migration's own step): one that began before the
    /// state last sent may hold VMs as they were before it (a migration's
    /// role missing), and diffed against what was sent it would undo that
    /// state (bench scale on PostgreSQL: a cold migration's source was told
    /// to run the VM again mid-move and exported its disk twice). It is
    /// [`Delivery::Stale`] instead.
    pub fn deliver_desired_vms(
        &self,
        ticket: u64,
        host_id: &str,
        generation: u64,
        vms: Vec<DesiredVm>,
        changed: Option<&std::collections::HashSet<String>>,
        prestage: Vec<ImageRef>,
    ) -> Delivery {
        let mut m = self.lock();
        let Some(l) = m.get_mut(host_id) else {
            return Delivery::NotSent;
        };
        if l.sent.as_ref().is_some_and(|s| ticket < s.ticket) {
            return Delivery::Stale;
        }
        let prestage_hash = json_hash(&prestage);
        let Some(sent) = l
            .sent
            .as_mut()
            .filter(|_| l.protocol >= DESIRED_CHANGES_PROTOCOL_VERSION)
        else {
            if changed.is_some() {
                return Delivery::NotSent;
            }
            let hashes: HashMap<String, u64> =
                vms.iter().map(|v| (v.id.clone(), json_hash(v))).collect();
            let fingerprint = json_hash(&(
                &hashes.iter().collect::<std::collections::BTreeMap<_, _>>(),
                prestage_hash,
            ));
            if l.protocol < DESIRED_CHANGES_PROTOCOL_VERSION && l.last_desired == Some(fingerprint)
            {
                return Delivery::NotSent;
            }
            let ok = l.tx.send(ServerMessage::DesiredState {
                generation,
                vms,
                prestage,
            });
            if ok {
                l.last_desired = Some(fingerprint);
                if l.protocol >= DESIRED_CHANGES_PROTOCOL_VERSION {
                    l.sent = Some(Sent {
                        generation,
                        ticket,
                        vms: hashes,
                        prestage: prestage_hash,
                    });
                }
            }
            return sent_if(ok);
        };
        let mut upsert = Vec::new();
        let mut present: std::collections::HashSet<String> = Default::default();
        for v in vms {
            let h = json_hash(&v);
            present.insert(v.id.clone());
            if sent.vms.get(&v.id) != Some(&h) {
                sent.vms.insert(v.id.clone(), h);
                upsert.push(v);
            }
        }
        let remove: Vec<String> = match changed {
            Some(ids) => ids
                .iter()
                .filter(|id| !present.contains(*id) && sent.vms.contains_key(*id))
                .cloned()
                .collect(),
            None => sent
                .vms
                .keys()
                .filter(|id| !present.contains(*id))
                .cloned()
                .collect(),
        };
        for id in &remove {
            sent.vms.remove(id);
        }
        let prestage = (prestage_hash != sent.prestage).then(|| {
            sent.prestage = prestage_hash;
            prestage
        });
        if upsert.is_empty() && remove.is_empty() && prestage.is_none() {
            return Delivery::NotSent;
        }
        let base = sent.generation;
        let generation = generation.max(base + 1);
        sent.generation = generation;
        sent.ticket = ticket;
        let ok = l.tx.send(ServerMessage::DesiredChanges {
            generation,
            base,
            upsert,
            remove,
            prestage,
        });
        if !ok {
            // The transport is gone; the next connection starts over.
            l.sent = None;
        }
        sent_if(ok)
    }

    /// Whether the next desired state sent to this host must be computed
    /// whole (it speaks an older protocol, or was sent nothing yet on this
    /// connection).
    pub fn needs_whole(&self, host_id: &str) -> bool {
        self.lock()
            .get(host_id)
            .is_none_or(|l| l.protocol < DESIRED_CHANGES_PROTOCOL_VERSION || l.sent.is_none())
    }

    /// The agent asked for its whole desired state again.
    pub fn forget_sent(&self, host_id: &str) {
        if let Some(l) = self.lock().get_mut(host_id) {
            l.sent = None;
            l.last_desired = None;
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

fn sent_if(ok: bool) -> Delivery {
    if ok {
        Delivery::Sent
    } else {
        Delivery::NotSent
    }
}

/// What a protocol 3 agent was sent on its connection.
struct Sent {
    generation: u64,
    /// The [`Hub::ticket`] of the computation it came from.
    ticket: u64,
    /// VM id -> hash of the `DesiredVm` sent.
    vms: HashMap<String, u64>,
    prestage: u64,
}

/// A 64-bit hash of a report's content (its JSON, which covers every field).
fn report_hash(r: &VmReport) -> u64 {
    json_hash(r)
}

/// A 64-bit hash of a value's JSON, written straight into the hasher.
fn json_hash<T: serde::Serialize + ?Sized>(r: &T) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    struct W(foldhash::quality::FoldHasher);
    impl std::io::Write for W {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.write(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    // Fixed seeds: the hashes are compared only within this process.
    let mut w = W(foldhash::quality::FixedState::with_seed(0x7669_7274_3872_6100).build_hasher());
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
    fn an_older_heartbeat_does_not_replace_a_newer_ones_usage() {
        let hub = Hub::default();
        let (tx, _rx) = mpsc::unbounded_channel();
        let c = hub.register("h", Outbox::Direct(tx));
        let used = |vms_running| HostUsage {
            vms_running,
            ..HostUsage::default()
        };
        let usage = |hub: &Hub| hub.view("h", Duration::from_secs(60)).map(|v| v.usage);
        // The reader records beat 5 inline; the session then applies beat 4.
        assert!(hub.heartbeat_on("h", c, 5, used(5)).is_ok());
        let at5 = hub.last_beat("h", c).expect("beat recorded");
        std::thread::sleep(Duration::from_millis(5));
        hub.heartbeat("h", 4, used(4));
        assert_eq!(usage(&hub), Some(used(5)));
        // Beat 4 still counts as a sign of life.
        assert!(hub.last_beat("h", c).expect("still connected") > at5);
        // The next beat, by either path, replaces it.
        hub.heartbeat("h", 6, used(6));
        assert_eq!(usage(&hub), Some(used(6)));
        // Another connection is not this one: nothing recorded on it.
        assert_eq!(hub.heartbeat_on("h", c + 1, 7, used(7)), Err(used(7)));
        assert_eq!(usage(&hub), Some(used(6)));
        // A new connection numbers its beats from the start again.
        let (tx2, _rx2) = mpsc::unbounded_channel();
        let c2 = hub.register("h", Outbox::Direct(tx2));
        assert!(hub.heartbeat_on("h", c2, 1, used(1)).is_ok());
        assert_eq!(usage(&hub), Some(used(1)));
    }

    #[test]
    fn liveness_changes_report_each_change_once() {
        let hub = Hub::default();
        let sorted = |mut v: Vec<(String, bool)>| {
            v.sort();
            v
        };
        // One window throughout; silence of longer than it makes a host stale.
        let w = Duration::from_secs(1);
        let (tx1, _rx1) = mpsc::unbounded_channel();
        let (tx2, _rx2) = mpsc::unbounded_channel();
        let c1 = hub.register("a", Outbox::Direct(tx1));
        hub.register("b", Outbox::Direct(tx2));
        // New connections are news; then nothing is, until something changes.
        assert_eq!(
            sorted(hub.liveness_changes(w, false)),
            vec![("a".into(), true), ("b".into(), true)]
        );
        assert!(hub.liveness_changes(w, false).is_empty());
        // Everyone, on request (and still nothing new after it).
        assert_eq!(hub.liveness_changes(w, true).len(), 2);
        assert!(hub.liveness_changes(w, false).is_empty());
        // Silence longer than the window: both go stale, once.
        std::thread::sleep(w + Duration::from_millis(100));
        assert_eq!(
            sorted(hub.liveness_changes(w, false)),
            vec![("a".into(), false), ("b".into(), false)]
        );
        assert!(hub.liveness_changes(w, false).is_empty());
        // A heartbeat brings one back.
        hub.heartbeat("b", 1, HostUsage::default());
        assert_eq!(hub.liveness_changes(w, false), vec![("b".into(), true)]);
        // A disconnect is reported as not alive; a host asked about again is
        // reported as it is.
        assert!(hub.unregister("a", c1));
        hub.rejudge_later("b");
        assert_eq!(
            sorted(hub.liveness_changes(w, false)),
            vec![("a".into(), false), ("b".into(), true)]
        );
        assert!(hub.liveness_changes(w, false).is_empty());
    }

    fn dvm(id: &str, power: virt8ra_api::PowerState) -> DesiredVm {
        serde_json::from_value(serde_json::json!({
            "id": id, "name": id, "vcpus": 1, "memory_mib": 64, "disk_gib": 1,
            "image": {"id": "i", "name": "i", "sha256": "s", "size_bytes": 1, "url_path": "/i"},
            "power": power, "reboot_generation": 0, "stop_timeout_s": 30,
        }))
        .expect("desired vm")
    }

    #[test]
    fn older_agents_get_the_whole_state_once_per_change() {
        use virt8ra_api::PowerState::*;
        let hub = Hub::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        hub.register("h", Outbox::Direct(tx));
        hub.set_protocol("h", 2);
        assert!(hub.needs_whole("h"));
        assert!(hub.send_desired_vms("h", 1, vec![dvm("a", Running)], None, vec![]));
        assert!(!hub.send_desired_vms("h", 2, vec![dvm("a", Running)], None, vec![]));
        assert!(hub.needs_whole("h"), "protocol 2 never gets changes");
        assert!(hub.send_desired_vms("h", 3, vec![dvm("a", Stopped)], None, vec![]));
        for _ in 0..2 {
            assert!(matches!(
                rx.try_recv(),
                Ok(ServerMessage::DesiredState { .. })
            ));
        }
        assert!(rx.try_recv().is_err());
    }

    /// A computation begun before the state last sent is dropped, however
    /// the clock went: it may hold VMs as they were before that state.
    #[test]
    fn a_state_computed_before_the_last_one_sent_is_stale() {
        use virt8ra_api::PowerState::*;
        let hub = Hub::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        hub.register("h", Outbox::Direct(tx));
        hub.set_protocol("h", 3);
        let before = hub.ticket();
        let after = hub.ticket();
        let sent = hub.deliver_desired_vms(after, "h", 10, vec![dvm("a", Stopped)], None, vec![]);
        assert_eq!(sent, Delivery::Sent);
        assert!(rx.try_recv().is_ok());
        // Older (the VM still running, say): not sent, and what was sent
        // is still what the next state is diffed against.
        let late = hub.deliver_desired_vms(before, "h", 20, vec![dvm("a", Running)], None, vec![]);
        assert_eq!(late, Delivery::Stale);
        assert!(rx.try_recv().is_err());
        let again = hub.ticket();
        assert_eq!(
            hub.deliver_desired_vms(again, "h", 5, vec![dvm("a", Stopped)], None, vec![]),
            Delivery::NotSent
        );
        assert_eq!(
            hub.deliver_desired_vms(hub.ticket(), "h", 5, vec![dvm("a", Running)], None, vec![]),
            Delivery::Sent
        );
    }

    #[test]
    fn protocol_3_agents_get_changes_against_what_they_were_sent() {
        use virt8ra_api::PowerState::*;
        let hub = Hub::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        hub.register("h", Outbox::Direct(tx));
        hub.set_protocol("h", 3);
        assert!(hub.needs_whole("h"));
        let whole = vec![dvm("a", Running), dvm("b", Running)];
        assert!(hub.send_desired_vms("h", 10, whole, None, vec![]));
        assert!(matches!(
            rx.try_recv(),
            Ok(ServerMessage::DesiredState { generation: 10, ref vms, .. }) if vms.len() == 2
        ));
        assert!(!hub.needs_whole("h"));
        // One VM changed, one new one, and one marked that is gone.
        let ids: std::collections::HashSet<String> =
            ["a", "c", "b"].iter().map(|s| s.to_string()).collect();
        assert!(hub.send_desired_vms(
            "h",
            5,
            vec![dvm("a", Stopped), dvm("c", Running)],
            Some(&ids),
            vec![]
        ));
        match rx.try_recv() {
            Ok(ServerMessage::DesiredChanges {
                generation,
                base,
                upsert,
                remove,
                prestage,
            }) => {
                assert_eq!(base, 10);
                assert!(
                    generation > base,
                    "generations grow even when the clock does not"
                );
                let mut up: Vec<&str> = upsert.iter().map(|v| v.id.as_str()).collect();
                up.sort();
                assert_eq!(up, ["a", "c"]);
                assert_eq!(remove, ["b"]);
                assert!(prestage.is_none());
            }
            other => panic!("expected changes, got {other:?}"),
        }
        // The same again is nothing to send; a whole state that matches
        // what was sent neither.
        assert!(!hub.send_desired_vms(
            "h",
            20,
            vec![dvm("a", Stopped), dvm("c", Running)],
            Some(&ids),
            vec![]
        ));
        assert!(!hub.send_desired_vms(
            "h",
            21,
            vec![dvm("a", Stopped), dvm("c", Running)],
            None,
            vec![]
        ));
        // A whole state removes what it does not list.
        assert!(hub.send_desired_vms("h", 22, vec![dvm("c", Running)], None, vec![]));
        assert!(matches!(
            rx.try_recv(),
            Ok(ServerMessage::DesiredChanges { ref remove, ref upsert, .. }) if remove == &["a"] && upsert.is_empty()
        ));
        // After the agent asked for it, the whole state goes again.
        hub.forget_sent("h");
        assert!(hub.needs_whole("h"));
        assert!(!hub.send_desired_vms("h", 23, vec![], Some(&ids), vec![]));
        assert!(hub.send_desired_vms("h", 24, vec![dvm("c", Running)], None, vec![]));
        assert!(matches!(
            rx.try_recv(),
            Ok(ServerMessage::DesiredState { .. })
        ));
    }

    #[test]
    fn a_network_state_goes_once_per_change_and_again_on_a_new_connection() {
        let hub = Hub::default();
        let state = |u: &str| virt8ra_api::HostNetworkState {
            underlay: u.parse().expect("addr"),
            networks: vec![],
            tunnel: None,
        };
        assert!(
            !hub.send_network_state("h", state("192.0.2.1"), || 1),
            "not connected"
        );
        let (tx, mut rx) = mpsc::unbounded_channel();
        hub.register("h", Outbox::Direct(tx));
        assert!(!hub.network_reported("h"));
        hub.set_network_reported("h", true);
        assert!(hub.network_reported("h"));
        assert!(hub.send_network_state("h", state("192.0.2.1"), || 5));
        let mut asked = false;
        assert!(!hub.send_network_state("h", state("192.0.2.1"), || {
            asked = true;
            6
        }));
        assert!(!asked, "no generation is used up for nothing");
        assert!(hub.send_network_state("h", state("192.0.2.9"), || 7));
        assert!(matches!(
            rx.try_recv(),
            Ok(ServerMessage::NetworkState { generation: 5, .. })
        ));
        assert!(matches!(
            rx.try_recv(),
            Ok(ServerMessage::NetworkState { generation: 7, .. })
        ));
        let (tx2, _rx2) = mpsc::unbounded_channel();
        hub.register("h", Outbox::Direct(tx2));
        assert!(!hub.network_reported("h"), "a new connection says anew");
        assert!(hub.send_network_state("h", state("192.0.2.9"), || 8));
    }
}
