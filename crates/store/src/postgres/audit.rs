//! The audit log (append-only; a trigger refuses updates) and each VM's
//! residency trail, as SQLite's `audit.rs`: its reads, and the writes the
//! VM, migration and export writes make inside their own transactions
//! ([`sync_vm`], [`sync_export`]; the rules are `crate::residency`'s).

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use tokio_postgres::types::ToSql;
use virt8ra_api::{AuditRecord, ResidencyInterval, Vm, VmExport};

use super::engine::{commit, retry, Lock, PgStore};
use super::rows::{db, from_json, to_json, ts};
use crate::audit_query::{audit_where, Dialect};
use crate::error::Result;
use crate::records::AuditFilter;
use crate::residency::{self, Why};

pub(super) async fn append_audit(store: &PgStore, r: &AuditRecord) -> Result<u64> {
    let body = to_json(r)?;
    let (at, actor) = (ts(&r.at), r.actor.token_id.clone().unwrap_or_default());
    let kind = r.actor.token_kind.clone().unwrap_or_default();
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Shared).await?;
        let row = tx
            .query_one(
                "INSERT INTO audit_log (at, actor, kind, resource, body)
                 VALUES ($1, $2, $3, $4, $5) RETURNING seq",
                &[&at, &actor, &kind, &r.resource, &body],
            )
            .await
            .map_err(db("append_audit"))?;
        let seq: i64 = row.try_get(0).map_err(db("append_audit"))?;
        commit(tx, "append_audit").await?;
        Ok(seq as u64)
    })
    .await
}

/// PostgreSQL's spelling of an audit query (see [`crate::audit_query`]).
const DIALECT: Dialect = Dialect {
    param: |n| format!("${n}"),
    actor_field: |k| format!("(body::jsonb #>> '{{actor,{k}}}')"),
    as_seq: |p| format!("{p}::text::bigint"),
};

pub(super) async fn list_audit(store: &PgStore, f: &AuditFilter) -> Result<Vec<AuditRecord>> {
    let (clause, args) = audit_where(f, &DIALECT);
    // Every parameter is text; a number is cast in the SQL.
    let sql = format!(
        "SELECT seq, body FROM audit_log{clause} ORDER BY seq LIMIT {}",
        f.limit
    );
    let c = store.client().await?;
    let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
    let rows = c.query(&sql, &params).await.map_err(db("list_audit"))?;
    let mut out = Vec::new();
    for r in rows {
        let seq: i64 = r.try_get(0).map_err(db("list_audit"))?;
        let mut rec: AuditRecord =
            from_json(&r.try_get::<_, String>(1).map_err(db("list_audit"))?)?;
        rec.seq = seq as u64;
        out.push(rec);
    }
    Ok(out)
}

pub(super) async fn prune_audit(store: &PgStore, before: DateTime<Utc>) -> Result<usize> {
    let before = ts(&before);
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin(&mut c, Lock::Shared).await?;
        let n = tx
            .execute("DELETE FROM audit_log WHERE at < $1", &[&before])
            .await
            .map_err(db("prune_audit"))?;
        commit(tx, "prune_audit").await?;
        Ok(n as usize)
    })
    .await
}

async fn intervals(
    store: &PgStore,
    sql: &str,
    args: &[&(dyn ToSql + Sync)],
) -> Result<Vec<ResidencyInterval>> {
    let c = store.client().await?;
    let rows = c.query(sql, args).await.map_err(db("residency"))?;
    let mut out = Vec::new();
    for r in rows {
        out.push(from_json(
            &r.try_get::<_, String>(0).map_err(db("residency"))?,
        )?);
    }
    Ok(out)
}

pub(super) async fn vm_residency(store: &PgStore, vm_id: &str) -> Result<Vec<ResidencyInterval>> {
    intervals(
        store,
        "SELECT body FROM vm_residency WHERE vm_id = $1 ORDER BY seq",
        &[&vm_id],
    )
    .await
}

