//! Failure injection for end-to-end tests, compiled only into test builds.
//!
//! The migration workflow's recovery (the control plane or an agent dying
//! at any step) is tested by making a real process die at a named point.
//! That needs code at those points; this crate holds it so that it exists
//! only when the `enabled` feature is on (the binary's `failpoints`
//! feature, which `scripts/test.sh` builds with). Without it every function
//! here does nothing and the environment variables are not even read: the
//! release binary cannot be made to fail on purpose.
//!
//! With the feature, `VIRT8RA_FAIL_AT=POINT` (control plane) or
//! `VIRT8RA_AGENT_FAIL_AT=POINT` (agent) makes the process exit with
//! status [`EXIT_CODE`] at `POINT`, as if killed; `…=error:POINT` makes
//! [`check`] return an error there instead, so the step fails.

use std::fmt;

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

/// A failure injected with `error:POINT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected(pub String);

impl fmt::Display for Injected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "failure injected at {}", self.0)
    }
}

impl std::error::Error for Injected {}

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
}
