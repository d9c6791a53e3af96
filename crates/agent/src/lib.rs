//! The virt8ra host agent.
//!
//! It dials out to the control plane, keeps its desired state on local disk so
//! VMs survive a lost control plane and a host reboot, and reconciles that
//! state into hypervisor processes through a [`driver::Driver`].

pub mod driver;
