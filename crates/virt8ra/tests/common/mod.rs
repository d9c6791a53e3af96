//! A harness for end-to-end tests: the real `virt8ra` binary started as
//! separate processes (a control plane on SQLite and agents with the QEMU
//! driver), talked to over HTTP (or HTTPS, [`Cluster::start_tls`]) and
//! through the CLI.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_virt8ra")
}

/// Fails the test, saying how to fix it, unless the binary has fail points
/// compiled in (`env` sets a `*FAIL_AT` variable, which a build without
/// them ignores: the test would wait for a failure that never comes).
pub fn require_failpoints(env: &[(&str, &str)]) {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !env.iter().any(|(k, _)| k.ends_with("FAIL_AT")) {
        return;
    }
    let has = *HAS.get_or_init(|| {
        let out = Command::new(bin()).arg("--version").output().unwrap();
        String::from_utf8_lossy(&out.stdout).contains("fail points compiled in")
    });
    assert!(
        has,
        "this test injects failures, but {} was built without fail points: \
         run it with `cargo test --features virt8ra/failpoints` (scripts/test.sh does)",
        bin()
    );
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds (or reuses) the test appliance and returns its qcow2.
pub fn test_image() -> PathBuf {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/test-image.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/test-image.sh");
    assert!(out.status.success(), "scripts/test-image.sh failed");
    let p = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(p.is_file(), "{} is not a file", p.display());
    p
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An API answer (from [`Cluster::api`]) is an error of `status` whose
/// message mentions `needle`, with a machine-readable code.
pub fn assert_error(resp: (u16, Value), status: u16, needle: &str) {
    let (s, body) = resp;
    assert_eq!(s, status, "expected {status}, got {s}: {body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(needle),
        "error message {msg:?} does not mention {needle:?}"
    );
    assert!(body["error"]["code"].is_string(), "no error code: {body}");
}

pub fn wait_until<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    wait_until_explained(what, timeout, f, String::new)
}

/// [`wait_until`], and on a timeout the panic message ends with what
/// `explain` says (the state a failing test should show).
pub fn wait_until_explained<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
    explain: impl FnOnce() -> String,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                explain()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub url: String,
    pub token: String,
    pub server: Option<Proc>,
    pub agents: Vec<(String, Option<Proc>)>,
    /// Set when the control plane serves HTTPS.
    pub tls: Option<Tls>,
    /// Extra arguments for every start of the control plane.
    pub server_args: Vec<String>,
    /// The address the control plane listens on (127.0.0.1, or an address
    /// of a test-made bridge that agents in network namespaces reach).
    pub listen: String,
    http: reqwest::blocking::Client,
}

