//! Site-local image distribution.
//!
//! Each site's image cache host is the first (by name) ready, connected host
//! of the site whose agent runs an image service. Every other host of the
//! site is told to fetch images from it first ([`ImageRef::sources`]); it
//! fetches them itself, once, from the control plane (the long link), and
//! serves its copy to the rest of the site. If it is down, hosts fall back to
//! the control plane. Images replicated to a site (`image replicate`) are
//! sent to its cache host as `prestage` so they are there before any VM
//! needs them.
//!
//! The view of hosts and replicated images is built from the in-memory
//! host index and the store's image catalogue (cached in memory), shared
//! behind an `Arc`, and rebuilt at most once a second and only when a host
//! changed (the index's version) or an image was replicated (`invalidate`),
//! so a scheduler pass over many hosts costs one lookup per host, not a scan.
//! The cache is the control plane's (`registry::distribution`).

use std::sync::Arc;
use std::time::Duration;

use virt8ra_api::protocol::ImageRef;
use virt8ra_api::HostState;

use crate::error::ApiResult;
use crate::registry::distribution::View;
use crate::state::Ctx;

const TTL: Duration = Duration::from_secs(1);

/// Forgets the cached view (after a replicate or an image change).
pub fn invalidate(app: &Ctx) {
    app.distribution.invalidate();
}

async fn view(app: &Ctx) -> ApiResult<Arc<View>> {
    let version = app.hosts.version();
    if let Some(v) = app.distribution.get(version, TTL) {
        return Ok(v);
    }
    let mut v = View::default();
    for h in app.hosts.all() {
        if let Some(url) = &h.inventory.image_service {
            if h.state == HostState::Ready {
                v.services.entry(h.site.clone()).or_default().push((
                    h.name.clone(),
                    h.id.clone(),
                    url.clone(),
                ));
            }
        }
        v.site_of.insert(h.id.clone(), h.site.clone());
    }
    for list in v.services.values_mut() {
        list.sort();
    }
    for i in app.store.list_images().await? {
        for s in &i.sites {
            v.prestage.entry(s.clone()).or_default().push(image_ref(&i));
        }
    }
    let view = Arc::new(v);
    app.distribution.put(version, view.clone());
    Ok(view)
}

pub fn image_ref(i: &virt8ra_api::Image) -> ImageRef {
    ImageRef {
        url_path: format!("/api/v1/images/{}/data", i.id),
        id: i.id.clone(),
        name: i.name.clone(),
        sha256: i.sha256.clone(),
        size_bytes: i.size_bytes,
        sources: vec![],
    }
}

/// What a host is told about images: the site-local sources to try before
/// the control plane, and the images to pre-stage.
pub struct HostPlan {
    pub sources: Vec<String>,
    pub prestage: Vec<ImageRef>,
}

pub async fn plan_for(app: &Ctx, host_id: &str) -> ApiResult<HostPlan> {
    let v = view(app).await?;
    let mut plan = HostPlan {
        sources: vec![],
        prestage: vec![],
    };
    // A host that joined since the view was built is looked up directly.
    let site = match v.site_of.get(host_id) {
        Some(s) => s.clone(),
        None => match app.hosts.get(host_id) {
            Some(h) => h.site.clone(),
            None => return Ok(plan),
        },
    };
    let site = &site;
    let cache_host = v.services.get(site).and_then(|list| {
        list.iter().find(|(_, id, _)| {
            app.hub
                .view(id, app.liveness_window())
                .is_some_and(|l| l.alive)
        })
    });
    match cache_host {
        Some((_, id, _)) if id == host_id => {
            plan.prestage = v.prestage.get(site).cloned().unwrap_or_default();
        }
        Some((_, _, url)) => plan.sources.push(url.clone()),
        None => {}
    }
    Ok(plan)
}
