//! Running `ip`, `bridge`, `nft` and friends, and recording what changed.
//!
//! A leaf of the network module (it imports none of its siblings), so
//! every part of the data plane can run commands and note its changes
//! without the parts importing each other. Errors name the command line
//! and carry its stderr: "ip link add ... failed: RTNETLINK answers: File
//! exists" says what went wrong on which host.

use std::io::Write;
use std::process::{Command, Stdio};

/// An error of the data plane, in words for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NetError(pub String);

pub type Result<T, E = NetError> = std::result::Result<T, E>;

/// What a reconcile changed, one line per command that changed something
/// (empty: the host already was as desired).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes(pub Vec<String>);

fn line(program: &str, args: &[&str]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// Runs `program args` and returns its stdout; a failure names the
/// command and its stderr.
pub fn output(program: &str, args: &[&str]) -> Result<String> {
    with_input(program, args, None)
}

/// Like [`output`], with `input` on stdin.
pub fn with_input(program: &str, args: &[&str], input: Option<&str>) -> Result<String> {
    let l = line(program, args);
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            NetError(format!(
                "cannot run {l}: {e} (is {program} installed? scripts/deps.sh)"
            ))
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| NetError(format!("{l}: writing its input: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| NetError(format!("{l}: {e}")))?;
    if !out.status.success() {
        return Err(NetError(format!(
            "{l} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Changes {
    /// Runs a command that changes the host, and records it.
    pub fn run(&mut self, program: &str, args: &[&str]) -> Result<()> {
        output(program, args)?;
        self.0.push(line(program, args));
        Ok(())
    }

    /// Records a change made otherwise (a file, a process).
    pub fn note(&mut self, what: String) {
        self.0.push(what);
    }
}

/// Parses the JSON an `ip -j` or `bridge -j` command printed (an empty
/// output is an empty list).
pub fn json_list(what: &str, text: &str) -> Result<Vec<serde_json::Value>> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(text)
        .map_err(|e| NetError(format!("cannot parse the output of {what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_command_is_named_with_its_stderr() {
        let e = output(
            "sh",
            &["-c", "echo 'RTNETLINK answers: File exists' >&2; exit 2"],
        )
        .err()
        .map(|e| e.0)
        .unwrap_or_default();
        assert!(e.starts_with("sh -c echo"), "{e}");
        assert!(e.contains("RTNETLINK answers: File exists"), "{e}");
        let e = output("v8-no-such-program", &[])
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        assert!(e.contains("cannot run v8-no-such-program"), "{e}");
        let mut c = Changes::default();
        assert!(c.run("sh", &["-c", "exit 1"]).is_err());
        assert!(c.0.is_empty(), "a failed command is not a change");
        c.run("true", &[]).ok();
        assert_eq!(c.0, ["true"]);
        assert_eq!(
            with_input("cat", &[], Some("in")).ok().as_deref(),
            Some("in")
        );
        assert!(json_list("x", "").is_ok_and(|v| v.is_empty()));
        assert!(json_list("x", "[{").is_err());
    }
}
