//! VMs and their event log: the hot path of the store (every state change
//! of every VM), so its statements are prepared once per connection and a
//! write is as few round trips as its rules allow.

use chrono::Utc;
use deadpool_postgres::{GenericClient, Transaction};
use tokio_postgres::types::ToSql;
use virt8ra_api::{Vm, VmEvent, VmPhase};

use super::engine::{commit, lock_statement, retry, take_lock, Lock, PgStore, WRITE_LOCK};
use super::rows::{conflict_or_db, db, from_json, parse_ts, texts, to_json, ts};
use crate::error::{Result, StoreError};
use crate::records::VmFilter;
use crate::residency::{self, Why};

/// A VM by id or by name; a live VM's name wins over a deleted one's.
pub(super) const GET_VM_SQL: &str =
    "SELECT body FROM vms WHERE id = $1 OR name = $1 ORDER BY (phase = 'deleted') LIMIT 1";

/// Returns the VM's host and phase before the write: a write that moves
/// the VM (or deletes it) writes its residency trail too. The sub-select
/// locks the row, so what it returns is the version this write replaces.
const UPDATE_VM_SQL: &str = "UPDATE vms v SET host_id = $2, site = $3, provider = $4, country = $5,
                                          body = $6, phase = $7, image_id = $8
                           FROM (SELECT id, host_id, phase FROM vms WHERE id = $1 FOR UPDATE) old
                           WHERE v.id = old.id
                           RETURNING old.host_id, old.phase";

/// Numbered after the VM's last event: run after the VM's row is locked
/// by its UPDATE, so that the writes of one VM number their events one
/// after another.
const APPEND_EVENT_SQL: &str = "INSERT INTO vm_events (vm_id, seq, at, phase, message)
     SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3, $4 FROM vm_events WHERE vm_id = $1";

const INSERT_VM_SQL: &str =
    "INSERT INTO vms (id, name, phase, host_id, site, provider, country, image_id, body)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

/// A VM just inserted has no events yet (its id is new: the insert of its
/// row fails otherwise, and then so does the transaction), so its events
/// are numbered from 1 without looking, all in one statement (none when
/// the list is empty).
const INSERT_EVENTS_SQL: &str = "INSERT INTO vm_events (vm_id, seq, at, phase, message)
     SELECT $1, e.seq, $2, $3, e.message
     FROM unnest($4::text[]) WITH ORDINALITY AS e(message, seq)";

/// Replaces a VM row (`body` is its JSON), and appends an event when given.
/// The UPDATE locks the VM's row first, so the writes of one VM (its
/// leases, its next event number) follow one another as in SQLite.
pub(super) async fn write_vm(
    tx: &Transaction<'_>,
    vm: &Vm,
    body: &str,
    event: Option<&str>,
    why: Why<'_>,
) -> Result<()> {
    let st = tx
        .prepare_cached(UPDATE_VM_SQL)
        .await
        .map_err(db("write_vm"))?;
    let phase = vm.status.phase.as_str();
    let rows = tx
        .query(&st, &update_params(vm, &body, &phase))
        .await
        .map_err(db("write_vm"))?;
    sync_if_moved(tx, &rows, vm, why).await?;
    if !vm.status.nics.is_empty() {
        super::networks::sync_leases(tx, vm).await?;
    }
    if let Some(e) = event {
        let st = tx
            .prepare_cached(APPEND_EVENT_SQL)
            .await
            .map_err(db("insert_event"))?;
        let at = ts(&Utc::now());
        tx.execute(&st, &[&vm.id, &at, &phase, &e])
            .await
            .map_err(db("insert_event"))?;
    }
    Ok(())
}

type Param<'a> = &'a (dyn ToSql + Sync);

fn update_params<'a>(vm: &'a Vm, body: &'a &str, phase: &'a &str) -> [Param<'a>; 8] {
    [
        &vm.id,
        &vm.status.host_id,
        &vm.status.site,
        &vm.status.provider,
        &vm.status.country,
        body,
        phase,
        &vm.status.image_id,
    ]
}

