//! The in-memory VM index that serves reads.
//!
//! Every VM the store holds is also here, loaded once at start-up and written
//! through on every durable write (`ControlPlane::create_vm` / `update_vm`, after
//! the store has committed and before the caller is answered). `GET` of one
//! VM, list pages with their filters and cursor, the scheduler's pending and
//! per-host views and the agents' desired state are all answered from here,
//! without a database round trip. The store stays the source of truth: after
//! a restart the index is rebuilt from it.
//!
//! Lists are ordered by VM id (the cursor is the last id of the previous
//! page). Each filterable attribute (host, site, provider, country, phase,
//! project, and "not deleted") has its own ordered set of ids; a page walks the
//! smallest set that applies, from the cursor on, and checks the other
//! filters on each VM, so a page costs about its size whatever the total.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::{Arc, RwLock};

use foldhash::HashMap;

use virt8ra_api::{Host, Vm, VmPhase};
use virt8ra_store::VmFilter;

type Id = Arc<str>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Dim {
    Host,
    Site,
    Provider,
    Country,
    Phase,
    /// The owning project: a tenant's list walks its project's set.
    Project,
    /// Every VM not in phase `deleted` (the default listing).
    Live,
}

fn keys(vm: &Vm) -> Vec<(Dim, String)> {
    let mut out = Vec::with_capacity(7);
    let s = &vm.status;
    for (d, v) in [
        (Dim::Host, &s.host_id),
        (Dim::Site, &s.site),
        (Dim::Provider, &s.provider),
        (Dim::Country, &s.country),
    ] {
        if let Some(v) = v {
            out.push((d, v.clone()));
        }
    }
    out.push((Dim::Phase, s.phase.as_str().to_string()));
    out.push((Dim::Project, vm.project.clone()));
    if s.phase != VmPhase::Deleted {
        out.push((Dim::Live, String::new()));
    }
    out
}

#[derive(Default)]
struct Inner {
    by_id: BTreeMap<Id, Arc<Vm>>,
    /// Name -> id of the VM that is not deleted (names are unique among them).
    live_names: HashMap<String, Id>,
    /// Name -> id of the last deleted VM of that name (history lookups).
    deleted_names: HashMap<String, Id>,
    sets: HashMap<(Dim, String), BTreeSet<Id>>,
    /// Network id -> the VMs with a NIC on it that are neither being
    /// deleted nor deleted (the members whose NICs the hosts plug in).
    /// Empty, and never looked at, while no VM has a NIC.
    by_network: HashMap<String, BTreeSet<Id>>,
    /// Networks whose members changed (joined, left, moved, started or
    /// ended a migration) since [`VmIndex::take_network_changes`].
    net_changes: std::collections::BTreeSet<String>,
    /// VMs not deleted, by (site, provider, country) (for metrics).
    placed: HashMap<Place, u64>,
}

