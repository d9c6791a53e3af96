//! The agent's side of migrations and exports.
//!
//! The control plane asks through the desired state: a VM carries a
//! [`MigrationRole`] while it moves. For each role the agent runs one job
//! (a task, keyed by the migration's id) that does the work with the QEMU
//! driver and reports its state ([`MigrationReport`]) upstream: at once on
//! every change, throttled while only the progress changes, and with every
//! heartbeat. Jobs are resumable: after an agent restart the role is still in
//! the persisted desired state ([`crate::desired_log`]: `desired.json` and
//! its journal `desired.log`), the job starts again and picks up from what
//! is on disk and what QEMU is doing (a live migration in flight continues
//! inside QEMU).
//!
//! Disks staged on the control plane (cold migration, export) move over
//! HTTP in chunks: an upload resumes from the size the control plane has,
//! a download from the size already on disk; both are checked by sha256.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::mpsc;
use virt8ra_api::protocol::{
    DesiredVm, LiveEndpoints, MigrationAgentState, MigrationReport, MigrationRole, MigrationSide,
    StagedDisk,
};
use virt8ra_api::{MigrationMode, MigrationProgress};

use crate::driver::{Driver, DriverVmState, Migrate, VmConfig};

/// Bytes per upload request: a broken connection loses at most this much.
const CHUNK: u64 = 8 << 20;
/// Answers "that is not the staged size" in a row before an upload gives
/// up (each is followed by asking the control plane for its size).
const MAX_CONFLICTS: u32 = 3;
/// Progress-only reports are sent at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

pub struct Mover {
    server: String,
    token: String,
    trust: virt8ra_tls::Trust,
    client: reqwest::Client,
    /// Where this host's incoming live streams listen; `None`: only
    /// relayed ones (on loopback) and cold ones.
    listen: Option<String>,
    /// Relayed incoming migrations: migration id -> (VM id, the loopback
    /// endpoints of its incoming QEMU and qemu-nbd), for the channel.
    relay_local: Mutex<HashMap<String, (String, LiveEndpoints)>>,
    staging: PathBuf,
    reports: Mutex<HashMap<String, (MigrationReport, Instant)>>,
    changes: Mutex<Option<mpsc::UnboundedSender<Box<MigrationReport>>>>,
    jobs: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
}

/// What every step of one job works with.
struct Job<'a> {
    q: &'a dyn Migrate,
    driver: &'a dyn Driver,
    d: &'a DesiredVm,
    cfg: &'a VmConfig,
    /// The job's report, to which each step adds its state.
    rep: MigrationReport,
}

impl Mover {
    pub fn new(
        data_dir: &Path,
        server: &str,
        token: &str,
        listen: Option<String>,
        trust: &virt8ra_tls::Trust,
    ) -> anyhow::Result<Arc<Mover>> {
        Mover::with_client(data_dir, server, token, listen, trust, trust.http_client()?)
    }

    /// [`Mover::new`] with an HTTP client shared with others (many
    /// simulated hosts in one process share one).
    pub fn with_client(
        data_dir: &Path,
        server: &str,
        token: &str,
        listen: Option<String>,
        trust: &virt8ra_tls::Trust,
        client: reqwest::Client,
    ) -> anyhow::Result<Arc<Mover>> {
        let staging = data_dir.join("staging");
        crate::private::make_dir(&staging)?;
        Ok(Arc::new(Mover {
            server: server.trim_end_matches('/').to_string(),
            token: token.to_string(),
            client,
            trust: trust.clone(),
            listen,
            relay_local: Mutex::new(HashMap::new()),
            staging,
            reports: Mutex::new(HashMap::new()),
            changes: Mutex::new(None),
            jobs: Mutex::new(HashMap::new()),
        }))
    }

    /// Reports are sent on the returned channel (the channel to the control plane).
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Box<MigrationReport>> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.changes.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    /// Every report of a job this host runs (for heartbeats).
    pub fn all(&self) -> Vec<MigrationReport> {
        let m = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<MigrationReport> = m.values().map(|(r, _)| r.clone()).collect();
        v.sort_by(|a, b| a.migration_id.cmp(&b.migration_id));
        v
    }

