//! `virt8ra apply -f FILE`, end to end through the CLI against a real
//! control plane (no agents: declared VMs stay pending, which is enough to
//! create, update, delete and compare them).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{assert_error, Cluster};
use serde_json::{json, Value};

/// Everything the store holds, to check that a run changed nothing (a VM's
/// status and update time are left out: the scheduler writes its placement
/// reason on its own).
fn snapshot(c: &Cluster) -> Value {
    let mut vms = c.ok("GET", "/api/v1/vms?include_deleted=true", None)["items"].take();
    for v in vms.as_array_mut().unwrap() {
        let o = v.as_object_mut().unwrap();
        let phase = o["status"]["phase"].clone();
        o.remove("status");
        o.remove("updated_at");
        o.insert("phase".into(), phase);
    }
    json!({
        "providers": c.ok("GET", "/api/v1/providers", None)["items"],
        "sites": c.ok("GET", "/api/v1/sites", None)["items"],
        "images": c.ok("GET", "/api/v1/images", None)["items"],
        "vms": vms,
    })
}

/// A small raw disk (the import converts it to qcow2, so the stored sha256
/// differs from the file's: apply must still see it as unchanged).
fn raw_disk(dir: &Path, name: &str, fill: u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, vec![fill; 1 << 20]).unwrap();
    p
}

const FILE: &str = r#"# a small estate
providers:
  - name: acme
    country: DE
  - name: nordic
    country: SE
    jurisdiction: EU
sites:
  - name: de-fra
    provider: acme
    country: DE
    city: Frankfurt
    latitude: 50.1109
    longitude: 8.6821
    facts:
      pue: 1.2
    labels:
      zone: a
  - name: se-sto
    provider: nordic
    country: SE
    city: Stockholm
    latitude: 59.3293
    longitude: 18.0686
    tier: edge
images:
  - name: tiny
    file: disks/tiny.raw
vms:
  - name: web-1
    image: tiny
    memory_mib: 128
    placement:
      site: de-fra
  - name: web-2
    image: tiny
    placement:
      country: SE
    data_disks:
      - image: tiny
      - size_gib: 2
"#;

struct Fixture {
    c: Cluster,
    file: PathBuf,
}

impl Fixture {
    fn new(text: &str) -> Fixture {
        let c = Cluster::start();
        let dir = c.dir.path().join("iac");
        std::fs::create_dir_all(dir.join("disks")).unwrap();
        raw_disk(&dir.join("disks"), "tiny.raw", 0);
        let file = dir.join("estate.yaml");
        std::fs::write(&file, text).unwrap();
        Fixture { c, file }
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.file, text).unwrap();
    }

    fn apply(&self, extra: &[&str]) -> Value {
        let f = self.file.to_str().unwrap();
        let mut args = vec!["apply", "-f", f, "-o", "json"];
        args.extend_from_slice(extra);
        serde_json::from_str(&self.c.cli_ok(&args)).unwrap()
    }

    /// Runs apply expecting failure; returns stderr.
    fn apply_err(&self, extra: &[&str]) -> String {
        let f = self.file.to_str().unwrap();
        let mut args = vec!["apply", "-f", f];
        args.extend_from_slice(extra);
        let out = self.c.cli(&args);
        assert!(!out.status.success(), "apply unexpectedly succeeded");
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert_eq!(err.lines().count(), 1, "not a one-line error: {err}");
        err
    }
}

