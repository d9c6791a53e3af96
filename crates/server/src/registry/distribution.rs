//! The cached view of site-local image distribution (which hosts serve
//! images at each site, which images are replicated where), built by
//! `services::distribution` and kept here between scheduler passes.
//!
//! Held by the control plane's state, not in a process-wide static: two
//! control planes in one process (the in-process tests) must not serve
//! each other's hosts a view of the wrong topology.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virt8ra_api::protocol::ImageRef;

/// Site-local distribution, as the scheduler reads it for each host.
#[derive(Default)]
pub struct View {
    /// host id -> site name
    pub site_of: HashMap<String, String>,
    /// site -> image services (host name, host id, URL), by host name
    pub services: HashMap<String, Vec<(String, String, String)>>,
    /// site -> images replicated there
    pub prestage: HashMap<String, Vec<ImageRef>>,
}

struct Cached {
    at: Instant,
    /// The host index's version the view was built from.
    hosts_version: u64,
    view: Arc<View>,
}

/// The last view built, if any.
#[derive(Default)]
pub struct ViewCache {
    slot: Mutex<Option<Cached>>,
}

impl ViewCache {
    /// The cached view, if it was built from host index `version` or is
    /// younger than `ttl`.
    pub fn get(&self, version: u64, ttl: Duration) -> Option<Arc<View>> {
        let g = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        let c = g.as_ref()?;
        (c.hosts_version == version || c.at.elapsed() < ttl).then(|| c.view.clone())
    }

    /// Keeps `view`, built from host index `version`.
    pub fn put(&self, version: u64, view: Arc<View>) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Cached {
            at: Instant::now(),
            hosts_version: version,
            view,
        });
    }

    /// Forgets the cached view (after a replicate or an image change).
    pub fn invalidate(&self) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_is_kept_per_cache_until_invalidated_or_stale() {
        let (a, b) = (ViewCache::default(), ViewCache::default());
        let ttl = Duration::from_secs(1);
        assert!(a.get(1, ttl).is_none());
        a.put(1, Arc::new(View::default()));
        assert!(a.get(1, ttl).is_some());
        assert!(a.get(2, ttl).is_some(), "younger than the ttl");
        assert!(a.get(2, Duration::ZERO).is_none(), "another version, stale");
        assert!(b.get(1, ttl).is_none(), "two caches shared a view");
        a.invalidate();
        assert!(a.get(1, ttl).is_none());
    }
}
