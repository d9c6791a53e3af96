//! The audit middleware, and the accountability endpoints: the audit log
//! (`GET /audit`), a VM's residency trail (`GET /vms/{key}/history`) and
//! showback (`GET /usage`).
//!
//! Every request gets a request id (the client's `X-Request-Id` when it is
//! short and plain, else a new one), sent back in `X-Request-Id`. Every
//! call that can change something (`POST`, `PUT`, `PATCH`, `DELETE`) is
//! recorded after its handler answered and *before* the answer leaves:
//! the record is durable (the store's commit) when the client sees the
//! status, so a kill -9 after a 2xx cannot lose it. Refusals (4xx) are
//! recorded too. Who called is filled in by the authentication extractor
//! (`auth::require`, through the [`ActorSlot`] this middleware puts in
//! the request), so the middleware needs no second token check; a call
//! without a valid token is recorded with an empty actor. If the record
//! cannot be written the answer is a 500 saying so (the change itself,
//! if any, stands), so no success is ever answered unrecorded.
//!
//! WebSocket upgrades (an agent's channel, relays) are GETs and change
//! nothing by themselves; what agents report over them is in the VMs'
//! events and residency trails.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use serde::Deserialize;
use virt8ra_api::{AuditRecord, Page, UsageReport, VmHistory};

use super::extract::{Query, JSON_BODY_LIMIT};
use crate::error::{ApiError, ApiResult, Kind};
use crate::http::auth::{ActorSlot, Reader};
use crate::registry::metrics::UNMATCHED_ROUTE;
use crate::services::{audit, usage};
use crate::state::Ctx;

/// The request id header.
pub const REQUEST_ID: &str = "x-request-id";

/// The client's request id when it is 1-128 characters of letters,
/// digits and `-_.:`, else a new one.
fn request_id(h: &HeaderMap) -> String {
    h.get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|s| {
            (1..=128).contains(&s.len())
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

fn changes(m: &Method) -> bool {
    matches!(
        *m,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

/// The longest resource name recorded (a path nobody routes can be long).
const MAX_RESOURCE: usize = 256;

/// What the call names: its path under `/api/v1/`, and for a create (a
/// POST to a path that does not end in a parameter) the new resource's
/// name from the body's `name` or the query's `name=`.
fn resource(path: &str, route: &str, created: Option<&str>) -> String {
    let mut r = path
        .strip_prefix("/api/v1/")
        .unwrap_or(path.trim_start_matches('/'))
        .trim_end_matches('/')
        .to_string();
    if let Some(n) = created.filter(|_| !route.ends_with('}')) {
        r = format!("{r}/{n}");
    }
    if r.len() > MAX_RESOURCE {
        let mut end = MAX_RESOURCE;
        while !r.is_char_boundary(end) {
            end -= 1;
        }
        r.truncate(end);
    }
    r
}

/// The `name` a create names, reading a JSON body (the body limit of every
/// JSON route) and putting it back. `Err` is the answer for a body that
/// could not be read.
async fn created_name(req: Request) -> Result<(Request, Option<String>), Response> {
    let from_query = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("name="))
            .map(str::to_string)
    });
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    // A body declared too large is left to the handler, which refuses it
    // (413) after the token was checked, so the record names the caller.
    let too_large = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .is_some_and(|n| n > JSON_BODY_LIMIT);
    if !json || too_large || req.method() != Method::POST {
        return Ok((req, from_query));
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, JSON_BODY_LIMIT).await {
        Ok(b) => b,
        Err(_) => {
            return Err(ApiError::PayloadTooLarge(format!(
                "the JSON body is larger than the {} KiB this endpoint takes (or was cut off)",
                JSON_BODY_LIMIT >> 10
            ))
            .into_response())
        }
    };
    #[derive(Deserialize)]
    struct Named {
        name: Option<serde_json::Value>,
    }
    let name = serde_json::from_slice::<Named>(&bytes)
        .ok()
        .and_then(|n| n.name)
        .and_then(|v| v.as_str().map(str::to_string))
        .or(from_query);
    Ok((Request::from_parts(parts, Body::from(bytes)), name))
}

/// The middleware: a request id for every request, and an audit record
/// for every changing call, durable before its answer leaves.
pub async fn record(State(app): State<Ctx>, mut req: Request, next: Next) -> Response {
    let id = request_id(req.headers());
    if !changes(req.method()) {
        return with_id(next.run(req).await, &id);
    }
    let slot = ActorSlot::default();
    req.extensions_mut().insert(slot.clone());
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED_ROUTE.to_string(), |m| m.as_str().to_string());
    let remote_addr = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string());
    let (resp, created) = match created_name(req).await {
        Ok((req, created)) => (next.run(req).await, created),
        Err(resp) => (resp, None),
    };
    let rec = AuditRecord {
        seq: 0,
        at: Utc::now(),
        request_id: id.clone(),
        actor: slot.take(),
        method,
        resource: resource(&path, &route, created.as_deref()),
        route,
        status: resp.status().as_u16(),
        remote_addr,
    };
    match audit::append(&app, &rec).await {
        Ok(_) => with_id(resp, &id),
        Err(e) => {
            tracing::error!(request_id = %id, status = rec.status, error = %e, "audit record not written");
            let msg = format!(
                "the call was carried out (status {}) but its audit record could not be written: {e}",
                rec.status
            );
            with_id(ApiError::Internal(msg).into_response(), &id)
        }
    }
}

