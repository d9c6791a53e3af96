//! The network plane's rule, on hand-made placements.

use super::*;

fn network(id: &str, cidr: &str, gateway: Option<&str>, vni: u32) -> Network {
    Network {
        id: id.into(),
        name: format!("{id}-name"),
        cidr: cidr.into(),
        gateway: gateway.map(|g| g.parse().expect("gateway")),
        dns: vec![],
        mtu: 1450,
        vni,
        span: Default::default(),
        nat: gateway.is_some(),
        project: "default".into(),
        created_at: chrono::Utc::now(),
    }
}

fn nic(id: &str, network: &str, ip: &str) -> VmNic {
    VmNic {
        id: id.into(),
        network: format!("{network}-name"),
        network_id: network.into(),
        mac: virt8ra_api::mac_for_nic(id).to_string(),
        ip: ip.parse().expect("ip"),
        prefix: 24,
        publish: vec![],
    }
}

fn underlays(v: &[(&str, Option<&str>)]) -> HashMap<String, Option<Ipv4Addr>> {
    v.iter()
        .map(|(h, a)| (h.to_string(), a.map(|a| a.parse().expect("addr"))))
        .collect()
}

fn nets(v: Vec<Network>) -> HashMap<String, Network> {
    v.into_iter().map(|n| (n.id.clone(), n)).collect()
}

fn peers(hn: &HostNetwork) -> Vec<(String, String)> {
    hn.peers
        .iter()
        .map(|p| (p.host.clone(), p.underlay.to_string()))
        .collect()
}

fn fdb(hn: &HostNetwork) -> Vec<(String, String)> {
    hn.fdb
        .iter()
        .map(|f| (f.mac.to_string(), f.peer.to_string()))
        .collect()
}

fn mac(nic: &str) -> String {
    virt8ra_api::mac_for_nic(nic).to_string()
}

fn three() -> (HashMap<String, Option<Ipv4Addr>>, Vec<VmNic>) {
    (
        underlays(&[
            ("a", Some("192.0.2.1")),
            ("b", Some("192.0.2.2")),
            ("c", Some("192.0.2.3")),
            ("d", Some("192.0.2.4")),
        ]),
        vec![
            nic("nic-a", "blue", "10.0.0.11"),
            nic("nic-b", "blue", "10.0.0.12"),
            nic("nic-c", "blue", "10.0.0.13"),
        ],
    )
}

/// NICs 0, 1 and 2 of VMs vm-a, vm-b and vm-c, on hosts a, b and c.
fn one_each(n: &[VmNic]) -> Vec<PlacedNic<'_>> {
    ["a", "b", "c"]
        .into_iter()
        .zip(["vm-a", "vm-b", "vm-c"])
        .zip(n)
        .map(|((host, vm), nic)| PlacedNic {
            vm,
            nic,
            host,
            target: None,
            ingress: None,
        })
        .collect()
}

#[test]
fn each_host_carries_its_vms_networks_with_the_others_as_peers() {
    let (u, n) = three();
    let networks = nets(vec![network("blue", "10.0.0.0/24", Some("10.0.0.1"), 7)]);
    let placed = one_each(&n);
    let c = host_state("a", &u, &placed, &networks);
    assert!(c.notes.is_empty(), "{:?}", c.notes);
    assert_eq!(c.state.validate(), Ok(()));
    assert_eq!(c.state.underlay.to_string(), "192.0.2.1");
    assert_eq!(c.carried, BTreeSet::from(["blue".to_string()]));
    let hn = &c.state.networks[0];
    assert_eq!(hn.network.vni, 7);
    assert_eq!(hn.network.cidr.to_string(), "10.0.0.0/24");
    assert!(hn.nat);
    assert_eq!(hn.nics.len(), 1);
    assert_eq!(hn.nics[0].tap, tap_name("nic-a"));
    assert_eq!(hn.nics[0].vm, "vm-a");
    assert_eq!(hn.nics[0].ip.to_string(), "10.0.0.11");
    assert_eq!(
        peers(hn),
        [
            ("b".into(), "192.0.2.2".into()),
            ("c".into(), "192.0.2.3".into())
        ]
    );
    let mut want = vec![
        (mac("nic-b"), "192.0.2.2".to_string()),
        (mac("nic-c"), "192.0.2.3".to_string()),
    ];
    want.sort();
    assert_eq!(fdb(hn), want);
    // A host without a VM on the network carries nothing.
    let d = host_state("d", &u, &placed, &networks);
    assert!(d.state.networks.is_empty() && d.carried.is_empty());
    assert_eq!(d.state.validate(), Ok(()));
}

