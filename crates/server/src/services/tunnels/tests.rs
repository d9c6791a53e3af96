#![allow(clippy::unwrap_used)]

use super::*;
use virt8ra_api::{mac_for_nic, FdbEntry, HostNetwork, NetworkSpec, Peer};

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

const KEY: &str = "YWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWE=";

/// A distinct well-formed key per host: 32 bytes of `n`, in base64.
fn key(n: u8) -> String {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = [n; 33];
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let v = (u32::from(c[0]) << 16) | (u32::from(c[1]) << 8) | u32::from(c[2]);
        for i in (0..4).rev() {
            out.push(B64[((v >> (6 * i)) & 63) as usize] as char);
        }
    }
    // 33 bytes make 44 characters; 32 bytes end in one '='.
    out.truncate(43);
    out.push('=');
    out
}

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
        trusted_fabric: true,
        underlay: Some(Ipv4Addr::new(192, 168, 0, n)),
        tunnel: tunnel.then(|| (Ipv4Addr::new(100, 64, 0, n), KEY.to_string())),
        relay: None,
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
    assert!(encrypt("h1", &mut s, &ends, &[]).is_empty());
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

/// A site that is not marked as a trusted fabric gets tunnels between its
/// own hosts too; without a tunnel, its hosts do not share the network.
#[test]
fn within_a_site_that_is_not_a_trusted_fabric_the_tunnel_is_used() {
    let untrusted = |site: &str, n: u8, tunnel: bool| {
        let (_, e) = host(n, site, false);
        HostEnd {
            trusted_fabric: false,
            tunnel: e.tunnel.filter(|_| tunnel),
            ..e
        }
    };
    let ends: HashMap<String, HostEnd> = [
        ("h1", untrusted("a", 1, true)),
        ("h2", untrusted("a", 2, true)),
        ("h3", untrusted("b", 3, true)),
    ]
    .into_iter()
    .map(|(h, e)| (h.to_string(), e))
    .collect();
    let mut s = state();
    assert!(encrypt("h1", &mut s, &ends, &[]).is_empty());
    let hn = &s.networks[0];
    assert_eq!(hn.peers[0].underlay, ip("100.64.0.2"), "same site: tunnel");
    assert_eq!(hn.peers[1].underlay, ip("100.64.0.3"));
    assert_eq!(s.tunnel.as_ref().unwrap().peers.len(), 2);
    s.validate().unwrap();

    let mut ends = ends;
    ends.insert("h2".into(), untrusted("a", 2, false));
    let mut s = state();
    let notes = encrypt("h1", &mut s, &ends, &[]);
    assert!(notes[0].contains("has no tunnel"), "{notes:?}");
    assert!(s.networks[0].peers.iter().all(|p| p.host != "h2"));
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
        let notes = encrypt("h1", &mut s, &ends, &[]);
        assert!(notes[0].contains("has no tunnel"), "{notes:?}");
        let hn = &s.networks[0];
        assert_eq!(hn.peers.len(), 1, "only h2 is left");
        assert_eq!(hn.peers[0].host, "h2");
        assert_eq!(hn.fdb.len(), 1);
        assert_eq!(s.tunnel, None);
    }
}

/// A host of the relay tests: `n` names it (`hN`, tunnel address
/// 100.64.0.N, underlay 192.168.0.N unless `nat`).
fn host(n: u8, site: &str, nat: bool) -> (String, HostEnd) {
    (
        format!("h{n}"),
        HostEnd {
            site: site.into(),
            trusted_fabric: true,
            underlay: (!nat).then(|| Ipv4Addr::new(192, 168, 0, n)),
            tunnel: Some((Ipv4Addr::new(100, 64, 0, n), key(n))),
            relay: None,
        },
    )
}

fn t(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, 0, n)
}

/// Host `n`'s state on one network with every other host of `ends` as a
/// peer (with one remote MAC each), each named as the network plane
/// names it: by underlay address, or behind NAT by tunnel address.
fn member_state(n: u8, ends: &HashMap<String, HostEnd>) -> HostNetworkState {
    let mut s = state();
    let own = &ends[&format!("h{n}")];
    s.underlay = own.underlay.unwrap_or(t(n));
    let hn = &mut s.networks[0];
    hn.peers.clear();
    hn.fdb.clear();
    let mut names: Vec<&String> = ends.keys().filter(|h| **h != format!("h{n}")).collect();
    names.sort();
    for h in names {
        let e = &ends[h];
        let at = e.underlay.unwrap_or(e.tunnel.as_ref().unwrap().0);
        hn.peers.push(Peer {
            host: h.clone(),
            underlay: at,
        });
        hn.fdb.push(FdbEntry {
            mac: mac_for_nic(h),
            peer: at,
        });
    }
    s
}

