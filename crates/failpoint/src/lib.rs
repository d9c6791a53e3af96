//! Failure injection for tests, compiled only into test builds.
//!
//! The migration workflow's recovery (the control plane or an agent dying
//! at any step, a step failing) is tested by making it fail at a named
//! point. That needs code at those points; this crate holds it so that it
//! exists only when the `enabled` feature is on (the binary's `failpoints`
//! feature, which `scripts/test.sh` builds with, and the in-process tests
//! of `crates/testkit`). Without it every function here does nothing and
//! the environment variables are not even read: the release binary cannot
//! be made to fail on purpose.
//!
//! Two ways to arm a point:
//!
//! - **Per process, by environment** (end-to-end tests with real
//!   processes): `VIRT8RA_FAIL_AT=POINT` (control plane) or
//!   `VIRT8RA_AGENT_FAIL_AT=POINT` (agent) makes the process exit with
//!   status [`EXIT_CODE`] at `POINT`, as if killed; `…=error:POINT` makes the
//!   point return an error instead, so the step fails.
//! - **Per instance, in process** (`crates/testkit`: a control plane and
//!   simulated agents in one test process, many tests in parallel threads):
//!   a [`FailPoints`] registry belongs to one instance, whose runtime
//!   installs it on each of its threads ([`FailPoints::install`], from the
//!   runtime builder's `on_thread_start`); a point reached on one of those
//!   threads consults it. Environment variables would be global to every
//!   test thread; a registry is not. [`FailPoints::arm`] a point with an
//!   [`Action`]: [`Action::Error`] (the step returns [`Injected`]: the
//!   workflow's error or undo path), or [`Action::Crash`] (the task halts
//!   there for good and the registry's crash hook runs; the harness then
//!   drops the instance's runtime, every task with it, without cleanup:
//!   exactly a crash right after the preceding durable write). Each arming
//!   fires once. [`FailPoints::hits`] lists the points reached, so a test
//!   can check that the point it armed exists on the path it drove.
//!
//! The points (docs/ARCHITECTURE.md, "Testing in process", says more).
//! Control plane, in the migration workflow: `migration:start` (before the
//! migration is recorded), `migration:before:<phase>` (before a phase is
//! recorded: each step forward, the commit `before:switching_over`, the
//! undo `before:rolling_back`, the ends `before:completed`/`before:failed`),
//! `migration:<phase>` (after it was recorded; an error there is a failed
//! send of the hosts' desired state), `migration:verify-staged` (before a
//! cold upload is checked), `migration:staged-removed` (after the staged
//! disks went, before the end is recorded). Agent: `agent-job-start`,
//! `agent-incoming-ready`, `agent-resumed` (target, live), `agent-send`,
//! `agent-sent` (source, live), `agent-staged`, `agent-upload-chunk`
//! (source, cold), `agent-cold-downloaded`, `agent-adopted` (target, cold),
//! and the undo steps `agent-abort-outgoing` (the source takes its VM
//! back) and `agent-remove-vm` (a copy is removed).

use std::fmt;
use std::sync::{Arc, Mutex};

/// Whether fail points are compiled in (`virt8ra --version` says so).
pub const ENABLED: bool = cfg!(feature = "enabled");

/// The exit status of a process stopped by a fail point.
pub const EXIT_CODE: i32 = 86;

/// Which process a fail point is in: each reads its own variable, so one
/// test can set them for the control plane and an agent separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Process {
    /// `VIRT8RA_FAIL_AT`.
    ControlPlane,
    /// `VIRT8RA_AGENT_FAIL_AT`.
    Agent,
}

/// A failure injected with `error:POINT` (or [`Action::Error`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected(pub String);

impl fmt::Display for Injected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "failure injected at {}", self.0)
    }
}

impl std::error::Error for Injected {}

/// What an armed point does when it is reached (in process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The point returns [`Injected`]: the step fails.
    Error,
    /// The task halts at the point for good and the crash hook runs (the
    /// harness drops the instance's runtime: a crash).
    Crash,
}

type Hook = Box<dyn Fn(&str) + Send + Sync>;

