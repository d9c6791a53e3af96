//! Every qemu-img run in a Landlock sandbox.
//!
//! The checks in [`crate::sniff`] and [`crate::inspect`] refuse images that
//! name other files; this is the second line, for a case they miss: the
//! qemu-img process can read the system's programs and libraries, the one
//! input file and nothing else, write the one output file and nothing else,
//! and open no TCP connection. A VMDK extent, qcow2 data file or backing
//! file pointing at `DATA_DIR/admin.token` fails to open instead of being
//! copied into an image.
//!
//! The ruleset is built in the parent; the child, between fork and exec,
//! only sets `no_new_privs` and calls `landlock_restrict_self` (both
//! async-signal-safe system calls). The child also gets an empty private
//! working directory, an environment of `PATH` and `LANG` only, and a time
//! limit. Where the kernel has no Landlock, qemu-img runs unconfined after
//! a warning (logged once); the checks still apply.

#![allow(unsafe_code)]

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::Duration;

use crate::ImageError;

/// Filesystem access rights (`LANDLOCK_ACCESS_FS_*`).
const EXECUTE: u64 = 1 << 0;
const WRITE_FILE: u64 = 1 << 1;
const READ_FILE: u64 = 1 << 2;
const READ_DIR: u64 = 1 << 3;
const TRUNCATE: u64 = 1 << 14;
/// The rights that may be granted on a file (not a directory).
const FILE_RIGHTS: u64 = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | (1 << 15);
/// `LANDLOCK_ACCESS_NET_BIND_TCP | LANDLOCK_ACCESS_NET_CONNECT_TCP`.
const NET_TCP: u64 = 0b11;
/// `LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL`.
const SCOPES: u64 = 0b11;
const CREATE_RULESET_VERSION: libc::c_uint = 1;
const RULE_PATH_BENEATH: libc::c_int = 1;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The kernel's Landlock ABI version, 0 without Landlock.
pub fn landlock_abi() -> u32 {
    static ABI: OnceLock<u32> = OnceLock::new();
    *ABI.get_or_init(|| {
        // SAFETY: the documented version query: no pointer is read.
        let v = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<RulesetAttr>(),
                0usize,
                CREATE_RULESET_VERSION,
            )
        };
        u32::try_from(v).unwrap_or(0)
    })
}

/// Every filesystem right this ABI knows (each is denied unless granted).
fn handled_fs(abi: u32) -> u64 {
    match abi {
        1 => (1 << 13) - 1,
        2 => (1 << 14) - 1,
        3 | 4 => (1 << 15) - 1,
        _ => (1 << 16) - 1,
    }
}

/// Directories qemu-img's program, libraries and block modules live in.
const SYSTEM_DIRS: &[&str] = &[
    "/usr/bin",
    "/usr/lib",
    "/usr/lib64",
    "/usr/libexec",
    "/usr/local/lib",
    "/bin",
    "/lib",
    "/lib64",
];
/// Files and directories it reads besides: the loader cache, randomness,
/// and the CPU and NUMA layout (glib, libnuma).
const SYSTEM_READ: &[&str] = &[
    "/etc/ld.so.cache",
    "/dev/urandom",
    "/sys/devices/system/cpu",
    "/sys/devices/system/node",
];

/// A Landlock ruleset being built.
struct Ruleset {
    fd: OwnedFd,
    abi: u32,
}

