//! The marketplace: this control plane's own catalog of appliances (signed
//! with its ed25519 key and readable by anyone, so other control planes can
//! add it), and the catalogs of others that the operator trusts.
//!
//! A remote catalog is accepted only when its signature verifies with the key
//! the operator gave for it; its images are imported only when their bytes
//! hash to the sha256 the signed index names. Either failure is a 400 that
//! says what did not match, and nothing is stored.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use virt8ra_api::{Appliance, Catalog, CatalogCreate, CatalogEntry, SignedCatalog};

use super::extract::Body;
use crate::error::{ApiError, ApiResult};
use crate::http::auth::Admin;
use crate::services::catalog::*;
use crate::state::Ctx;

#[utoipa::path(post, path = "/api/v1/appliances", tag = "marketplace", request_body = Appliance,
    responses((status = 201, body = Appliance), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
/// Publishes an appliance in this control plane's catalog. Its images must
/// be in the image store; their sha256, size and arch are filled in.
pub async fn publish(
    _: Admin,
    State(app): State<Ctx>,
    Body(mut a): Body<Appliance>,
) -> ApiResult<(StatusCode, Json<Appliance>)> {
    a.validate().map_err(ApiError::Invalid)?;
    for img in &mut a.images {
        let i = app.store.get_image(&img.name).await;
        let i = i.map_err(super::extract::missing_ref)?;
        if !img.sha256.is_empty() && img.sha256 != i.sha256 {
            return Err(ApiError::Invalid(format!(
                "image {}: the definition names sha256 {}, the image store has {}",
                img.name, img.sha256, i.sha256
            )));
        }
        img.sha256 = i.sha256;
        img.size_bytes = i.size_bytes;
        img.arch = i.arch;
        img.url = None;
    }
    let key = a.key();
    if app.store.get_doc(APPLIANCE, &key).await?.is_some() {
        return Err(ApiError::Conflict(format!(
            "appliance {key} is already published; publish a new version"
        )));
    }
    let body = serde_json::to_string(&a).map_err(|e| ApiError::Internal(e.to_string()))?;
    app.store.put_doc(APPLIANCE, &key, &key, &body).await?;
    Ok((StatusCode::CREATED, Json(a)))
}

#[utoipa::path(get, path = "/api/v1/appliances", tag = "marketplace",
    responses((status = 200, body = Vec<CatalogEntry>)), security(("bearer" = [])))]
/// Every appliance this control plane can deploy: its own and those of the
/// catalogs it trusts.
pub async fn list(_: Admin, State(app): State<Ctx>) -> ApiResult<Json<Vec<CatalogEntry>>> {
    let mut out: Vec<CatalogEntry> = local_appliances(&app)
        .await?
        .into_iter()
        .map(|a| CatalogEntry {
            catalog: LOCAL.into(),
            appliance: a,
        })
        .collect();
    for c in catalogs(&app).await? {
        for a in c.appliances {
            out.push(CatalogEntry {
                catalog: c.name.clone(),
                appliance: a,
            });
        }
    }
    Ok(Json(out))
}

#[utoipa::path(get, path = "/api/v1/appliances/{key}", tag = "marketplace",
    params(("key" = String, Path, description = "[CATALOG/]NAME[@VERSION]")),
    responses((status = 200, body = CatalogEntry), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<CatalogEntry>> {
    match resolve(&app, &key).await {
        Ok((e, _)) => Ok(Json(e)),
        // The path names it: not there is a 404 (with the same words).
        Err(ApiError::BadRef { kind, name, .. }) => Err(ApiError::NotFound {
            kind,
            name,
            hint: Some("; `virt8ra appliance list` shows what exists"),
        }),
        Err(ApiError::Invalid(m)) => Err(ApiError::Missing(m)),
        Err(e) => Err(e),
    }
}

#[utoipa::path(delete, path = "/api/v1/appliances/{key}", tag = "marketplace",
    params(("key" = String, Path, description = "NAME@VERSION of a local appliance")),
    responses((status = 204), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn unpublish(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    if app.store.delete_doc(APPLIANCE, &key).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::Missing(format!(
            "appliance '{key}' is not published here (name it as NAME@VERSION)"
        )))
    }
}

#[utoipa::path(get, path = "/api/v1/catalog", tag = "marketplace",
    responses((status = 200, body = SignedCatalog, description = "The signed index; no token needed")))]
/// This control plane's catalog, signed, for other control planes (public).
pub async fn serve(State(app): State<Ctx>) -> ApiResult<Json<SignedCatalog>> {
    Ok(Json(signed_index(&app).await?))
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CatalogKey {
    /// The ed25519 public key (hex) this control plane signs its catalog with.
    pub public_key: String,
}

#[utoipa::path(get, path = "/api/v1/catalog/key", tag = "marketplace",
    responses((status = 200, body = CatalogKey)), security(("bearer" = [])))]
