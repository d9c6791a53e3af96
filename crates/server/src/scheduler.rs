//! The scheduler: a reconciler that places pending VMs and keeps every
//! connected agent's desired state in step with the store.
//!
//! It takes no input: each pass reads the store and the hub and makes the
//! world match, so it is idempotent and safe to run after a crash, on a
//! timer and whenever it is woken (a VM was created, a host connected).
//!
//! Placement itself is the pure engine of `virt8ra-placement`, kept loaded
//! in memory by [`crate::placement`]: it returns a host and why, or, when
//! nothing fits, how many hosts each rule excluded; that explanation stays on
//! the VM while it is pending, and the VM is retried on every pass (so it is
//! placed as soon as capacity appears).

use std::collections::HashMap;

use std::time::Duration;

use chrono::Utc;
use virt8ra_api::protocol::{DesiredDisk, DesiredVm, ImageRef};
use virt8ra_api::{Allocation, Host, HostState, Vm, VmPhase};
use virt8ra_store::VmFilter;

use crate::error::ApiResult;
use crate::placement;
use crate::state::{App, Marks};

/// Fills in a host's live fields (connection, heartbeat, usage, state
/// derived from liveness) and its allocation.
pub fn host_view(app: &App, mut h: Host, alloc: Option<&Allocation>) -> Host {
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

/// Runs the scheduler until the process ends.
pub async fn run(app: App) {
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
/// Hosts whose VMs changed were marked (`AppState::mark_host`, `mark_vm`);
/// only their desired state is recomputed (of `mark_vm`, only those VMs),
/// unless `full`.
pub async fn pass(app: &App, full: bool) -> ApiResult<()> {
    place_pending(app).await?;
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

async fn place_pending(app: &App) -> ApiResult<()> {
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

async fn place_one(app: &App, id: String) -> ApiResult<()> {
    // Re-read under the VM's lock: it may have changed since the list.
    let _guard = app.lock_vm(&id).await;
    let mut vm = app.vm(&id)?;
    if vm.status.phase != VmPhase::Pending {
        return Ok(());
    }
    match decide(app, &mut vm).await? {
        Placement::Placed { host_id, event } => {
            if let Err(e) = app.update_vm(&vm, Some(&event)).await {
                app.placement.release(&vm.id);
                return Err(e.into());
            }
            app.mark_vm(&host_id, &vm.id);
        }
        Placement::Unplaced { why, changed } => {
            if changed {
                app.update_vm(&vm, Some(&format!("not placed: {why}")))
                    .await?;
            }
        }
    }
    Ok(())
}

/// What [`decide`] did with a pending VM.
pub enum Placement {
    /// Capacity is committed in the engine on `host_id` and the VM's status
    /// says `scheduled` there; the caller stores it, and releases the
    /// capacity (`Placement::release`) if that fails.
    Placed { host_id: String, event: String },
    /// Nothing fits; `placement_reason` holds why (`changed` when that is
    /// news).
    Unplaced { why: String, changed: bool },
}

/// Places a pending VM through the engine and fills in its status; stores
/// nothing. Used by the scheduler's passes and by `POST /vms`, which places
/// a VM at once so that creating and scheduling it is one durable write.
pub async fn decide(app: &App, vm: &mut Vm) -> ApiResult<Placement> {
    let outcome = match placement::request(vm, app.placement.config.weights) {
        Err(e) => Err(format!("invalid placement rules: {e}")),
        Ok(req) => {
            app.placement
                .with_engine(app, |e| match e.place(&req) {
                    Ok(d) => match e.commit(&vm.id, &d.host, &req) {
                        Ok(()) => Ok(d),
                        Err(err) => Err(err),
                    },
                    Err(u) => Err(u.message),
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
                return Ok(Placement::Unplaced {
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
            Ok(Placement::Placed {
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
            Ok(Placement::Unplaced { why, changed })
        }
    }
}

/// The VMs a host should run, as the agent protocol carries them: those
/// placed on it, with the migration roles of those on the move, and those
/// migrating to it.
pub async fn desired_for(
    app: &App,
    host_id: &str,
    plan: &crate::distribution::HostPlan,
) -> ApiResult<Vec<DesiredVm>> {
    let vms = app.vms.list(&VmFilter {
        host_id: Some(host_id.to_string()),
        ..Default::default()
    });
    let mut images: HashMap<String, ImageRef> = HashMap::new();
    let mut out = Vec::new();
    for vm in vms {
        if matches!(vm.status.phase, VmPhase::Deleting | VmPhase::Deleted) {
            continue;
        }
        if let Some(d) = desired_vm(app, &vm, &mut images).await? {
            out.push(d);
        }
    }
    crate::migration::apply_roles(app, host_id, &mut out, &mut images).await?;
    // Where this host fetches images: its site's copy first.
    for d in &mut out {
        d.set_image_sources(&plan.sources);
    }
    Ok(out)
}

/// One VM as the agent protocol carries it (`None` without an image).
pub async fn desired_vm(
    app: &App,
    vm: &Vm,
    images: &mut HashMap<String, ImageRef>,
) -> ApiResult<Option<DesiredVm>> {
    let Some(image_id) = vm.status.image_id.clone() else {
        return Ok(None);
    };
    let image = image_ref_of(app, &image_id, images).await?;
    let mut data_disks = Vec::with_capacity(vm.spec.data_disks.len());
    for (i, disk) in vm.spec.data_disks.iter().enumerate() {
        let image = match vm.status.data_image_ids.get(i).cloned().flatten() {
            Some(id) => Some(image_ref_of(app, &id, images).await?),
            None => None,
        };
        data_disks.push(DesiredDisk {
            image,
            size_gib: disk.size_gib.unwrap_or(0),
        });
    }
    Ok(Some(DesiredVm {
        id: vm.id.clone(),
        name: vm.name.clone(),
        vcpus: vm.spec.vcpus,
        memory_mib: vm.spec.memory_mib,
        disk_gib: vm.spec.disk_gib,
        image,
        user_data: vm.spec.user_data.clone(),
        ports: vm.spec.ports.clone(),
        power: vm.power,
        reboot_generation: vm.reboot_generation,
        stop_timeout_s: vm.stop_timeout_s,
        machine: vm.status.machine.clone(),
        site: vm.status.site.clone(),
        ssh_authorized_keys: vm.spec.ssh_authorized_keys.clone(),
        network: vm.spec.network.clone(),
        migration: None,
        data_disks,
    }))
}

/// What the agent is told of image `id` (from the pass's, then the
/// control plane's, memory before the store).
async fn image_ref_of(
    app: &App,
    id: &str,
    images: &mut HashMap<String, ImageRef>,
) -> ApiResult<ImageRef> {
    if let Some(r) = images.get(id).cloned().or_else(|| app.image_ref(id)) {
        return Ok(r);
    }
    let i = app.store.get_image(id).await?;
    let r = crate::distribution::image_ref(&i);
    app.remember_image_ref(&r);
    images.insert(id.to_string(), r.clone());
    Ok(r)
}

/// Sends the host its whole desired state if it changed since the last
/// send (to a protocol 3 agent: what changed).
pub async fn sync_host(app: &App, host_id: &str) -> ApiResult<()> {
    sync_host_marked(app, host_id, &Marks::All).await
}

/// Sends the host what changed of its desired state: with `Marks::Vms`,
/// only those VMs are recomputed (a host packed with hundreds of VMs costs
/// one VM per change, not hundreds), unless the host must be sent its whole
/// state or takes part in a migration (whose roles span VMs and hosts).
pub async fn sync_host_marked(app: &App, host_id: &str, marks: &Marks) -> ApiResult<()> {
    let plan = crate::distribution::plan_for(app, host_id).await?;
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
    app.hub
        .send_desired_vms(host_id, generation, vms, only, plan.prestage);
    Ok(())
}
