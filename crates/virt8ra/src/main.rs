//! `virt8ra`: one binary for the control plane (`server`), the host agent
//! (`agent`) and the client (every other verb).

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "virt8ra",
    version,
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
    #[command(flatten)]
    Client(virt8ra_cli::Command),
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VIRT8RA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() {
    let cli = Cli::parse();
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
            Top::Server(a) => {
                init_logging();
                virt8ra_server::run(a).await
            }
            Top::Agent(a) => {
                init_logging();
                virt8ra_agent::run(a).await
            }
            Top::Openapi => {
                println!("{}", virt8ra_server::api::openapi::document());
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
