//! `virt8ra bench scale`: the control plane under many hosts and VMs.
//!
//! Starts a control plane (this binary, `server`, as a child process on a
//! temporary data directory, so its memory can be measured on its own),
//! creates the example EU topology grown to the requested size, joins that
//! many simulated hosts from this process (each a full agent with its own
//! WebSocket channel; the simulated driver keeps VMs in memory), then drives
//! load through the public API and measures. At the end a sample of VMs is
//! compared between the control plane's view and the agents'.
//!
//! [`run_on`] is the order of the phases; each lives in a module of its own
//! that says what it measures:
//!
//! 1. [`control_plane::connect`]: the control plane answers.
//! 2. [`topology::register`], [`topology::join`]: sites, then hosts.
//! 3. [`creates`]: the image, then every VM created until all run.
//! 4. [`reads`]: single VMs and list pages, one call at a time.
//! 5. [`lifecycle`] (with [`migrations`] inside it): stops, starts,
//!    migrations and deletes, with list pages read meanwhile.
//! 6. [`verify`]: deletes applied, heartbeats, a sample compared.
//! 7. [`control_plane::footprint`], [`control_plane::restart`]: memory and
//!    database at the end, then the time a restart takes to serve.
//!
//! The load generator's HTTP client is [`http`]; the run's directories and
//! its interruption are [`scratch`]; the figures are computed in [`report`].

use control_plane::Server;
use scratch::Scratch;

mod api;
mod args;
mod control_plane;
mod creates;
mod http;
mod lifecycle;
mod measure;
mod migrations;
mod reads;
mod report;
mod scratch;
mod topology;
mod verify;

pub use args::LoadArgs;
pub use report::ScaleReport;

/// Progress lines on stderr, when asked for.
#[derive(Clone, Copy)]
struct Progress(bool);

impl Progress {
    fn say(self, m: impl std::fmt::Display) {
        if self.0 {
            eprintln!("bench scale: {m}");
        }
    }
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
    let mut scratch = Scratch::new()?;
    scratch.database = load.database.clone();
    let mut server = control_plane::start(&scratch)?;
    let out = tokio::select! {
        r = run_on(&scratch, &mut server, hosts, vms, load, Progress(progress)) => r,
        signal = scratch::interrupted() => Err(anyhow::anyhow!("interrupted ({signal}); stopped the control plane and removed the scratch directories")),
    };
    // The control plane first: without it the simulated hosts have nothing
    // to act on and stop writing to their directories.
    drop(server);
    drop(scratch);
    out
}

/// The phases in their order, on a started control plane.
async fn run_on(
    scratch: &Scratch,
    server: &mut Server,
    hosts: usize,
    vms: usize,
    load: &LoadArgs,
    p: Progress,
) -> anyhow::Result<ScaleReport> {
    let api = control_plane::connect(scratch, p).await?;
    let topo = topology::register(&api, hosts, p).await?;
    let url = control_plane::url(scratch.port);
    let fleet = topology::join(
        &api,
        &topo,
        &url,
        scratch.agents(),
        load.hosts_per_connection,
        p,
    )
    .await?;
    creates::upload_image(&api, scratch.dir()).await?;
    let created = creates::run(&api, &fleet, server.pid(), vms, load, p).await?;
    let reads = reads::run(&api, vms).await?;
    let running = created.vms_running;
    let lifecycle = lifecycle::run(&api, &fleet, &topo, vms, running, load, p).await?;
    let left = running.saturating_sub(lifecycle.deleted.len());
    let delete_mismatches = verify::deletes(&api, &fleet, left, &lifecycle.deleted).await?;
    let heartbeats = verify::heartbeats(&api, hosts).await?;
    let (sampled, mismatches) = verify::sample(&api, &fleet, vms).await?;
    let footprint = control_plane::footprint(server, scratch);
    let restart_to_serving_ms = control_plane::restart(server, scratch).await?;
    fleet.stop();
    Ok(ScaleReport::new(report::Phases {
        hosts,
        vms,
        agent_connections: fleet.connections(hosts),
        created,
        reads,
        lifecycle,
        delete_mismatches,
        heartbeats,
        sampled,
        mismatches,
        footprint,
        bench_rss_bytes: measure::rss_bytes(std::process::id()),
        restart_to_serving_ms,
    }))
}