/// The PEM files of an HTTPS control plane: a test CA of its own (given to
/// the CLI and the agents) and a certificate it signed for 127.0.0.1 and
/// localhost.
#[derive(Debug, Clone)]
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A blocking client for tests that trusts the public roots and `ca`.
pub fn https_client(ca: Option<&Path>) -> reqwest::blocking::Client {
    let trust = virt8ra_tls::Trust::new(ca, "test").unwrap();
    reqwest::blocking::Client::builder()
        .use_preconfigured_tls((*trust.client_config()).clone())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Three providers in three EU countries, one site each.
pub const TOPOLOGY: &[(&str, &str, &str, &str, f64, f64)] = &[
    (
        "provider-es",
        "ES",
        "es-logrono",
        "Logroño",
        42.4627,
        -2.4449,
    ),
    (
        "provider-de",
        "DE",
        "de-frankfurt",
        "Frankfurt",
        50.1109,
        8.6821,
    ),
    ("provider-pl", "PL", "pl-gdansk", "Gdańsk", 54.3520, 18.6466),
];

impl Cluster {
    /// Starts a control plane on a fresh data directory.
    pub fn start() -> Cluster {
        Cluster::start_with(false, &[], "127.0.0.1")
    }

    /// Starts a control plane listening on `addr` (an address of a bridge
    /// the test made; never a public one) instead of loopback.
    pub fn start_on(addr: &str) -> Cluster {
        Cluster::start_with(false, &[], addr)
    }

    /// Starts a control plane on a fresh data directory, `server_args`
    /// passed to every start of it (e.g. `--database URL`).
    pub fn start_args(server_args: &[&str]) -> Cluster {
        Cluster::start_with(false, server_args, "127.0.0.1")
    }

    /// Starts a control plane that serves HTTPS with a certificate from a
    /// test CA made now; the CLI and agents of this cluster trust that CA.
    /// `server_args` are passed to every start of the control plane.
    pub fn start_tls(server_args: &[&str]) -> Cluster {
        Cluster::start_with(true, server_args, "127.0.0.1")
    }

    fn start_with(tls: bool, server_args: &[&str], listen: &str) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("virt8ra-e2e-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let tls = tls.then(|| {
            let ca = virt8ra_tls::testing::TestCa::new("virt8ra test CA");
            let issued = ca.issue(dir.path(), "server", &["127.0.0.1", "localhost"]);
            Tls {
                ca: ca.write(&dir.path().join("ca.pem")),
                cert: issued.cert,
                key: issued.key,
            }
        });
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut c = Cluster {
            url: format!("{scheme}://{listen}:{port}"),
            dir,
            port,
            token: String::new(),
            server: None,
            agents: Vec::new(),
            http: https_client(tls.as_ref().map(|t| t.ca.as_path())),
            tls,
            server_args: server_args.iter().map(|s| s.to_string()).collect(),
            listen: listen.to_string(),
        };
        c.start_server();
        c.token = std::fs::read_to_string(c.server_dir().join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        c
    }

    pub fn server_dir(&self) -> PathBuf {
        self.dir.path().join("server")
    }

    pub fn start_server(&mut self) {
        self.start_server_env(&[]);
    }

    /// Starts the control plane with extra environment (failure injection).
    pub fn start_server_env(&mut self, env: &[(&str, &str)]) {
        require_failpoints(env);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let child = Command::new(bin())
            .args([
                "server",
                "--listen",
                &format!("{}:{}", self.listen, self.port),
            ])
            .arg("--data-dir")
            .arg(self.server_dir())
            .args(["--heartbeat-interval", "1"])
            .args(self.tls.iter().flat_map(|t| {
                [
                    "--tls-cert".into(),
                    t.cert.clone().into_os_string(),
                    "--tls-key".into(),
                    t.key.clone().into_os_string(),
                ]
            }))
            .args(&self.server_args)
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.server = Some(Proc {
            child,
            name: "server".into(),
        });
        let url = format!("{}/healthz", self.url);
        wait_until(
            "the control plane to answer",
            Duration::from_secs(20),
            || {
                self.http
                    .get(&url)
                    .send()
                    .ok()
                    .filter(|r| r.status().is_success())
            },
        );
    }

    pub fn kill_server(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.kill();
        }
    }

    /// An API call; returns the status code and the JSON body (Null if none).
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.api_raw(method, path, body.map(|b| b.to_string()), Some(&self.token))
    }

    pub fn api_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut rb = self.http.request(m, format!("{}{}", self.url, path));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.header("content-type", "application/json").body(b);
        }
        let resp = rb.send().unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.api(method, path, body);
        assert!((200..300).contains(&s), "{method} {path} -> {s}: {v}");
        v
    }

    /// Runs the CLI against this cluster.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .env("VIRT8RA_URL", &self.url)
            .env("VIRT8RA_TOKEN", &self.token)
            .env("HOME", self.dir.path());
        if let Some(t) = &self.tls {
            cmd.env("VIRT8RA_CA_CERT", &t.ca);
        }
        cmd.output().unwrap()
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "virt8ra {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Creates the three providers and sites of [`TOPOLOGY`].
    pub fn create_topology(&self) {
        for (provider, country, site, city, lat, lon) in TOPOLOGY {
            self.ok(
                "POST",
                "/api/v1/providers",
                Some(json!({"name": provider, "country": country})),
            );
            self.ok(
                "POST",
                "/api/v1/sites",
                Some(
                    json!({"name": site, "provider": provider, "country": country,
                            "city": city, "latitude": lat, "longitude": lon}),
                ),
            );
        }
    }

    pub fn agent_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("agent-{name}"))
    }

    /// Joins and starts an agent named `name` at `site`.
    pub fn start_agent(&mut self, name: &str, site: Option<&str>) {
        self.start_agent_with(name, site, &[]);
    }

    /// Same, with extra agent arguments (e.g. `--driver sim`).
    pub fn start_agent_with(&mut self, name: &str, site: Option<&str>, extra: &[&str]) {
        self.start_agent_env(name, site, extra, &[]);
    }

    /// Same, with extra environment (failure injection).
    pub fn start_agent_env(
        &mut self,
        name: &str,
        site: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) {
        require_failpoints(env);
        let mut cmd = Command::new(bin());
        cmd.envs(env.iter().copied());
        cmd.args(["agent", "--server", &self.url, "--name", name])
            .arg("--data-dir")
            .arg(self.agent_dir(name))
            .args(["--vcpus", "4", "--memory-mib", "2048", "--disk-gib", "20"])
            .args(
                self.tls
                    .iter()
                    .flat_map(|t| ["--ca-cert".into(), t.ca.clone()]),
            )
            .args(extra)
            .env("VIRT8RA_LOG", "info");
        if let Some(site) = site {
            // From a file, as the README advises: a token on the command
            // line is visible to every local user.
            let t = self.ok("POST", "/api/v1/join-tokens", Some(json!({"site": site})));
            let file = self.dir.path().join(format!("agent-{name}.join-token"));
            std::fs::write(&file, t["token"].as_str().unwrap()).unwrap();
            cmd.arg("--join-token-file").arg(file);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("agent-{name}.log")))
            .unwrap();
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let p = Proc {
            child,
            name: name.into(),
        };
        match self.agents.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = Some(p),
            None => self.agents.push((name.to_string(), Some(p))),
        }
    }

    /// Kills agent `name` and, if the control plane runs, waits until it has
    /// seen the session end (so that a restarted agent's session is the one
    /// a later wait for connected hosts sees).
    pub fn kill_agent(&mut self, name: &str) {
        if let Some((_, Some(p))) = self.agents.iter_mut().find(|(n, _)| n == name) {
            p.kill();
        }
        if self.server.is_some() {
            wait_until(
                &format!("the control plane to see {name} go"),
                Duration::from_secs(60),
                || {
                    let (s, v) = self.api("GET", &format!("/api/v1/hosts/{name}"), None);
                    (s != 200 || v["connected"] == false).then_some(())
                },
            );
        }
    }

    /// Waits until `n` hosts are ready and connected.
    /// Imports an empty 16 MiB image as `tiny`: the API needs an image for
    /// a VM; simulated agents and pending VMs never read it.
    pub fn import_tiny_image(&self) {
        let img = self.dir.path().join("tiny.qcow2");
        assert!(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("16M")
            .status()
            .unwrap()
            .success());
        self.cli_ok(&["image", "import", img.to_str().unwrap(), "--name", "tiny"]);
    }

    pub fn wait_hosts_ready(&self, n: usize) {
        wait_until(
            &format!("{n} ready, connected hosts"),
            Duration::from_secs(90),
            || {
                let (s, v) = self.api("GET", "/api/v1/hosts?state=ready", None);
                let connected = v["items"]
                    .as_array()
                    .map(|a| a.iter().filter(|h| h["connected"] == true).count());
                (s == 200 && connected == Some(n)).then_some(())
            },
        );
    }

    pub fn vm(&self, name: &str) -> Value {
        self.ok("GET", &format!("/api/v1/vms/{name}"), None)
    }

    pub fn wait_phase(&self, name: &str, phase: &str, timeout: Duration) -> Value {
        wait_until(&format!("VM {name} to be {phase}"), timeout, || {
            let (s, v) = self.api("GET", &format!("/api/v1/vms/{name}"), None);
            if s == 200 && v["status"]["phase"] == "failed" && phase != "failed" {
                panic!("VM {name} failed: {}", v["status"]["last_error"]);
            }
            (s == 200 && v["status"]["phase"] == phase).then_some(v)
        })
    }

    /// The last `lines` lines of the control plane's and every agent's log
    /// (for a failing test to show what happened; the directory goes with it).
    pub fn logs_tail(&self, lines: usize) -> String {
        let mut names = vec!["server.log".to_string()];
        names.extend(self.agents.iter().map(|(n, _)| format!("agent-{n}.log")));
        let mut out = String::new();
        for n in names {
            let text = std::fs::read_to_string(self.dir.path().join(&n)).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {n} (last {lines} lines)\n"));
            for l in &all[all.len().saturating_sub(lines)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// The VM's console log; empty while its agent is not connected.
    pub fn console(&self, name: &str) -> String {
        let (s, v) = self.api("GET", &format!("/api/v1/vms/{name}/console"), None);
        if s == 503 {
            return String::new();
        }
        assert_eq!(s, 200, "console of {name}: {v}");
        v["data"].as_str().unwrap_or_default().to_string()
    }

    /// Pids of QEMU processes whose command line mentions this cluster's directory.
    pub fn qemu_pids(&self) -> Vec<u32> {
        qemu_pids_under(self.dir.path())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, a) in self.agents.iter_mut() {
            if let Some(p) = a {
                p.kill();
            }
        }
        self.kill_server();
        // Leave no guest behind, whatever the test did.
        for pid in self
            .qemu_pids()
            .into_iter()
            .chain(procs_under(self.dir.path(), "qemu-nbd"))
        {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        if std::env::var_os("VIRT8RA_KEEP_TEST_DIR").is_some() {
            let p = self.dir.path().to_path_buf();
            eprintln!("keeping {}", p.display());
            std::mem::forget(std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().unwrap(),
            ));
        }
    }
}

/// Live (non-zombie) QEMU processes with `dir` in their command line.
pub fn qemu_pids_under(dir: &Path) -> Vec<u32> {
    procs_under(dir, "qemu-system")
}

/// Live (non-zombie) processes whose command line contains `prog` and `dir`.
pub fn procs_under(dir: &Path, prog: &str) -> Vec<u32> {
    let needle = dir.to_string_lossy().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !cmd.contains(prog) || !cmd.contains(&needle) {
            continue;
        }
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false);
        if !zombie {
            out.push(pid);
        }
    }
    out
}
