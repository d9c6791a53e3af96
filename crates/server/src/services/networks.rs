//! Virtual networks (issue 27): the rules of a new network, the NICs of a
//! new VM, and IPAM, the choice of their addresses.
//!
//! A network is a tenant resource like a VM: a name, an IPv4 subnet, a
//! gateway the hosts answer at (or none), DNS servers, an MTU, whether
//! outbound traffic is masqueraded, and a span (the countries, providers
//! and sites whose hosts may carry it). Networks are immutable for now.
//!
//! IPAM is decided here and made safe by the store. A NIC gets the address
//! asked for (if it is a host address of the subnet, not the gateway, and
//! free) or the lowest free one ([`virt8ra_api::allocate_ip`]). The choice
//! is written with the VM in one transaction, as a lease keyed by
//! (network, address), so no address can be held twice whatever the
//! concurrency: a create that lost a race gets a conflict and picks again.
//! Inside this process concurrent creates do not even race: each picks
//! under [`crate::registry::networks::Ipam`]'s lock, which sees every
//! address either leased or reserved by a create still under way. Deleting
//! the VM releases its leases in the same write that marks it deleted.
//!
//! A VM with NICs is placed only where all its networks reach: checked
//! here at create (rules and spans that cannot both hold are a 400 naming
//! the network), and enforced on every decision by the placement request
//! ([`crate::registry::placement::LoadedPlacement::request`]).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use chrono::Utc;
use virt8ra_api::{
    allocate_ip, mac_for_nic, validate, Ipv4Cidr, Network, NetworkCreate, NetworkSpan, NetworkSpec,
    PlacementConstraints, PublishedPort, Vm, VmCreate, VmNic, VmPublish, DEFAULT_MTU, MAX_MTU,
    MIN_MTU,
};
use virt8ra_store::{StoreError, VmFilter};

use crate::error::{missing_ref_in, ApiError, ApiResult};
use crate::registry::networks::{narrow, span_reaches};
use crate::registry::placement::site_info;
use crate::state::Ctx;

/// The most countries, providers or sites a span may list.
pub const MAX_SPAN_ENTRIES: usize = 64;
/// Times a create picks addresses again after losing one to another
/// control plane's create (within one process the IPAM lock prevents it).
const LEASE_RETRIES: usize = 8;

/// A network request's own values, checked: what does not need the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub cidr: Ipv4Cidr,
    pub gateway: Option<Ipv4Addr>,
    pub mtu: u32,
    pub nat: bool,
}

/// Checks a network request's name, subnet, gateway, DNS, MTU, NAT and the
/// country codes of its span. Each error names the field.
pub fn check(req: &NetworkCreate) -> Result<Checked, String> {
    validate::name("network", &req.name)?;
    let cidr: Ipv4Cidr = req.cidr.trim().parse().map_err(|e| format!("cidr: {e}"))?;
    if !(8..=30).contains(&cidr.prefix()) {
        return Err(format!(
            "cidr: {cidr} has a prefix of /{}; a network's prefix must be /8 to /30",
            cidr.prefix()
        ));
    }
    let gateway = match (req.no_gateway, req.gateway) {
        (true, Some(g)) => {
            return Err(format!(
                "gateway: {g} is given with no_gateway; give one or the other"
            ))
        }
        (true, None) => None,
        (false, g) => {
            let g = g.unwrap_or_else(|| Ipv4Addr::from(u32::from(cidr.network()) + 1));
            if !cidr.is_host(g) {
                return Err(format!(
                    "gateway: {g} is not a host address of {cidr} (inside it, neither its network nor its broadcast address)"
                ));
            }
            Some(g)
        }
    };
    let nat = req.nat.unwrap_or(gateway.is_some());
    if nat && gateway.is_none() {
        return Err(
            "nat: outbound NAT needs a gateway, and this network has none (no_gateway)".into(),
        );
    }
    if req.dns.len() > validate::MAX_NAMESERVERS {
        return Err(format!(
            "dns: {} servers; at most {} are allowed",
            req.dns.len(),
            validate::MAX_NAMESERVERS
        ));
    }
    for (i, d) in req.dns.iter().enumerate() {
        if d.is_unspecified() || d.is_broadcast() || d.is_multicast() {
            return Err(format!("dns[{i}]: {d} is not a name server's address"));
        }
    }
    let mtu = req.mtu.unwrap_or(DEFAULT_MTU);
    if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
        return Err(format!("mtu: {mtu} is outside {MIN_MTU}..{MAX_MTU}"));
    }
    check_span_lists(&req.span)?;
    Ok(Checked {
        cidr,
        gateway,
        mtu,
        nat,
    })
}

