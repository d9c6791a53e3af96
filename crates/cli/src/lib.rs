//! The virt8ra client CLI: every verb of `virt8ra` except `server` and `agent`.
//!
//! The control plane's URL and token come from `--url`/`--token`, then
//! `VIRT8RA_URL`/`VIRT8RA_TOKEN`, then `~/.config/virt8ra/config.yaml`
//! (`url:` and `token:`). An https control plane must present a certificate
//! signed by a public CA or by the CA given with `--ca-cert`,
//! `VIRT8RA_CA_CERT` or `ca_cert:` in that file. Errors are one line on
//! stderr and a non-zero exit.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use virt8ra_api::*;

pub mod app;
pub mod apply;
pub mod client;
pub mod migrate;
pub mod output;

use client::{seg, Client};
use output::{ago, emit, fields, opt, table, Format};

#[derive(Debug, Clone, Args)]
pub struct GlobalOpts {
    /// Control plane URL [env: VIRT8RA_URL; default http://127.0.0.1:8480]
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// API token [env: VIRT8RA_TOKEN]
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) to trust besides the public web roots, for an
    /// https control plane (and, for `server` and `agent`, for what they
    /// fetch) [env: VIRT8RA_CA_CERT]
    #[arg(long, global = true, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Output format.
    #[arg(
        short = 'o',
        long = "output",
        global = true,
        value_enum,
        default_value = "table"
    )]
    pub output: Format,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Providers: operators that own sites.
    #[command(subcommand)]
    Provider(ProviderCmd),
    /// Sites: core and edge locations of providers.
    #[command(subcommand)]
    Site(SiteCmd),
    /// Hosts: machines registered by their agents.
    #[command(subcommand)]
    Host(HostCmd),
    /// Images: base disks for VMs.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Migrations of VMs between hosts, sites, providers and countries.
    #[command(subcommand)]
    Migration(MigrationCmd),
    /// Plan moves toward a goal that keep every VM's rules; --execute migrates.
    Rebalance {
        /// even-load or lower-carbon.
        #[arg(long)]
        goal: String,
        /// even-load: how far above the mean memory use a host may be (0..1).
        #[arg(long)]
        tolerance: Option<f64>,
        /// lower-carbon: the least relative gain worth a move (0..1).
        #[arg(long)]
        min_gain: Option<f64>,
        /// Carry the moves out as migrations.
        #[arg(long)]
        execute: bool,
        /// live, cold, or auto.
        #[arg(long, default_value = "auto")]
        mode: String,
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Bring providers, sites, images and VMs to the state a YAML file declares.
    Apply(apply::ApplyArgs),
    /// Apps: one appliance deployed at several locations, managed as one unit.
    #[command(subcommand)]
    App(app::AppCmd),
    /// Appliances: versioned bundles of image, VM template and parameters.
    #[command(subcommand)]
    Appliance(app::ApplianceCmd),
    /// Catalogs of appliances: this control plane's, and others' it trusts.
    #[command(subcommand)]
    Catalog(app::CatalogCmd),
    /// The admin token.
    #[command(subcommand)]
    AdminToken(AdminTokenCmd),
}

#[derive(Debug, Subcommand)]
pub enum AdminTokenCmd {
    /// Replace the admin token: prints the new one (once); the old one
    /// stops working at once.
    Rotate,
}

#[derive(Debug, Subcommand)]
pub enum ProviderCmd {
    Create {
        name: String,
        /// ISO country code of the provider's legal seat, e.g. DE.
        #[arg(long)]
        country: String,
        /// Jurisdiction, e.g. EU.
        #[arg(long, default_value = "EU")]
        jurisdiction: String,
    },
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
    /// Move every VM away (under their placement rules), after putting its
    /// hosts in maintenance.
    Evacuate {
        name: String,
        /// live, cold, or auto.
        #[arg(long, default_value = "auto")]
        mode: String,
        #[command(flatten)]
        wait: WaitOpts,
    },
}

