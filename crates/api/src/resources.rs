//! API resources: providers, sites, hosts, images, VMs and tokens.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

// ---------------------------------------------------------------- providers

/// A cloud or edge operator that owns sites. Its legal country and
/// jurisdiction decide which law applies to the data on its hosts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Provider {
    pub id: String,
    pub name: String,
    /// ISO 3166-1 alpha-2 code of the country where the provider is incorporated.
    pub country: String,
    /// Legal jurisdiction, e.g. `EU`, `EEA`, `CH`, `US`.
    pub jurisdiction: String,
    /// Free-form labels (e.g. `virt8ra.io/managed-by: apply`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderCreate {
    /// 1-63 lowercase letters, digits and `-`, not starting or ending with `-`.
    #[schema(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: String,
    /// ISO 3166-1 alpha-2 code in upper case, e.g. `DE`.
    #[schema(pattern = "^[A-Z]{2}$")]
    pub country: String,
    #[serde(default = "default_jurisdiction")]
    pub jurisdiction: String,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Changes to a provider (`PATCH`): absent fields keep their value; `labels`
/// replaces all labels when given.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jurisdiction: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

fn default_jurisdiction() -> String {
    "EU".to_string()
}

// -------------------------------------------------------------------- sites

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Core,
    Edge,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Core => "core",
            Tier::Edge => "edge",
        }
    }
}

/// Facts about a site that placement weighs: energy and price.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SiteFacts {
    /// Grid carbon intensity in gCO2eq/kWh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid_gco2_per_kwh: Option<f64>,
    /// Power usage effectiveness of the data centre (>= 1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pue: Option<f64>,
    /// Price per vCPU-hour, in EUR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_vcpu_hour: Option<f64>,
    /// Price per GiB of memory per hour, in EUR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_gib_hour: Option<f64>,
    /// Price per GiB of disk per hour, in EUR (showback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_disk_gib_hour: Option<f64>,
    /// Round-trip time from the site's edge router to its hosts, in ms
    /// (added to the distance model; default 1 ms core, 0.5 ms edge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_latency_ms: Option<f64>,
}

/// A location of a provider: a core data centre or an edge site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Site {
    pub id: String,
    pub name: String,
    /// Name of the provider that runs the site.
    pub provider: String,
    /// ISO 3166-1 alpha-2 code of the country the site is in.
    pub country: String,
    pub city: String,
    pub latitude: f64,
    pub longitude: f64,
    pub tier: Tier,
    #[serde(default)]
    pub facts: SiteFacts,
    /// Free-form labels that placement rules can select on.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// The operator trusts the network between the site's hosts: virtual
    /// networks use plain VXLAN between them. Otherwise (the default) they
    /// are encrypted within the site too, as between sites.
    #[serde(default)]
    pub trusted_fabric: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SiteCreate {
    /// 1-63 lowercase letters, digits and `-`, not starting or ending with `-`.
    #[schema(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: String,
    /// Provider name or id.
    pub provider: String,
    /// ISO 3166-1 alpha-2 code in upper case, e.g. `DE`.
    #[schema(pattern = "^[A-Z]{2}$")]
    pub country: String,
    #[schema(min_length = 1, max_length = 100)]
    pub city: String,
    #[schema(minimum = -90.0, maximum = 90.0)]
    pub latitude: f64,
    #[schema(minimum = -180.0, maximum = 180.0)]
    pub longitude: f64,
    #[serde(default = "default_tier")]
    pub tier: Tier,
    #[serde(default)]
    pub facts: SiteFacts,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Plain VXLAN between the site's hosts (see [`Site::trusted_fabric`]).
    #[serde(default)]
    pub trusted_fabric: bool,
}

fn default_tier() -> Tier {
    Tier::Core
}

/// Changes to a site (`PATCH`): absent fields keep their value; `facts` and
/// `labels` replace the whole object when given. The provider and the
/// country of a site cannot change.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SiteUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latitude: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub longitude: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<Tier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facts: Option<SiteFacts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted_fabric: Option<bool>,
}

// -------------------------------------------------------------------- hosts

/// How the host runs guests: hardware virtualisation or CPU emulation (TCG).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Hypervisor {
    Kvm,
    Emulation,
}

