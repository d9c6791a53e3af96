//! Validation of request bodies, shared by the server (which enforces it) and
//! the CLI (which can fail early with the same words).

use crate::{JoinTokenCreate, ProviderCreate, SiteCreate, VmCreate};

/// Largest VM accepted: a sanity bound against typos, not a host limit.
pub const MAX_VCPUS: u32 = 512;
pub const MAX_MEMORY_MIB: u64 = 16 * 1024 * 1024; // 16 TiB
pub const MIN_MEMORY_MIB: u64 = 16;
pub const MAX_DISK_GIB: u64 = 64 * 1024; // 64 TiB
pub const MAX_USER_DATA: usize = 64 * 1024;

/// A name: 1 to 63 characters of lowercase letters, digits and `-`, starting
/// with a letter or digit (a DNS label, so it can become a hostname).
pub fn name(kind: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {kind} name {s:?}: use 1-63 lowercase letters, digits and '-', not starting or ending with '-'"
        ))
    }
}

/// ISO 3166-1 alpha-2 codes of the countries a site or provider may be in:
/// the EU and EEA members, Switzerland, the United Kingdom, and the largest
/// non-European cloud countries (so residency rules can name them).
pub const COUNTRIES: &[&str] = &[
    "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT", "LV",
    "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE", // EU
    "IS", "LI", "NO", // EEA
    "CH", "GB", "US", "CA", "JP", "CN", "IN", "AU", "BR", "SG", "KR", "TR", "UA", "RS", "AL", "ME",
    "MK", "BA", "MD",
];

/// EU member states.
pub const EU: &[&str] = &[
    "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT", "LV",
    "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE",
];

pub fn country(s: &str) -> Result<(), String> {
    if COUNTRIES.contains(&s) {
        Ok(())
    } else {
        Err(format!(
            "unknown country code {s:?}: use an ISO 3166-1 alpha-2 code in upper case, e.g. \"DE\""
        ))
    }
}

pub fn jurisdiction(s: &str) -> Result<(), String> {
    if s == "EU" || s == "EEA" || COUNTRIES.contains(&s) {
        Ok(())
    } else {
        Err(format!(
            "unknown jurisdiction {s:?}: use \"EU\", \"EEA\" or a country code"
        ))
    }
}

pub fn provider(p: &ProviderCreate) -> Result<(), String> {
    name("provider", &p.name)?;
    country(&p.country)?;
    jurisdiction(&p.jurisdiction)?;
    labels(&p.labels)
}

/// Label keys are 1-63 characters, values at most 253.
pub fn labels(l: &std::collections::BTreeMap<String, String>) -> Result<(), String> {
    for (k, v) in l {
        if k.is_empty() || k.len() > 63 || v.len() > 253 {
            return Err(format!(
                "label {k:?}: keys are 1-63 characters, values at most 253"
            ));
        }
    }
    if l.len() > 64 {
        return Err(format!("{} labels; at most 64 are allowed", l.len()));
    }
    Ok(())
}

pub fn site(s: &SiteCreate) -> Result<(), String> {
    name("site", &s.name)?;
    country(&s.country)?;
    if s.city.trim().is_empty() || s.city.len() > 100 {
        return Err("city must be 1-100 characters".into());
    }
    if !(-90.0..=90.0).contains(&s.latitude) {
        return Err(format!("latitude {} is outside -90..90", s.latitude));
    }
    if !(-180.0..=180.0).contains(&s.longitude) {
        return Err(format!("longitude {} is outside -180..180", s.longitude));
    }
    labels(&s.labels)?;
    let f = &s.facts;
    if let Some(a) = f.access_latency_ms {
        if !(0.0..=1000.0).contains(&a) {
            return Err(format!("access_latency_ms {a} is outside 0..1000"));
        }
    }
    if let Some(g) = f.grid_gco2_per_kwh {
        if !(0.0..=2000.0).contains(&g) {
            return Err(format!("grid_gco2_per_kwh {g} is outside 0..2000"));
        }
    }
    if let Some(p) = f.pue {
        if !(1.0..=5.0).contains(&p) {
            return Err(format!("pue {p} is outside 1.0..5.0"));
        }
    }
    for (what, v) in [
        ("price_vcpu_hour", f.price_vcpu_hour),
        ("price_gib_hour", f.price_gib_hour),
    ] {
        if let Some(v) = v {
            if !(0.0..=1000.0).contains(&v) {
                return Err(format!("{what} {v} is outside 0..1000"));
            }
        }
    }
    Ok(())
}

