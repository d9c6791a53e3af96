//! The embedded SQLite backend.
//!
//! Writes go to one writer thread that commits everything queued at the same
//! time in one transaction (group commit), each write in its own savepoint
//! (the VM writes, the hot path, without one: see [`unguarded`]), and
//! answers each write only after that commit is on disk (WAL,
//! `synchronous=FULL`): many concurrent writes share one fsync, and none is
//! acknowledged before it is durable. Reads use a second connection, which
//! WAL lets read while the writer writes.

use std::cell::Cell;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use serde::de::DeserializeOwned;
use serde::Serialize;
use virt8ra_api::{Host, Image, Migration, Provider, Site, Vm, VmEvent, VmExport, VmPhase};

use crate::migrations::MIGRATIONS;
use crate::{Result, Store, StoreError, TokenKind, TokenRecord, VmFilter};

/// A write job: runs inside the writer's batch transaction and returns a
/// finisher that delivers its result once the batch's commit is known.
type Job = Box<dyn FnOnce(&mut Connection) -> Box<dyn FnOnce(Result<()>) + Send> + Send>;

/// Most write jobs committed in one transaction.
const MAX_BATCH: usize = 512;

thread_local! {
    /// Set on the writer thread by a job run without a savepoint
    /// ([`unguarded`]) that failed after it had changed rows: its changes
    /// cannot be undone alone, so the writer rolls back the whole batch.
    static PARTIAL_JOB: Cell<bool> = const { Cell::new(false) };
}

#[derive(Clone)]
pub struct SqliteStore {
    /// Queue of the writer thread (group commit).
    writer: std::sync::mpsc::Sender<Job>,
    /// Connections for reads (WAL lets them read while the writer writes),
    /// used in turn; empty for in-memory databases, whose reads go through
    /// the writer.
    readers: Arc<Vec<Mutex<Connection>>>,
    next_reader: Arc<std::sync::atomic::AtomicUsize>,
    /// Dropped with the last clone of the store, which ends the
    /// checkpointer thread.
    _checkpointer: Option<Arc<std::sync::mpsc::Sender<()>>>,
}

/// Read connections per store.
const READERS: usize = 4;

/// The writer connection's page cache. Small on purpose: while the
/// database is under 1 GiB, SQLite scans the whole cache at the end of each
/// transaction in which a b-tree balance renamed a page (to the number past
/// the 1 GiB lock page; `pcache1TruncateUnsafe`), which was 7% of the
/// control plane's CPU with 64 MiB. The pages missed instead come from the
/// OS's page cache. 16 MiB against 64 MiB, 1,000,000 VMs, alternating runs:
/// 3% less CPU per VM created (BENCHMARKS.md).
const WRITER_CACHE_KIB: i64 = 16 * 1024;

/// How often the checkpointer copies the WAL back into the database.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// WAL frames (pages of 4 KiB) past which the checkpointer makes SQLite
/// start the WAL over: 64 MiB.
const WAL_RESTART_FRAMES: i64 = 16 * 1024;

/// The WAL's size once it starts over (`journal_size_limit`): its disk
/// space is kept between restarts, up to this much.
const WAL_KEEP_BYTES: i64 = 512 * 1024 * 1024;

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Db(e.to_string())
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Db(format!("encode: {e}")))
}

fn from_json<T: DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Db(format!("corrupt row: {e}")))
}

