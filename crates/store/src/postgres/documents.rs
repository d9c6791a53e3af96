//! Documents: resources kept whole as JSON under a kind, with a unique name
//! per kind (catalogs, appliances, apps).

use super::engine::{commit, retry, Lock, PgStore};
use super::rows::{conflict_or_db, db, texts};
use crate::error::Result;

pub(super) async fn put_doc(
    store: &PgStore,
    kind: &str,
    id: &str,
    name: &str,
    body: &str,
) -> Result<()> {
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Shared).await?;
        tx.execute(
            "INSERT INTO documents (kind, id, name, body) VALUES ($1, $2, $3, $4)
             ON CONFLICT (kind, id) DO UPDATE SET name = excluded.name, body = excluded.body",
            &[&kind, &id, &name, &body],
        )
        .await
        .map_err(|e| conflict_or_db(e, "put_doc", || format!("{kind} '{name}' already exists")))?;
        commit(tx, "put_doc").await
    })
    .await
}

pub(super) async fn get_doc(store: &PgStore, kind: &str, key: &str) -> Result<Option<String>> {
    let c = store.client().await?;
    let row = c
        .query_opt(
            "SELECT body FROM documents WHERE kind = $1 AND (id = $2 OR name = $2) LIMIT 1",
            &[&kind, &key],
        )
        .await
        .map_err(db("get_doc"))?;
    row.map(|r| r.try_get(0).map_err(db("get_doc"))).transpose()
}

pub(super) async fn list_docs(store: &PgStore, kind: &str) -> Result<Vec<String>> {
    let c = store.client().await?;
    let rows = c
        .query(
            "SELECT body FROM documents WHERE kind = $1 ORDER BY name",
            &[&kind],
        )
        .await
        .map_err(db("list_docs"))?;
    texts(&rows, "list_docs")
}

pub(super) async fn delete_doc(store: &PgStore, kind: &str, id: &str) -> Result<bool> {
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Shared).await?;
        let n = tx
            .execute(
                "DELETE FROM documents WHERE kind = $1 AND id = $2",
                &[&kind, &id],
            )
            .await
            .map_err(db("delete_doc"))?;
        commit(tx, "delete_doc").await?;
        Ok(n > 0)
    })
    .await
}
