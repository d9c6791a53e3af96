//! Migration workflows: moving a VM to another host, live or cold.
//!
//! A migration is a saga driven by the control plane. Each phase is written
//! to the store *before* the control plane acts on it, so after a crash it
//! resumes from the recorded phase (every action is idempotent: the agents
//! are told their part through the declarative desired state, and report
//! what they did). Each phase has one way forward and one way back:
//!
//! ```text
//!  live:  preparing_target ──► transferring ──► switching_over ──► cleaning_up ──► completed
//!         target: incoming      source: mirror    (commit point:      source copy
//!         QEMU + qemu-nbd       disk + memory,    VM belongs to the   removed
//!                               target resumes    target)
//!  cold:  transferring ──► preparing_target ──► switching_over ──► cleaning_up ──► completed
//!         source: stop,        target: fetch,     target starts
//!         upload disk          verify, adopt
//!
//!  before the commit point, any failure or timeout:
//!         rolling_back (target copy removed, confirmed gone) ──► failed (source resumes)
//! ```
//!
//! The invariant is exactly one running copy. The target runs the guest only
//! once the whole VM arrived; the source, once it sent the VM, is paused for
//! good unless rolled back, and a rollback resumes it only after the target
//! host confirmed its copy is gone. The commit point is the atomic write that
//! moves the VM to the target host; after it the workflow only goes forward.
//!
//! In code: [`start`] decides and records the migration; `drive` calls
//! `step` on every report or tick, and `step` runs the function of the
//! current state: `live_preparing`, `live_transferring`,
//! `cold_transferring` (with `verify_upload`), `cold_preparing`,
//! `switching_over`, `cleaning_up`, and the undo state `rolling_back`.
//! They move on with `advance`, `commit` (the commit point) or `rollback`
//! (the undo step), and end with `finish`. The agents learn their parts
//! from their desired state, whose migration roles
//! `services::desired::apply_roles` derives from the records kept in
//! `registry::migrations`.

use std::time::{Duration, Instant};

use chrono::Utc;
use virt8ra_api::protocol::{
    MigrationAgentState, MigrationReport, MigrationSide, StagedDisk, MIGRATION_PROTOCOL_VERSION,
};
use virt8ra_api::{
    Host, Hypervisor, Migration, MigrationCreate, MigrationEnd, MigrationMode, MigrationPhase,
    MigrationStep, RequestedMode, Vm, VmPhase,
};
use virt8ra_placement::Engine;

use crate::error::{ApiError, ApiResult, Kind};
use crate::registry::metrics::{self, Purpose};
use crate::registry::networks::span_reaches;
use crate::registry::placement;
use crate::state::Ctx;

/// Where a migration's disks are staged (kept here for the workflows that
/// name it so; the path is the staging service's).
pub use crate::services::staging::staging_path;

/// Giving up on a target that does not get ready.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(300);
/// Giving up on a transfer that makes no progress.
const STALL_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a workflow looks again without being woken.
const TICK: Duration = Duration::from_millis(250);

/// Fail point `migration:<name>` (see `virt8ra-failpoint`; the points are
/// listed in its crate doc): in a test build it can crash
/// the control plane here or fail the step; a no-op otherwise.
async fn fail_point(name: &str) -> ApiResult<()> {
    if !virt8ra_failpoint::ENABLED {
        return Ok(());
    }
    let point = format!("migration:{name}");
    virt8ra_failpoint::hit(virt8ra_failpoint::Process::ControlPlane, &point)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))
}

/// After phase `m.phase` was recorded: fail point `migration:<phase>`, then
/// the hosts are sent their part. An error injected there is a send that
/// failed, handled as one: the hosts are marked, and the scheduler sends it
/// again.
async fn recorded(app: &Ctx, m: &Migration) {
    if fail_point(m.phase.as_str()).await.is_err() {
        app.mark_host(&m.source.host_id);
        app.mark_host(&m.target.host_id);
        app.wake.notify_one();
        return;
    }
    sync_hosts(app, m).await;
}

fn end_of(h: &Host) -> MigrationEnd {
    MigrationEnd {
        host_id: h.id.clone(),
        host: h.name.clone(),
        site: h.site.clone(),
        provider: h.provider.clone(),
        country: h.country.clone(),
    }
}

