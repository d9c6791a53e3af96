//! Images: received once, checked, converted to qcow2, hashed and stored
//! by content address (`<sha256>.qcow2`); listed, deleted, replicated to
//! sites, and the bytes served counted.
//!
//! Every image that comes in (upload, URL import, remote catalog, a VM
//! import bundle's disk, which the CLI uploads) goes through [`ingest`],
//! which treats it as hostile (see `virt8ra_image`): a VMDK extent or a
//! qcow2 data file could otherwise make qemu-img copy a host file, the
//! admin token say, into a stored image that anyone can then download.

use std::path::{Path as FsPath, PathBuf};

use chrono::Utc;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use virt8ra_api::{validate, Image};

use crate::error::{missing_ref, ApiError, ApiResult};
use crate::state::Ctx;

/// Removes a temporary file when dropped, unless it was kept.
pub struct TempFile(pub Option<PathBuf>);
impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// What an import knows about the image besides its bytes.
pub struct Meta {
    pub id: String,
    pub name: String,
    pub arch: String,
    pub version: Option<String>,
    pub provenance: String,
    /// sha256 of the file as received, before any conversion.
    pub source_sha256: Option<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    /// The owning project; none: public.
    pub project: Option<String>,
}

/// A refused image is the sender's problem (400); anything else ours.
fn image_error(e: virt8ra_image::ImageError) -> ApiError {
    match e {
        virt8ra_image::ImageError::Refused(m) => ApiError::Invalid(m),
        virt8ra_image::ImageError::Internal(m) => ApiError::Internal(m),
    }
}

/// Checks, converts (to qcow2), hashes and stores a received file. Every
/// file is hostile until [`virt8ra_image::inspect`] passed it: the format
/// from its bytes, no reference to another file, `qemu-img check`, the
/// virtual-size limit; a conversion runs sandboxed and its output is
/// inspected again. A refused file leaves nothing behind.
pub async fn ingest(app: &Ctx, upload: &FsPath, m: Meta) -> ApiResult<Image> {
    let id = m.id.clone();
    let limit = app.max_image_virtual_size;
    let info = virt8ra_image::inspect(upload, &virt8ra_image::Policy::import(limit))
        .await
        .map_err(image_error)?;
    let stored = if info.format == virt8ra_image::Format::Qcow2 {
        upload.to_path_buf()
    } else {
        let out = app.images_dir.join(format!("convert-{id}.qcow2"));
        virt8ra_image::convert_to_qcow2(upload, &info, &out, limit)
            .await
            .map_err(image_error)?;
        out
    };
    let _stored_guard = TempFile(Some(stored.clone()));
    let (sha, size) = sha256_file(&stored).await?;
    let final_path = app.images_dir.join(format!("{sha}.qcow2"));
    tokio::fs::rename(&stored, &final_path)
        .await
        .map_err(|e| ApiError::Internal(format!("store image: {e}")))?;
    let image = Image {
        id: m.id,
        name: m.name,
        sha256: sha,
        format: "qcow2".into(),
        source_format: info.format.qemu_name().to_string(),
        size_bytes: size,
        virtual_size_bytes: info.virtual_size,
        arch: m.arch,
        source_sha256: m.source_sha256,
        labels: m.labels,
        created_at: Utc::now(),
        version: m.version,
        provenance: Some(m.provenance),
        sites: vec![],
        project: m.project,
    };
    app.store.create_image(&image).await?;
    Ok(image)
}

/// Validates the name, arch and version of a new image; returns the arch.
pub async fn check_new(
    app: &Ctx,
    name: &str,
    arch: Option<&str>,
    version: Option<&str>,
) -> ApiResult<String> {
    validate::name("image", name).map_err(ApiError::Invalid)?;
    let arch = arch.unwrap_or("x86_64").to_string();
    if !["x86_64", "aarch64", "riscv64"].contains(&arch.as_str()) {
        return Err(ApiError::Invalid(format!(
            "unknown arch {arch:?}: use x86_64, aarch64 or riscv64"
        )));
    }
    if let Some(v) = version {
        validate_version(v)?;
    }
    if app.store.get_image(name).await.is_ok() {
        return Err(ApiError::Conflict(format!("image '{name}' already exists")));
    }
    Ok(arch)
}

