//! Planning: what exists against what is declared, per kind, and the
//! checks that span kinds (references, placement rules).

use super::*;

// ------------------------------------------------------------------- the plan

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Create,
    Update,
    /// Deleted and created again (images whose content changed).
    Replace,
    Delete,
    Unchanged,
}

impl Action {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Replace => "replace",
            Action::Delete => "delete",
            Action::Unchanged => "unchanged",
        }
    }
}

/// One changed field: its dotted path, the current and the declared value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub field: String,
    pub from: Value,
    pub to: Value,
}

/// One line of the plan, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct PlanRow {
    pub kind: &'static str,
    pub name: String,
    pub action: Action,
    pub changes: Vec<Change>,
}

/// One resource's step: what to do, and with what.
pub(crate) struct Step<K: Kind> {
    pub(super) action: Action,
    pub(super) name: String,
    pub(super) changes: Vec<Change>,
    pub(super) decl: Option<K::Decl>,
    pub(super) live: Option<K::Live>,
}

/// A kind of resource that `apply` manages.
pub(crate) trait Kind {
    /// Singular, as printed (`provider`).
    const KIND: &'static str;
    /// The file's key (`providers`).
    const SECTION: &'static str;
    /// Fields that cannot change in place (a dotted prefix matches its children).
    const IMMUTABLE: &'static [&'static str];
    /// Whether a change to an immutable field is a replace (else a plan error).
    const REPLACE: bool;
    /// Whether `--replace` makes such a change a replace.
    const REPLACE_ON_REQUEST: bool = false;
    type Decl: Clone;
    type Live: Clone;

    fn name(d: &Self::Decl) -> &str;
    fn live_name(l: &Self::Live) -> &str;
    fn live_labels(l: &Self::Live) -> &BTreeMap<String, String>;
    /// The declared and the current values, as comparable JSON objects.
    fn view(d: &Self::Decl) -> Value;
    fn live_view(l: &Self::Live) -> Value;

    async fn list(c: &Client) -> anyhow::Result<Vec<Self::Live>>;
    async fn create(c: &Client, d: &Self::Decl) -> anyhow::Result<()>;
    async fn update(c: &Client, d: &Self::Decl, l: &Self::Live) -> anyhow::Result<()>;
    async fn delete(c: &Client, l: &Self::Live, wait: Duration) -> anyhow::Result<()>;
}

pub(super) fn managed(labels: &BTreeMap<String, String>) -> bool {
    labels.get(MANAGED_KEY).map(String::as_str) == Some(MANAGED_VALUE)
}

/// Labels as the file sees them: without the marker.
pub(super) fn user_labels(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut l = labels.clone();
    l.remove(MANAGED_KEY);
    l
}

/// The declared labels plus the marker (for creation).
pub(super) fn with_marker(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut l = labels.clone();
    l.insert(MANAGED_KEY.into(), MANAGED_VALUE.into());
    l
}

/// The declared labels, keeping the marker when the live resource has it.
pub(super) fn keep_marker(
    declared: &BTreeMap<String, String>,
    live: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    if managed(live) {
        with_marker(declared)
    } else {
        declared.clone()
    }
}

pub(super) fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        Value::Null => {}
        v => {
            out.insert(prefix.to_string(), v.clone());
        }
    }
}

