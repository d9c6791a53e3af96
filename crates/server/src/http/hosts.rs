//! Hosts and join tokens. Hosts are created by their agents (see `agent.rs`);
//! operators list them, change their state and remove them.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use virt8ra_api::{Host, HostState, HostUpdate, JoinToken, JoinTokenCreate, Page};

use super::extract::{Body, Query};
use crate::error::{ApiError, ApiResult, Kind};
use crate::http::auth::{Caller, Infra};
use crate::services::{tokens, topology};
use crate::state::Ctx;

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct HostQuery {
    pub site: Option<String>,
    pub provider: Option<String>,
    pub country: Option<String>,
    pub state: Option<HostState>,
}

#[utoipa::path(get, path = "/api/v1/hosts", tag = "hosts", params(HostQuery),
    responses((status = 200, body = Page<Host>)), security(("bearer" = [])))]
pub async fn list(
    Infra(c): Infra,
    State(app): State<Ctx>,
    Query(q): Query<HostQuery>,
) -> ApiResult<Json<Page<Host>>> {
    let op = c.operator_of().map(str::to_string);
    if op.is_some() && q.provider.is_some() && q.provider != op {
        return Ok(Json(Page {
            items: vec![],
            next_cursor: None,
        }));
    }
    let filter = topology::HostFilter {
        site: q.site,
        provider: op.or(q.provider),
        country: q.country,
        state: q.state,
    };
    Ok(Json(Page {
        items: topology::hosts(&app, &filter).await?,
        next_cursor: None,
    }))
}

#[utoipa::path(get, path = "/api/v1/hosts/{key}", tag = "hosts",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = Host), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    Infra(c): Infra,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<Host>> {
    Ok(Json(operated_host(&app, &c, &key).await?))
}

/// The host `key` if the caller manages its provider (else a 404).
async fn operated_host(app: &Ctx, c: &Caller, key: &str) -> ApiResult<Host> {
    let h = topology::host(app, key).await?;
    c.check_provider(&h.provider, Kind::Host, key)?;
    Ok(h)
}

#[utoipa::path(patch, path = "/api/v1/hosts/{key}", tag = "hosts", request_body = HostUpdate,
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = Host), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn update(
    Infra(c): Infra,
    State(app): State<Ctx>,
    Path(key): Path<String>,
    Body(req): Body<HostUpdate>,
) -> ApiResult<Json<Host>> {
    operated_host(&app, &c, &key).await?;
    Ok(Json(topology::update_host(&app, &key, req).await?))
}

#[utoipa::path(delete, path = "/api/v1/hosts/{key}", tag = "hosts",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 204), (status = 404, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    Infra(c): Infra,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    operated_host(&app, &c, &key).await?;
    topology::delete_host(&app, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/join-tokens", tag = "hosts", request_body = JoinTokenCreate,
    responses((status = 201, body = JoinToken), (status = 400, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_join_token(
    Infra(c): Infra,
    State(app): State<Ctx>,
    Body(req): Body<JoinTokenCreate>,
) -> ApiResult<(StatusCode, Json<JoinToken>)> {
    if let Some(op) = c.operator_of() {
        // Another provider's site is, to an operator, one that does not exist.
        let site = topology::site(&app, &req.site).await.ok();
        if site.is_none_or(|s| s.provider != op) {
            return Err(ApiError::BadRef {
                field: Some("site".into()),
                kind: Kind::Site,
                name: req.site.clone(),
            });
        }
    }
    let t = tokens::create_join_token(&app, &req).await?;
    Ok((StatusCode::CREATED, Json(t)))
}
