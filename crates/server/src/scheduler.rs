//! The scheduler: a reconciler that places pending VMs and keeps every
//! connected agent's desired state in step with the store.
//!
//! It takes no input: each pass reads the store and the hub and makes the
//! world match, so it is idempotent and safe to run after a crash, on a
//! timer and whenever it is woken (a VM was created, a host connected).
//!
//! Placement itself sits behind the [`Placer`] seam: a pure function from a
//! VM and the candidate hosts to a choice or an explanation of why nothing
//! fits. [`SimpleFit`] is the backbone's placer; the placement engine
//! replaces it without touching the rest.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use chrono::Utc;
use virt8ra_api::protocol::{DesiredVm, ImageRef, ServerMessage};
use virt8ra_api::{Allocation, Host, HostState, Provider, Site, Vm, VmPhase};
use virt8ra_store::VmFilter;

use crate::error::ApiResult;
use crate::state::App;

/// A host that placement may consider, with its site, provider and what is
/// already allocated on it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub host: Host,
    pub site: Site,
    pub provider: Provider,
    pub allocated: Allocation,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub host_id: String,
    /// Why this host, for people.
    pub reason: String,
}

pub trait Placer: Send + Sync + 'static {
    /// Chooses a host for `vm`, or explains why none fits.
    fn place(&self, vm: &Vm, candidates: &[Candidate]) -> Result<Choice, String>;
}

/// The backbone's placer: the ready host with the most free memory among
/// those that honour the VM's site, provider and country pins and have room.
pub struct SimpleFit;