    fn report(&self, r: MigrationReport) {
        let mut m = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let send = match m.get(&r.migration_id) {
            None => true,
            Some((old, _)) if old == &r => false,
            Some((old, _)) if old.state != r.state => true,
            Some((_, at)) => now.duration_since(*at) >= PROGRESS_EVERY,
        };
        if !send {
            if let Some(e) = m.get_mut(&r.migration_id) {
                e.0 = r; // the next heartbeat carries the latest progress
            }
            return;
        }
        m.insert(r.migration_id.clone(), (r.clone(), now));
        drop(m);
        if let Some(tx) = &*self.changes.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = tx.send(Box::new(r));
        }
    }

    /// Target: the local endpoint of `stream` of relayed migration
    /// `migration_id`, if this host receives it.
    pub fn relay_endpoint(&self, migration_id: &str, stream: &str) -> Option<String> {
        let m = self.relay_local.lock().unwrap_or_else(|p| p.into_inner());
        let (_, ep) = m.get(migration_id)?;
        match stream {
            "migrate" => Some(ep.migrate.clone()),
            "nbd" => Some(ep.nbd.clone()),
            s => {
                virt8ra_api::protocol::relay_data_index(s).and_then(|i| ep.data_nbd.get(i).cloned())
            }
        }
    }

    /// Forgets the jobs and reports of VM `vm_id` (its role was removed),
    /// stopping a job still running.
    pub fn clear_vm(&self, vm_id: &str) {
        let ids: Vec<String> = {
            let mut m = self.reports.lock().unwrap_or_else(|p| p.into_inner());
            let ids: Vec<String> = m
                .iter()
                .filter(|(_, (r, _))| r.vm_id == vm_id)
                .map(|(k, _)| k.clone())
                .collect();
            for k in &ids {
                m.remove(k);
            }
            ids
        };
        self.relay_local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (vm, _)| vm != vm_id);
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            for ext in ["qcow2", "sha256", "tmp"] {
                let _ = std::fs::remove_file(self.staging.join(format!("{id}.{ext}")));
                for i in 0..virt8ra_api::validate::MAX_DATA_DISKS {
                    let _ = std::fs::remove_file(self.staging.join(format!("{id}.{i}.{ext}")));
                }
            }
            if let Some(h) = jobs.remove(&id) {
                h.abort();
            }
        }
    }

    /// Starts the job for `role` unless it runs (or ran) already.
    pub fn ensure_job(
        self: &Arc<Self>,
        driver: &Arc<dyn Driver>,
        d: &DesiredVm,
        cfg: VmConfig,
        role: &MigrationRole,
        base: Option<PathBuf>,
    ) {
        // A live source without the target's endpoints is held as it is
        // (the control plane has not heard from the target since it
        // restarted, or it rolls back): no job until they come.
        if let MigrationRole::Outgoing {
            mode: MigrationMode::Live,
            target: None,
            ..
        } = role
        {
            return;
        }
        let id = role_id(role).to_string();
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if jobs.contains_key(&id) {
            return;
        }
        let me = self.clone();
        let driver = driver.clone();
        let (d, role) = (d.clone(), role.clone());
        let side = side_of(&role);
        jobs.insert(
            id.clone(),
            tokio::spawn(async move {
                let r = me.run(&*driver, &d, cfg, &role, base).await;
                if let Err(e) = r {
                    tracing::warn!(vm = %d.name, migration = %id, error = %format!("{e:#}"), "migration step failed");
                    me.report(MigrationReport {
                        migration_id: id,
                        vm_id: d.id.clone(),
                        side,
                        state: MigrationAgentState::Failed,
                        progress: None,
                        endpoints: None,
                        disk: None,
                        data_disks: vec![],
                        downtime_ms: None,
                        bytes: None,
                        error: Some(format!("{e:#}")),
                    });
                }
            }),
        );
    }

    fn base_report(&self, d: &DesiredVm, role: &MigrationRole) -> MigrationReport {
        MigrationReport {
            migration_id: role_id(role).to_string(),
            vm_id: d.id.clone(),
            side: side_of(role),
            state: MigrationAgentState::Preparing,
            progress: None,
            endpoints: None,
            disk: None,
            data_disks: vec![],
            downtime_ms: None,
            bytes: None,
            error: None,
        }
    }

    async fn run(
        self: &Arc<Self>,
        driver: &dyn Driver,
        d: &DesiredVm,
        cfg: VmConfig,
        role: &MigrationRole,
        base: Option<PathBuf>,
    ) -> anyhow::Result<()> {
        let Some(q) = driver.migrator() else {
            bail!("the {} driver cannot migrate VMs", driver.name());
        };
        fail_point("agent-job-start").await?;
        let rep = self.base_report(d, role);
        self.report(rep.clone());
        let j = Job {
            q,
            driver,
            d,
            cfg: &cfg,
            rep,
        };
        match role {
            MigrationRole::Incoming {
                migration_id,
                mode: MigrationMode::Live,
                relay,
                ..
            } => self.incoming_live(&j, migration_id, relay).await,
            MigrationRole::Incoming {
                migration_id,
                mode: MigrationMode::Cold,
                disk,
                data_disks,
                ..
            } => self.incoming_cold(&j, migration_id, disk, data_disks).await,
            MigrationRole::Outgoing {
                migration_id,
                mode: MigrationMode::Live,
                target,
                relay,
                ..
            } => self.outgoing_live(&j, migration_id, target, relay).await,
            MigrationRole::Outgoing {
                migration_id,
                mode: MigrationMode::Cold,
                upload_path,
                ..
            } => {
                self.outgoing_cold(&j, migration_id, upload_path, base.as_deref())
                    .await
            }
            MigrationRole::Export {
                export_id,
                upload_path,
            } => self.export(&j, export_id, upload_path).await,
        }
    }

    /// Target, live: wait for the VM and report when it runs here.
    async fn incoming_live(
        &self,
        j: &Job<'_>,
        migration_id: &str,
        relay: &bool,
    ) -> anyhow::Result<()> {
        let (q, d, cfg, rep) = (j.q, j.d, j.cfg, j.rep.clone());
        // Relayed: only this agent connects to the streams, on loopback.
        let listen = match (&self.listen, relay) {
            (_, true) => "127.0.0.1",
            (Some(l), false) => l.as_str(),
            (None, false) => bail!(
                "this host has no --address, so it takes live migrations only relayed through the control plane"
            ),
        };
        let endpoints = q.start_incoming(cfg, migration_id, listen).await?;
        if *relay {
            self.relay_local
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(migration_id.to_string(), (d.id.clone(), endpoints.clone()));
        }
        fail_point("agent-incoming-ready").await?;
        self.report(MigrationReport {
            state: MigrationAgentState::Ready,
            endpoints: Some(endpoints),
            ..rep.clone()
        });
        let resume_ms = q.await_incoming(&d.id, migration_id).await?;
        fail_point("agent-resumed").await?;
        tracing::info!(vm = %d.name, resume_ms, "live migration: the VM runs here now");
        self.report(MigrationReport {
            state: MigrationAgentState::Resumed,
            downtime_ms: Some(resume_ms),
            ..rep
        });
        Ok(())
    }

    /// Target, cold: download the staged disks and make them the VM's.
    async fn incoming_cold(
        &self,
        j: &Job<'_>,
        migration_id: &str,
        disk: &Option<StagedDisk>,
        data_disks: &[StagedDisk],
    ) -> anyhow::Result<()> {
        let (q, driver, d, cfg, rep) = (j.q, j.driver, j.d, j.cfg, j.rep.clone());
        let Some(disk) = disk else {
            bail!("cold migration without a staged disk");
        };
        if data_disks.len() != cfg.data_disks.len() {
            bail!(
                "the VM has {} data disk(s) but {} were staged",
                cfg.data_disks.len(),
                data_disks.len()
            );
        }
        let marker = q.marker_dir(&d.id).join(format!("adopted-{migration_id}"));
        if !marker.exists() || driver.state(&d.id).await? == DriverVmState::Absent {
            // Start clean: an earlier, interrupted attempt may have left parts.
            driver.destroy(&d.id).await?;
            let part = self.staging.join(format!("{migration_id}.qcow2"));
            let t = Instant::now();
            let progress = |p| {
                self.report(MigrationReport {
                    state: MigrationAgentState::Preparing,
                    progress: Some(p),
                    ..rep.clone()
                })
            };
            self.download(disk, &part, &progress).await?;
            // Data disks adopted first: the boot disk marks a prepared VM.
            for (i, staged) in data_disks.iter().enumerate() {
                let part = self.staging.join(format!("{migration_id}.{i}.qcow2"));
                self.download(staged, &part, &progress).await?;
                q.adopt_data_disk(cfg, i, &part).await?;
            }
            fail_point("agent-cold-downloaded").await?;
            q.adopt_disk(cfg, &part).await?;
            fail_point("agent-adopted").await?;
            std::fs::create_dir_all(q.marker_dir(&d.id)).context("create the VM's directory")?;
            std::fs::write(&marker, b"").context("write the adoption marker")?;
            tracing::info!(vm = %d.name, ms = t.elapsed().as_millis() as u64, "cold migration: disk in place");
        }
        self.report(MigrationReport {
            state: MigrationAgentState::Ready,
            bytes: Some(disk.size_bytes),
            ..rep
        });
        Ok(())
    }

    /// Source, live: send the VM (through relays if asked).
    async fn outgoing_live(
        &self,
        j: &Job<'_>,
        migration_id: &str,
        target: &Option<LiveEndpoints>,
        relay: &bool,
    ) -> anyhow::Result<()> {
        let (q, d, rep) = (j.q, j.d, j.rep.clone());
        let Some(target) = target else {
            bail!("live migration without target endpoints");
        };
        mark_outgoing(q, &d.id)?;
        fail_point("agent-send").await?;
        // Relayed: QEMU sends to loopback listeners that carry each
        // connection through the control plane; they stop when the
        // job ends.
        let relayed = if *relay {
            Some(
                crate::relay::SourceRelay::start(
                    &self.server,
                    &self.token,
                    &self.trust,
                    migration_id,
                    target,
                )
                .await?,
            )
        } else {
            None
        };
        let target = relayed.as_ref().map_or(target, |r| &r.local);
        let rep2 = rep.clone();
        let outcome = q
            .send_live(&d.id, migration_id, target, &|p| {
                self.report(MigrationReport {
                    state: MigrationAgentState::Transferring,
                    progress: Some(p),
                    ..rep2.clone()
                })
            })
            .await?;
        tracing::info!(vm = %d.name, downtime_ms = outcome.downtime_ms, bytes = outcome.bytes, "live migration: VM sent");
        fail_point("agent-sent").await?;
        self.report(MigrationReport {
            state: MigrationAgentState::Sent,
            downtime_ms: Some(outcome.downtime_ms),
            bytes: Some(outcome.bytes),
            ..rep
        });
        Ok(())
    }

    /// Source, cold: power the VM down, stage and upload its disks.
    async fn outgoing_cold(
        &self,
        j: &Job<'_>,
        migration_id: &str,
        upload_path: &Option<String>,
        base: Option<&Path>,
    ) -> anyhow::Result<()> {
        let (q, driver, d) = (j.q, j.driver, j.d);
        let Some(upload_path) = upload_path else {
            bail!("cold migration without an upload path");
        };
        mark_outgoing(q, &d.id)?;
        if driver.state(&d.id).await? == DriverVmState::Running {
            driver
                .stop(&d.id, Duration::from_secs(u64::from(d.stop_timeout_s)))
                .await?;
            tracing::info!(vm = %d.name, "cold migration: VM powered down");
        }
        // The disks stay overlays of their images, which the target has.
        self.send_disks(j, migration_id, base, upload_path, true)
            .await
    }

    /// Export: stage and upload the stopped VM's disks, standalone.
    async fn export(&self, j: &Job<'_>, export_id: &str, upload_path: &str) -> anyhow::Result<()> {
        let (driver, d) = (j.driver, j.d);
        if driver.state(&d.id).await? == DriverVmState::Running {
            bail!("the VM is running; stop it before exporting its disk");
        }
        // Every disk standalone: a bundle carries no image.
        self.send_disks(j, export_id, None, upload_path, false)
            .await
    }

    /// Stages and uploads the boot disk and every data disk under `id`, then
    /// reports them sent. `base`: the image the boot disk stays an overlay
    /// of (`None`: flattened); `over_images`: the same for the data disks.
    async fn send_disks(
        &self,
        j: &Job<'_>,
        id: &str,
        base: Option<&Path>,
        upload_path: &str,
        over_images: bool,
    ) -> anyhow::Result<()> {
        let (q, d, cfg, rep) = (j.q, j.d, j.cfg, j.rep.clone());
        let disk = self
            .stage_and_upload(q, d, &rep, id, None, base, upload_path)
            .await?;
        let data_disks = self
            .stage_data_disks(q, d, cfg, &rep, id, upload_path, over_images)
            .await?;
        let bytes = data_disks
            .iter()
            .fold(disk.size_bytes, |t, d| t + d.size_bytes);
        self.report(MigrationReport {
            state: MigrationAgentState::Sent,
            bytes: Some(bytes),
            disk: Some(disk),
            data_disks,
            ..rep
        });
        Ok(())
    }

    /// Stages and uploads every data disk of the VM, in order, under `ID.N`
    /// next to the boot disk's `upload_path`: over its image when
    /// `over_images` (cold migration), else standalone (export).
    #[allow(clippy::too_many_arguments)]
    async fn stage_data_disks(
        &self,
        q: &dyn Migrate,
        d: &DesiredVm,
        cfg: &VmConfig,
        rep: &MigrationReport,
        id: &str,
        upload_path: &str,
        over_images: bool,
    ) -> anyhow::Result<Vec<StagedDisk>> {
        let mut out = Vec::with_capacity(cfg.data_disks.len());
        for (i, dd) in cfg.data_disks.iter().enumerate() {
            let backing = dd.base_image.as_deref().filter(|_| over_images);
            let path = virt8ra_api::protocol::data_disk_path(upload_path, i);
            let key = format!("{id}.{i}");
            out.push(
                self.stage_and_upload(q, d, rep, &key, Some(i), backing, &path)
                    .await?,
            );
        }
        Ok(out)
    }

    /// Writes the boot disk, or data disk `data_disk`, as a compressed
    /// qcow2 (over `backing`, or standalone) into the staging directory as
    /// `id`, once, and uploads it (resuming).
    #[allow(clippy::too_many_arguments)]
    async fn stage_and_upload(
        &self,
        q: &dyn Migrate,
        d: &DesiredVm,
        rep: &MigrationReport,
        id: &str,
        data_disk: Option<usize>,
        backing: Option<&Path>,
        upload_path: &str,
    ) -> anyhow::Result<StagedDisk> {
        let file = self.staging.join(format!("{id}.qcow2"));
        let sum_file = self.staging.join(format!("{id}.sha256"));
        let (sha, size) = match std::fs::read_to_string(&sum_file)
            .ok()
            .and_then(|s| parse_sum(&s))
        {
            Some(v) if file.exists() => v,
            _ => {
                self.report(MigrationReport {
                    state: MigrationAgentState::Transferring,
                    progress: Some(MigrationProgress {
                        stage: "compress".into(),
                        ..Default::default()
                    }),
                    ..rep.clone()
                });
                match data_disk {
                    None => q.export_disk(&d.id, backing, &file).await?,
                    Some(i) => q.export_data_disk(&d.id, i, backing, &file).await?,
                }
                let (sha, size) = sha256_of(&file).await?;
                crate::durable::write_atomic(&sum_file, format!("{sha} {size}").as_bytes())?;
                (sha, size)
            }
        };
        fail_point("agent-staged").await?;
        let rep2 = rep.clone();
        self.upload(&file, upload_path, size, &|p| {
            self.report(MigrationReport {
                state: MigrationAgentState::Transferring,
                progress: Some(p),
                ..rep2.clone()
            })
        })
        .await?;
        let _ = std::fs::remove_file(&file);
        let _ = std::fs::remove_file(&sum_file);
        Ok(StagedDisk {
            url_path: upload_path.to_string(),
            sha256: sha,
            size_bytes: size,
        })
    }

    async fn staged_bytes(&self, path: &str) -> anyhow::Result<u64> {
        let url = format!("{}{path}/status", self.server);
        let resp = self
            .client
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| {
                crate::net::http_error(&self.trust, e, &url).context(format!("ask {url}"))
            })?;
        if !resp.status().is_success() {
            bail!("{url} answered {}", resp.status());
        }
        let v: serde_json::Value = resp.json().await?;
        Ok(v["bytes"].as_u64().unwrap_or(0))
    }

    /// Uploads `file` to the control plane from where it stopped last time.
    async fn upload(
        &self,
        file: &Path,
        path: &str,
        size: u64,
        progress: &(dyn Fn(MigrationProgress) + Send + Sync),
    ) -> anyhow::Result<()> {
        let mut have = self.staged_bytes(path).await?;
        if have > size {
            bail!("the control plane holds {have} bytes of a {size}-byte disk");
        }
        if have > 0 {
            tracing::info!(offset = have, "resuming the disk upload");
        }
        let t = Instant::now();
        let start = have;
        let mut f = tokio::fs::File::open(file).await?;
        let mut conflicts = 0;
        while have < size {
            let n = CHUNK.min(size - have);
            f.seek(std::io::SeekFrom::Start(have)).await?;
            let mut buf = vec![0u8; n as usize];
            f.read_exact(&mut buf).await?;
            let url = format!("{}{path}?offset={have}", self.server);
            let resp = self
                .client
                .put(&url)
                .bearer_auth(&self.token)
                .body(buf)
                .send()
                .await
                .map_err(|e| {
                    crate::net::http_error(&self.trust, e, &url).context(format!("upload to {url}"))
                })?;
            if resp.status() == reqwest::StatusCode::CONFLICT && conflicts < MAX_CONFLICTS {
                // The control plane holds another size than we thought (an
                // earlier attempt's chunk landed after all): go on from it.
                conflicts += 1;
                have = self.staged_bytes(path).await?;
                if have > size {
                    bail!("the control plane holds {have} bytes of a {size}-byte disk");
                }
                tracing::info!(offset = have, "the staged size moved; resuming from it");
                continue;
            }
            if !resp.status().is_success() {
                let body = resp.text().await.unwrap_or_default();
                bail!("upload to {url}: {body}");
            }
            conflicts = 0;
            have += n;
            fail_point("agent-upload-chunk").await?;
            progress(MigrationProgress::at_rate(
                "upload",
                have,
                size,
                have - start,
                t.elapsed().as_secs_f64(),
                0,
            ));
        }
        Ok(())
    }

    /// Downloads a staged disk to `part`, resuming, and checks its sha256.
    async fn download(
        &self,
        disk: &StagedDisk,
        part: &Path,
        progress: &(dyn Fn(MigrationProgress) + Send + Sync),
    ) -> anyhow::Result<()> {
        let mut have = tokio::fs::metadata(part)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        if have > disk.size_bytes {
            tokio::fs::remove_file(part).await?;
            have = 0;
        }
        let t = Instant::now();
        let start = have;
        if have < disk.size_bytes {
            let url = format!("{}{}", self.server, disk.url_path);
            let mut req = self.client.get(&url).bearer_auth(&self.token);
            if have > 0 {
                req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
                tracing::info!(offset = have, "resuming the disk download");
            }
            let resp = req.send().await.map_err(|e| {
                crate::net::http_error(&self.trust, e, &url).context(format!("fetch {url}"))
            })?;
            let status = resp.status();
            if have > 0 && status == reqwest::StatusCode::OK {
                have = 0;
                let _ = tokio::fs::remove_file(part).await;
            } else if !status.is_success() {
                let body = resp.text().await.unwrap_or_default();
                bail!("{url} answered {status}: {body}");
            }
            let mut f = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(part)
                .await?;
            let mut stream = resp.bytes_stream();
            let mut last = Instant::now();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.with_context(|| format!("download broke at {have} bytes"))?;
                f.write_all(&chunk).await?;
                have += chunk.len() as u64;
                if last.elapsed() >= PROGRESS_EVERY {
                    last = Instant::now();
                    progress(MigrationProgress::at_rate(
                        "download",
                        have,
                        disk.size_bytes,
                        have - start,
                        t.elapsed().as_secs_f64(),
                        0,
                    ));
                }
            }
            f.sync_all().await?;
        }
        let (sha, size) = sha256_of(part).await?;
        if sha != disk.sha256 || size != disk.size_bytes {
            let _ = tokio::fs::remove_file(part).await;
            bail!(
                "the staged disk is corrupt (sha256 {sha}, {size} bytes; expected {}, {} bytes); it was discarded",
                disk.sha256,
                disk.size_bytes
            );
        }
        Ok(())
    }
}

