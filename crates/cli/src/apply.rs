//! `virt8ra apply -f FILE.yaml`: infrastructure as code.
//!
//! The file declares providers, sites, images, VMs and apps (deployments of
//! an appliance at several locations). `apply` reads what exists through the
//! API, computes a plan (per resource: `create`, `update`, `replace`,
//! `delete` or `unchanged`, with the changed fields), validates the whole
//! file and the whole plan, and only then makes the changes: creates and
//! updates in the order providers → sites → images → VMs → apps, deletions
//! in the reverse order. A second apply of the same file
//! changes nothing and says so. `--dry-run` prints the plan and changes
//! nothing.
//!
//! Semantics:
//! - What is declared is created or brought to the declared values; fields
//!   left out take the API's defaults (a declared-state file, not a patch).
//! - What is absent is left alone, unless `--prune` is given: then resources
//!   that `apply` itself created (they carry the label
//!   `virt8ra.io/managed-by: apply`, set on creation only) and that the file
//!   no longer declares are deleted. Resources made by hand, or adopted by a
//!   file that declares an existing name, are never pruned.
//! - Fields that the API can change in place are updated (provider country,
//!   jurisdiction and labels; site city, coordinates, tier, facts and labels;
//!   a VM's power via `start`). Image content (sha256) or architecture
//!   changes are a `replace` (delete and import again), refused when VMs use
//!   the image. Any other change (a site's provider or country, a VM's size,
//!   image, placement, user data, SSH keys, network configuration, ports or
//!   labels) is a plan error that names
//!   the field: nothing is changed. With `--replace`, such a VM change is a
//!   `replace` instead (deleted, waited for, created again: its disk is lost).
//! - Apps: an entry has the fields of the deploy request (`appliance`,
//!   `name`, `locations`, `replicas_per_location`, `params`,
//!   `ssh_authorized_keys`, `labels`). The
//!   appliance is resolved through the API before anything changes (an
//!   unknown appliance or a bad parameter is an error with its line), and
//!   compared as resolved (`CATALOG/NAME@VERSION`: naming an appliance
//!   without a version means its newest one, so publishing a newer version
//!   makes the declared app differ) with its parameters as resolved
//!   (defaults filled in). Locations are compared as a set. Nothing of an
//!   app changes in place: any change is a plan error naming the field,
//!   or with `--replace` a `replace` (every replica deleted, the app deployed
//!   again). The marker label is on the app record itself (apps carry
//!   labels), not on its VMs, so `--prune` of VMs never touches replicas.
//!   Whether every replica fits is checked by the deploy itself (all or
//!   nothing), not in the plan.
//!
//! Every kind of resource is one implementation of [`Kind`] (read the
//! current state, compare, create, update, delete through the API), so a
//! new kind is one more implementation and one line in [`Plan`].

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use virt8ra_api::{
    validate, App, AppCreate, CatalogEntry, Image, Page, PlacementPlan, PowerState, Provider,
    ProviderCreate, ProviderUpdate, Site, SiteCreate, SiteUpdate, Vm, VmAction, VmActionRequest,
    VmCreate, VmPhase,
};

use crate::client::{seg, Client};
use crate::output::{emit, table, Format};

/// The label that marks resources created by `apply` (what `--prune` may delete).
pub const MANAGED_KEY: &str = "virt8ra.io/managed-by";
pub const MANAGED_VALUE: &str = "apply";

#[derive(Debug, Clone, Args)]
pub struct ApplyArgs {
    /// The YAML file that declares providers, sites, images, VMs and apps.
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Print the plan and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also delete resources created by apply that the file no longer declares.
    #[arg(long)]
    pub prune: bool,
    /// Replace (delete, then create again) VMs and apps whose declared spec
    /// changed in a way that cannot be made in place. Their disks are lost.
    #[arg(long)]
    pub replace: bool,
    /// Seconds to wait for a pruned VM to be gone before deleting what it used.
    #[arg(long, default_value_t = 300)]
    pub wait_timeout: u64,
}

// ------------------------------------------------------------------ the file

/// The file: one list per kind. Each entry has the fields of the API's
/// create request (`virt8ra openapi` documents them), except images.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default, deserialize_with = "list")]
    providers: Vec<ProviderCreate>,
    #[serde(default, deserialize_with = "list")]
    sites: Vec<SiteCreate>,
    #[serde(default, deserialize_with = "list")]
    images: Vec<ImageEntry>,
    #[serde(default, deserialize_with = "list")]
    vms: Vec<VmCreate>,
    /// App deployments: the deploy request's fields.
    #[serde(default, deserialize_with = "list")]
    apps: Vec<AppCreate>,
}

/// A list, or nothing (`vms:` with every entry commented out).
fn list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// An image: imported from a local file (relative to the YAML file) or
/// downloaded from an http(s) URL; identified by the sha256 of that file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageEntry {
    name: String,
    #[serde(default)]
    file: Option<String>,
    #[serde(default)]
    url: Option<String>,
    /// Expected sha256 of the file (checked; for a URL it saves a download
    /// when the image is already imported).
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default = "default_arch")]
    arch: String,
}

fn default_arch() -> String {
    "x86_64".into()
}

/// An image entry resolved: its local copy (when there is one yet) and sha256.
#[derive(Debug, Clone)]
pub(crate) struct ImageDecl {
    name: String,
    url: Option<String>,
    local: Option<PathBuf>,
    sha256: String,
    arch: String,
}

/// Limits of an app deployment (the server's own, checked before any change).
const MAX_APP_LOCATIONS: usize = 32;
const MAX_REPLICAS_PER_LOCATION: u32 = 16;

/// An app entry with its appliance resolved through the API.
#[derive(Debug, Clone)]
pub(crate) struct AppDecl {
    /// As declared.
    req: AppCreate,
    /// `CATALOG/NAME@VERSION`.
    appliance: String,
    /// Every parameter of the appliance, defaults filled in.
    params: BTreeMap<String, Value>,
    /// Names of the images the appliance boots from.
    images: Vec<String>,
}

/// Where each list entry starts in the file, for error messages.
struct Lines {
    file: String,
    text: Vec<String>,
    /// Section name → (first line, last line) of each entry (0-based).
    items: BTreeMap<String, Vec<(usize, usize)>>,
    sections: BTreeMap<String, usize>,
}

