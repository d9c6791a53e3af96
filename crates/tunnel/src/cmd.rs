//! The hidden `virt8ra tunnel` subcommand: runs one tunnel in the
//! foreground for tests and benchmarks (the agent will run it as a task
//! through the library API instead), and makes keys.
//!
//! `run` logs "tunnel up" when the data path runs, and on SIGTERM or
//! SIGINT stops, removes the interface and prints its stats as one JSON
//! object on stdout, which the tests read.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::{keys, Config, Tunnel};

/// Userspace WireGuard tunnel (for tests and benchmarks).
#[derive(Debug, Subcommand)]
pub enum TunnelCmd {
    /// Run a tunnel in the foreground until SIGTERM/SIGINT.
    Run(RunArgs),
    /// Create a private key file (mode 0600) and print its public key.
    Genkey {
        /// The key file to create; an existing file is not overwritten.
        file: PathBuf,
    },
    /// Print the public key of a private key file.
    Pubkey { file: PathBuf },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The configuration file (YAML; see the crate's config module).
    #[arg(long)]
    pub config: PathBuf,
}

/// Runs the subcommand.
pub async fn run(cmd: TunnelCmd) -> Result<(), crate::Error> {
    match cmd {
        TunnelCmd::Genkey { file } => {
            println!("{}", keys::encode_public(&keys::generate(&file)?));
            Ok(())
        }
        TunnelCmd::Pubkey { file } => {
            let secret = keys::read_private(&file)?;
            println!("{}", keys::encode_public(&keys::PublicKey::from(&secret)));
            Ok(())
        }
        TunnelCmd::Run(a) => {
            let config = Config::from_file(&a.config)?;
            let handle = Tunnel::start(config)?;
            wait_for_signal().await;
            let stats = handle.stats();
            handle.stop();
            match serde_json::to_string(&stats) {
                Ok(s) => println!("{s}"),
                Err(e) => eprintln!("stats: {e}"),
            }
            Ok(())
        }
    }
}

/// Returns at SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