/// Field-by-field differences of two objects (nested objects by dotted path;
/// lists compared whole; absent and null are the same).
pub fn diff(live: &Value, declared: &Value) -> Vec<Change> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", live, &mut a);
    flatten("", declared, &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let mut out = Vec::new();
    for k in keys {
        let from = a.get(k).cloned().unwrap_or(Value::Null);
        let to = b.get(k).cloned().unwrap_or(Value::Null);
        let same = match (&from, &to) {
            (Value::Array(x), _) if x.is_empty() => to.is_null() || from == to,
            (_, Value::Array(y)) if y.is_empty() => from.is_null() || from == to,
            (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
            _ => from == to,
        };
        if !same {
            out.push(Change {
                field: k.clone(),
                from,
                to,
            });
        }
    }
    out
}

pub(super) fn immutable(field: &str, list: &[&str]) -> bool {
    list.iter()
        .any(|f| field == *f || field.starts_with(&format!("{f}.")))
}

/// Plans one kind: what to create, update, replace, leave, and (with
/// `prune`) delete. Changes that cannot be made are added to `errs`.
pub(super) fn plan_kind<K: Kind>(
    decls: &[K::Decl],
    live: &[K::Live],
    a: &ApplyArgs,
    lines: &Lines,
    errs: &mut Vec<String>,
) -> Vec<Step<K>> {
    let prune = a.prune;
    let mut steps = Vec::new();
    for (i, d) in decls.iter().enumerate() {
        let name = K::name(d).to_string();
        let Some(l) = live.iter().find(|l| K::live_name(l) == name) else {
            steps.push(Step {
                action: Action::Create,
                name,
                changes: Vec::new(),
                decl: Some(d.clone()),
                live: None,
            });
            continue;
        };
        let changes = diff(&K::live_view(l), &K::view(d));
        let fixed: Vec<&Change> = changes
            .iter()
            .filter(|c| immutable(&c.field, K::IMMUTABLE))
            .collect();
        let action = if changes.is_empty() {
            Action::Unchanged
        } else if fixed.is_empty() {
            Action::Update
        } else if K::REPLACE || (a.replace && K::REPLACE_ON_REQUEST) {
            Action::Replace
        } else {
            let hint = if K::REPLACE_ON_REQUEST {
                ", or apply with --replace"
            } else {
                ""
            };
            for c in fixed {
                let leaf = c.field.rsplit('.').next().unwrap_or(&c.field);
                errs.push(format!(
                    "{}: {} {name}: {} cannot change in place ({} -> {}); delete the {} first or declare it under a new name{hint}",
                    lines.at(K::SECTION, i, Some(leaf)),
                    K::KIND,
                    c.field,
                    show(&c.from),
                    show(&c.to),
                    K::KIND,
                ));
            }
            Action::Update
        };
        steps.push(Step {
            action,
            name,
            changes,
            decl: Some(d.clone()),
            live: Some(l.clone()),
        });
    }
    if prune {
        for l in live {
            let name = K::live_name(l);
            if managed(K::live_labels(l)) && !decls.iter().any(|d| K::name(d) == name) {
                steps.push(Step {
                    action: Action::Delete,
                    name: name.to_string(),
                    changes: Vec::new(),
                    decl: None,
                    live: Some(l.clone()),
                });
            }
        }
    }
    steps
}

pub(super) fn rows<K: Kind>(steps: &[Step<K>]) -> Vec<PlanRow> {
    steps
        .iter()
        .map(|s| PlanRow {
            kind: K::KIND,
            name: s.name.clone(),
            action: s.action,
            changes: s.changes.clone(),
        })
        .collect()
}

/// The whole plan: one list of steps per kind, in creation order.
///
/// Adding a kind: implement [`Kind`] for it (`Decl` = the create request,
/// `Live` = the resource, `list`/`create`/`update`/`delete` through the API,
/// which fields are immutable), add a typed list to `FileDoc`, a field here
/// (creation order), a line to `rows`, `execute` (forward in creation order,
/// delete in reverse) and `run`, and the names it refers to to
/// [`check_references`].
pub(crate) struct Plan {
    pub(super) providers: Vec<Step<Providers>>,
    pub(super) sites: Vec<Step<Sites>>,
    pub(super) images: Vec<Step<Images>>,
    pub(super) networks: Vec<Step<Networks>>,
    pub(super) vms: Vec<Step<Vms>>,
    pub(super) apps: Vec<Step<Apps>>,
}

impl Plan {
    pub(super) fn rows(&self) -> Vec<PlanRow> {
        let mut r = rows(&self.providers);
        r.extend(rows(&self.sites));
        r.extend(rows(&self.images));
        r.extend(rows(&self.networks));
        r.extend(rows(&self.vms));
        r.extend(rows(&self.apps));
        r
    }
}

/// Checks that every name a resource refers to exists or is declared (and
/// is not about to be pruned), and that nothing pruned is still in use.
pub(super) fn check_references(
    doc: &FileDoc,
    apps: &[AppDecl],
    live: &LiveState,
    plan: &Plan,
    lines: &Lines,
    errs: &mut Vec<String>,
) {
    let gone_providers = deleted(rows(&plan.providers));
    let gone_sites = deleted(rows(&plan.sites));
    let gone_images = deleted(rows(&plan.images));
    let provider_known = |k: &str| {
        doc.providers.iter().any(|p| p.name == k)
            || live
                .providers
                .iter()
                .any(|p| (p.name == k || p.id == k) && !gone_providers.contains(&p.name))
    };
    let site_known = |k: &str| {
        doc.sites.iter().any(|s| s.name == k)
            || live
                .sites
                .iter()
                .any(|s| (s.name == k || s.id == k) && !gone_sites.contains(&s.name))
    };
    let image_known = |k: &str| {
        doc.images.iter().any(|i| i.name == k)
            || live
                .images
                .iter()
                .any(|i| (i.name == k || i.id == k) && !gone_images.contains(&i.name))
    };
    for (i, s) in doc.sites.iter().enumerate() {
        if !provider_known(&s.provider) {
            errs.push(format!(
                "{}: site {}: provider {:?} is neither declared nor known to the control plane",
                lines.at("sites", i, Some("provider")),
                s.name,
                s.provider
            ));
        }
    }
    for (i, v) in doc.vms.iter().enumerate() {
        if !image_known(&v.image) {
            errs.push(format!(
                "{}: vm {}: image {:?} is neither declared nor known to the control plane",
                lines.at("vms", i, Some("image")),
                v.name,
                v.image
            ));
        }
        for (j, n) in v.nics.iter().enumerate() {
            let known = doc.networks.iter().any(|d| d.name == n.network)
                || live
                    .networks
                    .iter()
                    .any(|l| l.name == n.network || l.id == n.network);
            if !known {
                errs.push(format!(
                    "{}: vm {}: nics[{j}]: network {:?} is neither declared nor known to the control plane",
                    lines.at("vms", i, Some("nics")),
                    v.name,
                    n.network
                ));
            }
        }
        if let Some(s) = &v.placement.site {
            if !site_known(s) {
                errs.push(format!(
                    "{}: vm {}: site {s:?} is neither declared nor known to the control plane",
                    lines.at("vms", i, Some("site")),
                    v.name
                ));
            }
        }
        if let Some(p) = &v.placement.provider {
            if !provider_known(p) {
                errs.push(format!(
                    "{}: vm {}: provider {p:?} is neither declared nor known to the control plane",
                    lines.at("vms", i, Some("provider")),
                    v.name
                ));
            }
        }
    }
    let country_has_site = |cc: &str| {
        doc.sites.iter().any(|s| s.country == cc)
            || live
                .sites
                .iter()
                .any(|s| s.country == cc && !gone_sites.contains(&s.name))
    };
    for (i, ap) in doc.apps.iter().enumerate() {
        for l in &ap.locations {
            let l = l.trim();
            if l.is_empty() || site_known(l) || provider_known(l) {
                continue;
            }
            let cc = l.to_ascii_uppercase();
            let why = if validate::country(&cc).is_err() {
                "is neither a declared or known site or provider, nor a country code"
            } else if !country_has_site(&cc) {
                "is a country where no site is declared or known"
            } else {
                continue;
            };
            errs.push(format!(
                "{}: app {}: location {l:?} {why}",
                lines.at("apps", i, Some("locations")),
                ap.name
            ));
        }
    }
    check_in_use(doc, apps, live, plan, lines, errs);
}

/// The names a kind's plan deletes.
fn deleted(rows: Vec<PlanRow>) -> HashSet<String> {
    rows.into_iter()
        .filter(|r| r.action == Action::Delete)
        .map(|r| r.name)
        .collect()
}

/// Checks that nothing pruned or replaced is still in use by what stays.
fn check_in_use(
    doc: &FileDoc,
    apps: &[AppDecl],
    live: &LiveState,
    plan: &Plan,
    lines: &Lines,
    errs: &mut Vec<String>,
) {
    let gone_sites = deleted(rows(&plan.sites));
    let mut gone_vms = deleted(rows(&plan.vms));
    // The replicas of a pruned app go with it.
    for s in &plan.apps {
        if let (Action::Delete, Some(l)) = (s.action, &s.live) {
            gone_vms.extend(l.vms.iter().map(|v| v.name.clone()));
        }
    }
    for d in apps {
        for s in &plan.images {
            if s.action == Action::Delete && d.images.contains(&s.name) {
                let at = match doc.apps.iter().position(|a| a.name == d.req.name) {
                    Some(i) => lines.at("apps", i, Some("appliance")),
                    None => lines.file.clone(),
                };
                errs.push(format!(
                    "{at}: app {}: its appliance {} boots from image {}, which would be pruned",
                    d.req.name, d.appliance, s.name
                ));
            }
        }
    }
    // What is pruned or replaced must not be in use by what stays.
    let live_vms: Vec<&Vm> = live
        .vms
        .iter()
        .filter(|v| !matches!(v.status.phase, VmPhase::Deleted) && !gone_vms.contains(&v.name))
        .collect();
    for s in &plan.images {
        if !matches!(s.action, Action::Delete | Action::Replace) {
            continue;
        }
        let Some(l) = &s.live else { continue };
        let mut users: Vec<&str> = live_vms
            .iter()
            .filter(|v| v.status.image_id.as_deref() == Some(l.id.as_str()))
            .map(|v| v.name.as_str())
            .collect();
        users.sort_unstable();
        if !users.is_empty() {
            let at = match doc.images.iter().position(|i| i.name == s.name) {
                Some(i) => lines.at("images", i, Some("file")),
                None => lines.file.clone(),
            };
            errs.push(format!(
                "{at}: image {}: cannot {} it while VM(s) {} use it; declare the new content under a new name",
                s.name,
                s.action.as_str(),
                users.join(", ")
            ));
        }
    }
    for s in &plan.sites {
        if s.action != Action::Delete {
            continue;
        }
        let hosts: Vec<&str> = live
            .hosts
            .iter()
            .filter(|h| h.site == s.name)
            .map(|h| h.name.as_str())
            .collect();
        if !hosts.is_empty() {
            errs.push(format!(
                "{}: site {}: cannot prune it while host(s) {} belong to it",
                lines.file,
                s.name,
                hosts.join(", ")
            ));
        }
    }
    for s in &plan.providers {
        if s.action != Action::Delete {
            continue;
        }
        let sites: Vec<&str> = live
            .sites
            .iter()
            .filter(|x| x.provider == s.name && !gone_sites.contains(&x.name))
            .map(|x| x.name.as_str())
            .collect();
        if !sites.is_empty() {
            errs.push(format!(
                "{}: provider {}: cannot prune it while site(s) {} belong to it",
                lines.file,
                s.name,
                sites.join(", ")
            ));
        }
    }
}

pub(super) struct LiveState {
    pub(super) providers: Vec<Provider>,
    pub(super) sites: Vec<Site>,
    pub(super) images: Vec<Image>,
    pub(super) networks: Vec<Network>,
    pub(super) vms: Vec<Vm>,
    pub(super) hosts: Vec<virt8ra_api::Host>,
}

/// Apps not on their way out (compared and pruned); declaring the name of
/// one being deleted is an error until it is gone.
pub(super) fn settled_apps(
    doc: &FileDoc,
    live: &[App],
    lines: &Lines,
    errs: &mut Vec<String>,
) -> Vec<App> {
    for (i, ap) in doc.apps.iter().enumerate() {
        if live
            .iter()
            .any(|l| l.name == ap.name && l.status == "deleting")
        {
            errs.push(format!(
                "{}: app {}: an app of this name is being deleted; apply again once it is gone",
                lines.at("apps", i, Some("name")),
                ap.name
            ));
        }
    }
    live.iter()
        .filter(|l| l.status != "deleting")
        .cloned()
        .collect()
}

/// Asks the control plane to check each VM's placement rules (a dry run of
/// placement: nothing is created), with the NICs on networks that exist
/// (one declared in the file is not created yet; a name neither declared
/// nor known is reported by [`check_references`]).
pub(super) async fn check_vm_rules(
    c: &Client,
    doc: &FileDoc,
    networks: &[Network],
    lines: &Lines,
    errs: &mut Vec<String>,
) -> anyhow::Result<()> {
    for (i, v) in doc.vms.iter().enumerate() {
        if validate::vm(v).is_err() {
            continue; // already reported
        }
        let mut v = v.clone();
        let declared = v.nics.len();
        v.nics.retain(|n| {
            networks
                .iter()
                .any(|l| l.name == n.network || l.id == n.network)
        });
        if v.nics.len() < declared {
            // Published ports may go to a NIC on a network not created
            // yet, and a group needs a NIC: the create checks them.
            v.publish.clear();
            if v.nics.is_empty() {
                v.ingress = None;
            }
        }
        if let Err(e) = c.post::<PlacementPlan>("/vms/plan", &v).await {
            let msg = format!("{e:#}");
            if msg.contains("cannot reach the control plane") {
                return Err(e);
            }
            let f = field_of(&msg, VM_FIELDS);
            errs.push(format!("{}: vm {}: {msg}", lines.at("vms", i, f), v.name));
        }
    }
    Ok(())
}

/// The VMs as the control plane makes them: each disk at least as large
/// as the (stored) image it starts from. A VM declared with 1 GiB of a
/// 2 GiB image runs with 2 GiB; comparing the declaration as written would
/// report a change that can never be applied.
pub(super) fn at_least_images(vms: &[VmCreate], images: &[Image]) -> Vec<VmCreate> {
    let gib = |name: &str| {
        images
            .iter()
            .find(|i| i.name == name || i.id == name)
            .map(|i| i.virtual_size_bytes.div_ceil(1 << 30))
    };
    vms.iter()
        .map(|v| {
            let mut v = v.clone();
            if let Some(need) = gib(&v.image) {
                v.disk_gib = v.disk_gib.max(need);
            }
            for d in &mut v.data_disks {
                let need = d.image.as_deref().and_then(gib).unwrap_or(0);
                if need > d.size_gib.unwrap_or(1) {
                    d.size_gib = Some(need);
                }
            }
            v
        })
        .collect()
}
