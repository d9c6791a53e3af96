//! `virt8ra bench scale`: the control plane under many hosts and VMs.
//!
//! Starts a control plane (this binary, `server`, as a child process on a
//! temporary data directory, so its memory can be measured on its own),
//! creates the example EU topology grown to the requested size, joins that
//! many simulated hosts from this process (each a full agent with its own
//! WebSocket channel; the simulated driver keeps VMs in memory), then drives
//! load through the public API and measures. At the end a sample of VMs is
//! compared between the control plane's view and the agents'.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};
use virt8ra_agent::simhost::{self, SimHost};

mod http;

/// List pages of 1,000 VMs read, one after the other, once every VM runs.
const LIST_PAGES: usize = 100;

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

/// Runs `n` calls of `f`, at most `concurrency` at a time and, when `rate`
/// is positive, started at that many per second; returns each call's
/// latency in milliseconds (in no particular order).
///
/// `concurrency` tasks each take the next call when their last one is
/// done. (A loop that spawned a task per call behind a semaphore ran on the
/// main thread, which every finished call had to wake through a futex: a
/// few percent of the whole machine at thousands of creates a second.)
async fn drive<F, Fut>(n: usize, concurrency: usize, rate: f64, f: F) -> anyhow::Result<Vec<f64>>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    use std::sync::atomic::{AtomicUsize, Ordering};
    let f = Arc::new(f);
    let next = Arc::new(AtomicUsize::new(0));
    // Paced calls share one ticker; unpaced ones take no lock.
    let tick = (rate > 0.0).then(|| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        Arc::new(tokio::sync::Mutex::new(t))
    });
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(n) {
        let (f, next, tick) = (f.clone(), next.clone(), tick.clone());
        workers.spawn(async move {
            let mut ms = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(ms);
                }
                if let Some(t) = &tick {
                    t.lock().await.tick().await;
                }
                let t = Instant::now();
                f(i).await?;
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = workers.join_next().await {
        out.extend(r??);
    }
    Ok(out)
}

#[derive(Debug, Serialize)]
pub struct ScaleReport {
    pub hosts: usize,
    pub hosts_connected: u64,
    /// Connections the simulated hosts hold to the control plane.
    pub agent_connections: usize,
    pub heartbeat_interval_s: u64,
    pub missed_heartbeat_ratio: f64,
    pub vms: usize,
    pub vms_running: usize,
    pub create_per_s: f64,
    pub create_p50_ms: f64,
    pub create_p99_ms: f64,
    /// CPU time the control plane used per VM over the create phase (create
    /// call to running), in milliseconds: a figure that, unlike the rate,
    /// does not depend on what else the machine was doing.
    pub server_cpu_ms_per_vm: f64,
    /// The same for this process: the simulated hosts and the load generator.
    pub bench_cpu_ms_per_vm: f64,
    /// The machine's 1-minute load average over the create phase (2 means
    /// both cores busy): above about 2.5, something else competed.
    pub create_load_1m: f64,
    /// 2,000 GETs of one VM by name, from the request to the last byte.
    pub get_p99_ms: f64,
    /// From the request to the last byte of the response, over
    /// `list_pages` pages of 1,000 read one after the other once every VM
    /// runs.
    pub list_page_p99_ms: f64,
    pub list_pages: usize,
    /// The load generator's parsing of such a page into a JSON value,
    /// after its last byte (not part of `list_page_p99_ms`).
    pub list_page_parse_p99_ms: f64,
    /// Lifecycle operations (stop, start, delete) after every VM ran.
    pub ops: usize,
    pub ops_per_s: f64,
    pub stop_p99_ms: f64,
    pub start_p99_ms: f64,
    pub delete_p99_ms: f64,
    /// Filtered list pages read while the lifecycle operations ran.
    pub list_page_under_load_p99_ms: f64,
    /// VMs deleted by the lifecycle operations that the agents still run
    /// or the control plane does not show as deleted after the run.
    pub delete_mismatches: usize,
    /// VMs deleted by the lifecycle operations.
    pub deleted: usize,
    /// Migrations asked for, completed, and failed (rolled back) or not
    /// finished within the time allowed.
    pub migrations: usize,
    pub migrations_completed: usize,
    pub migrations_failed: usize,
    /// Migration requests' latency (the call), and from the request to the
    /// workflow's completion.
    pub migrate_call_p99_ms: f64,
    pub migration_p50_ms: f64,
    pub migration_p99_ms: f64,
    /// Migrated VMs that are not running on exactly the host the control
    /// plane names, a different one from where they were.
    pub migration_mismatches: usize,
    /// The control plane's resident memory at the end of the run (after
    /// the lifecycle operations and migrations).
    pub server_rss_bytes: u64,
    /// ... right after the last VM created runs.
    pub server_rss_after_create_bytes: u64,
    /// ... at its highest during the run (the kernel's high-water mark).
    pub server_peak_rss_bytes: u64,
    /// This process (simulated hosts and load generator), for planning runs.
    pub bench_rss_bytes: u64,
    /// The database file and its WAL.
    pub db_bytes: u64,
    /// The WAL's part of `db_bytes` (the store keeps the WAL's disk space
    /// between restarts, up to a limit).
    pub wal_bytes: u64,
    pub restart_to_serving_ms: f64,
    pub sampled: usize,
    pub mismatches: usize,
}

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[(((v.len() - 1) as f64) * p).round() as usize]
}

