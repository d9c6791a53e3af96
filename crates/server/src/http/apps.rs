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
use crate::error::Kind;
use crate::http::auth::{Caller, Reader, Writer};
use crate::services::apps::*;
use crate::state::Ctx;

#[utoipa::path(post, path = "/api/v1/apps", tag = "apps", request_body = AppCreate,
    responses((status = 201, body = virt8ra_api::App), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
/// Deploys an appliance at every location, all or nothing.
pub async fn create(
    Writer(c): Writer,
    State(app): State<Ctx>,
    Body(req): Body<AppCreate>,
) -> ApiResult<(StatusCode, Json<AppView>)> {
    let view = deploy(&app, req, &c.owner()).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

#[utoipa::path(get, path = "/api/v1/apps", tag = "apps",
    responses((status = 200, body = Vec<virt8ra_api::App>)), security(("bearer" = [])))]
pub async fn list(Reader(c): Reader, State(app): State<Ctx>) -> ApiResult<Json<Vec<AppView>>> {
    let mut apps = list_all(&app).await?;
    apps.retain(|a| c.sees(&a.project) && c.list_project().is_none_or(|p| p == a.project));
    Ok(Json(apps))
}

/// The app `key` if the caller sees its project (else a 404).
async fn tenant_app(app: &Ctx, c: &Caller, key: &str) -> ApiResult<AppRecord> {
    let r = load(app, key).await?;
    c.check(&r.project, Kind::App, key)?;
    Ok(r)
}

#[utoipa::path(get, path = "/api/v1/apps/{key}", tag = "apps",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = virt8ra_api::App), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    Reader(c): Reader,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<AppView>> {
    tenant_app(&app, &c, &key).await?;
    Ok(Json(get(&app, &key).await?))
}

#[utoipa::path(delete, path = "/api/v1/apps/{key}", tag = "apps",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 202, body = virt8ra_api::App, description = "Every VM is being deleted; the app disappears when they are gone"),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    Writer(c): Writer,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<(StatusCode, Json<AppView>)> {
    tenant_app(&app, &c, &key).await?;
    Ok((StatusCode::ACCEPTED, Json(remove(&app, &key).await?)))
}
