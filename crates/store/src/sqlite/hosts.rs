//! Hosts, created together with their credential and the use of the join
//! token that admitted them.

use rusqlite::{params, OptionalExtension};
use virt8ra_api::Host;

use super::engine::{atomic, SqliteStore};
use super::rows::{conflict_or_db, db, delete_row, get_body, list_bodies, to_json};
use super::tokens::insert_token;
use crate::error::{Result, StoreError};
use crate::records::TokenRecord;

pub(super) async fn create_host(
    store: &SqliteStore,
    h: &Host,
    host_token: &TokenRecord,
    join_token_id: &str,
) -> Result<()> {
    let h = h.clone();
    let t = host_token.clone();
    let join_id = join_token_id.to_string();
    store
        .write(move |c| {
            atomic(c, |tx| {
                let left: Option<Option<i64>> = tx
                    .query_row(
                        "SELECT uses_left FROM tokens WHERE id = ?1 AND kind = 'join'",
                        [&join_id],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(db("create_host"))?;
                // A used-up token is deleted with its last use, so a
                // missing one is (most likely) used up too.
                match left {
                    None | Some(Some(i64::MIN..=0)) => {
                        return Err(StoreError::Conflict(
                            "join token is used up, expired or revoked".into(),
                        ))
                    }
                    Some(Some(1)) => {
                        tx.execute("DELETE FROM tokens WHERE id = ?1", [&join_id])
                            .map_err(db("create_host"))?;
                    }
                    Some(Some(_)) => {
                        tx.execute(
                            "UPDATE tokens SET uses_left = uses_left - 1 WHERE id = ?1",
                            [&join_id],
                        )
                        .map_err(db("create_host"))?;
                    }
                    Some(None) => {}
                }
                tx.execute(
                    "INSERT INTO hosts (id, name, site, body) VALUES (?1, ?2, ?3, ?4)",
                    params![h.id, h.name, h.site, to_json(&h)?],
                )
                .map_err(|e| {
                    conflict_or_db(e, "create_host", || {
                        format!("host '{}' already exists", h.name)
                    })
                })?;
                insert_token(tx, &t)?;
                Ok(())
            })
        })
        .await
}

pub(super) async fn update_host(store: &SqliteStore, h: &Host) -> Result<()> {
    // Encoded here, not on the writer thread; a cached statement, since
    // hosts' snapshots and state changes come at thousands a second.
    let (id, body) = (h.id.clone(), to_json(h)?);
    store
        .write(move |c| {
            let n = c
                .prepare_cached("UPDATE hosts SET body = ?2 WHERE id = ?1")
                .map_err(db("update_host"))?
                .execute(params![id, body])
                .map_err(db("update_host"))?;
            if n == 0 {
                return Err(StoreError::not_found("host", id));
            }
            Ok(())
        })
        .await
}

pub(super) async fn list_hosts(store: &SqliteStore) -> Result<Vec<Host>> {
    store.read(|c| list_bodies(c, "hosts")).await
}

pub(super) async fn get_host(store: &SqliteStore, key: &str) -> Result<Host> {
    let key = key.to_string();
    store
        .read(move |c| get_body(c, "hosts", "host", &key))
        .await
}

pub(super) async fn delete_host(store: &SqliteStore, id: &str) -> Result<()> {
    let id = id.to_string();
    store
        .write(move |c| {
            atomic(c, |tx| {
                let h: Host = get_body(tx, "hosts", "host", &id)?;
                delete_row(tx, "hosts", "host", &h.id)?;
                tx.execute("DELETE FROM tokens WHERE host_id = ?1", [&h.id])
                    .map_err(db("delete_host"))?;
                Ok(())
            })
        })
        .await
}