/// CPU time (user + system) a process used so far, in seconds; `None`
/// for this process.
fn cpu_seconds(pid: Option<u32>) -> f64 {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let Ok(s) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses and may hold
    // spaces): state is the 3rd field, utime the 14th, stime the 15th.
    let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// The 1-minute load average, to tell a busy machine from a slow program.
fn load_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Resident memory of a process now.
fn rss_bytes(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:") * 1024
}

/// The most resident memory a process had so far (its high-water mark).
fn peak_rss_bytes(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:") * 1024
}

/// A field of `/proc/<pid>/status` given in kB (0 when it cannot be read).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
}

fn start_server(dir: &Path, port: u16) -> anyhow::Result<Server> {
    let exe = std::env::current_exe()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))?;
    let child = Command::new(exe)
        .args(["server", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.join("server"))
        .env("VIRT8RA_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("start the control plane")?;
    Ok(Server(child))
}

/// The public API as the load generator calls it (see [`http`]).
struct Api {
    client: http::Client,
}

impl Api {
    fn new(port: u16, token: &str) -> Self {
        Self {
            client: http::Client::new(local(port), Some(token), Duration::from_secs(120)),
        }
    }

    /// Sends one call; an answer other than 2xx is an error with its body.
    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> anyhow::Result<http::Response> {
        let r = self
            .client
            .request(method, &format!("/api/v1{path}"), body)
            .await?;
        if !r.is_success() {
            bail!("{path}: {}: {}", r.status, String::from_utf8_lossy(&r.body));
        }
        Ok(r)
    }
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let body = body.map(|b| serde_json::to_vec(&b)).transpose()?;
        let r = self.send(method, path, body.as_deref()).await?;
        Ok(serde_json::from_slice(&r.body).unwrap_or(Value::Null))
    }
    /// A call whose answer the load generator does not look at (its CPU is
    /// shared with the control plane being measured): read whole, so that
    /// the connection is reused, but not parsed.
    async fn call_unread(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> anyhow::Result<()> {
        self.send(method, path, body).await.map(drop)
    }
    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call("GET", path, None).await
    }
    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call("POST", path, Some(body)).await
    }
    async fn post_unread(&self, path: &str, body: Value) -> anyhow::Result<()> {
        self.call_unread("POST", path, Some(&serde_json::to_vec(&body)?))
            .await
    }
}

