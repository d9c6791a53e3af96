//! Images: uploaded once, converted to qcow2, stored by content address
//! (`<sha256>.qcow2`) and served to agents, who verify the checksum.
//!
//! Every image that comes in (upload, URL import, remote catalog, a VM
//! import bundle's disk, which the CLI uploads) goes through [`ingest`],
//! which treats it as hostile (see `virt8ra_image`): a VMDK extent or a
//! qcow2 data file could otherwise make qemu-img copy a host file, the
//! admin token say, into a stored image that anyone can then download.

use std::path::{Path as FsPath, PathBuf};

use axum::body::Body as RawBody;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use futures_util::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use virt8ra_api::{validate, Image, Page};

use super::Query;
use crate::auth::{Admin, AdminOrHost};
use crate::error::{ApiError, ApiResult};
use crate::state::App;

#[utoipa::path(get, path = "/api/v1/images", tag = "images",
    responses((status = 200, body = Page<Image>)), security(("bearer" = [])))]
pub async fn list(_: Admin, State(app): State<App>) -> ApiResult<Json<Page<Image>>> {
    Ok(Json(Page {
        items: app.store.list_images().await?,
        next_cursor: None,
    }))
}

#[utoipa::path(get, path = "/api/v1/images/{key}", tag = "images",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = Image), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    _: Admin,
    State(app): State<App>,
    Path(key): Path<String>,
) -> ApiResult<Json<Image>> {
    Ok(Json(app.store.get_image(&key).await?))
}

#[utoipa::path(delete, path = "/api/v1/images/{key}", tag = "images",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 204), (status = 404, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    _: Admin,
    State(app): State<App>,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    let i = app.store.get_image(&key).await?;
    app.store.delete_image(&i.id).await?;
    // Keep the file if another image record has the same content.
    let same = app
        .store
        .list_images()
        .await?
        .iter()
        .any(|o| o.sha256 == i.sha256);
    if !same {
        let _ = tokio::fs::remove_file(app.images_dir.join(format!("{}.qcow2", i.sha256))).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    /// Name of the new image.
    pub name: String,
    /// Guest architecture (default x86_64).
    pub arch: Option<String>,
    /// Labels, `KEY=VALUE` pairs separated by commas.
    pub labels: Option<String>,
    /// Version tag, e.g. `1.0.0`.
    pub version: Option<String>,
}

/// Removes a temporary file when dropped, unless it was kept.
struct TempFile(Option<PathBuf>);
impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[utoipa::path(post, path = "/api/v1/images", tag = "images", params(UploadQuery),
    request_body(content = inline(super::openapi::Binary), content_type = "application/octet-stream",
                 description = "The disk image: qcow2, raw, VMDK, VHD or VHDX"),
    responses((status = 201, body = Image), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn upload(
    _: Admin,
    State(app): State<App>,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: RawBody,
) -> ApiResult<(StatusCode, Json<Image>)> {
    super::octet_stream(&headers)?;
    let arch = check_new(&app, &q.name, q.arch.as_deref(), q.version.as_deref()).await?;
    let mut labels = std::collections::BTreeMap::new();
    for pair in q.labels.iter().flat_map(|l| l.split(',')) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(ApiError::Invalid(format!(
                "label {pair:?} must be KEY=VALUE"
            )));
        };
        labels.insert(k.to_string(), v.to_string());
    }
    validate::labels(&labels).map_err(ApiError::Invalid)?;
    let id = uuid::Uuid::new_v4().to_string();
    let upload = app.images_dir.join(format!("upload-{id}"));
    let _upload_guard = TempFile(Some(upload.clone()));
    let mut f = tokio::fs::File::create(&upload)
        .await
        .map_err(|e| ApiError::Internal(format!("create {}: {e}", upload.display())))?;
    let mut stream = body.into_data_stream();
    let mut received: u64 = 0;
    let mut source_hash = Sha256::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::Invalid(format!("upload interrupted: {e}")))?;
        received += chunk.len() as u64;
        source_hash.update(&chunk);
        f.write_all(&chunk)
            .await
            .map_err(|e| ApiError::Internal(format!("write upload: {e}")))?;
    }
    f.sync_all()
        .await
        .map_err(|e| ApiError::Internal(format!("sync upload: {e}")))?;
    drop(f);
    if received == 0 {
        return Err(ApiError::Invalid("the upload is empty".into()));
    }

    ingest(
        &app,
        &upload,
        Meta {
            id,
            name: q.name,
            arch,
            version: q.version,
            provenance: "upload".into(),
            source_sha256: Some(hex::encode(source_hash.finalize())),
            labels,
        },
    )
    .await
    .map(|i| (StatusCode::CREATED, Json(i)))
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
}

