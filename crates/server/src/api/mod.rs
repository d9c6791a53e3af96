//! The HTTP API under `/api/v1`.
//!
//! Handlers validate, record intent in the store, wake the scheduler and
//! answer. They never wait for an agent to act (the console read is the one
//! exception: it is a read of the agent's disk) and never retry.

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::handler::Handler;
use axum::http::request::Parts;
use axum::http::Method;
use axum::routing::{MethodFilter, MethodRouter};
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

/// A WebSocket upgrade; a request that is not one gets a 400 with our error
/// body (axum's own rejection is plain text).
pub struct Upgrade(pub WebSocketUpgrade);

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match WebSocketUpgrade::from_request_parts(parts, state).await {
            Ok(ws) => Ok(Upgrade(ws)),
            Err(rej) => Err(ApiError::Invalid(format!(
                "this endpoint is a WebSocket: {}",
                rej.body_text()
            ))),
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

/// Who may call a route: the credential its handler's auth extractor
/// (`crate::auth`) accepts. The table below says it for every route so that
/// tests can call each one with every kind of credential and check the
/// answer, and so that the OpenAPI document's security can be checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No credential: health, the OpenAPI document, and the signed catalog
    /// with its images (public by design: other control planes fetch them).
    Anyone,
    /// A join token (`auth::JoinAuth`).
    Join,
    /// A host token (`auth::HostAuth`).
    Host,
    /// The admin token (`auth::Admin`).
    Admin,
    /// The admin token or a host token (`auth::AdminOrHost`).
    AdminOrHost,
}

impl Access {
    /// Whether a caller must present a bearer token.
    pub fn needs_token(self) -> bool {
        self != Access::Anyone
    }
}

/// One method on one path, who may call it, and its handler.
pub struct Route {
    pub method: Method,
    /// The full path, as in the OpenAPI document (`{name}` for a segment).
    pub path: &'static str,
    pub access: Access,
    pub handler: MethodRouter<App>,
}

impl Route {
    fn new<H, T>(
        (method, filter): (Method, MethodFilter),
        path: &'static str,
        access: Access,
        handler: H,
    ) -> Route
    where
        H: Handler<T, App>,
        T: 'static,
    {
        Route {
            method,
            path,
            access,
            handler: axum::routing::on(filter, handler),
        }
    }
}

fn get<H: Handler<T, App>, T: 'static>(path: &'static str, a: Access, h: H) -> Route {
    Route::new((Method::GET, MethodFilter::GET), path, a, h)
}
fn post<H: Handler<T, App>, T: 'static>(path: &'static str, a: Access, h: H) -> Route {
    Route::new((Method::POST, MethodFilter::POST), path, a, h)
}
fn put<H: Handler<T, App>, T: 'static>(path: &'static str, a: Access, h: H) -> Route {
    Route::new((Method::PUT, MethodFilter::PUT), path, a, h)
}
fn patch<H: Handler<T, App>, T: 'static>(path: &'static str, a: Access, h: H) -> Route {
    Route::new((Method::PATCH, MethodFilter::PATCH), path, a, h)
}
fn delete<H: Handler<T, App>, T: 'static>(path: &'static str, a: Access, h: H) -> Route {
    Route::new((Method::DELETE, MethodFilter::DELETE), path, a, h)
}

