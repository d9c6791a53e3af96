//! The virt8ra control plane.
//!
//! `virt8ra server` runs one process that serves the HTTP API, holds the
//! agents' channels (the hub) and runs the scheduler. State lives in the
//! store; everything in memory (agent connections, heartbeats) is rebuilt
//! when agents reconnect, so a SIGKILL loses nothing that was acknowledged,
//! and work in flight resumes: pending VMs are placed by the next scheduler
//! pass, and agents get their desired state again when they reconnect.
//!
//! The code is in layers that import only downward: [`http`] (routes,
//! handlers, the error mapping) over [`workflows`] (migration) over
//! [`services`] (the rules and the store calls) over [`state`] (the shared
//! [`state::Ctx`]) over [`registry`] (in-memory state); see
//! docs/ARCHITECTURE.md. This file is start-up only.
//!
//! With `--tls-cert` and `--tls-key` everything is served over HTTPS (and
//! WSS), see [`tls`]; the control plane's own outbound fetches (catalogs,
//! image imports from URLs) trust the public web roots plus `--ca-cert`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use virt8ra_serve as serve;
use virt8ra_store::{CachedStore, PgStore, SqliteStore, Store, TokenKind};

use crate::registry::placement::{LoadedPlacement, PlacementConfig};

pub mod error;
pub mod http;
pub mod keys;
pub mod registry;
pub mod services;
pub mod state;
pub mod tls;
pub mod workflows;

pub use state::{ControlPlane, Ctx};

/// `virt8ra server`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8480", env = "VIRT8RA_LISTEN")]
    pub listen: SocketAddr,
    /// Directory for the database, images and the admin token.
    #[arg(
        long,
        default_value = "/var/lib/virt8ra/server",
        env = "VIRT8RA_DATA_DIR"
    )]
    pub data_dir: PathBuf,
    /// The database: a PostgreSQL URL, postgres://USER[:PASSWORD]@HOST[:PORT]/DB
    /// (or postgresql://). Without it: SQLite, virt8ra.db in --data-dir.
    /// Logs and errors show it with the password replaced by ***.
    #[arg(long, env = "VIRT8RA_DATABASE", hide_env_values = true)]
    pub database: Option<String>,
    /// Seconds between agent heartbeats; a host is unreachable after three missed ones.
    #[arg(long, default_value_t = 5)]
    pub heartbeat_interval: u64,
    /// vCPU overcommit ratio applied to every host (vCPUs placed per physical vCPU).
    #[arg(long, default_value_t = 4.0)]
    pub cpu_overcommit: f64,
    /// Memory overcommit ratio applied to every host.
    #[arg(long, default_value_t = 1.0)]
    pub memory_overcommit: f64,
    /// The largest virtual size (GiB) of an image accepted on upload or
    /// import; a VM's disk is at least its image's virtual size.
    #[arg(long, default_value_t = virt8ra_image::DEFAULT_MAX_VIRTUAL_SIZE >> 30)]
    pub max_image_virtual_size_gib: u64,
    /// Serve HTTPS with this certificate chain (PEM, the server's
    /// certificate first); needs --tls-key. Without both: plain HTTP.
    /// SIGHUP reads both files again.
    #[arg(long, env = "VIRT8RA_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "VIRT8RA_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// A CA certificate (PEM) the control plane's outbound fetches (catalog
    /// URLs, image imports from URLs) trust besides the public web roots:
    /// the global `--ca-cert` (or `VIRT8RA_CA_CERT`), set by the binary.
    #[arg(skip)]
    pub ca_cert: Option<PathBuf>,
    /// Seconds a client has to send a whole request head (and to finish
    /// its TLS handshake); also how long a keep-alive connection may sit
    /// idle between requests. Never applies to upgraded (WebSocket)
    /// connections or to a request being served.
    #[arg(long, default_value_t = 10.0, env = "VIRT8RA_HEADER_TIMEOUT")]
    pub header_timeout: f64,
    /// Open connections at most (agents' WebSockets included); past it a
    /// new connection is answered 503 and closed.
    #[arg(long, default_value_t = 10_000, env = "VIRT8RA_MAX_CONNECTIONS")]
    pub max_connections: usize,
    /// Also serve `GET /metrics` (Prometheus) on this address, without a
    /// token and without TLS, and nothing else there. `/metrics` on
    /// --listen needs the admin token either way.
    #[arg(long, env = "VIRT8RA_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Delete audit records older than this many days (checked hourly).
    /// Without it the audit log keeps every record.
    #[arg(long, env = "VIRT8RA_AUDIT_RETENTION_DAYS")]
    pub audit_retention_days: Option<u32>,
    /// Showback's power model: watts a placed vCPU draws.
    #[arg(long, default_value_t = services::usage::DEFAULT_POWER.watts_per_vcpu)]
    pub power_watts_per_vcpu: f64,
    /// Watts a GiB of a placed VM's memory draws.
    #[arg(long, default_value_t = services::usage::DEFAULT_POWER.watts_per_gib_memory)]
    pub power_watts_per_gib_memory: f64,
    /// Watts a GiB of a placed VM's disk draws.
    #[arg(long, default_value_t = services::usage::DEFAULT_POWER.watts_per_gib_disk)]
    pub power_watts_per_gib_disk: f64,
    /// The PUE taken for a site that gives none.
    #[arg(long, default_value_t = services::usage::DEFAULT_POWER.default_pue)]
    pub power_default_pue: f64,
}

