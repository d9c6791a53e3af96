//! VM exports: a VM's disk offered for download, kept until deleted.

use virt8ra_api::VmExport;

use super::engine::{commit, retry, Lock, PgStore};
use super::rows::{db, from_json, to_json};
use crate::error::{Result, StoreError};

pub(super) async fn put_export(store: &PgStore, e: &VmExport) -> Result<()> {
    let body = to_json(e)?;
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Shared).await?;
        tx.execute(
            "INSERT INTO exports (id, vm_id, body) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET body = excluded.body",
            &[&e.id, &e.vm_id, &body],
        )
        .await
        .map_err(db("put_export"))?;
        // Where the exported copy is: in the same transaction.
        super::audit::sync_export(&tx, e).await?;
        commit(tx, "put_export").await
    })
    .await
}

pub(super) async fn get_export(store: &PgStore, id: &str) -> Result<VmExport> {
    let c = store.client().await?;
    let row = c
        .query_opt("SELECT body FROM exports WHERE id = $1", &[&id])
        .await
        .map_err(db("get_export"))?;
    match row {
        Some(r) => from_json(&r.try_get::<_, String>(0).map_err(db("get_export"))?),
        None => Err(StoreError::not_found("export", id)),
    }
}
