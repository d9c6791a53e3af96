//! virt8ra-tunnel: the encrypted data path between sites (issue 27, item
//! 3), a userspace WireGuard endpoint.
//!
//! Why userspace: traffic that leaves a site travels inside WireGuard
//! between hosts. Production hosts have the kernel module; hosts without it
//! (these test machines have neither WireGuard nor kernel IPsec) need a
//! userspace path, and boringtun as it comes moves only 0.35-0.6 Gbit/s
//! here. This crate keeps boringtun's `noise` module for the handshake,
//! timers and transport encryption, so the wire format IS WireGuard's (it
//! interoperates with the kernel and with boringtun-cli; a test checks
//! the latter), and replaces the data path with one that moves batches:
//! TUN offloads (IFF_VNET_HDR + TSO: the kernel hands over 64 KB TCP
//! segments) and UDP GSO/GRO with `recvmmsg`, one thread per direction, as
//! wireguard-go did (see [`datapath`], [`batch`]).
//!
//! It is a library the agent runs as a task ([`Tunnel::start`] returns a
//! [`TunnelHandle`]: `set_peers`, `stats`, `stop`), and a hidden
//! subcommand of the one binary for tests and benchmarks
//! (`virt8ra tunnel run --config FILE`, `virt8ra tunnel genkey FILE`).

pub mod batch;
pub mod cmd;
pub mod config;
pub mod datapath;
pub mod keys;
pub mod peers;
pub mod route;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use boringtun::noise::rate_limiter::RateLimiter;
use quinn_udp::UdpSocketState;
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};

pub use config::{Cidr, Config, ConfigFile, PeerFile, PeerSpec};
pub use datapath::DropStats;
pub use keys::{PublicKey, StaticSecret};
pub use peers::PeerStats;

use datapath::{Drops, Shared};
use peers::PeerTable;

/// Socket buffers: a burst of 64 KB GSO sends must not overflow the
/// receiver (boringtun's default-sized socket dropped ~15% here).
const SOCKET_BUFFER: usize = 16 << 20;
/// Handshakes a second before the rate limiter asks for cookies.
const HANDSHAKE_RATE_LIMIT: u64 = 100;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tunnel configuration: {0}")]
    Config(String),
    #[error("cannot create TUN interface {name}: {source} (this needs root or CAP_NET_ADMIN and /dev/net/tun)")]
    Tun {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot listen on UDP port {port}: {source}")]
    Socket { port: u16, source: std::io::Error },
    #[error("cannot start the tunnel's threads: {0}")]
    Thread(std::io::Error),
}

/// One of the data path's threads.
type Job = fn(&Shared);

/// The tunnel: start it with [`Tunnel::start`].
pub struct Tunnel;

/// A running tunnel. Dropping it stops it too (and removes the interface).
pub struct TunnelHandle {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    interface: String,
    listen_port: u16,
}

/// What [`TunnelHandle::stats`] reports.
#[derive(Debug, Clone, Serialize)]
pub struct TunnelStats {
    pub interface: String,
    pub listen_port: u16,
    pub public_key: String,
    pub peers: Vec<PeerStats>,
    pub dropped: DropStats,
}

