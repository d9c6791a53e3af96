//! The simulated driver, for scale tests only: `virt8ra agent --driver sim`.
//!
//! Same agent, same protocol, same reconciler; the VMs exist only in this
//! process's memory. Operations take a realistic time (a boot is a sleep, not
//! a QEMU), and resources are accounted for: a VM that does not fit in the
//! host's remaining memory fails to start, as it would on a real host. The
//! console holds a few synthetic lines. Never a default; the host reports its
//! hypervisor as `emulation` and its QEMU version as `simulated`.
//!
//! Simulated VMs migrate cold, through the same mover and the same staging on
//! the control plane as QEMU's: the source writes a small simulated disk (a
//! header naming the VM, then filler derived from its id), uploads it, the
//! target downloads and adopts it.
//!
//! A driver made [`SimDriver::with_live`] (the in-process test harness's)
//! also migrates live, over real sockets, with QEMU's shape: the target
//! listens on two ports (the disk mirror's and the migration stream's) with
//! the guest paused; the source sends the disk, stops the guest, sends its
//! memory, and stays paused; the target checks both and resumes the guest
//! when the mover asks. The "processes" (listener, sender) are threads of
//! the driver, not tasks of the agent, so they outlive an agent that
//! crashes, as QEMU does; a restarted agent finds them by migration id.
//! Without it live migration is refused: the hosts offer no machine type,
//! so the control plane picks cold (the benchmarks' hosts).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virt8ra_api::Hypervisor;

use super::{Driver, DriverError, DriverVmState, Migrate, Result, VmConfig};

/// First line of a simulated disk.
const DISK_MAGIC: &str = "VIRT8RA-SIM-DISK 1";
/// Filler bytes after a simulated disk's header.
const DISK_FILL: usize = 64 << 10;

/// How long simulated operations take.
#[derive(Debug, Clone, Copy)]
pub struct SimTimings {
    pub prepare: Duration,
    pub boot: Duration,
    pub stop: Duration,
}

impl Default for SimTimings {
    fn default() -> Self {
        SimTimings {
            prepare: Duration::from_millis(5),
            boot: Duration::from_millis(50),
            stop: Duration::from_millis(10),
        }
    }
}

#[derive(Debug, Clone)]
struct SimVm {
    name: String,
    memory_mib: u64,
    /// The guest executes.
    running: bool,
    /// Its "process" is there but the guest is stopped: an incoming copy
    /// that waits, or a source copy that was sent.
    paused: bool,
    boots: u32,
}

type Vms = Arc<Mutex<HashMap<String, SimVm>>>;

pub struct SimDriver {
    root: PathBuf,
    memory_mib: u64,
    timings: SimTimings,
    vms: Vms,
    /// Takes live migrations ([`SimDriver::with_live`]).
    live: bool,
    /// VM id -> its incoming live migration (target).
    incoming: Mutex<HashMap<String, Arc<Incoming>>>,
    /// VM id -> its outgoing live migration (source).
    outgoing: Mutex<HashMap<String, Arc<Outgoing>>>,
}

/// The machine type simulated live-migrating hosts offer.
const SIM_MACHINE: &str = "sim";
/// First line of a simulated live stream.
const LIVE_MAGIC: &str = "VIRT8RA-SIM-LIVE 1";

/// A target's incoming live migration: its listener thread and what it got.
struct Incoming {
    migration_id: String,
    endpoints: virt8ra_api::protocol::LiveEndpoints,
    /// Both streams arrived whole and checked.
    received: AtomicBool,
    /// The guest runs here (kept, as QEMU keeps `incoming.json`, so that a
    /// restarted agent does not start afresh over it).
    resumed: AtomicBool,
    /// Why the thread gave up, if it did.
    failed: Mutex<Option<String>>,
    cancel: AtomicBool,
}

