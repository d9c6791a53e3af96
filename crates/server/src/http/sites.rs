//! Sites.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use virt8ra_api::{Page, Site, SiteCreate, SiteUpdate};

use super::extract::Body;
use crate::error::{ApiResult, Kind};
use crate::http::auth::{Caller, Infra};
use crate::services::topology;
use crate::state::Ctx;

#[utoipa::path(get, path = "/api/v1/sites", tag = "sites",
    responses((status = 200, body = Page<Site>)), security(("bearer" = [])))]
pub async fn list(Infra(c): Infra, State(app): State<Ctx>) -> ApiResult<Json<Page<Site>>> {
    let mut items = topology::sites(&app).await?;
    if let Some(op) = c.operator_of() {
        items.retain(|s| s.provider == op);
    }
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

#[utoipa::path(post, path = "/api/v1/sites", tag = "sites", request_body = SiteCreate,
    responses((status = 201, body = Site), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    Infra(c): Infra,
    State(app): State<Ctx>,
    Body(req): Body<SiteCreate>,
) -> ApiResult<(StatusCode, Json<Site>)> {
    // An operator's sites are its provider's (another provider is, to it,
    // a provider that does not exist).
    if c.operator_of().is_some_and(|op| op != req.provider) {
        return Err(crate::error::ApiError::BadRef {
            field: Some("provider".into()),
            kind: Kind::Provider,
            name: req.provider,
        });
    }
    let s = topology::create_site(&app, req).await?;
    Ok((StatusCode::CREATED, Json(s)))
}

#[utoipa::path(get, path = "/api/v1/sites/{key}", tag = "sites",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = Site), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    Infra(c): Infra,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<Site>> {
    Ok(Json(operated_site(&app, &c, &key).await?))
}

/// The site `key` if the caller manages its provider (else a 404).
async fn operated_site(app: &Ctx, c: &Caller, key: &str) -> ApiResult<Site> {
    let s = topology::site(app, key).await?;
    c.check_provider(&s.provider, Kind::Site, key)?;
    Ok(s)
}

#[utoipa::path(patch, path = "/api/v1/sites/{key}", tag = "sites", request_body = SiteUpdate,
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = Site), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn update(
    Infra(c): Infra,
    State(app): State<Ctx>,
    Path(key): Path<String>,
    Body(req): Body<SiteUpdate>,
) -> ApiResult<Json<Site>> {
    operated_site(&app, &c, &key).await?;
    Ok(Json(topology::update_site(&app, &key, req).await?))
}

#[utoipa::path(delete, path = "/api/v1/sites/{key}", tag = "sites",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 204), (status = 404, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    Infra(c): Infra,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    operated_site(&app, &c, &key).await?;
    topology::delete_site(&app, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}
