//! Virtual networks (issue 27): a network's definition, a VM's NIC, and the
//! network state the control plane wants on one host.
//!
//! The agent turns a [`HostNetworkState`] into Linux devices (a bridge per
//! network, a VXLAN device with head-end replication to the other hosts that
//! carry it, a tap per local NIC, DHCP and outbound NAT). The state is
//! declarative and complete, like the VMs of the agent protocol: whatever is
//! not in it is removed. It lives here, beside the agent protocol, so the
//! control plane (which will compute it per host) and the agent (which
//! applies it) share one definition and one validation.
//!
//! Also here, because both sides need them and they must agree bit for bit:
//! the IPAM rule ([`allocate_ip`]: the lowest free address, or the one asked
//! for), the MAC a NIC gets ([`mac_for_nic`]) and the names of the devices
//! ([`device_names`]): Linux limits interface names to 15 bytes, so a
//! network's devices are named after a hash of its id, with a `v8` prefix
//! that marks them as virt8ra's (the agent removes only devices with it).
//!
//! Addresses are IPv4 for now. Fields for later steps (a peer's public key
//! for encryption, a network's span) can be added with `serde(default)`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The UDP port of VXLAN (IANA).
pub const VXLAN_PORT: u16 = 4789;
/// Largest VXLAN network identifier (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// The MTU a network gets when none is given: 1500 less VXLAN's 50 bytes
/// of outer headers and the tunnel's 60 ([`TUNNEL_OVERHEAD`]), so an
/// overlay frame fits a standard underlay also between sites, where it
/// travels encrypted.
pub const DEFAULT_MTU: u32 = 1390;
pub const MIN_MTU: u32 = 576;
pub const MAX_MTU: u32 = 9000;
/// Prefix of every network device the agent creates. Bridges are
/// `v8b-HASH`, VXLAN devices `v8x-HASH`, taps `v8t-HASH` (HASH: 10 hex
/// digits, so each name has 14 bytes, under Linux's 15).
pub const DEVICE_PREFIX: &str = "v8";
pub const TAP_PREFIX: &str = "v8t-";
const HASH_DIGITS: usize = 10;

/// An IPv4 network in CIDR notation, e.g. `10.0.0.0/24`. Parsing refuses
/// host bits (`10.0.0.1/24`): a network is named by its first address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// A network from its first address and prefix length (0-32).
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Ipv4Cidr, String> {
        if prefix > 32 {
            return Err(format!("prefix length /{prefix} is over 32"));
        }
        let c = Ipv4Cidr { addr, prefix };
        if c.network() != addr {
            return Err(format!(
                "{addr}/{prefix} has host bits set: the network is {}/{prefix}",
                c.network()
            ));
        }
        Ok(c)
    }

    /// The network of `prefix` bits that holds `addr` (host bits cleared).
    pub fn containing(addr: Ipv4Addr, prefix: u8) -> Result<Ipv4Cidr, String> {
        if prefix > 32 {
            return Err(format!("prefix length /{prefix} is over 32"));
        }
        Ok(Ipv4Cidr { addr, prefix }.first())
    }

    fn first(self) -> Ipv4Cidr {
        Ipv4Cidr {
            addr: self.network(),
            prefix: self.prefix,
        }
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// The first address (the network's own).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// The last address (broadcast).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }

    /// The netmask, e.g. 255.255.255.0 for /24.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }

    /// Whether the two networks share an address.
    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.contains(other.network()) || other.contains(self.network())
    }

    /// Whether `ip` may be given to a NIC: inside the network, and neither
    /// its network nor its broadcast address.
    pub fn is_host(&self, ip: Ipv4Addr) -> bool {
        self.contains(ip) && (self.prefix >= 31 || (ip != self.network() && ip != self.broadcast()))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = s.split_once('/').ok_or_else(|| {
            format!("invalid CIDR {s:?}: expected ADDRESS/PREFIX, e.g. 10.0.0.0/24")
        })?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("invalid CIDR {s:?}: {a:?} is not an IPv4 address"))?;
        let prefix: u8 = Some(p)
            .filter(|p| (1..=2).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse().ok())
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("invalid CIDR {s:?}: prefix {p:?} is not 0-32"))?;
        Ipv4Cidr::new(addr, prefix).map_err(|e| format!("invalid CIDR {s:?}: {e}"))
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An Ethernet MAC address, written `52:54:00:ab:cd:ef` (lower case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A unicast address (the group bit clear) that is not all zeros.
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("invalid MAC address {s:?}: expected six hex bytes, e.g. 52:54:00:12:34:56");
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// FNV-1a, 64 bits: a stable hash for names and MACs (the same on every
/// host and in every version, unlike std's hasher).
pub fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn hash_name(prefix: &str, id: &str) -> String {
    let h = format!("{:016x}", stable_hash(id));
    format!("{prefix}{}", &h[..HASH_DIGITS])
}

/// The MAC of NIC `nic_id`: locally administered unicast (`02:` ... the
/// first byte's bits 0b10), the rest from a hash of the id, so it is the
/// same wherever the NIC's VM runs (migration keeps it).
pub fn mac_for_nic(nic_id: &str) -> MacAddr {
    let h = stable_hash(nic_id).to_be_bytes();
    MacAddr([0x02, h[0], h[1], h[2], h[3], h[4]])
}

/// The tap device of NIC `nic_id`.
pub fn tap_name(nic_id: &str) -> String {
    hash_name(TAP_PREFIX, nic_id)
}

/// The devices of one network on a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNames {
    pub bridge: String,
    pub vxlan: String,
}

