//! Projects' quotas, in memory: read on every VM create, so a create of a
//! project without a quota costs a map lookup and no database read. Loaded
//! from the projects at start-up and written through when one is set.

use std::collections::HashMap;
use std::sync::RwLock;

use virt8ra_api::Quota;

#[derive(Default)]
pub struct Quotas {
    limits: RwLock<HashMap<String, Quota>>,
    /// Held from the check of a project's quota to the durable write of
    /// what it admitted (a VM, an app's replicas, a migration), so
    /// concurrent creates cannot together exceed a quota. Only calls of
    /// projects with a quota take it.
    pub booking: tokio::sync::Mutex<()>,
}

impl Quotas {
    pub fn load(quotas: impl IntoIterator<Item = (String, Quota)>) -> Quotas {
        let q = Quotas::default();
        for (p, quota) in quotas {
            q.set(&p, quota);
        }
        q
    }

    /// Replaces `project`'s quota (an empty one removes it).
    pub fn set(&self, project: &str, quota: Quota) {
        let mut g = self.limits.write().unwrap_or_else(|p| p.into_inner());
        if quota.is_empty() {
            g.remove(project);
        } else {
            g.insert(project.to_string(), quota);
        }
    }

    /// `project`'s quota, if it has one.
    pub fn get(&self, project: &str) -> Option<Quota> {
        self.limits
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(project)
            .cloned()
    }
}
