//! The network plane (issue 27): what each host's virtual networks should
//! be, computed from where the VMs with NICs are, and sent to its agent as
//! `ServerMessage::NetworkState`.
//!
//! [`host_state`] is the rule, a pure function of (this host, every
//! host's underlay address, the NICs and where their VMs are, the
//! networks): a host carries the networks of the NICs of the VMs placed
//! on it and of those migrating to it (the target of a migration has the
//! network, and the VM's taps, before the switch-over); its peers on a
//! network are the other hosts that carry it, by underlay address; and it
//! sends each remote NIC's MAC to the host its VM runs on.
//!
//! While a VM migrates, the other hosts have no entry for its MACs, so
//! its frames are flooded to every peer of the network (head-end
//! replication), the source and the target among them: they reach the
//! guest wherever it runs at that moment, and a connection to it flows
//! again as soon as the guest resumes at the target (frames sent while it
//! was paused wait in its tap), without waiting for the control plane to
//! hear of the switch-over and for every peer to apply a new state. The
//! VXLAN device cannot send a unicast MAC to two hosts: the kernel keeps
//! one destination per unicast entry. A host where the guest is not
//! running drops the copy. When the migration ends, the entries name the
//! one host again.

//! [`flush`] applies the rule where something changed, before the
//! scheduler sends desired VMs (so an agent gets a VM's taps before the VM;
//! it also waits for a missing tap itself). What changed comes from the VM
//! index (networks whose members joined, left, moved or started or ended
//! a migration: `VmIndex::take_network_changes`) and from marks on hosts
//! (an agent connected, maybe with a new address). Only the hosts carrying
//! an affected network, and the VMs' own hosts, are computed again; each
//! is sent its state only when it differs from what its connection was
//! last sent. While no VM has a NIC, a pass costs two empty checks, and a
//! host that never carried a network is never sent a state.
//!
//! Each local NIC carries its VM's security group (`spec.ingress`) and the
//! ports published to it (`status.nics[].publish`, chosen at create), so
//! the host that runs the VM enforces them, and they move with it: the
//! target of a migration has them before the switch-over.
//!
//! A host without an address (`virt8ra agent --address`, behind NAT) has
//! the unspecified underlay `0.0.0.0` in its state. With a tunnel, it is
//! named by its tunnel address here, and reached through a relay
//! ([`crate::services::overlay`], [`crate::services::tunnels`]): the
//! relay's state is computed again whenever the relayed host's is sent
//! changed (the hosts it talks to may have changed). Without a tunnel, or
//! without a relay, it carries its networks for its own guests only (no
//! VXLAN, no peers), the other hosts leave it out, and the control plane
//! logs why.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use virt8ra_api::{
    tap_name, FdbEntry, HostNetwork, HostNetworkState, IngressRule, LocalNic, MacAddr, Network,
    NetworkSpec, Peer, Vm, VmNic, VmPhase,
};
use virt8ra_store::VmFilter;

use crate::error::ApiResult;
use crate::registry::netplane::Carried;
use crate::services::overlay;
use crate::services::tunnels::{self, HostEnd};
use crate::state::Ctx;

/// A NIC and where its VM is: `host` runs it, `target` receives it in a
/// migration that has not switched over yet. `ingress`: its VM's security
/// group (its published ports are on the NIC itself).
#[derive(Debug, Clone, Copy)]
pub struct PlacedNic<'a> {
    pub vm: &'a str,
    pub nic: &'a VmNic,
    pub host: &'a str,
    pub target: Option<&'a str>,
    pub ingress: Option<&'a [IngressRule]>,
}

impl PlacedNic<'_> {
    fn on(&self, host: &str) -> bool {
        self.host == host || self.target == Some(host)
    }
}

/// One host's network state, the networks it carries, and what the
/// operator should know about it (hosts left out, networks that could not
/// be described).
#[derive(Debug, Clone, PartialEq)]
pub struct Computed {
    pub state: HostNetworkState,
    pub carried: BTreeSet<String>,
    pub notes: Vec<String>,
}

/// The agent's description of network `n`.
pub fn spec_of(n: &Network) -> Result<NetworkSpec, String> {
    Ok(NetworkSpec {
        id: n.id.clone(),
        name: n.name.clone(),
        cidr: n.cidr.parse()?,
        gateway: n.gateway,
        dns: n.dns.clone(),
        vni: n.vni,
        mtu: n.mtu,
    })
}