/// After the UPDATE of `vm` (its `rows`: the old host and phase): not
/// found when it changed no row, and the residency trail written when the
/// VM moved.
async fn sync_if_moved(
    tx: &Transaction<'_>,
    rows: &[tokio_postgres::Row],
    vm: &Vm,
    why: Why<'_>,
) -> Result<()> {
    let Some(old) = rows.first() else {
        return Err(StoreError::not_found("VM", vm.id.clone()));
    };
    let host: Option<String> = old.try_get(0).map_err(db("write_vm"))?;
    let phase: String = old.try_get(1).map_err(db("write_vm"))?;
    if residency::moved(host.as_deref(), &phase, vm) {
        super::audit::sync_vm(tx, vm, why).await?;
    }
    Ok(())
}

/// Creates the VM with its first events. Without NICs (the hot path) the
/// lock, the VM's row and its events go in one round trip (see
/// [`lock_statement`]); a VM with NICs takes its leases after its row.
pub(super) async fn create_vm(store: &PgStore, vm: &Vm, events: &[&str]) -> Result<()> {
    let body = to_json(vm)?;
    let events: Vec<&str> = events.to_vec();
    // Where it is placed, if it is: the first interval of its residency
    // trail, sent with the row and the events (no round trip of its own).
    let first = super::audit::first_interval(vm)?;
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin_unlocked(&mut c).await?;
        let lock = lock_statement(&tx, Lock::Shared).await?;
        let insert = tx
            .prepare_cached(INSERT_VM_SQL)
            .await
            .map_err(db("create_vm"))?;
        let insert_events = tx
            .prepare_cached(INSERT_EVENTS_SQL)
            .await
            .map_err(db("create_vm"))?;
        let insert_interval = tx
            .prepare_cached(super::audit::INSERT_INTERVAL_SQL)
            .await
            .map_err(db("create_vm"))?;
        let (phase, at) = (vm.status.phase.as_str(), ts(&Utc::now()));
        let s = &vm.status;
        let vm_params: [Param<'_>; 9] = [
            &vm.id,
            &vm.name,
            &phase,
            &s.host_id,
            &s.site,
            &s.provider,
            &s.country,
            &s.image_id,
            &body,
        ];
        let lock_params: [Param<'_>; 1] = [&WRITE_LOCK];
        let event_params: [Param<'_>; 4] = [&vm.id, &at, &phase, &events];
        let (locked, inserted, evented, trailed) = tokio::join!(
            biased;
            tx.execute(&lock, &lock_params),
            tx.execute(&insert, &vm_params),
            tx.execute(&insert_events, &event_params),
            async {
                match &first {
                    Some(i) => tx.execute(&insert_interval, &i.params()).await,
                    None => Ok(0),
                }
            },
        );
        locked.map_err(db("begin"))?;
        inserted.map_err(|e| {
            conflict_or_db(e, "create_vm", || {
                format!("VM '{}' already exists", vm.name)
            })
        })?;
        evented.map_err(db("create_vm"))?;
        trailed.map_err(db("create_vm"))?;
        if !vm.status.nics.is_empty() {
            super::networks::sync_leases(&tx, vm).await?;
        }
        commit(tx, "create_vm").await
    })
    .await
}

