//! The kernel's WireGuard, where the host has it (issue 27, item 3:
//! "the kernel's WireGuard where the module exists (production hosts), a
//! userspace data path where it does not").
//!
//! The same interface (`v8w0`), address, port, keys and peers as the
//! userspace tunnel ([`super::tunnel`]), set with `ip link add ... type
//! wireguard` and `wg set` (wireguard-tools): the key file the agent made
//! is already in the format `wg` reads. Unlike the userspace tunnel, the
//! interface outlives the agent's process; a restart finds it and brings
//! it to the wanted state again, and no state stops it.
//!
//! Which one runs: `VIRT8RA_TUNNEL_BACKEND=kernel|userspace`, or by
//! default the kernel's when a probe interface of type wireguard can be
//! made and `wg` is installed, else userspace. These test machines have no
//! module: the probe says so and the userspace path runs, which is what
//! the tests and benchmarks exercise; the commands this module runs are
//! checked by its unit tests, not against a kernel.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use virt8ra_api::{TunnelPeer, TunnelState, TUNNEL_INTERFACE};

use super::cmd::{self, Changes, NetError, Result};

/// Whether the kernel's WireGuard runs this host's tunnel (decided once).
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        let choice = std::env::var("VIRT8RA_TUNNEL_BACKEND").ok();
        let on = decide(choice.as_deref(), probe);
        tracing::info!(
            backend = if on { "kernel" } else { "userspace" },
            "WireGuard data path for the overlay's tunnel"
        );
        on
    })
}

/// The choice: `kernel` or `userspace` as asked, else what `probe` finds.
fn decide(choice: Option<&str>, probe: impl FnOnce() -> bool) -> bool {
    match choice {
        Some("kernel") => true,
        Some("userspace") => false,
        _ => probe(),
    }
}

/// Whether a WireGuard interface can be made here and `wg` is installed.
fn probe() -> bool {
    let name = "v8w-probe";
    let made = cmd::output("ip", &["link", "add", name, "type", "wireguard"]).is_ok();
    if made {
        let _ = cmd::output("ip", &["link", "del", name]);
    }
    made && cmd::output("wg", &["--version"]).is_ok()
}

/// The arguments of `wg set IFACE ...` for one peer: its key, endpoint
/// (left as learnt when it has none: it is behind NAT and dials in), the
/// tunnel addresses it may send from (its own and those it relays for),
/// and keepalives.
pub fn peer_args(p: &TunnelPeer) -> Vec<String> {
    let mut a = vec!["peer".to_string(), p.public_key.clone()];
    if let Some(e) = p.endpoint {
        a.extend(["endpoint".into(), e.to_string()]);
    }
    let allowed: Vec<String> = std::iter::once(&p.address)
        .chain(&p.relays_for)
        .map(|ip| format!("{ip}/32"))
        .collect();
    a.extend(["allowed-ips".into(), allowed.join(",")]);
    let keepalive = p.keepalive.map_or("off".to_string(), |s| s.to_string());
    a.extend(["persistent-keepalive".into(), keepalive]);
    a
}

/// The peers `wg show IFACE peers` lists that are no longer wanted.
pub fn stale_peers(shown: &str, want: &[TunnelPeer]) -> Vec<String> {
    let keep: BTreeSet<&str> = want.iter().map(|p| p.public_key.as_str()).collect();
    shown
        .lines()
        .map(str::trim)
        .filter(|k| !k.is_empty() && !keep.contains(k))
        .map(str::to_string)
        .collect()
}

/// What was last applied by this process (none after a start: applied
/// once again, which the commands make harmless).
static APPLIED: Mutex<Option<TunnelState>> = Mutex::new(None);

fn link_exists() -> bool {
    cmd::output("ip", &["link", "show", "dev", TUNNEL_INTERFACE]).is_ok()
}

