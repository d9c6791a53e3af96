//! The agent's reconciler: desired state in, QEMU processes out.
//!
//! The desired state the control plane sent last is persisted before
//! anything acts on it ([`crate::desired_log`]: a snapshot and a journal
//! of changes, so a change to one VM of hundreds appends one record), so
//! after an agent restart or a host reboot, and while the control plane is
//! unreachable, the agent keeps converging towards it on its own. A crash
//! part-way through writing a change leaves every VM either as it was or as
//! it was to be.
//!
//! Each VM has one owning task (an actor) that is told the VM's desired state
//! through a watch channel and converges towards it, one idempotent driver
//! step at a time, re-checking every few seconds (a guest that died is
//! started again). Actors publish what they observe in [`Reports`], which the
//! channel sends upstream immediately and with every heartbeat.
//!
//! ```text
//!   desired None ──► destroy ──► report deleted, actor ends
//!   desired Some ──► image ──► prepare disk ──► power running: start, reboot if generation grew
//!                                           └─► power stopped: ACPI stop, forced after the timeout
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use virt8ra_api::protocol::{AgentVmPhase, DesiredVm, VmReport};
use virt8ra_api::{PortForward, PowerState};

use crate::desired_log::DesiredLog;
use crate::driver::{DataDiskConfig, Driver, DriverVmState, VmConfig};
use crate::durable::write_atomic;
use crate::images::ImageCache;
use crate::mover::{self, Mover};

/// The latest observation of every VM, and a channel for changes.
pub struct Reports {
    map: Mutex<HashMap<String, VmReport>>,
    /// Boxed: a channel allocates room for 32 messages up front, and a
    /// process of simulated hosts holds one per host.
    changes: mpsc::UnboundedSender<Box<VmReport>>,
    /// Grows with every change, so a heartbeat can tell whether anything
    /// changed since the previous one.
    version: std::sync::atomic::AtomicU64,
}

impl Reports {
    pub fn new() -> (Arc<Reports>, mpsc::UnboundedReceiver<Box<VmReport>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Reports {
                map: Mutex::new(HashMap::new()),
                changes: tx,
                version: std::sync::atomic::AtomicU64::new(0),
            }),
            rx,
        )
    }

    fn set(&self, r: VmReport) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(&r.id) == Some(&r) {
            return;
        }
        if r.phase == AgentVmPhase::Deleted {
            m.remove(&r.id);
        } else {
            m.insert(r.id.clone(), r.clone());
        }
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let _ = self.changes.send(Box::new(r));
    }

    /// Changes so far (see [`Reports::all`]).
    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Every VM the agent has (for heartbeats).
    pub fn all(&self) -> Vec<VmReport> {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<VmReport> = m.values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    pub fn running(&self) -> u32 {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.values()
            .filter(|r| r.phase == AgentVmPhase::Running)
            .count() as u32
    }
}

/// A desired-state change did not apply: its base is not the generation
/// this agent has. The channel asks for the whole state.
#[derive(Debug)]
pub struct NotMyGeneration {
    pub base: u64,
    pub have: u64,
}

/// Per-VM state the agent keeps beside the driver's: the host ports it chose
/// and the last reboot it carried out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct LocalVm {
    ports: Vec<(u16, u16)>,
    reboot_generation: u64,
    /// The QEMU machine type the VM runs with.
    #[serde(default)]
    machine: Option<String>,
}

pub struct Reconciler {
    driver: Arc<dyn Driver>,
    images: Arc<ImageCache>,
    reports: Arc<Reports>,
    state_dir: PathBuf,
    /// The persisted desired state.
    log: DesiredLog,
    actors: Mutex<HashMap<String, watch::Sender<Option<Arc<DesiredVm>>>>>,
    /// The generation and VMs of the desired state as persisted.
    /// (Shared with the actors: one copy of each VM's desired state.)
    desired: Mutex<(u64, HashMap<String, Arc<DesiredVm>>)>,
    /// How often an actor re-checks a VM that is where it should be.
    recheck: Duration,
    /// Migrations and exports (absent: this agent cannot migrate).
    mover: std::sync::OnceLock<Arc<Mover>>,
}