fn actions(report: &Value) -> Vec<(String, String, String)> {
    report["plan"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap().to_string(),
                r["name"].as_str().unwrap().to_string(),
                r["action"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn count(report: &Value, action: &str) -> usize {
    actions(report).iter().filter(|a| a.2 == action).count()
}

/// First apply creates, in dependency order; a dry run before it changes
/// nothing; a second apply is a no-op and says so.
#[test]
fn apply_creates_then_second_apply_is_a_no_op() {
    let f = Fixture::new(FILE);
    let before = snapshot(&f.c);
    let plan = f.apply(&["--dry-run"]);
    assert_eq!(plan["changed"], true);
    assert_eq!(plan["applied"], false);
    assert_eq!(count(&plan, "create"), 7, "{plan}");
    let kinds: Vec<String> = actions(&plan).into_iter().map(|a| a.0).collect();
    assert_eq!(
        kinds,
        ["provider", "provider", "site", "site", "image", "vm", "vm"]
    );
    assert_eq!(snapshot(&f.c), before, "a dry run changed something");

    let done = f.apply(&[]);
    assert_eq!(done["applied"], true);
    assert_eq!(count(&done, "create"), 7);
    let site = f.c.ok("GET", "/api/v1/sites/de-fra", None);
    assert_eq!(site["facts"]["pue"], 1.2);
    assert_eq!(site["labels"]["zone"], "a");
    assert_eq!(site["labels"]["virt8ra.io/managed-by"], "apply");
    let vm = f.c.vm("web-1");
    assert_eq!(vm["spec"]["memory_mib"], 128);
    assert_eq!(
        f.c.vm("web-2")["spec"]["data_disks"],
        json!([{"image": "tiny"}, {"size_gib": 2}])
    );
    assert_eq!(vm["labels"]["virt8ra.io/managed-by"], "apply");
    assert_eq!(vm["status"]["phase"], "pending");
    let img = f.c.ok("GET", "/api/v1/images/tiny", None);
    assert_eq!(img["source_format"], "raw");

    // Second apply: nothing to do, in JSON and in the table.
    let after_first = snapshot(&f.c);
    let again = f.apply(&[]);
    assert_eq!(again["changed"], false, "{again}");
    assert_eq!(again["applied"], false);
    assert_eq!(count(&again, "unchanged"), 7);
    let table = f.c.cli_ok(&["apply", "-f", f.file.to_str().unwrap()]);
    assert!(table.contains("no changes"), "{table}");
    let dry =
        f.c.cli_ok(&["apply", "-f", f.file.to_str().unwrap(), "--dry-run"]);
    assert!(dry.contains("no changes"), "{dry}");
    assert_eq!(
        snapshot(&f.c),
        after_first,
        "a no-op apply changed something"
    );
}

/// A change to one field is an update of that field only; fields that cannot
/// change in place are plan errors; a changed image file is a replace,
/// refused while VMs use it.
#[test]
fn apply_updates_only_what_changed() {
    let f = Fixture::new(FILE);
    f.apply(&[]);

    // One field of one site.
    f.write(&FILE.replace("pue: 1.2", "pue: 1.4"));
    let before = snapshot(&f.c);
    let plan = f.apply(&["--dry-run"]);
    let changed: Vec<&Value> = plan["plan"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] != "unchanged")
        .collect();
    assert_eq!(changed.len(), 1, "{plan}");
    assert_eq!(changed[0]["kind"], "site");
    assert_eq!(changed[0]["name"], "de-fra");
    assert_eq!(changed[0]["action"], "update");
    assert_eq!(
        changed[0]["changes"],
        json!([{"field": "facts.pue", "from": 1.2, "to": 1.4}])
    );
    assert_eq!(snapshot(&f.c), before, "a dry run changed something");
    let done = f.apply(&[]);
    assert_eq!(count(&done, "update"), 1);
    let site = f.c.ok("GET", "/api/v1/sites/de-fra", None);
    assert_eq!(site["facts"]["pue"], 1.4);
    assert_eq!(site["labels"]["zone"], "a");
    assert_eq!(
        site["labels"]["virt8ra.io/managed-by"], "apply",
        "the update dropped the marker"
    );
    assert_eq!(f.apply(&[])["changed"], false);

    // A provider's jurisdiction, and a VM's power (start: false).
    let text = FILE
        .replace("pue: 1.2", "pue: 1.4")
        .replace("jurisdiction: EU", "jurisdiction: EEA")
        .replace(
            "  - name: web-2\n    image: tiny\n",
            "  - name: web-2\n    image: tiny\n    start: false\n",
        );
    f.write(&text);
    let done = f.apply(&[]);
    assert_eq!(count(&done, "update"), 2, "{done}");
    assert_eq!(
        f.c.ok("GET", "/api/v1/providers/nordic", None)["jurisdiction"],
        "EEA"
    );
    let vm = f.c.vm("web-2");
    assert_eq!(vm["power"], "stopped");
    assert_eq!(f.apply(&[])["changed"], false);

    // An immutable field: an error naming the field and its line; nothing changes.
    f.write(&text.replace("memory_mib: 128", "memory_mib: 512"));
    let before = snapshot(&f.c);
    let err = f.apply_err(&[]);
    assert!(err.contains("estate.yaml:32:"), "{err}");
    assert!(
        err.contains("vm web-1: memory_mib cannot change in place (128 -> 512)"),
        "{err}"
    );
    let err = f.apply_err(&["--dry-run"]);
    assert!(err.contains("memory_mib cannot change in place"), "{err}");
    assert_eq!(snapshot(&f.c), before);
    assert!(err.contains("or apply with --replace"), "{err}");
    // Data disks too.
    f.write(&text.replace("size_gib: 2", "size_gib: 3"));
    let err = f.apply_err(&[]);
    assert!(
        err.contains("vm web-2: data_disks cannot change in place"),
        "{err}"
    );
    assert_eq!(snapshot(&f.c), before);
    f.write(&text.replace("memory_mib: 128", "memory_mib: 512"));

    // ... unless the operator asks for a replace: deleted, then created anew.
    let old_id = f.c.vm("web-1")["id"].clone();
    let done = f.apply(&["--replace"]);
    assert_eq!(
        actions(&done)
            .into_iter()
            .filter(|a| a.2 != "unchanged")
            .collect::<Vec<_>>(),
        [("vm".into(), "web-1".into(), "replace".into())]
    );
    let vm = f.c.vm("web-1");
    assert_ne!(vm["id"], old_id);
    assert_eq!(vm["spec"]["memory_mib"], 512);
    assert_eq!(f.apply(&[])["changed"], false);
    f.write(&text);
    f.apply(&["--replace"]);
    let before = snapshot(&f.c);

    // New image content under the same name: a replace, refused while VMs use it.
    f.write(&text);
    raw_disk(&f.file.parent().unwrap().join("disks"), "tiny.raw", 7);
    let err = f.apply_err(&[]);
    assert!(
        err.contains("image tiny: cannot replace it while VM(s) web-1, web-2 use it"),
        "{err}"
    );
    assert_eq!(snapshot(&f.c), before);
}

/// Unknown fields and invalid values are reported with the file's line, on
/// one line, with a non-zero exit, and nothing is created.
#[test]
fn apply_reports_bad_files_with_their_line() {
    let f = Fixture::new(FILE);
    let before = snapshot(&f.c);

    f.write(&FILE.replace("    city: Stockholm\n", "    city: Stockholm\n    cty: x\n"));
    let err = f.apply_err(&[]);
    assert!(err.contains("estate.yaml:23:"), "{err}");
    assert!(err.contains("unknown field `cty`"), "{err}");

    f.write(&FILE.replace(
        "country: SE\n    jurisdiction",
        "country: XX\n    jurisdiction",
    ));
    let err = f.apply_err(&["--dry-run"]);
    assert!(err.contains("estate.yaml:6:"), "{err}");
    assert!(err.contains("unknown country code \"XX\""), "{err}");

    f.write(&FILE.replace("memory_mib: 128", "memory_mib: 1"));
    let err = f.apply_err(&[]);
    assert!(err.contains("estate.yaml:32:"), "{err}");
    assert!(err.contains("memory_mib 1 is outside"), "{err}");

    f.write(&FILE.replace("latitude: 50.1109", "latitude: north"));
    let err = f.apply_err(&[]);
    assert!(err.contains("estate.yaml:13:"), "{err}");

    f.write(&FILE.replace(
        "image: tiny\n    placement:\n      country",
        "image: nope\n    placement:\n      country",
    ));
    let err = f.apply_err(&[]);
    assert!(err.contains("estate.yaml:36:"), "{err}");
    assert!(
        err.contains("image \"nope\" is neither declared nor known"),
        "{err}"
    );

    f.write(&format!(
        "{FILE}apps:\n  - name: shop\n    appliance: web\n    locations: [DE]\n    replica: 2\n"
    ));
    let err = f.apply_err(&[]);
    assert!(err.contains("estate.yaml:46:"), "{err}");
    assert!(err.contains("unknown field `replica`"), "{err}");

    assert_eq!(snapshot(&f.c), before, "a rejected file changed something");
}

/// Without --prune, what the file no longer declares is left alone; with it,
/// only what apply created is deleted (VMs first, providers last), never
/// what was made by hand.
#[test]
fn prune_deletes_only_managed_resources() {
    let f = Fixture::new(FILE);
    // Made by hand: a provider, and a site of a declared provider.
    f.c.ok(
        "POST",
        "/api/v1/providers",
        Some(json!({"name": "handmade", "country": "FR"})),
    );
    f.apply(&[]);
    f.c.ok(
        "POST",
        "/api/v1/sites",
        Some(
            json!({"name": "de-ber", "provider": "acme", "country": "DE",
                    "city": "Berlin", "latitude": 52.52, "longitude": 13.405}),
        ),
    );

    // Drop the nordic provider, its site and web-2 from the file.
    let smaller = FILE
        .replace(
            "  - name: nordic\n    country: SE\n    jurisdiction: EU\n",
            "",
        )
        .replace(
            "  - name: se-sto\n    provider: nordic\n    country: SE\n    city: Stockholm\n    latitude: 59.3293\n    longitude: 18.0686\n    tier: edge\n",
            "",
        )
        .replace(
            "  - name: web-2\n    image: tiny\n    placement:\n      country: SE\n    data_disks:\n      - image: tiny\n      - size_gib: 2\n",
            "",
        );
    f.write(&smaller);
    let left = f.apply(&[]);
    assert_eq!(left["changed"], false, "{left}");
    assert!(f.c.api("GET", "/api/v1/providers/nordic", None).0 == 200);

    let plan = f.apply(&["--prune", "--dry-run"]);
    let deletes: Vec<(String, String, String)> = actions(&plan)
        .into_iter()
        .filter(|a| a.2 == "delete")
        .collect();
    assert_eq!(
        deletes,
        [
            ("provider".into(), "nordic".into(), "delete".into()),
            ("site".into(), "se-sto".into(), "delete".into()),
            ("vm".into(), "web-2".into(), "delete".into()),
        ]
    );
    let done = f.apply(&["--prune"]);
    assert_eq!(count(&done, "delete"), 3, "{done}");
    assert_eq!(f.c.api("GET", "/api/v1/providers/nordic", None).0, 404);
    assert_eq!(f.c.api("GET", "/api/v1/sites/se-sto", None).0, 404);
    assert_eq!(f.c.vm("web-2")["status"]["phase"], "deleted");
    // Hand-made resources stay, and so does everything still declared.
    assert_eq!(f.c.api("GET", "/api/v1/providers/handmade", None).0, 200);
    assert_eq!(f.c.api("GET", "/api/v1/sites/de-ber", None).0, 200);
    assert_eq!(f.c.vm("web-1")["status"]["phase"], "pending");
    assert_eq!(f.apply(&["--prune"])["changed"], false);
}

/// Serves `body` over HTTP on a loopback port; returns the URL and a counter
/// of requests.
fn serve(body: Vec<u8>) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/tiny.raw", l.local_addr().unwrap());
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
        }
    });
    (url, hits)
}

