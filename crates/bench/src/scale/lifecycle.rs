//! The lifecycle phase, once every VM runs: some VMs stopped, started
//! again, some migrated (see [`super::migrations`]) and half of the stopped
//! ones deleted, while filtered list pages are read at a fixed rate. It
//! measures each operation's call latency, the operations' rate (the
//! migrations' time left out) and the list pages' latency under that load.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::api::Api;
use super::args::LoadArgs;
use super::measure::drive;
use super::migrations::{self, Migrations};
use super::reads::Lister;
use super::topology::{Fleet, Topology};
use super::Progress;

/// What the lifecycle phase measured.
pub struct Lifecycle {
    /// Each call's latency, in milliseconds.
    pub stop_ms: Vec<f64>,
    pub start_ms: Vec<f64>,
    pub delete_ms: Vec<f64>,
    /// Stops, starts and deletes per second, migrations' time left out.
    pub ops_per_s: f64,
    /// The VMs deleted.
    pub deleted: Vec<String>,
    pub migrations: Migrations,
    /// The latency of each list page read meanwhile.
    pub list_ms: Vec<f64>,
}

impl Lifecycle {
    /// Stops, starts and deletes made.
    pub fn ops(&self) -> usize {
        self.stop_ms.len() + self.start_ms.len() + self.delete_ms.len()
    }
}

/// Stops and starts `load.ops` VMs, migrates some, then deletes every
/// other one of those stopped; `vms_running` is how many ran before.
pub async fn run(
    api: &Arc<Api>,
    fleet: &Fleet,
    topo: &Topology,
    vms: usize,
    vms_running: usize,
    load: &LoadArgs,
    p: Progress,
) -> anyhow::Result<Lifecycle> {
    let picked = Arc::new(pick(vms, load.ops));
    let lister = Lister::start(
        api.clone(),
        load.list_rate,
        topo.sites.clone(),
        topo.countries.clone(),
    );
    let t_ops = Instant::now();
    let stop_ms = act(api, &picked, "stop", load).await?;
    let want = vms_running.saturating_sub(picked.len());
    let deadline = Instant::now() + Duration::from_secs(300);
    while fleet.running() > want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let start_ms = act(api, &picked, "start", load).await?;
    let deleted: Vec<String> = picked.iter().step_by(2).cloned().collect();
    let migrations = migrations::run(api, fleet, vms, &deleted, load, p).await?;
    let delete_ms = {
        let (api, deleted) = (api.clone(), Arc::new(deleted.clone()));
        drive(deleted.len(), load.concurrency, load.ops_rate, move |i| {
            let (api, name) = (api.clone(), deleted[i].clone());
            async move {
                api.call_unread("DELETE", &format!("/vms/{name}"), None)
                    .await
            }
        })
        .await?
    };
    let ops_secs = t_ops.elapsed().as_secs_f64() - migrations.secs;
    let list_ms = lister.finish().await;
    let mut out = Lifecycle {
        stop_ms,
        start_ms,
        delete_ms,
        ops_per_s: 0.0,
        deleted,
        migrations,
        list_ms,
    };
    out.ops_per_s = out.ops() as f64 / ops_secs.max(1e-9);
    Ok(out)
}

/// Up to `ops` distinct VMs spread over the ids, sorted.
fn pick(vms: usize, ops: usize) -> Vec<String> {
    let mut picked: Vec<String> = (0..ops.min(vms))
        .map(|i| format!("v{}", (i * 7919 + 13) % vms.max(1)))
        .collect();
    picked.sort();
    picked.dedup();
    picked
}

/// Calls the action `verb` on each of `picked`; each call's latency.
async fn act(
    api: &Arc<Api>,
    picked: &Arc<Vec<String>>,
    verb: &'static str,
    load: &LoadArgs,
) -> anyhow::Result<Vec<f64>> {
    let (api, picked) = (api.clone(), picked.clone());
    drive(picked.len(), load.concurrency, load.ops_rate, move |i| {
        let (api, name) = (api.clone(), picked[i].clone());
        async move {
            api.post_unread(&format!("/vms/{name}/actions"), json!({"action": verb}))
                .await
        }
    })
    .await
}
