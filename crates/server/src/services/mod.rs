//! The control plane's rules and its store calls, one module per concern:
//! placement and scheduling, the desired state sent to agents, agents'
//! reports, VMs, virtual networks and IPAM, images (ingest and
//! distribution), the marketplace's catalogs and apps.
//!
//! No HTTP types here: the HTTP layer ([`crate::http`]) and the workflows
//! ([`crate::workflows`]) call these functions; they call the registry
//! ([`crate::registry`]), the state and the store.

pub mod access;
pub mod apps;
pub mod audit;
pub mod catalog;
pub mod desired;
pub mod distribution;
pub mod images;
pub mod migrations;
pub mod netplane;
pub mod networks;
pub mod overlay;
pub mod placement;
pub mod quotas;
pub mod reports;
pub mod scheduler;
pub mod staging;
pub mod tenancy;
pub mod tokens;
pub mod topology;
pub mod tunnels;
pub mod uploads;
pub mod usage;
pub mod vms;