impl Hypervisor {
    pub fn as_str(self) -> &'static str {
        match self {
            Hypervisor::Kvm => "kvm",
            Hypervisor::Emulation => "emulation",
        }
    }
}

/// What a host has, as its agent reports it at join and on every connect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostInventory {
    pub hostname: String,
    /// `x86_64`, `aarch64`, `riscv64`.
    pub arch: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub cpu_model: String,
    #[serde(default)]
    pub cpu_flags: Vec<String>,
    #[serde(default)]
    pub accelerators: Vec<String>,
    pub hypervisor: Hypervisor,
    pub agent_version: String,
    #[serde(default)]
    pub qemu_version: String,
    /// Concrete QEMU machine types this host runs (e.g. `pc-i440fx-7.2`).
    #[serde(default)]
    pub machine_types: Vec<String>,
    /// The address other hosts reach this host at (`virt8ra agent
    /// --address`, also `--migration-address`): where incoming
    /// live-migration streams arrive and, when it is an IPv4 address, the
    /// underlay of its virtual networks (VXLAN). None: live migrations to
    /// it are relayed through the control plane (if the agent can,
    /// `migration_relay`) or it takes only cold ones, and its virtual
    /// networks reach only its own guests.
    #[serde(default)]
    pub migration_address: Option<String>,
    /// The agent can take live migrations relayed through the control plane
    /// (agents from before the relay leave it out: false).
    #[serde(default)]
    pub migration_relay: bool,
    /// Agent protocol version spoken on the current connection.
    #[serde(default)]
    pub protocol: u32,
    /// URL at which this host's agent serves its image cache to the other
    /// hosts of its site, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_service: Option<String>,
    /// The host's WireGuard public key (base64) for the encrypted tunnels
    /// between sites; the private key never leaves the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_public_key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Connected and heartbeating: placement may use it.
    Ready,
    /// No heartbeat within three intervals.
    Unreachable,
    /// Taken out of placement by an operator; its VMs keep running.
    Disabled,
    /// Under maintenance: no new VMs.
    Maintenance,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Ready => "ready",
            HostState::Unreachable => "unreachable",
            HostState::Disabled => "disabled",
            HostState::Maintenance => "maintenance",
        }
    }
}

/// Live usage, as measured by the agent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostUsage {
    pub vms_running: u32,
    /// One-minute load average of the host.
    pub load_1m: f64,
    pub memory_used_mib: u64,
    pub disk_used_gib: u64,
}

/// Resources committed to VMs placed on the host (by the control plane).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Allocation {
    pub vms: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Host {
    pub id: String,
    pub name: String,
    pub site: String,
    pub provider: String,
    pub country: String,
    pub inventory: HostInventory,
    pub state: HostState,
    /// Whether the agent's channel is open right now.
    pub connected: bool,
    pub last_heartbeat: Option<DateTime<Utc>>,
    pub usage: HostUsage,
    pub allocated: Allocation,
    /// vCPU overcommit ratio for this host; the control plane's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_overcommit: Option<f64>,
    /// Memory overcommit ratio for this host; the control plane's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_overcommit: Option<f64>,
    /// The host's address inside the encrypted tunnels between sites
    /// (100.64.0.0/10), given by the control plane once its agent reports a
    /// tunnel key; it never changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Ipv4)]
    pub tunnel_address: Option<std::net::Ipv4Addr>,
    /// How the other hosts reach it over the virtual networks (direct,
    /// or relayed through which host); filled in when it is read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<crate::overlay::HostOverlay>,
    pub created_at: DateTime<Utc>,
}

/// Operator changes to a host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostUpdate {
    /// `ready`, `disabled` or `maintenance` (`unreachable` is set by the control plane only).
    #[serde(default)]
    pub state: Option<HostState>,
    /// vCPU overcommit ratio (0.1..64) for this host.
    #[serde(default)]
    pub cpu_overcommit: Option<f64>,
    /// Memory overcommit ratio (0.1..64) for this host.
    #[serde(default)]
    pub memory_overcommit: Option<f64>,
}