fn role_id(r: &MigrationRole) -> &str {
    match r {
        MigrationRole::Incoming { migration_id, .. } => migration_id,
        MigrationRole::Outgoing { migration_id, .. } => migration_id,
        MigrationRole::Export { export_id, .. } => export_id,
    }
}

fn side_of(r: &MigrationRole) -> MigrationSide {
    match r {
        MigrationRole::Incoming { .. } => MigrationSide::Target,
        _ => MigrationSide::Source,
    }
}

/// Marks a VM whose source side started sending, so that if the role is
/// withdrawn (rollback) the reconciler resumes it here.
fn mark_outgoing(q: &dyn Migrate, id: &str) -> anyhow::Result<()> {
    let dir = q.marker_dir(id);
    std::fs::create_dir_all(&dir).context("create the VM's directory")?;
    std::fs::write(dir.join("outgoing.marker"), b"").context("write the outgoing marker")
}

/// Whether VM `id` was being sent from this host.
pub fn is_marked_outgoing(q: &dyn Migrate, id: &str) -> bool {
    q.marker_dir(id).join("outgoing.marker").exists()
}

pub fn clear_outgoing(q: &dyn Migrate, id: &str) {
    let _ = std::fs::remove_file(q.marker_dir(id).join("outgoing.marker"));
}

fn parse_sum(s: &str) -> Option<(String, u64)> {
    let (sha, size) = s.trim().split_once(' ')?;
    Some((sha.to_string(), size.parse().ok()?))
}

pub async fn sha256_of(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = tokio::fs::File::open(path).await?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n_total = 0u64;
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        n_total += n as u64;
    }
    Ok((hex::encode(h.finalize()), n_total))
}

/// Failure injection for tests (`VIRT8RA_AGENT_FAIL_AT=POINT` exits the
/// agent here, `error:POINT` fails the step; in process, the agent's
/// `FailPoints` registry): a no-op unless built with fail points (see
/// `virt8ra-failpoint`).
pub(crate) async fn fail_point(name: &str) -> Result<(), virt8ra_failpoint::Injected> {
    virt8ra_failpoint::hit(virt8ra_failpoint::Process::Agent, name).await
}
