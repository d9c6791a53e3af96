//! Bytes of image data the control plane served, by who fetched them (a
//! host's id, `admin`, `catalog`): the long-link traffic that site-local
//! distribution is there to save (`GET /api/v1/images/transfers`).
//!
//! Held by the control plane's state, not in a process-wide static, so two
//! control planes in one process count their own.

use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct Transfers {
    by_who: Mutex<BTreeMap<String, u64>>,
}

impl Transfers {
    /// Counts `n` bytes sent to `who`.
    pub fn add(&self, who: &str, n: u64) {
        let mut t = self.by_who.lock().unwrap_or_else(|p| p.into_inner());
        *t.entry(who.to_string()).or_default() += n;
    }

    /// The bytes sent so far, by who fetched them.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.by_who
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_per_fetcher_and_per_registry() {
        let (a, b) = (Transfers::default(), Transfers::default());
        a.add("h1", 10);
        a.add("h1", 5);
        a.add("admin", 1);
        assert_eq!(a.snapshot().get("h1"), Some(&15));
        assert_eq!(a.snapshot().len(), 2);
        assert!(b.snapshot().is_empty(), "two registries shared counts");
    }
}