/// An image from a URL: downloaded and imported; with its sha256 declared,
/// a second apply needs no download; a wrong sha256 is refused before any
/// change.
#[test]
fn url_images_are_checked_by_sha256() {
    use sha2::Digest;
    let body = vec![3u8; 1 << 20];
    let sha = hex::encode(sha2::Sha256::digest(&body));
    let (url, hits) = serve(body);
    let f = Fixture::new(&format!("images:\n  - name: remote\n    url: {url}\n"));
    let done = f.apply(&[]);
    assert_eq!(count(&done, "create"), 1, "{done}");
    assert_eq!(
        f.c.ok("GET", "/api/v1/images/remote", None)["source_sha256"],
        sha.as_str()
    );
    assert_eq!(f.apply(&[])["changed"], false);

    f.write(&format!(
        "images:\n  - name: remote\n    url: {url}\n    sha256: {sha}\n"
    ));
    let n = hits.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(f.apply(&[])["changed"], false);
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        n,
        "downloaded again"
    );

    let before = snapshot(&f.c);
    f.write(&format!(
        "images:\n  - name: remote\n    url: {url}\n    sha256: {sha}\n  - name: other\n    url: {url}\n    sha256: {}\n",
        "0".repeat(64)
    ));
    let err = f.apply_err(&[]);
    assert!(err.contains("not the declared"), "{err}");
    assert_eq!(snapshot(&f.c), before);
}

