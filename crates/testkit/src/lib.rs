//! An in-process test harness: the control plane and simulated agents in
//! the test process, over real sockets, each of which a test can crash and
//! start again.
//!
//! The end-to-end tests (`crates/virt8ra/tests`) start real processes and
//! most boot QEMU guests: minutes per run, and a crash is a `SIGKILL`.
//! Here a [`ControlPlane`] is the real server (`virt8ra_server::open` and
//! `start_on`) on a temporary data directory and SQLite database, serving
//! HTTP on `127.0.0.1:0`; a [`SimAgent`] is the real agent (join, channel
//! over a WebSocket, reconciler, mover) with the simulated driver
//! (`virt8ra_agent::simhost`). Each runs on a tokio runtime of its own, on
//! a thread of its own, with a [`FailPoints`] registry installed on that
//! runtime's threads, so fail points armed for one instance fire in that
//! instance only, while other tests run in parallel threads.
//!
//! A crash ([`ControlPlane::crash`], [`SimAgent::crash`], or a point armed
//! with [`Action::Crash`]) drops the instance's runtime: every task stops
//! where it stands, every socket closes, nothing is cleaned up; what
//! survives is what was durably written (the data directory), and, for an
//! agent, its driver's guests (simulated VMs outlive their agent, as QEMU
//! processes do). `restart` starts the instance again on the same data
//! directory (the control plane on the same port, so agents reconnect).
//!
//! Fail points are compiled in only when `virt8ra-failpoint`'s `enabled`
//! feature is on: this crate's own tests turn it on (a dev-dependency), a
//! build of the workspace's binaries does not.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::sync::Notify;
pub use virt8ra_agent::driver::sim::SimDriver;
pub use virt8ra_agent::simhost::SimSpec;
pub use virt8ra_failpoint::{Action, FailPoints};

/// How often agents beat: short, so that a test waits little for the
/// control plane to see a host's VMs gone.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// A runtime of its own on a thread of its own, kept until it is halted.
struct Instance {
    halt: Arc<Notify>,
    /// A fail point crashed it (its runtime may still be shutting down).
    crashed: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Instance {
    /// Runs `setup` on a new runtime whose threads have `faults` installed,
    /// and keeps the runtime (and what `setup` spawned) until it is halted:
    /// by [`Instance::crash`] or by a fail point armed to crash.
    fn start<T, F, Fut>(name: &str, faults: &Arc<FailPoints>, setup: F) -> anyhow::Result<(Self, T)>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<T>>,
        T: Send + 'static,
    {
        let halt = Arc::new(Notify::new());
        let crashed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (h, c) = (halt.clone(), crashed.clone());
        faults.on_crash(move |_| {
            c.store(true, std::sync::atomic::Ordering::Release);
            h.notify_one();
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let (fp, h) = (faults.clone(), halt.clone());
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                fp.install();
                let on_start = fp.clone();
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .on_thread_start(move || on_start.install())
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(anyhow::Error::new(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let r = setup().await;
                    let ok = r.is_ok();
                    let _ = tx.send(r);
                    if ok {
                        h.notified().await;
                    }
                });
                // Every task dropped where it stands: a crash.
                rt.shutdown_timeout(Duration::from_secs(5));
            })?;
        let mut me = Instance {
            halt,
            crashed,
            thread: Some(thread),
        };
        match rx.recv() {
            Ok(Ok(v)) => Ok((me, v)),
            Ok(Err(e)) => {
                me.crash();
                Err(e)
            }
            Err(_) => {
                me.crash();
                bail!("{name}: the instance's thread ended before it started")
            }
        }
    }

    /// Drops the runtime (if a fail point did not already) and waits.
    fn crash(&mut self) {
        self.halt.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn halted(&self) -> bool {
        self.crashed.load(std::sync::atomic::Ordering::Acquire)
            || self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.crash();
    }
}

/// Waits until `f` is true, up to `timeout`.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The control plane, in this process.
pub struct ControlPlane {
    /// `http://127.0.0.1:PORT`; the same after a restart.
    pub url: String,
    /// The admin token.
    pub token: String,
    pub data_dir: PathBuf,
    /// This control plane's fail points (the same across restarts).
    pub faults: Arc<FailPoints>,
    addr: SocketAddr,
    app: Option<(virt8ra_server::Ctx, tokio::runtime::Handle)>,
    instance: Option<Instance>,
    http: reqwest::blocking::Client,
}

impl ControlPlane {
    /// Starts a control plane on `data_dir` (created if missing).
    pub fn start(data_dir: &Path) -> anyhow::Result<ControlPlane> {
        std::fs::create_dir_all(data_dir)?;
        let faults = FailPoints::new();
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        let (instance, (app, addr, handle)) = boot(data_dir, any, &faults)?;
        let token = std::fs::read_to_string(data_dir.join("admin.token"))
            .context("read the admin token")?
            .trim()
            .to_string();
        Ok(ControlPlane {
            url: format!("http://{addr}"),
            token,
            data_dir: data_dir.to_path_buf(),
            faults,
            addr,
            app: Some((app, handle)),
            instance: Some(instance),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
        })
    }

    /// How many VMs the placement engine books on host `name`, migration
    /// reservations included: what the API does not show.
    pub fn booked(&self, name: &str) -> anyhow::Result<u32> {
        let Some((app, rt)) = self.app.clone() else {
            bail!("the control plane is down");
        };
        let name = name.to_string();
        let n = rt.block_on(async move {
            app.placement
                .with_engine(&app, |e| e.host(&name).map_or(0, |h| h.vms))
                .await
        })?;
        Ok(n)
    }

    /// Crashes it now (if it is up).
    pub fn crash(&mut self) {
        self.app = None;
        if let Some(mut i) = self.instance.take() {
            i.crash();
        }
    }

    /// Whether a fail point crashed it (or [`ControlPlane::crash`] did).
    pub fn is_down(&self) -> bool {
        self.instance.as_ref().is_none_or(|i| i.halted())
    }

    /// Starts it again on the same data directory and port, after a crash
    /// (crashing it first if it is still up).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.crash();
        // The port may still be held by connections closing: try a while.
        let mut last = None;
        for _ in 0..50 {
            match boot(&self.data_dir, self.addr, &self.faults) {
                Ok((instance, (app, _, handle))) => {
                    self.app = Some((app, handle));
                    self.instance = Some(instance);
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("restart failed")))
    }

    /// Calls the API; returns the status and the JSON body (`null` if none).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send()?;
        let status = resp.status().as_u16();
        let text = resp.text()?;
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).with_context(|| format!("{path}: not JSON: {text}"))?
        };
        Ok((status, v))
    }

    /// Calls the API and fails unless it answered 2xx.
    pub fn ok(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let (status, v) = self.call(method, path, body)?;
        if !(200..300).contains(&status) {
            bail!("{method} {path}: {status} {v}");
        }
        Ok(v)
    }

    /// Uploads a small empty qcow2 image (made by qemu-img) as `name`:
    /// a VM needs an image, simulated hosts never download it.
    pub fn upload_tiny_image(&self, name: &str) -> anyhow::Result<()> {
        let file = self.data_dir.with_extension("tiny.qcow2");
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&file)
            .arg("16M")
            .output()
            .context("run qemu-img")?;
        if !out.status.success() {
            bail!("qemu-img: {}", String::from_utf8_lossy(&out.stderr));
        }
        let resp = self
            .http
            .post(format!("{}/api/v1/images?name={name}", self.url))
            .bearer_auth(&self.token)
            .header("content-type", "application/octet-stream")
            .body(std::fs::read(&file)?)
            .send()?;
        if !resp.status().is_success() {
            bail!("upload {name}: {}", resp.text().unwrap_or_default());
        }
        Ok(())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.crash();
    }
}

