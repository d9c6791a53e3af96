//! The topology the operator manages: providers, their sites, and the
//! hosts at the sites (which their agents create by joining).
//!
//! Every change here also changes what the placement engine knows: a new
//! or changed provider or site invalidates the loaded engine (it is
//! rebuilt on its next use), a host is updated in it in place. The three
//! kinds are changed the same way, load → change → check → store, so one
//! helper ([`update`]) does it for all of them through [`Resource`].

use std::future::Future;

use chrono::Utc;
use virt8ra_api::{
    validate, AgentJoin, Host, HostState, HostUpdate, Provider, ProviderCreate, ProviderUpdate,
    Site, SiteCreate, SiteUpdate,
};
use virt8ra_store::TokenRecord;

use crate::error::{missing_ref, ApiError, ApiResult};
use crate::services::placement::host_view;
use crate::services::tokens;
use crate::state::Ctx;

/// A piece of the topology as [`update`] changes it: how to load it by
/// name or id, and how to store its new state (and tell the placement
/// engine).
pub trait Resource: Sized + Send {
    fn load(app: &Ctx, key: &str) -> impl Future<Output = ApiResult<Self>> + Send;
    fn save(&self, app: &Ctx) -> impl Future<Output = ApiResult<()>> + Send;
}

impl Resource for Provider {
    async fn load(app: &Ctx, key: &str) -> ApiResult<Self> {
        Ok(app.store.get_provider(key).await?)
    }
    async fn save(&self, app: &Ctx) -> ApiResult<()> {
        app.store.update_provider(self).await?;
        app.placement.invalidate();
        Ok(())
    }
}

impl Resource for Site {
    async fn load(app: &Ctx, key: &str) -> ApiResult<Self> {
        Ok(app.store.get_site(key).await?)
    }
    async fn save(&self, app: &Ctx) -> ApiResult<()> {
        app.store.update_site(self).await?;
        app.placement.invalidate();
        Ok(())
    }
}

impl Resource for Host {
    async fn load(app: &Ctx, key: &str) -> ApiResult<Self> {
        Ok(app.host(key)?)
    }
    async fn save(&self, app: &Ctx) -> ApiResult<()> {
        app.update_host(self).await?;
        app.placement.upsert_host(app, self);
        app.wake.notify_one();
        Ok(())
    }
}

/// Loads `key`, applies `change` (which checks the result and refuses
/// with an error that stores nothing), and stores it.
pub async fn update<T: Resource>(
    app: &Ctx,
    key: &str,
    change: impl FnOnce(&mut T) -> ApiResult<()> + Send,
) -> ApiResult<T> {
    let mut r = T::load(app, key).await?;
    change(&mut r)?;
    r.save(app).await?;
    Ok(r)
}

fn set<T>(field: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *field = v;
    }
}

pub async fn providers(app: &Ctx) -> ApiResult<Vec<Provider>> {
    Ok(app.store.list_providers().await?)
}

pub async fn provider(app: &Ctx, key: &str) -> ApiResult<Provider> {
    Provider::load(app, key).await
}

pub async fn create_provider(app: &Ctx, req: ProviderCreate) -> ApiResult<Provider> {
    validate::provider(&req).map_err(ApiError::Invalid)?;
    let p = Provider {
        id: uuid::Uuid::new_v4().to_string(),
        name: req.name,
        country: req.country,
        jurisdiction: req.jurisdiction,
        labels: req.labels,
        created_at: Utc::now(),
    };
    app.store.create_provider(&p).await?;
    app.placement.invalidate();
    Ok(p)
}

pub async fn update_provider(app: &Ctx, key: &str, req: ProviderUpdate) -> ApiResult<Provider> {
    update(app, key, |p: &mut Provider| {
        set(&mut p.country, req.country);
        set(&mut p.jurisdiction, req.jurisdiction);
        set(&mut p.labels, req.labels);
        validate::provider(&ProviderCreate {
            name: p.name.clone(),
            country: p.country.clone(),
            jurisdiction: p.jurisdiction.clone(),
            labels: p.labels.clone(),
        })
        .map_err(ApiError::Invalid)
    })
    .await
}

pub async fn delete_provider(app: &Ctx, key: &str) -> ApiResult<()> {
    let p = provider(app, key).await?;
    app.store.delete_provider(&p.id).await?;
    app.placement.invalidate();
    Ok(())
}

pub async fn sites(app: &Ctx) -> ApiResult<Vec<Site>> {
    Ok(app.store.list_sites().await?)
}

pub async fn site(app: &Ctx, key: &str) -> ApiResult<Site> {
    Site::load(app, key).await
}

