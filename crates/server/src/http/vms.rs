//! Virtual machines over HTTP: create, inspect, power actions, console,
//! events, delete. The rules of a new VM are in [`crate::services::vms`];
//! agents' reports are applied by [`crate::services::reports`].

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use serde::Deserialize;
use virt8ra_api::{
    validate, ConsoleLog, Page, PlacementPlan, PowerState, Vm, VmAction, VmActionRequest, VmCreate,
    VmEvent, VmPhase,
};
use virt8ra_store::VmFilter;

use super::extract::{Body, Query};
use crate::error::{ApiError, ApiResult, Kind};
use crate::http::auth::{Caller, Reader, VmReader, Writer};
use crate::state::Ctx;

use crate::services::vms::{check_rules, DEFAULT_STOP_TIMEOUT_S};
const MAX_PAGE: usize = 1000;

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct VmQuery {
    pub site: Option<String>,
    pub provider: Option<String>,
    pub country: Option<String>,
    /// Host id.
    pub host: Option<String>,
    pub phase: Option<VmPhase>,
    /// Include deleted VMs (their history is kept).
    #[serde(default)]
    pub include_deleted: bool,
    /// Page size, at most 1000 (default 1000).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/vms", tag = "vms", params(VmQuery),
    responses((status = 200, body = Page<Vm>), (status = 400, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    VmReader(c): VmReader,
    State(app): State<Ctx>,
    Query(q): Query<VmQuery>,
) -> ApiResult<Json<Page<Arc<Vm>>>> {
    let limit = q.limit.unwrap_or(MAX_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::Invalid(format!(
            "limit {limit} is outside 1..{MAX_PAGE}"
        )));
    }
    if let Some(c) = &q.cursor {
        check_cursor(c)?;
    }
    // From the in-memory index: no database round trip, and serialized
    // from the index's shared copies, not from a deep copy of each VM.
    // A project's VMs through the index's set of that project (a page
    // costs its size, whatever the number of projects); an operator's,
    // through its provider's set, as metadata.
    let op = c.operator_of().map(str::to_string);
    if op.is_some() && q.provider.is_some() && q.provider != op {
        return Ok(Json(Page {
            items: vec![],
            next_cursor: None,
        }));
    }
    let mut items: Vec<Arc<Vm>> = app.vms.list(&VmFilter {
        host_id: q.host,
        site: q.site,
        provider: op.clone().or(q.provider),
        country: q.country,
        phase: q.phase,
        project: c.list_project().map(str::to_string),
        include_deleted: q.include_deleted,
        after_id: q.cursor,
        limit: Some(limit),
    });
    if op.is_some() {
        items = items.into_iter().map(|v| Arc::new(metadata(&v))).collect();
    }
    let next_cursor = (items.len() == limit)
        .then(|| items.last().map(|v| v.id.clone()))
        .flatten();
    Ok(Json(Page { items, next_cursor }))
}

/// What a provider operator sees of a VM on its hosts: no user data,
/// SSH keys, guest network configuration or labels.
fn metadata(vm: &Vm) -> Vm {
    let mut v = vm.clone();
    v.spec.user_data = None;
    v.spec.ssh_authorized_keys.clear();
    v.spec.network = None;
    v.labels.clear();
    v
}

/// The VM `key` if the caller may see it: its project's (platform admins:
/// every VM). Another project's VM is answered as if it did not exist.
pub fn tenant_vm(app: &Ctx, c: &Caller, key: &str) -> ApiResult<Vm> {
    let vm = app.vm(key)?;
    c.check(&vm.project, Kind::Vm, key)?;
    Ok(vm)
}

/// A cursor is the id of the last VM of the page it followed (a UUID in
/// its canonical form); anything else was not handed out by this server.
/// The VM need not exist any more: a page's last VM may be deleted before
/// the next page is asked for, and paging goes on from its place.
fn check_cursor(c: &str) -> ApiResult<()> {
    match uuid::Uuid::parse_str(c) {
        Ok(u) if u.hyphenated().to_string() == c => Ok(()),
        _ => Err(ApiError::Invalid(format!(
            "cursor {c:?} is not one this server handed out: pass the next_cursor of the \
             previous page unchanged, or no cursor for the first page"
        ))),
    }
}

#[utoipa::path(post, path = "/api/v1/vms", tag = "vms", request_body = VmCreate,
    responses((status = 201, body = Vm), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    Writer(c): Writer,
    State(app): State<Ctx>,
    Body(req): Body<VmCreate>,
) -> ApiResult<(StatusCode, Json<Vm>)> {
    let vm = crate::services::vms::create(&app, &req, &c.owner()).await?;
    Ok((StatusCode::CREATED, Json(vm)))
}

#[utoipa::path(get, path = "/api/v1/vms/{key}", tag = "vms",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = Vm), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    VmReader(c): VmReader,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<Vm>> {
    if let Some(op) = c.operator_of() {
        let vm = app.vm(&key)?;
        if vm.status.provider.as_deref() != Some(op) {
            return Err(ApiError::not_found(Kind::Vm, key));
        }
        return Ok(Json(metadata(&vm)));
    }
    Ok(Json(tenant_vm(&app, &c, &key)?))
}