/// The catalog's public key, for operators to pass to other control planes
/// out of band (admin only: trust must not come from the same channel).
pub async fn public_key(_: Admin, State(app): State<Ctx>) -> ApiResult<Json<CatalogKey>> {
    let key = signing_key(&app);
    Ok(Json(CatalogKey {
        public_key: hex::encode(key.verifying_key().to_bytes()),
    }))
}

#[utoipa::path(get, path = "/api/v1/catalog/images/{sha256}", tag = "marketplace",
    params(("sha256" = String, Path, description = "Content address of a published image")),
    responses((status = 200, description = "The qcow2 file", body = inline(super::extract::Binary), content_type = "application/octet-stream"),
              (status = 206, description = "The rest of the file from the requested offset", body = inline(super::extract::Binary), content_type = "application/octet-stream"),
              (status = 404, body = virt8ra_api::ErrorBody)))]
/// The image of a published appliance (public, like the catalog).
pub async fn image_data(
    State(app): State<Ctx>,
    Path(sha): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let published = local_appliances(&app)
        .await?
        .iter()
        .any(|a| a.images.iter().any(|i| i.sha256 == sha));
    if !published {
        return Err(ApiError::Missing(format!(
            "no published appliance has image {sha}"
        )));
    }
    let image = app
        .store
        .list_images()
        .await?
        .into_iter()
        .find(|i| i.sha256 == sha)
        .ok_or_else(|| ApiError::Missing(format!("image {sha} is no longer stored")))?;
    super::images::serve_file(&app, &image, &headers, "catalog").await
}

#[utoipa::path(post, path = "/api/v1/catalogs", tag = "marketplace", request_body = CatalogCreate,
    responses((status = 201, body = Catalog), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
/// Adds another provider's catalog, trusted with the given key. It is
/// fetched and verified now; a catalog that does not verify is refused.
pub async fn add(
    _: Admin,
    State(app): State<Ctx>,
    Body(req): Body<CatalogCreate>,
) -> ApiResult<(StatusCode, Json<Catalog>)> {
    virt8ra_api::validate::name("catalog", &req.name).map_err(ApiError::Invalid)?;
    if req.name == LOCAL {
        return Err(ApiError::Invalid(format!(
            "'{LOCAL}' names this control plane's own catalog"
        )));
    }
    if app.store.get_doc(CATALOG, &req.name).await?.is_some() {
        return Err(ApiError::Conflict(format!(
            "catalog '{}' already exists",
            req.name
        )));
    }
    let appliances = fetch_verified(&app.trust, &req.url, &req.public_key).await?;
    let c = Catalog {
        name: req.name,
        url: req.url,
        public_key: req.public_key.trim().to_lowercase(),
        appliances,
        fetched_at: Utc::now(),
    };
    let body = serde_json::to_string(&c).map_err(|e| ApiError::Internal(e.to_string()))?;
    app.store.put_doc(CATALOG, &c.name, &c.name, &body).await?;
    Ok((StatusCode::CREATED, Json(c)))
}

#[utoipa::path(post, path = "/api/v1/catalogs/{name}/refresh", tag = "marketplace",
    params(("name" = String, Path)),
    responses((status = 200, body = Catalog), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
/// Fetches the catalog again; on a verification failure the last verified
/// copy stays.
pub async fn refresh(
    _: Admin,
    State(app): State<Ctx>,
    Path(name): Path<String>,
) -> ApiResult<Json<Catalog>> {
    let mut c = get_catalog(&app, &name).await?;
    c.appliances = fetch_verified(&app.trust, &c.url, &c.public_key).await?;
    c.fetched_at = Utc::now();
    let body = serde_json::to_string(&c).map_err(|e| ApiError::Internal(e.to_string()))?;
    app.store.put_doc(CATALOG, &c.name, &c.name, &body).await?;
    Ok(Json(c))
}

#[utoipa::path(get, path = "/api/v1/catalogs", tag = "marketplace",
    responses((status = 200, body = Vec<Catalog>)), security(("bearer" = [])))]
pub async fn list_catalogs(_: Admin, State(app): State<Ctx>) -> ApiResult<Json<Vec<Catalog>>> {
    Ok(Json(catalogs(&app).await?))
}

#[utoipa::path(delete, path = "/api/v1/catalogs/{name}", tag = "marketplace",
    params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn remove(
    _: Admin,
    State(app): State<Ctx>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let c = get_catalog(&app, &name).await?;
    app.store.delete_doc(CATALOG, &c.name).await?;
    Ok(StatusCode::NO_CONTENT)
}
