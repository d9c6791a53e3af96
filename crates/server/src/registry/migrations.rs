//! Migrations and exports in flight, in memory: the workflows' records,
//! the agents' latest reports on them, which hosts were seen without a VM
//! (for the waits on a copy being gone), and the streams being relayed.
//!
//! The store holds every migration durably; this is the live view the
//! workflows ([`crate::workflows::migration`]) and the scheduler read on
//! every step and pass. It is filled as migrations start or resume and
//! forgets each one when it ends.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::Notify;
use virt8ra_api::protocol::{MigrationReport, MigrationSide};
use virt8ra_api::{Migration, MigrationPhase, VmExport};

use crate::registry::relays::Relays;

/// The control plane's live view of migrations and exports.
#[derive(Default)]
pub struct Migrations {
    active: Mutex<HashMap<String, Migration>>,
    reports: Mutex<HashMap<(String, MigrationSide), MigrationReport>>,
    /// (host id, VM id) -> when the host was seen without the VM.
    gone: Mutex<HashMap<(String, String), Instant>>,
    exports: Mutex<HashMap<String, VmExport>>,
    wake: Notify,
    /// Live streams relayed between agents ([`crate::http::relay`]).
    pub relay: Relays<axum::extract::ws::WebSocket>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Migrations {
    /// Migrations that are not finished.
    pub fn active(&self) -> Vec<Migration> {
        lock(&self.active).values().cloned().collect()
    }

    /// An active migration by id.
    pub fn get(&self, id: &str) -> Option<Migration> {
        lock(&self.active).get(id).cloned()
    }

    /// An export under way by id.
    pub fn export(&self, id: &str) -> Option<VmExport> {
        lock(&self.exports).get(id).cloned()
    }

    /// Resolves when [`wake`](Self::wake) is called (or a report comes in)
    /// after this was called.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.wake.notified()
    }

    pub fn set_active(&self, m: &Migration) {
        let mut a = lock(&self.active);
        if m.phase.is_terminal() {
            a.remove(&m.id);
        } else {
            a.insert(m.id.clone(), m.clone());
        }
    }

    pub fn active_exports(&self) -> Vec<VmExport> {
        lock(&self.exports).values().cloned().collect()
    }

    pub fn set_export(&self, e: &VmExport) {
        let mut x = lock(&self.exports);
        if e.state == "uploading" {
            x.insert(e.id.clone(), e.clone());
        } else {
            x.remove(&e.id);
        }
    }

    /// An agent's report. Reports from hosts that are not the named side
    /// of the migration are ignored.
    pub fn note_report(&self, host_id: &str, r: MigrationReport) {
        let known = lock(&self.active).get(&r.migration_id).is_some_and(|m| {
            let end = match r.side {
                MigrationSide::Source => &m.source,
                MigrationSide::Target => &m.target,
            };
            end.host_id == host_id
        });
        let export = lock(&self.exports).contains_key(&r.migration_id);
        if !known && !export {
            return;
        }
        lock(&self.reports).insert((r.migration_id.clone(), r.side), r);
        self.wake.notify_waiters();
    }

    pub fn report(&self, id: &str, side: MigrationSide) -> Option<MigrationReport> {
        lock(&self.reports).get(&(id.to_string(), side)).cloned()
    }

    pub fn forget_reports(&self, id: &str) {
        lock(&self.reports).retain(|(m, _), _| m != id);
    }

    /// A host said VM `vm_id` is gone from it.
    pub fn note_gone(&self, host_id: &str, vm_id: &str) {
        lock(&self.gone).insert((host_id.to_string(), vm_id.to_string()), Instant::now());
        self.wake.notify_waiters();
    }

    /// A heartbeat listed the VMs a host has: those a migration waits to
    /// see removed from it, and which it does not list, are gone.
    pub fn note_present(&self, host_id: &str, present: &[String]) {
        let waiting: Vec<String> = lock(&self.active)
            .values()
            .filter_map(|m| {
                let end = match m.phase {
                    MigrationPhase::RollingBack => &m.target,
                    MigrationPhase::CleaningUp => &m.source,
                    _ => return None,
                };
                (end.host_id == host_id && !present.contains(&m.vm_id)).then(|| m.vm_id.clone())
            })
            .collect();
        for vm in waiting {
            self.note_gone(host_id, &vm);
        }
    }

    /// Whether an active migration has this host at either end.
    pub fn involves(&self, host_id: &str) -> bool {
        lock(&self.active)
            .values()
            .any(|m| m.source.host_id == host_id || m.target.host_id == host_id)
    }

    /// Whether a migration waits to see a VM gone from this host (so its
    /// heartbeats must list what it has).
    pub fn waits_on(&self, host_id: &str) -> bool {
        lock(&self.active).values().any(|m| match m.phase {
            MigrationPhase::RollingBack => m.target.host_id == host_id,
            MigrationPhase::CleaningUp => m.source.host_id == host_id,
            _ => false,
        })
    }

    pub fn gone_since(&self, host_id: &str, vm_id: &str, since: Instant) -> bool {
        lock(&self.gone)
            .get(&(host_id.to_string(), vm_id.to_string()))
            .is_some_and(|t| *t >= since)
    }

    pub fn wake(&self) {
        self.wake.notify_waiters();
    }
}
