//! Hostile images built with the real qemu-img (and patched where qemu-img
//! will not write the attack itself), inspected and converted for real.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

const SECRET: &[u8] = b"TOP-SECRET-admin-token-0123456789abcdef";

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A 4 KiB secret file (a FLAT extent must cover whole sectors).
    fn secret(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        let mut b = SECRET.to_vec();
        b.resize(4096, b'.');
        std::fs::write(&p, b).unwrap();
        p
    }

    fn qemu_img(&self, args: &[&str]) {
        let o = Command::new("qemu-img")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "qemu-img {args:?}: {o:?}");
    }

    /// 1 MiB of a recognisable pattern.
    fn raw(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        let b: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
        std::fs::write(&p, b).unwrap();
        p
    }
}

fn policy() -> Policy {
    Policy::import(DEFAULT_MAX_VIRTUAL_SIZE)
}

fn refused(r: Result<Inspection, ImageError>) -> String {
    match r {
        Err(ImageError::Refused(m)) => m,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn flat_descriptor(secret: &Path) -> String {
    format!(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 8 FLAT \"{}\" 0\n\nddb.virtualHWVersion = \"4\"\n",
        secret.display()
    )
}

#[tokio::test]
async fn a_vmdk_descriptor_with_a_flat_extent_is_refused() {
    let f = Fixture::new();
    let secret = f.secret("secret");
    let d = f.path("upload-1");
    std::fs::write(&d, flat_descriptor(&secret)).unwrap();
    let m = refused(inspect(&d, &policy()).await);
    assert!(
        m.contains("refers to another file (VMDK extent FLAT"),
        "{m}"
    );
    assert!(m.contains("qemu-img convert -O qcow2 IN OUT"), "{m}");
    // Also without the comment line qemu's probe looks for.
    let text = flat_descriptor(&secret).replace("# Disk DescriptorFile\n", "");
    std::fs::write(&d, text).unwrap();
    let m = refused(inspect(&d, &policy()).await);
    assert!(m.contains("VMDK extent FLAT"), "{m}");
}

/// A sparse VMDK whose header says capacity 0, with an embedded descriptor
/// naming a flat extent: qemu reads the extent, not the file.
fn sparse_with_embedded_flat(f: &Fixture, secret: &Path) -> PathBuf {
    let p = f.path("sparse.vmdk");
    f.qemu_img(&["create", "-q", "-f", "vmdk", p.to_str().unwrap(), "1M"]);
    let mut b = std::fs::read(&p).unwrap();
    b[12..20].copy_from_slice(&0u64.to_le_bytes());
    let desc_off = u64::from_le_bytes(b[28..36].try_into().unwrap()) as usize * 512;
    let desc_len = u64::from_le_bytes(b[36..44].try_into().unwrap()) as usize * 512;
    let text = flat_descriptor(secret);
    assert!(text.len() < desc_len);
    b[desc_off..desc_off + desc_len].fill(0);
    b[desc_off..desc_off + text.len()].copy_from_slice(text.as_bytes());
    std::fs::write(&p, b).unwrap();
    p
}

#[tokio::test]
async fn a_sparse_vmdk_whose_embedded_descriptor_names_a_flat_extent_is_refused() {
    let f = Fixture::new();
    let secret = f.secret("secret");
    let p = sparse_with_embedded_flat(&f, &secret);
    // The attack is real: qemu-img unconfined copies the secret.
    let leak = f.path("leak.qcow2");
    f.qemu_img(&[
        "convert",
        "-f",
        "vmdk",
        p.to_str().unwrap(),
        "-O",
        "raw",
        leak.to_str().unwrap(),
    ]);
    assert!(contains(&std::fs::read(&leak).unwrap(), SECRET));
    let m = refused(inspect(&p, &policy()).await);
    assert!(m.contains("VMDK extent FLAT"), "{m}");
}

/// A qcow2 with a raw external data file whose name is then patched to a
/// host file of the same name length.
fn qcow2_with_data_file(f: &Fixture, secret: &Path) -> PathBuf {
    let p = f.path("d.qcow2");
    let data = f.path("data-file");
    assert_eq!(data.to_str().unwrap().len(), secret.to_str().unwrap().len());
    let opts = format!("data_file={},data_file_raw=on", data.display());
    f.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &opts,
        p.to_str().unwrap(),
        "4K",
    ]);
    let mut b = std::fs::read(&p).unwrap();
    let name = data.to_str().unwrap().as_bytes();
    let at = b.windows(name.len()).position(|w| w == name).unwrap();
    b[at..at + name.len()].copy_from_slice(secret.to_str().unwrap().as_bytes());
    std::fs::write(&p, b).unwrap();
    p
}

