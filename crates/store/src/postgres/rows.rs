//! Helpers shared by the PostgreSQL resource files: error mapping, lookups
//! by id or name, listing and deleting rows (JSON bodies and timestamps are
//! `crate::codec`'s, shared with SQLite). They know no resource and import
//! none of the resource files.

use deadpool_postgres::GenericClient;
use serde::de::DeserializeOwned;
use tokio_postgres::error::SqlState;

pub(super) use crate::codec::{from_json, parse_ts, to_json, ts};
use crate::error::{Result, StoreError};

/// Maps a driver error to a [`StoreError::Db`] that names `op` (the store
/// function that failed) and keeps the error as its source:
/// `.map_err(db("create_vm"))`.
pub(super) fn db(op: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |e| StoreError::db(op, e)
}

/// A unique-constraint violation as a conflict that says `what()`, any
/// other error as a database failure of `op`.
pub(super) fn conflict_or_db(
    e: tokio_postgres::Error,
    op: &'static str,
    what: impl FnOnce() -> String,
) -> StoreError {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        StoreError::Conflict(what())
    } else {
        StoreError::db(op, e)
    }
}

/// Finds a row by id or by name.
pub(super) async fn get_body<T: DeserializeOwned>(
    c: &impl GenericClient,
    table: &str,
    kind: &'static str,
    key: &str,
) -> Result<T> {
    let sql = format!("SELECT body FROM {table} WHERE id = $1 OR name = $1 LIMIT 1");
    let failed = |e| StoreError::db(format!("get from {table}"), e);
    let st = c.prepare_cached(&sql).await.map_err(failed)?;
    let row = c.query_opt(&st, &[&key]).await.map_err(failed)?;
    match row {
        Some(r) => from_json(&r.try_get::<_, String>(0).map_err(failed)?),
        None => Err(StoreError::not_found(kind, key)),
    }
}

pub(super) async fn list_bodies<T: DeserializeOwned>(
    c: &impl GenericClient,
    table: &str,
) -> Result<Vec<T>> {
    let sql = format!("SELECT body FROM {table} ORDER BY name");
    let failed = |e| StoreError::db(format!("list {table}"), e);
    let rows = c.query(&sql, &[]).await.map_err(failed)?;
    rows.iter()
        .map(|r| from_json(&r.try_get::<_, String>(0).map_err(failed)?))
        .collect()
}

pub(super) async fn delete_row(
    c: &impl GenericClient,
    table: &str,
    kind: &'static str,
    id: &str,
) -> Result<()> {
    let n = c
        .execute(&format!("DELETE FROM {table} WHERE id = $1"), &[&id])
        .await
        .map_err(|e| StoreError::db(format!("delete from {table}"), e))?;
    if n == 0 {
        return Err(StoreError::not_found(kind, id));
    }
    Ok(())
}

/// The text in column 0 of each row.
pub(super) fn texts(rows: &[tokio_postgres::Row], op: &'static str) -> Result<Vec<String>> {
    rows.iter()
        .map(|r| r.try_get::<_, String>(0).map_err(db(op)))
        .collect()
}
