//! Issue 25, defects 1, 2 and 7: images that try to make the control plane
//! read its own files (the admin token, another secret) are refused on
//! every path that brings an image in (upload, URL import, remote catalog,
//! `vm import` bundles), nothing of them is stored, and damaged or huge
//! images are refused; good images are stored as before.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::*;
use serde_json::{json, Value};

const SECRET: &[u8] = b"SECRET-of-the-control-plane-host-7f3a9c";

fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

fn qemu_img(args: &[&str]) {
    let o = Command::new("qemu-img").args(args).output().unwrap();
    assert!(o.status.success(), "qemu-img {args:?}: {o:?}");
}

fn flat_descriptor(target: &Path, sectors: u32) -> String {
    format!(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW {sectors} FLAT \"{}\" 0\n\nddb.virtualHWVersion = \"4\"\n",
        target.display()
    )
}

/// Uploads `body` as image `name`: the status and the JSON answer.
fn upload(c: &Cluster, name: &str, body: Vec<u8>) -> (u16, Value) {
    let resp = https_client(None)
        .post(format!("{}/api/v1/images?name={name}", c.url))
        .bearer_auth(&c.token)
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

/// No file is left in DATA_DIR/images, and no byte of the secrets is in
/// any file there.
fn assert_nothing_stored(c: &Cluster, secrets: &[&[u8]]) {
    let dir = c.server_dir().join("images");
    let left: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for p in &left {
        let b = std::fs::read(p).unwrap();
        for s in secrets {
            assert!(
                !b.windows(s.len()).any(|w| w == *s),
                "{} holds a secret",
                p.display()
            );
        }
    }
    assert!(left.is_empty(), "left in DATA_DIR/images: {left:?}");
    assert_eq!(c.ok("GET", "/api/v1/images", None)["items"], json!([]));
}

/// A tiny HTTP/1.1 server on loopback for files by path.
fn serve(files: Arc<Mutex<BTreeMap<String, Vec<u8>>>>) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&req).to_string();
            let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
            let body = files.lock().unwrap().get(&path).cloned();
            let _ = match body {
                Some(b) => s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            b.len()
                        )
                        .as_bytes(),
                    )
                    .and_then(|_| s.write_all(&b)),
                None => s.write_all(
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                ),
            };
        }
    });
    url
}

fn cli_err(c: &Cluster, args: &[&str]) -> String {
    let out = c.cli(args);
    assert!(!out.status.success(), "virt8ra {args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line: {err}");
    lines[0].to_string()
}

