//! The HTTP API under `/api/v1`.
//!
//! Handlers validate, record intent in the store, wake the scheduler and
//! answer. They never wait for an agent to act (the console read is the one
//! exception: it is a read of the agent's disk) and never retry.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::state::App;

pub mod agent;
pub mod apps;
pub mod catalog;
pub mod hosts;
pub mod images;
pub mod migrations;
pub mod openapi;
pub mod providers;
pub mod relay;
pub mod sites;
pub mod tokens;
pub mod vms;
pub mod watch;

/// A JSON body whose every rejection has our error body: 413 when it is
/// larger than the body limit, 415 when its content type is not JSON, 400
/// for the rest (bad syntax, unknown field, wrong type).
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Body(v)),
            Err(rej) => Err(match rej.status() {
                axum::http::StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(format!(
                    "the JSON body is larger than the {} KiB this endpoint takes",
                    JSON_BODY_LIMIT >> 10
                )),
                axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(
                    "the body must be JSON: send `Content-Type: application/json`".into(),
                ),
                _ => ApiError::Invalid(rej.body_text()),
            }),
        }
    }
}

/// The largest JSON body (and any body not streamed to disk) taken.
pub const JSON_BODY_LIMIT: usize = 1024 * 1024;

/// Refuses a binary upload whose `Content-Type` says it is something else
/// (415). A missing one is taken as binary: the agent's chunked staging
/// uploads send none.
pub fn octet_stream(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let Some(ct) = headers.get(axum::http::header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = ct
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim();
    if essence.eq_ignore_ascii_case("application/octet-stream") {
        return Ok(());
    }
    Err(ApiError::UnsupportedMediaType(format!(
        "the body is sent as {:?}; send the raw bytes as `Content-Type: application/octet-stream` \
         (with curl: --data-binary @FILE -H 'Content-Type: application/octet-stream')",
        String::from_utf8_lossy(ct.as_bytes())
    )))
}

/// Query parameters, with a 400 on anything malformed.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(rej) => Err(ApiError::Invalid(rej.body_text())),
        }
    }
}

/// Turns "not found" of a referenced resource into a 400 that says how to
/// find what exists.
pub fn missing_ref(kind: &str, name: &str, list_cmd: &str) -> ApiError {
    ApiError::Invalid(format!(
        "{kind} '{name}' not found; `virt8ra {list_cmd} list` shows what exists"
    ))
}

pub fn router(app: App) -> Router {
    let v1 = Router::new()
        .route("/openapi.json", get(openapi::serve))
        .route("/metrics", get(metrics))
        .route("/providers", get(providers::list).post(providers::create))
        .route(
            "/providers/{key}",
            get(providers::show)
                .patch(providers::update)
                .delete(providers::delete),
        )
        .route("/sites", get(sites::list).post(sites::create))
        .route(
            "/sites/{key}",
            get(sites::show).patch(sites::update).delete(sites::delete),
        )
        .route("/hosts", get(hosts::list))
        .route(
            "/hosts/{key}",
            get(hosts::show).patch(hosts::update).delete(hosts::delete),
        )
        .route("/join-tokens", post(hosts::create_join_token))
        .route("/images", get(images::list).post(images::upload))
        .route("/images/{key}", get(images::show).delete(images::delete))
        .route("/images/{key}/data", get(images::download))
        .route("/images/import", post(images::import_url))
        .route("/images/transfers", get(images::transfers))
        .route("/images/{key}/replicate", post(images::replicate))
        .route("/appliances", get(catalog::list).post(catalog::publish))
        .route(
            "/appliances/{key}",
            get(catalog::show).delete(catalog::unpublish),
        )
        .route("/catalog", get(catalog::serve))
        .route("/catalog/key", get(catalog::public_key))
        .route("/catalog/images/{sha}", get(catalog::image_data))
        .route("/catalogs", get(catalog::list_catalogs).post(catalog::add))
        .route("/catalogs/{name}", axum::routing::delete(catalog::remove))
        .route("/catalogs/{name}/refresh", post(catalog::refresh))
        .route("/apps", get(apps::list).post(apps::create))
        .route("/apps/{key}", get(apps::show).delete(apps::delete))
        .route("/vms", get(vms::list).post(vms::create))
        .route("/vms/plan", post(vms::plan))
        .route("/watch", get(watch::watch))
        .route("/vms/{key}", get(vms::show).delete(vms::delete))
        .route("/vms/{key}/actions", post(vms::action))
        .route("/vms/{key}/console", get(vms::console))
        .route("/vms/{key}/events", get(vms::events))
        .route("/vms/{key}/migrate", post(migrations::create))
        .route("/vms/{key}/migrations", get(migrations::history))
        .route("/vms/{key}/export", post(migrations::export))
        .route("/migrations", get(migrations::list))
        .route("/rebalance", post(migrations::rebalance))
        .route("/migrations/{id}", get(migrations::show))
        .route("/hosts/{key}/evacuate", post(migrations::evacuate_host))
        .route("/sites/{key}/evacuate", post(migrations::evacuate_site))
        .route(
            "/providers/{key}/evacuate",
            post(migrations::evacuate_provider),
        )
        .route(
            "/exports/{id}",
            get(migrations::show_export).delete(migrations::delete_export),
        )
        .route(
            "/staging/{id}",
            get(migrations::download).put(migrations::upload),
        )
        .route("/staging/{id}/status", get(migrations::staged))
        .route("/agent/join", post(agent::join))
        .route("/agent/connect", get(agent::connect))
        .route("/agent/mux", get(agent::mux))
        .route(
            "/relay/{migration_id}/{stream}/{conn_id}",
            get(relay::relay),
        );
    // Token housekeeping (issue 25): join tokens listed and revoked, the
    // admin token rotated. `/join-tokens` adds GET to the POST above.
    let v1 = v1
        .route("/join-tokens", get(tokens::list_join_tokens))
        .route(
            "/join-tokens/{id}",
            axum::routing::delete(tokens::revoke_join_token),
        )
        .route("/admin-token/rotate", post(tokens::rotate_admin_token))
        .method_not_allowed_fallback(method_not_allowed);
    Router::new()
        .route("/healthz", get(healthz))
        .method_not_allowed_fallback(method_not_allowed)
        .nest("/api/v1", v1)
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .with_state(app)
}

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
    _: crate::auth::Admin,
    axum::extract::State(app): axum::extract::State<App>,
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

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no such endpoint: {}", uri.path()))
}

/// A path that exists, called with a method it does not take (the router
/// adds the `Allow` header listing the ones it does).
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "{} does not take {method}; the Allow header lists the methods it does",
        uri.path()
    ))
}
