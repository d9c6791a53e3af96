//! The scheduler: a reconciler that places pending VMs and keeps every
//! connected agent's desired state in step with the store.
//!
//! It takes no input: each pass reads the store and the hub and makes the
//! world match, so it is idempotent and safe to run after a crash, on a
//! timer and whenever it is woken (a VM was created, a host connected).
//!
//! Placement itself is the pure engine of `virt8ra-placement`, kept loaded
//! in memory by [`crate::services::placement`]: it returns a host and why, or, when
//! nothing fits, how many hosts each rule excluded; that explanation stays on
//! the VM while it is pending, and the VM is retried on every pass (so it is
//! placed as soon as capacity appears).

use std::collections::HashMap;

use std::time::Duration;

use chrono::Utc;
use virt8ra_api::protocol::ImageRef;
use virt8ra_api::{Vm, VmPhase};
use virt8ra_store::VmFilter;

use crate::error::ApiResult;
use crate::registry::hub::Delivery;
use crate::registry::marks::Marks;
use crate::registry::metrics::{self, Purpose};
use crate::services::desired::{desired_for, desired_vm};
use crate::state::Ctx;

/// Runs the scheduler until the process ends.
pub async fn run(app: Ctx) {
    let mut last_full: Option<std::time::Instant> = None;
    loop {
        // Every 30 s a pass recomputes every connected host's desired
        // state, whatever was marked: a safety net, not the path. By time,
        // not by pass count: under load passes run back to back, and a full
        // pass costs O(VMs).
        let full = last_full.is_none_or(|t| t.elapsed() >= Duration::from_secs(30));
        if full {
            last_full = Some(std::time::Instant::now());
        }
        if let Err(e) = pass(&app, full).await {
            tracing::warn!(error = %e, "scheduler pass failed; retrying");
        }
        tokio::select! {
            _ = app.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// One reconciliation pass.
///
/// Hosts whose VMs changed were marked (`ControlPlane::mark_host`, `mark_vm`);
/// only their desired state is recomputed (of `mark_vm`, only those VMs),
/// unless `full`.
pub async fn pass(app: &Ctx, full: bool) -> ApiResult<()> {
    place_pending(app).await?;
    // Network state first: a VM's taps before the VM (see `netplane`).
    crate::services::netplane::flush(app).await;
    let hosts = if full {
        app.take_marked_hosts();
        // Deletions in flight, e.g. from before a restart of the control plane.
        for vm in app.vms.list(&VmFilter {
            phase: Some(VmPhase::Deleting),
            ..Default::default()
        }) {
            if let Some(h) = &vm.status.host_id {
                app.note_deletion(h);
            }
        }
        app.hub
            .connected_hosts()
            .into_iter()
            .map(|h| (h, Marks::All))
            .collect()
    } else {
        app.take_marked_hosts()
    };
    use futures_util::StreamExt;
    futures_util::stream::iter(hosts)
        .for_each_concurrent(16, |(h, marks)| async move {
            if let Err(e) = sync_host_marked(app, &h, &marks).await {
                app.mark_host(&h);
                tracing::warn!(host = %h, error = %e, "sending desired state failed");
            }
        })
        .await;
    Ok(())
}

async fn place_pending(app: &Ctx) -> ApiResult<()> {
    let pending = app.vms.ids_in_phase(VmPhase::Pending);
    if pending.is_empty() {
        return Ok(());
    }
    // Decisions are taken one at a time (the engine is locked), but the
    // writes run concurrently so that they share the store's group commits.
    use futures_util::StreamExt;
    futures_util::stream::iter(pending)
        .for_each_concurrent(256, |vm| async move {
            if let Err(e) = place_one(app, vm).await {
                tracing::warn!(error = %e, "placing a VM failed; retrying on the next pass");
            }
        })
        .await;
    Ok(())
}

async fn place_one(app: &Ctx, id: String) -> ApiResult<()> {
    // Re-read under the VM's lock: it may have changed since the list.
    let _guard = app.lock_vm(&id).await;
    let mut vm = app.vm(&id)?;
    if vm.status.phase != VmPhase::Pending {
        return Ok(());
    }
    // Held, for a project with a quota, until the placement is written.
    let _booking = crate::services::quotas::book(app, &vm.project).await;
    match decide(app, &mut vm).await? {
        Decision::Placed { host_id, event } => {
            let country = vm.status.country.clone().unwrap_or_default();
            if let Some(why) = crate::services::quotas::country_refusal(app, &vm, &country) {
                // Not there: it stays pending, saying why.
                app.placement.release(&vm.id);
                let mut pending = app.vm(&id)?;
                if pending.status.placement_reason.as_deref() != Some(why.as_str()) {
                    pending.status.placement_reason = Some(why.clone());
                    pending.updated_at = Utc::now();
                    app.update_vm(&pending, Some(&format!("not placed: {why}")))
                        .await?;
                }
                return Ok(());
            }
            if let Err(e) = app.update_vm(&vm, Some(&event)).await {
                app.placement.release(&vm.id);
                return Err(e.into());
            }
            app.mark_vm(&host_id, &vm.id);
        }
        Decision::Unplaced { why, changed } => {
            if changed {
                app.update_vm(&vm, Some(&format!("not placed: {why}")))
                    .await?;
            }
        }
    }
    Ok(())
}

/// What [`decide`] did with a pending VM.
pub enum Decision {
    /// Capacity is committed in the engine on `host_id` and the VM's status
    /// says `scheduled` there; the caller stores it, and releases the
    /// capacity (`LoadedPlacement::release`) if that fails.
    Placed { host_id: String, event: String },
    /// Nothing fits; `placement_reason` holds why (`changed` when that is
    /// news).
    Unplaced { why: String, changed: bool },
}

/// Places a pending VM through the engine and fills in its status; stores
/// nothing. Used by the scheduler's passes and by `POST /vms`, which places
/// a VM at once so that creating and scheduling it is one durable write.
pub async fn decide(app: &Ctx, vm: &mut Vm) -> ApiResult<Decision> {
    let outcome = match app.placement.request(vm) {
        Err(e) => Err(format!("invalid placement rules: {e}")),
        Ok(req) => {
            app.placement
                .with_engine(app, |e| {
                    match metrics::timed(&app.metrics, Purpose::Schedule, || e.place(&req)) {
                        Ok(d) => match e.commit(&vm.id, &d.host, &req) {
                            Ok(()) => Ok(d),
                            Err(err) => Err(err),
                        },
                        Err(u) => Err(u.message),
                    }
                })
                .await?
        }
    };
    match outcome {
        Ok(d) => {
            let Some(h) = app.hosts.get(&d.host) else {
                // The engine knows a host the index does not: rebuild it.
                app.placement.release(&vm.id);
                app.placement.invalidate();
                return Ok(Decision::Unplaced {
                    why: format!("host {} is gone; retrying", d.host),
                    changed: false,
                });
            };
            vm.status.phase = VmPhase::Scheduled;
            vm.status.host_id = Some(h.id.clone());
            vm.status.host = Some(h.name.clone());
            vm.status.site = Some(d.site.clone());
            vm.status.provider = Some(d.provider.clone());
            vm.status.country = Some(d.country.clone());
            vm.status.hypervisor = Some(h.inventory.hypervisor);
            vm.status.placement_reason = Some(d.reason.clone());
            vm.status.last_error = None;
            vm.updated_at = Utc::now();
            Ok(Decision::Placed {
                host_id: h.id.clone(),
                event: format!("scheduled: {}", d.reason),
            })
        }
        Err(why) => {
            let changed = vm.status.placement_reason.as_deref() != Some(why.as_str());
            if changed {
                vm.status.placement_reason = Some(why.clone());
                vm.updated_at = Utc::now();
            }
            Ok(Decision::Unplaced { why, changed })
        }
    }
}

/// Sends the host its whole desired state if it changed since the last
/// send (to a protocol 3 agent: what changed).
pub async fn sync_host(app: &Ctx, host_id: &str) -> ApiResult<()> {
    crate::services::netplane::flush(app).await;
    sync_host_marked(app, host_id, &Marks::All).await
}

/// Sends the host what changed of its desired state: with `Marks::Vms`,
/// only those VMs are recomputed (a host packed with hundreds of VMs costs
/// one VM per change, not hundreds), unless the host must be sent its whole
/// state or takes part in a migration (whose roles span VMs and hosts).
pub async fn sync_host_marked(app: &Ctx, host_id: &str, marks: &Marks) -> ApiResult<()> {
    // Before anything is read: see `Hub::deliver_desired_vms`.
    let ticket = app.hub.ticket();
    let plan = crate::services::distribution::plan_for(app, host_id).await?;
    // Generations grow with wall-clock time, so they keep increasing across
    // control-plane restarts.
    let generation = Utc::now().timestamp_micros().max(0) as u64;
    let only = match marks {
        Marks::Vms(ids) if !app.hub.needs_whole(host_id) && !app.migrations.involves(host_id) => {
            Some(ids)
        }
        _ => None,
    };
    let vms = match only {
        None => desired_for(app, host_id, &plan).await?,
        Some(ids) => {
            let mut images: HashMap<String, ImageRef> = HashMap::new();
            let mut out = Vec::new();
            for id in ids {
                let Some(vm) = app.vms.get(id) else { continue };
                if vm.status.host_id.as_deref() != Some(host_id)
                    || matches!(vm.status.phase, VmPhase::Deleting | VmPhase::Deleted)
                {
                    continue;
                }
                if let Some(mut d) = desired_vm(app, &vm, &mut images).await? {
                    d.set_image_sources(&plan.sources);
                    out.push(d);
                }
            }
            out
        }
    };
    let sent = app
        .hub
        .deliver_desired_vms(ticket, host_id, generation, vms, only, plan.prestage);
    if sent == Delivery::Stale {
        // Another computation, begun later, was sent first: this one may
        // be older than it. Compute the host again from what is known now.
        app.mark_host(host_id);
        app.wake.notify_one();
    }
    Ok(())
}
