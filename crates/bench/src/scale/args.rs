//! The flags of `bench scale` that shape its load (the size, `--hosts` and
//! `--vms`, is the command's own): kept apart so that the command line and
//! its checks read in one place.

use anyhow::bail;

/// The load `bench scale` drives through the public API.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Simulated hosts sharing one connection to the control plane (the mux
    /// protocol extension); 1 gives every host a protocol v1 WebSocket of
    /// its own.
    #[arg(long, default_value_t = 1000)]
    pub hosts_per_connection: usize,
    /// Concurrent API clients.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// VM creates per second to aim at (0: as fast as the clients go).
    #[arg(long, default_value_t = 0.0)]
    pub create_rate: f64,
    /// Lifecycle operations after every VM runs: this many VMs are stopped,
    /// started again, and half of them deleted (0: none).
    #[arg(long, default_value_t = 1000)]
    pub ops: usize,
    /// Lifecycle operations per second to aim at (0: as fast as the clients go).
    #[arg(long, default_value_t = 0.0)]
    pub ops_rate: f64,
    /// VMs migrated to another host (placement picks it; the simulated
    /// hosts migrate cold, through the control plane's staging) after the
    /// stops and starts, before the deletes (0: none).
    #[arg(long, default_value_t = 200)]
    pub migrations: usize,
    /// List pages (1,000 VMs, with filters) read per second while the
    /// lifecycle operations run.
    #[arg(long, default_value_t = 20.0)]
    pub list_rate: f64,
    /// The control plane's database: a PostgreSQL URL (postgres://...) of
    /// an empty database, passed to `server --database`; without it,
    /// SQLite in the run's scratch directory.
    #[arg(long)]
    pub database: Option<String>,
}

impl LoadArgs {
    pub fn check(&self) -> anyhow::Result<()> {
        if self.hosts_per_connection == 0 {
            bail!("--hosts-per-connection must be at least 1");
        }
        if self.concurrency == 0 || self.concurrency > 4096 {
            bail!("--concurrency must be 1..4096");
        }
        for (what, v) in [
            ("--create-rate", self.create_rate),
            ("--ops-rate", self.ops_rate),
            ("--list-rate", self.list_rate),
        ] {
            if !v.is_finite() || v < 0.0 {
                bail!("{what} must be a number ≥ 0");
            }
        }
        Ok(())
    }
}
