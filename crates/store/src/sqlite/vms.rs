//! VMs and their event log: the hot path of the store (every state change of
//! every VM), so its writes run without savepoints ([`unguarded`]) and
//! through cached statements.

use chrono::Utc;
use rusqlite::{params, Connection, OptionalExtension};
use virt8ra_api::{Vm, VmEvent, VmPhase};

use super::engine::{atomic, unguarded, SqliteStore};
use super::rows::{conflict_or_db, db, from_json, parse_ts, to_json, ts};
use crate::error::{Result, StoreError};
use crate::records::VmFilter;
use crate::residency::{self, Why};

/// A VM by id or by name; a live VM's name wins over a deleted one's.
pub(super) const GET_VM_SQL: &str =
    "SELECT body FROM vms WHERE id = ?1 OR name = ?1 ORDER BY (phase = 'deleted') LIMIT 1";

/// Replaces a VM row (`body` is its JSON), and appends an event when given.
pub(super) fn write_vm(
    tx: &Connection,
    vm: &Vm,
    body: &str,
    event: Option<&str>,
    why: Why<'_>,
) -> Result<()> {
    // An UPDATE that names an indexed column rewrites that column's index
    // entry even when the value is the same: setting phase (in the partial
    // name index's condition) or image_id on every write dirtied another
    // index page per write. So those two are set only when they changed.
    // The old host too: a write that moves the VM (or deletes it) writes
    // its residency trail.
    type Old = (String, Option<String>, Option<String>);
    let old: Option<Old> = tx
        .prepare_cached("SELECT phase, image_id, host_id FROM vms WHERE id = ?1")
        .map_err(db("write_vm"))?
        .query_row([&vm.id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()
        .map_err(db("write_vm"))?;
    let Some((phase, image_id, old_host)) = old else {
        return Err(StoreError::not_found("VM", vm.id.clone()));
    };
    if residency::moved(old_host.as_deref(), &phase, vm) {
        super::audit::sync_vm(tx, vm, why)?;
    }
    if !vm.status.nics.is_empty() {
        super::networks::sync_leases(tx, vm)?;
    }
    let mut sql = String::from(
        "UPDATE vms SET host_id = ?2, site = ?3, provider = ?4, country = ?5, body = ?6",
    );
    if phase != vm.status.phase.as_str() {
        sql.push_str(", phase = ?7");
    }
    if image_id != vm.status.image_id {
        sql.push_str(", image_id = ?8");
    }
    sql.push_str(" WHERE id = ?1");
    let mut stmt = tx.prepare_cached(&sql).map_err(db("write_vm"))?;
    let values: [&dyn rusqlite::ToSql; 8] = [
        &vm.id,
        &vm.status.host_id,
        &vm.status.site,
        &vm.status.provider,
        &vm.status.country,
        &body,
        &vm.status.phase.as_str(),
        &vm.status.image_id,
    ];
    // Numbered parameters may leave gaps; the count is the largest used.
    for (i, v) in values.iter().enumerate().take(stmt.parameter_count()) {
        stmt.raw_bind_parameter(i + 1, v).map_err(db("write_vm"))?;
    }
    stmt.raw_execute().map_err(db("write_vm"))?;
    if let Some(e) = event {
        insert_event(tx, vm, e)?;
    }
    Ok(())
}

fn insert_event(conn: &Connection, vm: &Vm, message: &str) -> Result<()> {
    // Cached statements: these run for every VM change.
    let seq: i64 = conn
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) + 1 FROM vm_events WHERE vm_id = ?1")
        .map_err(db("insert_event"))?
        .query_row([&vm.id], |r| r.get(0))
        .map_err(db("insert_event"))?;
    insert_event_at(conn, vm, seq, message)
}

/// Inserts event number `seq` of `vm`. A VM just inserted has no events
/// yet (its id is new: the insert of its row would have failed otherwise),
/// so its events are numbered from 1 without looking.
fn insert_event_at(conn: &Connection, vm: &Vm, seq: i64, message: &str) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO vm_events (vm_id, seq, at, phase, message) VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .map_err(db("insert_event_at"))?
    .execute(params![
        vm.id,
        seq,
        ts(&Utc::now()),
        vm.status.phase.as_str(),
        message
    ])
    .map_err(db("insert_event_at"))?;
    Ok(())
}

pub(super) async fn create_vm(store: &SqliteStore, vm: &Vm, events: &[&str]) -> Result<()> {
    // Encoded here, not on the writer thread, which every write shares.
    let body = to_json(vm)?;
    let vm = vm.clone();
    let events: Vec<String> = events.iter().map(|e| e.to_string()).collect();
    store
        .write(move |c| {
            let job = |tx: &Connection| {
                insert_vm(tx, &vm, &body)?;
                for (seq, e) in (1..).zip(&events) {
                    insert_event_at(tx, &vm, seq, e)?;
                }
                if !vm.status.nics.is_empty() {
                    super::networks::sync_leases(tx, &vm)?;
                }
                if residency::moved(None, "", &vm) {
                    super::audit::sync_vm(tx, &vm, Why::Create)?;
                }
                Ok(())
            };
            // A VM with NICs takes leases, which may conflict after its row
            // is in: that needs a savepoint of its own (see `unguarded`).
            if vm.status.nics.is_empty() {
                unguarded(c, job)
            } else {
                atomic(c, job)
            }
        })
        .await
}