/// The network state of `host` (see the module doc). `underlays`: every
/// host's underlay address (`None`, or missing: it has none); `nics`:
/// every NIC of the networks concerned, with where its VM is.
pub fn host_state(
    host: &str,
    underlays: &HashMap<String, Option<Ipv4Addr>>,
    nics: &[PlacedNic],
    networks: &HashMap<String, Network>,
) -> Computed {
    let own = underlays.get(host).copied().flatten();
    let mut notes = Vec::new();
    let carried: BTreeSet<String> = nics
        .iter()
        .filter(|p| p.on(host))
        .map(|p| p.nic.network_id.clone())
        .collect();
    let mut out: Vec<HostNetwork> = Vec::new();
    for net_id in &carried {
        let Some(net) = networks.get(net_id) else {
            notes.push(format!("network {net_id} is unknown; not carried"));
            continue;
        };
        let spec = match spec_of(net) {
            Ok(s) => s,
            Err(e) => {
                notes.push(format!("network {}: {e}; not carried", net.name));
                continue;
            }
        };
        let on_net: Vec<&PlacedNic> = nics
            .iter()
            .filter(|p| &p.nic.network_id == net_id)
            .collect();
        let mut hn = members(host, own, &spec, &on_net, underlays, &mut notes);
        hn.nat = net.nat && spec.gateway.is_some();
        out.push(hn);
    }
    one_gateway_per_subnet(&mut out, &mut notes);
    one_holder_per_port(&mut out, &mut notes);
    if own.is_none() && !out.is_empty() {
        notes.push(format!(
            "host {host} has no address other hosts reach it at (start its agent with \
             --address IP): its networks reach only its own guests"
        ));
    }
    let state = HostNetworkState {
        underlay: own.unwrap_or(Ipv4Addr::UNSPECIFIED),
        networks: out,
        // Set by `tunnels::encrypt` where peers are at other sites.
        tunnel: None,
    };
    if let Err(e) = state.validate() {
        notes.push(format!("the agent will refuse this state: {e}"));
    }
    Computed {
        state,
        carried,
        notes,
    }
}

/// Network `spec` as `host` carries it: its local NICs, its peers (the
/// other hosts with a NIC of it, by underlay), and where each remote MAC
/// is. Without an underlay of its own (`own`) the host has neither peers
/// nor remote MACs.
fn members(
    host: &str,
    own: Option<Ipv4Addr>,
    spec: &NetworkSpec,
    on_net: &[&PlacedNic],
    underlays: &HashMap<String, Option<Ipv4Addr>>,
    notes: &mut Vec<String>,
) -> HostNetwork {
    let mut nics = Vec::new();
    let mut peers: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut fdb: BTreeMap<MacAddr, Ipv4Addr> = BTreeMap::new();
    let addr = |h: &str| underlays.get(h).copied().flatten();
    for p in on_net {
        let mac: MacAddr = match p.nic.mac.parse() {
            Ok(m) => m,
            Err(e) => {
                notes.push(format!("NIC {} of VM {}: {e}; left out", p.nic.id, p.vm));
                continue;
            }
        };
        if p.on(host) {
            nics.push(LocalNic {
                id: p.nic.id.clone(),
                vm: p.vm.to_string(),
                tap: tap_name(&p.nic.id),
                mac,
                ip: p.nic.ip,
                // The VM's security group and the ports published to this
                // NIC go wherever the VM runs (and to a migration's target
                // before the switch-over, so they hold from its first
                // packet there).
                ingress: p.ingress.map(<[IngressRule]>::to_vec),
                publish: p.nic.publish.clone(),
            });
        }
        let Some(own) = own else { continue };
        for h in std::iter::once(p.host).chain(p.target) {
            if h == host {
                continue;
            }
            match addr(h) {
                Some(u) if u == own => notes.push(format!(
                    "host {h} has this host's own address {u}; it is not a peer on network {}",
                    spec.name
                )),
                Some(u) => {
                    peers.entry(u).or_insert_with(|| h.to_string());
                }
                None => notes.push(format!(
                    "host {h} has no address (agent --address): network {} does not reach it",
                    spec.name
                )),
            }
        }
        // While the VM moves, no entry: its frames are flooded to every
        // peer, both its hosts among them (see the module doc).
        if !p.on(host) && p.target.is_none() {
            if let Some(u) = addr(p.host).filter(|u| *u != own) {
                fdb.insert(mac, u);
            }
        }
    }
    nics.sort_by(|a, b| a.id.cmp(&b.id));
    notes.dedup();
    HostNetwork {
        network: spec.clone(),
        nat: false,
        nics,
        peers: peers
            .into_iter()
            .map(|(underlay, host)| Peer { host, underlay })
            .collect(),
        fdb: fdb
            .into_iter()
            .map(|(mac, peer)| FdbEntry { mac, peer })
            .collect(),
    }
}

