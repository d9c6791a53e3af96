//! Virtual networks as placement and IPAM need them, in memory.
//!
//! Spans: where each network may reach (countries, providers, sites). A VM
//! with NICs may run only where every one of its networks reaches, so the
//! placement request of such a VM is its own rules narrowed by its
//! networks' spans ([`narrow`]); the request is built in one place
//! ([`crate::registry::placement::LoadedPlacement::request`]), which create,
//! the scheduler, migration, evacuation and rebalance all use, so no move
//! can take a VM outside a network. Networks are immutable, so a span never
//! changes under a VM; the map is loaded at start-up and kept by the
//! networks service (a network's span is in it before the network can be
//! named by a VM, and leaves it only once the network is deleted).
//!
//! IPAM reservations ([`Ipam`]): addresses chosen for VMs being created but
//! not yet written. The store's lease key makes a double lease impossible;
//! this only keeps concurrent creates in this process from choosing the
//! same lowest free address and losing the race one by one.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::RwLock;

use virt8ra_api::{Network, NetworkSpan, PlacementConstraints, Vm};

/// One network's name and span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spanned {
    pub name: String,
    pub span: NetworkSpan,
}

/// The spans of every network, by network id.
#[derive(Debug, Default)]
pub struct NetworkSpans {
    by_id: RwLock<HashMap<String, Spanned>>,
}

impl NetworkSpans {
    /// Replaces the map with `nets` (start-up).
    pub fn load(&self, nets: &[Network]) {
        let mut m = self.by_id.write().unwrap_or_else(|p| p.into_inner());
        m.clear();
        for n in nets {
            m.insert(n.id.clone(), spanned(n));
        }
    }

    pub fn insert(&self, n: &Network) {
        self.by_id
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(n.id.clone(), spanned(n));
    }

