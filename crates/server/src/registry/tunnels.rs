//! Hosts' addresses inside the encrypted tunnels between sites (issue 27,
//! item 3), in memory.
//!
//! Every host that can run a tunnel (its agent reported a public key) gets
//! one address in [`TUNNEL_PREFIX`] when it joins or first says hello; the
//! address is kept in the host's record, so it survives restarts and never
//! changes (a change would restart every tunnel to the host). This set
//! holds the addresses in use, loaded from the hosts at start-up, so that
//! handing one out costs a lookup, not a scan of 100,000 hosts, and two
//! joins at once cannot pick the same one.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Mutex;

/// The tunnel addresses: 100.64.0.0/10 (shared address space, RFC 6598;
/// 4 million hosts, and not a range a site's own network uses).
pub const TUNNEL_PREFIX: (Ipv4Addr, u8) = (Ipv4Addr::new(100, 64, 0, 0), 10);

fn first() -> u32 {
    u32::from(TUNNEL_PREFIX.0) + 1
}

fn last() -> u32 {
    // The broadcast address is never handed out.
    u32::from(TUNNEL_PREFIX.0) + (1 << (32 - TUNNEL_PREFIX.1)) - 2
}

/// Whether `a` is a host address of the tunnel prefix.
pub fn is_tunnel_address(a: Ipv4Addr) -> bool {
    (first()..=last()).contains(&u32::from(a))
}

/// The tunnel addresses in use.
#[derive(Debug, Default)]
pub struct TunnelAddresses {
    used: Mutex<BTreeSet<u32>>,
}

impl TunnelAddresses {
    /// Replaces the set with the addresses `hosts` hold (start-up).
    pub fn load(&self, addresses: impl IntoIterator<Item = Ipv4Addr>) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        used.clear();
        used.extend(
            addresses
                .into_iter()
                .filter(|a| is_tunnel_address(*a))
                .map(u32::from),
        );
    }

    /// A free address, now taken (`None`: all 4 million are in use). The
    /// next after the highest in use, else the lowest gap.
    pub fn take(&self) -> Option<Ipv4Addr> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let next = match used.last() {
            None => Some(first()),
            Some(&max) if max < last() => Some(max + 1),
            Some(_) => (first()..=last()).find(|a| !used.contains(a)),
        }?;
        used.insert(next);
        Some(Ipv4Addr::from(next))
    }

    /// Gives an address back (its host was deleted, or the write that was
    /// to keep it failed).
    pub fn give_back(&self, a: Ipv4Addr) {
        self.used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&u32::from(a));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_unique_and_reused_only_when_given_back() {
        let t = TunnelAddresses::default();
        t.load([Ipv4Addr::new(100, 64, 0, 7), Ipv4Addr::new(10, 0, 0, 1)]);
        assert_eq!(t.take(), Some(Ipv4Addr::new(100, 64, 0, 8)));
        assert_eq!(t.take(), Some(Ipv4Addr::new(100, 64, 0, 9)));
        t.give_back(Ipv4Addr::new(100, 64, 0, 9));
        assert_eq!(t.take(), Some(Ipv4Addr::new(100, 64, 0, 9)));
        let fresh = TunnelAddresses::default();
        assert_eq!(fresh.take(), Some(Ipv4Addr::new(100, 64, 0, 1)));
    }

    #[test]
    fn a_full_top_falls_back_to_the_lowest_gap() {
        let t = TunnelAddresses::default();
        let top = Ipv4Addr::from(last());
        t.load([top, Ipv4Addr::new(100, 64, 0, 1)]);
        assert_eq!(t.take(), Some(Ipv4Addr::new(100, 64, 0, 2)));
        assert!(!is_tunnel_address(Ipv4Addr::new(100, 127, 255, 255)));
        assert!(is_tunnel_address(top));
        assert!(!is_tunnel_address(Ipv4Addr::new(100, 64, 0, 0)));
    }
}
