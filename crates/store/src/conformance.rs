//! The store's rules, tested once and run against every backend.
//!
//! Each test is a generic async function over a [`Backend`] (a fresh
//! database of one kind, and the few raw-SQL reaches a test needs);
//! [`both!`] instantiates it as `sqlite::NAME` and `postgres::NAME`, so a
//! rule added here holds for SQLite and PostgreSQL alike. The PostgreSQL
//! tests run on the harness's own cluster ([`crate::pgtest`]). What is one
//! backend's alone (SQLite's group commit, query plans; PostgreSQL's URL
//! handling) is tested in that backend's `tests.rs`.

use std::collections::BTreeSet;

use async_trait::async_trait;
use chrono::Utc;
use virt8ra_api::*;

use crate::error::StoreError;
use crate::pgtest::PgCluster;
use crate::postgres::PgStore;
use crate::records::{TokenKind, TokenRecord, VmFilter};
use crate::schema::UPGRADES;
use crate::sqlite::SqliteStore;
use crate::store::Store;

/// A fresh database of one backend, and what the tests do beneath the
/// [`Store`] trait.
#[async_trait]
pub(crate) trait Backend: Send + Sync + Sized + 'static {
    type S: Store + Clone;
    /// A fresh, empty database.
    fn new() -> Self;
    /// Opens the store on the database (again, after a drop: what was
    /// committed must be there).
    async fn open(&self) -> Self::S;
    /// Runs statements that return nothing.
    async fn exec(s: &Self::S, sql: &'static str);
    /// The same, with the database's refusal as the error's text.
    async fn try_exec(s: &Self::S, sql: &'static str) -> Result<(), String>;
    /// The text in the first column of the one row `sql` returns.
    async fn text(s: &Self::S, sql: &'static str) -> String;
    /// The schema version the database is at.
    async fn version(s: &Self::S) -> u32;
    /// The text of the driver's own error, when `e` is one.
    fn driver_error(e: &(dyn std::error::Error + 'static)) -> Option<String>;
}

pub(crate) struct Sqlite(tempfile::TempDir);

#[async_trait]
impl Backend for Sqlite {
    type S = SqliteStore;
    fn new() -> Self {
        Sqlite(tempfile::tempdir().unwrap())
    }
    async fn open(&self) -> SqliteStore {
        SqliteStore::open(&self.0.path().join("db.sqlite")).unwrap()
    }
    async fn exec(s: &SqliteStore, sql: &'static str) {
        s.write(move |c| c.execute_batch(sql).map_err(|e| StoreError::db("test", e)))
            .await
            .unwrap()
    }
    async fn try_exec(s: &SqliteStore, sql: &'static str) -> Result<(), String> {
        s.write(move |c| c.execute_batch(sql).map_err(|e| StoreError::db("test", e)))
            .await
            .map_err(|e| e.chain())
    }
    async fn text(s: &SqliteStore, sql: &'static str) -> String {
        s.read(move |c| {
            c.query_row(sql, [], |r| r.get::<_, String>(0))
                .map_err(|e| StoreError::db("test", e))
        })
        .await
        .unwrap()
    }
    async fn version(s: &SqliteStore) -> u32 {
        s.schema_version().unwrap()
    }
    fn driver_error(e: &(dyn std::error::Error + 'static)) -> Option<String> {
        e.downcast_ref::<rusqlite::Error>().map(|e| e.to_string())
    }
}

pub(crate) struct Postgres(String);

#[async_trait]
impl Backend for Postgres {
    type S = PgStore;
    fn new() -> Self {
        Postgres(PgCluster::shared().create_database())
    }
    async fn open(&self) -> PgStore {
        PgStore::connect(&self.0).await.unwrap()
    }
    async fn exec(s: &PgStore, sql: &'static str) {
        s.client().await.unwrap().batch_execute(sql).await.unwrap()
    }
    async fn try_exec(s: &PgStore, sql: &'static str) -> Result<(), String> {
        let c = s.client().await.unwrap();
        c.batch_execute(sql).await.map_err(|e| {
            e.as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_string())
        })
    }
    async fn text(s: &PgStore, sql: &'static str) -> String {
        let c = s.client().await.unwrap();
        c.query_one(sql, &[]).await.unwrap().get(0)
    }
    async fn version(s: &PgStore) -> u32 {
        s.schema_version().await.unwrap()
    }
    fn driver_error(e: &(dyn std::error::Error + 'static)) -> Option<String> {
        e.downcast_ref::<tokio_postgres::Error>().map(|e| {
            // The server's message is in the error's source.
            let mut s = e.to_string();
            if let Some(db) = e.as_db_error() {
                s = format!("{s}: {}", db.message());
            }
            s
        })
    }
}

/// Instantiates each generic test for both backends.
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name::<super::Sqlite>().await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name::<super::Postgres>().await
                }
            )*
        }
    };
}

