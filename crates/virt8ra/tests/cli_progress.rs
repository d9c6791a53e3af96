//! Progress of `--wait` when stderr is not a terminal: plain lines without
//! carriage returns or ANSI escapes, and none at all with `-o json`. A
//! control plane without agents is enough: the VM stays pending and the
//! wait gives up.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Cluster;

#[test]
fn waiting_into_a_pipe_writes_plain_lines() {
    let c = Cluster::start();
    let disk = c.dir.path().join("tiny.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    c.cli_ok(&["image", "import", disk.to_str().unwrap(), "--name", "tiny"]);

    let wait = [
        "--image",
        "tiny",
        "--memory-mib",
        "128",
        "--wait",
        "--wait-timeout",
        "2",
    ];
    let mut args = vec!["vm", "create", "v1"];
    args.extend_from_slice(&wait);
    let out = c.cli(&args);
    assert!(!out.status.success(), "no host: the wait must give up");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        !err.contains('\r') && !err.contains('\x1b'),
        "escapes in redirected stderr: {err:?}"
    );
    let lines: Vec<&str> = err.lines().collect();
    // One progress line (an unchanged status repeats only every 10 s),
    // then the error.
    assert_eq!(lines.len(), 2, "{err:?}");
    assert!(lines[0].starts_with("v1: pending ("), "{err:?}");
    assert!(
        lines[1].contains("gave up after 2 s: VM v1 is still pending"),
        "{err:?}"
    );

    let mut args = vec!["vm", "create", "v2", "-o", "json"];
    args.extend_from_slice(&wait);
    let out = c.cli(&args);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        err.lines().count(),
        1,
        "JSON output has no progress: {err:?}"
    );
    assert!(!err.contains('\r') && !err.contains('\x1b'), "{err:?}");
}
