//! The virt8ra client CLI: every verb of `virt8ra` except `server` and `agent`.
//!
//! The control plane's URL and token come from `--url`/`--token`, then
//! `VIRT8RA_URL`/`VIRT8RA_TOKEN`, then `~/.config/virt8ra/config.yaml`
//! (`url:` and `token:`). An https control plane must present a certificate
//! signed by a public CA or by the CA given with `--ca-cert`,
//! `VIRT8RA_CA_CERT` or `ca_cert:` in that file. Errors are one line on
//! stderr and a non-zero exit.
//!
//! This file holds the top of the command tree and the dispatch; each noun
//! is its own module (its clap subcommand and its handler), so a new verb
//! touches one file. Shared pieces: `client` (HTTP), `config` (where the
//! control plane is), `output` (tables, JSON, YAML) and `progress`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand};
use virt8ra_api::*;

pub mod admin_token;
pub mod app;
pub mod apply;
pub mod audit;
pub mod client;
pub mod config;
pub mod host;
pub mod image;
pub mod migrate;
pub mod network;
pub mod output;
pub mod progress;
pub mod provider;
pub mod site;
pub mod tenancy;
pub mod vm;

pub use config::ca_cert;
use config::connect;
use output::Format;

use admin_token::{admin_token, AdminTokenCmd};
use host::{host, HostCmd};
use image::{image, ImageCmd};
use migrate::{migration, MigrationCmd};
use network::{network, NetworkCmd};
use provider::{provider, ProviderCmd};
use site::{site, SiteCmd};
use vm::{vm, VmCmd};

#[derive(Debug, Clone, Args)]
pub struct GlobalOpts {
    /// Control plane URL [env: VIRT8RA_URL; default http://127.0.0.1:8480]
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// API token [env: VIRT8RA_TOKEN]
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// The project of tenant commands: lists show its resources, creates
    /// belong to it (a project token's is its own) [env: VIRT8RA_PROJECT]
    #[arg(long, global = true)]
    pub project: Option<String>,
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
    /// Virtual networks: private subnets across hosts, sites and providers.
    #[command(subcommand)]
    Network(NetworkCmd),
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
    /// Bring providers, sites, images, networks, VMs and apps to the state a YAML file declares.
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
    /// The audit log: every changing call, who made it and how it ended.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// Showback: each VM's vCPU-, memory- and disk-hours in a month, what
    /// they cost at the sites' prices and the carbon they emitted.
    Usage {
        /// YYYY-MM (default: this month, up to now).
        #[arg(long)]
        month: Option<String>,
    },
    /// Organisations: they hold projects.
    #[command(subcommand)]
    Org(tenancy::OrgCmd),
    /// Projects: the tenants that own VMs, apps, images and networks.
    #[command(subcommand)]
    Project(tenancy::ProjectCmd),
    /// Users: people who hold API tokens.
    #[command(subcommand)]
    User(tenancy::UserCmd),
    /// API tokens of users, scoped to a project, a provider or the platform.
    #[command(subcommand)]
    Token(tenancy::TokenCmd),
    /// Who the token in use is: its user, scope and role.
    Whoami,
    /// Projects' quotas and their use.
    #[command(subcommand)]
    Quota(tenancy::QuotaCmd),
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
        Command::Network(n) => network(&c, o, n).await,
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
        Command::Audit(a) => audit::audit(&c, o, a).await,
        Command::Usage { month } => audit::usage(&c, o, month.as_deref()).await,
        Command::Org(x) => tenancy::org(&c, o, x).await,
        Command::Project(x) => tenancy::project(&c, o, x).await,
        Command::User(x) => tenancy::user(&c, o, x).await,
        Command::Token(x) => tenancy::token(&c, o, x).await,
        Command::Whoami => tenancy::whoami(&c, o).await,
        Command::Quota(x) => tenancy::quota(&c, o, x).await,
    }
}