// ------------------------------------------------------------------- images

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Image {
    pub id: String,
    pub name: String,
    /// Content address: sha256 of the stored qcow2 file, lowercase hex.
    pub sha256: String,
    /// Format as stored (always `qcow2`; other formats are converted on import).
    pub format: String,
    /// Format the file had when it was imported.
    pub source_format: String,
    pub size_bytes: u64,
    pub virtual_size_bytes: u64,
    pub arch: String,
    /// sha256 of the file as uploaded (differs from `sha256` when the
    /// import converted it), so a client can tell whether a local file is
    /// already imported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    /// Version tag, e.g. `1.0.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Where the image came from: `upload`, a URL, or `catalog NAME: URL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<String>,
    /// Sites where the image is pre-staged (`image replicate`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    /// The project that owns the image; none: public (every project may
    /// use it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

/// Bytes of image data served, by source (`/api/v1/images/transfers`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImageTransfers {
    /// Bytes the control plane sent to agents (the long link), by host name.
    pub long_link_bytes_by_host: std::collections::BTreeMap<String, u64>,
    pub long_link_bytes: u64,
}

// ---------------------------------------------------------------------- VMs

/// Where a VM may run: hard rules the placement engine enforces (on
/// creation and on every later move), and the weights of its soft
/// preferences. Every field is optional; an empty object means "anywhere".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementConstraints {
    /// Site name: the VM runs only there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Provider name: the VM runs only at this provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// ISO country code: the VM runs only in this country.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// Residency: the VM runs only in one of these countries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub countries: Vec<String>,
    /// Residency: never in these countries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_countries: Vec<String>,
    /// Residency: the site's country must be in one of these jurisdictions
    /// (`EU`, `EEA`, or a country code).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jurisdictions: Vec<String>,
    /// Provider nationality: the provider's legal seat must be in one of these
    /// jurisdictions (`EU`, `EEA`, or a country code).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub provider_jurisdictions: Vec<String>,
    /// Only these providers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_providers: Vec<String>,
    /// Only these sites.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_sites: Vec<String>,
    /// Only sites of this tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<Tier>,
    /// Site labels that must all match.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Host architecture (`x86_64`, `aarch64`, `riscv64`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Only hosts with working KVM (not emulation).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_kvm: bool,
    /// CPU flags the host must have, e.g. `avx2`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_flags: Vec<String>,
    /// Accelerators the host must have, e.g. `gpu-nvidia`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accelerators: Vec<String>,
    /// Confidential computing: `sev-snp` or `tdx`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidential: Option<String>,
    /// Maximum round-trip time from where the users are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_latency: Option<LatencyBound>,
    /// Never share this level with other members of the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_affinity: Option<GroupRule>,
    /// Always share this level with the other members of the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<GroupRule>,
    /// Weights of the soft preferences; operator defaults when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PlacementPolicy>,
}

impl PlacementConstraints {
    pub fn is_empty(&self) -> bool {
        *self == PlacementConstraints::default()
    }
}

/// A latency bound from a user location: a known city (`from`) or coordinates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LatencyBound {
    /// A city name known to the control plane, e.g. `Gdańsk` or `Munich`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latitude: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub longitude: Option<f64>,
    /// Maximum round-trip time in milliseconds.
    pub max_rtt_ms: f64,
}

/// The level at which a group's members are kept together or apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Host,
    Site,
    Provider,
    Country,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupRule {
    pub group: String,
    pub level: Level,
}

/// Weights of the soft preferences (each 0..=10; higher matters more).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementPolicy {
    /// `pack` fills hosts before using new ones; `spread` balances load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<f64>,
    /// Lower grid carbon intensity × PUE is better.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy: Option<f64>,
    /// Lower price is better.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    /// Closer to the users (of `max_latency`) is better.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<f64>,
    /// Providers with less of the load are better.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    Pack,
    Spread,
}

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmSpec {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    /// Image name or id, as given.
    pub image: String,
    #[serde(default)]
    pub placement: PlacementConstraints,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// Guest TCP ports the agent forwards to a port on the host's loopback.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// OpenSSH public keys the guest accepts (cloud-init `public-keys`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// The guest's network configuration (cloud-init network-config v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::NetworkConfig>,
    /// Disks after the boot disk, in order (the guest sees them after the
    /// boot disk and the NoCloud seed: `vdc`, `vdd`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_disks: Vec<DataDisk>,
    /// NICs on virtual networks, as asked for (the addresses given are in
    /// `status.nics`). None: the guest has one user-mode NIC.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicRequest>,
    /// Guest ports published on the address of the host that runs the VM
    /// (which NIC each went to is in `status.nics`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<VmPublish>,
    /// The VM's security group: what may reach its NICs. None: what comes
    /// from each NIC's own network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<crate::IngressRule>>,
}

