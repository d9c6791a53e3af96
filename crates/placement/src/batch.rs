//! Batch placement: N replicas placed as one decision, all or nothing,
//! optionally spread over at least N distinct providers or countries.
//!
//! Replicas are placed one after another on the live engine; the first
//! `min` replicas exclude the providers (or countries) the earlier ones took,
//! which guarantees the spread. If any replica cannot be placed, every
//! allocation of the batch is released and the engine is as it was.

use std::collections::BTreeSet;

use virt8ra_api::Level;

use crate::engine::{Decision, Engine, Unplaceable};
use crate::rules::Request;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spread {
    /// `Provider` or `Country` (or `Site`, `Host`).
    pub level: Level,
    /// At least this many distinct values among the replicas.
    pub min: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BatchError {
    /// Index of the replica that could not be placed.
    pub replica: usize,
    pub why: Unplaceable,
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "replica {} cannot be placed: {}",
            self.replica + 1,
            self.why
        )
    }
}

fn value(d: &Decision, level: Level) -> String {
    match level {
        Level::Host => d.host.clone(),
        Level::Site => d.site.clone(),
        Level::Provider => d.provider.clone(),
        Level::Country => d.country.clone(),
    }
}

impl Engine {
    /// Places every `(vm id, request)` or none; on success the VMs are
    /// committed.
    pub fn place_batch(
        &mut self,
        replicas: &[(String, Request)],
        spread: Option<Spread>,
    ) -> Result<Vec<Decision>, BatchError> {
        let mut done: Vec<(String, Decision)> = Vec::new();
        let mut used: BTreeSet<String> = BTreeSet::new();
        for (i, (vm, req)) in replicas.iter().enumerate() {
            let mut r = req.clone();
            if let Some(s) = spread {
                if used.len() < s.min {
                    let excl: Vec<String> = used.iter().cloned().collect();
                    match s.level {
                        Level::Provider => r.c.deny_providers.extend(excl),
                        Level::Country => r.c.deny_countries.extend(excl),
                        Level::Site => r.c.deny_sites.extend(excl),
                        Level::Host => {}
                    }
                }
            }
            let placed = self.place(&r).and_then(|d| {
                // Host-level spread: exclude hosts already used by the batch.
                if spread.is_some_and(|s| s.level == Level::Host && used.len() < s.min)
                    && used.contains(&d.host)
                {
                    return Err(self.explain(&r));
                }
                Ok(d)
            });
            match placed {
                Ok(d) => {
                    if let Err(e) = self.commit(vm, &d.host, req) {
                        // The engine chose this host a moment ago; treat it as a bug.
                        for (v, _) in &done {
                            self.release(v);
                        }
                        let why = self.explain(req);
                        let _ = e;
                        return Err(BatchError { replica: i, why });
                    }
                    if let Some(s) = spread {
                        used.insert(value(&d, s.level));
                    }
                    done.push((vm.clone(), d));
                }
                Err(why) => {
                    for (v, _) in &done {
                        self.release(v);
                    }
                    return Err(BatchError { replica: i, why });
                }
            }
        }
        if let Some(s) = spread {
            if used.len() < s.min.min(replicas.len()) {
                for (v, _) in &done {
                    self.release(v);
                }
                let why = self.explain(&replicas[0].1);
                return Err(BatchError {
                    replica: replicas.len().saturating_sub(1),
                    why,
                });
            }
        }
        Ok(done.into_iter().map(|(_, d)| d).collect())
    }
}
