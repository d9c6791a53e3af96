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
//! target downloads and adopts it. Live migration is refused (the hosts do
//! not offer it, so `auto` picks cold).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

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
    running: bool,
    boots: u32,
}

pub struct SimDriver {
    root: PathBuf,
    memory_mib: u64,
    timings: SimTimings,
    vms: Mutex<HashMap<String, SimVm>>,
}

impl SimDriver {
    /// A simulated host with `memory_mib` of memory for guests.
    pub fn new(root: PathBuf, memory_mib: u64, timings: SimTimings) -> SimDriver {
        SimDriver {
            root,
            memory_mib,
            timings,
            vms: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SimVm>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the VM is running here (for comparing with the control plane).
    pub fn is_running(&self, id: &str) -> bool {
        self.lock().get(id).is_some_and(|v| v.running)
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

    /// Simulated VMs have no machine type: their local state records none.
    fn default_machine_type(&self) -> Option<String> {
        None
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
            vm.boots += 1;
        }
        Ok(())
    }

    async fn state(&self, id: &str) -> Result<DriverVmState> {
        Ok(match self.lock().get(id) {
            None => DriverVmState::Absent,
            Some(v) if v.running => DriverVmState::Running,
            Some(_) => DriverVmState::Stopped,
        })
    }

    async fn stop(&self, id: &str, _timeout: Duration) -> Result<()> {
        tokio::time::sleep(self.timings.stop).await;
        if let Some(vm) = self.lock().get_mut(id) {
            vm.running = false;
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
        _cfg: &VmConfig,
        _migration_id: &str,
        _listen: &str,
    ) -> Result<virt8ra_api::protocol::LiveEndpoints> {
        Err(live_refused())
    }

    async fn await_incoming(&self, _id: &str, _migration_id: &str) -> Result<u64> {
        Err(live_refused())
    }

    async fn send_live(
        &self,
        _id: &str,
        _migration_id: &str,
        _target: &virt8ra_api::protocol::LiveEndpoints,
        _progress: &(dyn Fn(virt8ra_api::MigrationProgress) + Send + Sync),
    ) -> Result<super::SendOutcome> {
        Err(live_refused())
    }

    async fn abort_outgoing(&self, _id: &str) -> Result<()> {
        // Cold only: the VM is stopped here and the reconciler starts it.
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
}
