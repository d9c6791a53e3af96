//! Images: uploaded once, converted to qcow2, stored by content address
//! (`<sha256>.qcow2`) and served to agents, who verify the checksum.

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

/// Formats accepted on import; everything is stored as qcow2.
const ACCEPTED_FORMATS: &[&str] = &["qcow2", "raw", "vmdk", "vpc", "vhdx"];

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
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    /// Name of the new image.
    pub name: String,
    /// Guest architecture (default x86_64).
    pub arch: Option<String>,
    /// Labels, `KEY=VALUE` pairs separated by commas.
    pub labels: Option<String>,
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
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
                 description = "The disk image: qcow2, raw, VMDK, VHD or VHDX"),
    responses((status = 201, body = Image), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn upload(
    _: Admin,
    State(app): State<App>,
    Query(q): Query<UploadQuery>,
    body: RawBody,
) -> ApiResult<(StatusCode, Json<Image>)> {
    validate::name("image", &q.name).map_err(ApiError::Invalid)?;
    let arch = q.arch.unwrap_or_else(|| "x86_64".into());
    if !["x86_64", "aarch64", "riscv64"].contains(&arch.as_str()) {
        return Err(ApiError::Invalid(format!(
            "unknown arch {arch:?}: use x86_64, aarch64 or riscv64"
        )));
    }
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
    if app.store.get_image(&q.name).await.is_ok() {
        return Err(ApiError::Conflict(format!(
            "image '{}' already exists",
            q.name
        )));
    }
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

    let info = qemu_img_info(&upload).await?;
    if !ACCEPTED_FORMATS.contains(&info.format.as_str()) {
        return Err(ApiError::Invalid(format!(
            "unsupported image format '{}': import qcow2, raw, VMDK, VHD (vpc) or VHDX",
            info.format
        )));
    }
    if info.has_backing_file {
        return Err(ApiError::Invalid(
            "the image has a backing file; flatten it first (qemu-img convert -O qcow2 IN OUT)"
                .into(),
        ));
    }
    if info.format == "raw" && !received.is_multiple_of(512) {
        return Err(ApiError::Invalid(format!(
            "not a disk image: {received} bytes of data in no known format (a raw disk is a multiple of 512 bytes)"
        )));
    }
    let stored = if info.format == "qcow2" {
        upload.clone()
    } else {
        let out = app.images_dir.join(format!("convert-{id}.qcow2"));
        let st = tokio::process::Command::new("qemu-img")
            .args(["convert", "-f", &info.format, "-O", "qcow2"])
            .arg(&upload)
            .arg(&out)
            .output()
            .await
            .map_err(|e| ApiError::Internal(format!("run qemu-img: {e}")))?;
        if !st.status.success() {
            let _ = tokio::fs::remove_file(&out).await;
            return Err(ApiError::Invalid(format!(
                "cannot convert the {} image: {}",
                info.format,
                String::from_utf8_lossy(&st.stderr).trim()
            )));
        }
        out
    };
    let _stored_guard = TempFile(Some(stored.clone()));
    let (sha, size) = sha256_file(&stored).await?;
    let final_path = app.images_dir.join(format!("{sha}.qcow2"));
    tokio::fs::rename(&stored, &final_path)
        .await
        .map_err(|e| ApiError::Internal(format!("store image: {e}")))?;
    let image = Image {
        id,
        name: q.name,
        sha256: sha,
        format: "qcow2".into(),
        source_format: info.format,
        size_bytes: size,
        virtual_size_bytes: info.virtual_size,
        arch,
        source_sha256: Some(hex::encode(source_hash.finalize())),
        labels,
        created_at: Utc::now(),
    };
    app.store.create_image(&image).await?;
    Ok((StatusCode::CREATED, Json(image)))
}

struct ImgInfo {
    format: String,
    virtual_size: u64,
    has_backing_file: bool,
}

async fn qemu_img_info(path: &FsPath) -> ApiResult<ImgInfo> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .await
        .map_err(|e| ApiError::Internal(format!("run qemu-img (is qemu-utils installed?): {e}")))?;
    if !out.status.success() {
        // The server's own path means nothing to the client.
        let why = String::from_utf8_lossy(&out.stderr)
            .trim()
            .replace(&format!("Could not open '{}': ", path.display()), "");
        return Err(ApiError::Invalid(format!(
            "not a readable disk image: {why}"
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| ApiError::Internal(format!("qemu-img info output: {e}")))?;
    Ok(ImgInfo {
        format: v["format"].as_str().unwrap_or("unknown").to_string(),
        virtual_size: v["virtual-size"].as_u64().unwrap_or(0),
        has_backing_file: v.get("backing-filename").is_some(),
    })
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
pub(crate) fn range_start(headers: &HeaderMap) -> ApiResult<Option<u64>> {
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
    responses((status = 200, description = "The qcow2 file", content_type = "application/octet-stream"),
              (status = 206, description = "The rest of the file from the requested offset"),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn download(
    _: AdminOrHost,
    State(app): State<App>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let i = app.store.get_image(&key).await?;
    let path = app.images_dir.join(format!("{}.qcow2", i.sha256));
    let mut f = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::Internal(format!("image file {}: {e}", path.display())))?;
    let len = f
        .metadata()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .len();
    let start = range_start(&headers)?;
    let mut status = StatusCode::OK;
    let mut hdrs = vec![
        (header::CONTENT_TYPE, "application/octet-stream".to_string()),
        (header::ACCEPT_RANGES, "bytes".to_string()),
        (
            header::HeaderName::from_static("x-virt8ra-sha256"),
            i.sha256.clone(),
        ),
    ];
    let mut remaining = len;
    if let Some(start) = start {
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
    let stream = tokio_util::io::ReaderStream::new(f);
    let mut resp = (status, RawBody::from_stream(stream)).into_response();
    for (k, v) in hdrs {
        if let Ok(v) = v.parse() {
            resp.headers_mut().insert(k, v);
        }
    }
    Ok(resp)
}