/// Why a live migration between these hosts is not possible, if it is not.
fn live_incompatibility(vm: &Vm, src: &Host, dst: &Host) -> Option<String> {
    if vm.status.phase != VmPhase::Running {
        return Some(format!(
            "the VM is {}, not running",
            vm.status.phase.as_str()
        ));
    }
    // A target without a migration address (behind NAT) still takes live
    // migrations: their streams are relayed through the control plane.
    if dst.inventory.migration_address.is_none() && !dst.inventory.migration_relay {
        return Some(format!(
            "host {} has no migration address (agent --address) and its agent cannot relay live migrations; upgrade it",
            dst.name
        ));
    }
    if src.inventory.arch != dst.inventory.arch {
        return Some(format!(
            "architectures differ ({} -> {})",
            src.inventory.arch, dst.inventory.arch
        ));
    }
    if src.inventory.hypervisor != dst.inventory.hypervisor {
        return Some(format!(
            "hypervisors differ ({} -> {})",
            src.inventory.hypervisor.as_str(),
            dst.inventory.hypervisor.as_str()
        ));
    }
    if src.inventory.hypervisor == Hypervisor::Kvm {
        // KVM guests see the host CPU: the target must offer every flag.
        let missing: Vec<&String> = src
            .inventory
            .cpu_flags
            .iter()
            .filter(|f| !dst.inventory.cpu_flags.contains(f))
            .take(5)
            .collect();
        if src.inventory.cpu_model != dst.inventory.cpu_model || !missing.is_empty() {
            return Some(format!(
                "CPU models differ ({} -> {}; missing flags {:?})",
                src.inventory.cpu_model, dst.inventory.cpu_model, missing
            ));
        }
    }
    match &vm.status.machine {
        Some(m) if !dst.inventory.machine_types.contains(m) => {
            return Some(format!(
                "host {} cannot run QEMU machine type {m} (its QEMU is {})",
                dst.name, dst.inventory.qemu_version
            ))
        }
        None => return Some("the VM's QEMU machine type is not known yet".into()),
        _ => {}
    }
    None
}

fn protocol_ok(app: &Ctx, h: &Host) -> ApiResult<()> {
    let v = app.hub.protocol(&h.id);
    match v {
        None => Err(ApiError::Conflict(format!(
            "host {} is not connected; a migration needs both agents",
            h.name
        ))),
        Some(v) if v < MIGRATION_PROTOCOL_VERSION => Err(ApiError::Conflict(format!(
            "the agent of host {} speaks protocol {v}, migration needs {MIGRATION_PROTOCOL_VERSION}; upgrade it",
            h.name
        ))),
        _ => Ok(()),
    }
}

/// Chooses the target host for `vm` under its own rules, the request's
/// selector, and never one of `exclude` (its own host is always excluded).
/// Reserves the capacity on the target under `reservation`.
fn choose_target(
    e: &mut Engine,
    vm: &Vm,
    req: &MigrationCreate,
    src_name: &str,
    exclude: &[String],
    reservation: &str,
    app: &Ctx,
) -> Result<(String, String), ApiError> {
    let pl = &app.placement;
    // Its own rules narrowed by its networks' spans: no move leaves a network.
    let mut c = pl
        .spans
        .constraints(vm)
        .map_err(|e| ApiError::Conflict(format!("cannot move VM '{}': {e}", vm.name)))?;
    outside_networks(e, pl, vm, req)?;
    let pin = |field: &mut Option<String>, want: &Option<String>, what: &str| {
        if let Some(w) = want {
            match field {
                Some(have) if have != w => {
                    return Err(ApiError::Conflict(format!(
                        "cannot move VM '{}' to {what} '{w}': its placement rules pin it to {what} '{have}'",
                        vm.name
                    )))
                }
                _ => *field = Some(w.clone()),
            }
        }
        Ok(())
    };
    pin(&mut c.site, &req.to_site, "site")?;
    pin(&mut c.provider, &req.to_provider, "provider")?;
    pin(&mut c.country, &req.to_country, "country")?;
    let r = virt8ra_placement::Request::new(placement::resources(vm), c, pl.config.weights)
        .map_err(|e| ApiError::Invalid(format!("placement: {e}")))?
        .with_ports(placement::published(vm));
    if let Some(h) = &req.to_host {
        if h == src_name {
            return Err(ApiError::Conflict(format!(
                "VM '{}' already runs on host {h}",
                vm.name
            )));
        }
        let host = e.host(h).ok_or_else(|| ApiError::NotFound {
            kind: Kind::Host,
            name: h.clone(),
            hint: Some("; `virt8ra host list` shows what exists"),
        })?;
        if let Err(rule) = e.check_host(host, &r) {
            let site = e.site_of(host);
            let why = outside_network(pl, vm, &site.name, &site.provider, &site.country)
                .or_else(|| port_taken(e, app, h, &r))
                .unwrap_or_else(|| rule.describe().to_string());
            return Err(ApiError::Conflict(format!(
                "cannot move VM '{}' to host {h}: {why}",
                vm.name
            )));
        }
        let site = e.site_of(host).name.clone();
        e.commit(reservation, h, &r).map_err(ApiError::Internal)?;
        return Ok((h.clone(), format!("host {h} at site {site}, as asked")));
    }
    // The source and the excluded hosts are taken out for this one decision.
    let mut off: Vec<String> = exclude.to_vec();
    off.push(src_name.to_string());
    let mut restored = Vec::new();
    for h in &off {
        if e.host(h).is_some_and(|x| x.info.ready) && e.set_ready(h, false).is_ok() {
            restored.push(h.clone());
        }
    }
    let out = metrics::timed(&app.metrics, Purpose::Migrate, || e.place(&r));
    for h in restored {
        let _ = e.set_ready(&h, true);
    }
    match out {
        Ok(d) => {
            e.commit(reservation, &d.host, &r)
                .map_err(ApiError::Internal)?;
            Ok((d.host, d.reason))
        }
        Err(u) => Err(ApiError::Conflict(format!(
            "no host can take VM '{}' under its placement rules{}{}: {}",
            vm.name,
            spans_text(pl, vm),
            selector_text(req),
            u.message
        ))),
    }
}