/// The fail points of one instance (a control plane or an agent running in
/// a test process): what is armed, what was reached, and what to do on a
/// crash. Inert without the `enabled` feature.
#[derive(Default)]
pub struct FailPoints {
    armed: Mutex<Vec<(String, Action)>>,
    hits: Mutex<Vec<String>>,
    crashed: Mutex<Option<String>>,
    on_crash: Mutex<Option<Hook>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl fmt::Debug for FailPoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailPoints")
            .field("armed", &*lock(&self.armed))
            .field("crashed", &*lock(&self.crashed))
            .finish()
    }
}

impl FailPoints {
    pub fn new() -> Arc<FailPoints> {
        Arc::new(FailPoints::default())
    }

    /// Arms `point` with `action`, for its next hit only.
    pub fn arm(&self, point: &str, action: Action) {
        lock(&self.armed).push((point.to_string(), action));
    }

    /// Disarms every point.
    pub fn clear(&self) {
        lock(&self.armed).clear();
    }

    /// The points reached so far, in order (each hit once per pass).
    pub fn hits(&self) -> Vec<String> {
        lock(&self.hits).clone()
    }

    /// The point a crash happened at, if one did.
    pub fn crashed(&self) -> Option<String> {
        lock(&self.crashed).clone()
    }

    /// Runs `hook` (with the point's name) when a point crashes the
    /// instance; the harness uses it to drop the instance's runtime.
    pub fn on_crash(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        *lock(&self.on_crash) = Some(Box::new(hook));
    }

    /// Makes this registry the current thread's: points reached on this
    /// thread consult it. Call it from the instance's runtime builder
    /// (`on_thread_start`) and on the thread that drives `block_on`.
    pub fn install(self: &Arc<Self>) {
        #[cfg(feature = "enabled")]
        CURRENT.with(|c| *c.borrow_mut() = Some(self.clone()));
    }

    /// What `point` does now: records the hit, takes a one-shot arming.
    #[cfg(feature = "enabled")]
    fn take(&self, point: &str) -> Option<Action> {
        lock(&self.hits).push(point.to_string());
        let mut armed = lock(&self.armed);
        let i = armed.iter().position(|(p, _)| p == point)?;
        Some(armed.remove(i).1)
    }
}

#[cfg(feature = "enabled")]
thread_local! {
    static CURRENT: std::cell::RefCell<Option<Arc<FailPoints>>> =
        const { std::cell::RefCell::new(None) };
}

/// Fail point `point` of `process`, in async code: consults this thread's
/// [`FailPoints`] (in-process tests), then the process's environment
/// variable (see [`check`]). Returns [`Injected`] for an error; never
/// returns for a crash. A no-op without the `enabled` feature.
#[cfg(feature = "enabled")]
pub async fn hit(process: Process, point: &str) -> Result<(), Injected> {
    let fp = CURRENT.with(|c| c.borrow().clone());
    if let Some(fp) = fp {
        match fp.take(point) {
            Some(Action::Error) => return Err(Injected(point.to_string())),
            Some(Action::Crash) => {
                tracing::warn!(point, "failure injection: this instance crashes here");
                *lock(&fp.crashed) = Some(point.to_string());
                if let Some(hook) = &*lock(&fp.on_crash) {
                    hook(point);
                }
                return std::future::pending().await;
            }
            None => {}
        }
    }
    check(process, point)
}

/// Fail point `point` of `process`, in async code. A no-op without the
/// `enabled` feature.
#[cfg(not(feature = "enabled"))]
#[inline(always)]
pub async fn hit(_process: Process, _point: &str) -> Result<(), Injected> {
    Ok(())
}

/// Exits the process at `point` if the process's variable names it;
/// returns [`Injected`] if it is `error:POINT`. A no-op without the
/// `enabled` feature.
#[cfg(feature = "enabled")]
pub fn check(process: Process, point: &str) -> Result<(), Injected> {
    let var = match process {
        Process::ControlPlane => "VIRT8RA_FAIL_AT",
        Process::Agent => "VIRT8RA_AGENT_FAIL_AT",
    };
    match std::env::var(var) {
        Ok(v) if v == point => {
            tracing::error!(point, "failure injection: the process exits");
            std::process::exit(EXIT_CODE);
        }
        Ok(v) if v.strip_prefix("error:") == Some(point) => Err(Injected(point.to_string())),
        _ => Ok(()),
    }
}

