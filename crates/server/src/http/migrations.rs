//! Migrations, evacuations, exports, and the staging area that carries
//! disks between hosts through the control plane.

use axum::body::Body as RawBody;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use serde::Deserialize;
use virt8ra_api::{
    EvacuateRequest, Evacuation, Migration, MigrationCreate, Page, Rebalance, RebalanceRequest,
    VmExport,
};

use super::extract::{Body, Query};
use crate::error::{ApiError, ApiResult, Kind};
use crate::http::auth::{
    Admin, AdminOrHost, Caller, Grant, HostAuth, Infra, Reader, ReaderOrHost, Writer,
};
use crate::http::vms::tenant_vm;
use crate::services::topology::{self, Of};
use crate::services::{migrations, uploads};
use crate::state::Ctx;
use crate::workflows::{evacuation, migration, rebalance};

#[utoipa::path(post, path = "/api/v1/vms/{key}/migrate", tag = "migrations", request_body = MigrationCreate,
    params(("key" = String, Path, description = "VM name or id")),
    responses((status = 202, body = Migration, description = "Migration started; follow it at /migrations/{id}"),
              (status = 400, body = virt8ra_api::ErrorBody), (status = 404, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody, description = "No allowed or compatible target, or the VM cannot move now")),
    security(("bearer" = [])))]
pub async fn create(
    Writer(c): Writer,
    State(app): State<Ctx>,
    Path(key): Path<String>,
    Body(req): Body<MigrationCreate>,
) -> ApiResult<(StatusCode, Json<Migration>)> {
    tenant_vm(&app, &c, &key)?;
    let m = migration::start(&app, &key, &req, &[]).await?;
    Ok((StatusCode::ACCEPTED, Json(m)))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct MigrationQuery {
    /// Only this VM's (name or id).
    pub vm: Option<String>,
    /// Only unfinished ones.
    #[serde(default)]
    pub active: bool,
}

#[utoipa::path(get, path = "/api/v1/migrations", tag = "migrations", params(MigrationQuery),
    responses((status = 200, body = Page<Migration>),
              (status = 404, body = virt8ra_api::ErrorBody, description = "The `vm` filter names no VM")),
    security(("bearer" = [])))]
pub async fn list(
    Reader(c): Reader,
    State(app): State<Ctx>,
    Query(q): Query<MigrationQuery>,
) -> ApiResult<Json<Page<Migration>>> {
    if let Some(vm) = &q.vm {
        tenant_vm(&app, &c, vm)?;
    }
    let mut items = migrations::list(&app, q.vm.as_deref(), q.active).await?;
    items.retain(|m| sees_vm(&app, &c, &m.vm_id));
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

#[utoipa::path(get, path = "/api/v1/migrations/{id}", tag = "migrations",
    params(("id" = String, Path, description = "Migration id")),
    responses((status = 200, body = Migration), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    Reader(c): Reader,
    State(app): State<Ctx>,
    Path(id): Path<String>,
) -> ApiResult<Json<Migration>> {
    let m = migrations::get(&app, &id).await?;
    if !sees_vm(&app, &c, &m.vm_id) {
        return Err(ApiError::not_found(Kind::Migration, id));
    }
    Ok(Json(m))
}

/// Whether the caller sees VM `vm_id`'s project (and, for a platform
/// admin who picked a project, whether it is that project's).
fn sees_vm(app: &Ctx, c: &Caller, vm_id: &str) -> bool {
    match app.vms.get(vm_id) {
        Some(v) => c.sees(&v.project) && c.list_project().is_none_or(|p| p == v.project),
        None => c.is_platform(),
    }
}

#[utoipa::path(get, path = "/api/v1/vms/{key}/migrations", tag = "migrations",
    params(("key" = String, Path, description = "VM name or id")),
    responses((status = 200, body = Vec<Migration>, description = "The VM's migrations, oldest first: where its data has been"),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn history(
    Reader(c): Reader,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<Vec<Migration>>> {
    tenant_vm(&app, &c, &key)?;
    Ok(Json(migrations::history(&app, &key).await?))
}

#[utoipa::path(post, path = "/api/v1/hosts/{key}/evacuate", tag = "migrations", request_body = EvacuateRequest,
    params(("key" = String, Path, description = "Host name or id")),
    responses((status = 202, body = Evacuation, description = "The host is put in maintenance; one migration per VM, or why a VM cannot move"),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn evacuate_host(
    Infra(c): Infra,
    State(app): State<Ctx>,
    Path(key): Path<String>,
    Body(req): Body<EvacuateRequest>,
) -> ApiResult<(StatusCode, Json<Evacuation>)> {
    operates(&app, &c, Of::Host, &key).await?;
    let out = evacuation::evacuate_of(&app, Of::Host, &key, req).await?;
    Ok((StatusCode::ACCEPTED, Json(out)))
}

#[utoipa::path(post, path = "/api/v1/sites/{key}/evacuate", tag = "migrations", request_body = EvacuateRequest,
    params(("key" = String, Path, description = "Site name or id")),
    responses((status = 202, body = Evacuation), (status = 404, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody, description = "The site has no hosts")),
    security(("bearer" = [])))]
pub async fn evacuate_site(
    Infra(c): Infra,
    State(app): State<Ctx>,
    Path(key): Path<String>,
    Body(req): Body<EvacuateRequest>,
) -> ApiResult<(StatusCode, Json<Evacuation>)> {
    operates(&app, &c, Of::Site, &key).await?;
    let out = evacuation::evacuate_of(&app, Of::Site, &key, req).await?;
    Ok((StatusCode::ACCEPTED, Json(out)))
}

#[utoipa::path(post, path = "/api/v1/providers/{key}/evacuate", tag = "migrations", request_body = EvacuateRequest,
    params(("key" = String, Path, description = "Provider name or id")),
    responses((status = 202, body = Evacuation), (status = 404, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody, description = "The provider has no hosts")),
    security(("bearer" = [])))]
