//! The Debian package (issue 31, item 3), built by `scripts/build-deb.sh`
//! from the binary under test (`--profile dev --no-build`: the tests do not
//! rebuild it).
//!
//! Always: the package holds the binary, both units, the two settings files
//! as conffiles with modes that keep secrets private, bash completion, and
//! maintainer scripts that parse.
//!
//! With `VIRT8RA_TEST_DEB_INSTALL=1` (CI sets it: its machine is thrown
//! away after the run; a developer's machine is left alone by default), on
//! this machine: install, upgrade to a second revision keeping a changed
//! setting, `systemd-analyze verify` of the installed units, the control
//! plane and an agent started as their units start them (the server as the
//! `virt8ra` user with no capability at all, the agent as root with only the
//! unit's bounding set) creating and running a real guest, then remove
//! (settings kept) and purge (settings and user gone; data kept, as the
//! package promises).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::{bin, free_port, wait_until, wait_until_explained, Proc};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn sh(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

fn must(cmd: &str, args: &[&str]) -> String {
    let out = sh(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The package of revision `rev`, built once per revision.
fn package(rev: u32) -> Option<PathBuf> {
    static BUILT: OnceLock<std::sync::Mutex<Vec<(u32, PathBuf)>>> = OnceLock::new();
    if !sh("sh", &["-c", "command -v cargo-deb"]).status.success() {
        eprintln!("SKIP: cargo-deb is not installed (scripts/deps.sh installs it)");
        return None;
    }
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, p)) = built.iter().find(|(r, _)| *r == rev) {
        return Some(p.clone());
    }
    // The binary under test is the one packaged.
    assert!(Path::new(bin()).ends_with("debug/virt8ra"), "{}", bin());
    let version = format!("{}-{rev}", env!("CARGO_PKG_VERSION"));
    let out = Command::new("bash")
        .arg(repo().join("scripts/build-deb.sh"))
        .args(["--profile", "dev", "--no-build", "--deb-version", &version])
        .current_dir(repo())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "scripts/build-deb.sh failed");
    let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let path = if path.is_absolute() {
        path
    } else {
        repo().join(path)
    };
    assert!(
        path.to_string_lossy().contains(&version),
        "{}",
        path.display()
    );
    // cargo-deb clears its output directory of other packages: keep each
    // revision apart.
    let keep = std::env::temp_dir().join(format!("virt8ra-deb-test-{}", std::process::id()));
    std::fs::create_dir_all(&keep).unwrap();
    let kept = keep.join(path.file_name().unwrap());
    std::fs::copy(&path, &kept).unwrap();
    built.push((rev, kept.clone()));
    Some(kept)
}

#[test]
fn the_package_holds_the_binary_units_and_private_settings() {
    let Some(deb) = package(1) else { return };
    let deb = deb.to_str().unwrap();
    let listing = must("dpkg-deb", &["-c", deb]);
    let mode_of = |path: &str| -> String {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(".{path}")))
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{listing}"))
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(mode_of("/usr/bin/virt8ra"), "-rwxr-xr-x");
    for unit in ["virt8ra-server", "virt8ra-agent"] {
        assert_eq!(
            mode_of(&format!("/usr/lib/systemd/system/{unit}.service")),
            "-rw-r--r--"
        );
    }
    // The settings may hold a database password or point at secrets.
    assert_eq!(mode_of("/etc/virt8ra/server.env"), "-rw-r-----");
    assert_eq!(mode_of("/etc/virt8ra/agent.env"), "-rw-------");
    assert_eq!(
        mode_of("/usr/share/bash-completion/completions/virt8ra"),
        "-rw-r--r--"
    );

    let control = tempfile::tempdir().unwrap();
    must("dpkg-deb", &["-e", deb, control.path().to_str().unwrap()]);
    let conffiles = std::fs::read_to_string(control.path().join("conffiles")).unwrap();
    assert_eq!(
        conffiles.lines().collect::<Vec<_>>(),
        ["/etc/virt8ra/server.env", "/etc/virt8ra/agent.env"]
    );
    for script in ["postinst", "postrm", "prerm"] {
        let p = control.path().join(script);
        must("sh", &["-n", p.to_str().unwrap()]);
    }
    let fields = must("dpkg-deb", &["-f", deb, "Depends"]);
    for dep in [
        "qemu-utils",
        "nftables",
        "iproute2",
        "dnsmasq-base",
        "adduser",
    ] {
        assert!(fields.contains(dep), "Depends lacks {dep}: {fields}");
    }
    // The completion script the package carries is the binary's own.
    let root = tempfile::tempdir().unwrap();
    must("dpkg-deb", &["-x", deb, root.path().to_str().unwrap()]);
    let packaged = std::fs::read_to_string(
        root.path()
            .join("usr/share/bash-completion/completions/virt8ra"),
    )
    .unwrap();
    assert!(packaged.contains("complete -F _virt8ra") || packaged.contains("-F _virt8ra"));
    assert!(packaged.contains("migrate"), "no subcommands completed");
}

