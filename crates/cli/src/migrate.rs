//! `vm migrate`, `vm migrations`, `migration list|show`, `... evacuate`, `rebalance`,
//! `vm export` and `vm import`.
//!
//! The export bundle is a directory anyone can use with standard tools:
//! `disk.qcow2` (standalone, compressed qcow2) and `manifest.json` (the
//! spec, checksums and provenance), documented in `docs/export-format.md`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use virt8ra_api::*;

use crate::client::{seg, Client};
use crate::output::{emit, fields, table, Format};
use crate::progress::Progress;
use crate::WaitOpts;

/// Target and mode of a migration.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[arg(long, conflicts_with_all = ["to_site", "to_provider", "to_country"])]
    pub to_host: Option<String>,
    #[arg(long, conflicts_with_all = ["to_provider", "to_country"])]
    pub to_site: Option<String>,
    #[arg(long, conflicts_with = "to_country")]
    pub to_provider: Option<String>,
    /// ISO 3166-1 alpha-2 country code.
    #[arg(long)]
    pub to_country: Option<String>,
    /// live, cold, or auto (live when the hosts are compatible).
    #[arg(long, default_value = "auto")]
    pub mode: String,
}

pub fn parse_mode(s: &str) -> anyhow::Result<RequestedMode> {
    Ok(match s {
        "live" => RequestedMode::Live,
        "cold" => RequestedMode::Cold,
        "auto" => RequestedMode::Auto,
        other => bail!("unknown --mode {other:?}: use live, cold or auto"),
    })
}

fn end(e: &MigrationEnd) -> String {
    format!("{} ({}, {}, {})", e.host, e.site, e.provider, e.country)
}

pub fn show_migration(m: &Migration) {
    let mut f = vec![
        ("id", m.id.clone()),
        ("vm", m.vm.clone()),
        ("mode", format!("{} ({})", m.mode.as_str(), m.mode_reason)),
        ("phase", m.phase.as_str().to_string()),
        ("from", end(&m.source)),
        ("to", end(&m.target)),
        ("why there", m.placement_reason.clone()),
    ];
    if let Some(d) = m.downtime_ms {
        f.push(("downtime", format!("{d} ms")));
    }
    if let Some(t) = m.total_ms {
        f.push(("total", format!("{:.1} s", t as f64 / 1000.0)));
    }
    if let Some(b) = m.bytes {
        f.push(("moved", format!("{:.1} MiB", b as f64 / 1048576.0)));
    }
    if let Some(e) = &m.error {
        f.push(("error", e.clone()));
    }
    fields(f);
    println!();
    table(
        &["at", "phase", "step"],
        m.steps
            .iter()
            .map(|s| {
                vec![
                    s.at.format("%H:%M:%S%.3f").to_string(),
                    s.phase.as_str().to_string(),
                    s.message.clone(),
                ]
            })
            .collect(),
    );
}

fn bar(p: &MigrationProgress) -> String {
    let frac = if p.bytes_total > 0 {
        (p.bytes_done as f64 / p.bytes_total as f64).min(1.0)
    } else {
        0.0
    };
    let n = (frac * 24.0) as usize;
    let eta = p.eta_s.map(|s| format!(" ETA {s}s")).unwrap_or_default();
    let rounds = if p.dirty_rounds > 0 {
        format!(" round {}", p.dirty_rounds)
    } else {
        String::new()
    };
    format!(
        "[{}{}] {:>3.0}% {} {:.1}/{:.1} MiB {:.1} MiB/s{rounds}{eta}",
        "#".repeat(n),
        " ".repeat(24 - n),
        frac * 100.0,
        p.stage,
        p.bytes_done as f64 / 1048576.0,
        p.bytes_total as f64 / 1048576.0,
        p.rate_bps as f64 / 1048576.0
    )
}

