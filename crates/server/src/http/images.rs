//! Images: uploaded once, converted to qcow2, stored by content address
//! (`<sha256>.qcow2`) and served to agents, who verify the checksum.
//!
//! Every image that comes in (upload, URL import, remote catalog, a VM
//! import bundle's disk, which the CLI uploads) goes through
//! [`crate::services::images::ingest`],
//! which treats it as hostile (see `virt8ra_image`): a VMDK extent or a
//! qcow2 data file could otherwise make qemu-img copy a host file, the
//! admin token say, into a stored image that anyone can then download.

use axum::body::Body as RawBody;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncSeekExt;
use virt8ra_api::{Image, Page};

use super::extract::Query;
use crate::error::{ApiError, ApiResult, Kind};
use crate::http::auth::{Admin, AdminOrHost, Caller, Grant, Reader, Writer};
use crate::services::images;
use crate::services::uploads;
use crate::state::Ctx;

#[utoipa::path(get, path = "/api/v1/images", tag = "images",
    responses((status = 200, body = Page<Image>)), security(("bearer" = [])))]
pub async fn list(Reader(c): Reader, State(app): State<Ctx>) -> ApiResult<Json<Page<Image>>> {
    let mut items = images::list(&app).await?;
    // Public images and the project's own (a platform admin who picked a
    // project: that project's and the public ones).
    items.retain(|i| {
        i.project
            .as_deref()
            .is_none_or(|p| c.sees(p) && c.list_project().is_none_or(|l| l == p))
    });
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

/// The image `key` if the caller sees it (public, or its project's).
async fn tenant_image(app: &Ctx, c: &Caller, key: &str) -> ApiResult<Image> {
    let i = images::get(app, key).await?;
    if let Some(p) = &i.project {
        c.check(p, Kind::Image, key)?;
    }
    Ok(i)
}

/// The project a new image belongs to: a project token's; a platform
/// admin's pick, or none (public).
fn image_owner(c: &Caller) -> Option<String> {
    c.project.clone()
}

#[utoipa::path(get, path = "/api/v1/images/{key}", tag = "images",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = Image), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    Reader(c): Reader,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<Image>> {
    Ok(Json(tenant_image(&app, &c, &key).await?))
}

#[utoipa::path(delete, path = "/api/v1/images/{key}", tag = "images",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 204), (status = 404, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    Writer(c): Writer,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    let i = tenant_image(&app, &c, &key).await?;
    if i.project.is_none() && matches!(c.grant, Grant::Project { .. }) {
        return Err(ApiError::Forbidden(format!(
            "image '{}' is public: only a platform admin can delete it",
            i.name
        )));
    }
    images::delete(&app, &key).await?;
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

#[utoipa::path(post, path = "/api/v1/images", tag = "images", params(UploadQuery),
    request_body(content = inline(super::extract::Binary), content_type = "application/octet-stream",
                 description = "The disk image: qcow2, raw, VMDK, VHD or VHDX"),
    responses((status = 201, body = Image), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn upload(
    Writer(c): Writer,
    State(app): State<Ctx>,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: RawBody,
) -> ApiResult<(StatusCode, Json<Image>)> {
    super::extract::octet_stream(&headers)?;
    let q = uploads::ImageUpload {
        name: q.name,
        arch: q.arch,
        labels: q.labels,
        version: q.version,
        project: image_owner(&c),
    };
    let i = uploads::upload_image(&app, q, body.into_data_stream()).await?;
    Ok((StatusCode::CREATED, Json(i)))
}

#[utoipa::path(post, path = "/api/v1/images/import", tag = "images",
    request_body = virt8ra_api::ImageImportUrl,
    responses((status = 201, body = Image), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn import_url(
    Writer(c): Writer,
    State(app): State<Ctx>,
    super::extract::Body(req): super::extract::Body<virt8ra_api::ImageImportUrl>,
) -> ApiResult<(StatusCode, Json<Image>)> {
    let i = images::import_url(&app, req, image_owner(&c)).await?;
    Ok((StatusCode::CREATED, Json(i)))
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
    responses((status = 200, description = "The qcow2 file", body = inline(super::extract::Binary), content_type = "application/octet-stream"),
              (status = 206, description = "The rest of the file from the requested offset", body = inline(super::extract::Binary), content_type = "application/octet-stream"),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn download(
    AdminOrHost(host): AdminOrHost,
    State(app): State<Ctx>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let i = images::get(&app, &key).await?;
    serve_file(&app, &i, &headers, &host.unwrap_or_else(|| "admin".into())).await
}

/// Serves an image's file (from `Range: bytes=START-` if asked), counting
/// the bytes sent under `who`.
pub async fn serve_file(
    app: &Ctx,
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
    let (app, who) = (app.clone(), who.to_string());
    let stream = tokio_util::io::ReaderStream::new(f).inspect(move |c| {
        if let Ok(c) = c {
            app.transfers.add(&who, c.len() as u64);
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

#[utoipa::path(get, path = "/api/v1/images/transfers", tag = "images",
    responses((status = 200, body = virt8ra_api::ImageTransfers)), security(("bearer" = [])))]
pub async fn transfers(
    _: Admin,
    State(app): State<Ctx>,
) -> ApiResult<Json<virt8ra_api::ImageTransfers>> {
    Ok(Json(images::transfers(&app).await))
}

#[utoipa::path(post, path = "/api/v1/images/{key}/replicate", tag = "images",
    request_body = virt8ra_api::ImageReplicate,
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 202, body = Image), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn replicate(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
    super::extract::Body(req): super::extract::Body<virt8ra_api::ImageReplicate>,
) -> ApiResult<(StatusCode, Json<Image>)> {
    let i = images::replicate(&app, &key, &req.sites).await?;
    Ok((StatusCode::ACCEPTED, Json(i)))
}
