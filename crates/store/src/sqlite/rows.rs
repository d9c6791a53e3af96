//! Helpers shared by the resource files: error mapping, lookups by id or
//! name (JSON bodies and timestamps are `crate::codec`'s, shared with
//! PostgreSQL). They know no resource and import none
//! of the resource files.

use rusqlite::{Connection, OptionalExtension};
use serde::de::DeserializeOwned;

pub(super) use crate::codec::{from_json, parse_ts, to_json, ts};
use crate::error::{Result, StoreError};

/// Maps a rusqlite error to a [`StoreError::Db`] that names `op` (the
/// store function that failed) and keeps the error as its source:
/// `.map_err(db("create_vm"))`.
pub(super) fn db(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |e| StoreError::db(op, e)
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

/// Finds a row by id or by name.
pub(super) fn get_body<T: DeserializeOwned>(
    conn: &Connection,
    table: &str,
    kind: &'static str,
    key: &str,
) -> Result<T> {
    let sql = format!("SELECT body FROM {table} WHERE id = ?1 OR name = ?1 LIMIT 1");
    let body: Option<String> = conn
        .query_row(&sql, [key], |r| r.get(0))
        .optional()
        .map_err(|e| StoreError::db(format!("get from {table}"), e))?;
    match body {
        Some(b) => from_json(&b),
        None => Err(StoreError::not_found(kind, key)),
    }
}

pub(super) fn list_bodies<T: DeserializeOwned>(conn: &Connection, table: &str) -> Result<Vec<T>> {
    let sql = format!("SELECT body FROM {table} ORDER BY name");
    let failed = |e| StoreError::db(format!("list {table}"), e);
    let mut st = conn.prepare(&sql).map_err(failed)?;
    let rows = st
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(failed)?;
    let mut out = Vec::new();
    for r in rows {
        out.push(from_json(&r.map_err(failed)?)?);
    }
    Ok(out)
}

pub(super) fn delete_row(
    conn: &Connection,
    table: &str,
    kind: &'static str,
    id: &str,
) -> Result<()> {
    let n = conn
        .execute(&format!("DELETE FROM {table} WHERE id = ?1"), [id])
        .map_err(|e| StoreError::db(format!("delete from {table}"), e))?;
    if n == 0 {
        return Err(StoreError::not_found(kind, id));
    }
    Ok(())
}

/// A unique-constraint violation as a conflict that says `what()`, any
/// other error as a database failure of `op`.
pub(super) fn conflict_or_db(
    e: rusqlite::Error,
    op: &'static str,
    what: impl FnOnce() -> String,
) -> StoreError {
    if is_unique_violation(&e) {
        StoreError::Conflict(what())
    } else {
        StoreError::db(op, e)
    }
}
