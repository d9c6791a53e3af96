//! Accountability records: the audit log of changing API calls, each VM's
//! residency trail (where its data has been), and showback (what the use
//! of the continuum cost, in money and in carbon).
//!
//! Wire types only; the rules are the control plane's
//! (`virt8ra_server::http::audit`, `services::usage`) and the store's
//! (the residency trail is written with the VM's own writes).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One changing call (`POST`, `PUT`, `PATCH`, `DELETE`) as the control
/// plane answered it, refused ones included. Written durably before the
/// answer left, never changed afterwards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditRecord {
    /// Position in the log: increases with every record, never reused.
    pub seq: u64,
    /// When the answer was ready (the change, if any, was committed).
    pub at: DateTime<Utc>,
    /// The request's id (also sent back as `X-Request-Id`).
    pub request_id: String,
    pub actor: AuditActor,
    pub method: String,
    /// The route template matched (`/api/v1/vms/{key}`), `unmatched` when
    /// no route matched.
    pub route: String,
    /// What the call named: the path under `/api/v1/`, and for a create
    /// the new resource's name (`vms/web`, `vms/web/migrate`).
    pub resource: String,
    /// The HTTP status of the answer.
    pub status: u16,
    /// The address the call came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_addr: Option<String>,
}

/// Who made a call: the credential it presented (none when it had none,
/// or one that was not valid).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditActor {
    /// The token's id (never its secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// `admin`, `host` or `join`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_kind: Option<String>,
    /// The host a host token belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
    /// The user the token belongs to (with per-user tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The project the token is scoped to (with per-project tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

/// Why a VM's data came to be where an interval of its trail says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResidencyReason {
    /// Placed when it was created.
    Created,
    /// Placed when it was created from imported disks (`vm import`: the
    /// VM carries the label `virt8ra.io/imported-from`, which says where
    /// they came from).
    Imported,
    /// Placed later (it was pending), or placed again after losing its host.
    Placed,
    LiveMigration,
    ColdMigration,
    /// Moved by the evacuation of its host, site or provider.
    Evacuation,
    /// A copy of its disks exported and staged on the control plane.
    Export,
}

impl ResidencyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ResidencyReason::Created => "created",
            ResidencyReason::Imported => "imported",
            ResidencyReason::Placed => "placed",
            ResidencyReason::LiveMigration => "live_migration",
            ResidencyReason::ColdMigration => "cold_migration",
            ResidencyReason::Evacuation => "evacuation",
            ResidencyReason::Export => "export",
        }
    }
}

/// One interval of a VM's residency trail: its data was at one place
/// (on a host, or staged on the control plane as an export) from `from`
/// to `to` (absent: still there), with the VM's size meanwhile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ResidencyInterval {
    pub vm_id: String,
    pub vm: String,
    /// Position in the VM's trail, from 1.
    pub seq: u64,
    /// `vm` for the VM itself (running or stopped on a host), `export:ID`
    /// for an exported copy. Intervals of one copy never overlap; a VM
    /// and its exports may be in two places at once.
    pub copy: String,
    pub reason: ResidencyReason,
    /// What moved it there (e.g. the migration and where from).
    pub detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
    /// Absent for a copy staged on the control plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The boot disk and every data disk, in GiB.
    pub disk_gib: u64,
    pub from: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<DateTime<Utc>>,
    /// What ended the interval (deleted, the migration that moved it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_by: Option<String>,
}

/// `GET /api/v1/vms/{key}/history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmHistory {
    pub vm_id: String,
    pub vm: String,
    /// Oldest first.
    pub intervals: Vec<ResidencyInterval>,
    /// Every country the VM's data has been in, sorted.
    pub countries: Vec<String>,
}

/// How much of one kind of use, what it cost and what it emitted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageAmounts {
    pub vcpu_hours: f64,
    /// Memory: GiB-hours.
    pub gib_hours: f64,
    pub disk_gib_hours: f64,
    /// EUR at the sites' prices (a site without a price adds nothing).
    pub cost_eur: f64,
    /// Energy by the power model, the sites' PUE included.
    pub energy_kwh: f64,
    /// gCO2eq from each site's grid intensity (a site without one adds
    /// nothing; `unknown_carbon_hours` says how much that left out).
    pub carbon_g: f64,
    /// Hours of use at sites without a grid intensity.
    pub unknown_carbon_hours: f64,
}

/// One VM's use in the month, in total and per site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmUsage {
    pub vm_id: String,
    pub vm: String,
    /// The key rows are totalled by: the VM's project (`-` for a VM
    /// deleted before the report was asked for).
    pub group: String,
    #[serde(flatten)]
    pub amounts: UsageAmounts,
    /// Per site the VM ran at in the month.
    pub sites: Vec<SiteUsage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SiteUsage {
    pub site: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    pub hours: f64,
    #[serde(flatten)]
    pub amounts: UsageAmounts,
}

/// The power model that turns use into energy: watts per vCPU plus watts
/// per GiB of memory plus watts per GiB of disk, times the site's PUE.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PowerModel {
    pub watts_per_vcpu: f64,
    pub watts_per_gib_memory: f64,
    pub watts_per_gib_disk: f64,
    /// PUE taken for a site that gives none.
    pub default_pue: f64,
}

/// `GET /api/v1/usage?month=YYYY-MM`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageReport {
    pub month: String,
    pub from: DateTime<Utc>,
    /// The end of the month, or now for the month under way.
    pub to: DateTime<Utc>,
    pub power_model: PowerModel,
    pub vms: Vec<VmUsage>,
    /// Per group key (see `VmUsage.group`).
    pub groups: std::collections::BTreeMap<String, UsageAmounts>,
    pub total: UsageAmounts,
}