#[utoipa::path(delete, path = "/api/v1/vms/{key}", tag = "vms",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 202, body = Vm, description = "Deletion under way (or done, phase `deleted`)"),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    Writer(c): Writer,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<(StatusCode, Json<Vm>)> {
    let id = tenant_vm(&app, &c, &key)?.id;
    let _g = app.lock_vm(&id).await;
    let mut vm = app.vm(&id)?;
    if vm.status.phase == VmPhase::Deleted {
        return Err(ApiError::not_found(Kind::Vm, key));
    }
    if vm.status.phase == VmPhase::Deleting {
        return Ok((StatusCode::ACCEPTED, Json(vm)));
    }
    refuse_while_migrating(&vm)?;
    vm.power = PowerState::Stopped;
    vm.updated_at = Utc::now();
    if vm.status.host_id.is_none() {
        vm.status.phase = VmPhase::Deleted;
        app.update_vm(&vm, Some("deleted (never placed)")).await?;
    } else {
        vm.status.phase = VmPhase::Deleting;
        app.update_vm(&vm, Some("delete requested")).await?;
        if let Some(h) = &vm.status.host_id {
            app.mark_vm(h, &vm.id);
            app.note_deletion(h);
        }
    }
    drop(_g);
    app.wake.notify_one();
    Ok((StatusCode::ACCEPTED, Json(vm)))
}