/// A host routes to one subnet of overlapping ones only: of networks with
/// overlapping CIDRs that meet on one host, the first (by id) keeps its
/// gateway there; the others are plain layer 2 segments on that host (no
/// gateway, DHCP or NAT), which the notes say.
fn one_gateway_per_subnet(out: &mut [HostNetwork], notes: &mut Vec<String>) {
    let mut routed: Vec<(String, virt8ra_api::Ipv4Cidr)> = Vec::new();
    for hn in out.iter_mut() {
        let n = &mut hn.network;
        if n.gateway.is_none() {
            continue;
        }
        if let Some((other, _)) = routed.iter().find(|(_, c)| c.overlaps(&n.cidr)) {
            notes.push(format!(
                "networks {other} and {} overlap ({}) on this host: {} is served without \
                 gateway, DHCP or NAT here",
                n.name, n.cidr, n.name
            ));
            n.gateway = None;
            hn.nat = false;
            continue;
        }
        routed.push((n.name.clone(), n.cidr));
    }
}

/// Placement keeps two VMs from publishing one host port on a host; should
/// two NICs here still ask for one (or a NIC's network lost its gateway
/// here, see [`one_gateway_per_subnet`]), the later ports are left out
/// with a note, rather than the agent refusing the host's whole state.
fn one_holder_per_port(out: &mut [HostNetwork], notes: &mut Vec<String>) {
    let mut held: Vec<(virt8ra_api::PublishedPort, String)> = Vec::new();
    for hn in out.iter_mut() {
        let routed = hn.network.gateway.is_some();
        for nic in &mut hn.nics {
            nic.publish.retain(|p| {
                if !routed {
                    notes.push(format!(
                        "NIC {} of VM {}: network {} has no gateway here; port {} not published",
                        nic.id,
                        nic.vm,
                        hn.network.name,
                        p.host_side()
                    ));
                    return false;
                }
                if let Some((_, other)) = held.iter().find(|(q, _)| q.clashes(p)) {
                    notes.push(format!(
                        "VM {} and VM {other} both publish host port {} here; only VM {other}'s is",
                        nic.vm,
                        p.host_side()
                    ));
                    return false;
                }
                held.push((p.clone(), nic.vm.clone()));
                true
            });
        }
    }
}

/// The host an active migration of `vm` takes it to, until it switched
/// over (then the VM's host is the target).
fn migration_target(app: &Ctx, vm: &Vm) -> Option<String> {
    let m = app.migrations.get(vm.status.migration.as_deref()?)?;
    let switched = vm.status.host_id.as_deref() == Some(m.target.host_id.as_str());
    (!switched).then_some(m.target.host_id)
}

/// Whether the VM's NICs are plugged in somewhere.
fn is_member(vm: &Vm) -> bool {
    !vm.status.nics.is_empty()
        && !matches!(vm.status.phase, VmPhase::Deleting | VmPhase::Deleted)
        && vm.status.host_id.is_some()
}

/// An agent connected (`reports`: it says it carries networks): its
/// state is computed on the next flush if it may carry any. Nothing while
/// no VM has a NIC and the agent carries none.
pub fn host_connected(app: &Ctx, host_id: &str, reports: bool) {
    app.hub.set_network_reported(host_id, reports);
    if reports || app.vms.has_network_members() {
        app.netplane.mark(host_id);
    }
}

