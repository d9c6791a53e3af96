//! Images, which VMs that are not deleted keep from being deleted.

use virt8ra_api::Image;

use super::engine::{commit, retry, Lock, PgStore};
use super::rows::{conflict_or_db, db, delete_row, get_body, list_bodies, to_json};
use crate::error::{Result, StoreError};

pub(super) async fn create_image(store: &PgStore, i: &Image) -> Result<()> {
    let body = to_json(i)?;
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Shared).await?;
        tx.execute(
            "INSERT INTO images (id, name, sha256, body) VALUES ($1, $2, $3, $4)",
            &[&i.id, &i.name, &i.sha256, &body],
        )
        .await
        .map_err(|e| {
            conflict_or_db(e, "create_image", || {
                format!("image '{}' already exists", i.name)
            })
        })?;
        commit(tx, "create_image").await
    })
    .await
}

pub(super) async fn list_images(store: &PgStore) -> Result<Vec<Image>> {
    list_bodies(&store.client().await?, "images").await
}

pub(super) async fn get_image(store: &PgStore, key: &str) -> Result<Image> {
    get_body(&store.client().await?, "images", "image", key).await
}

/// Runs alone ([`Lock::Exclusive`]): no VM can take the image between the
/// counts and the delete.
pub(super) async fn delete_image(store: &PgStore, id: &str) -> Result<()> {
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Exclusive).await?;
        let i: Image = get_body(&tx, "images", "image", id).await?;
        let n: i64 = tx
            .query_one(
                "SELECT COUNT(*) FROM vms WHERE image_id = $1 AND phase <> 'deleted'",
                &[&i.id],
            )
            .await
            .and_then(|r| r.try_get(0))
            .map_err(db("delete_image"))?;
        if n > 0 {
            return Err(StoreError::Conflict(format!(
                "image '{}' is used by {n} VM(s)",
                i.name
            )));
        }
        // Data disks name their images only in the body: a scan (an image
        // is deleted rarely), narrowed by a plain substring test before
        // the JSON is parsed.
        let n: i64 = tx
            .query_one(
                "SELECT COUNT(*) FROM vms WHERE phase <> 'deleted' AND strpos(body, $1) > 0
                 AND EXISTS (SELECT 1 FROM jsonb_array_elements_text(
                                 body::jsonb #> '{status,data_image_ids}') AS d(v)
                             WHERE d.v = $1)",
                &[&i.id],
            )
            .await
            .and_then(|r| r.try_get(0))
            .map_err(db("delete_image"))?;
        if n > 0 {
            return Err(StoreError::Conflict(format!(
                "image '{}' is the data disk of {n} VM(s)",
                i.name
            )));
        }
        delete_row(&tx, "images", "image", &i.id).await?;
        commit(tx, "delete_image").await
    })
    .await
}

pub(super) async fn update_image(store: &PgStore, i: &Image) -> Result<()> {
    let body = to_json(i)?;
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Shared).await?;
        let n = tx
            .execute("UPDATE images SET body = $2 WHERE id = $1", &[&i.id, &body])
            .await
            .map_err(db("update_image"))?;
        if n == 0 {
            return Err(StoreError::not_found("image", &i.id));
        }
        commit(tx, "update_image").await
    })
    .await
}
