//! This host's end of the encrypted tunnels to hosts at other sites
//! (issue 27, item 3): one WireGuard interface, `v8w0`, run in this process
//! by `virt8ra_tunnel` (a userspace data path), or by the kernel where it
//! has WireGuard ([`super::wg_kernel`]: the same state, set with `wg`).
//!
//! Keys are made here and never leave the host: the private key is
//! `DATA/network/tunnel.key` (mode 0600, made at the agent's first start),
//! and only the public key goes to the control plane, in the host's
//! inventory. The control plane sends back, in the host's network state,
//! this host's address inside the tunnels and its peers (public key,
//! endpoint, tunnel address); a peer's traffic is accepted from its tunnel
//! address only. VXLAN traffic to a peer's tunnel address is routed through
//! the interface, so guests' frames between sites travel encrypted.
//!
//! One tunnel per host, so one per process: the running tunnel is held
//! here, in a process-wide slot. The interface is a TUN device that exists
//! while this process holds it open: when the agent stops, the interface
//! goes, and the next start makes it again from the stored network state,
//! as it does the bridges.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use virt8ra_api::{TunnelState, TUNNEL_INTERFACE, TUNNEL_OVERHEAD};
use virt8ra_tunnel::{keys, Cidr, Config, PeerSpec, Tunnel, TunnelHandle};

use super::cmd::{Changes, NetError, Result};

/// The private key's file in the data plane's directory.
pub const KEY_FILE: &str = "tunnel.key";
/// The tunnel interface's MTU: a standard underlay's 1500 less the
/// tunnel's own headers.
pub const MTU: u16 = 1500 - TUNNEL_OVERHEAD as u16;

struct Running {
    address: Ipv4Addr,
    prefix: u8,
    listen_port: u16,
    peers: Vec<PeerSpec>,
    handle: TunnelHandle,
}

static RUNNING: Mutex<Option<Running>> = Mutex::new(None);

fn key_path(dir: &Path) -> PathBuf {
    dir.join(KEY_FILE)
}

/// This host's public key (base64), making the key pair first if there
/// is none yet. `dir`: the data plane's directory (`DATA/network`).
pub fn public_key(dir: &Path) -> Result<String> {
    let path = key_path(dir);
    crate::private::make_dir(dir)
        .map_err(|e| NetError(format!("create {}: {e}", dir.display())))?;
    let public = if path.exists() {
        let secret = keys::read_private(&path).map_err(|e| NetError(e.to_string()))?;
        virt8ra_tunnel::PublicKey::from(&secret)
    } else {
        keys::generate(&path).map_err(|e| NetError(e.to_string()))?
    };
    Ok(keys::encode_public(&public))
}

/// The peers as the tunnel takes them: each accepted from its tunnel
/// address only.
fn peer_specs(want: &TunnelState) -> Result<Vec<PeerSpec>> {
    want.peers
        .iter()
        .map(|p| {
            Ok(PeerSpec {
                public_key: keys::parse_public(&p.public_key)
                    .map_err(|e| NetError(format!("tunnel peer {}: {e}", p.host)))?,
                endpoint: p.endpoint.map(SocketAddr::V4),
                // Its own address and those of the hosts it relays for.
                allowed_ips: std::iter::once(&p.address)
                    .chain(&p.relays_for)
                    .map(|a| Cidr {
                        addr: IpAddr::V4(*a),
                        prefix: 32,
                    })
                    .collect(),
                persistent_keepalive: p.keepalive,
            })
        })
        .collect()
}

/// Runs the tunnel `want` describes, or none: starts it, changes its
/// peers (sessions of peers that stay are kept), or stops it. A change of
/// address or port restarts it. `dir`: the data plane's directory, which
/// holds the key.
pub fn ensure(dir: &Path, want: Option<&TunnelState>, changes: &mut Changes) -> Result<()> {
    if super::wg_kernel::enabled() {
        if want.is_some() {
            public_key(dir)?;
        }
        return super::wg_kernel::ensure(&key_path(dir), want, MTU, changes);
    }
    let mut slot = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
    let Some(want) = want else {
        if let Some(r) = slot.take() {
            r.handle.stop();
            changes.note(format!("tunnel {TUNNEL_INTERFACE} stopped"));
        }
        return Ok(());
    };
    let peers = peer_specs(want)?;
    if let Some(r) = slot.as_mut().filter(|r| {
        (r.address, r.prefix, r.listen_port) == (want.address, want.prefix, want.listen_port)
    }) {
        if r.peers != peers {
            r.handle
                .set_peers(peers.clone())
                .map_err(|e| NetError(e.to_string()))?;
            r.peers = peers;
            changes.note(format!(
                "tunnel {TUNNEL_INTERFACE}: {} peer(s)",
                r.peers.len()
            ));
        }
        return Ok(());
    }
    if let Some(r) = slot.take() {
        r.handle.stop();
    }
    public_key(dir)?;
    let private_key = keys::read_private(&key_path(dir)).map_err(|e| NetError(e.to_string()))?;
    let config = Config {
        interface: TUNNEL_INTERFACE.to_string(),
        private_key,
        listen_port: want.listen_port,
        mtu: MTU,
        address: Some(Cidr {
            addr: IpAddr::V4(want.address),
            prefix: want.prefix,
        }),
        offload: true,
        peers: peers.clone(),
    };
    let handle = Tunnel::start(config).map_err(|e| NetError(e.to_string()))?;
    changes.note(format!(
        "tunnel {TUNNEL_INTERFACE} up at {}/{} port {} with {} peer(s)",
        want.address,
        want.prefix,
        want.listen_port,
        peers.len()
    ));
    *slot = Some(Running {
        address: want.address,
        prefix: want.prefix,
        listen_port: want.listen_port,
        peers,
        handle,
    });
    Ok(())
}

/// The running tunnel's counters (none without a tunnel, or with the
/// kernel's: `wg show` has them).
pub fn stats() -> Option<virt8ra_tunnel::TunnelStats> {
    let slot = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
    slot.as_ref().map(|r| r.handle.stats())
}