#[test]
fn a_vmdk_pointing_at_host_files_is_refused_on_every_path() {
    let mut c = Cluster::start();
    let work = c.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let secret = work.join("secret");
    let mut sb = SECRET.to_vec();
    sb.resize(4096, b'.');
    std::fs::write(&secret, &sb).unwrap();
    let token_file = c.server_dir().join("admin.token");
    let token = std::fs::read(&token_file).unwrap();
    let evil = flat_descriptor(&secret, 8).into_bytes();
    let admin = c.token.clone();
    let secrets: [&[u8]; 2] = [SECRET, admin.as_bytes()];

    // (a) Upload: the secret file, and the admin token itself.
    let (s, v) = upload(&c, "evil", evil.clone());
    assert_eq!(s, 400, "{v}");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("the image refers to another file (VMDK extent FLAT")
            && m.contains("qemu-img convert -O qcow2 IN OUT"),
        "{m}"
    );
    assert_eq!(v["error"]["code"], "invalid_request");
    let (s, v) = upload(&c, "evil", flat_descriptor(&token_file, 1).into_bytes());
    assert_eq!(s, 400, "{v}");
    assert_nothing_stored(&c, &secrets);

    // (b) Import from a URL.
    let files = Arc::new(Mutex::new(BTreeMap::new()));
    files
        .lock()
        .unwrap()
        .insert("/evil.vmdk".to_string(), evil.clone());
    let base = serve(files.clone());
    let (s, v) = c.api(
        "POST",
        "/api/v1/images/import",
        Some(json!({"name": "evil", "url": format!("{base}/evil.vmdk"), "sha256": sha256(&evil)})),
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("VMDK extent FLAT"),
        "{v}"
    );
    assert_nothing_stored(&c, &secrets);

    // (d) `vm import` of a bundle whose disk is the descriptor.
    let bundle = work.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(bundle.join("disk.vmdk"), &evil).unwrap();
    let manifest = json!({
        "format": "virt8ra-vm-export", "version": 1,
        "vm": {"name": "evil", "id": "0", "spec": {"vcpus": 1, "memory_mib": 64, "disk_gib": 1, "image": "x"}},
        "disks": [{"file": "disk.vmdk", "format": "vmdk", "sha256": sha256(&evil), "size_bytes": evil.len()}],
        "provenance": {"exported_at": "2026-01-01T00:00:00Z", "control_plane": "elsewhere", "host": null,
                       "site": null, "provider": null, "country": null, "image": null, "migrations": []},
    });
    std::fs::write(bundle.join("manifest.json"), manifest.to_string()).unwrap();
    let e = cli_err(&c, &["vm", "import", bundle.to_str().unwrap()]);
    assert!(
        e.contains("refers to another file (VMDK extent FLAT"),
        "{e}"
    );
    assert_eq!(c.ok("GET", "/api/v1/vms", None)["items"], json!([]));
    assert_nothing_stored(&c, &secrets);

    // (c) A remote catalog (static, signed offline) whose appliance's
    // image is the descriptor: refused when an app first needs it.
    c.create_topology();
    c.start_agent_with("sim-de", Some("de-frankfurt"), &["--driver", "sim"]);
    c.wait_hosts_ready(1);
    let key = work.join("static.key");
    let pubkey: Value = serde_json::from_str(&c.cli_ok(&[
        "catalog",
        "keygen",
        key.to_str().unwrap(),
        "-o",
        "json",
    ]))
    .unwrap();
    let index = work.join("index.yaml");
    std::fs::write(
        &index,
        format!(
            "publisher: mallory\nappliances:\n- name: evil\n  version: 0.1.0\n  images:\n  - name: evil-disk\n    sha256: {}\n    size_bytes: {}\n    url: evil.vmdk\n  template: {{memory_mib: 64}}\n",
            sha256(&evil),
            evil.len()
        ),
    )
    .unwrap();
    let signed = c.cli_ok(&[
        "catalog",
        "sign",
        index.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    files
        .lock()
        .unwrap()
        .insert("/index.json".to_string(), signed.into_bytes());
    c.cli_ok(&[
        "catalog",
        "add",
        "mallory",
        &format!("{base}/index.json"),
        "--key",
        pubkey["public_key"].as_str().unwrap(),
    ]);
    let e = cli_err(
        &c,
        &[
            "app",
            "deploy",
            "mallory/evil",
            "--name",
            "evil",
            "--locations",
            "de-frankfurt",
        ],
    );
    assert!(
        e.contains("appliance evil@0.1.0 from catalog mallory")
            && e.contains("refers to another file (VMDK extent FLAT"),
        "{e}"
    );
    assert_eq!(c.ok("GET", "/api/v1/apps", None), json!([]));
    assert_nothing_stored(&c, &secrets);
    assert_eq!(std::fs::read(&token_file).unwrap(), token);
}

struct Work(PathBuf);

impl Work {
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

/// The refusal message of an upload of the file at `p`.
fn refused(c: &Cluster, p: &Path) -> String {
    let (s, v) = upload(c, "bad", std::fs::read(p).unwrap());
    assert_eq!(s, 400, "{}: {v}", p.display());
    v["error"]["message"].as_str().unwrap().to_string()
}

#[test]
fn hidden_references_damage_and_huge_sizes_are_refused_and_good_images_stored() {
    let mut c = Cluster::start();
    c.kill_server();
    c.server_args = vec!["--max-image-virtual-size-gib".into(), "100".into()];
    c.start_server();
    let w = Work(c.dir.path().join("work"));
    std::fs::create_dir_all(&w.0).unwrap();
    let secret = w.path("secret-fi");
    let mut sb = SECRET.to_vec();
    sb.resize(4096, b'.');
    std::fs::write(&secret, &sb).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();

    // A sparse VMDK of capacity 0 whose embedded descriptor names a flat
    // extent elsewhere.
    let sparse = w.path("sparse.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", &s(&sparse), "1M"]);
    let mut b = std::fs::read(&sparse).unwrap();
    b[12..20].copy_from_slice(&0u64.to_le_bytes());
    let at = u64::from_le_bytes(b[28..36].try_into().unwrap()) as usize * 512;
    let text = flat_descriptor(&secret, 8);
    b[at..at + text.len()].copy_from_slice(text.as_bytes());
    std::fs::write(&sparse, b).unwrap();
    let m = refused(&c, &sparse);
    assert!(
        m.contains("refers to another file (VMDK extent FLAT"),
        "{m}"
    );

    // A qcow2 with an external raw data file, renamed to the secret.
    let dq = w.path("data.qcow2");
    let data = w.path("data-file");
    let opts = format!("data_file={},data_file_raw=on", s(&data));
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, &s(&dq), "4K"]);
    let mut b = std::fs::read(&dq).unwrap();
    let name = s(&data).into_bytes();
    let at = b
        .windows(name.len())
        .position(|x| x == name.as_slice())
        .unwrap();
    b[at..at + name.len()].copy_from_slice(s(&secret).as_bytes());
    std::fs::write(&dq, b).unwrap();
    let m = refused(&c, &dq);
    assert!(
        m.contains("refers to another file (qcow2 external data file"),
        "{m}"
    );

    // A differencing VHD (disk type 4, footer checksum fixed).
    let vhd = w.path("diff.vhd");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=dynamic",
        &s(&vhd),
        "1M",
    ]);
    let mut b = std::fs::read(&vhd).unwrap();
    let n = b.len();
    for at in [0, n - 512] {
        let f = &mut b[at..at + 512];
        f[60..64].copy_from_slice(&4u32.to_be_bytes());
        f[64..68].fill(0);
        let sum: u32 = f.iter().map(|&x| u32::from(x)).sum();
        f[64..68].copy_from_slice(&(!sum).to_be_bytes());
    }
    std::fs::write(&vhd, b).unwrap();
    let m = refused(&c, &vhd);
    assert!(m.contains("differencing VHD"), "{m}");

    // A `.raw` holding a qcow2 header with a backing file.
    let raw = w.path("disk.raw");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        &s(&secret),
        &s(&raw),
        "4K",
    ]);
    let m = refused(&c, &raw);
    assert!(m.contains("qcow2 backing file"), "{m}");

    // A qcow2 cut after 1,000 bytes; one of 1 PiB.
    let good = w.path("good.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&good), "64M"]);
    let cut = w.path("cut.qcow2");
    std::fs::write(&cut, &std::fs::read(&good).unwrap()[..1000]).unwrap();
    let m = refused(&c, &cut);
    assert!(m.contains("damaged: qemu-img check found errors"), "{m}");
    let huge = w.path("huge.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&huge), "1P"]);
    let m = refused(&c, &huge);
    assert!(
        m.contains("over this control plane's limit of 100 GiB"),
        "{m}"
    );
    assert_nothing_stored(&c, &[SECRET, c.token.as_bytes()]);

    // A benign qcow2 named `.raw` is stored as qcow2, byte for byte.
    let benign = w.path("benign.raw");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&benign), "1M"]);
    let bytes = std::fs::read(&benign).unwrap();
    let i: Value = serde_json::from_str(&c.cli_ok(&[
        "image",
        "import",
        &s(&benign),
        "--name",
        "benign",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(i["source_format"], "qcow2");
    assert_eq!(i["sha256"], sha256(&bytes));
    assert_eq!(i["virtual_size_bytes"], 1 << 20);
    // A raw disk is converted.
    let plain = w.path("plain.img");
    std::fs::write(&plain, vec![7u8; 1 << 20]).unwrap();
    let (st, v) = upload(&c, "plain", std::fs::read(&plain).unwrap());
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["source_format"], "raw");
    assert_eq!(v["format"], "qcow2");
    let left: Vec<String> = std::fs::read_dir(c.server_dir().join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(left.len(), 2, "only the two stored images: {left:?}");
}

#[test]
fn a_vm_disk_is_at_least_its_image_and_placement_books_that() {
    let mut c = Cluster::start();
    c.kill_server();
    // The largest limit, so that a 1 PiB image gets into the store.
    c.server_args = vec!["--max-image-virtual-size-gib".into(), "16777216".into()];
    c.start_server();
    c.create_topology();
    // A simulated host with 20 GiB of disk.
    c.start_agent_with("sim-de", Some("de-frankfurt"), &["--driver", "sim"]);
    c.wait_hosts_ready(1);
    let w = c.dir.path().join("work");
    std::fs::create_dir_all(&w).unwrap();
    let image = |name: &str, size: &str| {
        let p = w.join(format!("{name}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), size]);
        let (s, v) = upload(&c, name, std::fs::read(&p).unwrap());
        assert_eq!(s, 201, "{v}");
    };
    image("ten", "10G");
    image("hundred", "100G");
    image("peta", "1P");
    let vm = |name: &str, image: &str| {
        c.api(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": name, "image": image, "memory_mib": 64, "disk_gib": 1})),
        )
    };

    // 1 GiB asked, 10 GiB image: the VM gets (and books) 10 GiB.
    let (s, v) = vm("ten", "ten");
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["spec"]["disk_gib"], 10);
    let events = c.ok("GET", "/api/v1/vms/ten/events", None);
    assert!(
        events
            .to_string()
            .contains("disk_gib 1 raised to 10: the virtual size of image 'ten'"),
        "{events}"
    );
    let host = wait_until("the VM placed", std::time::Duration::from_secs(20), || {
        let h = c.ok("GET", "/api/v1/hosts", None)["items"][0].clone();
        (h["allocated"]["disk_gib"] == 10).then_some(h)
    });
    assert_eq!(host["allocated"]["vms"], 1);

    // 100 GiB does not fit on the 20 GiB host: not placed, and says why.
    let (s, v) = vm("hundred", "hundred");
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["spec"]["disk_gib"], 100);
    assert_eq!(v["status"]["phase"], "pending");
    assert!(
        v["status"]["placement_reason"]
            .as_str()
            .unwrap_or("")
            .contains("disk"),
        "{v}"
    );

    // An app whose replicas would each book 100 GiB does not pass the
    // all-or-nothing dry run on the host's 10 GiB left: nothing is created (the
    // dry run used to book the template's 1 GiB).
    let appliance = w.join("big.json");
    std::fs::write(
        &appliance,
        json!({"name": "big", "version": "1.0.0", "images": [{"name": "hundred"}],
               "template": {"memory_mib": 64, "disk_gib": 1}})
        .to_string(),
    )
    .unwrap();
    c.cli_ok(&["appliance", "publish", appliance.to_str().unwrap()]);
    let e = cli_err(
        &c,
        &[
            "app",
            "deploy",
            "big",
            "--name",
            "big",
            "--locations",
            "de-frankfurt",
        ],
    );
    assert!(
        e.contains("fits nowhere") && e.contains("nothing was created"),
        "{e}"
    );
    assert_eq!(c.ok("GET", "/api/v1/apps", None), json!([]));

    // 1 PiB is more than any VM disk may be: refused, nothing created.
    let (s, v) = vm("peta", "peta");
    assert_error(
        (s, v),
        400,
        "image 'peta' has a virtual size of 1048576 GiB",
    );
    let (s, _) = c.api("GET", "/api/v1/vms/peta", None);
    assert_eq!(s, 404);
    let h = c.ok("GET", "/api/v1/hosts", None)["items"][0].clone();
    assert_eq!(h["allocated"]["disk_gib"], 10, "{h}");

    // Declared with 1 GiB of the 10 GiB image: created with 10 GiB, and a
    // second apply sees nothing to change (not a disk_gib it cannot apply).
    let file = w.join("estate.yaml");
    std::fs::write(
        &file,
        "vms:\n  - name: declared\n    image: ten\n    memory_mib: 64\n    disk_gib: 1\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    c.cli_ok(&["apply", "-f", f]);
    assert_eq!(c.vm("declared")["spec"]["disk_gib"], 10);
    let again: Value = serde_json::from_str(&c.cli_ok(&["apply", "-f", f, "-o", "json"])).unwrap();
    let actions: Vec<&Value> = again["plan"].as_array().unwrap().iter().collect();
    assert!(
        actions.iter().all(|a| a["action"] == "unchanged"),
        "{again}"
    );
}