#[tokio::test]
async fn a_qcow2_with_an_external_data_file_is_refused() {
    let f = Fixture::new();
    let secret = f.secret("secret-fi");
    let p = qcow2_with_data_file(&f, &secret);
    let m = refused(inspect(&p, &policy()).await);
    assert!(
        m.contains("refers to another file (qcow2 external data file"),
        "{m}"
    );
    // Not even a staged disk (which may have a backing file) may have one.
    let m = refused(inspect(&p, &Policy::staged()).await);
    assert!(m.contains("data file"), "{m}");
    // Past the header checks, qemu-img info's view refuses it too.
    let e = info(&absolute(&p).unwrap(), Format::Qcow2, &policy()).await;
    assert!(
        matches!(&e, Err(ImageError::Refused(m)) if m.contains("(qcow2 data-file \"")),
        "{e:?}"
    );
    // And the sandboxed conversion cannot open the data file.
    let out = f.path("out.qcow2");
    let e = convert(&p, Format::Qcow2, &out).await.unwrap_err();
    assert!(e.to_string().contains("Permission denied"), "{e}");
    assert!(!contains(&std::fs::read(&out).unwrap_or_default(), SECRET));
}

/// A VHD footer's checksum: the one's complement of its byte sum.
fn vhd_checksum(footer: &mut [u8]) {
    footer[64..68].fill(0);
    let sum: u32 = footer.iter().map(|&b| u32::from(b)).sum();
    footer[64..68].copy_from_slice(&(!sum).to_be_bytes());
}

#[tokio::test]
async fn differencing_vhd_and_vhdx_are_refused() {
    let f = Fixture::new();
    let p = f.path("d.vhd");
    f.qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=dynamic",
        p.to_str().unwrap(),
        "1M",
    ]);
    let mut b = std::fs::read(&p).unwrap();
    let n = b.len();
    for at in [0, n - 512] {
        b[at + 60..at + 64].copy_from_slice(&4u32.to_be_bytes());
        vhd_checksum(&mut b[at..at + 512]);
    }
    std::fs::write(&p, &b).unwrap();
    let m = refused(inspect(&p, &policy()).await);
    assert!(m.contains("differencing VHD"), "{m}");
    // A dynamic VHD whose header names a parent locator.
    b = std::fs::read(&p).unwrap();
    for at in [0, n - 512] {
        b[at + 60..at + 64].copy_from_slice(&3u32.to_be_bytes());
        vhd_checksum(&mut b[at..at + 512]);
    }
    let dyn_at = u64::from_be_bytes(b[16..24].try_into().unwrap()) as usize;
    b[dyn_at + 576..dyn_at + 580].copy_from_slice(b"W2ku");
    std::fs::write(&p, &b).unwrap();
    let m = refused(inspect(&p, &policy()).await);
    assert!(m.contains("VHD parent locator"), "{m}");

    let p = f.path("d.vhdx");
    f.qemu_img(&["create", "-q", "-f", "vhdx", p.to_str().unwrap(), "1M"]);
    let mut b = std::fs::read(&p).unwrap();
    // The File Parameters item: HasParent.
    let meta = sniff_vhdx_file_parameters(&b);
    b[meta + 4] |= 2;
    std::fs::write(&p, &b).unwrap();
    let m = refused(inspect(&p, &policy()).await);
    assert!(m.contains("differencing VHDX"), "{m}");
}

/// The offset of a VHDX's File Parameters metadata item.
fn sniff_vhdx_file_parameters(b: &[u8]) -> usize {
    let regions = 192 << 10;
    let meta_guid = [0x06u8, 0xa2, 0x7c, 0x8b];
    let e = (0..4)
        .map(|i| regions + 16 + i * 32)
        .find(|&e| b[e..e + 4] == meta_guid)
        .unwrap();
    let meta = u64::from_le_bytes(b[e + 16..e + 24].try_into().unwrap()) as usize;
    let fp = [0x37u8, 0x67, 0xa1, 0xca];
    let item = (0..16)
        .map(|i| meta + 32 + i * 32)
        .find(|&e| b[e..e + 4] == fp)
        .unwrap();
    meta + u32::from_le_bytes(b[item + 16..item + 20].try_into().unwrap()) as usize
}

