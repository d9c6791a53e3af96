//! The SQLite backend's tests: group commit, savepoints, upgrades, and the
//! rules each resource keeps.

use chrono::Utc;
use rusqlite::{params, Connection};
use virt8ra_api::*;

use super::engine::{unguarded, upgrade_schema, upgrade_schema_to};
use super::rows::db;
use super::vms::GET_VM_SQL;
use super::SqliteStore;
use crate::error::StoreError;
use crate::records::{TokenKind, TokenRecord, VmFilter};
use crate::schema::UPGRADES;
use crate::store::Store;

/// Lookups that run per request or per migration step use indexes: a
/// scan is one million rows at the size the control plane is built for.
#[test]
fn lookups_by_key_use_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = Connection::open(dir.path().join("t.db")).unwrap();
    upgrade_schema(&mut conn).unwrap();
    let plan = |sql: &str| -> String {
        let mut st = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = st
            .query_map(["k"], |r| r.get::<_, String>(3))
            .unwrap()
            .map(|r| r.unwrap())
            .collect::<Vec<_>>();
        rows.join("; ")
    };
    let p = plan(GET_VM_SQL);
    assert!(!p.contains("SCAN"), "get_vm: {p}");
    for table in ["providers", "sites", "hosts", "images"] {
        let p = plan(&format!(
            "SELECT body FROM {table} WHERE id = ?1 OR name = ?1 LIMIT 1"
        ));
        assert!(!p.contains("SCAN"), "{table}: {p}");
    }
}

fn provider(name: &str) -> Provider {
    Provider {
        id: format!("id-{name}"),
        name: name.into(),
        country: "DE".into(),
        jurisdiction: "EU".into(),
        labels: Default::default(),
        created_at: Utc::now(),
    }
}

fn vm(name: &str) -> Vm {
    Vm {
        id: format!("vm-{name}"),
        name: name.into(),
        spec: VmSpec {
            vcpus: 1,
            memory_mib: 128,
            disk_gib: 1,
            image: "img".into(),
            placement: Default::default(),
            user_data: None,
            ports: vec![],
            ssh_authorized_keys: vec![],
            network: None,
            data_disks: vec![],
            nics: vec![],
        },
        power: PowerState::Running,
        reboot_generation: 0,
        stop_timeout_s: 30,
        labels: Default::default(),
        status: VmStatus {
            phase: VmPhase::Pending,
            host: None,
            host_id: None,
            site: None,
            provider: None,
            country: None,
            image_id: None,
            data_image_ids: vec![],
            placement_reason: None,
            last_error: None,
            ports: vec![],
            started_at: None,
            hypervisor: None,
            machine: None,
            migration: None,
            nics: vec![],
        },
        created_at: Utc::now(),
        updated_at: Utc::now(),
    }
}

#[tokio::test]
async fn duplicate_names_conflict_and_lookup_by_name_or_id() {
    let s = SqliteStore::in_memory().unwrap();
    s.create_provider(&provider("a")).await.unwrap();
    let e = s.create_provider(&provider("a")).await.unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e}");
    assert_eq!(s.get_provider("a").await.unwrap().id, "id-a");
    assert_eq!(s.get_provider("id-a").await.unwrap().name, "a");
    assert!(matches!(
        s.get_provider("b").await.unwrap_err(),
        StoreError::NotFound { .. }
    ));
}

