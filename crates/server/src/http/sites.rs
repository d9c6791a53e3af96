//! Sites.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use virt8ra_api::{Page, Site, SiteCreate, SiteUpdate};

use super::extract::Body;
use crate::error::ApiResult;
use crate::http::auth::Admin;
use crate::services::topology;
use crate::state::Ctx;

#[utoipa::path(get, path = "/api/v1/sites", tag = "sites",
    responses((status = 200, body = Page<Site>)), security(("bearer" = [])))]
pub async fn list(_: Admin, State(app): State<Ctx>) -> ApiResult<Json<Page<Site>>> {
    Ok(Json(Page {
        items: topology::sites(&app).await?,
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
    let s = topology::create_site(&app, req).await?;
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
    Ok(Json(topology::site(&app, &key).await?))
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
    Ok(Json(topology::update_site(&app, &key, req).await?))
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
    topology::delete_site(&app, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}
