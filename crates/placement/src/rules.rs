//! Hard rules, compiled from a VM's placement constraints, and the checks
//! that every path (the indexed fast path, the explanation, the brute-force
//! test oracle) shares, so they cannot disagree.
//!
//! Rules are checked in a fixed order; a host that breaks several is counted
//! under the first, so an explanation's counts add up to the number of hosts.

use std::collections::BTreeMap;

use virt8ra_api::validate::{COUNTRIES, EU};
use virt8ra_api::{Level, PlacementConstraints, PublishedPort, Strategy, Tier};

use crate::geo;
use crate::model::{Host, HostInfo, Resources, SiteInfo};

/// The hard rules, in the order they are checked and explained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    Site,
    Provider,
    ProviderNationality,
    Country,
    Tier,
    Labels,
    Latency,
    NotReady,
    Group,
    Arch,
    Kvm,
    CpuFlags,
    Accelerators,
    Confidential,
    Vcpus,
    Memory,
    Disk,
    Ports,
}

impl Rule {
    pub const ALL: [Rule; 18] = [
        Rule::Site,
        Rule::Provider,
        Rule::ProviderNationality,
        Rule::Country,
        Rule::Tier,
        Rule::Labels,
        Rule::Latency,
        Rule::NotReady,
        Rule::Group,
        Rule::Arch,
        Rule::Kvm,
        Rule::CpuFlags,
        Rule::Accelerators,
        Rule::Confidential,
        Rule::Vcpus,
        Rule::Memory,
        Rule::Disk,
        Rule::Ports,
    ];

    /// "N hosts <this>".
    pub fn describe(self) -> &'static str {
        match self {
            Rule::Site => "at sites the VM may not use",
            Rule::Provider => "at providers the VM may not use",
            Rule::ProviderNationality => "at providers outside the allowed jurisdictions",
            Rule::Country => "outside the allowed countries",
            Rule::Tier => "at sites of another tier",
            Rule::Labels => "at sites without the required labels",
            Rule::Latency => "over the latency bound",
            Rule::NotReady => "not ready (unreachable, disabled or in maintenance)",
            Rule::Group => "excluded by affinity or anti-affinity",
            Rule::Arch => "of another architecture",
            Rule::Kvm => "without KVM",
            Rule::CpuFlags => "missing required CPU flags",
            Rule::Accelerators => "missing required accelerators",
            Rule::Confidential => "without the required confidential computing",
            Rule::Vcpus => "short of vCPUs",
            Rule::Memory => "short of memory",
            Rule::Disk => "short of disk",
            Rule::Ports => "where a host port it publishes is taken",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Rule::Site => "site",
            Rule::Provider => "provider",
            Rule::ProviderNationality => "provider_nationality",
            Rule::Country => "country",
            Rule::Tier => "tier",
            Rule::Labels => "labels",
            Rule::Latency => "latency",
            Rule::NotReady => "not_ready",
            Rule::Group => "group",
            Rule::Arch => "arch",
            Rule::Kvm => "kvm",
            Rule::CpuFlags => "cpu_flags",
            Rule::Accelerators => "accelerators",
            Rule::Confidential => "confidential",
            Rule::Vcpus => "vcpus",
            Rule::Memory => "memory",
            Rule::Disk => "disk",
            Rule::Ports => "ports",
        }
    }
}

/// EEA = EU + Iceland, Liechtenstein, Norway.
const EEA_EXTRA: &[&str] = &["IS", "LI", "NO"];

fn in_jurisdiction(country: &str, j: &str) -> bool {
    match j {
        "EU" => EU.contains(&country),
        "EEA" => EU.contains(&country) || EEA_EXTRA.contains(&country),
        c => c == country,
    }
}

/// Weights of the soft preferences, normalised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    pub pack: bool,
    pub capacity: f64,
    pub energy: f64,
    pub cost: f64,
    pub latency: f64,
    pub balance: f64,
}

impl Default for Weights {
    /// The operator's defaults: pack, prefer green, then cheap, then close.
    fn default() -> Self {
        Weights {
            pack: true,
            capacity: 1.0,
            energy: 1.0,
            cost: 0.5,
            latency: 1.0,
            balance: 0.2,
        }
    }
}

/// What one VM needs, compiled for fast checks.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub res: Resources,
    pub c: PlacementConstraints,
    /// Latency origin and bound (lat, lon, max ms), resolved.
    pub latency: Option<(f64, f64, f64)>,
    /// Name of the user location, for measured RTTs.
    pub latency_from: Option<String>,
    pub weights: Weights,
    /// Host ports the VM publishes: no two VMs on one host may publish
    /// the same (see [`PublishedPort::clashes`]). Host-level, like
    /// capacity, so not part of [`Request::site_key`].
    pub ports: Vec<PublishedPort>,
}