impl Ruleset {
    fn new(abi: u32) -> Result<Ruleset, ImageError> {
        let attr = RulesetAttr {
            handled_access_fs: handled_fs(abi),
            handled_access_net: NET_TCP,
            scoped: SCOPES,
        };
        // Older ABIs know a shorter attribute struct.
        let size = match abi {
            1..=3 => 8usize,
            4 | 5 => 16,
            _ => std::mem::size_of::<RulesetAttr>(),
        };
        // SAFETY: `attr` outlives the call and `size` is within it.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                size,
                0u32,
            )
        };
        let fd = i32::try_from(fd).unwrap_or(-1);
        if fd < 0 {
            return Err(ImageError::Internal(format!(
                "landlock_create_ruleset: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: a new descriptor (close-on-exec) owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Ruleset { fd, abi })
    }

    /// Grants `access` beneath `path`; a system path that does not exist
    /// is skipped when `optional`.
    fn allow(&self, path: &Path, access: u64, optional: bool) -> Result<(), ImageError> {
        let f = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(ImageError::Internal(format!(
                    "sandbox: open {}: {e}",
                    path.display()
                )))
            }
        };
        let is_dir = f.metadata().map(|m| m.is_dir()).unwrap_or(false);
        let mut allowed = access & handled_fs(self.abi);
        if !is_dir {
            allowed &= FILE_RIGHTS;
        }
        let attr = PathBeneathAttr {
            allowed_access: allowed,
            parent_fd: f.as_raw_fd(),
        };
        // SAFETY: both descriptors are open and `attr` outlives the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                self.fd.as_raw_fd(),
                RULE_PATH_BENEATH,
                &attr as *const PathBeneathAttr,
                0u32,
            )
        };
        if r != 0 {
            return Err(ImageError::Internal(format!(
                "sandbox: landlock_add_rule {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }
}

/// Where the `qemu-img` program is (looked up on `PATH`, in the parent).
fn qemu_img_path() -> Result<PathBuf, ImageError> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-img"))
        .find(|p| p.is_file())
        .and_then(|p| std::fs::canonicalize(p).ok())
        .ok_or_else(|| {
            ImageError::Internal("qemu-img not found on PATH (is qemu-utils installed?)".into())
        })
}

/// What a sandboxed run may touch besides the system.
pub struct Access<'a> {
    pub read: &'a [&'a Path],
    pub write: &'a [&'a Path],
}

/// Runs `qemu-img ARGS` confined to `access`, killed after `limit`.
pub async fn qemu_img<S: AsRef<OsStr>>(
    args: &[S],
    access: &Access<'_>,
    limit: Duration,
) -> Result<Output, ImageError> {
    let program = qemu_img_path()?;
    let cwd = tempfile::tempdir()
        .map_err(|e| ImageError::Internal(format!("sandbox: working directory: {e}")))?;
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(args)
        .current_dir(cwd.path())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let abi = landlock_abi();
    let ruleset = if abi == 0 {
        warn_unconfined();
        None
    } else {
        let r = Ruleset::new(abi)?;
        for d in SYSTEM_DIRS {
            r.allow(Path::new(d), EXECUTE | READ_FILE | READ_DIR, true)?;
        }
        for p in SYSTEM_READ {
            r.allow(Path::new(p), READ_FILE | READ_DIR, true)?;
        }
        r.allow(&program, EXECUTE | READ_FILE, false)?;
        r.allow(Path::new("/dev/null"), READ_FILE | WRITE_FILE, true)?;
        for p in access.read {
            r.allow(p, READ_FILE, false)?;
        }
        for p in access.write {
            r.allow(p, READ_FILE | WRITE_FILE | TRUNCATE, false)?;
        }
        let fd = r.fd.as_raw_fd();
        // SAFETY: the closure runs in the child between fork and exec and
        // makes only two system calls (async-signal-safe); `fd` stays open
        // in the child until exec closes it.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Some(r)
    };
    let child = cmd.output();
    let out = tokio::time::timeout(limit, child).await;
    drop(ruleset);
    match out {
        Ok(Ok(o)) => Ok(o),
        Ok(Err(e)) => Err(ImageError::Internal(format!("run qemu-img: {e}"))),
        Err(_) => Err(ImageError::Refused(format!(
            "qemu-img did not finish within {} s on the image",
            limit.as_secs()
        ))),
    }
}

fn warn_unconfined() {
    static WARNED: OnceLock<()> = OnceLock::new();
    WARNED.get_or_init(|| {
        tracing::warn!(
            "this kernel has no Landlock: qemu-img runs on received images without a sandbox \
             (the image checks still refuse external references); use Linux 5.13 or later \
             with Landlock enabled (lsm=landlock,...)"
        );
    });
}
