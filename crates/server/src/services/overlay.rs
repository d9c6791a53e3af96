//! Relays for hosts behind NAT (issue 27, item 3): the control plane's
//! side of [`crate::services::tunnels::choose_relay`], and what the API
//! shows of each host's path.
//!
//! A host whose agent has no `--address` but runs a tunnel needs a relay.
//! The candidates are the hosts with an address and a tunnel whose agent
//! is up, at a site the spans of every network the host carries reach (a
//! relay sees the traffic it forwards as its tunnel decrypts it, so it
//! must be a host that may carry it). The choice is made when the host's
//! state is first computed, and checked on each network pass while any
//! host is behind NAT (none: nothing is done): a relay that went down,
//! was deleted or lost its address is replaced at once; when the hosts
//! changed (at most once a second) or ten seconds passed, the choices are
//! made again, so a better one (a host that joined at the host's site, a
//! nearer one that came back up) is taken. A full choice looks at every
//! host once. Each change marks the host, its old and new relays and
//! every host that carries its networks, whose states route through the
//! relay.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::time::Duration;

use virt8ra_api::{Host, HostOverlay, Reachability};

use crate::error::ApiResult;
use crate::registry::networks::span_reaches;
use crate::services::tunnels::{choose_relay, Place};
use crate::state::Ctx;

/// How often the choices are made again when nothing forces it, so that
/// a better relay that came up (an agent that reconnected) is taken.
const RECHOOSE_EVERY: Duration = Duration::from_secs(10);
/// The least time between two choices made because the hosts changed: a
/// full choice looks at every host.
const RECHOOSE_GAP: Duration = Duration::from_secs(1);

/// A host's underlay address: its inventory's address, when it is IPv4.
pub fn underlay(h: &Host) -> Option<Ipv4Addr> {
    h.inventory.migration_address.as_deref()?.parse().ok()
}

/// Whether `h` runs a tunnel (it reported a key and was given an address).
fn has_tunnel(h: &Host) -> bool {
    h.tunnel_address.is_some() && h.inventory.tunnel_public_key.is_some()
}

/// Whether `h` is behind NAT and can be relayed: no address, a tunnel.
pub fn needs_relay(h: &Host) -> bool {
    underlay(h).is_none() && has_tunnel(h)
}

fn is_up(app: &Ctx, h: &Host) -> bool {
    app.hub
        .view(&h.id, app.liveness_window())
        .is_some_and(|l| l.alive)
}

/// The sites' locations, by name.
async fn locations(app: &Ctx) -> ApiResult<HashMap<String, (f64, f64)>> {
    Ok(app
        .store
        .list_sites()
        .await?
        .into_iter()
        .map(|s| (s.name, (s.latitude, s.longitude)))
        .collect())
}

/// The names of the sites marked as trusted fabrics (plain VXLAN between
/// their hosts; see [`crate::services::tunnels`]).
pub async fn trusted_fabrics(app: &Ctx) -> ApiResult<std::collections::HashSet<String>> {
    Ok(app
        .store
        .list_sites()
        .await?
        .into_iter()
        .filter(|s| s.trusted_fabric)
        .map(|s| s.name)
        .collect())
}

fn place(h: &Host, at: &HashMap<String, (f64, f64)>) -> Place {
    Place {
        host: h.id.clone(),
        site: h.site.clone(),
        provider: h.provider.clone(),
        location: at.get(&h.site).copied().unwrap_or((0.0, 0.0)),
    }
}

/// The hosts that may relay: reachable, with a tunnel, up.
fn candidates(app: &Ctx) -> Vec<std::sync::Arc<Host>> {
    app.hosts
        .all()
        .into_iter()
        .filter(|h| underlay(h).is_some() && has_tunnel(h) && is_up(app, h))
        .collect()
}

/// The relay for `h` of `cands`: one the spans of its networks (`nets`)
/// reach.
fn choose(
    app: &Ctx,
    h: &Host,
    nets: &BTreeSet<String>,
    cands: &[std::sync::Arc<Host>],
    at: &HashMap<String, (f64, f64)>,
) -> Option<String> {
    let spans: Vec<_> = nets
        .iter()
        .filter_map(|n| app.placement.spans.get(n))
        .collect();
    let places: Vec<Place> = cands
        .iter()
        .filter(|c| {
            spans
                .iter()
                .all(|s| span_reaches(&s.span, &c.site, &c.provider, &c.country))
        })
        .map(|c| place(c, at))
        .collect();
    choose_relay(&place(h, at), &places).map(|p| p.host.clone())
}

/// The relay of `host` (an id), choosing one if none was chosen yet
/// (for the networks `nets` it carries, else those it was last computed
/// to carry); `None` for a host that needs none or has none.
pub async fn relay_of(
    app: &Ctx,
    host: &str,
    nets: Option<&BTreeSet<String>>,
) -> ApiResult<Option<String>> {
    if let Some(r) = app.netplane.relays.get(host) {
        return Ok(r);
    }
    let Some(h) = app.hosts.get(host).filter(|h| needs_relay(h)) else {
        return Ok(None);
    };
    let at = locations(app).await?;
    let carried = app.netplane.carried(host).map(|c| c.networks);
    let nets = nets.or(carried.as_ref()).cloned().unwrap_or_default();
    let r = choose(app, &h, &nets, &candidates(app), &at);
    changed(
        app,
        host,
        app.netplane.relays.set(host, r.clone()),
        r.as_deref(),
    );
    Ok(r)
}