/// VM writes run without savepoints: a create whose name is taken and
/// an update of a VM that is not there fail alone, and the writes
/// committed with them stay, with their events.
#[tokio::test]
async fn vm_writes_fail_alone_without_savepoints() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("db.sqlite")).unwrap();
    let mut tasks = Vec::new();
    for i in 0..300 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            match i % 3 {
                // The name of the VM created just before, under another id.
                2 => {
                    let mut v = vm(&format!("v{}", i - 1));
                    v.id = format!("other-{i}");
                    s.create_vm(&v, &["created"]).await
                }
                1 => {
                    s.create_vm(&vm(&format!("v{i}")), &["created", "scheduled"])
                        .await
                }
                _ => {
                    let mut v = vm(&format!("ghost{i}"));
                    v.status.phase = VmPhase::Running;
                    s.update_vm(&v, Some("running")).await
                }
            }
        }));
    }
    let (mut ok, mut conflicts, mut missing) = (0, 0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(StoreError::Conflict(_)) => conflicts += 1,
            Err(StoreError::NotFound { .. }) => missing += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((ok, conflicts, missing), (100, 100, 100));
    drop(s);
    let s = SqliteStore::open(&dir.path().join("db.sqlite")).unwrap();
    // One VM per name (whichever of the two creates came first), each
    // with exactly the events of its own create.
    let vms = s.list_vms(&VmFilter::default()).await.unwrap();
    let names: std::collections::BTreeSet<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!((vms.len(), names.len()), (100, 100));
    for v in &vms {
        let events = s.vm_events(&v.id).await.unwrap();
        let messages: Vec<&str> = events.iter().map(|e| e.message.as_str()).collect();
        let want: &[&str] = if v.id.starts_with("other-") {
            &["created"]
        } else {
            &["created", "scheduled"]
        };
        assert_eq!(messages, want, "events of {}", v.id);
    }
    // The losers left no events either.
    let mut lost = 0;
    for i in (1..300).step_by(3) {
        for id in [format!("vm-v{i}"), format!("other-{}", i + 1)] {
            if !vms.iter().any(|v| v.id == id) {
                assert!(s.vm_events(&id).await.unwrap().is_empty(), "{id}");
                lost += 1;
            }
        }
    }
    assert_eq!(lost, 100);
}

/// A job without a savepoint that fails after changing rows cannot be
/// undone alone: its whole batch is rolled back and every write in it
/// fails; the next batch commits as usual.
#[tokio::test]
async fn a_write_failing_part_way_rolls_back_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("db.sqlite")).unwrap();
    // Hold the writer in a batch of its own while the next two queue,
    // so that they share the next batch.
    let (release, held) = std::sync::mpsc::channel::<()>();
    let (started, running) = tokio::sync::oneshot::channel::<()>();
    let s1 = s.clone();
    let hold = tokio::spawn(async move {
        s1.write(move |_c| {
            let _ = started.send(());
            let _ = held.recv();
            Ok(())
        })
        .await
    });
    running.await.unwrap();
    let s2 = s.clone();
    let good = tokio::spawn(async move { s2.create_vm(&vm("good"), &["created"]).await });
    let s3 = s.clone();
    let partial = tokio::spawn(async move {
        s3.write(|c| {
            unguarded(c, |tx| {
                tx.execute(
                    "INSERT INTO vms (id, name, phase, body) VALUES ('p', 'p', 'pending', '{}')",
                    [],
                )
                .map_err(db("test"))?;
                Err::<(), _>(StoreError::db_failure("failed after a change"))
            })
        })
        .await
    });
    // Both are queued behind the held batch before it is let go.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    release.send(()).unwrap();
    hold.await.unwrap().unwrap();
    let good = good.await.unwrap();
    let partial = partial.await.unwrap();
    assert!(partial.is_err());
    match good {
        Err(e @ StoreError::Db { .. }) => assert!(e.chain().contains("rolled back"), "{e:?}"),
        other => panic!("the batch's other write: {other:?}"),
    }
    assert!(s.list_vms(&VmFilter::default()).await.unwrap().is_empty());
    s.create_vm(&vm("after"), &["created"]).await.unwrap();
    assert_eq!(s.list_vms(&VmFilter::default()).await.unwrap().len(), 1);
}

/// Events are numbered in order from 1: those written with the VM's
/// creation (numbered without a lookup) as well as later updates'.
#[tokio::test]
async fn vm_events_are_numbered_from_one_in_order() {
    let s = SqliteStore::in_memory().unwrap();
    let mut b = vm("db");
    s.create_vm(&b, &["created", "scheduled"]).await.unwrap();
    b.status.phase = VmPhase::Running;
    s.update_vm(&b, Some("running")).await.unwrap();
    let ev = s.vm_events(&b.id).await.unwrap();
    let seqs: Vec<(u64, &str)> = ev.iter().map(|e| (e.seq, e.message.as_str())).collect();
    assert_eq!(seqs, [(1, "created"), (2, "scheduled"), (3, "running")]);
}

