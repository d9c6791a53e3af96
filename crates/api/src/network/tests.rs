use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use proptest::prelude::*;

use super::*;

fn net(cidr: &str, gateway: Option<&str>) -> NetworkSpec {
    NetworkSpec {
        id: "net-1".into(),
        name: "blue".into(),
        cidr: cidr.parse().expect("test CIDR"),
        gateway: gateway.map(|g| g.parse().expect("test gateway")),
        dns: vec![],
        vni: 100,
        mtu: DEFAULT_MTU,
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("test address")
}

#[test]
fn cidr_parses_and_refuses_what_is_not_a_network() {
    let c: Ipv4Cidr = "10.1.0.0/16".parse().expect("valid");
    assert_eq!(c.network(), ip("10.1.0.0"));
    assert_eq!(c.broadcast(), ip("10.1.255.255"));
    assert_eq!(c.netmask(), ip("255.255.0.0"));
    assert_eq!(c.to_string(), "10.1.0.0/16");
    for (bad, why) in [
        ("10.0.0.1/24", "host bits"),
        ("10.0.0.0", "ADDRESS/PREFIX"),
        ("10.0.0.0/33", "not 0-32"),
        ("10.0.0.0/+8", "not 0-32"),
        ("10.0.0.0/", "not 0-32"),
        ("10.0.0/24", "not an IPv4 address"),
        ("fd00::/64", "not an IPv4 address"),
    ] {
        let e = bad.parse::<Ipv4Cidr>().expect_err(bad);
        assert!(e.contains(why), "{bad}: {e}");
    }
    let json: Result<Ipv4Cidr, _> = serde_json::from_str("\"10.0.0.5/24\"");
    assert!(json.is_err());
}

#[test]
fn overlap_and_membership() {
    let a: Ipv4Cidr = "10.0.0.0/16".parse().expect("valid");
    let b: Ipv4Cidr = "10.0.5.0/24".parse().expect("valid");
    let c: Ipv4Cidr = "10.1.0.0/24".parse().expect("valid");
    assert!(a.overlaps(&b) && b.overlaps(&a));
    assert!(!a.overlaps(&c) && !c.overlaps(&b));
    assert!(b.is_host(ip("10.0.5.1")));
    assert!(!b.is_host(ip("10.0.5.0")) && !b.is_host(ip("10.0.5.255")));
    assert!(!b.is_host(ip("10.0.6.1")));
}

#[test]
fn mac_parses_prints_and_refuses_junk() {
    let m: MacAddr = "52:54:00:AB:cd:0f".parse().expect("valid");
    assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
    for bad in [
        "52:54:00:ab:cd",
        "52:54:00:ab:cd:0f:11",
        "5:54:00:ab:cd:0f",
        "zz:54:00:ab:cd:0f",
        "",
    ] {
        assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
    }
    assert!(!MacAddr([1, 0, 0, 0, 0, 0]).is_unicast());
    assert!(!MacAddr([0; 6]).is_unicast());
}

#[test]
fn generated_macs_are_local_unicast_and_stable() {
    let a = mac_for_nic("nic-a");
    assert_eq!(a, mac_for_nic("nic-a"));
    assert_ne!(a, mac_for_nic("nic-b"));
    assert_eq!(a.0[0] & 0b11, 0b10, "locally administered, unicast");
    // The hash is part of the contract (the control plane and every agent
    // version must agree): pin one value.
    assert_eq!(stable_hash(""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(
        mac_for_nic("nic-a").to_string(),
        mac_for_nic("nic-a").to_string()
    );
    let g = gateway_mac("net-1");
    assert!(g.is_unicast() && g.0[0] & 0b10 != 0);
}

#[test]
fn device_names_fit_linux_and_carry_the_prefix() {
    let n = device_names("a-very-long-network-id-0123456789-abcdef");
    for name in [&n.bridge, &n.vxlan, &tap_name("nic-xyz")] {
        assert!(
            name.len() <= 15 && name.starts_with(DEVICE_PREFIX),
            "{name}"
        );
    }
    assert_ne!(n.bridge, device_names("other").bridge);
}

#[test]
fn network_validation_names_the_problem() {
    assert!(net("10.0.0.0/24", Some("10.0.0.1")).validate().is_ok());
    let cases: Vec<(NetworkSpec, &str)> = vec![
        (net("10.0.0.0/24", Some("10.0.1.1")), "gateway 10.0.1.1"),
        (net("10.0.0.0/24", Some("10.0.0.255")), "gateway 10.0.0.255"),
        (net("10.0.0.0/31", None), "/8 to /30"),
        (
            NetworkSpec {
                vni: 0,
                ..net("10.0.0.0/24", None)
            },
            "VNI 0",
        ),
        (
            NetworkSpec {
                vni: MAX_VNI + 1,
                ..net("10.0.0.0/24", None)
            },
            "VNI",
        ),
        (
            NetworkSpec {
                mtu: 100,
                ..net("10.0.0.0/24", None)
            },
            "MTU 100",
        ),
        (
            NetworkSpec {
                name: "Bad Name".into(),
                ..net("10.0.0.0/24", None)
            },
            "network name",
        ),
        (
            NetworkSpec {
                dns: vec![ip("1.1.1.1"); 4],
                ..net("10.0.0.0/24", None)
            },
            "DNS",
        ),
    ];
    for (n, want) in cases {
        let e = n.validate().expect_err(want);
        assert!(e.contains(want), "{want}: {e}");
    }
}

#[test]
fn nic_validation() {
    let n = net("10.0.0.0/24", Some("10.0.0.1"));
    let nic = Nic {
        id: "nic-1".into(),
        network: "net-1".into(),
        mac: mac_for_nic("nic-1"),
        ip: ip("10.0.0.2"),
        prefix: 24,
    };
    assert!(nic.validate(&n).is_ok());
    let e = Nic {
        ip: ip("10.0.1.2"),
        ..nic.clone()
    }
    .validate(&n)
    .expect_err("outside");
    assert!(e.contains("not a host address"), "{e}");
    let e = Nic {
        ip: ip("10.0.0.1"),
        ..nic.clone()
    }
    .validate(&n)
    .expect_err("gateway");
    assert!(e.contains("gateway"), "{e}");
    let e = Nic {
        mac: MacAddr([3, 0, 0, 0, 0, 1]),
        ..nic.clone()
    }
    .validate(&n)
    .expect_err("multicast");
    assert!(e.contains("unicast"), "{e}");
    let e = Nic {
        network: "x".into(),
        ..nic
    }
    .validate(&n)
    .expect_err("network");
    assert!(e.contains("not net-1"), "{e}");
}

fn local_nic(id: &str, addr: &str) -> LocalNic {
    LocalNic {
        id: id.into(),
        vm: format!("vm-{id}"),
        tap: tap_name(id),
        mac: mac_for_nic(id),
        ip: ip(addr),
        ingress: None,
        publish: vec![],
    }
}

fn host_net(id: &str, cidr: &str, vni: u32, gateway: Option<&str>) -> HostNetwork {
    HostNetwork {
        network: NetworkSpec {
            id: id.into(),
            name: id.into(),
            vni,
            ..net(cidr, gateway)
        },
        nat: false,
        nics: vec![],
        peers: vec![Peer {
            host: "h2".into(),
            underlay: ip("192.168.0.2"),
        }],
        fdb: vec![],
    }
}

#[test]
fn host_state_validation() {
    let mut a = host_net("a", "10.0.0.0/24", 1, Some("10.0.0.1"));
    a.nics.push(local_nic("n1", "10.0.0.2"));
    a.fdb.push(FdbEntry {
        mac: mac_for_nic("r1"),
        peer: ip("192.168.0.2"),
    });
    // Same CIDR, no gateway: allowed beside a (a separate segment).
    let b = host_net("b", "10.0.0.0/24", 2, None);
    let ok = HostNetworkState {
        underlay: ip("192.168.0.1"),
        networks: vec![a.clone(), b.clone()],
        tunnel: None,
    };
    ok.validate().expect("valid state");
    let json = serde_json::to_string(&ok).expect("serialize");
    let back: HostNetworkState = serde_json::from_str(&json).expect("round trip");
    assert_eq!(back, ok);

    let bad = |f: &dyn Fn(&mut HostNetworkState), want: &str| {
        let mut s = ok.clone();
        f(&mut s);
        let e = s.validate().expect_err(want);
        assert!(e.contains(want), "{want}: {e}");
    };
    bad(&|s| s.networks[1].network.vni = 1, "same VNI 1");
    bad(&|s| s.networks[1].network.id = "a".into(), "listed twice");
    bad(
        &|s| s.networks[1].network.gateway = Some(ip("10.0.0.1")),
        "overlap",
    );
    bad(&|s| s.networks[1].nat = true, "NAT needs a gateway");
    bad(
        &|s| s.networks[0].nics.push(local_nic("n2", "10.0.0.2")),
        "same address",
    );
    bad(
        &|s| s.networks[0].nics.push(local_nic("n2", "10.0.9.2")),
        "not a host address",
    );
    bad(&|s| s.networks[0].nics[0].tap = "eth0".into(), "tap name");
    bad(
        &|s| {
            let mut n = local_nic("n2", "10.0.0.3");
            n.tap = s.networks[0].nics[0].tap.clone();
            s.networks[0].nics.push(n);
        },
        "used by two NICs",
    );
    bad(
        &|s| {
            let mut n = local_nic("n2", "10.0.0.3");
            n.mac = s.networks[0].nics[0].mac;
            s.networks[1].nics.push(n);
        },
        "same MAC",
    );
    bad(
        &|s| s.networks[0].peers[0].underlay = ip("192.168.0.1"),
        "own underlay",
    );
    bad(
        &|s| s.networks[0].fdb[0].peer = ip("192.168.0.9"),
        "names no peer",
    );
    bad(
        &|s| s.networks[0].fdb[0].mac = mac_for_nic("n1"),
        "both local and remote",
    );
    bad(
        &|s| s.underlay = Ipv4Addr::UNSPECIFIED,
        "no underlay address",
    );
    // Without an underlay: local NICs only, no peers or remote MACs.
    let mut local = ok.clone();
    local.underlay = Ipv4Addr::UNSPECIFIED;
    for hn in &mut local.networks {
        hn.peers.clear();
        hn.fdb.clear();
    }
    local
        .validate()
        .expect("a host without an address carries locally");
    let unknown =
        serde_json::from_str::<HostNetworkState>(r#"{"underlay":"1.2.3.4","netwrks":[]}"#);
    assert!(unknown.is_err(), "unknown fields are refused");
}

#[test]
fn allocation_takes_the_lowest_free_and_skips_reserved() {
    let n = net("10.0.0.0/29", Some("10.0.0.1"));
    let mut used = BTreeSet::new();
    let mut got = vec![];
    while let Ok(a) = allocate_ip(&n, &used, None) {
        used.insert(a);
        got.push(a.to_string());
    }
    assert_eq!(
        got,
        ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
    );
    let e = allocate_ip(&n, &used, None).expect_err("full");
    assert!(e.contains("no free address"), "{e}");
    used.remove(&ip("10.0.0.4"));
    assert_eq!(allocate_ip(&n, &used, None), Ok(ip("10.0.0.4")));
}

#[test]
fn allocation_honours_and_checks_a_request() {
    let n = net("10.0.0.0/24", Some("10.0.0.1"));
    let used: BTreeSet<_> = [ip("10.0.0.7")].into();
    assert_eq!(
        allocate_ip(&n, &used, Some(ip("10.0.0.200"))),
        Ok(ip("10.0.0.200"))
    );
    for (req, want) in [
        ("10.0.0.7", "already taken"),
        ("10.0.0.1", "already taken"),
        ("10.0.1.5", "not a usable address"),
        ("10.0.0.0", "not a usable address"),
        ("10.0.0.255", "not a usable address"),
    ] {
        let e = allocate_ip(&n, &used, Some(ip(req))).expect_err(req);
        assert!(e.contains(want), "{req}: {e}");
    }
}

proptest! {
    /// Whatever is already used, an allocation is a host address of the
    /// subnet, not the gateway, not used, and the lowest such address.
    #[test]
    fn allocation_is_the_lowest_free_host_address(
        prefix in 24u8..=30,
        used_offsets in proptest::collection::btree_set(0u32..256, 0..64),
        gw_offset in 1u32..4,
    ) {
        let n = NetworkSpec {
            cidr: Ipv4Cidr::new(ip("10.20.30.0"), prefix).expect("valid"),
            gateway: Some(Ipv4Addr::from(u32::from(ip("10.20.30.0")) + gw_offset)),
            ..net("10.20.30.0/24", None)
        };
        let used: BTreeSet<Ipv4Addr> = used_offsets
            .iter()
            .map(|o| Ipv4Addr::from(u32::from(ip("10.20.30.0")) + o))
            .collect();
        let free: Vec<Ipv4Addr> = (0u32..256)
            .map(|o| Ipv4Addr::from(u32::from(ip("10.20.30.0")) + o))
            .filter(|a| n.cidr.is_host(*a) && Some(*a) != n.gateway && !used.contains(a))
            .collect();
        match allocate_ip(&n, &used, None) {
            Ok(a) => prop_assert_eq!(Some(&a), free.first()),
            Err(_) => prop_assert!(free.is_empty()),
        }
    }

    /// A CIDR printed and parsed again is the same; overlap is symmetric.
    #[test]
    fn cidr_round_trip_and_symmetric_overlap(a in any::<u32>(), p in 0u8..=32, b in any::<u32>(), q in 0u8..=32) {
        let mask = |p: u8| if p == 0 { 0 } else { u32::MAX << (32 - u32::from(p)) };
        let x = Ipv4Cidr::new(Ipv4Addr::from(a & mask(p)), p).expect("network address");
        let y = Ipv4Cidr::new(Ipv4Addr::from(b & mask(q)), q).expect("network address");
        prop_assert_eq!(x.to_string().parse::<Ipv4Cidr>(), Ok(x));
        prop_assert_eq!(x.overlaps(&y), y.overlaps(&x));
        prop_assert_eq!(x.overlaps(&y), x.contains(y.network()) || y.contains(x.network()));
    }
}

#[test]
fn the_network_state_message_round_trips() {
    use crate::protocol::ServerMessage;
    let m = ServerMessage::NetworkState {
        generation: 7,
        state: HostNetworkState {
            underlay: ip("192.168.0.1"),
            networks: vec![host_net("a", "10.0.0.0/24", 1, Some("10.0.0.1"))],
            tunnel: None,
        },
    };
    let text = serde_json::to_string(&m).expect("serialize");
    assert!(
        text.starts_with(r#"{"type":"network_state","generation":7"#),
        "{text}"
    );
    assert_eq!(
        serde_json::from_str::<ServerMessage>(&text).expect("parse"),
        m
    );
}

const KEY_A: &str = "YWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWE=";
const KEY_B: &str = "YmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmI=";

fn tunneled() -> HostNetworkState {
    let mut a = host_net("a", "10.0.0.0/24", 1, Some("10.0.0.1"));
    // One peer through the tunnel, one on the plain underlay.
    a.peers = vec![
        Peer {
            host: "h2".into(),
            underlay: ip("100.64.0.2"),
        },
        Peer {
            host: "h3".into(),
            underlay: ip("192.168.0.3"),
        },
    ];
    HostNetworkState {
        underlay: ip("192.168.0.1"),
        networks: vec![a],
        tunnel: Some(TunnelState {
            address: ip("100.64.0.1"),
            prefix: 10,
            listen_port: TUNNEL_PORT,
            peers: vec![TunnelPeer {
                host: "h2".into(),
                public_key: KEY_A.into(),
                endpoint: Some("192.168.0.2:51820".parse().expect("endpoint")),
                address: ip("100.64.0.2"),
                relays_for: vec![],
                keepalive: None,
            }],
            relay: false,
        }),
    }
}

#[test]
fn tunnel_state_validation() {
    tunneled().validate().expect("valid tunneled state");
    type Edit = fn(&mut HostNetworkState);
    let cases: [(Edit, &str); 10] = [
        (
            |s| s.tunnel.as_mut().expect("tunnel").peers[0].public_key = "short".into(),
            "public key is not base64",
        ),
        (
            |s| s.tunnel.as_mut().expect("tunnel").peers[0].public_key = "YWFh".into(),
            "has 3 bytes, not 32",
        ),
        (
            |s| s.tunnel.as_mut().expect("tunnel").peers[0].address = ip("10.9.0.2"),
            "outside 100.64.0.0/10",
        ),
        (
            |s| s.tunnel.as_mut().expect("tunnel").peers[0].address = ip("100.64.0.1"),
            "or taken",
        ),
        (
            |s| {
                s.tunnel.as_mut().expect("tunnel").peers[0].endpoint =
                    Some("192.168.0.1:51820".parse().expect("endpoint"))
            },
            "is this host's",
        ),
        (
            |s| {
                let t = s.tunnel.as_mut().expect("tunnel");
                let mut p = t.peers[0].clone();
                p.host = "h4".into();
                p.address = ip("100.64.0.4");
                p.endpoint = Some("192.168.0.4:51820".parse().expect("endpoint"));
                t.peers.push(p);
            },
            "public key is listed twice",
        ),
        (
            |s| s.networks[0].peers[0].underlay = ip("100.64.0.9"),
            "at tunnel address 100.64.0.9 is no tunnel peer",
        ),
        (
            |s| s.tunnel.as_mut().expect("tunnel").listen_port = 0,
            "listen port 0",
        ),
        (
            |s| s.tunnel.as_mut().expect("tunnel").peers[0].relays_for = vec![ip("100.64.0.1")],
            "address 100.64.0.1 is outside 100.64.0.0/10, or taken",
        ),
        (
            |s| s.tunnel.as_mut().expect("tunnel").peers[0].keepalive = Some(0),
            "keepalive must be",
        ),
    ];
    for (edit, want) in cases {
        let mut s = tunneled();
        edit(&mut s);
        let e = s.validate().expect_err(want);
        assert!(e.contains(want), "{e:?} should say {want:?}");
    }
    // A routed network inside the tunnels' prefix would take their route.
    let mut s = tunneled();
    s.networks[0] = host_net("a", "100.64.8.0/24", 1, Some("100.64.8.1"));
    let e = s.validate().expect_err("overlap");
    assert!(e.contains("overlaps the tunnel addresses"), "{e}");
    // A second distinct key is fine.
    let mut s = tunneled();
    let t = s.tunnel.as_mut().expect("tunnel");
    t.peers.push(TunnelPeer {
        host: "h4".into(),
        public_key: KEY_B.into(),
        endpoint: None,
        address: ip("100.64.0.4"),
        relays_for: vec![ip("100.64.0.5")],
        keepalive: Some(25),
    });
    s.validate().expect("two peers");
}