/// A version tag: 1-32 characters of letters, digits, `.`, `-`, `+`.
pub fn validate_version(v: &str) -> ApiResult<()> {
    let ok = !v.is_empty()
        && v.len() <= 32
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'+');
    if ok {
        Ok(())
    } else {
        Err(ApiError::Invalid(format!(
            "invalid version {v:?}: use 1-32 letters, digits, '.', '-' or '+'"
        )))
    }
}

/// How many times a broken download is resumed before the import gives up.
const URL_ATTEMPTS: u32 = 5;

/// Downloads `url` (resuming a broken transfer with range requests), checks
/// its sha256 when one is expected, and stores it like an upload.
pub async fn import_from_url(
    app: &Ctx,
    url: &str,
    expected_sha: Option<&str>,
    m: Meta,
) -> ApiResult<Image> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| ApiError::Invalid(format!("invalid URL {url:?}: {e}")))?;
    if parsed.scheme() != "http" && parsed.scheme() != "https" {
        return Err(ApiError::Invalid(format!(
            "invalid URL {url:?}: only http and https are supported"
        )));
    }
    if let Some(e) = expected_sha {
        if e.len() != 64 || !e.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ApiError::Invalid(format!(
                "invalid sha256 {e:?}: 64 hex digits"
            )));
        }
    }
    let dest = app.images_dir.join(format!("download-{}", m.id));
    let _guard = TempFile(Some(dest.clone()));
    let have = download_resuming(&app.trust, url, &dest).await?;
    if have == 0 {
        return Err(ApiError::Invalid(format!("{url} sent no data")));
    }
    let (sha, _) = sha256_file(&dest).await?;
    if let Some(e) = expected_sha {
        if !sha.eq_ignore_ascii_case(e) {
            return Err(ApiError::Invalid(format!(
                "checksum mismatch: {url} sent data with sha256 {sha}, expected {e}; the download was discarded"
            )));
        }
    }
    ingest(app, &dest, m).await
}

/// Downloads `url` into `dest`; returns the byte count.
async fn download_resuming(trust: &virt8ra_tls::Trust, url: &str, dest: &FsPath) -> ApiResult<u64> {
    let client = trust
        .http()
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(dest)
        .await
        .map_err(|e| ApiError::Internal(format!("create {}: {e}", dest.display())))?;
    let mut have: u64 = 0;
    let mut last_err = String::new();
    for attempt in 0..URL_ATTEMPTS {
        if attempt > 0 {
            tracing::info!(url, offset = have, attempt, "resuming the image download");
            tokio::time::sleep(std::time::Duration::from_millis(200 * u64::from(attempt))).await;
        }
        let mut rb = client.get(url);
        if have > 0 {
            rb = rb.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let resp = match rb.send().await {
            Ok(r) => r,
            Err(e) => {
                // A certificate problem does not go away by trying again.
                if let Some(why) = trust.explain(&e, url) {
                    return Err(ApiError::Invalid(format!("cannot fetch {url}: {why}")));
                }
                last_err = format!("cannot fetch {url}: {}", trust.describe(&e, url));
                continue;
            }
        };
        let status = resp.status();
        if !status.is_success() {
            return Err(ApiError::Invalid(format!("{url} answered {status}")));
        }
        if have > 0 && status != reqwest::StatusCode::PARTIAL_CONTENT {
            // No range support: start over.
            have = 0;
            f.set_len(0)
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            f.seek(std::io::SeekFrom::Start(0))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?;
        }
        let total = resp.content_length().map(|n| n + have);
        let mut stream = resp.bytes_stream();
        let mut broke = false;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => {
                    f.write_all(&c)
                        .await
                        .map_err(|e| ApiError::Internal(format!("write download: {e}")))?;
                    have += c.len() as u64;
                }
                Err(e) => {
                    last_err = format!("transfer from {url} broke at {have} bytes: {e}");
                    broke = true;
                    break;
                }
            }
        }
        if !broke && total.is_none_or(|t| have >= t) {
            f.sync_all()
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            return Ok(have);
        }
        if !broke {
            last_err = format!("{url} ended the transfer early, at {have} bytes");
        }
    }
    Err(ApiError::Invalid(format!(
        "{last_err} (gave up after {URL_ATTEMPTS} attempts)"
    )))
}

