//! The virt8ra host agent.
//!
//! It joins the control plane once with a join token and keeps the host
//! credential it is given; then it dials out to the control plane over one
//! persistent channel ([`channel`]), keeps its desired state on local disk so
//! VMs survive a lost control plane and a host reboot ([`reconciler`]), and
//! turns that state into hypervisor processes through a [`driver::Driver`].
//!
//! Data directory layout:
//! ```text
//! credentials.json   host id and host token (mode 0600)
//! desired.json       the last desired state from the control plane: a snapshot
//! desired.log        ... and the journal of its changes since ([`desired_log`])
//! images/            cached base images, <sha256>.qcow2
//! staging/           disks being moved (cold migration, export; [`mover`])
//! vms/<id>/          one directory per VM, owned by the driver
//! vmstate/<id>.json  the agent's own per-VM state (ports, reboots, machine; none if default)
//! network/desired.json    the last virtual-network state, applied again at start ([`network`])
//! network/dhcp/<bridge>/  a virtual network's DHCP server: config, pid
//! ```
//!
//! What may import what: modules import only modules below them, never
//! each other in a circle (`crates/virt8ra/tests/imports.rs` checks it).
//! Start-up (this file) and the channel sit on top; under them the
//! reconciler, then the mover and the relays, then the drivers; at the
//! bottom the leaves every layer shares and which import nothing of the
//! agent: [`durable`] (atomic, fsynced files), [`private`] (0700/0600),
//! [`net`] (the control plane's URLs, request errors), [`liveness`] (read
//! deadlines, pings and keepalive of the connections to the control plane). The [`driver::Driver`]
//! trait says everything the agent needs of a driver (its callers never
//! see the QEMU driver's type), and the types the drivers and the mover
//! share (`driver::SendOutcome`) live in `driver/mod.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use virt8ra_api::{AgentJoin, AgentJoined, ErrorBody, HostInventory};
use virt8ra_tls::Trust;

pub mod channel;
pub mod desired_log;
pub mod driver;
pub mod durable;
pub mod image_service;
pub mod images;
pub mod inventory;
pub mod liveness;
pub mod metrics;
pub mod mover;
pub mod net;
pub mod network;
pub mod private;
pub mod reconciler;
pub mod relay;
pub mod simhost;

/// `virt8ra agent`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// URL of the control plane, e.g. https://cp.example:8480.
    #[arg(long, env = "VIRT8RA_SERVER")]
    pub server: String,
    /// A CA certificate (PEM) to trust besides the public web roots: the
    /// global `--ca-cert` (or `VIRT8RA_CA_CERT`), set by the binary. Used for
    /// join, the channel, image downloads, staging and relays.
    #[arg(skip)]
    pub ca_cert: Option<PathBuf>,
    /// Join token (`virt8ra host join-token create --site S`); needed on
    /// first start only. On the command line it is visible to every local
    /// user (ps): prefer --join-token-file or VIRT8RA_JOIN_TOKEN.
    #[arg(long, env = "VIRT8RA_JOIN_TOKEN")]
    pub join_token: Option<String>,
    /// A file holding the join token (e.g. mode 0600; surrounding
    /// whitespace is ignored); instead of --join-token.
    #[arg(long, conflicts_with = "join_token")]
    pub join_token_file: Option<PathBuf>,
    /// Directory for the agent's state, images and VM disks.
    #[arg(long, default_value = "/var/lib/virt8ra/agent")]
    pub data_dir: PathBuf,
    /// Hypervisor driver: qemu (real VMs), or sim (simulated VMs in memory, for scale tests only).
    #[arg(long, default_value = "qemu")]
    pub driver: String,
    /// Hardware acceleration: auto (probe KVM by booting a guest), kvm, or emulation.
    #[arg(long, default_value = "auto")]
    pub accel: String,
    /// Host name to register (default: the machine's hostname).
    #[arg(long)]
    pub name: Option<String>,
    /// Report this many vCPUs instead of the machine's.
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Report this much memory (MiB) instead of the machine's.
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// Report this much disk (GiB) instead of the data directory's filesystem.
    #[arg(long)]
    pub disk_gib: Option<u64>,
    /// The address other hosts reach this one at: the underlay of its
    /// virtual networks (VXLAN between hosts; an IPv4 address) and where
    /// incoming live migrations arrive (an address or a name).
    /// `--migration-address` is another name for it. Without it (e.g.
    /// behind NAT) incoming live migrations are relayed through the control
    /// plane, and the host's virtual networks reach only its own guests.
    #[arg(
        long = "address",
        alias = "migration-address",
        env = "VIRT8RA_ADDRESS",
        value_name = "IP"
    )]
    pub migration_address: Option<String>,
    /// Serve this host's image cache to the other hosts of its site on this
    /// address (e.g. 10.0.0.5:8481), so images cross the long link once per site.
    #[arg(long)]
    pub image_service_listen: Option<String>,
    /// URL the site's other hosts reach the image service at (default:
    /// http:// and the listen address).
    #[arg(long)]
    pub image_service_url: Option<String>,
    /// Serve Prometheus metrics (`GET /metrics`: each VM's QEMU CPU time
    /// and memory, the host's capacity and what is free) on this address,
    /// plain HTTP without a token.
    #[arg(long, env = "VIRT8RA_AGENT_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Credentials {
    server: String,
    host_id: String,
    host_name: String,
    site: String,
    host_token: String,
}

