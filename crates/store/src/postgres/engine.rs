//! The PostgreSQL engine: the URL, the connection pool, schema upgrades,
//! and the transactions every write runs in ([`PgStore::begin`],
//! [`retry`]). Resource files reach the database only through
//! [`PgStore::client`] and [`PgStore::begin`].

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime, Transaction,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Statement};

use super::rows::db;
use crate::error::{Result, StoreError};
use crate::schema::UPGRADES;

/// Connections per store. Writes hold one for the length of a transaction
/// (a few round trips), reads for one query.
const POOL_SIZE: usize = 16;

/// How long a new connection may take before the attempt fails (unless
/// the URL sets `connect_timeout`): a database that does not answer stops
/// the start with an error instead of hanging it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a query waits for a free connection of the pool.
const WAIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Times a write is tried again when PostgreSQL aborted it for a deadlock
/// or a serialization failure (it then changed nothing).
const RETRIES: u32 = 5;

/// The advisory lock that orders writes (see [`Lock`]); any constant,
/// the same in every build.
pub(super) const WRITE_LOCK: i64 = 0x7669_7274_3872_6101;

/// The advisory lock held while the schema is upgraded, so that two
/// control planes starting on one database do not both upgrade it.
const UPGRADE_LOCK: i64 = 0x7669_7274_3872_6102;

/// How a write transaction is ordered against the others.
///
/// SQLite runs writes one at a time, so a write that checks before it acts
/// (a provider is deleted only when no site names it) sees every write
/// before it and none after. In PostgreSQL writes run side by side, and a
/// check under READ COMMITTED would miss a write not yet committed. Every
/// write takes one advisory lock at its start: [`Lock::Shared`] for the
/// writes whose rules are constraints and row locks alone (VM creates and
/// updates, the hot path, run side by side), [`Lock::Exclusive`] for the
/// rare writes that check other rows before they act, which then run
/// alone, after every write in flight has committed, as in SQLite.
#[derive(Clone, Copy)]
pub(super) enum Lock {
    Shared,
    Exclusive,
}

/// The PostgreSQL backend of [`Store`](crate::store::Store).
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
}

/// `url` with its password (in the user part or a `password` parameter)
/// replaced by `***`: what logs and errors show of a database URL.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (format!("{s}://"), r),
        None => (String::new(), url),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _password)) => format!("{name}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => p.to_string(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}{authority}{tail}")
}

/// Parses a `postgres://` or `postgresql://` URL. The error shows the
/// URL redacted, never its password.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config> {
    let shown = redact_url(url);
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(StoreError::db_failure(format!(
            "database URL {shown:?} is not a PostgreSQL URL: \
             want postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
        )));
    }
    let mut config = tokio_postgres::Config::from_str(url)
        .map_err(|e| StoreError::db(format!("invalid database URL {shown:?}"), e))?;
    if config.get_hosts().is_empty() {
        return Err(StoreError::db_failure(format!(
            "database URL {shown:?} names no host"
        )));
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("virt8ra");
    }
    Ok(config)
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://` or
    /// `postgresql://`) and upgrades its schema. Fails at once, with the
    /// URL redacted, when the URL is bad or the database cannot be reached.
    pub async fn connect(url: &str) -> Result<PgStore> {
        Self::connect_upto(url, UPGRADES.len()).await
    }

    /// Like [`PgStore::connect`], with the schema upgraded to the first
    /// `upto` upgrades only (the tests' databases of an older build).
    pub(crate) async fn connect_upto(url: &str, upto: usize) -> Result<PgStore> {
        let config = parse_url(url)?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(CONNECT_TIMEOUT))
            .wait_timeout(Some(WAIT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::db("cannot make the connection pool", e))?;
        let store = PgStore { pool };
        let mut c = store.pool.get().await.map_err(|e| {
            // The driver's layers each repeat their cause in their own
            // message: the innermost one says it all, once.
            StoreError::db_failure(format!(
                "cannot connect to PostgreSQL at {}: {}",
                redact_url(url),
                root_cause(&e)
            ))
        })?;
        upgrade_schema_to(&mut c, upto).await?;
        Ok(store)
    }

    /// A connection of the pool.
    pub(crate) async fn client(&self) -> Result<Object> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::db("no database connection", e))
    }

    /// Begins a write transaction on `c`, ordered by `lock`.
    pub(super) async fn begin<'c>(c: &'c mut Object, lock: Lock) -> Result<Transaction<'c>> {
        let tx = Self::begin_unlocked(c).await?;
        take_lock(&tx, lock).await?;
        Ok(tx)
    }

    /// Begins a write transaction on `c` that has not taken its lock yet:
    /// the hot paths send the lock together with their first statements
    /// (see [`lock_statement`]).
    pub(super) async fn begin_unlocked<'c>(c: &'c mut Object) -> Result<Transaction<'c>> {
        c.transaction().await.map_err(db("begin"))
    }

    /// The schema version the database is at.
    pub async fn schema_version(&self) -> Result<u32> {
        let c = self.client().await?;
        current_version(&c).await
    }
}

