//! Hypervisor drivers.
//!
//! A driver turns "this VM should exist and be running" into processes on the
//! host. The agent's reconciler is the only caller; it never touches QEMU
//! itself. Every method is idempotent: calling `start` on a running VM or
//! `destroy` on a VM that is gone succeeds, so the reconciler can repeat any
//! step after a crash.
//!
//! Layout: each VM owns a directory `<root>/<vm id>/` holding its disk
//! overlay, its QMP socket, its pid file and its serial console log. Nothing
//! about a VM is kept only in memory, which is what lets a restarted agent
//! re-attach to QEMUs that kept running.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use virt8ra_api::Hypervisor;

pub mod cloudinit;
pub mod kvm_probe;
pub mod qemu;
pub mod qemu_migrate;
pub mod qmp;
pub mod sim;

/// What a driver needs to run one VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    pub id: String,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    /// The cached base image (qcow2) the VM's copy-on-write overlay sits on.
    pub base_image: PathBuf,
    /// Guest TCP port -> host loopback port.
    pub ports: Vec<(u16, u16)>,
    /// What the guest learns about itself at boot (cloud-init NoCloud).
    pub context: GuestContext,
    /// QEMU machine type; `None` is the host QEMU's default `pc` type.
    pub machine: Option<String>,
    /// Disks after the boot disk, in order.
    pub data_disks: Vec<DataDiskConfig>,
    /// NICs on virtual networks, in order (the guest's eth0, eth1, ...).
    /// None: QEMU's user-mode NIC with the loopback port forwards, as
    /// before virtual networks.
    pub nics: Vec<NicConfig>,
}

/// A NIC on a virtual network: the tap the host's network data plane
/// created for it (`crate::network`) and the MAC the guest sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicConfig {
    pub tap: String,
    pub mac: virt8ra_api::MacAddr,
}

/// A data disk: `data-N.qcow2` in the VM's directory, an overlay over a
/// cached image or blank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDiskConfig {
    /// The cached image the disk starts as a copy of; `None`: blank.
    pub base_image: Option<PathBuf>,
    /// Size in GiB (at least the image's size; 0: the image's size).
    pub size_gib: u64,
}

/// The file of data disk `index` in a VM's directory.
pub fn data_disk_file(index: usize) -> String {
    format!("data-{index}.qcow2")
}

/// Contextualization data for the guest (written by `cloudinit.rs`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuestContext {
    pub instance_id: String,
    pub hostname: String,
    pub site: Option<String>,
    pub user_data: Option<String>,
    /// OpenSSH public key lines the guest accepts.
    pub ssh_authorized_keys: Vec<String>,
    /// Network configuration; `None` leaves the image's default.
    pub network: Option<virt8ra_api::NetworkConfig>,
    /// The MAC of the VM's first NIC on a virtual network, which a network
    /// configuration entry without a match means; `None`: the user-mode
    /// NIC's (`cloudinit::FIRST_NIC_MAC`).
    pub first_mac: Option<String>,
}

/// What a driver observes of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverVmState {
    /// No VM directory: never created or destroyed.
    Absent,
    /// Disk exists, no process.
    Stopped,
    /// The process is alive and answers on QMP.
    Running,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    #[error("qemu-img failed: {0}")]
    QemuImg(String),
    #[error("QEMU did not start: {0}")]
    Start(String),
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = DriverError> = std::result::Result<T, E>;