fn with_id(mut resp: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Records at or after this time (RFC 3339, or a date: its midnight UTC).
    pub since: Option<String>,
    /// Records before this time.
    pub until: Option<String>,
    /// A token id, or a token kind (`admin`, `host`, `join`).
    pub actor: Option<String>,
    /// A resource as recorded (`vms/web`): it and everything under it.
    pub resource: Option<String>,
    /// Calls made with a token of this user.
    pub user: Option<String>,
    /// Page size, at most 1000 (default 100; with `format=jsonl`, the
    /// export's size, default all).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// `json` (a page, the default) or `jsonl` (every record that matches,
    /// streamed as JSON lines).
    pub format: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditQuery),
    responses(
        (status = 200, description = "The changing calls, oldest first: a page, or with \
            format=jsonl every match as JSON lines (application/jsonl).",
            content((Page<AuditRecord> = "application/json"), (AuditRecord = "application/jsonl"))),
        (status = 400, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    Reader(c): Reader,
    State(app): State<Ctx>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Response> {
    let query = audit::Query {
        since: q.since.as_deref(),
        until: q.until.as_deref(),
        actor: q.actor.as_deref(),
        resource: q.resource.as_deref(),
        user: q.user.as_deref(),
        // A project's token reads the calls made with its project's
        // tokens; a platform admin all, or one project's (`--project`).
        project: c.list_project(),
        limit: q.limit,
        cursor: q.cursor.as_deref(),
    };
    match q.format.as_deref() {
        None | Some("json") => Ok(Json(audit::page(&app, &query).await?).into_response()),
        Some("jsonl") => {
            let lines = audit::export(&app, &query)?;
            Ok((
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/jsonl")],
                Body::from_stream(lines),
            )
                .into_response())
        }
        Some(other) => Err(ApiError::Invalid(format!(
            "format {other:?} is neither json nor jsonl"
        ))),
    }
}

#[utoipa::path(get, path = "/api/v1/vms/{key}/history", tag = "audit",
    params(("key" = String, Path, description = "VM name or id (deleted VMs too)")),
    responses((status = 200, body = VmHistory), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn history(
    Reader(c): Reader,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<VmHistory>> {
    let h = usage::history(&app, &key).await?;
    if !c.is_platform() {
        // A project sees its own VMs' trails; another project's VM, or
        // one deleted (its owner no longer known here), is not found.
        let owner = app.vms.get(&h.vm_id).map(|v| v.project.clone());
        match owner {
            Some(p) => c.check(&p, Kind::Vm, &key)?,
            None => return Err(ApiError::not_found(Kind::Vm, &key)),
        }
    }
    Ok(Json(h))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// `YYYY-MM` (default: this month, up to now).
    pub month: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/usage", tag = "audit", params(UsageQuery),
    responses((status = 200, body = UsageReport), (status = 400, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn usage(
    Reader(c): Reader,
    State(app): State<Ctx>,
    Query(q): Query<UsageQuery>,
) -> ApiResult<Json<UsageReport>> {
    let mut r = usage::report(&app, q.month.as_deref()).await?;
    // A project's token, or the admin with `--project`: that project's
    // rows, and its total.
    if let Some(p) = c.list_project() {
        usage::only_project(&mut r, p);
    }
    Ok(Json(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_are_paths_under_the_api_with_the_created_name() {
        assert_eq!(
            resource("/api/v1/vms", "/api/v1/vms", Some("web")),
            "vms/web"
        );
        assert_eq!(
            resource(
                "/api/v1/vms/web/migrate",
                "/api/v1/vms/{key}/migrate",
                Some("x")
            ),
            "vms/web/migrate/x"
        );
        assert_eq!(
            resource("/api/v1/vms/web", "/api/v1/vms/{key}", Some("other")),
            "vms/web"
        );
        assert_eq!(resource("/nowhere", "unmatched", None), "nowhere");
        assert_eq!(
            resource(&"/x".repeat(400), "unmatched", None).len(),
            MAX_RESOURCE
        );
    }

    #[test]
    fn request_ids_are_the_clients_only_when_plain() {
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("abc-123.x"));
        assert_eq!(request_id(&h), "abc-123.x");
        h.insert(REQUEST_ID, HeaderValue::from_static("a b"));
        assert_eq!(request_id(&h).len(), 32);
        assert_eq!(request_id(&HeaderMap::new()).len(), 32);
    }
}
