//! The placement engine: indexes over hosts and the decision procedure.
//!
//! Hosts' live capacity is kept in memory, indexed per site and, within a
//! site, per feature class (hosts with the same architecture, KVM, CPU
//! flags, accelerators and confidential computing), each class's ready hosts
//! in a `BTreeSet<(in use?, free MiB, host)>`. A decision works at two
//! levels:
//!
//! 1. Site-level rules (residency, provider, tier, labels, latency) and the
//!    site-level part of the score (energy, cost, latency) depend only on the
//!    request's shape, not on current placements, so they are evaluated once
//!    per shape and cached: a sorted list of the sites that pass.
//! 2. Within each passing site, the index yields the best-fitting host with
//!    enough free memory in O(log n), in the classes whose features pass
//!    (decided once per class); the remaining host checks (vCPUs, disk,
//!    host-level groups) run on the few hosts the index yields.
//!    Sites are visited best score first, and the search stops as soon as no
//!    remaining site could beat the best host found (branch and bound).
//!
//! Every candidate is accepted only through the same checks the explanation
//! and the tests' brute-force oracle use (`rules.rs`), so the fast path can
//! never accept a host that breaks a hard rule. When nothing fits, a scan
//! counts, for every host, the first rule it breaks: site-level rules once
//! per site (its hosts counted together), feature rules once per class, and
//! only readiness, groups and capacity per host.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};

use virt8ra_api::{Level, PublishedPort};

use crate::geo;
use crate::model::{Host, HostInfo, Resources, SiteInfo};
use crate::rules::{check_capacity, check_features, check_site, level_key, Request, Rule, Weights};

/// A placement: where, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub host: String,
    pub site: String,
    pub provider: String,
    pub country: String,
    /// 0..1, higher is better.
    pub score: f64,
    /// Weighted score components, largest first.
    pub components: Vec<(String, f64)>,
    /// Round-trip time from the request's user location, when bounded.
    pub rtt_ms: Option<f64>,
    /// For people.
    pub reason: String,
}

/// Why nothing fits: every host counted under the first rule it breaks.
#[derive(Debug, Clone, PartialEq)]
pub struct Unplaceable {
    pub total_hosts: usize,
    pub counts: Vec<(Rule, usize)>,
    pub message: String,
}

impl std::fmt::Display for Unplaceable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Thousands separators, for explanations people read.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[derive(Debug, Clone)]
struct SiteEval {
    site: u32,
    rtt: Option<f64>,
    /// Weighted static part of the score (energy, cost, latency).
    score: f64,
    energy: f64,
    cost: f64,
    latency: f64,
}

#[derive(Debug, Clone)]
struct Placed {
    host: u32,
    res: Resources,
    /// Shared, so the map of VMs stays small (a resize moves 16-byte
    /// pointers, not whole requests) and cloning the engine for a rebalance
    /// plan does not copy every request; equal requests share one copy
    /// (see [`Engine::intern`]).
    req: Arc<Request>,
}

/// Requests recently committed, which the next commits share when equal:
/// VMs made from one template ask for the same thing, and a request is
/// about 750 bytes (a million VMs held 750 MB of identical copies).
const INTERNED: usize = 8;

/// Members of a group: how many at each host, site, provider and country.
#[derive(Debug, Clone, Default)]
struct Group {
    at: [HashMap<String, u32>; 4],
}

fn level_idx(l: Level) -> usize {
    match l {
        Level::Host => 0,
        Level::Site => 1,
        Level::Provider => 2,
        Level::Country => 3,
    }
}

const LEVELS: [Level; 4] = [Level::Host, Level::Site, Level::Provider, Level::Country];

/// The hosts of one site that share every feature a rule can ask for
/// (architecture, KVM, CPU flags, accelerators, confidential computing).
/// Feature rules are decided once per class, not once per host, so a
/// request for a rare feature (a GPU, TDX) skips whole classes instead of
/// scanning every host; a site typically has a handful of classes.
#[derive(Debug, Clone)]
struct Class {
    /// The class's features, as a host description with sorted, deduplicated
    /// lists (the other fields are blank), checked with the same
    /// `check_features` as any host.
    rep: HostInfo,
    /// Ready members with a vCPU to spare, keyed by (empty?, free MiB,
    /// host): hosts already in use sort before empty ones, so packing fills
    /// them first.
    free: BTreeSet<(u8, u64, u32)>,
    /// Ready members with every vCPU taken, same keys. Kept out of `free`:
    /// packing fills hosts until their vCPUs run out, which leaves them
    /// memory to spare, and in `free` every decision stepped over all of
    /// them (tightest memory first) before it reached a host that fits;
    /// at 650,000 VMs on 100,000 hosts that scan was the control plane's
    /// largest cost. Only a request for no vCPU can use them.
    full: BTreeSet<(u8, u64, u32)>,
    /// Hosts filed under this class, ready or not.
    members: usize,
}

