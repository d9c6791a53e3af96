//! What the network plane remembers between passes (issue 27): which
//! networks each host was last computed to carry and at which underlay
//! address, the hosts whose network state must be computed again, and the
//! last generation sent to each host.
//!
//! In memory only: after a restart of the control plane every host's
//! state is computed again when its agent connects (the agent says in its
//! hello whether it carries networks), and generations start from the
//! clock, so they still increase. `services::netplane` computes and sends;
//! this holds no rule.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// What one host was last computed to carry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Carried {
    pub networks: BTreeSet<String>,
    /// Its underlay address then (`None`: it had none).
    pub underlay: Option<Ipv4Addr>,
    /// Its tunnel's public key then: a new key (the agent's data was
    /// wiped) must reach its peers like a new address.
    pub tunnel_key: Option<String>,
}

#[derive(Default)]
pub struct NetPlane {
    carried: Mutex<HashMap<String, Carried>>,
    dirty: Mutex<HashSet<String>>,
    /// Set with every host marked, so that a pass with nothing to do (no
    /// network anywhere: the common case) takes no lock.
    any_dirty: AtomicBool,
    generations: Mutex<HashMap<String, u64>>,
    /// The relays of hosts behind NAT.
    pub relays: crate::registry::overlay::OverlayRelays,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update is a single insert or remove: a panic cannot leave the
    // maps half-changed.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl NetPlane {
    /// Notes that `host`'s network state must be computed again.
    pub fn mark(&self, host: &str) {
        lock(&self.dirty).insert(host.to_string());
        self.any_dirty.store(true, Ordering::Release);
    }

    /// The hosts marked since the last call.
    pub fn take_marked(&self) -> Vec<String> {
        if !self.any_dirty.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        lock(&self.dirty).drain().collect()
    }

    /// What `host` was last computed to carry.
    pub fn carried(&self, host: &str) -> Option<Carried> {
        lock(&self.carried).get(host).cloned()
    }

    /// Records what `host` carries now (nothing: forgotten).
    pub fn set_carried(&self, host: &str, c: Carried) {
        let mut m = lock(&self.carried);
        if c.networks.is_empty() {
            m.remove(host);
        } else {
            m.insert(host.to_string(), c);
        }
    }

    /// The hosts last computed to carry any of `networks`.
    pub fn hosts_carrying(&self, networks: &BTreeSet<String>) -> Vec<String> {
        lock(&self.carried)
            .iter()
            .filter(|(_, c)| !c.networks.is_disjoint(networks))
            .map(|(h, _)| h.clone())
            .collect()
    }

    /// The next generation for `host`: above the last one sent to it and
    /// at least the clock in microseconds, so that it increases across
    /// restarts of the control plane too.
    pub fn next_generation(&self, host: &str) -> u64 {
        let now = chrono::Utc::now().timestamp_micros().max(0) as u64;
        let mut m = lock(&self.generations);
        let g = m.get(host).map_or(now, |last| now.max(last + 1));
        m.insert(host.to_string(), g);
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_increase_even_when_the_clock_does_not() {
        let p = NetPlane::default();
        let a = p.next_generation("h");
        let b = p.next_generation("h");
        assert!(b > a);
        assert!(a >= 1_700_000_000_000_000, "from the clock: {a}");
        // Another host has its own sequence.
        assert!(p.next_generation("other") >= a);
    }

    #[test]
    fn marks_are_taken_once_and_carried_hosts_are_found_by_network() {
        let p = NetPlane::default();
        assert!(p.take_marked().is_empty());
        p.mark("a");
        p.mark("a");
        assert_eq!(p.take_marked(), vec!["a".to_string()]);
        assert!(p.take_marked().is_empty());
        let nets = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        p.set_carried(
            "a",
            Carried {
                networks: nets(&["n1"]),
                underlay: None,
                tunnel_key: None,
            },
        );
        p.set_carried(
            "b",
            Carried {
                networks: nets(&["n2"]),
                underlay: None,
                tunnel_key: None,
            },
        );
        assert_eq!(p.hosts_carrying(&nets(&["n1", "n3"])), vec!["a"]);
        p.set_carried("a", Carried::default());
        assert!(p.carried("a").is_none());
        assert!(p.hosts_carrying(&nets(&["n1"])).is_empty());
    }
}