impl Request {
    /// Compiles and validates a VM's placement constraints.
    pub fn new(
        res: Resources,
        c: PlacementConstraints,
        defaults: Weights,
    ) -> Result<Request, String> {
        validate(&c)?;
        let latency = match &c.max_latency {
            None => None,
            Some(b) => {
                let (lat, lon) = match (&b.from, b.latitude, b.longitude) {
                    (Some(city), None, None) => geo::city(city).ok_or_else(|| {
                        format!("unknown user location {city:?}: name a known city or give latitude and longitude")
                    })?,
                    (None, Some(lat), Some(lon)) => (lat, lon),
                    _ => {
                        return Err(
                            "max_latency needs either `from` (a city) or both latitude and longitude"
                                .into(),
                        )
                    }
                };
                Some((lat, lon, b.max_rtt_ms))
            }
        };
        let mut w = defaults;
        if let Some(p) = &c.policy {
            if let Some(s) = p.strategy {
                w.pack = s == Strategy::Pack;
            }
            for (field, v) in [
                (&mut w.capacity, p.capacity),
                (&mut w.energy, p.energy),
                (&mut w.cost, p.cost),
                (&mut w.latency, p.latency),
                (&mut w.balance, p.balance),
            ] {
                if let Some(v) = v {
                    *field = v;
                }
            }
        }
        if latency.is_none() {
            w.latency = 0.0;
        }
        Ok(Request {
            res,
            latency_from: c.max_latency.as_ref().and_then(|b| b.from.clone()),
            c,
            latency,
            weights: w,
            ports: Vec::new(),
        })
    }

    /// The request with the host ports the VM publishes.
    pub fn with_ports(mut self, ports: Vec<PublishedPort>) -> Request {
        self.ports = ports;
        self
    }

    /// The key under which site-level results can be cached: everything but
    /// the group rules, which depend on the current placements.
    pub fn site_key(&self) -> String {
        let mut c = self.c.clone();
        c.anti_affinity = None;
        c.affinity = None;
        c.policy = None;
        format!(
            "{}|{:?}",
            serde_json::to_string(&c).unwrap_or_default(),
            self.weights
        )
    }
}

fn check_countries(list: &[String], what: &str) -> Result<(), String> {
    for c in list {
        if !COUNTRIES.contains(&c.as_str()) {
            return Err(format!(
                "unknown country code {c:?} in {what}: use ISO 3166-1 alpha-2 in upper case, e.g. \"PL\""
            ));
        }
    }
    Ok(())
}

fn check_jurisdictions(list: &[String], what: &str) -> Result<(), String> {
    for j in list {
        if j != "EU" && j != "EEA" && !COUNTRIES.contains(&j.as_str()) {
            return Err(format!(
                "unknown jurisdiction {j:?} in {what}: use \"EU\", \"EEA\" or a country code"
            ));
        }
    }
    Ok(())
}

/// Rejects constraints that are malformed or contradict themselves.
pub fn validate(c: &PlacementConstraints) -> Result<(), String> {
    if let Some(x) = &c.country {
        check_countries(std::slice::from_ref(x), "country")?;
    }
    check_countries(&c.countries, "countries")?;
    check_countries(&c.deny_countries, "deny_countries")?;
    check_jurisdictions(&c.jurisdictions, "jurisdictions")?;
    check_jurisdictions(&c.provider_jurisdictions, "provider_jurisdictions")?;
    for x in &c.countries {
        if c.deny_countries.contains(x) {
            return Err(format!("country {x} is both allowed and denied"));
        }
    }
    if let Some(x) = &c.country {
        if c.deny_countries.contains(x) {
            return Err(format!("country {x} is both pinned and denied"));
        }
        if !c.countries.is_empty() && !c.countries.contains(x) {
            return Err(format!(
                "country {x} is pinned but not among the allowed countries {:?}",
                c.countries
            ));
        }
    }
    if !c.jurisdictions.is_empty() {
        let allowed: Vec<&String> = c.countries.iter().chain(c.country.iter()).collect();
        if !allowed.is_empty()
            && !allowed
                .iter()
                .any(|x| c.jurisdictions.iter().any(|j| in_jurisdiction(x, j)))
        {
            return Err(format!(
                "no allowed country lies in the allowed jurisdictions {:?}",
                c.jurisdictions
            ));
        }
    }
    for x in &c.providers {
        if c.deny_providers.contains(x) {
            return Err(format!("provider {x} is both allowed and denied"));
        }
    }
    for x in &c.sites {
        if c.deny_sites.contains(x) {
            return Err(format!("site {x} is both allowed and denied"));
        }
    }
    if let Some(a) = &c.arch {
        if !["x86_64", "aarch64", "riscv64"].contains(&a.as_str()) {
            return Err(format!(
                "unknown arch {a:?}: use x86_64, aarch64 or riscv64"
            ));
        }
    }
    if let Some(x) = &c.confidential {
        if x != "sev-snp" && x != "tdx" {
            return Err(format!(
                "unknown confidential computing {x:?}: use sev-snp or tdx"
            ));
        }
    }
    if let Some(b) = &c.max_latency {
        if !b.max_rtt_ms.is_finite() || b.max_rtt_ms <= 0.0 {
            return Err(format!(
                "max_latency.max_rtt_ms must be a positive number of milliseconds, got {}",
                b.max_rtt_ms
            ));
        }
        if let Some(lat) = b.latitude {
            if !(-90.0..=90.0).contains(&lat) {
                return Err(format!("max_latency.latitude {lat} is outside -90..90"));
            }
        }
        if let Some(lon) = b.longitude {
            if !(-180.0..=180.0).contains(&lon) {
                return Err(format!("max_latency.longitude {lon} is outside -180..180"));
            }
        }
    }
    for g in [&c.anti_affinity, &c.affinity].into_iter().flatten() {
        if g.group.is_empty() || g.group.len() > 128 {
            return Err("a group name must be 1-128 characters".into());
        }
    }
    if let (Some(a), Some(b)) = (&c.anti_affinity, &c.affinity) {
        if a.group == b.group {
            return Err(format!(
                "group {:?} cannot be both affine and anti-affine",
                a.group
            ));
        }
    }
    if let Some(p) = &c.policy {
        for (what, v) in [
            ("capacity", p.capacity),
            ("energy", p.energy),
            ("cost", p.cost),
            ("latency", p.latency),
            ("balance", p.balance),
        ] {
            if let Some(v) = v {
                if !(0.0..=10.0).contains(&v) {
                    return Err(format!("policy weight {what} {v} is outside 0..10"));
                }
            }
        }
    }
    Ok(())
}

