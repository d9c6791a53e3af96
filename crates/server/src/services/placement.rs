//! The control plane's side of placement: it keeps the placement engine
//! (`virt8ra-placement`, pure) loaded with the current sites, hosts and
//! allocations, in memory, so a decision never scans the database.
//!
//! The engine is rebuilt from the in-memory VM index only when the topology
//! changed (a site or provider was added, changed or removed, a host
//! removed), one rebuild at a time; placements are committed to it
//! directly, a deleted VM is released, a host that joins, changes state or
//! is evacuated is updated in place, a finished migration frees its target
//! reservation and books the VM where it now runs, and host readiness (from
//! heartbeats) is refreshed at most once a second.
//!
//! The engine and its books are in-memory state
//! ([`crate::registry::placement`]); this module adds what needs the rest of
//! the control plane: loading the engine from the store and the indexes,
//! host readiness from the hub, and a host's live view ([`host_view`]).

use std::collections::HashMap;

use virt8ra_api::{Allocation, Host, HostState, Provider, VmPhase};
use virt8ra_placement::{Engine, HostInfo, SiteInfo};
use virt8ra_store::VmFilter;

use crate::error::{ApiError, ApiResult};
use crate::registry::placement::{
    host_info, reservation, site_info, Loaded, LoadedPlacement, READINESS_TTL,
};
use crate::state::Ctx;

/// Fills in a host's live fields (connection, heartbeat, usage, state
/// derived from liveness) and its allocation.
pub fn host_view(app: &Ctx, mut h: Host, alloc: Option<&Allocation>) -> Host {
    let live = app.hub.view(&h.id, app.liveness_window());
    h.connected = live.is_some();
    if let Some(l) = &live {
        h.last_heartbeat = Some(l.last_beat_at);
        h.usage = l.usage.clone();
    }
    if h.state == HostState::Ready && !live.as_ref().is_some_and(|l| l.alive) {
        h.state = HostState::Unreachable;
    }
    h.allocated = alloc.copied().unwrap_or_default();
    h
}

impl LoadedPlacement {
    /// What is allocated on each host (by host name), from the engine's
    /// in-memory books: no scan of the VMs in the store.
    pub async fn allocations(&self, app: &Ctx) -> ApiResult<HashMap<String, Allocation>> {
        self.with_engine(app, |e| {
            e.hosts()
                .map(|h| {
                    (
                        h.info.name.clone(),
                        Allocation {
                            vms: h.vms,
                            vcpus: h.used.vcpus,
                            memory_mib: h.used.memory_mib,
                            disk_gib: h.used.disk_gib,
                        },
                    )
                })
                .collect()
        })
        .await
    }

    /// A host joined, connected or was changed: update it in the loaded
    /// engine, keeping its allocations, instead of a rebuild (which costs
    /// O(hosts + VMs), once per host when 100,000 hosts join).
    pub fn upsert_host(&self, app: &Ctx, h: &Host) {
        let info = host_info(&host_view(app, h.clone(), None), &self.config);
        let mut g = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = g.as_mut() {
            if l.engine.upsert_host(info).is_err() {
                // A site the engine does not know yet: rebuild.
                *g = None;
                return;
            }
            l.hosts.insert(h.name.clone(), (h.id.clone(), h.state));
            l.names.insert(h.id.clone(), h.name.clone());
        }
        drop(g);
        // The readiness just computed came from one look at the hub; have
        // the next refresh look at this host again, so that a change in
        // between is not missed.
        app.hub.rejudge_later(&h.id);
    }

    /// Deletes host `h` with `delete` (the store's delete) unless VMs are
    /// placed on it, or capacity is held on it for a migration: then it is
    /// left as it was and the count is the error.
    ///
    /// Atomic with placement: the host is first taken out of the loaded
    /// engine, under its lock, so no decision picks it any more; a decision
    /// made before then has booked its VM there, which the count sees. No
    /// rebuild can put it back meanwhile (one waits for `building`, held
    /// throughout), and after the delete the engine is dropped, so the next
    /// decision rebuilds without it. The VM index is counted as well (a VM
    /// recorded on the host is refused even if the engine did not book it).
    pub async fn remove_host<F>(&self, app: &Ctx, h: &Host, delete: F) -> ApiResult<()>
    where
        F: std::future::Future<Output = ApiResult<()>>,
    {
        let _no_rebuild = self.building.lock().await;
        let booked = {
            let mut g = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
            match g.as_mut() {
                Some(l) => {
                    // Disabled in the engine's copy of the operator state, so
                    // that a readiness refresh does not make it ready again.
                    l.hosts
                        .insert(h.name.clone(), (h.id.clone(), HostState::Disabled));
                    let _ = l.engine.set_ready(&h.name, false);
                    l.engine.host(&h.name).map_or(0, |e| e.vms as usize)
                }
                // Nothing is placed until the engine is rebuilt, which waits.
                None => 0,
            }
        };
        let recorded = app
            .vms
            .list(&VmFilter {
                host_id: Some(h.id.clone()),
                ..Default::default()
            })
            .len();
        let n = booked.max(recorded);
        let r = if n > 0 {
            Err(ApiError::Conflict(format!(
                "host '{}' still has {n} VM(s); delete or move them first",
                h.name
            )))
        } else {
            delete.await
        };
        match &r {
            Ok(()) => self.invalidate(),
            // As it was: its state and readiness from the hub again.
            Err(_) => self.upsert_host(app, h),
        }
        r
    }

