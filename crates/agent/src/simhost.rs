//! Many simulated hosts in one process, for scale benchmarks.
//!
//! Each simulated host is a complete agent — join, its own persistent
//! channel to the control plane, reconciler, local desired state — with the
//! simulated driver ([`crate::driver::sim`]). Only the process is shared.

use std::path::Path;
use std::sync::Arc;

use virt8ra_api::{AgentJoin, HostInventory, Hypervisor};

use crate::driver::sim::{SimDriver, SimTimings};
use crate::{channel, images, reconciler};

pub struct SimHost {
    pub name: String,
    pub host_id: String,
    pub driver: Arc<SimDriver>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Joins one simulated host and starts its agent on the current runtime.
pub async fn start(
    server: &str,
    join_token: &str,
    name: &str,
    data_dir: &Path,
    vcpus: u32,
    memory_mib: u64,
) -> anyhow::Result<SimHost> {
    std::fs::create_dir_all(data_dir)?;
    let inventory = HostInventory {
        hostname: name.to_string(),
        arch: "x86_64".into(),
        vcpus,
        memory_mib,
        disk_gib: 2000,
        cpu_model: "simulated".into(),
        cpu_flags: vec![],
        accelerators: vec![],
        hypervisor: Hypervisor::Emulation,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        qemu_version: "simulated".into(),
        machine_types: vec![],
        migration_address: None,
        migration_relay: false,
        protocol: 0,
        image_service: None,
    };
    let joined = crate::join(
        server,
        join_token,
        &AgentJoin {
            name: name.to_string(),
            inventory: inventory.clone(),
        },
    )
    .await?;
    let driver = Arc::new(SimDriver::new(
        data_dir.join("vms"),
        memory_mib,
        SimTimings::default(),
    ));
    let images = Arc::new(images::ImageCache::new(
        data_dir.join("images"),
        server,
        &joined.host_token,
    )?);
    let (reports, changes) = reconciler::Reports::new();
    // Simulated guests never die on their own: re-check them rarely, so that
    // thousands of simulated hosts leave the CPU to the control plane.
    let rec = reconciler::Reconciler::new(data_dir, driver.clone(), images, reports.clone())?
        .with_recheck(std::time::Duration::from_secs(60));
    let ch = channel::Channel {
        mover: None,
        server: server.to_string(),
        host_token: joined.host_token,
        inventory,
        data_dir: data_dir.to_path_buf(),
        driver: driver.clone(),
        reconciler: rec,
        reports,
    };
    let task = tokio::spawn(ch.run(changes));
    Ok(SimHost {
        name: name.to_string(),
        host_id: joined.host_id,
        driver,
        task,
    })
}
