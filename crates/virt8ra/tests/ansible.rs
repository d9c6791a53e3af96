//! The Ansible collection (`ansible/ansible_collections/virt8ra/continuum`)
//! end to end: Debian's `ansible-playbook` runs the playbooks of
//! `ansible/tests/` against a real control plane, and `ansible-inventory`
//! lists its VMs through the inventory plugin.
//!
//! The agents use the simulated driver (`--driver sim`): what the modules
//! manage and compare is the control plane's record (providers, sites,
//! images, networks, a VM's spec, power, phase and placement, apps), which
//! simulated hosts carry through the same protocol; no guest needs to boot.
//!
//! Skipped, saying so, where `ansible-playbook` is not installed
//! (`scripts/deps.sh` installs it, so CI runs it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{repo_root, wait_until, Cluster, Proc};
use serde_json::{json, Value};

fn have_ansible() -> bool {
    [
        "ansible",
        "ansible-playbook",
        "ansible-inventory",
        "ansible-doc",
    ]
    .iter()
    .all(|p| {
        Command::new(p)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn playbooks() -> PathBuf {
    repo_root().join("ansible/tests")
}

/// An Ansible command against `c`: the collection from the repository,
/// the URL and token from the environment, JSON output.
fn ansible(c: &Cluster, prog: &str) -> Command {
    let mut cmd = Command::new(prog);
    cmd.current_dir(c.dir.path())
        .env("ANSIBLE_COLLECTIONS_PATH", repo_root().join("ansible"))
        .env("ANSIBLE_STDOUT_CALLBACK", "json")
        .env("ANSIBLE_PYTHON_INTERPRETER", "auto_silent")
        .env("ANSIBLE_NOCOLOR", "1")
        .env("HOME", c.dir.path())
        .env("VIRT8RA_URL", &c.url)
        .env("VIRT8RA_TOKEN", &c.token)
        .stdin(Stdio::null());
    if let Some(t) = &c.tls {
        cmd.env("VIRT8RA_CA_CERT", &t.ca);
    }
    cmd
}

/// One module run ad hoc (`ansible localhost -m MODULE -a ARGS`): whether
/// it succeeded, and its JSON result.
fn adhoc(cmd: &mut Command, module: &str, args: &str) -> (bool, Value, String) {
    let out = cmd
        .args(["localhost", "-i", "localhost,", "-c", "local", "-m"])
        .arg(format!("virt8ra.continuum.{module}"))
        .args(["-a", args])
        .env("ANSIBLE_LOAD_CALLBACK_PLUGINS", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let result = v["plays"][0]["tasks"][0]["hosts"]["localhost"].clone();
    (out.status.success(), result, text)
}

fn playbook_cmd(c: &Cluster, file: &str, args: &[&str]) -> Command {
    let mut cmd = ansible(c, "ansible-playbook");
    cmd.args(["-i", "localhost,"])
        .arg(playbooks().join(file))
        .args(args);
    cmd
}

/// What a run printed (the json callback's document) and whether it
/// succeeded.
struct Run {
    ok: bool,
    out: Value,
    text: String,
}

impl Run {
    fn stat(&self, what: &str) -> u64 {
        self.out["stats"]["localhost"][what].as_u64().unwrap_or(0)
    }
}

fn finish(out: std::process::Output) -> Run {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("ansible's output is not JSON ({e}):\n{text}\n{err}"));
    Run {
        ok: out.status.success(),
        out: v,
        text: format!("{text}\n{err}"),
    }
}

fn playbook(c: &Cluster, file: &str, args: &[&str]) -> Run {
    finish(playbook_cmd(c, file, args).output().unwrap())
}

/// The state a run may not change (a VM's status and update time are left
/// out, but not its phase: the scheduler and agents write the rest).
fn snapshot(c: &Cluster) -> Value {
    let mut vms = c.ok("GET", "/api/v1/vms", None)["items"].take();
    for v in vms.as_array_mut().unwrap() {
        let o = v.as_object_mut().unwrap();
        let phase = o["status"]["phase"].clone();
        o.remove("status");
        o.remove("updated_at");
        o.insert("phase".into(), phase);
    }
    let apps: Vec<Value> = c
        .ok("GET", "/api/v1/apps", None)
        .as_array()
        .unwrap()
        .iter()
        .map(|a| json!({"name": a["name"], "status": a["status"], "appliance": a["appliance"]}))
        .collect();
    json!({
        "providers": c.ok("GET", "/api/v1/providers", None)["items"],
        "sites": c.ok("GET", "/api/v1/sites", None)["items"],
        "images": c.ok("GET", "/api/v1/images", None)["items"],
        "networks": c.ok("GET", "/api/v1/networks", None)["items"],
        "vms": vms,
        "apps": apps,
    })
}

fn names(c: &Cluster, path: &str) -> Vec<String> {
    let v = c.ok("GET", path, None);
    let items = v.get("items").unwrap_or(&v).as_array().unwrap().clone();
    let mut n: Vec<String> = items
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    n.sort();
    n
}

fn sha256_hex(p: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

/// The first run: started in the background, it creates the providers and
/// sites; agents join those sites while it waits for its VMs to run (as
/// hosts would join a declared estate).
fn first_run(c: &mut Cluster, disk: &Path) -> Run {
    let image_file = format!("image_file={}", disk.display());
    let log = c.dir.path().join("first-run.json");
    let errlog = c.dir.path().join("first-run.err");
    let child = playbook_cmd(c, "estate.yml", &["-e", &image_file])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&errlog).unwrap())
        .spawn()
        .unwrap();
    let mut run = Proc {
        child,
        name: "ansible-playbook".into(),
    };
    wait_until(
        "the playbook to create the sites",
        Duration::from_secs(120),
        || (names(c, "/api/v1/sites").len() == 3).then_some(()),
    );
    for site in ["es-logrono", "de-frankfurt", "pl-gdansk"] {
        let name = format!("sim-{}", &site[..2]);
        c.start_agent_with(&name, Some(site), &["--driver", "sim"]);
    }
    let status = wait_until("the first run to end", Duration::from_secs(300), || {
        run.child.try_wait().unwrap()
    });
    finish(std::process::Output {
        status,
        stdout: std::fs::read(&log).unwrap(),
        stderr: std::fs::read(&errlog).unwrap(),
    })
}

/// What the first run made, as the API shows it.
fn check_estate(c: &Cluster, disk: &Path) {
    let p = c.ok("GET", "/api/v1/providers/provider-de", None);
    assert_eq!(
        (&p["country"], &p["labels"]),
        (&json!("DE"), &json!({"tier": "gold"}))
    );
    assert_eq!(
        names(c, "/api/v1/providers"),
        ["provider-de", "provider-es", "provider-pl"]
    );
    let s = c.ok("GET", "/api/v1/sites/es-logrono", None);
    assert_eq!(
        (&s["provider"], &s["city"], &s["facts"]["pue"]),
        (&json!("provider-es"), &json!("Logroño"), &json!(1.2))
    );
    assert_eq!(s["tier"], "edge");
    let lab = c.ok("GET", "/api/v1/networks/lab", None);
    assert_eq!(
        (&lab["mtu"], &lab["gateway"], &lab["nat"]),
        (&json!(9000), &Value::Null, &json!(false)),
        "{lab}"
    );
    let img = c.ok("GET", "/api/v1/images/disk", None);
    assert_eq!(img["source_sha256"], sha256_hex(disk), "{img}");
    let n = c.ok("GET", "/api/v1/networks/backend", None);
    assert_eq!(
        (&n["cidr"], &n["gateway"]),
        (&json!("10.30.0.0/24"), &json!("10.30.0.1"))
    );
    let web = c.vm("web-es");
    assert_eq!(web["status"]["phase"], "running", "{web}");
    assert_eq!(web["status"]["country"], "ES");
    assert_eq!(web["status"]["nics"][0]["ip"], "10.30.0.10");
    assert_eq!(web["spec"]["memory_mib"], 128);
    let de = c.vm("web-de");
    assert_eq!(
        (&de["status"]["phase"], &de["status"]["site"]),
        (&json!("running"), &json!("de-frankfurt"))
    );
    assert_eq!(
        de["spec"]["placement"]["anti_affinity"],
        json!({"group": "web", "level": "site"})
    );
    assert_eq!(
        de["spec"]["ssh_authorized_keys"].as_array().map(Vec::len),
        Some(1)
    );
    let db = c.vm("db-pl");
    assert_eq!(db["spec"]["data_disks"], json!([{"size_gib": 2}]), "{db}");
    assert_eq!(
        (&db["power"], &db["status"]["country"]),
        (&json!("stopped"), &json!("PL"))
    );
    assert_eq!(db["labels"], json!({"role": "db"}));
    let app = c.ok("GET", "/api/v1/apps/shop", None);
    assert_eq!(
        (&app["status"], &app["appliance"]),
        (&json!("running"), &json!("local/tiny@0.1.0"))
    );
}

/// `ansible-inventory --list` through the plugin: the VMs grouped by
/// country, site and provider, with their addresses and hosts.
fn check_inventory(c: &Cluster) {
    let out = ansible(c, "ansible-inventory")
        .arg("-i")
        .arg(playbooks().join("inventory.virt8ra.yml"))
        .arg("--list")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inv: Value = serde_json::from_str(&text).unwrap();
    let hosts = |g: &str| {
        let mut h: Vec<String> = inv[g]["hosts"]
            .as_array()
            .unwrap_or_else(|| panic!("no group {g}: {inv}"))
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect();
        h.sort();
        h
    };
    assert_eq!(hosts("country_ES"), ["web-es"]);
    assert_eq!(hosts("country_DE"), ["web-de"]);
    assert_eq!(hosts("country_PL"), ["db-pl", "shop-pl-gdansk-1"]);
    assert_eq!(hosts("site_de_frankfurt"), ["web-de"]);
    assert_eq!(hosts("provider_provider_pl"), ["db-pl", "shop-pl-gdansk-1"]);
    assert_eq!(hosts("role_db"), ["db-pl"], "keyed_groups of the file");
    let web = &inv["_meta"]["hostvars"]["web-es"];
    assert_eq!(web["ansible_host"], "10.30.0.10", "{web}");
    assert_eq!(web["virt8ra_ips"], json!(["10.30.0.10"]));
    assert_eq!(web["virt8ra_host"], "sim-es");
    assert_eq!(web["virt8ra_phase"], "running");
    assert_eq!(
        inv["_meta"]["hostvars"]["db-pl"]["virt8ra_phase"],
        "stopped"
    );
}

/// A VM whose spec changed is recreated only when asked (`recreate`), and
/// not in check mode; then it has a new id and the new spec, and runs.
fn check_recreate(c: &Cluster) {
    let vm = |mem: u32, extra: &str| {
        format!(
            r#"{{"name": "re", "image": "disk", "memory_mib": {mem}, "placement": {{"country": "PL"}}{extra}}}"#
        )
    };
    let (ok, _, text) = adhoc(&mut ansible(c, "ansible"), "vm", &vm(128, ""));
    assert!(ok, "{text}");
    let id = c.vm("re")["id"].clone();
    let (ok, res, text) = adhoc(&mut ansible(c, "ansible"), "vm", &vm(192, ""));
    assert!(!ok, "{text}");
    assert_eq!(
        res["changes"],
        json!([{"field": "memory_mib", "from": 128, "to": 192}]),
        "{text}"
    );
    let mut check = ansible(c, "ansible");
    check.arg("--check");
    let (ok, res, text) = adhoc(&mut check, "vm", &vm(192, r#", "recreate": true"#));
    assert!(ok && res["changed"] == true, "{text}");
    assert_eq!(c.vm("re")["id"], id, "--check recreated it");
    let (ok, res, text) = adhoc(
        &mut ansible(c, "ansible"),
        "vm",
        &vm(192, r#", "recreate": true"#),
    );
    assert!(ok && res["changed"] == true, "{text}");
    let now = c.vm("re");
    assert_ne!(now["id"], id);
    assert_eq!(
        (&now["spec"]["memory_mib"], &now["status"]["phase"]),
        (&json!(192), &json!("running"))
    );
    let (ok, _, text) = adhoc(
        &mut ansible(c, "ansible"),
        "vm",
        r#"{"name": "re", "state": "absent"}"#,
    );
    assert!(ok, "{text}");
    assert_eq!(c.vm("re")["status"]["phase"], "deleted");
}

#[test]
fn playbooks_create_compare_check_and_delete_an_estate() {
    if !have_ansible() {
        eprintln!(
            "skipping: ansible, ansible-playbook, ansible-inventory or ansible-doc is not installed \
             (scripts/deps.sh installs Debian's ansible)"
        );
        return;
    }
    let mut c = Cluster::start();
    // Every module's and the inventory's documentation parses.
    for (kind, name) in [
        ("module", "provider"),
        ("module", "site"),
        ("module", "image"),
        ("module", "network"),
        ("module", "vm"),
        ("module", "app"),
        ("inventory", "virt8ra"),
    ] {
        let out = ansible(&c, "ansible-doc")
            .args(["-t", kind, &format!("virt8ra.continuum.{name}")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ansible-doc {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The appliance the playbook's app deploys (the collection has no
    // module that publishes appliances).
    c.import_tiny_image();
    c.ok(
        "POST",
        "/api/v1/appliances",
        Some(
            json!({"name": "tiny", "version": "0.1.0", "images": [{"name": "tiny"}],
                    "template": {"memory_mib": 64}}),
        ),
    );
    let disk = c.dir.path().join("disk.qcow2");
    assert!(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("16M")
        .status()
        .unwrap()
        .success());
    let image_file = format!("image_file={}", disk.display());

    let first = first_run(&mut c, &disk);
    assert!(
        first.ok,
        "first run failed:\n{}\n{}",
        first.text,
        c.logs_tail(30)
    );
    assert!(first.stat("changed") >= 8, "{}", first.out["stats"]);
    check_estate(&c, &disk);

    let second = playbook(&c, "estate.yml", &["-e", &image_file]);
    assert!(second.ok, "{}", second.text);
    assert_eq!(
        second.stat("changed"),
        0,
        "a second run changes nothing: {}",
        second.text
    );
    let before = snapshot(&c);

    // Check mode: every task of changed.yml would change something (an
    // update in place, creations, a stop, deletions); none is made.
    let check = playbook(&c, "changed.yml", &["--check", "--diff"]);
    assert!(check.ok, "{}", check.text);
    assert_eq!(check.stat("changed"), 8, "{}", check.out["stats"]);
    assert_eq!(snapshot(&c), before, "--check changed something");

    // What the API cannot change in place fails, naming the field, and
    // changes nothing.
    let bad = playbook(
        &c,
        "estate.yml",
        &["-e", &image_file, "-e", "web_memory_mib=512"],
    );
    assert!(!bad.ok);
    assert_eq!(bad.stat("failures"), 1, "{}", bad.out["stats"]);
    assert!(
        bad.text
            .contains("vm web-es: memory_mib cannot change in place (128 -> 512)"),
        "{}",
        bad.text
    );
    assert_eq!(snapshot(&c), before);
    // The API's own message, for a reference it cannot resolve.
    let adhoc = ansible(&c, "ansible")
        .args([
            "localhost",
            "-i",
            "localhost,",
            "-c",
            "local",
            "-m",
            "virt8ra.continuum.site",
            "-a",
        ])
        .arg("name=x provider=nope country=DE city=X latitude=1 longitude=2")
        .env("ANSIBLE_LOAD_CALLBACK_PLUGINS", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&adhoc.stdout);
    assert!(!adhoc.status.success());
    assert!(text.contains("POST /api/v1/sites: HTTP 4"), "{text}");
    assert!(text.contains("nope"), "{text}");
    assert_eq!(snapshot(&c), before);

    check_inventory(&c);
    check_recreate(&c);

    let gone = playbook(&c, "absent.yml", &[]);
    assert!(gone.ok, "{}\n{}", gone.text, c.logs_tail(30));
    assert!(names(&c, "/api/v1/vms").is_empty());
    assert!(names(&c, "/api/v1/apps").is_empty());
    assert!(names(&c, "/api/v1/networks").is_empty());
    assert!(names(&c, "/api/v1/sites").is_empty());
    assert!(names(&c, "/api/v1/providers").is_empty());
    assert_eq!(
        names(&c, "/api/v1/images"),
        ["tiny"],
        "the test's own image stays"
    );
    let again = playbook(&c, "absent.yml", &[]);
    assert!(again.ok, "{}", again.text);
    assert_eq!(again.stat("changed"), 0, "{}", again.text);
}

/// Over HTTPS with the operator's CA (`VIRT8RA_CA_CERT`), and without it a
/// failure that says why; an image the control plane fetches from a URL,
/// compared by its declared sha256; a wrong sum refused with the API's
/// message. No agents: nothing here needs a host.
#[test]
fn modules_over_https_and_an_image_from_a_url() {
    if !have_ansible() {
        eprintln!("skipping: ansible is not installed (scripts/deps.sh installs Debian's ansible)");
        return;
    }
    let c = Cluster::start_tls(&[]);
    // Without the CA: refused, saying the certificate is not trusted.
    let mut no_ca = ansible(&c, "ansible");
    no_ca.env_remove("VIRT8RA_CA_CERT");
    let (ok, res, text) = adhoc(&mut no_ca, "provider", "name=acme country=DE");
    assert!(!ok, "{text}");
    let msg = res["msg"].as_str().unwrap_or_default();
    assert!(msg.contains("cannot reach the control plane"), "{text}");
    assert!(msg.contains("CERTIFICATE_VERIFY_FAILED"), "{text}");
    assert_eq!(c.ok("GET", "/api/v1/providers", None)["items"], json!([]));

    // A plain HTTP file server on loopback the control plane fetches from.
    let files = c.dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    let disk = files.join("disk.qcow2");
    assert!(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("8M")
        .status()
        .unwrap()
        .success());
    let sha = sha256_hex(&disk);
    let port = common::free_port();
    let _server = Proc {
        child: Command::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
            ])
            .current_dir(&files)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        name: "http.server".into(),
    };
    wait_until("the file server", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let url = format!("http://127.0.0.1:{port}/disk.qcow2");
    let book = c.dir.path().join("https.yml");
    std::fs::write(
        &book,
        format!(
            "- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n\
             \x20   - virt8ra.continuum.provider: {{name: acme, country: DE}}\n\
             \x20   - virt8ra.continuum.image: {{name: fetched, image_url: \"{url}\", sha256: {sha}}}\n"
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let mut cmd = ansible(&c, "ansible-playbook");
        finish(
            cmd.args(["-i", "localhost,"])
                .arg(&book)
                .args(args)
                .output()
                .unwrap(),
        )
    };
    let check = run(&["--check"]);
    assert!(check.ok, "{}", check.text);
    assert_eq!(check.stat("changed"), 2);
    assert_eq!(c.ok("GET", "/api/v1/providers", None)["items"], json!([]));
    let first = run(&[]);
    assert!(first.ok, "{}", first.text);
    assert_eq!(first.stat("changed"), 2);
    let img = c.ok("GET", "/api/v1/images/fetched", None);
    // The sum of the file as fetched (the stored copy's, as it needed no
    // conversion).
    let got = img["source_sha256"].as_str().or(img["sha256"].as_str());
    assert_eq!(got, Some(sha.as_str()), "{img}");
    assert_eq!(img["provenance"], json!(url));
    let second = run(&[]);
    assert_eq!(second.stat("changed"), 0, "{}", second.text);

    // A wrong sum: the API's refusal, and no image.
    let (ok, res, text) = adhoc(
        &mut ansible(&c, "ansible"),
        "image",
        &format!("name=bad image_url={url} sha256={}", "0".repeat(64)),
    );
    assert!(!ok, "{text}");
    assert!(
        res["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("checksum mismatch"),
        "{text}"
    );
    assert_eq!(c.api("GET", "/api/v1/images/bad", None).0, 404);

    // The inventory over HTTPS: no VMs, no error.
    let out = ansible(&c, "ansible-inventory")
        .arg("-i")
        .arg(playbooks().join("inventory.virt8ra.yml"))
        .arg("--list")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inv: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inv["_meta"]["hostvars"], json!({}), "{inv}");
}

/// The Python the installed Ansible runs on (the last parenthesis of the
/// `python version` line of `ansible --version`).
fn ansible_python() -> String {
    let out = Command::new("ansible").arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("python version"))
        .unwrap_or_else(|| panic!("no python version in: {text}"));
    let start = line.rfind('(').unwrap() + 1;
    let end = line.rfind(')').unwrap();
    line[start..end].to_string()
}

/// The collection's Python unit tests (ansible/tests/unit: comparison
/// rules, the API's defaults, the HTTP client's errors against a real
/// socket), with the Python Ansible uses.
#[test]
fn python_unit_tests_of_the_collection() {
    if !have_ansible() {
        eprintln!("skipping: ansible is not installed (scripts/deps.sh installs Debian's ansible)");
        return;
    }
    let root = repo_root();
    let out = Command::new(ansible_python())
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(root.join("ansible/tests/unit"))
        .env("PYTHONPATH", root.join("ansible"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("\nOK"), "{err}");
}