#[test]
fn a_migration_target_carries_the_network_and_entries_follow_the_switch_over() {
    let (u, n) = three();
    let networks = nets(vec![network("blue", "10.0.0.0/24", Some("10.0.0.1"), 7)]);
    // vm-b moves from b to d: before the switch-over d has its tap, b
    // keeps it, and the others still send its MAC to b.
    let moving = [
        PlacedNic {
            vm: "vm-a",
            nic: &n[0],
            host: "a",
            target: None,
            ingress: None,
        },
        PlacedNic {
            vm: "vm-b",
            nic: &n[1],
            host: "b",
            target: Some("d"),
            ingress: None,
        },
        PlacedNic {
            vm: "vm-c",
            nic: &n[2],
            host: "c",
            target: None,
            ingress: None,
        },
    ];
    let d = host_state("d", &u, &moving, &networks);
    assert_eq!(d.state.validate(), Ok(()));
    let hn = &d.state.networks[0];
    assert_eq!(hn.nics.len(), 1);
    assert_eq!(hn.nics[0].tap, tap_name("nic-b"));
    assert_eq!(peers(hn).len(), 3, "a, b and c: {:?}", peers(hn));
    assert!(!fdb(hn).iter().any(|(m, _)| *m == mac("nic-b")));
    let b = host_state("b", &u, &moving, &networks);
    assert_eq!(
        b.state.networks[0].nics.len(),
        1,
        "the source keeps its tap"
    );
    assert!(peers(&b.state.networks[0]).contains(&("d".into(), "192.0.2.4".into())));
    // A third host has no entry for vm-b's MAC while it moves: its frames
    // are flooded to every peer, both of vm-b's hosts among them.
    let a = host_state("a", &u, &moving, &networks);
    let hn = &a.state.networks[0];
    assert!(
        !fdb(hn).iter().any(|(m, _)| *m == mac("nic-b")),
        "{:?}",
        fdb(hn)
    );
    for h in ["b", "d"] {
        assert!(peers(hn).iter().any(|(p, _)| p == h), "{:?}", peers(hn));
    }
    assert!(fdb(hn).contains(&(mac("nic-c"), "192.0.2.3".into())));
    assert_eq!(a.state.validate(), Ok(()));

    // Switched over: vm-b is on d; b carries nothing more; a sends to d.
    let moved = [
        moving[0],
        PlacedNic {
            vm: "vm-b",
            nic: &n[1],
            host: "d",
            target: None,
            ingress: None,
        },
        moving[2],
    ];
    let b = host_state("b", &u, &moved, &networks);
    assert!(b.state.networks.is_empty() && b.carried.is_empty());
    let a = host_state("a", &u, &moved, &networks);
    let f = fdb(&a.state.networks[0]);
    assert!(f.contains(&(mac("nic-b"), "192.0.2.4".into())), "{f:?}");
    assert!(!f.iter().any(|(_, d)| d == "192.0.2.2"), "{f:?}");
    assert!(!peers(&a.state.networks[0]).iter().any(|(h, _)| h == "b"));
    assert_eq!(a.state.validate(), Ok(()));
}

#[test]
fn a_host_without_an_address_carries_its_networks_locally_and_the_others_leave_it_out() {
    let (mut u, n) = three();
    u.insert("c".into(), None);
    let networks = nets(vec![network("blue", "10.0.0.0/24", Some("10.0.0.1"), 7)]);
    let placed = one_each(&n);
    let c = host_state("c", &u, &placed, &networks);
    assert_eq!(c.state.validate(), Ok(()));
    assert!(c.state.underlay.is_unspecified());
    let hn = &c.state.networks[0];
    assert_eq!(hn.nics.len(), 1, "its own guest still gets its tap");
    assert!(hn.peers.is_empty() && hn.fdb.is_empty());
    assert!(
        c.notes.iter().any(|n| n.contains("--address")),
        "{:?}",
        c.notes
    );
    let a = host_state("a", &u, &placed, &networks);
    assert_eq!(a.state.validate(), Ok(()));
    let hn = &a.state.networks[0];
    assert!(!peers(hn).iter().any(|(h, _)| h == "c"));
    assert!(!fdb(hn).iter().any(|(m, _)| *m == mac("nic-c")));
    assert!(
        a.notes.iter().any(|n| n.contains("host c has no address")),
        "{:?}",
        a.notes
    );
}

