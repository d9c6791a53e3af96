//! The agent protocol.
//!
//! An agent dials out to the control plane (so a host behind NAT needs no
//! inbound port) and keeps one WebSocket open at `GET /api/v1/agent/connect`,
//! authenticated with its host token. Every frame is one JSON text message:
//! [`AgentMessage`] upstream, [`ServerMessage`] downstream, tagged by `type`.
//!
//! The first message is the agent's [`AgentMessage::Hello`] naming the range
//! of protocol versions it speaks; the server answers [`ServerMessage::Welcome`]
//! with the version both use, or [`ServerMessage::Reject`] and closes. Within a
//! major protocol version, fields are only ever added, and both sides ignore
//! fields they do not know, so agents and the control plane can be upgraded at
//! different times.
//!
//! The control plane is declarative towards the agent: it sends the complete
//! set of VMs the host should have ([`ServerMessage::DesiredState`]) whenever it
//! changes and on every connect. The agent persists it, reconciles its QEMU
//! processes towards it, and reports what it has ([`VmReport`]) on every change
//! and with each heartbeat. Reboot is expressed declaratively too, as a
//! generation counter that the agent compares with the last one it acted on.
//!
//! Version 2 adds migration: a VM in the desired state may carry a
//! [`MigrationRole`] (receive it, send it, or export its disk), and the agent
//! answers with [`MigrationReport`]s. The control plane migrates only between
//! agents that speak version 2, since an older agent would ignore the role
//! and boot the VM from an empty disk.
//!
//! Version 3 makes heartbeats quiet: an agent leaves a heartbeat's VM
//! reports out (`vms_unchanged: true`) when none changed since its previous
//! heartbeat on this connection, so 100,000 idle hosts do not send and parse
//! a million unchanged reports every interval. Changes still travel at once
//! as [`AgentMessage::VmReport`]s, the first heartbeat of a connection is
//! always complete, and so is every twelfth; the control plane asks for a
//! complete one ([`ServerMessage::ReportRequest`]) when it needs the list of
//! VMs a host has (a deletion or a migration waiting to see a VM gone).
//!
//! Version 3 also sends the desired state as changes: after the complete
//! [`ServerMessage::DesiredState`] that starts every connection, the control
//! plane sends [`ServerMessage::DesiredChanges`] (the VMs added or changed,
//! and those removed, relative to the generation the agent has), so a host
//! packed with hundreds of VMs is not sent all of them again for each new
//! one. An agent that finds the base generation is not its own asks for the
//! complete state again ([`AgentMessage::DesiredRequest`]).

use serde::{Deserialize, Serialize};

use crate::migration::{MigrationMode, MigrationProgress};
use crate::{HostInventory, HostUsage, PortForward, PowerState};