both!(
    duplicate_names_conflict_and_lookup_by_name_or_id,
    vm_writes_fail_alone,
    vm_events_are_numbered_from_one_in_order,
    concurrent_events_of_one_vm_are_numbered_without_gaps,
    deleted_vm_frees_its_name_and_keeps_history,
    vm_updates_keep_the_indexed_columns_in_step,
    vm_list_filters_and_pages_in_id_order,
    concurrent_writes_commit_and_fail_alone,
    documents_are_unique_by_kind_and_name,
    state_survives_reopen,
    join_token_uses_are_counted,
    a_join_tokens_last_use_admits_one_of_many_concurrent_hosts,
    expired_and_used_up_join_tokens_are_purged_and_others_kept,
    admin_token_rotations_leave_one_token,
    database_errors_keep_their_cause,
    deletes_are_refused_while_something_uses_the_resource,
    migrations_are_one_active_per_vm_and_written_with_it,
    user_tokens_keep_their_grant_and_others_have_none,
    vm_list_filters_by_project_with_default_for_older_rows,
);

#[path = "conformance_audit.rs"]
mod audit;
#[path = "conformance_networks.rs"]
mod networks;

pub(crate) fn provider(name: &str) -> Provider {
    Provider {
        id: format!("id-{name}"),
        name: name.into(),
        country: "DE".into(),
        jurisdiction: "EU".into(),
        labels: Default::default(),
        created_at: Utc::now(),
    }
}

fn site(name: &str, provider: &str) -> Site {
    Site {
        id: format!("site-{name}"),
        name: name.into(),
        provider: provider.into(),
        country: "DE".into(),
        city: "Berlin".into(),
        latitude: 52.5,
        longitude: 13.4,
        tier: Tier::Core,
        facts: Default::default(),
        labels: Default::default(),
        trusted_fabric: false,
        created_at: Utc::now(),
    }
}

fn image(name: &str) -> Image {
    Image {
        id: format!("img-{name}"),
        name: name.into(),
        sha256: "00".into(),
        format: "qcow2".into(),
        source_format: "qcow2".into(),
        size_bytes: 1,
        virtual_size_bytes: 1,
        arch: "x86_64".into(),
        source_sha256: None,
        labels: Default::default(),
        created_at: Utc::now(),
        version: None,
        provenance: None,
        sites: vec![],
        project: None,
    }
}

pub(crate) fn vm(name: &str) -> Vm {
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
            publish: vec![],
            ingress: None,
        },
        power: PowerState::Running,
        reboot_generation: 0,
        stop_timeout_s: 30,
        labels: Default::default(),
        project: virt8ra_api::DEFAULT_PROJECT.into(),
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

fn host(n: &str) -> Host {
    Host {
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
        overlay: None,
        created_at: Utc::now(),
    }
}

fn host_token(n: &str) -> TokenRecord {
    TokenRecord {
        id: format!("t{n}"),
        kind: TokenKind::Host,
        hash: format!("hash{n}"),
        site: None,
        host_id: Some(n.into()),
        expires_at: None,
        uses_left: None,
        created_at: Utc::now(),
        grant: None,
    }
}

fn join_token(id: &str, uses: Option<u32>) -> TokenRecord {
    TokenRecord {
        id: id.into(),
        kind: TokenKind::Join,
        hash: format!("hash-{id}"),
        site: Some("s".into()),
        host_id: None,
        expires_at: None,
        uses_left: uses,
        created_at: Utc::now(),
        grant: None,
    }
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
        project: virt8ra_api::DEFAULT_PROJECT.into(),
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
        publish: vec![],
    }];
    v
}

