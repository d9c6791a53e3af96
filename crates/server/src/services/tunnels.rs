//! Encryption between sites (issue 27, item 3): which of a host's overlay
//! peers it reaches through its WireGuard tunnel, and the tunnel it runs.
//!
//! A pure rule over a host's computed network state. Within a site the
//! hosts share a fabric the site's operator trusts, and VXLAN goes to a
//! peer's underlay address in the clear. Between sites it never does: a
//! peer at another site is reached at its tunnel address (the VXLAN
//! device routes it into the tunnel), which needs a tunnel at both ends (an
//! agent that reported a public key, a host that was given a tunnel
//! address). A peer at another site without one is left out of the
//! network on this host, and the notes say so: the network is then split
//! between the two, but nothing crosses sites in plaintext.
//!
//! The tunnel's peers are the hosts it reaches that way, each at its
//! underlay address and WireGuard's port. Every host uses the same port,
//! so that an endpoint is known from an address alone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};

use virt8ra_api::{HostNetworkState, TunnelPeer, TunnelState, TUNNEL_PORT};

use crate::registry::tunnels::TUNNEL_PREFIX;

/// What the rule needs to know of one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEnd {
    pub site: String,
    /// Where other hosts reach it (`--address`), if anywhere.
    pub underlay: Option<Ipv4Addr>,
    /// Its tunnel address and public key, if it can run a tunnel.
    pub tunnel: Option<(Ipv4Addr, String)>,
}

