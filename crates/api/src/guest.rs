//! What a guest is told about itself at boot, besides its name and user
//! data: the SSH keys to accept and how to configure its network.
//!
//! The network configuration is a documented subset of cloud-init's
//! network-config version 2 (the netplan format): the same field names and
//! meanings, for Ethernet interfaces only. The one difference in shape is
//! that `ethernets` is a list instead of a map keyed by an id, so an entry
//! that names no interface can mean "the VM's first NIC"; the agent writes it
//! to the guest as a standard version 2 document (`network-config` on the
//! NoCloud seed) with the id and match filled in, so stock cloud images
//! (Debian and Ubuntu genericcloud) honour it as well as the test appliance.
//!
//! ```yaml
//! network:
//!   ethernets:
//!     - addresses: [10.0.2.15/24, 10.0.2.77/24]   # no match: the first NIC
//!       gateway4: 10.0.2.2
//!       nameservers: {addresses: [10.0.2.3], search: [example.test]}
//!       mtu: 1500
//!     - match: {name: eth1}                         # or {macaddress: "52:54:00:12:34:57"}
//!       dhcp4: true
//! ```
//!
//! Validation (limits, address syntax) is in [`crate::validate::network`].

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A VM's network configuration: a subset of cloud-init network-config
/// version 2 with `ethernets` as a list. Without it the guest uses its
/// image's default (the test appliance: 10.0.2.15/24 via 10.0.2.2, which is
/// where QEMU's user-mode networking forwards ports to).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// One entry per interface to configure (1 to 8).
    pub ethernets: Vec<EthernetConfig>,
}

/// One interface's configuration (cloud-init v2 `ethernets` entry).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EthernetConfig {
    /// Which interface: by name, by MAC address, or both (both must match).
    /// Absent: the VM's first NIC (written to the guest as a match on its
    /// MAC address). At most one entry may leave it out.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub match_: Option<InterfaceMatch>,
    /// Ask for an IPv4 address by DHCP.
    #[serde(default, skip_serializing_if = "is_false")]
    pub dhcp4: bool,
    /// Static addresses in CIDR notation, e.g. `10.0.2.15/24` or
    /// `fd00::5/64` (at most 16).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// IPv4 default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway4: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nameservers: Option<Nameservers>,
    /// Interface MTU in bytes (68 to 65535).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// How an entry finds its interface (cloud-init v2 `match`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InterfaceMatch {
    /// The interface's name in the guest, e.g. `eth0` (no wildcards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The interface's MAC address, e.g. `52:54:00:12:34:56`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macaddress: Option<String>,
}

/// DNS settings (cloud-init v2 `nameservers`): the guest's resolv.conf.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Nameservers {
    /// Name server addresses (at most 3, the resolver's limit).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Search domains (at most 6).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}