impl Lines {
    fn new(file: &Path, text: &str) -> Lines {
        let text: Vec<String> = text.lines().map(str::to_string).collect();
        let mut items: BTreeMap<String, Vec<(usize, usize)>> = BTreeMap::new();
        let mut sections = BTreeMap::new();
        let mut section: Option<String> = None;
        let mut item_indent: Option<usize> = None;
        for (i, line) in text.iter().enumerate() {
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let indent = line.len() - trimmed.len();
            if indent == 0 && !trimmed.starts_with('-') {
                let key = trimmed.split(':').next().unwrap_or_default().trim();
                section = Some(key.to_string());
                sections.insert(key.to_string(), i);
                item_indent = None;
                continue;
            }
            let Some(s) = &section else { continue };
            let list = items.entry(s.clone()).or_default();
            let is_item = trimmed == "-" || trimmed.starts_with("- ");
            if is_item && item_indent.is_none_or(|n| n == indent) {
                item_indent = Some(indent);
                list.push((i, i));
            } else if let Some(last) = list.last_mut() {
                last.1 = i;
            }
        }
        Lines {
            file: file.display().to_string(),
            text,
            items,
            sections,
        }
    }

    /// `FILE:LINE` of an entry, or of the line of `field` in it when found.
    fn at(&self, section: &str, index: usize, field: Option<&str>) -> String {
        let Some(&(first, last)) = self.items.get(section).and_then(|v| v.get(index)) else {
            return match self.sections.get(section) {
                Some(l) => format!("{}:{}", self.file, l + 1),
                None => self.file.clone(),
            };
        };
        let mut line = first;
        if let Some(f) = field {
            let key = format!("{f}:");
            for i in first..=last {
                let t = self.text[i].trim_start();
                let t = t.strip_prefix("- ").unwrap_or(t).trim_start();
                if t.starts_with(&key) {
                    line = i;
                    break;
                }
            }
        }
        format!("{}:{}", self.file, line + 1)
    }

    #[cfg(test)]
    fn section(&self, section: &str) -> String {
        match self.sections.get(section) {
            Some(l) => format!("{}:{}", self.file, l + 1),
            None => self.file.clone(),
        }
    }
}

/// The field a validation message is about: the one of `fields` it names
/// first (messages start with the field or name it early).
fn field_of<'a>(msg: &str, fields: &[(&str, &'a str)]) -> Option<&'a str> {
    fields
        .iter()
        .filter_map(|(needle, f)| msg.find(needle).map(|at| (at, *f)))
        .min_by_key(|(at, _)| *at)
        .map(|(_, f)| f)
}

const PROVIDER_FIELDS: &[(&str, &str)] = &[
    ("name", "name"),
    ("country", "country"),
    ("jurisdiction", "jurisdiction"),
    ("label", "labels"),
];
const SITE_FIELDS: &[(&str, &str)] = &[
    ("name", "name"),
    ("provider", "provider"),
    ("country", "country"),
    ("city", "city"),
    ("latitude", "latitude"),
    ("longitude", "longitude"),
    ("access_latency_ms", "access_latency_ms"),
    ("grid_gco2_per_kwh", "grid_gco2_per_kwh"),
    ("pue", "pue"),
    ("price_vcpu_hour", "price_vcpu_hour"),
    ("price_gib_hour", "price_gib_hour"),
    ("label", "labels"),
];
const VM_FIELDS: &[(&str, &str)] = &[
    ("name", "name"),
    ("vcpus", "vcpus"),
    ("memory_mib", "memory_mib"),
    ("disk_gib", "disk_gib"),
    ("image", "image"),
    ("user_data", "user_data"),
    ("ssh_authorized_keys", "ssh_authorized_keys"),
    ("network", "network"),
    ("port", "ports"),
    ("label", "labels"),
    ("country", "country"),
    ("site", "site"),
    ("provider", "provider"),
    ("placement", "placement"),
];

/// Reads and checks the file. Errors name the file and line.
fn load(path: &Path) -> anyhow::Result<(FileDoc, Lines)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let lines = Lines::new(path, &text);
    if text.trim().is_empty() {
        return Ok((FileDoc::default(), lines));
    }
    let doc: FileDoc = serde_yaml::from_str(&text).map_err(|e| match e.location() {
        Some(l) => anyhow!("{}:{}: {}", path.display(), l.line(), strip_location(&e)),
        None => anyhow!("{}: {e}", path.display()),
    })?;
    Ok((doc, lines))
}

