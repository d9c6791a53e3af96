//! Encryption between sites (issue 27, item 3): which of a host's overlay
//! peers it reaches through its WireGuard tunnel, through which tunnel
//! peer, and the tunnel it runs; and which host relays for a host that no
//! other host can reach (behind NAT).
//!
//! Pure rules over the hosts' ends ([`HostEnd`]). Within a site marked as
//! a trusted fabric (`Site::trusted_fabric`: the operator vouches for the
//! network between its hosts) VXLAN goes to a peer's underlay address in
//! the clear. Anywhere else it never does, within an unmarked site (the
//! default) as between sites: a peer is reached at its tunnel address (the VXLAN device routes
//! it into the tunnel), which needs a tunnel at both ends (an agent that
//! reported a public key, a host that was given a tunnel address). A peer
//! at another site without one is left out of the network on this host,
//! and the notes say so: the network is then split between the two, but
//! nothing crosses sites in plaintext.
//!
//! A host without an underlay address (its agent has no `--address`: it
//! is behind NAT) can reach others but not be reached. It gets a relay
//! ([`choose_relay`]): a reachable host with a tunnel, at its own site if
//! there is one, else at its provider, else the nearest. All its overlay
//! traffic, to hosts at its own site too (it has no underlay address for
//! plain VXLAN), goes through its tunnel to the relay, which it dials and
//! keeps its NAT mapping open to with keepalives; the relay forwards
//! between tunnel addresses (`relay: true`). Every other host reaches the
//! host's tunnel address through the relay (`relays_for` on its tunnel
//! peer for the relay). Two hosts behind NAT with different relays talk
//! through both. Without a relay (no reachable host with a tunnel) the
//! host serves its own guests only, and the notes say why.
//!
//! The tunnel's peers are the hosts it reaches that way, each at its
//! underlay address and WireGuard's port. Every host uses the same port,
//! so that an endpoint is known from an address alone.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};

use virt8ra_api::{HostNetworkState, TunnelPeer, TunnelState, TUNNEL_PORT};

use crate::registry::tunnels::TUNNEL_PREFIX;

/// Seconds between keepalives from a host behind NAT to its relay: under
/// the 30 s a NAT's UDP mapping commonly lasts.
pub const NAT_KEEPALIVE: u16 = 25;

/// What the rule needs to know of one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEnd {
    pub site: String,
    /// Its site is a trusted fabric: plain VXLAN to the site's other hosts.
    pub trusted_fabric: bool,
    /// Where other hosts reach it (`--address`), if anywhere.
    pub underlay: Option<Ipv4Addr>,
    /// Its tunnel address and public key, if it can run a tunnel.
    pub tunnel: Option<(Ipv4Addr, String)>,
    /// The host that relays its traffic, for a host without `underlay`.
    pub relay: Option<String>,
}

/// A host the tunnels of another relay through, and every host it talks
/// to (the other hosts that carry its networks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayed {
    pub host: String,
    pub talks_to: BTreeSet<String>,
}

/// How one host reaches another over the overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route<'a> {
    /// VXLAN to its underlay address, in the clear (same site).
    Plain,
    /// Through the tunnel, straight to it.
    Direct,
    /// Through the tunnel, by way of this relay.
    Via(&'a str),
    /// Not at all, and why.
    Out(String),
}

/// How `from` reaches `to` (both in `ends`). `plain`: whether plain VXLAN
/// within a site will do (a relay forwarding tunnel traffic needs the
/// tunnel even there).
fn route<'a>(
    from: (&str, &'a HostEnd),
    to: (&str, &'a HostEnd),
    ends: &'a HashMap<String, HostEnd>,
    plain: bool,
) -> Route<'a> {
    let ((f, fe), (t, te)) = (from, to);
    if plain
        && fe.underlay.is_some()
        && te.underlay.is_some()
        && fe.site == te.site
        && fe.trusted_fabric
    {
        return Route::Plain;
    }
    if fe.tunnel.is_none() || te.tunnel.is_none() {
        let which = if fe.tunnel.is_none() { f } else { t };
        return Route::Out(format!(
            "host {which} has no tunnel (its agent reported no key)"
        ));
    }
    // The relay on the way, if either end is behind NAT: the sender's
    // first (it can reach nobody else), else the receiver's.
    let (nat, relay) = match (fe.underlay, te.underlay) {
        (None, _) => (f, fe.relay.as_deref()),
        (_, None) => (t, te.relay.as_deref()),
        _ => return Route::Direct,
    };
    match relay {
        None => Route::Out(format!(
            "host {nat} has no address other hosts reach it at and no relay (no reachable \
             host with a tunnel is up)"
        )),
        Some(r) if r == f || r == t => Route::Direct,
        Some(r) => match ends.get(r) {
            Some(re) if re.underlay.is_some() && re.tunnel.is_some() => Route::Via(r),
            _ => Route::Out(format!("host {nat}'s relay {r} is not reachable")),
        },
    }
}

/// The tunnel peers of one host, by host.
struct Peers<'a> {
    own: &'a HostEnd,
    ends: &'a HashMap<String, HostEnd>,
    by_host: BTreeMap<String, TunnelPeer>,
}