/// The update endpoints apply uses check what they are given like create does.
#[test]
fn provider_and_site_updates_are_validated() {
    let c = Cluster::start();
    c.create_topology();
    assert_error(
        c.api(
            "PATCH",
            "/api/v1/sites/de-frankfurt",
            Some(json!({"facts": {"pue": 0.5}})),
        ),
        400,
        "pue",
    );
    let (s, _) = c.api(
        "PATCH",
        "/api/v1/sites/de-frankfurt",
        Some(json!({"country": "FR"})),
    );
    assert_eq!(s, 400, "a site's country cannot change");
    let (s, _) = c.api(
        "PATCH",
        "/api/v1/providers/provider-de",
        Some(json!({"country": "XX"})),
    );
    assert_eq!(s, 400);
    let p = c.ok(
        "PATCH",
        "/api/v1/providers/provider-de",
        Some(json!({"jurisdiction": "EEA", "labels": {"tier": "gold"}})),
    );
    assert_eq!(p["jurisdiction"], "EEA");
    assert_eq!(p["country"], "DE");
    let site = c.ok(
        "PATCH",
        "/api/v1/sites/de-frankfurt",
        Some(json!({"city": "Offenbach", "labels": {"zone": "b"}})),
    );
    assert_eq!(site["city"], "Offenbach");
    assert_eq!(site["labels"]["zone"], "b");
    assert_eq!(
        c.ok("GET", "/api/v1/sites/de-frankfurt", None)["city"],
        "Offenbach"
    );
}

