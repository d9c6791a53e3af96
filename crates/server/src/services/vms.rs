//! Virtual machines: the rules of a new VM (its spec, its image and data
//! disks, its placement rules and pins, its NICs: see
//! [`crate::services::networks`]) and its creation, placed at once when it
//! fits.

use chrono::Utc;
use virt8ra_api::{validate, PowerState, Vm, VmCreate, VmPhase, VmStatus};
use virt8ra_store::StoreError;

use crate::error::{missing_ref, missing_ref_in, ApiError, ApiResult, Kind};
use crate::services::scheduler::{decide, Decision};
use crate::services::{networks, quotas};
use crate::state::Ctx;

/// Seconds a guest is given to power down before it is forced off.
pub const DEFAULT_STOP_TIMEOUT_S: u32 = 30;

/// Creates a VM: validated, its disks at least their images' size, placed
/// at once when it fits (so that creating and scheduling it is one durable
/// write), otherwise pending with the reason, which the scheduler retries.
/// Bad input is an error and writes nothing.
pub async fn create(app: &Ctx, req: &VmCreate, project: &str) -> ApiResult<Vm> {
    validate::vm(req).map_err(ApiError::Invalid)?;
    check_rules(app, req)?;
    check_visible(app, req, project).await?;
    let image = match app.store.get_image(&req.image).await {
        Ok(i) => i,
        Err(e @ StoreError::NotFound { .. }) => return Err(missing_ref(e)),
        Err(e) => return Err(e.into()),
    };
    let data_image_ids = data_images(app, &req.data_disks).await?;
    let nics = networks::resolve_nics(app, req).await?;
    if let Some(s) = &req.placement.site {
        if let Err(e @ StoreError::NotFound { .. }) = app.store.get_site(s).await {
            return Err(missing_ref(e));
        }
    }
    if let Some(p) = &req.placement.provider {
        if let Err(e @ StoreError::NotFound { .. }) = app.store.get_provider(p).await {
            return Err(missing_ref(e));
        }
    }
    let mut spec = req.spec();
    let mut events = vec!["created".to_string()];
    events.extend(disks_fit_images(app, &mut spec, &image, &data_image_ids).await?);
    let mut vm = new_vm(
        &req.name,
        spec,
        req.start,
        req.labels.clone(),
        &image.id,
        data_image_ids,
    );
    vm.project = project.to_string();
    networks::attach(&mut vm, &nics);
    // The project's quota: checked, and held until the VM is indexed.
    let more = quotas::size_of(&vm.spec);
    let _booking = quotas::book(app, project).await;
    quotas::check(app, project, &more, None)?;
    // Placed at once when it fits, so that the VM is created and scheduled
    // in one durable write; otherwise it stays pending with the reason and
    // the scheduler retries it.
    let placed = match decide(app, &mut vm).await? {
        Decision::Placed { host_id, event } => {
            events.push(event);
            Some(host_id)
        }
        Decision::Unplaced { why, .. } => {
            events.push(format!("not placed: {why}"));
            None
        }
    };
    // Its country's limits, where it went (or is pinned).
    let country = vm.status.country.clone().or(req.placement.country.clone());
    if let Err(e) = quotas::check(app, project, &more, country.as_deref()) {
        if placed.is_some() {
            app.placement.release(&vm.id);
        }
        return Err(e);
    }
    let events: Vec<&str> = events.iter().map(String::as_str).collect();
    // With its NICs' addresses, leased in the same write.
    if let Err(e) = networks::create_vm(app, &mut vm, &nics, &events).await {
        if placed.is_some() {
            app.placement.release(&vm.id);
        }
        return Err(e);
    }
    if let Some(h) = &placed {
        app.mark_vm(h, &vm.id);
    }
    app.wake.notify_one();
    Ok(vm)
}

/// A VM's placement rules, checked (a bad country code or a negative
/// latency bound is a 400) and as the engine takes them.
pub fn check_rules(app: &Ctx, req: &VmCreate) -> ApiResult<virt8ra_placement::Request> {
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
        let img = app.store.get_image(name).await;
        ids.push(Some(
            img.map_err(|e| missing_ref_in(&format!("data_disks[{i}]"), e))?
                .id,
        ));
    }
    Ok(ids)
}

/// The images and networks a new VM of `project` names must be the
/// project's own or public (images without a project); another project's
/// are answered as missing, as if they did not exist.
pub async fn check_visible(app: &Ctx, req: &VmCreate, project: &str) -> ApiResult<()> {
    let images = std::iter::once(("image".to_string(), Some(&req.image))).chain(
        req.data_disks
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("data_disks[{i}]"), d.image.as_ref())),
    );
    for (field, name) in images {
        let Some(name) = name else { continue };
        match app.store.get_image(name).await {
            Ok(i) if i.project.as_deref().is_some_and(|p| p != project) => {
                return Err(ApiError::BadRef {
                    field: Some(field),
                    kind: Kind::Image,
                    name: name.clone(),
                })
            }
            // A missing one is answered where it is read.
            _ => {}
        }
    }
    for (i, n) in req.nics.iter().enumerate() {
        match app.store.get_network(&n.network).await {
            Ok(net) if net.project != project => {
                return Err(ApiError::BadRef {
                    field: Some(format!("nics[{i}]")),
                    kind: Kind::Network,
                    name: n.network.clone(),
                })
            }
            _ => {}
        }
    }
    Ok(())
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
        project: virt8ra_api::DEFAULT_PROJECT.to_string(),
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
            nics: vec![],
        },
        created_at: now,
        updated_at: now,
    }
}

/// VM `key`'s events, oldest first.
pub async fn events(app: &Ctx, key: &str) -> ApiResult<Vec<virt8ra_api::VmEvent>> {
    let vm = app.vm(key)?;
    Ok(app.store.vm_events(&vm.id).await?)
}