impl Peers<'_> {
    /// `to` as a tunnel peer (once), if it has a tunnel.
    fn direct(&mut self, to: &str) -> Option<&mut TunnelPeer> {
        let end = self.ends.get(to)?;
        let (address, key) = end.tunnel.clone()?;
        let behind_nat = self.own.underlay.is_none();
        Some(
            self.by_host
                .entry(to.to_string())
                .or_insert_with(|| TunnelPeer {
                    host: to.to_string(),
                    public_key: key,
                    endpoint: end.underlay.map(|u| SocketAddrV4::new(u, TUNNEL_PORT)),
                    address,
                    relays_for: Vec::new(),
                    // Behind NAT: keep the mapping open.
                    keepalive: behind_nat.then_some(NAT_KEEPALIVE),
                }),
        )
    }

    /// Adds the route to `to` (`Direct` or `Via`); its tunnel address.
    fn add(&mut self, to: &str, r: &Route) -> Option<Ipv4Addr> {
        let address = self.ends.get(to)?.tunnel.as_ref()?.0;
        match r {
            Route::Direct => {
                self.direct(to)?;
            }
            Route::Via(relay) => {
                let p = self.direct(relay)?;
                if !p.relays_for.contains(&address) {
                    p.relays_for.push(address);
                    p.relays_for.sort();
                }
            }
            Route::Plain | Route::Out(_) => return None,
        }
        Some(address)
    }
}

/// Routes `state`'s peers through the tunnel where they must be (at
/// another site, behind NAT, or this host is) and sets the tunnel;
/// `ends`: `host`, every host `state` names, their relays, and the
/// hosts of `relayed`; `relayed`: the hosts `host` relays for. A peer in
/// `state` behind NAT may be named by its tunnel address. Returns what
/// the operator should know (peers left out).
pub fn encrypt(
    host: &str,
    state: &mut HostNetworkState,
    ends: &HashMap<String, HostEnd>,
    relayed: &[Relayed],
) -> Vec<String> {
    let mut notes = Vec::new();
    let Some(own) = ends.get(host) else {
        return notes;
    };
    if own.underlay.is_none() {
        state.underlay = Ipv4Addr::UNSPECIFIED;
    }
    let mut peers = Peers {
        own,
        ends,
        by_host: BTreeMap::new(),
    };
    for hn in &mut state.networks {
        // Old address -> the tunnel address, or None: left out.
        let mut moved: HashMap<Ipv4Addr, Option<Ipv4Addr>> = HashMap::new();
        let mut left_out: HashSet<String> = HashSet::new();
        for p in &mut hn.peers {
            let Some(end) = ends.get(&p.host) else {
                continue;
            };
            let r = route((host, own), (&p.host, end), ends, true);
            if r == Route::Plain {
                continue;
            }
            match peers.add(&p.host, &r) {
                Some(address) => {
                    moved.insert(p.underlay, Some(address));
                    p.underlay = address;
                }
                None => {
                    let why = match r {
                        Route::Out(why) => why,
                        _ => format!("host {} has no tunnel", p.host),
                    };
                    notes.push(format!(
                        "network {}: host {} is not reached from host {host} ({why}): they \
                         do not share the network",
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
    relay_for(host, own, &mut peers, relayed);
    state.tunnel = match (&own.tunnel, peers.by_host.is_empty()) {
        (Some((address, _)), false) => Some(TunnelState {
            address: *address,
            prefix: TUNNEL_PREFIX.1,
            listen_port: TUNNEL_PORT,
            peers: peers.by_host.into_values().collect(),
            relay: own.underlay.is_some() && !relayed.is_empty(),
        }),
        _ => None,
    };
    notes
}

/// The relay's own tunnel peers: the hosts it relays for (they dial in)
/// and every host they talk to, each through the tunnel (the relay
/// forwards between tunnel addresses, so plain VXLAN will not do).
fn relay_for(host: &str, own: &HostEnd, peers: &mut Peers, relayed: &[Relayed]) {
    if own.underlay.is_none() || own.tunnel.is_none() {
        return;
    }
    for r in relayed {
        let Some(end) = peers.ends.get(&r.host) else {
            continue;
        };
        if end.relay.as_deref() != Some(host) {
            continue;
        }
        peers.add(&r.host, &Route::Direct);
        for t in r.talks_to.iter().filter(|t| *t != host && *t != &r.host) {
            let Some(te) = peers.ends.get(t) else {
                continue;
            };
            let route = route((host, own), (t, te), peers.ends, false);
            peers.add(t, &route);
        }
    }
}

/// Where a host is, for the choice of a relay.
#[derive(Debug, Clone, PartialEq)]
pub struct Place {
    pub host: String,
    pub site: String,
    pub provider: String,
    /// The site's latitude and longitude.
    pub location: (f64, f64),
}

/// The relay for a host behind NAT at `nat`, of `candidates` (hosts that
/// may relay: reachable, with a tunnel, up, allowed to carry its
/// traffic): at its site if any, else at its provider, else the nearest
/// site; of those, the nearest, then the first by name. `None`: there is
/// no candidate.
pub fn choose_relay<'a>(nat: &Place, candidates: &'a [Place]) -> Option<&'a Place> {
    let key = |c: &Place| {
        let tier = if c.site == nat.site {
            0
        } else if c.provider == nat.provider {
            1
        } else {
            2
        };
        let (a, b) = (nat.location, c.location);
        let km = virt8ra_placement::geo::distance_km(a.0, a.1, b.0, b.1);
        (tier, km)
    };
    candidates
        .iter()
        .filter(|c| c.host != nat.host)
        .map(|c| (key(c), c))
        .min_by(|(ka, a), (kb, b)| {
            ka.0.cmp(&kb.0)
                .then(ka.1.total_cmp(&kb.1))
                .then(a.host.cmp(&b.host))
        })
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests;