/// A guest port the host that runs the VM publishes on its own address
/// (`--publish [ADDR:]HOSTPORT:GUESTPORT[/udp]`): connections to
/// `host_port` there go to `guest_port` of the VM's NIC on `network`. The
/// host port follows the VM when it moves, and placement keeps two VMs
/// from publishing the same one on one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmPublish {
    /// The network (name or id) of the NIC that gets the connections.
    /// Default: the first of the VM's networks that has a gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// One of the host's addresses; none: every address of the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Ipv4)]
    pub address: Option<std::net::Ipv4Addr>,
    #[schema(minimum = 1, maximum = 65535)]
    pub host_port: u16,
    #[schema(minimum = 1, maximum = 65535)]
    pub guest_port: u16,
    /// `tcp` (the default) or `udp`.
    #[serde(default = "default_tcp")]
    pub protocol: crate::Protocol,
}

fn default_tcp() -> crate::Protocol {
    crate::Protocol::Tcp
}

impl VmPublish {
    /// The port as the host publishes it.
    pub fn port(&self) -> crate::PublishedPort {
        crate::PublishedPort {
            address: self.address,
            host_port: self.host_port,
            guest_port: self.guest_port,
            protocol: self.protocol,
        }
    }
}

impl std::str::FromStr for VmPublish {
    type Err = String;

    /// `[ADDR:]HOSTPORT:GUESTPORT[/tcp|udp][,network=NAME]`, as `vm create
    /// --publish` takes it.
    fn from_str(s: &str) -> Result<VmPublish, String> {
        let (spec, network) = match s.split_once(',') {
            None => (s, None),
            Some((spec, rest)) => match rest.split_once('=') {
                Some(("network", n)) if !n.is_empty() && !n.contains(',') => {
                    (spec, Some(n.to_string()))
                }
                _ => {
                    return Err(format!(
                        "--publish {s:?}: after the port, only ,network=NAME may follow"
                    ))
                }
            },
        };
        let p: crate::PublishedPort = spec.parse()?;
        Ok(VmPublish {
            network,
            address: p.address,
            host_port: p.host_port,
            guest_port: p.guest_port,
            protocol: p.protocol,
        })
    }
}

/// A NIC asked for at `vm create`: the network it joins and, optionally,
/// the address it must have (else the network's lowest free one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NicRequest {
    /// Network name or id.
    #[schema(min_length = 1)]
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Ipv4)]
    pub ip: Option<std::net::Ipv4Addr>,
}

impl VmSpec {
    /// The disk space the VM may take, in GiB: the boot disk and every
    /// data disk (one without a size, a copy of its image, counts 1 GiB).
    pub fn total_disk_gib(&self) -> u64 {
        total_disk_gib(self.disk_gib, &self.data_disks)
    }
}

/// See [`VmSpec::total_disk_gib`].
pub fn total_disk_gib(boot_gib: u64, data_disks: &[DataDisk]) -> u64 {
    data_disks
        .iter()
        .fold(boot_gib, |t, d| t.saturating_add(d.size_gib.unwrap_or(1)))
}