fn migration(id: &str, vm: &Vm) -> Migration {
    let end = |h: &str| MigrationEnd {
        host_id: h.into(),
        host: h.into(),
        site: "s".into(),
        provider: "p".into(),
        country: "DE".into(),
    };
    Migration {
        id: id.into(),
        vm_id: vm.id.clone(),
        vm: vm.name.clone(),
        mode: MigrationMode::Cold,
        requested_mode: RequestedMode::Auto,
        mode_reason: String::new(),
        phase: MigrationPhase::PreparingTarget,
        source: end("h1"),
        target: end("h2"),
        placement_reason: String::new(),
        progress: None,
        downtime_ms: None,
        total_ms: None,
        bytes: None,
        error: None,
        steps: vec![],
        was_running: true,
        source_engaged: false,
        relay: false,
        disk_sha256: None,
        disk_bytes: None,
        data_disks: vec![],
        evacuation: None,
        created_at: Utc::now(),
        updated_at: Utc::now(),
        finished_at: None,
    }
}

/// Runs `f(i)` for `0..n` as concurrent tasks; their results in order.
async fn concurrently<S, T, F, Fut>(s: &S, n: usize, f: F) -> Vec<crate::Result<T>>
where
    S: Store + Clone,
    T: Send + 'static,
    F: Fn(S, usize) -> Fut,
    Fut: std::future::Future<Output = crate::Result<T>> + Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(f(s.clone(), i))).collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// (ok, conflicts, not found) among `results`; any other error fails.
fn tally<T>(results: &[crate::Result<T>]) -> (usize, usize, usize) {
    let mut n = (0, 0, 0);
    for r in results {
        match r {
            Ok(_) => n.0 += 1,
            Err(StoreError::Conflict(_)) => n.1 += 1,
            Err(StoreError::NotFound { .. }) => n.2 += 1,
            Err(e) => panic!("{}", e.chain()),
        }
    }
    n
}

async fn duplicate_names_conflict_and_lookup_by_name_or_id<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    s.create_provider(&provider("a")).await.unwrap();
    let e = s.create_provider(&provider("a")).await.unwrap_err();
    assert_eq!(e.to_string(), "provider 'a' already exists");
    assert_eq!(s.get_provider("a").await.unwrap().id, "id-a");
    assert_eq!(s.get_provider("id-a").await.unwrap().name, "a");
    let e = s.get_provider("b").await.unwrap_err();
    assert!(
        matches!(&e, StoreError::NotFound { kind: "provider", key } if key == "b"),
        "{e}"
    );
}

/// A create whose name is taken and an update of a VM that is not there
/// fail alone: the writes committed with them (or beside them) stay, with
/// their events, and the losers leave no events.
async fn vm_writes_fail_alone<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    let results = concurrently(&s, 300, |s, i| async move {
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
    })
    .await;
    assert_eq!(tally(&results), (100, 100, 100));
    drop(s);
    let s = b.open().await;
    // One VM per name (whichever of the two creates came first), each
    // with exactly the events of its own create.
    let vms = s.list_vms(&VmFilter::default()).await.unwrap();
    let names: BTreeSet<&str> = vms.iter().map(|v| v.name.as_str()).collect();
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

/// Events are numbered in order from 1: those written with the VM's
/// creation (numbered without a lookup) as well as later updates'.
async fn vm_events_are_numbered_from_one_in_order<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    let mut v = vm("db");
    s.create_vm(&v, &["created", "scheduled"]).await.unwrap();
    v.status.phase = VmPhase::Running;
    s.update_vm(&v, Some("running")).await.unwrap();
    let ev = s.vm_events(&v.id).await.unwrap();
    let seqs: Vec<(u64, &str, VmPhase)> = ev
        .iter()
        .map(|e| (e.seq, e.message.as_str(), e.phase))
        .collect();
    assert_eq!(
        seqs,
        [
            (1, "created", VmPhase::Pending),
            (2, "scheduled", VmPhase::Pending),
            (3, "running", VmPhase::Running)
        ]
    );
}