pub fn vm(v: &VmCreate) -> Result<(), String> {
    name("vm", &v.name)?;
    if v.vcpus == 0 || v.vcpus > MAX_VCPUS {
        return Err(format!("vcpus {} is outside 1..{MAX_VCPUS}", v.vcpus));
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&v.memory_mib) {
        return Err(format!(
            "memory_mib {} is outside {MIN_MEMORY_MIB}..{MAX_MEMORY_MIB}",
            v.memory_mib
        ));
    }
    if v.disk_gib == 0 || v.disk_gib > MAX_DISK_GIB {
        return Err(format!(
            "disk_gib {} is outside 1..{MAX_DISK_GIB}",
            v.disk_gib
        ));
    }
    if v.image.trim().is_empty() {
        return Err("image must not be empty".into());
    }
    if let Some(c) = &v.placement.country {
        country(c)?;
    }
    if let Some(ud) = &v.user_data {
        if ud.len() > MAX_USER_DATA {
            return Err(format!(
                "user_data is {} bytes; at most {MAX_USER_DATA} are allowed",
                ud.len()
            ));
        }
    }
    if v.ports.len() > 16 {
        return Err("at most 16 forwarded ports".into());
    }
    for p in &v.ports {
        if *p == 0 {
            return Err("port 0 cannot be forwarded".into());
        }
    }
    labels(&v.labels)
}

pub fn join_token(j: &JoinTokenCreate) -> Result<(), String> {
    if let Some(ttl) = j.ttl_s {
        if ttl == 0 || ttl > 30 * 24 * 3600 {
            return Err(format!("ttl_s {ttl} is outside 1..2592000 (30 days)"));
        }
    }
    if let Some(m) = j.max_uses {
        if m == 0 || m > 10_000 {
            return Err(format!("max_uses {m} is outside 1..10000"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(name("vm", "web-1").is_ok());
        assert!(name("vm", "").is_err());
        assert!(name("vm", "Web").is_err());
        assert!(name("vm", "-a").is_err());
        assert!(name("vm", &"a".repeat(64)).is_err());
        assert!(name("vm", "a b").is_err());
    }

    #[test]
    fn countries() {
        assert!(country("PL").is_ok());
        assert!(country("pl").is_err());
        assert!(country("XX").is_err());
    }

    fn vm_create() -> VmCreate {
        serde_json::from_str(r#"{"name":"a","image":"img"}"#).expect("parse")
    }

    #[test]
    fn vm_sizes() {
        assert!(vm(&vm_create()).is_ok());
        let mut v = vm_create();
        v.vcpus = 0;
        assert!(vm(&v).unwrap_err().contains("vcpus"));
        let mut v = vm_create();
        v.memory_mib = u64::MAX;
        assert!(vm(&v).unwrap_err().contains("memory_mib"));
        let mut v = vm_create();
        v.disk_gib = 1 << 40;
        assert!(vm(&v).unwrap_err().contains("disk_gib"));
        let mut v = vm_create();
        v.placement.country = Some("ZZ".into());
        assert!(vm(&v).unwrap_err().contains("ZZ"));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let r: Result<VmCreate, _> = serde_json::from_str(r#"{"name":"a","image":"i","vcpu":2}"#);
        assert!(r.unwrap_err().to_string().contains("unknown field `vcpu`"));
    }
}
