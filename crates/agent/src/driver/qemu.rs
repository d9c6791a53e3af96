//! The QEMU driver: each VM is one `qemu-system-x86_64` process controlled
//! over QMP.
//!
//! QEMU runs daemonised (`-daemonize -pidfile`), in its own session, so it
//! outlives the agent: an agent restart or upgrade does not touch the guests.
//! Everything needed to find a VM again lives in its directory — the pid file,
//! the QMP socket, the console log and `vm.json` with the configuration it was
//! started with — which is how a restarted agent re-attaches.
//!
//! Disks are qcow2 overlays over the cached base image, so a VM costs only
//! the blocks it writes. The serial console goes to `console.log` (appended
//! across reboots and restarts). Networking is QEMU user mode with host port
//! forwards on loopback; a VM with NICs on virtual networks gets a
//! virtio NIC on a tap per NIC instead (the taps are the network data
//! plane's, `crate::network`).
//!
//! Hardware acceleration is probed once per host boot ([`super::kvm_probe`]);
//! under emulation the CPU model is the fixed `qemu64`, under KVM `host`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::process::Command;
use virt8ra_api::Hypervisor;

use super::{kvm_probe, qmp, Driver, DriverError, DriverVmState, Result, VmConfig};

const QEMU: &str = "qemu-system-x86_64";

/// How to choose the accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    /// Probe KVM by booting a guest; fall back to emulation.
    Auto,
    Kvm,
    Emulation,
}