/// The control plane's address on this machine.
fn local(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

async fn wait_healthy(port: u16, timeout: Duration) -> anyhow::Result<()> {
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

/// Runs the benchmark. Interrupted (Ctrl-C, SIGTERM), it stops the control
/// plane it started and removes its scratch directories before it returns
/// the error: the simulated hosts' state alone is 100,000 directories, which
/// left behind fill a tmpfs's inodes after a few runs.
///
/// The control plane is this process's own executable run as `server`: the
/// caller is the `virt8ra` binary.
pub async fn run(
    hosts: usize,
    vms: usize,
    load: &LoadArgs,
    progress: bool,
) -> anyhow::Result<ScaleReport> {
    let tmp = tempfile::Builder::new()
        .prefix("virt8ra-scale-")
        .tempdir()?;
    // The simulated agents' own state goes to memory when the machine has a
    // tmpfs, so that their fsyncs do not compete with the control plane's
    // on the disk being measured.
    let shm = Path::new("/dev/shm");
    let agents_tmp = tempfile::Builder::new()
        .prefix("virt8ra-scale-agents-")
        .tempdir_in(if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        })?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut server = start_server(tmp.path(), port)?;
    let scratch = Scratch {
        dir: tmp.path(),
        agents: agents_tmp.path(),
        port,
    };
    let out = tokio::select! {
        r = run_on(&scratch, &mut server, hosts, vms, load, progress) => r,
        signal = interrupted() => Err(anyhow::anyhow!("interrupted ({signal}); stopped the control plane and removed the scratch directories")),
    };
    // The control plane first: without it the simulated hosts have nothing
    // to act on and stop writing to their directories.
    drop(server);
    drop(agents_tmp);
    drop(tmp);
    out
}

/// Where one run keeps its files, and the control plane's port.
struct Scratch<'a> {
    /// Holds the control plane's data directory (`server/`) and the
    /// image the VMs are made from.
    dir: &'a Path,
    /// The simulated hosts' directories.
    agents: &'a Path,
    port: u16,
}

/// Resolves on Ctrl-C or SIGTERM, with the signal's name.
async fn interrupted() -> &'static str {
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