pub(super) async fn residency_between(
    store: &PgStore,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<ResidencyInterval>> {
    let (from, to) = (ts(&from), ts(&to));
    intervals(
        store,
        "SELECT body FROM vm_residency WHERE from_at < $2 AND (to_at IS NULL OR to_at > $1)
         ORDER BY vm_id, seq",
        &[&from, &to],
    )
    .await
}

/// Closes the open interval of `copy` (if any) with `ended_by`; returns
/// the next sequence number of the VM's trail. The VM's row is locked by
/// the write (or, for an export, by [`sync_export`]), so the writes of
/// one trail follow one another.
async fn close_open(
    tx: &Transaction<'_>,
    vm_id: &str,
    copy: &str,
    ended_by: &str,
    at: &DateTime<Utc>,
) -> Result<i64> {
    let open = tx
        .query_opt(
            "SELECT seq, body FROM vm_residency WHERE vm_id = $1 AND copy = $2 AND to_at IS NULL",
            &[&vm_id, &copy],
        )
        .await
        .map_err(db("residency"))?;
    if let Some(r) = open {
        let seq: i64 = r.try_get(0).map_err(db("residency"))?;
        let mut i: ResidencyInterval =
            from_json(&r.try_get::<_, String>(1).map_err(db("residency"))?)?;
        i.to = Some(*at);
        i.ended_by = Some(ended_by.to_string());
        tx.execute(
            "UPDATE vm_residency SET to_at = $3, body = $4 WHERE vm_id = $1 AND seq = $2",
            &[&vm_id, &seq, &ts(at), &to_json(&i)?],
        )
        .await
        .map_err(db("residency"))?;
    }
    let r = tx
        .query_one(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM vm_residency WHERE vm_id = $1",
            &[&vm_id],
        )
        .await
        .map_err(db("residency"))?;
    r.try_get(0).map_err(db("residency"))
}

/// Inserts an open interval: `(vm_id, seq, copy, from_at, body)`.
pub(super) const INSERT_INTERVAL_SQL: &str =
    "INSERT INTO vm_residency (vm_id, seq, copy, from_at, to_at, body)
     VALUES ($1, $2, $3, $4, NULL, $5)";

/// The parameters of [`INSERT_INTERVAL_SQL`] for interval `seq`.
pub(super) struct NewInterval {
    vm_id: String,
    seq: i64,
    copy: String,
    from: String,
    body: String,
}

impl NewInterval {
    fn of(mut i: ResidencyInterval, seq: i64) -> Result<NewInterval> {
        i.seq = seq as u64;
        Ok(NewInterval {
            body: to_json(&i)?,
            from: ts(&i.from),
            vm_id: i.vm_id,
            seq,
            copy: i.copy,
        })
    }

    pub(super) fn params(&self) -> [&(dyn ToSql + Sync); 5] {
        [&self.vm_id, &self.seq, &self.copy, &self.from, &self.body]
    }
}

/// The first interval of a VM created placed (none for a pending one),
/// for `create_vm` to send with its other statements.
pub(super) fn first_interval(vm: &Vm) -> Result<Option<NewInterval>> {
    if !residency::moved(None, "", vm) {
        return Ok(None);
    }
    residency::change(vm, Why::Create, Utc::now())
        .open
        .map(|i| NewInterval::of(i, 1))
        .transpose()
}

async fn insert(tx: &Transaction<'_>, i: ResidencyInterval, seq: i64) -> Result<()> {
    let n = NewInterval::of(i, seq)?;
    tx.execute(INSERT_INTERVAL_SQL, &n.params())
        .await
        .map_err(db("residency"))?;
    Ok(())
}

/// The trail's part of a VM write that moved the VM (see
/// `residency::moved`), in the write's transaction.
pub(super) async fn sync_vm(tx: &Transaction<'_>, vm: &Vm, why: Why<'_>) -> Result<()> {
    let at = Utc::now();
    let change = residency::change(vm, why, at);
    // (A create sends its first interval itself: `first_interval`.)
    let next = close_open(tx, &vm.id, residency::VM_COPY, &change.ended_by, &at).await?;
    match change.open {
        Some(i) => insert(tx, i, next).await,
        None => Ok(()),
    }
}

/// The trail's part of an export write: its first write opens its
/// interval, its removal (or failure) closes it.
pub(super) async fn sync_export(tx: &Transaction<'_>, e: &VmExport) -> Result<()> {
    let copy = residency::export_copy(e);
    let at = Utc::now();
    // The VM's row, locked: its trail's numbering is this write's alone.
    let row = tx
        .query_opt("SELECT body FROM vms WHERE id = $1 FOR UPDATE", &[&e.vm_id])
        .await
        .map_err(db("residency"))?;
    let Some(row) = row else {
        return Ok(());
    };
    if residency::export_gone(e) {
        close_open(tx, &e.vm_id, &copy, &format!("export {}", e.state), &at).await?;
        return Ok(());
    }
    let known = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM vm_residency WHERE vm_id = $1 AND copy = $2)",
            &[&e.vm_id, &copy],
        )
        .await
        .map_err(db("residency"))?;
    if known.try_get::<_, bool>(0).map_err(db("residency"))? {
        return Ok(());
    }
    let vm: Vm = from_json(&row.try_get::<_, String>(0).map_err(db("residency"))?)?;
    let next = close_open(tx, &e.vm_id, &copy, "", &at).await?;
    insert(tx, residency::export_interval(&vm, e, at), next).await
}
