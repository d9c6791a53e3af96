//! A throwaway PostgreSQL for tests: the store's tests run every rule
//! against it as well as SQLite, and the end-to-end tests start
//! `virt8ra server --database` on it. (Behind the `test-util` feature;
//! never in a release build.)
//!
//! [`PgCluster::start`] makes a cluster of its own in a temporary
//! directory with Debian's PostgreSQL programs (`initdb`, `pg_ctl`; no
//! system service, no port: it listens on a Unix socket in that directory
//! only, so clusters of tests running side by side never meet), and
//! [`PgCluster::create_database`] gives each test a fresh database in it
//! (`CREATE DATABASE` takes milliseconds; a cluster takes a second).
//! [`PgCluster::shared`] is one cluster per test binary.
//!
//! PostgreSQL refuses to run as root. Run as root (as CI and the
//! developers' machines do), the harness runs the server programs as the
//! unprivileged user `nobody` through `setpriv` (util-linux, on every
//! Debian), in a temporary directory it gives that user; run as anyone
//! else, it runs them as itself. The test process connects as the
//! database user `virt8ra`, trusted without a password on that socket.
//!
//! Clean-up cannot rely on `Drop` alone: the shared cluster is a static,
//! never dropped, and a test binary may die of a signal. So each cluster
//! has a watchdog, a shell in a process group of its own, that waits for
//! its standard input to close and then stops the cluster (`pg_ctl stop
//! -m immediate`) and removes the directory. The input is a pipe only the
//! test process holds, so it closes when the cluster is dropped or the
//! process ends, however it ends.
//!
//! When the programs are missing the test fails, saying to install
//! postgresql-15 (`scripts/deps.sh` does); `VIRT8RA_PG_BIN` names another
//! directory of them.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Where Debian's postgresql-15 puts the server programs.
const DEBIAN_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The database user the tests connect as (the cluster's superuser).
pub const USER: &str = "virt8ra";

/// Settings for a cluster that holds only throwaway data: no fsync (its
/// data need not survive a crash of the machine), room for every test's
/// connection pool at once.
const SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "''"),
    ("fsync", "off"),
    ("full_page_writes", "off"),
    ("max_connections", "400"),
    ("shared_buffers", "64MB"),
];

/// A PostgreSQL cluster of a test's own; stopped and removed when dropped
/// (or when the test process ends, see the module docs).
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// `Some((uid, gid))` of the user the server programs run as, when the
    /// test runs as root.
    owner: Option<(u32, u32)>,
    watchdog: Option<Child>,
    databases: AtomicUsize,
}

impl PgCluster {
    /// One cluster for the whole test binary, started on first use.
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(PgCluster::start)
    }

    /// Starts a cluster in a new temporary directory. Panics, saying why,
    /// when it cannot (the programs missing: install postgresql-15).
    pub fn start() -> PgCluster {
        let bin = find_bin();
        let dir = tempfile::Builder::new()
            .prefix("virt8ra-pg-")
            .tempdir()
            .unwrap();
        let owner = running_as_root().then(unprivileged_user);
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let mut cluster = PgCluster {
            dir,
            bin,
            owner,
            watchdog: None,
            databases: AtomicUsize::new(0),
        };
        // The watchdog first: a failure from here on still cleans up.
        cluster.watchdog = Some(cluster.spawn_watchdog());
        cluster.initdb();
        cluster.pg_ctl_start();
        cluster
    }

    /// The directory of the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The URL of `database` in this cluster (its host is the socket's
    /// directory, percent-encoded).
    pub fn url(&self, database: &str) -> String {
        let host: String = self
            .socket_dir()
            .to_string_lossy()
            .chars()
            .map(|c| match c {
                'A'..='Z' | 'a'..='z' | '0'..='9' | '-' | '_' | '.' | '~' => c.to_string(),
                c => {
                    let mut b = [0u8; 4];
                    c.encode_utf8(&mut b)
                        .bytes()
                        .map(|x| format!("%{x:02X}"))
                        .collect()
                }
            })
            .collect();
        format!("postgres://{USER}@{host}/{database}")
    }

    /// Creates a fresh, empty database and returns its URL.
    pub fn create_database(&self) -> String {
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        let name = format!("t{}_{n}", std::process::id());
        let out = Command::new(self.bin.join("createdb"))
            .arg("-h")
            .arg(self.socket_dir())
            .args(["-U", USER, &name])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "createdb {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(&name)
    }

    /// Runs `sql` on the database at `url` (one of this cluster's) with
    /// psql; its rows, unaligned, `|` between columns.
    pub fn psql(&self, url: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                url,
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A server program, run as the cluster's owner.
    fn program(&self, name: &str) -> Command {
        let path = self.bin.join(name);
        let mut cmd = match self.owner {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .args(["--clear-groups", "--"])
                    .arg(path);
                c
            }
            None => Command::new(path),
        };
        // Somewhere the owner may be (not, say, root's home).
        cmd.current_dir(self.dir.path());
        cmd
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn spawn_watchdog(&self) -> Child {
        let stop = self.program("pg_ctl");
        let mut argv = vec![stop.get_program().to_owned()];
        argv.extend(stop.get_args().map(|a| a.to_owned()));
        Command::new("sh")
            .arg("-c")
            .arg(
                "cat >/dev/null 2>&1; \
                 \"$@\" -D \"$PG_TEST_DATA\" stop -m immediate -w >/dev/null 2>&1; \
                 rm -rf \"$PG_TEST_DIR\"",
            )
            .arg("virt8ra-pg-watchdog")
            .args(argv)
            .env("PG_TEST_DATA", self.data_dir())
            .env("PG_TEST_DIR", self.dir.path())
            .current_dir(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Not in the test's process group: a ^C of the tests must
            // leave it to clean up.
            .process_group(0)
            .spawn()
            .unwrap()
    }

    fn initdb(&self) {
        let out = self
            .program("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-A", "trust", "-U", USER, "-E", "UTF8", "--no-locale", "-N"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pg_ctl_start(&self) {
        let mut opts = format!("-k {}", self.socket_dir().display());
        for (k, v) in SETTINGS {
            opts.push_str(&format!(" -c {k}={v}"));
        }
        let log = self.dir.path().join("postgres.log");
        let out = self
            .program("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "-o", &opts, "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            drop(w.stdin.take());
            let _ = w.wait();
        }
    }
}

fn find_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os("VIRT8RA_PG_BIN") {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("initdb").exists() && dir.join("pg_ctl").exists(),
            "VIRT8RA_PG_BIN={} has no initdb and pg_ctl: {MISSING}",
            dir.display()
        );
        return dir;
    }
    let debian = Path::new(DEBIAN_BIN);
    if debian.join("initdb").exists() {
        return debian.to_path_buf();
    }
    // Another major version from the distribution's packages, the newest.
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!("PostgreSQL's server programs are not in {DEBIAN_BIN}: {MISSING}"),
    }
}

/// What to do when the server programs are missing.
const MISSING: &str = "the store's tests and the PostgreSQL end-to-end test run a \
    PostgreSQL 15 of their own (initdb, pg_ctl). Install postgresql-15 (Debian: apt-get \
    install postgresql-15; scripts/deps.sh does it), or set VIRT8RA_PG_BIN to the directory \
    that has initdb and pg_ctl";

fn running_as_root() -> bool {
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// The uid and gid of `nobody`, whom the server programs run as under root.
fn unprivileged_user() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, "nobody"]).output().unwrap();
        assert!(out.status.success(), "no user nobody to run PostgreSQL as");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    (id("-u"), id("-g"))
}