/// Why host `h` cannot take the VM's published ports: which one, and the
/// VM that holds it there.
fn port_taken(e: &Engine, app: &Ctx, h: &str, r: &virt8ra_placement::Request) -> Option<String> {
    let (port, holder) = e.port_clash(h, r)?;
    let id = holder.split('/').next().unwrap_or(&holder);
    let by = app
        .vms
        .get(id)
        .map(|v| format!("VM '{}'", v.name))
        .unwrap_or_else(|| "another VM".into());
    Some(format!(
        "host port {} is already published there by {by}",
        port.host_side()
    ))
}

/// Why a move to a site (named, at `provider`, in `country`) would take
/// the VM off one of its networks, naming the network.
fn outside_network(
    pl: &placement::LoadedPlacement,
    vm: &Vm,
    site: &str,
    provider: &str,
    country: &str,
) -> Option<String> {
    let nets = pl.spans.of_vm(vm).ok()?;
    let n = nets
        .iter()
        .find(|n| !span_reaches(&n.span, site, provider, country))?;
    Some(format!(
        "its network '{}' does not reach site {site} ({provider}, {country}); the network spans {}",
        n.name,
        n.span.describe()
    ))
}

/// Refuses a move asked to a site, provider or country that one of the
/// VM's networks does not reach, naming the network.
fn outside_networks(
    e: &Engine,
    pl: &placement::LoadedPlacement,
    vm: &Vm,
    req: &MigrationCreate,
) -> ApiResult<()> {
    if vm.status.nics.is_empty() {
        return Ok(());
    }
    let refuse = |what: String| {
        Err(ApiError::Conflict(format!(
            "cannot move VM '{}' to {what}",
            vm.name
        )))
    };
    if let Some(s) = req.to_site.as_deref().and_then(|s| e.site(s)) {
        if let Some(why) = outside_network(pl, vm, &s.name, &s.provider, &s.country) {
            return refuse(format!("site {}: {why}", s.name));
        }
    }
    let nets = pl.spans.of_vm(vm).map_err(ApiError::Internal)?;
    for n in &nets {
        fn off<'a>(want: &'a Option<String>, reach: &[String]) -> Option<&'a String> {
            want.as_ref()
                .filter(|w| !reach.is_empty() && !reach.contains(w))
        }
        if let Some(c) = off(&req.to_country, &n.span.countries) {
            return refuse(format!(
                "country {c}: its network '{}' does not reach it; the network spans {}",
                n.name,
                n.span.describe()
            ));
        }
        if let Some(p) = off(&req.to_provider, &n.span.providers) {
            return refuse(format!(
                "provider {p}: its network '{}' does not reach it; the network spans {}",
                n.name,
                n.span.describe()
            ));
        }
    }
    Ok(())
}

/// ` and the spans of its networks (NAME: SPAN, ...)`, for a VM with NICs.
fn spans_text(pl: &placement::LoadedPlacement, vm: &Vm) -> String {
    let nets = pl.spans.of_vm(vm).unwrap_or_default();
    if nets.is_empty() {
        return String::new();
    }
    let each: Vec<String> = nets
        .iter()
        .map(|n| format!("'{}': {}", n.name, n.span.describe()))
        .collect();
    format!(" and the spans of its networks ({})", each.join(", "))
}

fn selector_text(req: &MigrationCreate) -> String {
    let mut parts = Vec::new();
    for (k, v) in [
        ("site", &req.to_site),
        ("provider", &req.to_provider),
        ("country", &req.to_country),
    ] {
        if let Some(v) = v {
            parts.push(format!("{k} {v}"));
        }
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" at {}", parts.join(", "))
    }
}

/// Refuses a request naming more than one destination, or a country that
/// is not an ISO code.
fn check_request(req: &MigrationCreate) -> ApiResult<()> {
    let selectors = [
        &req.to_host,
        &req.to_site,
        &req.to_provider,
        &req.to_country,
    ]
    .iter()
    .filter(|s| s.is_some())
    .count();
    if selectors > 1 {
        return Err(ApiError::Invalid(
            "give at most one of to_host, to_site, to_provider, to_country".into(),
        ));
    }
    if let Some(c) = &req.to_country {
        if c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(ApiError::Invalid(format!(
                "to_country {c:?} is not an ISO 3166-1 alpha-2 code (e.g. DE)"
            )));
        }
    }
    Ok(())
}

