//! The data path: one thread per direction and one for timers, as
//! wireguard-go does, each moving a batch per system call.
//!
//! - TUN -> UDP: one read of the TUN (IFF_VNET_HDR, TSO on) returns up to a
//!   64 KB TCP segment, which tun-rs splits into MTU-sized packets; each is
//!   routed by its destination (cryptokey routing), encrypted into one
//!   contiguous buffer, and the datagrams for one endpoint leave in one
//!   `sendmsg` with UDP GSO ([`crate::batch`]).
//! - UDP -> TUN: `recvmmsg` with UDP GRO returns up to 32 buffers of
//!   coalesced datagrams; each datagram is authenticated and decrypted by
//!   its peer's state, its inner source checked against the peer's allowed
//!   IPs, and the packets are coalesced back into large TCP segments
//!   (tun-rs's GRO table) before they are written to the TUN.
//! - Timers: every 100 ms each peer's WireGuard timers run (handshake
//!   retries, rekeying, keepalives, session expiry).
//!
//! Everything read from the UDP socket is hostile until authenticated:
//! it is parsed by boringtun's bounds-checked parser, a handshake must
//! carry a valid MAC for our key before any Diffie-Hellman is done, an
//! unknown key gets no answer, and a failure is a counter, never a panic.

use std::io::{ErrorKind, IoSliceMut};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use rustix::event::{PollFd, PollFlags, Timespec};
use serde::Serialize;
use tun_rs::{GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use crate::batch::SendBatch;
use crate::keys::{PublicKey, StaticSecret};
use crate::peers::{Peer, PeerTable};

/// Room in front of each TUN packet for the virtio-net header tun-rs writes.
const OFFSET: usize = VIRTIO_NET_HDR_LEN;
/// A TUN packet buffer: a GRO-coalesced TCP segment may grow to 64 KB.
const TUN_BUF: usize = 65_536 + 2 * OFFSET;
/// How long a thread blocks before it looks at the stop flag.
const POLL: Duration = Duration::from_millis(200);
/// WireGuard's overhead on a data packet (header 16, tag 16), and the
/// size of a handshake initiation, the largest message.
const WG_OVERHEAD: usize = 32;
const WG_MIN_BUF: usize = 148;

/// Packets dropped, by reason (all of them are counted, none logged at
/// more than debug level: a flood must not fill the log).
#[derive(Default)]
pub struct Drops {
    /// Not a WireGuard message, a bad MAC, a failed decryption, a replay.
    pub invalid: AtomicU64,
    /// A handshake from a key that is not one of our peers.
    pub unknown_peer: AtomicU64,
    /// Decrypted, but its source is outside the peer's allowed IPs.
    pub not_allowed: AtomicU64,
    /// From the TUN to an address no peer is allowed.
    pub no_route: AtomicU64,
    /// For a peer with no known endpoint yet.
    pub no_endpoint: AtomicU64,
}

/// The drop counters, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct DropStats {
    pub invalid: u64,
    pub unknown_peer: u64,
    pub not_allowed: u64,
    pub no_route: u64,
    pub no_endpoint: u64,
}

