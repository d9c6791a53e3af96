//! The SQLite engine: opening and migrating the database, the writer thread
//! (group commit), the reader connections and the checkpointer. Resource
//! files reach the database only through [`SqliteStore::write`] and
//! [`SqliteStore::read`], and guard their writes with [`atomic`] or
//! [`unguarded`].

use std::cell::Cell;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::rows::db;
use crate::error::{Result, StoreError};
use crate::schema::UPGRADES;

/// A write job: runs inside the writer's batch transaction and returns a
/// finisher that delivers its result once the batch's commit is known.
type Job = Box<dyn FnOnce(&mut Connection) -> Box<dyn FnOnce(Result<()>) + Send> + Send>;

/// Told of each commit of the writer thread: how long it took (from
/// `BEGIN` to the end of `COMMIT`, the jobs' own work included) and how
/// many writes it made durable. Runs on the writer thread: it must be
/// quick (the control plane's metrics bump a histogram).
pub type CommitHook = Box<dyn Fn(Duration, usize) + Send + Sync>;

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
    /// Set once by [`SqliteStore::on_commit`]; read by the writer thread
    /// after each commit (an atomic load when unset).
    commit_hook: Arc<OnceLock<CommitHook>>,
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

fn configure(conn: &Connection) -> Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(db("configure"))?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(db("configure"))?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(db("configure"))?;
    // Cut the WAL back to this size when it starts over. Under a sustained
    // write load it grows to a few hundred MiB between restarts (measured:
    // 75 MiB/s at 5,500 VM creates/s, up to 470 MiB), and every write past
    // the cut lands in a block the filesystem must allocate and zero first
    // (ext4: 3.5% of the control plane's CPU at 64 MiB); a file that keeps
    // its blocks is overwritten in place.
    conn.pragma_update(None, "journal_size_limit", WAL_KEEP_BYTES)
        .map_err(db("configure"))?;
    conn.busy_timeout(std::time::Duration::from_secs(30))
        .map_err(db("configure"))?;
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and upgrades its
    /// schema.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let mut conn = Connection::open(path).map_err(db("open"))?;
        configure(&conn)?;
        // The writer's page cache holds the hot part of the tables (with
        // time-ordered ids, the recent end); checkpoints run on their own
        // thread, not inside the writer's commits.
        conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)
            .map_err(db("open"))?;
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(db("open"))?;
        upgrade_schema(&mut conn)?;
        let mut readers = Vec::new();
        for _ in 0..READERS {
            let r = Connection::open(path).map_err(db("open"))?;
            configure(&r)?;
            readers.push(r);
        }
        let ckpt = Connection::open(path).map_err(db("open"))?;
        configure(&ckpt)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("virt8ra-store-checkpoint".into())
            .spawn(move || checkpointer(ckpt, stopped))
            .map_err(|e| StoreError::db("cannot start the checkpoint thread", e))?;
        Self::start(conn, readers, Some(Arc::new(stop)))
    }

    /// A private in-memory database, for tests.
    pub fn in_memory() -> Result<SqliteStore> {
        let mut conn = Connection::open_in_memory().map_err(db("in_memory"))?;
        configure(&conn)?;
        upgrade_schema(&mut conn)?;
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
        let commit_hook: Arc<OnceLock<CommitHook>> = Arc::default();
        let hook = commit_hook.clone();
        std::thread::Builder::new()
            .name("virt8ra-store-writer".into())
            .spawn(move || writer(conn, rx, &hook))
            .map_err(|e| StoreError::db("cannot start the writer thread", e))?;
        Ok(SqliteStore {
            writer: tx,
            readers: Arc::new(readers.into_iter().map(Mutex::new).collect()),
            next_reader: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            commit_hook,
            _checkpointer: checkpointer,
        })
    }

    /// Calls `hook` after each commit of the writer thread (for metrics).
    /// Only the first hook set is kept; false if one was set already.
    pub fn on_commit(&self, hook: CommitHook) -> bool {
        self.commit_hook.set(hook).is_ok()
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<u32> {
        let (tx, rx) = std::sync::mpsc::channel();
        let job: Job = Box::new(move |c: &mut Connection| {
            let r: Result<u32> = c
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .map_err(db("schema_version"));
            Box::new(move |_commit: Result<()>| {
                let _ = tx.send(r);
            })
        });
        self.writer
            .send(job)
            .map_err(|_| StoreError::db_failure("the store's writer has stopped"))?;
        rx.recv()
            .map_err(|_| StoreError::db_failure("the store's writer has stopped"))?
    }

    /// Runs a write on the writer thread. It is committed together with the
    /// other writes queued at the same time (group commit), and its result is
    /// delivered only once that commit is durable.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T>
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
            .map_err(|_| StoreError::db_failure("the store's writer has stopped"))?;
        rx.await
            .map_err(|_| StoreError::db_failure("the store's writer has stopped"))?
    }

    /// Runs a read on the reader connection (a blocking thread).
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T>
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
                .map_err(|_| StoreError::db_failure("database lock poisoned"))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::db("store task failed", e))?
    }
}

