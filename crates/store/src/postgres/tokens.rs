//! Tokens: the admin token, join tokens and hosts' credentials, stored as
//! the SHA-256 of their secret.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::engine::{commit, retry, Lock, PgStore};
use super::rows::{db, parse_ts, ts};
use crate::error::{Result, StoreError};
use crate::records::{grant_of, TokenKind, TokenRecord};

pub(super) async fn create_token(store: &PgStore, t: &TokenRecord) -> Result<()> {
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Shared).await?;
        insert_token(&tx, t).await?;
        commit(tx, "create_token").await
    })
    .await
}

pub(super) async fn find_token(store: &PgStore, hash: &str) -> Result<Option<TokenRecord>> {
    let c = store.client().await?;
    let st = c
        .prepare_cached(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = $1"
        ))
        .await
        .map_err(db("find_token"))?;
    let row = c.query_opt(&st, &[&hash]).await.map_err(db("find_token"))?;
    row.as_ref().map(token_record).transpose()
}

pub(super) async fn list_tokens(store: &PgStore, kind: TokenKind) -> Result<Vec<TokenRecord>> {
    let c = store.client().await?;
    let rows = c
        .query(
            &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE kind = $1 ORDER BY created_at, id"),
            &[&kind.as_str()],
        )
        .await
        .map_err(db("list_tokens"))?;
    rows.iter().map(token_record).collect()
}

pub(super) async fn delete_token(store: &PgStore, kind: TokenKind, id: &str) -> Result<bool> {
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Shared).await?;
        let n = tx
            .execute(
                "DELETE FROM tokens WHERE id = $1 AND kind = $2",
                &[&id, &kind.as_str()],
            )
            .await
            .map_err(db("delete_token"))?;
        commit(tx, "delete_token").await?;
        Ok(n > 0)
    })
    .await
}

pub(super) async fn purge_join_tokens(store: &PgStore, now: DateTime<Utc>) -> Result<usize> {
    // Timestamps are stored in one fixed RFC 3339 form (UTC,
    // microseconds) in "C"-collated columns, so they compare as strings.
    let now = ts(&now);
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Shared).await?;
        let n = tx
            .execute(
                "DELETE FROM tokens WHERE kind = 'join'
                 AND (uses_left <= 0 OR (expires_at IS NOT NULL AND expires_at < $1))",
                &[&now],
            )
            .await
            .map_err(db("purge_join_tokens"))?;
        commit(tx, "purge_join_tokens").await?;
        Ok(n as usize)
    })
    .await
}

/// Runs alone ([`Lock::Exclusive`]): two rotations at once leave one
/// token, as in SQLite, not one each.
pub(super) async fn replace_tokens(store: &PgStore, t: &TokenRecord) -> Result<()> {
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Exclusive).await?;
        tx.execute("DELETE FROM tokens WHERE kind = $1", &[&t.kind.as_str()])
            .await
            .map_err(db("replace_tokens"))?;
        insert_token(&tx, t).await?;
        commit(tx, "replace_tokens").await
    })
    .await
}

pub(super) async fn count_tokens(store: &PgStore, kind: TokenKind) -> Result<usize> {
    let c = store.client().await?;
    let n: i64 = c
        .query_one(
            "SELECT COUNT(*) FROM tokens WHERE kind = $1",
            &[&kind.as_str()],
        )
        .await
        .and_then(|r| r.try_get(0))
        .map_err(db("count_tokens"))?;
    Ok(n as usize)
}

const TOKEN_COLUMNS: &str = "id, kind, hash, site, host_id, expires_at, uses_left, created_at, \
     user_name, scope, role, token_name";

fn token_record(r: &Row) -> Result<TokenRecord> {
    let get = |e| StoreError::db("corrupt token row", e);
    let kind: String = r.try_get(1).map_err(get)?;
    let expires: Option<String> = r.try_get(5).map_err(get)?;
    let uses: Option<i64> = r.try_get(6).map_err(get)?;
    let created: String = r.try_get(7).map_err(get)?;
    Ok(TokenRecord {
        id: r.try_get(0).map_err(get)?,
        kind: TokenKind::parse(&kind)
            .ok_or_else(|| StoreError::db_failure(format!("corrupt token kind {kind:?}")))?,
        hash: r.try_get(2).map_err(get)?,
        site: r.try_get(3).map_err(get)?,
        host_id: r.try_get(4).map_err(get)?,
        expires_at: expires.as_deref().map(parse_ts).transpose()?,
        uses_left: uses.map(|u| u.clamp(0, u32::MAX as i64) as u32),
        created_at: parse_ts(&created)?,
        grant: grant_of([
            r.try_get(8).map_err(get)?,
            r.try_get(9).map_err(get)?,
            r.try_get(10).map_err(get)?,
            r.try_get(11).map_err(get)?,
        ]),
    })
}

pub(super) async fn insert_token(c: &impl GenericClient, t: &TokenRecord) -> Result<()> {
    c.execute(
        "INSERT INTO tokens (id, kind, hash, site, host_id, expires_at, uses_left, created_at,
                             user_name, scope, role, token_name)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        &[
            &t.id,
            &t.kind.as_str(),
            &t.hash,
            &t.site,
            &t.host_id,
            &t.expires_at.as_ref().map(ts),
            &t.uses_left.map(i64::from),
            &ts(&t.created_at),
            &t.grant.as_ref().map(|g| g.user.as_str()),
            &t.grant.as_ref().map(|g| g.scope.as_str()),
            &t.grant.as_ref().map(|g| g.role.as_str()),
            &t.grant.as_ref().map(|g| g.name.as_str()),
        ],
    )
    .await
    .map_err(db("insert_token"))?;
    Ok(())
}