/// The audit log's retention and showback's power model, as the operator
/// set them (checked before anything starts).
fn accounting(args: &ServerArgs) -> anyhow::Result<virt8ra_api::PowerModel> {
    if args.audit_retention_days == Some(0) {
        anyhow::bail!("--audit-retention-days must be at least 1 (without it, records are kept)");
    }
    for (what, v) in [
        ("--power-watts-per-vcpu", args.power_watts_per_vcpu),
        (
            "--power-watts-per-gib-memory",
            args.power_watts_per_gib_memory,
        ),
        ("--power-watts-per-gib-disk", args.power_watts_per_gib_disk),
    ] {
        if !(0.0..=1000.0).contains(&v) {
            anyhow::bail!("{what} {v} is outside 0..1000");
        }
    }
    if !(1.0..=5.0).contains(&args.power_default_pue) {
        anyhow::bail!(
            "--power-default-pue {} is outside 1.0..5.0",
            args.power_default_pue
        );
    }
    Ok(virt8ra_api::PowerModel {
        watts_per_vcpu: args.power_watts_per_vcpu,
        watts_per_gib_memory: args.power_watts_per_gib_memory,
        watts_per_gib_disk: args.power_watts_per_gib_disk,
        default_pue: args.power_default_pue,
    })
}

/// How an operator makes the control plane trust a server it fetches from.
pub const CA_HINT: &str = "start the control plane with --ca-cert FILE, the CA that signed it";

/// Builds the control plane's state on `data_dir`, its database SQLite
/// there: see [`open_with`].
pub async fn open(
    data_dir: &Path,
    heartbeat: Duration,
    placement_config: PlacementConfig,
    max_image_virtual_size: u64,
    trust: virt8ra_tls::Trust,
) -> anyhow::Result<(Ctx, Option<String>)> {
    open_with(
        data_dir,
        None,
        heartbeat,
        placement_config,
        max_image_virtual_size,
        trust,
    )
    .await
}

/// Opens the store: PostgreSQL at `database` when given (a URL), else
/// SQLite in `data_dir`; either upgraded to this build's schema, with the
/// hot collections cached in memory (see `virt8ra_store::CachedStore`).
async fn open_store(
    data_dir: &Path,
    database: Option<&str>,
    metrics: &Arc<registry::metrics::Metrics>,
) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match database {
        Some(url) => {
            // The store's errors show the URL redacted, never the password.
            let store = PgStore::connect(url).await?;
            tracing::info!(database = %virt8ra_store::redact_url(url), "store: PostgreSQL");
            Arc::new(CachedStore::new(store).await?)
        }
        None => {
            let store = SqliteStore::open(&data_dir.join("virt8ra.db"))
                .with_context(|| format!("open database in {}", data_dir.display()))?;
            // Commit latency from the writer thread (SQLite only so far).
            let m = metrics.clone();
            store.on_commit(Box::new(move |took, writes| m.commit(took, writes)));
            // Providers, sites, images and tokens are read on every
            // request: from memory (see `virt8ra_store::CachedStore`).
            Arc::new(CachedStore::new(store).await?)
        }
    })
}

