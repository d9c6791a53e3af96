//! Sites.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use virt8ra_api::{validate, Page, Site, SiteCreate, SiteUpdate};

use super::extract::{missing_ref, Body};
use crate::error::{ApiError, ApiResult};
use crate::http::auth::Admin;
use crate::state::Ctx;

#[utoipa::path(get, path = "/api/v1/sites", tag = "sites",
    responses((status = 200, body = Page<Site>)), security(("bearer" = [])))]
pub async fn list(_: Admin, State(app): State<Ctx>) -> ApiResult<Json<Page<Site>>> {
    Ok(Json(Page {
        items: app.store.list_sites().await?,
        next_cursor: None,
    }))
}

#[utoipa::path(post, path = "/api/v1/sites", tag = "sites", request_body = SiteCreate,
    responses((status = 201, body = Site), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    _: Admin,
    State(app): State<Ctx>,
    Body(req): Body<SiteCreate>,
) -> ApiResult<(StatusCode, Json<Site>)> {
    validate::site(&req).map_err(ApiError::Invalid)?;
    let provider = app
        .store
        .get_provider(&req.provider)
        .await
        .map_err(missing_ref)?;
    let s = Site {
        id: uuid::Uuid::new_v4().to_string(),
        name: req.name,
        provider: provider.name,
        country: req.country,
        city: req.city,
        latitude: req.latitude,
        longitude: req.longitude,
        tier: req.tier,
        facts: req.facts,
        labels: req.labels,
        created_at: Utc::now(),
    };
    app.store.create_site(&s).await?;
    app.placement.invalidate();
    Ok((StatusCode::CREATED, Json(s)))
}

#[utoipa::path(get, path = "/api/v1/sites/{key}", tag = "sites",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = Site), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<Site>> {
    Ok(Json(app.store.get_site(&key).await?))
}

#[utoipa::path(patch, path = "/api/v1/sites/{key}", tag = "sites", request_body = SiteUpdate,
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = Site), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn update(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
    Body(req): Body<SiteUpdate>,
) -> ApiResult<Json<Site>> {
    let mut s = app.store.get_site(&key).await?;
    if let Some(v) = req.city {
        s.city = v;
    }
    if let Some(v) = req.latitude {
        s.latitude = v;
    }
    if let Some(v) = req.longitude {
        s.longitude = v;
    }
    if let Some(v) = req.tier {
        s.tier = v;
    }
    if let Some(v) = req.facts {
        s.facts = v;
    }
    if let Some(v) = req.labels {
        s.labels = v;
    }
    validate::site(&SiteCreate {
        name: s.name.clone(),
        provider: s.provider.clone(),
        country: s.country.clone(),
        city: s.city.clone(),
        latitude: s.latitude,
        longitude: s.longitude,
        tier: s.tier,
        facts: s.facts.clone(),
        labels: s.labels.clone(),
    })
    .map_err(ApiError::Invalid)?;
    app.store.update_site(&s).await?;
    app.placement.invalidate();
    Ok(Json(s))
}

#[utoipa::path(delete, path = "/api/v1/sites/{key}", tag = "sites",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 204), (status = 404, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    let s = app.store.get_site(&key).await?;
    app.store.delete_site(&s.id).await?;
    app.placement.invalidate();
    Ok(StatusCode::NO_CONTENT)
}
