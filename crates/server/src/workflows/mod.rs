//! Durable state machines driven by the control plane: each records its
//! phase in the store before it acts, so it resumes after a crash. Each
//! module's documentation draws its states.
//!
//! Workflows call services ([`crate::services`]) and the registry; nothing
//! below imports a workflow.

pub mod evacuation;
pub mod export;
pub mod migration;
pub mod rebalance;