#[tokio::test]
async fn the_format_comes_from_the_bytes_not_the_name() {
    let f = Fixture::new();
    let secret = f.secret("secret");
    let p = f.path("disk.raw");
    f.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        secret.to_str().unwrap(),
        p.to_str().unwrap(),
        "4K",
    ]);
    let m = refused(inspect(&p, &policy()).await);
    assert!(m.contains("qcow2 backing file"), "{m}");
    assert!(m.contains(&secret.display().to_string()), "{m}");
    let ok = f.path("benign.raw");
    f.qemu_img(&["create", "-q", "-f", "qcow2", ok.to_str().unwrap(), "1M"]);
    let i = inspect(&ok, &policy()).await.unwrap();
    assert_eq!(i.format, Format::Qcow2);
    assert_eq!(i.virtual_size, 1 << 20);
}

#[tokio::test]
async fn a_damaged_or_huge_image_is_refused() {
    let f = Fixture::new();
    let p = f.path("g.qcow2");
    f.qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "64M"]);
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..1000]).unwrap();
    let m = refused(inspect(&p, &policy()).await);
    assert!(m.contains("damaged: qemu-img check found errors"), "{m}");

    let p = f.path("big.qcow2");
    f.qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "1P"]);
    let m = refused(inspect(&p, &policy()).await);
    assert!(
        m.contains("1048576 GiB") && m.contains("limit of 4096 GiB"),
        "{m}"
    );
    // Within a larger limit it passes.
    let i = inspect(&p, &Policy::import(2 << 50)).await.unwrap();
    assert_eq!(i.virtual_size, 1 << 50);

    let p = f.path("text");
    std::fs::write(&p, b"hello, not a disk\n").unwrap();
    let m = refused(inspect(&p, &policy()).await);
    assert!(m.contains("not a disk image: 18 bytes"), "{m}");
}

#[tokio::test]
async fn good_images_of_every_format_are_converted_with_their_data() {
    let f = Fixture::new();
    let raw = f.raw("r.raw");
    let cases: &[(&str, &[&str], Format)] = &[
        ("r.qcow2", &["-O", "qcow2"], Format::Qcow2),
        ("r.vmdk", &["-O", "vmdk"], Format::Vmdk),
        (
            "s.vmdk",
            &["-O", "vmdk", "-o", "subformat=streamOptimized"],
            Format::Vmdk,
        ),
        ("r.vhd", &["-O", "vpc"], Format::Vpc),
        (
            "f.vhd",
            &["-O", "vpc", "-o", "subformat=fixed"],
            Format::Vpc,
        ),
        ("r.vhdx", &["-O", "vhdx"], Format::Vhdx),
    ];
    let mut all = vec![(raw.clone(), Format::Raw)];
    for (name, args, format) in cases {
        let p = f.path(name);
        let mut a = vec!["convert", "-q", "-f", "raw", raw.to_str().unwrap()];
        a.extend_from_slice(args);
        a.push(p.to_str().unwrap());
        f.qemu_img(&a);
        all.push((p, *format));
    }
    for (i, (p, format)) in all.iter().enumerate() {
        let got = inspect(p, &policy())
            .await
            .unwrap_or_else(|e| panic!("{p:?}: {e}"));
        assert_eq!(got.format, *format, "{p:?}");
        assert!(got.virtual_size >= 1 << 20, "{p:?}");
        let out = f.path(&format!("out-{i}.qcow2"));
        let stored = convert_to_qcow2(p, &got, &out, DEFAULT_MAX_VIRTUAL_SIZE)
            .await
            .unwrap_or_else(|e| panic!("{p:?}: {e}"));
        assert_eq!(stored.format, Format::Qcow2);
        // The guest sees the same first MiB.
        let o = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
            .arg(&raw)
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success() || *format == Format::Vpc, "{p:?}: {o:?}");
    }
}