/// Computes and sends the network state of every host affected by what
/// changed since the last flush (see the module doc). Runs before desired
/// VMs are sent.
pub async fn flush(app: &Ctx) {
    if let Err(e) = overlay::refresh(app).await {
        tracing::warn!(error = %e, "overlay relays not checked; retrying");
    }
    let changed = app.vms.take_network_changes();
    let mut hosts: BTreeSet<String> = app.netplane.take_marked().into_iter().collect();
    if changed.is_empty() && hosts.is_empty() {
        return;
    }
    let changed: BTreeSet<String> = changed.into_iter().collect();
    if !changed.is_empty() {
        hosts.extend(app.netplane.hosts_carrying(&changed));
        for n in &changed {
            for vm in app.vms.on_network(n) {
                hosts.extend(vm.status.host_id.clone());
                hosts.extend(migration_target(app, &vm));
            }
        }
    }
    let mut specs = NetworkCache::default();
    let mut done: HashSet<String> = HashSet::new();
    let mut again = Vec::new();
    while !hosts.is_empty() {
        for h in std::mem::take(&mut hosts) {
            if !done.insert(h.clone()) {
                again.push(h);
                continue;
            }
            if let Err(e) = sync_host(app, &h, &mut specs).await {
                tracing::warn!(host = %h, error = %e, "network state not computed; retrying");
                again.push(h);
            }
        }
        // Peers of a host whose address changed were marked meanwhile.
        hosts.extend(app.netplane.take_marked());
    }
    for h in again {
        app.netplane.mark(&h);
    }
}

/// The networks of one flush, read from the store once each.
#[derive(Default)]
struct NetworkCache(HashMap<String, Network>);

