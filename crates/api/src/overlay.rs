//! How hosts reach each other over the virtual networks' overlay (issue
//! 27, item 3), as the API shows it: directly at a host's address, or
//! through a relay for a host that no other host can reach (behind NAT).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How the other hosts reach a host's overlay traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reachability {
    /// At its own address (`--address`): plain VXLAN within its site,
    /// its tunnel between sites.
    Direct,
    /// It has no address other hosts reach it at: its traffic goes
    /// through its tunnel to a relay (`relayed_via`).
    Relayed,
    /// It has no address and no relay (no tunnel, or no reachable host
    /// with one is up): its networks reach its own guests only.
    Isolated,
}

/// A host's place in the overlay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostOverlay {
    /// Its address inside the encrypted tunnels, if it has a tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Ipv4)]
    pub tunnel_address: Option<std::net::Ipv4Addr>,
    pub reachable: Reachability,
    /// The host that relays its traffic (name), when `relayed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relayed_via: Option<String>,
}

/// A host that carries a network, and how the others reach it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkHost {
    /// The host's name.
    pub host: String,
    pub site: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Ipv4)]
    pub tunnel_address: Option<std::net::Ipv4Addr>,
    pub reachable: Reachability,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relayed_via: Option<String>,
}