/// The networks whose hosts carry `vm`'s NICs (none for a VM without NICs,
/// or one being deleted).
fn member_networks(vm: &Vm) -> Vec<&str> {
    if vm.status.nics.is_empty() || matches!(vm.status.phase, VmPhase::Deleting | VmPhase::Deleted)
    {
        return Vec::new();
    }
    let mut v: Vec<&str> = vm
        .status
        .nics
        .iter()
        .map(|n| n.network_id.as_str())
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Whether a change from `old` to `new` changes what hosts carry for the
/// VM's networks: membership, the host, a migration, the NICs.
fn network_relevant(old: Option<&Vm>, new: &Vm) -> bool {
    let Some(old) = old else {
        return !new.status.nics.is_empty();
    };
    if old.status.nics.is_empty() && new.status.nics.is_empty() {
        return false;
    }
    old.status.nics != new.status.nics
        || old.status.host_id != new.status.host_id
        || old.status.migration != new.status.migration
        || member_networks(old).is_empty() != member_networks(new).is_empty()
}

/// A VM's (site, provider, country).
type Place = (String, String, String);

/// Where a VM counts in `Inner::placed`: not deleted and at a site.
fn place(vm: &Vm) -> Option<Place> {
    let s = &vm.status;
    if s.phase == VmPhase::Deleted {
        return None;
    }
    Some((
        s.site.clone()?,
        s.provider.clone().unwrap_or_default(),
        s.country.clone().unwrap_or_default(),
    ))
}

/// Every phase, in the order metrics show them.
const PHASES: [VmPhase; 9] = [
    VmPhase::Pending,
    VmPhase::Scheduled,
    VmPhase::Provisioning,
    VmPhase::Running,
    VmPhase::Stopping,
    VmPhase::Stopped,
    VmPhase::Failed,
    VmPhase::Deleting,
    VmPhase::Deleted,
];

impl Inner {
    fn remove_from(&mut self, k: &(Dim, String), id: &Id) {
        if let Some(s) = self.sets.get_mut(k) {
            s.remove(id);
            if s.is_empty() {
                self.sets.remove(k);
            }
        }
    }

    fn add_to(&mut self, k: (Dim, String), id: &Id) {
        self.sets.entry(k).or_default().insert(id.clone());
    }

    fn names_of(&mut self, vm: &Vm) -> &mut HashMap<String, Id> {
        if vm.status.phase == VmPhase::Deleted {
            &mut self.deleted_names
        } else {
            &mut self.live_names
        }
    }

    fn unlink_name(&mut self, id: &Id, vm: &Vm) {
        let names = self.names_of(vm);
        if names.get(&vm.name) == Some(id) {
            names.remove(&vm.name);
        }
    }

    fn link_name(&mut self, id: &Id, vm: &Vm) {
        self.names_of(vm).insert(vm.name.clone(), id.clone());
    }

    /// Moves `id` from `old`'s networks to `new`'s and notes the networks
    /// whose members changed (only when the change matters to them).
    fn relink_networks(&mut self, id: &Id, old: Option<&Vm>, new: &Vm) {
        if !network_relevant(old, new) {
            return;
        }
        let before = old.map(member_networks).unwrap_or_default();
        let after = member_networks(new);
        for n in &before {
            if !after.contains(n) {
                if let Some(s) = self.by_network.get_mut(*n) {
                    s.remove(id);
                    if s.is_empty() {
                        self.by_network.remove(*n);
                    }
                }
            }
        }
        for n in &after {
            self.by_network
                .entry(n.to_string())
                .or_default()
                .insert(id.clone());
        }
        for n in before.into_iter().chain(after) {
            self.net_changes.insert(n.to_string());
        }
        // A VM that only left (deleted) still changed its networks.
        if let Some(o) = old {
            for n in &o.status.nics {
                self.net_changes.insert(n.network_id.clone());
            }
        }
    }

    /// Adds a VM not indexed yet, with `keys(vm)`.
    fn link_keys(&mut self, id: &Id, keys: Vec<(Dim, String)>, vm: &Vm) {
        for k in keys {
            self.add_to(k, id);
        }
        self.link_name(id, vm);
        self.count_place(None, place(vm));
    }

    /// Moves a VM's count from place `old` to `new`.
    fn count_place(&mut self, old: Option<Place>, new: Option<Place>) {
        if old == new {
            return;
        }
        if let Some(o) = old {
            if let Some(n) = self.placed.get_mut(&o) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.placed.remove(&o);
                }
            }
        }
        if let Some(n) = new {
            *self.placed.entry(n).or_default() += 1;
        }
    }
}

/// The VMs, in memory. Cheap to read concurrently.
#[derive(Default)]
pub struct VmIndex {
    inner: RwLock<Inner>,
}

impl VmIndex {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // Every update leaves the maps consistent before it can panic (no
        // user code runs under the lock), so a poisoned lock is still usable.
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Builds the index from every VM (deleted ones included).
    pub fn load(vms: Vec<Vm>) -> VmIndex {
        let idx = VmIndex::default();
        {
            let mut g = idx.write();
            for vm in vms {
                let id: Id = Arc::from(vm.id.as_str());
                g.link_keys(&id, keys(&vm), &vm);
                g.relink_networks(&id, None, &vm);
                g.by_id.insert(id, Arc::new(vm));
            }
        }
        idx
    }