pub struct QemuDriver {
    root: PathBuf,
    hypervisor: Hypervisor,
    version: String,
    /// Concrete machine types this QEMU offers, and the one `pc` stands for.
    machine_types: Vec<String>,
    default_machine: String,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DriverError {
    let what = what.into();
    move |e| DriverError::Io(what, e)
}

impl QemuDriver {
    /// A driver keeping VM directories under `root`.
    pub async fn new(root: PathBuf, accel: AccelChoice) -> Result<QemuDriver> {
        crate::private::make_dir(&root).map_err(io_err(format!("create {}", root.display())))?;
        let out = Command::new(QEMU)
            .arg("--version")
            .output()
            .await
            .map_err(|e| {
                DriverError::Start(format!(
                    "cannot run {QEMU} ({e}): install qemu-system-x86 (scripts/deps.sh)"
                ))
            })?;
        if !out.status.success() {
            return Err(DriverError::Start(format!(
                "{QEMU} --version failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("QEMU")
            .replace("QEMU emulator version", "QEMU")
            .trim()
            .to_string();
        let hypervisor = match accel {
            AccelChoice::Kvm => Hypervisor::Kvm,
            AccelChoice::Emulation => Hypervisor::Emulation,
            AccelChoice::Auto => {
                let parent = root.parent().unwrap_or(&root).to_path_buf();
                let (kvm, why) = kvm_probe::probe(&parent, &parent.join("kvm-probe.json")).await;
                if kvm {
                    tracing::info!(reason = %why, "using KVM");
                    Hypervisor::Kvm
                } else {
                    tracing::info!(reason = %why, "KVM not usable; using emulation (TCG)");
                    Hypervisor::Emulation
                }
            }
        };
        let (machine_types, default_machine) = machine_types().await;
        Ok(QemuDriver {
            root,
            hypervisor,
            version,
            machine_types,
            default_machine,
        })
    }

    /// The machine type a VM runs with: its own, or this QEMU's `pc`.
    pub fn machine_of(&self, cfg: &VmConfig) -> String {
        cfg.machine
            .clone()
            .unwrap_or_else(|| self.default_machine.clone())
    }

    /// The machine type `pc` stands for on this host.
    pub fn default_machine(&self) -> &str {
        &self.default_machine
    }

    /// The pid of the VM's QEMU, if it runs.
    pub fn running_pid(&self, id: &str) -> Option<i32> {
        self.live_pid(id)
    }

    fn pid_file(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join("qemu.pid")
    }

    fn qmp_socket(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join("qmp.sock")
    }

    /// The pid of the VM's QEMU if it is alive (and really is that QEMU).
    ///
    /// The pid file is the normal way; a scan of `/proc` catches a QEMU whose
    /// pid file was lost (deleted by hand, or a crash between the fork and the
    /// write), so such a process is neither reported as stopped nor left
    /// running as an orphan by `destroy`.
    fn live_pid(&self, id: &str) -> Option<i32> {
        let dir = self.vm_dir(id);
        let from_file = std::fs::read_to_string(self.pid_file(id))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        match from_file {
            Some(pid) if is_our_qemu(pid, &dir) => Some(pid),
            _ => vm_processes(&dir).into_iter().next(),
        }
    }

    /// The run state QEMU reports over QMP (`running`, `paused`,
    /// `shutdown`, ...), for diagnostics and tests.
    pub async fn qmp_status(&self, id: &str) -> Result<String> {
        if self.live_pid(id).is_none() {
            return Err(DriverError::Other(format!("VM {id} is not running")));
        }
        qmp::query_status(&self.qmp_socket(id)).await
    }

    /// The command line that runs `cfg`. A VM without data disks keeps the
    /// command line of agents before data disks (live migration between
    /// them needs the same devices on both sides).
    pub fn command_line(&self, cfg: &VmConfig) -> Vec<String> {
        let dir = self.vm_dir(&cfg.id);
        // QEMU option values are comma-separated: a literal comma is doubled.
        let p = |f: &str| opt_escape(&dir.join(f).to_string_lossy());
        let (accel, cpu) = match self.hypervisor {
            Hypervisor::Kvm => ("kvm", "host"),
            Hypervisor::Emulation => ("tcg", "qemu64"),
        };
        let mut net = String::from("user,id=net0");
        for (guest, host) in &cfg.ports {
            net.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
        }
        let a: Vec<String> = vec![
            "-name".into(),
            format!(
                "{},process=virt8ra-{}",
                opt_escape(&cfg.name),
                opt_escape(&cfg.id)
            ),
            "-machine".into(),
            format!("{},accel={accel}", opt_escape(&self.machine_of(cfg))),
            "-cpu".into(),
            cpu.into(),
            "-smp".into(),
            cfg.vcpus.to_string(),
            "-m".into(),
            cfg.memory_mib.to_string(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-vga".into(),
            "none".into(),
            "-drive".into(),
            format!(
                "file={},if=virtio,format=qcow2,cache=writeback,discard=unmap",
                p("disk.qcow2")
            ),
            // The NoCloud seed (cloud-init), read-only.
            "-drive".into(),
            format!("file={},if=virtio,format=raw,readonly=on", p("seed.img")),
            "-chardev".into(),
            format!("file,id=con0,path={},append=on", p("console.log")),
            "-serial".into(),
            "chardev:con0".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", p("qmp.sock")),
            "-daemonize".into(),
            "-pidfile".into(),
            p("qemu.pid"),
        ];
        let mut a = a;
        a.extend(nic_args(cfg, net));
        // Data disks at PCI slots after every other device's, so the
        // firmware still boots the boot disk (the first disk in PCI order)
        // and the guest names them after the boot disk and the seed (vdc,
        // vdd, ...); the serial names each one in the guest.
        for i in 0..cfg.data_disks.len() {
            a.push("-drive".into());
            a.push(format!(
                "file={},if=none,id=data{i},format=qcow2,cache=writeback,discard=unmap",
                p(&super::data_disk_file(i))
            ));
            a.push("-device".into());
            a.push(format!(
                "virtio-blk-pci,drive=data{i},serial=data-{i},addr={:#x}",
                DATA_DISK_SLOT + i
            ));
        }
        a
    }

    async fn wait_gone(&self, id: &str, timeout: Duration) -> bool {
        let start = Instant::now();
        loop {
            if self.live_pid(id).is_none() {
                return true;
            }
            if start.elapsed() >= timeout {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ends the process: QMP `quit`, then SIGKILL (to every QEMU naming the
    /// VM's directory). Waits until it is gone.
    async fn force_off(&self, id: &str) -> Result<()> {
        let Some(pid) = self.live_pid(id) else {
            return Ok(());
        };
        if let Err(e) = qmp::execute(&self.qmp_socket(id), "quit", None).await {
            tracing::debug!(vm = %id, error = %e, "QMP quit");
        }
        if self.wait_gone(id, Duration::from_secs(5)).await {
            return Ok(());
        }
        tracing::warn!(vm = %id, pid, "QEMU ignored quit; killing it");
        let dir = self.vm_dir(id);
        let mut pids = vm_processes(&dir);
        if is_our_qemu(pid, &dir) && !pids.contains(&pid) {
            pids.push(pid);
        }
        for pid in pids {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                if let Err(e) = rustix::process::kill_process(p, rustix::process::Signal::KILL) {
                    tracing::warn!(vm = %id, pid, error = %e, "SIGKILL failed");
                }
            }
        }
        if self.wait_gone(id, Duration::from_secs(10)).await {
            Ok(())
        } else {
            Err(DriverError::Other(format!(
                "QEMU process {pid} of VM {id} does not go away after SIGKILL"
            )))
        }
    }

    /// Runs QEMU with `args` (daemonised) and checks it stayed up.
    pub async fn spawn_qemu(&self, cfg: &VmConfig, args: Vec<String>) -> Result<()> {
        let dir = self.vm_dir(&cfg.id);
        let _ = std::fs::remove_file(self.qmp_socket(&cfg.id));
        let _ = std::fs::remove_file(self.pid_file(&cfg.id));
        let record = serde_json::json!({
            "id": cfg.id, "name": cfg.name, "vcpus": cfg.vcpus, "memory_mib": cfg.memory_mib,
            "disk_gib": cfg.disk_gib, "base_image": cfg.base_image, "ports": cfg.ports,
            "hypervisor": self.hypervisor, "machine": self.machine_of(cfg), "command": args,
        });
        std::fs::write(
            dir.join("vm.json"),
            serde_json::to_vec_pretty(&record).unwrap_or_default(),
        )
        .map_err(io_err("write vm.json"))?;
        let stderr_path = dir.join("qemu.stderr");
        let stderr = std::fs::File::create(&stderr_path).map_err(io_err("create qemu.stderr"))?;
        // With -daemonize the command returns once the guest is set up and
        // the daemon detached; a non-zero exit means QEMU refused to start.
        let status = Command::new(QEMU)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .status()
            .await
            .map_err(|e| DriverError::Start(format!("cannot run {QEMU}: {e}")))?;
        if !status.success() {
            return Err(DriverError::Start(format!(
                "{QEMU} exited with {status}: {}",
                tail(&stderr_path, 2000)
            )));
        }
        if self.live_pid(&cfg.id).is_none() {
            return Err(DriverError::Start(format!(
                "QEMU exited right after starting: {}",
                tail(&stderr_path, 2000)
            )));
        }
        Ok(())
    }
}

/// The VM's network devices: a virtio NIC on its tap for each NIC on a
/// virtual network (created beforehand by the network data plane; QEMU
/// neither creates nor configures it: no scripts); without any, QEMU's
/// user-mode NIC `user` with its port forwards, exactly as before virtual
/// networks (a live migration between the two kinds of agent needs the
/// same devices on both sides).
fn nic_args(cfg: &VmConfig, user: String) -> Vec<String> {
    if cfg.nics.is_empty() {
        return vec![
            "-netdev".into(),
            user,
            "-device".into(),
            // QEMU's default MAC for the first NIC, explicit: the guest's
            // network configuration matches the first NIC by it.
            format!(
                "virtio-net-pci,netdev=net0,mac={}",
                super::cloudinit::FIRST_NIC_MAC
            ),
        ];
    }
    let mut a = Vec::new();
    for (i, nic) in cfg.nics.iter().enumerate() {
        a.push("-netdev".into());
        a.push(format!(
            "tap,id=n{i},ifname={},script=no,downscript=no",
            opt_escape(&nic.tap)
        ));
        a.push("-device".into());
        a.push(format!("virtio-net-pci,netdev=n{i},mac={}", nic.mac));
    }
    a
}

/// Doubles the commas of a QEMU option value (`a,b` -> `a,,b`).
pub fn opt_escape(v: &str) -> String {
    v.replace(',', ",,")
}

/// Whether `pid` is a live (not zombie) QEMU started for the VM in `dir`:
/// its program is `qemu-system-*` and an argument names a file inside `dir`
/// (`<dir>/`, so VM `a1` is not mistaken for VM `a10`).
pub fn is_our_qemu(pid: i32, dir: &Path) -> bool {
    is_dir_process(pid, dir, "qemu-system")
}

/// Whether `pid` is a live (not zombie) process whose program name starts
/// with `prefix` and an argument of which names a file inside `dir`.
pub fn is_dir_process(pid: i32, dir: &Path, prefix: &str) -> bool {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let Ok(cmd) = std::fs::read(proc.join("cmdline")) else {
        return false;
    };
    let mut args = cmd.split(|b| *b == 0).map(String::from_utf8_lossy);
    let is_qemu = args
        .next()
        .map(|a0| {
            Path::new(&*a0)
                .file_name()
                .map(|n| n.to_string_lossy().starts_with(prefix))
                .unwrap_or(false)
        })
        .unwrap_or(false);
    let inside = format!("{}/", dir.to_string_lossy());
    // Paths appear escaped (doubled commas) inside option values.
    let inside_escaped = opt_escape(&inside);
    if !is_qemu || !args.any(|a| a.contains(&inside) || a.contains(&inside_escaped)) {
        return false;
    }
    let stat = std::fs::read_to_string(proc.join("stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z') | Some('X') | None)
}

/// Every live QEMU process started for the VM in `dir`, found by scanning
/// `/proc`. Normally one at most.
pub fn vm_processes(dir: &Path) -> Vec<i32> {
    dir_processes(dir, "qemu-system")
}

/// Every live process of program `prefix*` started for the VM in `dir`
/// (QEMU, or the qemu-nbd of an incoming migration).
pub fn dir_processes(dir: &Path, prefix: &str) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    let mut pids: Vec<i32> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| is_dir_process(*pid, dir, prefix))
        .collect();
    pids.sort_unstable();
    pids
}

/// The concrete machine types of this QEMU, and the one `pc` is an alias of.
async fn machine_types() -> (Vec<String>, String) {
    let out = Command::new(QEMU).args(["-machine", "help"]).output().await;
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let mut types = Vec::new();
    let mut default = String::from("pc");
    for line in text.lines().skip(1) {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if let Some(alias) = line
            .split("(alias of ")
            .nth(1)
            .and_then(|r| r.split(')').next())
        {
            if name == "pc" {
                default = alias.to_string();
            }
            continue;
        }
        if name != "none" {
            types.push(name.to_string());
        }
    }
    (types, default)
}

/// Runs `qemu-img ARGS`; its stdout, or its stderr as the error.
pub(super) async fn qemu_img(args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .await
        .map_err(|e| DriverError::QemuImg(format!("cannot run qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(DriverError::QemuImg(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(out.stdout)
}

fn tail(path: &Path, max: u64) -> String {
    super::read_tail(path, max)
        .map(|(s, _)| s.trim().to_string())
        .unwrap_or_default()
}

#[async_trait::async_trait]
impl Driver for QemuDriver {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn pid(&self, id: &str) -> Option<i32> {
        self.live_pid(id)
    }

    fn hypervisor(&self) -> Hypervisor {
        self.hypervisor
    }

    fn version(&self) -> String {
        self.version.clone()
    }

    fn vm_dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    fn machine_types(&self) -> Vec<String> {
        self.machine_types.clone()
    }

    fn default_machine_type(&self) -> Option<String> {
        Some(self.default_machine().to_string())
    }

    fn uses_taps(&self) -> bool {
        true
    }

    fn migrator(&self) -> Option<&dyn super::Migrate> {
        Some(self)
    }

    async fn prepare(&self, cfg: &VmConfig) -> Result<()> {
        let dir = self.vm_dir(&cfg.id);
        let disk = dir.join("disk.qcow2");
        if disk.exists() {
            return Ok(());
        }
        std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
        // Data disks first: the boot disk's existence says all are there.
        for (i, d) in cfg.data_disks.iter().enumerate() {
            let file = dir.join(super::data_disk_file(i));
            if !file.exists() {
                create_disk(&file, d.base_image.as_deref(), d.size_gib << 30).await?;
            }
        }
        create_disk(&disk, Some(&cfg.base_image), cfg.disk_gib << 30).await?;
        super::cloudinit::write_seed(&dir, &cfg.context).await?;
        Ok(())
    }

    async fn start(&self, cfg: &VmConfig) -> Result<()> {
        if self.live_pid(&cfg.id).is_some() {
            return Ok(());
        }
        let dir = self.vm_dir(&cfg.id);
        if !dir.join("disk.qcow2").exists() {
            return Err(DriverError::Start(format!(
                "VM {} has no disk; prepare it first",
                cfg.id
            )));
        }
        let sock = self.qmp_socket(&cfg.id);
        if sock.as_os_str().len() >= 108 {
            return Err(DriverError::Start(format!(
                "QMP socket path {} is longer than a unix socket address allows (107 bytes); use a shorter data directory",
                sock.display()
            )));
        }
        let args = self.command_line(cfg);
        self.spawn_qemu(cfg, args).await
    }

    /// Running if our QEMU is alive; otherwise Stopped if the disk exists,
    /// Absent if not (a directory left without a disk by an interrupted
    /// `prepare` counts as absent, so the reconciler prepares it again).
    async fn state(&self, id: &str) -> Result<DriverVmState> {
        if self.live_pid(id).is_some() {
            return Ok(DriverVmState::Running);
        }
        if self.vm_dir(id).join("disk.qcow2").exists() {
            Ok(DriverVmState::Stopped)
        } else {
            Ok(DriverVmState::Absent)
        }
    }

    async fn stop(&self, id: &str, timeout: Duration) -> Result<()> {
        if self.live_pid(id).is_none() {
            return Ok(());
        }
        if !timeout.is_zero() {
            // Press the power button, and again every 5 s: a guest still
            // booting may not listen yet, and a press is not queued.
            let deadline = std::time::Instant::now() + timeout;
            let mut pressed = false;
            loop {
                match qmp::execute(&self.qmp_socket(id), "system_powerdown", None).await {
                    Ok(_) => pressed = true,
                    Err(e) if !pressed => {
                        tracing::warn!(vm = %id, error = %e, "ACPI power-down failed; forcing it off");
                        break;
                    }
                    Err(_) => {}
                }
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if self.wait_gone(id, left.min(Duration::from_secs(5))).await {
                    return Ok(());
                }
                if left <= Duration::from_secs(5) {
                    tracing::warn!(vm = %id, timeout_s = timeout.as_secs(), "guest did not power down in time; forcing it off");
                    break;
                }
            }
        }
        self.force_off(id).await
    }

    async fn reboot(&self, id: &str) -> Result<()> {
        if self.live_pid(id).is_none() {
            return Err(DriverError::Other(format!("VM {id} is not running")));
        }
        qmp::execute(&self.qmp_socket(id), "system_reset", None).await?;
        Ok(())
    }

    async fn destroy(&self, id: &str) -> Result<()> {
        self.force_off(id).await?;
        self.kill_nbd(id).await;
        let dir = self.vm_dir(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DriverError::Io(format!("remove {}", dir.display()), e)),
        }
    }

    async fn list(&self) -> Result<Vec<String>> {
        let rd = match std::fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(DriverError::Io(format!("list {}", self.root.display()), e)),
        };
        let mut out: Vec<String> = rd
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        out.sort();
        Ok(out)
    }
}

/// The PCI slot of the first data disk (the ones before it are left to
/// QEMU's automatic assignment: boot disk, seed, NIC; at most 8 data disks
/// follow, up to slot 0x17).
const DATA_DISK_SLOT: usize = 0x10;

/// Creates the qcow2 disk `path` (atomically, through a temporary file): an
/// overlay over `base` grown to at least `min_size` bytes, or blank of
/// `min_size` bytes.
async fn create_disk(path: &Path, base: Option<&Path>, min_size: u64) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let tmp_s = tmp.to_string_lossy().to_string();
    match base {
        Some(base) => {
            // An absolute backing path: qemu-img resolves a relative one
            // against the overlay's directory, not ours.
            let base = std::fs::canonicalize(base)
                .map_err(io_err(format!("base image {}", base.display())))?;
            let base = base.to_string_lossy().to_string();
            // -U: the base may be open (read-only) by running VMs.
            let info = qemu_img(&["info", "-U", "--output=json", "-f", "qcow2", &base]).await?;
            let v: serde_json::Value = serde_json::from_slice(&info)
                .map_err(|e| DriverError::QemuImg(format!("qemu-img info: {e}")))?;
            let base_size = v["virtual-size"].as_u64().unwrap_or(0);
            let size = base_size.max(min_size).to_string();
            qemu_img(&[
                "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &base, &tmp_s, &size,
            ])
            .await?;
        }
        None => {
            let size = min_size.to_string();
            qemu_img(&["create", "-q", "-f", "qcow2", &tmp_s, &size]).await?;
        }
    }
    std::fs::rename(&tmp, path).map_err(io_err(format!("create {}", path.display())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::read_tail;

    #[test]
    fn read_tail_returns_the_end_and_says_when_it_cut() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        assert_eq!(read_tail(&p, 10).unwrap(), (String::new(), false));
        std::fs::write(&p, b"line one\nline two\n").unwrap();
        assert_eq!(
            read_tail(&p, 100).unwrap(),
            ("line one\nline two\n".into(), false)
        );
        assert_eq!(read_tail(&p, 9).unwrap(), ("line two\n".into(), true));
        // A cut through a multi-byte character is decoded lossily, not an error.
        std::fs::write(&p, "é".as_bytes()).unwrap();
        assert_eq!(read_tail(&p, 1).unwrap(), ("\u{fffd}".into(), true));
    }

    #[test]
    fn option_values_escape_commas() {
        assert_eq!(opt_escape("/a,b/c"), "/a,,b/c");
        assert_eq!(opt_escape("plain"), "plain");
    }

    #[test]
    fn our_own_process_is_not_a_qemu() {
        let d = tempfile::tempdir().unwrap();
        let me = i32::try_from(std::process::id()).unwrap();
        assert!(!is_our_qemu(me, d.path()));
        assert!(!is_our_qemu(i32::MAX, d.path()));
        assert!(vm_processes(d.path()).is_empty());
    }

    #[tokio::test]
    async fn command_line_has_what_the_vm_needs() {
        let d = tempfile::tempdir().unwrap();
        let drv = QemuDriver::new(d.path().join("v,ms"), AccelChoice::Emulation)
            .await
            .unwrap();
        let cfg = VmConfig {
            id: "a1".into(),
            name: "web".into(),
            vcpus: 2,
            memory_mib: 256,
            disk_gib: 1,
            base_image: PathBuf::from("/nonexistent"),
            ports: vec![(22, 2222), (80, 8080)],
            context: Default::default(),
            machine: Some("pc-i440fx-7.2".into()),
            data_disks: vec![
                crate::driver::DataDiskConfig {
                    base_image: None,
                    size_gib: 2,
                },
                crate::driver::DataDiskConfig {
                    base_image: Some(PathBuf::from("/nonexistent")),
                    size_gib: 0,
                },
            ],
            nics: vec![],
        };
        let a = drv.command_line(&cfg).join(" ");
        let dir = opt_escape(&drv.vm_dir("a1").to_string_lossy());
        assert!(dir.contains(",,"));
        for want in [
            "-machine pc-i440fx-7.2,accel=tcg".to_string(),
            "-cpu qemu64".into(),
            "-smp 2".into(),
            "-m 256".into(),
            format!("file={dir}/disk.qcow2,if=virtio,format=qcow2"),
            format!("-drive file={dir}/data-0.qcow2,if=none,id=data0,format=qcow2,cache=writeback,discard=unmap -device virtio-blk-pci,drive=data0,serial=data-0,addr=0x10"),
            format!("-drive file={dir}/data-1.qcow2,if=none,id=data1,format=qcow2,cache=writeback,discard=unmap -device virtio-blk-pci,drive=data1,serial=data-1,addr=0x11"),
            format!("path={dir}/console.log,append=on"),
            format!("-qmp unix:{dir}/qmp.sock,server=on,wait=off"),
            "hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=tcp:127.0.0.1:8080-:80".into(),
            "-device virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56".into(),
            format!("-daemonize -pidfile {dir}/qemu.pid"),
        ] {
            assert!(a.contains(&want), "{want:?} not in {a}");
        }
        assert_eq!(a.matches("-netdev").count(), 1, "{a}");
        assert!(!a.contains("tap,"), "{a}");

        // With NICs on virtual networks: one tap NIC each, no user mode.
        let nics = VmConfig {
            nics: vec![
                crate::driver::NicConfig {
                    tap: "v8t-0123456789".into(),
                    mac: "02:aa:bb:cc:dd:01".parse().unwrap(),
                },
                crate::driver::NicConfig {
                    tap: "v8t-abcdefabcd".into(),
                    mac: "02:aa:bb:cc:dd:02".parse().unwrap(),
                },
            ],
            ..cfg
        };
        let a = drv.command_line(&nics).join(" ");
        for want in [
            "-netdev tap,id=n0,ifname=v8t-0123456789,script=no,downscript=no -device virtio-net-pci,netdev=n0,mac=02:aa:bb:cc:dd:01",
            "-netdev tap,id=n1,ifname=v8t-abcdefabcd,script=no,downscript=no -device virtio-net-pci,netdev=n1,mac=02:aa:bb:cc:dd:02",
        ] {
            assert!(a.contains(want), "{want:?} not in {a}");
        }
        assert!(!a.contains("user,") && !a.contains("hostfwd"), "{a}");
        assert_eq!(a.matches("-netdev").count(), 2, "{a}");
    }
}