/// The writer thread: takes every job queued, runs them in one transaction
/// (each job inside its own savepoint, so one job's failure undoes only that
/// job, except the VM writes: see [`unguarded`]), commits once, then answers
/// them all.
fn writer(mut conn: Connection, rx: std::sync::mpsc::Receiver<Job>, hook: &OnceLock<CommitHook>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let began = Instant::now();
        let writes = batch.len();
        let begun = exec_cached(&conn, "BEGIN IMMEDIATE");
        if let Err(e) = begun {
            for job in batch {
                let finish = job(&mut conn);
                finish(Err(StoreError::db("begin", e.clone())));
            }
            continue;
        }
        PARTIAL_JOB.with(|p| p.set(false));
        let finishers: Vec<_> = batch.into_iter().map(|job| job(&mut conn)).collect();
        let commit = if PARTIAL_JOB.with(|p| p.replace(false)) {
            Err(StoreError::db_failure(
                "a write of this batch failed after changing rows; the batch was rolled back",
            ))
        } else {
            exec_cached(&conn, "COMMIT")
        };
        if commit.is_err() {
            let _ = exec_cached(&conn, "ROLLBACK");
        } else if let Some(h) = hook.get() {
            h(began.elapsed(), writes);
        }
        for f in finishers {
            f(match &commit {
                Ok(()) => Ok(()),
                Err(e) => Err(StoreError::db("commit", e.clone())),
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

/// Brings a database's schema up to this build's version.
pub(super) fn upgrade_schema(conn: &mut Connection) -> Result<()> {
    upgrade_schema_to(conn, UPGRADES.len())
}

/// Applies the schema upgrades a database lacks, up to the first `upto`
/// of them.
pub(crate) fn upgrade_schema_to(conn: &mut Connection, upto: usize) -> Result<()> {
    let current: u32 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(db("schema upgrade"))?;
    let latest = UPGRADES.len() as u32;
    if current > latest {
        return Err(StoreError::db_failure(format!(
            "database schema version {current} is newer than this build understands ({latest}); \
             run a newer virt8ra"
        )));
    }
    for (i, upgrade) in UPGRADES
        .iter()
        .enumerate()
        .take(upto)
        .skip(current as usize)
    {
        let tx = conn.transaction().map_err(db("schema upgrade"))?;
        tx.execute_batch(upgrade.sqlite)
            .map_err(db("schema upgrade"))?;
        tx.pragma_update(None, "user_version", (i + 1) as u32)
            .map_err(db("schema upgrade"))?;
        tx.commit().map_err(db("schema upgrade"))?;
    }
    Ok(())
}

/// Runs one parameterless statement through the statement cache.
fn exec_cached(c: &Connection, sql: &'static str) -> Result<()> {
    c.prepare_cached(sql)
        .map_err(db(sql))?
        .execute([])
        .map_err(db(sql))?;
    Ok(())
}

/// Runs `f` inside a savepoint of its own, so that a failing job of a
/// group commit undoes only its own changes. The savepoint statements are
/// cached (rusqlite's `Connection::savepoint` parses them on every call,
/// twice per write).
pub(super) fn atomic<T>(c: &mut Connection, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
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
pub(super) fn unguarded<T>(
    c: &mut Connection,
    f: impl FnOnce(&Connection) -> Result<T>,
) -> Result<T> {
    let before = c.total_changes();
    let r = f(c);
    if r.is_err() && c.total_changes() != before {
        PARTIAL_JOB.with(|p| p.set(true));
    }
    r
}
