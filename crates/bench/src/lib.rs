//! The benchmarks behind `virt8ra bench`, in a crate of their own so that
//! the binary only wires the command line and the control plane, agent and
//! client crates carry none of the load generator's code.
//!
//! - `bench scale` ([`scale`]): the control plane under many simulated hosts
//!   and VMs, driven through its public API.
//! - `bench placement`: the placement engine alone, on a generated topology
//!   (`virt8ra_placement::bench`, pure and next to the engine it measures).

use clap::Subcommand;

pub mod scale;

/// `virt8ra bench`'s commands.
#[derive(Subcommand)]
pub enum Bench {
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

/// Runs one benchmark and prints its report in the output format `o`
/// (progress of `bench scale` goes to stderr).
pub async fn run(b: Bench, o: virt8ra_cli::output::Format) -> anyhow::Result<()> {
    match b {
        Bench::Scale { hosts, vms, load } => {
            if hosts == 0 {
                anyhow::bail!("--hosts must be at least 1");
            }
            load.check()?;
            // Progress goes to stderr in every format; stdout holds the report.
            let r = scale::run(hosts, vms, &load, true).await?;
            virt8ra_cli::output::emit(o, &r, |r| virt8ra_cli::output::fields(r.table()))
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
