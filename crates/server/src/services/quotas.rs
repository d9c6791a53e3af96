//! Projects' quotas: vCPUs, memory, disk and VM count over a project's VMs
//! that are not deleted, and the same per country over those placed there.
//!
//! A create of a project with a quota takes the quota registry's booking
//! lock ([`book`]) before it checks the use and keeps it until the VM is
//! written and indexed: the use is read from the VM index, so the next
//! create in line sees this one, and concurrent creates cannot together
//! exceed a limit. A project without a quota takes no lock. The country
//! limits are checked where the country is known: at create, for a VM
//! placed at once or pinned to a country; when the scheduler places a
//! pending VM (one that would exceed its country's limit stays pending,
//! saying why); and when a migration (or an evacuation's) would move a VM
//! into another country.

use std::collections::BTreeMap;

use virt8ra_api::{QuotaReport, Usage, Vm, VmPhase, VmSpec};
use virt8ra_store::VmFilter;

use crate::error::{ApiError, ApiResult};
use crate::state::Ctx;

/// What one VM of `spec` uses.
pub fn size_of(spec: &VmSpec) -> Usage {
    Usage {
        vcpus: spec.vcpus as u64,
        memory_mib: spec.memory_mib,
        disk_gib: spec
            .data_disks
            .iter()
            .map(|d| d.size_gib.unwrap_or(0))
            .fold(spec.disk_gib, u64::saturating_add),
        vms: 1,
    }
}

/// What `project`'s VMs (not deleted) use, in all and per country.
pub fn usage(app: &Ctx, project: &str) -> (Usage, BTreeMap<String, Usage>) {
    let vms = app.vms.list(&VmFilter {
        project: Some(project.to_string()),
        ..Default::default()
    });
    let mut total = Usage::default();
    let mut by_country: BTreeMap<String, Usage> = BTreeMap::new();
    for v in vms.iter().filter(|v| v.status.phase != VmPhase::Deleted) {
        let u = size_of(&v.spec);
        total.add(&u);
        if let Some(c) = &v.status.country {
            by_country.entry(c.clone()).or_default().add(&u);
        }
    }
    (total, by_country)
}

/// The booking lock, when `project` has a quota: hold it from the check
/// to the durable write of what it admitted.
pub async fn book<'a>(app: &'a Ctx, project: &str) -> Option<tokio::sync::MutexGuard<'a, ()>> {
    match app.quotas.get(project) {
        Some(_) => Some(app.quotas.booking.lock().await),
        None => None,
    }
}

/// `Ok` if `project` may add `more` (in `country`, when known); else a
/// 409 naming the quota and the limit it would exceed.
pub fn check(app: &Ctx, project: &str, more: &Usage, country: Option<&str>) -> ApiResult<()> {
    let Some(q) = app.quotas.get(project) else {
        return Ok(());
    };
    let (total, by_country) = usage(app, project);
    if let Some(why) = total.exceeds(more, &q.total) {
        return Err(exceeded(project, None, &why));
    }
    if let Some(c) = country {
        if let Some(limits) = q.countries.get(c) {
            let used = by_country.get(c).copied().unwrap_or_default();
            if let Some(why) = used.exceeds(more, limits) {
                return Err(exceeded(project, Some(c), &why));
            }
        }
    }
    Ok(())
}

fn exceeded(project: &str, country: Option<&str>, why: &str) -> ApiError {
    ApiError::Conflict(format!(
        "quota of project '{project}'{} exceeded: {why} (`virt8ra quota show {project}`)",
        country.map(|c| format!(" in {c}")).unwrap_or_default()
    ))
}

/// Why `vm`, placed by the scheduler in `country`, may not go there: its
/// project's limit in that country (none when it fits or has no limit).
/// The caller holds [`book`] until the placement is written.
pub fn country_refusal(app: &Ctx, vm: &Vm, country: &str) -> Option<String> {
    let limits = app
        .quotas
        .get(&vm.project)?
        .countries
        .get(country)
        .cloned()?;
    let (_, by_country) = usage(app, &vm.project);
    let used = by_country.get(country).copied().unwrap_or_default();
    used.exceeds(&size_of(&vm.spec), &limits)
        .map(|why| exceeded(&vm.project, Some(country), &why).to_string())
}

/// Whether moving `vm` to `country` keeps its project's quota there
/// (a move within a country changes no country's use, and no move
/// changes the total).
pub async fn check_move(app: &Ctx, vm: &Vm, country: &str) -> ApiResult<()> {
    if vm.status.country.as_deref() == Some(country) {
        return Ok(());
    }
    let Some(limits) = app
        .quotas
        .get(&vm.project)
        .and_then(|q| q.countries.get(country).cloned())
    else {
        return Ok(());
    };
    let _booking = book(app, &vm.project).await;
    let (_, by_country) = usage(app, &vm.project);
    let used = by_country.get(country).copied().unwrap_or_default();
    match used.exceeds(&size_of(&vm.spec), &limits) {
        Some(why) => Err(exceeded(&vm.project, Some(country), &why)),
        None => Ok(()),
    }
}

/// A project's quota and its use against each limit.
pub fn report(app: &Ctx, project: &str) -> QuotaReport {
    let (usage, usage_by_country) = usage(app, project);
    QuotaReport {
        project: project.to_string(),
        quota: app.quotas.get(project).unwrap_or_default(),
        usage,
        usage_by_country,
    }
}
