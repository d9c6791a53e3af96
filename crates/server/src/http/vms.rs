//! Virtual machines: create, inspect, power actions, console, events, delete;
//! and the application of agents' reports to VM status.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use serde::Deserialize;
use virt8ra_api::{
    validate, ConsoleLog, Page, PlacementPlan, PowerState, Vm, VmAction, VmActionRequest, VmCreate,
    VmEvent, VmPhase, VmStatus,
};
use virt8ra_store::{StoreError, VmFilter};

use super::extract::{missing_ref, Body, Query};
use crate::error::{ApiError, ApiResult};
use crate::http::auth::Admin;
use crate::state::Ctx;

const DEFAULT_STOP_TIMEOUT_S: u32 = 30;
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
    _: Admin,
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
    let items: Vec<Arc<Vm>> = app.vms.list(&VmFilter {
        host_id: q.host,
        site: q.site,
        provider: q.provider,
        country: q.country,
        phase: q.phase,
        include_deleted: q.include_deleted,
        after_id: q.cursor,
        limit: Some(limit),
    });
    let next_cursor = (items.len() == limit)
        .then(|| items.last().map(|v| v.id.clone()))
        .flatten();
    Ok(Json(Page { items, next_cursor }))
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
    _: Admin,
    State(app): State<Ctx>,
    Body(req): Body<VmCreate>,
) -> ApiResult<(StatusCode, Json<Vm>)> {
    validate::vm(&req).map_err(ApiError::Invalid)?;
    check_rules(&app, &req)?;
    let image = match app.store.get_image(&req.image).await {
        Ok(i) => i,
        Err(StoreError::NotFound { .. }) => return Err(missing_ref("image", &req.image, "image")),
        Err(e) => return Err(e.into()),
    };
    let data_image_ids = data_images(&app, &req.data_disks).await?;
    if let Some(s) = &req.placement.site {
        if let Err(StoreError::NotFound { .. }) = app.store.get_site(s).await {
            return Err(missing_ref("site", s, "site"));
        }
    }
    if let Some(p) = &req.placement.provider {
        if let Err(StoreError::NotFound { .. }) = app.store.get_provider(p).await {
            return Err(missing_ref("provider", p, "provider"));
        }
    }
    let mut spec = req.spec();
    let mut events = vec!["created".to_string()];
    events.extend(disks_fit_images(&app, &mut spec, &image, &data_image_ids).await?);
    let mut vm = new_vm(
        &req.name,
        spec,
        req.start,
        req.labels.clone(),
        &image.id,
        data_image_ids,
    );
    // Placed at once when it fits, so that the VM is created and scheduled
    // in one durable write; otherwise it stays pending with the reason and
    // the scheduler retries it.
    let placed = match crate::services::scheduler::decide(&app, &mut vm).await? {
        crate::services::scheduler::Decision::Placed { host_id, event } => {
            events.push(event);
            Some(host_id)
        }
        crate::services::scheduler::Decision::Unplaced { why, .. } => {
            events.push(format!("not placed: {why}"));
            None
        }
    };
    let events: Vec<&str> = events.iter().map(String::as_str).collect();
    if let Err(e) = app.create_vm(&vm, &events).await {
        if placed.is_some() {
            app.placement.release(&vm.id);
        }
        return Err(e.into());
    }
    if let Some(h) = &placed {
        app.mark_vm(h, &vm.id);
    }
    app.wake.notify_one();
    Ok((StatusCode::CREATED, Json(vm)))
}

/// Size in whole GiB that holds `bytes`.
fn gib_of(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 30)
}

/// Makes each disk of `spec` at least as large as the image it starts
/// from: the agent creates it that large anyway (a disk cannot be smaller
/// than its image), so placement must book that size. A 1 GiB VM of a
/// 100 GiB image books 100 GiB. Returns the events that say what grew; a
/// disk over the largest allowed is a 400.
pub async fn disks_fit_images(
    app: &Ctx,
    spec: &mut virt8ra_api::VmSpec,
    image: &virt8ra_api::Image,
    data_image_ids: &[Option<String>],
) -> ApiResult<Vec<String>> {
    let mut events = Vec::new();
    let too_big = |what: &str, img: &virt8ra_api::Image| {
        ApiError::Invalid(format!(
            "{what}: image '{}' has a virtual size of {} GiB, more than a VM disk may have ({} GiB)",
            img.name,
            gib_of(img.virtual_size_bytes),
            validate::MAX_DISK_GIB
        ))
    };
    let need = gib_of(image.virtual_size_bytes);
    if need > validate::MAX_DISK_GIB {
        return Err(too_big("the boot disk", image));
    }
    if need > spec.disk_gib {
        events.push(format!(
            "disk_gib {} raised to {need}: the virtual size of image '{}'",
            spec.disk_gib, image.name
        ));
        spec.disk_gib = need;
    }
    for (i, (d, id)) in spec.data_disks.iter_mut().zip(data_image_ids).enumerate() {
        let Some(id) = id else { continue };
        let img = app.store.get_image(id).await?;
        let need = gib_of(img.virtual_size_bytes);
        if need > validate::MAX_DISK_GIB {
            return Err(too_big(&format!("data_disks[{i}]"), &img));
        }
        // Without a size a data disk is its image's size (counted 1 GiB).
        if need > d.size_gib.unwrap_or(1) {
            events.push(format!(
                "data_disks[{i}] size raised to {need} GiB: the virtual size of image '{}'",
                img.name
            ));
            d.size_gib = Some(need);
        }
    }
    Ok(events)
}

