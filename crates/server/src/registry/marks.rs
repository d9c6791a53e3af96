//! Which hosts' desired state may have changed since the scheduler's last
//! pass, and which of their VMs: the scheduler then sends each marked host
//! only what changed.

/// What changed on a marked host.
#[derive(Debug, Clone, PartialEq)]
pub enum Marks {
    /// Anything: recompute the host's whole desired state.
    All,
    /// These VMs (by id) only.
    Vms(std::collections::HashSet<String>),
}