/// Whether a VM can be migrated now; its host's id when it can.
fn migratable(vm: &Vm) -> ApiResult<String> {
    if let Some(m) = &vm.status.migration {
        return Err(ApiError::Conflict(format!(
            "VM '{}' is already being migrated (migration {m})",
            vm.name
        )));
    }
    if !matches!(vm.status.phase, VmPhase::Running | VmPhase::Stopped) {
        return Err(ApiError::Conflict(format!(
            "VM '{}' is {}; only a running or stopped VM can be migrated",
            vm.name,
            vm.status.phase.as_str()
        )));
    }
    vm.status
        .host_id
        .clone()
        .ok_or_else(|| ApiError::Conflict(format!("VM '{}' has no host", vm.name)))
}

/// Live or cold, and why: as asked, or (`auto`) live when the hosts are
/// compatible. Asked live between incompatible hosts is refused.
fn choose_mode(
    asked: RequestedMode,
    why_not_live: Option<String>,
    relay_live: bool,
    vm: &Vm,
    dst: &Host,
) -> ApiResult<(MigrationMode, String)> {
    Ok(match (asked, why_not_live) {
        (RequestedMode::Cold, _) => (MigrationMode::Cold, "cold, as asked".to_string()),
        (RequestedMode::Live | RequestedMode::Auto, None) if relay_live => (
            MigrationMode::Live,
            "live, relayed through the control plane (target has no migration address)".to_string(),
        ),
        (RequestedMode::Live, None) => (MigrationMode::Live, "live, as asked".to_string()),
        (RequestedMode::Live, Some(why)) => {
            return Err(ApiError::Conflict(format!(
                "cannot migrate VM '{}' live to host {}: {why}; use --mode cold or auto",
                vm.name, dst.name
            )));
        }
        (RequestedMode::Auto, None) => (
            MigrationMode::Live,
            "live: the hosts are compatible".to_string(),
        ),
        (RequestedMode::Auto, Some(why)) => (MigrationMode::Cold, format!("cold: {why}")),
    })
}

/// The record of a migration just decided, at its first phase.
fn new_record(
    mig_id: &str,
    vm: &Vm,
    requested_mode: RequestedMode,
    (mode, mode_reason): (MigrationMode, String),
    (src, dst): (&Host, &Host),
    placement_reason: String,
) -> Migration {
    let now = Utc::now();
    let first = first_phase(mode);
    let relay_live = dst.inventory.migration_address.is_none();
    Migration {
        id: mig_id.to_string(),
        vm_id: vm.id.clone(),
        vm: vm.name.clone(),
        mode,
        requested_mode,
        mode_reason: mode_reason.clone(),
        phase: first,
        source: end_of(src),
        target: end_of(dst),
        placement_reason,
        progress: None,
        downtime_ms: None,
        total_ms: None,
        bytes: None,
        error: None,
        steps: vec![MigrationStep {
            at: now,
            phase: first,
            message: format!(
                "{} migration from {} ({}, {}) to {} ({}, {}); {mode_reason}",
                mode.as_str(),
                src.name,
                src.site,
                src.country,
                dst.name,
                dst.site,
                dst.country
            ),
        }],
        was_running: vm.status.phase == VmPhase::Running,
        source_engaged: mode == MigrationMode::Cold,
        relay: mode == MigrationMode::Live && relay_live,
        disk_sha256: None,
        disk_bytes: None,
        data_disks: vec![],
        evacuation: None,
        created_at: now,
        updated_at: now,
        finished_at: None,
    }
}

/// A migration's first phase: live prepares the target first, cold
/// stops the source and uploads its disk first.
fn first_phase(mode: MigrationMode) -> MigrationPhase {
    match mode {
        MigrationMode::Live => MigrationPhase::PreparingTarget,
        MigrationMode::Cold => MigrationPhase::Transferring,
    }
}