/// Replaces the VM. Without NICs (the hot path) the lock, the UPDATE and
/// the event go in one round trip (see [`lock_statement`]); with NICs the
/// leases are synced between the UPDATE and the event.
pub(super) async fn update_vm(store: &PgStore, vm: &Vm, event: Option<&str>) -> Result<()> {
    let body = to_json(vm)?;
    retry(|| async {
        let mut c = store.client().await?;
        let tx = PgStore::begin_unlocked(&mut c).await?;
        if !vm.status.nics.is_empty() {
            take_lock(&tx, Lock::Shared).await?;
            write_vm(&tx, vm, &body, event, Why::Update).await?;
            return commit(tx, "update_vm").await;
        }
        let lock = lock_statement(&tx, Lock::Shared).await?;
        let update = tx
            .prepare_cached(UPDATE_VM_SQL)
            .await
            .map_err(db("write_vm"))?;
        let append = tx
            .prepare_cached(APPEND_EVENT_SQL)
            .await
            .map_err(db("insert_event"))?;
        let (phase, at) = (vm.status.phase.as_str(), ts(&Utc::now()));
        let body = body.as_str();
        let lock_params: [Param<'_>; 1] = [&WRITE_LOCK];
        let row_params = update_params(vm, &body, &phase);
        let (locked, updated, evented) = tokio::join!(
            biased;
            tx.execute(&lock, &lock_params),
            tx.query(&update, &row_params),
            async {
                match event {
                    Some(e) => tx.execute(&append, &[&vm.id, &at, &phase, &e]).await,
                    None => Ok(0),
                }
            },
        );
        locked.map_err(db("begin"))?;
        let updated = updated.map_err(db("write_vm"))?;
        evented.map_err(db("insert_event"))?;
        sync_if_moved(&tx, &updated, vm, Why::Update).await?;
        commit(tx, "update_vm").await
    })
    .await
}

pub(super) async fn get_vm(store: &PgStore, key: &str) -> Result<Vm> {
    let c = store.client().await?;
    let st = c.prepare_cached(GET_VM_SQL).await.map_err(db("get_vm"))?;
    let row = c.query_opt(&st, &[&key]).await.map_err(db("get_vm"))?;
    match row {
        Some(r) => from_json(&r.try_get::<_, String>(0).map_err(db("get_vm"))?),
        None => Err(StoreError::not_found("VM", key)),
    }
}

pub(super) async fn list_vms(store: &PgStore, f: &VmFilter) -> Result<Vec<Vm>> {
    let mut sql = String::from("SELECT body FROM vms WHERE true");
    let mut args: Vec<String> = Vec::new();
    let mut add = |col: &str, v: Option<String>, sql: &mut String| {
        if let Some(v) = v {
            args.push(v);
            sql.push_str(&format!(" AND {col} = ${}", args.len()));
        }
    };
    add("host_id", f.host_id.clone(), &mut sql);
    add("site", f.site.clone(), &mut sql);
    add("provider", f.provider.clone(), &mut sql);
    add("country", f.country.clone(), &mut sql);
    add("phase", f.phase.map(|p| p.as_str().to_string()), &mut sql);
    // Not a column, as in SQLite's.
    add(
        "COALESCE(body::jsonb ->> 'project', 'default')",
        f.project.clone(),
        &mut sql,
    );
    if let Some(after) = &f.after_id {
        args.push(after.clone());
        sql.push_str(&format!(" AND id > ${}", args.len()));
    }
    if !f.include_deleted && f.phase != Some(VmPhase::Deleted) {
        sql.push_str(" AND phase <> 'deleted'");
    }
    sql.push_str(" ORDER BY id");
    if let Some(l) = f.limit {
        sql.push_str(&format!(" LIMIT {l}"));
    }
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = args
        .iter()
        .map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let c = store.client().await?;
    let rows = c.query(&sql, &params).await.map_err(db("list_vms"))?;
    texts(&rows, "list_vms")?
        .iter()
        .map(|b| from_json(b))
        .collect()
}

pub(super) async fn vm_events(store: &PgStore, vm_id: &str) -> Result<Vec<VmEvent>> {
    let c = store.client().await?;
    let rows = c
        .query(
            "SELECT seq, at, phase, message FROM vm_events WHERE vm_id = $1 ORDER BY seq",
            &[&vm_id],
        )
        .await
        .map_err(db("vm_events"))?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let seq: i64 = r.try_get(0).map_err(db("vm_events"))?;
        let at: String = r.try_get(1).map_err(db("vm_events"))?;
        let phase: String = r.try_get(2).map_err(db("vm_events"))?;
        out.push(VmEvent {
            seq: seq.max(0) as u64,
            at: parse_ts(&at)?,
            phase: VmPhase::parse(&phase)
                .ok_or_else(|| StoreError::db_failure(format!("corrupt phase {phase:?}")))?,
            message: r.try_get(3).map_err(db("vm_events"))?,
        });
    }
    Ok(out)
}