/// With a (simulated) host: a VM's power is changed in place, and pruning a
/// running VM and its image waits for the host to remove the VM before the
/// image is deleted (deletions run VMs first).
#[test]
fn prune_deletes_a_running_vm_before_its_image() {
    let text = "providers:\n  - name: acme\n    country: DE\nsites:\n  - name: de-fra\n    provider: acme\n    country: DE\n    city: Frankfurt\n    latitude: 50.11\n    longitude: 8.68\nimages:\n  - name: tiny\n    file: disks/tiny.raw\nvms:\n  - name: web-1\n    image: tiny\n    memory_mib: 128\n    placement:\n      site: de-fra\n";
    let mut f = Fixture::new(text);
    f.apply(&[]);
    f.c.start_agent_with("sim-0", Some("de-fra"), &["--driver", "sim"]);
    f.c.wait_hosts_ready(1);
    f.c.wait_phase("web-1", "running", std::time::Duration::from_secs(60));
    assert_eq!(f.apply(&[])["changed"], false);

    f.write(&text.replace("memory_mib: 128\n", "memory_mib: 128\n    start: false\n"));
    let done = f.apply(&[]);
    assert_eq!(count(&done, "update"), 1, "{done}");
    f.c.wait_phase("web-1", "stopped", std::time::Duration::from_secs(60));
    assert_eq!(f.apply(&[])["changed"], false);

    f.write(text.split("images:").next().unwrap());
    let done = f.apply(&["--prune"]);
    let deletes: Vec<(String, String, String)> = actions(&done)
        .into_iter()
        .filter(|a| a.2 == "delete")
        .collect();
    assert_eq!(
        deletes,
        [
            ("image".into(), "tiny".into(), "delete".into()),
            ("vm".into(), "web-1".into(), "delete".into()),
        ]
    );
    assert_eq!(f.c.vm("web-1")["status"]["phase"], "deleted");
    assert_eq!(f.c.api("GET", "/api/v1/images/tiny", None).0, 404);
    assert_eq!(f.c.api("GET", "/api/v1/sites/de-fra", None).0, 200);
    assert_eq!(f.apply(&["--prune"])["changed"], false);
}