#[utoipa::path(post, path = "/api/v1/vms/{key}/actions", tag = "vms", request_body = VmActionRequest,
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 202, body = Vm), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 404, body = virt8ra_api::ErrorBody), (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn action(
    Writer(c): Writer,
    State(app): State<Ctx>,
    Path(key): Path<String>,
    Body(req): Body<VmActionRequest>,
) -> ApiResult<(StatusCode, Json<Vm>)> {
    if let Some(t) = req.timeout_s {
        if req.action != VmAction::Stop {
            return Err(ApiError::Invalid("timeout_s applies to stop only".into()));
        }
        if t > 3600 {
            return Err(ApiError::Invalid(format!(
                "timeout_s {t} is outside 0..3600"
            )));
        }
    }
    let id = tenant_vm(&app, &c, &key)?.id;
    let _g = app.lock_vm(&id).await;
    let mut vm = app.vm(&id)?;
    if matches!(vm.status.phase, VmPhase::Deleting | VmPhase::Deleted) {
        return Err(ApiError::Conflict(format!(
            "VM '{}' is {}",
            vm.name,
            vm.status.phase.as_str()
        )));
    }
    refuse_while_migrating(&vm)?;
    let event = match req.action {
        VmAction::Start => {
            vm.power = PowerState::Running;
            if vm.status.phase == VmPhase::Failed && vm.status.host_id.is_none() {
                vm.status.phase = VmPhase::Pending;
            }
            "start requested".to_string()
        }
        VmAction::Stop => {
            vm.power = PowerState::Stopped;
            vm.stop_timeout_s = req.timeout_s.unwrap_or(DEFAULT_STOP_TIMEOUT_S);
            if vm.status.host_id.is_none() {
                vm.status.phase = VmPhase::Stopped;
            }
            format!(
                "stop requested (ACPI power-down, forced after {} s)",
                vm.stop_timeout_s
            )
        }
        VmAction::Reboot => {
            if vm.status.phase != VmPhase::Running {
                return Err(ApiError::Conflict(format!(
                    "VM '{}' is {}, not running; start it instead",
                    vm.name,
                    vm.status.phase.as_str()
                )));
            }
            vm.reboot_generation += 1;
            "reboot requested".to_string()
        }
    };
    vm.updated_at = Utc::now();
    app.update_vm(&vm, Some(&event)).await?;
    if let Some(h) = &vm.status.host_id {
        app.mark_vm(h, &vm.id);
    }
    drop(_g);
    app.wake.notify_one();
    Ok((StatusCode::ACCEPTED, Json(vm)))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ConsoleQuery {
    /// Return at most this many bytes from the end (default 65536, at most 4 MiB).
    pub bytes: Option<u64>,
}

#[utoipa::path(get, path = "/api/v1/vms/{key}/console", tag = "vms", params(("key" = String, Path, description = "Name or id"), ConsoleQuery),
    responses((status = 200, body = ConsoleLog), (status = 404, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody), (status = 503, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn console(
    Reader(c): Reader,
    State(app): State<Ctx>,
    Path(key): Path<String>,
    Query(q): Query<ConsoleQuery>,
) -> ApiResult<Json<ConsoleLog>> {
    let max = q.bytes.unwrap_or(65536);
    if max == 0 || max > 4 << 20 {
        return Err(ApiError::Invalid(format!(
            "bytes {max} is outside 1..4194304"
        )));
    }
    let vm = tenant_vm(&app, &c, &key)?;
    let host_id = vm.status.host_id.clone().ok_or_else(|| {
        ApiError::Conflict(format!(
            "VM '{}' has not been placed on a host yet, so it has no console",
            vm.name
        ))
    })?;
    let r = app.hub.console(&host_id, &vm.id, max).await?;
    if let Some(e) = r.error {
        return Err(ApiError::Unavailable(format!(
            "agent could not read the console: {e}"
        )));
    }
    Ok(Json(ConsoleLog {
        vm: vm.name,
        data: r.data,
        truncated: r.truncated,
    }))
}

#[utoipa::path(get, path = "/api/v1/vms/{key}/events", tag = "vms",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = Vec<VmEvent>), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn events(
    Reader(c): Reader,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<Vec<VmEvent>>> {
    tenant_vm(&app, &c, &key)?;
    Ok(Json(crate::services::vms::events(&app, &key).await?))
}

fn refuse_while_migrating(vm: &Vm) -> ApiResult<()> {
    match &vm.status.migration {
        Some(m) => Err(ApiError::Conflict(format!(
            "VM '{}' is being migrated (migration {m}); wait for it to finish (`virt8ra migration show {m}`)",
            vm.name
        ))),
        None => Ok(()),
    }
}

#[utoipa::path(post, path = "/api/v1/vms/plan", tag = "vms", request_body = VmCreate,
    responses((status = 200, body = PlacementPlan, description = "Where the VM would go, or why nowhere; nothing is created"),
              (status = 400, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn plan(
    Writer(c): Writer,
    State(app): State<Ctx>,
    Body(req): Body<VmCreate>,
) -> ApiResult<Json<PlacementPlan>> {
    validate::vm(&req).map_err(ApiError::Invalid)?;
    crate::services::vms::check_visible(&app, &req, &c.owner()).await?;
    let r = check_rules(&app, &req)?;
    // Where its networks reach, too.
    let r = crate::services::networks::planned_request(&app, &req, r).await?;
    let out = app.placement.with_engine(&app, |e| e.place(&r)).await?;
    Ok(Json(match out {
        Ok(d) => PlacementPlan {
            placed: true,
            host: Some(d.host),
            site: Some(d.site),
            provider: Some(d.provider),
            country: Some(d.country),
            score: Some(d.score),
            components: d.components.into_iter().collect(),
            rtt_ms: d.rtt_ms,
            reason: d.reason,
            total_hosts: None,
            excluded: Default::default(),
        },
        Err(u) => PlacementPlan {
            placed: false,
            host: None,
            site: None,
            provider: None,
            country: None,
            score: None,
            components: Default::default(),
            rtt_ms: None,
            reason: u.message,
            total_hosts: Some(u.total_hosts),
            excluded: u
                .counts
                .into_iter()
                .map(|(rule, n)| (rule.key().to_string(), n))
                .collect(),
        },
    }))
}
