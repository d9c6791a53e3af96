//! What this host has (inventory, reported at join and on every connect) and
//! how busy it is (usage, reported with every heartbeat), read from /proc.

use std::path::Path;

use virt8ra_api::{HostInventory, HostUsage, Hypervisor};

/// Operator overrides, so one machine can be presented as a smaller host
/// (three agents on one machine in the demo) or a host can keep capacity back.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub disk_gib: Option<u64>,
}

fn meminfo(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kib| kib / 1024)
}

fn cpuinfo() -> (String, Vec<String>) {
    let s = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let model = field("model name").unwrap_or_else(|| "unknown".into());
    let flags = field("flags")
        .map(|f| f.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    (model, flags)
}

/// Disk of the filesystem holding `path`: (total GiB, used GiB).
fn disk(path: &Path) -> (u64, u64) {
    match rustix::fs::statvfs(path) {
        Ok(st) => {
            let total = st.f_blocks.saturating_mul(st.f_frsize) >> 30;
            let free = st.f_bavail.saturating_mul(st.f_frsize) >> 30;
            (total, total.saturating_sub(free))
        }
        Err(_) => (0, 0),
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// GPUs visible on the PCI bus (display controllers of known GPU vendors).
fn accelerators() -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/sys/bus/pci/devices") else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        let class = std::fs::read_to_string(p.join("class")).unwrap_or_default();
        let vendor = std::fs::read_to_string(p.join("vendor")).unwrap_or_default();
        if !class.trim().starts_with("0x03") {
            continue;
        }
        let name = match vendor.trim() {
            "0x10de" => "gpu-nvidia",
            "0x1002" => "gpu-amd",
            _ => continue,
        };
        out.push(name.to_string());
    }
    out
}

pub fn collect(
    hostname: &str,
    data_dir: &Path,
    hypervisor: Hypervisor,
    qemu_version: &str,
    o: &Overrides,
) -> HostInventory {
    let (cpu_model, cpu_flags) = cpuinfo();
    let vcpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    HostInventory {
        hostname: hostname.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        vcpus: o.vcpus.unwrap_or(vcpus),
        memory_mib: o
            .memory_mib
            .unwrap_or_else(|| meminfo("MemTotal:").unwrap_or(0)),
        disk_gib: o.disk_gib.unwrap_or_else(|| disk(data_dir).0),
        cpu_model,
        cpu_flags,
        accelerators: accelerators(),
        hypervisor,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        qemu_version: qemu_version.to_string(),
        machine_types: vec![],
        migration_address: None,
        migration_relay: true,
        protocol: 0,
        image_service: None,
        tunnel_public_key: None,
    }
}

pub fn usage(data_dir: &Path, vms_running: u32) -> HostUsage {
    let load_1m = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0);
    let total = meminfo("MemTotal:").unwrap_or(0);
    let avail = meminfo("MemAvailable:").unwrap_or(total);
    HostUsage {
        vms_running,
        load_1m,
        memory_used_mib: total.saturating_sub(avail),
        disk_used_gib: disk(data_dir).1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_machine() {
        let inv = collect(
            "h",
            Path::new("/"),
            Hypervisor::Emulation,
            "QEMU",
            &Overrides::default(),
        );
        assert!(inv.vcpus >= 1);
        assert!(inv.memory_mib > 64, "{inv:?}");
        assert!(inv.disk_gib > 0);
        assert_eq!(inv.arch, std::env::consts::ARCH);
        let o = Overrides {
            vcpus: Some(3),
            memory_mib: Some(777),
            disk_gib: Some(9),
        };
        let inv = collect("h", Path::new("/"), Hypervisor::Kvm, "", &o);
        assert_eq!((inv.vcpus, inv.memory_mib, inv.disk_gib), (3, 777, 9));
        let u = usage(Path::new("/"), 2);
        assert_eq!(u.vms_running, 2);
        assert!(u.memory_used_mib > 0);
    }
}
