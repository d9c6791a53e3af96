//! Hosts and join tokens. Hosts are created by their agents (see `agent.rs`);
//! operators list them, change their state and remove them.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{Duration, Utc};
use serde::Deserialize;
use virt8ra_api::{validate, Host, HostState, HostUpdate, JoinToken, JoinTokenCreate, Page};
use virt8ra_store::{TokenKind, TokenRecord};

use super::extract::{missing_ref, Body, Query};
use crate::error::{ApiError, ApiResult};
use crate::http::auth::{self, Admin};
use crate::services::placement::host_view;
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
    _: Admin,
    State(app): State<Ctx>,
    Query(q): Query<HostQuery>,
) -> ApiResult<Json<Page<Host>>> {
    let alloc = app.placement.allocations(&app).await?;
    // From memory: the host index, the hub and the engine's books.
    let items = app
        .hosts
        .all()
        .into_iter()
        .map(|h| {
            let a = alloc.get(&h.name).copied();
            host_view(&app, (*h).clone(), a.as_ref())
        })
        .filter(|h| {
            q.site.as_ref().is_none_or(|s| *s == h.site)
                && q.provider.as_ref().is_none_or(|s| *s == h.provider)
                && q.country.as_ref().is_none_or(|s| *s == h.country)
                && q.state.is_none_or(|s| s == h.state)
        })
        .collect();
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

async fn load(app: &Ctx, key: &str) -> ApiResult<Host> {
    let h = app.host(key)?;
    let a = app.placement.allocations(app).await?.get(&h.name).copied();
    Ok(host_view(app, h, a.as_ref()))
}

#[utoipa::path(get, path = "/api/v1/hosts/{key}", tag = "hosts",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = Host), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<Host>> {
    Ok(Json(load(&app, &key).await?))
}

#[utoipa::path(patch, path = "/api/v1/hosts/{key}", tag = "hosts", request_body = HostUpdate,
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = Host), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn update(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
    Body(req): Body<HostUpdate>,
) -> ApiResult<Json<Host>> {
    if req.state == Some(HostState::Unreachable) {
        return Err(ApiError::Invalid(
            "state 'unreachable' is set by the control plane; use ready, disabled or maintenance"
                .into(),
        ));
    }
    for (what, v) in [
        ("cpu_overcommit", req.cpu_overcommit),
        ("memory_overcommit", req.memory_overcommit),
    ] {
        if let Some(v) = v {
            if !(0.1..=64.0).contains(&v) {
                return Err(ApiError::Invalid(format!("{what} {v} is outside 0.1..64")));
            }
        }
    }
    if req.state.is_none() && req.cpu_overcommit.is_none() && req.memory_overcommit.is_none() {
        return Err(ApiError::Invalid(
            "nothing to change: give state, cpu_overcommit or memory_overcommit".into(),
        ));
    }
    let mut h = app.host(&key)?;
    if let Some(s) = req.state {
        h.state = s;
    }
    if req.cpu_overcommit.is_some() {
        h.cpu_overcommit = req.cpu_overcommit;
    }
    if req.memory_overcommit.is_some() {
        h.memory_overcommit = req.memory_overcommit;
    }
    app.update_host(&h).await?;
    app.placement.upsert_host(&app, &h);
    app.wake.notify_one();
    Ok(Json(load(&app, &h.id).await?))
}

#[utoipa::path(delete, path = "/api/v1/hosts/{key}", tag = "hosts",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 204), (status = 404, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    let h = app.host(&key)?;
    app.placement
        .remove_host(&app, &h, async {
            app.store.delete_host(&h.id).await?;
            app.hosts.remove(&h.id);
            Ok(())
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/join-tokens", tag = "hosts", request_body = JoinTokenCreate,
    responses((status = 201, body = JoinToken), (status = 400, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_join_token(
    _: Admin,
    State(app): State<Ctx>,
    Body(req): Body<JoinTokenCreate>,
) -> ApiResult<(StatusCode, Json<JoinToken>)> {
    validate::join_token(&req).map_err(ApiError::Invalid)?;
    let site = app.store.get_site(&req.site).await.map_err(missing_ref)?;
    let secret = auth::new_secret();
    let ttl = req.ttl_s.unwrap_or(3600);
    let max_uses = req.max_uses.unwrap_or(1);
    let expires_at = Utc::now() + Duration::seconds(ttl as i64);
    let rec = TokenRecord {
        id: uuid::Uuid::new_v4().to_string(),
        kind: TokenKind::Join,
        hash: auth::hash(&secret),
        site: Some(site.name.clone()),
        host_id: None,
        expires_at: Some(expires_at),
        uses_left: Some(max_uses),
        created_at: Utc::now(),
    };
    app.store.create_token(&rec).await?;
    Ok((
        StatusCode::CREATED,
        Json(JoinToken {
            id: rec.id,
            site: site.name,
            token: secret,
            expires_at,
            max_uses,
        }),
    ))
}
