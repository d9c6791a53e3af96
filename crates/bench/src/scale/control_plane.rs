//! The control plane under test: this binary run as `server`, a child
//! process on the scratch directory, so that its CPU time and memory can be
//! measured apart from the simulated hosts and the load generator.
//!
//! Phases here: [`connect`] (the control plane answers and the load
//! generator has its admin token), [`footprint`] (its memory and database
//! at the end) and [`restart`] (time from a kill to serving again).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::api::{local, Api};
use super::http;
use super::measure::{ms_since, peak_rss_bytes, rss_bytes};
use super::scratch::Scratch;
use super::Progress;

/// The control plane's process, killed and reaped when dropped.
pub struct Server(Child);

impl Server {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the control plane on `scratch`'s port, its data in `server/`
/// (its database there too, unless `scratch.database` names one) and its
/// log in `server.log` there.
pub fn start(scratch: &Scratch) -> anyhow::Result<Server> {
    let dir = scratch.dir();
    let exe = std::env::current_exe()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))?;
    let mut cmd = Command::new(exe);
    cmd.args(["server", "--listen", &format!("127.0.0.1:{}", scratch.port)])
        .arg("--data-dir")
        .arg(dir.join("server"));
    if let Some(db) = &scratch.database {
        cmd.arg("--database").arg(db);
    }
    let child = cmd
        .env("VIRT8RA_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("start the control plane")?;
    Ok(Server(child))
}

/// Waits until the control plane answers its health check.
pub async fn wait_healthy(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    // A client of its own: before the first start there is no token yet,
    // and after a restart the load generator's connections are dead.
    let http = http::Client::new(local(port), None, Duration::from_secs(5));
    while start.elapsed() < timeout {
        if http
            .request("GET", "/healthz", None)
            .await
            .is_ok_and(|r| r.is_success())
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("the control plane did not answer within {timeout:?}")
}

/// The first phase: the freshly started control plane answers; the load
/// generator gets a client with the admin token the server wrote. Prints
/// where the control plane listens and the scratch directories (a test
/// reads that line to find them).
pub async fn connect(scratch: &Scratch, p: Progress) -> anyhow::Result<Arc<Api>> {
    let port = scratch.port;
    wait_healthy(port, Duration::from_secs(20)).await?;
    p.say(format!(
        "control plane at {}, scratch directories {} and {}",
        url(port),
        scratch.dir().display(),
        scratch.agents().display()
    ));
    let token = std::fs::read_to_string(scratch.dir().join("server/admin.token"))?
        .trim()
        .to_string();
    Ok(Arc::new(Api::new(port, &token)))
}

/// The control plane's base URL, as the simulated hosts join it.
pub fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// What the control plane holds at the end of the run.
pub struct Footprint {
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    /// The database file and its WAL (0 on PostgreSQL, whose files are
    /// the database server's).
    pub db_bytes: u64,
    pub wal_bytes: u64,
}

/// Measures the control plane's memory now and at its highest, and the
/// size of its database.
pub fn footprint(server: &Server, scratch: &Scratch) -> Footprint {
    let pid = server.pid();
    let size = |f: &str| {
        std::fs::metadata(scratch.dir().join("server").join(f))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let wal = size("virt8ra.db-wal");
    Footprint {
        rss_bytes: rss_bytes(pid),
        peak_rss_bytes: peak_rss_bytes(pid),
        db_bytes: size("virt8ra.db") + wal,
        wal_bytes: wal,
    }
}

/// The restart phase: kills the control plane, starts it again on the same
/// data and measures the milliseconds until it serves (loading every VM and
/// host into its indexes).
pub async fn restart(server: &mut Server, scratch: &Scratch) -> anyhow::Result<f64> {
    server.stop();
    let t = Instant::now();
    *server = start(scratch)?;
    wait_healthy(scratch.port, Duration::from_secs(600)).await?;
    Ok(ms_since(t))
}