/// Newest protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 3;
/// The first version with migration.
pub const MIGRATION_PROTOCOL_VERSION: u32 = 2;
/// The first version with quiet heartbeats (`vms_unchanged`, `report_request`)
/// and desired-state changes (`desired_changes`, `desired_request`).
pub const QUIET_HEARTBEAT_PROTOCOL_VERSION: u32 = 3;
/// The first version with desired-state changes.
pub const DESIRED_CHANGES_PROTOCOL_VERSION: u32 = 3;
/// A v3 agent sends a complete heartbeat at least this often (in beats),
/// even when nothing changed.
pub const FULL_HEARTBEAT_EVERY: u64 = 12;
/// Oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Agent to control plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    Hello {
        /// Newest version the agent speaks.
        protocol: u32,
        /// Oldest version the agent speaks.
        min_protocol: u32,
        /// Boxed (as the migration report below): every message in a
        /// host's queue takes the size of the largest variant, and a
        /// control plane holds a queue per host.
        inventory: Box<HostInventory>,
        /// The host carries virtual networks (its kept network state has
        /// some): the control plane sends it its network state on connect
        /// even when it should carry none now, so that what is left goes.
        /// A host that never carried one is sent none (an added field:
        /// absent when false, ignored by an older control plane).
        #[serde(default, skip_serializing_if = "is_false")]
        networks: bool,
    },
    Heartbeat {
        seq: u64,
        usage: HostUsage,
        /// Every VM the host has, unless `vms_unchanged`.
        #[serde(default)]
        vms: Vec<VmReport>,
        /// (v3) No VM's report changed since this connection's previous
        /// heartbeat: `vms` is left empty and means "as before".
        #[serde(default, skip_serializing_if = "is_false")]
        vms_unchanged: bool,
        /// Migrations and exports in progress on this host (v2).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        migrations: Vec<MigrationReport>,
    },
    /// Sent when a VM's observed state changes, between heartbeats.
    VmReport(VmReport),
    /// A migration's (or export's) state on this host changed, or progress (v2).
    MigrationReport(Box<MigrationReport>),
    /// (v3) A `desired_changes` did not apply to this agent's generation:
    /// send the complete desired state.
    DesiredRequest,
    /// Answer to [`ServerMessage::ConsoleRequest`].
    ConsoleData {
        request_id: u64,
        vm_id: String,
        data: String,
        truncated: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// Control plane to agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Welcome {
        protocol: u32,
        host_id: String,
        heartbeat_interval_s: u64,
        /// The secret the hosts of this host's site share: a host sends it
        /// as a bearer token to its peers' image services, which serve
        /// nothing to a request without it. An added field, as the
        /// protocol's rules allow: an older agent ignores it (and its image
        /// service stays open), an older control plane sends none (and the
        /// agent's image service then serves nobody; its peers fall back
        /// to the control plane).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        site_secret: Option<String>,
    },
    Reject {
        reason: String,
    },
    /// The full set of VMs this host should have. Anything else is removed.
    DesiredState {
        /// Increases with every change; the agent ignores an older one.
        generation: u64,
        vms: Vec<DesiredVm>,
        /// Images to fetch and keep even without a VM that needs them
        /// (pre-staging at a site; only the site's image cache host gets these).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        prestage: Vec<ImageRef>,
    },
    /// (v3) Changes to the desired state the agent has (`base`, the
    /// generation of the last desired state or changes sent on this
    /// connection): VMs added or changed in full, VMs removed by id.
    DesiredChanges {
        generation: u64,
        base: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        upsert: Vec<DesiredVm>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        remove: Vec<String>,
        /// The images to pre-stage, when they changed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prestage: Option<Vec<ImageRef>>,
    },
    ConsoleRequest {
        request_id: u64,
        vm_id: String,
        /// Return at most this many bytes from the end of the log.
        max_bytes: u64,
    },
    /// (v3) Send a complete heartbeat now: the control plane needs the list
    /// of VMs this host has.
    ReportRequest,
    /// The complete virtual-network state this host should have (issue
    /// 27): its networks, NICs, peers and forwarding entries. Anything of
    /// the agent's network data plane not in it is removed; the agent keeps
    /// it on disk and applies it again at start (a rebooted host). An older
    /// agent ignores it, as any message it does not know.
    NetworkState {
        /// Increases with every change; the agent ignores an older one.
        generation: u64,
        state: crate::network::HostNetworkState,
    },
    /// Target of a relayed live migration: the source opened a connection
    /// for `stream` (see [`RELAY_STREAMS`]); dial
    /// `GET /api/v1/relay/{migration_id}/{stream}/{conn_id}` (WebSocket, host
    /// token) and pipe it to the local endpoint of that stream. Older agents
    /// ignore it (and never take a relayed migration: they refuse a live
    /// incoming role without a migration address).
    RelayOpen {
        migration_id: String,
        stream: String,
        conn_id: String,
    },
}

/// The streams of a live migration that may be relayed: QEMU's migration
/// stream and the disk mirror's NBD connection.
pub const RELAY_STREAMS: [&str; 2] = ["migrate", "nbd"];

/// The relay stream of data disk `i`'s mirror (`nbd-0`, ...).
pub fn data_relay_stream(i: usize) -> String {
    format!("nbd-{i}")
}

/// Whether `stream` names a relayed stream: one of [`RELAY_STREAMS`], or a
/// data disk's (`nbd-N`, N below the data disk limit, canonical digits).
pub fn is_relay_stream(stream: &str) -> bool {
    RELAY_STREAMS.contains(&stream) || relay_data_index(stream).is_some()
}