/// A data disk: a copy-on-write copy of an image, or a blank disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DataDisk {
    /// Image name or id (as given) the disk starts as a copy of; none for
    /// a blank disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Size in GiB: at least the image's size (it is grown to this);
    /// required for a blank disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_gib: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmCreate {
    /// 1-63 lowercase letters, digits and `-`, not starting or ending with `-`.
    #[schema(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: String,
    #[serde(default = "default_vcpus")]
    #[schema(minimum = 1, maximum = 512)]
    pub vcpus: u32,
    #[serde(default = "default_memory")]
    #[schema(minimum = 16, maximum = 16777216)]
    pub memory_mib: u64,
    #[serde(default = "default_disk")]
    #[schema(minimum = 1, maximum = 65536)]
    pub disk_gib: u64,
    /// Image name or id.
    #[schema(min_length = 1)]
    pub image: String,
    #[serde(default)]
    pub placement: PlacementConstraints,
    /// Given to the guest verbatim (NoCloud `user-data`), at most 64 KiB.
    #[serde(default)]
    pub user_data: Option<String>,
    #[serde(default)]
    pub ports: Vec<u16>,
    /// OpenSSH public key lines (`TYPE BASE64 [COMMENT]`, e.g. the contents
    /// of `~/.ssh/id_ed25519.pub`) the guest accepts for logins; at most 32.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// The guest's network configuration; without it the image's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::NetworkConfig>,
    /// Disks after the boot disk (at most 8): copies of images or blank.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_disks: Vec<DataDisk>,
    /// NICs on virtual networks (at most 8), in the order the guest sees
    /// them. Without any, the guest has one user-mode NIC.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicRequest>,
    /// Guest ports the host that runs the VM publishes on its own address
    /// (at most 32; the VM needs a NIC on a network with a gateway). No two
    /// VMs on one host publish the same host port: placement sees to it.
    /// A VM without NICs forwards `ports` to the host's loopback instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<VmPublish>,
    /// The VM's security group (at most 64 rules), applied to each of its
    /// NICs: what may reach the guest. None: what comes from the NIC's
    /// own network (its members). Replies to the guest's own connections
    /// and its published ports always pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<crate::IngressRule>>,
    /// Start the VM once placed (default true).
    #[serde(default = "default_true")]
    pub start: bool,
    /// Free-form labels of the VM (not part of its spec; e.g.
    /// `virt8ra.io/managed-by: apply`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

fn default_vcpus() -> u32 {
    1
}
fn default_memory() -> u64 {
    256
}
fn default_disk() -> u64 {
    1
}
fn default_true() -> bool {
    true
}

impl VmCreate {
    pub fn spec(&self) -> VmSpec {
        VmSpec {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disk_gib: self.disk_gib,
            image: self.image.clone(),
            placement: self.placement.clone(),
            user_data: self.user_data.clone(),
            ports: self.ports.clone(),
            ssh_authorized_keys: self.ssh_authorized_keys.clone(),
            network: self.network.clone(),
            data_disks: self.data_disks.clone(),
            nics: self.nics.clone(),
            publish: self.publish.clone(),
            ingress: self.ingress.clone(),
        }
    }
}

/// The life cycle of a VM.
///
/// ```text
///  pending ──► scheduled ──► provisioning ──► running ◄──► stopping ──► stopped
///     │            │               │             │                        │
///     └────────────┴───────────────┴─────► failed (reason) ◄──────────────┘
///  any ──► deleting ──► deleted
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmPhase {
    /// Accepted, waiting for a host.
    Pending,
    /// A host was chosen; its agent has not reported yet.
    Scheduled,
    /// The agent fetches the image and creates the disk.
    Provisioning,
    Running,
    Stopping,
    Stopped,
    Failed,
    Deleting,
    Deleted,
}

impl VmPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            VmPhase::Pending => "pending",
            VmPhase::Scheduled => "scheduled",
            VmPhase::Provisioning => "provisioning",
            VmPhase::Running => "running",
            VmPhase::Stopping => "stopping",
            VmPhase::Stopped => "stopped",
            VmPhase::Failed => "failed",
            VmPhase::Deleting => "deleting",
            VmPhase::Deleted => "deleted",
        }
    }

    pub fn parse(s: &str) -> Option<VmPhase> {
        Some(match s {
            "pending" => VmPhase::Pending,
            "scheduled" => VmPhase::Scheduled,
            "provisioning" => VmPhase::Provisioning,
            "running" => VmPhase::Running,
            "stopping" => VmPhase::Stopping,
            "stopped" => VmPhase::Stopped,
            "failed" => VmPhase::Failed,
            "deleting" => VmPhase::Deleting,
            "deleted" => VmPhase::Deleted,
            _ => return None,
        })
    }
}

/// Whether the user wants the VM on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    Running,
    Stopped,
}