fn check_span_lists(s: &NetworkSpan) -> Result<(), String> {
    for (what, list) in [
        ("countries", &s.countries),
        ("providers", &s.providers),
        ("sites", &s.sites),
    ] {
        if list.len() > MAX_SPAN_ENTRIES {
            return Err(format!(
                "span.{what}: {} entries; at most {MAX_SPAN_ENTRIES} are allowed",
                list.len()
            ));
        }
        if let Some((i, x)) = list
            .iter()
            .enumerate()
            .find(|(i, x)| list[..*i].contains(x))
        {
            return Err(format!("span.{what}[{i}]: {x:?} is listed twice"));
        }
    }
    for c in &s.countries {
        validate::country(c).map_err(|e| format!("span.countries: {e}"))?;
    }
    Ok(())
}

/// Checks that the span's providers and sites exist, and that each site
/// lies inside the span's countries and providers (a network restricted
/// to some countries cannot reach a site elsewhere).
async fn check_span_refs(app: &Ctx, s: &NetworkSpan) -> ApiResult<()> {
    for p in &s.providers {
        match app.store.get_provider(p).await {
            Ok(_) => {}
            Err(e @ StoreError::NotFound { .. }) => {
                return Err(missing_ref_in("span.providers", e))
            }
            Err(e) => return Err(e.into()),
        }
    }
    for name in &s.sites {
        let site = match app.store.get_site(name).await {
            Ok(x) => x,
            Err(e @ StoreError::NotFound { .. }) => return Err(missing_ref_in("span.sites", e)),
            Err(e) => return Err(e.into()),
        };
        if !s.countries.is_empty() && !s.countries.contains(&site.country) {
            return Err(ApiError::Invalid(format!(
                "span.sites: site '{name}' is in {}, outside the span's countries {}",
                site.country,
                s.countries.join(", ")
            )));
        }
        if !s.providers.is_empty() && !s.providers.contains(&site.provider) {
            return Err(ApiError::Invalid(format!(
                "span.sites: site '{name}' belongs to provider '{}', outside the span's providers {}",
                site.provider,
                s.providers.join(", ")
            )));
        }
    }
    Ok(())
}