/// A source's outgoing live migration: its sender thread and its outcome.
struct Outgoing {
    migration_id: String,
    bytes_sent: AtomicU64,
    outcome: Mutex<Option<std::result::Result<super::SendOutcome, String>>>,
    cancel: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl SimDriver {
    /// A simulated host with `memory_mib` of memory for guests.
    pub fn new(root: PathBuf, memory_mib: u64, timings: SimTimings) -> SimDriver {
        SimDriver {
            root,
            memory_mib,
            timings,
            vms: Default::default(),
            live: false,
            incoming: Default::default(),
            outgoing: Default::default(),
        }
    }

    /// Whether this host takes live migrations (it then offers machine
    /// type `sim`, which its VMs record).
    pub fn with_live(mut self, live: bool) -> SimDriver {
        self.live = live;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SimVm>> {
        lock(&self.vms)
    }

    /// Whether the VM's guest runs here (for comparing with the control plane).
    pub fn is_running(&self, id: &str) -> bool {
        self.lock().get(id).is_some_and(|v| v.running)
    }

    /// Whether the VM exists here at all (running, paused or stopped).
    pub fn has(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    /// Live migrations whose threads are still here (neither finished
    /// nor cleared): `(incoming, outgoing)`.
    pub fn live_in_flight(&self) -> (usize, usize) {
        let incoming = lock(&self.incoming)
            .values()
            .filter(|i| !i.resumed.load(Ordering::Acquire))
            .count();
        (incoming, lock(&self.outgoing).len())
    }

    /// How many VMs run here.
    pub fn running_count(&self) -> usize {
        self.lock().values().filter(|v| v.running).count()
    }

    /// Memory of the running VMs.
    pub fn memory_in_use(&self) -> u64 {
        self.lock()
            .values()
            .filter(|v| v.running)
            .map(|v| v.memory_mib)
            .sum()
    }
}

#[async_trait::async_trait]
impl Driver for SimDriver {
    fn name(&self) -> &'static str {
        "sim"
    }

    /// The simulated host's own accounting, not the machine's: reading
    /// /proc and statvfs on every beat of 100,000 simulated hosts would be
    /// most of the benchmark's CPU, and would describe the wrong machine.
    fn usage(&self, vms_running: u32) -> Option<virt8ra_api::HostUsage> {
        Some(virt8ra_api::HostUsage {
            vms_running,
            load_1m: 0.0,
            memory_used_mib: self.memory_in_use(),
            disk_used_gib: 0,
        })
    }

    fn hypervisor(&self) -> Hypervisor {
        Hypervisor::Emulation
    }

    fn version(&self) -> String {
        "simulated".into()
    }

    /// Simulated VMs have no machine type (their local state records none)
    /// unless the host migrates live: live migration needs one.
    fn default_machine_type(&self) -> Option<String> {
        self.live.then(|| SIM_MACHINE.to_string())
    }

    fn machine_types(&self) -> Vec<String> {
        if self.live {
            vec![SIM_MACHINE.to_string()]
        } else {
            Vec::new()
        }
    }

    fn needs_image(&self) -> bool {
        false
    }

    fn vm_dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    async fn prepare(&self, cfg: &VmConfig) -> Result<()> {
        tokio::time::sleep(self.timings.prepare).await;
        self.lock().entry(cfg.id.clone()).or_insert(SimVm {
            name: cfg.name.clone(),
            memory_mib: cfg.memory_mib,
            running: false,
            paused: false,
            boots: 0,
        });
        Ok(())
    }

    async fn start(&self, cfg: &VmConfig) -> Result<()> {
        {
            let m = self.lock();
            let Some(vm) = m.get(&cfg.id) else {
                return Err(DriverError::Start(format!(
                    "VM {} has no disk; prepare it first",
                    cfg.id
                )));
            };
            if vm.running {
                return Ok(());
            }
            let used: u64 = m.values().filter(|v| v.running).map(|v| v.memory_mib).sum();
            if used + cfg.memory_mib > self.memory_mib {
                return Err(DriverError::Start(format!(
                    "cannot allocate {} MiB of guest memory: {} of {} MiB in use",
                    cfg.memory_mib, used, self.memory_mib
                )));
            }
        }
        tokio::time::sleep(self.timings.boot).await;
        if let Some(vm) = self.lock().get_mut(&cfg.id) {
            vm.running = true;
            vm.paused = false;
            vm.boots += 1;
        }
        Ok(())
    }

    async fn state(&self, id: &str) -> Result<DriverVmState> {
        // A paused guest's "process" runs, as a paused QEMU does.
        Ok(match self.lock().get(id) {
            None => DriverVmState::Absent,
            Some(v) if v.running || v.paused => DriverVmState::Running,
            Some(_) => DriverVmState::Stopped,
        })
    }

    async fn stop(&self, id: &str, _timeout: Duration) -> Result<()> {
        tokio::time::sleep(self.timings.stop).await;
        if let Some(vm) = self.lock().get_mut(id) {
            vm.running = false;
            vm.paused = false;
        }
        Ok(())
    }

    async fn reboot(&self, id: &str) -> Result<()> {
        match self.lock().get_mut(id) {
            Some(vm) if vm.running => {
                vm.boots += 1;
                Ok(())
            }
            _ => Err(DriverError::Other(format!("VM {id} is not running"))),
        }
    }

    async fn destroy(&self, id: &str) -> Result<()> {
        self.end_live(id);
        self.lock().remove(id);
        // Only the mover's markers live on disk, when a VM moved.
        let _ = std::fs::remove_dir_all(self.vm_dir(id));
        Ok(())
    }

    async fn list(&self) -> Result<Vec<String>> {
        let mut v: Vec<String> = self.lock().keys().cloned().collect();
        v.sort();
        Ok(v)
    }

    fn migrator(&self) -> Option<&dyn Migrate> {
        Some(self)
    }

    fn console_tail(&self, id: &str, max_bytes: u64) -> std::io::Result<(String, bool)> {
        let text = match self.lock().get(id) {
            None => String::new(),
            Some(vm) => (1..=vm.boots)
                .map(|b| format!("VIRT8RA-SIM-BOOTED name={} boot={b}\n", vm.name))
                .collect(),
        };
        let start = text.len().saturating_sub(max_bytes as usize);
        Ok((text[start..].to_string(), start > 0))
    }
}

fn live_refused() -> DriverError {
    DriverError::Other("the simulated driver migrates VMs cold only".into())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a live stream carries for VM `id` (`boots`: its history).
fn live_payload(id: &str, boots: u32) -> Vec<u8> {
    let mut data = format!("{LIVE_MAGIC}\nvm {id}\nboots {boots}\n\n").into_bytes();
    data.extend(filler(id));
    data
}

/// About how many bytes a live stream carries (for progress).
fn live_payload_len() -> u64 {
    (DISK_FILL + 64) as u64
}

/// Checks a live stream received for VM `id`; returns the boots it carried.
fn check_live_payload(id: &str, data: &[u8]) -> std::result::Result<u32, String> {
    let end = data
        .windows(2)
        .position(|w| w == b"\n\n")
        .ok_or("the stream has no header")?;
    let header = std::str::from_utf8(&data[..end]).map_err(|_| "the header is not UTF-8")?;
    let mut lines = header.lines();
    if lines.next() != Some(LIVE_MAGIC) {
        return Err("not a simulated live stream".into());
    }
    let fields: HashMap<&str, &str> = lines.filter_map(|l| l.split_once(' ')).collect();
    if fields.get("vm") != Some(&id) {
        return Err(format!("the stream carries another VM than {id}"));
    }
    if data[end + 2..] != filler(id)[..] {
        return Err("the stream arrived damaged".into());
    }
    Ok(fields
        .get("boots")
        .and_then(|b| b.parse().ok())
        .unwrap_or(0))
}

/// Accepts one connection on `l` (non-blocking, polled) and reads it
/// whole; gives up when `cancel` is set.
fn receive_one(l: &std::net::TcpListener, cancel: &AtomicBool) -> std::io::Result<Vec<u8>> {
    loop {
        if cancel.load(Ordering::Acquire) {
            return Err(std::io::Error::other("cancelled"));
        }
        match l.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                let mut buf = Vec::new();
                s.read_to_end(&mut buf)?;
                return Ok(buf);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => return Err(e),
        }
    }
}

/// Sends `data` on a new connection to `addr`, counting into `sent`.
fn send_one(addr: &str, data: &[u8], sent: &AtomicU64, cancel: &AtomicBool) -> std::io::Result<()> {
    let mut s = std::net::TcpStream::connect(addr)?;
    for chunk in data.chunks(8 << 10) {
        if cancel.load(Ordering::Acquire) {
            return Err(std::io::Error::other("cancelled"));
        }
        s.write_all(chunk)?;
        sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    s.shutdown(std::net::Shutdown::Write)
}

impl SimDriver {
    /// Target: the incoming copy of `cfg` for `migration_id`, waiting on
    /// two ports (kept if it already waits; anything else there goes).
    fn incoming_live(
        &self,
        cfg: &VmConfig,
        migration_id: &str,
        listen: &str,
    ) -> Result<virt8ra_api::protocol::LiveEndpoints> {
        if let Some(i) = lock(&self.incoming).get(&cfg.id) {
            let alive = lock(&i.failed).is_none() && !i.cancel.load(Ordering::Acquire);
            if i.migration_id == migration_id && alive {
                return Ok(i.endpoints.clone());
            }
        }
        // A leftover from an earlier attempt: start clean.
        self.end_live(&cfg.id);
        self.lock().insert(
            cfg.id.clone(),
            SimVm {
                name: cfg.name.clone(),
                memory_mib: cfg.memory_mib,
                running: false,
                paused: true,
                boots: 0,
            },
        );
        let bind = |what: &str| {
            let l = std::net::TcpListener::bind((listen, 0))
                .map_err(|e| DriverError::Io(format!("bind the {what} port on {listen}"), e))?;
            l.set_nonblocking(true)
                .map_err(|e| DriverError::Io(format!("set up the {what} port"), e))?;
            let addr = l
                .local_addr()
                .map_err(|e| DriverError::Io(format!("the {what} port"), e))?;
            Ok::<_, DriverError>((l, format!("{listen}:{}", addr.port())))
        };
        let (nbd, nbd_addr) = bind("disk")?;
        let (mig, mig_addr) = bind("migration")?;
        let inc = Arc::new(Incoming {
            migration_id: migration_id.to_string(),
            endpoints: virt8ra_api::protocol::LiveEndpoints {
                migrate: mig_addr,
                nbd: nbd_addr,
                export_name: "disk0".into(),
                data_nbd: vec![],
            },
            received: AtomicBool::new(false),
            resumed: AtomicBool::new(false),
            failed: Mutex::new(None),
            cancel: AtomicBool::new(false),
        });
        lock(&self.incoming).insert(cfg.id.clone(), inc.clone());
        let endpoints = inc.endpoints.clone();
        let (vms, id) = (self.vms.clone(), cfg.id.clone());
        std::thread::spawn(move || {
            let got = receive_one(&nbd, &inc.cancel)
                .and_then(|disk| Ok((disk, receive_one(&mig, &inc.cancel)?)));
            let checked = match got {
                Err(e) => Err(format!("the incoming stream broke: {e}")),
                Ok((disk, mem)) => {
                    check_live_payload(&id, &disk).and_then(|_| check_live_payload(&id, &mem))
                }
            };
            match checked {
                Ok(boots) => {
                    if let Some(vm) = lock(&vms).get_mut(&id) {
                        vm.boots = boots;
                    }
                    inc.received.store(true, Ordering::Release);
                }
                Err(why) => *lock(&inc.failed) = Some(why),
            }
        });
        Ok(endpoints)
    }

    /// Source: the sender of `id` to `target` for `migration_id`, started
    /// unless it runs or ran already (an agent restarted meanwhile).
    fn outgoing_live(
        &self,
        id: &str,
        migration_id: &str,
        target: &virt8ra_api::protocol::LiveEndpoints,
    ) -> Result<Arc<Outgoing>> {
        let mut outs = lock(&self.outgoing);
        if let Some(o) = outs.get(id).filter(|o| o.migration_id == migration_id) {
            return Ok(o.clone());
        }
        let boots = match self.lock().get(id) {
            Some(v) if v.running => v.boots,
            _ => return Err(DriverError::Other(format!("VM {id} is not running"))),
        };
        if !target.data_nbd.is_empty() {
            return Err(DriverError::Other(
                "the simulated driver moves no data disks live".into(),
            ));
        }
        let out = Arc::new(Outgoing {
            migration_id: migration_id.to_string(),
            bytes_sent: AtomicU64::new(0),
            outcome: Mutex::new(None),
            cancel: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let (o, vms, id2, target) = (
            out.clone(),
            self.vms.clone(),
            id.to_string(),
            target.clone(),
        );
        let t = std::thread::spawn(move || {
            let payload = live_payload(&id2, boots);
            // The disk first, the guest running; then the guest stops for
            // its memory, and stays stopped once sent.
            let r = send_one(&target.nbd, &payload, &o.bytes_sent, &o.cancel).and_then(|_| {
                let stopped = Instant::now();
                if let Some(vm) = lock(&vms).get_mut(&id2) {
                    vm.running = false;
                    vm.paused = true;
                }
                send_one(&target.migrate, &payload, &o.bytes_sent, &o.cancel)
                    .map(|_| stopped.elapsed().as_millis() as u64)
            });
            let outcome = match r {
                Ok(downtime_ms) => Ok(super::SendOutcome {
                    downtime_ms,
                    bytes: o.bytes_sent.load(Ordering::Relaxed),
                }),
                Err(e) => {
                    // As QEMU does when a migration fails: the guest goes on.
                    if let Some(vm) = lock(&vms).get_mut(&id2) {
                        if vm.paused {
                            vm.paused = false;
                            vm.running = true;
                        }
                    }
                    Err(format!("the live stream to {} broke: {e}", target.migrate))
                }
            };
            *lock(&o.outcome) = Some(outcome);
        });
        *lock(&out.thread) = Some(t);
        outs.insert(id.to_string(), out.clone());
        Ok(out)
    }

    /// Stops the live-migration threads of `id` (the VM goes).
    fn end_live(&self, id: &str) {
        if let Some(i) = lock(&self.incoming).remove(id) {
            i.cancel.store(true, Ordering::Release);
        }
        if let Some(o) = lock(&self.outgoing).remove(id) {
            o.cancel.store(true, Ordering::Release);
        }
    }
}

/// Filler derived from the VM's id, so that every simulated disk differs.
fn filler(id: &str) -> Vec<u8> {
    let mut x = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (0..DISK_FILL)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[async_trait::async_trait]
impl Migrate for SimDriver {
    fn marker_dir(&self, id: &str) -> PathBuf {
        Driver::vm_dir(self, id)
    }

    async fn start_incoming(
        &self,
        cfg: &VmConfig,
        migration_id: &str,
        listen: &str,
    ) -> Result<virt8ra_api::protocol::LiveEndpoints> {
        if !self.live {
            return Err(live_refused());
        }
        self.incoming_live(cfg, migration_id, listen)
    }

    async fn await_incoming(&self, id: &str, migration_id: &str) -> Result<u64> {
        if !self.live {
            return Err(live_refused());
        }
        loop {
            let inc = lock(&self.incoming).get(id).cloned();
            match inc {
                Some(i) if i.migration_id == migration_id => {
                    if i.resumed.load(Ordering::Acquire) {
                        return Ok(0);
                    }
                    if i.received.load(Ordering::Acquire) {
                        let t = Instant::now();
                        if let Some(vm) = self.lock().get_mut(id) {
                            vm.running = true;
                            vm.paused = false;
                        }
                        i.resumed.store(true, Ordering::Release);
                        return Ok(t.elapsed().as_millis() as u64);
                    }
                    if let Some(why) = lock(&i.failed).clone() {
                        return Err(DriverError::Other(why));
                    }
                }
                // Resumed already (the agent restarted since).
                _ if self.is_running(id) => return Ok(0),
                _ => {
                    return Err(DriverError::Other(
                        "the incoming VM went away before the VM arrived".into(),
                    ))
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn send_live(
        &self,
        id: &str,
        migration_id: &str,
        target: &virt8ra_api::protocol::LiveEndpoints,
        progress: &(dyn Fn(virt8ra_api::MigrationProgress) + Send + Sync),
    ) -> Result<super::SendOutcome> {
        if !self.live {
            return Err(live_refused());
        }
        let out = self.outgoing_live(id, migration_id, target)?;
        let t = Instant::now();
        loop {
            if let Some(r) = lock(&out.outcome).clone() {
                return r.map_err(DriverError::Other);
            }
            let done = out.bytes_sent.load(Ordering::Relaxed);
            progress(virt8ra_api::MigrationProgress::at_rate(
                "memory",
                done,
                live_payload_len(),
                done,
                t.elapsed().as_secs_f64(),
                0,
            ));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn abort_outgoing(&self, id: &str) -> Result<()> {
        // Cold: the VM is stopped here and the reconciler starts it. Live:
        // the sender stops, and the guest runs here again.
        let out = lock(&self.outgoing).remove(id);
        if let Some(o) = out {
            o.cancel.store(true, Ordering::Release);
            let t = lock(&o.thread).take();
            if let Some(t) = t {
                let _ = tokio::task::spawn_blocking(move || t.join()).await;
            }
        }
        if let Some(vm) = self.lock().get_mut(id) {
            if vm.paused {
                vm.paused = false;
                vm.running = true;
            }
        }
        Ok(())
    }

    async fn export_disk(&self, id: &str, _backing: Option<&Path>, out: &Path) -> Result<()> {
        let (name, memory_mib, boots) = match self.lock().get(id) {
            None => return Err(DriverError::Other(format!("VM {id} has no disk here"))),
            Some(v) if v.running => {
                return Err(DriverError::Other(format!(
                    "VM {id} is running; stop it first"
                )))
            }
            Some(v) => (v.name.clone(), v.memory_mib, v.boots),
        };
        tokio::time::sleep(self.timings.stop).await;
        let mut data = format!(
            "{DISK_MAGIC}\nvm {id}\nname {name}\nmemory_mib {memory_mib}\nboots {boots}\n\n"
        )
        .into_bytes();
        data.extend(filler(id));
        let tmp = out.with_extension("tmp");
        std::fs::write(&tmp, &data)
            .and_then(|_| std::fs::rename(&tmp, out))
            .map_err(|e| DriverError::Io(format!("write the simulated disk {}", out.display()), e))
    }

    async fn adopt_disk(&self, cfg: &VmConfig, file: &Path) -> Result<()> {
        let data = std::fs::read(file)
            .map_err(|e| DriverError::Io(format!("read {}", file.display()), e))?;
        let bad = |why: &str| {
            DriverError::Other(format!(
                "{} is not a simulated disk of VM {}: {why}",
                file.display(),
                cfg.id
            ))
        };
        let end = data
            .windows(2)
            .position(|w| w == b"\n\n")
            .ok_or_else(|| bad("no header"))?;
        let header = std::str::from_utf8(&data[..end]).map_err(|_| bad("header not UTF-8"))?;
        let mut lines = header.lines();
        if lines.next() != Some(DISK_MAGIC) {
            return Err(bad("wrong format"));
        }
        let fields: HashMap<&str, &str> = lines.filter_map(|l| l.split_once(' ')).collect();
        if fields.get("vm") != Some(&cfg.id.as_str()) {
            return Err(bad("it belongs to another VM"));
        }
        if data[end + 2..] != filler(&cfg.id)[..] {
            return Err(bad("its contents are damaged"));
        }
        let boots = fields
            .get("boots")
            .and_then(|b| b.parse().ok())
            .unwrap_or(0);
        tokio::time::sleep(self.timings.prepare).await;
        self.lock().insert(
            cfg.id.clone(),
            SimVm {
                name: cfg.name.clone(),
                memory_mib: cfg.memory_mib,
                running: false,
                paused: false,
                boots,
            },
        );
        let _ = std::fs::remove_file(file);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(id: &str, mem: u64) -> VmConfig {
        VmConfig {
            id: id.into(),
            name: format!("vm-{id}"),
            vcpus: 1,
            memory_mib: mem,
            disk_gib: 1,
            base_image: PathBuf::new(),
            ports: vec![],
            context: Default::default(),
            machine: None,
            data_disks: vec![],
            nics: vec![],
        }
    }

    #[tokio::test]
    async fn lifecycle_and_memory_accounting() {
        let d = SimDriver::new(PathBuf::from("/nonexistent"), 1024, SimTimings::default());
        assert_eq!(d.state("a").await.unwrap(), DriverVmState::Absent);
        d.prepare(&cfg("a", 768)).await.unwrap();
        assert_eq!(d.state("a").await.unwrap(), DriverVmState::Stopped);
        d.start(&cfg("a", 768)).await.unwrap();
        assert_eq!(d.state("a").await.unwrap(), DriverVmState::Running);
        assert_eq!(d.memory_in_use(), 768);
        // A second VM does not fit in the remaining 256 MiB.
        d.prepare(&cfg("b", 512)).await.unwrap();
        let e = d.start(&cfg("b", 512)).await.unwrap_err();
        assert!(e.to_string().contains("cannot allocate 512 MiB"), "{e}");
        d.reboot("a").await.unwrap();
        let (console, _) = d.console_tail("a", 1000).unwrap();
        assert_eq!(console.matches("VIRT8RA-SIM-BOOTED").count(), 2);
        d.stop("a", Duration::ZERO).await.unwrap();
        d.start(&cfg("b", 512)).await.unwrap();
        d.destroy("a").await.unwrap();
        assert_eq!(d.list().await.unwrap(), vec!["b".to_string()]);
    }

    #[tokio::test]
    async fn a_cold_move_carries_the_vm_and_refuses_foreign_or_damaged_disks() {
        let dir = tempfile::tempdir().unwrap();
        let src = SimDriver::new(dir.path().join("a"), 4096, SimTimings::default());
        let dst = SimDriver::new(dir.path().join("b"), 4096, SimTimings::default());
        let m: &dyn Migrate = &src;
        let out = dir.path().join("x.disk");
        src.prepare(&cfg("v", 512)).await.unwrap();
        src.start(&cfg("v", 512)).await.unwrap();
        let e = m.export_disk("v", None, &out).await.unwrap_err();
        assert!(e.to_string().contains("running"), "{e}");
        src.stop("v", Duration::ZERO).await.unwrap();
        m.export_disk("v", None, &out).await.unwrap();
        // Another VM's disk, or a damaged one, is not adopted.
        let e = dst.adopt_disk(&cfg("w", 512), &out).await.unwrap_err();
        assert!(e.to_string().contains("another VM"), "{e}");
        let mut bytes = std::fs::read(&out).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let damaged = dir.path().join("y.disk");
        std::fs::write(&damaged, &bytes).unwrap();
        let e = dst.adopt_disk(&cfg("v", 512), &damaged).await.unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
        assert_eq!(dst.state("v").await.unwrap(), DriverVmState::Absent);
        dst.adopt_disk(&cfg("v", 512), &out).await.unwrap();
        assert_eq!(dst.state("v").await.unwrap(), DriverVmState::Stopped);
        dst.start(&cfg("v", 512)).await.unwrap();
        // The console shows both boots: the VM's history came along.
        let (console, _) = dst.console_tail("v", 1000).unwrap();
        assert_eq!(console.matches("VIRT8RA-SIM-BOOTED").count(), 2);
        let e = m
            .start_incoming(&cfg("v", 512), "m", "127.0.0.1")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("cold only"), "{e}");
    }

    /// Live, over real sockets: the source's guest stops once its memory
    /// went and stays stopped; the target runs it only when told; a second
    /// ask for the same migration (a restarted agent) keeps what is there;
    /// an abort on the source runs its guest again.
    #[tokio::test]
    async fn a_live_move_runs_the_guest_on_one_side_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let src = SimDriver::new(dir.path().join("a"), 4096, SimTimings::default()).with_live(true);
        let dst = SimDriver::new(dir.path().join("b"), 4096, SimTimings::default()).with_live(true);
        assert_eq!(src.machine_types(), ["sim"]);
        src.prepare(&cfg("v", 512)).await.unwrap();
        src.start(&cfg("v", 512)).await.unwrap();
        src.reboot("v").await.unwrap();
        let (s, d): (&dyn Migrate, &dyn Migrate) = (&src, &dst);
        let ep = d
            .start_incoming(&cfg("v", 512), "m1", "127.0.0.1")
            .await
            .unwrap();
        assert_eq!(
            d.start_incoming(&cfg("v", 512), "m1", "127.0.0.1")
                .await
                .unwrap(),
            ep
        );
        assert!(dst.has("v") && !dst.is_running("v"), "waits paused");
        let out = s.send_live("v", "m1", &ep, &|_| {}).await.unwrap();
        assert!(out.bytes > 0);
        assert!(!src.is_running("v"), "the source stays stopped once sent");
        assert_eq!(src.state("v").await.unwrap(), DriverVmState::Running);
        assert!(!dst.is_running("v"), "the target waits to be told");
        d.await_incoming("v", "m1").await.unwrap();
        assert!(dst.is_running("v"));
        // A restarted agent asks again: the running guest is kept.
        assert_eq!(
            d.start_incoming(&cfg("v", 512), "m1", "127.0.0.1")
                .await
                .unwrap(),
            ep
        );
        assert_eq!(d.await_incoming("v", "m1").await.unwrap(), 0);
        assert!(dst.is_running("v"));
        let (console, _) = dst.console_tail("v", 1000).unwrap();
        assert_eq!(console.matches("VIRT8RA-SIM-BOOTED").count(), 2);
        // Had it rolled back (target copy gone): the source runs again.
        dst.destroy("v").await.unwrap();
        assert_eq!(dst.live_in_flight(), (0, 0));
        s.abort_outgoing("v").await.unwrap();
        assert!(src.is_running("v"));
        assert_eq!(src.live_in_flight(), (0, 0));
    }
}