    pub fn remove(&self, id: &str) {
        self.by_id
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    pub fn get(&self, id: &str) -> Option<Spanned> {
        self.by_id
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// The networks of a VM's NICs, each once, in NIC order. A NIC on a
    /// network this map does not know is an error (the VM is not placed
    /// rather than placed anywhere).
    pub fn of_vm(&self, vm: &Vm) -> Result<Vec<Spanned>, String> {
        let m = self.by_id.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Spanned> = Vec::new();
        for nic in &vm.status.nics {
            let s = m
                .get(&nic.network_id)
                .ok_or_else(|| format!("network '{}' of NIC {} is unknown", nic.network, nic.id))?;
            if !out.iter().any(|o| o.name == s.name) {
                out.push(s.clone());
            }
        }
        Ok(out)
    }

    /// The VM's own placement rules narrowed by the spans of its NICs'
    /// networks.
    pub fn constraints(&self, vm: &Vm) -> Result<PlacementConstraints, String> {
        let mut c = vm.spec.placement.clone();
        if vm.status.nics.is_empty() {
            return Ok(c);
        }
        for s in self.of_vm(vm)? {
            narrow(&mut c, &s.name, &s.span)?;
        }
        Ok(c)
    }
}

fn spanned(n: &Network) -> Spanned {
    Spanned {
        name: n.name.clone(),
        span: n.span.clone(),
    }
}

/// Narrows placement rules `c` to where network `name` reaches: each
/// non-empty list of the span becomes (or is intersected with) the
/// matching allow-list, less what `c` denies. When nothing is left, or a
/// pin of `c` lies outside the span, the two cannot both hold: an error
/// naming the network.
pub fn narrow(c: &mut PlacementConstraints, name: &str, span: &NetworkSpan) -> Result<(), String> {
    let one = |what: &str,
               pin: &Option<String>,
               allow: &mut Vec<String>,
               deny: &[String],
               reach: &[String]|
     -> Result<(), String> {
        if reach.is_empty() {
            return Ok(());
        }
        let reach_text = reach.join(", ");
        if let Some(p) = pin {
            if !reach.contains(p) {
                return Err(format!(
                    "network '{name}' reaches only {what} {reach_text}, but the VM's placement is pinned to {p}"
                ));
            }
        }
        let mut next: Vec<String> = if allow.is_empty() {
            reach.to_vec()
        } else {
            allow
                .iter()
                .filter(|a| reach.contains(a))
                .cloned()
                .collect()
        };
        if next.is_empty() {
            return Err(format!(
                "network '{name}' reaches only {what} {reach_text}, none of the VM's allowed {what} {}",
                allow.join(", ")
            ));
        }
        next.retain(|x| !deny.contains(x));
        if next.is_empty() {
            return Err(format!(
                "network '{name}' reaches only {what} {reach_text}, all of which the VM's placement denies"
            ));
        }
        *allow = next;
        Ok(())
    };
    one(
        "countries",
        &c.country,
        &mut c.countries,
        &c.deny_countries,
        &span.countries,
    )?;
    one(
        "providers",
        &c.provider,
        &mut c.providers,
        &c.deny_providers,
        &span.providers,
    )?;
    one("sites", &c.site, &mut c.sites, &c.deny_sites, &span.sites)
}

/// Whether a span reaches a site (named, at `provider`, in `country`).
pub fn span_reaches(span: &NetworkSpan, site: &str, provider: &str, country: &str) -> bool {
    (span.sites.is_empty() || span.sites.iter().any(|s| s == site))
        && (span.providers.is_empty() || span.providers.iter().any(|p| p == provider))
        && (span.countries.is_empty() || span.countries.iter().any(|c| c == country))
}

/// Addresses chosen for NICs of VMs being created, by network id, until
/// their VM is written (or fails to be).
#[derive(Debug, Default)]
pub struct Ipam {
    /// Held while a create reads the leases and picks: a pick sees every
    /// address either leased (written) or reserved here.
    pub pick: tokio::sync::Mutex<()>,
    reserved: std::sync::Mutex<HashMap<String, BTreeSet<Ipv4Addr>>>,
}

impl Ipam {
    /// The addresses reserved on `network`.
    pub fn reserved(&self, network: &str) -> BTreeSet<Ipv4Addr> {
        self.reserved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(network)
            .cloned()
            .unwrap_or_default()
    }

    pub fn reserve(&self, network: &str, ip: Ipv4Addr) {
        self.reserved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(network.to_string())
            .or_default()
            .insert(ip);
    }

    pub fn release(&self, network: &str, ip: Ipv4Addr) {
        let mut m = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = m.get_mut(network) {
            s.remove(&ip);
            if s.is_empty() {
                m.remove(network);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(countries: &[&str], providers: &[&str], sites: &[&str]) -> NetworkSpan {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect();
        NetworkSpan {
            countries: v(countries),
            providers: v(providers),
            sites: v(sites),
        }
    }

    #[test]
    fn a_span_narrows_the_allow_lists() {
        let mut c = PlacementConstraints {
            countries: vec!["DE".into(), "PL".into(), "FR".into()],
            deny_countries: vec!["FR".into()],
            ..Default::default()
        };
        narrow(&mut c, "n", &span(&["DE", "FR"], &[], &[])).unwrap();
        assert_eq!(c.countries, vec!["DE"]);
        narrow(&mut c, "m", &span(&[], &["p1"], &["s1", "s2"])).unwrap();
        assert_eq!(c.providers, vec!["p1"]);
        assert_eq!(c.sites, vec!["s1", "s2"]);
        // An empty span changes nothing.
        let before = c.clone();
        narrow(&mut c, "any", &NetworkSpan::default()).unwrap();
        assert_eq!(c, before);
    }

    #[test]
    fn rules_and_spans_that_cannot_both_hold_name_the_network() {
        let mut c = PlacementConstraints {
            country: Some("DE".into()),
            ..Default::default()
        };
        let e = narrow(&mut c, "net-fr", &span(&["FR"], &[], &[])).unwrap_err();
        assert!(
            e.contains("network 'net-fr'") && e.contains("pinned to DE"),
            "{e}"
        );
        let mut c = PlacementConstraints {
            sites: vec!["a".into()],
            ..Default::default()
        };
        let e = narrow(&mut c, "n", &span(&[], &[], &["b"])).unwrap_err();
        assert!(e.contains("network 'n' reaches only sites b"), "{e}");
        let mut c = PlacementConstraints {
            deny_providers: vec!["p".into()],
            ..Default::default()
        };
        let e = narrow(&mut c, "n", &span(&[], &["p"], &[])).unwrap_err();
        assert!(e.contains("denies"), "{e}");
        // Two networks whose spans do not meet.
        let mut c = PlacementConstraints::default();
        narrow(&mut c, "fr", &span(&["FR"], &[], &[])).unwrap();
        let e = narrow(&mut c, "de", &span(&["DE"], &[], &[])).unwrap_err();
        assert!(e.contains("network 'de'"), "{e}");
    }

    #[test]
    fn reach_and_words() {
        let s = span(&["DE"], &[], &["de-a"]);
        assert!(span_reaches(&s, "de-a", "p", "DE"));
        assert!(!span_reaches(&s, "de-b", "p", "DE"));
        assert!(!span_reaches(&s, "de-a", "p", "FR"));
        assert_eq!(s.describe(), "countries DE; sites de-a");
        assert_eq!(NetworkSpan::default().describe(), "anywhere");
    }
}