/// serde_yaml's message without its trailing "at line L column C".
fn strip_location(e: &serde_yaml::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Checks every entry on its own (the API's own rules) and names are unique.
fn check_entries(doc: &FileDoc, lines: &Lines, errs: &mut Vec<String>) {
    fn dupes<'a>(
        section: &str,
        names: impl Iterator<Item = &'a str>,
        lines: &Lines,
        errs: &mut Vec<String>,
    ) {
        let mut seen = HashSet::new();
        for (i, n) in names.enumerate() {
            if !seen.insert(n) {
                errs.push(format!(
                    "{}: {section}: {n:?} is declared twice",
                    lines.at(section, i, Some("name"))
                ));
            }
        }
    }
    dupes(
        "providers",
        doc.providers.iter().map(|p| p.name.as_str()),
        lines,
        errs,
    );
    dupes(
        "sites",
        doc.sites.iter().map(|s| s.name.as_str()),
        lines,
        errs,
    );
    dupes(
        "images",
        doc.images.iter().map(|s| s.name.as_str()),
        lines,
        errs,
    );
    dupes("vms", doc.vms.iter().map(|s| s.name.as_str()), lines, errs);
    dupes(
        "apps",
        doc.apps.iter().map(|s| s.name.as_str()),
        lines,
        errs,
    );
    for (i, ap) in doc.apps.iter().enumerate() {
        let at = |f| lines.at("apps", i, Some(f));
        if let Err(e) = validate::name("app", &ap.name) {
            errs.push(format!("{}: {e}", at("name")));
        }
        if ap.appliance.trim().is_empty() {
            errs.push(format!(
                "{}: app {}: name an appliance",
                at("appliance"),
                ap.name
            ));
        }
        if ap.locations.is_empty() {
            errs.push(format!(
                "{}: app {}: name at least one location (a site, provider or country)",
                at("locations"),
                ap.name
            ));
        } else if ap.locations.len() > MAX_APP_LOCATIONS {
            errs.push(format!(
                "{}: app {}: at most {MAX_APP_LOCATIONS} locations per app",
                at("locations"),
                ap.name
            ));
        }
        let mut seen = HashSet::new();
        for l in &ap.locations {
            if l.trim().is_empty() {
                errs.push(format!(
                    "{}: app {}: an empty location",
                    at("locations"),
                    ap.name
                ));
            } else if !seen.insert(l.trim().to_ascii_lowercase()) {
                errs.push(format!(
                    "{}: app {}: location {:?} is named twice",
                    at("locations"),
                    ap.name,
                    l.trim()
                ));
            }
        }
        if ap.replicas_per_location == 0 || ap.replicas_per_location > MAX_REPLICAS_PER_LOCATION {
            errs.push(format!(
                "{}: app {}: replicas_per_location {} is outside 1..{MAX_REPLICAS_PER_LOCATION}",
                at("replicas_per_location"),
                ap.name,
                ap.replicas_per_location
            ));
        }
        if let Err(e) = validate::labels(&ap.labels) {
            errs.push(format!("{}: app {}: {e}", at("labels"), ap.name));
        }
        if let Err(e) = validate::ssh_keys("ssh_authorized_keys", &ap.ssh_authorized_keys) {
            errs.push(format!(
                "{}: app {}: {e}",
                at("ssh_authorized_keys"),
                ap.name
            ));
        }
    }
    for (i, p) in doc.providers.iter().enumerate() {
        if let Err(e) = validate::provider(p) {
            let f = field_of(&e, PROVIDER_FIELDS);
            errs.push(format!(
                "{}: provider {}: {e}",
                lines.at("providers", i, f),
                p.name
            ));
        }
    }
    for (i, s) in doc.sites.iter().enumerate() {
        if let Err(e) = validate::site(s) {
            let f = field_of(&e, SITE_FIELDS);
            errs.push(format!("{}: site {}: {e}", lines.at("sites", i, f), s.name));
        }
    }
    for (i, v) in doc.vms.iter().enumerate() {
        if let Err(e) = validate::vm(v) {
            let f = field_of(&e, VM_FIELDS);
            errs.push(format!("{}: vm {}: {e}", lines.at("vms", i, f), v.name));
        }
    }
    for (i, im) in doc.images.iter().enumerate() {
        let at = |f| lines.at("images", i, Some(f));
        if let Err(e) = validate::name("image", &im.name) {
            errs.push(format!("{}: {e}", at("name")));
        }
        if !["x86_64", "aarch64", "riscv64"].contains(&im.arch.as_str()) {
            errs.push(format!(
                "{}: image {}: unknown arch {:?}: use x86_64, aarch64 or riscv64",
                at("arch"),
                im.name,
                im.arch
            ));
        }
        match (&im.file, &im.url) {
            (Some(_), Some(_)) | (None, None) => errs.push(format!(
                "{}: image {}: give exactly one of file and url",
                lines.at("images", i, None),
                im.name
            )),
            (None, Some(u)) if u.starts_with("https://") => errs.push(format!(
                "{}: image {}: https is not supported by this build (it has no TLS); use http:// or a local file",
                at("url"),
                im.name
            )),
            (None, Some(u)) if !u.starts_with("http://") => errs.push(format!(
                "{}: image {}: url must start with http://",
                at("url"),
                im.name
            )),
            _ => {}
        }
        if let Some(s) = &im.sha256 {
            if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                errs.push(format!(
                    "{}: image {}: sha256 must be 64 hex digits",
                    at("sha256"),
                    im.name
                ));
            }
        }
    }
}