/// The largest virtual size an imported image may have
/// (`--max-image-virtual-size-gib`). Process-wide: one control plane runs
/// per process, and `run` sets it before serving.
static MAX_VIRTUAL_SIZE: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(virt8ra_image::DEFAULT_MAX_VIRTUAL_SIZE);

pub fn set_max_virtual_size(bytes: u64) {
    MAX_VIRTUAL_SIZE.store(bytes, std::sync::atomic::Ordering::Relaxed);
}

pub fn max_virtual_size() -> u64 {
    MAX_VIRTUAL_SIZE.load(std::sync::atomic::Ordering::Relaxed)
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
pub async fn ingest(app: &App, upload: &FsPath, m: Meta) -> ApiResult<Image> {
    let id = m.id.clone();
    let limit = max_virtual_size();
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
    };
    app.store.create_image(&image).await?;
    Ok(image)
}

/// Validates the name, arch and version of a new image; returns the arch.
pub async fn check_new(
    app: &App,
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

#[utoipa::path(post, path = "/api/v1/images/import", tag = "images",
    request_body = virt8ra_api::ImageImportUrl,
    responses((status = 201, body = Image), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn import_url(
    _: Admin,
    State(app): State<App>,
    super::Body(req): super::Body<virt8ra_api::ImageImportUrl>,
) -> ApiResult<(StatusCode, Json<Image>)> {
    let arch = check_new(&app, &req.name, req.arch.as_deref(), req.version.as_deref()).await?;
    let i = import_from_url(
        &app,
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
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(i)))
}

/// How many times a broken download is resumed before the import gives up.
const URL_ATTEMPTS: u32 = 5;

/// Downloads `url` (resuming a broken transfer with range requests), checks
/// its sha256 when one is expected, and stores it like an upload.
pub async fn import_from_url(
    app: &App,
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

/// Parses `Range: bytes=START-` (the only form agents send, to resume).
fn range_start(headers: &HeaderMap) -> ApiResult<Option<u64>> {
    let Some(v) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .map_err(|_| ApiError::Invalid("malformed Range header".into()))?;
    let rest = s
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .ok_or_else(|| ApiError::Invalid("only 'Range: bytes=START-' is supported".into()))?;
    rest.parse::<u64>()
        .map(Some)
        .map_err(|_| ApiError::Invalid("malformed Range header".into()))
}

#[utoipa::path(get, path = "/api/v1/images/{key}/data", tag = "images",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, description = "The qcow2 file", body = inline(super::openapi::Binary), content_type = "application/octet-stream"),
              (status = 206, description = "The rest of the file from the requested offset", body = inline(super::openapi::Binary), content_type = "application/octet-stream"),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn download(
    AdminOrHost(host): AdminOrHost,
    State(app): State<App>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let i = app.store.get_image(&key).await?;
    serve_file(&app, &i, &headers, &host.unwrap_or_else(|| "admin".into())).await
}

pub fn valid_sha(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Serves an image's file (from `Range: bytes=START-` if asked), counting
/// the bytes sent under `who`.
pub async fn serve_file(
    app: &App,
    i: &Image,
    headers: &HeaderMap,
    who: &str,
) -> ApiResult<Response> {
    let path = app.images_dir.join(format!("{}.qcow2", i.sha256));
    let f = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::Internal(format!("image file {}: {e}", path.display())))?;
    let (f, status, mut hdrs) = ranged(f, headers).await?;
    hdrs.push((
        header::HeaderName::from_static("x-virt8ra-sha256"),
        i.sha256.clone(),
    ));
    let who = who.to_string();
    let stream = tokio_util::io::ReaderStream::new(f).inspect(move |c| {
        if let Ok(c) = c {
            count_transfer(&who, c.len() as u64);
        }
    });
    Ok(respond(status, RawBody::from_stream(stream), hdrs))
}

/// Positions an open file for an answer from `Range: bytes=START-` if the
/// request asks for one: the file, the status, and the content headers.
pub(crate) async fn ranged(
    mut f: tokio::fs::File,
    headers: &HeaderMap,
) -> ApiResult<(
    tokio::fs::File,
    StatusCode,
    Vec<(header::HeaderName, String)>,
)> {
    let len = f
        .metadata()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .len();
    let mut status = StatusCode::OK;
    let mut hdrs = vec![
        (header::CONTENT_TYPE, "application/octet-stream".to_string()),
        (header::ACCEPT_RANGES, "bytes".to_string()),
    ];
    let mut remaining = len;
    if let Some(start) = range_start(headers)? {
        if start > len {
            return Err(ApiError::Invalid(format!(
                "range start {start} is past the end ({len} bytes)"
            )));
        }
        f.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        status = StatusCode::PARTIAL_CONTENT;
        remaining = len - start;
        hdrs.push((
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", len.saturating_sub(1)),
        ));
    }
    hdrs.push((header::CONTENT_LENGTH, remaining.to_string()));
    Ok((f, status, hdrs))
}

/// A response with a body and headers (values that do not parse are left out).
pub(crate) fn respond(
    status: StatusCode,
    body: RawBody,
    hdrs: Vec<(header::HeaderName, String)>,
) -> Response {
    let mut resp = (status, body).into_response();
    for (k, v) in hdrs {
        if let Ok(v) = v.parse() {
            resp.headers_mut().insert(k, v);
        }
    }
    resp
}

/// Bytes of image data the control plane served, by host id (`admin` for
/// operators). Process-wide: one control plane runs per process.
static TRANSFERS: std::sync::Mutex<std::collections::BTreeMap<String, u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn count_transfer(who: &str, n: u64) {
    let mut t = TRANSFERS.lock().unwrap_or_else(|p| p.into_inner());
    *t.entry(who.to_string()).or_default() += n;
}

#[utoipa::path(get, path = "/api/v1/images/transfers", tag = "images",
    responses((status = 200, body = virt8ra_api::ImageTransfers)), security(("bearer" = [])))]