#[test]
fn clashes_on_one_host_are_resolved_so_the_agent_accepts_the_state() {
    let (mut u, n) = three();
    // b says it is at a's address (two agents in one namespace, say).
    u.insert("b".into(), Some("192.0.2.1".parse().expect("addr")));
    let red = nic("nic-r", "red", "10.0.0.50");
    let networks = nets(vec![
        network("blue", "10.0.0.0/24", Some("10.0.0.1"), 7),
        network("red", "10.0.0.0/24", Some("10.0.0.1"), 8),
    ]);
    let placed = [
        PlacedNic {
            vm: "vm-a",
            nic: &n[0],
            host: "a",
            target: None,
            ingress: None,
        },
        PlacedNic {
            vm: "vm-b",
            nic: &n[1],
            host: "b",
            target: None,
            ingress: None,
        },
        PlacedNic {
            vm: "vm-r",
            nic: &red,
            host: "a",
            target: None,
            ingress: None,
        },
    ];
    let a = host_state("a", &u, &placed, &networks);
    assert_eq!(a.state.validate(), Ok(()), "{:?}", a.notes);
    assert_eq!(a.state.networks.len(), 2);
    let blue = &a.state.networks[0];
    assert!(blue.peers.is_empty(), "b is not a peer at a's own address");
    assert!(blue.network.gateway.is_some());
    let red = &a.state.networks[1];
    assert!(red.network.gateway.is_none() && !red.nat);
    assert!(
        a.notes.iter().any(|n| n.contains("overlap")),
        "{:?}",
        a.notes
    );
    assert!(
        a.notes.iter().any(|n| n.contains("own address")),
        "{:?}",
        a.notes
    );
    // A network the control plane does not know is left out, and said.
    let unknown = nets(vec![]);
    let x = host_state("a", &u, &placed, &unknown);
    assert!(x.state.networks.is_empty());
    assert!(x.notes.iter().any(|n| n.contains("unknown")));
}

#[test]
fn the_state_is_the_same_whatever_the_order_of_the_input() {
    let (u, n) = three();
    let networks = nets(vec![network("blue", "10.0.0.0/24", Some("10.0.0.1"), 7)]);
    let mut placed = vec![
        PlacedNic {
            vm: "vm-a",
            nic: &n[0],
            host: "a",
            target: None,
            ingress: None,
        },
        PlacedNic {
            vm: "vm-b",
            nic: &n[1],
            host: "b",
            target: None,
            ingress: None,
        },
        PlacedNic {
            vm: "vm-c",
            nic: &n[2],
            host: "c",
            target: None,
            ingress: None,
        },
    ];
    let one = host_state("a", &u, &placed, &networks);
    placed.reverse();
    let two = host_state("a", &u, &placed, &networks);
    assert_eq!(one, two, "the agent is sent a state only when it changes");
}

/// A VM's security group and its NICs' published ports go to the host
/// that runs it (and to a migration's target), not to its peers; two NICs
/// on one host asking for one host port keep the first, with a note, so
/// the agent does not refuse the whole state.
#[test]
fn security_groups_and_published_ports_go_where_the_vm_runs() {
    let (u, mut n) = three();
    let p = |s: &str| s.parse::<virt8ra_api::PublishedPort>().expect("port");
    n[0].publish = vec![p("8080:80")];
    n[1].publish = vec![p("8080:81"), p("53:53/udp")];
    let rules: Vec<IngressRule> = vec!["0.0.0.0/0:tcp:80".parse().expect("rule")];
    let networks = nets(vec![network("blue", "10.0.0.0/24", Some("10.0.0.1"), 7)]);
    let mut placed = one_each(&n);
    placed[0].ingress = Some(&rules);
    placed[0].target = Some("d");
    for host in ["a", "d"] {
        let c = host_state(host, &u, &placed, &networks);
        assert!(c.notes.is_empty(), "{host}: {:?}", c.notes);
        let nic = &c.state.networks[0].nics[0];
        assert_eq!(nic.ingress.as_deref(), Some(&rules[..]), "{host}");
        assert_eq!(nic.publish, [p("8080:80")], "{host}");
        assert_eq!(c.state.validate(), Ok(()));
    }
    // b's NIC: its own ports, the default group.
    let b = host_state("b", &u, &placed, &networks);
    let nic = &b.state.networks[0].nics[0];
    assert_eq!((nic.ingress.is_none(), nic.publish.len()), (true, 2));
    // vm-b on host a too: its 8080/tcp clashes with vm-a's and is left out.
    placed[1].host = "a";
    let c = host_state("a", &u, &placed, &networks);
    assert_eq!(c.state.validate(), Ok(()));
    let published: Vec<String> = c.state.networks[0]
        .nics
        .iter()
        .flat_map(|x| x.publish.iter().map(|p| p.to_string()))
        .collect();
    assert_eq!(published, ["8080:80/tcp", "53:53/udp"]);
    assert!(
        c.notes
            .iter()
            .any(|x| x.contains("VM vm-b and VM vm-a both publish host port 8080/tcp")),
        "{:?}",
        c.notes
    );
}