pub async fn evacuate_provider(
    Infra(c): Infra,
    State(app): State<Ctx>,
    Path(key): Path<String>,
    Body(req): Body<EvacuateRequest>,
) -> ApiResult<(StatusCode, Json<Evacuation>)> {
    operates(&app, &c, Of::Provider, &key).await?;
    let out = evacuation::evacuate_of(&app, Of::Provider, &key, req).await?;
    Ok((StatusCode::ACCEPTED, Json(out)))
}

#[utoipa::path(post, path = "/api/v1/vms/{key}/export", tag = "migrations",
    params(("key" = String, Path, description = "VM name or id")),
    responses((status = 202, body = VmExport, description = "The host uploads a standalone qcow2 of the disk; poll /exports/{id}"),
              (status = 404, body = virt8ra_api::ErrorBody), (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn export(
    Writer(c): Writer,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<(StatusCode, Json<VmExport>)> {
    tenant_vm(&app, &c, &key)?;
    let e = crate::workflows::export::start(&app, &key).await?;
    Ok((StatusCode::ACCEPTED, Json(e)))
}

#[utoipa::path(get, path = "/api/v1/exports/{id}", tag = "migrations",
    params(("id" = String, Path, description = "Export id")),
    responses((status = 200, body = VmExport), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show_export(
    Reader(c): Reader,
    State(app): State<Ctx>,
    Path(id): Path<String>,
) -> ApiResult<Json<VmExport>> {
    Ok(Json(tenant_export(&app, &c, &id).await?))
}

/// The export `id` if the caller sees its VM's project (else a 404).
async fn tenant_export(app: &Ctx, c: &Caller, id: &str) -> ApiResult<VmExport> {
    let e = migrations::export(app, id).await?;
    // The index keeps deleted VMs, so an export's VM is always found.
    let project = app.vms.get(&e.vm_id).map(|v| v.project.clone());
    match project {
        Some(p) if c.sees(&p) => Ok(e),
        None if c.is_platform() => Ok(e),
        _ => Err(ApiError::not_found(Kind::Export, id)),
    }
}

/// `Ok` if the caller manages the provider of the host, site or provider
/// `key` (platform admins: every one); another provider's is a 404.
pub async fn operates(app: &Ctx, c: &Caller, of: Of, key: &str) -> ApiResult<()> {
    if c.operator_of().is_none() {
        return Ok(());
    }
    let (provider, kind) = match of {
        Of::Host => (
            app.hosts
                .get(key)
                .ok_or_else(|| ApiError::not_found(Kind::Host, key))?
                .provider
                .clone(),
            Kind::Host,
        ),
        Of::Site => (topology::site(app, key).await?.provider, Kind::Site),
        Of::Provider => (topology::provider(app, key).await?.name, Kind::Provider),
    };
    c.check_provider(&provider, kind, key)
}

#[utoipa::path(delete, path = "/api/v1/exports/{id}", tag = "migrations",
    params(("id" = String, Path, description = "Export id")),
    responses((status = 204, description = "The staged disk is removed"), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_export(
    Writer(c): Writer,
    State(app): State<Ctx>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    tenant_export(&app, &c, &id).await?;
    crate::workflows::export::cancel(&app, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UploadAt {
    /// Where this chunk starts: must equal the bytes already staged.
    pub offset: u64,
}

#[utoipa::path(put, path = "/api/v1/staging/{id}", tag = "agent", params(("id" = String, Path), UploadAt),
    request_body(content = inline(super::extract::Binary), content_type = "application/octet-stream"),
    responses((status = 200, description = "Chunk stored durably"), (status = 403, body = virt8ra_api::ErrorBody),
              (status = 404, body = virt8ra_api::ErrorBody, description = "Not a staging id"),
              (status = 409, body = virt8ra_api::ErrorBody, description = "Offset is not the staged size")),
    security(("bearer" = [])))]
pub async fn upload(
    host: HostAuth,
    State(app): State<Ctx>,
    Path(id): Path<String>,
    Query(q): Query<UploadAt>,
    headers: HeaderMap,
    body: RawBody,
) -> ApiResult<Json<serde_json::Value>> {
    let at = uploads::Chunk {
        key: &id,
        offset: q.offset,
    };
    let content = super::extract::octet_stream(&headers);
    let stream = body.into_data_stream();
    let bytes = uploads::stage_chunk(&app, &host.host_id, at, content, stream).await?;
    Ok(Json(serde_json::json!({ "bytes": bytes })))
}

#[utoipa::path(get, path = "/api/v1/staging/{id}/status", tag = "agent", params(("id" = String, Path)),
    responses((status = 200, description = "`{\"bytes\": N}` staged so far"),
              (status = 404, body = virt8ra_api::ErrorBody, description = "Not a staging id")),
    security(("bearer" = [])))]
pub async fn staged(
    who: AdminOrHost,
    State(app): State<Ctx>,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let have = uploads::staged_bytes(&app, who.0.as_deref(), &id).await?;
    Ok(Json(serde_json::json!({ "bytes": have })))
}

#[utoipa::path(get, path = "/api/v1/staging/{id}", tag = "migrations", params(("id" = String, Path)),
    responses((status = 200, description = "The staged disk (qcow2); `Range: bytes=N-` resumes", body = inline(super::extract::Binary), content_type = "application/octet-stream"),
              (status = 206, description = "The rest of the staged disk from the requested offset", body = inline(super::extract::Binary), content_type = "application/octet-stream"),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn download(
    ReaderOrHost(c): ReaderOrHost,
    State(app): State<Ctx>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let host = match &c.grant {
        Grant::Host(h) => Some(h.as_str()),
        Grant::Platform => None,
        // A project downloads its exports' disks, nothing else staged.
        _ => {
            let (export, _) = uploads::staging_key(&id)?;
            tenant_export(&app, &c, export)
                .await
                .map_err(|_| ApiError::not_found(Kind::StagedDisk, &id))?;
            None
        }
    };
    let f = uploads::open_staged(&app, host, &id).await?;
    let (f, status, hdrs) = super::images::ranged(f, &headers).await?;
    let body = RawBody::from_stream(tokio_util::io::ReaderStream::new(f));
    Ok(super::images::respond(status, body, hdrs))
}

#[utoipa::path(post, path = "/api/v1/rebalance", tag = "migrations", request_body = RebalanceRequest,
    responses((status = 200, body = Rebalance, description = "The planned moves (every VM's rules kept), and the migrations started when `execute`"),
              (status = 400, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn rebalance(
    _: Admin,
    State(app): State<Ctx>,
    Body(req): Body<RebalanceRequest>,
) -> ApiResult<Json<Rebalance>> {
    Ok(Json(rebalance::run(&app, req).await?))
}
