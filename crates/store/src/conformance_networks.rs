//! Virtual networks' rules on both backends: unique VNIs and names, and
//! IPAM's leases (a child of `conformance.rs`, whose helpers and `both!`
//! it uses).

use virt8ra_api::*;

use super::*;

both!(
    networks_get_distinct_vnis_and_unique_names,
    concurrent_networks_get_distinct_vnis,
    nic_addresses_are_held_until_the_vm_is_deleted,
    one_address_goes_to_one_of_many_concurrent_creates,
);

async fn networks_get_distinct_vnis_and_unique_names<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    assert_eq!(s.create_network(&network("a")).await.unwrap().vni, 1);
    assert_eq!(s.create_network(&network("b")).await.unwrap().vni, 2);
    let e = s.create_network(&network("a")).await.unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e}");
    let mut taken = network("c");
    taken.vni = 2;
    assert_eq!(
        s.create_network(&taken).await.unwrap_err().to_string(),
        "network 'c' (or VNI 2) already exists"
    );
    s.delete_network("net-a").await.unwrap();
    // The lowest free VNI is handed out again.
    assert_eq!(s.create_network(&network("d")).await.unwrap().vni, 1);
    assert_eq!(s.get_network("d").await.unwrap().id, "net-d");
    let names: Vec<String> = s
        .list_networks()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(names, ["b", "d"]);
}

/// Networks created at once each get a VNI of their own, none refused.
async fn concurrent_networks_get_distinct_vnis<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    let results = concurrently(&s, 20, |s, i| async move {
        s.create_network(&network(&format!("n{i}"))).await
    })
    .await;
    let vnis: BTreeSet<u32> = results.into_iter().map(|r| r.unwrap().vni).collect();
    assert_eq!(vnis, (1..=20).collect());
}

/// A VM's NICs hold their addresses from its create until it is deleted:
/// a second VM at a held address is refused and not stored, a network
/// with NICs cannot be deleted, and deleting the VM frees both.
async fn nic_addresses_are_held_until_the_vm_is_deleted<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    s.create_network(&network("lan")).await.unwrap();
    s.create_vm(&vm_on("web", "lan", "10.20.0.2"), &["created"])
        .await
        .unwrap();
    let used = s.used_ips("net-lan").await.unwrap();
    assert_eq!(
        used.into_iter().collect::<Vec<_>>(),
        ["10.20.0.2".parse::<std::net::Ipv4Addr>().unwrap()]
    );
    let e = s
        .create_vm(&vm_on("db", "lan", "10.20.0.2"), &["created"])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("10.20.0.2 (or MAC"), "{e}");
    assert!(matches!(
        s.get_vm("db").await.unwrap_err(),
        StoreError::NotFound { .. }
    ));
    assert!(s.vm_events("vm-db").await.unwrap().is_empty());
    let e = s.delete_network("net-lan").await.unwrap_err();
    assert!(
        e.to_string().contains("still has NICs of 1 VM(s) (web)"),
        "{e}"
    );
    // Updates (e.g. a move to another host) keep the lease.
    let mut web = s.get_vm("web").await.unwrap();
    web.status.host = Some("h2".into());
    s.update_vm(&web, Some("moved")).await.unwrap();
    assert_eq!(s.used_ips("net-lan").await.unwrap().len(), 1);
    // An update that would take a held address is refused whole: the
    // VM's row and events stay as they were.
    s.create_vm(&vm_on("db", "lan", "10.20.0.3"), &["created"])
        .await
        .unwrap();
    let mut db = s.get_vm("db").await.unwrap();
    db.status.nics[0].id = "nic-db-2".into();
    db.status.nics[0].ip = "10.20.0.2".parse().unwrap();
    db.status.phase = VmPhase::Running;
    let e = s.update_vm(&db, Some("renumbered")).await.unwrap_err();
    assert!(e.to_string().contains("10.20.0.2 (or MAC"), "{e}");
    assert_eq!(s.get_vm("db").await.unwrap().status.phase, VmPhase::Pending);
    assert_eq!(s.vm_events("vm-db").await.unwrap().len(), 1);
    assert_eq!(s.used_ips("net-lan").await.unwrap().len(), 2);
    web.status.phase = VmPhase::Deleted;
    s.update_vm(&web, Some("deleted")).await.unwrap();
    assert_eq!(s.used_ips("net-lan").await.unwrap().len(), 1);
    // The deleted VM keeps its NICs as history; the address is free.
    assert_eq!(s.get_vm("vm-web").await.unwrap().status.nics.len(), 1);
    s.update_vm(&db, Some("renumbered")).await.unwrap();
    let ips: Vec<String> = s
        .used_ips("net-lan")
        .await
        .unwrap()
        .iter()
        .map(|i| i.to_string())
        .collect();
    assert_eq!(ips, ["10.20.0.2"]);
    db.status.phase = VmPhase::Deleted;
    s.update_vm(&db, None).await.unwrap();
    s.delete_network("net-lan").await.unwrap();
}

/// Concurrent creates asking for one address: exactly one gets it, and a
/// refused one does not undo the plain VM creates committed with it.
async fn one_address_goes_to_one_of_many_concurrent_creates<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    s.create_network(&network("lan")).await.unwrap();
    let results = concurrently(&s, 40, |s, i| async move {
        let v = if i % 2 == 0 {
            let mut v = vm_on(&format!("n{i}"), "lan", "10.20.0.9");
            v.status.nics[0].mac = format!("52:54:00:00:01:{i:02x}");
            v
        } else {
            vm(&format!("p{i}"))
        };
        s.create_vm(&v, &["created"]).await
    })
    .await;
    assert_eq!(tally(&results), (21, 19, 0));
    assert_eq!(s.used_ips("net-lan").await.unwrap().len(), 1);
    assert_eq!(s.list_vms(&VmFilter::default()).await.unwrap().len(), 21);
}