fn configure(conn: &Connection) -> Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(db)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(db)?;
    conn.pragma_update(None, "foreign_keys", "ON").map_err(db)?;
    // Cut the WAL back to this size when it starts over. Under a sustained
    // write load it grows to a few hundred MiB between restarts (measured:
    // 75 MiB/s at 5,500 VM creates/s, up to 470 MiB), and every write past
    // the cut lands in a block the filesystem must allocate and zero first
    // (ext4: 3.5% of the control plane's CPU at 64 MiB); a file that keeps
    // its blocks is overwritten in place.
    conn.pragma_update(None, "journal_size_limit", WAL_KEEP_BYTES)
        .map_err(db)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))
        .map_err(db)?;
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let mut conn = Connection::open(path).map_err(db)?;
        configure(&conn)?;
        // The writer's page cache holds the hot part of the tables (with
        // time-ordered ids, the recent end); checkpoints run on their own
        // thread, not inside the writer's commits.
        conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)
            .map_err(db)?;
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(db)?;
        migrate(&mut conn)?;
        let mut readers = Vec::new();
        for _ in 0..READERS {
            let r = Connection::open(path).map_err(db)?;
            configure(&r)?;
            readers.push(r);
        }
        let ckpt = Connection::open(path).map_err(db)?;
        configure(&ckpt)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("virt8ra-store-checkpoint".into())
            .spawn(move || checkpointer(ckpt, stopped))
            .map_err(|e| StoreError::Db(format!("cannot start the checkpoint thread: {e}")))?;
        Self::start(conn, readers, Some(Arc::new(stop)))
    }

    /// A private in-memory database, for tests.
    pub fn in_memory() -> Result<SqliteStore> {
        let mut conn = Connection::open_in_memory().map_err(db)?;
        configure(&conn)?;
        migrate(&mut conn)?;
        Self::start(conn, Vec::new(), None)
    }

    fn start(
        conn: Connection,
        readers: Vec<Connection>,
        checkpointer: Option<Arc<std::sync::mpsc::Sender<()>>>,
    ) -> Result<SqliteStore> {
        // Room for every statement the writer runs (the VM update alone has
        // eight forms), so that none is parsed again.
        conn.set_prepared_statement_cache_capacity(64);
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("virt8ra-store-writer".into())
            .spawn(move || writer(conn, rx))
            .map_err(|e| StoreError::Db(format!("cannot start the writer thread: {e}")))?;
        Ok(SqliteStore {
            writer: tx,
            readers: Arc::new(readers.into_iter().map(Mutex::new).collect()),
            next_reader: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            _checkpointer: checkpointer,
        })
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<u32> {
        let (tx, rx) = std::sync::mpsc::channel();
        let job: Job = Box::new(move |c: &mut Connection| {
            let r: Result<u32> = c
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .map_err(db);
            Box::new(move |_commit: Result<()>| {
                let _ = tx.send(r);
            })
        });
        self.writer
            .send(job)
            .map_err(|_| StoreError::Db("the store's writer has stopped".into()))?;
        rx.recv()
            .map_err(|_| StoreError::Db("the store's writer has stopped".into()))?
    }

    /// Runs a write on the writer thread. It is committed together with the
    /// other writes queued at the same time (group commit), and its result is
    /// delivered only once that commit is durable.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<T>>();
        let job: Job = Box::new(move |c: &mut Connection| {
            let r = f(c);
            Box::new(move |commit: Result<()>| {
                let out = match (commit, r) {
                    (Ok(()), r) => r,
                    (Err(e), _) => Err(e),
                };
                let _ = tx.send(out);
            })
        });
        self.writer
            .send(job)
            .map_err(|_| StoreError::Db("the store's writer has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Db("the store's writer has stopped".into()))?
    }

    /// Runs a read on the reader connection (a blocking thread).
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        if self.readers.is_empty() {
            return self.write(f).await;
        }
        let readers = self.readers.clone();
        let i = self
            .next_reader
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % readers.len();
        tokio::task::spawn_blocking(move || {
            let mut guard = readers[i]
                .lock()
                .map_err(|_| StoreError::Db("database lock poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Db(format!("store task failed: {e}")))?
    }
}

/// The writer thread: takes every job queued, runs them in one transaction
/// (each job inside its own savepoint, so one job's failure undoes only that
/// job, except the VM writes: see [`unguarded`]), commits once, then answers
/// them all.
fn writer(mut conn: Connection, rx: std::sync::mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let begun = exec_cached(&conn, "BEGIN IMMEDIATE");
        if let Err(e) = begun {
            for job in batch {
                let finish = job(&mut conn);
                finish(Err(StoreError::Db(format!("begin: {e}"))));
            }
            continue;
        }
        PARTIAL_JOB.with(|p| p.set(false));
        let finishers: Vec<_> = batch.into_iter().map(|job| job(&mut conn)).collect();
        let commit = if PARTIAL_JOB.with(|p| p.replace(false)) {
            Err(StoreError::Db(
                "a write of this batch failed after changing rows; the batch was rolled back"
                    .into(),
            ))
        } else {
            exec_cached(&conn, "COMMIT")
        };
        if commit.is_err() {
            let _ = exec_cached(&conn, "ROLLBACK");
        }
        for f in finishers {
            f(match &commit {
                Ok(()) => Ok(()),
                Err(e) => Err(StoreError::Db(format!("commit: {e}"))),
            });
        }
    }
}

/// The checkpointer thread. Every second it copies what the WAL holds back
/// into the database file in PASSIVE mode, which never blocks the writer or
/// readers. Under continuous writes a passive checkpoint never catches up
/// with the end of the WAL, and SQLite starts the WAL over only after a
/// checkpoint covered all of it, so once the WAL passes
/// [`WAL_RESTART_FRAMES`] a RESTART checkpoint holds the writer back for the
/// little the passive rounds left and lets the next write start the WAL
/// over (the file is then cut to `journal_size_limit`). SQLite's automatic
/// checkpoint would do all of this work inside a commit on the writer
/// thread, stalling every write queued behind it. Ends when the store is
/// dropped (its end of `stop` goes away).
fn checkpointer(conn: Connection, stop: std::sync::mpsc::Receiver<()>) {
    use std::sync::mpsc::RecvTimeoutError;
    // `wal_checkpoint` answers (busy, frames in the WAL, frames copied).
    let checkpoint = |mode: &str| {
        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
            r.get::<_, i64>(1)
        })
    };
    loop {
        match stop.recv_timeout(CHECKPOINT_EVERY) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let mut r = checkpoint("PASSIVE");
        if matches!(r, Ok(frames) if frames > WAL_RESTART_FRAMES) {
            // The RESTART holds the writer back while it copies what the
            // passive round left: the frames written while that round ran
            // (a round copies up to the end of the WAL as of its start), tens
            // of ms of stall at 5,000 VM creates a second. Two more passive
            // rounds first, each copying what arrived during the one before
            // and so shorter than it, leave the RESTART little to copy.
            for _ in 0..2 {
                r = checkpoint("PASSIVE");
            }
            if r.is_ok() {
                r = checkpoint("RESTART");
            }
        }
        if let Err(e) = r {
            tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
        }
    }
}

/// A VM by id or by name; a live VM's name wins over a deleted one's.
const GET_VM_SQL: &str =
    "SELECT body FROM vms WHERE id = ?1 OR name = ?1 ORDER BY (phase = 'deleted') LIMIT 1";

fn migrate(conn: &mut Connection) -> Result<()> {
    migrate_to(conn, MIGRATIONS.len())
}

/// Applies the migrations a database lacks up to the first `upto` of them.
fn migrate_to(conn: &mut Connection, upto: usize) -> Result<()> {
    let current: u32 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(db)?;
    let latest = MIGRATIONS.len() as u32;
    if current > latest {
        return Err(StoreError::Db(format!(
            "database schema version {current} is newer than this build understands ({latest}); \
             run a newer virt8ra"
        )));
    }
    for (i, (_name, sql)) in MIGRATIONS
        .iter()
        .enumerate()
        .take(upto)
        .skip(current as usize)
    {
        let tx = conn.transaction().map_err(db)?;
        tx.execute_batch(sql).map_err(db)?;
        tx.pragma_update(None, "user_version", (i + 1) as u32)
            .map_err(db)?;
        tx.commit().map_err(db)?;
    }
    Ok(())
}

/// Finds a row by id or by name.
fn get_body<T: DeserializeOwned>(
    conn: &Connection,
    table: &str,
    kind: &'static str,
    key: &str,
) -> Result<T> {
    let sql = format!("SELECT body FROM {table} WHERE id = ?1 OR name = ?1 LIMIT 1");
    let body: Option<String> = conn
        .query_row(&sql, [key], |r| r.get(0))
        .optional()
        .map_err(db)?;
    match body {
        Some(b) => from_json(&b),
        None => Err(StoreError::not_found(kind, key)),
    }
}

fn list_bodies<T: DeserializeOwned>(conn: &Connection, table: &str) -> Result<Vec<T>> {
    let sql = format!("SELECT body FROM {table} ORDER BY name");
    let mut st = conn.prepare(&sql).map_err(db)?;
    let rows = st.query_map([], |r| r.get::<_, String>(0)).map_err(db)?;
    let mut out = Vec::new();
    for r in rows {
        out.push(from_json(&r.map_err(db)?)?);
    }
    Ok(out)
}

fn delete_row(conn: &Connection, table: &str, kind: &'static str, id: &str) -> Result<()> {
    let n = conn
        .execute(&format!("DELETE FROM {table} WHERE id = ?1"), [id])
        .map_err(db)?;
    if n == 0 {
        return Err(StoreError::not_found(kind, id));
    }
    Ok(())
}

fn conflict_or_db(e: rusqlite::Error, what: impl FnOnce() -> String) -> StoreError {
    if is_unique_violation(&e) {
        StoreError::Conflict(what())
    } else {
        db(e)
    }
}

fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn parse_ts(s: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Db(format!("corrupt timestamp {s:?}: {e}")))
}