/// Creates a site of an existing provider (a missing one is a 400).
pub async fn create_site(app: &Ctx, req: SiteCreate) -> ApiResult<Site> {
    validate::site(&req).map_err(ApiError::Invalid)?;
    let provider = provider(app, &req.provider).await.map_err(missing_ref)?;
    let s = Site {
        id: uuid::Uuid::new_v4().to_string(),
        name: req.name,
        provider: provider.name,
        country: req.country,
        city: req.city,
        latitude: req.latitude,
        longitude: req.longitude,
        tier: req.tier,
        facts: req.facts,
        labels: req.labels,
        trusted_fabric: req.trusted_fabric,
        created_at: Utc::now(),
    };
    app.store.create_site(&s).await?;
    app.placement.invalidate();
    Ok(s)
}

pub async fn update_site(app: &Ctx, key: &str, req: SiteUpdate) -> ApiResult<Site> {
    let trust = req.trusted_fabric;
    let site = update(app, key, |s: &mut Site| {
        set(&mut s.city, req.city);
        set(&mut s.latitude, req.latitude);
        set(&mut s.longitude, req.longitude);
        set(&mut s.tier, req.tier);
        set(&mut s.facts, req.facts);
        set(&mut s.labels, req.labels);
        set(&mut s.trusted_fabric, req.trusted_fabric);
        validate::site(&SiteCreate {
            name: s.name.clone(),
            provider: s.provider.clone(),
            country: s.country.clone(),
            city: s.city.clone(),
            latitude: s.latitude,
            longitude: s.longitude,
            tier: s.tier,
            facts: s.facts.clone(),
            labels: s.labels.clone(),
            trusted_fabric: s.trusted_fabric,
        })
        .map_err(ApiError::Invalid)
    })
    .await?;
    if trust.is_some() {
        // Plain VXLAN or tunnels between its hosts: their network states.
        for h in app.hosts.all().iter().filter(|h| h.site == site.name) {
            app.netplane.mark(&h.id);
        }
        app.wake.notify_one();
    }
    Ok(site)
}

pub async fn delete_site(app: &Ctx, key: &str) -> ApiResult<()> {
    let s = site(app, key).await?;
    app.store.delete_site(&s.id).await?;
    app.placement.invalidate();
    Ok(())
}

/// Which hosts a listing keeps.
#[derive(Debug, Default)]
pub struct HostFilter {
    pub site: Option<String>,
    pub provider: Option<String>,
    pub country: Option<String>,
    pub state: Option<HostState>,
}

/// The hosts that pass `q`, from memory (the host index, the hub and the
/// engine's books), with their liveness and allocations.
pub async fn hosts(app: &Ctx, q: &HostFilter) -> ApiResult<Vec<Host>> {
    let alloc = app.placement.allocations(app).await?;
    Ok(app
        .hosts
        .all()
        .into_iter()
        .map(|h| {
            let a = alloc.get(&h.name).copied();
            with_overlay(app, host_view(app, (*h).clone(), a.as_ref()))
        })
        .filter(|h| {
            q.site.as_ref().is_none_or(|s| *s == h.site)
                && q.provider.as_ref().is_none_or(|s| *s == h.provider)
                && q.country.as_ref().is_none_or(|s| *s == h.country)
                && q.state.is_none_or(|s| s == h.state)
        })
        .collect())
}

/// One host with its liveness and allocation.
pub async fn host(app: &Ctx, key: &str) -> ApiResult<Host> {
    let h = app.host(key)?;
    let a = app.placement.allocations(app).await?.get(&h.name).copied();
    Ok(with_overlay(app, host_view(app, h, a.as_ref())))
}

/// `h` with how the other hosts reach it over the overlay.
fn with_overlay(app: &Ctx, mut h: Host) -> Host {
    h.overlay = Some(crate::services::overlay::reachability(app, &h));
    h
}

/// Changes a host's state or overcommit. `unreachable` is the control
/// plane's to set, and an overcommit outside 0.1..64 is refused.
pub async fn update_host(app: &Ctx, key: &str, req: HostUpdate) -> ApiResult<Host> {
    if req.state == Some(HostState::Unreachable) {
        return Err(ApiError::Invalid(
            "state 'unreachable' is set by the control plane; use ready, disabled or maintenance"
                .into(),
        ));
    }
    for (what, v) in [
        ("cpu_overcommit", req.cpu_overcommit),
        ("memory_overcommit", req.memory_overcommit),
    ] {
        if let Some(v) = v {
            if !(0.1..=64.0).contains(&v) {
                return Err(ApiError::Invalid(format!("{what} {v} is outside 0.1..64")));
            }
        }
    }
    if req.state.is_none() && req.cpu_overcommit.is_none() && req.memory_overcommit.is_none() {
        return Err(ApiError::Invalid(
            "nothing to change: give state, cpu_overcommit or memory_overcommit".into(),
        ));
    }
    let h = update(app, key, |h: &mut Host| {
        set(&mut h.state, req.state);
        if req.cpu_overcommit.is_some() {
            h.cpu_overcommit = req.cpu_overcommit;
        }
        if req.memory_overcommit.is_some() {
            h.memory_overcommit = req.memory_overcommit;
        }
        Ok(())
    })
    .await?;
    host(app, &h.id).await
}