/// Builds the control plane's state on `data_dir`: opens (and upgrades) the
/// database (PostgreSQL at `database`, else SQLite in `data_dir`) and makes
/// sure an admin token exists. Returns the admin token if it was created
/// now (it is shown once).
pub async fn open_with(
    data_dir: &Path,
    database: Option<&str>,
    heartbeat: Duration,
    placement_config: PlacementConfig,
    max_image_virtual_size: u64,
    trust: virt8ra_tls::Trust,
) -> anyhow::Result<(Ctx, Option<String>)> {
    // The owner's alone (0700, files 0600), an older one tightened.
    keys::private_dir(data_dir)?;
    let images_dir = data_dir.join("images");
    keys::private_dir(&images_dir)?;
    // Made here, once, never in a request.
    let catalog_key = keys::catalog_key(data_dir)?;
    let site_key = keys::site_key(data_dir)?;
    let metrics = Arc::new(registry::metrics::Metrics::new());
    let store = open_store(data_dir, database, &metrics).await?;
    let created = ensure_admin_token(store.as_ref(), data_dir).await?;
    services::tenancy::ensure_default(store.as_ref()).await?;
    let quotas = services::tenancy::load_quotas(store.as_ref()).await?;
    store.purge_join_tokens(Utc::now()).await?;
    let hosts = registry::index::HostIndex::load(store.list_hosts().await?);
    // Every VM into memory before serving: reads are answered from there.
    let vms = registry::index::VmIndex::load(
        store
            .list_vms(&virt8ra_store::VmFilter {
                include_deleted: true,
                ..Default::default()
            })
            .await?,
    );
    let placement = LoadedPlacement::new(placement_config);
    // Networks' spans before anything is placed (see `registry::networks`).
    placement.spans.load(&store.list_networks().await?);
    let tunnels = registry::tunnels::TunnelAddresses::default();
    tunnels.load(hosts.all().iter().filter_map(|h| h.tunnel_address));
    let app = Arc::new(ControlPlane {
        store,
        hub: registry::hub::Hub::default(),
        data_dir: data_dir.to_path_buf(),
        images_dir,
        heartbeat_interval: heartbeat,
        wake: tokio::sync::Notify::new(),
        vm_locks: (0..256).map(|_| tokio::sync::Mutex::new(())).collect(),
        placement,
        ipam: Default::default(),
        tunnels,
        started: std::time::Instant::now(),
        marked_hosts: Default::default(),
        deleting_hosts: Default::default(),
        changes: tokio::sync::broadcast::channel(4096).0,
        migrations: Default::default(),
        staging: Default::default(),
        transfers: Default::default(),
        distribution: Default::default(),
        token_rotation: Default::default(),
        vms,
        hosts,
        image_refs: Default::default(),
        netplane: Default::default(),
        trust,
        catalog_key,
        site_key,
        max_image_virtual_size,
        metrics,
        power: Default::default(),
        quotas,
    });
    Ok((app, created))
}

async fn ensure_admin_token(store: &dyn Store, data_dir: &Path) -> anyhow::Result<Option<String>> {
    if store.count_tokens(TokenKind::Admin).await? > 0 {
        return Ok(None);
    }
    let secret = services::tokens::new_secret();
    let path = data_dir.join("admin.token");
    keys::write_secret(&path, &secret)?;
    store
        .create_token(&services::tokens::admin_record(&secret))
        .await?;
    Ok(Some(secret))
}