/// Replaces a VM row (`body` is its JSON), and appends an event when given.
/// Runs one parameterless statement through the statement cache.
fn exec_cached(c: &Connection, sql: &str) -> Result<()> {
    c.prepare_cached(sql).map_err(db)?.execute([]).map_err(db)?;
    Ok(())
}

/// Runs `f` inside a savepoint of its own, so that a failing job of a
/// group commit undoes only its own changes. The savepoint statements are
/// cached (rusqlite's `Connection::savepoint` parses them on every call,
/// twice per write).
fn atomic<T>(c: &mut Connection, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
    exec_cached(c, "SAVEPOINT job")?;
    match f(c) {
        Ok(v) => {
            exec_cached(c, "RELEASE job")?;
            Ok(v)
        }
        Err(e) => {
            // Undo and end the savepoint. As with rusqlite's own savepoint,
            // a failure here is ignored: it means the connection itself is
            // broken, and then the batch's commit fails too.
            let _ = exec_cached(c, "ROLLBACK TO job");
            let _ = exec_cached(c, "RELEASE job");
            Err(e)
        }
    }
}

/// Runs `f` without a savepoint, for the writes of every VM change (the hot
/// path): a savepoint copies each page a job changes into its
/// sub-journal, and a batch's jobs change the same few pages (the end of
/// the VM table and of the event log), so each job copied them again. The
/// failures these jobs expect (a name taken, a VM gone) come before their
/// first change and leave nothing to undo; any other failure after a change
/// rolls back the whole batch (every write in it fails, as when its commit
/// fails), never leaving half of a job committed.
fn unguarded<T>(c: &mut Connection, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
    let before = c.total_changes();
    let r = f(c);
    if r.is_err() && c.total_changes() != before {
        PARTIAL_JOB.with(|p| p.set(true));
    }
    r
}