/// Takes the write lock ([`Lock`]) in `tx`.
pub(super) async fn take_lock(tx: &Transaction<'_>, lock: Lock) -> Result<()> {
    let st = lock_statement(tx, lock).await?;
    tx.execute(&st, &[&WRITE_LOCK]).await.map_err(db("begin"))?;
    Ok(())
}

/// The statement that takes the write lock, to be run with [`WRITE_LOCK`]
/// as its parameter. The hot paths pipeline it with their own statements:
/// statements of one connection polled in order are sent in that order
/// without waiting for answers, and PostgreSQL runs them in that order,
/// so the lock and the write's statements cost one round trip (a VM
/// create or update is three: BEGIN, those, COMMIT; not five). They
/// prepare every statement first (from the connection's cache), then run
/// them with `tokio::join!(biased; ...)`, and read the answers in order:
/// a statement that fails aborts the transaction, and the ones after it
/// fail only because of it, so the first error in order is the answer.
pub(super) async fn lock_statement(tx: &Transaction<'_>, lock: Lock) -> Result<Statement> {
    let sql = match lock {
        Lock::Shared => "SELECT pg_advisory_xact_lock_shared($1)",
        Lock::Exclusive => "SELECT pg_advisory_xact_lock($1)",
    };
    tx.prepare_cached(sql).await.map_err(db("begin"))
}

/// The innermost cause of `e`.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Commits `tx`; `op` names the write in an error.
pub(super) async fn commit(tx: Transaction<'_>, op: &'static str) -> Result<()> {
    tx.commit().await.map_err(db(op))
}

/// Runs the write `f` (a whole transaction) again when PostgreSQL aborted
/// it for a deadlock or a serialization failure: such a transaction
/// changed nothing, and SQLite, which runs writes one at a time, never
/// fails that way. Any other error is the write's answer.
pub(super) async fn retry<T, F, Fut>(mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 0;
    loop {
        match f().await {
            Err(e) if attempt < RETRIES && is_transient(&e) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(5 << attempt)).await;
            }
            r => return r,
        }
    }
}

fn is_transient(e: &StoreError) -> bool {
    let StoreError::Db {
        source: Some(s), ..
    } = e
    else {
        return false;
    };
    let Some(pg) = s.downcast_ref::<tokio_postgres::Error>() else {
        return false;
    };
    matches!(
        pg.code(),
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    )
}

/// The record of the upgrades applied: one row each, by number.
const UPGRADES_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_upgrades (
    number     INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)";

/// The highest upgrade applied.
async fn current_version(c: &impl GenericClient) -> Result<u32> {
    let row = c
        .query_one("SELECT COALESCE(MAX(number), 0) FROM schema_upgrades", &[])
        .await
        .map_err(db("schema upgrade"))?;
    let v: i32 = row.try_get(0).map_err(db("schema upgrade"))?;
    Ok(v.max(0) as u32)
}

/// Applies the schema upgrades the database lacks, up to the first `upto`
/// of them, each in a transaction of its own with its row in
/// `schema_upgrades`, under [`UPGRADE_LOCK`].
pub(super) async fn upgrade_schema_to(c: &mut Object, upto: usize) -> Result<()> {
    let latest = UPGRADES.len() as u32;
    loop {
        let tx = c.transaction().await.map_err(db("schema upgrade"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&UPGRADE_LOCK])
            .await
            .map_err(db("schema upgrade"))?;
        tx.batch_execute(UPGRADES_TABLE)
            .await
            .map_err(db("schema upgrade"))?;
        let current = current_version(&tx).await?;
        if current > latest {
            return Err(StoreError::db_failure(format!(
                "database schema version {current} is newer than this build understands \
                 ({latest}); run a newer virt8ra"
            )));
        }
        let Some(upgrade) = UPGRADES
            .get(current as usize)
            .filter(|_| current < upto as u32)
        else {
            return tx.commit().await.map_err(db("schema upgrade"));
        };
        tx.batch_execute(upgrade.postgres)
            .await
            .map_err(|e| StoreError::db(format!("schema upgrade {}", current + 1), e))?;
        tx.execute(
            "INSERT INTO schema_upgrades (number, name) VALUES ($1, $2)",
            &[&(current as i32 + 1), &upgrade.name],
        )
        .await
        .map_err(db("schema upgrade"))?;
        tx.commit().await.map_err(db("schema upgrade"))?;
    }
}