/// The image id of each data disk (`None` for a blank one); a disk naming
/// no stored image is a 400 naming it.
pub async fn data_images(
    app: &Ctx,
    disks: &[virt8ra_api::DataDisk],
) -> ApiResult<Vec<Option<String>>> {
    let mut ids = Vec::with_capacity(disks.len());
    for (i, d) in disks.iter().enumerate() {
        let Some(name) = &d.image else {
            ids.push(None);
            continue;
        };
        match app.store.get_image(name).await {
            Ok(img) => ids.push(Some(img.id)),
            Err(StoreError::NotFound { .. }) => {
                return Err(missing_ref(
                    &format!("data_disks[{i}]: image"),
                    name,
                    "image",
                ))
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(ids)
}

/// A new VM in phase `pending`. Its id is a UUIDv7: ids grow with time, so
/// lists (ordered by id) come in creation order and the store's inserts
/// land at the end of its indexes instead of at random pages.
pub fn new_vm(
    name: &str,
    spec: virt8ra_api::VmSpec,
    start: bool,
    labels: std::collections::BTreeMap<String, String>,
    image_id: &str,
    data_image_ids: Vec<Option<String>>,
) -> Vm {
    let now = Utc::now();
    Vm {
        id: uuid::Uuid::now_v7().to_string(),
        name: name.to_string(),
        spec,
        power: if start {
            PowerState::Running
        } else {
            PowerState::Stopped
        },
        reboot_generation: 0,
        stop_timeout_s: DEFAULT_STOP_TIMEOUT_S,
        labels,
        status: VmStatus {
            phase: VmPhase::Pending,
            host: None,
            host_id: None,
            site: None,
            provider: None,
            country: None,
            image_id: Some(image_id.to_string()),
            data_image_ids,
            placement_reason: None,
            last_error: None,
            ports: vec![],
            started_at: None,
            hypervisor: None,
            machine: None,
            migration: None,
        },
        created_at: now,
        updated_at: now,
    }
}

#[utoipa::path(get, path = "/api/v1/vms/{key}", tag = "vms",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = Vm), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<Vm>> {
    Ok(Json(app.vm(&key)?))
}

#[utoipa::path(delete, path = "/api/v1/vms/{key}", tag = "vms",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 202, body = Vm, description = "Deletion under way (or done, phase `deleted`)"),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<(StatusCode, Json<Vm>)> {
    let id = app.vm(&key)?.id;
    let _g = app.lock_vm(&id).await;
    let mut vm = app.vm(&id)?;
    if vm.status.phase == VmPhase::Deleted {
        return Err(ApiError::NotFound(format!("VM '{key}' not found")));
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
    _: Admin,
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
    let id = app.vm(&key)?.id;
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
    _: Admin,
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
    let vm = app.vm(&key)?;
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
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<Vec<VmEvent>>> {
    let vm = app.vm(&key)?;
    Ok(Json(app.store.vm_events(&vm.id).await?))
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

fn check_rules(app: &Ctx, req: &VmCreate) -> ApiResult<virt8ra_placement::Request> {
    virt8ra_placement::Request::new(
        virt8ra_placement::Resources {
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            disk_gib: virt8ra_api::total_disk_gib(req.disk_gib, &req.data_disks),
        },
        req.placement.clone(),
        app.placement.config.weights,
    )
    .map_err(|e| ApiError::Invalid(format!("placement: {e}")))
}

#[utoipa::path(post, path = "/api/v1/vms/plan", tag = "vms", request_body = VmCreate,
    responses((status = 200, body = PlacementPlan, description = "Where the VM would go, or why nowhere; nothing is created"),
              (status = 400, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn plan(
    _: Admin,
    State(app): State<Ctx>,
    Body(req): Body<VmCreate>,
) -> ApiResult<Json<PlacementPlan>> {
    validate::vm(&req).map_err(ApiError::Invalid)?;
    let r = check_rules(&app, &req)?;
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