/// A ready host's key in its class's `free` or `full` set.
fn free_key(h: &Host, id: u32) -> (u8, u64, u32) {
    (u8::from(h.vms == 0), h.free_mem(), id)
}

/// Same features, as sets (no allocation: this runs on every allocation).
fn same_features(a: &HostInfo, b: &HostInfo) -> bool {
    fn same_set(x: &[String], y: &[String]) -> bool {
        x.iter().all(|v| y.contains(v)) && y.iter().all(|v| x.contains(v))
    }
    a.arch == b.arch
        && a.kvm == b.kvm
        && same_set(&a.cpu_flags, &b.cpu_flags)
        && same_set(&a.accelerators, &b.accelerators)
        && same_set(&a.confidential, &b.confidential)
}

fn feature_rep(h: &HostInfo) -> HostInfo {
    let norm = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v.dedup();
        v
    };
    HostInfo {
        name: String::new(),
        site: String::new(),
        arch: h.arch.clone(),
        vcpus: 0,
        memory_mib: 0,
        disk_gib: 0,
        cpu_flags: norm(&h.cpu_flags),
        accelerators: norm(&h.accelerators),
        kvm: h.kvm,
        confidential: norm(&h.confidential),
        ready: true,
        cpu_ratio: 1.0,
        mem_ratio: 1.0,
    }
}

#[derive(Debug, Clone)]
pub struct Engine {
    sites: Vec<SiteInfo>,
    site_by_name: HashMap<String, u32>,
    site_hosts: Vec<Vec<u32>>,
    /// Per site, its hosts by feature class, each class indexed by free memory.
    site_classes: Vec<Vec<Class>>,
    hosts: Vec<Host>,
    /// Each host's class within its site's `site_classes`.
    host_class: Vec<u32>,
    host_by_name: HashMap<String, u32>,
    vms: HashMap<String, Placed>,
    /// Per host, the host ports its VMs publish and which VM holds each
    /// (only hosts with any: most VMs publish nothing).
    published: HashMap<u32, Vec<(PublishedPort, String)>>,
    groups: HashMap<String, Group>,
    provider_mem: HashMap<String, u64>,
    measured: HashMap<(u32, String), f64>,
    cache: HashMap<String, Arc<Vec<SiteEval>>>,
    /// The requests last committed, newest first (see [`INTERNED`]).
    interned: Vec<Arc<Request>>,
    defaults: Weights,
    max_carbon: f64,
    max_price: f64,
    /// Largest host memory capacity, to prefer big hosts when opening one.
    max_host_mem: u64,
    /// Per site: hosts with VMs on them, and the largest host's memory.
    /// They bound what a site can score before its hosts are searched.
    site_used: Vec<u32>,
    site_max_mem: Vec<u64>,
    /// Per site, its provider's number in `providers`.
    site_provider: Vec<u32>,
    providers: Vec<String>,
    /// Skip sites whose upper bound cannot beat the best so far (always on;
    /// a test turns it off to prove it changes no decision).
    prune_sites: bool,
}

impl Engine {
    pub fn new(sites: Vec<SiteInfo>, hosts: Vec<HostInfo>) -> Result<Engine, String> {
        let mut e = Engine {
            sites: Vec::new(),
            site_by_name: HashMap::new(),
            site_hosts: Vec::new(),
            site_classes: Vec::new(),
            hosts: Vec::new(),
            host_class: Vec::new(),
            host_by_name: HashMap::new(),
            vms: HashMap::new(),
            published: HashMap::new(),
            groups: HashMap::new(),
            provider_mem: HashMap::new(),
            measured: HashMap::new(),
            cache: HashMap::new(),
            interned: Vec::new(),
            defaults: Weights::default(),
            max_carbon: 1.0,
            max_price: 1.0,
            max_host_mem: 1,
            site_used: Vec::new(),
            site_max_mem: Vec::new(),
            site_provider: Vec::new(),
            providers: Vec::new(),
            prune_sites: true,
        };
        for s in sites {
            e.upsert_site(s);
        }
        for h in hosts {
            e.upsert_host(h)?;
        }
        Ok(e)
    }

    /// The operator's default weights for requests that set none.
    pub fn set_default_weights(&mut self, w: Weights) {
        self.defaults = w;
        self.cache.clear();
    }

    pub fn default_weights(&self) -> Weights {
        self.defaults
    }

    pub fn host_count(&self) -> usize {
        self.hosts.len()
    }

    pub fn site_count(&self) -> usize {
        self.sites.len()
    }

