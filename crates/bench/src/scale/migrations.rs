//! The migration phase: VMs moved to a host the placement engine picks
//! (`mode: auto`; the simulated hosts move them cold, through the control
//! plane's staging), each workflow followed to its end. It measures the
//! request's latency, the time from the request to the workflow's
//! completion, and whether each moved VM runs on exactly the host the
//! control plane names, a different one from where it was.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::api::Api;
use super::args::LoadArgs;
use super::measure::drive;
use super::topology::Fleet;
use super::Progress;

/// What the migration phase measured.
pub struct Migrations {
    /// VMs asked to move.
    pub asked: usize,
    pub completed: usize,
    /// Failed (rolled back) or not finished within five minutes.
    pub failed: usize,
    /// Each migrate call's latency, in milliseconds.
    pub call_ms: Vec<f64>,
    /// From each completed migration's request to its completion.
    pub done_ms: Vec<f64>,
    /// Moved VMs not running on exactly the host the control plane names.
    pub mismatches: usize,
    /// The phase's length in seconds (not counted as lifecycle time).
    pub secs: f64,
}

/// Migrates up to `load.migrations` VMs, none of `deleted`, and checks
/// where they end up.
pub async fn run(
    api: &Arc<Api>,
    fleet: &Fleet,
    vms: usize,
    deleted: &[String],
    load: &LoadArgs,
    p: Progress,
) -> anyhow::Result<Migrations> {
    let migrated = pick(vms, deleted, load.migrations);
    if !migrated.is_empty() {
        p.say(format!("migrating {} VMs", migrated.len()));
    }
    let t_mig = Instant::now();
    let mut from_hosts = Vec::with_capacity(migrated.len());
    for name in &migrated {
        from_hosts.push(host_of(api, name).await?.1);
    }
    let (call_ms, ids) = request(api, &migrated, load).await?;
    let (done, completed) = follow(api, &ids).await?;
    let mut mismatches = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, name) in migrated.iter().enumerate() {
        if done[i].is_some_and(f64::is_finite)
            && !moved(api, fleet, name, &from_hosts[i], deadline).await?
        {
            mismatches += 1;
        }
    }
    let secs = t_mig.elapsed().as_secs_f64();
    if !migrated.is_empty() {
        p.say(format!(
            "{completed} of {} migrations completed in {secs:.1} s",
            migrated.len()
        ));
    }
    Ok(Migrations {
        asked: migrated.len(),
        completed,
        failed: ids.len() - completed,
        call_ms,
        done_ms: done
            .into_iter()
            .flatten()
            .filter(|v| v.is_finite())
            .collect(),
        mismatches,
        secs,
    })
}

/// Up to `n` VMs spread over the ids, none of those to be deleted, sorted.
fn pick(vms: usize, deleted: &[String], n: usize) -> Vec<String> {
    let skip: HashSet<&String> = deleted.iter().collect();
    let mut m: Vec<String> = (0..vms)
        .map(|i| format!("v{}", (i * 104_729 + 101) % vms.max(1)))
        .filter(|n| !skip.contains(n))
        .take(n.min(vms))
        .collect();
    m.sort();
    m.dedup();
    m
}

/// A VM's id, the host the control plane shows it on, and whether it
/// shows it running.
async fn host_of(api: &Api, name: &str) -> anyhow::Result<(String, String, bool)> {
    let vm = api.get(&format!("/vms/{name}")).await?;
    let id = vm["id"].as_str().unwrap_or_default().to_string();
    let host = vm["status"]["host"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    Ok((id, host, vm["status"]["phase"] == "running"))
}

/// Asks for each migration (at most 32 at a time); each call's latency,
/// and each migration's id with when it was asked for.
async fn request(
    api: &Arc<Api>,
    names: &[String],
    load: &LoadArgs,
) -> anyhow::Result<(Vec<f64>, Vec<(String, Instant)>)> {
    let ids = Arc::new(Mutex::new(vec![
        (String::new(), Instant::now());
        names.len()
    ]));
    let (api, names, out) = (api.clone(), Arc::new(names.to_vec()), ids.clone());
    let call_ms = drive(
        names.len(),
        load.concurrency.min(32),
        load.ops_rate,
        move |i| {
            let (api, names, ids) = (api.clone(), names.clone(), out.clone());
            async move {
                let m = api
                    .post(
                        &format!("/vms/{}/migrate", names[i]),
                        json!({"mode": "auto"}),
                    )
                    .await?;
                let id = m["id"].as_str().unwrap_or_default().to_string();
                ids.lock().unwrap_or_else(|p| p.into_inner())[i] = (id, Instant::now());
                Ok(())
            }
        },
    )
    .await?;
    let ids = ids.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok((call_ms, ids))
}

/// Polls each migration until it completed or failed (five minutes at
/// most): per migration, milliseconds to completion (NaN when it failed,
/// `None` when unfinished), and how many completed.
async fn follow(api: &Api, ids: &[(String, Instant)]) -> anyhow::Result<(Vec<Option<f64>>, usize)> {
    let mut done_ms: Vec<Option<f64>> = vec![None; ids.len()];
    let mut completed = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    while done_ms.iter().any(Option::is_none) && Instant::now() < deadline {
        for (i, (id, asked)) in ids.iter().enumerate() {
            if done_ms[i].is_some() {
                continue;
            }
            let m = api.get(&format!("/migrations/{id}")).await?;
            match m["phase"].as_str() {
                Some("completed") => {
                    completed += 1;
                    done_ms[i] = Some(asked.elapsed().as_secs_f64() * 1000.0);
                }
                Some("failed") => done_ms[i] = Some(f64::NAN),
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok((done_ms, completed))
}

/// Whether a migrated VM runs on the host the control plane names, which
/// is not `from`, and no longer on `from`; retried until `deadline`.
async fn moved(
    api: &Api,
    fleet: &Fleet,
    name: &str,
    from: &str,
    deadline: Instant,
) -> anyhow::Result<bool> {
    loop {
        let (id, host, running) = host_of(api, name).await?;
        let ok = running && host != from && fleet.runs(&host, &id) && !fleet.runs(from, &id);
        if ok || Instant::now() > deadline {
            return Ok(ok);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