/// Validates and starts a migration of VM `key`; returns it as recorded.
pub async fn start(
    app: &Ctx,
    key: &str,
    req: &MigrationCreate,
    exclude: &[String],
) -> ApiResult<Migration> {
    check_request(req)?;
    let id = app.store.get_vm(key).await?.id;
    let _g = app.lock_vm(&id).await;
    let mut vm = app.store.get_vm(&id).await?;
    let src_id = migratable(&vm)?;
    let src = app.store.get_host(&src_id).await?;
    protocol_ok(app, &src)?;
    let mig_id = uuid::Uuid::new_v4().to_string();
    let reservation = placement::reservation(&vm.id, &mig_id);
    let (dst_name, reason) = app
        .placement
        .with_engine(app, |e| {
            choose_target(e, &vm, req, &src.name, exclude, &reservation, app)
        })
        .await??;
    let release = || app.placement.release(&reservation);
    let dst = match app.store.get_host(&dst_name).await {
        Ok(h) => h,
        Err(e) => {
            release();
            return Err(e.into());
        }
    };
    if let Err(e) = protocol_ok(app, &dst) {
        release();
        return Err(e);
    }
    // The project's quota in the target's country.
    if let Err(e) = crate::services::quotas::check_move(app, &vm, &dst.country).await {
        release();
        return Err(e);
    }
    let why_not_live = live_incompatibility(&vm, &src, &dst);
    let relay_live = dst.inventory.migration_address.is_none();
    let (mode, mode_reason) = match choose_mode(req.mode, why_not_live, relay_live, &vm, &dst) {
        Ok(m) => m,
        Err(e) => {
            release();
            return Err(e);
        }
    };
    let now = Utc::now();
    let mut m = new_record(
        &mig_id,
        &vm,
        req.mode,
        (mode, mode_reason),
        (&src, &dst),
        reason,
    );
    // Only an evacuation excludes hosts: the residency trail says so.
    if !exclude.is_empty() {
        m.evacuation = Some(format!("host(s) {}", exclude.join(", ")));
    }
    vm.status.migration = Some(mig_id.clone());
    vm.updated_at = now;
    let event = format!(
        "{} migration {} to host {} ({}, {}, {}) started",
        mode.as_str(),
        mig_id,
        dst.name,
        dst.site,
        dst.provider,
        dst.country
    );
    if let Err(e) = fail_point("start").await {
        release();
        return Err(e);
    }
    if let Err(e) = app.store.create_migration(&m, &vm, &event).await {
        release();
        return Err(e.into());
    }
    app.migrations.set_active(&m);
    app.metrics.migration_started(m.mode.as_str());
    app.vms.put(&vm);
    app.publish_vm(&vm);
    drop(_g);
    recorded(app, &m).await;
    tokio::spawn(drive(app.clone(), m.id.clone()));
    Ok(m)
}

/// Resumes every unfinished migration (control-plane start).
pub async fn resume_all(app: &Ctx) -> ApiResult<()> {
    for m in app.store.list_migrations(None, true).await? {
        tracing::info!(migration = %m.id, vm = %m.vm, phase = m.phase.as_str(), "resuming migration");
        app.migrations.set_active(&m);
        tokio::spawn(drive(app.clone(), m.id.clone()));
    }
    Ok(())
}

async fn sync_hosts(app: &Ctx, m: &Migration) {
    for h in [&m.source.host_id, &m.target.host_id] {
        if let Err(e) = crate::services::scheduler::sync_host(app, h).await {
            tracing::warn!(host = %h, error = %e, "sending desired state");
            app.mark_host(h);
        }
    }
    app.wake.notify_one();
}

/// Records a new phase durably (with the VM when it changes too).
async fn advance(
    app: &Ctx,
    m: &mut Migration,
    phase: MigrationPhase,
    message: String,
    vm: Option<&Vm>,
) -> ApiResult<()> {
    fail_point(&format!("before:{}", phase.as_str())).await?;
    let now = Utc::now();
    m.phase = phase;
    m.updated_at = now;
    m.steps.push(MigrationStep {
        at: now,
        phase,
        message: message.clone(),
    });
    if phase.is_terminal() {
        m.finished_at = Some(now);
        m.total_ms = Some((now - m.created_at).num_milliseconds().max(0) as u64);
        m.progress = None;
    }
    let event = format!("migration {}: {message}", m.id);
    app.store
        .update_migration(m, vm, vm.map(|_| event.as_str()))
        .await?;
    app.migrations.set_active(m);
    if phase.is_terminal() {
        let ms = |v: Option<u64>| v.map(Duration::from_millis);
        app.metrics.migration_finished(
            m.mode.as_str(),
            phase.as_str(),
            ms(m.total_ms).unwrap_or_default(),
            ms(m.downtime_ms).filter(|_| phase == MigrationPhase::Completed),
        );
    }
    if let Some(vm) = vm {
        app.vms.put(vm);
        app.publish_vm(vm);
    }
    tracing::info!(migration = %m.id, vm = %m.vm, phase = phase.as_str(), "{message}");
    recorded(app, m).await;
    Ok(())
}

