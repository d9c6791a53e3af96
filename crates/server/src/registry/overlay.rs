//! Which host relays the overlay traffic of each host behind NAT (issue
//! 27, item 3), in memory.
//!
//! The choice is a pure rule (`services::tunnels::choose_relay`) over the
//! hosts' places and liveness; it is kept here so that every host's
//! network state is computed with the same choice, and so that a change
//! (the relay went down, was deleted, lost its address) is noticed once
//! and sent to the hosts it concerns. After a restart of the control
//! plane the choices are made again as hosts' states are computed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Instant;

#[derive(Default)]
pub struct OverlayRelays {
    /// Host behind NAT (id) -> its relay (id), or `None`: none can be.
    chosen: Mutex<BTreeMap<String, Option<String>>>,
    /// Relays that were sent a relay's tunnel: each is sent its state
    /// again when it stops relaying, also if it carries no network.
    served: Mutex<BTreeSet<String>>,
    /// When the choices were last made again, and at which version of
    /// the hosts.
    checked: Mutex<Option<(u64, Instant)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update is a single insert or remove.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl OverlayRelays {
    /// The relay chosen for `host`: `None` if no choice was made yet,
    /// `Some(None)` if there is none.
    pub fn get(&self, host: &str) -> Option<Option<String>> {
        lock(&self.chosen).get(host).cloned()
    }

    /// Records the choice for `host`; the one it replaces, if different
    /// (`Some(old)`), or `None` if it is the same.
    pub fn set(&self, host: &str, relay: Option<String>) -> Option<Option<String>> {
        let mut m = lock(&self.chosen);
        match m.insert(host.to_string(), relay.clone()) {
            Some(old) if old == relay => None,
            Some(old) => Some(old),
            None => Some(None),
        }
    }

    /// Forgets `host` (deleted, or it has an address now); its relay.
    pub fn remove(&self, host: &str) -> Option<String> {
        lock(&self.chosen).remove(host).flatten()
    }

    /// Every host behind NAT with a choice made.
    pub fn hosts(&self) -> Vec<String> {
        lock(&self.chosen).keys().cloned().collect()
    }

    /// The hosts `relay` relays for.
    pub fn clients_of(&self, relay: &str) -> Vec<String> {
        lock(&self.chosen)
            .iter()
            .filter(|(_, r)| r.as_deref() == Some(relay))
            .map(|(h, _)| h.clone())
            .collect()
    }

    /// Notes whether `relay` was sent a relay's tunnel; whether it was
    /// before.
    pub fn set_served(&self, relay: &str, serves: bool) -> bool {
        let mut s = lock(&self.served);
        if serves {
            !s.insert(relay.to_string())
        } else {
            s.remove(relay)
        }
    }

    /// Whether the choices are due to be made again: `now` (a relay
    /// went), the hosts changed since (`version`) and `gap` passed (so
    /// that joins in bulk cost one choice per `gap`, not one per join),
    /// or `every` passed (liveness changes without a write). Records it.
    pub fn due(
        &self,
        now: bool,
        version: u64,
        gap: std::time::Duration,
        every: std::time::Duration,
    ) -> bool {
        let mut c = lock(&self.checked);
        let due = now
            || c.is_none_or(|(v, at)| {
                let e = at.elapsed();
                (v != version && e >= gap) || e >= every
            });
        if due {
            *c = Some((version, Instant::now()));
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_are_recorded_and_changes_reported() {
        let r = OverlayRelays::default();
        assert_eq!(r.get("n"), None);
        assert_eq!(r.set("n", Some("a".into())), Some(None));
        assert_eq!(r.set("n", Some("a".into())), None, "the same: no change");
        assert_eq!(r.set("m", Some("a".into())), Some(None));
        assert_eq!(r.clients_of("a"), vec!["m".to_string(), "n".to_string()]);
        assert_eq!(r.set("n", None), Some(Some("a".into())));
        assert_eq!(r.get("n"), Some(None));
        assert_eq!(r.remove("m"), Some("a".into()));
        assert!(r.clients_of("a").is_empty());
        assert!(!r.set_served("a", true));
        assert!(r.set_served("a", true));
        assert!(r.set_served("a", false));
        let (zero, hour) = (
            std::time::Duration::ZERO,
            std::time::Duration::from_secs(3600),
        );
        assert!(r.due(false, 1, zero, hour), "the first time");
        assert!(!r.due(false, 1, zero, hour));
        assert!(r.due(false, 2, zero, hour), "the hosts changed");
        assert!(!r.due(false, 3, hour, hour), "changed, but too soon");
        assert!(r.due(true, 3, hour, hour), "a relay went");
    }
}
