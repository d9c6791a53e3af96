//! Virtual networks over HTTP: create, list, show, delete, and the hosts
//! that carry one with their paths (direct or relayed). The rules (and
//! IPAM) are in [`crate::services::networks`].

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use virt8ra_api::{Network, NetworkCreate, NetworkHost, Page};

use super::extract::Body;
use crate::error::{ApiResult, Kind};
use crate::http::auth::{Reader, Writer};
use crate::services::networks;
use crate::state::Ctx;

#[utoipa::path(get, path = "/api/v1/networks", tag = "networks",
    responses((status = 200, body = Page<Network>)), security(("bearer" = [])))]
pub async fn list(Reader(c): Reader, State(app): State<Ctx>) -> ApiResult<Json<Page<Network>>> {
    let mut items = networks::list(&app).await?;
    items.retain(|n| c.sees(&n.project) && c.list_project().is_none_or(|p| p == n.project));
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

#[utoipa::path(post, path = "/api/v1/networks", tag = "networks", request_body = NetworkCreate,
    responses((status = 201, body = Network),
              (status = 400, body = virt8ra_api::ErrorBody, description = "A field is invalid (the message names it), or the span names a provider or site that does not exist or a site outside the span's countries or providers"),
              (status = 409, body = virt8ra_api::ErrorBody, description = "A network of this name exists")),
    security(("bearer" = [])))]
pub async fn create(
    Writer(c): Writer,
    State(app): State<Ctx>,
    Body(req): Body<NetworkCreate>,
) -> ApiResult<(StatusCode, Json<Network>)> {
    let n = networks::create(&app, &req, &c.owner()).await?;
    Ok((StatusCode::CREATED, Json(n)))
}

#[utoipa::path(get, path = "/api/v1/networks/{key}", tag = "networks",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = Network), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    Reader(c): Reader,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<Network>> {
    let n = networks::get(&app, &key).await?;
    c.check(&n.project, Kind::Network, &key)?;
    Ok(Json(n))
}

#[utoipa::path(get, path = "/api/v1/networks/{key}/hosts", tag = "networks",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = Page<NetworkHost>,
               description = "The hosts that carry the network now (they run or receive a VM with a NIC on it), each with how the others reach it: directly, or relayed through which host"),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn hosts(
    Reader(c): Reader,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<Page<NetworkHost>>> {
    let n = networks::get(&app, &key).await?;
    c.check(&n.project, Kind::Network, &key)?;
    Ok(Json(Page {
        items: crate::services::overlay::network_hosts(&app, &n.id),
        next_cursor: None,
    }))
}

#[utoipa::path(delete, path = "/api/v1/networks/{key}", tag = "networks",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 204), (status = 404, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody, description = "VMs still have NICs on the network (the message names them)")),
    security(("bearer" = [])))]
pub async fn delete(
    Writer(c): Writer,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    let n = networks::get(&app, &key).await?;
    c.check(&n.project, Kind::Network, &key)?;
    networks::delete(&app, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}
