//! Providers.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use virt8ra_api::{Page, Provider, ProviderCreate, ProviderUpdate};

use super::extract::Body;
use crate::error::{ApiError, ApiResult, Kind};
use crate::http::auth::{Admin, Infra};
use crate::services::topology;
use crate::state::Ctx;

#[utoipa::path(get, path = "/api/v1/providers", tag = "providers",
    responses((status = 200, body = Page<Provider>)), security(("bearer" = [])))]
pub async fn list(Infra(c): Infra, State(app): State<Ctx>) -> ApiResult<Json<Page<Provider>>> {
    let mut items = topology::providers(&app).await?;
    if let Some(op) = c.operator_of() {
        items.retain(|p| p.name == op);
    }
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

#[utoipa::path(post, path = "/api/v1/providers", tag = "providers", request_body = ProviderCreate,
    responses((status = 201, body = Provider), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    _: Admin,
    State(app): State<Ctx>,
    Body(req): Body<ProviderCreate>,
) -> ApiResult<(StatusCode, Json<Provider>)> {
    let p = topology::create_provider(&app, req).await?;
    Ok((StatusCode::CREATED, Json(p)))
}

#[utoipa::path(get, path = "/api/v1/providers/{key}", tag = "providers",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = Provider), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    Infra(c): Infra,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<Provider>> {
    let p = topology::provider(&app, &key).await?;
    c.check_provider(&p.name, Kind::Provider, &key)?;
    Ok(Json(p))
}

#[utoipa::path(patch, path = "/api/v1/providers/{key}", tag = "providers", request_body = ProviderUpdate,
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = Provider), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn update(
    Infra(c): Infra,
    State(app): State<Ctx>,
    Path(key): Path<String>,
    Body(req): Body<ProviderUpdate>,
) -> ApiResult<Json<Provider>> {
    let p = topology::provider(&app, &key)
        .await
        .map_err(|_| ApiError::not_found(Kind::Provider, &key))?;
    c.check_provider(&p.name, Kind::Provider, &key)?;
    Ok(Json(topology::update_provider(&app, &key, req).await?))
}

#[utoipa::path(delete, path = "/api/v1/providers/{key}", tag = "providers",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 204), (status = 404, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    topology::delete_provider(&app, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}