/// The names of network `network_id`'s devices.
pub fn device_names(network_id: &str) -> DeviceNames {
    DeviceNames {
        bridge: hash_name("v8b-", network_id),
        vxlan: hash_name("v8x-", network_id),
    }
}

/// The MAC of a network's gateway: the same on every host that carries
/// the network (an anycast gateway: each host answers for it locally, and
/// a guest that moves keeps the gateway's address in its ARP cache).
pub fn gateway_mac(network_id: &str) -> MacAddr {
    let h = stable_hash(&format!("gateway:{network_id}")).to_be_bytes();
    MacAddr([0x06, h[0], h[1], h[2], h[3], h[4]])
}

/// A virtual network: a private L2 segment with an IPv4 subnet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    pub id: String,
    pub name: String,
    pub cidr: Ipv4Cidr,
    /// The guests' default gateway, answered by every host carrying the
    /// network (which also serves DHCP and NATs outbound traffic there).
    /// `None`: a plain L2 segment; the hosts take no part in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// Name servers handed out by DHCP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<Ipv4Addr>,
    /// VXLAN network identifier, 1 to 2^24-1, unique per network.
    pub vni: u32,
    /// The guests' MTU; the underlay needs 50 bytes more.
    #[serde(default = "default_mtu")]
    pub mtu: u32,
}

fn default_mtu() -> u32 {
    DEFAULT_MTU
}

/// A NIC of a VM: the network it is on, its MAC and its address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    pub id: String,
    /// The network's id.
    pub network: String,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    pub prefix: u8,
}

/// A NIC of a VM on this host, as the host's network state names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalNic {
    pub id: String,
    /// The VM it belongs to.
    pub vm: String,
    /// Its tap device (`v8t-...`, see [`tap_name`]).
    pub tap: String,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    /// Its security group: what may reach it. None: what comes from the
    /// network's own subnet. Replies to its own connections and its
    /// published ports always pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<IngressRule>>,
    /// Its ports the host publishes on its own address (the network needs
    /// a gateway: the host routes to the guest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<PublishedPort>,
}

/// Another host that carries the network: where its VXLAN traffic goes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub host: String,
    /// Its underlay address (the address other hosts reach it at).
    pub underlay: Ipv4Addr,
}

/// A remote NIC's MAC and the underlay address of the host it is on: the
/// VXLAN device sends frames for the MAC there (and floods only
/// broadcasts, unknown unicast and multicast to every peer).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FdbEntry {
    pub mac: MacAddr,
    pub peer: Ipv4Addr,
}

