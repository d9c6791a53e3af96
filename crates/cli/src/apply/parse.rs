//! Reading the file: the YAML into typed entries, each entry and field
//! mapped to its line, every entry checked on its own, images and apps
//! resolved.

use super::*;

// ------------------------------------------------------------------ the file

/// The file: one list per kind. Each entry has the fields of the API's
/// create request (`virt8ra openapi` documents them), except images.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileDoc {
    #[serde(default, deserialize_with = "list")]
    pub(super) providers: Vec<ProviderCreate>,
    #[serde(default, deserialize_with = "list")]
    pub(super) sites: Vec<SiteCreate>,
    #[serde(default, deserialize_with = "list")]
    pub(super) images: Vec<ImageEntry>,
    /// Virtual networks: the network create request's fields.
    #[serde(default, deserialize_with = "list")]
    pub(super) networks: Vec<NetworkCreate>,
    #[serde(default, deserialize_with = "list")]
    pub(super) vms: Vec<VmCreate>,
    /// App deployments: the deploy request's fields.
    #[serde(default, deserialize_with = "list")]
    pub(super) apps: Vec<AppCreate>,
}

/// A list, or nothing (`vms:` with every entry commented out).
pub(super) fn list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
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
pub(super) struct ImageEntry {
    pub(super) name: String,
    #[serde(default)]
    pub(super) file: Option<String>,
    #[serde(default)]
    pub(super) url: Option<String>,
    /// Expected sha256 of the file (checked; for a URL it saves a download
    /// when the image is already imported).
    #[serde(default)]
    pub(super) sha256: Option<String>,
    #[serde(default = "default_arch")]
    pub(super) arch: String,
}

pub(super) fn default_arch() -> String {
    "x86_64".into()
}

/// An image entry resolved: its local copy (when there is one yet) and sha256.
#[derive(Debug, Clone)]
pub(crate) struct ImageDecl {
    pub(super) name: String,
    pub(super) url: Option<String>,
    pub(super) local: Option<PathBuf>,
    pub(super) sha256: String,
    pub(super) arch: String,
}

/// Limits of an app deployment (the server's own, checked before any change).
pub(super) const MAX_APP_LOCATIONS: usize = 32;
pub(super) const MAX_REPLICAS_PER_LOCATION: u32 = 16;

/// An app entry with its appliance resolved through the API.
#[derive(Debug, Clone)]
pub(crate) struct AppDecl {
    /// As declared.
    pub(super) req: AppCreate,
    /// `CATALOG/NAME@VERSION`.
    pub(super) appliance: String,
    /// Every parameter of the appliance, defaults filled in.
    pub(super) params: BTreeMap<String, Value>,
    /// Names of the images the appliance boots from.
    pub(super) images: Vec<String>,
}

/// The field a validation message is about: the one of `fields` it names
/// first (messages start with the field or name it early).
pub(super) fn field_of<'a>(msg: &str, fields: &[(&str, &'a str)]) -> Option<&'a str> {
    fields
        .iter()
        .filter_map(|(needle, f)| msg.find(needle).map(|at| (at, *f)))
        .min_by_key(|(at, _)| *at)
        .map(|(_, f)| f)
}

pub(super) const PROVIDER_FIELDS: &[(&str, &str)] = &[
    ("name", "name"),
    ("country", "country"),
    ("jurisdiction", "jurisdiction"),
    ("label", "labels"),
];
pub(super) const SITE_FIELDS: &[(&str, &str)] = &[
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
pub(super) const VM_FIELDS: &[(&str, &str)] = &[
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
    ("nics", "nics"),
    ("publish", "publish"),
    ("ingress", "ingress"),
];

/// Reads and checks the file. Errors name the file and line.
pub(super) fn load(path: &Path) -> anyhow::Result<(FileDoc, Lines)> {
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
pub(super) fn strip_location(e: &serde_yaml::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Checks every entry on its own (the API's own rules) and names are unique.
pub(super) fn check_entries(doc: &FileDoc, lines: &Lines, errs: &mut Vec<String>) {
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
    dupes(
        "networks",
        doc.networks.iter().map(|s| s.name.as_str()),
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
    check_apps(doc, lines, errs);
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
    check_images(doc, lines, errs);
    check_networks(doc, lines, errs);
}

/// Checks what of each network entry needs no control plane: its name and
/// subnet (the control plane checks the rest before anything changes).
fn check_networks(doc: &FileDoc, lines: &Lines, errs: &mut Vec<String>) {
    for (i, n) in doc.networks.iter().enumerate() {
        if let Err(e) = validate::name("network", &n.name) {
            errs.push(format!("{}: {e}", lines.at("networks", i, Some("name"))));
        }
        if let Err(e) = n.cidr.trim().parse::<virt8ra_api::Ipv4Cidr>() {
            errs.push(format!(
                "{}: network {}: cidr: {e}",
                lines.at("networks", i, Some("cidr")),
                n.name
            ));
        }
    }
}

/// Checks each app entry: its name, appliance, locations, replicas,
/// labels and keys.
fn check_apps(doc: &FileDoc, lines: &Lines, errs: &mut Vec<String>) {
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
}

/// Checks each image entry: its name, architecture, source and sha256.
fn check_images(doc: &FileDoc, lines: &Lines, errs: &mut Vec<String>) {
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

pub(super) fn sha256_of(path: &Path) -> anyhow::Result<String> {
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
pub(super) struct Downloads(Vec<PathBuf>);

impl Drop for Downloads {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub(super) async fn download(
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
pub(super) async fn resolve_images(
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
pub(super) async fn resolve_apps(
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
