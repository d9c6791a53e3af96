//! The PostgreSQL backend's own tests: its URL (parsed, redacted), its
//! connection errors, and its schema upgrades, whose history must be
//! SQLite's. The rules every backend keeps are tested for both in
//! `crate::conformance`.

use rusqlite::Connection;

use super::engine::{parse_url, redact_url, PgStore};
use crate::error::StoreError;
use crate::pgtest::PgCluster;
use crate::schema::UPGRADES;
use crate::store::Store;

#[test]
fn urls_are_shown_without_their_password() {
    for (url, shown) in [
        (
            "postgres://u:s3cret@db.example:5433/virt8ra",
            "postgres://u:***@db.example:5433/virt8ra",
        ),
        (
            "postgresql://u:p%40ss@h/d?sslmode=disable&password=s3cret",
            "postgresql://u:***@h/d?sslmode=disable&password=***",
        ),
        ("postgres://u@h/d", "postgres://u@h/d"),
        ("postgres://h", "postgres://h"),
        // An '@' in the password itself (not percent-encoded).
        ("postgres://u:a@b@h/d", "postgres://u:***@h/d"),
    ] {
        assert_eq!(redact_url(url), shown, "{url}");
    }
}

#[test]
fn bad_urls_are_refused_with_what_is_wrong_and_no_password() {
    for (url, want) in [
        ("mysql://u:s3cret@h/d", "is not a PostgreSQL URL"),
        ("/var/lib/virt8ra.db", "is not a PostgreSQL URL"),
        ("postgres://u:s3cret@h:notaport/d", "invalid database URL"),
        ("postgres://u:s3cret@/d", "names no host"),
    ] {
        let e = parse_url(url).unwrap_err();
        let chain = e.chain();
        assert!(chain.contains(want), "{url}: {chain}");
        assert!(!chain.contains("s3cret"), "{url}: {chain}");
    }
    let c = parse_url("postgresql://u:pw@localhost:6543/d").unwrap();
    assert_eq!(c.get_ports(), [6543]);
    assert_eq!(c.get_dbname(), Some("d"));
    assert_eq!(c.get_password(), Some(&b"pw"[..]));
}

#[tokio::test]
async fn an_unreachable_database_fails_at_once_without_the_password() {
    // Port 1 on loopback: nothing listens there.
    let Err(e) = PgStore::connect("postgres://virt8ra:s3cret@127.0.0.1:1/virt8ra").await else {
        panic!("connected to port 1");
    };
    let chain = e.chain();
    assert_eq!(
        chain,
        "database error: cannot connect to PostgreSQL at \
         postgres://virt8ra:***@127.0.0.1:1/virt8ra: Connection refused (os error 111)"
    );
    assert!(!chain.contains("s3cret"), "{chain}");
    // A database that does not exist on a server that does.
    let cluster = PgCluster::shared();
    let url = cluster.url("no_such_database");
    let Err(e) = PgStore::connect(&url).await else {
        panic!("connected to a missing database");
    };
    assert!(e.chain().contains("no_such_database"), "{}", e.chain());
}

/// The tables, columns and indexes a SQLite database has after its first
/// `upto` upgrades.
fn sqlite_schema(upto: usize) -> Vec<String> {
    let mut c = Connection::open_in_memory().unwrap();
    crate::sqlite::upgrade_schema_to(&mut c, upto).unwrap();
    let mut out = Vec::new();
    let tables: Vec<(String, String)> = c
        .prepare(
            "SELECT type, name FROM sqlite_master
             WHERE name NOT LIKE 'sqlite_%' AND type IN ('table', 'index')",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    for (kind, name) in tables {
        if kind == "index" {
            out.push(format!("index {name}"));
            continue;
        }
        out.push(format!("table {name}"));
        let cols: Vec<String> = c
            .prepare(&format!("SELECT name FROM pragma_table_info('{name}')"))
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        for col in cols {
            out.push(format!("column {name}.{col}"));
        }
    }
    out.sort();
    out
}