async fn run_on(
    scratch: &Scratch<'_>,
    server: &mut Server,
    hosts: usize,
    vms: usize,
    load: &LoadArgs,
    progress: bool,
) -> anyhow::Result<ScaleReport> {
    let say = |m: String| {
        if progress {
            eprintln!("bench scale: {m}");
        }
    };
    let port = scratch.port;
    let url = format!("http://127.0.0.1:{port}");
    wait_healthy(port, Duration::from_secs(20)).await?;
    say(format!(
        "control plane at {url}, scratch directories {} and {}",
        scratch.dir.display(),
        scratch.agents.display()
    ));
    let token = std::fs::read_to_string(scratch.dir.join("server/admin.token"))?
        .trim()
        .to_string();
    let api = Arc::new(Api::new(port, &token));

    // Topology: the example EU sites grown to size.
    let (sites, host_infos) = virt8ra_placement::bench::topology(hosts, 42);
    let mut providers = std::collections::BTreeMap::new();
    for s in &sites {
        providers
            .entry(s.provider.clone())
            .or_insert(s.provider_country.clone());
    }
    for (p, c) in &providers {
        api.post("/providers", json!({"name": p, "country": c}))
            .await?;
    }
    let mut per_site: std::collections::BTreeMap<String, usize> = Default::default();
    for h in &host_infos {
        *per_site.entry(h.site.clone()).or_default() += 1;
    }
    let mut tokens = std::collections::HashMap::new();
    for s in &sites {
        api.post(
            "/sites",
            json!({"name": s.name, "provider": s.provider, "country": s.country, "city": "x",
                   "latitude": s.lat, "longitude": s.lon, "tier": s.tier,
                   "facts": {"grid_gco2_per_kwh": s.carbon}}),
        )
        .await?;
        let n = per_site.get(&s.name).copied().unwrap_or(0);
        if n > 0 {
            let t = api
                .post(
                    "/join-tokens",
                    json!({"site": s.name, "max_uses": n.min(10_000)}),
                )
                .await?;
            tokens.insert(
                s.name.clone(),
                t["token"].as_str().unwrap_or_default().to_string(),
            );
        }
    }
    say(format!(
        "{} sites, {} providers; joining {hosts} simulated hosts",
        sites.len(),
        providers.len()
    ));

    // Hosts: join with bounded concurrency.
    let agents_dir = scratch.agents.to_path_buf();
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut joins = tokio::task::JoinSet::new();
    let per_conn = load.hosts_per_connection;
    let muxes: Vec<Arc<simhost::Mux>> = if per_conn > 1 {
        (0..hosts.div_ceil(per_conn))
            .map(|_| simhost::Mux::new(&url))
            .collect()
    } else {
        Vec::new()
    };
    for (i, h) in host_infos.iter().enumerate() {
        let mux = muxes.get(i / per_conn).cloned();
        let (sem, url, token, dir) = (
            sem.clone(),
            url.clone(),
            tokens.get(&h.site).cloned().unwrap_or_default(),
            agents_dir.join(&h.name),
        );
        let (name, mem) = (h.name.clone(), h.memory_mib);
        let vcpus = h.vcpus;
        joins.spawn(async move {
            let _p = sem.acquire().await;
            simhost::start(&url, &token, &name, &dir, vcpus, mem, mux).await
        });
    }
    let mut sim: Vec<SimHost> = Vec::new();
    while let Some(r) = joins.join_next().await {
        sim.push(r??);
    }
    let by_name: std::collections::HashMap<String, usize> = sim
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), i))
        .collect();
    let start = Instant::now();
    loop {
        let m = api.get("/metrics").await?;
        if m["agents_connected"].as_u64().unwrap_or(0) as usize >= hosts {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!(
                "only {} of {hosts} hosts connected after 120 s",
                m["agents_connected"]
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    say("all hosts connected".into());

    // An image (agents of the simulated driver never download it).
    let img = scratch.dir.join("tiny.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M")
        .status()
        .context("qemu-img")?;
    if !st.success() {
        bail!("qemu-img create failed");
    }
    let bytes = tokio::fs::read(&img).await?;
    let r = api
        .client
        .request_as(
            "POST",
            "/api/v1/images?name=tiny",
            Some(("application/octet-stream", &bytes)),
        )
        .await?;
    if !r.is_success() {
        bail!(
            "image upload: {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }

    // Load: create VMs with bounded concurrency; measure each call.
    say(format!("creating {vms} VMs"));
    let server_pid = server.0.id();
    let (server_cpu0, own_cpu0, load0) =
        (cpu_seconds(Some(server_pid)), cpu_seconds(None), load_1m());
    let t0 = Instant::now();
    let creator = api.clone();
    let mut create_ms = drive(vms, load.concurrency, load.create_rate, move |i| {
        let api = creator.clone();
        async move {
            // Written directly: the name is `v` and digits, nothing to escape.
            let body = format!(r#"{{"name":"v{i}","image":"tiny","memory_mib":512,"vcpus":1}}"#);
            api.call_unread("POST", "/vms", Some(body.as_bytes())).await
        }
    })
    .await?;
    let running = |sim: &[SimHost]| -> usize { sim.iter().map(|s| s.driver.running_count()).sum() };
    let deadline = Instant::now() + Duration::from_secs(600);
    while running(&sim) < vms && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_running = t0.elapsed().as_secs_f64();
    let vms_running = running(&sim);
    let rss_after_create = rss_bytes(server_pid);
    let create_cpu = (
        cpu_seconds(Some(server_pid)) - server_cpu0,
        cpu_seconds(None) - own_cpu0,
        (load0 + load_1m()) / 2.0,
    );
    say(format!(
        "{vms_running} VMs running after {all_running:.1} s"
    ));

    // Reads. A call's latency runs from the request to the last byte of
    // its response; the client's parsing of the JSON comes after (it is
    // the load generator's work, on cores it shares with the control plane,
    // and for a page of 1,000 VMs into a `serde_json::Value` it was several
    // milliseconds). The pages' parse times are reported on their own.
    let mut get_ms = Vec::new();
    for i in 0..2000usize {
        let t = Instant::now();
        api.send("GET", &format!("/vms/v{}", (i * 7919) % vms.max(1)), None)
            .await?;
        get_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let (mut list_ms, mut list_parse_ms) = (Vec::new(), Vec::new());
    let mut cursor: Option<String> = None;
    // 100 pages, so that the 99th percentile is not simply the slowest.
    for _ in 0..LIST_PAGES {
        let path = match &cursor {
            Some(c) => format!("/vms?limit=1000&cursor={c}"),
            None => "/vms?limit=1000".to_string(),
        };
        let t = Instant::now();
        let r = api.send("GET", &path, None).await?;
        list_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        let page: Value = serde_json::from_slice(&r.body).context("a list page")?;
        list_parse_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        cursor = page["next_cursor"].as_str().map(str::to_string);
        if cursor.is_none() {
            break;
        }
    }

    // Lifecycle load: stop, start again, delete half; list pages meanwhile.
    let ops = load.ops.min(vms);
    let pick = |i: usize| format!("v{}", (i * 7919 + 13) % vms.max(1));
    let mut picked: Vec<String> = (0..ops).map(pick).collect();
    picked.sort();
    picked.dedup();
    let ops = picked.len();
    let picked = Arc::new(picked);
    let stop_listing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lister = {
        let (api, rate, stop) = (api.clone(), load.list_rate, stop_listing.clone());
        let sites: Vec<String> = sites.iter().map(|s| s.name.clone()).collect();
        let countries: Vec<String> = providers.values().cloned().collect();
        tokio::spawn(async move {
            let mut ms = Vec::new();
            if rate <= 0.0 {
                return ms;
            }
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                i += 1;
                let path = match i % 4 {
                    0 => "/vms?limit=1000".to_string(),
                    1 => format!("/vms?limit=1000&site={}", sites[i % sites.len().max(1)]),
                    2 => format!(
                        "/vms?limit=1000&country={}&phase=running",
                        countries[i % countries.len().max(1)]
                    ),
                    _ => "/vms?limit=1000&phase=stopped".to_string(),
                };
                let t = Instant::now();
                if api.send("GET", &path, None).await.is_ok() {
                    ms.push(t.elapsed().as_secs_f64() * 1000.0);
                }
            }
            ms
        })
    };
    let action = |verb: &'static str| {
        let (api, picked) = (api.clone(), picked.clone());
        move |i: usize| {
            let (api, name) = (api.clone(), picked[i].clone());
            async move {
                api.post_unread(&format!("/vms/{name}/actions"), json!({"action": verb}))
                    .await
            }
        }
    };
    let t_ops = Instant::now();
    let mut stop_ms = drive(ops, load.concurrency, load.ops_rate, action("stop")).await?;
    let want = vms_running.saturating_sub(ops);
    let deadline = Instant::now() + Duration::from_secs(300);
    while running(&sim) > want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut start_ms = drive(ops, load.concurrency, load.ops_rate, action("start")).await?;
    let deleted: Vec<String> = picked.iter().step_by(2).cloned().collect();

    // Migrations: VMs not among those deleted next, each to a host the
    // placement engine picks; the workflow is followed to its end.
    let migrated: Vec<String> = {
        let skip: std::collections::HashSet<&String> = deleted.iter().collect();
        let mut m: Vec<String> = (0..vms)
            .map(|i| format!("v{}", (i * 104_729 + 101) % vms.max(1)))
            .filter(|n| !skip.contains(n))
            .take(load.migrations.min(vms))
            .collect();
        m.sort();
        m.dedup();
        m
    };
    if !migrated.is_empty() {
        say(format!("migrating {} VMs", migrated.len()));
    }
    let t_mig = Instant::now();
    let from_hosts: Vec<String> = {
        let mut v = Vec::with_capacity(migrated.len());
        for name in &migrated {
            let vm = api.get(&format!("/vms/{name}")).await?;
            v.push(
                vm["status"]["host"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
        v
    };
    let mig_ids = Arc::new(Mutex::new(vec![(String::new(), t_mig); migrated.len()]));
    let mut migrate_ms = {
        let (api, names, ids) = (api.clone(), Arc::new(migrated.clone()), mig_ids.clone());
        drive(
            names.len(),
            load.concurrency.min(32),
            load.ops_rate,
            move |i| {
                let (api, names, ids) = (api.clone(), names.clone(), ids.clone());
                async move {
                    let m = api
                        .post(
                            &format!("/vms/{}/migrate", names[i]),
                            json!({"mode": "auto"}),
                        )
                        .await?;
                    let id = m["id"].as_str().unwrap_or_default().to_string();
                    ids.lock().unwrap_or_else(|p| p.into_inner())[i] = (id, Instant::now());
                    Ok(())
                }
            },
        )
        .await?
    };
    let ids: Vec<(String, Instant)> = mig_ids.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut done_ms: Vec<Option<f64>> = vec![None; ids.len()];
    let mut completed = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    while done_ms.iter().any(Option::is_none) && Instant::now() < deadline {
        for (i, (id, asked)) in ids.iter().enumerate() {
            if done_ms[i].is_some() {
                continue;
            }
            let m = api.get(&format!("/migrations/{id}")).await?;
            match m["phase"].as_str() {
                Some("completed") => {
                    completed += 1;
                    done_ms[i] = Some(asked.elapsed().as_secs_f64() * 1000.0);
                }
                Some("failed") => done_ms[i] = Some(f64::NAN),
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut migration_ms: Vec<f64> = done_ms
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    let migrations_failed = ids.len() - completed;
    // Each completed migration's VM runs on the host the control plane
    // names, which is not where it was, and no longer on its source.
    let mut migration_mismatches = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, name) in migrated.iter().enumerate() {
        if !done_ms[i].is_some_and(f64::is_finite) {
            continue;
        }
        let ok = loop {
            let vm = api.get(&format!("/vms/{name}")).await?;
            let (id, host) = (
                vm["id"].as_str().unwrap_or_default().to_string(),
                vm["status"]["host"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
            let on = |h: &str| {
                by_name
                    .get(h)
                    .is_some_and(|j| sim[*j].driver.is_running(&id))
            };
            let ok = vm["status"]["phase"] == "running"
                && host != from_hosts[i]
                && on(&host)
                && !on(&from_hosts[i]);
            if ok || Instant::now() > deadline {
                break ok;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if !ok {
            migration_mismatches += 1;
        }
    }
    let mig_secs = t_mig.elapsed().as_secs_f64();
    if !migrated.is_empty() {
        say(format!(
            "{completed} of {} migrations completed in {mig_secs:.1} s",
            migrated.len()
        ));
    }

    let mut delete_ms = {
        let (api, deleted) = (api.clone(), Arc::new(deleted.clone()));
        drive(deleted.len(), load.concurrency, load.ops_rate, move |i| {
            let (api, name) = (api.clone(), deleted[i].clone());
            async move {
                api.call_unread("DELETE", &format!("/vms/{name}"), None)
                    .await
            }
        })
        .await?
    };
    let n_ops = stop_ms.len() + start_ms.len() + delete_ms.len();
    let ops_secs = t_ops.elapsed().as_secs_f64() - mig_secs;
    stop_listing.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut list_load_ms = lister.await.unwrap_or_default();
    // Deleted VMs are gone from the agents and shown deleted.
    let deadline = Instant::now() + Duration::from_secs(300);
    let target = vms_running.saturating_sub(deleted.len());
    while running(&sim) != target && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The control plane marks them deleted on the agents' reports; allow
    // two heartbeats for those.
    let mut pending_delete: Vec<String> = deleted.iter().take(500).cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(12);
    loop {
        let mut left = Vec::new();
        for name in pending_delete {
            let v = api.get(&format!("/vms/{name}")).await;
            let gone_on_cp = match &v {
                Err(e) => e.to_string().contains("404"),
                Ok(v) => v["status"]["phase"] == "deleted",
            };
            if !gone_on_cp {
                left.push(name);
            }
        }
        pending_delete = left;
        if pending_delete.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let delete_mismatches = pending_delete.len();

    // Heartbeats over a window.
    let m0 = api.get("/metrics").await?;
    let window = Duration::from_secs(12);
    tokio::time::sleep(window).await;
    let m1 = api.get("/metrics").await?;
    let interval = m1["heartbeat_interval_s"].as_u64().unwrap_or(5).max(1);
    let received = m1["heartbeats_received"].as_u64().unwrap_or(0)
        - m0["heartbeats_received"].as_u64().unwrap_or(0);
    let expected = hosts as f64 * window.as_secs_f64() / interval as f64;
    // Beats are periodic, so a window catches floor or ceil of the expected
    // count per host; allow one beat per host of slack before calling it missed.
    let missed = ((expected - hosts as f64) - received as f64).max(0.0) / expected.max(1.0);

    // Agents' view against the control plane's, on a sample.
    let mut sampled = 0;
    let mut mismatches = 0;
    let mut sample = Vec::new();
    let mut cursor: Option<String> = None;
    while sample.len() < 2000 {
        let path = match &cursor {
            Some(c) => format!("/vms?limit=1000&cursor={c}"),
            None => "/vms?limit=1000".to_string(),
        };
        let page = api.get(&path).await?;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        // At size, every 7th VM of each page, so the sample spreads over the ids.
        sample.extend(items.into_iter().step_by(if vms > 2000 { 7 } else { 1 }));
        cursor = page["next_cursor"].as_str().map(str::to_string);
        if cursor.is_none() {
            break;
        }
    }
    for v in sample {
        sampled += 1;
        let id = v["id"].as_str().unwrap_or_default();
        let host = v["status"]["host"].as_str().unwrap_or_default();
        let cp_running = v["status"]["phase"] == "running";
        let agent_running = by_name
            .get(host)
            .is_some_and(|i| sim[*i].driver.is_running(id));
        if cp_running != agent_running {
            mismatches += 1;
        }
    }

    let pid = server.0.id();
    let server_rss = rss_bytes(pid);
    let server_peak_rss = peak_rss_bytes(pid);
    let size = |f: &str| {
        std::fs::metadata(scratch.dir.join("server").join(f))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let wal = size("virt8ra.db-wal");
    let db = size("virt8ra.db") + wal;
    let connected = m1["agents_connected"].as_u64().unwrap_or(0);

    // Restart to serving.
    let _ = server.0.kill();
    let _ = server.0.wait();
    let t = Instant::now();
    *server = start_server(scratch.dir, port)?;
    wait_healthy(port, Duration::from_secs(600)).await?;
    let restart_ms = t.elapsed().as_secs_f64() * 1000.0;
    for s in &sim {
        s.task.abort();
    }

    Ok(ScaleReport {
        hosts,
        hosts_connected: connected,
        agent_connections: if muxes.iter().any(|m| m.fell_back()) || muxes.is_empty() {
            hosts
        } else {
            muxes.len()
        },
        heartbeat_interval_s: interval,
        missed_heartbeat_ratio: missed,
        vms,
        vms_running,
        create_per_s: vms as f64 / all_running.max(1e-9),
        create_p50_ms: percentile(&mut create_ms.clone(), 0.5),
        create_p99_ms: percentile(&mut create_ms, 0.99),
        server_cpu_ms_per_vm: create_cpu.0 * 1000.0 / vms.max(1) as f64,
        bench_cpu_ms_per_vm: create_cpu.1 * 1000.0 / vms.max(1) as f64,
        create_load_1m: create_cpu.2,
        get_p99_ms: percentile(&mut get_ms, 0.99),
        list_page_p99_ms: percentile(&mut list_ms, 0.99),
        list_pages: list_ms.len(),
        list_page_parse_p99_ms: percentile(&mut list_parse_ms, 0.99),
        ops: n_ops,
        ops_per_s: n_ops as f64 / ops_secs.max(1e-9),
        stop_p99_ms: percentile(&mut stop_ms, 0.99),
        start_p99_ms: percentile(&mut start_ms, 0.99),
        delete_p99_ms: percentile(&mut delete_ms, 0.99),
        list_page_under_load_p99_ms: percentile(&mut list_load_ms, 0.99),
        delete_mismatches,
        deleted: deleted.len(),
        migrations: migrated.len(),
        migrations_completed: completed,
        migrations_failed,
        migrate_call_p99_ms: percentile(&mut migrate_ms, 0.99),
        migration_p50_ms: percentile(&mut migration_ms.clone(), 0.5),
        migration_p99_ms: percentile(&mut migration_ms, 0.99),
        migration_mismatches,
        server_rss_bytes: server_rss,
        server_rss_after_create_bytes: rss_after_create,
        server_peak_rss_bytes: server_peak_rss,
        bench_rss_bytes: rss_bytes(std::process::id()),
        db_bytes: db,
        wal_bytes: wal,
        restart_to_serving_ms: restart_ms,
        sampled,
        mismatches,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drive_makes_every_call_once_at_most_concurrency_at_a_time() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (s, n, m) = (seen.clone(), now.clone(), most.clone());
        let ms = drive(100, 8, 0.0, move |i| {
            let (s, n, m) = (s.clone(), n.clone(), m.clone());
            async move {
                let in_flight = n.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(in_flight, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                s.lock().unwrap().push(i);
                n.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .await
        .unwrap();
        assert_eq!(ms.len(), 100);
        assert!(ms.iter().all(|&l| l >= 2.0), "{ms:?}");
        let mut seen = seen.lock().unwrap().clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        let most = most.load(Ordering::SeqCst);
        assert!((2..=8).contains(&most), "{most} calls at once");
    }

    #[tokio::test]
    async fn drive_fails_with_a_failed_call_and_keeps_to_its_rate() {
        let e = drive(20, 4, 0.0, |i| async move {
            if i == 13 {
                bail!("call {i} failed");
            }
            Ok(())
        })
        .await
        .expect_err("a call failed");
        assert!(e.to_string().contains("call 13 failed"), "{e}");
        // 10 calls at 200 a second: the first at once, the last 45 ms later.
        let t = Instant::now();
        let ms = drive(10, 4, 200.0, |_| async { Ok(()) }).await.unwrap();
        assert_eq!(ms.len(), 10);
        assert!(
            t.elapsed() >= Duration::from_millis(40),
            "{:?}",
            t.elapsed()
        );
    }
}