fn load_credentials(path: &Path) -> anyhow::Result<Option<Credentials>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
            format!("{} is corrupt; remove it and join again", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

fn save_credentials(path: &Path, c: &Credentials) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(c)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// How an agent is told to trust a control plane's certificate.
pub const CA_HINT: &str = "start the agent with --ca-cert FILE, the CA that signed it";

pub(crate) async fn join(
    server: &str,
    token: &str,
    req: &AgentJoin,
    trust: &Trust,
) -> anyhow::Result<AgentJoined> {
    let url = format!("{}/api/v1/agent/join", server.trim_end_matches('/'));
    let resp = trust
        .http_client()?
        .post(&url)
        .bearer_auth(token)
        .json(req)
        .send()
        .await
        .map_err(|e| match trust.explain(&e, &url) {
            Some(why) => anyhow::anyhow!("join {url}: {why}"),
            None => anyhow::anyhow!("join: cannot reach {url}: {}", virt8ra_tls::error_chain(&e)),
        })?;
    let status = resp.status();
    if !status.is_success() {
        let msg = resp
            .json::<ErrorBody>()
            .await
            .map(|b| b.error.message)
            .unwrap_or_else(|_| status.to_string());
        bail!("join refused: {msg}");
    }
    Ok(resp.json().await?)
}

/// The join token from --join-token-file, or --join-token /
/// VIRT8RA_JOIN_TOKEN.
fn join_token(args: &AgentArgs) -> anyhow::Result<Option<String>> {
    let Some(path) = &args.join_token_file else {
        return Ok(args.join_token.clone());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read the join token from {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() || token.contains(char::is_whitespace) {
        bail!(
            "{} must hold one join token (as `virt8ra host join-token create` prints it)",
            path.display()
        );
    }
    Ok(Some(token.to_string()))
}

/// Runs the agent until the process is stopped.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    // Before anything is written: the data files are the owner's alone.
    private::private_umask();
    if args.driver != "qemu" && args.driver != "sim" {
        bail!(
            "unknown driver {:?}: use qemu, or sim for scale tests",
            args.driver
        );
    }
    let accel = match args.accel.as_str() {
        "auto" => driver::qemu::AccelChoice::Auto,
        "kvm" => driver::qemu::AccelChoice::Kvm,
        "emulation" => driver::qemu::AccelChoice::Emulation,
        other => bail!("unknown --accel {other:?}: use auto, kvm or emulation"),
    };
    net::ws_url(&args.server)?;
    let trust = Trust::new(args.ca_cert.as_deref(), CA_HINT)?;
    let join_token = join_token(&args)?;
    private::private_tree(&args.data_dir).with_context(|| {
        format!(
            "create {} (mode 0700, everything in it the owner's alone)",
            args.data_dir.display()
        )
    })?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    // The virtual networks first: a rebooted host has lost its bridges
    // and taps, and VMs on networks need their taps before QEMU starts.
    reapply_networks(&data_dir).await;
    let driver = start_driver(&args, &data_dir, accel).await?;
    let name = args.name.clone().unwrap_or_else(inventory::hostname);
    let mut inv = inventory::collect(
        &name,
        &data_dir,
        driver.hypervisor(),
        &driver.version(),
        &inventory::Overrides {
            vcpus: args.vcpus,
            memory_mib: args.memory_mib,
            disk_gib: args.disk_gib,
        },
    );
    inv.machine_types = driver.machine_types();
    match network::tunnel::public_key(&data_dir.join(network::DIR)) {
        Ok(k) => inv.tunnel_public_key = Some(k),
        Err(e) => {
            tracing::warn!(error = %e, "no tunnel key: this host cannot join encrypted networks")
        }
    }
    // The older name of --address, in the environment too.
    let address = args
        .migration_address
        .clone()
        .or_else(|| std::env::var("VIRT8RA_MIGRATION_ADDRESS").ok());
    if let Some(a) = &address {
        if a.is_empty() || a.contains(['/', ' ']) {
            bail!("--address {a:?} is not an address");
        }
        if a.parse::<std::net::Ipv4Addr>().is_err() {
            tracing::warn!(
                address = %a,
                "--address is not an IPv4 address: live migrations use it, but this host's \
                 virtual networks reach only its own guests (VXLAN needs an IPv4 underlay)"
            );
        }
        inv.migration_address = Some(a.clone());
    }
    tracing::info!(
        hypervisor = driver.hypervisor().as_str(),
        vcpus = inv.vcpus,
        memory_mib = inv.memory_mib,
        "host inventory"
    );

    let creds = credentials(&args, &data_dir, join_token.as_deref(), &name, &inv, &trust).await?;

    let images = Arc::new(images::ImageCache::new(
        data_dir.join("images"),
        &args.server,
        &creds.host_token,
        &trust,
    )?);
    if let Some(listen) = &args.image_service_listen {
        let addr = image_service::start(images.clone(), listen).await?;
        inv.image_service = Some(
            args.image_service_url
                .clone()
                .unwrap_or_else(|| format!("http://{addr}")),
        );
    }
    let (reports, changes) = reconciler::Reports::new();
    if let Some(listen) = &args.metrics_listen {
        let source = metrics::Source {
            driver: driver.clone(),
            reports: reports.clone(),
            inventory: inv.clone(),
            data_dir: data_dir.clone(),
        };
        metrics::start(Arc::new(source), listen).await?;
    }
    let rec = reconciler::Reconciler::new(&data_dir, driver.clone(), images, reports.clone())?;
    let mover = mover::Mover::new(&data_dir, &args.server, &creds.host_token, address, &trust)?;
    rec.set_mover(mover.clone());
    rec.resume().await?;
    let ch = channel::Channel {
        server: args.server.clone(),
        host_token: creds.host_token.clone(),
        trust,
        inventory: inv,
        data_dir: data_dir.clone(),
        driver,
        reconciler: rec,
        reports,
        mover: Some(mover),
    };
    println!(
        "virt8ra agent: host {} ({}) connecting to {}",
        creds.host_name, creds.host_id, args.server
    );
    tokio::select! {
        _ = ch.run(changes) => {}
        _ = shutdown_signal() => {
            tracing::info!("agent stopping; VMs keep running");
        }
    }
    Ok(())
}

/// Applies the network state kept from the last run (see [`network`]).
async fn reapply_networks(data_dir: &Path) {
    let dd = data_dir.to_path_buf();
    match tokio::task::spawn_blocking(move || network::apply_stored(&dd)).await {
        Ok(Ok(c)) if !c.0.is_empty() => {
            tracing::info!(changes = c.0.len(), "network state re-applied")
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "stored network state not applied"),
        Err(e) => tracing::warn!(error = %e, "network state task failed"),
    }
}

async fn start_driver(
    args: &AgentArgs,
    data_dir: &Path,
    accel: driver::qemu::AccelChoice,
) -> anyhow::Result<Arc<dyn driver::Driver>> {
    if args.driver == "sim" {
        tracing::warn!("simulated driver: VMs exist only in memory (scale tests only)");
        return Ok(Arc::new(driver::sim::SimDriver::new(
            data_dir.join("vms"),
            args.memory_mib.unwrap_or(64 * 1024),
            driver::sim::SimTimings::default(),
        )));
    }
    Ok(Arc::new(
        driver::qemu::QemuDriver::new(data_dir.join("vms"), accel)
            .await
            .context("start the QEMU driver")?,
    ))
}

/// The host's credentials: kept from an earlier join, or got by joining
/// with the join token now (and kept).
async fn credentials(
    args: &AgentArgs,
    data_dir: &Path,
    join_token: Option<&str>,
    name: &str,
    inv: &HostInventory,
    trust: &Trust,
) -> anyhow::Result<Credentials> {
    let cred_path = data_dir.join("credentials.json");
    if let Some(c) = load_credentials(&cred_path)? {
        return Ok(c);
    }
    let Some(token) = join_token else {
        bail!(
            "this agent has not joined yet: pass --join-token-file FILE (or VIRT8RA_JOIN_TOKEN); create one with `virt8ra host join-token create --site SITE`"
        );
    };
    let joined = join(
        &args.server,
        token,
        &AgentJoin {
            name: name.to_string(),
            inventory: inv.clone(),
        },
        trust,
    )
    .await?;
    let c = Credentials {
        server: args.server.clone(),
        host_id: joined.host_id,
        host_name: joined.host_name,
        site: joined.site,
        host_token: joined.host_token,
    };
    save_credentials(&cred_path, &c)?;
    println!("joined as host {} at site {}", c.host_name, c.site);
    Ok(c)
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
