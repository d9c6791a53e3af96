//! Apps: one appliance deployed at several locations (sites, providers or
//! countries) in one request, and managed as one unit.
//!
//! A deployment is checked whole before anything is created: the appliance
//! and its parameters, every location, the VM names, the images (imported
//! from the appliance's catalog when needed, verified by checksum), and
//! whether every replica fits, as one all-or-nothing batch of the placement
//! engine. Then each replica becomes an ordinary VM pinned to its location,
//! and the scheduler places it within the location through the engine.
//! The handlers are in [`crate::http::apps`].

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use virt8ra_api::{
    validate, App as AppView, AppCreate, AppLocation, AppVm, LocationKind, PlacementConstraints,
    PowerState, Vm, VmCreate, VmPhase,
};

use crate::error::{ApiError, ApiResult, Kind};
use crate::state::Ctx;

pub const KIND: &str = "app";
pub const MAX_LOCATIONS: usize = 32;
pub const MAX_REPLICAS_PER_LOCATION: u32 = 16;

/// What the store keeps of an app; its VMs' state is read live.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppRecord {
    pub id: String,
    pub name: String,
    pub appliance: String,
    pub images: Vec<String>,
    pub params: BTreeMap<String, serde_json::Value>,
    pub locations: Vec<AppLocation>,
    /// (VM id, location)
    pub vms: Vec<(String, String)>,
    #[serde(default)]
    pub deleting: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ssh_authorized_keys: Vec<String>,
    /// The project that owns the app and its VMs.
    #[serde(default = "virt8ra_api::default_project")]
    pub project: String,
    pub created_at: DateTime<Utc>,
}

/// Resolves a location: a site, else a provider, else a country code.
pub async fn resolve_location(app: &Ctx, loc: &str) -> ApiResult<(LocationKind, String)> {
    if loc.is_empty() {
        return Err(ApiError::Invalid("an empty location".into()));
    }
    if let Ok(s) = app.store.get_site(loc).await {
        return Ok((LocationKind::Site, s.name));
    }
    if let Ok(p) = app.store.get_provider(loc).await {
        return Ok((LocationKind::Provider, p.name));
    }
    let cc = loc.to_ascii_uppercase();
    if validate::country(&cc).is_ok() {
        let any = app
            .store
            .list_sites()
            .await?
            .iter()
            .any(|s| s.country == cc);
        if !any {
            return Err(ApiError::Invalid(format!(
                "location '{loc}': no site is in country {cc}"
            )));
        }
        return Ok((LocationKind::Country, cc));
    }
    Err(ApiError::Invalid(format!(
        "location '{loc}' is not a site, a provider or a country code; `virt8ra site list` shows the sites"
    )))
}

pub fn slug(loc: &str) -> String {
    loc.to_ascii_lowercase()
        .bytes()
        .map(|b| {
            if b.is_ascii_lowercase() || b.is_ascii_digit() {
                b as char
            } else {
                '-'
            }
        })
        .collect::<String>()
        .trim_matches('-')
        .to_string()
}

pub async fn load(app: &Ctx, key: &str) -> ApiResult<AppRecord> {
    let body = app
        .store
        .get_doc(KIND, key)
        .await?
        .ok_or_else(|| ApiError::not_found(Kind::App, key))?;
    serde_json::from_str(&body).map_err(|e| ApiError::Internal(format!("corrupt app record: {e}")))
}

pub async fn save(app: &Ctx, r: &AppRecord) -> ApiResult<()> {
    let body = serde_json::to_string(r).map_err(|e| ApiError::Internal(e.to_string()))?;
    app.store.put_doc(KIND, &r.id, &r.name, &body).await?;
    Ok(())
}

