//! Migrations, evacuations, exports, and the staging area that carries
//! disks between hosts through the control plane.

use axum::body::Body as RawBody;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use serde::Deserialize;
use virt8ra_api::{
    EvacuateRequest, Evacuation, Migration, MigrationCreate, MigrationPhase, Page, Rebalance,
    RebalanceGoal, RebalanceMove, RebalanceRequest, VmExport,
};

use super::extract::{Body, Query};
use crate::error::{ApiError, ApiResult, Kind};
use crate::http::auth::{Admin, AdminOrHost, HostAuth};
use crate::services::staging::{self, ChunkError};
use crate::state::Ctx;
use crate::workflows::migration;

#[utoipa::path(post, path = "/api/v1/vms/{key}/migrate", tag = "migrations", request_body = MigrationCreate,
    params(("key" = String, Path, description = "VM name or id")),
    responses((status = 202, body = Migration, description = "Migration started; follow it at /migrations/{id}"),
              (status = 400, body = virt8ra_api::ErrorBody), (status = 404, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody, description = "No allowed or compatible target, or the VM cannot move now")),
    security(("bearer" = [])))]
pub async fn create(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
    Body(req): Body<MigrationCreate>,
) -> ApiResult<(StatusCode, Json<Migration>)> {
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
    _: Admin,
    State(app): State<Ctx>,
    Query(q): Query<MigrationQuery>,
) -> ApiResult<Json<Page<Migration>>> {
    let vm_id = match &q.vm {
        Some(k) => Some(app.store.get_vm(k).await?.id),
        None => None,
    };
    let mut items = app
        .store
        .list_migrations(vm_id.as_deref(), q.active)
        .await?;
    fresher(&app, &mut items);
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

/// Running migrations' progress lives in memory; the store has it with a delay.
fn fresher(app: &Ctx, items: &mut [Migration]) {
    let live = app.migrations.active();
    for m in items.iter_mut() {
        if let Some(l) = live.iter().find(|l| l.id == m.id) {
            *m = l.clone();
        }
    }
}

#[utoipa::path(get, path = "/api/v1/migrations/{id}", tag = "migrations",
    params(("id" = String, Path, description = "Migration id")),
    responses((status = 200, body = Migration), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    _: Admin,
    State(app): State<Ctx>,
    Path(id): Path<String>,
) -> ApiResult<Json<Migration>> {
    if let Some(m) = app.migrations.active().into_iter().find(|m| m.id == id) {
        return Ok(Json(m));
    }
    Ok(Json(app.store.get_migration(&id).await?))
}

#[utoipa::path(get, path = "/api/v1/vms/{key}/migrations", tag = "migrations",
    params(("key" = String, Path, description = "VM name or id")),
    responses((status = 200, body = Vec<Migration>, description = "The VM's migrations, oldest first: where its data has been"),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn history(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<Vec<Migration>>> {
    let vm = app.store.get_vm(&key).await?;
    let mut items = app.store.list_migrations(Some(&vm.id), false).await?;
    fresher(&app, &mut items);
    Ok(Json(items))
}

#[utoipa::path(post, path = "/api/v1/hosts/{key}/evacuate", tag = "migrations", request_body = EvacuateRequest,
    params(("key" = String, Path, description = "Host name or id")),
    responses((status = 202, body = Evacuation, description = "The host is put in maintenance; one migration per VM, or why a VM cannot move"),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn evacuate_host(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
    Body(req): Body<EvacuateRequest>,
) -> ApiResult<(StatusCode, Json<Evacuation>)> {
    let h = app.store.get_host(&key).await?;
    let out =
        crate::workflows::evacuation::evacuate(&app, &format!("host {}", h.name), vec![h.id], req)
            .await?;
    Ok((StatusCode::ACCEPTED, Json(out)))
}

#[utoipa::path(post, path = "/api/v1/sites/{key}/evacuate", tag = "migrations", request_body = EvacuateRequest,
    params(("key" = String, Path, description = "Site name or id")),
    responses((status = 202, body = Evacuation), (status = 404, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody, description = "The site has no hosts")),
    security(("bearer" = [])))]
pub async fn evacuate_site(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
    Body(req): Body<EvacuateRequest>,
) -> ApiResult<(StatusCode, Json<Evacuation>)> {
    let s = app.store.get_site(&key).await?;
    let hosts = app
        .store
        .list_hosts()
        .await?
        .into_iter()
        .filter(|h| h.site == s.name)
        .map(|h| h.id)
        .collect();
    let out = crate::workflows::evacuation::evacuate(&app, &format!("site {}", s.name), hosts, req)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(out)))
}