    /// Records the VM's current (durable) state.
    ///
    /// Only the sets whose key changed are touched: most updates change
    /// one attribute (a phase), and each set is an ordered set of ids with
    /// up to a million entries. The copy and its keys are made before the
    /// lock is taken.
    pub fn put(&self, vm: &Vm) {
        let new = Arc::new(vm.clone());
        let new_keys = keys(vm);
        let mut g = self.write();
        let Some((id, old)) = g
            .by_id
            .get_key_value(vm.id.as_str())
            .map(|(k, v)| (k.clone(), v.clone()))
        else {
            let id: Id = Arc::from(vm.id.as_str());
            g.link_keys(&id, new_keys, vm);
            g.relink_networks(&id, None, vm);
            g.by_id.insert(id, new);
            return;
        };
        let old_keys = keys(&old);
        for k in old_keys.iter().filter(|k| !new_keys.contains(k)) {
            g.remove_from(k, &id);
        }
        for k in new_keys.into_iter().filter(|k| !old_keys.contains(k)) {
            g.add_to(k, &id);
        }
        g.count_place(place(&old), place(vm));
        let deleted = |v: &Vm| v.status.phase == VmPhase::Deleted;
        if old.name != vm.name || deleted(&old) != deleted(vm) {
            g.unlink_name(&id, &old);
            g.link_name(&id, vm);
        }
        g.relink_networks(&id, Some(&old), vm);
        g.by_id.insert(id, new);
    }

    /// The VMs with a NIC on network `network_id` (not being deleted).
    pub fn on_network(&self, network_id: &str) -> Vec<Arc<Vm>> {
        let g = self.read();
        g.by_network
            .get(network_id)
            .map(|s| s.iter().filter_map(|id| g.by_id.get(id).cloned()).collect())
            .unwrap_or_default()
    }

    /// Whether any VM has a NIC on a virtual network (while none does, the
    /// network plane has nothing to do).
    pub fn has_network_members(&self) -> bool {
        !self.read().by_network.is_empty()
    }

    /// The networks whose members changed since the last call.
    pub fn take_network_changes(&self) -> Vec<String> {
        {
            // The common case, no change (and no network at all): a read lock.
            if self.read().net_changes.is_empty() {
                return Vec::new();
            }
        }
        std::mem::take(&mut self.write().net_changes)
            .into_iter()
            .collect()
    }

    /// By id, or by name (a live VM's name wins over a deleted one's).
    pub fn get(&self, key: &str) -> Option<Arc<Vm>> {
        let g = self.read();
        if let Some(v) = g.by_id.get(key) {
            return Some(v.clone());
        }
        let id = g.live_names.get(key).or_else(|| g.deleted_names.get(key))?;
        g.by_id.get(id).cloned()
    }

