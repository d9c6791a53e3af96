//! `--log-format json` (issue 31, item 2): the control plane and the agent
//! write one JSON object per log line, with the level, the time, the
//! message and each field as a key of its own, so a log collector can
//! select by host, VM or migration without parsing text.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{wait_until, Cluster};
use serde_json::Value;
use std::time::Duration;

/// The JSON log lines of a log file (stdout's plain lines, such as the
/// listening address, go to the same file and are left out); fails on a
/// line that looks like JSON and is not an object with the usual keys.
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            for key in ["timestamp", "level", "target"] {
                assert!(v.get(key).is_some(), "no {key}: {l}");
            }
            v
        })
        .collect()
}

#[test]
fn server_and_agent_log_one_json_object_per_line_with_their_fields() {
    let mut c = Cluster::start_args(&["--log-format", "json"]);
    c.create_topology();
    c.start_agent_with("h1", Some(common::TOPOLOGY[0].2), &["--log-format", "json"]);
    c.wait_hosts_ready(1);
    let server = wait_until(
        "the control plane to log the agent",
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(c.dir.path().join("server.log")).unwrap();
            json_lines(&text)
                .into_iter()
                .find(|v| v["message"] == "agent connected")
        },
    );
    // The field is a key of its own, not text inside the message.
    assert_eq!(server["host"], "h1", "{server}");
    assert_eq!(server["level"], "INFO", "{server}");
    let text = std::fs::read_to_string(c.dir.path().join("agent-h1.log")).unwrap();
    let lines = json_lines(&text);
    assert!(!lines.is_empty(), "the agent logged no JSON:\n{text}");
    let inventory = lines
        .iter()
        .find(|v| v["message"] == "host inventory")
        .unwrap_or_else(|| panic!("no inventory line:\n{text}"));
    assert!(
        inventory["vcpus"].as_u64().is_some_and(|n| n > 0),
        "{inventory}"
    );
    // Nothing else on stderr: every line is JSON or a plain stdout line
    // the binary prints on purpose (none starts with a log level).
    for l in text.lines().filter(|l| !l.starts_with('{')) {
        assert!(
            !l.contains(" INFO ") && !l.contains(" WARN "),
            "text log line: {l}"
        );
    }
}
