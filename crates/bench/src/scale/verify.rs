//! The verification phases, after the load: that the deleted VMs are gone
//! from the agents and shown deleted ([`deletes`]), that the hosts'
//! heartbeats arrive ([`heartbeats`]), and that the control plane's view
//! of a sample of VMs matches the agents' ([`sample`]).

use std::time::{Duration, Instant};

use super::api::Api;
use super::topology::Fleet;

/// Waits until the agents run `running` VMs (five minutes at most), then
/// until the control plane shows `deleted`'s first 500 deleted or gone (12
/// seconds: two heartbeats' reports); how many it does not.
pub async fn deletes(
    api: &Api,
    fleet: &Fleet,
    running: usize,
    deleted: &[String],
) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while fleet.running() != running && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The control plane marks them deleted on the agents' reports; allow
    // two heartbeats for those.
    let mut pending: Vec<String> = deleted.iter().take(500).cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(12);
    loop {
        let mut left = Vec::new();
        for name in pending {
            let v = api.get(&format!("/vms/{name}")).await;
            let gone_on_cp = match &v {
                Err(e) => e.to_string().contains("404"),
                Ok(v) => v["status"]["phase"] == "deleted",
            };
            if !gone_on_cp {
                left.push(name);
            }
        }
        pending = left;
        if pending.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(pending.len())
}

/// Heartbeats over a 12-second window, from the control plane's metrics.
pub struct Heartbeats {
    pub interval_s: u64,
    /// The share of expected beats that did not arrive.
    pub missed_ratio: f64,
    /// Agents connected at the window's end.
    pub connected: u64,
}

/// Counts the heartbeats `hosts` hosts send over a window.
pub async fn heartbeats(api: &Api, hosts: usize) -> anyhow::Result<Heartbeats> {
    let m0 = api.get("/metrics").await?;
    let window = Duration::from_secs(12);
    tokio::time::sleep(window).await;
    let m1 = api.get("/metrics").await?;
    let interval = m1["heartbeat_interval_s"].as_u64().unwrap_or(5).max(1);
    let received = m1["heartbeats_received"].as_u64().unwrap_or(0)
        - m0["heartbeats_received"].as_u64().unwrap_or(0);
    let expected = hosts as f64 * window.as_secs_f64() / interval as f64;
    // Beats are periodic, so a window catches floor or ceil of the expected
    // count per host; allow one beat per host of slack before calling it missed.
    let missed = ((expected - hosts as f64) - received as f64).max(0.0) / expected.max(1.0);
    Ok(Heartbeats {
        interval_s: interval,
        missed_ratio: missed,
        connected: m1["agents_connected"].as_u64().unwrap_or(0),
    })
}

/// Compares up to about 2,000 VMs from the list pages (at size, every 7th
/// of each page, so the sample spreads over the ids) with the agents: a
/// VM the control plane shows running must run on its host, and one it
/// does not must not. Returns how many were sampled and how many differ.
pub async fn sample(api: &Api, fleet: &Fleet, vms: usize) -> anyhow::Result<(usize, usize)> {
    let mut sample = Vec::new();
    let mut cursor: Option<String> = None;
    while sample.len() < 2000 {
        let path = match &cursor {
            Some(c) => format!("/vms?limit=1000&cursor={c}"),
            None => "/vms?limit=1000".to_string(),
        };
        let page = api.get(&path).await?;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        sample.extend(items.into_iter().step_by(if vms > 2000 { 7 } else { 1 }));
        cursor = page["next_cursor"].as_str().map(str::to_string);
        if cursor.is_none() {
            break;
        }
    }
    let mut mismatches = 0;
    for v in &sample {
        let id = v["id"].as_str().unwrap_or_default();
        let host = v["status"]["host"].as_str().unwrap_or_default();
        let cp_running = v["status"]["phase"] == "running";
        if cp_running != fleet.runs(host, id) {
            mismatches += 1;
        }
    }
    Ok((sample.len(), mismatches))
}
