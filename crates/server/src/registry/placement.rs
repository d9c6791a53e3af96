//! The placement engine as the control plane keeps it loaded: the pure
//! engine of `virt8ra-placement` with the current sites, hosts and
//! allocations, in memory, so a decision never scans the database.
//!
//! This module is the in-memory state and the conversions from the API's
//! types to the engine's; it knows nothing of the store or the hub. Loading
//! the engine from them and keeping host readiness fresh is the placement
//! service's ([`crate::services::placement`]), which adds those methods.

use std::collections::HashMap;
use std::sync::Mutex;

use virt8ra_api::Host;
use virt8ra_api::{HostState, Hypervisor, PlacementConstraints, Provider, Site, Vm, VmPhase};
use virt8ra_placement::{Engine, HostInfo, Request, Resources, SiteInfo, Weights};

use crate::registry::networks::NetworkSpans;

/// Operator settings for placement.
#[derive(Debug, Clone, Copy)]
pub struct PlacementConfig {
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
    pub weights: Weights,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        PlacementConfig {
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            weights: Weights::default(),
        }
    }
}

pub struct LoadedPlacement {
    pub config: PlacementConfig,
    pub(crate) loaded: Mutex<Option<Loaded>>,
    /// Held while the engine is rebuilt, so that callers who find it
    /// missing wait for one rebuild instead of each making their own (at a
    /// million VMs a rebuild holds a copy of every allocation, and a few at
    /// once took gigabytes).
    pub(crate) building: tokio::sync::Mutex<()>,
    /// Where each virtual network reaches: a VM with NICs is placed only
    /// where all its networks do (see [`LoadedPlacement::request`]).
    pub spans: NetworkSpans,
}

pub(crate) struct Loaded {
    pub(crate) engine: Engine,
    /// Host name -> (id, operator state), for readiness.
    pub(crate) hosts: HashMap<String, (String, HostState)>,
    /// Host id -> name (the hub names hosts by id).
    pub(crate) names: HashMap<String, String>,
    /// When readiness was last refreshed from the hub.
    pub(crate) refreshed: Option<std::time::Instant>,
}

/// How stale host readiness may be for a decision. Liveness itself is
/// judged over three heartbeat intervals, so this changes little; it keeps
/// the hub's pass over its connections off the path of every single
/// placement.
pub(crate) const READINESS_TTL: std::time::Duration = std::time::Duration::from_secs(1);
impl LoadedPlacement {
    pub fn new(config: PlacementConfig) -> LoadedPlacement {
        LoadedPlacement {
            config,
            loaded: Mutex::new(None),
            building: tokio::sync::Mutex::new(()),
            spans: NetworkSpans::default(),
        }
    }

    /// The topology changed: rebuild before the next decision.
    pub fn invalidate(&self) {
        *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Books `vm` where it is now (its host in the index), or frees its
    /// allocation when it has no host any more: after a migration moved it,
    /// instead of a rebuild, which costs O(hosts + VMs) per migration.
    pub fn rebook(&self, vm: &Vm) {
        let mut g = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let Some(l) = g.as_mut() else {
            return;
        };
        let host = vm
            .status
            .host_id
            .as_ref()
            .filter(|_| vm.status.phase != VmPhase::Deleted)
            .and_then(|id| l.names.get(id));
        let Some(host) = host else {
            l.engine.release(&vm.id);
            return;
        };
        let req = self.booked_request(vm);
        if l.engine.commit(&vm.id, host, &req).is_err() {
            // A host the engine does not know: rebuild before the next decision.
            *g = None;
        }
    }

    /// The placement request of a VM (validated): its own rules narrowed
    /// by the spans of its NICs' networks. Every decision about a VM that
    /// exists (the scheduler's, a migration's, a rebalance's from the
    /// booked requests) starts here, so none can leave a network's span.
    pub fn request(&self, vm: &Vm) -> Result<Request, String> {
        let c = self.spans.constraints(vm)?;
        Ok(Request::new(resources(vm), c, self.config.weights)?.with_ports(published(vm)))
    }

    /// The request under which an existing VM's capacity is booked: its own,
    /// or, for a spec from an older rule set that no longer validates, its
    /// resources alone (its capacity stays accounted).
    pub(crate) fn booked_request(&self, vm: &Vm) -> Request {
        let weights = self.config.weights;
        self.request(vm).unwrap_or_else(|_| {
            Request::new(resources(vm), PlacementConstraints::default(), weights)
                .unwrap_or_else(|_| unreachable_request(vm))
                .with_ports(published(vm))
        })
    }

    /// Frees a VM's allocation (it was deleted).
    pub fn release(&self, vm_id: &str) {
        if let Some(l) = self
            .loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            l.engine.release(vm_id);
        }
    }
}