/// Every route of the control plane. [`router`] is built from this table
/// and nothing else, so a route cannot be missing from it.
pub fn routes() -> Vec<Route> {
    use Access::{Admin, AdminOrHost, Anyone, Host, Join};
    vec![
        get("/healthz", Anyone, healthz),
        get("/api/v1/openapi.json", Anyone, openapi::serve),
        get("/api/v1/metrics", Admin, metrics),
        get("/api/v1/providers", Admin, providers::list),
        post("/api/v1/providers", Admin, providers::create),
        get("/api/v1/providers/{key}", Admin, providers::show),
        patch("/api/v1/providers/{key}", Admin, providers::update),
        delete("/api/v1/providers/{key}", Admin, providers::delete),
        get("/api/v1/sites", Admin, sites::list),
        post("/api/v1/sites", Admin, sites::create),
        get("/api/v1/sites/{key}", Admin, sites::show),
        patch("/api/v1/sites/{key}", Admin, sites::update),
        delete("/api/v1/sites/{key}", Admin, sites::delete),
        get("/api/v1/hosts", Admin, hosts::list),
        get("/api/v1/hosts/{key}", Admin, hosts::show),
        patch("/api/v1/hosts/{key}", Admin, hosts::update),
        delete("/api/v1/hosts/{key}", Admin, hosts::delete),
        post("/api/v1/join-tokens", Admin, hosts::create_join_token),
        get("/api/v1/images", Admin, images::list),
        post("/api/v1/images", Admin, images::upload),
        get("/api/v1/images/{key}", Admin, images::show),
        delete("/api/v1/images/{key}", Admin, images::delete),
        get("/api/v1/images/{key}/data", AdminOrHost, images::download),
        post("/api/v1/images/import", Admin, images::import_url),
        get("/api/v1/images/transfers", Admin, images::transfers),
        post("/api/v1/images/{key}/replicate", Admin, images::replicate),
        get("/api/v1/appliances", Admin, catalog::list),
        post("/api/v1/appliances", Admin, catalog::publish),
        get("/api/v1/appliances/{key}", Admin, catalog::show),
        delete("/api/v1/appliances/{key}", Admin, catalog::unpublish),
        get("/api/v1/catalog", Anyone, catalog::serve),
        get("/api/v1/catalog/key", Admin, catalog::public_key),
        get(
            "/api/v1/catalog/images/{sha256}",
            Anyone,
            catalog::image_data,
        ),
        get("/api/v1/catalogs", Admin, catalog::list_catalogs),
        post("/api/v1/catalogs", Admin, catalog::add),
        delete("/api/v1/catalogs/{name}", Admin, catalog::remove),
        post("/api/v1/catalogs/{name}/refresh", Admin, catalog::refresh),
        get("/api/v1/apps", Admin, apps::list),
        post("/api/v1/apps", Admin, apps::create),
        get("/api/v1/apps/{key}", Admin, apps::show),
        delete("/api/v1/apps/{key}", Admin, apps::delete),
        get("/api/v1/vms", Admin, vms::list),
        post("/api/v1/vms", Admin, vms::create),
        post("/api/v1/vms/plan", Admin, vms::plan),
        get("/api/v1/watch", Admin, watch::watch),
        get("/api/v1/vms/{key}", Admin, vms::show),
        delete("/api/v1/vms/{key}", Admin, vms::delete),
        post("/api/v1/vms/{key}/actions", Admin, vms::action),
        get("/api/v1/vms/{key}/console", Admin, vms::console),
        get("/api/v1/vms/{key}/events", Admin, vms::events),
        post("/api/v1/vms/{key}/migrate", Admin, migrations::create),
        get("/api/v1/vms/{key}/migrations", Admin, migrations::history),
        post("/api/v1/vms/{key}/export", Admin, migrations::export),
        get("/api/v1/migrations", Admin, migrations::list),
        post("/api/v1/rebalance", Admin, migrations::rebalance),
        get("/api/v1/migrations/{id}", Admin, migrations::show),
        post(
            "/api/v1/hosts/{key}/evacuate",
            Admin,
            migrations::evacuate_host,
        ),
        post(
            "/api/v1/sites/{key}/evacuate",
            Admin,
            migrations::evacuate_site,
        ),
        post(
            "/api/v1/providers/{key}/evacuate",
            Admin,
            migrations::evacuate_provider,
        ),
        get("/api/v1/exports/{id}", Admin, migrations::show_export),
        delete("/api/v1/exports/{id}", Admin, migrations::delete_export),
        get("/api/v1/staging/{id}", AdminOrHost, migrations::download),
        put("/api/v1/staging/{id}", Host, migrations::upload),
        get(
            "/api/v1/staging/{id}/status",
            AdminOrHost,
            migrations::staged,
        ),
        post("/api/v1/agent/join", Join, agent::join),
        get("/api/v1/agent/connect", Host, agent::connect),
        get("/api/v1/agent/mux", Host, agent::mux),
        get(
            "/api/v1/relay/{migration_id}/{stream}/{conn_id}",
            Host,
            relay::relay,
        ),
        get("/api/v1/join-tokens", Admin, tokens::list_join_tokens),
        delete("/api/v1/join-tokens/{id}", Admin, tokens::revoke_join_token),
        post(
            "/api/v1/admin-token/rotate",
            Admin,
            tokens::rotate_admin_token,
        ),
    ]
}

pub fn router(app: App) -> Router {
    let mut router = Router::new();
    for r in routes() {
        // Several methods on one path merge into one method router.
        router = router.route(r.path, r.handler);
    }
    router
        .method_not_allowed_fallback(method_not_allowed)
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
