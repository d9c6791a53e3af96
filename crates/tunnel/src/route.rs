//! Cryptokey routing, as WireGuard defines it: a packet from the TUN goes to
//! the peer whose allowed IPs hold its destination (longest prefix wins),
//! and a packet decrypted from a peer is accepted only if its source is in
//! that peer's allowed IPs, so a peer cannot speak for addresses it was not
//! given.

use std::net::IpAddr;

use crate::config::Cidr;

/// Allowed-IP prefixes and what each routes to.
pub struct Routes<T> {
    /// Longest prefix first, so the first match is the best.
    entries: Vec<(Cidr, T)>,
}

impl<T> Routes<T> {
    pub fn new(mut entries: Vec<(Cidr, T)>) -> Routes<T> {
        entries.sort_by_key(|e| std::cmp::Reverse(e.0.prefix));
        Routes { entries }
    }

    /// The most specific entry holding `ip`.
    pub fn lookup(&self, ip: IpAddr) -> Option<&T> {
        self.entries
            .iter()
            .find(|(c, _)| c.contains(ip))
            .map(|(_, t)| t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        Cidr::parse(s).expect("cidr")
    }

    #[test]
    fn longest_prefix_wins() {
        let r = Routes::new(vec![
            (c("10.0.0.0/8"), 1),
            (c("10.1.0.0/16"), 2),
            (c("10.1.2.3/32"), 3),
        ]);
        let ip = |s: &str| s.parse().expect("ip");
        assert_eq!(r.lookup(ip("10.9.9.9")), Some(&1));
        assert_eq!(r.lookup(ip("10.1.9.9")), Some(&2));
        assert_eq!(r.lookup(ip("10.1.2.3")), Some(&3));
        assert_eq!(r.lookup(ip("11.0.0.1")), None);
        assert_eq!(r.lookup(ip("fd00::1")), None);
    }
}