/// Creates a network. Bad input is a 400 naming the field; a name in use
/// is a 409. Nothing is written unless everything holds.
pub async fn create(app: &Ctx, req: &NetworkCreate, project: &str) -> ApiResult<Network> {
    let ok = check(req).map_err(ApiError::Invalid)?;
    check_span_refs(app, &req.span).await?;
    match app.store.get_network(&req.name).await {
        Ok(_) => {
            return Err(ApiError::Conflict(format!(
                "network '{}' already exists",
                req.name
            )))
        }
        Err(StoreError::NotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let n = Network {
        id: uuid::Uuid::now_v7().to_string(),
        name: req.name.clone(),
        cidr: ok.cidr.to_string(),
        gateway: ok.gateway,
        dns: req.dns.clone(),
        mtu: ok.mtu,
        vni: 0,
        span: req.span.clone(),
        nat: ok.nat,
        project: project.to_string(),
        created_at: Utc::now(),
    };
    // Its span is known to placement before any VM can name it.
    app.placement.spans.insert(&n);
    match app.store.create_network(&n).await {
        Ok(n) => Ok(n),
        Err(e) => {
            app.placement.spans.remove(&n.id);
            Err(e.into())
        }
    }
}

pub async fn list(app: &Ctx) -> ApiResult<Vec<Network>> {
    Ok(app.store.list_networks().await?)
}

/// A network by name or id (404 when there is none).
pub async fn get(app: &Ctx, key: &str) -> ApiResult<Network> {
    Ok(app.store.get_network(key).await?)
}

/// Deletes a network; refused (409, naming the VMs) while NICs are on it,
/// or while a VM with a NIC on it is being created. Under the IPAM lock:
/// a create that picked an address on the network holds a reservation
/// until its VM is written (so the delete sees it), and a create that
/// picks after the delete finds the network gone (so no lease outlives
/// its network).
pub async fn delete(app: &Ctx, key: &str) -> ApiResult<()> {
    let n = app.store.get_network(key).await?;
    let _one = app.ipam.pick.lock().await;
    if !app.ipam.reserved(&n.id).is_empty() {
        return Err(ApiError::Conflict(format!(
            "network '{}' is getting a NIC of a VM being created; try again",
            n.name
        )));
    }
    app.store.delete_network(&n.id).await?;
    app.placement.spans.remove(&n.id);
    Ok(())
}

/// The network definition as the IPAM rule and the agents take it.
pub fn spec_of(n: &Network) -> ApiResult<NetworkSpec> {
    let cidr = n
        .cidr
        .parse()
        .map_err(|e| ApiError::Internal(format!("network '{}': stored {e}", n.name)))?;
    Ok(NetworkSpec {
        id: n.id.clone(),
        name: n.name.clone(),
        cidr,
        gateway: n.gateway,
        dns: n.dns.clone(),
        vni: n.vni,
        mtu: n.mtu,
    })
}

/// A NIC of a VM being created: its network, resolved, and the address
/// asked for.
#[derive(Debug, Clone)]
pub struct NicPlan {
    pub network: Network,
    pub spec: NetworkSpec,
    pub ip: Option<Ipv4Addr>,
    /// The VM's ports published to this NIC.
    pub publish: Vec<PublishedPort>,
}

/// Resolves and checks the NICs of a new VM, before anything is written:
/// each network exists (else a 400 naming it), is used once, no two
/// subnets overlap (the guest could not route), an address asked for is a
/// host address of the subnet and not its gateway, and the VM's placement
/// rules and its networks' spans can both hold.
pub async fn resolve_nics(app: &Ctx, req: &VmCreate) -> ApiResult<Vec<NicPlan>> {
    let mut out: Vec<NicPlan> = Vec::with_capacity(req.nics.len());
    for (i, r) in req.nics.iter().enumerate() {
        let network = match app.store.get_network(&r.network).await {
            Ok(n) => n,
            Err(e @ StoreError::NotFound { .. }) => {
                return Err(missing_ref_in(&format!("nics[{i}]"), e))
            }
            Err(e) => return Err(e.into()),
        };
        let spec = spec_of(&network)?;
        check_nic(i, &spec, r.ip, &out).map_err(ApiError::Invalid)?;
        out.push(NicPlan {
            network,
            spec,
            ip: r.ip,
            publish: Vec::new(),
        });
    }
    assign_published(&req.publish, &mut out).map_err(ApiError::Invalid)?;
    if !out.is_empty() {
        check_reach(app, &req.placement, &out).await?;
    }
    Ok(out)
}

/// Gives each published port to its NIC: the one on the network it
/// names (by name or id), else the first on a network with a gateway.
/// The host routes to the guest, so that network needs a gateway.
pub fn assign_published(publish: &[VmPublish], nics: &mut [NicPlan]) -> Result<(), String> {
    for (i, p) in publish.iter().enumerate() {
        let at = match &p.network {
            Some(n) => nics
                .iter()
                .position(|x| x.network.name == *n || x.network.id == *n)
                .ok_or_else(|| {
                    format!(
                        "publish[{i}]: network '{n}' is not the network of any of the VM's NICs"
                    )
                })?,
            None => nics
                .iter()
                .position(|x| x.spec.gateway.is_some())
                .ok_or_else(|| {
                    format!(
                        "publish[{i}]: none of the VM's networks has a gateway, so no host can \
                         route to the guest; add a NIC on a network with one, or forward the \
                         port to the host's loopback (ports, --port)"
                    )
                })?,
        };
        let nic = &mut nics[at];
        if nic.spec.gateway.is_none() {
            return Err(format!(
                "publish[{i}]: network '{}' has no gateway, so no host can route to the guest on it",
                nic.network.name
            ));
        }
        nic.publish.push(p.port());
    }
    Ok(())
}

/// The placement request of a VM being planned (`vm plan`): `own` (its
/// own rules) narrowed by the spans of the networks its NICs name, which
/// are checked as at create.
pub async fn planned_request(
    app: &Ctx,
    req: &VmCreate,
    own: virt8ra_placement::Request,
) -> ApiResult<virt8ra_placement::Request> {
    if req.nics.is_empty() {
        return Ok(own);
    }
    let nics = resolve_nics(app, req).await?;
    let mut c = own.c.clone();
    for (i, n) in nics.iter().enumerate() {
        narrow(&mut c, &n.network.name, &n.network.span)
            .map_err(|e| ApiError::Invalid(format!("nics[{i}]: {e}")))?;
    }
    virt8ra_placement::Request::new(own.res, c, app.placement.config.weights)
        .map(|r| r.with_ports(req.publish.iter().map(VmPublish::port).collect()))
        .map_err(|e| ApiError::Invalid(format!("placement: {e}")))
}

/// NIC `i` on `net` with address `ip`, against the NICs before it.
pub fn check_nic(
    i: usize,
    net: &NetworkSpec,
    ip: Option<Ipv4Addr>,
    before: &[NicPlan],
) -> Result<(), String> {
    for (j, o) in before.iter().enumerate() {
        if o.spec.id == net.id {
            return Err(format!(
                "nics[{i}]: network '{}' is already the network of nics[{j}]; a VM has at most one NIC per network",
                net.name
            ));
        }
        if o.spec.cidr.overlaps(&net.cidr) {
            return Err(format!(
                "nics[{i}]: network '{}' ({}) overlaps network '{}' ({}) of nics[{j}]: the guest could not route between them",
                net.name, net.cidr, o.spec.name, o.spec.cidr
            ));
        }
    }
    let Some(ip) = ip else { return Ok(()) };
    if !net.cidr.contains(ip) {
        return Err(format!(
            "nics[{i}]: address {ip} is outside network '{}' ({})",
            net.name, net.cidr
        ));
    }
    if !net.cidr.is_host(ip) {
        let which = if ip == net.cidr.network() {
            "network"
        } else {
            "broadcast"
        };
        return Err(format!(
            "nics[{i}]: address {ip} is the {which} address of network '{}' ({}), not a host address",
            net.name, net.cidr
        ));
    }
    if Some(ip) == net.gateway {
        return Err(format!(
            "nics[{i}]: address {ip} is the gateway of network '{}'",
            net.name
        ));
    }
    Ok(())
}

/// The VM's own placement rules and its networks' spans must both be able
/// to hold: first as rules (a pinned country outside a span, lists with
/// nothing in common), then over the sites that exist (a VM whose rules
/// allow some sites, none of which a network reaches).
async fn check_reach(app: &Ctx, own: &PlacementConstraints, nics: &[NicPlan]) -> ApiResult<()> {
    let mut c = own.clone();
    for (i, n) in nics.iter().enumerate() {
        narrow(&mut c, &n.network.name, &n.network.span)
            .map_err(|e| ApiError::Invalid(format!("nics[{i}]: {e}")))?;
    }
    let weights = app.placement.config.weights;
    let res = virt8ra_placement::Resources {
        vcpus: 1,
        memory_mib: 1,
        disk_gib: 1,
    };
    virt8ra_placement::Request::new(res, c, weights).map_err(|e| {
        ApiError::Invalid(format!(
            "nics: the VM's placement rules and its networks' spans cannot both hold: {e}"
        ))
    })?;
    let Ok(own_req) = virt8ra_placement::Request::new(res, own.clone(), weights) else {
        return Ok(()); // reported by the VM's own checks
    };
    let providers = app.store.list_providers().await?;
    let mut allowed: Vec<virt8ra_placement::SiteInfo> = Vec::new();
    for s in app.store.list_sites().await? {
        let info = site_info(&s, providers.iter().find(|p| p.name == s.provider));
        if virt8ra_placement::rules::check_site(&info, &own_req, None).is_ok() {
            allowed.push(info);
        }
    }
    if allowed.is_empty() {
        return Ok(()); // no site yet: the VM waits, pending, whatever its NICs
    }
    for (i, n) in nics.iter().enumerate() {
        let span = &n.network.span;
        allowed.retain(|s| span_reaches(span, &s.name, &s.provider, &s.country));
        if allowed.is_empty() {
            let others = if i > 0 {
                " together with the networks before it"
            } else {
                ""
            };
            return Err(ApiError::Invalid(format!(
                "nics[{i}]: network '{}' does not reach any site the VM may run at{others}: the network spans {}",
                n.network.name,
                span.describe()
            )));
        }
    }
    Ok(())
}

/// Gives the new VM its NICs (ids, MACs, networks; addresses come at
/// [`create_vm`]), so that its placement follows their networks' spans.
pub fn attach(vm: &mut Vm, nics: &[NicPlan]) {
    vm.status.nics = nics
        .iter()
        .map(|p| {
            let id = uuid::Uuid::now_v7().to_string();
            VmNic {
                mac: mac_for_nic(&id).to_string(),
                id,
                network: p.network.name.clone(),
                network_id: p.network.id.clone(),
                ip: Ipv4Addr::UNSPECIFIED,
                prefix: p.spec.cidr.prefix(),
                publish: p.publish.clone(),
            }
        })
        .collect();
}

/// Writes the new VM with its events; a VM with NICs gets their addresses
/// here, leased in the same write. A lease lost to a concurrent create
/// (another control plane's) is picked again, a few times; an address
/// asked for that is held is a 409 naming the holder, a full network a
/// 409 naming it.
pub async fn create_vm(app: &Ctx, vm: &mut Vm, nics: &[NicPlan], events: &[&str]) -> ApiResult<()> {
    if nics.is_empty() {
        return Ok(app.create_vm(vm, events).await?);
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        let picked = pick(app, vm, nics).await?;
        let r = app.create_vm(vm, events).await;
        for (net, ip) in &picked {
            app.ipam.release(net, *ip);
        }
        match r {
            Ok(()) => return Ok(()),
            Err(StoreError::Conflict(m)) => {
                // Ours no longer free: a lease was lost; anything else
                // (the VM's name) is the caller's conflict.
                let lost = lost_lease(app, vm, nics).await?;
                match lost {
                    None => return Err(ApiError::Conflict(m)),
                    Some(i) if nics[i].ip.is_some() => {
                        return Err(held(app, &nics[i], vm.status.nics[i].ip))
                    }
                    Some(_) if attempt >= LEASE_RETRIES => {
                        return Err(ApiError::Conflict(format!(
                            "{m}; still taken after {attempt} attempts, try again"
                        )))
                    }
                    Some(_) => continue,
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Chooses each NIC's address under the IPAM lock and reserves it until
/// the VM is written. Returns what it reserved.
async fn pick(app: &Ctx, vm: &mut Vm, nics: &[NicPlan]) -> ApiResult<Vec<(String, Ipv4Addr)>> {
    let _one = app.ipam.pick.lock().await;
    let mut picked = Vec::with_capacity(nics.len());
    for (p, nic) in nics.iter().zip(vm.status.nics.iter_mut()) {
        let id = &p.network.id;
        if app.placement.spans.get(id).is_none() {
            release_all(app, &picked);
            return Err(ApiError::Invalid(format!(
                "network '{}' was deleted while the VM was being created",
                p.network.name
            )));
        }
        let reserved = app.ipam.reserved(id);
        let mut used: BTreeSet<Ipv4Addr> = match app.store.used_ips(id).await {
            Ok(u) => u,
            Err(e) => {
                release_all(app, &picked);
                return Err(e.into());
            }
        };
        if let Some(ip) = p.ip.filter(|ip| used.contains(ip) || reserved.contains(ip)) {
            release_all(app, &picked);
            return Err(held(app, p, ip));
        }
        used.extend(reserved);
        let ip = match allocate_ip(&p.spec, &used, p.ip) {
            Ok(ip) => ip,
            Err(_) => {
                release_all(app, &picked);
                return Err(ApiError::Conflict(format!(
                    "network {} has no free address ({} is full)",
                    p.network.name, p.network.cidr
                )));
            }
        };
        app.ipam.reserve(id, ip);
        picked.push((id.clone(), ip));
        nic.ip = ip;
    }
    Ok(picked)
}

fn release_all(app: &Ctx, picked: &[(String, Ipv4Addr)]) {
    for (net, ip) in picked {
        app.ipam.release(net, *ip);
    }
}

/// The first NIC of `vm` whose address is now leased (by another VM: this
/// one was not written).
async fn lost_lease(app: &Ctx, vm: &Vm, nics: &[NicPlan]) -> ApiResult<Option<usize>> {
    for (i, (p, nic)) in nics.iter().zip(&vm.status.nics).enumerate() {
        if app.store.used_ips(&p.network.id).await?.contains(&nic.ip) {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// The 409 for an address asked for that another NIC holds, naming the
/// holder when it is known.
fn held(app: &Ctx, p: &NicPlan, ip: Ipv4Addr) -> ApiError {
    let holder = app
        .vms
        .list(&VmFilter::default())
        .into_iter()
        .find(|v| {
            v.status
                .nics
                .iter()
                .any(|n| n.network_id == p.network.id && n.ip == ip)
        })
        .map(|v| format!("VM '{}'", v.name))
        .unwrap_or_else(|| "a VM being created".into());
    ApiError::Conflict(format!(
        "address {ip} on network '{}' is already taken by {holder}",
        p.network.name
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: serde_json::Value) -> NetworkCreate {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn defaults_are_the_first_host_the_default_mtu_and_nat() {
        let c = check(&req(
            serde_json::json!({"name": "n", "cidr": "10.1.0.0/24"}),
        ))
        .unwrap();
        assert_eq!(c.gateway, Some(Ipv4Addr::new(10, 1, 0, 1)));
        assert_eq!((c.mtu, c.nat), (DEFAULT_MTU, true));
        let c = check(&req(
            serde_json::json!({"name": "n", "cidr": "10.1.0.0/24", "no_gateway": true}),
        ))
        .unwrap();
        assert_eq!((c.gateway, c.nat), (None, false));
    }

    #[test]
    fn bad_networks_name_the_field() {
        let bad = |v: serde_json::Value, needle: &str| {
            let mut body = serde_json::json!({"name": "n", "cidr": "10.1.0.0/24"});
            for (k, x) in v.as_object().unwrap() {
                body[k] = x.clone();
            }
            let e = check(&req(body)).unwrap_err();
            assert!(e.contains(needle), "{e} lacks {needle}");
        };
        bad(
            serde_json::json!({"name": "Bad_Name"}),
            "invalid network name",
        );
        bad(
            serde_json::json!({"cidr": "10.1.0.0"}),
            "cidr: invalid CIDR",
        );
        bad(serde_json::json!({"cidr": "10.1.0.1/24"}), "host bits");
        bad(serde_json::json!({"cidr": "10.0.0.0/31"}), "/8 to /30");
        bad(serde_json::json!({"cidr": "10.0.0.0/7"}), "/8 to /30");
        bad(
            serde_json::json!({"gateway": "10.2.0.1"}),
            "gateway: 10.2.0.1 is not a host",
        );
        bad(
            serde_json::json!({"gateway": "10.1.0.255"}),
            "gateway: 10.1.0.255",
        );
        bad(
            serde_json::json!({"no_gateway": true, "gateway": "10.1.0.1"}),
            "given with no_gateway",
        );
        bad(
            serde_json::json!({"no_gateway": true, "nat": true}),
            "nat: outbound NAT needs a gateway",
        );
        bad(serde_json::json!({"mtu": 575}), "mtu: 575");
        bad(serde_json::json!({"mtu": 9001}), "mtu: 9001");
        bad(serde_json::json!({"dns": ["0.0.0.0"]}), "dns[0]");
        bad(
            serde_json::json!({"dns": ["1.1.1.1", "1.0.0.1", "8.8.8.8", "9.9.9.9"]}),
            "dns: 4 servers",
        );
        bad(
            serde_json::json!({"span": {"countries": ["XX"]}}),
            "span.countries: unknown country code",
        );
        bad(
            serde_json::json!({"span": {"sites": ["a", "a"]}}),
            "span.sites[1]",
        );
    }

    fn plan(name: &str, cidr: &str) -> NicPlan {
        let net = Network {
            id: format!("id-{name}"),
            name: name.into(),
            cidr: cidr.into(),
            gateway: None,
            dns: vec![],
            mtu: 1450,
            vni: 1,
            span: Default::default(),
            nat: false,
            project: "default".into(),
            created_at: Utc::now(),
        };
        let mut spec = spec_of(&net).unwrap();
        spec.gateway = Some(Ipv4Addr::from(u32::from(spec.cidr.network()) + 1));
        NicPlan {
            network: net,
            spec,
            ip: None,
            publish: vec![],
        }
    }

    #[test]
    fn published_ports_go_to_the_named_network_or_the_first_with_a_gateway() {
        let mut l2 = plan("l2", "10.9.0.0/24");
        l2.spec.gateway = None;
        let (a, b) = (plan("a", "10.0.0.0/24"), plan("b", "10.1.0.0/24"));
        let p = |s: &str| s.parse::<VmPublish>().unwrap();
        let mut nics = vec![l2.clone(), a.clone(), b.clone()];
        assign_published(&[p("8080:80"), p("53:53/udp,network=b")], &mut nics).unwrap();
        let got: Vec<usize> = nics.iter().map(|n| n.publish.len()).collect();
        assert_eq!(got, [0, 1, 1], "default to a, the first with a gateway");
        assert_eq!(nics[2].publish[0].to_string(), "53:53/udp");
        // By id too.
        let mut nics = vec![a.clone(), b.clone()];
        assign_published(&[p("1:1,network=id-b")], &mut nics).unwrap();
        assert_eq!(nics[1].publish.len(), 1);
        let e = assign_published(&[p("1:1"), p("2:2,network=c")], &mut [a.clone()]).unwrap_err();
        assert!(
            e.starts_with("publish[1]: network 'c' is not the network"),
            "{e}"
        );
        let e = assign_published(&[p("1:1,network=l2")], &mut [l2.clone(), a]).unwrap_err();
        assert!(
            e.starts_with("publish[0]: network 'l2' has no gateway"),
            "{e}"
        );
        let e = assign_published(&[p("1:1")], &mut [l2]).unwrap_err();
        assert!(
            e.starts_with("publish[0]: none of the VM's networks has a gateway"),
            "{e}"
        );
    }

    #[test]
    fn nics_must_not_overlap_and_addresses_must_be_hosts() {
        let a = plan("a", "10.0.0.0/24");
        let b = plan("b", "10.0.0.0/16");
        let e = check_nic(1, &b.spec, None, std::slice::from_ref(&a)).unwrap_err();
        assert!(e.contains("overlaps network 'a'"), "{e}");
        let e = check_nic(1, &a.spec, None, std::slice::from_ref(&a)).unwrap_err();
        assert!(e.contains("already the network of nics[0]"), "{e}");
        let c = plan("c", "10.1.0.0/24");
        assert!(check_nic(1, &c.spec, None, std::slice::from_ref(&a)).is_ok());
        let ip = |s: &str| Some(s.parse().unwrap());
        let e = check_nic(0, &c.spec, ip("10.2.0.5"), &[]).unwrap_err();
        assert!(e.contains("outside network 'c'"), "{e}");
        let e = check_nic(0, &c.spec, ip("10.1.0.0"), &[]).unwrap_err();
        assert!(e.contains("network address"), "{e}");
        let e = check_nic(0, &c.spec, ip("10.1.0.255"), &[]).unwrap_err();
        assert!(e.contains("broadcast address"), "{e}");
        let e = check_nic(0, &c.spec, ip("10.1.0.1"), &[]).unwrap_err();
        assert!(e.contains("gateway"), "{e}");
        assert!(check_nic(0, &c.spec, ip("10.1.0.7"), &[]).is_ok());
    }
}
