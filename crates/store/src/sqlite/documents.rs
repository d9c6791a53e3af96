//! Documents: resources kept whole as JSON under a kind, with a unique name
//! per kind (catalogs, appliances, apps).

use rusqlite::{params, OptionalExtension};

use super::engine::SqliteStore;
use super::rows::{conflict_or_db, db};
use crate::error::Result;

pub(super) async fn put_doc(
    store: &SqliteStore,
    kind: &str,
    id: &str,
    name: &str,
    body: &str,
) -> Result<()> {
    let (kind, id, name, body) = (
        kind.to_string(),
        id.to_string(),
        name.to_string(),
        body.to_string(),
    );
    store
        .write(move |c| {
            c.execute(
                "INSERT INTO documents (kind, id, name, body) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (kind, id) DO UPDATE SET name = excluded.name, body = excluded.body",
                params![kind, id, name, body],
            )
            .map_err(|e| {
                conflict_or_db(e, "put_doc", || format!("{kind} '{name}' already exists"))
            })?;
            Ok(())
        })
        .await
}

pub(super) async fn get_doc(store: &SqliteStore, kind: &str, key: &str) -> Result<Option<String>> {
    let (kind, key) = (kind.to_string(), key.to_string());
    store
        .read(move |c| {
            c.query_row(
                "SELECT body FROM documents WHERE kind = ?1 AND (id = ?2 OR name = ?2) LIMIT 1",
                params![kind, key],
                |r| r.get(0),
            )
            .optional()
            .map_err(db("get_doc"))
        })
        .await
}

pub(super) async fn list_docs(store: &SqliteStore, kind: &str) -> Result<Vec<String>> {
    let kind = kind.to_string();
    store
        .read(move |c| {
            let mut st = c
                .prepare("SELECT body FROM documents WHERE kind = ?1 ORDER BY name")
                .map_err(db("list_docs"))?;
            let rows = st
                .query_map([&kind], |r| r.get::<_, String>(0))
                .map_err(db("list_docs"))?;
            let mut out = Vec::new();
            for r in rows {
                out.push(r.map_err(db("list_docs"))?);
            }
            Ok(out)
        })
        .await
}

pub(super) async fn delete_doc(store: &SqliteStore, kind: &str, id: &str) -> Result<bool> {
    let (kind, id) = (kind.to_string(), id.to_string());
    store
        .write(move |c| {
            let n = c
                .execute(
                    "DELETE FROM documents WHERE kind = ?1 AND id = ?2",
                    params![kind, id],
                )
                .map_err(db("delete_doc"))?;
            Ok(n > 0)
        })
        .await
}
