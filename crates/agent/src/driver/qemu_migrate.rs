//! Live migration and disk transfer with QEMU.
//!
//! Live, with local (non-shared) disks, between two hosts:
//!
//! ```text
//!  target                                   source
//!  qemu-nbd exports the new overlay  ◄────  drive-mirror (sync=top: only the VM's own
//!  (writable, on the migration address)     blocks; both hosts hold the same base image)
//!  QEMU -incoming defer -S,                 … mirror ready: writes now go to both sides
//!  late-block-activate               ◄────  migrate (pre-copy rounds of dirty memory),
//!                                           pause-before-switchover:
//!                                           guest stopped → block-job-cancel (the mirror
//!                                           completes: the target disk is identical)
//!                                           → migrate-continue → completed (postmigrate)
//!  incoming done (paused): stop qemu-nbd,
//!  cont → the guest runs here
//! ```
//!
//! The target takes the disk through a separate `qemu-nbd` because QEMU 7.2
//! cannot export a node of an incoming VM writably; with `late-block-activate`
//! the incoming QEMU opens the disk only at `cont`, after qemu-nbd has
//! flushed and exited, so it reads the mirrored metadata fresh.
//!
//! Under emulation (TCG) the source stops the guest before `migrate`, so its
//! memory goes in one pass with nothing running (issue 35). QEMU 7.2's TCG
//! loses guest writes during pre-copy: after a dirty-bitmap sync clears
//! bits through its 64-bit fast path it does not reset the vCPU's TLB
//! entries to "not dirty", so later stores through those entries set no
//! dirty bit and the page is never sent again (fixed upstream for QEMU 9.0:
//! "physmem: Fix migration dirty bitmap coherency with TCG memory access",
//! N. Piggin, 2024; Debian 12's 7.2.22 lacks it). The target then runs on
//! stale pages: processes hang or crash, or the guest kernel panics, more
//! often the longer pre-copy runs (a loaded host). The price is downtime:
//! the whole memory copy. Under KVM, whose dirty log is exact, pre-copy
//! stays live.
//!
//! The source never resumes by itself once it sent the VM: only an explicit
//! rollback ([`QemuDriver::abort_outgoing`]) does, and the control plane asks
//! for one only after the target copy is gone. That is what keeps exactly one
//! copy running.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use virt8ra_api::protocol::LiveEndpoints;
use virt8ra_api::{Hypervisor, MigrationProgress};

use super::qemu::{dir_processes, QemuDriver};
use super::{qmp, Driver, DriverError, Result, SendOutcome, VmConfig};

/// Job id of the disk mirror on the source.
const MIRROR_JOB: &str = "virt8ra-mirror";

/// The mirror job of data disk `i`.
fn data_mirror_job(i: usize) -> String {
    format!("{MIRROR_JOB}-data{i}")
}
/// The NBD export's name on the target.
const EXPORT_NAME: &str = "disk0";

/// What the target recorded about its incoming VM (`incoming.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IncomingRecord {
    migration_id: String,
    endpoints: LiveEndpoints,
}

/// The target's incoming VM, as observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncomingState {
    /// No incoming QEMU for this migration.
    Absent,
    /// Waiting for (or receiving) the stream.
    Waiting,
    /// The stream is complete; the guest is paused here.
    Received,
    /// The guest runs here.
    Running,
}

/// What the source recorded about the migration it sends (`outgoing.json`):
/// QEMU's own status cannot tell this migration from an earlier one (a VM
/// that arrived here reports its incoming migration as `completed`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct OutgoingRecord {
    migration_id: String,
    #[serde(default)]
    outcome: Option<SendOutcome>,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DriverError {
    let what = what.into();
    move |e| DriverError::Io(what, e)
}

