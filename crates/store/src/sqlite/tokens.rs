//! Tokens: the admin token, join tokens and hosts' credentials, stored as
//! the SHA-256 of their secret.

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use super::engine::{atomic, SqliteStore};
use super::rows::{db, parse_ts, ts};
use crate::error::{Result, StoreError};
use crate::records::{grant_of, TokenKind, TokenRecord};

pub(super) async fn create_token(store: &SqliteStore, t: &TokenRecord) -> Result<()> {
    let t = t.clone();
    store.write(move |c| insert_token(c, &t)).await
}

pub(super) async fn find_token(store: &SqliteStore, hash: &str) -> Result<Option<TokenRecord>> {
    let hash = hash.to_string();
    store
        .read(move |c| {
            let row = c
                .query_row(
                    &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = ?1"),
                    [&hash],
                    token_row,
                )
                .optional()
                .map_err(db("find_token"))?;
            row.map(token_record).transpose()
        })
        .await
}

pub(super) async fn list_tokens(store: &SqliteStore, kind: TokenKind) -> Result<Vec<TokenRecord>> {
    store
        .read(move |c| {
            let mut st = c
                .prepare(&format!(
                    "SELECT {TOKEN_COLUMNS} FROM tokens WHERE kind = ?1 ORDER BY created_at, id"
                ))
                .map_err(db("list_tokens"))?;
            let rows = st
                .query_map([kind.as_str()], token_row)
                .map_err(db("list_tokens"))?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(db("list_tokens"))?;
            rows.into_iter().map(token_record).collect()
        })
        .await
}

pub(super) async fn delete_token(store: &SqliteStore, kind: TokenKind, id: &str) -> Result<bool> {
    let id = id.to_string();
    store
        .write(move |c| {
            let n = c
                .execute(
                    "DELETE FROM tokens WHERE id = ?1 AND kind = ?2",
                    params![id, kind.as_str()],
                )
                .map_err(db("delete_token"))?;
            Ok(n > 0)
        })
        .await
}

pub(super) async fn purge_join_tokens(store: &SqliteStore, now: DateTime<Utc>) -> Result<usize> {
    // Timestamps are stored in one fixed RFC 3339 form (UTC,
    // microseconds), so they compare as strings.
    let now = ts(&now);
    store
        .write(move |c| {
            c.execute(
                "DELETE FROM tokens WHERE kind = 'join'
               AND (uses_left <= 0 OR (expires_at IS NOT NULL AND expires_at < ?1))",
                [&now],
            )
            .map_err(db("purge_join_tokens"))
        })
        .await
}

pub(super) async fn replace_tokens(store: &SqliteStore, t: &TokenRecord) -> Result<()> {
    let t = t.clone();
    store
        .write(move |c| {
            atomic(c, |tx| {
                tx.execute("DELETE FROM tokens WHERE kind = ?1", [t.kind.as_str()])
                    .map_err(db("replace_tokens"))?;
                insert_token(tx, &t)
            })
        })
        .await
}

pub(super) async fn count_tokens(store: &SqliteStore, kind: TokenKind) -> Result<usize> {
    store
        .read(move |c| {
            let n: i64 = c
                .query_row(
                    "SELECT COUNT(*) FROM tokens WHERE kind = ?1",
                    [kind.as_str()],
                    |r| r.get(0),
                )
                .map_err(db("count_tokens"))?;
            Ok(n as usize)
        })
        .await
}

const TOKEN_COLUMNS: &str = "id, kind, hash, site, host_id, expires_at, uses_left, created_at, \
     user_name, scope, role, token_name";

type TokenRow = (
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    String,
    [Option<String>; 4],
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
        [r.get(8)?, r.get(9)?, r.get(10)?, r.get(11)?],
    ))
}

fn token_record(row: TokenRow) -> Result<TokenRecord> {
    let (id, kind, hash, site, host_id, exp, uses, created, grant) = row;
    Ok(TokenRecord {
        id,
        kind: TokenKind::parse(&kind)
            .ok_or_else(|| StoreError::db_failure(format!("corrupt token kind {kind:?}")))?,
        hash,
        site,
        host_id,
        expires_at: exp.as_deref().map(parse_ts).transpose()?,
        uses_left: uses.map(|u| u.max(0) as u32),
        created_at: parse_ts(&created)?,
        grant: grant_of(grant),
    })
}

pub(super) fn insert_token(c: &Connection, t: &TokenRecord) -> Result<()> {
    c.execute(
        "INSERT INTO tokens (id, kind, hash, site, host_id, expires_at, uses_left, created_at,
                             user_name, scope, role, token_name)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            t.id,
            t.kind.as_str(),
            t.hash,
            t.site,
            t.host_id,
            t.expires_at.as_ref().map(ts),
            t.uses_left,
            ts(&t.created_at),
            t.grant.as_ref().map(|g| &g.user),
            t.grant.as_ref().map(|g| &g.scope),
            t.grant.as_ref().map(|g| &g.role),
            t.grant.as_ref().map(|g| &g.name),
        ],
    )
    .map_err(db("insert_token"))?;
    Ok(())
}