/// Updates of one VM at once each get their own event number: none lost,
/// none twice (in PostgreSQL the row lock of the update orders them).
async fn concurrent_events_of_one_vm_are_numbered_without_gaps<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    s.create_vm(&vm("busy"), &["created"]).await.unwrap();
    let results = concurrently(&s, 60, |s, i| async move {
        let mut v = vm("busy");
        v.labels.insert("n".into(), i.to_string());
        s.update_vm(&v, Some(&format!("update {i}"))).await
    })
    .await;
    assert_eq!(tally(&results), (60, 0, 0));
    let ev = s.vm_events("vm-busy").await.unwrap();
    let seqs: Vec<u64> = ev.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=61).collect::<Vec<u64>>());
    let messages: BTreeSet<&str> = ev.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(messages.len(), 61);
}

async fn deleted_vm_frees_its_name_and_keeps_history<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    let mut a = vm("web");
    s.create_vm(&a, &["created"]).await.unwrap();
    let mut dup = vm("web");
    dup.id = "other".into();
    let e = s.create_vm(&dup, &["x"]).await.unwrap_err();
    assert_eq!(e.to_string(), "VM 'web' already exists");
    a.status.phase = VmPhase::Deleted;
    s.update_vm(&a, Some("deleted")).await.unwrap();
    s.create_vm(&dup, &["created again"]).await.unwrap();
    // A live VM's name wins over a deleted one's; the deleted one is still
    // found by id.
    assert_eq!(s.get_vm("web").await.unwrap().id, "other");
    assert_eq!(
        s.get_vm("vm-web").await.unwrap().status.phase,
        VmPhase::Deleted
    );
    let ev = s.vm_events("vm-web").await.unwrap();
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[1].phase, VmPhase::Deleted);
    assert_eq!(s.list_vms(&VmFilter::default()).await.unwrap().len(), 1);
    let all = VmFilter {
        include_deleted: true,
        ..Default::default()
    };
    assert_eq!(s.list_vms(&all).await.unwrap().len(), 2);
    let deleted = VmFilter {
        phase: Some(VmPhase::Deleted),
        ..Default::default()
    };
    assert_eq!(s.list_vms(&deleted).await.unwrap()[0].id, "vm-web");
}

async fn vm_updates_keep_the_indexed_columns_in_step<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    let on = |h: &str| VmFilter {
        host_id: Some(h.into()),
        ..Default::default()
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
    assert_eq!(B::text(&s, "SELECT image_id FROM vms").await, "i2");
    assert_eq!(B::text(&s, "SELECT phase FROM vms").await, "running");
    let running = VmFilter {
        phase: Some(VmPhase::Running),
        ..Default::default()
    };
    assert_eq!(s.list_vms(&running).await.unwrap().len(), 1);
    a.status.host_id = None;
    a.status.phase = VmPhase::Pending;
    s.update_vm(&a, None).await.unwrap();
    assert!(s.list_vms(&on("h2")).await.unwrap().is_empty());
    assert_eq!(B::text(&s, "SELECT phase FROM vms").await, "pending");
    // An update of a VM that does not exist is a not-found, and changes
    // nothing (its event is not written either).
    let mut ghost = vm("ghost");
    ghost.status.host_id = Some("h1".into());
    let e = s.update_vm(&ghost, Some("x")).await.unwrap_err();
    assert!(
        matches!(&e, StoreError::NotFound { kind: "VM", key } if key == "vm-ghost"),
        "{e}"
    );
    assert!(s.vm_events(&ghost.id).await.unwrap().is_empty());
    assert_eq!(s.vm_events(&a.id).await.unwrap().len(), 3);
}

/// Filters combine, and pages follow the id in byte order (the order of
/// the control plane's in-memory index, whatever the database's locale).
async fn vm_list_filters_and_pages_in_id_order<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    // Upper case sorts before lower case byte by byte, not in most locales.
    for (id, site, country) in [
        ("b", "s1", "DE"),
        ("A", "s1", "PL"),
        ("a", "s2", "DE"),
        ("B", "s2", "DE"),
    ] {
        let mut v = vm(id);
        v.id = id.into();
        v.status.site = Some(site.into());
        v.status.country = Some(country.into());
        v.status.provider = Some("p".into());
        s.create_vm(&v, &[]).await.unwrap();
    }
    let ids = |vms: Vec<Vm>| vms.into_iter().map(|v| v.id).collect::<Vec<_>>();
    let all = s.list_vms(&VmFilter::default()).await.unwrap();
    assert_eq!(ids(all), ["A", "B", "a", "b"]);
    let page = VmFilter {
        after_id: Some("B".into()),
        limit: Some(1),
        ..Default::default()
    };
    assert_eq!(ids(s.list_vms(&page).await.unwrap()), ["a"]);
    let de_s2 = VmFilter {
        site: Some("s2".into()),
        country: Some("DE".into()),
        provider: Some("p".into()),
        ..Default::default()
    };
    assert_eq!(ids(s.list_vms(&de_s2).await.unwrap()), ["B", "a"]);
    // Names list in byte order too.
    for n in ["b", "B", "a"] {
        s.create_provider(&provider(n)).await.unwrap();
    }
    let names: Vec<String> = s
        .list_providers()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["B", "a", "b"]);
}

