//! Marketplace and multi-location deployment: appliances, catalogs and apps.
//!
//! An appliance is a versioned bundle: disk image(s) named by content
//! address, a VM template, typed parameters and a description. A catalog is a
//! signed list of appliances ([`SignedCatalog`]): its `payload` is the JSON
//! text of a [`CatalogIndex`], and `signature` is an ed25519 signature of
//! exactly those bytes, so no canonical form of JSON is needed to verify it.
//! An app is one appliance deployed at several locations as one unit.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{PortForward, VmPhase};

/// A disk image an appliance needs, named by its content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApplianceImage {
    /// Name of the image in the image store that publishes it (publish), or
    /// the name it gets when imported (deploy from another catalog).
    pub name: String,
    /// sha256 of the qcow2 file, lowercase hex (filled in on publish).
    #[serde(default)]
    pub sha256: String,
    #[serde(default)]
    pub size_bytes: u64,
    #[serde(default = "default_arch")]
    pub arch: String,
    /// Where the image can be downloaded, relative to the catalog's URL
    /// (filled in by the catalog that serves it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

fn default_arch() -> String {
    "x86_64".into()
}

/// The VM every replica of an appliance becomes. `user_data` may name
/// parameters as `{{name}}`; the parameters `vcpus` and `memory_mib`, when
/// declared, set those fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmTemplate {
    #[serde(default = "one")]
    pub vcpus: u32,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    #[serde(default = "one_u64")]
    pub disk_gib: u64,
    /// Guest TCP ports the agent forwards to the host.
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
}

fn one() -> u32 {
    1
}
fn one_u64() -> u64 {
    1
}
fn default_memory() -> u64 {
    128
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ParamType {
    String,
    Integer,
    Boolean,
}

/// A typed parameter of an appliance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApplianceParam {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ParamType,
    #[serde(default)]
    pub description: String,
    /// Used when the deployment does not set it; without a default the
    /// parameter is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<serde_json::Value>,
    /// Integers: smallest allowed value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<i64>,
    /// Integers: largest allowed value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<i64>,
    /// Strings: longest allowed value (default 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_len: Option<usize>,
    /// Strings: the only values allowed, when given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed: Vec<String>,
}

/// An appliance: a versioned bundle of images, a VM template and parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Appliance {
    pub name: String,
    /// Version, e.g. `1.0.0`.
    pub version: String,
    #[serde(default)]
    pub description: String,
    /// The boot disk first; any others become the VM's data disks, in order.
    pub images: Vec<ApplianceImage>,
    pub template: VmTemplate,
    #[serde(default)]
    pub parameters: Vec<ApplianceParam>,
}

/// What a catalog signs: its appliances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CatalogIndex {
    /// Name of the catalog's publisher (the control plane's name).
    pub publisher: String,
    pub generated_at: DateTime<Utc>,
    pub appliances: Vec<Appliance>,
}

/// A catalog as served: the index's JSON text and its signature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SignedCatalog {
    /// The JSON text of a [`CatalogIndex`]; the signature covers exactly these bytes.
    pub payload: String,
    /// ed25519 signature of `payload`, hex.
    pub signature: String,
    /// The signer's public key, hex (informational: trust comes from the key
    /// the operator configured, never from this field).
    pub public_key: String,
}

/// A catalog of another provider (a control plane or a static index) that
/// this control plane trusts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Catalog {
    pub name: String,
    /// URL of the signed index (`.../api/v1/catalog` of another control
    /// plane, or a static file).
    pub url: String,
    /// The ed25519 public key (hex) the operator trusts for it.
    pub public_key: String,
    /// The appliances of the last verified fetch.
    pub appliances: Vec<Appliance>,
    pub fetched_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CatalogCreate {
    pub name: String,
    pub url: String,
    /// ed25519 public key, 64 hex digits.
    pub public_key: String,
}

/// An appliance as listed: where it comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CatalogEntry {
    /// `local` for this control plane's own catalog, else the catalog's name.
    pub catalog: String,
    pub appliance: Appliance,
}

// --------------------------------------------------------------------- apps

