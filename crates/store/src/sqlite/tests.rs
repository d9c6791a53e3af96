//! The SQLite backend's own tests: group commit, savepoints, query plans,
//! its upgrades. The rules every backend keeps are tested for both in
//! `crate::conformance`.

use rusqlite::{params, Connection};
use virt8ra_api::*;

use super::engine::{unguarded, upgrade_schema, upgrade_schema_to};
use super::rows::db;
use super::vms::GET_VM_SQL;
use super::SqliteStore;
use crate::conformance::vm;
use crate::error::StoreError;
use crate::records::VmFilter;
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

/// SQLite's side of `conformance::database_errors_keep_their_cause`:
/// rusqlite's error has a source of its own (SQLite's code), and the
/// chain has all of it; a failed commit fails every write of its batch
/// with the cause.
#[tokio::test]
async fn database_errors_keep_sqlites_whole_chain() {
    let s = SqliteStore::in_memory().unwrap();
    s.write(|c| c.execute_batch("DROP TABLE exports").map_err(db("test")))
        .await
        .unwrap();
    let e = s.get_export("x").await.unwrap_err();
    let cause = std::error::Error::source(&e).expect("a source");
    let sqlite = cause.downcast_ref::<rusqlite::Error>().expect("rusqlite's");
    assert!(
        sqlite.to_string().contains("no such table: exports"),
        "{sqlite}"
    );
    let chain = e.chain();
    assert!(
        chain.starts_with(&format!("database error: get_export: {sqlite}: ")),
        "{chain}"
    );
    let e = StoreError::db("commit", StoreError::db_failure("disk full"));
    assert_eq!(
        e.chain(),
        "database error: commit: database error: disk full"
    );
}
