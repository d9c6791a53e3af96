//! In-memory state of the control plane that knows nothing of HTTP or of
//! the services above it: the agent hub, the VM and host indexes, the
//! loaded placement engine, networks' spans and IPAM reservations,
//! migrations in flight, relays, marks, the locks of staged disk files,
//! the image bytes served, the cached view of site-local image
//! distribution, and the Prometheus counters and histograms.
//!
//! Everything here is rebuilt from the store and from the agents after a
//! restart; nothing here imports `services`, `workflows` or `http`.

pub mod distribution;
pub mod hub;
pub mod index;
pub mod marks;
pub mod metrics;
pub mod migrations;
pub mod netplane;
pub mod networks;
pub mod overlay;
pub mod placement;
pub mod quotas;
pub mod relays;
pub mod staging;
pub mod transfers;
pub mod tunnels;
