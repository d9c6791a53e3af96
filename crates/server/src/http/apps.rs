//! Apps: one appliance deployed at several locations (sites, providers or
//! countries) in one request, and managed as one unit.
//!
//! A deployment is checked whole before anything is created: the appliance
//! and its parameters, every location, the VM names, the images (imported
//! from the appliance's catalog when needed, verified by checksum), and
//! whether every replica fits, as one all-or-nothing batch of the placement
//! engine. Then each replica becomes an ordinary VM pinned to its location,
//! and the scheduler places it within the location through the engine.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use virt8ra_api::{App as AppView, AppCreate};

use super::extract::Body;
use crate::error::ApiResult;
use crate::http::auth::Admin;
use crate::services::apps::*;
use crate::state::Ctx;

#[utoipa::path(post, path = "/api/v1/apps", tag = "apps", request_body = AppCreate,
    responses((status = 201, body = virt8ra_api::App), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
/// Deploys an appliance at every location, all or nothing.
pub async fn create(
    _: Admin,
    State(app): State<Ctx>,
    Body(req): Body<AppCreate>,
) -> ApiResult<(StatusCode, Json<AppView>)> {
    let view = deploy(&app, req).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

#[utoipa::path(get, path = "/api/v1/apps", tag = "apps",
    responses((status = 200, body = Vec<virt8ra_api::App>)), security(("bearer" = [])))]
pub async fn list(_: Admin, State(app): State<Ctx>) -> ApiResult<Json<Vec<AppView>>> {
    Ok(Json(list_all(&app).await?))
}

#[utoipa::path(get, path = "/api/v1/apps/{key}", tag = "apps",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = virt8ra_api::App), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<AppView>> {
    Ok(Json(get(&app, &key).await?))
}

#[utoipa::path(delete, path = "/api/v1/apps/{key}", tag = "apps",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 202, body = virt8ra_api::App, description = "Every VM is being deleted; the app disappears when they are gone"),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<(StatusCode, Json<AppView>)> {
    Ok((StatusCode::ACCEPTED, Json(remove(&app, &key).await?)))
}