impl NetworkCache {
    async fn load(&mut self, app: &Ctx, ids: &BTreeSet<String>) -> ApiResult<()> {
        for id in ids {
            if !self.0.contains_key(id) {
                match app.store.get_network(id).await {
                    Ok(n) => {
                        self.0.insert(id.clone(), n);
                    }
                    // Gone (it cannot be while NICs are on it): the rule
                    // leaves it out and says so.
                    Err(virt8ra_store::StoreError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }
}

/// The inputs of [`host_state`] for `host`: the VMs of every network it
/// carries (the networks of the VMs on it and coming to it).
fn inputs(app: &Ctx, host: &str) -> (Vec<Arc<Vm>>, HashMap<String, Option<String>>) {
    let mut vms: BTreeMap<String, Arc<Vm>> = BTreeMap::new();
    let here = app.vms.list(&VmFilter {
        host_id: Some(host.to_string()),
        ..Default::default()
    });
    let incoming = app
        .migrations
        .active()
        .into_iter()
        .filter(|m| m.target.host_id == host)
        .filter_map(|m| app.vms.get(&m.vm_id));
    let mut nets: BTreeSet<String> = BTreeSet::new();
    for vm in here.into_iter().chain(incoming).filter(|v| is_member(v)) {
        nets.extend(vm.status.nics.iter().map(|n| n.network_id.clone()));
    }
    for n in &nets {
        for vm in app.vms.on_network(n) {
            if is_member(&vm) {
                vms.insert(vm.id.clone(), vm);
            }
        }
    }
    let targets = vms
        .values()
        .map(|vm| (vm.id.clone(), migration_target(app, vm)))
        .collect();
    (vms.into_values().collect(), targets)
}

/// A host's underlay address: its inventory's address, when it is IPv4.
fn underlay_of(app: &Ctx, host: &str) -> Option<Ipv4Addr> {
    overlay::underlay(&*app.hosts.get(host)?)
}

/// Where the rule names a host: its underlay address, or behind NAT its
/// tunnel address (reached through its relay, see `tunnels`).
fn reach_of(app: &Ctx, host: &str) -> Option<Ipv4Addr> {
    let h = app.hosts.get(host)?;
    overlay::underlay(&h).or_else(|| h.tunnel_address.filter(|_| overlay::needs_relay(&h)))
}

/// Computes `host`'s state and sends it if its connection was not sent
/// the same already. A host whose address changed has its peers marked.
async fn sync_host(app: &Ctx, host: &str, specs: &mut NetworkCache) -> ApiResult<()> {
    let (vms, targets) = inputs(app, host);
    let mut placed = Vec::new();
    let mut underlays: HashMap<String, Option<Ipv4Addr>> = HashMap::new();
    underlays.insert(host.to_string(), reach_of(app, host));
    let mut ids = BTreeSet::new();
    for vm in &vms {
        let Some(h) = vm.status.host_id.as_deref() else {
            continue;
        };
        let target = targets.get(&vm.id).cloned().flatten();
        for nic in &vm.status.nics {
            ids.insert(nic.network_id.clone());
            placed.push(PlacedNic {
                vm: &vm.id,
                nic,
                host: h,
                target: None,
                ingress: vm.spec.ingress.as_deref(),
            });
        }
        for x in std::iter::once(h.to_string()).chain(target) {
            underlays.entry(x).or_insert_with_key(|x| reach_of(app, x));
        }
    }
    // The targets borrow from `targets`, which outlives `placed`.
    for p in &mut placed {
        p.target = targets.get(p.vm).and_then(|t| t.as_deref());
    }
    specs.load(app, &ids).await?;
    let mut c = host_state(host, &underlays, &placed, &specs.0);
    encrypt_between_sites(app, host, underlays.keys(), &mut c).await?;
    let own = c.state.underlay;
    let own = (!own.is_unspecified()).then_some(own);
    let key = app
        .hosts
        .get(host)
        .and_then(|h| h.inventory.tunnel_public_key.clone());
    let before = app.netplane.carried(host);
    let moved = before
        .as_ref()
        .is_none_or(|b| b.underlay != own || b.tunnel_key != key);
    if moved && !c.carried.is_empty() {
        for peer in app.netplane.hosts_carrying(&c.carried) {
            if peer != host {
                app.netplane.mark(&peer);
            }
        }
    }
    app.netplane.set_carried(
        host,
        Carried {
            networks: c.carried.clone(),
            underlay: own,
            tunnel_key: key,
        },
    );
    let relays = c.state.tunnel.as_ref().is_some_and(|t| t.relay);
    let relayed = app.netplane.relays.set_served(host, relays);
    // A host that carries nothing, was computed to carry nothing, says it
    // carries nothing and relays for nobody (nor did) is sent nothing.
    if c.state.networks.is_empty()
        && before.is_none()
        && !app.hub.network_reported(host)
        && !relays
        && !relayed
    {
        return Ok(());
    }
    let networks = c.state.networks.len();
    if app
        .hub
        .send_network_state(host, c.state, || app.netplane.next_generation(host))
    {
        tracing::info!(host = %host, networks, relays, "network state sent");
        // The hosts it talks to may have changed: so may its relay's.
        if let Some(r) = app.netplane.relays.get(host).flatten() {
            app.netplane.mark(&r);
        }
        for n in &c.notes {
            tracing::warn!(host = %host, "{n}");
        }
    }
    Ok(())
}

/// Routes `c`'s peers at other sites, behind NAT or relayed through
/// the tunnels (see [`crate::services::tunnels`]), from what the hosts it
/// names (`named`), their relays, and the hosts `host` relays for are.
async fn encrypt_between_sites(
    app: &Ctx,
    host: &str,
    named: impl Iterator<Item = &String>,
    c: &mut Computed,
) -> ApiResult<()> {
    let relayed = overlay::relayed_by(app, host);
    let mut names: BTreeSet<String> = named.cloned().collect();
    names.insert(host.to_string());
    for r in &relayed {
        names.insert(r.host.clone());
        names.extend(r.talks_to.iter().cloned());
    }
    let trusted = overlay::trusted_fabrics(app).await?;
    let end = |rec: &virt8ra_api::Host, relay: Option<String>| HostEnd {
        site: rec.site.clone(),
        trusted_fabric: trusted.contains(&rec.site),
        underlay: overlay::underlay(rec),
        tunnel: rec
            .tunnel_address
            .zip(rec.inventory.tunnel_public_key.clone()),
        relay,
    };
    let mut ends: HashMap<String, HostEnd> = HashMap::new();
    let mut relays = BTreeSet::new();
    for h in &names {
        let Some(rec) = app.hosts.get(h) else {
            continue;
        };
        let nets = (h == host).then_some(&c.carried);
        let relay = overlay::relay_of(app, h, nets).await?;
        relays.extend(relay.clone());
        ends.insert(h.clone(), end(&rec, relay));
    }
    for r in relays {
        if let (false, Some(rec)) = (ends.contains_key(&r), app.hosts.get(&r)) {
            ends.insert(r, end(&rec, None));
        }
    }
    c.notes
        .extend(tunnels::encrypt(host, &mut c.state, &ends, &relayed));
    if underlay_of(app, host).is_none() {
        c.state.underlay = Ipv4Addr::UNSPECIFIED;
    }
    if let Err(e) = c.state.validate() {
        c.notes
            .push(format!("the agent will refuse this state: {e}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
