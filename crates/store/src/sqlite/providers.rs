//! Providers: the companies or operators that own sites.

use rusqlite::params;
use virt8ra_api::Provider;

use super::engine::{atomic, SqliteStore};
use super::rows::{conflict_or_db, db, delete_row, get_body, list_bodies, to_json};
use crate::error::{Result, StoreError};

pub(super) async fn create_provider(store: &SqliteStore, p: &Provider) -> Result<()> {
    let p = p.clone();
    store
        .write(move |c| {
            c.execute(
                "INSERT INTO providers (id, name, body) VALUES (?1, ?2, ?3)",
                params![p.id, p.name, to_json(&p)?],
            )
            .map_err(|e| {
                conflict_or_db(e, "create_provider", || {
                    format!("provider '{}' already exists", p.name)
                })
            })?;
            Ok(())
        })
        .await
}

pub(super) async fn list_providers(store: &SqliteStore) -> Result<Vec<Provider>> {
    store.read(|c| list_bodies(c, "providers")).await
}

pub(super) async fn get_provider(store: &SqliteStore, key: &str) -> Result<Provider> {
    let key = key.to_string();
    store
        .read(move |c| get_body(c, "providers", "provider", &key))
        .await
}

pub(super) async fn delete_provider(store: &SqliteStore, id: &str) -> Result<()> {
    let id = id.to_string();
    store
        .write(move |c| {
            atomic(c, |tx| {
                let p: Provider = get_body(tx, "providers", "provider", &id)?;
                let n: i64 = tx
                    .query_row(
                        "SELECT COUNT(*) FROM sites WHERE provider = ?1",
                        [&p.name],
                        |r| r.get(0),
                    )
                    .map_err(db("delete_provider"))?;
                if n > 0 {
                    return Err(StoreError::Conflict(format!(
                        "provider '{}' still has {n} site(s); delete them first",
                        p.name
                    )));
                }
                delete_row(tx, "providers", "provider", &p.id)?;
                Ok(())
            })
        })
        .await
}

pub(super) async fn update_provider(store: &SqliteStore, p: &Provider) -> Result<()> {
    let p = p.clone();
    store
        .write(move |c| {
            let n = c
                .execute(
                    "UPDATE providers SET body = ?2 WHERE id = ?1",
                    params![p.id, to_json(&p)?],
                )
                .map_err(db("update_provider"))?;
            if n == 0 {
                return Err(StoreError::not_found("provider", p.id));
            }
            Ok(())
        })
        .await
}