/// Brings the kernel's `v8w0` to `want`, or removes it. `key_file`: the
/// agent's private key (base64, 0600), which `wg` reads itself.
pub fn ensure(
    key_file: &Path,
    want: Option<&TunnelState>,
    mtu: u16,
    changes: &mut Changes,
) -> Result<()> {
    let mut applied = APPLIED.lock().unwrap_or_else(|p| p.into_inner());
    let Some(want) = want else {
        if link_exists() {
            changes.run("ip", &["link", "del", TUNNEL_INTERFACE])?;
        }
        *applied = None;
        return Ok(());
    };
    if applied.as_ref() == Some(want) && link_exists() {
        return Ok(());
    }
    let iface = TUNNEL_INTERFACE;
    if !link_exists() {
        changes.run("ip", &["link", "add", iface, "type", "wireguard"])?;
    }
    let key = key_file
        .to_str()
        .ok_or_else(|| NetError(format!("key file {} is not UTF-8", key_file.display())))?;
    let port = want.listen_port.to_string();
    changes.run(
        "wg",
        &["set", iface, "listen-port", &port, "private-key", key],
    )?;
    for p in &want.peers {
        let args = peer_args(p);
        let mut all = vec!["set", iface];
        all.extend(args.iter().map(String::as_str));
        changes.run("wg", &all)?;
    }
    let shown = cmd::output("wg", &["show", iface, "peers"])?;
    for k in stale_peers(&shown, &want.peers) {
        changes.run("wg", &["set", iface, "peer", &k, "remove"])?;
    }
    let addr = format!("{}/{}", want.address, want.prefix);
    let have = cmd::output("ip", &["-o", "-4", "addr", "show", "dev", iface])?;
    if !have.contains(&format!(" {addr} ")) {
        changes.run("ip", &["addr", "flush", "dev", iface])?;
        changes.run("ip", &["addr", "add", &addr, "dev", iface])?;
    }
    let mtu = mtu.to_string();
    changes.run("ip", &["link", "set", iface, "mtu", &mtu, "up"])?;
    *applied = Some(want.clone());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn peer(
        key: &str,
        endpoint: Option<&str>,
        relays: &[u8],
        keepalive: Option<u16>,
    ) -> TunnelPeer {
        TunnelPeer {
            host: "h".into(),
            public_key: key.into(),
            endpoint: endpoint.map(|e| e.parse().expect("endpoint")),
            address: Ipv4Addr::new(100, 64, 0, 2),
            relays_for: relays
                .iter()
                .map(|n| Ipv4Addr::new(100, 64, 0, *n))
                .collect(),
            keepalive,
        }
    }

    #[test]
    fn a_peer_becomes_wg_set_arguments() {
        let p = peer("K2", Some("192.0.2.2:51820"), &[], None);
        assert_eq!(
            peer_args(&p).join(" "),
            "peer K2 endpoint 192.0.2.2:51820 allowed-ips 100.64.0.2/32 persistent-keepalive off"
        );
        // Behind NAT (no endpoint: learnt from its packets), relaying for
        // two others, with keepalives.
        let p = peer("K3", None, &[7, 9], Some(25));
        assert_eq!(
            peer_args(&p).join(" "),
            "peer K3 allowed-ips 100.64.0.2/32,100.64.0.7/32,100.64.0.9/32 persistent-keepalive 25"
        );
    }

    #[test]
    fn peers_no_longer_wanted_are_removed() {
        let want = [peer("A", None, &[], None), peer("B", None, &[], None)];
        assert_eq!(stale_peers("A\nC\n\nB\nD\n", &want), ["C", "D"]);
        assert!(stale_peers("", &want).is_empty());
    }

    #[test]
    fn the_backend_is_the_one_asked_for_else_what_the_probe_finds() {
        assert!(decide(Some("kernel"), || false));
        assert!(!decide(Some("userspace"), || true));
        assert!(decide(None, || true));
        assert!(!decide(Some("anything else"), || false));
    }
}
