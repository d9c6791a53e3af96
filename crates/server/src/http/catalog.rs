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
use serde::{Deserialize, Serialize};
use virt8ra_api::{Appliance, Catalog, CatalogCreate, CatalogEntry, SignedCatalog};

use super::extract::Body;
use crate::error::ApiResult;
use crate::http::auth::{Admin, Reader};
use crate::services::catalog;
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
    Body(a): Body<Appliance>,
) -> ApiResult<(StatusCode, Json<Appliance>)> {
    let a = catalog::publish(&app, a).await?;
    Ok((StatusCode::CREATED, Json(a)))
}

#[utoipa::path(get, path = "/api/v1/appliances", tag = "marketplace",
    responses((status = 200, body = Vec<CatalogEntry>)), security(("bearer" = [])))]
/// Every appliance this control plane can deploy: its own and those of the
/// catalogs it trusts.
pub async fn list(_: Reader, State(app): State<Ctx>) -> ApiResult<Json<Vec<CatalogEntry>>> {
    Ok(Json(catalog::entries(&app).await?))
}

#[utoipa::path(get, path = "/api/v1/appliances/{key}", tag = "marketplace",
    params(("key" = String, Path, description = "[CATALOG/]NAME[@VERSION]")),
    responses((status = 200, body = CatalogEntry), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    _: Reader,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<CatalogEntry>> {
    Ok(Json(catalog::entry(&app, &key).await?))
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
    catalog::unpublish(&app, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/catalog", tag = "marketplace",
    responses((status = 200, body = SignedCatalog, description = "The signed index; no token needed")))]
/// This control plane's catalog, signed, for other control planes (public).
pub async fn serve(State(app): State<Ctx>) -> ApiResult<Json<SignedCatalog>> {
    Ok(Json(catalog::signed_index(&app).await?))
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
    let key = catalog::signing_key(&app);
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
    let image = catalog::published_image(&app, &sha).await?;
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
    let c = catalog::add(&app, req).await?;
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
    Ok(Json(catalog::refresh(&app, &name).await?))
}

#[utoipa::path(get, path = "/api/v1/catalogs", tag = "marketplace",
    responses((status = 200, body = Vec<Catalog>)), security(("bearer" = [])))]
pub async fn list_catalogs(_: Admin, State(app): State<Ctx>) -> ApiResult<Json<Vec<Catalog>>> {
    Ok(Json(catalog::catalogs(&app).await?))
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
    catalog::remove(&app, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
