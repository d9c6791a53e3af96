//! The rebalance planner: from the current placements and a goal, a list of
//! moves that keeps every hard rule of every VM.
//!
//! Pure: it plans on a copy of the engine and returns moves; the migration
//! workflow executes them. Each VM is re-placed with its own request (its
//! residency, latency, feature and group rules), so no move can break a rule
//! that the VM's original placement honoured. VMs that have nowhere to go are
//! reported, never moved.

use virt8ra_api::PlacementPolicy;

use crate::engine::Engine;

#[derive(Debug, Clone, PartialEq)]
pub enum Goal {
    /// Move every VM off this host.
    DrainHost(String),
    /// Move every VM off this site.
    DrainSite(String),
    /// Move every VM off this provider's sites.
    DrainProvider(String),
    /// Move VMs to sites whose carbon per kWh is at least `min_gain` (a
    /// fraction, e.g. 0.2) lower.
    LowerCarbon { min_gain: f64 },
    /// Move VMs off hosts whose memory use exceeds the mean by more than
    /// `tolerance` (a fraction of capacity).
    EvenLoad { tolerance: f64 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    pub vm: String,
    pub from: String,
    pub to: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub moves: Vec<Move>,
    /// VMs the goal wanted moved that have no target, with why.
    pub stuck: Vec<(String, String)>,
}

impl Engine {
    pub fn plan_rebalance(&self, goal: &Goal) -> Plan {
        let mut e = self.clone();
        let mut plan = Plan::default();
        let mut vms: Vec<(String, String)> = e
            .placements()
            .map(|(v, h)| (v.to_string(), h.to_string()))
            .collect();
        // By host, and within a host largest first: they are the hardest to fit.
        vms.sort_by_key(|(v, h)| {
            (
                h.clone(),
                std::cmp::Reverse(e.request_of(v).map(|r| r.res.memory_mib).unwrap_or(0)),
            )
        });
        match goal {
            Goal::DrainHost(_) | Goal::DrainSite(_) | Goal::DrainProvider(_) => {
                let drained = |e: &Engine, host: &str| -> bool {
                    let Some(h) = e.host(host) else { return false };
                    let s = e.site_of(h);
                    match goal {
                        Goal::DrainHost(n) => h.info.name == *n,
                        Goal::DrainSite(n) => s.name == *n,
                        Goal::DrainProvider(n) => s.provider == *n,
                        _ => false,
                    }
                };
                let hosts: Vec<String> = e
                    .hosts()
                    .filter(|h| drained(&e, &h.info.name))
                    .map(|h| h.info.name.clone())
                    .collect();
                for h in &hosts {
                    let _ = e.set_ready(h, false);
                }
                for (vm, host) in vms.iter().filter(|(_, h)| hosts.contains(h)) {
                    let Some(req) = e.request_of(vm).cloned() else {
                        continue;
                    };
                    e.release(vm);
                    match e.place(&req) {
                        Ok(d) => {
                            let _ = e.commit(vm, &d.host, &req);
                            plan.moves.push(Move {
                                vm: vm.clone(),
                                from: host.clone(),
                                to: d.host.clone(),
                                reason: format!("drain: {}", d.reason),
                            });
                        }
                        Err(why) => {
                            let _ = e.commit(vm, host, &req);
                            plan.stuck.push((vm.clone(), why.message));
                        }
                    }
                }
            }
            Goal::LowerCarbon { min_gain } => {
                for (vm, host) in &vms {
                    let Some(mut req) = e.request_of(vm).cloned() else {
                        continue;
                    };
                    let Some(now) = e.host(host).and_then(|h| e.site_of(h).carbon_per_it_kwh())
                    else {
                        continue;
                    };
                    let original = req.clone();
                    // Hard rules stay; the soft preference becomes energy alone.
                    req.c.policy = Some(PlacementPolicy {
                        energy: Some(10.0),
                        capacity: Some(0.0),
                        cost: Some(0.0),
                        latency: Some(0.0),
                        balance: Some(0.0),
                        strategy: None,
                    });
                    req.weights.energy = 10.0;
                    req.weights.capacity = 0.0;
                    req.weights.cost = 0.0;
                    req.weights.latency = 0.0;
                    req.weights.balance = 0.0;
                    e.release(vm);
                    let better = e.place(&req).ok().filter(|d| {
                        e.host(&d.host)
                            .and_then(|h| e.site_of(h).carbon_per_it_kwh())
                            .is_some_and(|c| c <= now * (1.0 - min_gain))
                    });
                    match better {
                        Some(d) => {
                            let _ = e.commit(vm, &d.host, &original);
                            plan.moves.push(Move {
                                vm: vm.clone(),
                                from: host.clone(),
                                to: d.host.clone(),
                                reason: format!("lower carbon: {}", d.reason),
                            });
                        }
                        None => {
                            let _ = e.commit(vm, host, &original);
                        }
                    }
                }
            }
            Goal::EvenLoad { tolerance } => {
                let util = |e: &Engine, h: &str| {
                    e.host(h)
                        .map(|h| h.used.memory_mib as f64 / h.cap.memory_mib.max(1) as f64)
                        .unwrap_or(0.0)
                };
                let n = e.host_count().max(1) as f64;
                let mean = e
                    .hosts()
                    .map(|h| h.used.memory_mib as f64 / h.cap.memory_mib.max(1) as f64)
                    .sum::<f64>()
                    / n;
                for (vm, host) in &vms {
                    if util(&e, host) <= mean + tolerance {
                        continue;
                    }
                    let Some(mut req) = e.request_of(vm).cloned() else {
                        continue;
                    };
                    let original = req.clone();
                    req.weights.pack = false;
                    req.weights.capacity = 10.0;
                    e.release(vm);
                    let target = e
                        .place(&req)
                        .ok()
                        .filter(|d| d.host != *host && util(&e, &d.host) + 1e-9 < mean);
                    match target {
                        Some(d) => {
                            let _ = e.commit(vm, &d.host, &original);
                            plan.moves.push(Move {
                                vm: vm.clone(),
                                from: host.clone(),
                                to: d.host.clone(),
                                reason: format!("even out load: {}", d.reason),
                            });
                        }
                        None => {
                            let _ = e.commit(vm, host, &original);
                        }
                    }
                }
            }
        }
        plan
    }
}