/// Removes a host: from the engine's books, the store and the index, as
/// one step the engine does not rebuild across.
pub async fn delete_host(app: &Ctx, key: &str) -> ApiResult<()> {
    let h = app.host(key)?;
    app.placement
        .remove_host(app, &h, async {
            app.store.delete_host(&h.id).await?;
            app.hosts.remove(&h.id);
            Ok(())
        })
        .await?;
    if let Some(a) = h.tunnel_address {
        app.tunnels.give_back(a);
    }
    Ok(())
}

/// Gives `host` its tunnel address if its agent can run a tunnel (it
/// reported a public key) and it has none yet; the caller writes the host.
pub fn take_tunnel_address(app: &Ctx, host: &mut Host) {
    if host.tunnel_address.is_some() || host.inventory.tunnel_public_key.is_none() {
        return;
    }
    host.tunnel_address = app.tunnels.take();
    if host.tunnel_address.is_none() {
        tracing::warn!(host = %host.name, "no tunnel address left: the host cannot join encrypted networks");
    }
}

/// A host joined with a join token of its site: the new host, its site's
/// name and the host's token (its secret, shown once).
pub struct Joined {
    pub host: Host,
    pub site: String,
    pub secret: String,
}

/// Registers the agent that presented join token `token` as a new host of
/// the token's site; the token's use is spent in the same write.
pub async fn join(app: &Ctx, token: &TokenRecord, req: AgentJoin) -> ApiResult<Joined> {
    validate::name("host", &req.name).map_err(ApiError::Invalid)?;
    let site_name = token
        .site
        .clone()
        .ok_or_else(|| ApiError::Internal("join token without site".into()))?;
    let site = app.store.get_site(&site_name).await?;
    let host = Host {
        id: uuid::Uuid::new_v4().to_string(),
        name: req.name,
        site: site.name.clone(),
        provider: site.provider.clone(),
        country: site.country.clone(),
        inventory: req.inventory,
        state: HostState::Ready,
        connected: false,
        last_heartbeat: None,
        usage: Default::default(),
        allocated: Default::default(),
        cpu_overcommit: None,
        memory_overcommit: None,
        tunnel_address: None,
        overlay: None,
        created_at: Utc::now(),
    };
    let mut host = host;
    take_tunnel_address(app, &mut host);
    let secret = tokens::new_secret();
    let rec = tokens::host_record(&secret, &host.id);
    if let Err(e) = app.store.create_host(&host, &rec, &token.id).await {
        if let Some(a) = host.tunnel_address {
            app.tunnels.give_back(a);
        }
        return Err(e.into());
    }
    app.hosts.put(&host);
    app.placement.upsert_host(app, &host);
    tracing::info!(host = %host.name, site = %site.name, "host joined");
    Ok(Joined {
        host,
        site: site.name,
        secret,
    })
}

/// The secret of the host's site (see [`crate::keys::site_secret`]), for
/// its image service and its requests to its peers'.
pub async fn site_secret(app: &Ctx, host_id: &str) -> Option<String> {
    let site = app.host(host_id).ok()?.site;
    match app.store.get_site(&site).await {
        Ok(s) => Some(crate::keys::site_secret(&app.site_key, &s.id)),
        Err(e) => {
            tracing::warn!(error = %e, site, "no site secret for the welcome");
            None
        }
    }
}

/// The hosts an evacuation empties: `what` names the host, site or
/// provider in words (`site es-1`), the ids are its hosts'.
pub struct Scope {
    pub what: String,
    pub host_ids: Vec<String>,
}

/// What a [`Scope`] is of.
#[derive(Debug, Clone, Copy)]
pub enum Of {
    Host,
    Site,
    Provider,
}

/// The hosts of host, site or provider `key`.
pub async fn scope(app: &Ctx, of: Of, key: &str) -> ApiResult<Scope> {
    Ok(match of {
        Of::Host => {
            let h = app.store.get_host(key).await?;
            Scope {
                what: format!("host {}", h.name),
                host_ids: vec![h.id],
            }
        }
        Of::Site => {
            let s = site(app, key).await?;
            Scope {
                what: format!("site {}", s.name),
                host_ids: hosts_where(app, |h| h.site == s.name).await?,
            }
        }
        Of::Provider => {
            let p = provider(app, key).await?;
            Scope {
                what: format!("provider {}", p.name),
                host_ids: hosts_where(app, |h| h.provider == p.name).await?,
            }
        }
    })
}

async fn hosts_where(app: &Ctx, keep: impl Fn(&Host) -> bool) -> ApiResult<Vec<String>> {
    Ok(app
        .store
        .list_hosts()
        .await?
        .into_iter()
        .filter(|h| keep(h))
        .map(|h| h.id)
        .collect())
}