/// Deploy one appliance at several locations.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AppCreate {
    pub name: String,
    /// `NAME`, `NAME@VERSION`, `CATALOG/NAME` or `CATALOG/NAME@VERSION`;
    /// the newest version when none is given.
    pub appliance: String,
    /// Each a site, a provider or an ISO country code (in that order of lookup).
    pub locations: Vec<String>,
    #[serde(default = "one")]
    pub replicas_per_location: u32,
    /// Parameter values; strings are converted to the parameter's type.
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
    /// Labels of the app itself (not of its VMs); `virt8ra apply` marks the
    /// apps it creates with `virt8ra.io/managed-by: apply`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// OpenSSH public keys every replica accepts (as `VmCreate`'s).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LocationKind {
    Site,
    Provider,
    Country,
}

/// One location of an app and how it is doing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AppLocation {
    /// As given.
    pub location: String,
    pub kind: LocationKind,
    pub replicas: u32,
    /// Replicas in phase `running`.
    #[serde(default)]
    pub running: u32,
    /// `running` when all replicas run, `failed` if one failed, else `deploying`
    /// (or `deleting`).
    #[serde(default)]
    pub status: String,
}

/// One replica of an app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AppVm {
    pub id: String,
    pub name: String,
    pub location: String,
    pub phase: VmPhase,
    pub site: Option<String>,
    pub provider: Option<String>,
    pub country: Option<String>,
    pub host: Option<String>,
    #[serde(default)]
    pub ports: Vec<PortForward>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A deployment of an appliance at several locations, managed as one unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct App {
    pub id: String,
    pub name: String,
    /// `CATALOG/NAME@VERSION` as resolved.
    pub appliance: String,
    /// Image ids in this control plane's store.
    pub images: Vec<String>,
    pub params: BTreeMap<String, serde_json::Value>,
    pub locations: Vec<AppLocation>,
    pub vms: Vec<AppVm>,
    /// `running`, `deploying`, `failed` or `deleting`.
    pub status: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The SSH keys given to every replica.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// The project that owns the app (and its VMs).
    #[serde(default = "crate::tenancy::default_project")]
    pub project: String,
    pub created_at: DateTime<Utc>,
}

/// Start pre-staging an image at sites.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageReplicate {
    /// Site names.
    pub sites: Vec<String>,
}

/// Import an image from an http(s) URL.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageImportUrl {
    pub name: String,
    pub url: String,
    /// Refuse the download unless its sha256 is this (lowercase hex).
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub arch: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
}

// ---------------------------------------------------------------- validation

/// Longest string parameter value unless the parameter says otherwise.
pub const DEFAULT_MAX_LEN: usize = 256;

fn param_value(p: &ApplianceParam, v: &serde_json::Value) -> Result<serde_json::Value, String> {
    use serde_json::Value;
    let bad = |why: &str| format!("parameter {}: {why}", p.name);
    match p.kind {
        ParamType::Integer => {
            let n = match v {
                Value::Number(n) => n.as_i64(),
                Value::String(s) => s.trim().parse::<i64>().ok(),
                _ => None,
            }
            .ok_or_else(|| bad(&format!("{v} is not an integer")))?;
            if let Some(min) = p.min {
                if n < min {
                    return Err(bad(&format!("{n} is below the minimum {min}")));
                }
            }
            if let Some(max) = p.max {
                if n > max {
                    return Err(bad(&format!("{n} is above the maximum {max}")));
                }
            }
            Ok(Value::from(n))
        }
        ParamType::Boolean => match v {
            Value::Bool(b) => Ok(Value::Bool(*b)),
            Value::String(s) if s == "true" => Ok(Value::Bool(true)),
            Value::String(s) if s == "false" => Ok(Value::Bool(false)),
            _ => Err(bad(&format!("{v} is not true or false"))),
        },
        ParamType::String => {
            let s = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => return Err(bad(&format!("{v} is not a string"))),
            };
            let max = p.max_len.unwrap_or(DEFAULT_MAX_LEN);
            if s.chars().count() > max {
                return Err(bad(&format!("longer than {max} characters")));
            }
            if s.chars().any(|c| c.is_control() && c != '\n') {
                return Err(bad("contains control characters"));
            }
            if !p.allowed.is_empty() && !p.allowed.contains(&s) {
                return Err(bad(&format!(
                    "{s:?} is not one of {}",
                    p.allowed.join(", ")
                )));
            }
            Ok(Value::String(s))
        }
    }
}