    /// Runs `f` on an up-to-date engine.
    pub async fn with_engine<T>(
        &self,
        app: &Ctx,
        f: impl FnOnce(&mut Engine) -> T,
    ) -> ApiResult<T> {
        let missing = || {
            self.loaded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_none()
        };
        if missing() {
            let _one = self.building.lock().await;
            if missing() {
                let l = self.build(app).await?;
                let mut g = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
                if g.is_none() {
                    *g = Some(l);
                }
            }
        }
        let mut g = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let l = g
            .as_mut()
            .ok_or_else(|| ApiError::Internal("placement engine missing".into()))?;
        if l.refreshed.is_none_or(|t| t.elapsed() >= READINESS_TTL) {
            refresh_readiness(app, l, l.refreshed.is_none());
            l.refreshed = Some(std::time::Instant::now());
        }
        Ok(f(&mut l.engine))
    }

    async fn build(&self, app: &Ctx) -> ApiResult<Loaded> {
        let providers: HashMap<String, Provider> = app
            .store
            .list_providers()
            .await?
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect();
        let sites: Vec<SiteInfo> = app
            .store
            .list_sites()
            .await?
            .iter()
            .map(|s| site_info(s, providers.get(&s.provider)))
            .collect();
        let hosts: Vec<Host> = app.hosts.all().iter().map(|h| (**h).clone()).collect();
        let infos: Vec<HostInfo> = hosts
            .iter()
            .map(|h| host_info(&host_view(app, h.clone(), None), &self.config))
            .collect();
        let mut e = Engine::new(sites, infos).map_err(ApiError::Internal)?;
        e.set_default_weights(self.config.weights);
        let by_id: HashMap<&str, &str> = hosts
            .iter()
            .map(|h| (h.id.as_str(), h.name.as_str()))
            .collect();
        for vm in app.vms.list(&VmFilter::default()) {
            if vm.status.phase == VmPhase::Deleted {
                continue;
            }
            let Some(host) = vm.status.host_id.as_deref().and_then(|id| by_id.get(id)) else {
                continue;
            };
            let _ = e.commit(&vm.id, host, &self.booked_request(&vm));
        }
        // Capacity held on the targets of migrations under way.
        for m in app.migrations.active() {
            if let (Some(host), Ok(vm)) = (
                by_id.get(m.target.host_id.as_str()),
                app.store.get_vm(&m.vm_id).await,
            ) {
                if let Ok(req) = self.request(&vm) {
                    let _ = e.commit(&reservation(&vm.id, &m.id), host, &req);
                }
            }
        }
        Ok(Loaded {
            engine: e,
            hosts: hosts
                .iter()
                .map(|h| (h.name.clone(), (h.id.clone(), h.state)))
                .collect(),
            names: hosts
                .iter()
                .map(|h| (h.id.clone(), h.name.clone()))
                .collect(),
            refreshed: None,
        })
    }
}

/// Host readiness follows heartbeats and the operator's state. The hub
/// hands out only the hosts whose liveness changed since the last refresh
/// (`all`: every connected host, for an engine just built), so a refresh
/// looks up only the changed hosts. The hub's pass that finds them is a
/// comparison of times per connection; it still runs under this lock, once
/// a second. (Before, every host was looked up by name here and by id in
/// the hub, and that pass, at 100,000 hosts, held every VM create behind
/// it for tens of milliseconds.)
fn refresh_readiness(app: &Ctx, l: &mut Loaded, all: bool) {
    let window = app.liveness_window();
    for (id, alive) in app.hub.liveness_changes(window, all) {
        let Some(name) = l.names.get(&id) else {
            continue;
        };
        let ready = alive
            && l.hosts
                .get(name)
                .is_some_and(|(_, state)| *state == HostState::Ready);
        if l.engine.host(name).is_some_and(|h| h.info.ready != ready) {
            let _ = l.engine.set_ready(name, ready);
        }
    }
}