#[tokio::test]
async fn deleted_vm_frees_its_name_and_keeps_history() {
    let s = SqliteStore::in_memory().unwrap();
    let mut a = vm("web");
    s.create_vm(&a, &["created"]).await.unwrap();
    let mut dup = vm("web");
    dup.id = "other".into();
    assert!(matches!(
        s.create_vm(&dup, &["x"]).await.unwrap_err(),
        StoreError::Conflict(_)
    ));
    a.status.phase = VmPhase::Deleted;
    s.update_vm(&a, Some("deleted")).await.unwrap();
    s.create_vm(&dup, &["created again"]).await.unwrap();
    assert_eq!(s.get_vm("web").await.unwrap().id, "other");
    let ev = s.vm_events("vm-web").await.unwrap();
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[1].phase, VmPhase::Deleted);
    assert_eq!(s.list_vms(&VmFilter::default()).await.unwrap().len(), 1);
    let all = VmFilter {
        include_deleted: true,
        ..Default::default()
    };
    assert_eq!(s.list_vms(&all).await.unwrap().len(), 2);
}

#[tokio::test]
async fn vm_updates_keep_the_indexed_columns_in_step() {
    let s = SqliteStore::in_memory().unwrap();
    let on = |h: &str| VmFilter {
        host_id: Some(h.into()),
        ..Default::default()
    };
    let column = |s: &SqliteStore, sql: &'static str| {
        let s = s.clone();
        async move {
            s.read(move |c| {
                c.query_row(sql, [], |r| r.get::<_, String>(0))
                    .map_err(db("test"))
            })
            .await
            .unwrap()
        }
    };
    let mut a = vm("web");
    a.status.host_id = Some("h1".into());
    a.status.image_id = Some("i1".into());
    s.create_vm(&a, &["created"]).await.unwrap();
    // Only unindexed fields change: the indexed columns stay as they were.
    a.labels.insert("tier".into(), "front".into());
    a.status.site = Some("s1".into());
    s.update_vm(&a, None).await.unwrap();
    let got = s.list_vms(&on("h1")).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].labels.get("tier").map(String::as_str), Some("front"));
    assert_eq!(got[0].status.site.as_deref(), Some("s1"));
    // Each indexed column follows its change, alone or together.
    a.status.host_id = Some("h2".into());
    s.update_vm(&a, Some("moved")).await.unwrap();
    assert!(s.list_vms(&on("h1")).await.unwrap().is_empty());
    assert_eq!(s.list_vms(&on("h2")).await.unwrap().len(), 1);
    a.status.image_id = Some("i2".into());
    a.status.phase = VmPhase::Running;
    s.update_vm(&a, Some("running")).await.unwrap();
    assert_eq!(column(&s, "SELECT image_id FROM vms").await, "i2");
    assert_eq!(column(&s, "SELECT phase FROM vms").await, "running");
    let running = VmFilter {
        phase: Some(VmPhase::Running),
        ..Default::default()
    };
    assert_eq!(s.list_vms(&running).await.unwrap().len(), 1);
    a.status.host_id = None;
    a.status.phase = VmPhase::Pending;
    s.update_vm(&a, None).await.unwrap();
    assert!(s.list_vms(&on("h2")).await.unwrap().is_empty());
    assert_eq!(column(&s, "SELECT phase FROM vms").await, "pending");
    // An update of a VM that does not exist is a not-found, and changes
    // nothing (its event is not written either).
    let mut ghost = vm("ghost");
    ghost.status.host_id = Some("h1".into());
    assert!(matches!(
        s.update_vm(&ghost, Some("x")).await.unwrap_err(),
        StoreError::NotFound { .. }
    ));
    assert!(s.vm_events(&ghost.id).await.unwrap().is_empty());
    assert_eq!(s.vm_events(&a.id).await.unwrap().len(), 3);
}

