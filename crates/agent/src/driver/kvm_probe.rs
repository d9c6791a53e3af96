//! Does KVM really work here?
//!
//! Some hosts expose `/dev/kvm` but guests hang under it (nested
//! virtualisation without the right CPU features, for one). Opening the device
//! proves nothing, so the probe boots a guest under KVM and waits for it to
//! get far. On hosts measured here, a boot sector that switches to long mode
//! and writes to the serial port works under such a broken KVM, while a Linux
//! kernel hangs in its decompressor; so where the host has a kernel in
//! `/boot`, the probe boots it (with no root file system) and waits for its
//! final panic message, which a working KVM reaches in about a second.
//! Without a kernel, the probe falls back to a 512-byte boot sector that
//! writes one byte to the serial port, and says that it is the weaker test.
//! The answer is cached for the current boot of
//! the host (keyed by `/proc/sys/kernel/random/boot_id`), so restarting the
//! agent does not probe again.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The marker the probe guest prints.
pub const MARKER: u8 = b'K';

/// A boot sector: `mov dx,0x3f8; mov al,'K'; out dx,al; cli; hlt; jmp $-1`.
pub fn boot_sector() -> [u8; 512] {
    let mut s = [0u8; 512];
    let code = [
        0xBA, 0xF8, 0x03, // mov dx, 0x3f8 (COM1)
        0xB0, MARKER, // mov al, 'K'
        0xEE,   // out dx, al
        0xFA,   // cli
        0xF4,   // hlt
        0xEB, 0xFD, // jmp back to hlt
    ];
    s[..code.len()].copy_from_slice(&code);
    s[510] = 0x55;
    s[511] = 0xAA;
    s
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Cached {
    boot_id: String,
    kvm: bool,
    reason: String,
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Whether KVM works, and why we think so.
pub async fn probe(work_dir: &Path, cache: &Path) -> (bool, String) {
    let id = boot_id();
    if let Ok(b) = std::fs::read(cache) {
        if let Ok(c) = serde_json::from_slice::<Cached>(&b) {
            if c.boot_id == id && !id.is_empty() {
                return (c.kvm, format!("{} (cached for this boot)", c.reason));
            }
        }
    }
    let (kvm, reason) = run_probe(work_dir).await;
    let c = Cached {
        boot_id: id,
        kvm,
        reason: reason.clone(),
    };
    if let Ok(b) = serde_json::to_vec(&c) {
        // Written whole or not at all: a reader never sees half a file.
        let tmp = cache.with_extension(format!("tmp.{}", std::process::id()));
        if let Err(e) = std::fs::write(&tmp, b).and_then(|()| std::fs::rename(&tmp, cache)) {
            tracing::warn!(path = %cache.display(), error = %e, "cannot cache the KVM probe result");
            let _ = std::fs::remove_file(&tmp);
        }
    }
    (kvm, reason)
}

/// The newest kernel in /boot, if any.
fn host_kernel() -> Option<std::path::PathBuf> {
    let mut ks: Vec<std::path::PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().starts_with("vmlinuz-"))
                .unwrap_or(false)
        })
        .collect();
    ks.sort();
    ks.pop()
}

async fn run_probe(work_dir: &Path) -> (bool, String) {
    if std::fs::metadata("/dev/kvm").is_err() {
        return (false, "/dev/kvm does not exist".into());
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return (false, "/dev/kvm cannot be opened".into());
    }
    // Per process, so two agents probing at once do not share files.
    let dir = work_dir.join(format!("kvm-probe.{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let out = dir.join("serial.out");
    let _ = std::fs::remove_file(&out);
    let mut cmd = tokio::process::Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "pc,accel=kvm", "-cpu", "host", "-m", "256"])
        .args(["-nodefaults", "-display", "none", "-no-reboot"]);
    let kernel = host_kernel();
    let (needle, what, limit): (&[u8], String, u64) = match &kernel {
        Some(k) => {
            cmd.arg("-kernel")
                .arg(k)
                .args(["-append", "console=ttyS0 panic=-1 init=/virt8ra-kvm-probe"]);
            (
                b"Kernel panic",
                format!("a Linux kernel ({})", k.display()),
                8,
            )
        }
        None => {
            let disk = dir.join("boot.bin");
            if let Err(e) = std::fs::write(&disk, boot_sector()) {
                return (false, format!("cannot write the probe disk: {e}"));
            }
            cmd.arg("-drive")
                .arg(format!("file={},format=raw,if=floppy", disk.display()));
            (
                &[MARKER][..],
                "a boot sector (no kernel in /boot for the stronger test)".to_string(),
                5,
            )
        }
    };
    let child = cmd
        .arg("-serial")
        .arg(format!("file:{}", out.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return (false, format!("cannot run qemu-system-x86_64: {e}")),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(limit);
    let mut result = (
        false,
        format!("{what} did not finish booting under KVM within {limit} s"),
    );
    while std::time::Instant::now() < deadline {
        if std::fs::read(&out)
            .map(|b| b.windows(needle.len()).any(|w| w == needle))
            .unwrap_or(false)
        {
            result = (true, format!("{what} booted under KVM"));
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            result = (false, format!("QEMU with KVM exited early ({st})"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.start_kill();
    // A QEMU stuck in the kernel under a broken KVM may take a moment to die;
    // do not hang the agent's start on it.
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        tracing::warn!("the KVM probe's QEMU does not exit after SIGKILL");
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_sector_is_bootable_and_prints_the_marker() {
        let s = boot_sector();
        assert_eq!(s.len(), 512);
        assert_eq!((s[510], s[511]), (0x55, 0xAA));
        assert_eq!(&s[..3], &[0xBA, 0xF8, 0x03], "mov dx, 0x3f8");
        assert_eq!(&s[3..5], &[0xB0, MARKER]);
        assert_eq!(s[5], 0xEE, "out dx, al");
    }

    #[tokio::test]
    async fn the_result_is_cached_per_boot() {
        let d = tempfile::tempdir().unwrap();
        let cache = d.path().join("probe.json");
        let c = Cached {
            boot_id: boot_id(),
            kvm: true,
            reason: "planted".into(),
        };
        std::fs::write(&cache, serde_json::to_vec(&c).unwrap()).unwrap();
        let (kvm, why) = probe(d.path(), &cache).await;
        assert!(kvm);
        assert!(why.contains("planted") && why.contains("cached"));
    }
}
