//! Evacuation: emptying hosts (one, a site's or a provider's) by migrating
//! every VM on them elsewhere.
//!
//! ```text
//!   hosts ready ──► maintenance (no new VM lands) ──► one migration per VM
//!                                                     (each its own workflow,
//!                                                      see `migration`)
//! ```
//!
//! Its one durable step is the hosts' state, written before any VM moves;
//! each VM's move is then a migration workflow of its own, durable and
//! resumed like any other. A VM that cannot move is named with why, and
//! the others move anyway; running it again moves what is left.

use virt8ra_api::{EvacuateRequest, Evacuation, HostState, MigrationCreate, VmPhase};
use virt8ra_store::VmFilter;

use crate::error::{ApiError, ApiResult};
use crate::services::topology::{self, Of};
use crate::state::Ctx;

/// Evacuates host, site or provider `key` (see [`evacuate`]).
pub async fn evacuate_of(
    app: &Ctx,
    of: Of,
    key: &str,
    req: EvacuateRequest,
) -> ApiResult<Evacuation> {
    let s = topology::scope(app, of, key).await?;
    evacuate(app, &s.what, s.host_ids, req).await
}

/// Puts the hosts in maintenance, then starts a migration for each VM on
/// them (to any host but these); `what` names them in errors.
pub async fn evacuate(
    app: &Ctx,
    what: &str,
    host_ids: Vec<String>,
    req: EvacuateRequest,
) -> ApiResult<Evacuation> {
    if host_ids.is_empty() {
        return Err(ApiError::Conflict(format!("{what} has no hosts")));
    }
    // No new VMs land on hosts being emptied.
    let mut names = Vec::new();
    for id in &host_ids {
        let mut h = app.store.get_host(id).await?;
        names.push(h.name.clone());
        if h.state == HostState::Ready {
            h.state = HostState::Maintenance;
            app.update_host(&h).await?;
            app.placement.upsert_host(app, &h);
        }
    }
    let mut out = Evacuation::default();
    for id in &host_ids {
        let vms = app.vms.list(&VmFilter {
            host_id: Some(id.clone()),
            ..Default::default()
        });
        for vm in vms {
            if matches!(
                vm.status.phase,
                VmPhase::Deleting | VmPhase::Deleted | VmPhase::Pending
            ) {
                continue;
            }
            let r = MigrationCreate {
                mode: req.mode,
                ..Default::default()
            };
            match crate::workflows::migration::start(app, &vm.id, &r, &names).await {
                Ok(m) => out.migrations.push(m),
                Err(e) => {
                    out.refused.insert(vm.name.clone(), e.to_string());
                }
            }
        }
    }
    Ok(out)
}
