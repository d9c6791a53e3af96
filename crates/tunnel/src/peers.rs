//! The peers a running tunnel knows: each with its WireGuard state machine
//! (boringtun's `Tunn`: handshake, sessions, timers), its current endpoint
//! (updated from the authenticated source address: roaming) and its
//! counters. The table is replaced whole when the peers change, so the
//! data path reads one consistent snapshot per batch without holding a
//! lock across it; a peer whose key stays keeps its state and sessions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::Tunn;
use serde::Serialize;

use crate::config::{Cidr, PeerSpec};
use crate::keys::{encode_public, PublicKey, StaticSecret};
use crate::route::Routes;

/// One peer's live state.
pub struct Peer {
    pub public_key: PublicKey,
    pub index: u32,
    pub keepalive: Option<u16>,
    pub allowed_ips: Vec<Cidr>,
    tunn: Mutex<Tunn>,
    endpoint: Mutex<Option<SocketAddr>>,
    pub tx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
}

impl Peer {
    /// The WireGuard state; a poisoned lock (a panic elsewhere) still
    /// yields the state rather than taking the tunnel down.
    pub fn tunn(&self) -> MutexGuard<'_, Tunn> {
        self.tunn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn endpoint(&self) -> Option<SocketAddr> {
        *self.endpoint.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Roaming: the peer is where its last authenticated packet came from.
    pub fn set_endpoint(&self, addr: SocketAddr) {
        let mut e = self.endpoint.lock().unwrap_or_else(|p| p.into_inner());
        if *e != Some(addr) {
            if e.is_some() {
                tracing::info!(peer = %encode_public(&self.public_key), from = ?*e, to = %addr, "peer roamed");
            }
            *e = Some(addr);
        }
    }

    pub fn stats(&self) -> PeerStats {
        let (since, ..) = self.tunn().stats();
        PeerStats {
            public_key: encode_public(&self.public_key),
            endpoint: self.endpoint(),
            tx_bytes: self.tx_bytes.load(Ordering::Relaxed),
            tx_packets: self.tx_packets.load(Ordering::Relaxed),
            rx_bytes: self.rx_bytes.load(Ordering::Relaxed),
            rx_packets: self.rx_packets.load(Ordering::Relaxed),
            last_handshake: since.and_then(|d| SystemTime::now().checked_sub(d)),
        }
    }
}

/// A peer's counters (plaintext bytes and packets through the tunnel).
#[derive(Debug, Clone, Serialize)]
pub struct PeerStats {
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    /// When the current session's handshake completed.
    #[serde(with = "unix_secs")]
    pub last_handshake: Option<SystemTime>,
}

mod unix_secs {
    use std::time::{SystemTime, UNIX_EPOCH};

    pub fn serialize<S: serde::Serializer>(
        t: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t.and_then(|t| t.duration_since(UNIX_EPOCH).ok()) {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }
}

/// A snapshot of the peers: by index (data packets name the receiver's
/// index), by key (handshake initiations name the sender's key) and by
/// allowed IP (packets from the TUN).
pub struct PeerTable {
    pub peers: Vec<Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    by_key: HashMap<[u8; 32], Arc<Peer>>,
    pub routes: Routes<Arc<Peer>>,
}

impl PeerTable {
    pub fn empty() -> PeerTable {
        PeerTable::new(Vec::new())
    }

    fn new(peers: Vec<Arc<Peer>>) -> PeerTable {
        let by_index = peers.iter().map(|p| (p.index, p.clone())).collect();
        let by_key = peers
            .iter()
            .map(|p| (*p.public_key.as_bytes(), p.clone()))
            .collect();
        let routes = Routes::new(
            peers
                .iter()
                .flat_map(|p| p.allowed_ips.iter().map(move |c| (*c, p.clone())))
                .collect(),
        );
        PeerTable {
            peers,
            by_index,
            by_key,
            routes,
        }
    }

    /// The peer a session index belongs to: boringtun puts the peer's
    /// index in the upper 24 bits.
    pub fn by_receiver(&self, receiver_idx: u32) -> Option<&Arc<Peer>> {
        self.by_index.get(&(receiver_idx >> 8))
    }

    pub fn by_key(&self, key: &[u8; 32]) -> Option<&Arc<Peer>> {
        self.by_key.get(key)
    }

    /// The table for `specs`: peers already known (same key and
    /// keepalive) keep their state; new ones get a fresh index from
    /// `next_index`.
    pub fn rebuild(
        &self,
        specs: &[PeerSpec],
        secret: &StaticSecret,
        limiter: &Arc<RateLimiter>,
        next_index: &mut u32,
    ) -> PeerTable {
        let peers = specs
            .iter()
            .map(|s| {
                let old = self
                    .by_key(s.public_key.as_bytes())
                    .filter(|p| p.keepalive == s.persistent_keepalive);
                let (tunn, index, endpoint, counters) = match old {
                    Some(p) => {
                        // Keep the sessions: move the state into the new record.
                        let t = std::mem::replace(
                            &mut *p.tunn(),
                            new_tunn(secret, s, p.index, limiter),
                        );
                        let c = [&p.tx_bytes, &p.tx_packets, &p.rx_bytes, &p.rx_packets]
                            .map(|a| a.load(Ordering::Relaxed));
                        (t, p.index, s.endpoint.or(p.endpoint()), c)
                    }
                    None => {
                        *next_index = (*next_index + 1) & 0x00ff_ffff;
                        let i = *next_index;
                        (new_tunn(secret, s, i, limiter), i, s.endpoint, [0; 4])
                    }
                };
                Arc::new(Peer {
                    public_key: s.public_key,
                    index,
                    keepalive: s.persistent_keepalive,
                    allowed_ips: s.allowed_ips.clone(),
                    tunn: Mutex::new(tunn),
                    endpoint: Mutex::new(endpoint),
                    tx_bytes: AtomicU64::new(counters[0]),
                    tx_packets: AtomicU64::new(counters[1]),
                    rx_bytes: AtomicU64::new(counters[2]),
                    rx_packets: AtomicU64::new(counters[3]),
                })
            })
            .collect();
        PeerTable::new(peers)
    }
}

fn new_tunn(secret: &StaticSecret, s: &PeerSpec, index: u32, limiter: &Arc<RateLimiter>) -> Tunn {
    Tunn::new(
        secret.clone(),
        s.public_key,
        None,
        s.persistent_keepalive,
        index,
        Some(limiter.clone()),
    )
}