fn insert_vm(tx: &Connection, vm: &Vm, body: &str) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO vms (id, name, phase, host_id, site, provider, country, image_id, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )
    .map_err(db("create_vm"))?
    .execute(params![
        vm.id,
        vm.name,
        vm.status.phase.as_str(),
        vm.status.host_id,
        vm.status.site,
        vm.status.provider,
        vm.status.country,
        vm.status.image_id,
        body
    ])
    .map_err(|e| {
        conflict_or_db(e, "create_vm", || {
            format!("VM '{}' already exists", vm.name)
        })
    })?;
    Ok(())
}

pub(super) async fn update_vm(store: &SqliteStore, vm: &Vm, event: Option<&str>) -> Result<()> {
    let body = to_json(vm)?;
    let vm = vm.clone();
    let event = event.map(str::to_string);
    store
        .write(move |c| {
            let job = |tx: &Connection| write_vm(tx, &vm, &body, event.as_deref(), Why::Update);
            // Leases may conflict after the VM's row changed (see create_vm).
            if vm.status.nics.is_empty() {
                unguarded(c, job)
            } else {
                atomic(c, job)
            }
        })
        .await
}

pub(super) async fn get_vm(store: &SqliteStore, key: &str) -> Result<Vm> {
    let key = key.to_string();
    store
        .read(move |c| {
            // A live VM's name wins over a deleted one's.
            let body: Option<String> = c
                .query_row(GET_VM_SQL, [&key], |r| r.get(0))
                .optional()
                .map_err(db("get_vm"))?;
            match body {
                Some(b) => from_json(&b),
                None => Err(StoreError::not_found("VM", key)),
            }
        })
        .await
}

pub(super) async fn list_vms(store: &SqliteStore, f: &VmFilter) -> Result<Vec<Vm>> {
    let f = f.clone();
    store
        .read(move |c| {
            let mut sql = String::from("SELECT body FROM vms WHERE 1=1");
            let mut args: Vec<String> = Vec::new();
            let mut add = |col: &str, v: &Option<String>, sql: &mut String| {
                if let Some(v) = v {
                    args.push(v.clone());
                    sql.push_str(&format!(" AND {col} = ?{}", args.len()));
                }
            };
            add("host_id", &f.host_id, &mut sql);
            add("site", &f.site, &mut sql);
            add("provider", &f.provider, &mut sql);
            add("country", &f.country, &mut sql);
            add("phase", &f.phase.map(|p| p.as_str().to_string()), &mut sql);
            // Not a column: the store's list is not the hot path (the
            // control plane's index serves lists), so the body is read.
            add(
                "COALESCE(json_extract(body, '$.project'), 'default')",
                &f.project,
                &mut sql,
            );
            if let Some(after) = &f.after_id {
                args.push(after.clone());
                sql.push_str(&format!(" AND id > ?{}", args.len()));
            }
            if !f.include_deleted && f.phase != Some(VmPhase::Deleted) {
                sql.push_str(" AND phase <> 'deleted'");
            }
            sql.push_str(" ORDER BY id");
            if let Some(l) = f.limit {
                sql.push_str(&format!(" LIMIT {l}"));
            }
            let mut st = c.prepare(&sql).map_err(db("list_vms"))?;
            let rows = st
                .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                    r.get::<_, String>(0)
                })
                .map_err(db("list_vms"))?;
            let mut out = Vec::new();
            for r in rows {
                out.push(from_json(&r.map_err(db("list_vms"))?)?);
            }
            Ok(out)
        })
        .await
}

pub(super) async fn vm_events(store: &SqliteStore, vm_id: &str) -> Result<Vec<VmEvent>> {
    let vm_id = vm_id.to_string();
    store
        .read(move |c| {
            let mut st = c
                .prepare(
                    "SELECT seq, at, phase, message FROM vm_events WHERE vm_id = ?1 ORDER BY seq",
                )
                .map_err(db("vm_events"))?;
            let rows = st
                .query_map([&vm_id], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                })
                .map_err(db("vm_events"))?;
            let mut out = Vec::new();
            for r in rows {
                let (seq, at, phase, message) = r.map_err(db("vm_events"))?;
                out.push(VmEvent {
                    seq: seq as u64,
                    at: parse_ts(&at)?,
                    phase: VmPhase::parse(&phase).ok_or_else(|| {
                        StoreError::db_failure(format!("corrupt phase {phase:?}"))
                    })?,
                    message,
                });
            }
            Ok(out)
        })
        .await
}
