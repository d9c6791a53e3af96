//! Providers.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use virt8ra_api::{validate, Page, Provider, ProviderCreate, ProviderUpdate};

use super::extract::Body;
use crate::error::{ApiError, ApiResult};
use crate::http::auth::Admin;
use crate::state::Ctx;

#[utoipa::path(get, path = "/api/v1/providers", tag = "providers",
    responses((status = 200, body = Page<Provider>)), security(("bearer" = [])))]
pub async fn list(_: Admin, State(app): State<Ctx>) -> ApiResult<Json<Page<Provider>>> {
    Ok(Json(Page {
        items: app.store.list_providers().await?,
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
    validate::provider(&req).map_err(ApiError::Invalid)?;
    let p = Provider {
        id: uuid::Uuid::new_v4().to_string(),
        name: req.name,
        country: req.country,
        jurisdiction: req.jurisdiction,
        labels: req.labels,
        created_at: Utc::now(),
    };
    app.store.create_provider(&p).await?;
    app.placement.invalidate();
    Ok((StatusCode::CREATED, Json(p)))
}

#[utoipa::path(get, path = "/api/v1/providers/{key}", tag = "providers",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = Provider), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<Provider>> {
    Ok(Json(app.store.get_provider(&key).await?))
}

#[utoipa::path(patch, path = "/api/v1/providers/{key}", tag = "providers", request_body = ProviderUpdate,
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = Provider), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn update(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
    Body(req): Body<ProviderUpdate>,
) -> ApiResult<Json<Provider>> {
    let mut p = app.store.get_provider(&key).await?;
    if let Some(c) = req.country {
        p.country = c;
    }
    if let Some(j) = req.jurisdiction {
        p.jurisdiction = j;
    }
    if let Some(l) = req.labels {
        p.labels = l;
    }
    validate::provider(&ProviderCreate {
        name: p.name.clone(),
        country: p.country.clone(),
        jurisdiction: p.jurisdiction.clone(),
        labels: p.labels.clone(),
    })
    .map_err(ApiError::Invalid)?;
    app.store.update_provider(&p).await?;
    app.placement.invalidate();
    Ok(Json(p))
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
    let p = app.store.get_provider(&key).await?;
    app.store.delete_provider(&p.id).await?;
    app.placement.invalidate();
    Ok(StatusCode::NO_CONTENT)
}