fn write_vm(tx: &Connection, vm: &Vm, body: &str, event: Option<&str>) -> Result<()> {
    // An UPDATE that names an indexed column rewrites that column's index
    // entry even when the value is the same: setting phase (in the partial
    // name index's condition) or image_id on every write dirtied another
    // index page per write. So those two are set only when they changed.
    let old: Option<(String, Option<String>)> = tx
        .prepare_cached("SELECT phase, image_id FROM vms WHERE id = ?1")
        .map_err(db)?
        .query_row([&vm.id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(db)?;
    let Some((phase, image_id)) = old else {
        return Err(StoreError::not_found("VM", vm.id.clone()));
    };
    let mut sql = String::from(
        "UPDATE vms SET host_id = ?2, site = ?3, provider = ?4, country = ?5, body = ?6",
    );
    if phase != vm.status.phase.as_str() {
        sql.push_str(", phase = ?7");
    }
    if image_id != vm.status.image_id {
        sql.push_str(", image_id = ?8");
    }
    sql.push_str(" WHERE id = ?1");
    let mut stmt = tx.prepare_cached(&sql).map_err(db)?;
    let values: [&dyn rusqlite::ToSql; 8] = [
        &vm.id,
        &vm.status.host_id,
        &vm.status.site,
        &vm.status.provider,
        &vm.status.country,
        &body,
        &vm.status.phase.as_str(),
        &vm.status.image_id,
    ];
    // Numbered parameters may leave gaps; the count is the largest used.
    for (i, v) in values.iter().enumerate().take(stmt.parameter_count()) {
        stmt.raw_bind_parameter(i + 1, v).map_err(db)?;
    }
    stmt.raw_execute().map_err(db)?;
    if let Some(e) = event {
        insert_event(tx, vm, e)?;
    }
    Ok(())
}

fn insert_event(conn: &Connection, vm: &Vm, message: &str) -> Result<()> {
    // Cached statements: these run for every VM change.
    let seq: i64 = conn
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) + 1 FROM vm_events WHERE vm_id = ?1")
        .map_err(db)?
        .query_row([&vm.id], |r| r.get(0))
        .map_err(db)?;
    insert_event_at(conn, vm, seq, message)
}

/// Inserts event number `seq` of `vm`. A VM just inserted has no events
/// yet (its id is new: the insert of its row would have failed otherwise),
/// so its events are numbered from 1 without looking.
fn insert_event_at(conn: &Connection, vm: &Vm, seq: i64, message: &str) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO vm_events (vm_id, seq, at, phase, message) VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .map_err(db)?
    .execute(params![
        vm.id,
        seq,
        ts(&Utc::now()),
        vm.status.phase.as_str(),
        message
    ])
    .map_err(db)?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_provider(&self, p: &Provider) -> Result<()> {
        let p = p.clone();
        self.write(move |c| {
            c.execute(
                "INSERT INTO providers (id, name, body) VALUES (?1, ?2, ?3)",
                params![p.id, p.name, to_json(&p)?],
            )
            .map_err(|e| conflict_or_db(e, || format!("provider '{}' already exists", p.name)))?;
            Ok(())
        })
        .await
    }

    async fn list_providers(&self) -> Result<Vec<Provider>> {
        self.read(|c| list_bodies(c, "providers")).await
    }

    async fn get_provider(&self, key: &str) -> Result<Provider> {
        let key = key.to_string();
        self.read(move |c| get_body(c, "providers", "provider", &key))
            .await
    }

    async fn delete_provider(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.write(move |c| {
            atomic(c, |tx| {
                let p: Provider = get_body(tx, "providers", "provider", &id)?;
                let n: i64 = tx
                    .query_row(
                        "SELECT COUNT(*) FROM sites WHERE provider = ?1",
                        [&p.name],
                        |r| r.get(0),
                    )
                    .map_err(db)?;
                if n > 0 {
                    return Err(StoreError::Conflict(format!(
                        "provider '{}' still has {n} site(s); delete them first",
                        p.name
                    )));
                }
                delete_row(tx, "providers", "provider", &p.id)?;
                Ok(())
            })
        })
        .await
    }

    async fn update_provider(&self, p: &Provider) -> Result<()> {
        let p = p.clone();
        self.write(move |c| {
            let n = c
                .execute(
                    "UPDATE providers SET body = ?2 WHERE id = ?1",
                    params![p.id, to_json(&p)?],
                )
                .map_err(db)?;
            if n == 0 {
                return Err(StoreError::not_found("provider", p.id));
            }
            Ok(())
        })
        .await
    }

    async fn create_site(&self, s: &Site) -> Result<()> {
        let s = s.clone();
        self.write(move |c| {
            c.execute(
                "INSERT INTO sites (id, name, provider, body) VALUES (?1, ?2, ?3, ?4)",
                params![s.id, s.name, s.provider, to_json(&s)?],
            )
            .map_err(|e| conflict_or_db(e, || format!("site '{}' already exists", s.name)))?;
            Ok(())
        })
        .await
    }

    async fn list_sites(&self) -> Result<Vec<Site>> {
        self.read(|c| list_bodies(c, "sites")).await
    }

    async fn get_site(&self, key: &str) -> Result<Site> {
        let key = key.to_string();
        self.read(move |c| get_body(c, "sites", "site", &key)).await
    }

    async fn delete_site(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.write(move |c| {
            atomic(c, |tx| {
                let s: Site = get_body(tx, "sites", "site", &id)?;
                let n: i64 = tx
                    .query_row(
                        "SELECT COUNT(*) FROM hosts WHERE site = ?1",
                        [&s.name],
                        |r| r.get(0),
                    )
                    .map_err(db)?;
                if n > 0 {
                    return Err(StoreError::Conflict(format!(
                        "site '{}' still has {n} host(s); delete them first",
                        s.name
                    )));
                }
                delete_row(tx, "sites", "site", &s.id)?;
                Ok(())
            })
        })
        .await
    }

    async fn update_site(&self, s: &Site) -> Result<()> {
        let s = s.clone();
        self.write(move |c| {
            let n = c
                .execute(
                    "UPDATE sites SET body = ?2 WHERE id = ?1",
                    params![s.id, to_json(&s)?],
                )
                .map_err(db)?;
            if n == 0 {
                return Err(StoreError::not_found("site", s.id));
            }
            Ok(())
        })
        .await
    }

    async fn create_host(
        &self,
        h: &Host,
        host_token: &TokenRecord,
        join_token_id: &str,
    ) -> Result<()> {
        let h = h.clone();
        let t = host_token.clone();
        let join_id = join_token_id.to_string();
        self.write(move |c| {
            atomic(c, |tx| {
                let left: Option<Option<i64>> = tx
                    .query_row(
                        "SELECT uses_left FROM tokens WHERE id = ?1 AND kind = 'join'",
                        [&join_id],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(db)?;
                // A used-up token is deleted with its last use, so a
                // missing one is (most likely) used up too.
                match left {
                    None | Some(Some(i64::MIN..=0)) => {
                        return Err(StoreError::Conflict(
                            "join token is used up, expired or revoked".into(),
                        ))
                    }
                    Some(Some(1)) => {
                        tx.execute("DELETE FROM tokens WHERE id = ?1", [&join_id])
                            .map_err(db)?;
                    }
                    Some(Some(_)) => {
                        tx.execute(
                            "UPDATE tokens SET uses_left = uses_left - 1 WHERE id = ?1",
                            [&join_id],
                        )
                        .map_err(db)?;
                    }
                    Some(None) => {}
                }
                tx.execute(
                    "INSERT INTO hosts (id, name, site, body) VALUES (?1, ?2, ?3, ?4)",
                    params![h.id, h.name, h.site, to_json(&h)?],
                )
                .map_err(|e| conflict_or_db(e, || format!("host '{}' already exists", h.name)))?;
                insert_token(tx, &t)?;
                Ok(())
            })
        })
        .await
    }

    async fn update_host(&self, h: &Host) -> Result<()> {
        // Encoded here, not on the writer thread; a cached statement, since
        // hosts' snapshots and state changes come at thousands a second.
        let (id, body) = (h.id.clone(), to_json(h)?);
        self.write(move |c| {
            let n = c
                .prepare_cached("UPDATE hosts SET body = ?2 WHERE id = ?1")
                .map_err(db)?
                .execute(params![id, body])
                .map_err(db)?;
            if n == 0 {
                return Err(StoreError::not_found("host", id));
            }
            Ok(())
        })
        .await
    }

    async fn list_hosts(&self) -> Result<Vec<Host>> {
        self.read(|c| list_bodies(c, "hosts")).await
    }

    async fn get_host(&self, key: &str) -> Result<Host> {
        let key = key.to_string();
        self.read(move |c| get_body(c, "hosts", "host", &key)).await
    }

    async fn delete_host(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.write(move |c| {
            atomic(c, |tx| {
                let h: Host = get_body(tx, "hosts", "host", &id)?;
                delete_row(tx, "hosts", "host", &h.id)?;
                tx.execute("DELETE FROM tokens WHERE host_id = ?1", [&h.id])
                    .map_err(db)?;
                Ok(())
            })
        })
        .await
    }

    async fn create_image(&self, i: &Image) -> Result<()> {
        let i = i.clone();
        self.write(move |c| {
            c.execute(
                "INSERT INTO images (id, name, sha256, body) VALUES (?1, ?2, ?3, ?4)",
                params![i.id, i.name, i.sha256, to_json(&i)?],
            )
            .map_err(|e| conflict_or_db(e, || format!("image '{}' already exists", i.name)))?;
            Ok(())
        })
        .await
    }

    async fn list_images(&self) -> Result<Vec<Image>> {
        self.read(|c| list_bodies(c, "images")).await
    }

    async fn get_image(&self, key: &str) -> Result<Image> {
        let key = key.to_string();
        self.read(move |c| get_body(c, "images", "image", &key))
            .await
    }

    async fn delete_image(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.write(move |c| {
            atomic(c, |tx| {
                let i: Image = get_body(tx, "images", "image", &id)?;
                let n: i64 = tx
                    .query_row(
                        "SELECT COUNT(*) FROM vms WHERE image_id = ?1 AND phase <> 'deleted'",
                        [&i.id],
                        |r| r.get(0),
                    )
                    .map_err(db)?;
                if n > 0 {
                    return Err(StoreError::Conflict(format!(
                        "image '{}' is used by {n} VM(s)",
                        i.name
                    )));
                }
                // Data disks name their images only in the body: a scan (an
                // image is deleted rarely), narrowed by a plain substring test
                // before the JSON is parsed.
                let n: i64 = tx
                    .query_row(
                        "SELECT COUNT(*) FROM vms WHERE phase <> 'deleted' AND instr(body, ?1) > 0
                     AND EXISTS (SELECT 1 FROM json_each(body, '$.status.data_image_ids')
                                 WHERE value = ?1)",
                        [&i.id],
                        |r| r.get(0),
                    )
                    .map_err(db)?;
                if n > 0 {
                    return Err(StoreError::Conflict(format!(
                        "image '{}' is the data disk of {n} VM(s)",
                        i.name
                    )));
                }
                delete_row(tx, "images", "image", &i.id)?;
                Ok(())
            })
        })
        .await
    }

    async fn update_image(&self, i: &Image) -> Result<()> {
        let i = i.clone();
        self.write(move |c| {
            let n = c
                .execute(
                    "UPDATE images SET body = ?2 WHERE id = ?1",
                    params![i.id, to_json(&i)?],
                )
                .map_err(db)?;
            if n == 0 {
                return Err(StoreError::not_found("image", &i.id));
            }
            Ok(())
        })
        .await
    }

    async fn create_vm(&self, vm: &Vm, events: &[&str]) -> Result<()> {
        // Encoded here, not on the writer thread, which every write shares.
        let body = to_json(vm)?;
        let vm = vm.clone();
        let events: Vec<String> = events.iter().map(|e| e.to_string()).collect();
        self.write(move |c| {
            unguarded(c, |tx| {
                tx.prepare_cached(
                    "INSERT INTO vms (id, name, phase, host_id, site, provider, country, image_id, body)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(db)?
                .execute(params![
                    vm.id,
                    vm.name,
                    vm.status.phase.as_str(),
                    vm.status.host_id,
                    vm.status.site,
                    vm.status.provider,
                    vm.status.country,
                    vm.status.image_id,
                    body
                ])
                .map_err(|e| conflict_or_db(e, || format!("VM '{}' already exists", vm.name)))?;
                for (seq, e) in (1..).zip(&events) {
                    insert_event_at(tx, &vm, seq, e)?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn update_vm(&self, vm: &Vm, event: Option<&str>) -> Result<()> {
        let body = to_json(vm)?;
        let vm = vm.clone();
        let event = event.map(str::to_string);
        self.write(move |c| {
            unguarded(c, |tx| {
                write_vm(tx, &vm, &body, event.as_deref())?;
                Ok(())
            })
        })
        .await
    }

    async fn create_migration(&self, m: &Migration, vm: &Vm, event: &str) -> Result<()> {
        let (m, vm, event) = (m.clone(), vm.clone(), event.to_string());
        let body = to_json(&vm)?;
        self.write(move |c| {
            atomic(c, |tx| {
            tx.execute(
                "INSERT INTO migrations (id, vm_id, phase, created_at, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![m.id, m.vm_id, m.phase.as_str(), ts(&m.created_at), to_json(&m)?],
            )
            .map_err(|e| {
                conflict_or_db(e, || format!("VM '{}' is already being migrated", m.vm))
            })?;
            write_vm(tx, &vm, &body, Some(&event))?;
            Ok(())
            })
        })
        .await
    }

    async fn update_migration(
        &self,
        m: &Migration,
        vm: Option<&Vm>,
        event: Option<&str>,
    ) -> Result<()> {
        let (m, vm, event) = (m.clone(), vm.cloned(), event.map(str::to_string));
        let body = vm.as_ref().map(to_json).transpose()?;
        self.write(move |c| {
            atomic(c, |tx| {
                let n = tx
                    .execute(
                        "UPDATE migrations SET phase = ?2, body = ?3 WHERE id = ?1",
                        params![m.id, m.phase.as_str(), to_json(&m)?],
                    )
                    .map_err(db)?;
                if n == 0 {
                    return Err(StoreError::not_found("migration", m.id));
                }
                if let (Some(vm), Some(body)) = (vm, body) {
                    write_vm(tx, &vm, &body, event.as_deref())?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn get_migration(&self, id: &str) -> Result<Migration> {
        let id = id.to_string();
        self.read(move |c| {
            let body: Option<String> = c
                .query_row("SELECT body FROM migrations WHERE id = ?1", [&id], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(db)?;
            match body {
                Some(b) => from_json(&b),
                None => Err(StoreError::not_found("migration", id)),
            }
        })
        .await
    }

    async fn list_migrations(&self, vm_id: Option<&str>, active: bool) -> Result<Vec<Migration>> {
        let vm_id = vm_id.map(str::to_string);
        self.read(move |c| {
            let mut sql = String::from("SELECT body FROM migrations WHERE 1=1");
            if vm_id.is_some() {
                sql.push_str(" AND vm_id = ?1");
            }
            if active {
                sql.push_str(" AND phase NOT IN ('completed', 'failed')");
            }
            sql.push_str(" ORDER BY created_at, id");
            let mut st = c.prepare(&sql).map_err(db)?;
            let mut rows = match &vm_id {
                Some(v) => st.query([v]),
                None => st.query([]),
            }
            .map_err(db)?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(db)? {
                out.push(from_json(&r.get::<_, String>(0).map_err(db)?)?);
            }
            Ok(out)
        })
        .await
    }

    async fn put_export(&self, e: &VmExport) -> Result<()> {
        let e = e.clone();
        self.write(move |c| {
            c.execute(
                "INSERT INTO exports (id, vm_id, body) VALUES (?1, ?2, ?3)
                 ON CONFLICT(id) DO UPDATE SET body = excluded.body",
                params![e.id, e.vm_id, to_json(&e)?],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn get_export(&self, id: &str) -> Result<VmExport> {
        let id = id.to_string();
        self.read(move |c| {
            let body: Option<String> = c
                .query_row("SELECT body FROM exports WHERE id = ?1", [&id], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(db)?;
            match body {
                Some(b) => from_json(&b),
                None => Err(StoreError::not_found("export", id)),
            }
        })
        .await
    }

    async fn get_vm(&self, key: &str) -> Result<Vm> {
        let key = key.to_string();
        self.read(move |c| {
            // A live VM's name wins over a deleted one's.
            let body: Option<String> = c
                .query_row(GET_VM_SQL, [&key], |r| r.get(0))
                .optional()
                .map_err(db)?;
            match body {
                Some(b) => from_json(&b),
                None => Err(StoreError::not_found("VM", key)),
            }
        })
        .await
    }

    async fn list_vms(&self, f: &VmFilter) -> Result<Vec<Vm>> {
        let f = f.clone();
        self.read(move |c| {
            let mut sql = String::from("SELECT body FROM vms WHERE 1=1");
            let mut args: Vec<String> = Vec::new();
            let mut add = |col: &str, v: &Option<String>, sql: &mut String| {
                if let Some(v) = v {
                    args.push(v.clone());
                    sql.push_str(&format!(" AND {col} = ?{}", args.len()));
                }
            };
            add("host_id", &f.host_id, &mut sql);
            add("site", &f.site, &mut sql);
            add("provider", &f.provider, &mut sql);
            add("country", &f.country, &mut sql);
            add("phase", &f.phase.map(|p| p.as_str().to_string()), &mut sql);
            if let Some(after) = &f.after_id {
                args.push(after.clone());
                sql.push_str(&format!(" AND id > ?{}", args.len()));
            }
            if !f.include_deleted && f.phase != Some(VmPhase::Deleted) {
                sql.push_str(" AND phase <> 'deleted'");
            }
            sql.push_str(" ORDER BY id");
            if let Some(l) = f.limit {
                sql.push_str(&format!(" LIMIT {l}"));
            }
            let mut st = c.prepare(&sql).map_err(db)?;
            let rows = st
                .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                    r.get::<_, String>(0)
                })
                .map_err(db)?;
            let mut out = Vec::new();
            for r in rows {
                out.push(from_json(&r.map_err(db)?)?);
            }
            Ok(out)
        })
        .await
    }

    async fn vm_events(&self, vm_id: &str) -> Result<Vec<VmEvent>> {
        let vm_id = vm_id.to_string();
        self.read(move |c| {
            let mut st = c
                .prepare(
                    "SELECT seq, at, phase, message FROM vm_events WHERE vm_id = ?1 ORDER BY seq",
                )
                .map_err(db)?;
            let rows = st
                .query_map([&vm_id], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                })
                .map_err(db)?;
            let mut out = Vec::new();
            for r in rows {
                let (seq, at, phase, message) = r.map_err(db)?;
                out.push(VmEvent {
                    seq: seq as u64,
                    at: parse_ts(&at)?,
                    phase: VmPhase::parse(&phase)
                        .ok_or_else(|| StoreError::Db(format!("corrupt phase {phase:?}")))?,
                    message,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn create_token(&self, t: &TokenRecord) -> Result<()> {
        let t = t.clone();
        self.write(move |c| insert_token(c, &t)).await
    }

    async fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>> {
        let hash = hash.to_string();
        self.read(move |c| {
            let row = c
                .query_row(
                    &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = ?1"),
                    [&hash],
                    token_row,
                )
                .optional()
                .map_err(db)?;
            row.map(token_record).transpose()
        })
        .await
    }

    async fn list_tokens(&self, kind: TokenKind) -> Result<Vec<TokenRecord>> {
        self.read(move |c| {
            let mut st = c
                .prepare(&format!(
                    "SELECT {TOKEN_COLUMNS} FROM tokens WHERE kind = ?1 ORDER BY created_at, id"
                ))
                .map_err(db)?;
            let rows = st
                .query_map([kind.as_str()], token_row)
                .map_err(db)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(db)?;
            rows.into_iter().map(token_record).collect()
        })
        .await
    }

    async fn delete_token(&self, kind: TokenKind, id: &str) -> Result<bool> {
        let id = id.to_string();
        self.write(move |c| {
            let n = c
                .execute(
                    "DELETE FROM tokens WHERE id = ?1 AND kind = ?2",
                    params![id, kind.as_str()],
                )
                .map_err(db)?;
            Ok(n > 0)
        })
        .await
    }

    async fn purge_join_tokens(&self, now: DateTime<Utc>) -> Result<usize> {
        // Timestamps are stored in one fixed RFC 3339 form (UTC,
        // microseconds), so they compare as strings.
        let now = ts(&now);
        self.write(move |c| {
            c.execute(
                "DELETE FROM tokens WHERE kind = 'join'
                   AND (uses_left <= 0 OR (expires_at IS NOT NULL AND expires_at < ?1))",
                [&now],
            )
            .map_err(db)
        })
        .await
    }

    async fn replace_tokens(&self, t: &TokenRecord) -> Result<()> {
        let t = t.clone();
        self.write(move |c| {
            atomic(c, |tx| {
                tx.execute("DELETE FROM tokens WHERE kind = ?1", [t.kind.as_str()])
                    .map_err(db)?;
                insert_token(tx, &t)
            })
        })
        .await
    }

    async fn count_tokens(&self, kind: TokenKind) -> Result<usize> {
        self.read(move |c| {
            let n: i64 = c
                .query_row(
                    "SELECT COUNT(*) FROM tokens WHERE kind = ?1",
                    [kind.as_str()],
                    |r| r.get(0),
                )
                .map_err(db)?;
            Ok(n as usize)
        })
        .await
    }

    async fn put_doc(&self, kind: &str, id: &str, name: &str, body: &str) -> Result<()> {
        let (kind, id, name, body) = (
            kind.to_string(),
            id.to_string(),
            name.to_string(),
            body.to_string(),
        );
        self.write(move |c| {
            c.execute(
                "INSERT INTO documents (kind, id, name, body) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (kind, id) DO UPDATE SET name = excluded.name, body = excluded.body",
                params![kind, id, name, body],
            )
            .map_err(|e| conflict_or_db(e, || format!("{kind} '{name}' already exists")))?;
            Ok(())
        })
        .await
    }

    async fn get_doc(&self, kind: &str, key: &str) -> Result<Option<String>> {
        let (kind, key) = (kind.to_string(), key.to_string());
        self.read(move |c| {
            c.query_row(
                "SELECT body FROM documents WHERE kind = ?1 AND (id = ?2 OR name = ?2) LIMIT 1",
                params![kind, key],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)
        })
        .await
    }

    async fn list_docs(&self, kind: &str) -> Result<Vec<String>> {
        let kind = kind.to_string();
        self.read(move |c| {
            let mut st = c
                .prepare("SELECT body FROM documents WHERE kind = ?1 ORDER BY name")
                .map_err(db)?;
            let rows = st
                .query_map([&kind], |r| r.get::<_, String>(0))
                .map_err(db)?;
            let mut out = Vec::new();
            for r in rows {
                out.push(r.map_err(db)?);
            }
            Ok(out)
        })
        .await
    }

    async fn delete_doc(&self, kind: &str, id: &str) -> Result<bool> {
        let (kind, id) = (kind.to_string(), id.to_string());
        self.write(move |c| {
            let n = c
                .execute(
                    "DELETE FROM documents WHERE kind = ?1 AND id = ?2",
                    params![kind, id],
                )
                .map_err(db)?;
            Ok(n > 0)
        })
        .await
    }
}

const TOKEN_COLUMNS: &str = "id, kind, hash, site, host_id, expires_at, uses_left, created_at";

type TokenRow = (
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    String,
);

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
    ))
}

fn token_record(row: TokenRow) -> Result<TokenRecord> {
    let (id, kind, hash, site, host_id, exp, uses, created) = row;
    Ok(TokenRecord {
        id,
        kind: TokenKind::parse(&kind)
            .ok_or_else(|| StoreError::Db(format!("corrupt token kind {kind:?}")))?,
        hash,
        site,
        host_id,
        expires_at: exp.as_deref().map(parse_ts).transpose()?,
        uses_left: uses.map(|u| u.max(0) as u32),
        created_at: parse_ts(&created)?,
    })
}

fn insert_token(c: &Connection, t: &TokenRecord) -> Result<()> {
    c.execute(
        "INSERT INTO tokens (id, kind, hash, site, host_id, expires_at, uses_left, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            t.id,
            t.kind.as_str(),
            t.hash,
            t.site,
            t.host_id,
            t.expires_at.as_ref().map(ts),
            t.uses_left,
            ts(&t.created_at)
        ],
    )
    .map_err(db)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virt8ra_api::*;

    /// Lookups that run per request or per migration step use indexes: a
    /// scan is one million rows at the size the control plane is built for.
    #[test]
    fn lookups_by_key_use_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("t.db")).unwrap();
        migrate(&mut conn).unwrap();
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
                    .map_err(db)?;
                    Err::<(), _>(StoreError::Db("failed after a change".into()))
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
            Err(StoreError::Db(m)) => assert!(m.contains("rolled back"), "{m}"),
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
                s.read(move |c| c.query_row(sql, [], |r| r.get::<_, String>(0)).map_err(db))
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
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as u32);
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
            migrate_to(&mut c, MIGRATIONS.len() - 1).unwrap();
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
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as u32);
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
            },
            state: HostState::Ready,
            connected: false,
            last_heartbeat: None,
            usage: Default::default(),
            allocated: Default::default(),
            cpu_overcommit: None,
            memory_overcommit: None,
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
}