/// The same of a PostgreSQL database (without its record of upgrades, and
/// without the indexes PostgreSQL makes for PRIMARY KEY and UNIQUE, which
/// SQLite names `sqlite_autoindex_*`).
async fn postgres_schema(s: &PgStore) -> Vec<String> {
    let c = s.client().await.unwrap();
    let mut out = Vec::new();
    for r in c
        .query(
            "SELECT table_name::text, column_name::text FROM information_schema.columns
             WHERE table_schema = 'public' AND table_name <> 'schema_upgrades'",
            &[],
        )
        .await
        .unwrap()
    {
        let (t, col): (String, String) = (r.get(0), r.get(1));
        out.push(format!("column {t}.{col}"));
        out.push(format!("table {t}"));
    }
    for r in c
        .query(
            "SELECT indexname::text FROM pg_indexes
             WHERE schemaname = 'public' AND tablename <> 'schema_upgrades'
               AND indexname NOT LIKE '%\\_pkey' AND indexname NOT LIKE '%\\_key'",
            &[],
        )
        .await
        .unwrap()
    {
        out.push(format!("index {}", r.get::<_, String>(0)));
    }
    out.sort();
    out.dedup();
    out
}

/// Upgrade N is the same change in both backends: after each number of
/// upgrades, the two databases have the same tables, columns and indexes,
/// and PostgreSQL's record names each upgrade applied.
#[tokio::test]
async fn each_upgrade_makes_the_same_schema_as_sqlites() {
    let cluster = PgCluster::shared();
    for upto in 0..=UPGRADES.len() {
        let s = PgStore::connect_upto(&cluster.create_database(), upto)
            .await
            .unwrap();
        assert_eq!(s.schema_version().await.unwrap(), upto as u32);
        assert_eq!(
            postgres_schema(&s).await,
            sqlite_schema(upto),
            "after upgrade {upto}"
        );
    }
    let s = PgStore::connect(&cluster.create_database()).await.unwrap();
    let c = s.client().await.unwrap();
    let names: Vec<String> = c
        .query("SELECT name FROM schema_upgrades ORDER BY number", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let want: Vec<&str> = UPGRADES.iter().map(|u| u.name).collect();
    assert_eq!(names, want);
}

/// A database of an older build is upgraded on open and keeps its rows; a
/// database of a newer build is refused, and left as it was.
#[tokio::test]
async fn older_databases_are_upgraded_and_newer_ones_refused() {
    let url = PgCluster::shared().create_database();
    {
        let s = PgStore::connect_upto(&url, UPGRADES.len() - 1)
            .await
            .unwrap();
        s.client()
            .await
            .unwrap()
            .batch_execute(
                "INSERT INTO vm_events (vm_id, seq, at, phase, message)
                 VALUES ('a', 1, '2026-12-04T00:00:00.000000Z', 'running', 'a1')",
            )
            .await
            .unwrap();
    }
    let s = PgStore::connect(&url).await.unwrap();
    assert_eq!(s.schema_version().await.unwrap(), UPGRADES.len() as u32);
    let ev = s.vm_events("a").await.unwrap();
    assert_eq!(ev[0].message, "a1");
    let next = UPGRADES.len() as i32 + 1;
    s.client()
        .await
        .unwrap()
        .execute(
            "INSERT INTO schema_upgrades (number, name) VALUES ($1, 'from the future')",
            &[&next],
        )
        .await
        .unwrap();
    let Err(e) = PgStore::connect(&url).await else {
        panic!("a newer database was opened");
    };
    assert_eq!(
        e.to_string(),
        format!(
            "database error: database schema version {next} is newer than this build \
             understands ({}); run a newer virt8ra",
            UPGRADES.len()
        )
    );
    assert!(matches!(e, StoreError::Db { .. }));
    assert_eq!(s.schema_version().await.unwrap(), next as u32);
}

/// Control planes starting on one new database at once: one upgrades it,
/// the others wait and find it done.
#[tokio::test]
async fn concurrent_opens_upgrade_once() {
    let url = PgCluster::shared().create_database();
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PgStore::connect(&url).await })
        })
        .collect();
    for o in opens {
        let s = o.await.unwrap().unwrap();
        assert_eq!(s.schema_version().await.unwrap(), UPGRADES.len() as u32);
    }
    let s = PgStore::connect(&url).await.unwrap();
    let n: i64 = s
        .client()
        .await
        .unwrap()
        .query_one("SELECT COUNT(*) FROM schema_upgrades", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, UPGRADES.len() as i64);
    s.create_provider(&crate::conformance::provider("p"))
        .await
        .unwrap();
}
