//! Images, which VMs that are not deleted keep from being deleted.

use rusqlite::params;
use virt8ra_api::Image;

use super::engine::{atomic, SqliteStore};
use super::rows::{conflict_or_db, db, delete_row, get_body, list_bodies, to_json};
use crate::error::{Result, StoreError};

pub(super) async fn create_image(store: &SqliteStore, i: &Image) -> Result<()> {
    let i = i.clone();
    store
        .write(move |c| {
            c.execute(
                "INSERT INTO images (id, name, sha256, body) VALUES (?1, ?2, ?3, ?4)",
                params![i.id, i.name, i.sha256, to_json(&i)?],
            )
            .map_err(|e| {
                conflict_or_db(e, "create_image", || {
                    format!("image '{}' already exists", i.name)
                })
            })?;
            Ok(())
        })
        .await
}

pub(super) async fn list_images(store: &SqliteStore) -> Result<Vec<Image>> {
    store.read(|c| list_bodies(c, "images")).await
}

pub(super) async fn get_image(store: &SqliteStore, key: &str) -> Result<Image> {
    let key = key.to_string();
    store
        .read(move |c| get_body(c, "images", "image", &key))
        .await
}

pub(super) async fn delete_image(store: &SqliteStore, id: &str) -> Result<()> {
    let id = id.to_string();
    store
        .write(move |c| {
            atomic(c, |tx| {
                let i: Image = get_body(tx, "images", "image", &id)?;
                let n: i64 = tx
                    .query_row(
                        "SELECT COUNT(*) FROM vms WHERE image_id = ?1 AND phase <> 'deleted'",
                        [&i.id],
                        |r| r.get(0),
                    )
                    .map_err(db("delete_image"))?;
                if n > 0 {
                    return Err(StoreError::Conflict(format!(
                        "image '{}' is used by {n} VM(s)",
                        i.name
                    )));
                }
                // Data disks name their images only in the body: a scan (an
                // image is deleted rarely), narrowed by a plain substring test
                // before the JSON is parsed.
                let n: i64 = tx
                    .query_row(
                        "SELECT COUNT(*) FROM vms WHERE phase <> 'deleted' AND instr(body, ?1) > 0
                 AND EXISTS (SELECT 1 FROM json_each(body, '$.status.data_image_ids')
                             WHERE value = ?1)",
                        [&i.id],
                        |r| r.get(0),
                    )
                    .map_err(db("delete_image"))?;
                if n > 0 {
                    return Err(StoreError::Conflict(format!(
                        "image '{}' is the data disk of {n} VM(s)",
                        i.name
                    )));
                }
                delete_row(tx, "images", "image", &i.id)?;
                Ok(())
            })
        })
        .await
}

pub(super) async fn update_image(store: &SqliteStore, i: &Image) -> Result<()> {
    let i = i.clone();
    store
        .write(move |c| {
            let n = c
                .execute(
                    "UPDATE images SET body = ?2 WHERE id = ?1",
                    params![i.id, to_json(&i)?],
                )
                .map_err(db("update_image"))?;
            if n == 0 {
                return Err(StoreError::not_found("image", &i.id));
            }
            Ok(())
        })
        .await
}