fn free_port(host: &str) -> Result<u16> {
    let l = std::net::TcpListener::bind((host, 0)).map_err(io_err(format!(
        "bind a port on the migration address {host}"
    )))?;
    Ok(l.local_addr().map_err(io_err("local address"))?.port())
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

impl QemuDriver {
    fn qmp_path(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join("qmp.sock")
    }

    async fn qmp(&self, id: &str, cmd: &str, args: Option<Value>) -> Result<Value> {
        qmp::execute(&self.qmp_path(id), cmd, args).await
    }

    /// The QEMU block devices of the VM's disks, from one `query-block`:
    /// the boot disk's, then each data disk's in order (`data0`, ...).
    async fn disk_devices(&self, id: &str) -> Result<(String, Vec<String>)> {
        let v = self.qmp(id, "query-block", None).await?;
        let blocks = v.as_array().map(Vec::as_slice).unwrap_or_default();
        let boot = blocks
            .iter()
            .find(|b| {
                b["inserted"]["file"]
                    .as_str()
                    .is_some_and(|f| f.ends_with("disk.qcow2"))
            })
            .and_then(|b| b["device"].as_str().map(str::to_string))
            .ok_or_else(|| DriverError::Qmp(format!("VM {id}: no disk device found")))?;
        let named = |name: &str| blocks.iter().any(|b| b["device"].as_str() == Some(name));
        let data = (0..)
            .map(|i| format!("data{i}"))
            .take_while(|d| named(d))
            .collect();
        Ok((boot, data))
    }

    /// Starts mirror job `job` of `device` to the NBD export at `endpoint`.
    async fn start_mirror(
        &self,
        id: &str,
        job: &str,
        device: &str,
        endpoint: &str,
        export_name: &str,
    ) -> Result<()> {
        let (host, port) = endpoint
            .rsplit_once(':')
            .ok_or_else(|| DriverError::Other(format!("bad NBD endpoint {endpoint:?}")))?;
        self.qmp(
            id,
            "drive-mirror",
            Some(json!({
                "job-id": job, "device": device,
                "target": format!("nbd:{host}:{port}:exportname={export_name}"),
                "sync": "top", "mode": "existing", "format": "raw",
            })),
        )
        .await?;
        Ok(())
    }

    /// Cancels every mirror of the VM without completing it and waits
    /// until they are gone (an interrupted attempt, or a rollback).
    async fn drop_mirrors(&self, id: &str) -> Result<()> {
        for job in self.mirror_jobs(id).await? {
            let _ = self
                .qmp(
                    id,
                    "block-job-cancel",
                    Some(json!({"device": job["device"], "force": true})),
                )
                .await;
        }
        self.wait_mirror_gone(id, Duration::from_secs(30)).await
    }

    /// Target: creates the VM's disk and starts QEMU waiting for the
    /// incoming stream, with qemu-nbd taking the disk mirror. Idempotent: an
    /// incoming QEMU already waiting for this migration is kept.
    pub async fn start_incoming(
        &self,
        cfg: &VmConfig,
        migration_id: &str,
        listen: &str,
    ) -> Result<LiveEndpoints> {
        let dir = self.vm_dir(&cfg.id);
        let record_path = dir.join("incoming.json");
        if let Ok(b) = std::fs::read(&record_path) {
            if let Ok(r) = serde_json::from_slice::<IncomingRecord>(&b) {
                if r.migration_id == migration_id && self.running_pid(&cfg.id).is_some() {
                    return Ok(r.endpoints);
                }
            }
        }
        // A leftover from an earlier attempt: start clean.
        self.kill_nbd(&cfg.id).await;
        super::Driver::destroy(self, &cfg.id).await?;
        super::Driver::prepare(self, cfg).await?;
        let nbd_port = free_port(listen)?;
        let mig_port = free_port(listen)?;
        self.start_nbd(&dir, listen, nbd_port, "nbd.pid", &dir.join("disk.qcow2"))
            .await?;
        // One more qemu-nbd per data disk, each on its own port.
        let mut data_nbd = Vec::with_capacity(cfg.data_disks.len());
        for i in 0..cfg.data_disks.len() {
            let port = free_port(listen)?;
            self.start_nbd(
                &dir,
                listen,
                port,
                &format!("nbd-{i}.pid"),
                &dir.join(super::data_disk_file(i)),
            )
            .await?;
            data_nbd.push(format!("{listen}:{port}"));
        }
        let mut args = self.command_line(cfg);
        args.extend(["-incoming".into(), "defer".into(), "-S".into()]);
        self.spawn_qemu(cfg, args).await?;
        self.qmp(
            &cfg.id,
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": "late-block-activate", "state": true}]})),
        )
        .await?;
        self.qmp(
            &cfg.id,
            "migrate-incoming",
            Some(json!({"uri": format!("tcp:{listen}:{mig_port}")})),
        )
        .await?;
        let endpoints = LiveEndpoints {
            migrate: format!("{listen}:{mig_port}"),
            nbd: format!("{listen}:{nbd_port}"),
            export_name: EXPORT_NAME.into(),
            data_nbd,
        };
        let rec = IncomingRecord {
            migration_id: migration_id.to_string(),
            endpoints: endpoints.clone(),
        };
        let b = serde_json::to_vec(&rec).map_err(|e| DriverError::Other(e.to_string()))?;
        crate::durable::write_atomic(&record_path, &b).map_err(io_err("write incoming.json"))?;
        Ok(endpoints)
    }

    /// Target: serves `disk` over NBD on `listen:port` for a mirror to
    /// write (a daemon, found again by the VM directory in its command line).
    async fn start_nbd(
        &self,
        dir: &Path,
        listen: &str,
        port: u16,
        pid_file: &str,
        disk: &Path,
    ) -> Result<()> {
        let out = tokio::process::Command::new("qemu-nbd")
            .args([
                "--fork",
                "--persistent",
                "-f",
                "qcow2",
                "-x",
                EXPORT_NAME,
                "-b",
                listen,
            ])
            .args(["-p", &port.to_string(), "--cache=writeback", "--pid-file"])
            .arg(dir.join(pid_file))
            .arg(disk)
            .output()
            .await
            .map_err(|e| DriverError::Start(format!("cannot run qemu-nbd (qemu-utils): {e}")))?;
        if !out.status.success() {
            return Err(DriverError::Start(format!(
                "qemu-nbd failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Target: where the incoming VM of `migration_id` stands.
    pub async fn incoming_state(&self, id: &str, migration_id: &str) -> IncomingState {
        let rec = std::fs::read(self.vm_dir(id).join("incoming.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<IncomingRecord>(&b).ok());
        let ours = rec.is_some_and(|r| r.migration_id == migration_id);
        if !ours || self.running_pid(id).is_none() {
            return IncomingState::Absent;
        }
        match qmp::query_status(&self.qmp_path(id)).await.as_deref() {
            Ok("inmigrate") => IncomingState::Waiting,
            Ok("running") => IncomingState::Running,
            Ok("paused") | Ok("prelaunch") => IncomingState::Received,
            // Unreadable for a moment (QEMU busy loading): keep waiting.
            _ => IncomingState::Waiting,
        }
    }

    /// Target: the stream is complete; hand the disk back from qemu-nbd to
    /// QEMU and run the guest. Returns how long that took (ms).
    pub async fn finish_incoming(&self, id: &str) -> Result<u64> {
        let t = Instant::now();
        self.kill_nbd(id).await;
        self.qmp(id, "cont", None).await?;
        // incoming.json stays (it goes with the VM's directory): an agent
        // restarted before it reported the guest running finds it, and
        // `start_incoming` keeps the guest instead of starting afresh over
        // it.
        Ok(t.elapsed().as_millis() as u64)
    }

    /// Target: waits for the stream to complete, then resumes the guest.
    /// Returns the time from noticing completion to running (ms).
    pub async fn await_incoming(&self, id: &str, migration_id: &str) -> Result<u64> {
        loop {
            match self.incoming_state(id, migration_id).await {
                // Polled often (part of the downtime), not so often that the
                // monitor slows the incoming stream down.
                IncomingState::Waiting => tokio::time::sleep(Duration::from_millis(5)).await,
                IncomingState::Received => return self.finish_incoming(id).await,
                IncomingState::Running => {
                    self.kill_nbd(id).await;
                    return Ok(0);
                }
                IncomingState::Absent => {
                    return Err(DriverError::Other(
                        "the incoming QEMU went away before the VM arrived".into(),
                    ))
                }
            }
        }
    }

    /// Ends the VM's qemu-nbd, if any, and waits until it is gone (so its
    /// writes are on disk).
    pub async fn kill_nbd(&self, id: &str) {
        let dir = self.vm_dir(id);
        for sig in [rustix::process::Signal::TERM, rustix::process::Signal::KILL] {
            let pids = dir_processes(&dir, "qemu-nbd");
            if pids.is_empty() {
                break;
            }
            for pid in &pids {
                if let Some(p) = rustix::process::Pid::from_raw(*pid) {
                    let _ = rustix::process::kill_process(p, sig);
                }
            }
            let start = Instant::now();
            while !dir_processes(&dir, "qemu-nbd").is_empty()
                && start.elapsed() < Duration::from_secs(5)
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let _ = std::fs::remove_file(dir.join("nbd.pid"));
    }

    /// Source: sends the running VM to `target`: disk mirror, then memory,
    /// then the switch-over. Resumable: it picks up from whatever QEMU is
    /// doing (after an agent restart). `progress` is called as it goes.
    pub async fn send_live(
        &self,
        id: &str,
        migration_id: &str,
        target: &LiveEndpoints,
        progress: &(dyn Fn(MigrationProgress) + Send + Sync),
    ) -> Result<SendOutcome> {
        if self.running_pid(id).is_none() {
            return Err(DriverError::Other(format!("VM {id} is not running")));
        }
        let record_path = self.vm_dir(id).join("outgoing.json");
        let record: Option<OutgoingRecord> = std::fs::read(&record_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(|r: &OutgoingRecord| r.migration_id == migration_id);
        let status = self.migrate_status(id).await?;
        if let Some(o) = record.as_ref().and_then(|r| r.outcome) {
            return Ok(o);
        }
        let ours_in_flight = record.is_some()
            && matches!(
                status["status"].as_str(),
                Some("active")
                    | Some("pre-switchover")
                    | Some("device")
                    | Some("setup")
                    | Some("completed")
            );
        let (device, data) = self.disk_devices(id).await?;
        if data.len() != target.data_nbd.len() {
            return Err(DriverError::Other(format!(
                "the VM has {} data disk(s) but the target takes {}",
                data.len(),
                target.data_nbd.len()
            )));
        }
        // When this call stopped the guest before its memory copy.
        let stopped_at = if ours_in_flight {
            None
        } else {
            self.start_outgoing(id, migration_id, target, (&device, &data), progress)
                .await?
        };
        self.follow_outgoing(id, migration_id, stopped_at, progress)
            .await
    }

    /// Starts sending `id`: records the attempt (`outgoing.json`), mirrors
    /// every disk to the target's exports until the mirrors are ready, then
    /// starts QEMU's migration. Returns when it stopped the guest for the
    /// memory copy (under emulation), to count the downtime from there.
    async fn start_outgoing(
        &self,
        id: &str,
        migration_id: &str,
        target: &LiveEndpoints,
        (device, data): (&str, &[String]),
        progress: &(dyn Fn(MigrationProgress) + Send + Sync),
    ) -> Result<Option<Instant>> {
        let record_path = self.vm_dir(id).join("outgoing.json");
        let rec = OutgoingRecord {
            migration_id: migration_id.to_string(),
            outcome: None,
        };
        let b = serde_json::to_vec(&rec).map_err(|e| DriverError::Other(e.to_string()))?;
        crate::durable::write_atomic(&record_path, &b).map_err(io_err("write outgoing.json"))?;
        // (Re)start: mirrors left over from an interrupted attempt are dropped.
        self.drop_mirrors(id).await?;
        self.start_mirror(id, MIRROR_JOB, device, &target.nbd, &target.export_name)
            .await?;
        // Each data disk to its own export, the same way.
        for (i, (dev, ep)) in data.iter().zip(&target.data_nbd).enumerate() {
            self.start_mirror(id, &data_mirror_job(i), dev, ep, &target.export_name)
                .await?;
        }
        let started = Instant::now();
        loop {
            let jobs = self.mirror_jobs(id).await?;
            if jobs.len() < 1 + data.len() {
                return Err(DriverError::Other(
                    "a disk mirror stopped before it was ready".into(),
                ));
            }
            if let Some(e) = jobs.iter().find_map(|j| j["error"].as_str()) {
                return Err(DriverError::Other(format!("disk mirror: {e}")));
            }
            let done: u64 = jobs.iter().map(|j| u(j, "offset")).sum();
            let len: u64 = jobs.iter().map(|j| u(j, "len")).sum();
            let secs = started.elapsed().as_secs_f64();
            progress(MigrationProgress::at_rate("disk", done, len, done, secs, 0));
            if jobs.iter().all(|j| j["ready"].as_bool() == Some(true)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.qmp(
            id,
            "migrate-set-capabilities",
            Some(json!({"capabilities": [
                {"capability": "pause-before-switchover", "state": true},
                {"capability": "events", "state": true}]})),
        )
        .await?;
        self.qmp(
            id,
            "migrate-set-parameters",
            // QEMU switches over once it expects to copy the rest
            // within this many ms (its default is 300).
            Some(json!({"downtime-limit": 30, "max-bandwidth": 10u64 << 30})),
        )
        .await?;
        let mut stopped_at = None;
        if self.hypervisor() == Hypervisor::Emulation {
            // QEMU 7.2 under TCG loses guest writes during pre-copy (the
            // module doc): the memory goes in one pass, guest stopped.
            stopped_at = Some(Instant::now());
            self.qmp(id, "stop", None).await?;
        }
        self.qmp(
            id,
            "migrate",
            Some(json!({"uri": format!("tcp:{}", target.migrate)})),
        )
        .await?;
        Ok(stopped_at)
    }

    /// Follows QEMU's migration of `id` to its end: at the pause before the
    /// switch-over, lets the disk mirrors finish and continues; on
    /// completion records the outcome in `outgoing.json`.
    async fn follow_outgoing(
        &self,
        id: &str,
        migration_id: &str,
        stopped_at: Option<Instant>,
        progress: &(dyn Fn(MigrationProgress) + Send + Sync),
    ) -> Result<SendOutcome> {
        let record_path = self.vm_dir(id).join("outgoing.json");
        let started = Instant::now();
        let mut mirror_bytes = 0u64;
        let mut continued = false;
        loop {
            let status = self.migrate_status(id).await?;
            let ram = &status["ram"];
            match status["status"].as_str().unwrap_or("none") {
                "active" | "setup" | "device" => {
                    let done = u(ram, "transferred");
                    progress(MigrationProgress {
                        stage: "memory".into(),
                        bytes_done: done,
                        bytes_total: done + u(ram, "remaining"),
                        rate_bps: (ram["mbps"].as_f64().unwrap_or(0.0) * 1e6 / 8.0) as u64,
                        eta_s: None,
                        dirty_rounds: u(ram, "dirty-sync-count"),
                    });
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                "pre-switchover" if continued => {
                    // The continue was taken; QEMU switches state shortly.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                "pre-switchover" => {
                    // The guest is stopped: let the mirror finish, so the
                    // target disk is exactly the source's, then switch.
                    let jobs = self.mirror_jobs(id).await?;
                    for job in &jobs {
                        mirror_bytes += u(job, "offset");
                        self.qmp(
                            id,
                            "block-job-cancel",
                            Some(json!({"device": job["device"]})),
                        )
                        .await?;
                    }
                    if let Err(e) = self.wait_mirror_gone(id, Duration::from_secs(60)).await {
                        let _ = self.qmp(id, "migrate_cancel", None).await;
                        return Err(e);
                    }
                    self.qmp(
                        id,
                        "migrate-continue",
                        Some(json!({"state": "pre-switchover"})),
                    )
                    .await?;
                    continued = true;
                }
                "completed" => {
                    // Stopped before the copy: the guest was down since then.
                    let ours = stopped_at.map_or(0, |t| t.elapsed().as_millis() as u64);
                    let o = SendOutcome {
                        downtime_ms: u(&status, "downtime").max(ours),
                        bytes: u(ram, "transferred") + mirror_bytes,
                    };
                    let rec = OutgoingRecord {
                        migration_id: migration_id.to_string(),
                        outcome: Some(o),
                    };
                    let b = serde_json::to_vec(&rec).unwrap_or_default();
                    let _ = crate::durable::write_atomic(&record_path, &b);
                    progress(MigrationProgress {
                        stage: "switch-over".into(),
                        bytes_done: o.bytes,
                        bytes_total: o.bytes,
                        rate_bps: 0,
                        eta_s: Some(0),
                        dirty_rounds: u(ram, "dirty-sync-count"),
                    });
                    return Ok(o);
                }
                other => {
                    let why = status["error-desc"].as_str().unwrap_or("no reason given");
                    return Err(DriverError::Other(format!(
                        "QEMU migration {other} after {} ms: {why}",
                        started.elapsed().as_millis()
                    )));
                }
            }
        }
    }

    async fn migrate_status(&self, id: &str) -> Result<Value> {
        self.qmp(id, "query-migrate", None).await
    }

    /// This agent's disk mirror jobs on the VM: the boot disk's and each
    /// data disk's.
    async fn mirror_jobs(&self, id: &str) -> Result<Vec<Value>> {
        let jobs = self.qmp(id, "query-block-jobs", None).await?;
        Ok(jobs
            .as_array()
            .into_iter()
            .flatten()
            .filter(|j| {
                j["device"]
                    .as_str()
                    .is_some_and(|d| d == MIRROR_JOB || d.starts_with(&format!("{MIRROR_JOB}-")))
            })
            .cloned()
            .collect())
    }

    async fn wait_mirror_gone(&self, id: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while !self.mirror_jobs(id).await?.is_empty() {
            if start.elapsed() > timeout {
                return Err(DriverError::Other(format!(
                    "the disk mirror did not finish within {} s",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    /// Source, rollback: stops an outgoing migration and runs the guest here
    /// again. Only called once the target copy is gone.
    pub async fn abort_outgoing(&self, id: &str) -> Result<()> {
        let _ = std::fs::remove_file(self.vm_dir(id).join("outgoing.json"));
        if self.running_pid(id).is_none() {
            return Ok(()); // the reconciler starts it from its disk
        }
        let st = self.migrate_status(id).await?;
        if matches!(
            st["status"].as_str(),
            Some("active") | Some("pre-switchover") | Some("setup") | Some("device")
        ) {
            let _ = self.qmp(id, "migrate_cancel", None).await;
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                let s = self.migrate_status(id).await?;
                if !matches!(
                    s["status"].as_str(),
                    Some("active") | Some("pre-switchover") | Some("cancelling")
                ) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.drop_mirrors(id).await?;
        let status = qmp::query_status(&self.qmp_path(id)).await?;
        if status != "running" {
            self.qmp(id, "cont", None).await?;
        }
        Ok(())
    }

    /// Writes the VM's disk as a compressed qcow2 at `out`: only the VM's
    /// own blocks over `backing` (cold migration), or standalone when
    /// `backing` is `None` (export). The VM must be stopped.
    pub async fn export_disk(&self, id: &str, backing: Option<&Path>, out: &Path) -> Result<()> {
        self.export_file(id, "disk.qcow2", backing, out).await
    }

    /// [`Self::export_disk`] of the VM's file `name` (a data disk's too).
    pub async fn export_file(
        &self,
        id: &str,
        name: &str,
        backing: Option<&Path>,
        out: &Path,
    ) -> Result<()> {
        let disk = self.vm_dir(id).join(name).to_string_lossy().to_string();
        let tmp = out.with_extension("tmp");
        let tmp_s = tmp.to_string_lossy().to_string();
        let base = match backing {
            Some(b) => Some(
                std::fs::canonicalize(b)
                    .map_err(io_err(format!("base {}", b.display())))?
                    .to_string_lossy()
                    .to_string(),
            ),
            None => None,
        };
        let mut args = vec!["convert", "-c", "-O", "qcow2"];
        if let Some(b) = &base {
            args.extend(["-F", "qcow2", "-B", b]);
        }
        args.extend([disk.as_str(), tmp_s.as_str()]);
        if let Err(e) = super::qemu::qemu_img(&args).await {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, out).map_err(io_err("store the exported disk"))?;
        Ok(())
    }

    /// Target, cold: makes `file` (a qcow2 over the same base image, as
    /// [`Self::export_disk`] wrote it) the VM's disk, pointing it at this
    /// host's copy of the base.
    pub async fn adopt_disk(&self, cfg: &VmConfig, file: &Path) -> Result<()> {
        check_staged(file, true).await?;
        let dir = self.vm_dir(&cfg.id);
        std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
        rebase(file, &cfg.base_image).await?;
        super::cloudinit::write_seed(&dir, &cfg.context).await?;
        std::fs::rename(file, dir.join("disk.qcow2")).map_err(io_err("adopt the disk"))?;
        Ok(())
    }

    /// [`Self::adopt_disk`] for data disk `index`: over this host's copy of
    /// its image, or standalone (a blank disk was exported without one).
    pub async fn adopt_data_disk(&self, cfg: &VmConfig, index: usize, file: &Path) -> Result<()> {
        let Some(d) = cfg.data_disks.get(index) else {
            return Err(DriverError::Other(format!(
                "VM {} has no data disk {index}",
                cfg.id
            )));
        };
        check_staged(file, d.base_image.is_some()).await?;
        let dir = self.vm_dir(&cfg.id);
        std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
        if let Some(base) = &d.base_image {
            rebase(file, base).await?;
        }
        std::fs::rename(file, dir.join(super::data_disk_file(index)))
            .map_err(io_err("adopt the data disk"))?;
        Ok(())
    }
}

/// Checks a disk another host staged (cold migration) before it becomes a
/// VM's disk here: a hostile host must not hand this one a disk that makes
/// QEMU open a host file. It must be a qcow2 that passes `qemu-img check`
/// with no data file and no encryption; its backing file name (the source
/// host's path of the base image, never opened) is allowed only where
/// [`rebase`] replaces it with this host's copy of the same image
/// (`may_have_backing`); a blank data disk is adopted as it is, so it must
/// have none.
async fn check_staged(file: &Path, may_have_backing: bool) -> Result<()> {
    let mut policy = virt8ra_image::Policy::staged();
    policy.allow_backing = may_have_backing;
    virt8ra_image::inspect(file, &policy)
        .await
        .map(|_| ())
        .map_err(|e| DriverError::Other(format!("the staged disk is refused: {e}")))
}

/// Points the qcow2 `file` at `base` (the same image's copy on this host)
/// without touching its data or opening its old backing file
/// (`qemu-img rebase -u`).
async fn rebase(file: &Path, base: &Path) -> Result<()> {
    let base =
        std::fs::canonicalize(base).map_err(io_err(format!("base image {}", base.display())))?;
    let (base, file) = (base.to_string_lossy(), file.to_string_lossy());
    super::qemu::qemu_img(&[
        "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", &base, &file,
    ])
    .await?;
    Ok(())
}

#[async_trait::async_trait]
impl super::Migrate for QemuDriver {
    fn marker_dir(&self, id: &str) -> PathBuf {
        super::Driver::vm_dir(self, id)
    }

    async fn start_incoming(
        &self,
        cfg: &VmConfig,
        migration_id: &str,
        listen: &str,
    ) -> Result<LiveEndpoints> {
        QemuDriver::start_incoming(self, cfg, migration_id, listen).await
    }

    async fn await_incoming(&self, id: &str, migration_id: &str) -> Result<u64> {
        QemuDriver::await_incoming(self, id, migration_id).await
    }

    async fn send_live(
        &self,
        id: &str,
        migration_id: &str,
        target: &LiveEndpoints,
        progress: &(dyn Fn(MigrationProgress) + Send + Sync),
    ) -> Result<SendOutcome> {
        QemuDriver::send_live(self, id, migration_id, target, progress).await
    }

    async fn abort_outgoing(&self, id: &str) -> Result<()> {
        QemuDriver::abort_outgoing(self, id).await
    }

    async fn export_disk(&self, id: &str, backing: Option<&Path>, out: &Path) -> Result<()> {
        QemuDriver::export_disk(self, id, backing, out).await
    }

    async fn adopt_disk(&self, cfg: &VmConfig, file: &Path) -> Result<()> {
        QemuDriver::adopt_disk(self, cfg, file).await
    }

    async fn export_data_disk(
        &self,
        id: &str,
        index: usize,
        backing: Option<&Path>,
        out: &Path,
    ) -> Result<()> {
        QemuDriver::export_file(self, id, &super::data_disk_file(index), backing, out).await
    }

    async fn adopt_data_disk(&self, cfg: &VmConfig, index: usize, file: &Path) -> Result<()> {
        QemuDriver::adopt_data_disk(self, cfg, index, file).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_img(args: &[&str]) {
        let st = std::process::Command::new("qemu-img")
            .args(args)
            .status()
            .expect("qemu-img");
        assert!(st.success(), "qemu-img {args:?}");
    }

    #[tokio::test]
    async fn a_staged_disk_may_only_name_the_base_image_it_is_rebased_onto() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = |n: &str| d.path().join(n).to_string_lossy().to_string();
        // What a source host stages: its own blocks over its base image.
        qemu_img(&["create", "-q", "-f", "qcow2", &p("base.qcow2"), "1M"]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            &p("base.qcow2"),
            &p("staged.qcow2"),
        ]);
        check_staged(Path::new(&p("staged.qcow2")), true)
            .await
            .expect("a boot disk over its base");
        // A blank data disk is adopted as it is: no backing file at all.
        let e = check_staged(Path::new(&p("staged.qcow2")), false)
            .await
            .expect_err("a blank data disk with a backing file");
        assert!(e.to_string().contains("qcow2 backing file"), "{e}");
        // A data file, or another format, is never allowed.
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={},data_file_raw=on", p("data")),
            &p("data.qcow2"),
            "1M",
        ]);
        let e = check_staged(Path::new(&p("data.qcow2")), true)
            .await
            .expect_err("a data file");
        assert!(e.to_string().contains("external data file"), "{e}");
        std::fs::write(p("raw"), vec![0u8; 4096]).expect("write");
        let e = check_staged(Path::new(&p("raw")), true)
            .await
            .expect_err("a raw disk");
        assert!(e.to_string().contains("expected qcow2"), "{e}");
    }
}