async fn concurrent_writes_commit_and_fail_alone<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    // 300 concurrent creates, every third a duplicate of an earlier name.
    let results = concurrently(&s, 300, |s, i| async move {
        let name = if i % 3 == 2 {
            format!("p{}", i - 1)
        } else {
            format!("p{i}")
        };
        let mut p = provider(&name);
        p.id = format!("id{i}");
        s.create_provider(&p).await
    })
    .await;
    assert_eq!(tally(&results), (200, 100, 0));
    // A failed write did not undo the others committed with it.
    assert_eq!(s.list_providers().await.unwrap().len(), 200);
    drop(s);
    let s = b.open().await;
    assert_eq!(s.list_providers().await.unwrap().len(), 200);
}

async fn documents_are_unique_by_kind_and_name<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    s.put_doc("app", "1", "shop", "{\"v\":1}").await.unwrap();
    s.put_doc("app", "1", "shop", "{\"v\":2}").await.unwrap();
    s.put_doc("catalog", "2", "shop", "{}").await.unwrap();
    let e = s.put_doc("app", "3", "shop", "{}").await.unwrap_err();
    assert_eq!(e.to_string(), "app 'shop' already exists");
    assert_eq!(
        s.get_doc("app", "shop").await.unwrap().unwrap(),
        "{\"v\":2}"
    );
    assert_eq!(s.get_doc("app", "1").await.unwrap().unwrap(), "{\"v\":2}");
    assert_eq!(s.list_docs("app").await.unwrap().len(), 1);
    assert!(s.delete_doc("app", "1").await.unwrap());
    assert!(!s.delete_doc("app", "1").await.unwrap());
    assert!(s.get_doc("app", "shop").await.unwrap().is_none());
}

async fn state_survives_reopen<B: Backend>() {
    let b = B::new();
    {
        let s = b.open().await;
        s.create_provider(&provider("p")).await.unwrap();
        s.create_image(&image("debian")).await.unwrap();
        let export = VmExport {
            id: "e1".into(),
            vm_id: "vm-web".into(),
            vm: "web".into(),
            state: "ready".into(),
            sha256: None,
            size_bytes: None,
            error: None,
            url_path: "/e1".into(),
            data_disks: vec![],
            created_at: Utc::now(),
        };
        s.put_export(&export).await.unwrap();
        s.put_export(&VmExport {
            state: "failed".into(),
            ..export
        })
        .await
        .unwrap();
    }
    let s = b.open().await;
    assert_eq!(B::version(&s).await, UPGRADES.len() as u32);
    assert_eq!(s.list_providers().await.unwrap().len(), 1);
    assert_eq!(s.get_image("img-debian").await.unwrap().name, "debian");
    assert_eq!(s.get_export("e1").await.unwrap().state, "failed");
    let e = s.get_export("e2").await.unwrap_err();
    assert_eq!(e.to_string(), "export 'e2' not found");
}

