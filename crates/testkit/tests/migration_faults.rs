//! The migration workflow under failure injection, in process: for live
//! and cold migration, on the way forward and on the way back (a rollback),
//! every fail point the workflow passes, in the control plane and in both
//! agents, is made to fail (the step returns an error) and to crash (the
//! instance's runtime is dropped; the harness starts it again). After each,
//! once the workflow ended, the invariant: exactly one running copy, on the
//! host the VM is recorded on; nothing leaked (no copy, staged file or
//! reservation left, no migration unfinished); and the VM still usable (it
//! migrates again). At no moment may two copies run.
//!
//! The points are not listed here: a clean run of each path records the
//! points it passes (`FailPoints::hits`), and those are the cases, so a
//! point added to the workflow is tested without touching this file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use virt8ra_testkit::{wait_until, Action, ControlPlane, FailPoints, SimAgent, SimSpec};

const SITE: &str = "es-logrono";

/// A control plane and two simulated hosts that migrate live and cold.
struct Fixture {
    cp: ControlPlane,
    agents: Vec<SimAgent>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::start(&dir.path().join("server")).unwrap();
        cp.ok(
            "POST",
            "/api/v1/providers",
            Some(json!({"name": "provider-a", "country": "ES"})),
        )
        .unwrap();
        cp.ok(
            "POST",
            "/api/v1/sites",
            Some(
                json!({"name": SITE, "provider": "provider-a", "country": "ES",
                        "city": "Logroño", "latitude": 42.46, "longitude": -2.44}),
            ),
        )
        .unwrap();
        cp.upload_tiny_image("tiny").unwrap();
        let agents = ["sim-a", "sim-b"]
            .iter()
            .map(|name| {
                let spec = SimSpec {
                    name: name.to_string(),
                    vcpus: 8,
                    memory_mib: 4096,
                    migration_address: Some("127.0.0.1".into()),
                };
                SimAgent::join(&cp, SITE, spec, &dir.path().join(name), true).unwrap()
            })
            .collect();
        let f = Fixture {
            cp,
            agents,
            _dir: dir,
        };
        assert!(
            f.hosts_ready(),
            "the hosts did not get ready: {}",
            f.cp.ok("GET", "/api/v1/hosts", None).unwrap()
        );
        f
    }

    /// Waits until both hosts are connected and ready.
    fn hosts_ready(&self) -> bool {
        wait_until(Duration::from_secs(20), || {
            let Ok((200, hosts)) = self.cp.call("GET", "/api/v1/hosts", None) else {
                return false;
            };
            hosts["items"].as_array().is_some_and(|h| {
                h.len() == 2
                    && h.iter()
                        .all(|h| h["state"] == "ready" && h["connected"] == true)
            })
        })
    }

    fn vm(&self) -> Value {
        self.cp.ok("GET", "/api/v1/vms/v", None).unwrap()
    }

    /// Creates VM `v` and waits until it runs; returns (source, target).
    fn create_vm(&self) -> (usize, usize) {
        self.cp
            .ok(
                "POST",
                "/api/v1/vms",
                Some(json!({"name": "v", "image": "tiny", "memory_mib": 128})),
            )
            .unwrap();
        assert!(
            wait_until(Duration::from_secs(20), || {
                let vm = self.vm();
                vm["status"]["phase"] == "running" && vm["status"]["machine"].is_string()
            }),
            "the VM did not run: {}",
            self.vm()
        );
        let src = self.running_on().expect("one running copy");
        (src, 1 - src)
    }

    fn vm_id(&self) -> String {
        self.vm()["id"].as_str().unwrap().to_string()
    }

    /// The agent whose driver runs the VM, if exactly one does.
    fn running_on(&self) -> Option<usize> {
        let id = self.vm_id();
        let on: Vec<usize> = (0..self.agents.len())
            .filter(|&i| self.agents[i].driver().is_running(&id))
            .collect();
        (on.len() == 1).then(|| on[0])
    }

    fn running_copies(&self, id: &str) -> usize {
        self.agents
            .iter()
            .filter(|a| !a.is_down() && a.driver().is_running(id))
            .count()
    }

    /// Restarts whatever crashed; true if something did.
    fn recover(&mut self) -> bool {
        let mut any = false;
        if self.cp.is_down() {
            self.cp.restart().unwrap();
            any = true;
        }
        for a in &mut self.agents {
            if a.is_down() {
                a.restart().unwrap();
                any = true;
            }
        }
        any
    }

    /// Whether every migration ended and the VM is free.
    fn settled(&self) -> bool {
        let Ok((200, list)) = self.cp.call("GET", "/api/v1/migrations", None) else {
            return false;
        };
        let open = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| !matches!(m["phase"].as_str(), Some("completed" | "failed")));
        // Asked again: the control plane may crash in between.
        let free = matches!(self.cp.call("GET", "/api/v1/vms/v", None),
                            Ok((200, vm)) if vm["status"]["migration"].is_null());
        !open && free
    }

    /// Asks for a migration to `to`; the answer, if there was one (a crash
    /// of the control plane while it answers leaves none).
    fn migrate(&self, to: usize, mode: &str) -> Option<(u16, Value)> {
        let body = json!({"to_host": self.agents[to].spec.name, "mode": mode});
        self.cp
            .call("POST", "/api/v1/vms/v/migrate", Some(body))
            .ok()
    }

    /// Drives the workflow to its end, restarting what crashes; fails if two
    /// copies ever run at once. Returns how many restarts it took.
    fn drive_to_end(&mut self, id: &str, timeout: Duration) -> Result<u32, String> {
        let start = Instant::now();
        let mut restarts = 0;
        loop {
            if self.running_copies(id) > 1 {
                return Err("two copies of the VM ran at once".into());
            }
            if self.recover() {
                restarts += 1;
            }
            if !self.cp.is_down() && self.settled() {
                return Ok(restarts);
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "the workflow did not end in {timeout:?}: {}",
                    self.cp
                        .call("GET", "/api/v1/migrations", None)
                        .map(|r| r.1.to_string())
                        .unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The invariant, once the workflow ended: one running copy, where the
    /// VM is recorded; no other copy, staged file, reservation or open
    /// migration. Waits a little for the agents to converge.
    fn check_invariant(&mut self, id: &str) -> Result<usize, String> {
        let mut why = String::new();
        // A point past the workflow's end (an agent's undo step) may crash
        // something still: restarted as it goes.
        let ok = wait_until(Duration::from_secs(15), || {
            self.recover();
            match self.invariant(id) {
                Ok(_) => true,
                Err(w) => {
                    why = w;
                    false
                }
            }
        });
        if !ok {
            return Err(why);
        }
        self.invariant(id)
    }

    fn invariant(&self, id: &str) -> Result<usize, String> {
        let Some(on) = self.running_on() else {
            return Err(format!("{} running copies", self.running_copies(id)));
        };
        let other = 1 - on;
        if self.agents[other].driver().has(id) {
            return Err(format!(
                "a copy is left on {}",
                self.agents[other].spec.name
            ));
        }
        if self.agents[other].driver().live_in_flight() != (0, 0) {
            return Err(format!(
                "live-migration threads left on {}",
                self.agents[other].spec.name
            ));
        }
        let vm = self.vm();
        if vm["status"]["host_id"] != self.agents[on].host_id.as_str() {
            return Err(format!(
                "the VM runs on {} but is recorded on {}",
                self.agents[on].spec.name, vm["status"]["host"]
            ));
        }
        if vm["status"]["phase"] != "running" {
            return Err(format!("the VM is {}", vm["status"]["phase"]));
        }
        // The residency trail agrees with the VM's record, whatever crashed:
        // one open interval of the VM, on its host, after contiguous ones.
        let h = self
            .cp
            .ok("GET", "/api/v1/vms/v/history", None)
            .map_err(|e| e.to_string())?;
        let trail: Vec<&Value> = h["intervals"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["copy"] == "vm")
            .collect();
        let open: Vec<&&Value> = trail.iter().filter(|i| i.get("to").is_none()).collect();
        if open.len() != 1 || open[0]["host_id"] != vm["status"]["host_id"] {
            return Err(format!("the residency trail disagrees with the VM: {h}"));
        }
        if trail.windows(2).any(|w| w[0]["to"] != w[1]["from"]) {
            return Err(format!("the residency trail has a gap: {h}"));
        }
        if !self.settled() {
            return Err("a migration is unfinished".into());
        }
        for dir in std::iter::once(self.cp.data_dir.join("staging"))
            .chain(self.agents.iter().map(|a| a.data_dir.join("staging")))
        {
            let left: Vec<_> = std::fs::read_dir(&dir)
                .map(|r| r.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            if !left.is_empty() {
                return Err(format!("staged files left in {}: {left:?}", dir.display()));
            }
        }
        let booked_other = self
            .cp
            .booked(&self.agents[other].spec.name)
            .map_err(|e| e.to_string())?;
        let booked_on = self
            .cp
            .booked(&self.agents[on].spec.name)
            .map_err(|e| e.to_string())?;
        if (booked_on, booked_other) != (1, 0) {
            return Err(format!(
                "placement books {booked_on} VM(s) on the VM's host and {booked_other} on the other"
            ));
        }
        Ok(on)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    ControlPlane,
    Source,
    Target,
}

#[derive(Debug, Clone)]
struct Case {
    mode: &'static str,
    /// Whether the source fails its send first (the undo path).
    rollback: bool,
    who: Who,
    point: String,
    action: Action,
}

/// The point on the source that fails the send and makes the workflow roll
/// back.
fn trigger(mode: &str) -> &'static str {
    match mode {
        "live" => "agent-send",
        _ => "agent-staged",
    }
}

fn faults_of(f: &Fixture, who: Who, src: usize, dst: usize) -> Arc<FailPoints> {
    match who {
        Who::ControlPlane => f.cp.faults.clone(),
        Who::Source => f.agents[src].faults.clone(),
        Who::Target => f.agents[dst].faults.clone(),
    }
}

/// Runs one migration with `case` armed (or none) and checks the
/// invariant; returns the points each party passed.
fn run(
    case: Option<&Case>,
    mode: &'static str,
    rollback: bool,
) -> Result<Vec<(Who, String)>, String> {
    let mut f = Fixture::new();
    let (src, dst) = f.create_vm();
    let id = f.vm_id();
    let before: Vec<(Who, usize)> = [Who::ControlPlane, Who::Source, Who::Target]
        .iter()
        .map(|&w| (w, faults_of(&f, w, src, dst).hits().len()))
        .collect();
    if rollback {
        f.agents[src].faults.arm(trigger(mode), Action::Error);
    }
    if let Some(c) = case {
        faults_of(&f, c.who, src, dst).arm(&c.point, c.action);
    }
    let answer = f.migrate(dst, mode);
    if let Some((status, body)) = &answer {
        let injected_at_start = case.is_some_and(|c| c.point == "migration:start");
        match status {
            202 => {}
            503 if injected_at_start => {
                // Refused, with the API's error body, and nothing changed.
                let msg = body["error"]["message"].as_str().unwrap_or_default();
                if body["error"]["code"].as_str().is_none() || !msg.contains("migration:start") {
                    return Err(format!("unclear refusal: {body}"));
                }
            }
            _ => return Err(format!("migrate answered {status}: {body}")),
        }
    }
    f.drive_to_end(&id, Duration::from_secs(60))?;
    let on = f.check_invariant(&id)?;
    // Where it should be: the target after a clean run, the source after a
    // rollback (a failure injected later than the commit may still end on
    // the target; one before it on either).
    if case.is_none() && on != if rollback { src } else { dst } {
        return Err(format!("the VM ended on {}", f.agents[on].spec.name));
    }
    let mut hits = Vec::new();
    for (who, n) in before {
        for p in faults_of(&f, who, src, dst).hits().into_iter().skip(n) {
            hits.push((who, p));
        }
    }
    // Usable: it migrates again, cleanly.
    for c in [&f.cp.faults, &f.agents[0].faults, &f.agents[1].faults] {
        c.clear();
    }
    if !f.hosts_ready() {
        return Err("the hosts did not come back".into());
    }
    // An agent's step that failed reports the VM failed until its retry
    // (seconds later) runs it again: usable means usable again soon.
    let mut answer = None;
    wait_until(Duration::from_secs(15), || {
        answer = f.migrate(1 - on, mode);
        !matches!(answer, Some((409, _)))
    });
    match answer {
        Some((202, _)) => {}
        other => return Err(format!("the VM does not migrate again: {other:?}")),
    }
    f.drive_to_end(&id, Duration::from_secs(30))?;
    let again = f.check_invariant(&id)?;
    if again == on {
        return Err("the second migration did not move the VM".into());
    }
    Ok(hits)
}

/// Every case: the points a clean run of each path passes, each failed and
/// crashed.
fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for mode in ["live", "cold"] {
        let mut seen = BTreeSet::new();
        for rollback in [false, true] {
            let hits = run(None, mode, rollback)
                .unwrap_or_else(|e| panic!("a clean {mode} run (rollback {rollback}) failed: {e}"));
            for (who, point) in hits {
                if point == trigger(mode) && who == Who::Source && rollback {
                    continue;
                }
                if !seen.insert((who, point.clone())) {
                    continue;
                }
                for action in [Action::Error, Action::Crash] {
                    out.push(Case {
                        mode,
                        rollback,
                        who,
                        point: point.clone(),
                        action,
                    });
                }
            }
        }
    }
    out
}

#[test]
fn a_migration_failed_or_crashed_at_any_step_keeps_exactly_one_copy() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    let t = Instant::now();
    let cases = cases();
    let discovered = t.elapsed();
    // The workflow's named points must be among them, on both paths.
    let names: BTreeSet<&str> = cases.iter().map(|c| c.point.as_str()).collect();
    for p in [
        "migration:start",
        "migration:before:switching_over",
        "migration:switching_over",
        "migration:cleaning_up",
        "migration:completed",
        "migration:rolling_back",
        "migration:failed",
        "migration:staged-removed",
        "migration:verify-staged",
        "agent-job-start",
        "agent-send",
        "agent-staged",
        "agent-adopted",
        "agent-remove-vm",
        "agent-abort-outgoing",
    ] {
        assert!(names.contains(p), "no case passes point {p}: {names:?}");
    }
    // FAULT_CASE=TEXT runs only the cases whose description contains it.
    let only = std::env::var("FAULT_CASE").ok();
    let cases: Vec<Case> = cases
        .into_iter()
        .filter(|c| {
            only.as_ref()
                .is_none_or(|o| format!("{c:?}").contains(o.as_str()))
        })
        .collect();
    let queue = Arc::new(Mutex::new(cases.clone()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (queue, failures) = (queue.clone(), failures.clone());
            std::thread::spawn(move || loop {
                let Some(c) = queue.lock().unwrap().pop() else {
                    return;
                };
                let t = Instant::now();
                let r = run(Some(&c), c.mode, c.rollback);
                eprintln!("{c:?}: {:?} in {:?}", r.as_ref().map(|_| "ok"), t.elapsed());
                if let Err(e) = r {
                    failures.lock().unwrap().push(format!("{c:?}: {e}"));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    eprintln!(
        "{} cases in {:?} (discovery {discovered:?})",
        cases.len(),
        t.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
