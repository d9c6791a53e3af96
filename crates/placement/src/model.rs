//! The engine's input: sites and hosts as the control plane describes them,
//! independent of how it stores them.

use std::collections::BTreeMap;

use virt8ra_api::Tier;

/// A site with its provider's nationality and the facts placement weighs.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteInfo {
    pub name: String,
    pub provider: String,
    /// Legal seat of the provider (ISO code).
    pub provider_country: String,
    /// Jurisdiction of the provider, e.g. `EU`.
    pub provider_jurisdiction: String,
    /// Country the site is in.
    pub country: String,
    pub tier: Tier,
    pub lat: f64,
    pub lon: f64,
    /// Grid carbon intensity, gCO2eq/kWh.
    pub carbon: Option<f64>,
    pub pue: Option<f64>,
    pub price_vcpu_hour: Option<f64>,
    pub price_gib_hour: Option<f64>,
    /// Router-to-host round trip in ms (defaults: core 1.0, edge 0.5).
    pub access_latency_ms: Option<f64>,
    pub labels: BTreeMap<String, String>,
}

impl SiteInfo {
    pub fn access_ms(&self) -> f64 {
        self.access_latency_ms.unwrap_or(match self.tier {
            Tier::Core => 1.0,
            Tier::Edge => 0.5,
        })
    }

    /// Carbon per unit of IT energy: grid intensity × PUE (PUE 1.4 when unknown).
    pub fn carbon_per_it_kwh(&self) -> Option<f64> {
        self.carbon.map(|c| c * self.pue.unwrap_or(1.4))
    }

    /// Price of one reference VM-hour (1 vCPU + 1 GiB).
    pub fn unit_price(&self) -> Option<f64> {
        match (self.price_vcpu_hour, self.price_gib_hour) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

impl Resources {
    pub fn add(&mut self, o: &Resources) {
        self.vcpus += o.vcpus;
        self.memory_mib += o.memory_mib;
        self.disk_gib += o.disk_gib;
    }
    pub fn sub(&mut self, o: &Resources) {
        self.vcpus = self.vcpus.saturating_sub(o.vcpus);
        self.memory_mib = self.memory_mib.saturating_sub(o.memory_mib);
        self.disk_gib = self.disk_gib.saturating_sub(o.disk_gib);
    }
}

/// A host as the control plane describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostInfo {
    pub name: String,
    /// Site name.
    pub site: String,
    pub arch: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub cpu_flags: Vec<String>,
    pub accelerators: Vec<String>,
    pub kvm: bool,
    /// Confidential computing technologies: `sev-snp`, `tdx`.
    pub confidential: Vec<String>,
    /// Ready for new VMs (not unreachable, disabled or in maintenance).
    pub ready: bool,
    /// vCPU overcommit ratio (1.0 = none).
    pub cpu_ratio: f64,
    /// Memory overcommit ratio (1.0 = none).
    pub mem_ratio: f64,
}

/// A host inside the engine: its description, capacity after overcommit,
/// and what is allocated on it.
#[derive(Debug, Clone)]
pub struct Host {
    pub info: HostInfo,
    pub site: u32,
    pub cap: Resources,
    pub used: Resources,
    pub vms: u32,
}

impl Host {
    pub fn new(info: HostInfo, site: u32) -> Host {
        let cap = Resources {
            vcpus: (f64::from(info.vcpus) * info.cpu_ratio.max(0.0)).floor() as u32,
            memory_mib: (info.memory_mib as f64 * info.mem_ratio.max(0.0)).floor() as u64,
            disk_gib: info.disk_gib,
        };
        Host {
            info,
            site,
            cap,
            used: Resources::default(),
            vms: 0,
        }
    }

    pub fn free_mem(&self) -> u64 {
        self.cap.memory_mib.saturating_sub(self.used.memory_mib)
    }
}