/// Marks what a new choice for `host` concerns (if it changed: `old`).
fn changed(app: &Ctx, host: &str, old: Option<Option<String>>, new: Option<&str>) {
    let Some(old) = old else { return };
    match new {
        Some(r) => tracing::info!(host = %host, relay = %r, "overlay relay chosen"),
        None => tracing::warn!(
            host = %host,
            "no overlay relay: no host with an address and a tunnel is up; the host's \
             networks reach its own guests only"
        ),
    }
    app.netplane.mark(host);
    for r in old.iter().map(String::as_str).chain(new) {
        app.netplane.mark(r);
    }
    if let Some(c) = app.netplane.carried(host) {
        for p in app.netplane.hosts_carrying(&c.networks) {
            app.netplane.mark(&p);
        }
    }
}

/// Whether relay `r` may still relay: it exists, is reachable, has a
/// tunnel and is up.
fn still_relays(app: &Ctx, r: &str) -> bool {
    app.hosts
        .get(r)
        .is_some_and(|h| underlay(&h).is_some() && has_tunnel(&h) && is_up(app, &h))
}

/// Makes the choices again where due (see the module doc): when a relay
/// went, when the hosts changed (at most every [`RECHOOSE_GAP`]), and
/// every [`RECHOOSE_EVERY`] (a better relay came up, a host without one
/// may have one now); otherwise a pass costs a look at each chosen relay.
pub async fn refresh(app: &Ctx) -> ApiResult<()> {
    let known = app.netplane.relays.hosts();
    if known.is_empty() {
        return Ok(());
    }
    let gone = known.iter().any(|h| {
        app.netplane
            .relays
            .get(h)
            .flatten()
            .is_some_and(|r| !still_relays(app, &r))
    });
    let version = app.hosts.version();
    if !app
        .netplane
        .relays
        .due(gone, version, RECHOOSE_GAP, RECHOOSE_EVERY)
    {
        return Ok(());
    }
    let at = locations(app).await?;
    let cands = candidates(app);
    for id in known {
        match app.hosts.get(&id).filter(|h| needs_relay(h)) {
            None => {
                let old = app.netplane.relays.remove(&id);
                changed(app, &id, Some(old), None);
            }
            Some(h) => {
                let nets = app.netplane.carried(&id).map(|c| c.networks);
                let r = choose(app, &h, &nets.unwrap_or_default(), &cands, &at);
                changed(
                    app,
                    &id,
                    app.netplane.relays.set(&id, r.clone()),
                    r.as_deref(),
                );
            }
        }
    }
    Ok(())
}

/// The hosts `relay` relays for, each with every host it talks to (the
/// other hosts carrying its networks).
pub fn relayed_by(app: &Ctx, relay: &str) -> Vec<crate::services::tunnels::Relayed> {
    app.netplane
        .relays
        .clients_of(relay)
        .into_iter()
        .map(|c| {
            let nets = app
                .netplane
                .carried(&c)
                .map(|x| x.networks)
                .unwrap_or_default();
            let talks_to: BTreeSet<String> = app
                .netplane
                .hosts_carrying(&nets)
                .into_iter()
                .filter(|h| *h != c)
                .collect();
            crate::services::tunnels::Relayed { host: c, talks_to }
        })
        .collect()
}

/// How the other hosts reach `h` (see [`HostOverlay`]).
pub fn reachability(app: &Ctx, h: &Host) -> HostOverlay {
    let (reachable, relayed_via) = if underlay(h).is_some() {
        (Reachability::Direct, None)
    } else {
        match app.netplane.relays.get(&h.id).flatten() {
            Some(r) if has_tunnel(h) => {
                let name = app.hosts.get(&r).map_or(r, |x| x.name.clone());
                (Reachability::Relayed, Some(name))
            }
            _ => (Reachability::Isolated, None),
        }
    };
    HostOverlay {
        tunnel_address: h.tunnel_address,
        reachable,
        relayed_via,
    }
}

/// The hosts that carry network `id`, each with how the others reach it.
pub fn network_hosts(app: &Ctx, id: &str) -> Vec<virt8ra_api::NetworkHost> {
    let mut out: Vec<virt8ra_api::NetworkHost> = app
        .netplane
        .hosts_carrying(&BTreeSet::from([id.to_string()]))
        .into_iter()
        .filter_map(|h| app.hosts.get(&h))
        .map(|h| {
            let o = reachability(app, &h);
            virt8ra_api::NetworkHost {
                host: h.name.clone(),
                site: h.site.clone(),
                tunnel_address: o.tunnel_address,
                reachable: o.reachable,
                relayed_via: o.relayed_via,
            }
        })
        .collect();
    out.sort_by(|a, b| a.host.cmp(&b.host));
    out
}
