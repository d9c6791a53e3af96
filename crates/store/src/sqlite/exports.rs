//! VM exports: a VM's disk offered for download, kept until deleted.

use rusqlite::{params, OptionalExtension};
use virt8ra_api::VmExport;

use super::engine::{atomic, SqliteStore};
use super::rows::{db, from_json, to_json};
use crate::error::{Result, StoreError};

pub(super) async fn put_export(store: &SqliteStore, e: &VmExport) -> Result<()> {
    let e = e.clone();
    store
        .write(move |c| {
            atomic(c, |tx| {
                tx.execute(
                    "INSERT INTO exports (id, vm_id, body) VALUES (?1, ?2, ?3)
                 ON CONFLICT(id) DO UPDATE SET body = excluded.body",
                    params![e.id, e.vm_id, to_json(&e)?],
                )
                .map_err(db("put_export"))?;
                // Where the exported copy is: in the same transaction.
                super::audit::sync_export(tx, &e)
            })
        })
        .await
}

pub(super) async fn get_export(store: &SqliteStore, id: &str) -> Result<VmExport> {
    let id = id.to_string();
    store
        .read(move |c| {
            let body: Option<String> = c
                .query_row("SELECT body FROM exports WHERE id = ?1", [&id], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(db("get_export"))?;
            match body {
                Some(b) => from_json(&b),
                None => Err(StoreError::not_found("export", id)),
            }
        })
        .await
}