/// One network as carried by one host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostNetwork {
    pub network: NetworkSpec,
    /// Masquerade the guests' traffic to outside the network behind the
    /// host's address (needs a gateway).
    #[serde(default)]
    pub nat: bool,
    #[serde(default)]
    pub nics: Vec<LocalNic>,
    #[serde(default)]
    pub peers: Vec<Peer>,
    #[serde(default)]
    pub fdb: Vec<FdbEntry>,
}

/// Everything the control plane wants of one host's virtual networks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostNetworkState {
    /// This host's underlay address: the source of its VXLAN traffic and
    /// the address its peers send to. `0.0.0.0`: the host has none (its
    /// agent was started without `--address`), so, without a tunnel, it
    /// carries its networks for its own guests only: no VXLAN device, no
    /// peers, no remote MACs.
    pub underlay: Ipv4Addr,
    #[serde(default)]
    pub networks: Vec<HostNetwork>,
    /// The encrypted tunnels to hosts at other sites, if this host has
    /// any. With it, a peer's address ([`Peer::underlay`], [`FdbEntry::peer`])
    /// may be a tunnel address: VXLAN traffic to it goes through the tunnel
    /// interface, and the VXLAN devices take their source address from
    /// the route (the underlay address or this host's tunnel address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelState>,
}

/// The UDP port of the tunnels when none is given (WireGuard's).
pub const TUNNEL_PORT: u16 = 51820;
/// The tunnel interface, one per host (all networks share it).
pub const TUNNEL_INTERFACE: &str = "v8w0";
/// WireGuard's outer headers over IPv4: IP 20, UDP 8, WireGuard 32.
pub const TUNNEL_OVERHEAD: u32 = 60;

/// This host's end of the encrypted tunnels (WireGuard) to hosts at other
/// sites. Keys are made on the hosts: the control plane knows only public
/// keys. Each host has an address inside the tunnels, in one prefix shared
/// by all hosts ([`TunnelState::prefix`]); a peer's tunnel traffic is
/// accepted from its address only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelState {
    /// This host's address inside the tunnels.
    pub address: Ipv4Addr,
    /// The prefix length of the tunnel addresses (routed through the
    /// tunnel interface).
    pub prefix: u8,
    /// The UDP port this host's tunnel listens on.
    pub listen_port: u16,
    #[serde(default)]
    pub peers: Vec<TunnelPeer>,
    /// This host relays between peers (hosts that cannot reach each other
    /// directly, such as two behind NAT, talk through it): it forwards
    /// between tunnel addresses.
    #[serde(default)]
    pub relay: bool,
}

/// A host at another site that this host talks to through the tunnel.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelPeer {
    pub host: String,
    /// Its WireGuard public key (base64, 32 bytes).
    pub public_key: String,
    /// Where its tunnel listens (its underlay address and port). None: it
    /// has no address this host can reach (it is behind NAT); it dials in,
    /// and its endpoint is learnt from its first authenticated packet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<std::net::SocketAddrV4>,
    /// Its address inside the tunnels.
    pub address: Ipv4Addr,
    /// Tunnel addresses of other hosts reached through this peer, which
    /// relays for them (they are behind NAT, or this host is).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relays_for: Vec<Ipv4Addr>,
    /// Seconds between keepalives to it (this host is behind NAT and must
    /// keep its mapping open); none: no keepalives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<u16>,
}

impl TunnelState {
    /// Whether the tunnel can be set up: addresses inside the prefix and
    /// unique, keys well formed and unique, no endpoint twice.
    pub fn validate(&self, underlay: Ipv4Addr) -> Result<(), String> {
        let net = Ipv4Cidr::containing(self.address, self.prefix)
            .map_err(|e| format!("tunnel address {}: {e}", self.address))?;
        if !(8..=30).contains(&self.prefix) || !net.is_host(self.address) {
            return Err(format!(
                "tunnel address {}/{} is not a host address of a /8 to /30",
                self.address, self.prefix
            ));
        }
        if self.listen_port == 0 {
            return Err("tunnel listen port 0 is not allowed".into());
        }
        let mut addresses = BTreeSet::from([self.address]);
        let mut keys = BTreeSet::new();
        let mut endpoints = BTreeSet::new();
        for p in &self.peers {
            let key = decode_key(&p.public_key)
                .map_err(|e| format!("tunnel peer {}: public key {e}", p.host))?;
            if !keys.insert(key) {
                return Err(format!(
                    "tunnel peer {}: public key is listed twice",
                    p.host
                ));
            }
            for a in std::iter::once(&p.address).chain(&p.relays_for) {
                if !net.is_host(*a) || !addresses.insert(*a) {
                    return Err(format!(
                        "tunnel peer {}: address {a} is outside {net}, or taken",
                        p.host
                    ));
                }
            }
            if let Some(e) = p.endpoint {
                if *e.ip() == underlay || !endpoints.insert(e) {
                    return Err(format!(
                        "tunnel peer {}: endpoint {e} is this host's or listed twice",
                        p.host
                    ));
                }
            }
            if p.keepalive == Some(0) {
                return Err(format!(
                    "tunnel peer {}: keepalive must be 1-65535 seconds, or none",
                    p.host
                ));
            }
        }
        Ok(())
    }
}