/// Runs one migration to its end.
async fn drive(app: Ctx, id: String) {
    let mut entered = Instant::now();
    let mut last_progress: Option<(u64, Instant)> = None;
    let mut last_saved = Instant::now();
    loop {
        let notified = app.migrations.notified();
        let Some(mut m) = app.migrations.get(&id) else {
            return;
        };
        let phase = m.phase;
        match step(&app, &mut m, entered, &mut last_progress).await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(migration = %id, error = %e, "migration step failed; retrying")
            }
        }
        if m.phase != phase {
            entered = Instant::now();
            last_progress = None;
        } else if last_saved.elapsed() > Duration::from_secs(2) {
            // Progress reaches the store now and then, not on every report.
            last_saved = Instant::now();
            let _ = app.store.update_migration(&m, None, None).await;
        }
        if m.phase.is_terminal() {
            return;
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

async fn load_vm(app: &Ctx, m: &Migration) -> ApiResult<Vm> {
    Ok(app.store.get_vm(&m.vm_id).await?)
}

/// What one look at a migration found: the agents' latest reports and
/// whether the transfer stopped moving.
struct Observed {
    src: Option<MigrationReport>,
    dst: Option<MigrationReport>,
    /// When the workflow entered its phase.
    entered: Instant,
    /// No progress for [`STALL_TIMEOUT`].
    stalled: bool,
}

/// A side's error, when its report says it failed.
fn failure(r: &Option<MigrationReport>) -> Option<String> {
    r.as_ref()
        .filter(|r| r.state == MigrationAgentState::Failed)
        .map(|r| r.error.clone().unwrap_or_else(|| "failed".into()))
}

/// Reads the agents' reports and notes progress (for the API; a transfer
/// that stops moving is given up).
fn observe(
    app: &Ctx,
    m: &mut Migration,
    entered: Instant,
    last_progress: &mut Option<(u64, Instant)>,
) -> Observed {
    let src = app.migrations.report(&m.id, MigrationSide::Source);
    let dst = app.migrations.report(&m.id, MigrationSide::Target);
    if let Some(p) = src
        .as_ref()
        .and_then(|r| r.progress.clone())
        .or_else(|| dst.as_ref().and_then(|r| r.progress.clone()))
    {
        if last_progress.is_none_or(|(b, _)| b != p.bytes_done) {
            *last_progress = Some((p.bytes_done, Instant::now()));
        }
        if m.progress.as_ref() != Some(&p) {
            m.progress = Some(p);
            app.migrations.set_active(m);
        }
    }
    let since = last_progress.map(|(_, t)| t).unwrap_or(entered);
    Observed {
        src,
        dst,
        entered,
        stalled: since.elapsed() > STALL_TIMEOUT,
    }
}

/// One look at a migration: act on what the agents reported, by the step
/// of the diagram in the module documentation it is at.
async fn step(
    app: &Ctx,
    m: &mut Migration,
    entered: Instant,
    last_progress: &mut Option<(u64, Instant)>,
) -> ApiResult<()> {
    let o = observe(app, m, entered, last_progress);
    match (m.mode, m.phase) {
        (MigrationMode::Live, MigrationPhase::PreparingTarget) => live_preparing(app, m, &o).await,
        (MigrationMode::Live, MigrationPhase::Transferring) => live_transferring(app, m, &o).await,
        (MigrationMode::Cold, MigrationPhase::Transferring) => cold_transferring(app, m, &o).await,
        (MigrationMode::Cold, MigrationPhase::PreparingTarget) => cold_preparing(app, m, &o).await,
        (_, MigrationPhase::SwitchingOver) => switching_over(app, m).await,
        (_, MigrationPhase::CleaningUp) => cleaning_up(app, m).await,
        (_, MigrationPhase::RollingBack) => rolling_back(app, m, &o).await,
        (_, MigrationPhase::Completed | MigrationPhase::Failed) => Ok(()),
    }
}

/// Live, `preparing_target`: the target's endpoints are known -> the
/// source sends disk and memory (`transferring`).
async fn live_preparing(app: &Ctx, m: &mut Migration, o: &Observed) -> ApiResult<()> {
    if let Some(e) = failure(&o.dst) {
        return rollback(app, m, format!("the target could not get ready: {e}")).await;
    }
    if let Some(ep) = o.dst.as_ref().and_then(|r| r.endpoints.clone()) {
        m.source_engaged = true;
        let via = if m.relay {
            ", relayed through the control plane"
        } else {
            ""
        };
        let msg = format!(
            "target {} ready (migration stream {}, disk {}{via}); sending disk and memory",
            m.target.host, ep.migrate, ep.nbd
        );
        return advance(app, m, MigrationPhase::Transferring, msg, None).await;
    }
    if o.entered.elapsed() > PREPARE_TIMEOUT {
        return rollback(app, m, "the target did not get ready in time".into()).await;
    }
    Ok(())
}

/// Live, `transferring`: the target resumed the guest -> commit.
async fn live_transferring(app: &Ctx, m: &mut Migration, o: &Observed) -> ApiResult<()> {
    if o.dst
        .as_ref()
        .is_some_and(|r| r.state == MigrationAgentState::Resumed)
    {
        let src_down = o.src.as_ref().and_then(|r| r.downtime_ms).unwrap_or(0);
        let dst_down = o.dst.as_ref().and_then(|r| r.downtime_ms).unwrap_or(0);
        m.downtime_ms = Some(src_down + dst_down);
        m.bytes = o.src.as_ref().and_then(|r| r.bytes);
        return commit(app, m).await;
    }
    if let Some(e) = failure(&o.src).or_else(|| failure(&o.dst)) {
        return rollback(app, m, format!("the transfer failed: {e}")).await;
    }
    if o.src.is_none() && o.dst.as_ref().is_some_and(|r| r.endpoints.is_some()) {
        // The source has not been told yet (e.g. the control plane
        // restarted before it could); unchanged states are not resent.
        sync_hosts(app, m).await;
    }
    if o.stalled {
        return rollback(app, m, "the transfer made no progress".into()).await;
    }
    Ok(())
}

/// Cold, `transferring`: the source uploaded the disks -> verify them
/// ([`verify_upload`]).
async fn cold_transferring(app: &Ctx, m: &mut Migration, o: &Observed) -> ApiResult<()> {
    if let Some(e) = failure(&o.src) {
        return rollback(app, m, format!("the source could not send the disk: {e}")).await;
    }
    if let Some(disk) = o
        .src
        .as_ref()
        .filter(|r| r.state == MigrationAgentState::Sent)
        .and_then(|r| r.disk.clone())
    {
        let reported = o.src.as_ref().map_or(&[][..], |r| &r.data_disks[..]);
        return verify_upload(app, m, &disk, reported).await;
    }
    if o.stalled {
        return rollback(app, m, "the disk upload made no progress".into()).await;
    }
    Ok(())
}

/// Cold: checks the disks the source uploaded against what it reported;
/// verified -> the target fetches them (`preparing_target`), corrupt ->
/// rollback.
async fn verify_upload(
    app: &Ctx,
    m: &mut Migration,
    disk: &StagedDisk,
    reported: &[StagedDisk],
) -> ApiResult<()> {
    fail_point("verify-staged").await?;
    let path = staging_path(app, &m.id);
    let (sha, size) = crate::services::images::sha256_file(&path).await?;
    if sha != disk.sha256 || size != disk.size_bytes {
        let _ = tokio::fs::remove_file(&path).await;
        return rollback(
            app,
            m,
            format!(
                "the uploaded disk is corrupt (sha256 {sha}, expected {})",
                disk.sha256
            ),
        )
        .await;
    }
    // Every data disk too, each as its own staged file.
    let vm = load_vm(app, m).await?;
    if reported.len() != vm.spec.data_disks.len() {
        let msg = format!(
            "the source sent {} data disk(s); the VM has {}",
            reported.len(),
            vm.spec.data_disks.len()
        );
        return rollback(app, m, msg).await;
    }
    let sums = match verify_staged_data(app, &m.id, reported).await? {
        Ok(sums) => sums,
        Err(why) => {
            remove_staged(app, &m.id).await;
            return rollback(app, m, why).await;
        }
    };
    let total = sums.iter().fold(size, |t, d| t + d.size_bytes);
    let extra = if sums.is_empty() {
        String::new()
    } else {
        format!(" with {} data disk(s)", sums.len())
    };
    m.disk_sha256 = Some(sha);
    m.disk_bytes = Some(size);
    m.data_disks = sums;
    m.downtime_ms = None;
    let msg = format!(
        "disk{extra} uploaded and verified ({total} bytes compressed); target {} fetches it",
        m.target.host
    );
    advance(app, m, MigrationPhase::PreparingTarget, msg, None).await
}

/// Cold, `preparing_target`: the target fetched and adopted the disks ->
/// commit.
async fn cold_preparing(app: &Ctx, m: &mut Migration, o: &Observed) -> ApiResult<()> {
    if let Some(e) = failure(&o.dst) {
        return rollback(app, m, format!("the target could not take the disk: {e}")).await;
    }
    if o.dst
        .as_ref()
        .is_some_and(|r| r.state == MigrationAgentState::Ready)
    {
        // Up to the control plane and down again, every disk.
        let data: u64 = m.data_disks.iter().map(|d| d.size_bytes).sum();
        m.bytes = m.disk_bytes.map(|b| (b + data) * 2);
        return commit(app, m).await;
    }
    if o.stalled {
        return rollback(
            app,
            m,
            "the target made no progress fetching the disk".into(),
        )
        .await;
    }
    Ok(())
}

/// `switching_over` (after the commit point): the target runs the VM ->
/// remove the source copy (`cleaning_up`).
async fn switching_over(app: &Ctx, m: &mut Migration) -> ApiResult<()> {
    // Cold: wait until the target runs the VM (or holds it stopped).
    let vm = load_vm(app, m).await?;
    let settled = m.mode == MigrationMode::Live
        || vm.status.host_id.as_deref() == Some(m.target.host_id.as_str())
            && matches!(
                vm.status.phase,
                VmPhase::Running | VmPhase::Stopped | VmPhase::Failed
            );
    if settled {
        if m.mode == MigrationMode::Cold {
            let since_created = (Utc::now() - m.created_at).num_milliseconds().max(0);
            m.downtime_ms = Some(since_created as u64).filter(|_| m.was_running);
        }
        let msg = format!("VM runs at {}; removing the source copy", m.target.host);
        return advance(app, m, MigrationPhase::CleaningUp, msg, None).await;
    }
    Ok(())
}

/// `cleaning_up`: the source copy is gone -> `completed`.
async fn cleaning_up(app: &Ctx, m: &mut Migration) -> ApiResult<()> {
    if app
        .migrations
        .gone_since(&m.source.host_id, &m.vm_id, since_instant(m))
    {
        let msg = format!(
            "completed: {} -> {} ({}, {}) in {} ms, downtime {} ms, {} bytes",
            m.source.host,
            m.target.host,
            m.target.site,
            m.target.country,
            (Utc::now() - m.created_at).num_milliseconds(),
            m.downtime_ms.unwrap_or(0),
            m.bytes.unwrap_or(0)
        );
        return finish(app, m, MigrationPhase::Completed, msg).await;
    }
    Ok(())
}

/// `rolling_back` (undo): the target copy is gone -> `failed`, and the
/// source resumes.
async fn rolling_back(app: &Ctx, m: &mut Migration, o: &Observed) -> ApiResult<()> {
    // The target's copy must be gone before the source may run again.
    let target_engaged = o.dst.is_some() || m.mode == MigrationMode::Live;
    if !target_engaged
        || app
            .migrations
            .gone_since(&m.target.host_id, &m.vm_id, since_instant(m))
    {
        let msg = format!(
            "rolled back: the VM stays on {} ({})",
            m.source.host, m.source.site
        );
        return finish(app, m, MigrationPhase::Failed, msg).await;
    }
    Ok(())
}

/// Ends a migration (completed or failed): the VM is free again, the staged
/// disk and the target reservation go.
async fn finish(app: &Ctx, m: &mut Migration, phase: MigrationPhase, msg: String) -> ApiResult<()> {
    remove_staged(app, &m.id).await;
    fail_point("staged-removed").await?;
    let _g = app.lock_vm(&m.vm_id).await;
    let mut vm = load_vm(app, m).await?;
    vm.status.migration = None;
    vm.updated_at = Utc::now();
    advance(app, m, phase, msg, Some(&vm)).await?;
    app.migrations.forget_reports(&m.id);
    // The target's reservation goes; the VM is booked where it now runs
    // (the target once it switched over, else still the source).
    app.placement
        .release(&placement::reservation(&m.vm_id, &m.id));
    app.placement.rebook(&vm);
    Ok(())
}

/// When the current phase began, as an `Instant` (for "seen gone since").
fn since_instant(m: &Migration) -> Instant {
    let age = (Utc::now() - m.updated_at).to_std().unwrap_or_default();
    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
}

/// The commit point: the VM belongs to the target host from now on.
async fn commit(app: &Ctx, m: &mut Migration) -> ApiResult<()> {
    let _g = app.lock_vm(&m.vm_id).await;
    let mut vm = load_vm(app, m).await?;
    let dst = app.store.get_host(&m.target.host_id).await?;
    vm.status.host_id = Some(dst.id.clone());
    vm.status.host = Some(dst.name.clone());
    vm.status.site = Some(dst.site.clone());
    vm.status.provider = Some(dst.provider.clone());
    vm.status.country = Some(dst.country.clone());
    vm.status.hypervisor = Some(dst.inventory.hypervisor);
    vm.status.ports.clear();
    vm.status.placement_reason = Some(format!("migrated: {}", m.placement_reason));
    if m.mode == MigrationMode::Cold {
        vm.status.phase = VmPhase::Scheduled;
        vm.status.started_at = None;
        if vm
            .status
            .machine
            .as_ref()
            .is_some_and(|mt| !dst.inventory.machine_types.contains(mt))
        {
            vm.status.machine = None;
        }
    }
    vm.updated_at = Utc::now();
    let msg = format!(
        "switched over to {} ({}, {}, {})",
        dst.name, dst.site, dst.provider, dst.country
    );
    advance(app, m, MigrationPhase::SwitchingOver, msg, Some(&vm)).await
}

async fn rollback(app: &Ctx, m: &mut Migration, why: String) -> ApiResult<()> {
    m.error = Some(why.clone());
    advance(
        app,
        m,
        MigrationPhase::RollingBack,
        format!("{why}; rolling back"),
        None,
    )
    .await
}

/// Removes every file staged for migration `id` (boot and data disks).
pub async fn remove_staged(app: &Ctx, id: &str) {
    let _ = tokio::fs::remove_file(staging_path(app, id)).await;
    for i in 0..virt8ra_api::validate::MAX_DATA_DISKS {
        let _ = tokio::fs::remove_file(staging_path(app, &format!("{id}.{i}"))).await;
    }
}

/// Checks each data disk staged for `id` (`ID.N`) against what the host
/// reported; the inner error says which one is corrupt.
pub(crate) async fn verify_staged_data(
    app: &Ctx,
    id: &str,
    reported: &[StagedDisk],
) -> ApiResult<Result<Vec<virt8ra_api::StagedDiskSum>, String>> {
    let mut sums = Vec::with_capacity(reported.len());
    for (i, d) in reported.iter().enumerate() {
        let key = format!("{id}.{i}");
        let (sha, size) = crate::services::images::sha256_file(&staging_path(app, &key)).await?;
        if sha != d.sha256 || size != d.size_bytes {
            return Ok(Err(format!(
                "uploaded data disk {i} is corrupt (sha256 {sha}, expected {})",
                d.sha256
            )));
        }
        sums.push(virt8ra_api::StagedDiskSum {
            sha256: sha,
            size_bytes: size,
        });
    }
    Ok(Ok(sums))
}