/// The data disk index of relay stream `nbd-N`.
pub fn relay_data_index(stream: &str) -> Option<usize> {
    let n = stream.strip_prefix("nbd-")?;
    let i: usize = n.parse().ok()?;
    (i < crate::validate::MAX_DATA_DISKS && i.to_string() == n).then_some(i)
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A VM as the control plane wants it on this host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredVm {
    pub id: String,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub image: ImageRef,
    #[serde(default)]
    pub user_data: Option<String>,
    #[serde(default)]
    pub ports: Vec<u16>,
    pub power: PowerState,
    pub reboot_generation: u64,
    /// Seconds to wait for an ACPI power-down before forcing the VM off.
    pub stop_timeout_s: u32,
    /// Pin the VM to this QEMU machine type (a migrated VM keeps its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// The site the VM runs at, for the guest's context.
    #[serde(default)]
    pub site: Option<String>,
    /// OpenSSH public keys for the guest's context (added within v1 and v2:
    /// absent when empty, and an older agent ignores it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// Network configuration for the guest's context (added like
    /// `ssh_authorized_keys`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::NetworkConfig>,
    /// Set while the VM is being migrated or exported (v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationRole>,
    /// Disks after the boot disk, in order (added within v3: absent when
    /// there are none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_disks: Vec<DesiredDisk>,
    /// NICs on virtual networks, in order (the guest's eth0, eth1, ...;
    /// added within v3: absent when there are none). None: the user-mode
    /// NIC with the loopback port forwards, as before virtual networks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<DesiredNic>,
}

/// A VM's NIC on a virtual network as the agent plugs it in: QEMU opens
/// `tap`, which the host's network state (`ServerMessage::NetworkState`)
/// creates on the network's bridge; the guest sees `mac`, and the
/// network's DHCP server on the host leases it `ip`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredNic {
    pub id: String,
    /// The network's id.
    pub network: String,
    pub mac: crate::network::MacAddr,
    pub ip: std::net::Ipv4Addr,
    pub prefix: u8,
    /// `v8t-...` ([`crate::network::tap_name`] of the NIC's id).
    pub tap: String,
}

impl DesiredVm {
    /// Sets where the agent fetches every image of the VM first.
    pub fn set_image_sources(&mut self, sources: &[String]) {
        self.image.sources = sources.to_vec();
        for d in &mut self.data_disks {
            if let Some(i) = &mut d.image {
                i.sources = sources.to_vec();
            }
        }
    }
}

/// A data disk as the agent creates it: a copy-on-write copy of `image`
/// (grown to `size_gib` if that is larger), or blank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredDisk {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageRef>,
    #[serde(default)]
    pub size_gib: u64,
}

/// What this host does for a VM on the move.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum MigrationRole {
    /// Target: receive the VM. Never boot it from its disk: a live VM is
    /// resumed from the incoming memory; a cold one waits for the commit,
    /// when the role is removed and the VM is started normally.
    Incoming {
        migration_id: String,
        mode: MigrationMode,
        /// Cold: the disk staged on the control plane.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk: Option<StagedDisk>,
        /// Cold: each data disk staged on the control plane, in order.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        data_disks: Vec<StagedDisk>,
        /// Live: the streams are relayed through the control plane, so
        /// listen on loopback only (the host has no migration address).
        #[serde(default, skip_serializing_if = "is_false")]
        relay: bool,
    },
    /// Source: send the VM. Live: to the target's endpoints; cold: power it
    /// down and upload its disk to `upload_path`, and data disk N to
    /// [`data_disk_path`]`(upload_path, N)`.
    Outgoing {
        migration_id: String,
        mode: MigrationMode,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<LiveEndpoints>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        upload_path: Option<String>,
        /// Live: `target` is the target's loopback; relay each stream through
        /// the control plane (`/api/v1/relay/...`) instead of dialling it.
        #[serde(default, skip_serializing_if = "is_false")]
        relay: bool,
    },
    /// Upload a standalone copy (no backing image) of the stopped VM's disk.
    Export {
        export_id: String,
        upload_path: String,
    },
}

/// Where a live migration's streams go: both are TCP `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveEndpoints {
    /// QEMU's incoming migration stream.
    pub migrate: String,
    /// The NBD server taking the disk mirror.
    pub nbd: String,
    pub export_name: String,
    /// One NBD server per data disk, in order (same export name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_nbd: Vec<String>,
}

/// Where data disk `index` of a cold migration is staged, next to the
/// boot disk's `upload_path` (`/api/v1/staging/ID` -> `/api/v1/staging/ID.N`).
pub fn data_disk_path(upload_path: &str, index: usize) -> String {
    format!("{upload_path}.{index}")
}