impl Drops {
    pub fn snapshot(&self) -> DropStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DropStats {
            invalid: l(&self.invalid),
            unknown_peer: l(&self.unknown_peer),
            not_allowed: l(&self.not_allowed),
            no_route: l(&self.no_route),
            no_endpoint: l(&self.no_endpoint),
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// What the three threads share.
pub struct Shared {
    pub stop: AtomicBool,
    pub table: RwLock<Arc<PeerTable>>,
    pub secret: StaticSecret,
    pub public: PublicKey,
    pub limiter: Arc<RateLimiter>,
    pub socket: UdpSocket,
    pub udp: UdpSocketState,
    pub tun: SyncDevice,
    pub mtu: usize,
    /// UDP GSO on sends (off with `offload: false`).
    pub gso: bool,
    pub drops: Drops,
    pub next_index: Mutex<u32>,
}

impl Shared {
    pub fn table(&self) -> Arc<PeerTable> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn max_segments(&self) -> usize {
        if self.gso {
            self.udp.max_gso_segments()
        } else {
            1
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sends one datagram (or a GSO group), waiting while the socket's
    /// buffer is full; other errors are UDP's usual losses.
    fn send(&self, dest: SocketAddr, contents: &[u8], segment: Option<usize>) {
        let t = Transmit {
            destination: dest,
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        while !self.stopped() {
            match self.udp.send((&self.socket).into(), &t) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    wait(&self.socket, PollFlags::OUT);
                }
                Err(e) => {
                    tracing::debug!(%dest, "send: {e}");
                    return;
                }
                Ok(()) => return,
            }
        }
    }
}

/// Waits until `fd` is ready for `flags`, or [`POLL`] passed.
fn wait(fd: &impl AsFd, flags: PollFlags) {
    let mut fds = [PollFd::new(fd, flags)];
    let timeout = Timespec {
        tv_sec: 0,
        tv_nsec: POLL.as_nanos() as i64,
    };
    // EINTR or a timeout: the caller looks again either way.
    let _ = rustix::event::poll(&mut fds, Some(&timeout));
}

/// TUN -> UDP.
pub fn tun_to_udp(sh: &Shared) {
    let mut original = vec![0u8; OFFSET + 65_535];
    let mut bufs = vec![vec![0u8; sh.mtu.max(1500) + OFFSET]; IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
    let slot = sh.mtu.max(1500) + WG_OVERHEAD + WG_MIN_BUF;
    let mut batch = SendBatch::new(IDEAL_BATCH_SIZE, slot, sh.max_segments());
    while !sh.stopped() {
        let n = match sh
            .tun
            .recv_multiple(&mut original, &mut bufs, &mut sizes, 0)
        {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                wait(&sh.tun, PollFlags::IN);
                continue;
            }
            Err(e) => {
                // A malformed offload header from the kernel is one lost
                // packet; a gone device ends the loop below at stop.
                tracing::debug!("tun read: {e}");
                wait(&sh.tun, PollFlags::IN);
                continue;
            }
        };
        let table = sh.table();
        batch.set_max_segments(sh.max_segments());
        for (buf, &size) in bufs.iter().zip(&sizes).take(n) {
            let Some(packet) = buf.get(..size) else {
                continue;
            };
            if batch.slot().is_none() {
                flush(sh, &mut batch);
            }
            encrypt(sh, &table, packet, &mut batch);
        }
        flush(sh, &mut batch);
    }
}

fn flush(sh: &Shared, batch: &mut SendBatch) {
    for (g, bytes) in batch.groups() {
        let segment = (g.count > 1).then_some(g.segment);
        sh.send(g.dest, bytes, segment);
    }
    batch.clear();
}

/// Routes and encrypts one packet from the TUN into the batch.
fn encrypt(sh: &Shared, table: &PeerTable, packet: &[u8], batch: &mut SendBatch) {
    let Some(peer) = Tunn::dst_address(packet).and_then(|d| table.routes.lookup(d)) else {
        bump(&sh.drops.no_route);
        return;
    };
    let Some(slot) = batch.slot() else {
        return;
    };
    let n = match peer.tunn().encapsulate(packet, slot) {
        TunnResult::WriteToNetwork(out) => out.len(),
        TunnResult::Err(e) => {
            tracing::debug!("encapsulate: {e:?}");
            return;
        }
        // Queued until the handshake completes.
        _ => return,
    };
    peer.tx_packets.fetch_add(1, Ordering::Relaxed);
    peer.tx_bytes
        .fetch_add(packet.len() as u64, Ordering::Relaxed);
    match peer.endpoint() {
        Some(ep) => batch.commit(ep, n),
        None => bump(&sh.drops.no_endpoint),
    }
}

/// UDP -> TUN.
pub fn udp_to_tun(sh: &Shared) {
    let batch = quinn_udp::BATCH_SIZE;
    let gro = sh.udp.gro_segments().max(1);
    let mut rx: Vec<Vec<u8>> = vec![vec![0u8; 65_536.min(gro * 2048).max(2048)]; batch];
    let mut meta = vec![RecvMeta::default(); batch];
    let mut out: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE)
        .map(|_| Vec::with_capacity(TUN_BUF))
        .collect();
    let mut gro_table = GROTable::default();
    let mut reply = vec![0u8; 65_536];
    while !sh.stopped() {
        let n = {
            let mut iovs: Vec<IoSliceMut<'_>> = rx.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            match sh.udp.recv((&sh.socket).into(), &mut iovs, &mut meta) {
                Ok(n) => n,
                Err(e) => {
                    if e.kind() != ErrorKind::WouldBlock && e.kind() != ErrorKind::Interrupted {
                        tracing::debug!("udp recv: {e}");
                    }
                    wait(&sh.socket, PollFlags::IN);
                    continue;
                }
            }
        };
        let table = sh.table();
        let mut k = 0;
        for (m, buf) in meta.iter().zip(&rx).take(n) {
            let stride = m.stride.max(1);
            let data = buf.get(..m.len).unwrap_or(&[]);
            for datagram in data.chunks(stride) {
                if k == out.len() {
                    write_tun(sh, &mut gro_table, &mut out[..k]);
                    k = 0;
                }
                let Some(slot) = out.get_mut(k) else { break };
                // A decrypted packet is shorter than its datagram; only
                // that much is (re)initialised, the capacity stays 64 KB
                // for the GRO coalescing on write.
                slot.resize(OFFSET + datagram.len().max(WG_MIN_BUF), 0);
                if receive(sh, &table, m.addr, datagram, slot, &mut reply) {
                    k += 1;
                }
            }
        }
        write_tun(sh, &mut gro_table, &mut out[..k]);
    }
}

fn write_tun(sh: &Shared, gro: &mut GROTable, bufs: &mut [Vec<u8>]) {
    if bufs.is_empty() {
        return;
    }
    if let Err(e) = sh.tun.send_multiple(gro, bufs, OFFSET) {
        tracing::debug!("tun write: {e}");
    }
}

/// Which peer a message from the network is for, if any. A handshake
/// initiation names its sender only inside the encryption: its MAC is
/// checked first (cheap, and only someone who knows our public key can
/// make it), then the static key is decrypted and looked up.
fn which_peer(
    sh: &Shared,
    table: &PeerTable,
    src: SocketAddr,
    datagram: &[u8],
    reply: &mut [u8],
) -> Option<Arc<Peer>> {
    let packet = match sh.limiter.verify_packet(Some(src.ip()), datagram, reply) {
        Ok(p) => p,
        Err(TunnResult::WriteToNetwork(cookie)) => {
            // Under load: a cookie reply instead of a handshake.
            let len = cookie.len();
            sh.send(src, &reply[..len], None);
            return None;
        }
        Err(_) => {
            bump(&sh.drops.invalid);
            return None;
        }
    };
    let peer = match packet {
        Packet::HandshakeInit(ref init) => {
            match parse_handshake_anon(&sh.secret, &sh.public, init) {
                Ok(half) => {
                    let p = table.by_key(&half.peer_static_public);
                    if p.is_none() {
                        bump(&sh.drops.unknown_peer);
                        return None;
                    }
                    p
                }
                Err(_) => None,
            }
        }
        Packet::HandshakeResponse(ref r) => table.by_receiver(r.receiver_idx),
        Packet::PacketCookieReply(ref c) => table.by_receiver(c.receiver_idx),
        Packet::PacketData(ref d) => table.by_receiver(d.receiver_idx),
    };
    if peer.is_none() {
        bump(&sh.drops.invalid);
    }
    peer.cloned()
}

/// Authenticates and decrypts one datagram into `slot` (after its
/// offset); true when `slot` now holds a packet for the TUN.
fn receive(
    sh: &Shared,
    table: &PeerTable,
    src: SocketAddr,
    datagram: &[u8],
    slot: &mut Vec<u8>,
    reply: &mut [u8],
) -> bool {
    let Some(peer) = which_peer(sh, table, src, datagram, reply) else {
        return false;
    };
    let mut tunn = peer.tunn();
    let Some(dst) = slot.get_mut(OFFSET..) else {
        return false;
    };
    match tunn.decapsulate(Some(src.ip()), datagram, dst) {
        TunnResult::WriteToTunnelV4(p, from) => {
            let (len, from) = (p.len(), IpAddr::V4(from));
            deliver(sh, &peer, src, from, len, slot)
        }
        TunnResult::WriteToTunnelV6(p, from) => {
            let (len, from) = (p.len(), IpAddr::V6(from));
            deliver(sh, &peer, src, from, len, slot)
        }
        TunnResult::WriteToNetwork(p) => {
            // A handshake answered or completed: authenticated.
            let len = p.len();
            peer.set_endpoint(src);
            sh.send(src, slot.get(OFFSET..OFFSET + len).unwrap_or(&[]), None);
            flush_queued(sh, &peer, &mut tunn, reply);
            false
        }
        TunnResult::Done => {
            // A keepalive (authenticated) or a cookie.
            if matches!(
                Tunn::parse_incoming_packet(datagram),
                Ok(Packet::PacketData(_))
            ) {
                peer.set_endpoint(src);
            }
            false
        }
        TunnResult::Err(e) => {
            tracing::debug!(%src, "decapsulate: {e:?}");
            bump(&sh.drops.invalid);
            false
        }
    }
}

/// Packets queued while the handshake ran leave now.
fn flush_queued(sh: &Shared, peer: &Peer, tunn: &mut Tunn, buf: &mut [u8]) {
    while let TunnResult::WriteToNetwork(p) = tunn.decapsulate(None, &[], buf) {
        if let Some(ep) = peer.endpoint() {
            sh.send(ep, p, None);
        }
    }
}

/// Checks the decrypted packet's source against the peer's allowed IPs.
fn deliver(
    sh: &Shared,
    peer: &Peer,
    src: SocketAddr,
    from: IpAddr,
    len: usize,
    slot: &mut Vec<u8>,
) -> bool {
    peer.set_endpoint(src);
    if !peer.allowed_ips.iter().any(|c| c.contains(from)) {
        bump(&sh.drops.not_allowed);
        return false;
    }
    peer.rx_packets.fetch_add(1, Ordering::Relaxed);
    peer.rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
    slot.truncate(OFFSET + len);
    true
}

/// WireGuard's timers, every 100 ms; the handshake rate limiter's counts
/// are reset every second.
pub fn timers(sh: &Shared) {
    let mut buf = vec![0u8; 65_536];
    let mut last_reset = Instant::now();
    while !sh.stopped() {
        std::thread::sleep(Duration::from_millis(100));
        if last_reset.elapsed() >= Duration::from_secs(1) {
            sh.limiter.reset_count();
            last_reset = Instant::now();
        }
        for peer in &sh.table().peers {
            let mut tunn = peer.tunn();
            match tunn.update_timers(&mut buf) {
                TunnResult::WriteToNetwork(p) => match peer.endpoint() {
                    Some(ep) => sh.send(ep, p, None),
                    None => bump(&sh.drops.no_endpoint),
                },
                TunnResult::Err(e) => tracing::trace!("timers: {e:?}"),
                _ => {}
            }
        }
    }
}

/// Starts a handshake with every peer that has an endpoint, so the first
/// packet does not wait for it.
pub fn initiate(sh: &Shared, peers: &[Arc<Peer>]) {
    let mut buf = vec![0u8; WG_MIN_BUF * 2];
    for peer in peers {
        let Some(ep) = peer.endpoint() else { continue };
        if let TunnResult::WriteToNetwork(p) =
            peer.tunn().format_handshake_initiation(&mut buf, false)
        {
            sh.send(ep, p, None);
        }
    }
}
