//! What each host should run, as the agent protocol carries it: the VMs
//! placed on it and the migration roles of those on the move (incoming,
//! outgoing, export).
//!
//! The scheduler sends this to the agents ([`crate::services::scheduler`]);
//! the migration workflow changes it only through the records it keeps in
//! the registry ([`crate::registry::migrations`]), which [`apply_roles`]
//! reads, so the workflow and the scheduler do not import each other.

use std::collections::HashMap;

use virt8ra_api::protocol::{
    DesiredDisk, DesiredNic, DesiredVm, ImageRef, MigrationRole, MigrationSide, StagedDisk,
};
use virt8ra_api::{MigrationMode, MigrationPhase, Vm, VmPhase};
use virt8ra_store::VmFilter;

use crate::error::ApiResult;
use crate::state::Ctx;

/// The VMs a host should run, as the agent protocol carries them: those
/// placed on it, with the migration roles of those on the move, and those
/// migrating to it.
pub async fn desired_for(
    app: &Ctx,
    host_id: &str,
    plan: &crate::services::distribution::HostPlan,
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
    apply_roles(app, host_id, &mut out, &mut images).await?;
    // Where this host fetches images: its site's copy first.
    for d in &mut out {
        d.set_image_sources(&plan.sources);
    }
    Ok(out)
}

/// One VM as the agent protocol carries it (`None` without an image).
pub async fn desired_vm(
    app: &Ctx,
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
        nics: vm.status.nics.iter().filter_map(desired_nic).collect(),
    }))
}

/// A NIC as the agent plugs it in. Its MAC was written by the control
/// plane itself (`mac_for_nic`); one that does not parse is left out, with
/// a warning, rather than fail the whole VM.
fn desired_nic(n: &virt8ra_api::VmNic) -> Option<DesiredNic> {
    let mac = match n.mac.parse() {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(nic = %n.id, error = %e, "NIC left out of the desired state");
            return None;
        }
    };
    Some(DesiredNic {
        id: n.id.clone(),
        network: n.network_id.clone(),
        mac,
        ip: n.ip,
        prefix: n.prefix,
        tap: virt8ra_api::tap_name(&n.id),
    })
}

/// What the agent is told of image `id` (from the pass's, then the
/// control plane's, memory before the store).
async fn image_ref_of(
    app: &Ctx,
    id: &str,
    images: &mut HashMap<String, ImageRef>,
) -> ApiResult<ImageRef> {
    if let Some(r) = images.get(id).cloned().or_else(|| app.image_ref(id)) {
        return Ok(r);
    }
    let i = app.store.get_image(id).await?;
    let r = crate::services::distribution::image_ref(&i);
    app.remember_image_ref(&r);
    images.insert(id.to_string(), r.clone());
    Ok(r)
}

/// The migration roles of the VMs a host should have: adds the VMs coming
/// in and marks those going out (called when computing its desired state).
pub async fn apply_roles(
    app: &Ctx,
    host_id: &str,
    out: &mut Vec<DesiredVm>,
    images: &mut HashMap<String, virt8ra_api::protocol::ImageRef>,
) -> ApiResult<()> {
    for m in app.migrations.active() {
        let live = m.mode == MigrationMode::Live;
        if m.source.host_id == host_id {
            let role = match m.phase {
                MigrationPhase::Transferring | MigrationPhase::PreparingTarget if !live => {
                    Some(MigrationRole::Outgoing {
                        migration_id: m.id.clone(),
                        mode: m.mode,
                        target: None,
                        upload_path: Some(format!("/api/v1/staging/{}", m.id)),
                        relay: false,
                    })
                }
                // The target's endpoints once they are known (after a
                // restart of the control plane, from the target's next
                // report); until then the role holds the source as it is
                // (withdrawn, it would read as a rollback and resume the
                // guest, which may run on the target already).
                MigrationPhase::Transferring => Some(MigrationRole::Outgoing {
                    migration_id: m.id.clone(),
                    mode: m.mode,
                    target: app
                        .migrations
                        .report(&m.id, MigrationSide::Target)
                        .and_then(|r| r.endpoints),
                    upload_path: None,
                    relay: m.relay,
                }),
                // Held (not resumed) until the target copy is gone.
                MigrationPhase::RollingBack if m.source_engaged => Some(MigrationRole::Outgoing {
                    migration_id: m.id.clone(),
                    mode: m.mode,
                    target: None,
                    upload_path: None,
                    relay: m.relay,
                }),
                _ => None,
            };
            if let (Some(role), Some(d)) = (role, out.iter_mut().find(|d| d.id == m.vm_id)) {
                d.migration = Some(role);
            }
        }
        if m.target.host_id == host_id {
            let incoming = match m.phase {
                MigrationPhase::PreparingTarget => true,
                MigrationPhase::Transferring => live,
                _ => false,
            };
            if incoming && !out.iter().any(|d| d.id == m.vm_id) {
                let vm = app.store.get_vm(&m.vm_id).await?;
                let Some(mut d) = desired_vm(app, &vm, images).await? else {
                    continue;
                };
                d.site = Some(m.target.site.clone());
                d.migration = Some(MigrationRole::Incoming {
                    migration_id: m.id.clone(),
                    mode: m.mode,
                    disk: match (&m.disk_sha256, m.disk_bytes) {
                        (Some(sha), Some(size)) if !live => Some(StagedDisk {
                            url_path: format!("/api/v1/staging/{}", m.id),
                            sha256: sha.clone(),
                            size_bytes: size,
                        }),
                        _ => None,
                    },
                    data_disks: if live {
                        vec![]
                    } else {
                        m.data_disks
                            .iter()
                            .enumerate()
                            .map(|(i, s)| StagedDisk {
                                url_path: virt8ra_api::protocol::data_disk_path(
                                    &format!("/api/v1/staging/{}", m.id),
                                    i,
                                ),
                                sha256: s.sha256.clone(),
                                size_bytes: s.size_bytes,
                            })
                            .collect()
                    },
                    relay: m.relay,
                });
                out.push(d);
            }
        }
    }
    for e in app.migrations.active_exports() {
        if let Some(d) = out.iter_mut().find(|d| d.id == e.vm_id) {
            d.migration = Some(MigrationRole::Export {
                export_id: e.id.clone(),
                upload_path: e.url_path.clone(),
            });
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(())
}
