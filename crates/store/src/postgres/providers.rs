//! Providers: the companies or operators that own sites.

use virt8ra_api::Provider;

use super::engine::{commit, retry, Lock, PgStore};
use super::rows::{conflict_or_db, db, delete_row, get_body, list_bodies, to_json};
use crate::error::{Result, StoreError};

pub(super) async fn create_provider(store: &PgStore, p: &Provider) -> Result<()> {
    let body = to_json(p)?;
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Shared).await?;
        tx.execute(
            "INSERT INTO providers (id, name, body) VALUES ($1, $2, $3)",
            &[&p.id, &p.name, &body],
        )
        .await
        .map_err(|e| {
            conflict_or_db(e, "create_provider", || {
                format!("provider '{}' already exists", p.name)
            })
        })?;
        commit(tx, "create_provider").await
    })
    .await
}

pub(super) async fn list_providers(store: &PgStore) -> Result<Vec<Provider>> {
    list_bodies(&store.client().await?, "providers").await
}

pub(super) async fn get_provider(store: &PgStore, key: &str) -> Result<Provider> {
    get_body(&store.client().await?, "providers", "provider", key).await
}

/// Runs alone ([`Lock::Exclusive`]): no site can be created for the
/// provider between the count and the delete.
pub(super) async fn delete_provider(store: &PgStore, id: &str) -> Result<()> {
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Exclusive).await?;
        let p: Provider = get_body(&tx, "providers", "provider", id).await?;
        let n: i64 = tx
            .query_one("SELECT COUNT(*) FROM sites WHERE provider = $1", &[&p.name])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(db("delete_provider"))?;
        if n > 0 {
            return Err(StoreError::Conflict(format!(
                "provider '{}' still has {n} site(s); delete them first",
                p.name
            )));
        }
        delete_row(&tx, "providers", "provider", &p.id).await?;
        commit(tx, "delete_provider").await
    })
    .await
}

pub(super) async fn update_provider(store: &PgStore, p: &Provider) -> Result<()> {
    let body = to_json(p)?;
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Shared).await?;
        let n = tx
            .execute(
                "UPDATE providers SET body = $2 WHERE id = $1",
                &[&p.id, &body],
            )
            .await
            .map_err(db("update_provider"))?;
        if n == 0 {
            return Err(StoreError::not_found("provider", p.id.clone()));
        }
        commit(tx, "update_provider").await
    })
    .await
}