impl Placer for SimpleFit {
    fn place(&self, vm: &Vm, candidates: &[Candidate]) -> Result<Choice, String> {
        let p = &vm.spec.placement;
        let mut not_ready = 0;
        let mut wrong_site = 0;
        let mut wrong_provider = 0;
        let mut wrong_country = 0;
        let mut no_room = 0;
        let mut best: Option<(&Candidate, u64)> = None;
        for c in candidates {
            if c.host.state != HostState::Ready {
                not_ready += 1;
                continue;
            }
            if p.site.as_ref().is_some_and(|s| *s != c.site.name) {
                wrong_site += 1;
                continue;
            }
            if p.provider.as_ref().is_some_and(|s| *s != c.provider.name) {
                wrong_provider += 1;
                continue;
            }
            if p.country.as_ref().is_some_and(|s| *s != c.site.country) {
                wrong_country += 1;
                continue;
            }
            let inv = &c.host.inventory;
            let free_mem = inv.memory_mib.saturating_sub(c.allocated.memory_mib);
            let fits = c.allocated.vcpus + vm.spec.vcpus <= inv.vcpus
                && vm.spec.memory_mib <= free_mem
                && c.allocated.disk_gib + vm.spec.disk_gib <= inv.disk_gib;
            if !fits {
                no_room += 1;
                continue;
            }
            if best.is_none_or(|(_, m)| free_mem > m) {
                best = Some((c, free_mem));
            }
        }
        if let Some((c, free)) = best {
            return Ok(Choice {
                host_id: c.host.id.clone(),
                reason: format!(
                    "host {} at site {} ({}, {}): ready, has room ({} MiB free before this VM), most free memory of {} fitting host(s)",
                    c.host.name,
                    c.site.name,
                    c.provider.name,
                    c.site.country,
                    free,
                    candidates.len() - not_ready - wrong_site - wrong_provider - wrong_country - no_room
                ),
            });
        }
        let mut parts = Vec::new();
        for (n, what) in [
            (not_ready, "not ready"),
            (wrong_site, "at another site than requested"),
            (wrong_provider, "at another provider than requested"),
            (wrong_country, "in another country than requested"),
            (no_room, "without room for the VM"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        Err(if candidates.is_empty() {
            "0 hosts fit: no host has joined".to_string()
        } else {
            format!("0 of {} hosts fit: {}", candidates.len(), parts.join(", "))
        })
    }
}

/// Resources committed to each host by the VMs placed on it.
pub fn allocations(vms: &[Vm]) -> HashMap<String, Allocation> {
    let mut m: HashMap<String, Allocation> = HashMap::new();
    for vm in vms {
        if vm.status.phase == VmPhase::Deleted {
            continue;
        }
        if let Some(h) = &vm.status.host_id {
            let a = m.entry(h.clone()).or_default();
            a.vms += 1;
            a.vcpus += vm.spec.vcpus;
            a.memory_mib += vm.spec.memory_mib;
            a.disk_gib += vm.spec.disk_gib;
        }
    }
    m
}

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
    loop {
        if let Err(e) = pass(&app).await {
            tracing::warn!(error = %e, "scheduler pass failed; retrying");
        }
        tokio::select! {
            _ = app.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// One reconciliation pass.
pub async fn pass(app: &App) -> ApiResult<()> {
    place_pending(app).await?;
    for host_id in app.hub.connected_hosts() {
        sync_host(app, &host_id).await?;
    }
    Ok(())
}

async fn place_pending(app: &App) -> ApiResult<()> {
    let pending = app
        .store
        .list_vms(&VmFilter {
            phase: Some(VmPhase::Pending),
            ..Default::default()
        })
        .await?;
    if pending.is_empty() {
        return Ok(());
    }
    let _guard = app.vm_lock.lock().await;
    let all = app.store.list_vms(&VmFilter::default()).await?;
    let mut alloc = allocations(&all);
    let sites: HashMap<String, Site> = app
        .store
        .list_sites()
        .await?
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect();
    let providers: HashMap<String, Provider> = app
        .store
        .list_providers()
        .await?
        .into_iter()
        .map(|p| (p.name.clone(), p))
        .collect();
    let hosts = app.store.list_hosts().await?;
    for vm in pending {
        // Re-read under the lock: it may have changed since the first list.
        let mut vm = app.store.get_vm(&vm.id).await?;
        if vm.status.phase != VmPhase::Pending {
            continue;
        }
        let candidates: Vec<Candidate> = hosts
            .iter()
            .filter_map(|h| {
                let site = sites.get(&h.site)?.clone();
                let provider = providers.get(&site.provider)?.clone();
                let allocated = alloc.get(&h.id).copied().unwrap_or_default();
                Some(Candidate {
                    host: host_view(app, h.clone(), Some(&allocated)),
                    site,
                    provider,
                    allocated,
                })
            })
            .collect();
        match app.placer.place(&vm, &candidates) {
            Ok(choice) => {
                let Some(c) = candidates.iter().find(|c| c.host.id == choice.host_id) else {
                    continue;
                };
                vm.status.phase = VmPhase::Scheduled;
                vm.status.host_id = Some(c.host.id.clone());
                vm.status.host = Some(c.host.name.clone());
                vm.status.site = Some(c.site.name.clone());
                vm.status.provider = Some(c.provider.name.clone());
                vm.status.country = Some(c.site.country.clone());
                vm.status.hypervisor = Some(c.host.inventory.hypervisor);
                vm.status.placement_reason = Some(choice.reason.clone());
                vm.status.last_error = None;
                vm.updated_at = Utc::now();
                app.store
                    .update_vm(&vm, Some(&format!("scheduled: {}", choice.reason)))
                    .await?;
                let a = alloc.entry(c.host.id.clone()).or_default();
                a.vms += 1;
                a.vcpus += vm.spec.vcpus;
                a.memory_mib += vm.spec.memory_mib;
                a.disk_gib += vm.spec.disk_gib;
            }
            Err(why) => {
                if vm.status.placement_reason.as_deref() != Some(why.as_str()) {
                    vm.status.placement_reason = Some(why.clone());
                    vm.updated_at = Utc::now();
                    app.store
                        .update_vm(&vm, Some(&format!("not placed: {why}")))
                        .await?;
                }
            }
        }
    }
    Ok(())
}

/// The VMs a host should run, as the agent protocol carries them.
pub async fn desired_for(app: &App, host_id: &str) -> ApiResult<Vec<DesiredVm>> {
    let vms = app
        .store
        .list_vms(&VmFilter {
            host_id: Some(host_id.to_string()),
            ..Default::default()
        })
        .await?;
    let mut images: HashMap<String, ImageRef> = HashMap::new();
    let mut out = Vec::new();
    for vm in vms {
        if matches!(vm.status.phase, VmPhase::Deleting | VmPhase::Deleted) {
            continue;
        }
        let Some(image_id) = vm.status.image_id.clone() else {
            continue;
        };
        let image = match images.get(&image_id) {
            Some(i) => i.clone(),
            None => {
                let i = app.store.get_image(&image_id).await?;
                let r = ImageRef {
                    url_path: format!("/api/v1/images/{}/data", i.id),
                    id: i.id,
                    name: i.name,
                    sha256: i.sha256,
                    size_bytes: i.size_bytes,
                };
                images.insert(image_id, r.clone());
                r
            }
        };
        out.push(DesiredVm {
            id: vm.id,
            name: vm.name,
            vcpus: vm.spec.vcpus,
            memory_mib: vm.spec.memory_mib,
            disk_gib: vm.spec.disk_gib,
            image,
            user_data: vm.spec.user_data,
            ports: vm.spec.ports,
            power: vm.power,
            reboot_generation: vm.reboot_generation,
            stop_timeout_s: vm.stop_timeout_s,
        });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Sends the host its desired state if it changed since the last send.
pub async fn sync_host(app: &App, host_id: &str) -> ApiResult<()> {
    let vms = desired_for(app, host_id).await?;
    let fingerprint = {
        let mut h = DefaultHasher::new();
        serde_json::to_string(&vms).unwrap_or_default().hash(&mut h);
        h.finish()
    };
    // Generations grow with wall-clock time, so they keep increasing across
    // control-plane restarts.
    let generation = Utc::now().timestamp_micros().max(0) as u64;
    app.hub.send_desired(
        host_id,
        fingerprint,
        ServerMessage::DesiredState { generation, vms },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virt8ra_api::*;

    fn cand(name: &str, site: &str, country: &str, mem: u64, used: u64) -> Candidate {
        Candidate {
            host: Host {
                id: name.into(),
                name: name.into(),
                site: site.into(),
                provider: format!("p-{site}"),
                country: country.into(),
                inventory: HostInventory {
                    hostname: name.into(),
                    arch: "x86_64".into(),
                    vcpus: 4,
                    memory_mib: mem,
                    disk_gib: 100,
                    cpu_model: String::new(),
                    cpu_flags: vec![],
                    accelerators: vec![],
                    hypervisor: Hypervisor::Emulation,
                    agent_version: String::new(),
                    qemu_version: String::new(),
                },
                state: HostState::Ready,
                connected: true,
                last_heartbeat: None,
                usage: Default::default(),
                allocated: Default::default(),
                created_at: Utc::now(),
            },
            site: Site {
                id: site.into(),
                name: site.into(),
                provider: format!("p-{site}"),
                country: country.into(),
                city: "x".into(),
                latitude: 0.0,
                longitude: 0.0,
                tier: Tier::Core,
                facts: Default::default(),
                labels: Default::default(),
                created_at: Utc::now(),
            },
            provider: Provider {
                id: format!("p-{site}"),
                name: format!("p-{site}"),
                country: country.into(),
                jurisdiction: "EU".into(),
                created_at: Utc::now(),
            },
            allocated: Allocation {
                vms: 0,
                vcpus: 0,
                memory_mib: used,
                disk_gib: 0,
            },
        }
    }

    fn vm(mem: u64, country: Option<&str>) -> Vm {
        let c: VmCreate = serde_json::from_value(serde_json::json!({
            "name": "v", "image": "i", "memory_mib": mem,
            "placement": {"country": country}
        }))
        .unwrap();
        Vm {
            id: "v".into(),
            name: "v".into(),
            spec: c.spec(),
            power: PowerState::Running,
            reboot_generation: 0,
            stop_timeout_s: 30,
            status: VmStatus {
                phase: VmPhase::Pending,
                host: None,
                host_id: None,
                site: None,
                provider: None,
                country: None,
                image_id: None,
                placement_reason: None,
                last_error: None,
                ports: vec![],
                started_at: None,
                hypervisor: None,
            },
            created_at: Utc::now(),
            updated_at: Utc::now(),
        }
    }

    #[test]
    fn picks_most_free_memory_within_pins() {
        let c = vec![
            cand("a", "s1", "DE", 4096, 0),
            cand("b", "s2", "PL", 2048, 0),
            cand("c", "s3", "PL", 4096, 1024),
        ];
        assert_eq!(SimpleFit.place(&vm(256, None), &c).unwrap().host_id, "a");
        assert_eq!(
            SimpleFit.place(&vm(256, Some("PL")), &c).unwrap().host_id,
            "c"
        );
    }

    #[test]
    fn explains_why_nothing_fits() {
        let mut c = vec![
            cand("a", "s1", "DE", 4096, 0),
            cand("b", "s2", "PL", 512, 0),
            cand("c", "s3", "PL", 4096, 0),
        ];
        c[2].host.state = HostState::Maintenance;
        let why = SimpleFit.place(&vm(1024, Some("PL")), &c).unwrap_err();
        assert_eq!(
            why,
            "0 of 3 hosts fit: 1 not ready, 1 in another country than requested, 1 without room for the VM"
        );
    }
}