async fn join_token_uses_are_counted<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    let mut join = join_token("j", Some(1));
    join.hash = "h".into();
    // Stored to the microsecond, as every timestamp.
    join.created_at = "2026-12-07T10:00:00.123456Z".parse().unwrap();
    join.expires_at = Some("2126-12-07T10:00:00Z".parse().unwrap());
    s.create_token(&join).await.unwrap();
    let found = s.find_token("h").await.unwrap().unwrap();
    assert_eq!(found, join);
    s.create_host(&host("h1"), &host_token("h1"), "j")
        .await
        .unwrap();
    // Used up: gone with its last use.
    assert!(s.find_token("h").await.unwrap().is_none());
    let e = s
        .create_host(&host("h2"), &host_token("h2"), "j")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("used up"), "{e}");
    assert!(s.get_host("h2").await.is_err(), "nothing changed");
    assert!(s.find_token("hashh2").await.unwrap().is_none());
    // A token with uses left counts down; one without a limit stays.
    s.create_token(&join_token("two", Some(2))).await.unwrap();
    s.create_token(&join_token("free", None)).await.unwrap();
    s.create_host(&host("h3"), &host_token("h3"), "two")
        .await
        .unwrap();
    let two = s.find_token("hash-two").await.unwrap().unwrap();
    assert_eq!(two.uses_left, Some(1));
    s.create_host(&host("h4"), &host_token("h4"), "free")
        .await
        .unwrap();
    assert_eq!(
        s.find_token("hash-free").await.unwrap().unwrap().uses_left,
        None
    );
    // A host's name is unique: the join is refused whole, its use kept.
    let mut again = host("h5");
    again.name = "h4".into();
    let e = s
        .create_host(&again, &host_token("h5"), "two")
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "host 'h4' already exists");
    assert_eq!(
        s.find_token("hash-two").await.unwrap().unwrap().uses_left,
        Some(1)
    );
    // A deleted host's credential goes with it.
    s.delete_host("h4").await.unwrap();
    assert!(s.find_token("hashh4").await.unwrap().is_none());
    assert!(matches!(
        s.delete_host("h4").await.unwrap_err(),
        StoreError::NotFound { kind: "host", .. }
    ));
}

/// Many hosts joining at once on a token's last use: one is admitted.
async fn a_join_tokens_last_use_admits_one_of_many_concurrent_hosts<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    s.create_token(&join_token("last", Some(1))).await.unwrap();
    let results = concurrently(&s, 20, |s, i| async move {
        let n = format!("h{i}");
        s.create_host(&host(&n), &host_token(&n), "last").await
    })
    .await;
    assert_eq!(tally(&results), (1, 19, 0));
    assert_eq!(s.list_hosts().await.unwrap().len(), 1);
    assert_eq!(s.count_tokens(TokenKind::Host).await.unwrap(), 1);
    assert_eq!(s.count_tokens(TokenKind::Join).await.unwrap(), 0);
}

async fn expired_and_used_up_join_tokens_are_purged_and_others_kept<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    let now = Utc::now();
    let join = |id: &str, exp: Option<chrono::Duration>, uses: Option<u32>| TokenRecord {
        expires_at: exp.map(|d| now + d),
        created_at: now,
        ..join_token(id, uses)
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

/// Rotations of the admin token at once leave exactly one (the last).
async fn admin_token_rotations_leave_one_token<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    let admin = |i: usize| TokenRecord {
        kind: TokenKind::Admin,
        site: None,
        ..join_token(&format!("admin{i}"), None)
    };
    s.create_token(&admin(1000)).await.unwrap();
    // Rounds: the first opens the connections of a pool, whose starts
    // would keep its writes apart.
    for round in 0..5 {
        let results = concurrently(&s, 20, move |s, i| async move {
            s.replace_tokens(&admin(round * 100 + i)).await
        })
        .await;
        assert_eq!(tally(&results), (20, 0, 0));
        assert_eq!(s.count_tokens(TokenKind::Admin).await.unwrap(), 1);
    }
    assert!(s.find_token("hash-admin1000").await.unwrap().is_none());
}

/// A database failure names the store function that failed and keeps the
/// driver's error as its source (downcastable, not only text), so the
/// cause reaches the logs; the message does not repeat it.
async fn database_errors_keep_their_cause<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    B::exec(&s, "DROP TABLE exports").await;
    let e = s.get_export("x").await.unwrap_err();
    assert_eq!(e.to_string(), "database error: get_export");
    let cause = std::error::Error::source(&e).expect("a source");
    let text = B::driver_error(cause).expect("the driver's own error");
    assert!(text.contains("exports"), "{text}");
    assert!(
        e.chain().starts_with("database error: get_export: "),
        "{}",
        e.chain()
    );

    // A row the store cannot decode: the JSON error is the source.
    B::exec(
        &s,
        "INSERT INTO providers (id, name, body) VALUES ('p', 'p', 'not json')",
    )
    .await;
    let e = s.get_provider("p").await.unwrap_err();
    assert_eq!(e.to_string(), "database error: corrupt row");
    let cause = std::error::Error::source(&e).expect("a source");
    assert!(
        cause.downcast_ref::<serde_json::Error>().is_some(),
        "{cause}"
    );
}