pub async fn transfers(
    _: Admin,
    State(app): State<App>,
) -> ApiResult<Json<virt8ra_api::ImageTransfers>> {
    let by_id = TRANSFERS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut out = virt8ra_api::ImageTransfers::default();
    for (id, n) in by_id {
        let name = match app.store.get_host(&id).await {
            Ok(h) => h.name,
            Err(_) => id,
        };
        *out.long_link_bytes_by_host.entry(name).or_default() += n;
        out.long_link_bytes += n;
    }
    Ok(Json(out))
}

#[utoipa::path(post, path = "/api/v1/images/{key}/replicate", tag = "images",
    request_body = virt8ra_api::ImageReplicate,
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 202, body = Image), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn replicate(
    _: Admin,
    State(app): State<App>,
    Path(key): Path<String>,
    super::Body(req): super::Body<virt8ra_api::ImageReplicate>,
) -> ApiResult<(StatusCode, Json<Image>)> {
    let mut i = app.store.get_image(&key).await?;
    if req.sites.is_empty() {
        return Err(ApiError::Invalid("name at least one site".into()));
    }
    let mut sites = Vec::new();
    for s in &req.sites {
        match app.store.get_site(s).await {
            Ok(site) => sites.push(site.name),
            Err(virt8ra_store::StoreError::NotFound { .. }) => {
                return Err(super::missing_ref("site", s, "site"))
            }
            Err(e) => return Err(e.into()),
        }
    }
    let mut changed = false;
    for s in sites {
        if !i.sites.contains(&s) {
            i.sites.push(s);
            changed = true;
        }
    }
    if changed {
        i.sites.sort();
        app.store.update_image(&i).await?;
    }
    crate::distribution::invalidate();
    for h in app.store.list_hosts().await? {
        if i.sites.contains(&h.site) {
            app.mark_host(&h.id);
        }
    }
    app.wake.notify_one();
    Ok((StatusCode::ACCEPTED, Json(i)))
}
