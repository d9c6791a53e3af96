//! VM migrations: moves of a VM from one host to another, each stored with
//! the VM that names it. (Schema upgrades are in [`crate::schema`].)

use virt8ra_api::{Migration, Vm};

use super::engine::{commit, retry, Lock, PgStore};
use super::rows::{conflict_or_db, db, from_json, texts, to_json, ts};
use super::vms::write_vm;
use crate::error::{Result, StoreError};
use crate::residency::Why;

pub(super) async fn create_migration(
    store: &PgStore,
    m: &Migration,
    vm: &Vm,
    event: &str,
) -> Result<()> {
    let (mbody, vbody) = (to_json(m)?, to_json(vm)?);
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Shared).await?;
        tx.execute(
            "INSERT INTO migrations (id, vm_id, phase, created_at, body)
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &m.id,
                &m.vm_id,
                &m.phase.as_str(),
                &ts(&m.created_at),
                &mbody,
            ],
        )
        .await
        .map_err(|e| {
            conflict_or_db(e, "create_migration", || {
                format!("VM '{}' is already being migrated", m.vm)
            })
        })?;
        write_vm(&tx, vm, &vbody, Some(event), Why::Migration(m)).await?;
        commit(tx, "create_migration").await
    })
    .await
}

pub(super) async fn update_migration(
    store: &PgStore,
    m: &Migration,
    vm: Option<&Vm>,
    event: Option<&str>,
) -> Result<()> {
    let mbody = to_json(m)?;
    let vm = vm.map(|v| to_json(v).map(|b| (v, b))).transpose()?;
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Shared).await?;
        let n = tx
            .execute(
                "UPDATE migrations SET phase = $2, body = $3 WHERE id = $1",
                &[&m.id, &m.phase.as_str(), &mbody],
            )
            .await
            .map_err(db("update_migration"))?;
        if n == 0 {
            return Err(StoreError::not_found("migration", m.id.clone()));
        }
        if let Some((vm, body)) = &vm {
            write_vm(&tx, vm, body, event, Why::Migration(m)).await?;
        }
        commit(tx, "update_migration").await
    })
    .await
}

pub(super) async fn get_migration(store: &PgStore, id: &str) -> Result<Migration> {
    let c = store.client().await?;
    let row = c
        .query_opt("SELECT body FROM migrations WHERE id = $1", &[&id])
        .await
        .map_err(db("get_migration"))?;
    match row {
        Some(r) => from_json(&r.try_get::<_, String>(0).map_err(db("get_migration"))?),
        None => Err(StoreError::not_found("migration", id)),
    }
}

pub(super) async fn list_migrations(
    store: &PgStore,
    vm_id: Option<&str>,
    active: bool,
) -> Result<Vec<Migration>> {
    let mut sql = String::from("SELECT body FROM migrations WHERE true");
    if vm_id.is_some() {
        sql.push_str(" AND vm_id = $1");
    }
    if active {
        sql.push_str(" AND phase NOT IN ('completed', 'failed')");
    }
    sql.push_str(" ORDER BY created_at, id");
    let c = store.client().await?;
    let rows = match &vm_id {
        Some(v) => c.query(&sql, &[v]).await,
        None => c.query(&sql, &[]).await,
    }
    .map_err(db("list_migrations"))?;
    texts(&rows, "list_migrations")?
        .iter()
        .map(|b| from_json(b))
        .collect()
}