/// A disk staged on the control plane (cold migration, export).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedDisk {
    pub url_path: String,
    pub sha256: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationSide {
    Source,
    Target,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationAgentState {
    /// Getting ready (target: image, disk, incoming QEMU; source: powering down).
    Preparing,
    /// Target: ready to receive (live: `endpoints` set), or the cold disk is in place.
    Ready,
    /// Source: disk and memory (or the upload) under way.
    Transferring,
    /// Source: everything sent. Live: the source QEMU is paused for good
    /// unless the control plane rolls back; cold/export: `disk` uploaded.
    Sent,
    /// Target (live): the guest runs here now.
    Resumed,
    Failed,
}

/// What an agent reports of a migration (or export) it takes part in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// The migration's id, or the export's.
    pub migration_id: String,
    pub vm_id: String,
    pub side: MigrationSide,
    pub state: MigrationAgentState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<MigrationProgress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<LiveEndpoints>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<StagedDisk>,
    /// Cold source: each data disk as uploaded, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_disks: Vec<StagedDisk>,
    /// Source (live): QEMU's measured downtime; target: from the end of the
    /// incoming stream to the guest running. Cold source: when it powered down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Bytes this side sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where the agent gets a VM's base image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    pub id: String,
    pub name: String,
    pub sha256: String,
    pub size_bytes: u64,
    /// Path on the control plane, e.g. `/api/v1/images/ID/data`.
    pub url_path: String,
    /// Site-local copies to try first, in order (base URLs of peer agents'
    /// image services); the control plane is the fallback.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
}

/// What the agent observes of one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmReport {
    pub id: String,
    pub phase: AgentVmPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub ports: Vec<PortForward>,
    /// The last reboot generation the agent carried out.
    pub reboot_generation: u64,
    /// The concrete QEMU machine type the VM runs with (v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentVmPhase {
    Provisioning,
    Running,
    Stopping,
    Stopped,
    Failed,
    /// Removed from the host: process gone, disk deleted.
    Deleted,
}

