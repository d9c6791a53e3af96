//! Migrations: moving a VM to another host, site, provider or country.
//!
//! A migration is a durable workflow run by the control plane (see
//! `docs/ARCHITECTURE.md`, "Migration"). Its record is the audit trail of
//! where the VM's data has been: every VM keeps its migrations.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How a VM is moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationMode {
    /// Disks mirrored and memory copied while the guest runs; the guest
    /// pauses only for the switch-over.
    Live,
    /// Guest powered down, disk copied (compressed, checksummed), started on
    /// the target.
    Cold,
}

impl MigrationMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationMode::Live => "live",
            MigrationMode::Cold => "cold",
        }
    }
}

/// The mode asked for: `auto` is live when the hosts are compatible, cold
/// otherwise (the migration says why).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RequestedMode {
    Live,
    Cold,
    #[default]
    Auto,
}

/// `POST /api/v1/vms/{key}/migrate`. At most one target selector; without
/// one, the placement engine picks a host other than the current one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrationCreate {
    #[serde(default)]
    pub to_host: Option<String>,
    #[serde(default)]
    pub to_site: Option<String>,
    #[serde(default)]
    pub to_provider: Option<String>,
    /// ISO 3166-1 alpha-2 country code.
    #[serde(default)]
    pub to_country: Option<String>,
    #[serde(default)]
    pub mode: RequestedMode,
}

/// Where a workflow stands. Every phase is recorded in the store before the
/// control plane acts on it.
///
/// ```text
///  live:  preparing_target ─► transferring ─► switching_over ─► cleaning_up ─► completed
///  cold:  transferring (stop, upload) ─► preparing_target (download) ─► switching_over ─► cleaning_up ─► completed
///  any phase before switching_over ─► rolling_back ─► failed   (the VM runs on its source)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// The target host receives the VM: disk created, incoming QEMU waiting
    /// (live), or the disk downloaded (cold).
    PreparingTarget,
    /// Disk and memory move (live), or the stopped disk is uploaded (cold).
    Transferring,
    /// The commit point is recorded: the VM belongs to the target host.
    SwitchingOver,
    /// The source copy is removed.
    CleaningUp,
    Completed,
    /// Undoing: the target copy is removed, then the source resumes.
    RollingBack,
    /// Rolled back: the VM runs (or is stopped, as it was) on its source.
    Failed,
}

impl MigrationPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationPhase::PreparingTarget => "preparing_target",
            MigrationPhase::Transferring => "transferring",
            MigrationPhase::SwitchingOver => "switching_over",
            MigrationPhase::CleaningUp => "cleaning_up",
            MigrationPhase::Completed => "completed",
            MigrationPhase::RollingBack => "rolling_back",
            MigrationPhase::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<MigrationPhase> {
        Some(match s {
            "preparing_target" => MigrationPhase::PreparingTarget,
            "transferring" => MigrationPhase::Transferring,
            "switching_over" => MigrationPhase::SwitchingOver,
            "cleaning_up" => MigrationPhase::CleaningUp,
            "completed" => MigrationPhase::Completed,
            "rolling_back" => MigrationPhase::RollingBack,
            "failed" => MigrationPhase::Failed,
            _ => return None,
        })
    }

    /// Completed or failed: nothing more happens.
    pub fn is_terminal(self) -> bool {
        matches!(self, MigrationPhase::Completed | MigrationPhase::Failed)
    }
}

/// One end of a migration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationEnd {
    pub host_id: String,
    pub host: String,
    pub site: String,
    pub provider: String,
    pub country: String,
}

/// Progress while a migration runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationProgress {
    /// What moves now: `disk`, `memory`, `upload`, `download`, `switch-over`.
    pub stage: String,
    /// Bytes of this stage moved so far.
    pub bytes_done: u64,
    /// Bytes of this stage in all (an estimate while memory is dirtied).
    pub bytes_total: u64,
    /// Bytes per second, recently.
    pub rate_bps: u64,
    /// Seconds left at this rate, when known.
    #[serde(default)]
    pub eta_s: Option<u64>,
    /// Memory passes so far (live: rounds of copying dirtied pages).
    #[serde(default)]
    pub dirty_rounds: u64,
}