/// The app with its VMs' live state and the status of each location.
pub async fn view(app: &Ctx, r: &AppRecord) -> ApiResult<AppView> {
    let mut vms = Vec::new();
    for (id, loc) in &r.vms {
        let vm = match app.store.get_vm(id).await {
            Ok(v) => v,
            Err(virt8ra_store::StoreError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        vms.push(AppVm {
            id: vm.id,
            name: vm.name,
            location: loc.clone(),
            phase: vm.status.phase,
            site: vm.status.site,
            provider: vm.status.provider,
            country: vm.status.country,
            host: vm.status.host,
            ports: vm.status.ports,
            last_error: vm.status.last_error,
        });
    }
    let mut locations = r.locations.clone();
    for l in &mut locations {
        let mine: Vec<&AppVm> = vms.iter().filter(|v| v.location == l.location).collect();
        l.running = mine.iter().filter(|v| v.phase == VmPhase::Running).count() as u32;
        l.status = status_of(&mine, l.replicas, r.deleting);
    }
    let all: Vec<&AppVm> = vms.iter().collect();
    let status = status_of(&all, all.len() as u32, r.deleting);
    Ok(AppView {
        id: r.id.clone(),
        name: r.name.clone(),
        appliance: r.appliance.clone(),
        images: r.images.clone(),
        params: r.params.clone(),
        locations,
        vms,
        status,
        labels: r.labels.clone(),
        ssh_authorized_keys: r.ssh_authorized_keys.clone(),
        project: r.project.clone(),
        created_at: r.created_at,
    })
}

pub fn status_of(vms: &[&AppVm], wanted: u32, deleting: bool) -> String {
    if deleting {
        if vms.iter().all(|v| v.phase == VmPhase::Deleted) {
            "deleted"
        } else {
            "deleting"
        }
    } else if vms.iter().any(|v| v.phase == VmPhase::Failed) {
        "failed"
    } else if vms.len() as u32 == wanted && vms.iter().all(|v| v.phase == VmPhase::Running) {
        "running"
    } else {
        "deploying"
    }
    .to_string()
}

/// The deployment itself, for the API handler and for other callers in
/// the control plane (e.g. declarative apply).
pub async fn deploy(app: &Ctx, req: AppCreate, project: &str) -> ApiResult<AppView> {
    check_create(app, &req).await?;
    let (entry, catalog) = crate::services::catalog::resolve(app, &req.appliance).await?;
    let params = entry
        .appliance
        .resolve_params(&req.params)
        .map_err(ApiError::Invalid)?;
    let t = entry.appliance.render(&params);
    let locs = resolve_locations(app, &req.locations).await?;
    let replicas = replica_requests(app, &req, &locs, &t).await?;
    check_fit(app, &req.name, &entry, t.disk_gib, &replicas).await?;
    // Images: local, or imported from the appliance's catalog and verified.
    let images = crate::services::catalog::ensure_images(app, &entry, catalog.as_ref()).await?;
    let now = Utc::now();
    let rec = AppRecord {
        id: uuid::Uuid::new_v4().to_string(),
        name: req.name.clone(),
        appliance: format!("{}/{}", entry.catalog, entry.appliance.key()),
        images: images.clone(),
        params,
        locations: locs
            .iter()
            .map(|(given, kind, _)| AppLocation {
                location: given.clone(),
                kind: *kind,
                replicas: req.replicas_per_location,
                running: 0,
                status: String::new(),
            })
            .collect(),
        vms: Vec::new(),
        deleting: false,
        labels: req.labels.clone(),
        ssh_authorized_keys: req.ssh_authorized_keys.clone(),
        project: project.to_string(),
        created_at: now,
    };
    create_replicas(app, rec, &images, &replicas).await
}

/// The request's own rules: a valid name, labels and keys, 1 to
/// [`MAX_LOCATIONS`] locations, a replica count in range, a free name.
pub async fn check_create(app: &Ctx, req: &AppCreate) -> ApiResult<()> {
    validate::name("app", &req.name).map_err(ApiError::Invalid)?;
    validate::labels(&req.labels).map_err(ApiError::Invalid)?;
    validate::ssh_keys("ssh_authorized_keys", &req.ssh_authorized_keys)
        .map_err(ApiError::Invalid)?;
    if req.locations.is_empty() {
        return Err(ApiError::Invalid(
            "name at least one location (a site, provider or country)".into(),
        ));
    }
    if req.locations.len() > MAX_LOCATIONS {
        return Err(ApiError::Invalid(format!(
            "at most {MAX_LOCATIONS} locations per app"
        )));
    }
    if req.replicas_per_location == 0 || req.replicas_per_location > MAX_REPLICAS_PER_LOCATION {
        return Err(ApiError::Invalid(format!(
            "replicas_per_location {} is outside 1..{MAX_REPLICAS_PER_LOCATION}",
            req.replicas_per_location
        )));
    }
    if app.store.get_doc(KIND, &req.name).await?.is_some() {
        return Err(ApiError::Conflict(format!(
            "app '{}' already exists",
            req.name
        )));
    }
    Ok(())
}

/// Each location resolved to a site, provider or country, each once.
pub async fn resolve_locations(
    app: &Ctx,
    given: &[String],
) -> ApiResult<Vec<(String, LocationKind, String)>> {
    let mut locs: Vec<(String, LocationKind, String)> = Vec::new();
    for l in given {
        let (kind, resolved) = resolve_location(app, l.trim()).await?;
        if locs.iter().any(|(_, k, r)| *k == kind && *r == resolved) {
            return Err(ApiError::Invalid(format!("location '{l}' is named twice")));
        }
        locs.push((l.trim().to_string(), kind, resolved));
    }

    Ok(locs)
}

/// The replicas as VM requests, pinned to their locations; each valid and
/// its name free.
pub async fn replica_requests(
    app: &Ctx,
    req: &AppCreate,
    locs: &[(String, LocationKind, String)],
    t: &virt8ra_api::market::VmTemplate,
) -> ApiResult<Vec<(String, VmCreate)>> {
    // The replicas as VM requests; all names must be free.
    let mut replicas: Vec<(String, VmCreate)> = Vec::new();
    for (given, kind, resolved) in locs {
        for i in 1..=req.replicas_per_location {
            let name = format!("{}-{}-{i}", req.name, slug(given));
            let mut placement = PlacementConstraints::default();
            match kind {
                LocationKind::Site => placement.site = Some(resolved.clone()),
                LocationKind::Provider => placement.provider = Some(resolved.clone()),
                LocationKind::Country => placement.country = Some(resolved.clone()),
            }
            let vc = VmCreate {
                name: name.clone(),
                vcpus: t.vcpus,
                memory_mib: t.memory_mib,
                disk_gib: t.disk_gib,
                image: String::new(),
                placement,
                user_data: t.user_data.clone(),
                ports: t.ports.clone(),
                ssh_authorized_keys: req.ssh_authorized_keys.clone(),
                network: None,
                data_disks: vec![],
                nics: vec![],
                publish: vec![],
                ingress: None,
                start: true,
                labels: [("virt8ra.io/app".to_string(), req.name.clone())]
                    .into_iter()
                    .collect(),
            };
            let mut check = vc.clone();
            check.image = "checked-later".into();
            validate::vm(&check).map_err(|e| {
                ApiError::Invalid(format!("replica {name} of app {}: {e}", req.name))
            })?;
            // A deleted VM's name is free again (an app deleted and deployed anew).
            if app
                .store
                .get_vm(&name)
                .await
                .is_ok_and(|v| v.status.phase != VmPhase::Deleted)
            {
                return Err(ApiError::Conflict(format!(
                    "a VM named '{name}' already exists; choose another app name"
                )));
            }
            replicas.push((given.clone(), vc));
        }
    }

    Ok(replicas)
}

/// All replicas must fit at once (a dry run of one batch of the placement
/// engine), with the disks they will book; nothing is booked.
pub async fn check_fit(
    app: &Ctx,
    name: &str,
    entry: &virt8ra_api::CatalogEntry,
    disk_gib: u64,
    replicas: &[(String, VmCreate)],
) -> ApiResult<()> {
    let replica_disk = replica_disk_gib(app, entry, disk_gib).await?;
    let requests: Vec<(String, virt8ra_placement::Request)> = replicas
        .iter()
        .enumerate()
        .map(|(i, (_, vc))| {
            virt8ra_placement::Request::new(
                virt8ra_placement::Resources {
                    vcpus: vc.vcpus,
                    memory_mib: vc.memory_mib,
                    disk_gib: replica_disk,
                },
                vc.placement.clone(),
                app.placement.config.weights,
            )
            .map(|r| (format!("app-dry-run-{name}-{i}"), r))
            .map_err(|e| ApiError::Invalid(format!("placement: {e}")))
        })
        .collect::<ApiResult<_>>()?;
    let fit = app
        .placement
        .with_engine(app, |e| {
            let out = e.place_batch(&requests, None);
            for (id, _) in &requests {
                e.release(id);
            }
            out.map(|_| ())
        })
        .await?;
    if let Err(e) = fit {
        let (loc, vc) = &replicas[e.replica.min(replicas.len().saturating_sub(1))];
        return Err(ApiError::Conflict(format!(
            "app {} cannot be deployed: replica {} at location '{loc}' fits nowhere: {}; nothing was created",
            name, vc.name, e.why
        )));
    }

    Ok(())
}

/// Stores the app's record, then its replicas as VMs with the appliance's
/// images (the first the boot disk, the others data disks, in order).
pub async fn create_replicas(
    app: &Ctx,
    mut rec: AppRecord,
    images: &[String],
    replicas: &[(String, VmCreate)],
) -> ApiResult<AppView> {
    let image_id = images
        .first()
        .cloned()
        .ok_or_else(|| ApiError::Invalid("the appliance names no image".into()))?;
    let image = app.store.get_image(&image_id).await?;
    // The appliance's other images are the replicas' data disks, in order.
    let mut data_disks = Vec::new();
    for id in &images[1..] {
        let i = app.store.get_image(id).await?;
        data_disks.push(virt8ra_api::DataDisk {
            image: Some(i.name),
            size_gib: None,
        });
    }
    let data_image_ids: Vec<Option<String>> = images[1..].iter().cloned().map(Some).collect();

    // The record first, so a crash part-way leaves an app that can be deleted.
    let mut vms: Vec<Vm> = Vec::with_capacity(replicas.len());
    for (loc, vc) in replicas {
        let mut vc = vc.clone();
        vc.image = image.name.clone();
        vc.data_disks = data_disks.clone();
        // Each disk at least its image's size (what the agent creates).
        let mut spec = vc.spec();
        crate::services::vms::disks_fit_images(app, &mut spec, &image, &data_image_ids).await?;
        let mut vm = crate::services::vms::new_vm(
            &vc.name,
            spec,
            true,
            vc.labels.clone(),
            &image.id,
            data_image_ids.clone(),
        );
        vm.project = rec.project.clone();
        rec.vms.push((vm.id.clone(), loc.clone()));
        vms.push(vm);
    }
    // The project's quota, for every replica at once (held until they are
    // written).
    let _booking = crate::services::quotas::book(app, &rec.project).await;
    let mut more = virt8ra_api::Usage::default();
    for vm in &vms {
        more.add(&crate::services::quotas::size_of(&vm.spec));
    }
    crate::services::quotas::check(app, &rec.project, &more, None)?;
    save(app, &rec).await?;
    for vm in &vms {
        app.create_vm(vm, &[&format!("created by app {}", rec.name)])
            .await?;
    }
    app.wake.notify_one();
    view(app, &rec).await
}

/// The disk one replica books, as its VM will ([`crate::services::vms::disks_fit_images`]):
/// the boot disk at least its image's virtual size, each data disk (a copy
/// of an image) at least 1 GiB and its image's size. An image not imported
/// yet (a remote catalog's) counts as small; its VM books its real size.
pub async fn replica_disk_gib(
    app: &Ctx,
    entry: &virt8ra_api::CatalogEntry,
    boot_gib: u64,
) -> ApiResult<u64> {
    let stored = app.store.list_images().await?;
    let gib = |sha: &str| {
        stored
            .iter()
            .find(|i| i.sha256 == sha)
            .map_or(0, |i| i.virtual_size_bytes.div_ceil(1 << 30))
    };
    let mut total = boot_gib;
    for (n, img) in entry.appliance.images.iter().enumerate() {
        let need = gib(&img.sha256);
        total = if n == 0 {
            total.max(need)
        } else {
            total.saturating_add(need.max(1))
        };
    }
    Ok(total)
}

/// The app by name or id, with its VMs and the status per location.
/// Every app; an app whose VMs are all gone is forgotten as it is listed.
pub async fn list_all(app: &Ctx) -> ApiResult<Vec<AppView>> {
    list(app).await
}

/// Every app (see [`list_all`]).
pub async fn list(app: &Ctx) -> ApiResult<Vec<AppView>> {
    let mut out = Vec::new();
    for body in app.store.list_docs(KIND).await? {
        let r: AppRecord = serde_json::from_str(&body)
            .map_err(|e| ApiError::Internal(format!("corrupt app record: {e}")))?;
        let v = view(app, &r).await?;
        if v.status == "deleted" {
            app.store.delete_doc(KIND, &r.id).await?;
            continue;
        }
        out.push(v);
    }
    Ok(out)
}

pub async fn get(app: &Ctx, key: &str) -> ApiResult<AppView> {
    let r = load(app, key).await?;
    let v = view(app, &r).await?;
    if v.status == "deleted" {
        app.store.delete_doc(KIND, &r.id).await?;
        return Err(ApiError::not_found(Kind::App, key));
    }
    Ok(v)
}

/// Deletes every VM of the app (images stay cached everywhere).
pub async fn remove(app: &Ctx, key: &str) -> ApiResult<AppView> {
    let mut r = load(app, key).await?;
    if !r.deleting {
        r.deleting = true;
        save(app, &r).await?;
    }
    for (id, _) in &r.vms {
        delete_vm(app, id, &r.name).await?;
    }
    app.wake.notify_one();
    view(app, &r).await
}

pub async fn delete_vm(app: &Ctx, id: &str, app_name: &str) -> ApiResult<()> {
    let _g = app.lock_vm(id).await;
    let mut vm = match app.store.get_vm(id).await {
        Ok(v) => v,
        Err(virt8ra_store::StoreError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if matches!(vm.status.phase, VmPhase::Deleted | VmPhase::Deleting) {
        return Ok(());
    }
    vm.power = PowerState::Stopped;
    vm.updated_at = Utc::now();
    if vm.status.host_id.is_none() {
        vm.status.phase = VmPhase::Deleted;
        app.update_vm(
            &vm,
            Some(&format!("deleted with app {app_name} (never placed)")),
        )
        .await?;
    } else {
        vm.status.phase = VmPhase::Deleting;
        app.update_vm(&vm, Some(&format!("delete requested with app {app_name}")))
            .await?;
        if let Some(h) = &vm.status.host_id {
            app.mark_vm(h, &vm.id);
            app.note_deletion(h);
        }
    }
    Ok(())
}
