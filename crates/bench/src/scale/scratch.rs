//! Where one run keeps its files, and what happens when it is interrupted.
//!
//! The simulated hosts' state alone is 100,000 directories at size, which
//! left behind fill a tmpfs's inodes after a few runs: the directories are
//! owned here and removed when the run ends, interrupted or not.

use std::path::Path;

use tempfile::TempDir;

/// The run's scratch directories and the control plane's port. Dropped,
/// it removes the simulated hosts' directories first, then the control
/// plane's.
pub struct Scratch {
    /// The simulated hosts' directories.
    agents: TempDir,
    /// Holds the control plane's data directory (`server/`) and the
    /// image the VMs are made from.
    dir: TempDir,
    pub port: u16,
    /// The control plane's `--database`, when not SQLite in `dir`.
    pub database: Option<String>,
}

impl Scratch {
    /// Makes the directories and picks a free port on loopback.
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("virt8ra-scale-")
            .tempdir()?;
        // The simulated agents' own state goes to memory when the machine
        // has a tmpfs, so that their fsyncs do not compete with the control
        // plane's on the disk being measured.
        let shm = Path::new("/dev/shm");
        let agents = tempfile::Builder::new()
            .prefix("virt8ra-scale-agents-")
            .tempdir_in(if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            })?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        Ok(Self {
            agents,
            dir,
            port,
            database: None,
        })
    }

    /// The control plane's side: its data directory is `server/` in it.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The simulated hosts' side: one directory per host in it.
    pub fn agents(&self) -> &Path {
        self.agents.path()
    }
}

/// Resolves on Ctrl-C or SIGTERM, with the signal's name.
pub async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        // Cannot listen for SIGTERM: Ctrl-C still counts.
        let _ = tokio::signal::ctrl_c().await;
        return "SIGINT";
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}