impl TunnelState {
    fn cidr(&self) -> Option<Ipv4Cidr> {
        Ipv4Cidr::containing(self.address, self.prefix).ok()
    }

    /// Whether `ip` is a tunnel address (inside the tunnels' prefix).
    pub fn holds(&self, ip: Ipv4Addr) -> bool {
        self.cidr().is_some_and(|c| c.contains(ip))
    }

    fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.cidr().is_some_and(|c| c.overlaps(other))
    }
}

/// The 32 bytes of a WireGuard key written in base64.
pub fn decode_key(s: &str) -> Result<[u8; 32], String> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|e| format!("is not base64: {e}"))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| format!("has {} bytes, not 32", bytes.len()))
}

impl NetworkSpec {
    /// Whether the definition is usable: a valid name, a subnet with room
    /// for hosts, a gateway inside it, a VNI and an MTU in range.
    pub fn validate(&self) -> Result<(), String> {
        if self.id.is_empty() || self.id.len() > 64 || self.id.chars().any(char::is_control) {
            return Err(format!(
                "network id {:?} must be 1-64 printable characters",
                self.id
            ));
        }
        crate::validate::name("network", &self.name)?;
        let n = &self.name;
        if self.cidr.prefix() > 30 || self.cidr.prefix() < 8 {
            return Err(format!(
                "network {n}: CIDR {} must have a prefix of /8 to /30",
                self.cidr
            ));
        }
        if let Some(g) = self.gateway {
            if !self.cidr.is_host(g) {
                return Err(format!(
                    "network {n}: gateway {g} is not a host address of {}",
                    self.cidr
                ));
            }
        }
        if self.dns.len() > crate::validate::MAX_NAMESERVERS {
            return Err(format!(
                "network {n}: {} DNS servers; at most {} are allowed",
                self.dns.len(),
                crate::validate::MAX_NAMESERVERS
            ));
        }
        if self.vni == 0 || self.vni > MAX_VNI {
            return Err(format!("network {n}: VNI {} is not 1-{MAX_VNI}", self.vni));
        }
        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            return Err(format!(
                "network {n}: MTU {} is not {MIN_MTU}-{MAX_MTU}",
                self.mtu
            ));
        }
        Ok(())
    }
}

impl Nic {
    /// Whether the NIC fits `net`: the same network, a unicast MAC and a
    /// host address of its subnet that is not the gateway.
    pub fn validate(&self, net: &NetworkSpec) -> Result<(), String> {
        if self.network != net.id {
            return Err(format!(
                "NIC {} is on network {}, not {}",
                self.id, self.network, net.id
            ));
        }
        if self.prefix != net.cidr.prefix() {
            return Err(format!(
                "NIC {}: prefix /{} differs from network {}'s {}",
                self.id, self.prefix, net.name, net.cidr
            ));
        }
        nic_address(&self.id, self.mac, self.ip, net)
    }
}

fn nic_address(id: &str, mac: MacAddr, ip: Ipv4Addr, net: &NetworkSpec) -> Result<(), String> {
    if !mac.is_unicast() {
        return Err(format!("NIC {id}: MAC {mac} is not a unicast address"));
    }
    if !net.cidr.is_host(ip) {
        return Err(format!(
            "NIC {id}: address {ip} is not a host address of network {} ({})",
            net.name, net.cidr
        ));
    }
    if Some(ip) == net.gateway {
        return Err(format!(
            "NIC {id}: address {ip} is network {}'s gateway",
            net.name
        ));
    }
    Ok(())
}

