//! Sites: the places a provider's hosts are in.

use virt8ra_api::Site;

use super::engine::{commit, retry, Lock, PgStore};
use super::rows::{conflict_or_db, db, delete_row, get_body, list_bodies, to_json};
use crate::error::{Result, StoreError};

pub(super) async fn create_site(store: &PgStore, s: &Site) -> Result<()> {
    let body = to_json(s)?;
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Shared).await?;
        tx.execute(
            "INSERT INTO sites (id, name, provider, body) VALUES ($1, $2, $3, $4)",
            &[&s.id, &s.name, &s.provider, &body],
        )
        .await
        .map_err(|e| {
            conflict_or_db(e, "create_site", || {
                format!("site '{}' already exists", s.name)
            })
        })?;
        commit(tx, "create_site").await
    })
    .await
}

pub(super) async fn list_sites(store: &PgStore) -> Result<Vec<Site>> {
    list_bodies(&store.client().await?, "sites").await
}

pub(super) async fn get_site(store: &PgStore, key: &str) -> Result<Site> {
    get_body(&store.client().await?, "sites", "site", key).await
}

/// Runs alone ([`Lock::Exclusive`]): no host can join the site between
/// the count and the delete.
pub(super) async fn delete_site(store: &PgStore, id: &str) -> Result<()> {
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Exclusive).await?;
        let s: Site = get_body(&tx, "sites", "site", id).await?;
        let n: i64 = tx
            .query_one("SELECT COUNT(*) FROM hosts WHERE site = $1", &[&s.name])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(db("delete_site"))?;
        if n > 0 {
            return Err(StoreError::Conflict(format!(
                "site '{}' still has {n} host(s); delete them first",
                s.name
            )));
        }
        delete_row(&tx, "sites", "site", &s.id).await?;
        commit(tx, "delete_site").await
    })
    .await
}

pub(super) async fn update_site(store: &PgStore, s: &Site) -> Result<()> {
    let body = to_json(s)?;
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Shared).await?;
        let n = tx
            .execute("UPDATE sites SET body = $2 WHERE id = $1", &[&s.id, &body])
            .await
            .map_err(db("update_site"))?;
        if n == 0 {
            return Err(StoreError::not_found("site", s.id.clone()));
        }
        commit(tx, "update_site").await
    })
    .await
}