#[tokio::test]
async fn concurrent_writes_commit_together_and_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("db.sqlite")).unwrap();
    // 300 concurrent creates, every third a duplicate of an earlier name.
    let mut tasks = Vec::new();
    for i in 0..300 {
        let s = s.clone();
        let name = if i % 3 == 2 {
            format!("p{}", i - 1)
        } else {
            format!("p{i}")
        };
        let mut p = provider(&name);
        p.id = format!("id{i}");
        tasks.push(tokio::spawn(async move { s.create_provider(&p).await }));
    }
    let mut ok = 0;
    let mut conflicts = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(StoreError::Conflict(_)) => conflicts += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((ok, conflicts), (200, 100));
    // A failed write did not undo the others committed with it.
    assert_eq!(s.list_providers().await.unwrap().len(), 200);
    drop(s);
    let s = SqliteStore::open(&dir.path().join("db.sqlite")).unwrap();
    assert_eq!(s.list_providers().await.unwrap().len(), 200);
}

#[tokio::test]
async fn documents_are_unique_by_kind_and_name() {
    let s = SqliteStore::in_memory().unwrap();
    s.put_doc("app", "1", "shop", "{\"v\":1}").await.unwrap();
    s.put_doc("app", "1", "shop", "{\"v\":2}").await.unwrap();
    s.put_doc("catalog", "2", "shop", "{}").await.unwrap();
    let e = s.put_doc("app", "3", "shop", "{}").await.unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e}");
    assert_eq!(
        s.get_doc("app", "shop").await.unwrap().unwrap(),
        "{\"v\":2}"
    );
    assert_eq!(s.list_docs("app").await.unwrap().len(), 1);
    assert!(s.delete_doc("app", "1").await.unwrap());
    assert!(!s.delete_doc("app", "1").await.unwrap());
    assert!(s.get_doc("app", "shop").await.unwrap().is_none());
}

#[tokio::test]
async fn state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    {
        let s = SqliteStore::open(&path).unwrap();
        s.create_provider(&provider("p")).await.unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.schema_version().unwrap(), UPGRADES.len() as u32);
    assert_eq!(s.list_providers().await.unwrap().len(), 1);
}

#[tokio::test]
async fn upgrade_keeps_vm_events_in_order() {
    // A database written by the build before events moved to a
    // WITHOUT ROWID table: its events must come through the upgrade.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    {
        let mut c = Connection::open(&path).unwrap();
        upgrade_schema_to(&mut c, UPGRADES.len() - 1).unwrap();
        for (vm, seq, msg) in [("b", 1, "b1"), ("a", 2, "a2"), ("a", 1, "a1")] {
            c.execute(
                "INSERT INTO vm_events (vm_id, seq, at, phase, message) \
                 VALUES (?1, ?2, '2026-12-04T00:00:00Z', 'running', ?3)",
                params![vm, seq, msg],
            )
            .unwrap();
        }
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.schema_version().unwrap(), UPGRADES.len() as u32);
    let msgs = |evs: Vec<VmEvent>| evs.into_iter().map(|e| e.message).collect::<Vec<_>>();
    assert_eq!(msgs(s.vm_events("a").await.unwrap()), ["a1", "a2"]);
    assert_eq!(msgs(s.vm_events("b").await.unwrap()), ["b1"]);
    let ddl: String = Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT sql FROM sqlite_master WHERE name = 'vm_events'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(ddl.contains("WITHOUT ROWID"), "{ddl}");
}