/// Follows a migration until it ends, drawing a progress bar on stderr.
pub async fn wait_migration(
    c: &Client,
    id: &str,
    timeout: Duration,
    o: Format,
) -> anyhow::Result<Migration> {
    let start = Instant::now();
    let mut progress = Progress::stderr(o);
    loop {
        let m: Migration = c.get(&format!("/migrations/{}", seg(id))).await?;
        let p = m.progress.as_ref().map(bar).unwrap_or_default();
        progress.update(
            &format!("{} {}: {}", m.vm, m.mode.as_str(), m.phase.as_str()),
            &format!(" ({:.1}s) {p}", start.elapsed().as_secs_f64()),
        );
        if m.phase.is_terminal() {
            return Ok(m);
        }
        if start.elapsed() > timeout {
            progress.finish();
            bail!(
                "gave up waiting after {} s: migration {} is still {}",
                timeout.as_secs(),
                m.id,
                m.phase.as_str()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn migrate(
    c: &Client,
    o: Format,
    vm: &str,
    a: &MigrateArgs,
    wait: Option<Duration>,
) -> anyhow::Result<()> {
    let req = MigrationCreate {
        to_host: a.to_host.clone(),
        to_site: a.to_site.clone(),
        to_provider: a.to_provider.clone(),
        to_country: a.to_country.clone(),
        mode: parse_mode(&a.mode)?,
    };
    let m: Migration = c.post(&format!("/vms/{}/migrate", seg(vm)), &req).await?;
    let Some(timeout) = wait else {
        return emit(o, &m, show_migration);
    };
    let m = wait_migration(c, &m.id, timeout, o).await?;
    if m.phase == MigrationPhase::Failed {
        if o != Format::Table {
            emit(o, &m, show_migration)?;
        }
        bail!(
            "migration of {} failed and was rolled back ({} stays on {}): {}",
            m.vm,
            m.vm,
            m.source.host,
            m.error.clone().unwrap_or_default()
        );
    }
    emit(o, &m, show_migration)
}

pub fn list_migrations(o: Format, ms: &[Migration]) -> anyhow::Result<()> {
    emit(o, &ms.to_vec(), |ms| {
        table(
            &[
                "id", "vm", "mode", "phase", "from", "to", "downtime", "total", "started",
            ],
            ms.iter()
                .map(|m| {
                    vec![
                        m.id.chars().take(8).collect(),
                        m.vm.clone(),
                        m.mode.as_str().into(),
                        m.phase.as_str().into(),
                        format!("{} ({})", m.source.site, m.source.country),
                        format!("{} ({})", m.target.site, m.target.country),
                        m.downtime_ms.map(|d| format!("{d} ms")).unwrap_or_default(),
                        m.total_ms
                            .map(|t| format!("{:.1} s", t as f64 / 1000.0))
                            .unwrap_or_default(),
                        m.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                    ]
                })
                .collect(),
        )
    })
}

pub async fn evacuate(
    c: &Client,
    o: Format,
    kind: &str,
    name: &str,
    mode: &str,
    wait: Option<Duration>,
) -> anyhow::Result<()> {
    let req = EvacuateRequest {
        mode: parse_mode(mode)?,
    };
    let ev: Evacuation = c
        .post(&format!("/{kind}/{}/evacuate", seg(name)), &req)
        .await?;
    let mut ev = ev;
    if let Some(timeout) = wait {
        let mut done = Vec::new();
        for m in &ev.migrations {
            done.push(wait_migration(c, &m.id, timeout, o).await?);
        }
        ev.migrations = done;
    }
    let failed = ev
        .migrations
        .iter()
        .filter(|m| m.phase == MigrationPhase::Failed)
        .count();
    emit(o, &ev, |ev| {
        if !ev.migrations.is_empty() {
            let _ = list_migrations(Format::Table, &ev.migrations);
        }
        for (vm, why) in &ev.refused {
            println!("{vm}: not moved: {why}");
        }
        if ev.migrations.is_empty() && ev.refused.is_empty() {
            println!("nothing to move");
        }
    })?;
    if !ev.refused.is_empty() || failed > 0 {
        bail!(
            "{} VM(s) could not be moved and {failed} migration(s) failed",
            ev.refused.len()
        );
    }
    Ok(())
}

pub async fn rebalance(
    c: &Client,
    o: Format,
    req: &RebalanceRequest,
    wait: Option<Duration>,
) -> anyhow::Result<()> {
    let mut r: Rebalance = c.post("/rebalance", req).await?;
    if let Some(timeout) = wait {
        let mut done = Vec::new();
        for m in &r.migrations {
            done.push(wait_migration(c, &m.id, timeout, o).await?);
        }
        r.migrations = done;
    }
    emit(o, &r, |r| {
        if r.moves.is_empty() {
            println!("nothing to move");
        } else {
            table(
                &["vm", "from", "to", "why"],
                r.moves
                    .iter()
                    .map(|m| vec![m.vm.clone(), m.from.clone(), m.to.clone(), m.reason.clone()])
                    .collect(),
            );
        }
        for (vm, why) in &r.stuck {
            println!("{vm}: stays: {why}");
        }
        if !r.migrations.is_empty() {
            println!();
            let _ = list_migrations(Format::Table, &r.migrations);
        }
        for (vm, why) in &r.refused {
            println!("{vm}: not moved: {why}");
        }
    })?;
    let failed = r
        .migrations
        .iter()
        .filter(|m| m.phase == MigrationPhase::Failed)
        .count();
    if !r.refused.is_empty() || failed > 0 {
        bail!(
            "{} move(s) could not start and {failed} migration(s) failed",
            r.refused.len()
        );
    }
    Ok(())
}

/// `manifest.json` of an export bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always `virt8ra-vm-export`.
    pub format: String,
    pub version: u32,
    pub vm: ManifestVm,
    pub disks: Vec<ManifestDisk>,
    pub provenance: Provenance,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestVm {
    pub name: String,
    pub id: String,
    pub spec: VmSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestDisk {
    /// File name inside the bundle.
    pub file: String,
    pub format: String,
    pub sha256: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    pub exported_at: chrono::DateTime<chrono::Utc>,
    pub control_plane: String,
    /// Where the VM ran when exported.
    pub host: Option<String>,
    pub site: Option<String>,
    pub provider: Option<String>,
    pub country: Option<String>,
    /// The base image it was created from.
    pub image: Option<String>,
    /// Every migration of the VM: where its data has been.
    pub migrations: Vec<Migration>,
}

pub async fn export(c: &Client, o: Format, vm: &str, dir: &Path) -> anyhow::Result<()> {
    let v: Vm = c.get(&format!("/vms/{}", seg(vm))).await?;
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!(
            "{} exists and is not empty; export into a new directory",
            dir.display()
        );
    }
    let e: VmExport = c
        .post(&format!("/vms/{}/export", seg(vm)), &serde_json::json!({}))
        .await?;
    let start = Instant::now();
    let mut progress = Progress::stderr(o);
    let e = loop {
        let e: VmExport = c.get(&format!("/exports/{}", seg(&e.id))).await?;
        match e.state.as_str() {
            "ready" => break e,
            "uploading" => {}
            _ => bail!(
                "export of {} failed: {}",
                v.name,
                e.error.unwrap_or_else(|| e.state.clone())
            ),
        }
        if start.elapsed() > Duration::from_secs(3600) {
            bail!("export of {} did not finish within an hour", v.name);
        }
        progress.update(
            &format!("{}: the host uploads the disk", v.name),
            &format!(" ({}s)", start.elapsed().as_secs()),
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    progress.finish();
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let disk = dir.join("disk.qcow2");
    let size = c
        .download(&e.url_path.replacen("/api/v1", "", 1), &disk)
        .await?;
    let sha = sha256_file(&disk)?;
    if Some(&sha) != e.sha256.as_ref() || Some(size) != e.size_bytes {
        bail!("the downloaded disk does not match the export (sha256 {sha}); run the export again");
    }
    let mut disks = vec![ManifestDisk {
        file: "disk.qcow2".into(),
        format: "qcow2".into(),
        sha256: sha,
        size_bytes: size,
    }];
    // Data disks after the boot disk, in the VM's order.
    for (i, d) in e.data_disks.iter().enumerate() {
        let file = format!("data-{i}.qcow2");
        let path = dir.join(&file);
        let size = c
            .download(&d.url_path.replacen("/api/v1", "", 1), &path)
            .await?;
        let sha = sha256_file(&path)?;
        if sha != d.sha256 || size != d.size_bytes {
            bail!("the downloaded data disk {i} does not match the export (sha256 {sha}); run the export again");
        }
        disks.push(ManifestDisk {
            file,
            format: "qcow2".into(),
            sha256: sha,
            size_bytes: size,
        });
    }
    let history: Vec<Migration> = c
        .get(&format!("/vms/{}/migrations", seg(&v.id)))
        .await
        .unwrap_or_default();
    let image: Option<Image> = c.get(&format!("/images/{}", seg(&v.spec.image))).await.ok();
    let m = Manifest {
        format: "virt8ra-vm-export".into(),
        version: 1,
        vm: ManifestVm {
            name: v.name.clone(),
            id: v.id.clone(),
            spec: v.spec.clone(),
        },
        disks,
        provenance: Provenance {
            exported_at: chrono::Utc::now(),
            control_plane: c.base().to_string(),
            host: v.status.host.clone(),
            site: v.status.site.clone(),
            provider: v.status.provider.clone(),
            country: v.status.country.clone(),
            image: image.map(|i| format!("{} sha256:{}", i.name, i.sha256)),
            migrations: history,
        },
    };
    let path = dir.join("manifest.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&m)?)
        .with_context(|| format!("write {}", path.display()))?;
    let _ = c.delete(&format!("/exports/{}", seg(&e.id))).await;
    emit(o, &m, |m| {
        fields(vec![
            ("exported", m.vm.name.clone()),
            ("to", dir.display().to_string()),
            (
                "disk",
                format!("disk.qcow2, {} bytes", m.disks[0].size_bytes),
            ),
            ("sha256", m.disks[0].sha256.clone()),
            (
                "data disks",
                if m.disks.len() > 1 {
                    m.disks[1..]
                        .iter()
                        .map(|d| format!("{} ({} bytes)", d.file, d.size_bytes))
                        .collect::<Vec<_>>()
                        .join(", ")
                } else {
                    "-".into()
                },
            ),
        ])
    })
}

fn sha256_file(p: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("open {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The format of a disk file, from its contents (and, for raw, only when
/// asked or named `.raw`/`.img`): qemu-img would call anything raw.
pub fn detect_format(p: &Path, asked: Option<&str>) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("open {}", p.display()))?;
    let len = f.metadata()?.len();
    let mut head = [0u8; 64];
    let n = f.read(&mut head)?;
    let head = &head[..n];
    let mut tail = [0u8; 8];
    if len >= 512 {
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(len - 512))?;
        f.read_exact(&mut tail)?;
    }
    let found = if head.starts_with(b"QFI\xfb") {
        Some("qcow2")
    } else if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
        Some("vmdk")
    } else if head.starts_with(b"vhdxfile") {
        Some("vhdx")
    } else if head.starts_with(b"conectix") || &tail == b"conectix" {
        Some("vpc")
    } else {
        None
    };
    let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
    match (asked, found) {
        (Some(a), Some(f)) if a != f && !(a == "vhd" && f == "vpc") => bail!(
            "{} is a {f} disk, not {a}",
            p.display()
        ),
        (_, Some(f)) => Ok(f.to_string()),
        (Some("raw"), None) => Ok("raw".into()),
        (None, None) if ext == "raw" || ext == "img" => Ok("raw".into()),
        (Some(a), None) => bail!("{} is not a {a} disk (its header does not match)", p.display()),
        (None, None) => bail!(
            "{}: unknown disk format; expected qcow2, VMDK, VHD, VHDX, or raw (name it .raw/.img or pass --format raw)",
            p.display()
        ),
    }
}

/// `vm import PATH`: a bundle directory from `vm export`, or a bare disk.
#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// A directory written by `vm export`, or a disk file (qcow2, VMDK, VHD, VHDX, raw).
    pub path: PathBuf,
    /// Name of the new VM (default: the bundle's, or the file's stem).
    #[arg(long)]
    pub name: Option<String>,
    /// Disk format of a bare disk file (default: detected).
    #[arg(long)]
    pub format: Option<String>,
    #[arg(long)]
    pub vcpus: Option<u32>,
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// Import stopped.
    #[arg(long)]
    pub no_start: bool,
}

/// The image `name` (named after its content), uploaded from `file` unless
/// an earlier import left it.
async fn image_of(c: &Client, o: Format, name: &str, file: &Path) -> anyhow::Result<Image> {
    if let Ok(i) = c.get::<Image>(&format!("/images/{}", seg(name))).await {
        return Ok(i);
    }
    if o == Format::Table {
        eprintln!("uploading {} ...", file.display());
    }
    c.upload(&format!("/images?name={}", seg(name)), file).await
}

/// The label an imported VM carries: where its disks came from (its
/// residency trail starts with an `imported` interval that says so).
pub const IMPORTED_FROM: &str = "virt8ra.io/imported-from";

/// Where a bundle's VM was when it was exported.
fn bundle_origin(m: &Manifest) -> String {
    let p = &m.provenance;
    let at = [&p.site, &p.provider, &p.country]
        .iter()
        .filter_map(|v| v.as_deref())
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "bundle of VM {} ({}) exported {} from {at} by {}",
        m.vm.name,
        m.vm.id,
        p.exported_at.to_rfc3339(),
        p.control_plane
    )
}

pub async fn import(c: &Client, o: Format, a: &ImportArgs) -> anyhow::Result<Vm> {
    // Each disk with its sha256 (computed once): the boot disk, then data disks.
    let mut data_files: Vec<(PathBuf, String)> = Vec::new();
    let mut origin = format!("disk file {}", a.path.display());
    let ((disk, sha), spec, name) = if a.path.is_dir() {
        let mpath = a.path.join("manifest.json");
        let raw = std::fs::read(&mpath).with_context(|| {
            format!(
                "{} has no manifest.json: not an export bundle",
                a.path.display()
            )
        })?;
        let m: Manifest = serde_json::from_slice(&raw)
            .with_context(|| format!("{} is not a valid manifest", mpath.display()))?;
        if m.format != "virt8ra-vm-export" || m.version != 1 {
            bail!(
                "{}: unsupported bundle format {:?} version {}",
                mpath.display(),
                m.format,
                m.version
            );
        }
        // The boot disk first, then one per data disk of the spec.
        let want = 1 + m.vm.spec.data_disks.len();
        if m.disks.len() != want {
            bail!(
                "{}: {} disk(s) listed; the VM's spec needs {want} (the boot disk and its data disks)",
                mpath.display(),
                m.disks.len()
            );
        }
        let mut files = Vec::new();
        for d in &m.disks {
            if d.file.is_empty() || d.file.contains('/') || d.file.contains("..") {
                bail!("{}: bad disk file name {:?}", mpath.display(), d.file);
            }
            let disk = a.path.join(&d.file);
            let sha = sha256_file(&disk)?;
            if sha != d.sha256 {
                bail!(
                    "{} is corrupt: its sha256 is {sha}, the manifest says {}",
                    disk.display(),
                    d.sha256
                );
            }
            detect_format(&disk, Some(&d.format))?;
            files.push((disk, sha));
        }
        let disk = files.remove(0);
        data_files = files;
        origin = bundle_origin(&m);
        (disk, Some(m.vm.spec), a.name.clone().unwrap_or(m.vm.name))
    } else if a.path.is_file() {
        detect_format(&a.path, a.format.as_deref())?;
        let stem = a
            .path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("imported")
            .to_lowercase()
            .replace(|ch: char| !ch.is_ascii_alphanumeric() && ch != '-', "-");
        let sha = sha256_file(&a.path)?;
        ((a.path.clone(), sha), None, a.name.clone().unwrap_or(stem))
    } else {
        bail!("{} does not exist", a.path.display());
    };
    let image = image_of(c, o, &format!("{name}-disk-{}", &sha[..12]), &disk).await?;
    // Each data disk becomes an image; the new VM's data disk a copy of it.
    let mut data_images = Vec::new();
    for (i, (f, sha)) in data_files.iter().enumerate() {
        let img = image_of(c, o, &format!("{name}-data-{i}-{}", &sha[..12]), f).await?;
        data_images.push(img.name);
    }
    let mut body = serde_json::json!({
        "name": name,
        "image": image.name,
        "start": !a.no_start,
        "disk_gib": image.virtual_size_bytes.div_ceil(1 << 30).max(1),
        "labels": {IMPORTED_FROM: origin.chars().take(253).collect::<String>()},
    });
    if let Some(s) = spec {
        let obj = body.as_object_mut().context("body")?;
        obj.insert("vcpus".into(), s.vcpus.into());
        obj.insert("memory_mib".into(), s.memory_mib.into());
        obj.insert("disk_gib".into(), s.disk_gib.into());
        obj.insert("placement".into(), serde_json::to_value(&s.placement)?);
        obj.insert("ports".into(), serde_json::to_value(&s.ports)?);
        if let Some(u) = s.user_data {
            obj.insert("user_data".into(), u.into());
        }
        if !s.ssh_authorized_keys.is_empty() {
            obj.insert(
                "ssh_authorized_keys".into(),
                serde_json::to_value(&s.ssh_authorized_keys)?,
            );
        }
        if let Some(n) = s.network {
            obj.insert("network".into(), serde_json::to_value(n)?);
        }
        if !s.data_disks.is_empty() {
            let disks: Vec<virt8ra_api::DataDisk> = s
                .data_disks
                .iter()
                .zip(&data_images)
                .map(|(d, img)| virt8ra_api::DataDisk {
                    image: Some(img.clone()),
                    size_gib: d.size_gib,
                })
                .collect();
            obj.insert("data_disks".into(), serde_json::to_value(disks)?);
        }
    }
    if let Some(v) = a.vcpus {
        body["vcpus"] = v.into();
    }
    if let Some(m) = a.memory_mib {
        body["memory_mib"] = m.into();
    }
    let vm: Vm = c.post("/vms", &body).await?;
    Ok(vm)
}

#[derive(Debug, Subcommand)]
pub enum MigrationCmd {
    List {
        /// Only this VM's.
        #[arg(long)]
        vm: Option<String>,
        /// Only unfinished ones.
        #[arg(long)]
        active: bool,
    },
    Show {
        id: String,
        #[command(flatten)]
        wait: WaitOpts,
    },
}

pub(crate) async fn migration(c: &Client, o: Format, cmd: MigrationCmd) -> anyhow::Result<()> {
    match cmd {
        MigrationCmd::List { vm, active } => {
            let mut path = format!("/migrations?active={active}");
            if let Some(v) = vm {
                path.push_str(&format!("&vm={}", seg(&v)));
            }
            let page: Page<Migration> = c.get(&path).await?;
            list_migrations(o, &page.items)
        }
        MigrationCmd::Show { id, wait } => {
            let m: Migration = match wait.timeout() {
                Some(t) => wait_migration(c, &id, t, o).await?,
                None => c.get(&format!("/migrations/{}", seg(&id))).await?,
            };
            emit(o, &m, show_migration)
        }
    }
}
