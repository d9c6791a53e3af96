//! `virt8ra`: one binary for the control plane (`server`), the host agent
//! (`agent`) and the client (every other verb).

use clap::{Parser, Subcommand};

mod scale;

/// The version `--version` prints; a test build says that it can be made
/// to fail on purpose (the end-to-end tests that inject failures check it).
const VERSION: &str = if virt8ra_failpoint::ENABLED {
    concat!(
        env!("CARGO_PKG_VERSION"),
        " (fail points compiled in: a test build)"
    )
} else {
    env!("CARGO_PKG_VERSION")
};

#[derive(Parser)]
#[command(
    name = "virt8ra",
    version = VERSION,
    about = "Sovereign multi-provider cloud-edge control plane"
)]
struct Cli {
    #[command(flatten)]
    global: virt8ra_cli::GlobalOpts,
    #[command(subcommand)]
    cmd: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Run the control plane.
    Server(virt8ra_server::ServerArgs),
    /// Run the host agent.
    Agent(virt8ra_agent::AgentArgs),
    /// Print the OpenAPI document of the control plane's API.
    Openapi,
    /// Benchmarks.
    #[command(subcommand)]
    Bench(Bench),
    #[command(flatten)]
    Client(virt8ra_cli::Command),
}

#[derive(Subcommand)]
enum Bench {
    /// The placement engine on a generated EU topology (11 providers, 7
    /// countries), mixed load, packing policy; compared with first-fit
    /// decreasing.
    Placement {
        #[arg(long, default_value_t = 10_000)]
        hosts: usize,
        #[arg(long, default_value_t = 100_000)]
        placements: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// The control plane under load: simulated hosts in this process, each
    /// with its own channel, and VMs created through the API.
    Scale {
        #[arg(long, default_value_t = 100)]
        hosts: usize,
        #[arg(long, default_value_t = 1000)]
        vms: usize,
        #[command(flatten)]
        load: scale::LoadArgs,
    },
}

async fn bench(b: Bench, o: virt8ra_cli::output::Format) -> anyhow::Result<()> {
    match b {
        Bench::Scale { hosts, vms, load } => {
            if hosts == 0 {
                anyhow::bail!("--hosts must be at least 1");
            }
            load.check()?;
            // Progress goes to stderr in every format; stdout holds the report.
            let r = scale::run(hosts, vms, &load, true).await?;
            virt8ra_cli::output::emit(o, &r, |r| {
                virt8ra_cli::output::fields(vec![
                    (
                        "hosts connected",
                        format!("{} of {}", r.hosts_connected, r.hosts),
                    ),
                    (
                        "missed heartbeats",
                        format!("{:.3}%", r.missed_heartbeat_ratio * 100.0),
                    ),
                    ("VMs running", format!("{} of {}", r.vms_running, r.vms)),
                    ("create → running", format!("{:.0} VMs/s", r.create_per_s)),
                    ("create call p99", format!("{:.1} ms", r.create_p99_ms)),
                    (
                        "CPU per VM created",
                        format!(
                            "control plane {:.3} ms, simulated hosts + load {:.3} ms (load average {:.1})",
                            r.server_cpu_ms_per_vm, r.bench_cpu_ms_per_vm, r.create_load_1m
                        ),
                    ),
                    ("GET one VM p99", format!("{:.1} ms", r.get_p99_ms)),
                    (
                        "list page (1000) p99",
                        format!(
                            "{:.1} ms over {} pages (then parsing one: p99 {:.1} ms)",
                            r.list_page_p99_ms, r.list_pages, r.list_page_parse_p99_ms
                        ),
                    ),
                    (
                        "lifecycle ops (stop/start/delete)",
                        format!(
                            "{} at {:.0}/s; p99 stop {:.1} ms, start {:.1} ms, delete {:.1} ms",
                            r.ops, r.ops_per_s, r.stop_p99_ms, r.start_p99_ms, r.delete_p99_ms
                        ),
                    ),
                    (
                        "migrations (cold, simulated hosts)",
                        format!(
                            "{} of {} completed ({} failed); p50 {:.0} ms, p99 {:.0} ms to complete; {} mismatches",
                            r.migrations_completed,
                            r.migrations,
                            r.migrations_failed,
                            r.migration_p50_ms,
                            r.migration_p99_ms,
                            r.migration_mismatches
                        ),
                    ),
                    (
                        "list page under load p99",
                        format!("{:.1} ms", r.list_page_under_load_p99_ms),
                    ),
                    (
                        "server RSS",
                        format!(
                            "{:.1} MiB at the end, {:.1} MiB after the creates, {:.1} MiB at most",
                            r.server_rss_bytes as f64 / 1048576.0,
                            r.server_rss_after_create_bytes as f64 / 1048576.0,
                            r.server_peak_rss_bytes as f64 / 1048576.0
                        ),
                    ),
                    (
                        "simulated hosts' process RSS",
                        format!("{:.1} MiB", r.bench_rss_bytes as f64 / 1048576.0),
                    ),
                    (
                        "database",
                        format!(
                            "{:.1} MiB (WAL {:.1} MiB)",
                            r.db_bytes as f64 / 1048576.0,
                            r.wal_bytes as f64 / 1048576.0
                        ),
                    ),
                    (
                        "restart to serving",
                        format!("{:.0} ms", r.restart_to_serving_ms),
                    ),
                    (
                        "mismatches",
                        format!("{} of {} sampled", r.mismatches, r.sampled),
                    ),
                ])
            })
        }
        Bench::Placement {
            hosts,
            placements,
            seed,
        } => {
            if hosts == 0 || placements == 0 {
                anyhow::bail!("--hosts and --placements must be at least 1");
            }
            let r = virt8ra_placement::bench::run_bench(hosts, placements, seed);
            virt8ra_cli::output::emit(o, &r, |r| {
                virt8ra_cli::output::fields(vec![
                    ("hosts", format!("{} in {} sites", r.hosts, r.sites)),
                    (
                        "placements",
                        format!("{} ({} placed)", r.placements, r.placed),
                    ),
                    ("placements/s", format!("{:.0}", r.placements_per_s)),
                    ("p50", format!("{:.1} µs", r.p50_us)),
                    ("p99", format!("{:.1} µs", r.p99_us)),
                    ("hosts used (pack)", r.hosts_used.to_string()),
                    ("hosts used (FFD)", r.ffd_hosts_used.to_string()),
                    ("index bytes/host", r.index_bytes_per_host.to_string()),
                ])
            })
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VIRT8RA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// `vm export VM -o DIR` names a directory, while `-o` everywhere else is
/// the output format: a value that is not a format becomes `--dir`.
fn export_dir_alias(mut args: Vec<String>) -> Vec<String> {
    let is_export = args.windows(2).any(|w| w[0] == "vm" && w[1] == "export");
    if is_export {
        for i in 0..args.len().saturating_sub(1) {
            if (args[i] == "-o" || args[i] == "--output")
                && !["table", "json", "yaml"].contains(&args[i + 1].as_str())
            {
                args[i] = "--dir".into();
            }
        }
    }
    args
}

/// mimalloc instead of the C library's allocator: the control plane keeps
/// millions of small objects (VMs, ids, index entries) and serves them from
/// many threads; glibc's allocator spent a tenth of the control plane's CPU
/// in `malloc_consolidate` under load and fragmented its memory.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse_from(export_dir_alias(std::env::args().collect()));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(async move {
        match cli.cmd {
            Top::Server(mut a) => {
                init_logging();
                virt8ra_failpoint::announce();
                a.ca_cert = virt8ra_cli::ca_cert(&cli.global);
                virt8ra_server::run(a).await
            }
            Top::Agent(mut a) => {
                init_logging();
                virt8ra_failpoint::announce();
                a.ca_cert = virt8ra_cli::ca_cert(&cli.global);
                virt8ra_agent::run(a).await
            }
            Top::Openapi => {
                println!("{}", virt8ra_server::api::openapi::document());
                Ok(())
            }
            Top::Bench(b) => bench(b, cli.global.output).await,
            Top::Client(c) => virt8ra_cli::run(cli.global, c).await,
        }
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