/// Providers, sites and images are refused deletion while something uses
/// them, with the same messages in every backend, and changed nothing.
async fn deletes_are_refused_while_something_uses_the_resource<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    s.create_provider(&provider("p")).await.unwrap();
    s.create_site(&site("s", "p")).await.unwrap();
    assert_eq!(
        s.create_site(&site("s", "p"))
            .await
            .unwrap_err()
            .to_string(),
        "site 's' already exists"
    );
    assert_eq!(
        s.delete_provider("id-p").await.unwrap_err().to_string(),
        "provider 'p' still has 1 site(s); delete them first"
    );
    s.create_token(&join_token("j", None)).await.unwrap();
    s.create_host(&host("h"), &host_token("h"), "j")
        .await
        .unwrap();
    assert_eq!(
        s.delete_site("site-s").await.unwrap_err().to_string(),
        "site 's' still has 1 host(s); delete them first"
    );
    s.create_image(&image("debian")).await.unwrap();
    s.create_image(&image("data")).await.unwrap();
    let mut v = vm("web");
    v.status.image_id = Some("img-debian".into());
    v.status.data_image_ids = vec![None, Some("img-data".into())];
    s.create_vm(&v, &["created"]).await.unwrap();
    assert_eq!(
        s.delete_image("img-debian").await.unwrap_err().to_string(),
        "image 'debian' is used by 1 VM(s)"
    );
    assert_eq!(
        s.delete_image("data").await.unwrap_err().to_string(),
        "image 'data' is the data disk of 1 VM(s)"
    );
    // Updates replace bodies; their ids must exist.
    let mut p = provider("p");
    p.labels.insert("tier".into(), "gold".into());
    s.update_provider(&p).await.unwrap();
    assert_eq!(s.get_provider("p").await.unwrap().labels.len(), 1);
    let e = s.update_site(&site("ghost", "p")).await.unwrap_err();
    assert_eq!(e.to_string(), "site 'site-ghost' not found");
    let e = s.update_image(&image("ghost")).await.unwrap_err();
    assert_eq!(e.to_string(), "image 'img-ghost' not found");
    // Once unused, each goes.
    v.status.phase = VmPhase::Deleted;
    s.update_vm(&v, Some("deleted")).await.unwrap();
    s.delete_image("debian").await.unwrap();
    s.delete_image("img-data").await.unwrap();
    assert_eq!(s.list_images().await.unwrap().len(), 0);
    s.delete_host("h").await.unwrap();
    s.delete_site("s").await.unwrap();
    s.delete_provider("p").await.unwrap();
    assert!(s.list_sites().await.unwrap().is_empty());
    assert!(s.list_providers().await.unwrap().is_empty());
    assert_eq!(
        s.delete_provider("p").await.unwrap_err().to_string(),
        "provider 'p' not found"
    );
}

/// A migration is stored with its VM in one transaction, one active per
/// VM; a refused one changes neither.
async fn migrations_are_one_active_per_vm_and_written_with_it<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    let mut v = vm("web");
    s.create_vm(&v, &["created"]).await.unwrap();
    let mut m = migration("m1", &v);
    v.labels.insert("moving".into(), "yes".into());
    s.create_migration(&m, &v, "migration m1").await.unwrap();
    assert_eq!(s.get_vm("web").await.unwrap().labels.len(), 1);
    let mut v2 = v.clone();
    v2.labels.insert("again".into(), "yes".into());
    let e = s
        .create_migration(&migration("m2", &v), &v2, "migration m2")
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "VM 'web' is already being migrated");
    assert_eq!(s.get_vm("web").await.unwrap().labels.len(), 1);
    assert_eq!(s.vm_events("vm-web").await.unwrap().len(), 2);
    // A migration of a VM that is not there is refused whole.
    let ghost = vm("ghost");
    let e = s
        .create_migration(&migration("m3", &ghost), &ghost, "x")
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NotFound { kind: "VM", .. }), "{e}");
    assert!(matches!(
        s.get_migration("m3").await.unwrap_err(),
        StoreError::NotFound {
            kind: "migration",
            ..
        }
    ));
    m.phase = MigrationPhase::Completed;
    v.status.host_id = Some("h2".into());
    s.update_migration(&m, Some(&v), Some("moved"))
        .await
        .unwrap();
    assert_eq!(
        s.get_migration("m1").await.unwrap().phase,
        MigrationPhase::Completed
    );
    assert_eq!(
        s.get_vm("web").await.unwrap().status.host_id.as_deref(),
        Some("h2")
    );
    assert!(s.list_migrations(None, true).await.unwrap().is_empty());
    // The next one may start; oldest first.
    s.create_migration(&migration("m2", &v), &v, "migration m2")
        .await
        .unwrap();
    let ids: Vec<String> = s
        .list_migrations(Some("vm-web"), false)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, ["m1", "m2"]);
    assert_eq!(s.list_migrations(None, true).await.unwrap().len(), 1);
    let e = s
        .update_migration(&migration("nope", &v), None, None)
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "migration 'nope' not found");
}