/// Site-level rules. `rtt` is the round-trip time from the request's user
/// location to the site, when the request has a latency bound.
pub fn check_site(site: &SiteInfo, r: &Request, rtt: Option<f64>) -> Result<(), Rule> {
    let c = &r.c;
    if c.site.as_ref().is_some_and(|s| *s != site.name)
        || (!c.sites.is_empty() && !c.sites.contains(&site.name))
        || c.deny_sites.contains(&site.name)
    {
        return Err(Rule::Site);
    }
    if c.provider.as_ref().is_some_and(|p| *p != site.provider)
        || (!c.providers.is_empty() && !c.providers.contains(&site.provider))
        || c.deny_providers.contains(&site.provider)
    {
        return Err(Rule::Provider);
    }
    if !c.provider_jurisdictions.is_empty()
        && !c
            .provider_jurisdictions
            .iter()
            .any(|j| in_jurisdiction(&site.provider_country, j) || *j == site.provider_jurisdiction)
    {
        return Err(Rule::ProviderNationality);
    }
    if c.country.as_ref().is_some_and(|x| *x != site.country)
        || (!c.countries.is_empty() && !c.countries.contains(&site.country))
        || c.deny_countries.contains(&site.country)
        || (!c.jurisdictions.is_empty()
            && !c
                .jurisdictions
                .iter()
                .any(|j| in_jurisdiction(&site.country, j)))
    {
        return Err(Rule::Country);
    }
    if c.tier.is_some_and(|t| t != site.tier) {
        return Err(Rule::Tier);
    }
    if !labels_match(&c.labels, &site.labels) {
        return Err(Rule::Labels);
    }
    if let (Some((_, _, max)), Some(rtt)) = (r.latency, rtt) {
        if rtt > max {
            return Err(Rule::Latency);
        }
    }
    Ok(())
}

fn labels_match(want: &BTreeMap<String, String>, have: &BTreeMap<String, String>) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

/// Host features (everything but state, groups and capacity).
pub fn check_features(h: &HostInfo, r: &Request) -> Result<(), Rule> {
    let c = &r.c;
    if c.arch.as_ref().is_some_and(|a| *a != h.arch) {
        return Err(Rule::Arch);
    }
    if c.require_kvm && !h.kvm {
        return Err(Rule::Kvm);
    }
    if !c.cpu_flags.iter().all(|f| h.cpu_flags.contains(f)) {
        return Err(Rule::CpuFlags);
    }
    if !c.accelerators.iter().all(|a| h.accelerators.contains(a)) {
        return Err(Rule::Accelerators);
    }
    if c.confidential
        .as_ref()
        .is_some_and(|x| !h.confidential.contains(x))
    {
        return Err(Rule::Confidential);
    }
    Ok(())
}

/// Capacity, with the host's overcommit ratios.
pub fn check_capacity(h: &Host, need: &Resources) -> Result<(), Rule> {
    if h.used.vcpus + need.vcpus > h.cap.vcpus {
        return Err(Rule::Vcpus);
    }
    if h.used.memory_mib + need.memory_mib > h.cap.memory_mib {
        return Err(Rule::Memory);
    }
    if h.used.disk_gib + need.disk_gib > h.cap.disk_gib {
        return Err(Rule::Disk);
    }
    Ok(())
}

/// Which value of a level a site/host has, for group rules.
pub fn level_key(level: Level, host_name: &str, site: &SiteInfo) -> String {
    match level {
        Level::Host => host_name.to_string(),
        Level::Site => site.name.clone(),
        Level::Provider => site.provider.clone(),
        Level::Country => site.country.clone(),
    }
}

/// Tier from the API, re-exported for callers building sites.
pub type SiteTier = Tier;