/// Runs the rule for every host, as the network plane does: the hosts
/// behind NAT get `relays` (host -> relay), each relay its clients.
fn all_states(
    mut ends: HashMap<String, HostEnd>,
    relays: &[(&str, &str)],
) -> BTreeMap<String, (HostNetworkState, Vec<String>)> {
    for (h, r) in relays {
        ends.get_mut(*h).unwrap().relay = Some(r.to_string());
    }
    let mut out = BTreeMap::new();
    for (name, _) in ends.iter() {
        let n: u8 = name[1..].parse().unwrap();
        let relayed: Vec<Relayed> = relays
            .iter()
            .filter(|(_, r)| r == name)
            .map(|(h, _)| Relayed {
                host: h.to_string(),
                talks_to: ends.keys().filter(|k| k != h).cloned().collect(),
            })
            .collect();
        let mut s = member_state(n, &ends);
        let notes = encrypt(name, &mut s, &ends, &relayed);
        s.validate()
            .unwrap_or_else(|e| panic!("{name}'s state is refused: {e}\n{s:#?}"));
        out.insert(name.clone(), (s, notes));
    }
    out
}

/// A tunnel peer in short: (host, endpoint?, relays_for, keepalive).
type Short = (String, bool, Vec<Ipv4Addr>, Option<u16>);