/// Routes `state`'s peers at other sites than `host`'s through the
/// tunnel and sets the tunnel; `ends`: every host `state` names, and
/// `host`. Returns what the operator should know (peers left out).
pub fn encrypt(
    host: &str,
    state: &mut HostNetworkState,
    ends: &HashMap<String, HostEnd>,
) -> Vec<String> {
    let mut notes = Vec::new();
    let Some(own) = ends.get(host) else {
        return notes;
    };
    let mut tunnel_peers: BTreeMap<String, TunnelPeer> = BTreeMap::new();
    for hn in &mut state.networks {
        // Old underlay address -> the tunnel address, or None: left out.
        let mut moved: HashMap<Ipv4Addr, Option<Ipv4Addr>> = HashMap::new();
        let mut left_out: HashSet<String> = HashSet::new();
        for p in &mut hn.peers {
            let Some(end) = ends.get(&p.host).filter(|e| e.site != own.site) else {
                continue;
            };
            match (&own.tunnel, &end.tunnel) {
                (Some(_), Some((address, key))) => {
                    tunnel_peers
                        .entry(p.host.clone())
                        .or_insert_with(|| TunnelPeer {
                            host: p.host.clone(),
                            public_key: key.clone(),
                            endpoint: end.underlay.map(|u| SocketAddrV4::new(u, TUNNEL_PORT)),
                            address: *address,
                            relays_for: Vec::new(),
                            // Behind NAT: keep the mapping open.
                            keepalive: own.underlay.is_none().then_some(25),
                        });
                    moved.insert(p.underlay, Some(*address));
                    p.underlay = *address;
                }
                _ => {
                    let which = if own.tunnel.is_none() { host } else { &p.host };
                    notes.push(format!(
                        "network {}: host {} is at another site and host {which} has no \
                         tunnel (its agent reported no key): they do not share the network",
                        hn.network.name, p.host
                    ));
                    moved.insert(p.underlay, None);
                    left_out.insert(p.host.clone());
                }
            }
        }
        hn.peers.retain(|p| !left_out.contains(&p.host));
        hn.fdb.retain_mut(|f| match moved.get(&f.peer) {
            None => true,
            Some(None) => false,
            Some(Some(a)) => {
                f.peer = *a;
                true
            }
        });
        hn.peers.sort();
    }
    state.tunnel = match (&own.tunnel, tunnel_peers.is_empty()) {
        (Some((address, _)), false) => Some(TunnelState {
            address: *address,
            prefix: TUNNEL_PREFIX.1,
            listen_port: TUNNEL_PORT,
            peers: tunnel_peers.into_values().collect(),
            relay: false,
        }),
        _ => None,
    };
    notes
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use virt8ra_api::{mac_for_nic, FdbEntry, HostNetwork, NetworkSpec, Peer};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    const KEY: &str = "YWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWE=";

    /// h1 (this host) and h2 at site a, h3 at site b; one remote NIC on
    /// each of h2 and h3.
    fn state() -> HostNetworkState {
        HostNetworkState {
            underlay: ip("192.168.0.1"),
            networks: vec![HostNetwork {
                network: NetworkSpec {
                    id: "n".into(),
                    name: "n".into(),
                    cidr: "10.0.0.0/24".parse().unwrap(),
                    gateway: None,
                    dns: vec![],
                    vni: 1,
                    mtu: virt8ra_api::DEFAULT_MTU,
                },
                nat: false,
                nics: vec![],
                peers: ["h2", "h3"]
                    .iter()
                    .enumerate()
                    .map(|(i, h)| Peer {
                        host: h.to_string(),
                        underlay: Ipv4Addr::new(192, 168, 0, i as u8 + 2),
                    })
                    .collect(),
                fdb: ["m2", "m3"]
                    .iter()
                    .enumerate()
                    .map(|(i, m)| FdbEntry {
                        mac: mac_for_nic(m),
                        peer: Ipv4Addr::new(192, 168, 0, i as u8 + 2),
                    })
                    .collect(),
            }],
            tunnel: None,
        }
    }

    fn end(site: &str, n: u8, tunnel: bool) -> HostEnd {
        HostEnd {
            site: site.into(),
            underlay: Some(Ipv4Addr::new(192, 168, 0, n)),
            tunnel: tunnel.then(|| (Ipv4Addr::new(100, 64, 0, n), KEY.to_string())),
        }
    }

    #[test]
    fn peers_at_other_sites_go_through_the_tunnel() {
        let ends: HashMap<String, HostEnd> = [
            ("h1", end("a", 1, true)),
            ("h2", end("a", 2, true)),
            ("h3", end("b", 3, true)),
        ]
        .into_iter()
        .map(|(h, e)| (h.to_string(), e))
        .collect();
        let mut s = state();
        assert!(encrypt("h1", &mut s, &ends).is_empty());
        let hn = &s.networks[0];
        assert_eq!(hn.peers[0].underlay, ip("192.168.0.2"), "same site: plain");
        assert_eq!(hn.peers[1].underlay, ip("100.64.0.3"), "other site: tunnel");
        assert_eq!(hn.fdb[1].peer, ip("100.64.0.3"));
        assert_eq!(hn.fdb[0].peer, ip("192.168.0.2"));
        let t = s.tunnel.as_ref().unwrap();
        assert_eq!((t.address, t.prefix), (ip("100.64.0.1"), 10));
        assert_eq!(t.peers.len(), 1);
        assert_eq!(
            t.peers[0].endpoint,
            Some("192.168.0.3:51820".parse().unwrap())
        );
        assert_eq!(t.peers[0].keepalive, None);
        s.validate().unwrap();
    }

    #[test]
    fn no_tunnel_at_either_end_leaves_the_peer_out_never_plain() {
        for (own, other) in [(true, false), (false, true)] {
            let ends: HashMap<String, HostEnd> = [
                ("h1", end("a", 1, own)),
                ("h2", end("a", 2, false)),
                ("h3", end("b", 3, other)),
            ]
            .into_iter()
            .map(|(h, e)| (h.to_string(), e))
            .collect();
            let mut s = state();
            let notes = encrypt("h1", &mut s, &ends);
            assert!(notes[0].contains("has no tunnel"), "{notes:?}");
            let hn = &s.networks[0];
            assert_eq!(hn.peers.len(), 1, "only h2 is left");
            assert_eq!(hn.peers[0].host, "h2");
            assert_eq!(hn.fdb.len(), 1);
            assert_eq!(s.tunnel, None);
        }
    }

    #[test]
    fn a_host_behind_nat_keeps_its_mapping_open() {
        let mut me = end("a", 1, true);
        me.underlay = None;
        let ends: HashMap<String, HostEnd> = [
            ("h1", me),
            ("h2", end("b", 2, true)),
            ("h3", end("b", 3, true)),
        ]
        .into_iter()
        .map(|(h, e)| (h.to_string(), e))
        .collect();
        let mut s = state();
        encrypt("h1", &mut s, &ends);
        let t = s.tunnel.unwrap();
        assert!(t.peers.iter().all(|p| p.keepalive == Some(25)));
    }
}
