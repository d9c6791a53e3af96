//! The audit log (append-only; a trigger refuses updates) and each VM's
//! residency trail: its reads, and the writes the VM, migration and export
//! writes make inside their own transactions ([`sync_vm`], [`sync_export`];
//! the rules are `crate::residency`'s).

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use virt8ra_api::{AuditRecord, ResidencyInterval, Vm, VmExport};

use super::engine::SqliteStore;
use super::rows::{db, from_json, to_json, ts};
use crate::audit_query::{audit_where, Dialect};
use crate::error::Result;
use crate::records::AuditFilter;
use crate::residency::{self, Why};

pub(super) async fn append_audit(store: &SqliteStore, r: &AuditRecord) -> Result<u64> {
    let body = to_json(r)?;
    let (at, actor) = (ts(&r.at), r.actor.token_id.clone().unwrap_or_default());
    let kind = r.actor.token_kind.clone().unwrap_or_default();
    let resource = r.resource.clone();
    store
        .write(move |c| {
            c.prepare_cached(
                "INSERT INTO audit_log (at, actor, kind, resource, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .map_err(db("append_audit"))?
            .execute(params![at, actor, kind, resource, body])
            .map_err(db("append_audit"))?;
            Ok(c.last_insert_rowid() as u64)
        })
        .await
}

/// SQLite's spelling of an audit query (see [`crate::audit_query`]).
const DIALECT: Dialect = Dialect {
    param: |n| format!("?{n}"),
    actor_field: |k| format!("json_extract(body, '$.actor.{k}')"),
    as_seq: |p| p,
};

pub(super) async fn list_audit(store: &SqliteStore, f: &AuditFilter) -> Result<Vec<AuditRecord>> {
    let (clause, args) = audit_where(f, &DIALECT);
    let sql = format!(
        "SELECT seq, body FROM audit_log{clause} ORDER BY seq LIMIT {}",
        f.limit
    );
    store
        .read(move |c| {
            let mut st = c.prepare(&sql).map_err(db("list_audit"))?;
            let rows = st
                .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                })
                .map_err(db("list_audit"))?;
            let mut out = Vec::new();
            for r in rows {
                let (seq, body) = r.map_err(db("list_audit"))?;
                let mut rec: AuditRecord = from_json(&body)?;
                rec.seq = seq as u64;
                out.push(rec);
            }
            Ok(out)
        })
        .await
}

pub(super) async fn prune_audit(store: &SqliteStore, before: DateTime<Utc>) -> Result<usize> {
    let before = ts(&before);
    store
        .write(move |c| {
            c.execute("DELETE FROM audit_log WHERE at < ?1", [&before])
                .map_err(db("prune_audit"))
        })
        .await
}

fn intervals(
    c: &Connection,
    sql: &str,
    args: &[&dyn rusqlite::ToSql],
) -> Result<Vec<ResidencyInterval>> {
    let mut st = c.prepare_cached(sql).map_err(db("residency"))?;
    let rows = st
        .query_map(args, |r| r.get::<_, String>(0))
        .map_err(db("residency"))?;
    let mut out = Vec::new();
    for r in rows {
        out.push(from_json(&r.map_err(db("residency"))?)?);
    }
    Ok(out)
}

pub(super) async fn vm_residency(
    store: &SqliteStore,
    vm_id: &str,
) -> Result<Vec<ResidencyInterval>> {
    let vm_id = vm_id.to_string();
    store
        .read(move |c| {
            intervals(
                c,
                "SELECT body FROM vm_residency WHERE vm_id = ?1 ORDER BY seq",
                &[&vm_id],
            )
        })
        .await
}

pub(super) async fn residency_between(
    store: &SqliteStore,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<ResidencyInterval>> {
    let (from, to) = (ts(&from), ts(&to));
    store
        .read(move |c| {
            intervals(
                c,
                "SELECT body FROM vm_residency WHERE from_at < ?2 AND (to_at IS NULL OR to_at > ?1)
                 ORDER BY vm_id, seq",
                &[&from, &to],
            )
        })
        .await
}

/// Closes the open interval of `copy` (if any) with `ended_by`; returns
/// the next sequence number of the VM's trail.
fn close_open(
    tx: &Connection,
    vm_id: &str,
    copy: &str,
    ended_by: &str,
    at: &DateTime<Utc>,
) -> Result<i64> {
    let open: Option<(i64, String)> = tx
        .prepare_cached(
            "SELECT seq, body FROM vm_residency WHERE vm_id = ?1 AND copy = ?2 AND to_at IS NULL",
        )
        .map_err(db("residency"))?
        .query_row([vm_id, copy], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(db("residency"))?;
    if let Some((seq, body)) = open {
        let mut i: ResidencyInterval = from_json(&body)?;
        i.to = Some(*at);
        i.ended_by = Some(ended_by.to_string());
        tx.prepare_cached(
            "UPDATE vm_residency SET to_at = ?3, body = ?4 WHERE vm_id = ?1 AND seq = ?2",
        )
        .map_err(db("residency"))?
        .execute(params![vm_id, seq, ts(at), to_json(&i)?])
        .map_err(db("residency"))?;
    }
    tx.prepare_cached("SELECT COALESCE(MAX(seq), 0) + 1 FROM vm_residency WHERE vm_id = ?1")
        .map_err(db("residency"))?
        .query_row([vm_id], |r| r.get(0))
        .map_err(db("residency"))
}

fn insert(tx: &Connection, mut i: ResidencyInterval, seq: i64) -> Result<()> {
    i.seq = seq as u64;
    tx.prepare_cached(
        "INSERT INTO vm_residency (vm_id, seq, copy, from_at, to_at, body) VALUES (?1, ?2, ?3, ?4, NULL, ?5)",
    )
    .map_err(db("residency"))?
    .execute(params![i.vm_id, seq, i.copy, ts(&i.from), to_json(&i)?])
    .map_err(db("residency"))?;
    Ok(())
}

/// The trail's part of a VM write that moved the VM (see
/// `residency::moved`), in the write's transaction.
pub(super) fn sync_vm(tx: &Connection, vm: &Vm, why: Why<'_>) -> Result<()> {
    let at = Utc::now();
    let change = residency::change(vm, why, at);
    let next = match why {
        // A new VM has no trail yet.
        Why::Create => 1,
        _ => close_open(tx, &vm.id, residency::VM_COPY, &change.ended_by, &at)?,
    };
    match change.open {
        Some(i) => insert(tx, i, next),
        None => Ok(()),
    }
}

/// The trail's part of an export write: its first write opens its
/// interval, its removal (or failure) closes it.
pub(super) fn sync_export(tx: &Connection, e: &VmExport) -> Result<()> {
    let copy = residency::export_copy(e);
    let at = Utc::now();
    if residency::export_gone(e) {
        close_open(tx, &e.vm_id, &copy, &format!("export {}", e.state), &at)?;
        return Ok(());
    }
    let known: bool = tx
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM vm_residency WHERE vm_id = ?1 AND copy = ?2)")
        .map_err(db("residency"))?
        .query_row([&e.vm_id, &copy], |r| r.get(0))
        .map_err(db("residency"))?;
    if known {
        return Ok(());
    }
    let body: Option<String> = tx
        .query_row("SELECT body FROM vms WHERE id = ?1", [&e.vm_id], |r| {
            r.get(0)
        })
        .optional()
        .map_err(db("residency"))?;
    let Some(body) = body else {
        return Ok(());
    };
    let vm: Vm = from_json(&body)?;
    let next = close_open(tx, &e.vm_id, &copy, "", &at)?;
    insert(tx, residency::export_interval(&vm, e, at), next)
}