impl MigrationProgress {
    /// Progress of `stage`: `done` of `total` bytes, with the rate from
    /// `moved` bytes in `secs` seconds and the time left at that rate.
    pub fn at_rate(
        stage: &str,
        done: u64,
        total: u64,
        moved: u64,
        secs: f64,
        dirty_rounds: u64,
    ) -> MigrationProgress {
        let rate = (moved as f64 / secs.max(0.001)) as u64;
        MigrationProgress {
            stage: stage.into(),
            bytes_done: done,
            bytes_total: total,
            rate_bps: rate,
            eta_s: (rate > 0).then(|| total.saturating_sub(done) / rate),
            dirty_rounds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_estimates_rate_and_eta() {
        let p = MigrationProgress::at_rate("disk", 50, 150, 50, 1.0, 0);
        assert_eq!((p.rate_bps, p.eta_s), (50, Some(2)));
        let p = MigrationProgress::at_rate("disk", 0, 150, 0, 1.0, 0);
        assert_eq!((p.rate_bps, p.eta_s), (0, None));
        // A resumed transfer's rate counts only what moved this time.
        let p = MigrationProgress::at_rate("upload", 120, 150, 20, 1.0, 0);
        assert_eq!((p.rate_bps, p.eta_s), (20, Some(1)));
    }
}

/// A step of the workflow, as it happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationStep {
    pub at: DateTime<Utc>,
    pub phase: MigrationPhase,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Migration {
    pub id: String,
    pub vm_id: String,
    pub vm: String,
    /// The mode used.
    pub mode: MigrationMode,
    pub requested_mode: RequestedMode,
    /// Why this mode (e.g. why `auto` fell back to cold).
    pub mode_reason: String,
    pub phase: MigrationPhase,
    pub source: MigrationEnd,
    pub target: MigrationEnd,
    /// Why the target was chosen.
    pub placement_reason: String,
    #[serde(default)]
    pub progress: Option<MigrationProgress>,
    /// How long the guest did not run (live: paused for the switch-over;
    /// cold: from power-down to running on the target).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// From the request to the end.
    #[serde(default)]
    pub total_ms: Option<u64>,
    /// Bytes moved between the hosts (disk and memory).
    #[serde(default)]
    pub bytes: Option<u64>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub steps: Vec<MigrationStep>,
    /// The guest's power state at the start (a stopped VM stays stopped).
    pub was_running: bool,
    /// The source host began sending (so a rollback must resume it there).
    #[serde(default)]
    pub source_engaged: bool,
    /// Live: the streams are relayed through the control plane (the target
    /// has no migration address, e.g. it is behind NAT).
    #[serde(default)]
    pub relay: bool,
    /// Cold: the disk staged on the control plane, as uploaded and verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// Cold: each data disk staged on the control plane, as uploaded and
    /// verified, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_disks: Vec<StagedDiskSum>,
    /// Set when the migration is part of an evacuation: the hosts emptied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evacuation: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
}

/// A staged disk's content address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StagedDiskSum {
    pub sha256: String,
    pub size_bytes: u64,
}

/// `POST /api/v1/hosts/{key}/evacuate` (and for sites and providers).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EvacuateRequest {
    #[serde(default)]
    pub mode: RequestedMode,
}

/// What an evacuation started: one migration per VM, or why a VM cannot move.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Evacuation {
    pub migrations: Vec<Migration>,
    /// VM name -> why it cannot be moved (e.g. no host satisfies its rules).
    pub refused: std::collections::BTreeMap<String, String>,
}

/// A VM's disk staged on the control plane for export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmExport {
    pub id: String,
    pub vm_id: String,
    pub vm: String,
    /// `uploading`, `ready` or `failed`.
    pub state: String,
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub size_bytes: Option<u64>,
    #[serde(default)]
    pub error: Option<String>,
    /// Where to download the disk (qcow2) once ready.
    pub url_path: String,
    /// Each data disk, in order, once ready: where to download it
    /// (`url_path.N`) and what it is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_disks: Vec<ExportedDisk>,
    pub created_at: DateTime<Utc>,
}

/// A data disk of an export, staged on the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExportedDisk {
    pub url_path: String,
    pub sha256: String,
    pub size_bytes: u64,
}

/// What a rebalance aims at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RebalanceGoal {
    /// Move VMs off hosts whose memory use exceeds the mean by more than
    /// `tolerance` (a fraction of capacity).
    EvenLoad,
    /// Move VMs to sites whose grid carbon per kWh is at least `min_gain`
    /// (a fraction) lower.
    LowerCarbon,
}

/// `POST /api/v1/rebalance`: plan moves that keep every VM's rules, and
/// optionally carry them out as migrations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RebalanceRequest {
    pub goal: RebalanceGoal,
    /// For `even_load` (default 0.1).
    #[serde(default)]
    pub tolerance: Option<f64>,
    /// For `lower_carbon` (default 0.2).
    #[serde(default)]
    pub min_gain: Option<f64>,
    /// Start the moves as migrations (default: only plan).
    #[serde(default)]
    pub execute: bool,
    #[serde(default)]
    pub mode: RequestedMode,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RebalanceMove {
    pub vm: String,
    pub from: String,
    pub to: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Rebalance {
    pub moves: Vec<RebalanceMove>,
    /// VM -> why the goal wanted it moved but it has nowhere to go.
    pub stuck: std::collections::BTreeMap<String, String>,
    /// The migrations started (with `execute`).
    pub migrations: Vec<Migration>,
    /// VM -> why its move could not start (with `execute`).
    pub refused: std::collections::BTreeMap<String, String>,
}