impl Reconciler {
    /// The image cache VMs' disks come from.
    pub fn images(&self) -> &Arc<ImageCache> {
        &self.images
    }

    pub fn new(
        data_dir: &Path,
        driver: Arc<dyn Driver>,
        images: Arc<ImageCache>,
        reports: Arc<Reports>,
    ) -> std::io::Result<Arc<Reconciler>> {
        let state_dir = data_dir.join("vmstate");
        crate::private::make_dir(&state_dir)?;
        Ok(Arc::new(Reconciler {
            driver,
            images,
            reports,
            state_dir,
            log: DesiredLog::new(data_dir),
            actors: Mutex::new(HashMap::new()),
            desired: Mutex::new((0, HashMap::new())),
            recheck: Duration::from_secs(3),
            mover: std::sync::OnceLock::new(),
        }))
    }

    /// Sets how often a settled VM is re-checked (default 3 s).
    pub fn with_recheck(self: Arc<Self>, recheck: Duration) -> Arc<Self> {
        match Arc::try_unwrap(self) {
            Ok(mut r) => {
                r.recheck = recheck;
                Arc::new(r)
            }
            Err(a) => a,
        }
    }

    /// Lets this agent take part in migrations and exports.
    pub fn set_mover(&self, m: Arc<Mover>) {
        let _ = self.mover.set(m);
    }

    /// Fetches images the control plane wants staged at this host's site, in
    /// the background (each once: the cache shares concurrent downloads and
    /// returns at once when the image is there).
    pub fn prestage(&self, images: Vec<virt8ra_api::protocol::ImageRef>) {
        for r in images {
            let cache = self.images.clone();
            tokio::spawn(async move {
                if let Err(e) = cache.get(&r).await {
                    tracing::warn!(image = %r.name, error = %e, "pre-staging failed");
                }
            });
        }
    }

    /// Resumes from the persisted desired state (agent restart, host reboot).
    pub async fn resume(self: &Arc<Self>) -> anyhow::Result<()> {
        let loaded = self.log.load()?;
        if loaded.torn_bytes > 0 {
            tracing::warn!(
                bytes = loaded.torn_bytes,
                "the desired-state journal ended in a record cut short (a crash while it \
                 was written); it was never acted on and is dropped"
            );
        }
        let vms = loaded.vms;
        if vms.is_empty() {
            return Ok(());
        }
        tracing::info!(vms = vms.len(), "resuming from the local desired state");
        self.converge(0, vms).await;
        Ok(())
    }

    /// Persists what differs from the desired state persisted so far: the
    /// VMs of `upsert` that changed and those of `remove` as one journal
    /// record, or, `whole`, `upsert` as the entire state (every other VM
    /// goes) in a new snapshot.
    fn persist(
        &self,
        generation: u64,
        upsert: &[DesiredVm],
        remove: &[String],
        whole: bool,
    ) -> anyhow::Result<()> {
        let (changed, gone) = {
            let g = self.desired.lock().unwrap_or_else(|p| p.into_inner());
            let changed: Vec<&DesiredVm> = upsert
                .iter()
                .filter(|d| g.1.get(&d.id).map(|h| &**h) != Some(*d))
                .collect();
            let gone: Vec<String> = if whole {
                let keep: std::collections::HashSet<&str> =
                    upsert.iter().map(|d| d.id.as_str()).collect();
                g.1.keys()
                    .filter(|id| !keep.contains(id.as_str()))
                    .cloned()
                    .collect()
            } else {
                remove
                    .iter()
                    .filter(|id| g.1.contains_key(*id))
                    .cloned()
                    .collect()
            };
            (changed, gone)
        };
        if whole {
            if !changed.is_empty() || !gone.is_empty() {
                let all: Vec<&DesiredVm> = upsert.iter().collect();
                self.log.rewrite(generation, &all)?;
            }
        } else {
            self.log.append(&changed, &gone)?;
        }
        Ok(())
    }