#[utoipa::path(post, path = "/api/v1/providers/{key}/evacuate", tag = "migrations", request_body = EvacuateRequest,
    params(("key" = String, Path, description = "Provider name or id")),
    responses((status = 202, body = Evacuation), (status = 404, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody, description = "The provider has no hosts")),
    security(("bearer" = [])))]
pub async fn evacuate_provider(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
    Body(req): Body<EvacuateRequest>,
) -> ApiResult<(StatusCode, Json<Evacuation>)> {
    let p = app.store.get_provider(&key).await?;
    let hosts = app
        .store
        .list_hosts()
        .await?
        .into_iter()
        .filter(|h| h.provider == p.name)
        .map(|h| h.id)
        .collect();
    let out =
        crate::workflows::evacuation::evacuate(&app, &format!("provider {}", p.name), hosts, req)
            .await?;
    Ok((StatusCode::ACCEPTED, Json(out)))
}

#[utoipa::path(post, path = "/api/v1/vms/{key}/export", tag = "migrations",
    params(("key" = String, Path, description = "VM name or id")),
    responses((status = 202, body = VmExport, description = "The host uploads a standalone qcow2 of the disk; poll /exports/{id}"),
              (status = 404, body = virt8ra_api::ErrorBody), (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn export(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<(StatusCode, Json<VmExport>)> {
    let e = crate::workflows::export::start(&app, &key).await?;
    Ok((StatusCode::ACCEPTED, Json(e)))
}

#[utoipa::path(get, path = "/api/v1/exports/{id}", tag = "migrations",
    params(("id" = String, Path, description = "Export id")),
    responses((status = 200, body = VmExport), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show_export(
    _: Admin,
    State(app): State<Ctx>,
    Path(id): Path<String>,
) -> ApiResult<Json<VmExport>> {
    Ok(Json(app.store.get_export(&id).await?))
}

#[utoipa::path(delete, path = "/api/v1/exports/{id}", tag = "migrations",
    params(("id" = String, Path, description = "Export id")),
    responses((status = 204, description = "The staged disk is removed"), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_export(
    _: Admin,
    State(app): State<Ctx>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    crate::workflows::export::cancel(&app, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Whether `host_id` may upload to staging area `id`: the source host of an
/// active migration, or the host of an export's VM.
async fn may_upload(app: &Ctx, host_id: &str, key: &str) -> ApiResult<()> {
    let (id, _) = staging_key(key)?;
    let mig = app.migrations.active().into_iter().find(|m| m.id == id);
    if let Some(m) = mig {
        if m.source.host_id == host_id && m.phase == MigrationPhase::Transferring {
            return Ok(());
        }
    } else if let Some(e) = app
        .migrations
        .active_exports()
        .into_iter()
        .find(|e| e.id == id)
    {
        let vm = app.store.get_vm(&e.vm_id).await?;
        if vm.status.host_id.as_deref() == Some(host_id) {
            return Ok(());
        }
    }
    Err(ApiError::Forbidden(format!(
        "no upload of {key} is expected from this host"
    )))
}

/// Whether `host_id` may download staged disk `key`: only the target host
/// of an active cold migration once the disk is staged and verified (phase
/// `preparing_target`, when the target is told where to fetch it). An
/// export's staged disk is read by the admin (`vm export`), never by a
/// host; and no other host reads anyone's disk.
fn may_download(app: &Ctx, host_id: &str, key: &str) -> ApiResult<()> {
    let (id, _) = staging_key(key)?;
    let fetching = app.migrations.active().into_iter().any(|m| {
        m.id == id
            && m.target.host_id == host_id
            && m.mode == virt8ra_api::MigrationMode::Cold
            && m.phase == MigrationPhase::PreparingTarget
    });
    if fetching {
        return Ok(());
    }
    Err(ApiError::Forbidden(format!(
        "staged disk {key} is not for this host: only the target of its migration fetches it"
    )))
}

/// A staging key: a migration's or export's id, or `ID.N` for data disk N
/// of a cold migration. Anything else is not found.
fn staging_key(key: &str) -> ApiResult<(&str, Option<usize>)> {
    let (id, disk) = match key.split_once('.') {
        None => (key, None),
        Some((id, suffix)) => match suffix.parse::<usize>() {
            // Canonical digits only, so one disk has one key.
            Ok(n) if n < virt8ra_api::validate::MAX_DATA_DISKS && n.to_string() == suffix => {
                (id, Some(n))
            }
            _ => return Err(ApiError::not_found(Kind::StagedDisk, key)),
        },
    };
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(ApiError::not_found(Kind::StagedDisk, key));
    }
    Ok((id, disk))
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
    may_upload(&app, &host.host_id, &id).await?;
    super::extract::octet_stream(&headers)?;
    let path = migration::staging_path(&app, &id);
    let bytes = staging::write_chunk(&app.staging, &path, q.offset, body.into_data_stream())
        .await
        .map_err(|e| match e {
            ChunkError::Offset { .. } => ApiError::Conflict(e.to_string()),
            ChunkError::Interrupted(_) => ApiError::Invalid(e.to_string()),
            ChunkError::Io { .. } => ApiError::Internal(e.to_string()),
        })?;
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
    valid_id(&id)?;
    // A host asks to resume its own upload, or a download it may make.
    if let AdminOrHost(Some(host_id)) = &who {
        if may_upload(&app, host_id, &id).await.is_err() {
            may_download(&app, host_id, &id)?;
        }
    }
    let path = migration::staging_path(&app, &id);
    let have = staging::staged_size(&app.staging, &path).await;
    Ok(Json(serde_json::json!({ "bytes": have })))
}

fn valid_id(key: &str) -> ApiResult<()> {
    staging_key(key).map(drop)
}

#[utoipa::path(get, path = "/api/v1/staging/{id}", tag = "migrations", params(("id" = String, Path)),
    responses((status = 200, description = "The staged disk (qcow2); `Range: bytes=N-` resumes", body = inline(super::extract::Binary), content_type = "application/octet-stream"),
              (status = 206, description = "The rest of the staged disk from the requested offset", body = inline(super::extract::Binary), content_type = "application/octet-stream"),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn download(
    who: AdminOrHost,
    State(app): State<Ctx>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    valid_id(&id)?;
    if let AdminOrHost(Some(host_id)) = &who {
        may_download(&app, host_id, &id)?;
    }
    let path = migration::staging_path(&app, &id);
    let f = tokio::fs::File::open(&path)
        .await
        .map_err(|_| ApiError::not_found(Kind::StagedDisk, id))?;
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
    use virt8ra_placement::rebalance::Goal;
    let frac = |v: Option<f64>, default: f64, what: &str| -> ApiResult<f64> {
        let v = v.unwrap_or(default);
        if !(0.0..=1.0).contains(&v) || v.is_nan() {
            return Err(ApiError::Invalid(format!("{what} {v} is outside 0..1")));
        }
        Ok(v)
    };
    let goal = match req.goal {
        RebalanceGoal::EvenLoad => Goal::EvenLoad {
            tolerance: frac(req.tolerance, 0.1, "tolerance")?,
        },
        RebalanceGoal::LowerCarbon => Goal::LowerCarbon {
            min_gain: frac(req.min_gain, 0.2, "min_gain")?,
        },
    };
    let plan = app
        .placement
        .with_engine(&app, |e| e.plan_rebalance(&goal))
        .await?;
    let mut out = Rebalance::default();
    for m in plan.moves {
        // Capacity held for migrations under way is not a VM to move.
        if crate::registry::placement::is_reservation(&m.vm) {
            continue;
        }
        let name = app.vm(&m.vm).map(|v| v.name).unwrap_or(m.vm.clone());
        out.moves.push(RebalanceMove {
            vm: name,
            from: m.from,
            to: m.to,
            reason: m.reason,
        });
    }
    for (vm, why) in plan.stuck {
        let name = app.vm(&vm).map(|v| v.name).unwrap_or(vm);
        out.stuck.insert(name, why);
    }
    if req.execute {
        for mv in &out.moves {
            let r = MigrationCreate {
                to_host: Some(mv.to.clone()),
                mode: req.mode,
                ..Default::default()
            };
            match migration::start(&app, &mv.vm, &r, &[]).await {
                Ok(m) => out.migrations.push(m),
                Err(e) => {
                    out.refused.insert(mv.vm.clone(), e.to_string());
                }
            }
        }
    }
    Ok(Json(out))
}