#[tokio::test]
async fn the_sandbox_stops_a_conversion_that_the_checks_missed() {
    assert!(sandboxed(), "this kernel has Landlock; the test needs it");
    let f = Fixture::new();
    let secret = f.secret("secret");
    let d = f.path("desc.vmdk");
    std::fs::write(&d, flat_descriptor(&secret)).unwrap();
    // Unconfined, qemu-img copies the secret into the output.
    let leak = f.path("leak.qcow2");
    f.qemu_img(&[
        "convert",
        "-f",
        "vmdk",
        d.to_str().unwrap(),
        "-O",
        "qcow2",
        leak.to_str().unwrap(),
    ]);
    assert!(contains(&std::fs::read(&leak).unwrap(), SECRET));
    // Sandboxed (the checks bypassed), it cannot open the extent.
    let out = f.path("out.qcow2");
    let e = convert(&d, Format::Vmdk, &out).await.unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("cannot convert the VMDK image") && m.contains("Permission denied"),
        "{m}"
    );
    assert!(!contains(&std::fs::read(&out).unwrap_or_default(), SECRET));
    // Nor does the output of the checked path exist after a refusal.
    let out2 = f.path("out2.qcow2");
    let i = Inspection {
        format: Format::Vmdk,
        virtual_size: 4096,
        has_backing: false,
    };
    assert!(convert_to_qcow2(&d, &i, &out2, DEFAULT_MAX_VIRTUAL_SIZE)
        .await
        .is_err());
    assert!(!out2.exists());
    // Nor can it write anywhere but its output.
    let raw = f.raw("r.raw");
    let elsewhere = f.path("elsewhere.qcow2");
    let access = sandbox::Access {
        read: &[&raw],
        write: &[],
    };
    let o = sandbox::qemu_img(
        &[
            "convert",
            "-f",
            "raw",
            raw.to_str().unwrap(),
            "-O",
            "qcow2",
            elsewhere.to_str().unwrap(),
        ],
        &access,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert!(!o.status.success() && !elsewhere.exists(), "{o:?}");
}

#[tokio::test]
async fn a_staged_disk_may_name_a_backing_file_but_nothing_else() {
    let f = Fixture::new();
    let base = f.path("base.qcow2");
    f.qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1M"]);
    let p = f.path("staged.qcow2");
    f.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        "/elsewhere/base.qcow2",
        "-u",
        p.to_str().unwrap(),
        "1M",
    ]);
    let i = inspect(&p, &Policy::staged()).await.unwrap();
    assert!(i.has_backing);
    let m = refused(inspect(&p, &Policy::stored(u64::MAX)).await);
    assert!(
        m.contains("qcow2 backing file \"/elsewhere/base.qcow2\""),
        "{m}"
    );
    // A raw file is not a staged disk.
    let raw = f.raw("r.raw");
    let m = refused(inspect(&raw, &Policy::staged()).await);
    assert!(
        m.contains("a raw image is not accepted here; expected qcow2"),
        "{m}"
    );
}

#[tokio::test]
async fn a_sparse_vmdk_naming_a_parent_is_refused() {
    let f = Fixture::new();
    let secret = f.secret("secret");
    let p = f.path("child.vmdk");
    f.qemu_img(&["create", "-q", "-f", "vmdk", p.to_str().unwrap(), "1M"]);
    let mut b = std::fs::read(&p).unwrap();
    let at = u64::from_le_bytes(b[28..36].try_into().unwrap()) as usize * 512;
    let end = at + b[at..].iter().position(|&c| c == 0).unwrap();
    let text = String::from_utf8(b[at..end].to_vec()).unwrap().replace(
        "parentCID=ffffffff",
        &format!(
            "parentCID=fffffffe\nparentFileNameHint=\"{}\"",
            secret.display()
        ),
    );
    b[at..at + text.len()].copy_from_slice(text.as_bytes());
    std::fs::write(&p, b).unwrap();
    let m = refused(inspect(&p, &policy()).await);
    assert!(m.contains("refers to another file (VMDK parent"), "{m}");
}

#[tokio::test]
async fn the_sandbox_opens_no_tcp_connection() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let port = l.local_addr().unwrap().port();
    let url = format!("nbd://127.0.0.1:{port}/disk");
    let access = sandbox::Access {
        read: &[],
        write: &[],
    };
    let o = sandbox::qemu_img(
        &["info", "-f", "raw", &url],
        &access,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert!(!o.status.success(), "{o:?}");
    assert!(
        matches!(l.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "qemu-img connected"
    );
    // Unconfined, the same call does connect (the test is meaningful).
    let mut child = Command::new("qemu-img")
        .args(["info", "-f", "raw", &url])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let connected = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        l.accept().is_ok()
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(connected, "unconfined qemu-img never connected");
}