#[async_trait::async_trait]
pub trait Driver: Send + Sync + 'static {
    /// `qemu` or `sim`.
    fn name(&self) -> &'static str;
    /// KVM or emulation, as probed when the driver was created.
    fn hypervisor(&self) -> Hypervisor;
    /// Version of the hypervisor, e.g. `QEMU 7.2.22`.
    fn version(&self) -> String;
    /// Directory of one VM.
    fn vm_dir(&self, id: &str) -> PathBuf;
    /// Create the VM's directory and its copy-on-write disk over the base
    /// image, sized to at least `disk_gib`. Keeps an existing disk.
    async fn prepare(&self, cfg: &VmConfig) -> Result<()>;
    /// Start the VM's process if it is not running. Requires `prepare`.
    async fn start(&self, cfg: &VmConfig) -> Result<()>;
    async fn state(&self, id: &str) -> Result<DriverVmState>;
    /// Ask the guest to power down (ACPI), wait up to `timeout`, then force it off.
    async fn stop(&self, id: &str, timeout: Duration) -> Result<()>;
    /// Reset the guest.
    async fn reboot(&self, id: &str) -> Result<()>;
    /// Kill the process if any and delete the VM's directory.
    async fn destroy(&self, id: &str) -> Result<()>;
    /// Ids of the VMs that have a directory on this host.
    async fn list(&self) -> Result<Vec<String>>;
    /// Path of the serial console log.
    fn console_path(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join("console.log")
    }
    /// The last `max_bytes` of the console, and whether older output was cut.
    fn console_tail(&self, id: &str, max_bytes: u64) -> std::io::Result<(String, bool)> {
        read_tail(&self.console_path(id), max_bytes)
    }
    /// Whether VMs need their base image on this host (the simulated driver
    /// does not).
    fn needs_image(&self) -> bool {
        true
    }
    /// Whether VMs' NICs on virtual networks are host taps that must exist
    /// before the VM starts (QEMU; the simulated driver has none).
    fn uses_taps(&self) -> bool {
        false
    }
    /// Concrete machine types this host can run (empty: not QEMU).
    fn machine_types(&self) -> Vec<String> {
        Vec::new()
    }
    /// The machine type a VM gets when its desired state names none,
    /// recorded when the VM is first created so that it keeps it across
    /// QEMU upgrades and migrations (`None`: the driver has no machine types).
    fn default_machine_type(&self) -> Option<String>;
    /// What moves this driver's VMs between hosts (migration, export);
    /// `None`: it cannot.
    fn migrator(&self) -> Option<&dyn Migrate> {
        None
    }
    /// The pid of the VM's hypervisor process, if it runs one (metrics read
    /// its `/proc`); `None` for a simulated VM.
    fn pid(&self, _id: &str) -> Option<i32> {
        None
    }
    /// The host's usage as this driver accounts it, for heartbeats; `None`
    /// (real drivers) measures the machine (`inventory::usage`).
    fn usage(&self, _vms_running: u32) -> Option<virt8ra_api::HostUsage> {
        None
    }
}

/// The result of sending a VM live ([`Migrate::send_live`]).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct SendOutcome {
    /// QEMU's measured downtime on the source (under emulation, from the
    /// `stop` before the memory copy).
    pub downtime_ms: u64,
    /// Memory and disk bytes sent.
    pub bytes: u64,
}

/// What moving a VM between hosts needs of a driver: the agent's mover
/// ([`crate::mover`]) runs the protocol's steps and calls these. QEMU does all
/// of them; the simulated driver moves cold only (its live calls fail with a
/// clear error, and its hosts do not offer live migration).
#[async_trait::async_trait]
pub trait Migrate: Send + Sync {
    /// Where the mover keeps a VM's markers (the VM's directory).
    fn marker_dir(&self, id: &str) -> PathBuf;
    /// Target, live: get ready to receive the VM; returns where to send it.
    /// Idempotent for one migration.
    async fn start_incoming(
        &self,
        cfg: &VmConfig,
        migration_id: &str,
        listen: &str,
    ) -> Result<virt8ra_api::protocol::LiveEndpoints>;
    /// Target, live: waits until the VM runs here; returns the milliseconds
    /// from the end of the stream to the guest running.
    async fn await_incoming(&self, id: &str, migration_id: &str) -> Result<u64>;
    /// Source, live: sends disk and memory to `target`.
    async fn send_live(
        &self,
        id: &str,
        migration_id: &str,
        target: &virt8ra_api::protocol::LiveEndpoints,
        progress: &(dyn Fn(virt8ra_api::MigrationProgress) + Send + Sync),
    ) -> Result<SendOutcome>;
    /// Source, rollback: the VM runs here again (or can be started).
    async fn abort_outgoing(&self, id: &str) -> Result<()>;
    /// Writes the stopped VM's disk to `out`: its own blocks over `backing`
    /// (cold migration), or standalone (export).
    async fn export_disk(&self, id: &str, backing: Option<&Path>, out: &Path) -> Result<()>;
    /// Target, cold: makes `file`, as [`Migrate::export_disk`] wrote it on
    /// the source, this VM's disk here.
    async fn adopt_disk(&self, cfg: &VmConfig, file: &Path) -> Result<()>;
    /// Like [`Migrate::export_disk`], for data disk `index`.
    async fn export_data_disk(
        &self,
        id: &str,
        index: usize,
        _backing: Option<&Path>,
        _out: &Path,
    ) -> Result<()> {
        Err(DriverError::Other(format!(
            "this driver cannot move data disk {index} of VM {id}"
        )))
    }
    /// Like [`Migrate::adopt_disk`], for data disk `index`; called before
    /// the boot disk is adopted.
    async fn adopt_data_disk(&self, cfg: &VmConfig, index: usize, _file: &Path) -> Result<()> {
        Err(DriverError::Other(format!(
            "this driver cannot take data disk {index} of VM {}",
            cfg.id
        )))
    }
}

/// The last `max_bytes` of a console log, lossily decoded, and whether older
/// output was cut.
pub fn read_tail(path: &Path, max_bytes: u64) -> std::io::Result<(String, bool)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((String::new(), false)),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let start = len.saturating_sub(max_bytes);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    f.read_to_end(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf).into_owned(), start > 0))
}