    pub fn upsert_site(&mut self, s: SiteInfo) {
        self.cache.clear();
        let provider = match self.providers.iter().position(|p| *p == s.provider) {
            Some(i) => i as u32,
            None => {
                self.providers.push(s.provider.clone());
                (self.providers.len() - 1) as u32
            }
        };
        match self.site_by_name.get(&s.name) {
            Some(&i) => {
                self.sites[i as usize] = s;
                self.site_provider[i as usize] = provider;
            }
            None => {
                let i = self.sites.len() as u32;
                self.site_by_name.insert(s.name.clone(), i);
                self.sites.push(s);
                self.site_hosts.push(Vec::new());
                self.site_classes.push(Vec::new());
                self.site_used.push(0);
                self.site_max_mem.push(0);
                self.site_provider.push(provider);
            }
        }
        self.max_carbon = self
            .sites
            .iter()
            .filter_map(|s| s.carbon_per_it_kwh())
            .fold(1.0, f64::max);
        self.max_price = self
            .sites
            .iter()
            .filter_map(|s| s.unit_price())
            .fold(1e-9, f64::max);
    }

    /// Adds a host or updates its description (keeping its allocations).
    pub fn upsert_host(&mut self, info: HostInfo) -> Result<(), String> {
        let site = *self
            .site_by_name
            .get(&info.site)
            .ok_or_else(|| format!("host {}: unknown site {:?}", info.name, info.site))?;
        match self.host_by_name.get(&info.name).copied() {
            Some(id) => {
                self.unindex(id);
                let old = &self.hosts[id as usize];
                let (used, vms, old_site) = (old.used, old.vms, old.site);
                if old_site != site {
                    self.site_hosts[old_site as usize].retain(|h| *h != id);
                    self.site_hosts[site as usize].push(id);
                }
                let mut h = Host::new(info, site);
                h.used = used;
                h.vms = vms;
                self.hosts[id as usize] = h;
                self.index(id);
            }
            None => {
                let id = self.hosts.len() as u32;
                self.host_by_name.insert(info.name.clone(), id);
                self.hosts.push(Host::new(info, site));
                self.host_class.push(0);
                self.site_hosts[site as usize].push(id);
                self.index(id);
            }
        }
        Ok(())
    }

    /// Marks a host ready or not (unreachable, disabled, maintenance).
    pub fn set_ready(&mut self, host: &str, ready: bool) -> Result<(), String> {
        let id = self.host_id(host)?;
        self.unindex(id);
        self.hosts[id as usize].info.ready = ready;
        self.index(id);
        Ok(())
    }

    /// A measured round-trip time from a named user location to a site,
    /// which then overrides the model.
    pub fn set_measured_rtt(&mut self, site: &str, location: &str, ms: f64) -> Result<(), String> {
        let s = *self
            .site_by_name
            .get(site)
            .ok_or_else(|| format!("unknown site {site:?}"))?;
        self.measured.insert((s, location.to_lowercase()), ms);
        self.cache.clear();
        Ok(())
    }

    fn host_id(&self, name: &str) -> Result<u32, String> {
        self.host_by_name
            .get(name)
            .copied()
            .ok_or_else(|| format!("unknown host {name:?}"))
    }

    /// Files a host under its feature class (found again, or created) and,
    /// when ready, in that class's free-memory index. Classes are only ever
    /// appended, so a host's stored class number stays valid.
    fn index(&mut self, id: u32) {
        let h = &self.hosts[id as usize];
        self.max_host_mem = self.max_host_mem.max(h.cap.memory_mib);
        let si = h.site as usize;
        self.site_max_mem[si] = self.site_max_mem[si].max(h.cap.memory_mib);
        if h.vms > 0 {
            self.site_used[si] += 1;
        }
        let classes = &mut self.site_classes[h.site as usize];
        let cur = self.host_class[id as usize] as usize;
        let c = if classes
            .get(cur)
            .is_some_and(|c| same_features(&c.rep, &h.info))
        {
            cur
        } else if let Some(c) = classes.iter().position(|c| same_features(&c.rep, &h.info)) {
            c
        } else {
            classes.push(Class {
                rep: feature_rep(&h.info),
                free: BTreeSet::new(),
                full: BTreeSet::new(),
                members: 0,
            });
            classes.len() - 1
        };
        self.host_class[id as usize] = c as u32;
        classes[c].members += 1;
        if h.info.ready {
            let key = free_key(h, id);
            if h.used.vcpus < h.cap.vcpus {
                classes[c].free.insert(key);
            } else {
                classes[c].full.insert(key);
            }
        }
    }