    /// How many VMs are indexed (deleted ones included).
    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The VMs that match `f`, ordered by id, after `f.after_id`, at most
    /// `f.limit` of them.
    pub fn list(&self, f: &VmFilter) -> Vec<Arc<Vm>> {
        let g = self.read();
        let mut wanted: Vec<(Dim, String)> = Vec::new();
        for (d, v) in [
            (Dim::Host, &f.host_id),
            (Dim::Site, &f.site),
            (Dim::Provider, &f.provider),
            (Dim::Country, &f.country),
        ] {
            if let Some(v) = v {
                wanted.push((d, v.clone()));
            }
        }
        if let Some(p) = f.phase {
            wanted.push((Dim::Phase, p.as_str().to_string()));
        }
        if let Some(p) = &f.project {
            wanted.push((Dim::Project, p.clone()));
        }
        let hide_deleted = !f.include_deleted && f.phase != Some(VmPhase::Deleted);
        if hide_deleted {
            wanted.push((Dim::Live, String::new()));
        }
        let limit = f.limit.unwrap_or(usize::MAX);
        let lower = match &f.after_id {
            Some(a) => Bound::Excluded(a.as_str()),
            None => Bound::Unbounded,
        };
        let matches = |vm: &Vm| {
            let s = &vm.status;
            f.host_id
                .as_ref()
                .is_none_or(|v| s.host_id.as_ref() == Some(v))
                && f.site.as_ref().is_none_or(|v| s.site.as_ref() == Some(v))
                && f.provider
                    .as_ref()
                    .is_none_or(|v| s.provider.as_ref() == Some(v))
                && f.country
                    .as_ref()
                    .is_none_or(|v| s.country.as_ref() == Some(v))
                && f.phase.is_none_or(|p| s.phase == p)
                && f.project.as_ref().is_none_or(|p| &vm.project == p)
                && (!hide_deleted || s.phase != VmPhase::Deleted)
        };
        let mut out = Vec::new();
        if limit == 0 {
            return out;
        }
        // The smallest set that applies; an attribute value no VM has means
        // an empty answer.
        let mut best: Option<&BTreeSet<Id>> = None;
        for k in &wanted {
            match g.sets.get(k) {
                None => return out,
                Some(s) => {
                    if best.is_none_or(|b| s.len() < b.len()) {
                        best = Some(s);
                    }
                }
            }
        }
        match best {
            Some(set) => {
                for id in set.range::<str, _>((lower, Bound::Unbounded)) {
                    if let Some(vm) = g.by_id.get(id) {
                        if matches(vm) {
                            out.push(vm.clone());
                            if out.len() >= limit {
                                break;
                            }
                        }
                    }
                }
            }
            None => {
                for (_, vm) in g.by_id.range::<str, _>((lower, Bound::Unbounded)) {
                    if matches(vm) {
                        out.push(vm.clone());
                        if out.len() >= limit {
                            break;
                        }
                    }
                }
            }
        }
        out
    }

    /// How many VMs are in each phase (every phase, zeros included).
    pub fn count_by_phase(&self) -> Vec<(&'static str, u64)> {
        let g = self.read();
        PHASES
            .iter()
            .map(|p| {
                let n = g.sets.get(&(Dim::Phase, p.as_str().to_string()));
                (p.as_str(), n.map_or(0, |s| s.len() as u64))
            })
            .collect()
    }

    /// How many VMs not deleted are at each (site, provider, country):
    /// one entry per site, whatever the number of VMs.
    pub fn count_by_site(&self) -> Vec<(Place, u64)> {
        let g = self.read();
        let mut out: Vec<(Place, u64)> = g.placed.iter().map(|(k, n)| (k.clone(), *n)).collect();
        out.sort();
        out
    }

    /// Ids of the VMs in `phase` (e.g. the scheduler's pending VMs).
    pub fn ids_in_phase(&self, phase: VmPhase) -> Vec<String> {
        self.read()
            .sets
            .get(&(Dim::Phase, phase.as_str().to_string()))
            .map(|s| s.iter().map(|i| i.to_string()).collect())
            .unwrap_or_default()
    }
}

/// The hosts, in memory, by name (the store's list order), written through
/// on every durable host write. Live fields (connection, heartbeat, usage)
/// stay in the hub; allocations in the placement engine.
#[derive(Default)]
pub struct HostIndex {
    inner: RwLock<HostsInner>,
    /// Bumped by every change, so derived views know when to rebuild.
    version: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct HostsInner {
    by_name: BTreeMap<String, Arc<Host>>,
    /// Host id -> name.
    names: HashMap<String, String>,
}

impl HostIndex {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HostsInner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HostsInner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn load(hosts: Vec<Host>) -> HostIndex {
        let idx = HostIndex::default();
        for h in hosts {
            idx.put(&h);
        }
        idx
    }