impl HostNetworkState {
    /// Whether the agent can apply the state as it is: every network and
    /// NIC valid, ids, VNIs, device names, MACs, taps and addresses unique,
    /// forwarding entries pointing at peers. Networks with overlapping
    /// CIDRs may share a host (they are separate L2 segments), but at most
    /// one of them may have a gateway there: the host routes to a
    /// gateway's subnet, and one routing table holds one route per subnet.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(t) = &self.tunnel {
            t.validate(self.underlay)?;
        }
        let mut ids = BTreeSet::new();
        let mut vnis = BTreeMap::new();
        let mut bridges = BTreeMap::new();
        let mut macs = BTreeMap::new();
        let mut taps = BTreeSet::new();
        let mut published = BTreeSet::new();
        let mut routed: Vec<&NetworkSpec> = Vec::new();
        for hn in &self.networks {
            let net = &hn.network;
            net.validate()?;
            if !ids.insert(net.id.as_str()) {
                return Err(format!("network {} is listed twice", net.id));
            }
            if let Some(other) = vnis.insert(net.vni, net.name.as_str()) {
                return Err(format!(
                    "networks {other} and {} have the same VNI {}",
                    net.name, net.vni
                ));
            }
            let names = device_names(&net.id);
            if let Some(other) = bridges.insert(names.bridge.clone(), net.name.as_str()) {
                return Err(format!(
                    "networks {other} and {} hash to the same device name {}",
                    net.name, names.bridge
                ));
            }
            if net.gateway.is_some() {
                if let Some(t) = self.tunnel.as_ref().filter(|t| t.overlaps(&net.cidr)) {
                    return Err(format!(
                        "network {} ({}) overlaps the tunnel addresses {}/{}",
                        net.name, net.cidr, t.address, t.prefix
                    ));
                }
                if let Some(o) = routed.iter().find(|o| o.cidr.overlaps(&net.cidr)) {
                    return Err(format!(
                        "networks {} ({}) and {} ({}) overlap and both have a gateway on this host",
                        o.name, o.cidr, net.name, net.cidr
                    ));
                }
                routed.push(net);
            }
            if hn.nat && net.gateway.is_none() {
                return Err(format!(
                    "network {}: outbound NAT needs a gateway",
                    net.name
                ));
            }
            self.validate_members(hn, &mut macs, &mut taps, &mut published)?;
        }
        Ok(())
    }

    fn validate_members<'a>(
        &self,
        hn: &'a HostNetwork,
        macs: &mut BTreeMap<MacAddr, &'a str>,
        taps: &mut BTreeSet<&'a str>,
        published: &mut BTreeSet<(Option<Ipv4Addr>, Protocol, u16)>,
    ) -> Result<(), String> {
        let net = &hn.network;
        let mut ips = BTreeMap::new();
        for nic in &hn.nics {
            nic_address(&nic.id, nic.mac, nic.ip, net)?;
            validate_nic_security(&nic.id, nic.ingress.as_deref(), &nic.publish, published)?;
            if !nic.publish.is_empty() && net.gateway.is_none() {
                return Err(format!(
                    "NIC {}: network {} has no gateway, so the host cannot publish its ports",
                    nic.id, net.name
                ));
            }
            if !nic.tap.starts_with(TAP_PREFIX)
                || nic.tap.len() > 15
                || !nic
                    .tap
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err(format!(
                    "NIC {}: tap name {:?} must be {TAP_PREFIX} and letters, digits or '-', 15 bytes at most",
                    nic.id, nic.tap
                ));
            }
            if !taps.insert(nic.tap.as_str()) {
                return Err(format!("tap {} is used by two NICs", nic.tap));
            }
            if let Some(o) = macs.insert(nic.mac, nic.id.as_str()) {
                return Err(format!(
                    "NICs {o} and {} have the same MAC {}",
                    nic.id, nic.mac
                ));
            }
            if let Some(o) = ips.insert(nic.ip, nic.id.as_str()) {
                return Err(format!(
                    "NICs {o} and {} have the same address {} on network {}",
                    nic.id, nic.ip, net.name
                ));
            }
        }
        // Without an underlay address and without a tunnel (through which a
        // host behind NAT reaches its peers) there is no overlay.
        let no_overlay = self.underlay.is_unspecified() && self.tunnel.is_none();
        if no_overlay && (!hn.peers.is_empty() || !hn.fdb.is_empty()) {
            return Err(format!(
                "network {}: this host has no underlay address, so it can have no peers or \
                 remote MACs (start its agent with --address)",
                net.name
            ));
        }
        let mut peers = BTreeSet::new();
        for p in &hn.peers {
            if p.underlay == self.underlay {
                return Err(format!(
                    "network {}: peer {} has this host's own underlay address {}",
                    net.name, p.host, p.underlay
                ));
            }
            if let Some(t) = self.tunnel.as_ref().filter(|t| t.holds(p.underlay)) {
                let reached = t
                    .peers
                    .iter()
                    .any(|tp| tp.address == p.underlay || tp.relays_for.contains(&p.underlay));
                if !reached {
                    return Err(format!(
                        "network {}: peer {} at tunnel address {} is no tunnel peer",
                        net.name, p.host, p.underlay
                    ));
                }
            }
            if !peers.insert(p.underlay) {
                return Err(format!(
                    "network {}: peer address {} is listed twice",
                    net.name, p.underlay
                ));
            }
        }
        let mut fdb = BTreeSet::new();
        for f in &hn.fdb {
            if !f.mac.is_unicast() {
                return Err(format!(
                    "network {}: forwarding entry for {} is not a unicast MAC",
                    net.name, f.mac
                ));
            }
            if !peers.contains(&f.peer) {
                return Err(format!(
                    "network {}: forwarding entry {} -> {} names no peer of the network",
                    net.name, f.mac, f.peer
                ));
            }
            if hn.nics.iter().any(|n| n.mac == f.mac) || !fdb.insert(f.mac) {
                return Err(format!(
                    "network {}: MAC {} is both local and remote, or listed twice",
                    net.name, f.mac
                ));
            }
        }
        Ok(())
    }
}