/// The capabilities a unit's `CapabilityBoundingSet=` allows, as setpriv
/// takes them (`-all,+net_admin,...`; `-all` alone for an empty set).
fn bounding_set(unit: &str) -> String {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit bounds its capabilities");
    let mut set = String::from("-all");
    for cap in line.split_whitespace() {
        set.push_str(",+");
        set.push_str(&cap.trim_start_matches("CAP_").to_ascii_lowercase());
    }
    set
}

/// Removes and purges the package, and the data it leaves, when the test
/// ends (also on failure).
struct Installed {
    procs: Vec<Proc>,
}

impl Drop for Installed {
    fn drop(&mut self) {
        self.procs.clear();
        let _ = sh("pkill", &["-9", "-f", "/var/lib/virt8ra/agent"]);
        let _ = sh("dpkg", &["--purge", "virt8ra"]);
        let _ = std::fs::remove_dir_all("/var/lib/virt8ra");
    }
}

fn dpkg_status() -> String {
    String::from_utf8_lossy(&sh("dpkg-query", &["-W", "-f=${Status} ${Version}", "virt8ra"]).stdout)
        .into_owned()
}

#[test]
fn the_package_installs_upgrades_runs_a_guest_and_purges() {
    if std::env::var("VIRT8RA_TEST_DEB_INSTALL").as_deref() != Ok("1") {
        eprintln!(
            "SKIP: installs a package on this machine; set VIRT8RA_TEST_DEB_INSTALL=1 (CI does)"
        );
        return;
    }
    let (Some(rev1), Some(rev2)) = (package(1), package(2)) else {
        return;
    };
    assert!(
        dpkg_status().is_empty() && !Path::new("/var/lib/virt8ra").exists(),
        "virt8ra is already installed here ({}); not touching it",
        dpkg_status()
    );
    let mut guard = Installed { procs: Vec::new() };
    must("dpkg", &["-i", rev1.to_str().unwrap()]);
    assert!(
        dpkg_status().starts_with("install ok installed") && dpkg_status().ends_with("-1"),
        "{}",
        dpkg_status()
    );
    must("getent", &["passwd", "virt8ra"]);
    let meta = |p: &str| must("stat", &["-c", "%U:%G %a", p]).trim().to_string();
    assert_eq!(meta("/etc/virt8ra/server.env"), "root:virt8ra 640");
    assert_eq!(meta("/etc/virt8ra/agent.env"), "root:root 600");
    assert_eq!(meta("/var/lib/virt8ra/server"), "virt8ra:virt8ra 750");
    assert_eq!(meta("/var/lib/virt8ra/agent"), "root:root 700");

    // An operator's change to a setting survives an upgrade.
    let env = "/etc/virt8ra/server.env";
    let mut text = std::fs::read_to_string(env).unwrap();
    text.push_str("# kept across upgrades\n");
    std::fs::write(env, &text).unwrap();
    must("dpkg", &["-i", rev2.to_str().unwrap()]);
    assert!(dpkg_status().contains("0.1.0-2"), "{}", dpkg_status());
    assert!(std::fs::read_to_string(env)
        .unwrap()
        .contains("# kept across upgrades"));
    assert_eq!(meta(env), "root:virt8ra 640");

    let units = "/usr/lib/systemd/system";
    let verify = sh(
        "systemd-analyze",
        &[
            "verify",
            &format!("{units}/virt8ra-server.service"),
            &format!("{units}/virt8ra-agent.service"),
        ],
    );
    let complaints = String::from_utf8_lossy(&verify.stderr);
    // Without systemd as PID 1 (a container) verify cannot load the
    // default targets; anything else it says about our units is a fault.
    let ours: Vec<&str> = complaints
        .lines()
        .filter(|l| {
            l.contains("virt8ra")
                && !l.contains("sysinit.target")
                && !l.contains(".target not found")
        })
        .collect();
    assert!(ours.is_empty(), "systemd-analyze verify:\n{complaints}");

    run_as_the_units_do(&mut guard, units);
    // Stopped, as the package's prerm has systemd stop the units.
    guard.procs.clear();

    must("dpkg", &["--remove", "virt8ra"]);
    assert!(!Path::new("/usr/bin/virt8ra").exists());
    assert!(Path::new(env).exists(), "remove keeps the settings");
    must("dpkg", &["--purge", "virt8ra"]);
    assert!(
        !Path::new("/etc/virt8ra").exists(),
        "purge removes the settings"
    );
    for db in ["passwd", "group"] {
        assert!(
            !sh("getent", &[db, "virt8ra"]).status.success(),
            "purge removes the service's {db} entry"
        );
    }
    assert!(
        Path::new("/var/lib/virt8ra/server/virt8ra.db").exists(),
        "purge keeps the data"
    );
    drop(guard);
}