    /// Applies a desired state from the control plane: persist, then act.
    pub async fn apply(
        self: &Arc<Self>,
        generation: u64,
        vms: Vec<DesiredVm>,
    ) -> anyhow::Result<()> {
        {
            let g = self.desired.lock().unwrap_or_else(|p| p.into_inner());
            if generation < g.0 {
                tracing::debug!(generation, current = g.0, "ignoring an older desired state");
                return Ok(());
            }
        }
        self.persist(generation, &vms, &[], true)?;
        self.converge(generation, vms).await;
        Ok(())
    }

    /// Applies changes to the desired state (protocol 3): persist the VMs
    /// changed and removed, then hand only those to their actors.
    pub async fn apply_changes(
        self: &Arc<Self>,
        generation: u64,
        base: u64,
        upsert: Vec<DesiredVm>,
        remove: Vec<String>,
    ) -> anyhow::Result<Result<(), NotMyGeneration>> {
        let have = self.desired.lock().unwrap_or_else(|p| p.into_inner()).0;
        if base != have {
            return Ok(Err(NotMyGeneration { base, have }));
        }
        self.persist(generation, &upsert, &remove, false)?;
        let upsert: Vec<Arc<DesiredVm>> = upsert.into_iter().map(Arc::new).collect();
        let fold = {
            let mut g = self.desired.lock().unwrap_or_else(|p| p.into_inner());
            g.0 = generation;
            for id in &remove {
                g.1.remove(id);
            }
            for d in &upsert {
                g.1.insert(d.id.clone(), d.clone());
            }
            self.log
                .wants_fold()
                .then(|| g.1.values().cloned().collect::<Vec<_>>())
        };
        if let Some(all) = fold {
            self.log.fold(generation, &all)?;
        }
        let mut actors = self.actors.lock().unwrap_or_else(|p| p.into_inner());
        for id in &remove {
            if let Some(tx) = actors.get(id) {
                tx.send_replace(None);
            }
        }
        for d in upsert {
            self.hand_over(&mut actors, d);
        }
        Ok(Ok(()))
    }

    /// Gives a VM's desired state to its actor, starting one if needed.
    fn hand_over(
        self: &Arc<Self>,
        actors: &mut HashMap<String, watch::Sender<Option<Arc<DesiredVm>>>>,
        d: Arc<DesiredVm>,
    ) {
        match actors.get(&d.id) {
            Some(tx) if !tx.is_closed() => {
                tx.send_replace(Some(d));
            }
            _ => {
                let id = d.id.clone();
                let (tx, rx) = watch::channel(Some(d));
                actors.insert(id.clone(), tx);
                tokio::spawn(self.clone().actor(id, rx));
            }
        }
    }

    async fn converge(self: &Arc<Self>, generation: u64, vms: Vec<DesiredVm>) {
        let wanted: HashMap<String, Arc<DesiredVm>> = vms
            .into_iter()
            .map(|v| (v.id.clone(), Arc::new(v)))
            .collect();
        *self.desired.lock().unwrap_or_else(|p| p.into_inner()) = (generation, wanted.clone());
        // VMs on disk that nobody wants any more, e.g. deleted while the agent was down.
        let on_disk = self.driver.list().await.unwrap_or_default();
        let mut actors = self.actors.lock().unwrap_or_else(|p| p.into_inner());
        for d in wanted.values() {
            self.hand_over(&mut actors, d.clone());
        }
        for (id, tx) in actors.iter() {
            if !wanted.contains_key(id) {
                tx.send_replace(None);
            }
        }
        for id in on_disk {
            if !wanted.contains_key(&id) && !actors.contains_key(&id) {
                let (tx, rx) = watch::channel(None);
                actors.insert(id.clone(), tx);
                tokio::spawn(self.clone().actor(id, rx));
            }
        }
    }