/// A guest TCP port reachable on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PortForward {
    pub guest_port: u16,
    /// `127.0.0.1:PORT` on the host that runs the VM.
    pub host_addr: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmStatus {
    pub phase: VmPhase,
    pub host: Option<String>,
    pub host_id: Option<String>,
    pub site: Option<String>,
    pub provider: Option<String>,
    pub country: Option<String>,
    /// Resolved image id.
    pub image_id: Option<String>,
    /// Resolved image id of each data disk, in `spec.data_disks` order
    /// (`None` for a blank disk).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_image_ids: Vec<Option<String>>,
    /// Why the VM is where it is, or why it is still pending.
    pub placement_reason: Option<String>,
    pub last_error: Option<String>,
    #[serde(default)]
    pub ports: Vec<PortForward>,
    pub started_at: Option<DateTime<Utc>>,
    /// Hypervisor the VM runs under (`kvm` or `emulation`).
    pub hypervisor: Option<Hypervisor>,
    /// The concrete QEMU machine type it was started with.
    #[serde(default)]
    pub machine: Option<String>,
    /// The migration in progress, if any.
    #[serde(default)]
    pub migration: Option<String>,
    /// The VM's NICs on virtual networks, with the addresses the control
    /// plane gave them. They are held (no other NIC gets the address) until
    /// the VM is deleted; a VM without any has the user-mode NIC only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<VmNic>,
}

/// A NIC of a VM on a virtual network: its address is the network's to
/// give and stays the same when the VM moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmNic {
    pub id: String,
    /// The network's name.
    pub network: String,
    pub network_id: String,
    /// Locally administered (`02:...`), derived from the NIC's id
    /// (`virt8ra_api::mac_for_nic`).
    pub mac: String,
    #[schema(value_type = String, format = Ipv4)]
    pub ip: std::net::Ipv4Addr,
    /// The network's prefix length.
    pub prefix: u8,
    /// The ports published to this NIC (from `spec.publish`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<crate::PublishedPort>,
}

/// Where a network may reach: the countries, providers and sites whose
/// hosts may carry it. Empty lists allow everything; the VMs on the
/// network must be placed where all of them allow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpan {
    /// ISO 3166-1 alpha-2 codes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub countries: Vec<String>,
    /// Provider names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<String>,
    /// Site names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
}

impl NetworkSpan {
    /// The span in words: `countries FR, DE; sites fr-paris`, or `anywhere`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = [
            ("countries", &self.countries),
            ("providers", &self.providers),
            ("sites", &self.sites),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k} {}", v.join(", ")))
        .collect();
        if parts.is_empty() {
            "anywhere".into()
        } else {
            parts.join("; ")
        }
    }
}

/// What `network create` sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkCreate {
    /// 1-63 lowercase letters, digits and `-`, not starting or ending with `-`.
    #[schema(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: String,
    /// The subnet, e.g. `10.20.0.0/24` (no host bits; /8 to /30).
    pub cidr: String,
    /// Default: the subnet's first address. Ignored with `no_gateway`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Ipv4)]
    pub gateway: Option<std::net::Ipv4Addr>,
    /// A plain layer 2 segment: no gateway, no DHCP, no NAT on the hosts.
    #[serde(default)]
    pub no_gateway: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub dns: Vec<std::net::Ipv4Addr>,
    /// Default 1390 (1500 less VXLAN's 50 bytes of headers and the
    /// encrypted tunnel's 60 between sites).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub span: NetworkSpan,
    /// Outbound traffic leaves through each host's own address (default
    /// true; needs a gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<bool>,
}

/// A virtual network: a private layer 2 segment with one IPv4 subnet that
/// spans the hosts its VMs run on, whatever their site or provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Network {
    pub id: String,
    pub name: String,
    /// The subnet, e.g. `10.20.0.0/24`.
    pub cidr: String,
    /// The address the network's hosts answer at (DHCP, NAT); none for a
    /// network without a gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Ipv4)]
    pub gateway: Option<std::net::Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub dns: Vec<std::net::Ipv4Addr>,
    pub mtu: u32,
    /// The VXLAN network identifier, unique per control plane.
    pub vni: u32,
    #[serde(default)]
    pub span: NetworkSpan,
    /// Outbound traffic leaves through each host's own address (NAT).
    pub nat: bool,
    /// The project that owns the network.
    #[serde(default = "crate::tenancy::default_project")]
    pub project: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    pub id: String,
    pub name: String,
    pub spec: VmSpec,
    /// Desired power state.
    pub power: PowerState,
    /// Bumped by each reboot request; the agent reboots when it sees a new value.
    pub reboot_generation: u64,
    /// Seconds a stop waits for the guest's ACPI power-down before forcing it off.
    pub stop_timeout_s: u32,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// The project that owns the VM.
    #[serde(default = "crate::tenancy::default_project")]
    pub project: String,
    pub status: VmStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmEvent {
    pub seq: u64,
    pub at: DateTime<Utc>,
    /// Phase after the event.
    pub phase: VmPhase,
    pub message: String,
}