/// The control plane and an agent, started as their units start them, run
/// a real guest.
fn run_as_the_units_do(guard: &mut Installed, units: &str) {
    let server_unit = std::fs::read_to_string(format!("{units}/virt8ra-server.service")).unwrap();
    let agent_unit = std::fs::read_to_string(format!("{units}/virt8ra-agent.service")).unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let log = |name: &str| std::fs::File::create(format!("/tmp/virt8ra-deb-{name}.log")).unwrap();
    let server = Command::new("setpriv")
        .args(["--reuid", "virt8ra", "--regid", "virt8ra", "--init-groups"])
        .args(["--no-new-privs", "--inh-caps", "-all"])
        .args(["--bounding-set", &bounding_set(&server_unit)])
        .args([
            "/usr/bin/virt8ra",
            "server",
            "--data-dir",
            "/var/lib/virt8ra/server",
        ])
        .env("VIRT8RA_LISTEN", format!("127.0.0.1:{port}"))
        .stdout(log("server"))
        .stderr(log("server-err"))
        .spawn()
        .unwrap();
    guard.procs.push(Proc {
        child: server,
        name: "packaged server".into(),
    });
    let token_file = "/var/lib/virt8ra/server/admin.token";
    let token = wait_until(
        "the packaged server's admin token",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(token_file)
                .ok()
                .filter(|t| !t.trim().is_empty())
        },
    );
    assert_eq!(
        must("stat", &["-c", "%U %a", token_file]).trim(),
        "virt8ra 600",
        "the admin token is the service user's alone"
    );
    let cli = |args: &[&str]| -> String {
        let out = Command::new("/usr/bin/virt8ra")
            .args(args)
            .env("VIRT8RA_URL", &url)
            .env("VIRT8RA_TOKEN", token.trim())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "virt8ra {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_until(
        "the packaged server to answer",
        Duration::from_secs(30),
        || {
            sh(
                "/usr/bin/virt8ra",
                &["--url", &url, "--token", token.trim(), "provider", "list"],
            )
            .status
            .success()
            .then_some(())
        },
    );
    cli(&["provider", "create", "p-deb", "--country", "DE"]);
    cli(&[
        "site",
        "create",
        "s-deb",
        "--provider",
        "p-deb",
        "--country",
        "DE",
        "--city",
        "Berlin",
        "--lat",
        "52.52",
        "--lon",
        "13.40",
    ]);
    let join: Value = serde_json::from_str(&cli(&[
        "host",
        "join-token",
        "create",
        "--site",
        "s-deb",
        "-o",
        "json",
    ]))
    .unwrap();
    let agent = Command::new("setpriv")
        .args(["--bounding-set", &bounding_set(&agent_unit)])
        .args([
            "/usr/bin/virt8ra",
            "agent",
            "--data-dir",
            "/var/lib/virt8ra/agent",
        ])
        .args([
            "--name",
            "deb-host",
            "--vcpus",
            "2",
            "--memory-mib",
            "1024",
            "--disk-gib",
            "10",
        ])
        .env("VIRT8RA_SERVER", &url)
        .env("VIRT8RA_JOIN_TOKEN", join["token"].as_str().unwrap())
        .stdout(log("agent"))
        .stderr(log("agent-err"))
        .spawn()
        .unwrap();
    guard.procs.push(Proc {
        child: agent,
        name: "packaged agent".into(),
    });
    let image = common::test_image();
    cli(&["image", "import", image.to_str().unwrap(), "--name", "test"]);
    let vm: Value = serde_json::from_str(&cli(&[
        "vm",
        "create",
        "deb-vm",
        "--image",
        "test",
        "--memory-mib",
        "128",
        "--wait",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(vm["status"]["phase"], "running", "{vm}");
    wait_until_explained(
        "the packaged agent's guest to boot",
        Duration::from_secs(300),
        || {
            let c: Value =
                serde_json::from_str(&cli(&["vm", "console", "deb-vm", "-o", "json"])).ok()?;
            c["data"]
                .as_str()?
                .contains("VIRT8RA-GUEST-BOOTED")
                .then_some(())
        },
        || std::fs::read_to_string("/tmp/virt8ra-deb-agent-err.log").unwrap_or_default(),
    );
    cli(&["vm", "delete", "deb-vm", "--wait"]);
}