/// A user token's owner, scope, role and name come back as written; the
/// other kinds have no grant; revoking (deleting) one leaves the others.
async fn user_tokens_keep_their_grant_and_others_have_none<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    let user = |id: &str, scope: &str, role: &str| TokenRecord {
        kind: TokenKind::User,
        site: None,
        expires_at: Some(Utc::now() + chrono::Duration::days(30)),
        grant: Some(crate::TokenGrant {
            user: "ana".into(),
            scope: scope.into(),
            role: role.into(),
            name: format!("{id}-name"),
        }),
        ..join_token(id, None)
    };
    let a = user("u1", "project:shop", "member");
    let o = user("u2", "provider:p1", "operator");
    s.create_token(&a).await.unwrap();
    s.create_token(&o).await.unwrap();
    s.create_token(&join_token("j1", Some(1))).await.unwrap();
    let got = s.find_token("hash-u1").await.unwrap().unwrap();
    // Timestamps are kept to the microsecond.
    assert_eq!(got.grant, a.grant);
    assert_eq!(got.kind, TokenKind::User);
    assert!(got.expires_at.is_some());
    assert_eq!(s.find_token("hash-j1").await.unwrap().unwrap().grant, None);
    let listed: Vec<_> = s
        .list_tokens(TokenKind::User)
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.id, t.grant.map(|g| g.scope)))
        .collect();
    assert_eq!(
        listed,
        [
            ("u1".to_string(), Some("project:shop".to_string())),
            ("u2".to_string(), Some("provider:p1".to_string()))
        ]
    );
    assert!(s.delete_token(TokenKind::User, "u1").await.unwrap());
    assert!(s.find_token("hash-u1").await.unwrap().is_none());
    assert!(s.find_token("hash-u2").await.unwrap().is_some());
    // Purging join tokens leaves user tokens, expired or not.
    assert_eq!(
        s.purge_join_tokens(Utc::now() + chrono::Duration::days(60))
            .await
            .unwrap(),
        0
    );
    assert_eq!(s.count_tokens(TokenKind::User).await.unwrap(), 1);
}

/// The store's VM list filters by project; a row written before VMs had
/// a project (no `project` in its body) is the `default` project's.
async fn vm_list_filters_by_project_with_default_for_older_rows<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    for (name, project) in [("a1", "a"), ("b1", "b"), ("d1", "default")] {
        let mut v = vm(name);
        v.project = project.into();
        s.create_vm(&v, &[]).await.unwrap();
    }
    B::exec(
        &s,
        "UPDATE vms SET body = replace(body, '\"project\":\"default\",', '') WHERE name = 'd1'",
    )
    .await;
    let names = |p: &str| {
        let f = VmFilter {
            project: Some(p.into()),
            ..Default::default()
        };
        let s = &s;
        async move {
            s.list_vms(&f)
                .await
                .unwrap()
                .into_iter()
                .map(|v| v.name)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(names("a").await, ["a1"]);
    assert_eq!(names("b").await, ["b1"]);
    let d = s.get_vm("d1").await.unwrap();
    assert_eq!(d.project, "default", "the older row reads as default's");
    assert_eq!(names("default").await, ["d1"]);
    assert!(names("c").await.is_empty());
}