#[derive(Debug, Subcommand)]
pub enum SiteCmd {
    Create {
        name: String,
        #[arg(long)]
        provider: String,
        #[arg(long)]
        country: String,
        #[arg(long)]
        city: String,
        #[arg(long, allow_negative_numbers = true)]
        lat: f64,
        #[arg(long, allow_negative_numbers = true)]
        lon: f64,
        /// core or edge.
        #[arg(long, default_value = "core")]
        tier: String,
        /// Grid carbon intensity, gCO2eq/kWh.
        #[arg(long)]
        carbon: Option<f64>,
        #[arg(long)]
        pue: Option<f64>,
        /// EUR per vCPU-hour.
        #[arg(long)]
        price_vcpu_hour: Option<f64>,
        /// EUR per GiB-hour.
        #[arg(long)]
        price_gib_hour: Option<f64>,
        /// A label placement rules can select on, KEY=VALUE (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
    /// Move every VM away (under their placement rules), after putting its
    /// hosts in maintenance.
    Evacuate {
        name: String,
        /// live, cold, or auto.
        #[arg(long, default_value = "auto")]
        mode: String,
        #[command(flatten)]
        wait: WaitOpts,
    },
}

#[derive(Debug, Subcommand)]
pub enum HostCmd {
    List {
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        provider: Option<String>,
        #[arg(long)]
        country: Option<String>,
    },
    Show {
        name: String,
    },
    /// Take a host out of placement (disabled, maintenance) or back (ready).
    SetState {
        name: String,
        state: String,
    },
    /// Set the host's overcommit ratios (vCPUs and memory placed per physical unit).
    SetOvercommit {
        name: String,
        #[arg(long)]
        cpu: Option<f64>,
        #[arg(long)]
        memory: Option<f64>,
    },
    Delete {
        name: String,
    },
    /// Move every VM away (under their placement rules), after putting its
    /// hosts in maintenance.
    Evacuate {
        name: String,
        /// live, cold, or auto.
        #[arg(long, default_value = "auto")]
        mode: String,
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Join tokens, with which agents register.
    #[command(subcommand)]
    JoinToken(JoinTokenCmd),
}

#[derive(Debug, Subcommand)]
pub enum JoinTokenCmd {
    Create {
        /// Site the host will belong to.
        #[arg(long)]
        site: String,
        /// Validity in seconds (default 3600).
        #[arg(long)]
        ttl: Option<u64>,
        /// How many hosts may join with it (default 1).
        #[arg(long)]
        max_uses: Option<u32>,
    },
    /// The join tokens that can still admit a host (never their secrets).
    List,
    /// Revoke a join token by its id (from `list`): no host can join with it any more.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Import a disk image (qcow2, raw, VMDK, VHD, VHDX) from a file or an
    /// http(s) URL; it is stored as qcow2.
    Import {
        /// A local file (or give --url).
        file: Option<PathBuf>,
        #[arg(long)]
        name: String,
        #[arg(long)]
        arch: Option<String>,
        /// Version tag, e.g. 1.0.0.
        #[arg(long)]
        version: Option<String>,
        /// Have the control plane download it from this http(s) URL.
        #[arg(long = "from-url", conflicts_with = "file")]
        from_url: Option<String>,
        /// With --from-url: refuse the download unless its sha256 is this.
        #[arg(long, requires = "from_url")]
        sha256: Option<String>,
    },
    /// Pre-stage an image at sites: each site's image cache host fetches it
    /// once, and the site's other hosts get it from there.
    Replicate {
        name: String,
        /// Comma-separated site names.
        #[arg(long, value_delimiter = ',', required = true)]
        sites: Vec<String>,
    },
    /// Bytes of image data the control plane sent to hosts (the long link).
    Transfers,
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum VmCmd {
    Create {
        /// VM name (omit with -f when the spec names it).
        name: Option<String>,
        #[command(flatten)]
        spec: SpecArgs,
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Where would this VM go? A dry run of placement: nothing is created.
    Plan {
        /// VM name (optional for a plan).
        name: Option<String>,
        #[command(flatten)]
        spec: SpecArgs,
    },
    List {
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        provider: Option<String>,
        #[arg(long)]
        country: Option<String>,
        #[arg(long)]
        phase: Option<String>,
        /// Include deleted VMs.
        #[arg(long)]
        all: bool,
    },
    Show {
        name: String,
    },
    Start {
        name: String,
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Graceful ACPI power-down, forced after the timeout.
    Stop {
        name: String,
        /// Seconds to wait for the guest before forcing it off.
        #[arg(long)]
        timeout: Option<u32>,
        #[command(flatten)]
        wait: WaitOpts,
    },
    Reboot {
        name: String,
    },
    Delete {
        name: String,
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// The guest's serial console output.
    Console {
        name: String,
        /// At most this many bytes from the end.
        #[arg(long, default_value_t = 65536)]
        bytes: u64,
    },
    /// The VM's event history.
    Events {
        name: String,
    },
    /// Move the VM to another host, site, provider or country (live when
    /// possible); without a target the placement engine picks one.
    Migrate {
        name: String,
        #[command(flatten)]
        target: migrate::MigrateArgs,
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// The VM's migrations: where its data has been.
    Migrations {
        name: String,
    },
    /// Write the stopped VM as an open bundle: disk.qcow2 and manifest.json.
    Export {
        name: String,
        /// Directory to write (new or empty). `-o DIR` works too.
        #[arg(long = "dir")]
        dir: PathBuf,
    },
    /// Create a VM from an export bundle or a foreign disk (qcow2, VMDK, VHD, VHDX, raw).
    Import {
        #[command(flatten)]
        args: migrate::ImportArgs,
        #[command(flatten)]
        wait: WaitOpts,
    },
}

#[derive(Debug, Subcommand)]
pub enum MigrationCmd {
    List {
        /// Only this VM's.
        #[arg(long)]
        vm: Option<String>,
        /// Only unfinished ones.
        #[arg(long)]
        active: bool,
    },
    Show {
        id: String,
        #[command(flatten)]
        wait: WaitOpts,
    },
}

/// A VM spec from a file and flags.
#[derive(Debug, Clone, Args)]
pub struct SpecArgs {
    /// Spec file (JSON or YAML, the API's VmCreate); flags override it.
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    #[arg(long)]
    image: Option<String>,
    #[arg(long)]
    vcpus: Option<u32>,
    #[arg(long)]
    memory_mib: Option<u64>,
    #[arg(long)]
    disk_gib: Option<u64>,
    /// Pin to a site.
    #[arg(long)]
    site: Option<String>,
    /// Pin to a provider.
    #[arg(long)]
    provider: Option<String>,
    /// Pin to a country (ISO code).
    #[arg(long)]
    country: Option<String>,
    /// File with user data for the guest.
    #[arg(long)]
    user_data: Option<PathBuf>,
    /// Guest TCP port to forward to the host (repeatable).
    #[arg(long = "port")]
    ports: Vec<u16>,
    /// An SSH public key the guest accepts: a file (a .pub file, or an
    /// authorized_keys file with one key per line) or the key line itself
    /// (repeatable; replaces the spec file's ssh_authorized_keys).
    #[arg(long = "ssh-key", value_name = "FILE_OR_LINE")]
    ssh_keys: Vec<String>,
    /// A data disk after the boot disk: `image=NAME` (a copy of an image),
    /// `image=NAME,size_gib=N` (grown to N GiB) or `size_gib=N` (blank);
    /// repeatable, in order (replaces the spec file's data_disks).
    #[arg(long = "data-disk", value_name = "image=NAME,size_gib=N")]
    data_disks: Vec<String>,
    /// Create it stopped.
    #[arg(long)]
    no_start: bool,
}

#[derive(Debug, Clone, Args)]
pub struct WaitOpts {
    /// Wait until the operation has finished, showing progress.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub wait_timeout: u64,
}

impl WaitOpts {
    /// How long to wait, if waiting was asked for.
    pub fn timeout(&self) -> Option<Duration> {
        self.wait.then(|| Duration::from_secs(self.wait_timeout))
    }
}

async fn migration(c: &Client, o: Format, cmd: MigrationCmd) -> anyhow::Result<()> {
    match cmd {
        MigrationCmd::List { vm, active } => {
            let mut path = format!("/migrations?active={active}");
            if let Some(v) = vm {
                path.push_str(&format!("&vm={}", seg(&v)));
            }
            let page: Page<Migration> = c.get(&path).await?;
            migrate::list_migrations(o, &page.items)
        }
        MigrationCmd::Show { id, wait } => {
            let m: Migration = match wait.timeout() {
                Some(t) => migrate::wait_migration(c, &id, t, o).await?,
                None => c.get(&format!("/migrations/{}", seg(&id))).await?,
            };
            emit(o, &m, migrate::show_migration)
        }
    }
}

#[derive(Debug, Default, serde::Deserialize)]
struct ConfigFile {
    url: Option<String>,
    token: Option<String>,
    /// A relative path is relative to the config file's directory.
    ca_cert: Option<PathBuf>,
}

fn config_file() -> ConfigFile {
    let Some(home) = std::env::var_os("HOME") else {
        return ConfigFile::default();
    };
    let dir = PathBuf::from(home).join(".config/virt8ra");
    let mut cfg: ConfigFile = std::fs::read_to_string(dir.join("config.yaml"))
        .ok()
        .and_then(|s| serde_yaml::from_str(&s).ok())
        .unwrap_or_default();
    cfg.ca_cert = cfg.ca_cert.map(|p| dir.join(p));
    cfg
}

/// How the CLI is told to trust a control plane's certificate.
const CA_HINT: &str =
    "pass --ca-cert FILE, set VIRT8RA_CA_CERT or put ca_cert: in ~/.config/virt8ra/config.yaml: the CA that signed it";

/// The global `--ca-cert`, else `VIRT8RA_CA_CERT` (for `server` and `agent`,
/// which do not read the CLI's config file).
pub fn ca_cert(g: &GlobalOpts) -> Option<PathBuf> {
    g.ca_cert
        .clone()
        .or_else(|| std::env::var_os("VIRT8RA_CA_CERT").map(PathBuf::from))
        .filter(|p| !p.as_os_str().is_empty())
}

fn connect(g: &GlobalOpts) -> anyhow::Result<Client> {
    let cfg = config_file();
    let url = g
        .url
        .clone()
        .or_else(|| std::env::var("VIRT8RA_URL").ok())
        .or(cfg.url)
        .unwrap_or_else(|| "http://127.0.0.1:8480".into());
    let token = g
        .token
        .clone()
        .or_else(|| std::env::var("VIRT8RA_TOKEN").ok())
        .or(cfg.token)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no API token: set VIRT8RA_TOKEN (the server writes the admin token to DATA_DIR/admin.token)"
            )
        })?;
    let ca = ca_cert(g).or(cfg.ca_cert);
    let trust = virt8ra_tls::Trust::new(ca.as_deref(), CA_HINT)?;
    Client::new(&url, token.trim(), trust)
}

pub async fn run(g: GlobalOpts, cmd: Command) -> anyhow::Result<()> {
    if let Command::Catalog(k) = cmd {
        if k.offline() {
            return app::catalog_offline(g.output, k);
        }
        return app::catalog(&connect(&g)?, g.output, k).await;
    }
    let c = connect(&g)?;
    let o = g.output;
    match cmd {
        Command::Provider(p) => provider(&c, o, p).await,
        Command::Site(s) => site(&c, o, s).await,
        Command::Host(h) => host(&c, o, h).await,
        Command::Image(i) => image(&c, o, i).await,
        Command::Vm(v) => vm(&c, o, v).await,
        Command::Migration(m) => migration(&c, o, m).await,
        Command::Rebalance {
            goal,
            tolerance,
            min_gain,
            execute,
            mode,
            wait,
        } => {
            let goal = match goal.as_str() {
                "even-load" | "even_load" => RebalanceGoal::EvenLoad,
                "lower-carbon" | "lower_carbon" => RebalanceGoal::LowerCarbon,
                other => bail!("unknown --goal {other:?}: use even-load or lower-carbon"),
            };
            let req = RebalanceRequest {
                goal,
                tolerance,
                min_gain,
                execute,
                mode: migrate::parse_mode(&mode)?,
            };
            migrate::rebalance(&c, o, &req, wait.timeout()).await
        }
        Command::Apply(a) => apply::run(&c, o, a).await,
        Command::App(a) => app::app(&c, o, a).await,
        Command::Appliance(a) => app::appliance(&c, o, a).await,
        Command::Catalog(k) => app::catalog(&c, o, k).await,
        Command::AdminToken(a) => admin_token(&c, o, a).await,
    }
}

async fn provider(c: &Client, o: Format, cmd: ProviderCmd) -> anyhow::Result<()> {
    let show = |p: &Provider| {
        fields(vec![
            ("name", p.name.clone()),
            ("id", p.id.clone()),
            ("country", p.country.clone()),
            ("jurisdiction", p.jurisdiction.clone()),
        ])
    };
    match cmd {
        ProviderCmd::Create {
            name,
            country,
            jurisdiction,
        } => {
            let p: Provider = c
                .post(
                    "/providers",
                    &ProviderCreate {
                        name,
                        country,
                        jurisdiction,
                        labels: Default::default(),
                    },
                )
                .await?;
            emit(o, &p, show)
        }
        ProviderCmd::List => {
            let page: Page<Provider> = c.get("/providers").await?;
            emit(o, &page.items, |ps| {
                table(
                    &["name", "country", "jurisdiction"],
                    ps.iter()
                        .map(|p| vec![p.name.clone(), p.country.clone(), p.jurisdiction.clone()])
                        .collect(),
                )
            })
        }
        ProviderCmd::Show { name } => {
            let p: Provider = c.get(&format!("/providers/{}", seg(&name))).await?;
            emit(o, &p, show)
        }
        ProviderCmd::Delete { name } => {
            c.delete(&format!("/providers/{}", seg(&name))).await?;
            done(o, &format!("provider {name} deleted"))
        }
        ProviderCmd::Evacuate { name, mode, wait } => {
            migrate::evacuate(c, o, "providers", &name, &mode, wait.timeout()).await
        }
    }
}

pub(crate) fn done(o: Format, msg: &str) -> anyhow::Result<()> {
    emit(o, &serde_json::json!({ "result": msg }), |_| {
        println!("{msg}")
    })
}

async fn site(c: &Client, o: Format, cmd: SiteCmd) -> anyhow::Result<()> {
    let show = |s: &Site| {
        fields(vec![
            ("name", s.name.clone()),
            ("id", s.id.clone()),
            ("provider", s.provider.clone()),
            ("country", s.country.clone()),
            ("city", s.city.clone()),
            ("location", format!("{:.4}, {:.4}", s.latitude, s.longitude)),
            ("tier", s.tier.as_str().into()),
            ("carbon gCO2/kWh", opt(&s.facts.grid_gco2_per_kwh)),
            ("pue", opt(&s.facts.pue)),
        ])
    };
    match cmd {
        SiteCmd::Create {
            name,
            provider,
            country,
            city,
            lat,
            lon,
            tier,
            carbon,
            pue,
            price_vcpu_hour,
            price_gib_hour,
            labels,
        } => {
            let mut label_map = std::collections::BTreeMap::new();
            for l in &labels {
                let Some((k, v)) = l.split_once('=') else {
                    bail!("label {l:?} must be KEY=VALUE");
                };
                label_map.insert(k.to_string(), v.to_string());
            }
            let tier = match tier.as_str() {
                "core" => Tier::Core,
                "edge" => Tier::Edge,
                t => bail!("unknown tier {t:?}: use core or edge"),
            };
            let s: Site = c
                .post(
                    "/sites",
                    &SiteCreate {
                        name,
                        provider,
                        country,
                        city,
                        latitude: lat,
                        longitude: lon,
                        tier,
                        facts: SiteFacts {
                            grid_gco2_per_kwh: carbon,
                            pue,
                            price_vcpu_hour,
                            price_gib_hour,
                            access_latency_ms: None,
                        },
                        labels: label_map,
                    },
                )
                .await?;
            emit(o, &s, show)
        }
        SiteCmd::List => {
            let page: Page<Site> = c.get("/sites").await?;
            emit(o, &page.items, |ss| {
                table(
                    &["name", "provider", "country", "city", "tier", "gco2/kwh"],
                    ss.iter()
                        .map(|s| {
                            vec![
                                s.name.clone(),
                                s.provider.clone(),
                                s.country.clone(),
                                s.city.clone(),
                                s.tier.as_str().into(),
                                opt(&s.facts.grid_gco2_per_kwh),
                            ]
                        })
                        .collect(),
                )
            })
        }
        SiteCmd::Show { name } => {
            let s: Site = c.get(&format!("/sites/{}", seg(&name))).await?;
            emit(o, &s, show)
        }
        SiteCmd::Delete { name } => {
            c.delete(&format!("/sites/{}", seg(&name))).await?;
            done(o, &format!("site {name} deleted"))
        }
        SiteCmd::Evacuate { name, mode, wait } => {
            migrate::evacuate(c, o, "sites", &name, &mode, wait.timeout()).await
        }
    }
}

fn host_row(h: &Host) -> Vec<String> {
    vec![
        h.name.clone(),
        h.site.clone(),
        h.provider.clone(),
        h.country.clone(),
        h.state.as_str().into(),
        h.inventory.hypervisor.as_str().into(),
        format!("{}/{}", h.allocated.vcpus, h.inventory.vcpus),
        format!("{}/{}", h.allocated.memory_mib, h.inventory.memory_mib),
        h.allocated.vms.to_string(),
        ago(&h.last_heartbeat),
    ]
}

async fn host(c: &Client, o: Format, cmd: HostCmd) -> anyhow::Result<()> {
    let show = |h: &Host| {
        fields(vec![
            ("name", h.name.clone()),
            ("id", h.id.clone()),
            ("site", h.site.clone()),
            ("provider", h.provider.clone()),
            ("country", h.country.clone()),
            ("state", h.state.as_str().into()),
            ("connected", h.connected.to_string()),
            ("last heartbeat", ago(&h.last_heartbeat)),
            ("arch", h.inventory.arch.clone()),
            ("hypervisor", h.inventory.hypervisor.as_str().into()),
            ("cpu", h.inventory.cpu_model.clone()),
            (
                "vcpus (allocated/total)",
                format!("{}/{}", h.allocated.vcpus, h.inventory.vcpus),
            ),
            (
                "memory MiB (allocated/total)",
                format!("{}/{}", h.allocated.memory_mib, h.inventory.memory_mib),
            ),
            (
                "disk GiB (allocated/total)",
                format!("{}/{}", h.allocated.disk_gib, h.inventory.disk_gib),
            ),
            ("vms", h.allocated.vms.to_string()),
            ("load 1m", format!("{:.2}", h.usage.load_1m)),
            ("agent", h.inventory.agent_version.clone()),
            ("qemu", h.inventory.qemu_version.clone()),
        ])
    };
    match cmd {
        HostCmd::List {
            site,
            provider,
            country,
        } => {
            let mut q = Vec::new();
            for (k, v) in [("site", site), ("provider", provider), ("country", country)] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", seg(&v)));
                }
            }
            let path = if q.is_empty() {
                "/hosts".to_string()
            } else {
                format!("/hosts?{}", q.join("&"))
            };
            let page: Page<Host> = c.get(&path).await?;
            emit(o, &page.items, |hs| {
                table(
                    &[
                        "name",
                        "site",
                        "provider",
                        "country",
                        "state",
                        "hypervisor",
                        "vcpus",
                        "memory",
                        "vms",
                        "heartbeat",
                    ],
                    hs.iter().map(host_row).collect(),
                )
            })
        }
        HostCmd::Show { name } => {
            let h: Host = c.get(&format!("/hosts/{}", seg(&name))).await?;
            emit(o, &h, show)
        }
        HostCmd::SetState { name, state } => {
            let state = match state.as_str() {
                "ready" => HostState::Ready,
                "disabled" => HostState::Disabled,
                "maintenance" => HostState::Maintenance,
                s => bail!("unknown state {s:?}: use ready, disabled or maintenance"),
            };
            let h: Host = c
                .request(
                    reqwest::Method::PATCH,
                    &format!("/hosts/{}", seg(&name)),
                    Some(&HostUpdate {
                        state: Some(state),
                        cpu_overcommit: None,
                        memory_overcommit: None,
                    }),
                )
                .await?;
            emit(o, &h, show)
        }
        HostCmd::SetOvercommit { name, cpu, memory } => {
            let h: Host = c
                .request(
                    reqwest::Method::PATCH,
                    &format!("/hosts/{}", seg(&name)),
                    Some(&HostUpdate {
                        state: None,
                        cpu_overcommit: cpu,
                        memory_overcommit: memory,
                    }),
                )
                .await?;
            emit(o, &h, show)
        }
        HostCmd::Delete { name } => {
            c.delete(&format!("/hosts/{}", seg(&name))).await?;
            done(o, &format!("host {name} deleted"))
        }
        HostCmd::Evacuate { name, mode, wait } => {
            migrate::evacuate(c, o, "hosts", &name, &mode, wait.timeout()).await
        }
        HostCmd::JoinToken(j) => join_token(c, o, j).await,
    }
}

async fn join_token(c: &Client, o: Format, cmd: JoinTokenCmd) -> anyhow::Result<()> {
    match cmd {
        JoinTokenCmd::Create {
            site,
            ttl,
            max_uses,
        } => {
            let t: JoinToken = c
                .post(
                    "/join-tokens",
                    &JoinTokenCreate {
                        site,
                        ttl_s: ttl,
                        max_uses,
                    },
                )
                .await?;
            emit(o, &t, |t| println!("{}", t.token))
        }
        JoinTokenCmd::List => {
            let page: Page<JoinTokenInfo> = c.get("/join-tokens").await?;
            emit(o, &page.items, |ts| {
                table(
                    &["id", "site", "created", "expires", "uses left"],
                    ts.iter()
                        .map(|t| {
                            vec![
                                t.id.clone(),
                                t.site.clone(),
                                t.created_at.format("%Y-%m-%d %H:%M:%SZ").to_string(),
                                t.expires_at
                                    .map(|e| e.format("%Y-%m-%d %H:%M:%SZ").to_string())
                                    .unwrap_or_else(|| "never".into()),
                                t.uses_left
                                    .map(|u| u.to_string())
                                    .unwrap_or_else(|| "unlimited".into()),
                            ]
                        })
                        .collect(),
                )
            })
        }
        JoinTokenCmd::Revoke { id } => {
            c.delete(&format!("/join-tokens/{}", seg(&id))).await?;
            done(o, &format!("join token {id} revoked"))
        }
    }
}

async fn admin_token(c: &Client, o: Format, cmd: AdminTokenCmd) -> anyhow::Result<()> {
    match cmd {
        AdminTokenCmd::Rotate => {
            let t: AdminToken = c
                .post("/admin-token/rotate", &serde_json::json!({}))
                .await?;
            // The token alone on stdout (for scripts); where it goes, on stderr.
            eprintln!(
                "the old admin token no longer works; the control plane also wrote the new one to \
                 DATA_DIR/admin.token (mode 0600). Put it in VIRT8RA_TOKEN or in token: of \
                 ~/.config/virt8ra/config.yaml."
            );
            emit(o, &t, |t| println!("{}", t.token))
        }
    }
}

async fn image(c: &Client, o: Format, cmd: ImageCmd) -> anyhow::Result<()> {
    let show = |i: &Image| {
        fields(vec![
            ("name", i.name.clone()),
            ("id", i.id.clone()),
            ("sha256", i.sha256.clone()),
            (
                "format",
                format!("{} (imported as {})", i.format, i.source_format),
            ),
            ("size", format!("{} bytes", i.size_bytes)),
            ("virtual size", format!("{} bytes", i.virtual_size_bytes)),
            ("arch", i.arch.clone()),
            ("version", i.version.clone().unwrap_or("-".into())),
            ("provenance", i.provenance.clone().unwrap_or("-".into())),
            (
                "staged at",
                if i.sites.is_empty() {
                    "-".into()
                } else {
                    i.sites.join(", ")
                },
            ),
        ])
    };
    match cmd {
        ImageCmd::Import {
            file: None,
            name,
            arch,
            version,
            from_url,
            sha256,
        } => {
            let Some(url) = from_url else {
                bail!("give a file to import, or --from-url URL");
            };
            let i: Image = c
                .post(
                    "/images/import",
                    &ImageImportUrl {
                        name,
                        url,
                        sha256,
                        arch,
                        version,
                    },
                )
                .await?;
            emit(o, &i, show)
        }
        ImageCmd::Replicate { name, sites } => {
            let i: Image = c
                .post(
                    &format!("/images/{}/replicate", seg(&name)),
                    &ImageReplicate { sites },
                )
                .await?;
            emit(o, &i, |i| {
                println!("image {} is being staged at {}", i.name, i.sites.join(", "))
            })
        }
        ImageCmd::Transfers => {
            let t: ImageTransfers = c.get("/images/transfers").await?;
            emit(o, &t, |t| {
                fields(vec![("long link", format!("{} bytes", t.long_link_bytes))]);
                for (h, n) in &t.long_link_bytes_by_host {
                    println!("  {h}: {n} bytes");
                }
            })
        }
        ImageCmd::Import {
            file: Some(file),
            name,
            arch,
            version,
            ..
        } => {
            if !file.is_file() {
                bail!("{} is not a file", file.display());
            }
            let mut path = format!("/images?name={}", seg(&name));
            if let Some(a) = arch {
                path.push_str(&format!("&arch={}", seg(&a)));
            }
            if let Some(v) = version {
                path.push_str(&format!("&version={}", seg(&v)));
            }
            if o == Format::Table {
                eprintln!("uploading {} ...", file.display());
            }
            let i: Image = c.upload(&path, &file).await?;
            emit(o, &i, show)
        }
        ImageCmd::List => {
            let page: Page<Image> = c.get("/images").await?;
            emit(o, &page.items, |is| {
                table(
                    &["name", "sha256", "size", "arch"],
                    is.iter()
                        .map(|i| {
                            vec![
                                i.name.clone(),
                                i.sha256.chars().take(12).collect(),
                                format!("{:.1} MiB", i.size_bytes as f64 / 1048576.0),
                                i.arch.clone(),
                            ]
                        })
                        .collect(),
                )
            })
        }
        ImageCmd::Show { name } => {
            let i: Image = c.get(&format!("/images/{}", seg(&name))).await?;
            emit(o, &i, show)
        }
        ImageCmd::Delete { name } => {
            c.delete(&format!("/images/{}", seg(&name))).await?;
            done(o, &format!("image {name} deleted"))
        }
    }
}

/// SSH keys for a table: their comments (or types), or "-".
/// `vdc: image NAME (N GiB), vdd: blank N GiB` (the guest's names).
pub(crate) fn data_disk_summary(disks: &[virt8ra_api::DataDisk]) -> String {
    if disks.is_empty() {
        return "-".into();
    }
    disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            // vda is the boot disk, vdb the NoCloud seed.
            let dev = format!("vd{}", (b'c' + i as u8) as char);
            match (&d.image, d.size_gib) {
                (Some(img), Some(s)) => format!("{dev}: image {img} ({s} GiB)"),
                (Some(img), None) => format!("{dev}: image {img}"),
                (None, s) => format!("{dev}: blank {} GiB", s.unwrap_or(0)),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn ssh_key_summary(keys: &[String]) -> String {
    if keys.is_empty() {
        return "-".into();
    }
    keys.iter()
        .map(|k| {
            let mut p = k.splitn(3, ' ');
            let kind = p.next().unwrap_or_default();
            match p.nth(1).map(str::trim).filter(|c| !c.is_empty()) {
                Some(comment) => format!("{comment} ({kind})"),
                None => kind.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A network configuration on one line, e.g.
/// `first NIC: 10.0.2.15/24 via 10.0.2.2, dns 10.0.2.3; eth1: dhcp4`.
fn network_summary(n: Option<&NetworkConfig>) -> String {
    let Some(n) = n else {
        return "image default".into();
    };
    n.ethernets
        .iter()
        .map(|e| {
            let which = match &e.match_ {
                None => "first NIC".to_string(),
                Some(m) => [m.name.clone(), m.macaddress.clone()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(" "),
            };
            let mut what = Vec::new();
            if e.dhcp4 {
                what.push("dhcp4".to_string());
            }
            if !e.addresses.is_empty() {
                what.push(e.addresses.join(" "));
            }
            if let Some(g) = &e.gateway4 {
                what.push(format!("via {g}"));
            }
            if let Some(ns) = &e.nameservers {
                if !ns.addresses.is_empty() {
                    what.push(format!("dns {}", ns.addresses.join(" ")));
                }
                if !ns.search.is_empty() {
                    what.push(format!("search {}", ns.search.join(" ")));
                }
            }
            if let Some(m) = e.mtu {
                what.push(format!("mtu {m}"));
            }
            format!("{which}: {}", what.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn show_vm(v: &Vm) {
    let s = &v.status;
    fields(vec![
        ("name", v.name.clone()),
        ("id", v.id.clone()),
        ("phase", s.phase.as_str().into()),
        (
            "power (desired)",
            match v.power {
                PowerState::Running => "running".into(),
                PowerState::Stopped => "stopped".into(),
            },
        ),
        ("host", opt(&s.host)),
        ("site", opt(&s.site)),
        ("provider", opt(&s.provider)),
        ("country", opt(&s.country)),
        (
            "hypervisor",
            s.hypervisor
                .map(|h| h.as_str().to_string())
                .unwrap_or("-".into()),
        ),
        ("vcpus", v.spec.vcpus.to_string()),
        ("memory", format!("{} MiB", v.spec.memory_mib)),
        ("disk", format!("{} GiB", v.spec.disk_gib)),
        ("image", v.spec.image.clone()),
        ("data disks", data_disk_summary(&v.spec.data_disks)),
        ("ssh keys", ssh_key_summary(&v.spec.ssh_authorized_keys)),
        ("network", network_summary(v.spec.network.as_ref())),
        (
            "ports",
            if s.ports.is_empty() {
                "-".into()
            } else {
                s.ports
                    .iter()
                    .map(|p| format!("{} -> {}", p.host_addr, p.guest_port))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ),
        ("placement", opt(&s.placement_reason)),
        ("last error", opt(&s.last_error)),
        ("started", ago(&s.started_at)),
        ("created", v.created_at.to_rfc3339()),
    ])
}

async fn vm(c: &Client, o: Format, cmd: VmCmd) -> anyhow::Result<()> {
    match cmd {
        VmCmd::Create { name, spec, wait } => {
            let no_start = spec.no_start;
            let spec = build_spec(name, &spec)?;
            if spec.get("name").is_none() {
                bail!("give the VM a name (virt8ra vm create NAME ...)");
            }
            if spec.get("image").is_none() {
                bail!("name an image with --image (`virt8ra image list` shows what exists)");
            }
            let v: Vm = c.post("/vms", &spec).await?;
            let target = if no_start {
                VmPhase::Stopped
            } else {
                VmPhase::Running
            };
            let v = if wait.wait {
                wait_for(c, &v.id, &[target], &wait, o).await?
            } else {
                v
            };
            emit(o, &v, show_vm)
        }
        VmCmd::Plan { name, spec } => {
            let mut spec = build_spec(name, &spec)?;
            if let Some(obj) = spec.as_object_mut() {
                obj.entry("name").or_insert_with(|| "plan".into());
                obj.entry("image").or_insert_with(|| "none".into());
            }
            let p: PlacementPlan = c.post("/vms/plan", &spec).await?;
            emit(o, &p, |p| {
                if p.placed {
                    fields(vec![
                        ("host", opt(&p.host)),
                        ("site", opt(&p.site)),
                        ("provider", opt(&p.provider)),
                        ("country", opt(&p.country)),
                        (
                            "score",
                            p.score.map(|s| format!("{s:.2}")).unwrap_or_default(),
                        ),
                        ("why", p.reason.clone()),
                    ])
                } else {
                    println!("no host fits: {}", p.reason);
                }
            })
        }
        VmCmd::List {
            site,
            provider,
            country,
            phase,
            all,
        } => {
            let mut q = Vec::new();
            for (k, v) in [
                ("site", site),
                ("provider", provider),
                ("country", country),
                ("phase", phase),
            ] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", seg(&v)));
                }
            }
            if all {
                q.push("include_deleted=true".into());
            }
            let mut items: Vec<Vm> = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let mut qq = q.clone();
                if let Some(cur) = &cursor {
                    qq.push(format!("cursor={}", seg(cur)));
                }
                let path = if qq.is_empty() {
                    "/vms".into()
                } else {
                    format!("/vms?{}", qq.join("&"))
                };
                let page: Page<Vm> = c.get(&path).await?;
                items.extend(page.items);
                match page.next_cursor {
                    Some(n) => cursor = Some(n),
                    None => break,
                }
            }
            emit(o, &items, |vs| {
                table(
                    &[
                        "name", "phase", "host", "site", "provider", "country", "vcpus", "memory",
                    ],
                    vs.iter()
                        .map(|v| {
                            vec![
                                v.name.clone(),
                                v.status.phase.as_str().into(),
                                opt(&v.status.host),
                                opt(&v.status.site),
                                opt(&v.status.provider),
                                opt(&v.status.country),
                                v.spec.vcpus.to_string(),
                                format!("{} MiB", v.spec.memory_mib),
                            ]
                        })
                        .collect(),
                )
            })
        }
        VmCmd::Show { name } => {
            let v: Vm = c.get(&format!("/vms/{}", seg(&name))).await?;
            emit(o, &v, show_vm)
        }
        VmCmd::Start { name, wait } => {
            act(
                c,
                o,
                &name,
                VmAction::Start,
                None,
                &wait,
                &[VmPhase::Running],
            )
            .await
        }
        VmCmd::Stop {
            name,
            timeout,
            wait,
        } => {
            act(
                c,
                o,
                &name,
                VmAction::Stop,
                timeout,
                &wait,
                &[VmPhase::Stopped],
            )
            .await
        }
        VmCmd::Reboot { name } => {
            let wait = WaitOpts {
                wait: false,
                wait_timeout: 0,
            };
            act(c, o, &name, VmAction::Reboot, None, &wait, &[]).await
        }
        VmCmd::Delete { name, wait } => {
            let v: Option<serde_json::Value> = c.delete(&format!("/vms/{}", seg(&name))).await?;
            let id = v
                .as_ref()
                .and_then(|v| v["id"].as_str())
                .unwrap_or(&name)
                .to_string();
            if wait.wait {
                let v = wait_for(c, &id, &[VmPhase::Deleted], &wait, o).await?;
                return emit(o, &v, |_| println!("VM {name} deleted"));
            }
            emit(o, &v, |_| println!("VM {name} is being deleted"))
        }
        VmCmd::Console { name, bytes } => {
            let log: ConsoleLog = c
                .get(&format!("/vms/{}/console?bytes={bytes}", seg(&name)))
                .await?;
            emit(o, &log, |l| {
                if l.truncated {
                    eprintln!("[... earlier output cut; --bytes shows more]");
                }
                print!("{}", l.data);
                let _ = std::io::stdout().flush();
            })
        }
        VmCmd::Migrate { name, target, wait } => {
            migrate::migrate(c, o, &name, &target, wait.timeout()).await
        }
        VmCmd::Migrations { name } => {
            let ms: Vec<Migration> = c.get(&format!("/vms/{}/migrations", seg(&name))).await?;
            migrate::list_migrations(o, &ms)
        }
        VmCmd::Export { name, dir } => migrate::export(c, o, &name, &dir).await,
        VmCmd::Import { args, wait } => {
            let v = migrate::import(c, o, &args).await?;
            let target: &[VmPhase] = if args.no_start {
                &[VmPhase::Stopped]
            } else {
                &[VmPhase::Running]
            };
            let v = if wait.wait {
                wait_for(c, &v.id, target, &wait, o).await?
            } else {
                v
            };
            emit(o, &v, show_vm)
        }
        VmCmd::Events { name } => {
            let ev: Vec<VmEvent> = c.get(&format!("/vms/{}/events", seg(&name))).await?;
            emit(o, &ev, |ev| {
                table(
                    &["time", "phase", "event"],
                    ev.iter()
                        .map(|e| {
                            vec![
                                e.at.format("%Y-%m-%d %H:%M:%S").to_string(),
                                e.phase.as_str().into(),
                                e.message.clone(),
                            ]
                        })
                        .collect(),
                )
            })
        }
    }
}

/// The keys of `--ssh-key` arguments: each is an OpenSSH public key line
/// (it starts with a key type and a space), or else a file holding one key
/// per line (blank lines and `#` comments skipped). Each key is checked
/// here, so a bad one is reported with the argument or file and line that
/// gave it.
/// One `--data-disk` argument: `image=NAME`, `size_gib=N` or both,
/// comma-separated.
pub fn data_disk_arg(arg: &str) -> anyhow::Result<virt8ra_api::DataDisk> {
    let mut d = virt8ra_api::DataDisk {
        image: None,
        size_gib: None,
    };
    for part in arg.split(',') {
        match part.split_once('=') {
            Some(("image", v)) if !v.is_empty() && d.image.is_none() => d.image = Some(v.into()),
            Some(("size_gib", v)) if d.size_gib.is_none() => {
                let n: u64 = v.parse().map_err(|_| {
                    anyhow::anyhow!("--data-disk {arg}: size_gib {v:?} is not a whole number")
                })?;
                d.size_gib = Some(n);
            }
            _ => {
                bail!("--data-disk {arg}: expected image=NAME, size_gib=N or image=NAME,size_gib=N")
            }
        }
    }
    validate::data_disks(std::slice::from_ref(&d)).map_err(|e| {
        anyhow::anyhow!("--data-disk {arg}: {}", e.replace("data_disks[0]", "disk"))
    })?;
    Ok(d)
}

pub fn ssh_keys(args: &[String]) -> anyhow::Result<Vec<String>> {
    let mut keys = Vec::new();
    for a in args {
        let is_line = validate::SSH_KEY_TYPES
            .iter()
            .any(|t| a.strip_prefix(t).is_some_and(|r| r.starts_with(' ')));
        if is_line {
            let k = a.trim_end();
            validate::ssh_key(k).map_err(|e| anyhow::anyhow!("--ssh-key: {e}"))?;
            keys.push(k.to_string());
            continue;
        }
        let text = std::fs::read_to_string(a).map_err(|e| {
            anyhow::anyhow!(
                "--ssh-key {a}: not a public key line (e.g. \"ssh-ed25519 AAAA... user@host\"), and not a readable file: {e}"
            )
        })?;
        let before = keys.len();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            validate::ssh_key(line).map_err(|e| anyhow::anyhow!("--ssh-key {a}:{}: {e}", i + 1))?;
            keys.push(line.to_string());
        }
        if keys.len() == before {
            bail!("--ssh-key {a}: the file holds no public key");
        }
    }
    Ok(keys)
}

/// Merges a spec file and flags into a VmCreate body.
fn build_spec(name: Option<String>, a: &SpecArgs) -> anyhow::Result<serde_json::Value> {
    let mut spec: serde_json::Value = match &a.file {
        Some(f) => {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?;
            serde_yaml::from_str(&text)
                .with_context(|| format!("{} is not valid JSON or YAML", f.display()))?
        }
        None => serde_json::json!({}),
    };
    let Some(obj) = spec.as_object_mut() else {
        bail!("the spec must be a mapping of fields");
    };
    let mut set = |k: &str, v: serde_json::Value| {
        obj.insert(k.to_string(), v);
    };
    if let Some(v) = name {
        set("name", v.into());
    }
    if let Some(v) = &a.image {
        set("image", v.clone().into());
    }
    if let Some(v) = a.vcpus {
        set("vcpus", v.into());
    }
    if let Some(v) = a.memory_mib {
        set("memory_mib", v.into());
    }
    if let Some(v) = a.disk_gib {
        set("disk_gib", v.into());
    }
    if let Some(p) = &a.user_data {
        let ud = std::fs::read_to_string(p)
            .with_context(|| format!("read user data {}", p.display()))?;
        set("user_data", ud.into());
    }
    if !a.ports.is_empty() {
        set("ports", serde_json::json!(a.ports));
    }
    if !a.ssh_keys.is_empty() {
        set(
            "ssh_authorized_keys",
            serde_json::json!(ssh_keys(&a.ssh_keys)?),
        );
    }
    if !a.data_disks.is_empty() {
        let disks = a
            .data_disks
            .iter()
            .map(|d| data_disk_arg(d))
            .collect::<anyhow::Result<Vec<_>>>()?;
        set("data_disks", serde_json::json!(disks));
    }
    if a.no_start {
        set("start", false.into());
    }
    let mut pins = obj
        .get("placement")
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}));
    for (k, v) in [
        ("site", &a.site),
        ("provider", &a.provider),
        ("country", &a.country),
    ] {
        if let (Some(v), Some(m)) = (v, pins.as_object_mut()) {
            m.insert(k.into(), v.clone().into());
        }
    }
    obj.insert("placement".into(), pins);
    Ok(spec)
}

async fn act(
    c: &Client,
    o: Format,
    name: &str,
    action: VmAction,
    timeout_s: Option<u32>,
    wait: &WaitOpts,
    target: &[VmPhase],
) -> anyhow::Result<()> {
    let v: Vm = c
        .post(
            &format!("/vms/{}/actions", seg(name)),
            &VmActionRequest { action, timeout_s },
        )
        .await?;
    let v = if wait.wait && !target.is_empty() {
        wait_for(c, &v.id, target, wait, o).await?
    } else {
        v
    };
    emit(o, &v, show_vm)
}

/// Polls the VM until it reaches one of `target`, showing progress on stderr.
async fn wait_for(
    c: &Client,
    id: &str,
    target: &[VmPhase],
    w: &WaitOpts,
    o: Format,
) -> anyhow::Result<Vm> {
    let start = Instant::now();
    let spinner = ['|', '/', '-', '\\'];
    let tty = o == Format::Table;
    let mut last_phase = None;
    let mut i = 0usize;
    loop {
        let v: Vm = c.get(&format!("/vms/{}", seg(id))).await?;
        let phase = v.status.phase;
        if tty && last_phase != Some(phase) {
            if last_phase.is_some() {
                eprintln!();
            }
            last_phase = Some(phase);
        }
        if tty {
            eprint!(
                "\r{} {}: {} ({}s){}",
                spinner[i % 4],
                v.name,
                phase.as_str(),
                start.elapsed().as_secs(),
                v.status
                    .host
                    .as_ref()
                    .map(|h| format!(" on {h}"))
                    .unwrap_or_default()
            );
            let _ = std::io::stderr().flush();
        }
        i += 1;
        if target.contains(&phase) {
            if tty {
                eprintln!();
            }
            return Ok(v);
        }
        if phase == VmPhase::Failed {
            if tty {
                eprintln!();
            }
            bail!(
                "VM {} failed: {}",
                v.name,
                v.status
                    .last_error
                    .unwrap_or_else(|| "no reason given".into())
            );
        }
        if start.elapsed() > Duration::from_secs(w.wait_timeout) {
            if tty {
                eprintln!();
            }
            let why = v
                .status
                .placement_reason
                .filter(|_| phase == VmPhase::Pending)
                .map(|r| format!(": {r}"))
                .unwrap_or_default();
            bail!(
                "gave up after {} s: VM {} is still {}{why}",
                w.wait_timeout,
                v.name,
                phase.as_str()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOiakisE7iP/Y3q4YCqhXcGDKYvynw8ekG2NX341waDN alice@example";

    #[test]
    fn ssh_key_arguments_are_lines_or_files() {
        let d = tempfile::tempdir().expect("dir");
        let pubf = d.path().join("id.pub");
        std::fs::write(&pubf, format!("{KEY}\n")).expect("write");
        let many = d.path().join("authorized_keys");
        let rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC6v8INylJkQCEx/FyBWvtTkbuC6DlOxFjwTZMrrIJ17xGGOVtfO/ldQlTopQERpWu4mPhwUFPYsFOorS+uaiXSQAeW5ZhGBF50qQ9qZ9gRuMR7CR6ISOXyo7kZAkXSYdSVMh6MwuFoaan6GPZFuMBFzq4I0rBOy1nE0ZyMLCw51w==";
        std::fs::write(&many, format!("# team\n\n{rsa}\n{KEY}\n")).expect("write");
        let args = [
            pubf.display().to_string(),
            format!("{KEY}\n"),
            many.display().to_string(),
        ];
        assert_eq!(ssh_keys(&args).expect("keys"), vec![KEY, KEY, rsa, KEY]);

        let e = ssh_keys(&["/nonexistent/id.pub".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--ssh-key /nonexistent/id.pub: not a public key line"),
            "{e}"
        );
        let e = ssh_keys(&["ssh-ed25519 AAAA".into()])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--ssh-key: \"ssh-ed25519 AAAA\""), "{e}");
        std::fs::write(&many, format!("{KEY}\nssh-ed25519 AAAA x\n")).expect("write");
        let e = ssh_keys(&[many.display().to_string()])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("--ssh-key {}:2: ", many.display())),
            "{e}"
        );
        let empty = d.path().join("empty.pub");
        std::fs::write(&empty, "# nothing\n").expect("write");
        let e = ssh_keys(&[empty.display().to_string()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds no public key"), "{e}");
    }
}