/// Console output of a VM's serial port.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ConsoleLog {
    pub vm: String,
    /// The last bytes of the log (lossy UTF-8).
    pub data: String,
    /// True when older output was cut off.
    pub truncated: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmAction {
    Start,
    Stop,
    Reboot,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmActionRequest {
    pub action: VmAction,
    /// For `stop`: seconds to wait for the guest's ACPI power-down before forcing it off.
    #[serde(default)]
    pub timeout_s: Option<u32>,
}

// ------------------------------------------------------------------- tokens

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenCreate {
    /// Site name or id the joining host will belong to.
    pub site: String,
    /// Validity in seconds (default one hour).
    #[serde(default)]
    pub ttl_s: Option<u64>,
    /// How many hosts may join with it (default 1).
    #[serde(default)]
    pub max_uses: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinToken {
    pub id: String,
    pub site: String,
    /// The secret, shown once; only its hash is stored.
    pub token: String,
    pub expires_at: DateTime<Utc>,
    pub max_uses: u32,
}

/// A join token as listed: never its secret, nor the secret's hash.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinTokenInfo {
    pub id: String,
    pub site: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Hosts that may still join with it (none: unlimited).
    pub uses_left: Option<u32>,
}

/// A new admin token, shown once (`POST /api/v1/admin-token/rotate`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AdminToken {
    pub token: String,
}

/// Sent by an agent with its join token.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentJoin {
    /// Host name to register (unique).
    pub name: String,
    pub inventory: HostInventory,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentJoined {
    pub host_id: String,
    pub host_name: String,
    pub site: String,
    /// The host's own credential for the agent channel and image downloads.
    pub host_token: String,
}

/// A page of a list.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `?cursor=` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// One event of `GET /api/v1/watch` (server-sent events; the event's `data`
/// is this object as JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WatchEvent {
    /// A VM changed (durably): its whole new state.
    Vm { vm: Box<Vm> },
    /// The watcher fell behind and missed events: list again, then go on
    /// watching.
    Resync { missed: u64 },
}

/// Counters of the control plane, for operators and benchmarks.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Metrics {
    pub agents_connected: u64,
    /// Heartbeats received since the control plane started.
    pub heartbeats_received: u64,
    pub uptime_s: f64,
    /// Heartbeat interval agents are told to use, in seconds.
    pub heartbeat_interval_s: u64,
    /// Live-migration bytes relayed between agents (both directions).
    #[serde(default)]
    pub relay_bytes: u64,
    /// Live-migration connections relayed between agents.
    #[serde(default)]
    pub relay_connections: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
}

/// A placement decision, as `POST /api/v1/vms/plan` (a dry run) reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlacementPlan {
    /// Whether some host fits.
    pub placed: bool,
    pub host: Option<String>,
    pub site: Option<String>,
    pub provider: Option<String>,
    pub country: Option<String>,
    /// 0..1, higher is better.
    pub score: Option<f64>,
    /// Weighted score components of the chosen host.
    #[serde(default)]
    pub components: std::collections::BTreeMap<String, f64>,
    /// Round-trip time from the user location, when the VM has a latency bound.
    pub rtt_ms: Option<f64>,
    /// Why this host, or why none.
    pub reason: String,
    /// When nothing fits: how many hosts there are ...
    pub total_hosts: Option<usize>,
    /// ... and how many each hard rule excluded (each host counted once, under
    /// the first rule it breaks).
    #[serde(default)]
    pub excluded: std::collections::BTreeMap<String, usize>,
}
