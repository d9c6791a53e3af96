//! VM migrations: moves of a VM from one host to another, each stored with
//! the VM that names it. (Schema upgrades are in [`crate::schema`].)

use rusqlite::{params, OptionalExtension};
use virt8ra_api::{Migration, Vm};

use super::engine::{atomic, SqliteStore};
use super::rows::{conflict_or_db, db, from_json, to_json, ts};
use super::vms::write_vm;
use crate::error::{Result, StoreError};
use crate::residency::Why;

pub(super) async fn create_migration(
    store: &SqliteStore,
    m: &Migration,
    vm: &Vm,
    event: &str,
) -> Result<()> {
    let (m, vm, event) = (m.clone(), vm.clone(), event.to_string());
    let body = to_json(&vm)?;
    store.write(move |c| {
        atomic(c, |tx| {
        tx.execute(
            "INSERT INTO migrations (id, vm_id, phase, created_at, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![m.id, m.vm_id, m.phase.as_str(), ts(&m.created_at), to_json(&m)?],
        )
        .map_err(|e| {
            conflict_or_db(e, "create_migration", || format!("VM '{}' is already being migrated", m.vm))
        })?;
        write_vm(tx, &vm, &body, Some(&event), Why::Migration(&m))?;
        Ok(())
        })
    })
    .await
}

pub(super) async fn update_migration(
    store: &SqliteStore,
    m: &Migration,
    vm: Option<&Vm>,
    event: Option<&str>,
) -> Result<()> {
    let (m, vm, event) = (m.clone(), vm.cloned(), event.map(str::to_string));
    let body = vm.as_ref().map(to_json).transpose()?;
    store
        .write(move |c| {
            atomic(c, |tx| {
                let n = tx
                    .execute(
                        "UPDATE migrations SET phase = ?2, body = ?3 WHERE id = ?1",
                        params![m.id, m.phase.as_str(), to_json(&m)?],
                    )
                    .map_err(db("update_migration"))?;
                if n == 0 {
                    return Err(StoreError::not_found("migration", m.id));
                }
                if let (Some(vm), Some(body)) = (vm, body) {
                    write_vm(tx, &vm, &body, event.as_deref(), Why::Migration(&m))?;
                }
                Ok(())
            })
        })
        .await
}

pub(super) async fn get_migration(store: &SqliteStore, id: &str) -> Result<Migration> {
    let id = id.to_string();
    store
        .read(move |c| {
            let body: Option<String> = c
                .query_row("SELECT body FROM migrations WHERE id = ?1", [&id], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(db("get_migration"))?;
            match body {
                Some(b) => from_json(&b),
                None => Err(StoreError::not_found("migration", id)),
            }
        })
        .await
}

pub(super) async fn list_migrations(
    store: &SqliteStore,
    vm_id: Option<&str>,
    active: bool,
) -> Result<Vec<Migration>> {
    let vm_id = vm_id.map(str::to_string);
    store
        .read(move |c| {
            let mut sql = String::from("SELECT body FROM migrations WHERE 1=1");
            if vm_id.is_some() {
                sql.push_str(" AND vm_id = ?1");
            }
            if active {
                sql.push_str(" AND phase NOT IN ('completed', 'failed')");
            }
            sql.push_str(" ORDER BY created_at, id");
            let mut st = c.prepare(&sql).map_err(db("list_migrations"))?;
            let mut rows = match &vm_id {
                Some(v) => st.query([v]),
                None => st.query([]),
            }
            .map_err(db("list_migrations"))?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(db("list_migrations"))? {
                out.push(from_json(
                    &r.get::<_, String>(0).map_err(db("list_migrations"))?,
                )?);
            }
            Ok(out)
        })
        .await
}