type Booted = (virt8ra_server::Ctx, SocketAddr, tokio::runtime::Handle);

fn boot(
    data_dir: &Path,
    addr: SocketAddr,
    faults: &Arc<FailPoints>,
) -> anyhow::Result<(Instance, Booted)> {
    let dir = data_dir.to_path_buf();
    Instance::start("control-plane", faults, move || async move {
        let (app, _created) = virt8ra_server::open(
            &dir,
            HEARTBEAT,
            Default::default(),
            virt8ra_image::DEFAULT_MAX_VIRTUAL_SIZE,
            virt8ra_tls::Trust::public(),
        )
        .await?;
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        virt8ra_server::start_on(&app, listener).await?;
        Ok((app, local, tokio::runtime::Handle::current()))
    })
}

/// A simulated host's agent, in this process.
pub struct SimAgent {
    pub spec: SimSpec,
    pub host_id: String,
    pub data_dir: PathBuf,
    /// This agent's fail points (the same across restarts).
    pub faults: Arc<FailPoints>,
    server: String,
    host: virt8ra_agent::simhost::SimHost,
    instance: Option<Instance>,
}

impl SimAgent {
    /// Joins a simulated host described by `spec` at `site` and starts its
    /// agent; `live`: its driver takes live migrations.
    pub fn join(
        cp: &ControlPlane,
        site: &str,
        spec: SimSpec,
        data_dir: &Path,
        live: bool,
    ) -> anyhow::Result<SimAgent> {
        let t = cp.ok("POST", "/api/v1/join-tokens", Some(json!({"site": site})))?;
        let Some(token) = t["token"].as_str().map(str::to_string) else {
            bail!("no join token in {t}");
        };
        let faults = FailPoints::new();
        let driver = Arc::new(
            SimDriver::new(data_dir.join("vms"), spec.memory_mib, Default::default())
                .with_live(live),
        );
        let (server, dir, s) = (cp.url.clone(), data_dir.to_path_buf(), spec.clone());
        let (instance, host) = Instance::start(&spec.name, &faults, move || async move {
            virt8ra_agent::simhost::join_and_start(&server, &token, &s, &dir, driver, None).await
        })?;
        Ok(SimAgent {
            spec,
            host_id: host.host_id.clone(),
            data_dir: data_dir.to_path_buf(),
            faults,
            server: cp.url.clone(),
            host,
            instance: Some(instance),
        })
    }

    /// The host's driver: its simulated guests, which outlive the agent.
    pub fn driver(&self) -> &Arc<SimDriver> {
        &self.host.driver
    }

    pub fn crash(&mut self) {
        if let Some(mut i) = self.instance.take() {
            i.crash();
        }
    }

    /// Whether a fail point crashed it (or [`SimAgent::crash`] did).
    pub fn is_down(&self) -> bool {
        self.instance.as_ref().is_none_or(|i| i.halted())
    }

    /// Starts the agent again from what it persisted, with the same driver.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.crash();
        let (server, dir, spec) = (
            self.server.clone(),
            self.data_dir.clone(),
            self.spec.clone(),
        );
        let host_id = self.host.host_id.clone();
        let token = self.host.host_token.clone();
        let driver = self.host.driver.clone();
        let name = self.spec.name.clone();
        let (instance, host) = Instance::start(&name, &self.faults, move || async move {
            virt8ra_agent::simhost::restart(&server, &host_id, &token, &spec, &dir, driver).await
        })?;
        self.host = host;
        self.instance = Some(instance);
        Ok(())
    }
}

impl Drop for SimAgent {
    fn drop(&mut self) {
        self.crash();
    }
}