    fn local_path(&self, id: &str) -> PathBuf {
        self.state_dir.join(format!("{id}.json"))
    }

    /// The agent's record of VM `id`: `Ok(None)` when it has no file (the
    /// implicit default record, see [`Reconciler::save_local`]), `Err` when
    /// the file cannot be read or parsed.
    fn load_local(&self, id: &str) -> std::io::Result<Option<LocalVm>> {
        match std::fs::read(self.local_path(id)) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Persists `l`; the default record (no ports, no reboot, no machine
    /// type: every simulated VM) is implicit and has no file, which halves
    /// the files of a host with many VMs.
    fn save_local(&self, id: &str, l: &LocalVm) -> std::io::Result<()> {
        if *l == LocalVm::default() {
            return match std::fs::remove_file(self.local_path(id)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let b = serde_json::to_vec(l).map_err(std::io::Error::other)?;
        write_atomic(&self.local_path(id), &b)
    }

    fn report(&self, id: &str, phase: AgentVmPhase, error: Option<String>, local: &LocalVm) {
        self.reports.set(VmReport {
            id: id.to_string(),
            phase,
            error,
            ports: local
                .ports
                .iter()
                .map(|(g, h)| PortForward {
                    guest_port: *g,
                    host_addr: format!("127.0.0.1:{h}"),
                })
                .collect(),
            reboot_generation: local.reboot_generation,
            machine: local.machine.clone(),
        });
    }

    /// The one task that owns VM `id`.
    async fn actor(self: Arc<Self>, id: String, mut rx: watch::Receiver<Option<Arc<DesiredVm>>>) {
        let mut failures: u32 = 0;
        // The agent's own state of this VM, read from disk once.
        let mut cached: Option<LocalVm> = None;
        loop {
            let desired = rx.borrow_and_update().clone();
            let Some(d) = desired else {
                if let Some(m) = self.mover.get() {
                    m.clear_vm(&id);
                }
                let removed = match mover::fail_point("agent-remove-vm").await {
                    Ok(()) => self.driver.destroy(&id).await,
                    Err(e) => Err(crate::driver::DriverError::Other(e.to_string())),
                };
                match removed {
                    Ok(()) => {
                        let _ = std::fs::remove_file(self.local_path(&id));
                        self.report(&id, AgentVmPhase::Deleted, None, &LocalVm::default());
                        tracing::info!(vm = %id, "VM removed");
                        let mut actors = self.actors.lock().unwrap_or_else(|p| p.into_inner());
                        // Only end if nobody wanted the VM back in the meantime.
                        if rx.borrow().is_none() {
                            actors.remove(&id);
                            return;
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(vm = %id, error = %e, "removing VM failed; will retry");
                        failures += 1;
                    }
                }
                self.wait(&mut rx, failures).await;
                continue;
            };
            // Boxed: the step's state exists only while it runs, so a VM
            // that waits (nearly all of them, nearly always) costs a small
            // task (a process of simulated hosts holds a million).
            match Box::pin(self.step(&d, &mut cached)).await {
                Ok(()) => failures = 0,
                Err(e) if e.is::<WaitingForNetwork>() => {
                    tracing::info!(vm = %d.name, "{e}");
                    let local = cached.clone().unwrap_or_default();
                    self.report(&id, AgentVmPhase::Provisioning, Some(e.to_string()), &local);
                    tokio::select! {
                        _ = rx.changed() => {}
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    continue;
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(vm = %d.name, error = %e, "VM step failed; will retry");
                    let local = cached.clone().unwrap_or_default();
                    self.report(&id, AgentVmPhase::Failed, Some(e.to_string()), &local);
                }
            }
            self.wait(&mut rx, failures).await;
        }
    }

    async fn wait(&self, rx: &mut watch::Receiver<Option<Arc<DesiredVm>>>, failures: u32) {
        let delay = if failures == 0 {
            self.recheck
        } else {
            Duration::from_secs((2u64 << failures.min(5)).min(60))
        };
        tokio::select! {
            _ = rx.changed() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }

    /// One convergence step for a VM that should exist.
    async fn step(&self, d: &DesiredVm, cached: &mut Option<LocalVm>) -> anyhow::Result<()> {
        // No record on disk: nothing to remove if the new one is the default.
        let mut no_file = false;
        if cached.is_none() {
            match self.load_local(&d.id) {
                Ok(Some(l)) => *cached = Some(l),
                Ok(None) => no_file = true,
                // Unreadable: written afresh below.
                Err(_) => {}
            }
        }
        let mut local = match cached.clone() {
            Some(l) => l,
            None => {
                // A new VM starts fresh: no reboot owed. One that exists
                // without a record has the implicit one (see `save_local`),
                // so a reboot asked for meanwhile is still owed.
                let fresh = self.driver.state(&d.id).await? == DriverVmState::Absent;
                let l = LocalVm {
                    ports: allocate_ports(&d.ports)?,
                    reboot_generation: if fresh { d.reboot_generation } else { 0 },
                    machine: d
                        .machine
                        .clone()
                        .or_else(|| self.driver.default_machine_type()),
                };
                if !(no_file && l == LocalVm::default()) {
                    self.save_local(&d.id, &l)?;
                }
                *cached = Some(l.clone());
                l
            }
        };
        let state = self.driver.state(&d.id).await?;
        if let Some(role) = &d.migration {
            let Some(mover) = self.mover.get() else {
                anyhow::bail!("this agent cannot take part in migrations");
            };
            let base = if self.driver.needs_image() {
                self.images.get(&d.image).await?
            } else {
                self.images.path_of(&d.image.sha256)
            };
            let data = self.data_disks(d, self.driver.needs_image()).await?;
            let mut cfg = self.config(d, base.clone(), &local.ports, data);
            cfg.machine = local.machine.clone();
            if matches!(role, virt8ra_api::protocol::MigrationRole::Incoming { .. }) {
                self.taps_ready(d)?;
            }
            mover.ensure_job(&self.driver, d, cfg, role, Some(base));
            return Ok(());
        }
        if let Some(m) = self.mover.get() {
            m.clear_vm(&d.id);
        }
        if let Some(q) = self.driver.migrator() {
            // The role was withdrawn after this host began sending the VM:
            // a rollback. The control plane withdraws it only once the
            // target copy is gone, so the guest may run here again.
            if mover::is_marked_outgoing(q, &d.id) {
                mover::fail_point("agent-abort-outgoing").await?;
                q.abort_outgoing(&d.id).await?;
                mover::clear_outgoing(q, &d.id);
                tracing::info!(vm = %d.name, "migration rolled back: the VM stays here");
            }
        }
        if state == DriverVmState::Absent {
            self.report(&d.id, AgentVmPhase::Provisioning, None, &local);
        }
        let fetch = state == DriverVmState::Absent && self.driver.needs_image();
        let base = if fetch {
            self.images.get(&d.image).await?
        } else {
            self.images.path_of(&d.image.sha256)
        };
        let data = self.data_disks(d, fetch).await?;
        let mut cfg = self.config(d, base, &local.ports, data);
        cfg.machine = local.machine.clone();
        if state == DriverVmState::Absent {
            self.driver.prepare(&cfg).await?;
        }
        match d.power {
            PowerState::Running => {
                if self.driver.state(&d.id).await? != DriverVmState::Running {
                    if state == DriverVmState::Running {
                        tracing::warn!(vm = %d.name, "VM process went away; starting it again");
                    }
                    self.taps_ready(d)?;
                    self.driver.start(&cfg).await?;
                    tracing::info!(vm = %d.name, "VM started");
                } else if d.reboot_generation > local.reboot_generation {
                    self.driver.reboot(&d.id).await?;
                    tracing::info!(vm = %d.name, "VM rebooted");
                }
                if d.reboot_generation != local.reboot_generation {
                    local.reboot_generation = d.reboot_generation;
                    self.save_local(&d.id, &local)?;
                    *cached = Some(local.clone());
                }
                self.report(&d.id, AgentVmPhase::Running, None, &local);
            }
            PowerState::Stopped => {
                if self.driver.state(&d.id).await? == DriverVmState::Running {
                    self.report(&d.id, AgentVmPhase::Stopping, None, &local);
                    self.driver
                        .stop(&d.id, Duration::from_secs(u64::from(d.stop_timeout_s)))
                        .await?;
                    tracing::info!(vm = %d.name, "VM stopped");
                }
                self.report(&d.id, AgentVmPhase::Stopped, None, &local);
            }
        }
        Ok(())
    }
}

impl Reconciler {
    /// The VM's data disks, with the cached copy of each one's image
    /// (fetched first when `fetch`).
    async fn data_disks(&self, d: &DesiredVm, fetch: bool) -> anyhow::Result<Vec<DataDiskConfig>> {
        let mut out = Vec::with_capacity(d.data_disks.len());
        for disk in &d.data_disks {
            let base_image = match &disk.image {
                Some(i) if fetch => Some(self.images.get(i).await?),
                Some(i) => Some(self.images.path_of(&i.sha256)),
                None => None,
            };
            out.push(DataDiskConfig {
                base_image,
                size_gib: disk.size_gib,
            });
        }
        Ok(out)
    }

    fn config(
        &self,
        d: &DesiredVm,
        base: PathBuf,
        ports: &[(u16, u16)],
        data_disks: Vec<DataDiskConfig>,
    ) -> VmConfig {
        VmConfig {
            id: d.id.clone(),
            name: d.name.clone(),
            vcpus: d.vcpus,
            memory_mib: d.memory_mib,
            disk_gib: d.disk_gib,
            base_image: base,
            ports: ports.to_vec(),
            context: crate::driver::GuestContext {
                instance_id: d.id.clone(),
                hostname: d.name.clone(),
                site: d.site.clone(),
                user_data: d.user_data.clone(),
                ssh_authorized_keys: d.ssh_authorized_keys.clone(),
                network: d.network.clone(),
                first_mac: d.nics.first().map(|n| n.mac.to_string()),
            },
            machine: d.machine.clone(),
            data_disks,
            nics: d
                .nics
                .iter()
                .map(|n| crate::driver::NicConfig {
                    tap: n.tap.clone(),
                    mac: n.mac,
                })
                .collect(),
        }
    }

    /// Fails with [`WaitingForNetwork`] while a tap the VM's NICs need is
    /// not there yet. QEMU must not start without it: as root it would
    /// create a tap of that name itself, on no bridge, and the guest would
    /// boot cut off from its network.
    fn taps_ready(&self, d: &DesiredVm) -> Result<(), WaitingForNetwork> {
        if !self.driver.uses_taps() {
            return Ok(());
        }
        match d.nics.iter().find(|n| !crate::network::tap_exists(&n.tap)) {
            None => Ok(()),
            Some(n) => Err(WaitingForNetwork(format!(
                "waiting for tap {} of NIC {} (network {}): the host's network state \
                 has not created it yet",
                n.tap, n.id, n.network
            ))),
        }
    }
}

/// A VM's tap is not there yet: the step is retried within a second, not
/// with the backoff of a failure (the network state that makes the tap
/// comes over the same channel, just before or just after the VM).
#[derive(Debug)]
pub struct WaitingForNetwork(pub String);

impl std::fmt::Display for WaitingForNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WaitingForNetwork {}

/// Picks a free loopback port for each guest port.
fn allocate_ports(guest_ports: &[u16]) -> std::io::Result<Vec<(u16, u16)>> {
    let mut out = Vec::new();
    let mut held = Vec::new();
    for g in guest_ports {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        out.push((*g, l.local_addr()?.port()));
        held.push(l); // keep bound until all are chosen, so they differ
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired_log::tests::dvm;
    use crate::driver::sim::{SimDriver, SimTimings};

    fn sim_driver(dir: &Path, memory_mib: u64) -> Arc<SimDriver> {
        Arc::new(SimDriver::new(
            dir.join("vms"),
            memory_mib,
            SimTimings::default(),
        ))
    }

    fn reconciler(dir: &Path, driver: Arc<SimDriver>) -> Arc<Reconciler> {
        let images = Arc::new(
            ImageCache::new(
                dir.join("images"),
                "http://127.0.0.1:9",
                "t",
                &virt8ra_tls::Trust::public(),
            )
            .expect("cache"),
        );
        let (reports, _changes) = Reports::new();
        Reconciler::new(dir, driver, images, reports)
            .expect("reconciler")
            .with_recheck(Duration::from_millis(50))
    }

    /// A VM that waits costs its task's idle state; a process of simulated
    /// hosts holds a million of them. The step runs boxed, so the idle
    /// state is small (it was 3.5 KB with the step inline).
    #[tokio::test]
    async fn a_waiting_vm_actor_is_small() {
        let dir = tempfile::tempdir().expect("tempdir");
        let driver = sim_driver(dir.path(), 1024);
        let r = reconciler(dir.path(), driver);
        let (_tx, rx) = watch::channel(None);
        let idle = std::mem::size_of_val(&r.clone().actor("x".into(), rx));
        assert!(idle <= 1024, "an idle VM actor takes {idle} bytes");
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting until {what}");
    }

    /// The VMs of the persisted desired state.
    fn persisted(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = DesiredLog::new(dir)
            .read()
            .expect("desired state")
            .vms
            .into_iter()
            .map(|d| d.id)
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn changes_apply_to_their_generation_and_survive_a_restart() {
        let tmp = tempfile::tempdir().expect("tmp");
        let driver = sim_driver(tmp.path(), 4096);
        let r = reconciler(tmp.path(), driver.clone());
        r.apply(
            10,
            vec![dvm("a", PowerState::Running), dvm("b", PowerState::Running)],
        )
        .await
        .expect("apply");
        until("both run", || driver.running_count() == 2).await;
        assert_eq!(persisted(tmp.path()), ["a", "b"]);

        // Changes against another generation are refused, and change nothing.
        let refused = r
            .apply_changes(
                12,
                11,
                vec![dvm("c", PowerState::Running)],
                vec!["a".into()],
            )
            .await
            .expect("io");
        assert!(matches!(
            refused,
            Err(NotMyGeneration { base: 11, have: 10 })
        ));
        assert_eq!(persisted(tmp.path()), ["a", "b"]);

        // a goes, b is stopped, c comes.
        r.apply_changes(
            11,
            10,
            vec![dvm("b", PowerState::Stopped), dvm("c", PowerState::Running)],
            vec!["a".into()],
        )
        .await
        .expect("io")
        .expect("applies");
        until("a gone, b stopped, c running", || {
            !driver.is_running("a") && !driver.is_running("b") && driver.is_running("c")
        })
        .await;
        assert_eq!(persisted(tmp.path()), ["b", "c"]);

        // A restarted agent resumes what was persisted.
        let r2 = reconciler(tmp.path(), driver.clone());
        r2.resume().await.expect("resume");
        let have = r2.desired.lock().expect("lock").1.clone();
        assert_eq!(have.len(), 2);
        assert_eq!(have["b"].power, PowerState::Stopped);
        assert_eq!(have["c"].power, PowerState::Running);
    }

    #[tokio::test]
    async fn an_older_agents_desired_json_is_taken_over() {
        let tmp = tempfile::tempdir().expect("tmp");
        let old = serde_json::json!({
            "generation": 3,
            "vms": [dvm("x", PowerState::Running)],
        });
        std::fs::write(
            tmp.path().join("desired.json"),
            serde_json::to_vec(&old).expect("json"),
        )
        .expect("write");
        let driver = sim_driver(tmp.path(), 4096);
        let r = reconciler(tmp.path(), driver.clone());
        r.resume().await.expect("resume");
        until("x runs", || driver.is_running("x")).await;
        assert_eq!(persisted(tmp.path()), ["x"]);
    }

    /// The simulated driver, but with taps, as QEMU's: a VM with NICs
    /// must wait for them.
    struct WithTaps(Arc<SimDriver>);

    #[async_trait::async_trait]
    impl Driver for WithTaps {
        fn name(&self) -> &'static str {
            "sim-with-taps"
        }
        fn hypervisor(&self) -> virt8ra_api::Hypervisor {
            self.0.hypervisor()
        }
        fn version(&self) -> String {
            self.0.version()
        }
        fn vm_dir(&self, id: &str) -> PathBuf {
            self.0.vm_dir(id)
        }
        fn needs_image(&self) -> bool {
            false
        }
        fn uses_taps(&self) -> bool {
            true
        }
        fn default_machine_type(&self) -> Option<String> {
            self.0.default_machine_type()
        }
        async fn prepare(&self, cfg: &VmConfig) -> crate::driver::Result<()> {
            self.0.prepare(cfg).await
        }
        async fn start(&self, cfg: &VmConfig) -> crate::driver::Result<()> {
            self.0.start(cfg).await
        }
        async fn state(&self, id: &str) -> crate::driver::Result<DriverVmState> {
            self.0.state(id).await
        }
        async fn stop(&self, id: &str, t: Duration) -> crate::driver::Result<()> {
            self.0.stop(id, t).await
        }
        async fn reboot(&self, id: &str) -> crate::driver::Result<()> {
            self.0.reboot(id).await
        }
        async fn destroy(&self, id: &str) -> crate::driver::Result<()> {
            self.0.destroy(id).await
        }
        async fn list(&self) -> crate::driver::Result<Vec<String>> {
            self.0.list().await
        }
    }

    #[tokio::test]
    async fn a_vm_waits_for_its_tap_and_starts_once_it_is_there() {
        let tmp = tempfile::tempdir().expect("tmp");
        let sim = sim_driver(tmp.path(), 4096);
        let images = Arc::new(
            ImageCache::new(
                tmp.path().join("images"),
                "http://127.0.0.1:9",
                "t",
                &virt8ra_tls::Trust::public(),
            )
            .expect("cache"),
        );
        let (reports, _changes) = Reports::new();
        let r = Reconciler::new(
            tmp.path(),
            Arc::new(WithTaps(sim.clone())),
            images,
            reports.clone(),
        )
        .expect("reconciler")
        .with_recheck(Duration::from_millis(50));
        let nic = |tap: &str| virt8ra_api::protocol::DesiredNic {
            id: "nic-1".into(),
            network: "net-1".into(),
            mac: virt8ra_api::mac_for_nic("nic-1"),
            ip: "10.0.0.5".parse().expect("ip"),
            prefix: 24,
            tap: tap.into(),
        };
        let mut d = dvm("x", PowerState::Running);
        d.nics = vec![nic("v8t-notthere01")];
        r.apply(1, vec![d.clone()]).await.expect("apply");
        until("x says it waits for its tap", || {
            reports.all().iter().any(|v| {
                v.id == "x"
                    && v.phase == AgentVmPhase::Provisioning
                    && v.error
                        .as_deref()
                        .is_some_and(|e| e.contains("waiting for tap v8t-notthere01"))
            })
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!sim.is_running("x"), "QEMU would have made the tap itself");
        // The tap appears (here: a device every namespace has).
        d.nics = vec![nic("lo")];
        r.apply(2, vec![d]).await.expect("apply");
        until("x runs", || sim.is_running("x")).await;
    }
}