/// An image whose file changed (and that no VM uses) is replaced: deleted
/// and imported again; the next apply is a no-op.
#[test]
fn changed_image_file_is_replaced() {
    let f = Fixture::new("images:\n  - name: tiny\n    file: disks/tiny.raw\n");
    f.apply(&[]);
    let old = f.c.ok("GET", "/api/v1/images/tiny", None);
    raw_disk(&f.file.parent().unwrap().join("disks"), "tiny.raw", 9);
    let plan = f.apply(&["--dry-run"]);
    assert_eq!(
        actions(&plan),
        [("image".into(), "tiny".into(), "replace".into())]
    );
    assert_eq!(plan["plan"][0]["changes"][0]["field"], "sha256");
    assert_eq!(plan["plan"][0]["changes"][0]["from"], old["source_sha256"]);
    f.apply(&[]);
    let new = f.c.ok("GET", "/api/v1/images/tiny", None);
    assert_ne!(new["source_sha256"], old["source_sha256"]);
    assert_eq!(new["labels"]["virt8ra.io/managed-by"], "apply");
    assert_eq!(f.apply(&[])["changed"], false);
}

// ------------------------------------------------------------------- apps

/// Sites in Germany and Sweden, the image an appliance boots from.
const APPS_BASE: &str = "providers:\n  - name: acme\n    country: DE\n  - name: nordic\n    country: SE\nsites:\n  - name: de-fra\n    provider: acme\n    country: DE\n    city: Frankfurt\n    latitude: 50.11\n    longitude: 8.68\n  - name: se-sto\n    provider: nordic\n    country: SE\n    city: Stockholm\n    latitude: 59.33\n    longitude: 18.07\nimages:\n  - name: tiny\n    file: disks/tiny.raw\n";

/// One app (lines 22-28 of the file).
const APP: &str = "apps:\n  - name: shop\n    appliance: tiny-app\n    locations:\n      - de-fra\n    params:\n      greeting: hello\n";

/// The base applied, a simulated host at each site, and an appliance
/// `tiny-app` published in the local catalog that boots from `tiny`.
fn apps_fixture() -> Fixture {
    let mut f = Fixture::new(APPS_BASE);
    f.apply(&[]);
    f.c.start_agent_with("sim-de", Some("de-fra"), &["--driver", "sim"]);
    f.c.start_agent_with("sim-se", Some("se-sto"), &["--driver", "sim"]);
    f.c.wait_hosts_ready(2);
    let appliance = f.file.parent().unwrap().join("tiny-app.json");
    std::fs::write(
        &appliance,
        json!({
            "name": "tiny-app", "version": "1.0.0",
            "images": [{"name": "tiny"}],
            "template": {"vcpus": 1, "memory_mib": 64, "disk_gib": 1},
            "parameters": [
                {"name": "greeting", "type": "string", "default": "hi"},
                {"name": "workers", "type": "integer", "default": 2}
            ]
        })
        .to_string(),
    )
    .unwrap();
    f.c.cli_ok(&["appliance", "publish", appliance.to_str().unwrap()]);
    f
}

fn app(c: &Cluster, name: &str) -> (u16, Value) {
    c.api("GET", &format!("/api/v1/apps/{name}"), None)
}