impl Tunnel {
    /// Creates the interface and the socket and starts the data path.
    pub fn start(config: Config) -> Result<TunnelHandle, Error> {
        let public = PublicKey::from(&config.private_key);
        config::check_peers(&config.peers, &public)?;
        let tun = open_tun(&config)?;
        let (socket, udp) = open_socket(config.listen_port)?;
        let listen_port = socket
            .local_addr()
            .map(|a| a.port())
            .unwrap_or(config.listen_port);
        let limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        let mut next_index = 0;
        let table = PeerTable::empty().rebuild(
            &config.peers,
            &config.private_key,
            &limiter,
            &mut next_index,
        );
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            table: RwLock::new(Arc::new(table)),
            secret: config.private_key.clone(),
            public,
            limiter,
            socket,
            udp,
            tun,
            mtu: usize::from(config.mtu),
            gso: config.offload,
            drops: Drops::default(),
            next_index: Mutex::new(next_index),
        });
        let mut handle = TunnelHandle {
            shared: shared.clone(),
            threads: Vec::new(),
            interface: config.interface.clone(),
            listen_port,
        };
        let jobs: [(&str, Job); 3] = [
            ("tunnel-tun-rx", datapath::tun_to_udp),
            ("tunnel-udp-rx", datapath::udp_to_tun),
            ("tunnel-timers", datapath::timers),
        ];
        for (name, job) in jobs {
            let sh = shared.clone();
            let t = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || job(&sh))
                .map_err(Error::Thread)?;
            handle.threads.push(t);
        }
        datapath::initiate(&shared, &shared.table().peers);
        tracing::info!(
            interface = %config.interface,
            port = listen_port,
            public_key = %keys::encode_public(&public),
            offload = config.offload,
            tso = shared.tun.tcp_gso(),
            gso_segments = shared.udp.max_gso_segments(),
            gro_segments = shared.udp.gro_segments(),
            "tunnel up"
        );
        Ok(handle)
    }
}

fn open_tun(config: &Config) -> Result<tun_rs::SyncDevice, Error> {
    let err = |source| Error::Tun {
        name: config.interface.clone(),
        source,
    };
    let mut b = tun_rs::DeviceBuilder::new()
        .name(&config.interface)
        .mtu(config.mtu)
        .offload(config.offload)
        .enable(true);
    match config.address {
        Some(Cidr {
            addr: IpAddr::V4(a),
            prefix,
        }) => b = b.ipv4(a, prefix, None),
        Some(Cidr {
            addr: IpAddr::V6(a),
            prefix,
        }) => b = b.ipv6(a, prefix),
        None => {}
    }
    let tun = b.build_sync().map_err(err)?;
    tun.set_nonblocking(true).map_err(err)?;
    Ok(tun)
}

fn open_socket(port: u16) -> Result<(UdpSocket, UdpSocketState), Error> {
    let err = |source| Error::Socket { port, source };
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
        .map_err(err)?;
    // Ask for big buffers; as root force them past the sysctl limits.
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size_force(&s, SOCKET_BUFFER);
    let _ = rustix::net::sockopt::set_socket_send_buffer_size_force(&s, SOCKET_BUFFER);
    let socket: UdpSocket = s.into();
    let state = UdpSocketState::new((&socket).into()).map_err(err)?;
    Ok((socket, state))
}

impl TunnelHandle {
    /// Replaces the peers; peers whose key stays keep their sessions.
    pub fn set_peers(&self, peers: Vec<PeerSpec>) -> Result<(), Error> {
        config::check_peers(&peers, &self.shared.public)?;
        let mut next = self
            .shared
            .next_index
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let new = self.shared.table().rebuild(
            &peers,
            &self.shared.secret,
            &self.shared.limiter,
            &mut next,
        );
        let old = self.shared.table();
        let added: Vec<_> = new
            .peers
            .iter()
            .filter(|p| old.by_receiver(p.index << 8).is_none())
            .cloned()
            .collect();
        *self.shared.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        datapath::initiate(&self.shared, &added);
        Ok(())
    }

    /// Counters per peer and drops by reason.
    pub fn stats(&self) -> TunnelStats {
        TunnelStats {
            interface: self.interface.clone(),
            listen_port: self.listen_port,
            public_key: keys::encode_public(&self.shared.public),
            peers: self
                .shared
                .table()
                .peers
                .iter()
                .map(|p| p.stats())
                .collect(),
            dropped: self.shared.drops.snapshot(),
        }
    }

    /// The UDP port it listens on (useful with `listen_port: 0`).
    pub fn listen_port(&self) -> u16 {
        self.listen_port
    }

    /// Stops the threads and removes the interface.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for TunnelHandle {
    fn drop(&mut self) {
        self.halt();
    }
}
