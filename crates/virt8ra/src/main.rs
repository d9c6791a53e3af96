//! `virt8ra`: one binary for the control plane (`server`), the host agent
//! (`agent`) and the client (every other verb).

use clap::{Parser, Subcommand};

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

/// How the long-running commands write their log (to stderr).
#[derive(clap::Args)]
struct LogOpts {
    /// `text` for people, `json` for log collectors: one JSON object per
    /// line with the level, the time, the message and each field (vm,
    /// host, migration, ...) as a key of its own.
    #[arg(long, value_enum, default_value = "text", env = "VIRT8RA_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Top {
    /// Run the control plane.
    Server {
        #[command(flatten)]
        log: LogOpts,
        #[command(flatten)]
        args: virt8ra_server::ServerArgs,
    },
    /// Run the host agent.
    Agent {
        #[command(flatten)]
        log: LogOpts,
        #[command(flatten)]
        args: virt8ra_agent::AgentArgs,
    },
    /// Apply a host network state (JSON, `virt8ra_api::HostNetworkState`)
    /// to this host's network namespace once, print what changed, and keep
    /// it in the data directory for the agent to apply at start: the
    /// agent's network data plane without a control plane, for tests and
    /// for repairs by hand.
    #[command(name = "agent-network-apply", hide = true)]
    AgentNetworkApply {
        /// The desired state, a JSON file.
        #[arg(long)]
        desired: std::path::PathBuf,
        /// The agent's data directory (DHCP servers keep their files there).
        #[arg(long, default_value = "/var/lib/virt8ra/agent")]
        data_dir: std::path::PathBuf,
        /// Stay until SIGTERM or SIGINT, as the agent would: a tunnel in
        /// the state lives only while its process does. At the end, print
        /// the tunnel's counters as one JSON object on stdout.
        #[arg(long)]
        hold: bool,
    },
    /// Print the OpenAPI document of the control plane's API.
    Openapi,
    /// Benchmarks.
    #[command(subcommand)]
    Bench(virt8ra_bench::Bench),
    /// Userspace WireGuard tunnel, for tests and benchmarks (the agent
    /// will run it as a task).
    #[command(subcommand, hide = true)]
    Tunnel(virt8ra_tunnel::cmd::TunnelCmd),
    /// Print a shell completion script: `virt8ra completions bash >
    /// /etc/bash_completion.d/virt8ra` (the Debian package installs it).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    #[command(flatten)]
    Client(virt8ra_cli::Command),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VIRT8RA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt.init(),
        // Fields at the top level next to `message`, and the fields of
        // the spans the event is in (a request's, a migration's) too.
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .init(),
    }
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
            Top::Server { log, args: mut a } => {
                init_logging(log.log_format);
                virt8ra_failpoint::announce();
                a.ca_cert = virt8ra_cli::ca_cert(&cli.global);
                virt8ra_server::run(a).await
            }
            Top::Agent { log, args: mut a } => {
                init_logging(log.log_format);
                virt8ra_failpoint::announce();
                a.ca_cert = virt8ra_cli::ca_cert(&cli.global);
                virt8ra_agent::run(a).await
            }
            Top::AgentNetworkApply {
                desired,
                data_dir,
                hold,
            } => {
                let state = virt8ra_agent::network::read_state(&desired)?;
                let changes = virt8ra_agent::network::reconcile(&state, &data_dir)?;
                // Kept like a state from the control plane (same
                // generation: the next one from it replaces it), so the
                // agent applies it again when it starts.
                let generation = virt8ra_agent::network::load(&data_dir)?
                    .map(|s| s.generation)
                    .unwrap_or(0);
                let stored = virt8ra_agent::network::Stored { generation, state };
                virt8ra_agent::network::store(&data_dir, &stored)?;
                for c in &changes.0 {
                    println!("{c}");
                }
                eprintln!("{} change(s)", changes.0.len());
                if hold {
                    virt8ra_tunnel::cmd::wait_for_signal().await;
                    if let Some(stats) = virt8ra_agent::network::tunnel::stats() {
                        println!("{}", serde_json::to_string(&stats)?);
                    }
                }
                Ok(())
            }
            Top::Openapi => {
                println!("{}", virt8ra_server::http::openapi::document());
                Ok(())
            }
            Top::Bench(b) => virt8ra_bench::run(b, cli.global.output).await,
            Top::Tunnel(t) => {
                init_logging(LogFormat::Text);
                virt8ra_tunnel::cmd::run(t).await.map_err(Into::into)
            }
            Top::Completions { shell } => {
                use clap::CommandFactory;
                use std::io::Write;
                // Into memory first: clap_complete panics on a write error
                // (a closed pipe), which this way is an error instead.
                let mut script = Vec::new();
                clap_complete::generate(shell, &mut Cli::command(), "virt8ra", &mut script);
                std::io::stdout().write_all(&script)?;
                Ok(())
            }
            Top::Client(c) => virt8ra_cli::run(cli.global, c).await,
        }
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