    /// Undoes `index` (before the host's state, usage or site changes).
    fn unindex(&mut self, id: u32) {
        let h = &self.hosts[id as usize];
        if h.vms > 0 {
            let u = &mut self.site_used[h.site as usize];
            *u = u.saturating_sub(1);
        }
        if let Some(c) =
            self.site_classes[h.site as usize].get_mut(self.host_class[id as usize] as usize)
        {
            let key = free_key(h, id);
            if !c.free.remove(&key) {
                c.full.remove(&key);
            }
            c.members = c.members.saturating_sub(1);
        }
    }

    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        self.hosts.iter()
    }

    pub fn site_of(&self, h: &Host) -> &SiteInfo {
        &self.sites[h.site as usize]
    }

    pub fn host(&self, name: &str) -> Option<&Host> {
        self.host_by_name
            .get(name)
            .map(|&i| &self.hosts[i as usize])
    }

    pub fn site(&self, name: &str) -> Option<&SiteInfo> {
        self.site_by_name
            .get(name)
            .map(|&i| &self.sites[i as usize])
    }

    /// VMs placed through the engine: (vm, host name).
    pub fn placements(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vms
            .iter()
            .map(|(v, p)| (v.as_str(), self.hosts[p.host as usize].info.name.as_str()))
    }

    pub fn request_of(&self, vm: &str) -> Option<&Request> {
        self.vms.get(vm).map(|p| p.req.as_ref())
    }

    fn rtt(&self, site: u32, r: &Request) -> Option<f64> {
        let (lat, lon, _) = r.latency?;
        if let Some(loc) = &r.latency_from {
            if let Some(ms) = self.measured.get(&(site, loc.to_lowercase())) {
                return Some(*ms);
            }
        }
        let s = &self.sites[site as usize];
        Some(geo::model_rtt_ms(lat, lon, s.lat, s.lon, s.access_ms()))
    }

    /// Sites that pass the site-level rules, best static score first.
    fn site_evals(&mut self, r: &Request) -> Arc<Vec<SiteEval>> {
        let key = r.site_key();
        if let Some(v) = self.cache.get(&key) {
            return v.clone();
        }
        let w = &r.weights;
        let mut out = Vec::new();
        for (i, s) in self.sites.iter().enumerate() {
            let rtt = self.rtt(i as u32, r);
            if check_site(s, r, rtt).is_err() {
                continue;
            }
            let energy = s
                .carbon_per_it_kwh()
                .map(|c| 1.0 - c / self.max_carbon)
                .unwrap_or(0.5);
            let cost = s
                .unit_price()
                .map(|p| 1.0 - p / self.max_price)
                .unwrap_or(0.5);
            let latency = match (rtt, r.latency) {
                (Some(rtt), Some((_, _, max))) => (1.0 - rtt / max).clamp(0.0, 1.0),
                _ => 0.0,
            };
            out.push(SiteEval {
                site: i as u32,
                rtt,
                score: w.energy * energy + w.cost * cost + w.latency * latency,
                energy,
                cost,
                latency,
            });
        }
        out.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.site.cmp(&b.site)));
        let v = Arc::new(out);
        if self.cache.len() > 4096 {
            self.cache.clear();
        }
        self.cache.insert(key, v.clone());
        v
    }

    /// Group rules for a host: `Err(Rule::Group)` when it is excluded.
    fn check_groups(&self, host_name: &str, site: &SiteInfo, r: &Request) -> Result<(), Rule> {
        if let Some(g) = &r.c.anti_affinity {
            if let Some(members) = self.groups.get(&g.group) {
                let key = level_key(g.level, host_name, site);
                if members.at[level_idx(g.level)].contains_key(&key) {
                    return Err(Rule::Group);
                }
            }
        }
        if let Some(g) = &r.c.affinity {
            if let Some(members) = self.groups.get(&g.group) {
                let at = &members.at[level_idx(g.level)];
                if !at.is_empty() && !at.contains_key(&level_key(g.level, host_name, site)) {
                    return Err(Rule::Group);
                }
            }
        }
        Ok(())
    }

    /// Site-level part of the group rules (levels site, provider, country).
    fn site_excluded_by_groups(&self, site: &SiteInfo, r: &Request) -> bool {
        if let Some(g) = &r.c.anti_affinity {
            if g.level != Level::Host {
                if let Some(m) = self.groups.get(&g.group) {
                    if m.at[level_idx(g.level)].contains_key(&level_key(g.level, "", site)) {
                        return true;
                    }
                }
            }
        }
        if let Some(g) = &r.c.affinity {
            if g.level != Level::Host {
                if let Some(m) = self.groups.get(&g.group) {
                    let at = &m.at[level_idx(g.level)];
                    if !at.is_empty() && !at.contains_key(&level_key(g.level, "", site)) {
                        return true;
                    }
                }
            }
        }
        false
    }

    /// Every hard rule for one host: the oracle the fast path agrees with.
    pub fn check_host(&self, host: &Host, r: &Request) -> Result<(), Rule> {
        let site = &self.sites[host.site as usize];
        check_site(site, r, self.rtt(host.site, r))?;
        if !host.info.ready {
            return Err(Rule::NotReady);
        }
        self.check_groups(&host.info.name, site, r)?;
        check_features(&host.info, r)?;
        check_capacity(host, &r.res)?;
        match self.host_by_name.get(&host.info.name) {
            Some(&id) if self.port_taken(id, r).is_some() => Err(Rule::Ports),
            _ => Ok(()),
        }
    }

    /// The first of `r`'s host ports that a VM on host `id` already
    /// publishes, with that VM.
    fn port_taken<'a>(&'a self, id: u32, r: &'a Request) -> Option<(&'a PublishedPort, &'a str)> {
        if r.ports.is_empty() {
            return None;
        }
        let held = self.published.get(&id)?;
        r.ports.iter().find_map(|p| {
            held.iter()
                .find(|(q, _)| q.clashes(p))
                .map(|(_, vm)| (p, vm.as_str()))
        })
    }

    /// Which of `r`'s host ports is taken on `host`, and by which VM (the
    /// engine's key: a VM id, or a migration's reservation), to name both
    /// when a move there is refused.
    pub fn port_clash(&self, host: &str, r: &Request) -> Option<(PublishedPort, String)> {
        let id = *self.host_by_name.get(host)?;
        self.port_taken(id, r)
            .map(|(p, vm)| (p.clone(), vm.to_string()))
    }

    /// Chooses a host for `r` without allocating anything.
    pub fn place(&mut self, r: &Request) -> Result<Decision, Unplaceable> {
        let evals = self.site_evals(r);
        let w = r.weights;
        let max_pm = self.provider_mem.values().copied().max().unwrap_or(0);
        let bal_of: Vec<f64> = self
            .providers
            .iter()
            .map(|p| {
                let pm = self.provider_mem.get(p).copied().unwrap_or(0);
                if max_pm == 0 {
                    1.0
                } else {
                    1.0 - pm as f64 / max_pm as f64
                }
            })
            .collect();
        let bound = w.capacity + w.balance;
        // (raw score, host, eval index, capacity component, balance component)
        let mut best: Option<(f64, u32, usize, f64, f64)> = None;
        for (ei, ev) in evals.iter().enumerate() {
            if best.is_some_and(|b| ev.score + bound <= b.0) {
                break;
            }
            // What this site could score at most, from its provider's
            // balance and (packing) whether any of its hosts is in use: an
            // empty host scores at most half its share of the largest. A
            // site that cannot beat the best so far is not searched, which
            // at 1,000 sites that all pass is most of them.
            if let Some(b) = best.filter(|_| self.prune_sites) {
                let cap_ub = if w.pack && self.site_used[ev.site as usize] == 0 {
                    0.5 * self.site_max_mem[ev.site as usize] as f64 / self.max_host_mem as f64
                } else {
                    1.0
                };
                let bal = bal_of[self.site_provider[ev.site as usize] as usize];
                if ev.score + w.capacity * cap_ub + w.balance * bal <= b.0 {
                    continue;
                }
            }
            let site = &self.sites[ev.site as usize];
            if self.site_excluded_by_groups(site, r) {
                continue;
            }
            let Some(hid) = self.best_host_in(ev.site, r) else {
                continue;
            };
            let h = &self.hosts[hid as usize];
            let util =
                (h.used.memory_mib + r.res.memory_mib) as f64 / h.cap.memory_mib.max(1) as f64;
            // Packing prefers any host already in use over an empty one,
            // then the fuller; of empty hosts, the bigger (fewer hosts in
            // use in the end). Spreading prefers the emptier.
            let cap_c = if w.pack {
                if h.vms > 0 {
                    0.5 + 0.5 * util
                } else {
                    0.5 * h.cap.memory_mib as f64 / self.max_host_mem as f64
                }
            } else {
                1.0 - util
            };
            let pm = self.provider_mem.get(&site.provider).copied().unwrap_or(0);
            let bal_c = if max_pm == 0 {
                1.0
            } else {
                1.0 - pm as f64 / max_pm as f64
            };
            let raw = ev.score + w.capacity * cap_c + w.balance * bal_c;
            if best.is_none_or(|b| raw > b.0) {
                best = Some((raw, hid, ei, cap_c, bal_c));
            }
        }
        let Some((raw, hid, ei, cap_c, bal_c)) = best else {
            return Err(self.explain(r));
        };
        let ev = &evals[ei];
        let h = &self.hosts[hid as usize];
        let s = &self.sites[ev.site as usize];
        let total_w = (w.capacity + w.energy + w.cost + w.latency + w.balance).max(1e-9);
        let mut components: Vec<(String, f64)> = vec![
            (
                if w.pack { "pack" } else { "spread" }.to_string(),
                w.capacity * cap_c / total_w,
            ),
            ("energy".to_string(), w.energy * ev.energy / total_w),
            ("cost".to_string(), w.cost * ev.cost / total_w),
            ("latency".to_string(), w.latency * ev.latency / total_w),
            ("balance".to_string(), w.balance * bal_c / total_w),
        ];
        components.retain(|(_, v)| *v > 0.0);
        components.sort_by(|a, b| b.1.total_cmp(&a.1));
        let score = raw / total_w;
        let top: Vec<String> = components
            .iter()
            .take(3)
            .map(|(n, v)| format!("{n} {v:.2}"))
            .collect();
        let mut facts = Vec::new();
        if let Some(rtt) = ev.rtt {
            facts.push(format!("{rtt:.1} ms from the users"));
        }
        if let Some(c) = s.carbon {
            facts.push(format!("{c:.0} gCO2/kWh"));
        }
        let reason = format!(
            "host {} at site {} ({}, {}): score {:.2} ({}){}; {} of {} sites pass the hard rules",
            h.info.name,
            s.name,
            s.provider,
            s.country,
            score,
            top.join(", "),
            if facts.is_empty() {
                String::new()
            } else {
                format!("; {}", facts.join(", "))
            },
            evals.len(),
            self.sites.len()
        );
        Ok(Decision {
            host: h.info.name.clone(),
            site: s.name.clone(),
            provider: s.provider.clone(),
            country: s.country.clone(),
            score,
            components,
            rtt_ms: ev.rtt,
            reason,
        })
    }

    /// The best host of a site for `r`, the first that passes every host
    /// check: for packing, the tightest fit among hosts already in use, else
    /// the largest empty host (fewer hosts in use); for spreading, the most
    /// free memory, empty hosts first.
    ///
    /// Only classes whose features pass are searched; across classes the
    /// same order applies (the key includes the host number, so ties break
    /// the same way whatever the classes).
    fn best_host_in(&self, site: u32, r: &Request) -> Option<u32> {
        let s = &self.sites[site as usize];
        let need = r.res.memory_mib;
        let ok = |&&(_, _, hid): &&(u8, u64, u32)| {
            let h = &self.hosts[hid as usize];
            check_capacity(h, &r.res).is_ok()
                && self.check_groups(&h.info.name, s, r).is_ok()
                && self.port_taken(hid, r).is_none()
        };
        let c = &r.c;
        let any_feature = c.arch.is_some()
            || c.require_kvm
            || !c.cpu_flags.is_empty()
            || !c.accelerators.is_empty()
            || c.confidential.is_some();
        // The host sets to search: each class's hosts with a vCPU to spare
        // (and its hosts without one, for a request of no vCPU). The first
        // fit of each set in key order, then the least (or greatest) of
        // those, is the first fit in key order of all the sets together.
        let sets = || {
            self.site_classes[site as usize]
                .iter()
                .filter(move |cl| !any_feature || check_features(&cl.rep, r).is_ok())
                .flat_map(move |cl| {
                    std::iter::once(&cl.free).chain((r.res.vcpus == 0).then_some(&cl.full))
                })
                .filter(|set| !set.is_empty())
        };
        let used_tightest = || {
            sets()
                .filter_map(|s| s.range((0, need, 0)..(1, 0, 0)).find(ok))
                .min()
        };
        let used_emptiest = || {
            sets()
                .filter_map(|s| s.range((0, need, 0)..(1, 0, 0)).rev().find(ok))
                .max()
        };
        let empty_largest = || {
            sets()
                .filter_map(|s| s.range((1, need, 0)..).rev().find(ok))
                .max()
        };
        let found = if r.weights.pack {
            used_tightest().or_else(empty_largest)
        } else {
            empty_largest().or_else(used_emptiest)
        };
        found.map(|&(_, _, h)| h)
    }

    /// Counts, for every host, the first hard rule it breaks.
    pub fn explain(&self, r: &Request) -> Unplaceable {
        let mut counts: BTreeMap<Rule, usize> = BTreeMap::new();
        // The host ports found taken, to name them.
        let mut taken: BTreeSet<String> = BTreeSet::new();
        let mut last_checks = |h: &Host, hid: u32| -> Option<Rule> {
            if let Err(rule) = check_capacity(h, &r.res) {
                return Some(rule);
            }
            let (p, _) = self.port_taken(hid, r)?;
            taken.insert(p.host_side());
            Some(Rule::Ports)
        };
        for (si, site) in self.sites.iter().enumerate() {
            let n = self.site_hosts[si].len();
            if n == 0 {
                continue;
            }
            if let Err(rule) = check_site(site, r, self.rtt(si as u32, r)) {
                *counts.entry(rule).or_default() += n;
                continue;
            }
            // Feature rules once per class, as in `place`.
            let verdicts: Vec<Result<(), Rule>> = self.site_classes[si]
                .iter()
                .map(|c| check_features(&c.rep, r))
                .collect();
            if r.c.anti_affinity.is_none() && r.c.affinity.is_none() {
                // Without group rules, only capacity needs a look at single
                // hosts: a class's hosts that are not ready, and the ready
                // ones of a class whose features fail, are counted together.
                for (c, v) in self.site_classes[si].iter().zip(&verdicts) {
                    let ready = c.free.len() + c.full.len();
                    let not_ready = c.members - ready;
                    if not_ready > 0 {
                        *counts.entry(Rule::NotReady).or_default() += not_ready;
                    }
                    match v {
                        Err(rule) => *counts.entry(*rule).or_default() += ready,
                        Ok(()) => {
                            for &(_, _, hid) in c.free.iter().chain(&c.full) {
                                if let Some(rule) = last_checks(&self.hosts[hid as usize], hid) {
                                    *counts.entry(rule).or_default() += 1;
                                }
                            }
                        }
                    }
                }
                continue;
            }
            for &hid in &self.site_hosts[si] {
                let h = &self.hosts[hid as usize];
                let rule = if !h.info.ready {
                    Rule::NotReady
                } else if let Err(rule) = self.check_groups(&h.info.name, site, r) {
                    rule
                } else if let Err(rule) = verdicts[self.host_class[hid as usize] as usize] {
                    rule
                } else if let Some(rule) = last_checks(h, hid) {
                    rule
                } else {
                    // Cannot happen: place() would have found this host.
                    continue;
                };
                *counts.entry(rule).or_default() += 1;
            }
        }
        let total = self.hosts.len();
        let counts: Vec<(Rule, usize)> = counts.into_iter().filter(|(_, n)| *n > 0).collect();
        let message = if total == 0 {
            "0 hosts fit: no host has joined".to_string()
        } else {
            let parts: Vec<String> = counts
                .iter()
                .map(|(rule, n)| match rule {
                    Rule::Ports => format!(
                        "{} where host port {} is already published",
                        thousands(*n),
                        taken.iter().cloned().collect::<Vec<_>>().join(", ")
                    ),
                    _ => format!("{} {}", thousands(*n), rule.describe()),
                })
                .collect();
            format!("0 of {} hosts fit: {}", thousands(total), parts.join(", "))
        };
        Unplaceable {
            total_hosts: total,
            counts,
            message,
        }
    }

    /// Allocates `vm` on `host` (after `place`, or to record an existing VM).
    pub fn commit(&mut self, vm: &str, host: &str, r: &Request) -> Result<(), String> {
        if self.vms.contains_key(vm) {
            self.release(vm);
        }
        let id = self.host_id(host)?;
        self.unindex(id);
        let h = &mut self.hosts[id as usize];
        h.used.add(&r.res);
        h.vms += 1;
        let (site, name) = (&self.sites[h.site as usize], &h.info.name);
        match self.provider_mem.get_mut(&site.provider) {
            Some(m) => *m += r.res.memory_mib,
            None => {
                self.provider_mem
                    .insert(site.provider.clone(), r.res.memory_mib);
            }
        }
        for g in [&r.c.anti_affinity, &r.c.affinity].into_iter().flatten() {
            let grp = self.groups.entry(g.group.clone()).or_default();
            for l in LEVELS {
                *grp.at[level_idx(l)]
                    .entry(level_key(l, name, site))
                    .or_default() += 1;
            }
        }
        self.index(id);
        if !r.ports.is_empty() {
            let held = self.published.entry(id).or_default();
            held.extend(r.ports.iter().map(|p| (p.clone(), vm.to_string())));
        }
        let req = self.intern(r);
        self.vms.insert(
            vm.to_string(),
            Placed {
                host: id,
                res: r.res,
                req,
            },
        );
        Ok(())
    }

    /// A shared copy of `r`: one of the requests committed lately when it
    /// equals `r`, else a new one, remembered in their place.
    fn intern(&mut self, r: &Request) -> Arc<Request> {
        if let Some(i) = self.interned.iter().position(|q| **q == *r) {
            let q = self.interned.remove(i);
            self.interned.insert(0, q.clone());
            return q;
        }
        let q = Arc::new(r.clone());
        self.interned.truncate(INTERNED - 1);
        self.interned.insert(0, q.clone());
        q
    }

    /// Frees what `vm` held. Unknown VMs are ignored.
    pub fn release(&mut self, vm: &str) {
        let Some(p) = self.vms.remove(vm) else {
            return;
        };
        if !p.req.ports.is_empty() {
            if let Some(held) = self.published.get_mut(&p.host) {
                held.retain(|(_, holder)| holder != vm);
                if held.is_empty() {
                    self.published.remove(&p.host);
                }
            }
        }
        self.unindex(p.host);
        let h = &mut self.hosts[p.host as usize];
        h.used.sub(&p.res);
        h.vms = h.vms.saturating_sub(1);
        let (site, name) = (&self.sites[h.site as usize], &h.info.name);
        if let Some(m) = self.provider_mem.get_mut(&site.provider) {
            *m = m.saturating_sub(p.res.memory_mib);
        }
        for g in [&p.req.c.anti_affinity, &p.req.c.affinity]
            .into_iter()
            .flatten()
        {
            if let Some(grp) = self.groups.get_mut(&g.group) {
                for l in LEVELS {
                    let map = &mut grp.at[level_idx(l)];
                    let key = level_key(l, name, site);
                    if let Some(n) = map.get_mut(&key) {
                        *n -= 1;
                        if *n == 0 {
                            map.remove(&key);
                        }
                    }
                }
            }
        }
        self.index(p.host);
    }

    /// Approximate bytes the engine keeps per host (host record, names and
    /// flags, index entries).
    pub fn bytes_per_host(&self) -> usize {
        if self.hosts.is_empty() {
            return 0;
        }
        let mut total = 0usize;
        for h in &self.hosts {
            total += std::mem::size_of::<Host>()
                + h.info.name.capacity()
                + h.info.site.capacity()
                + h.info.arch.capacity()
                + h.info.cpu_flags.iter().map(|f| f.capacity() + 24).sum::<usize>()
                + h.info.accelerators.iter().map(|f| f.capacity() + 24).sum::<usize>()
                // BTreeSet entry (16 bytes + node overhead), name map entry, site list entry
                + 32
                + (h.info.name.capacity() + 24 + 4 + 8)
                + 4
                // its class number
                + 4;
        }
        // The classes themselves, shared by their hosts.
        for c in self.site_classes.iter().flatten() {
            total += std::mem::size_of::<Class>()
                + c.rep.arch.capacity()
                + c.rep
                    .cpu_flags
                    .iter()
                    .map(|f| f.capacity() + 24)
                    .sum::<usize>()
                + c.rep
                    .accelerators
                    .iter()
                    .map(|f| f.capacity() + 24)
                    .sum::<usize>()
                + c.rep
                    .confidential
                    .iter()
                    .map(|f| f.capacity() + 24)
                    .sum::<usize>();
        }
        total / self.hosts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{requests, topology};

    /// Pruning sites by their upper bound is an optimisation only: with the
    /// operator's default weights (packing, energy, cost, latency, balance)
    /// and with packing alone, every decision is the one the full search
    /// makes.
    #[test]
    fn site_pruning_changes_no_decision() {
        for pack_only in [false, true] {
            let (sites, hosts) = topology(3000, 7);
            let mut fast = Engine::new(sites.clone(), hosts.clone()).expect("topology");
            let mut full = Engine::new(sites, hosts).expect("topology");
            full.prune_sites = false;
            let mut placed = 0;
            for (vm, r) in requests(4000, 7, pack_only) {
                let a = fast.place(&r).map(|d| d.host);
                let b = full.place(&r).map(|d| d.host);
                assert_eq!(
                    a.as_ref().ok(),
                    b.as_ref().ok(),
                    "{vm} (pack_only {pack_only})"
                );
                if let Ok(h) = a {
                    fast.commit(&vm, &h, &r).expect("commit");
                    full.commit(&vm, &h, &r).expect("commit");
                    placed += 1;
                }
                if placed % 500 == 499 {
                    // Releases make sites empty again, which the bound tracks.
                    let gone = format!("vm{}", placed / 2);
                    fast.release(&gone);
                    full.release(&gone);
                }
            }
            assert!(placed > 1000, "only {placed} placed");
        }
    }

    /// VMs committed with equal requests share one copy of it, also when
    /// other requests were committed in between, and a VM with another
    /// request keeps its own.
    #[test]
    fn equal_requests_share_one_copy() {
        let (sites, hosts) = topology(20, 3);
        let mut e = Engine::new(sites, hosts).expect("topology");
        fn commit(e: &mut Engine, vm: &str, r: &Request) {
            let host = e.place(r).expect("room").host;
            e.commit(vm, &host, r).expect("commit");
        }
        let mut rs = requests(40, 3, false).into_iter().map(|(_, r)| r);
        let a = rs.next().expect("a request");
        let b = rs.find(|r| *r != a).expect("a different request");
        commit(&mut e, "v1", &a);
        commit(&mut e, "v2", &b);
        commit(&mut e, "v3", &a.clone());
        let req = |vm: &str| e.vms[vm].req.clone();
        assert!(Arc::ptr_eq(&req("v1"), &req("v3")));
        assert!(!Arc::ptr_eq(&req("v1"), &req("v2")));
        assert_eq!(*req("v2"), b);
        // Beyond what is remembered, an equal request gets a copy again.
        let mut others = requests(400, 5, false).into_iter().map(|(_, r)| r);
        let mut n = 0;
        while n < INTERNED {
            let r = others.next().expect("enough requests");
            if e.interned.iter().all(|q| **q != r) {
                commit(&mut e, &format!("o{n}"), &r);
                n += 1;
            }
        }
        commit(&mut e, "v4", &a);
        assert!(!Arc::ptr_eq(&e.vms["v1"].req, &e.vms["v4"].req));
        assert_eq!(*e.vms["v4"].req, a);
    }
}