/// The engine's key for the capacity a migration holds on its target,
/// beside the VM's own allocation on its source.
pub fn reservation(vm_id: &str, migration_id: &str) -> String {
    format!("{vm_id}/migration/{migration_id}")
}

/// Whether an engine key is a migration's reservation, not a VM.
pub fn is_reservation(key: &str) -> bool {
    key.contains("/migration/")
}

fn unreachable_request(vm: &Vm) -> Request {
    Request {
        res: resources(vm),
        c: PlacementConstraints::default(),
        latency: None,
        latency_from: None,
        weights: Weights::default(),
        ports: Vec::new(),
    }
}

/// The host ports a VM publishes (placement keeps two VMs on one host
/// from publishing the same).
pub fn published(vm: &Vm) -> Vec<virt8ra_api::PublishedPort> {
    vm.spec
        .publish
        .iter()
        .map(virt8ra_api::VmPublish::port)
        .collect()
}

pub fn resources(vm: &Vm) -> Resources {
    Resources {
        vcpus: vm.spec.vcpus,
        memory_mib: vm.spec.memory_mib,
        disk_gib: vm.spec.total_disk_gib(),
    }
}

pub fn site_info(s: &Site, p: Option<&Provider>) -> SiteInfo {
    SiteInfo {
        name: s.name.clone(),
        provider: s.provider.clone(),
        provider_country: p.map(|p| p.country.clone()).unwrap_or_default(),
        provider_jurisdiction: p.map(|p| p.jurisdiction.clone()).unwrap_or_default(),
        country: s.country.clone(),
        tier: s.tier,
        lat: s.latitude,
        lon: s.longitude,
        carbon: s.facts.grid_gco2_per_kwh,
        pue: s.facts.pue,
        price_vcpu_hour: s.facts.price_vcpu_hour,
        price_gib_hour: s.facts.price_gib_hour,
        access_latency_ms: s.facts.access_latency_ms,
        labels: s.labels.clone(),
    }
}

pub fn host_info(h: &Host, cfg: &PlacementConfig) -> HostInfo {
    let inv = &h.inventory;
    HostInfo {
        name: h.name.clone(),
        site: h.site.clone(),
        arch: inv.arch.clone(),
        vcpus: inv.vcpus,
        memory_mib: inv.memory_mib,
        disk_gib: inv.disk_gib,
        cpu_flags: inv.cpu_flags.clone(),
        accelerators: inv.accelerators.clone(),
        kvm: inv.hypervisor == Hypervisor::Kvm,
        confidential: inv
            .cpu_flags
            .iter()
            .filter_map(|f| match f.as_str() {
                "sev_snp" => Some("sev-snp".to_string()),
                "tdx_guest" | "tdx" => Some("tdx".to_string()),
                _ => None,
            })
            .collect(),
        ready: h.state == HostState::Ready,
        cpu_ratio: h.cpu_overcommit.unwrap_or(cfg.cpu_overcommit),
        mem_ratio: h.memory_overcommit.unwrap_or(cfg.memory_overcommit),
    }
}