fn sha256_of(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Downloaded files, removed when apply ends.
#[derive(Default)]
struct Downloads(Vec<PathBuf>);

impl Drop for Downloads {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

async fn download(
    c: &Client,
    url: &str,
    name: &str,
    dl: &mut Downloads,
) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    let path =
        std::env::temp_dir().join(format!("virt8ra-apply-{}-{name}.img", std::process::id()));
    dl.0.push(path.clone());
    let mut resp = c.fetch_external(url).await?;
    let mut f =
        std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
    while let Some(chunk) = resp
        .chunk()
        .await
        .with_context(|| format!("download {url}"))?
    {
        f.write_all(&chunk)
            .with_context(|| format!("write {}", path.display()))?;
    }
    f.sync_all()?;
    Ok(path)
}

/// Resolves image entries: local files are hashed; URLs without a declared
/// sha256 are downloaded to learn it.
async fn resolve_images(
    c: &Client,
    doc: &FileDoc,
    base: &Path,
    lines: &Lines,
    dl: &mut Downloads,
    errs: &mut Vec<String>,
) -> Vec<ImageDecl> {
    let mut out = Vec::new();
    for (i, im) in doc.images.iter().enumerate() {
        let (local, sha) = match (&im.file, &im.url) {
            (Some(f), None) => {
                let p = base.join(f);
                if !p.is_file() {
                    errs.push(format!(
                        "{}: image {}: {} is not a file",
                        lines.at("images", i, Some("file")),
                        im.name,
                        p.display()
                    ));
                    continue;
                }
                match sha256_of(&p) {
                    Ok(s) => (Some(p), s),
                    Err(e) => {
                        errs.push(format!(
                            "{}: image {}: {e:#}",
                            lines.at("images", i, Some("file")),
                            im.name
                        ));
                        continue;
                    }
                }
            }
            (None, Some(u)) => match &im.sha256 {
                Some(s) => (None, s.to_lowercase()),
                None => match download(c, u, &im.name, dl).await {
                    Ok(p) => match sha256_of(&p) {
                        Ok(s) => (Some(p), s),
                        Err(e) => {
                            errs.push(format!("{}: {e:#}", lines.at("images", i, Some("url"))));
                            continue;
                        }
                    },
                    Err(e) => {
                        errs.push(format!("{}: {e:#}", lines.at("images", i, Some("url"))));
                        continue;
                    }
                },
            },
            _ => continue, // reported by check_entries
        };
        if let Some(want) = &im.sha256 {
            if local.is_some() && !want.eq_ignore_ascii_case(&sha) {
                errs.push(format!(
                    "{}: image {}: the file's sha256 is {sha}, not the declared {want}",
                    lines.at("images", i, Some("sha256")),
                    im.name
                ));
                continue;
            }
        }
        out.push(ImageDecl {
            name: im.name.clone(),
            url: im.url.clone(),
            local,
            sha256: sha,
            arch: im.arch.clone(),
        });
    }
    out
}

/// Resolves each app's appliance through the API (it must exist) and its
/// parameters (checked and completed with the defaults, as the deploy does).
async fn resolve_apps(
    c: &Client,
    doc: &FileDoc,
    lines: &Lines,
    errs: &mut Vec<String>,
) -> anyhow::Result<Vec<AppDecl>> {
    let mut out = Vec::new();
    for (i, ap) in doc.apps.iter().enumerate() {
        let key = ap.appliance.trim();
        if key.is_empty() {
            continue; // reported by check_entries
        }
        let entry = c
            .get_opt::<CatalogEntry>(&format!("/appliances/{}", seg(key)))
            .await?;
        let Some(entry) = entry else {
            errs.push(format!(
                "{}: app {}: appliance {key:?} is not known to the control plane (`virt8ra appliance list` shows the appliances)",
                lines.at("apps", i, Some("appliance")),
                ap.name
            ));
            continue;
        };
        let params = match entry.appliance.resolve_params(&ap.params) {
            Ok(p) => p,
            Err(e) => {
                // The message names the parameter; point at its line when given.
                let line = ap
                    .params
                    .keys()
                    .filter_map(|k| e.find(k.as_str()).map(|at| (at, k)))
                    .min_by_key(|(at, _)| *at)
                    .map(|(_, k)| lines.at("apps", i, Some(k)))
                    .unwrap_or_else(|| lines.at("apps", i, Some("params")));
                errs.push(format!("{line}: app {}: {e}", ap.name));
                continue;
            }
        };
        out.push(AppDecl {
            req: ap.clone(),
            appliance: format!("{}/{}", entry.catalog, entry.appliance.key()),
            params,
            images: entry
                .appliance
                .images
                .iter()
                .map(|im| im.name.clone())
                .collect(),
        });
    }
    Ok(out)
}

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
    fn as_str(self) -> &'static str {
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
    action: Action,
    name: String,
    changes: Vec<Change>,
    decl: Option<K::Decl>,
    live: Option<K::Live>,
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

fn managed(labels: &BTreeMap<String, String>) -> bool {
    labels.get(MANAGED_KEY).map(String::as_str) == Some(MANAGED_VALUE)
}

/// Labels as the file sees them: without the marker.
fn user_labels(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut l = labels.clone();
    l.remove(MANAGED_KEY);
    l
}

/// The declared labels plus the marker (for creation).
fn with_marker(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut l = labels.clone();
    l.insert(MANAGED_KEY.into(), MANAGED_VALUE.into());
    l
}

/// The declared labels, keeping the marker when the live resource has it.
fn keep_marker(
    declared: &BTreeMap<String, String>,
    live: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    if managed(live) {
        with_marker(declared)
    } else {
        declared.clone()
    }
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
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

fn immutable(field: &str, list: &[&str]) -> bool {
    list.iter()
        .any(|f| field == *f || field.starts_with(&format!("{f}.")))
}

/// Plans one kind: what to create, update, replace, leave, and (with
/// `prune`) delete. Changes that cannot be made are added to `errs`.
fn plan_kind<K: Kind>(
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

fn rows<K: Kind>(steps: &[Step<K>]) -> Vec<PlanRow> {
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

/// Creates, updates and replaces of one kind, in file order.
/// How the plan is carried out.
struct Exec<'a> {
    c: &'a Client,
    /// How long a deleted VM may take to be gone.
    wait: Duration,
    /// Report each change on stderr as it is made (table output).
    progress: bool,
}

impl Exec<'_> {
    fn note(&self, action: Action, kind: &str, name: &str) {
        if self.progress {
            eprintln!("{} {kind} {name}", action.as_str());
        }
    }
}

async fn exec_forward<K: Kind>(x: &Exec<'_>, steps: &[Step<K>]) -> anyhow::Result<()> {
    let (c, wait) = (x.c, x.wait);
    for s in steps {
        let what = || format!("{} {}", K::KIND, s.name);
        if matches!(s.action, Action::Create | Action::Update | Action::Replace) {
            x.note(s.action, K::KIND, &s.name);
        }
        match (s.action, &s.decl, &s.live) {
            (Action::Create, Some(d), _) => K::create(c, d)
                .await
                .with_context(|| format!("create {}", what()))?,
            (Action::Update, Some(d), Some(l)) => K::update(c, d, l)
                .await
                .with_context(|| format!("update {}", what()))?,
            (Action::Replace, Some(d), Some(l)) => {
                K::delete(c, l, wait)
                    .await
                    .with_context(|| format!("replace {}", what()))?;
                K::create(c, d)
                    .await
                    .with_context(|| format!("replace {}", what()))?;
            }
            _ => {}
        }
    }
    Ok(())
}

async fn exec_delete<K: Kind>(x: &Exec<'_>, steps: &[Step<K>]) -> anyhow::Result<()> {
    for s in steps {
        if let (Action::Delete, Some(l)) = (s.action, &s.live) {
            x.note(s.action, K::KIND, &s.name);
            K::delete(x.c, l, x.wait)
                .await
                .with_context(|| format!("delete {} {}", K::KIND, s.name))?;
        }
    }
    Ok(())
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

// ---------------------------------------------------------------- the kinds

pub(crate) struct Providers;

impl Kind for Providers {
    const KIND: &'static str = "provider";
    const SECTION: &'static str = "providers";
    const IMMUTABLE: &'static [&'static str] = &[];
    const REPLACE: bool = false;
    type Decl = ProviderCreate;
    type Live = Provider;

    fn name(d: &ProviderCreate) -> &str {
        &d.name
    }
    fn live_name(l: &Provider) -> &str {
        &l.name
    }
    fn live_labels(l: &Provider) -> &BTreeMap<String, String> {
        &l.labels
    }
    fn view(d: &ProviderCreate) -> Value {
        json!({"country": d.country, "jurisdiction": d.jurisdiction, "labels": d.labels})
    }
    fn live_view(l: &Provider) -> Value {
        json!({"country": l.country, "jurisdiction": l.jurisdiction, "labels": user_labels(&l.labels)})
    }
    async fn list(c: &Client) -> anyhow::Result<Vec<Provider>> {
        Ok(c.get::<Page<Provider>>("/providers").await?.items)
    }
    async fn create(c: &Client, d: &ProviderCreate) -> anyhow::Result<()> {
        let mut d = d.clone();
        d.labels = with_marker(&d.labels);
        c.post::<Provider>("/providers", &d).await.map(drop)
    }
    async fn update(c: &Client, d: &ProviderCreate, l: &Provider) -> anyhow::Result<()> {
        let body = ProviderUpdate {
            country: Some(d.country.clone()),
            jurisdiction: Some(d.jurisdiction.clone()),
            labels: Some(keep_marker(&d.labels, &l.labels)),
        };
        c.request::<Provider>(
            Method::PATCH,
            &format!("/providers/{}", seg(&l.id)),
            Some(&body),
        )
        .await
        .map(drop)
    }
    async fn delete(c: &Client, l: &Provider, _: Duration) -> anyhow::Result<()> {
        c.delete(&format!("/providers/{}", seg(&l.id)))
            .await
            .map(drop)
    }
}

pub(crate) struct Sites;

impl Kind for Sites {
    const KIND: &'static str = "site";
    const SECTION: &'static str = "sites";
    const IMMUTABLE: &'static [&'static str] = &["provider", "country"];
    const REPLACE: bool = false;
    type Decl = SiteCreate;
    type Live = Site;

    fn name(d: &SiteCreate) -> &str {
        &d.name
    }
    fn live_name(l: &Site) -> &str {
        &l.name
    }
    fn live_labels(l: &Site) -> &BTreeMap<String, String> {
        &l.labels
    }
    fn view(d: &SiteCreate) -> Value {
        json!({"provider": d.provider, "country": d.country, "city": d.city,
               "latitude": d.latitude, "longitude": d.longitude, "tier": d.tier,
               "facts": d.facts, "labels": d.labels})
    }
    fn live_view(l: &Site) -> Value {
        json!({"provider": l.provider, "country": l.country, "city": l.city,
               "latitude": l.latitude, "longitude": l.longitude, "tier": l.tier,
               "facts": l.facts, "labels": user_labels(&l.labels)})
    }
    async fn list(c: &Client) -> anyhow::Result<Vec<Site>> {
        Ok(c.get::<Page<Site>>("/sites").await?.items)
    }
    async fn create(c: &Client, d: &SiteCreate) -> anyhow::Result<()> {
        let mut d = d.clone();
        d.labels = with_marker(&d.labels);
        c.post::<Site>("/sites", &d).await.map(drop)
    }
    async fn update(c: &Client, d: &SiteCreate, l: &Site) -> anyhow::Result<()> {
        let body = SiteUpdate {
            city: Some(d.city.clone()),
            latitude: Some(d.latitude),
            longitude: Some(d.longitude),
            tier: Some(d.tier),
            facts: Some(d.facts.clone()),
            labels: Some(keep_marker(&d.labels, &l.labels)),
        };
        c.request::<Site>(
            Method::PATCH,
            &format!("/sites/{}", seg(&l.id)),
            Some(&body),
        )
        .await
        .map(drop)
    }
    async fn delete(c: &Client, l: &Site, _: Duration) -> anyhow::Result<()> {
        c.delete(&format!("/sites/{}", seg(&l.id))).await.map(drop)
    }
}

pub(crate) struct Images;

impl Kind for Images {
    const KIND: &'static str = "image";
    const SECTION: &'static str = "images";
    const IMMUTABLE: &'static [&'static str] = &["sha256", "arch"];
    const REPLACE: bool = true;
    type Decl = ImageDecl;
    type Live = Image;

    fn name(d: &ImageDecl) -> &str {
        &d.name
    }
    fn live_name(l: &Image) -> &str {
        &l.name
    }
    fn live_labels(l: &Image) -> &BTreeMap<String, String> {
        &l.labels
    }
    fn view(d: &ImageDecl) -> Value {
        json!({"sha256": d.sha256, "arch": d.arch})
    }
    fn live_view(l: &Image) -> Value {
        // The file's sha256 is that of the file as imported; the stored copy
        // differs when the import converted it.
        json!({"sha256": l.source_sha256.as_ref().unwrap_or(&l.sha256), "arch": l.arch})
    }
    async fn list(c: &Client) -> anyhow::Result<Vec<Image>> {
        Ok(c.get::<Page<Image>>("/images").await?.items)
    }
    async fn create(c: &Client, d: &ImageDecl) -> anyhow::Result<()> {
        let Some(local) = &d.local else {
            bail!(
                "image {} from {} was not downloaded",
                d.name,
                d.url.as_deref().unwrap_or("-")
            );
        };
        let path = format!(
            "/images?name={}&arch={}&labels={}",
            seg(&d.name),
            seg(&d.arch),
            seg(&format!("{MANAGED_KEY}={MANAGED_VALUE}"))
        );
        c.upload::<Image>(&path, local).await.map(drop)
    }
    async fn update(_: &Client, d: &ImageDecl, _: &Image) -> anyhow::Result<()> {
        bail!("image {} has nothing that changes in place", d.name)
    }
    async fn delete(c: &Client, l: &Image, _: Duration) -> anyhow::Result<()> {
        c.delete(&format!("/images/{}", seg(&l.id))).await.map(drop)
    }
}

