//! Sites: the places a provider's hosts are in.

use rusqlite::params;
use virt8ra_api::Site;

use super::engine::{atomic, SqliteStore};
use super::rows::{conflict_or_db, db, delete_row, get_body, list_bodies, to_json};
use crate::error::{Result, StoreError};

pub(super) async fn create_site(store: &SqliteStore, s: &Site) -> Result<()> {
    let s = s.clone();
    store
        .write(move |c| {
            c.execute(
                "INSERT INTO sites (id, name, provider, body) VALUES (?1, ?2, ?3, ?4)",
                params![s.id, s.name, s.provider, to_json(&s)?],
            )
            .map_err(|e| {
                conflict_or_db(e, "create_site", || {
                    format!("site '{}' already exists", s.name)
                })
            })?;
            Ok(())
        })
        .await
}

pub(super) async fn list_sites(store: &SqliteStore) -> Result<Vec<Site>> {
    store.read(|c| list_bodies(c, "sites")).await
}

pub(super) async fn get_site(store: &SqliteStore, key: &str) -> Result<Site> {
    let key = key.to_string();
    store
        .read(move |c| get_body(c, "sites", "site", &key))
        .await
}

pub(super) async fn delete_site(store: &SqliteStore, id: &str) -> Result<()> {
    let id = id.to_string();
    store
        .write(move |c| {
            atomic(c, |tx| {
                let s: Site = get_body(tx, "sites", "site", &id)?;
                let n: i64 = tx
                    .query_row(
                        "SELECT COUNT(*) FROM hosts WHERE site = ?1",
                        [&s.name],
                        |r| r.get(0),
                    )
                    .map_err(db("delete_site"))?;
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

pub(super) async fn update_site(store: &SqliteStore, s: &Site) -> Result<()> {
    let s = s.clone();
    store
        .write(move |c| {
            let n = c
                .execute(
                    "UPDATE sites SET body = ?2 WHERE id = ?1",
                    params![s.id, to_json(&s)?],
                )
                .map_err(db("update_site"))?;
            if n == 0 {
                return Err(StoreError::not_found("site", s.id));
            }
            Ok(())
        })
        .await
}