/// IPAM: the address a new NIC on `net` gets. `requested`: that address,
/// if it is a host address of the subnet, not the gateway and not in
/// `used`; otherwise the lowest such free address. The network and
/// broadcast addresses are never handed out.
pub fn allocate_ip(
    net: &NetworkSpec,
    used: &BTreeSet<Ipv4Addr>,
    requested: Option<Ipv4Addr>,
) -> Result<Ipv4Addr, String> {
    let taken = |ip: Ipv4Addr| used.contains(&ip) || Some(ip) == net.gateway;
    if let Some(ip) = requested {
        if !net.cidr.is_host(ip) {
            return Err(format!(
                "address {ip} is not a usable address of network {} ({})",
                net.name, net.cidr
            ));
        }
        if taken(ip) {
            return Err(format!(
                "address {ip} is already taken on network {}",
                net.name
            ));
        }
        return Ok(ip);
    }
    let first = u32::from(net.cidr.network());
    let last = u32::from(net.cidr.broadcast());
    let (lo, hi) = if net.cidr.prefix() >= 31 {
        (first, last)
    } else {
        (first + 1, last - 1)
    };
    // `used` is sorted: walk the candidates and the used set together, so a
    // nearly full /8 costs the size of `used`, not 16 million probes each.
    let mut ip = lo;
    let mut it = used.range(Ipv4Addr::from(lo)..).peekable();
    while ip <= hi {
        let addr = Ipv4Addr::from(ip);
        while it.peek().is_some_and(|u| **u < addr) {
            it.next();
        }
        if it.peek() != Some(&&addr) && Some(addr) != net.gateway {
            return Ok(addr);
        }
        ip = match ip.checked_add(1) {
            Some(n) => n,
            None => break,
        };
    }
    Err(format!(
        "network {} ({}) has no free address left",
        net.name, net.cidr
    ))
}

mod security;
pub use security::*;

#[cfg(test)]
mod tests;
