//! The topology phases: the example EU sites grown to the requested size
//! are registered through the API ([`register`]), then that many simulated
//! hosts join them ([`join`]). What they measure is that the control plane
//! takes them all: the run stops when not every host is connected within
//! two minutes.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;
use virt8ra_agent::simhost::{self, SimHost};
use virt8ra_placement::HostInfo;

use super::api::Api;
use super::Progress;

/// The sites registered, and the hosts to join them.
pub struct Topology {
    /// The sites' names.
    pub sites: Vec<String>,
    /// The providers' countries (one per provider, by provider name).
    pub countries: Vec<String>,
    /// The hosts to join, each naming its site.
    pub hosts: Vec<HostInfo>,
    /// A join token per site with hosts.
    tokens: HashMap<String, String>,
}

/// Registers the providers and sites of a generated topology for `hosts`
/// hosts (seed 42), and a join token for each site that gets hosts.
pub async fn register(api: &Api, hosts: usize, p: Progress) -> anyhow::Result<Topology> {
    let (sites, host_infos) = virt8ra_placement::bench::topology(hosts, 42);
    let mut providers = BTreeMap::new();
    for s in &sites {
        providers
            .entry(s.provider.clone())
            .or_insert(s.provider_country.clone());
    }
    for (p, c) in &providers {
        api.post("/providers", json!({"name": p, "country": c}))
            .await?;
    }
    let mut per_site: BTreeMap<String, usize> = Default::default();
    for h in &host_infos {
        *per_site.entry(h.site.clone()).or_default() += 1;
    }
    let mut tokens = HashMap::new();
    for s in &sites {
        api.post(
            "/sites",
            json!({"name": s.name, "provider": s.provider, "country": s.country, "city": "x",
                   "latitude": s.lat, "longitude": s.lon, "tier": s.tier,
                   "facts": {"grid_gco2_per_kwh": s.carbon}}),
        )
        .await?;
        let n = per_site.get(&s.name).copied().unwrap_or(0);
        if n > 0 {
            let t = api
                .post(
                    "/join-tokens",
                    json!({"site": s.name, "max_uses": n.min(10_000)}),
                )
                .await?;
            tokens.insert(
                s.name.clone(),
                t["token"].as_str().unwrap_or_default().to_string(),
            );
        }
    }
    p.say(format!(
        "{} sites, {} providers; joining {hosts} simulated hosts",
        sites.len(),
        providers.len()
    ));
    Ok(Topology {
        sites: sites.into_iter().map(|s| s.name).collect(),
        countries: providers.into_values().collect(),
        hosts: host_infos,
        tokens,
    })
}

/// The simulated hosts of this process, and the connections they share.
pub struct Fleet {
    sim: Vec<SimHost>,
    by_name: HashMap<String, usize>,
    muxes: Vec<Arc<simhost::Mux>>,
}

impl Fleet {
    /// VMs running on all the simulated hosts.
    pub fn running(&self) -> usize {
        self.sim.iter().map(|s| s.driver.running_count()).sum()
    }

    /// Whether the host named `host` runs the VM `id`.
    pub fn runs(&self, host: &str, id: &str) -> bool {
        self.by_name
            .get(host)
            .is_some_and(|i| self.sim[*i].driver.is_running(id))
    }

    /// Connections the hosts hold to the control plane: one per mux, or one
    /// per host when they have their own (or a mux fell back to that).
    pub fn connections(&self, hosts: usize) -> usize {
        if self.muxes.iter().any(|m| m.fell_back()) || self.muxes.is_empty() {
            hosts
        } else {
            self.muxes.len()
        }
    }

    /// Stops every simulated host's agent.
    pub fn stop(&self) {
        for s in &self.sim {
            s.task.abort();
        }
    }
}

/// Joins a simulated host for each of `topo`'s hosts, 32 at a time,
/// `per_conn` to a shared connection, each with its directory in
/// `agents_dir`; returns once the control plane counts them all connected.
pub async fn join(
    api: &Api,
    topo: &Topology,
    url: &str,
    agents_dir: &Path,
    per_conn: usize,
    p: Progress,
) -> anyhow::Result<Fleet> {
    let hosts = topo.hosts.len();
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut joins = tokio::task::JoinSet::new();
    let muxes: Vec<Arc<simhost::Mux>> = if per_conn > 1 {
        (0..hosts.div_ceil(per_conn))
            .map(|_| simhost::Mux::new(url))
            .collect()
    } else {
        Vec::new()
    };
    for (i, h) in topo.hosts.iter().enumerate() {
        let mux = muxes.get(i / per_conn).cloned();
        let (sem, url, token, dir) = (
            sem.clone(),
            url.to_string(),
            topo.tokens.get(&h.site).cloned().unwrap_or_default(),
            agents_dir.join(&h.name),
        );
        let (name, mem) = (h.name.clone(), h.memory_mib);
        let vcpus = h.vcpus;
        joins.spawn(async move {
            let _p = sem.acquire().await;
            simhost::start(&url, &token, &name, &dir, vcpus, mem, mux).await
        });
    }
    let mut sim: Vec<SimHost> = Vec::new();
    while let Some(r) = joins.join_next().await {
        sim.push(r??);
    }
    let by_name = sim
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), i))
        .collect();
    let start = Instant::now();
    loop {
        let m = api.get("/metrics").await?;
        if m["agents_connected"].as_u64().unwrap_or(0) as usize >= hosts {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!(
                "only {} of {hosts} hosts connected after 120 s",
                m["agents_connected"]
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    p.say("all hosts connected");
    Ok(Fleet {
        sim,
        by_name,
        muxes,
    })
}