pub(crate) struct Vms;

impl Kind for Vms {
    const KIND: &'static str = "vm";
    const SECTION: &'static str = "vms";
    const IMMUTABLE: &'static [&'static str] = &[
        "vcpus",
        "memory_mib",
        "disk_gib",
        "image",
        "placement",
        "user_data",
        "ssh_authorized_keys",
        "network",
        "ports",
        "labels",
        "data_disks",
    ];
    const REPLACE: bool = false;
    const REPLACE_ON_REQUEST: bool = true;
    type Decl = VmCreate;
    type Live = Vm;

    fn name(d: &VmCreate) -> &str {
        &d.name
    }
    fn live_name(l: &Vm) -> &str {
        &l.name
    }
    fn live_labels(l: &Vm) -> &BTreeMap<String, String> {
        &l.labels
    }
    fn view(d: &VmCreate) -> Value {
        json!({"vcpus": d.vcpus, "memory_mib": d.memory_mib, "disk_gib": d.disk_gib,
               "image": d.image, "placement": d.placement, "user_data": d.user_data,
               "ssh_authorized_keys": d.ssh_authorized_keys, "network": d.network,
               "ports": d.ports, "data_disks": d.data_disks, "labels": d.labels,
               "start": d.start})
    }
    fn live_view(l: &Vm) -> Value {
        let s = &l.spec;
        json!({"vcpus": s.vcpus, "memory_mib": s.memory_mib, "disk_gib": s.disk_gib,
               "image": s.image, "placement": s.placement, "user_data": s.user_data,
               "ssh_authorized_keys": s.ssh_authorized_keys, "network": s.network,
               "ports": s.ports, "data_disks": s.data_disks, "labels": user_labels(&l.labels),
               "start": l.power == PowerState::Running})
    }
    async fn list(c: &Client) -> anyhow::Result<Vec<Vm>> {
        let mut items: Vec<Vm> = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(cur) => format!("/vms?cursor={}", seg(cur)),
                None => "/vms".into(),
            };
            let page: Page<Vm> = c.get(&path).await?;
            items.extend(page.items);
            match page.next_cursor {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        // A VM being deleted is on its way out: declaring its name again
        // has to wait until it is gone.
        Ok(items)
    }
    async fn create(c: &Client, d: &VmCreate) -> anyhow::Result<()> {
        let mut d = d.clone();
        d.labels = with_marker(&d.labels);
        c.post::<Vm>("/vms", &d).await.map(drop)
    }
    async fn update(c: &Client, d: &VmCreate, l: &Vm) -> anyhow::Result<()> {
        // Only the power state changes in place.
        let action = if d.start {
            VmAction::Start
        } else {
            VmAction::Stop
        };
        c.post::<Vm>(
            &format!("/vms/{}/actions", seg(&l.id)),
            &VmActionRequest {
                action,
                timeout_s: None,
            },
        )
        .await
        .map(drop)
    }
    async fn delete(c: &Client, l: &Vm, wait: Duration) -> anyhow::Result<()> {
        c.delete(&format!("/vms/{}", seg(&l.id))).await?;
        // What the VM used (its image, its site) can go only once it is gone.
        let start = Instant::now();
        loop {
            let v: Vm = c.get(&format!("/vms/{}", seg(&l.id))).await?;
            if v.status.phase == VmPhase::Deleted {
                return Ok(());
            }
            if start.elapsed() > wait {
                bail!(
                    "VM {} is still {} after {} s",
                    l.name,
                    v.status.phase.as_str(),
                    wait.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

pub(crate) struct Apps;

/// An app's locations as given, trimmed and sorted (their order does not
/// matter to a deployment).
fn location_set<'a>(locs: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut v: Vec<String> = locs.map(|l| l.trim().to_string()).collect();
    v.sort();
    v
}

impl Kind for Apps {
    const KIND: &'static str = "app";
    const SECTION: &'static str = "apps";
    const IMMUTABLE: &'static [&'static str] = &[
        "appliance",
        "locations",
        "replicas_per_location",
        "params",
        "ssh_authorized_keys",
        "labels",
    ];
    const REPLACE: bool = false;
    const REPLACE_ON_REQUEST: bool = true;
    type Decl = AppDecl;
    type Live = App;

    fn name(d: &AppDecl) -> &str {
        &d.req.name
    }
    fn live_name(l: &App) -> &str {
        &l.name
    }
    fn live_labels(l: &App) -> &BTreeMap<String, String> {
        &l.labels
    }
    fn view(d: &AppDecl) -> Value {
        json!({"appliance": d.appliance,
               "locations": location_set(d.req.locations.iter().map(String::as_str)),
               "replicas_per_location": d.req.replicas_per_location,
               "params": d.params, "ssh_authorized_keys": d.req.ssh_authorized_keys,
               "labels": d.req.labels})
    }
    fn live_view(l: &App) -> Value {
        // Every location of a deployment has the same number of replicas.
        let replicas: Vec<u32> = l.locations.iter().map(|x| x.replicas).collect();
        let replicas = match replicas.as_slice() {
            [first, rest @ ..] if rest.iter().all(|r| r == first) => json!(first),
            _ => json!(replicas),
        };
        json!({"appliance": l.appliance,
               "locations": location_set(l.locations.iter().map(|x| x.location.as_str())),
               "replicas_per_location": replicas,
               "params": l.params, "ssh_authorized_keys": l.ssh_authorized_keys,
               "labels": user_labels(&l.labels)})
    }
    async fn list(c: &Client) -> anyhow::Result<Vec<App>> {
        c.get::<Vec<App>>("/apps").await
    }
    async fn create(c: &Client, d: &AppDecl) -> anyhow::Result<()> {
        // The appliance as planned (a version published meanwhile is not
        // picked up half-way).
        let mut req = d.req.clone();
        req.appliance = d.appliance.clone();
        req.locations = req.locations.iter().map(|l| l.trim().to_string()).collect();
        req.labels = with_marker(&req.labels);
        c.post::<App>("/apps", &req).await.map(drop)
    }
    async fn update(_: &Client, d: &AppDecl, _: &App) -> anyhow::Result<()> {
        bail!("app {} has nothing that changes in place", d.req.name)
    }
    async fn delete(c: &Client, l: &App, wait: Duration) -> anyhow::Result<()> {
        c.delete(&format!("/apps/{}", seg(&l.id))).await?;
        // The app is gone (and its name free) once every replica is.
        let start = Instant::now();
        loop {
            let Some(a) = c.get_opt::<App>(&format!("/apps/{}", seg(&l.id))).await? else {
                return Ok(());
            };
            if start.elapsed() > wait {
                bail!(
                    "app {} is still {} after {} s",
                    l.name,
                    a.status,
                    wait.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
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
    providers: Vec<Step<Providers>>,
    sites: Vec<Step<Sites>>,
    images: Vec<Step<Images>>,
    vms: Vec<Step<Vms>>,
    apps: Vec<Step<Apps>>,
}

impl Plan {
    fn rows(&self) -> Vec<PlanRow> {
        let mut r = rows(&self.providers);
        r.extend(rows(&self.sites));
        r.extend(rows(&self.images));
        r.extend(rows(&self.vms));
        r.extend(rows(&self.apps));
        r
    }

    /// Creates and updates in dependency order, then deletions in reverse.
    async fn execute(&self, x: &Exec<'_>) -> anyhow::Result<()> {
        exec_forward(x, &self.providers).await?;
        exec_forward(x, &self.sites).await?;
        exec_forward(x, &self.images).await?;
        exec_forward(x, &self.vms).await?;
        exec_forward(x, &self.apps).await?;
        exec_delete(x, &self.apps).await?;
        exec_delete(x, &self.vms).await?;
        exec_delete(x, &self.images).await?;
        exec_delete(x, &self.sites).await?;
        exec_delete(x, &self.providers).await
    }
}

/// What `apply` prints (`-o json`).
#[derive(Debug, Serialize)]
pub struct ApplyReport {
    /// Whether the plan changes anything.
    pub changed: bool,
    pub dry_run: bool,
    /// Whether the changes were made (false on a dry run or when nothing changes).
    pub applied: bool,
    pub summary: BTreeMap<&'static str, usize>,
    pub plan: Vec<PlanRow>,
}

/// Checks that every name a resource refers to exists or is declared (and
/// is not about to be pruned), and that nothing pruned is still in use.
fn check_references(
    doc: &FileDoc,
    apps: &[AppDecl],
    live: &LiveState,
    plan: &Plan,
    lines: &Lines,
    errs: &mut Vec<String>,
) {
    let deleted = |rows: Vec<PlanRow>| -> HashSet<String> {
        rows.into_iter()
            .filter(|r| r.action == Action::Delete)
            .map(|r| r.name)
            .collect()
    };
    let gone_providers = deleted(rows(&plan.providers));
    let gone_sites = deleted(rows(&plan.sites));
    let gone_images = deleted(rows(&plan.images));
    let mut gone_vms = deleted(rows(&plan.vms));
    // The replicas of a pruned app go with it.
    for s in &plan.apps {
        if let (Action::Delete, Some(l)) = (s.action, &s.live) {
            gone_vms.extend(l.vms.iter().map(|v| v.name.clone()));
        }
    }
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

struct LiveState {
    providers: Vec<Provider>,
    sites: Vec<Site>,
    images: Vec<Image>,
    vms: Vec<Vm>,
    hosts: Vec<virt8ra_api::Host>,
}

/// Apps not on their way out (compared and pruned); declaring the name of
/// one being deleted is an error until it is gone.
fn settled_apps(doc: &FileDoc, live: &[App], lines: &Lines, errs: &mut Vec<String>) -> Vec<App> {
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
/// placement: nothing is created).
async fn check_vm_rules(
    c: &Client,
    doc: &FileDoc,
    lines: &Lines,
    errs: &mut Vec<String>,
) -> anyhow::Result<()> {
    for (i, v) in doc.vms.iter().enumerate() {
        if validate::vm(v).is_err() {
            continue; // already reported
        }
        if let Err(e) = c.post::<PlacementPlan>("/vms/plan", v).await {
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
fn at_least_images(vms: &[VmCreate], images: &[Image]) -> Vec<VmCreate> {
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

/// Runs `virt8ra apply`.
pub async fn run(c: &Client, o: Format, a: ApplyArgs) -> anyhow::Result<()> {
    let (doc, lines) = load(&a.file)?;
    let mut errs = Vec::new();
    check_entries(&doc, &lines, &mut errs);
    let base = a
        .file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut downloads = Downloads::default();
    let images = resolve_images(c, &doc, &base, &lines, &mut downloads, &mut errs).await;
    fail_on(&errs)?;

    let live = LiveState {
        providers: Providers::list(c).await?,
        sites: Sites::list(c).await?,
        images: Images::list(c).await?,
        vms: Vms::list(c).await?,
        hosts: c.get::<Page<virt8ra_api::Host>>("/hosts").await?.items,
    };
    let live_apps = Apps::list(c).await?;
    check_vm_rules(c, &doc, &lines, &mut errs).await?;
    let apps = resolve_apps(c, &doc, &lines, &mut errs).await?;
    let settled_apps = settled_apps(&doc, &live_apps, &lines, &mut errs);
    // A VM on its way out is neither compared nor deleted again; declaring
    // its name has to wait until it is gone.
    let settled_vms: Vec<Vm> = live
        .vms
        .iter()
        .filter(|v| v.status.phase != VmPhase::Deleting)
        .cloned()
        .collect();
    for (i, v) in doc.vms.iter().enumerate() {
        if live
            .vms
            .iter()
            .any(|l| l.name == v.name && l.status.phase == VmPhase::Deleting)
        {
            errs.push(format!(
                "{}: vm {}: a VM of this name is being deleted; apply again once it is gone",
                lines.at("vms", i, Some("name")),
                v.name
            ));
        }
    }
    let plan = Plan {
        providers: plan_kind::<Providers>(&doc.providers, &live.providers, &a, &lines, &mut errs),
        sites: plan_kind::<Sites>(&doc.sites, &live.sites, &a, &lines, &mut errs),
        images: plan_kind::<Images>(&images, &live.images, &a, &lines, &mut errs),
        vms: plan_kind::<Vms>(
            &at_least_images(&doc.vms, &live.images),
            &settled_vms,
            &a,
            &lines,
            &mut errs,
        ),
        apps: plan_kind::<Apps>(&apps, &settled_apps, &a, &lines, &mut errs),
    };
    check_references(&doc, &apps, &live, &plan, &lines, &mut errs);
    fail_on(&errs)?;

    let mut plan = plan;
    // Images still to be downloaded (a URL with a declared sha256) are
    // fetched and checked before the first change.
    if !a.dry_run {
        for s in plan.images.iter_mut() {
            let Some(d) = s.decl.as_mut() else { continue };
            if !matches!(s.action, Action::Create | Action::Replace) || d.local.is_some() {
                continue;
            }
            let Some(url) = d.url.clone() else { continue };
            let p = download(c, &url, &d.name, &mut downloads).await?;
            let sha = sha256_of(&p)?;
            if sha != d.sha256 {
                bail!(
                    "image {}: {url} has sha256 {sha}, not the declared {}; nothing was changed",
                    d.name,
                    d.sha256
                );
            }
            d.local = Some(p);
        }
    }

    let rows = plan.rows();
    let mut summary: BTreeMap<&'static str, usize> = BTreeMap::new();
    for r in &rows {
        *summary.entry(r.action.as_str()).or_default() += 1;
    }
    let changed = rows.iter().any(|r| r.action != Action::Unchanged);
    if changed && !a.dry_run {
        let x = Exec {
            c,
            wait: Duration::from_secs(a.wait_timeout),
            progress: o == Format::Table,
        };
        plan.execute(&x)
            .await
            .context("apply stopped; changes before this one were made (apply again to go on)")?;
    }
    let report = ApplyReport {
        changed,
        dry_run: a.dry_run,
        applied: changed && !a.dry_run,
        summary,
        plan: rows,
    };
    emit(o, &report, print_report)
}

fn fail_on(errs: &[String]) -> anyhow::Result<()> {
    match errs {
        [] => Ok(()),
        [one] => bail!("{one}; nothing was changed"),
        [first, rest @ ..] => bail!(
            "{first} (and {} more error(s)); nothing was changed",
            rest.len()
        ),
    }
}

fn print_report(r: &ApplyReport) {
    if !r.plan.is_empty() {
        table(
            &["kind", "name", "action", "changes"],
            r.plan
                .iter()
                .map(|p| {
                    vec![
                        p.kind.to_string(),
                        p.name.clone(),
                        p.action.as_str().to_string(),
                        p.changes
                            .iter()
                            .map(|c| format!("{}: {} -> {}", c.field, show(&c.from), show(&c.to)))
                            .collect::<Vec<_>>()
                            .join(", "),
                    ]
                })
                .collect(),
        );
    }
    if !r.changed {
        println!("no changes");
        return;
    }
    let counts = ["create", "update", "replace", "delete"]
        .iter()
        .map(|k| format!("{} {k}", r.summary.get(k).copied().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(", ");
    if r.dry_run {
        println!("plan: {counts} (dry run: nothing was changed)");
    } else {
        println!("applied: {counts}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_disks_are_compared_at_least_as_large_as_their_images() {
        let img = |name: &str, gib: u64| -> Image {
            serde_json::from_value(json!({
                "id": format!("id-{name}"), "name": name, "sha256": "0".repeat(64),
                "format": "qcow2", "source_format": "qcow2", "size_bytes": 1,
                "virtual_size_bytes": (gib << 30) - 5, "arch": "x86_64",
                "created_at": "2026-01-01T00:00:00Z",
            }))
            .expect("image")
        };
        let vm: VmCreate = serde_json::from_value(json!({
            "name": "v", "image": "debian", "disk_gib": 1,
            "data_disks": [{"image": "id-big"}, {"image": "small"}, {"size_gib": 3}],
        }))
        .expect("vm");
        let images = [img("debian", 2), img("big", 5), img("small", 1)];
        let got = at_least_images(std::slice::from_ref(&vm), &images);
        assert_eq!(got[0].disk_gib, 2);
        let sizes: Vec<Option<u64>> = got[0].data_disks.iter().map(|d| d.size_gib).collect();
        assert_eq!(sizes, vec![Some(5), None, Some(3)]);
        // An image not stored yet: as declared.
        let same = at_least_images(std::slice::from_ref(&vm), &[]);
        assert_eq!(same[0].disk_gib, 1);
        assert_eq!(same[0].data_disks, vm.data_disks);
    }

    #[test]
    fn diff_reports_only_changed_fields() {
        let a = json!({"city": "A", "facts": {"pue": 1.2}, "labels": {}, "ports": []});
        let b = json!({"city": "A", "facts": {"pue": 1.4}, "ports": null});
        let d = diff(&a, &b);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].field, "facts.pue");
    }

    #[test]
    fn messages_map_to_their_field() {
        let f = |m| field_of(m, VM_FIELDS);
        assert_eq!(
            f("placement: unknown user location \"X\": name a city"),
            Some("placement")
        );
        assert_eq!(f("invalid vm name \"A\""), Some("name"));
        assert_eq!(f("unknown country code \"XX\""), Some("country"));
        assert_eq!(
            f("memory_mib 1 is outside 16..16777216"),
            Some("memory_mib")
        );
        assert_eq!(f("port 0 cannot be forwarded"), Some("ports"));
    }

    #[test]
    fn bad_keys_and_networks_name_their_line() {
        let dir = std::env::temp_dir().join(format!("virt8ra-apply-ctx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("ctx.yaml");
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOiakisE7iP/Y3q4YCqhXcGDKYvynw8ekG2NX341waDN a@b";
        std::fs::write(
            &f,
            format!(
                "vms:\n  - name: good\n    image: i\n    ssh_authorized_keys: [\"{key}\"]\n    network:\n      ethernets:\n        - {{addresses: [10.0.2.15/24], gateway4: 10.0.2.2}}\n\
                 \x20 - name: badkey\n    image: i\n    ssh_authorized_keys:\n      - ssh-ed25519 AAAA\n\
                 \x20 - name: badnet\n    image: i\n    network:\n      ethernets:\n        - addresses: [10.0.2.300/24]\n\
                 apps:\n  - name: shop\n    appliance: web\n    locations: [es]\n    ssh_authorized_keys: [\"not a key\"]\n"
            ),
        )
        .expect("write");
        let (doc, lines) = load(&f).expect("parses");
        let mut errs = Vec::new();
        check_entries(&doc, &lines, &mut errs);
        assert_eq!(errs.len(), 3, "{errs:#?}");
        let file = f.display().to_string();
        assert!(
            errs[0].starts_with(&format!("{file}:21: app shop: ssh_authorized_keys[0]: ")),
            "{errs:#?}"
        );
        assert!(
            errs[1].starts_with(&format!("{file}:10: vm badkey: ssh_authorized_keys[0]: ")),
            "{errs:#?}"
        );
        assert!(
            errs[2].starts_with(&format!(
                "{file}:14: vm badnet: network.ethernets[0].addresses[0]: \"10.0.2.300/24\" is not an address"
            )),
            "{errs:#?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn lines_locate_entries_and_fields() {
        let text = "providers:\n  - name: a\n    country: DE\n  - name: b\n    country: XX\nvms:\n- name: v\n  image: i\n";
        let l = Lines::new(Path::new("f.yaml"), text);
        assert_eq!(l.at("providers", 1, Some("country")), "f.yaml:5");
        assert_eq!(l.at("providers", 0, None), "f.yaml:2");
        assert_eq!(l.at("vms", 0, Some("image")), "f.yaml:8");
        assert_eq!(l.section("vms"), "f.yaml:6");
    }

    #[test]
    fn unknown_fields_name_their_line() {
        let dir = std::env::temp_dir().join(format!("virt8ra-apply-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("x.yaml");
        std::fs::write(
            &f,
            "providers:\n  - name: a\n    country: DE\n    contry: DE\n",
        )
        .expect("write");
        let e = load(&f).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("x.yaml:4:"), "{e}");
        assert!(e.contains("unknown field `contry`"), "{e}");
        std::fs::write(&f, "providers:\n# none yet\nvms:\n").expect("write");
        assert!(load(&f).is_ok(), "empty lists are allowed");
        std::fs::write(&f, "vms:\n  - name: a\n    image: i\n    vcpus: many\n").expect("write");
        let e = load(&f).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("x.yaml:4:"), "{e}");
        std::fs::write(
            &f,
            "apps:\n  - name: a\n    appliance: web\n    locations: [DE]\n    replica: 2\n",
        )
        .expect("write");
        let e = load(&f).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("x.yaml:5:"), "{e}");
        assert!(e.contains("unknown field `replica`"), "{e}");
        std::fs::write(&f, "apps:\n  - name: a\n    locations: [DE]\n").expect("write");
        let e = load(&f).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("missing field `appliance`"), "{e}");
        std::fs::write(
            &f,
            "apps:\n  - name: a\n    appliance: web\n    locations: [DE, ES]\n",
        )
        .expect("write");
        let (doc, _) = load(&f).expect("an app entry");
        assert_eq!(doc.apps[0].replicas_per_location, 1);
        assert_eq!(doc.apps[0].locations, ["DE", "ES"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