#[tokio::test]
async fn join_token_uses_are_counted() {
    let s = SqliteStore::in_memory().unwrap();
    let join = TokenRecord {
        id: "j".into(),
        kind: TokenKind::Join,
        hash: "h".into(),
        site: Some("s".into()),
        host_id: None,
        expires_at: None,
        uses_left: Some(1),
        created_at: Utc::now(),
    };
    s.create_token(&join).await.unwrap();
    let found = s.find_token("h").await.unwrap().unwrap();
    assert_eq!((found.kind, found.uses_left), (TokenKind::Join, Some(1)));
    assert_eq!(found.site.as_deref(), Some("s"));
    let host = |n: &str| Host {
        id: n.into(),
        name: n.into(),
        site: "s".into(),
        provider: "p".into(),
        country: "DE".into(),
        inventory: HostInventory {
            hostname: n.into(),
            arch: "x86_64".into(),
            vcpus: 2,
            memory_mib: 1024,
            disk_gib: 10,
            cpu_model: "x".into(),
            cpu_flags: vec![],
            accelerators: vec![],
            hypervisor: Hypervisor::Emulation,
            agent_version: "0".into(),
            qemu_version: String::new(),
            machine_types: vec![],
            migration_address: None,
            migration_relay: false,
            protocol: 0,
            image_service: None,
            tunnel_public_key: None,
        },
        state: HostState::Ready,
        connected: false,
        last_heartbeat: None,
        usage: Default::default(),
        allocated: Default::default(),
        cpu_overcommit: None,
        memory_overcommit: None,
        tunnel_address: None,
        created_at: Utc::now(),
    };
    let tok = |n: &str| TokenRecord {
        id: format!("t{n}"),
        kind: TokenKind::Host,
        hash: format!("hash{n}"),
        site: None,
        host_id: Some(n.into()),
        expires_at: None,
        uses_left: None,
        created_at: Utc::now(),
    };
    s.create_host(&host("h1"), &tok("h1"), "j").await.unwrap();
    // Used up: gone with its last use.
    assert!(s.find_token("h").await.unwrap().is_none());
    let e = s
        .create_host(&host("h2"), &tok("h2"), "j")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("used up"), "{e}");
    assert!(s.get_host("h2").await.is_err(), "nothing changed");
    assert!(s.find_token("hashh2").await.unwrap().is_none());
}

#[tokio::test]
async fn expired_and_used_up_join_tokens_are_purged_and_others_kept() {
    let s = SqliteStore::in_memory().unwrap();
    let now = Utc::now();
    let join = |id: &str, exp: Option<chrono::Duration>, uses: Option<u32>| TokenRecord {
        id: id.into(),
        kind: TokenKind::Join,
        hash: format!("hash-{id}"),
        site: Some("s".into()),
        host_id: None,
        expires_at: exp.map(|d| now + d),
        uses_left: uses,
        created_at: now,
    };
    let hour = chrono::Duration::hours(1);
    for t in [
        join("live", Some(hour), Some(2)),
        join("expired", Some(-hour), Some(2)),
        join("used", Some(hour), Some(0)),
        join("forever", None, None),
    ] {
        s.create_token(&t).await.unwrap();
    }
    let mut admin = join("admin", Some(-hour), Some(0));
    admin.kind = TokenKind::Admin;
    admin.hash = "hash-admin".into();
    s.create_token(&admin).await.unwrap();
    assert_eq!(s.purge_join_tokens(now).await.unwrap(), 2);
    let left: Vec<String> = s
        .list_tokens(TokenKind::Join)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(left, ["forever", "live"]);
    // Other kinds are never purged.
    assert_eq!(s.count_tokens(TokenKind::Admin).await.unwrap(), 1);
    assert_eq!(s.purge_join_tokens(now).await.unwrap(), 0);
    // Deleting by id is limited to the kind named.
    assert!(!s.delete_token(TokenKind::Join, "admin").await.unwrap());
    assert!(s.delete_token(TokenKind::Join, "live").await.unwrap());
    assert!(s.find_token("hash-live").await.unwrap().is_none());
}

/// A database failure names the store function that failed and keeps the
/// backend's error as its source (downcastable, not only text), so the
/// cause reaches the logs; the message does not repeat it.
#[tokio::test]
async fn database_errors_keep_their_cause() {
    let s = SqliteStore::in_memory().unwrap();
    s.write(|c| c.execute_batch("DROP TABLE exports").map_err(db("test")))
        .await
        .unwrap();
    let e = s.get_export("x").await.unwrap_err();
    assert_eq!(e.to_string(), "database error: get_export");
    let cause = std::error::Error::source(&e).expect("a source");
    let sqlite = cause.downcast_ref::<rusqlite::Error>().expect("rusqlite's");
    assert!(
        sqlite.to_string().contains("no such table: exports"),
        "{sqlite}"
    );
    // rusqlite's error has a source of its own (SQLite's code): all of it.
    let chain = e.chain();
    assert!(
        chain.starts_with(&format!("database error: get_export: {sqlite}: ")),
        "{chain}"
    );

    // A row the store cannot decode: the JSON error is the source.
    s.write(|c| {
        c.execute(
            "INSERT INTO providers (id, name, body) VALUES ('p', 'p', 'not json')",
            [],
        )
        .map_err(db("test"))
    })
    .await
    .unwrap();
    let e = s.get_provider("p").await.unwrap_err();
    assert_eq!(e.to_string(), "database error: corrupt row");
    let cause = std::error::Error::source(&e).expect("a source");
    assert!(
        cause.downcast_ref::<serde_json::Error>().is_some(),
        "{cause}"
    );

    // A failed commit fails every write of the batch with the cause.
    let e = StoreError::db("commit", StoreError::db_failure("disk full"));
    assert_eq!(
        e.chain(),
        "database error: commit: database error: disk full"
    );
}