impl Appliance {
    /// `NAME@VERSION`.
    pub fn key(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// Checks the appliance's own definition (names, version, parameters
    /// and their defaults, template). Does not look at the images' bytes.
    pub fn validate(&self) -> Result<(), String> {
        crate::validate::name("appliance", &self.name)?;
        let v = &self.version;
        if v.is_empty()
            || v.len() > 32
            || !v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'+')
        {
            return Err(format!(
                "invalid version {v:?}: use 1-32 letters, digits, '.', '-' or '+'"
            ));
        }
        if self.description.len() > 4096 {
            return Err("the description is longer than 4096 bytes".into());
        }
        if self.images.is_empty() {
            return Err(format!("appliance {}: names no image", self.key()));
        }
        if self.images.len() > 1 + crate::validate::MAX_DATA_DISKS {
            return Err(format!(
                "appliance {}: {} images; at most {} (the boot disk and {} data disks)",
                self.key(),
                self.images.len(),
                1 + crate::validate::MAX_DATA_DISKS,
                crate::validate::MAX_DATA_DISKS
            ));
        }
        for i in &self.images {
            crate::validate::name("image", &i.name)?;
        }
        let t = &self.template;
        if t.vcpus == 0 || t.vcpus > crate::validate::MAX_VCPUS {
            return Err(format!("template: vcpus {} is out of range", t.vcpus));
        }
        if t.memory_mib < crate::validate::MIN_MEMORY_MIB
            || t.memory_mib > crate::validate::MAX_MEMORY_MIB
        {
            return Err(format!(
                "template: memory_mib {} is out of range",
                t.memory_mib
            ));
        }
        if t.disk_gib == 0 || t.disk_gib > crate::validate::MAX_DISK_GIB {
            return Err(format!("template: disk_gib {} is out of range", t.disk_gib));
        }
        if t.ports.contains(&0) {
            return Err("template: port 0 is not a port".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.parameters {
            if p.name.is_empty()
                || p.name.len() > 63
                || !p
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(format!(
                    "invalid parameter name {:?}: use lowercase letters, digits and '_'",
                    p.name
                ));
            }
            if !seen.insert(p.name.clone()) {
                return Err(format!("parameter {} is declared twice", p.name));
            }
            if (p.name == "vcpus" || p.name == "memory_mib") && p.kind != ParamType::Integer {
                return Err(format!("parameter {} must be an integer", p.name));
            }
            if let (Some(a), Some(b)) = (p.min, p.max) {
                if a > b {
                    return Err(format!("parameter {}: min {a} is above max {b}", p.name));
                }
            }
            if let Some(d) = &p.default {
                param_value(p, d).map_err(|e| format!("default of {e}"))?;
            }
        }
        Ok(())
    }

    /// The parameters of a deployment: given values checked and converted to
    /// their types, defaults filled in. Unknown or missing ones are errors.
    pub fn resolve_params(
        &self,
        given: &BTreeMap<String, serde_json::Value>,
    ) -> Result<BTreeMap<String, serde_json::Value>, String> {
        for k in given.keys() {
            if !self.parameters.iter().any(|p| &p.name == k) {
                let known: Vec<&str> = self.parameters.iter().map(|p| p.name.as_str()).collect();
                return Err(format!(
                    "appliance {} has no parameter {k:?} (it has: {})",
                    self.key(),
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ));
            }
        }
        let mut out = BTreeMap::new();
        for p in &self.parameters {
            let v = match (given.get(&p.name), &p.default) {
                (Some(v), _) => param_value(p, v)?,
                (None, Some(d)) => param_value(p, d)?,
                (None, None) => {
                    return Err(format!(
                        "parameter {} is required: {}",
                        p.name,
                        if p.description.is_empty() {
                            "give it with --param"
                        } else {
                            &p.description
                        }
                    ))
                }
            };
            out.insert(p.name.clone(), v);
        }
        Ok(out)
    }

    /// The VM template with the parameters applied: `vcpus` and
    /// `memory_mib` set those fields, and `{{name}}` in the user data
    /// becomes the parameter's value.
    pub fn render(&self, params: &BTreeMap<String, serde_json::Value>) -> VmTemplate {
        let mut t = self.template.clone();
        if let Some(v) = params.get("vcpus").and_then(|v| v.as_i64()) {
            t.vcpus = v.clamp(1, i64::from(u32::MAX)) as u32;
        }
        if let Some(v) = params.get("memory_mib").and_then(|v| v.as_i64()) {
            t.memory_mib = v.max(0) as u64;
        }
        if let Some(ud) = &mut t.user_data {
            for (k, v) in params {
                let text = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                *ud = ud.replace(&format!("{{{{{k}}}}}"), &text);
            }
        }
        t
    }
}

/// Orders versions: numeric dot-separated parts compare as numbers.
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let pa: Vec<&str> = a.split(['.', '-', '+']).collect();
    let pb: Vec<&str> = b.split(['.', '-', '+']).collect();
    for (x, y) in pa.iter().zip(pb.iter()) {
        let o = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(m), Ok(n)) => m.cmp(&n),
            _ => x.cmp(y),
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn web() -> Appliance {
        serde_json::from_value(json!({
            "name": "web", "version": "1.0.0",
            "images": [{"name": "web-1-0-0"}],
            "template": {"memory_mib": 128, "ports": [80],
                         "user_data": "#!/bin/sh\necho {{greeting}} {{replicas}}\n"},
            "parameters": [
                {"name": "greeting", "type": "string", "default": "hello", "max_len": 10},
                {"name": "replicas", "type": "integer", "default": 2, "min": 1, "max": 5},
                {"name": "memory_mib", "type": "integer", "default": 128, "min": 64, "max": 512},
                {"name": "colour", "type": "string", "default": "red", "allowed": ["red", "blue"]}
            ]
        }))
        .expect("appliance")
    }

