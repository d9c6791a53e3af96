//! What agents report of their VMs, applied to the VMs' status: phase,
//! errors, machine type, forwarded ports, and deletions the agent
//! finished. The agent channel ([`crate::http::agent`]) batches the
//! reports and calls these.
//!
//! A report only moves a VM the way its agent can know: never out of
//! `deleting` but to `deleted`, never to `deleted` unless asked to delete,
//! and only from the host the VM is placed on.

use chrono::Utc;
use virt8ra_api::protocol::{AgentVmPhase, VmReport};
use virt8ra_api::VmPhase;
use virt8ra_store::VmFilter;

use crate::error::ApiResult;
use crate::state::Ctx;

/// The VM phase an agent's phase stands for.
fn phase_of(p: AgentVmPhase) -> VmPhase {
    match p {
        AgentVmPhase::Provisioning => VmPhase::Provisioning,
        AgentVmPhase::Running => VmPhase::Running,
        AgentVmPhase::Stopping => VmPhase::Stopping,
        AgentVmPhase::Stopped => VmPhase::Stopped,
        AgentVmPhase::Failed => VmPhase::Failed,
        AgentVmPhase::Deleted => VmPhase::Deleted,
    }
}

/// Applies what an agent observed of one VM to the VM's status.
pub async fn apply_report(app: &Ctx, host_id: &str, r: &VmReport) -> ApiResult<()> {
    if !app.hub.report_changed(host_id, r) {
        return Ok(());
    }
    let result = apply_report_inner(app, host_id, r).await;
    if result.is_err() {
        app.hub.forget_report(host_id, &r.id);
    }
    result
}

async fn apply_report_inner(app: &Ctx, host_id: &str, r: &VmReport) -> ApiResult<()> {
    let _g = app.lock_vm(&r.id).await;
    let Some(vm) = app.vms.get(&r.id) else {
        return Ok(());
    };
    // Reports name VMs by id; a name equal to some id is no match.
    if vm.id != r.id {
        return Ok(());
    }
    let mut vm = (*vm).clone();
    if vm.status.host_id.as_deref() != Some(host_id) || vm.status.phase == VmPhase::Deleted {
        return Ok(());
    }
    let phase = phase_of(r.phase);
    if vm.status.phase == VmPhase::Deleting && phase != VmPhase::Deleted {
        return Ok(());
    }
    if phase == VmPhase::Deleted && vm.status.phase != VmPhase::Deleting {
        return Ok(());
    }
    let mut event = None;
    let host = vm.status.host.clone().unwrap_or_default();
    if phase != vm.status.phase {
        event = Some(match (&r.error, phase) {
            (Some(e), VmPhase::Failed) => format!("failed on host {host}: {e}"),
            _ => format!("{} on host {host}", phase.as_str()),
        });
        if phase == VmPhase::Running {
            vm.status.started_at = Some(Utc::now());
            vm.status.last_error = None;
        }
        if phase == VmPhase::Stopped {
            vm.status.started_at = None;
        }
        vm.status.phase = phase;
    }
    if phase == VmPhase::Failed && r.error.is_some() && vm.status.last_error != r.error {
        vm.status.last_error = r.error.clone();
        if event.is_none() {
            event = Some(format!(
                "still failing on host {host}: {}",
                r.error.clone().unwrap_or_default()
            ));
        }
    }
    if r.machine.is_some() && vm.status.machine != r.machine {
        vm.status.machine = r.machine.clone();
        event = event.or_else(|| {
            Some(format!(
                "runs as QEMU machine {}",
                r.machine.clone().unwrap_or_default()
            ))
        });
    }
    let ports_changed = vm.status.ports != r.ports;
    if ports_changed {
        vm.status.ports = r.ports.clone();
    }
    if event.is_none() && !ports_changed {
        return Ok(());
    }
    vm.updated_at = Utc::now();
    app.update_vm(&vm, event.as_deref()).await?;
    if vm.status.phase == VmPhase::Deleted {
        app.placement.release(&vm.id);
    }
    Ok(())
}

/// VMs being deleted on `host_id` that the agent no longer has are gone.
/// Called with every heartbeat, it reads the store only for hosts known to
/// have deletions in flight.
pub async fn confirm_deletions(app: &Ctx, host_id: &str, present: &[String]) -> ApiResult<()> {
    if !app.has_deletions(host_id) {
        return Ok(());
    }
    // Forget the host first, then read: a deletion noted meanwhile is
    // either seen by this read or noted again after it.
    app.deletions_done(host_id);
    let deleting = app.vms.list(&VmFilter {
        host_id: Some(host_id.to_string()),
        phase: Some(VmPhase::Deleting),
        ..Default::default()
    });
    if deleting.iter().any(|vm| present.contains(&vm.id)) {
        // The agent still has some: look again on its next heartbeat.
        app.note_deletion(host_id);
    }
    for vm in deleting {
        if present.contains(&vm.id) {
            continue;
        }
        let _g = app.lock_vm(&vm.id).await;
        let mut vm = app.vm(&vm.id)?;
        if vm.status.phase != VmPhase::Deleting {
            continue;
        }
        vm.status.phase = VmPhase::Deleted;
        vm.status.ports.clear();
        vm.updated_at = Utc::now();
        app.update_vm(&vm, Some("deleted: the host agent removed it"))
            .await?;
        app.placement.release(&vm.id);
    }
    Ok(())
}
