//! Export: a stopped VM's disks uploaded by its host to the staging area,
//! verified, and kept there for download (`virt8ra vm export`).
//!
//! ```text
//!   start: record "uploading" ──► host uploads (desired state: export role)
//!      ├─► finish: every checksum verified ──► "ready"   (download, then cancel)
//!      ├─► finish: corrupt, or the host failed ──► "failed"
//!      └─► cancel: staged files removed ──► "<state> (removed)"
//! ```
//!
//! Each state is written to the store before it is acted on; the export's
//! role reaches the host through its desired state, which
//! `services::desired::apply_roles` derives from the registry.

use chrono::Utc;
use virt8ra_api::protocol::{MigrationAgentState, MigrationReport};
use virt8ra_api::{VmExport, VmPhase};

use crate::error::{ApiError, ApiResult};
use crate::state::Ctx;
use crate::workflows::migration::{remove_staged, staging_path, verify_staged_data};

/// Starts exporting a stopped VM: records it and tells its host.
pub async fn start(app: &Ctx, key: &str) -> ApiResult<VmExport> {
    let vm = app.store.get_vm(key).await?;
    if vm.status.phase != VmPhase::Stopped || vm.status.host_id.is_none() {
        return Err(ApiError::Conflict(format!(
            "VM '{}' is {}; stop it first (`virt8ra vm stop {} --wait`), its disk must be quiet to export",
            vm.name,
            vm.status.phase.as_str(),
            vm.name
        )));
    }
    if let Some(m) = &vm.status.migration {
        return Err(ApiError::Conflict(format!(
            "VM '{}' is being migrated (migration {m})",
            vm.name
        )));
    }
    if app
        .migrations
        .active_exports()
        .iter()
        .any(|e| e.vm_id == vm.id)
    {
        return Err(ApiError::Conflict(format!(
            "VM '{}' is being exported already",
            vm.name
        )));
    }
    let id = uuid::Uuid::new_v4().to_string();
    let e = VmExport {
        url_path: format!("/api/v1/staging/{id}"),
        id,
        vm_id: vm.id.clone(),
        vm: vm.name.clone(),
        state: "uploading".into(),
        sha256: None,
        size_bytes: None,
        error: None,
        data_disks: vec![],
        created_at: Utc::now(),
    };
    app.store.put_export(&e).await?;
    app.migrations.set_export(&e);
    if let Some(h) = &vm.status.host_id {
        crate::services::scheduler::sync_host(app, h).await?;
    }
    Ok(e)
}

/// Cancels or removes an export: its staged files go, its record stays
/// (marked removed).
pub async fn cancel(app: &Ctx, id: &str) -> ApiResult<()> {
    let mut e = app.store.get_export(id).await?;
    remove_staged(app, &e.id).await;
    if e.state == "uploading" {
        e.state = "failed".into();
        e.error = Some("cancelled".into());
    }
    e.state = format!("{} (removed)", e.state.trim_end_matches(" (removed)"));
    app.store.put_export(&e).await?;
    app.migrations.set_export(&e);
    Ok(())
}

/// An export's upload finished (or failed): verify and record it.
pub async fn finish(app: &Ctx, r: &MigrationReport) -> ApiResult<()> {
    let Some(mut e) = app.migrations.export(&r.migration_id) else {
        return Ok(());
    };
    match (r.state, &r.disk) {
        (MigrationAgentState::Sent, Some(disk)) => {
            let (sha, size) =
                crate::services::images::sha256_file(&staging_path(app, &e.id)).await?;
            let wanted = match app.store.get_vm(&e.vm_id).await {
                Ok(vm) => vm.spec.data_disks.len(),
                Err(_) => r.data_disks.len(),
            };
            let verdict = if sha != disk.sha256 || size != disk.size_bytes {
                Err(format!(
                    "the uploaded disk is corrupt (sha256 {sha}, expected {})",
                    disk.sha256
                ))
            } else if r.data_disks.len() != wanted {
                Err(format!(
                    "the host sent {} data disk(s); the VM has {wanted}",
                    r.data_disks.len()
                ))
            } else {
                verify_staged_data(app, &e.id, &r.data_disks).await?
            };
            match verdict {
                Ok(sums) => {
                    e.state = "ready".into();
                    e.sha256 = Some(sha);
                    e.size_bytes = Some(size);
                    e.data_disks = sums
                        .into_iter()
                        .enumerate()
                        .map(|(i, d)| virt8ra_api::ExportedDisk {
                            url_path: virt8ra_api::protocol::data_disk_path(&e.url_path, i),
                            sha256: d.sha256,
                            size_bytes: d.size_bytes,
                        })
                        .collect();
                }
                Err(why) => {
                    e.state = "failed".into();
                    e.error = Some(why);
                }
            }
        }
        (MigrationAgentState::Failed, _) => {
            e.state = "failed".into();
            e.error = r.error.clone();
        }
        _ => return Ok(()),
    }
    app.store.put_export(&e).await?;
    app.migrations.set_export(&e);
    app.migrations.forget_reports(&e.id);
    if let Ok(vm) = app.store.get_vm(&e.vm_id).await {
        if let Some(h) = vm.status.host_id {
            let _ = crate::services::scheduler::sync_host(app, &h).await;
        }
    }
    Ok(())
}