    #[test]
    fn parameters_are_typed_defaulted_and_rendered() {
        let a = web();
        a.validate().expect("valid");
        let mut given = BTreeMap::new();
        given.insert("replicas".to_string(), json!("3"));
        given.insert("memory_mib".to_string(), json!(256));
        let p = a.resolve_params(&given).expect("params");
        assert_eq!(p["replicas"], json!(3));
        assert_eq!(p["greeting"], json!("hello"));
        let t = a.render(&p);
        assert_eq!(t.memory_mib, 256);
        assert_eq!(t.user_data.as_deref(), Some("#!/bin/sh\necho hello 3\n"));
    }

    #[test]
    fn bad_parameters_are_refused_with_the_reason() {
        let a = web();
        let cases = [
            ("replicas", json!("many"), "is not an integer"),
            ("replicas", json!(9), "above the maximum 5"),
            (
                "greeting",
                json!("far too long a greeting"),
                "longer than 10",
            ),
            ("colour", json!("green"), "is not one of red, blue"),
            ("nope", json!(1), "has no parameter \"nope\""),
        ];
        for (k, v, want) in cases {
            let mut g = BTreeMap::new();
            g.insert(k.to_string(), v);
            let e = a.resolve_params(&g).expect_err(k);
            assert!(e.contains(want), "{k}: {e}");
        }
        let mut bad = web();
        bad.parameters[1].default = Some(json!(0));
        assert!(bad
            .validate()
            .expect_err("default")
            .contains("below the minimum"));
        let mut req = web();
        req.parameters[0].default = None;
        assert!(req
            .resolve_params(&BTreeMap::new())
            .expect_err("required")
            .contains("greeting is required"));
    }

    #[test]
    fn versions_order_numerically() {
        assert_eq!(version_cmp("1.10.0", "1.9.2"), std::cmp::Ordering::Greater);
        assert_eq!(version_cmp("2", "2.0.1"), std::cmp::Ordering::Less);
    }
}
