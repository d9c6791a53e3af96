//! The virt8ra placement engine.
//!
//! Pure (no I/O): the control plane hands it sites and hosts, asks where a
//! VM should run, and records what it decided. Where a workload runs is the
//! product in a sovereign multi-provider continuum, so residency, latency,
//! host features, capacity and affinity are hard rules that no operation may
//! break, and every decision explains itself: why this host, or, when
//! nothing fits, how many hosts each rule excluded.
//!
//! - [`rules`]: the hard rules, their validation and the checks.
//! - [`geo`]: distances and the latency model.
//! - [`engine`]: indexes and the decision procedure.
//! - [`batch`]: N replicas as one all-or-nothing decision, with spread.
//! - [`rebalance`]: a planner of moves that keep every rule.
//! - [`bench`]: the example topology and the benchmark.

pub mod batch;
pub mod bench;
pub mod engine;
pub mod geo;
pub mod model;
pub mod rebalance;
pub mod rules;

pub use engine::{Decision, Engine, Unplaceable};
pub use model::{HostInfo, Resources, SiteInfo};
pub use rules::{Request, Rule, Weights};