/// Runs the control plane until the process is stopped.
pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    // Before anything is written: the data files are the owner's alone.
    keys::private_umask();
    for (what, v) in [
        ("--cpu-overcommit", args.cpu_overcommit),
        ("--memory-overcommit", args.memory_overcommit),
    ] {
        if !(0.1..=64.0).contains(&v) {
            anyhow::bail!("{what} {v} is outside 0.1..64");
        }
    }
    if !(0.1..=3600.0).contains(&args.header_timeout) {
        anyhow::bail!(
            "--header-timeout {} is outside 0.1..3600 seconds",
            args.header_timeout
        );
    }
    if args.max_connections == 0 {
        anyhow::bail!("--max-connections must be at least 1");
    }
    let power = accounting(&args)?;
    let limits = serve::Limits {
        header_timeout: Duration::from_secs_f64(args.header_timeout),
        max_connections: args.max_connections,
        busy_message: "the control plane has --max-connections open connections; try again later",
        tcp_keepalive: Some(Duration::from_secs(args.heartbeat_interval.max(1))),
    };
    if args.max_image_virtual_size_gib == 0 || args.max_image_virtual_size_gib > 1 << 24 {
        anyhow::bail!(
            "--max-image-virtual-size-gib {} is outside 1..16777216",
            args.max_image_virtual_size_gib
        );
    }
    if !virt8ra_image::sandboxed() {
        tracing::warn!(
            "no Landlock on this kernel: qemu-img checks and converts received images unconfined"
        );
    }
    let cfg = PlacementConfig {
        cpu_overcommit: args.cpu_overcommit,
        memory_overcommit: args.memory_overcommit,
        ..Default::default()
    };
    // Certificates first: a bad one stops the start before anything else.
    let server_tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(Arc::new(tls::ServerTls::load(c, k)?)),
        (None, None) => None,
        (Some(_), None) => {
            anyhow::bail!("--tls-cert needs --tls-key (the certificate's private key)")
        }
        (None, Some(_)) => anyhow::bail!("--tls-key needs --tls-cert (the certificate chain)"),
    };
    let trust = virt8ra_tls::Trust::new(args.ca_cert.as_deref(), CA_HINT)?;
    let (app, created) = open_with(
        &args.data_dir,
        args.database.as_deref(),
        Duration::from_secs(args.heartbeat_interval.max(1)),
        cfg,
        args.max_image_virtual_size_gib << 30,
        trust,
    )
    .await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    if let Some(token) = created {
        println!(
            "admin token (shown once; also in {}): {token}",
            args.data_dir.join("admin.token").display()
        );
    }
    let scheme = if server_tls.is_some() {
        "https"
    } else {
        "http"
    };
    println!("virt8ra control plane listening on {scheme}://{local}");
    if server_tls.is_none() && !local.ip().is_loopback() {
        tracing::warn!(
            listen = %local,
            "serving plain HTTP on a non-loopback address: tokens, the agents' channels and relayed \
             migrations cross the network unencrypted; pass --tls-cert and --tls-key"
        );
    }
    if let Some(addr) = args.metrics_listen {
        serve_metrics(&app, addr, limits).await?;
    }
    start_work(&app).await?;
    let _ = app.power.set(power);
    if let Some(days) = args.audit_retention_days {
        services::audit::keep_for(&app, days);
    }
    if let Some(server_tls) = &server_tls {
        tokio::spawn(reload_on_sighup(server_tls.clone()));
    }
    serve::serve(
        listener,
        server_tls.map(|t| t as Arc<dyn serve::Handshake>),
        http::router(app),
        limits,
        shutdown_signal(),
    )
    .await;
    Ok(())
}

/// `--metrics-listen`: `GET /metrics` without a token, in a task of its own.
async fn serve_metrics(app: &Ctx, addr: SocketAddr, limits: serve::Limits) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics-listen {addr}"))?;
    let local = listener.local_addr()?;
    println!("virt8ra metrics on http://{local}/metrics");
    if !local.ip().is_loopback() {
        tracing::info!(listen = %local, "metrics served without a token: keep this address on the monitoring network");
    }
    tokio::spawn(serve::serve(
        listener,
        None,
        http::metrics::open_router(app.clone()),
        limits,
        std::future::pending(),
    ));
    Ok(())
}

/// The control plane's own work: unfinished migrations resume, the
/// scheduler and the token purge run (in tasks of the current runtime).
async fn start_work(app: &Ctx) -> anyhow::Result<()> {
    workflows::migration::resume_all(app)
        .await
        .context("resume unfinished migrations")?;
    tokio::spawn(services::scheduler::run(app.clone()));
    tokio::spawn(services::tokens::purge_periodically(app.clone()));
    Ok(())
}

/// Starts a control plane opened with [`open`] on a bound `listener`
/// (plain HTTP, default limits), every part of it a task of the current
/// runtime, and returns at once: for the in-process test harness
/// (`crates/testkit`), which stops it, or crashes it, by dropping that
/// runtime.
pub async fn start_on(app: &Ctx, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    start_work(app).await?;
    let limits = serve::Limits {
        header_timeout: Duration::from_secs(10),
        max_connections: 10_000,
        busy_message: "the control plane has --max-connections open connections; try again later",
        tcp_keepalive: Some(app.heartbeat_interval),
    };
    let router = http::router(app.clone());
    tokio::spawn(serve::serve(
        listener,
        None,
        router,
        limits,
        std::future::pending(),
    ));
    Ok(())
}

/// SIGHUP: read the certificate and key again (a renewed certificate).
async fn reload_on_sighup(server_tls: Arc<tls::ServerTls>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        match server_tls.reload() {
            Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "SIGHUP: TLS certificate not reloaded; the old one stays")
            }
        }
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