/// Exits the process at `point` if the process's variable names it;
/// returns [`Injected`] if it is `error:POINT`. A no-op without the
/// `enabled` feature.
#[cfg(not(feature = "enabled"))]
#[inline(always)]
pub fn check(_process: Process, _point: &str) -> Result<(), Injected> {
    Ok(())
}

/// Logs once at start-up when a fail point is armed in this process's
/// environment: it will fail on purpose. Silent otherwise, so that a test
/// build's output is the release build's (tests check one-line errors).
pub fn announce() {
    if !ENABLED {
        return;
    }
    for var in ["VIRT8RA_FAIL_AT", "VIRT8RA_AGENT_FAIL_AT"] {
        if let Ok(point) = std::env::var(var) {
            tracing::warn!(
                var,
                point,
                "a fail point is armed (a test build): this process will fail on purpose"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    /// Polls `f` once (the points never wait except to crash).
    fn poll_once<T>(f: impl Future<Output = T>) -> Poll<T> {
        let mut f = Box::pin(f);
        Pin::as_mut(&mut f).poll(&mut Context::from_waker(Waker::noop()))
    }

    // Both variants are tested: `cargo test -p virt8ra-failpoint` and
    // `cargo test -p virt8ra-failpoint --features enabled`. The variable is
    // set to an `error:` point only, so nothing exits the test process.
    #[test]
    fn an_error_point_fails_only_when_compiled_in() {
        std::env::set_var("VIRT8RA_AGENT_FAIL_AT", "error:unit-test-point");
        let r = check(Process::Agent, "unit-test-point");
        let other = check(Process::Agent, "another-point");
        let cp = check(Process::ControlPlane, "unit-test-point");
        std::env::remove_var("VIRT8RA_AGENT_FAIL_AT");
        assert_eq!(other, Ok(()));
        assert_eq!(cp, Ok(()), "the control plane reads its own variable");
        if ENABLED {
            let e = r.expect_err("an enabled error point fails");
            assert_eq!(e.to_string(), "failure injected at unit-test-point");
        } else {
            assert_eq!(r, Ok(()), "without the feature a fail point does nothing");
        }
    }

    /// A registry arms points for the threads it is installed on only, each
    /// arming once; a crash halts the task and runs the hook. Without the
    /// feature the same calls do nothing: the release build has no points.
    #[test]
    fn an_instance_registry_arms_its_own_threads_once() {
        let fp = FailPoints::new();
        let crashes = Arc::new(Mutex::new(Vec::new()));
        let seen = crashes.clone();
        fp.on_crash(move |p| seen.lock().expect("lock").push(p.to_string()));
        fp.arm("step-a", Action::Error);
        fp.arm("step-b", Action::Crash);
        // Another thread (another instance) has no registry: untouched.
        let other = std::thread::spawn(|| poll_once(hit(Process::ControlPlane, "step-a")))
            .join()
            .expect("thread");
        assert_eq!(other, Poll::Ready(Ok(())));
        fp.install();
        let a1 = poll_once(hit(Process::ControlPlane, "step-a"));
        let a2 = poll_once(hit(Process::ControlPlane, "step-a"));
        let b = poll_once(hit(Process::Agent, "step-b"));
        let b2 = poll_once(hit(Process::Agent, "step-b"));
        if ENABLED {
            assert_eq!(a1, Poll::Ready(Err(Injected("step-a".into()))));
            assert_eq!(a2, Poll::Ready(Ok(())), "an arming fires once");
            assert_eq!(b, Poll::Pending, "a crash never returns");
            assert_eq!(b2, Poll::Ready(Ok(())));
            assert_eq!(fp.crashed().as_deref(), Some("step-b"));
            assert_eq!(*crashes.lock().expect("lock"), ["step-b"]);
            assert_eq!(fp.hits(), ["step-a", "step-a", "step-b", "step-b"]);
        } else {
            for r in [a1, a2, b, b2] {
                assert_eq!(r, Poll::Ready(Ok(())), "without the feature nothing fires");
            }
            assert_eq!(fp.crashed(), None);
            assert!(fp.hits().is_empty());
            assert!(crashes.lock().expect("lock").is_empty());
        }
    }
}
