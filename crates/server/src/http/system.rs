//! System endpoints (health, metrics) and the answers to paths and methods
//! that do not exist.

use crate::error::ApiError;
use crate::state::Ctx;

#[utoipa::path(get, path = "/healthz", tag = "system",
    responses((status = 200, description = "The control plane is alive", body = virt8ra_api::Health)))]
pub async fn healthz() -> axum::Json<virt8ra_api::Health> {
    axum::Json(virt8ra_api::Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

#[utoipa::path(get, path = "/api/v1/metrics", tag = "system",
    responses((status = 200, body = virt8ra_api::Metrics)), security(("bearer" = [])))]
pub async fn metrics(
    _: crate::http::auth::Admin,
    axum::extract::State(app): axum::extract::State<Ctx>,
) -> axum::Json<virt8ra_api::Metrics> {
    axum::Json(virt8ra_api::Metrics {
        agents_connected: app.hub.connected_count() as u64,
        heartbeats_received: app.hub.heartbeats(),
        uptime_s: app.started.elapsed().as_secs_f64(),
        heartbeat_interval_s: app.heartbeat_interval.as_secs(),
        relay_bytes: app.migrations.relay.bytes(),
        relay_connections: app.migrations.relay.connections(),
    })
}

pub(super) async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::Missing(format!("no such endpoint: {}", uri.path()))
}

/// A path that exists, called with a method it does not take (the router
/// adds the `Allow` header listing the ones it does).
pub(super) async fn method_not_allowed(
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "{} does not take {method}; the Allow header lists the methods it does",
        uri.path()
    ))
}
