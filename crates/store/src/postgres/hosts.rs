//! Hosts, created together with their credential and the use of the join
//! token that admitted them.

use tokio_postgres::types::ToSql;
use virt8ra_api::Host;

use super::engine::{commit, lock_statement, retry, Lock, PgStore, WRITE_LOCK};
use super::rows::{conflict_or_db, db, delete_row, get_body, list_bodies, to_json};
use super::tokens::insert_token;
use crate::error::{Result, StoreError};
use crate::records::TokenRecord;

/// The join token's use is taken by one UPDATE, which locks its row: of
/// two joins on a token's last use, the second waits for the first, then
/// finds the token used up (or gone), as in SQLite.
pub(super) async fn create_host(
    store: &PgStore,
    h: &Host,
    host_token: &TokenRecord,
    join_token_id: &str,
) -> Result<()> {
    let body = to_json(h)?;
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Shared).await?;
        let left = tx
            .query_opt(
                "UPDATE tokens SET uses_left = uses_left - 1
                 WHERE id = $1 AND kind = 'join' AND (uses_left IS NULL OR uses_left > 0)
                 RETURNING uses_left",
                &[&join_token_id],
            )
            .await
            .map_err(db("create_host"))?;
        // A used-up token is deleted with its last use, so a missing one
        // is (most likely) used up too.
        let Some(left) = left else {
            return Err(StoreError::Conflict(
                "join token is used up, expired or revoked".into(),
            ));
        };
        let left: Option<i64> = left.try_get(0).map_err(db("create_host"))?;
        if left == Some(0) {
            tx.execute("DELETE FROM tokens WHERE id = $1", &[&join_token_id])
                .await
                .map_err(db("create_host"))?;
        }
        tx.execute(
            "INSERT INTO hosts (id, name, site, body) VALUES ($1, $2, $3, $4)",
            &[&h.id, &h.name, &h.site, &body],
        )
        .await
        .map_err(|e| {
            conflict_or_db(e, "create_host", || {
                format!("host '{}' already exists", h.name)
            })
        })?;
        insert_token(&tx, host_token).await?;
        commit(tx, "create_host").await
    })
    .await
}

pub(super) async fn update_host(store: &PgStore, h: &Host) -> Result<()> {
    // Hosts' snapshots and state changes come at thousands a second: a
    // cached statement.
    // The lock and the UPDATE in one round trip (see `lock_statement`).
    let body = to_json(h)?;
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin_unlocked(&mut c).await?;
        let lock = lock_statement(&tx, Lock::Shared).await?;
        let update = tx
            .prepare_cached("UPDATE hosts SET body = $2 WHERE id = $1")
            .await
            .map_err(db("update_host"))?;
        let lock_params: [&(dyn ToSql + Sync); 1] = [&WRITE_LOCK];
        let row_params: [&(dyn ToSql + Sync); 2] = [&h.id, &body];
        let (locked, updated) = tokio::join!(
            biased;
            tx.execute(&lock, &lock_params),
            tx.execute(&update, &row_params),
        );
        locked.map_err(db("begin"))?;
        if updated.map_err(db("update_host"))? == 0 {
            return Err(StoreError::not_found("host", h.id.clone()));
        }
        commit(tx, "update_host").await
    })
    .await
}

pub(super) async fn list_hosts(store: &PgStore) -> Result<Vec<Host>> {
    list_bodies(&store.client().await?, "hosts").await
}

pub(super) async fn get_host(store: &PgStore, key: &str) -> Result<Host> {
    get_body(&store.client().await?, "hosts", "host", key).await
}

pub(super) async fn delete_host(store: &PgStore, id: &str) -> Result<()> {
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Shared).await?;
        let h: Host = get_body(&tx, "hosts", "host", id).await?;
        delete_row(&tx, "hosts", "host", &h.id).await?;
        tx.execute("DELETE FROM tokens WHERE host_id = $1", &[&h.id])
            .await
            .map_err(db("delete_host"))?;
        commit(tx, "delete_host").await
    })
    .await
}