fn peers_of(s: &HostNetworkState) -> Vec<Short> {
    s.tunnel
        .as_ref()
        .map(|t| {
            t.peers
                .iter()
                .map(|p| {
                    (
                        p.host.clone(),
                        p.endpoint.is_some(),
                        p.relays_for.clone(),
                        p.keepalive,
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn vxlan_peers(s: &HostNetworkState) -> Vec<(String, Ipv4Addr)> {
    s.networks[0]
        .peers
        .iter()
        .map(|p| (p.host.clone(), p.underlay))
        .collect()
}

fn p(h: &str, endpoint: bool, relays_for: &[u8], keepalive: Option<u16>) -> Short {
    (
        h.to_string(),
        endpoint,
        relays_for.iter().map(|n| t(*n)).collect(),
        keepalive,
    )
}

/// The table: each case's hosts, which relay for which, and what every
/// host's tunnel must hold (peer, has an endpoint, relays for, keepalive)
/// and whether it relays.
#[test]
fn hosts_behind_nat_are_reached_through_their_relay() {
    let ka = Some(NAT_KEEPALIVE);
    type Want = Vec<(&'static str, Vec<Short>, bool)>;
    type Case = (
        &'static str,
        Vec<(String, HostEnd)>,
        Vec<(&'static str, &'static str)>,
        Want,
    );
    let cases: Vec<Case> = vec![
        (
            "h1 behind NAT at site a with h2; h3 at site b",
            vec![host(1, "a", true), host(2, "a", false), host(3, "b", false)],
            vec![("h1", "h2")],
            vec![
                ("h1", vec![p("h2", true, &[3], ka)], false),
                (
                    "h2",
                    vec![p("h1", false, &[], None), p("h3", true, &[], None)],
                    true,
                ),
                ("h3", vec![p("h2", true, &[1], None)], false),
            ],
        ),
        (
            "two hosts behind NAT talk through one relay",
            vec![host(1, "a", true), host(2, "b", false), host(4, "c", true)],
            vec![("h1", "h2"), ("h4", "h2")],
            vec![
                ("h1", vec![p("h2", true, &[4], ka)], false),
                (
                    "h2",
                    vec![p("h1", false, &[], None), p("h4", false, &[], None)],
                    true,
                ),
                ("h4", vec![p("h2", true, &[1], ka)], false),
            ],
        ),
        (
            "two hosts behind NAT with different relays talk through both",
            vec![
                host(1, "a", true),
                host(2, "a", false),
                host(3, "b", false),
                host(4, "b", true),
            ],
            vec![("h1", "h2"), ("h4", "h3")],
            vec![
                ("h1", vec![p("h2", true, &[3, 4], ka)], false),
                (
                    "h2",
                    vec![p("h1", false, &[], None), p("h3", true, &[4], None)],
                    true,
                ),
                (
                    "h3",
                    vec![p("h2", true, &[1], None), p("h4", false, &[], None)],
                    true,
                ),
                ("h4", vec![p("h3", true, &[1, 2], ka)], false),
            ],
        ),
    ];
    for (what, hosts, relays, want) in cases {
        let states = all_states(hosts.into_iter().collect(), &relays);
        for (h, peers, relay) in want {
            let (s, notes) = &states[h];
            assert!(notes.is_empty(), "{what}: {h}: {notes:?}");
            assert_eq!(peers_of(s), peers, "{what}: {h}'s tunnel peers");
            assert_eq!(
                s.tunnel.as_ref().unwrap().relay,
                relay,
                "{what}: {h} relays"
            );
        }
        // A host behind NAT has no underlay address of its own, and
        // reaches every peer, at its site too, at its tunnel address.
        for (h, _) in &relays {
            let (s, _) = &states[*h];
            assert_eq!(s.underlay, Ipv4Addr::UNSPECIFIED, "{what}: {h}");
            assert!(vxlan_peers(s).iter().all(|(_, a)| a.octets()[0] == 100));
        }
    }
}

#[test]
fn a_relay_forwards_to_hosts_at_its_own_site_through_the_tunnel() {
    // h2 relays for h1; h3 shares h2's site, so h2 and h3 talk plain
    // VXLAN, but h1's traffic to h3 reaches h2 inside the tunnel, so h2
    // forwards it to h3 through the tunnel too, and h3 accepts it.
    let hosts = vec![host(1, "b", true), host(2, "a", false), host(3, "a", false)];
    let states = all_states(hosts.into_iter().collect(), &[("h1", "h2")]);
    let (h2, _) = &states["h2"];
    assert!(vxlan_peers(h2).contains(&("h3".to_string(), ip("192.168.0.3"))));
    assert_eq!(
        peers_of(h2),
        vec![p("h1", false, &[], None), p("h3", true, &[], None)]
    );
    let (h3, _) = &states["h3"];
    assert_eq!(peers_of(h3), vec![p("h2", true, &[1], None)]);
    assert!(vxlan_peers(h3).contains(&("h1".to_string(), t(1))));
    assert!(vxlan_peers(h3).contains(&("h2".to_string(), ip("192.168.0.2"))));
}

#[test]
fn without_a_relay_a_host_behind_nat_serves_its_own_guests_only() {
    let hosts = vec![host(1, "a", true), host(2, "b", false)];
    let states = all_states(hosts.into_iter().collect(), &[]);
    let (h1, notes) = &states["h1"];
    assert!(h1.networks[0].peers.is_empty() && h1.networks[0].fdb.is_empty());
    assert_eq!(
        (h1.tunnel.as_ref(), h1.underlay),
        (None, Ipv4Addr::UNSPECIFIED)
    );
    assert!(notes[0].contains("no relay"), "{notes:?}");
    let (h2, notes) = &states["h2"];
    assert!(h2.networks[0].peers.is_empty() && h2.tunnel.is_none());
    assert!(notes[0].contains("host h1 has no address"), "{notes:?}");
}

fn place(host: &str, site: &str, provider: &str, location: (f64, f64)) -> Place {
    Place {
        host: host.into(),
        site: site.into(),
        provider: provider.into(),
        location,
    }
}

#[test]
fn the_relay_is_at_the_site_then_the_provider_then_the_nearest() {
    let madrid = (40.42, -3.70);
    let lisbon = (38.72, -9.14);
    let berlin = (52.52, 13.40);
    let nat = place("n", "es-madrid", "p-es", madrid);
    let all = [
        place("z-same-site", "es-madrid", "p-es", madrid),
        place("a-same-site", "es-madrid", "p-es", madrid),
        place("far-same-provider", "de-berlin", "p-es", berlin),
        place("near-other", "pt-lisbon", "p-pt", lisbon),
        place("far-other", "de-berlin2", "p-de", berlin),
        place("n", "es-madrid", "p-es", madrid),
    ];
    let pick = |c: &[Place]| choose_relay(&nat, c).map(|p| p.host.clone());
    // Table: the candidates left, and the relay.
    let cases: [(&[usize], Option<&str>); 6] = [
        (&[0, 1, 2, 3, 4, 5], Some("a-same-site")),
        // The chosen relay goes away: the next at the site.
        (&[0, 2, 3, 4, 5], Some("z-same-site")),
        // None at the site: the provider's, however far.
        (&[2, 3, 4], Some("far-same-provider")),
        // None at the provider: the nearest.
        (&[3, 4], Some("near-other")),
        (&[4], Some("far-other")),
        // Never itself; nobody: none.
        (&[5], None),
    ];
    for (left, want) in cases {
        let c: Vec<Place> = left.iter().map(|i| all[*i].clone()).collect();
        assert_eq!(pick(&c).as_deref(), want, "{left:?}");
        // Deterministic: the order of the candidates does not matter.
        let rev: Vec<Place> = c.iter().rev().cloned().collect();
        assert_eq!(pick(&rev).as_deref(), want, "{left:?} reversed");
    }
}

#[test]
fn a_new_relay_moves_the_routes_of_every_host() {
    // h2 relayed for h1, then went away: h3 relays now, and h4 reaches
    // h1 through h3, no longer through h2.
    let hosts = vec![host(1, "a", true), host(3, "b", false), host(4, "c", false)];
    let states = all_states(hosts.into_iter().collect(), &[("h1", "h3")]);
    assert_eq!(
        peers_of(&states["h1"].0),
        vec![p("h3", true, &[4], Some(NAT_KEEPALIVE))]
    );
    assert_eq!(peers_of(&states["h4"].0), vec![p("h3", true, &[1], None)]);
    assert!(states["h3"].0.tunnel.as_ref().unwrap().relay);
}
