//! The residency trail's rules, shared by both backends: which VM writes
//! open or close an interval, and what the new interval says.
//!
//! The trail is derived from the VM's own record in the transaction that
//! writes it (the backends call [`change`] from their VM writes), so it
//! cannot disagree with the VM after a crash: either both the VM's new
//! host and the interval that starts there are committed, or neither is.
//! Only writes that change the VM's host or delete it touch the trail, so
//! the hot path (agents' reports) costs nothing more than the read of the
//! old host the write already did.

use chrono::{DateTime, Utc};
use virt8ra_api::{Migration, MigrationMode, ResidencyInterval, ResidencyReason, Vm, VmExport};
use virt8ra_api::{VmPhase, VmSpec};

/// What kind of write moved the VM.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Why<'a> {
    Create,
    Update,
    Migration(&'a Migration),
}

/// The label `vm import` puts on the VM it creates (where its disks came
/// from).
pub(crate) const IMPORTED_FROM: &str = "virt8ra.io/imported-from";

/// The trail's copy name of the VM itself.
pub(crate) const VM_COPY: &str = "vm";

/// Where the VM's data is after the write: its host, unless it is deleted.
fn host_of(vm: &Vm) -> Option<&str> {
    match vm.status.phase {
        VmPhase::Deleted => None,
        _ => vm.status.host_id.as_deref(),
    }
}

/// Whether a write from `old_host` (and `old_phase`) to `vm` changes where
/// the VM's data is.
pub(crate) fn moved(old_host: Option<&str>, old_phase: &str, vm: &Vm) -> bool {
    let old = if old_phase == VmPhase::Deleted.as_str() {
        None
    } else {
        old_host
    };
    old != host_of(vm)
}

/// What a write does to the trail: the open interval of the VM's copy (if
/// any) is closed with `ended_by`, and `open` (if any) begins.
#[derive(Debug)]
pub(crate) struct Change {
    pub ended_by: String,
    pub open: Option<ResidencyInterval>,
}

/// The change of `vm`'s trail by this write (`seq` of a new interval is
/// left 0 for the backend to number). Call it when [`moved`] says so, or
/// on a create.
pub(crate) fn change(vm: &Vm, why: Why<'_>, at: DateTime<Utc>) -> Change {
    let (reason, detail) = match why {
        Why::Create => match vm.labels.get(IMPORTED_FROM) {
            Some(from) => (ResidencyReason::Imported, format!("imported: {from}")),
            None => (ResidencyReason::Created, "placed when created".to_string()),
        },
        Why::Update => (ResidencyReason::Placed, "placed by the scheduler".into()),
        Why::Migration(m) => migration_reason(m),
    };
    let ended_by = match (vm.status.phase, why) {
        (VmPhase::Deleted, _) => "deleted".to_string(),
        (_, Why::Migration(m)) => format!("{} migration {}", m.mode.as_str(), m.id),
        _ => "unplaced".to_string(),
    };
    let open = host_of(vm).map(|h| {
        let mut i = interval(vm, &vm.spec, VM_COPY, reason, detail, at);
        i.host_id = Some(h.to_string());
        i.host = vm.status.host.clone();
        i.site = vm.status.site.clone();
        i.provider = vm.status.provider.clone();
        i.country = vm.status.country.clone();
        i
    });
    Change { ended_by, open }
}

fn migration_reason(m: &Migration) -> (ResidencyReason, String) {
    let from = format!(
        "from host {} ({}, {}, {})",
        m.source.host, m.source.site, m.source.provider, m.source.country
    );
    let reason = match (&m.evacuation, m.mode) {
        (Some(_), _) => ResidencyReason::Evacuation,
        (None, MigrationMode::Live) => ResidencyReason::LiveMigration,
        (None, MigrationMode::Cold) => ResidencyReason::ColdMigration,
    };
    let detail = match &m.evacuation {
        Some(what) => format!(
            "{} migration {} {from}, evacuating {what}",
            m.mode.as_str(),
            m.id
        ),
        None => format!("{} migration {} {from}", m.mode.as_str(), m.id),
    };
    (reason, detail)
}

fn interval(
    vm: &Vm,
    spec: &VmSpec,
    copy: &str,
    reason: ResidencyReason,
    detail: String,
    at: DateTime<Utc>,
) -> ResidencyInterval {
    ResidencyInterval {
        vm_id: vm.id.clone(),
        vm: vm.name.clone(),
        seq: 0,
        copy: copy.to_string(),
        reason,
        detail,
        host: None,
        host_id: None,
        site: None,
        provider: None,
        country: None,
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        disk_gib: spec.total_disk_gib(),
        from: at,
        to: None,
        ended_by: None,
    }
}

/// The trail's copy name of an export.
pub(crate) fn export_copy(e: &VmExport) -> String {
    format!("export:{}", e.id)
}

/// Whether an export's staged files are gone (failed or removed): its
/// interval closes.
pub(crate) fn export_gone(e: &VmExport) -> bool {
    e.state == "failed" || e.state.ends_with("(removed)")
}

/// The interval an export opens: its disks, staged on the control plane.
pub(crate) fn export_interval(vm: &Vm, e: &VmExport, at: DateTime<Utc>) -> ResidencyInterval {
    let mut i = interval(
        vm,
        &vm.spec,
        &export_copy(e),
        ResidencyReason::Export,
        format!("export {} staged on the control plane", e.id),
        at,
    );
    i.vcpus = 0;
    i.memory_mib = 0;
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(phase: VmPhase, host: Option<&str>) -> Vm {
        let mut v: Vm = serde_json::from_value(serde_json::json!({
            "id": "v1", "name": "web",
            "spec": {"vcpus": 2, "memory_mib": 1024, "disk_gib": 3, "image": "i"},
            "power": "running", "reboot_generation": 0, "stop_timeout_s": 30,
            "status": {"phase": "running", "host": null, "host_id": null, "site": null,
                "provider": null, "country": null, "image_id": null, "placement_reason": null,
                "last_error": null, "started_at": null, "hypervisor": null},
            "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"
        }))
        .unwrap();
        v.status.phase = phase;
        v.status.host_id = host.map(str::to_string);
        v.status.site = host.map(|h| format!("site-{h}"));
        v
    }

    #[test]
    fn only_a_new_host_or_a_deletion_moves_the_data() {
        let on = |h| vm(VmPhase::Running, Some(h));
        assert!(!moved(Some("h1"), "running", &on("h1")));
        assert!(moved(Some("h1"), "running", &on("h2")));
        assert!(moved(None, "pending", &on("h1")));
        assert!(moved(
            Some("h1"),
            "deleting",
            &vm(VmPhase::Deleted, Some("h1"))
        ));
        assert!(!moved(
            Some("h1"),
            "deleted",
            &vm(VmPhase::Deleted, Some("h1"))
        ));
        assert!(!moved(None, "pending", &vm(VmPhase::Pending, None)));
    }

    #[test]
    fn a_change_closes_and_opens_with_the_vms_place_and_size() {
        let c = change(&vm(VmPhase::Scheduled, Some("h1")), Why::Update, Utc::now());
        let i = c.open.unwrap();
        assert_eq!(i.reason, ResidencyReason::Placed);
        assert_eq!(i.site.as_deref(), Some("site-h1"));
        assert_eq!((i.vcpus, i.memory_mib, i.disk_gib), (2, 1024, 3));
        let c = change(&vm(VmPhase::Deleted, Some("h1")), Why::Update, Utc::now());
        assert!(c.open.is_none());
        assert_eq!(c.ended_by, "deleted");
    }
}