fn app_locations(a: &Value) -> Vec<String> {
    a["locations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["location"].as_str().unwrap().to_string())
        .collect()
}

/// An app is planned (dry run) and created after everything else; a second
/// apply is a no-op; an unknown appliance and a changed location are plan
/// errors with their line; with --replace the app is deployed again.
#[test]
fn apps_are_created_then_unchanged_and_replaced_only_on_request() {
    let f = apps_fixture();
    let text = format!("{APPS_BASE}{APP}");
    // An unknown location: an error with its line, before any change.
    f.write(&text.replace("- de-fra", "- atlantis"));
    let err = f.apply_err(&[]);
    assert!(err.contains("estate.yaml:25:"), "{err}");
    assert!(
        err.contains("location \"atlantis\" is neither a declared or known site"),
        "{err}"
    );
    f.write(&text);

    let plan = f.apply(&["--dry-run"]);
    assert_eq!(plan["changed"], true);
    assert_eq!(
        actions(&plan).last().unwrap(),
        &("app".into(), "shop".into(), "create".into()),
        "{plan}"
    );
    assert_eq!(count(&plan, "create"), 1, "{plan}");
    assert_eq!(app(&f.c, "shop").0, 404, "a dry run deployed the app");

    let done = f.apply(&[]);
    assert_eq!(done["applied"], true);
    assert_eq!(count(&done, "create"), 1, "{done}");
    let (st, a) = app(&f.c, "shop");
    assert_eq!(st, 200, "{a}");
    assert_eq!(a["appliance"], "local/tiny-app@1.0.0");
    assert_eq!(a["labels"]["virt8ra.io/managed-by"], "apply");
    assert_eq!(a["params"]["greeting"], "hello");
    assert_eq!(a["params"]["workers"], 2);
    assert_eq!(app_locations(&a), ["de-fra"]);
    assert_eq!(a["vms"].as_array().unwrap().len(), 1, "{a}");
    // The replica is not marked: pruning VMs never touches it.
    let replica = f.c.vm("shop-de-fra-1");
    assert!(
        replica["labels"]["virt8ra.io/managed-by"].is_null(),
        "{replica}"
    );

    // Second apply: nothing to do (the appliance named without version and
    // the parameters' defaults compare as deployed).
    let again = f.apply(&[]);
    assert_eq!(again["changed"], false, "{again}");
    assert_eq!(count(&again, "unchanged"), 6, "{again}");
    let table = f.c.cli_ok(&["apply", "-f", f.file.to_str().unwrap()]);
    assert!(table.contains("no changes"), "{table}");
    // The appliance named in full and a parameter's default declared: still
    // the same app.
    f.write(
        &text
            .replace("appliance: tiny-app", "appliance: local/tiny-app@1.0.0")
            .replace("greeting: hello\n", "greeting: hello\n      workers: 2\n"),
    );
    assert_eq!(f.apply(&[])["changed"], false);

    // An unknown appliance: an error with its line, before any change.
    f.write(&text.replace("appliance: tiny-app", "appliance: nope"));
    let err = f.apply_err(&[]);
    assert!(err.contains("estate.yaml:24:"), "{err}");
    assert!(err.contains("appliance \"nope\" is not known"), "{err}");
    // An unknown parameter: its line.
    f.write(&text.replace("greeting: hello", "greting: hello"));
    let err = f.apply_err(&[]);
    assert!(err.contains("estate.yaml:28:"), "{err}");
    assert!(err.contains("no parameter \"greting\""), "{err}");

    // A changed location: a plan error naming the field and its line.
    let moved = text.replace("- de-fra", "- se-sto");
    f.write(&moved);
    let err = f.apply_err(&[]);
    assert!(err.contains("estate.yaml:25:"), "{err}");
    assert!(
        err.contains("app shop: locations cannot change in place"),
        "{err}"
    );
    assert!(err.contains("--replace"), "{err}");
    let err = f.apply_err(&["--dry-run"]);
    assert!(err.contains("locations cannot change in place"), "{err}");
    assert_eq!(app_locations(&app(&f.c, "shop").1), ["de-fra"]);

    // With --replace: deleted and deployed again at the new location.
    let plan = f.apply(&["--replace", "--dry-run"]);
    let row = plan["plan"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(row["action"], "replace", "{plan}");
    assert_eq!(row["changes"][0]["field"], "locations", "{plan}");
    let done = f.apply(&["--replace"]);
    assert_eq!(count(&done, "replace"), 1, "{done}");
    let (st, a) = app(&f.c, "shop");
    assert_eq!(st, 200, "{a}");
    assert_eq!(app_locations(&a), ["se-sto"]);
    assert_eq!(a["labels"]["virt8ra.io/managed-by"], "apply");
    assert_eq!(f.c.vm("shop-de-fra-1")["status"]["phase"], "deleted");
    assert_eq!(f.apply(&[])["changed"], false);

    // SSH keys for every replica: a bad one is an error with its line; a
    // changed key list cannot change in place either.
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOiakisE7iP/Y3q4YCqhXcGDKYvynw8ekG2NX341waDN ops@example";
    f.write(&format!(
        "{moved}    ssh_authorized_keys: [\"ssh-ed25519 AAAA\"]\n"
    ));
    let err = f.apply_err(&["--dry-run"]);
    assert!(
        err.contains("estate.yaml:29: app shop: ssh_authorized_keys[0]: "),
        "{err}"
    );
    let keyed = format!("{moved}    ssh_authorized_keys: [\"{key}\"]\n");
    f.write(&keyed);
    let err = f.apply_err(&[]);
    assert!(
        err.contains("estate.yaml:29: app shop: ssh_authorized_keys cannot change in place"),
        "{err}"
    );
    let done = f.apply(&["--replace"]);
    assert_eq!(count(&done, "replace"), 1, "{done}");
    let (_, a) = app(&f.c, "shop");
    assert_eq!(a["ssh_authorized_keys"], json!([key]), "{a}");
    let replica = a["vms"][0]["name"].as_str().unwrap().to_string();
    assert_eq!(
        f.c.vm(&replica)["spec"]["ssh_authorized_keys"],
        json!([key])
    );
    assert_eq!(f.apply(&[])["changed"], false);
}

/// --prune deletes the apps apply created and the file no longer declares
/// (before VMs and images), never an app deployed by hand.
#[test]
fn prune_deletes_only_managed_apps() {
    let f = apps_fixture();
    f.write(&format!("{APPS_BASE}{APP}"));
    f.apply(&[]);
    f.c.cli_ok(&[
        "app",
        "deploy",
        "tiny-app",
        "--name",
        "manual",
        "--locations",
        "se-sto",
    ]);

    // Without --prune: both stay.
    f.write(APPS_BASE);
    assert_eq!(f.apply(&[])["changed"], false);
    assert_eq!(app(&f.c, "shop").0, 200);

    let plan = f.apply(&["--prune", "--dry-run"]);
    let deletes: Vec<(String, String, String)> = actions(&plan)
        .into_iter()
        .filter(|a| a.2 == "delete")
        .collect();
    assert_eq!(deletes, [("app".into(), "shop".into(), "delete".into())]);
    let done = f.apply(&["--prune"]);
    assert_eq!(count(&done, "delete"), 1, "{done}");
    assert_eq!(app(&f.c, "shop").0, 404);
    assert_eq!(f.c.vm("shop-de-fra-1")["status"]["phase"], "deleted");
    assert_eq!(app(&f.c, "manual").0, 200);
    assert_eq!(f.apply(&["--prune"])["changed"], false);

    // Declared again: deployed anew (its replicas' names are free again).
    f.write(&format!("{APPS_BASE}{APP}"));
    let done = f.apply(&[]);
    assert_eq!(count(&done, "create"), 1, "{done}");
    let (st, a) = app(&f.c, "shop");
    assert_eq!(st, 200, "{a}");
    assert_eq!(a["vms"][0]["name"], "shop-de-fra-1", "{a}");
    assert_ne!(a["vms"][0]["phase"], "deleted", "{a}");
}