    /// Grows with every change to the hosts.
    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Acquire)
    }

    fn bump(&self) {
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Records the host's current (durable) state.
    pub fn put(&self, h: &Host) {
        let mut g = self.write();
        if let Some(old) = g.names.insert(h.id.clone(), h.name.clone()) {
            if old != h.name {
                g.by_name.remove(&old);
            }
        }
        g.by_name.insert(h.name.clone(), Arc::new(h.clone()));
        // Under the lock, after the change: a view built from this version
        // sees the change.
        self.bump();
    }

    pub fn remove(&self, id: &str) {
        let mut g = self.write();
        if let Some(name) = g.names.remove(id) {
            g.by_name.remove(&name);
        }
        self.bump();
    }

    /// By id or name.
    pub fn get(&self, key: &str) -> Option<Arc<Host>> {
        let g = self.read();
        let name = g.names.get(key).map(String::as_str).unwrap_or(key);
        g.by_name.get(name).cloned()
    }

    /// Every host, ordered by name.
    pub fn all(&self) -> Vec<Arc<Host>> {
        self.read().by_name.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.read().by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use virt8ra_api::{PowerState, VmSpec, VmStatus};

    fn vm(id: &str, name: &str, site: Option<&str>, phase: VmPhase) -> Vm {
        Vm {
            id: id.into(),
            name: name.into(),
            spec: VmSpec {
                vcpus: 1,
                memory_mib: 128,
                disk_gib: 1,
                image: "img".into(),
                placement: Default::default(),
                user_data: None,
                ports: vec![],
                ssh_authorized_keys: vec![],
                network: None,
                data_disks: vec![],
                nics: vec![],
                publish: vec![],
                ingress: None,
            },
            power: PowerState::Running,
            reboot_generation: 0,
            stop_timeout_s: 30,
            status: VmStatus {
                phase,
                host: site.map(|s| format!("{s}-h")),
                host_id: site.map(|s| format!("{s}-hid")),
                site: site.map(str::to_string),
                provider: site.map(|_| "p".to_string()),
                country: site.map(|_| "DE".to_string()),
                image_id: None,
                data_image_ids: vec![],
                placement_reason: None,
                last_error: None,
                ports: vec![],
                started_at: None,
                hypervisor: None,
                machine: None,
                migration: None,
                nics: vec![],
            },
            labels: Default::default(),
            project: "default".into(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
        }
    }

    fn ids(v: &[Arc<Vm>]) -> Vec<&str> {
        v.iter().map(|v| v.id.as_str()).collect()
    }

    /// A project's list walks that project's set: a page of a small
    /// project among many VMs looks at the project's VMs only, and a VM
    /// that changes project moves between the sets.
    #[test]
    fn project_lists_walk_the_projects_own_set() {
        let mut vms = Vec::new();
        for i in 0..1000 {
            let mut v = vm(
                &format!("{i:04}"),
                &format!("v{i}"),
                Some("s1"),
                VmPhase::Running,
            );
            v.project = if i % 100 == 7 { "small" } else { "big" }.into();
            vms.push(v);
        }
        let idx = VmIndex::load(vms);
        let small = VmFilter {
            project: Some("small".into()),
            limit: Some(3),
            ..Default::default()
        };
        assert_eq!(ids(&idx.list(&small)), ["0007", "0107", "0207"]);
        {
            let g = idx.read();
            let set = g
                .sets
                .get(&(Dim::Project, "small".to_string()))
                .expect("set");
            assert_eq!(set.len(), 10, "the page walks a set of 10, not of 1000");
        }
        let next = VmFilter {
            after_id: Some("0907".into()),
            ..small.clone()
        };
        assert!(idx.list(&next).is_empty());
        let mut moved = (*idx.get("0001").expect("vm")).clone();
        moved.project = "small".into();
        idx.put(&moved);
        assert_eq!(ids(&idx.list(&small)), ["0001", "0007", "0107"]);
        let nobody = VmFilter {
            project: Some("nobody".into()),
            ..Default::default()
        };
        assert!(idx.list(&nobody).is_empty());
    }

    #[test]
    fn filters_and_cursor_follow_updates() {
        let idx = VmIndex::load(vec![
            vm("a", "va", Some("s1"), VmPhase::Running),
            vm("b", "vb", Some("s2"), VmPhase::Running),
            vm("c", "vc", None, VmPhase::Pending),
            vm("d", "vd", Some("s1"), VmPhase::Stopped),
        ]);
        let site1 = VmFilter {
            site: Some("s1".into()),
            ..Default::default()
        };
        assert_eq!(ids(&idx.list(&site1)), ["a", "d"]);
        let page = VmFilter {
            limit: Some(2),
            ..Default::default()
        };
        assert_eq!(ids(&idx.list(&page)), ["a", "b"]);
        let next = VmFilter {
            limit: Some(2),
            after_id: Some("b".into()),
            ..Default::default()
        };
        assert_eq!(ids(&idx.list(&next)), ["c", "d"]);

        // c is placed on s1 and runs: it moves between the sets.
        idx.put(&vm("c", "vc", Some("s1"), VmPhase::Running));
        assert_eq!(ids(&idx.list(&site1)), ["a", "c", "d"]);
        let pending = VmFilter {
            phase: Some(VmPhase::Pending),
            ..Default::default()
        };
        assert!(idx.list(&pending).is_empty());
        assert!(idx.ids_in_phase(VmPhase::Pending).is_empty());
        let running_s1 = VmFilter {
            site: Some("s1".into()),
            phase: Some(VmPhase::Running),
            ..Default::default()
        };
        assert_eq!(ids(&idx.list(&running_s1)), ["a", "c"]);
        let unknown = VmFilter {
            country: Some("FR".into()),
            ..Default::default()
        };
        assert!(idx.list(&unknown).is_empty());
    }

    #[test]
    fn an_update_moves_the_vm_only_between_the_sets_that_changed() {
        let idx = VmIndex::load(vec![
            vm("a", "va", Some("s1"), VmPhase::Running),
            vm("b", "vb", Some("s1"), VmPhase::Running),
        ]);
        let by = |site: Option<&str>, phase: Option<VmPhase>| VmFilter {
            site: site.map(str::to_string),
            phase,
            ..Default::default()
        };
        let provider = VmFilter {
            provider: Some("p".into()),
            ..Default::default()
        };
        // a moves to s2 (host and site change; provider, country and phase
        // do not), then only its phase changes, then it comes back.
        idx.put(&vm("a", "va", Some("s2"), VmPhase::Running));
        assert_eq!(ids(&idx.list(&by(Some("s1"), None))), ["b"]);
        assert_eq!(ids(&idx.list(&by(Some("s2"), None))), ["a"]);
        assert_eq!(ids(&idx.list(&provider)), ["a", "b"]);
        idx.put(&vm("a", "va", Some("s2"), VmPhase::Stopped));
        assert_eq!(ids(&idx.list(&by(None, Some(VmPhase::Running)))), ["b"]);
        assert_eq!(
            ids(&idx.list(&by(Some("s2"), Some(VmPhase::Stopped)))),
            ["a"]
        );
        assert_eq!(ids(&idx.list(&provider)), ["a", "b"]);
        idx.put(&vm("a", "va", Some("s1"), VmPhase::Running));
        assert_eq!(
            ids(&idx.list(&by(Some("s1"), Some(VmPhase::Running)))),
            ["a", "b"]
        );
        // Nothing is left behind in the sets a VM moved out of.
        assert!(idx.list(&by(Some("s2"), None)).is_empty());
        assert!(idx.list(&by(None, Some(VmPhase::Stopped))).is_empty());
        // Renamed: the old name no longer finds it.
        idx.put(&vm("a", "va2", Some("s1"), VmPhase::Running));
        assert!(idx.get("va").is_none());
        assert_eq!(idx.get("va2").map(|v| v.id.clone()).as_deref(), Some("a"));
    }

    #[test]
    fn counts_by_phase_and_site_follow_updates_and_skip_deleted_vms() {
        let idx = VmIndex::load(vec![
            vm("a", "va", Some("s1"), VmPhase::Running),
            vm("b", "vb", Some("s1"), VmPhase::Stopped),
            vm("c", "vc", None, VmPhase::Pending),
        ]);
        let site = |s: &str| (s.to_string(), "p".to_string(), "DE".to_string());
        let phase = |p: &str| {
            idx.count_by_phase()
                .into_iter()
                .find(|(n, _)| *n == p)
                .map(|(_, n)| n)
        };
        assert_eq!(idx.count_by_site(), vec![(site("s1"), 2)]);
        assert_eq!(phase("running"), Some(1));
        assert_eq!(phase("deleted"), Some(0), "every phase is listed");
        // c is placed on s2; b is deleted (no longer counted at s1); a moves.
        idx.put(&vm("c", "vc", Some("s2"), VmPhase::Running));
        idx.put(&vm("b", "vb", Some("s1"), VmPhase::Deleted));
        assert_eq!(idx.count_by_site(), vec![(site("s1"), 1), (site("s2"), 1)]);
        idx.put(&vm("a", "va", Some("s2"), VmPhase::Running));
        assert_eq!(idx.count_by_site(), vec![(site("s2"), 2)], "s1 is gone");
        assert_eq!(phase("running"), Some(2));
        assert_eq!(phase("pending"), Some(0));
        assert_eq!(phase("deleted"), Some(1));
    }

    #[test]
    fn deleted_vms_are_hidden_and_free_their_name() {
        let idx = VmIndex::load(vec![vm("a", "web", Some("s1"), VmPhase::Running)]);
        assert_eq!(idx.get("web").map(|v| v.id.clone()).as_deref(), Some("a"));
        idx.put(&vm("a", "web", Some("s1"), VmPhase::Deleted));
        assert!(idx.list(&VmFilter::default()).is_empty());
        let all = VmFilter {
            include_deleted: true,
            ..Default::default()
        };
        assert_eq!(ids(&idx.list(&all)), ["a"]);
        // The deleted one is still found by name until a new one takes it.
        assert_eq!(idx.get("web").map(|v| v.id.clone()).as_deref(), Some("a"));
        idx.put(&vm("b", "web", None, VmPhase::Pending));
        assert_eq!(idx.get("web").map(|v| v.id.clone()).as_deref(), Some("b"));
        assert_eq!(idx.get("a").map(|v| v.id.clone()).as_deref(), Some("a"));
        assert_eq!(idx.len(), 2);
    }

    #[test]
    fn network_members_and_their_changes_are_tracked() {
        let idx = VmIndex::default();
        // VMs without NICs: nothing to track, nothing noted.
        idx.put(&vm("plain", "plain", Some("s1"), VmPhase::Running));
        assert!(!idx.has_network_members());
        assert!(idx.take_network_changes().is_empty());
        let nic = |id: &str, net: &str| virt8ra_api::VmNic {
            id: id.into(),
            network: net.into(),
            network_id: net.into(),
            mac: "02:00:00:00:00:01".into(),
            ip: "10.0.0.5".parse().expect("ip"),
            prefix: 24,
            publish: vec![],
        };
        let mut a = vm("a", "a", Some("s1"), VmPhase::Scheduled);
        a.status.nics = vec![nic("n1", "blue"), nic("n2", "red")];
        idx.put(&a);
        assert!(idx.has_network_members());
        assert_eq!(idx.take_network_changes(), ["blue", "red"]);
        assert!(idx.take_network_changes().is_empty(), "taken once");
        // A change that does not move it is not news to its networks.
        a.status.phase = VmPhase::Running;
        idx.put(&a);
        assert!(idx.take_network_changes().is_empty());
        // Moving it is.
        a.status.host_id = Some("other".into());
        idx.put(&a);
        assert_eq!(idx.take_network_changes(), ["blue", "red"]);
        assert_eq!(idx.on_network("blue").len(), 1);
        // Deleting it takes it off its networks, and that is news.
        a.status.phase = VmPhase::Deleting;
        idx.put(&a);
        assert_eq!(idx.take_network_changes(), ["blue", "red"]);
        assert!(idx.on_network("blue").is_empty());
        assert!(!idx.has_network_members());
        // Loading finds the members and notes their networks.
        let mut b = vm("b", "b", Some("s1"), VmPhase::Running);
        b.status.nics = vec![nic("n3", "blue")];
        let idx = VmIndex::load(vec![b]);
        assert_eq!(idx.take_network_changes(), ["blue"]);
        assert_eq!(idx.on_network("blue").len(), 1);
    }
}