/// Pick the protocol version both sides speak, if any.
pub fn negotiate(agent_min: u32, agent_max: u32) -> Option<u32> {
    let hi = agent_max.min(PROTOCOL_VERSION);
    let lo = agent_min.max(MIN_PROTOCOL_VERSION);
    (lo <= hi).then_some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_streams_name_each_data_disk_once() {
        for s in ["migrate", "nbd", "nbd-0", "nbd-7"] {
            assert!(is_relay_stream(s), "{s}");
        }
        for s in ["nbd-8", "nbd-01", "nbd-", "nbd--1", "nbd-x", "disk", ""] {
            assert!(!is_relay_stream(s), "{s}");
        }
        assert_eq!(relay_data_index(&data_relay_stream(3)), Some(3));
        assert_eq!(
            data_disk_path("/api/v1/staging/ab", 2),
            "/api/v1/staging/ab.2"
        );
    }

    #[test]
    fn negotiation_picks_highest_common_version() {
        assert_eq!(negotiate(1, 1), Some(1));
        assert_eq!(negotiate(1, 7), Some(PROTOCOL_VERSION));
        assert_eq!(negotiate(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 3), None);
        assert_eq!(negotiate(0, 0), None);
    }

    #[test]
    fn unknown_fields_from_a_newer_peer_are_ignored() {
        let raw = r#"{"type":"reject","reason":"x","added_in_v2":true}"#;
        let m: ServerMessage = serde_json::from_str(raw).expect("parse");
        assert_eq!(m, ServerMessage::Reject { reason: "x".into() });
    }

    #[test]
    fn the_site_secret_is_an_optional_addition_to_welcome() {
        // From a control plane that predates it: accepted, no secret.
        let old: ServerMessage = serde_json::from_str(
            r#"{"type":"welcome","protocol":3,"host_id":"h","heartbeat_interval_s":5}"#,
        )
        .expect("old welcome");
        assert!(matches!(
            old,
            ServerMessage::Welcome {
                site_secret: None,
                ..
            }
        ));
        // Left out when there is none; carried when there is.
        let none = ServerMessage::Welcome {
            protocol: 3,
            host_id: "h".into(),
            heartbeat_interval_s: 5,
            site_secret: None,
        };
        let text = serde_json::to_string(&none).expect("json");
        assert!(!text.contains("site_secret"), "{text}");
        let with = ServerMessage::Welcome {
            protocol: 3,
            host_id: "h".into(),
            heartbeat_interval_s: 5,
            site_secret: Some("s".into()),
        };
        let back: ServerMessage =
            serde_json::from_str(&serde_json::to_string(&with).expect("json")).expect("parse");
        assert_eq!(back, with);
    }

    #[test]
    fn relay_fields_are_optional_and_relay_open_is_tagged() {
        let raw = r#"{"role":"outgoing","migration_id":"m","mode":"live"}"#;
        let r: MigrationRole = serde_json::from_str(raw).expect("parse");
        assert!(matches!(r, MigrationRole::Outgoing { relay: false, .. }));
        let v = serde_json::to_value(&r).expect("json");
        assert!(v.get("relay").is_none(), "{v}");
        let m = ServerMessage::RelayOpen {
            migration_id: "m".into(),
            stream: "nbd".into(),
            conn_id: "c".into(),
        };
        let v = serde_json::to_value(&m).expect("json");
        assert_eq!(v["type"], "relay_open");
    }

    #[test]
    fn guest_context_fields_are_optional_both_ways() {
        // From an older control plane: no keys, no network.
        let raw = r#"{"id":"v","name":"web","vcpus":1,"memory_mib":128,"disk_gib":1,
            "image":{"id":"i","name":"img","sha256":"00","size_bytes":1,"url_path":"/x"},
            "power":"running","reboot_generation":0,"stop_timeout_s":30}"#;
        let mut d: DesiredVm = serde_json::from_str(raw).expect("parse");
        assert!(d.ssh_authorized_keys.is_empty() && d.network.is_none());
        // Without them nothing new is sent, so an older agent sees what it knew.
        let v = serde_json::to_value(&d).expect("json");
        assert!(
            v.get("ssh_authorized_keys").is_none() && v.get("network").is_none(),
            "{v}"
        );
        d.ssh_authorized_keys = vec!["ssh-ed25519 AAAA k".into()];
        d.network = Some(crate::NetworkConfig {
            ethernets: vec![crate::EthernetConfig {
                dhcp4: true,
                ..Default::default()
            }],
        });
        let v = serde_json::to_value(&d).expect("json");
        assert_eq!(v["ssh_authorized_keys"][0], "ssh-ed25519 AAAA k");
        assert_eq!(v["network"]["ethernets"][0]["dhcp4"], true);
        let back: DesiredVm = serde_json::from_value(v).expect("back");
        assert_eq!(back, d);
    }

    #[test]
    fn nics_and_the_hello_networks_flag_are_optional_both_ways() {
        // From an older control plane: no NICs (the user-mode NIC).
        let raw = r#"{"id":"v","name":"web","vcpus":1,"memory_mib":128,"disk_gib":1,
            "image":{"id":"i","name":"img","sha256":"00","size_bytes":1,"url_path":"/x"},
            "power":"running","reboot_generation":0,"stop_timeout_s":30}"#;
        let mut d: DesiredVm = serde_json::from_str(raw).expect("parse");
        assert!(d.nics.is_empty());
        let v = serde_json::to_value(&d).expect("json");
        assert!(
            v.get("nics").is_none(),
            "nothing new for an older agent: {v}"
        );
        d.nics = vec![DesiredNic {
            id: "nic-1".into(),
            network: "net-1".into(),
            mac: crate::network::mac_for_nic("nic-1"),
            ip: "10.0.0.5".parse().expect("ip"),
            prefix: 24,
            tap: crate::network::tap_name("nic-1"),
        }];
        let v = serde_json::to_value(&d).expect("json");
        assert_eq!(v["nics"][0]["tap"], crate::network::tap_name("nic-1"));
        let back: DesiredVm = serde_json::from_value(v).expect("back");
        assert_eq!(back, d);
        // An older agent's hello: carries no networks.
        let old = r#"{"type":"hello","protocol":3,"min_protocol":1,"inventory":{"hostname":"h",
            "arch":"x86_64","vcpus":1,"memory_mib":1,"disk_gib":1,"cpu_model":"c",
            "hypervisor":"emulation","agent_version":"0"}}"#;
        let h: AgentMessage = serde_json::from_str(old).expect("old hello");
        assert!(matches!(
            h,
            AgentMessage::Hello {
                networks: false,
                ..
            }
        ));
        let text = serde_json::to_string(&h).expect("json");
        assert!(!text.contains("networks"), "{text}");
    }

    #[test]
    fn messages_are_tagged_by_type() {
        let m = AgentMessage::ConsoleData {
            request_id: 3,
            vm_id: "v".into(),
            data: "boot".into(),
            truncated: false,
            error: None,
        };
        let v = serde_json::to_value(&m).expect("json");
        assert_eq!(v["type"], "console_data");
        let back: AgentMessage = serde_json::from_value(v).expect("back");
        assert_eq!(back, m);
    }
}