/// The sha256 (hex) and the size of a file.
pub async fn sha256_file(path: &FsPath) -> ApiResult<(String, u64)> {
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(|e| ApiError::Internal(format!("open {}: {e}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n_total = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .await
            .map_err(|e| ApiError::Internal(format!("read {}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        n_total += n as u64;
        h.update(&buf[..n]);
    }
    Ok((hex::encode(h.finalize()), n_total))
}

/// Whether `s` is a sha256 in hex.
pub fn valid_sha(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Imports an image from a URL (checked against `req.sha256` if given).
pub async fn import_url(
    app: &Ctx,
    req: virt8ra_api::ImageImportUrl,
    project: Option<String>,
) -> ApiResult<Image> {
    let arch = check_new(app, &req.name, req.arch.as_deref(), req.version.as_deref()).await?;
    import_from_url(
        app,
        &req.url,
        req.sha256.as_deref(),
        Meta {
            id: uuid::Uuid::new_v4().to_string(),
            name: req.name,
            arch,
            version: req.version,
            provenance: req.url.clone(),
            source_sha256: None,
            labels: Default::default(),
            project,
        },
    )
    .await
}

pub async fn list(app: &Ctx) -> ApiResult<Vec<Image>> {
    Ok(app.store.list_images().await?)
}

pub async fn get(app: &Ctx, key: &str) -> ApiResult<Image> {
    Ok(app.store.get_image(key).await?)
}

/// Deletes an image record, and its file unless another record has the
/// same content.
pub async fn delete(app: &Ctx, key: &str) -> ApiResult<()> {
    let i = app.store.get_image(key).await?;
    app.store.delete_image(&i.id).await?;
    let same = app
        .store
        .list_images()
        .await?
        .iter()
        .any(|o| o.sha256 == i.sha256);
    if !same {
        let _ = tokio::fs::remove_file(app.images_dir.join(format!("{}.qcow2", i.sha256))).await;
    }
    Ok(())
}

/// Adds `sites` (each must exist; a missing one is a 400) to the sites an
/// image is kept at, and has their hosts fetch it on the next pass.
pub async fn replicate(app: &Ctx, key: &str, sites: &[String]) -> ApiResult<Image> {
    let mut i = app.store.get_image(key).await?;
    if sites.is_empty() {
        return Err(ApiError::Invalid("name at least one site".into()));
    }
    let mut names = Vec::new();
    for s in sites {
        let site = app.store.get_site(s).await;
        names.push(site.map_err(missing_ref)?.name);
    }
    let mut changed = false;
    for s in names {
        if !i.sites.contains(&s) {
            i.sites.push(s);
            changed = true;
        }
    }
    if changed {
        i.sites.sort();
        app.store.update_image(&i).await?;
    }
    crate::services::distribution::invalidate(app);
    for h in app.store.list_hosts().await? {
        if i.sites.contains(&h.site) {
            app.mark_host(&h.id);
        }
    }
    app.wake.notify_one();
    Ok(i)
}

/// The image bytes served so far, by host name (`admin` for operators).
pub async fn transfers(app: &Ctx) -> virt8ra_api::ImageTransfers {
    let mut out = virt8ra_api::ImageTransfers::default();
    for (id, n) in app.transfers.snapshot() {
        let name = match app.store.get_host(&id).await {
            Ok(h) => h.name,
            Err(_) => id,
        };
        *out.long_link_bytes_by_host.entry(name).or_default() += n;
        out.long_link_bytes += n;
    }
    out
}