fn network(name: &str) -> Network {
    Network {
        id: format!("net-{name}"),
        name: name.into(),
        cidr: "10.20.0.0/24".into(),
        gateway: Some("10.20.0.1".parse().unwrap()),
        dns: vec![],
        mtu: 1450,
        vni: 0,
        span: NetworkSpan::default(),
        nat: true,
        created_at: Utc::now(),
    }
}

/// `vm(name)` with one NIC on network `net` at `ip`.
fn vm_on(name: &str, net: &str, ip: &str) -> Vm {
    let mut v = vm(name);
    v.status.nics = vec![VmNic {
        id: format!("nic-{name}"),
        network: net.into(),
        network_id: format!("net-{net}"),
        mac: format!("52:54:00:00:00:{:02x}", name.len()),
        ip: ip.parse().unwrap(),
        prefix: 24,
    }];
    v
}

#[tokio::test]
async fn networks_get_distinct_vnis_and_unique_names() {
    let s = SqliteStore::in_memory().unwrap();
    assert_eq!(s.create_network(&network("a")).await.unwrap().vni, 1);
    assert_eq!(s.create_network(&network("b")).await.unwrap().vni, 2);
    let e = s.create_network(&network("a")).await.unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e}");
    let mut taken = network("c");
    taken.vni = 2;
    assert!(matches!(
        s.create_network(&taken).await.unwrap_err(),
        StoreError::Conflict(_)
    ));
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

/// A VM's NICs hold their addresses from its create until it is deleted:
/// a second VM at a held address is refused and not stored, a network
/// with NICs cannot be deleted, and deleting the VM frees both.
#[tokio::test]
async fn nic_addresses_are_held_until_the_vm_is_deleted() {
    let s = SqliteStore::in_memory().unwrap();
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
    web.status.phase = VmPhase::Deleted;
    s.update_vm(&web, Some("deleted")).await.unwrap();
    assert!(s.used_ips("net-lan").await.unwrap().is_empty());
    // The deleted VM keeps its NICs as history; the address is free.
    assert_eq!(s.get_vm("vm-web").await.unwrap().status.nics.len(), 1);
    s.create_vm(&vm_on("db", "lan", "10.20.0.2"), &["created"])
        .await
        .unwrap();
    let mut db = s.get_vm("db").await.unwrap();
    db.status.phase = VmPhase::Deleted;
    s.update_vm(&db, None).await.unwrap();
    s.delete_network("net-lan").await.unwrap();
}

/// Concurrent creates asking for one address: exactly one gets it, and a
/// refused one does not undo the plain VM creates committed with it.
#[tokio::test]
async fn one_address_goes_to_one_of_many_concurrent_creates() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("db.sqlite")).unwrap();
    s.create_network(&network("lan")).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = s.clone();
        let v = if i % 2 == 0 {
            let mut v = vm_on(&format!("n{i}"), "lan", "10.20.0.9");
            v.status.nics[0].mac = format!("52:54:00:00:01:{i:02x}");
            v
        } else {
            vm(&format!("p{i}"))
        };
        tasks.push(tokio::spawn(
            async move { s.create_vm(&v, &["created"]).await },
        ));
    }
    let mut ok = 0;
    let mut conflicts = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(StoreError::Conflict(_)) => conflicts += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((ok, conflicts), (21, 19));
    assert_eq!(s.used_ips("net-lan").await.unwrap().len(), 1);
    let all = s.list_vms(&VmFilter::default()).await.unwrap();
    assert_eq!(all.len(), 21);
}
