//! Prometheus metrics over HTTP: the layer that counts and times every API
//! request by its route template, and `GET /metrics`, the exposition
//! (Prometheus text format 0.0.4; what it holds is
//! [`crate::registry::metrics`]'s).
//!
//! `/metrics` is served in two places: on the main listener, behind the
//! admin token like the rest of the API; and, with `--metrics-listen ADDR`,
//! on a listener of its own that serves nothing else and asks for no
//! token, for a Prometheus that should not hold the admin token (bind it
//! where only the monitoring network reaches).
//!
//! The route label is the template the router matched (`/api/v1/vms/{key}`),
//! never the raw path, and `unmatched` for a path no route has, so a
//! client that walks random paths cannot add series.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use virt8ra_api::HostState;

use crate::error::{ApiError, ApiResult};
use crate::http::auth::Admin;
use crate::registry::metrics::{Snapshot, CONTENT_TYPE, UNMATCHED_ROUTE};
use crate::state::Ctx;

/// Counts and times one request (the time to the response head: a watch
/// or an agent's channel counts until it is accepted, not while it lasts).
pub async fn track(State(app): State<Ctx>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let route = req.extensions().get::<MatchedPath>().cloned();
    let resp = next.run(req).await;
    let route = route.as_ref().map_or(UNMATCHED_ROUTE, |m| m.as_str());
    app.metrics
        .request(method, route, resp.status().as_u16(), started.elapsed());
    resp
}

/// The method as a label: one of the few the API uses, else `other`.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, content_type = "text/plain; version=0.0.4; charset=utf-8", body = String,
        description = "Prometheus text exposition: API requests by route template and status, \
            placement decisions and refusals by rule, migrations by mode and outcome, store commits, \
            VMs by phase and by site, hosts by state, heartbeats. No label names a VM. \
            Also served without a token on --metrics-listen.")),
    security(("bearer" = [])))]
pub async fn scrape(_: Admin, State(app): State<Ctx>) -> ApiResult<Response> {
    exposition(&app)
}

/// `GET /metrics` on `--metrics-listen`: no token.
async fn scrape_open(State(app): State<Ctx>) -> ApiResult<Response> {
    exposition(&app)
}

fn exposition(app: &Ctx) -> ApiResult<Response> {
    let text = app
        .metrics
        .encode(snapshot(app))
        .map_err(|e| ApiError::Internal(format!("encoding metrics: {e}")))?;
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response())
}

/// What the indexes and the hub say now: counts, never a scan of the store.
/// The VM counts are kept by the index as VMs change (one entry per phase
/// and per site); hosts are counted in one pass over the host index.
fn snapshot(app: &Ctx) -> Snapshot {
    let (alive, oldest_beat) = app.hub.alive_hosts(app.liveness_window());
    let mut states = [
        (HostState::Ready, 0u64),
        (HostState::Unreachable, 0),
        (HostState::Disabled, 0),
        (HostState::Maintenance, 0),
    ];
    for h in app.hosts.all() {
        // As the API shows it (`services::placement::host_view`): a ready
        // host without a recent heartbeat is unreachable.
        let state = match h.state {
            HostState::Ready if !alive.contains(&h.id) => HostState::Unreachable,
            s => s,
        };
        if let Some((_, n)) = states.iter_mut().find(|(s, _)| *s == state) {
            *n += 1;
        }
    }
    Snapshot {
        vms_by_phase: app.vms.count_by_phase(),
        vms_by_site: app.vms.count_by_site(),
        hosts_by_state: states.iter().map(|(s, n)| (s.as_str(), *n)).collect(),
        agents_connected: app.hub.connected_count() as u64,
        heartbeats: app.hub.heartbeats(),
        relay_bytes: app.migrations.relay.bytes(),
        oldest_heartbeat: oldest_beat,
        image_bytes_served: app.transfers.snapshot().values().sum(),
        uptime: app.started.elapsed(),
    }
}

/// The router of `--metrics-listen`: `GET /metrics` and nothing else.
pub fn open_router(app: Ctx) -> Router {
    Router::new()
        .route("/metrics", axum::routing::get(scrape_open))
        .fallback(|uri: axum::http::Uri| async move {
            ApiError::Missing(format!(
                "no such endpoint: {} (this listener serves GET /metrics only)",
                uri.path()
            ))
        })
        .with_state(app)
}
