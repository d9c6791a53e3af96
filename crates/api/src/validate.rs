//! Validation of request bodies, shared by the server (which enforces it) and
//! the CLI (which can fail early with the same words).

use std::net::IpAddr;

use crate::{EthernetConfig, JoinTokenCreate, NetworkConfig, ProviderCreate, SiteCreate, VmCreate};

/// Largest VM accepted: a sanity bound against typos, not a host limit.
pub const MAX_VCPUS: u32 = 512;
pub const MAX_MEMORY_MIB: u64 = 16 * 1024 * 1024; // 16 TiB
pub const MIN_MEMORY_MIB: u64 = 16;
pub const MAX_DISK_GIB: u64 = 64 * 1024; // 64 TiB
pub const MAX_USER_DATA: usize = 64 * 1024;
/// SSH keys per VM, and the length of one key line (a 16384-bit RSA key
/// with a comment is about 2,800 bytes).
pub const MAX_SSH_KEYS: usize = 32;
pub const MAX_SSH_KEY_LEN: usize = 8 * 1024;
/// Key types of OpenSSH public key lines accepted for guests.
pub const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];
/// Network configuration limits: interfaces, addresses per interface, name
/// servers (the resolver uses three) and search domains.
pub const MAX_INTERFACES: usize = 8;
pub const MAX_ADDRESSES: usize = 16;
pub const MAX_NAMESERVERS: usize = 3;
pub const MAX_SEARCH_DOMAINS: usize = 6;

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
        ("price_disk_gib_hour", f.price_disk_gib_hour),
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
    ssh_keys("ssh_authorized_keys", &v.ssh_authorized_keys)?;
    if let Some(n) = &v.network {
        network(n)?;
    }
    if v.ports.len() > 16 {
        return Err("at most 16 forwarded ports".into());
    }
    for p in &v.ports {
        if *p == 0 {
            return Err("port 0 cannot be forwarded".into());
        }
    }
    data_disks(&v.data_disks)?;
    nics(&v.nics)?;
    publish_and_ingress(&v.publish, v.ingress.as_deref(), !v.nics.is_empty())?;
    labels(&v.labels)
}

/// A VM's published ports and security group (see
/// [`crate::validate_vm_security`]).
pub fn publish_and_ingress(
    publish: &[crate::VmPublish],
    ingress: Option<&[crate::IngressRule]>,
    has_nics: bool,
) -> Result<(), String> {
    let ports: Vec<crate::PublishedPort> = publish.iter().map(crate::VmPublish::port).collect();
    let pairs: Vec<(Option<&str>, &crate::PublishedPort)> = publish
        .iter()
        .zip(&ports)
        .map(|(p, port)| (p.network.as_deref(), port))
        .collect();
    crate::validate_vm_security(ingress, &pairs, has_nics)
}

/// A VM's NICs as asked for: at most [`MAX_INTERFACES`], each naming a
/// network, no network twice (the control plane checks the rest: that the
/// networks exist, do not overlap, and have the addresses asked for).
pub fn nics(nics: &[crate::NicRequest]) -> Result<(), String> {
    if nics.len() > MAX_INTERFACES {
        return Err(format!(
            "nics: {} NICs; at most {MAX_INTERFACES} are allowed",
            nics.len()
        ));
    }
    for (i, n) in nics.iter().enumerate() {
        if n.network.trim().is_empty() {
            return Err(format!("nics[{i}]: name a network"));
        }
        if let Some(j) = nics[..i].iter().position(|o| o.network == n.network) {
            return Err(format!(
                "nics[{i}]: network '{}' is already the network of nics[{j}]; a VM has at most one NIC per network",
                n.network
            ));
        }
    }
    Ok(())
}

/// At most this many data disks per VM.
pub const MAX_DATA_DISKS: usize = 8;

/// A VM's data disks: each a copy of an image or a blank disk with a size.
pub fn data_disks(disks: &[crate::DataDisk]) -> Result<(), String> {
    if disks.len() > MAX_DATA_DISKS {
        return Err(format!(
            "data_disks: {} disks; at most {MAX_DATA_DISKS} are allowed",
            disks.len()
        ));
    }
    for (i, d) in disks.iter().enumerate() {
        if let Some(img) = &d.image {
            if img.trim().is_empty() {
                return Err(format!("data_disks[{i}].image must not be empty"));
            }
        }
        match d.size_gib {
            None if d.image.is_none() => {
                return Err(format!(
                    "data_disks[{i}]: a blank disk needs size_gib (or give an image)"
                ))
            }
            Some(s) if s == 0 || s > MAX_DISK_GIB => {
                return Err(format!(
                    "data_disks[{i}].size_gib {s} is outside 1..{MAX_DISK_GIB}"
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// A list of OpenSSH public key lines, as given in `field`.
pub fn ssh_keys(field: &str, keys: &[String]) -> Result<(), String> {
    if keys.len() > MAX_SSH_KEYS {
        return Err(format!(
            "{field}: {} keys; at most {MAX_SSH_KEYS} are allowed",
            keys.len()
        ));
    }
    for (i, k) in keys.iter().enumerate() {
        ssh_key(k).map_err(|e| format!("{field}[{i}]: {e}"))?;
        if keys[..i].contains(k) {
            return Err(format!("{field}[{i}]: the same key is given twice"));
        }
    }
    Ok(())
}

/// One OpenSSH public key line, `TYPE BASE64 [COMMENT]` (what a `.pub`
/// file holds), checked down to the key blob: valid base64 whose first
/// field names the same type. `authorized_keys` options are not accepted.
pub fn ssh_key(k: &str) -> Result<(), String> {
    if k.contains("PRIVATE KEY") {
        return Err("this is a private key; give the public key (the .pub file)".into());
    }
    let shown = preview(k);
    if k.len() > MAX_SSH_KEY_LEN {
        return Err(format!(
            "{shown} is {} bytes; at most {MAX_SSH_KEY_LEN} are allowed",
            k.len()
        ));
    }
    if k.chars().any(char::is_control) {
        return Err(format!(
            "{shown} is not an OpenSSH public key line: it must be one line without control characters"
        ));
    }
    let mut parts = k.splitn(3, ' ');
    let kind = parts.next().unwrap_or_default();
    let blob = parts.next().unwrap_or_default();
    if !SSH_KEY_TYPES.contains(&kind) {
        return Err(format!(
            "{shown} is not an OpenSSH public key line: it must start with the key type ({}), then the key in base64, then an optional comment",
            SSH_KEY_TYPES.join(", ")
        ));
    }
    let Some(bytes) = base64_decode(blob) else {
        return Err(format!(
            "{shown} is not an OpenSSH public key line: the key after {kind:?} is not base64"
        ));
    };
    // The blob starts with the key type as an SSH string (u32 length, bytes).
    let named = bytes
        .get(..4)
        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
        .and_then(|n| bytes.get(4..4 + n));
    if named != Some(kind.as_bytes()) || bytes.len() < 4 + kind.len() + 8 {
        return Err(format!(
            "{shown} is not an OpenSSH public key line: the base64 data is not a {kind} key"
        ));
    }
    Ok(())
}

/// The start of a key line, quoted, for messages (key lines are long).
fn preview(k: &str) -> String {
    let cut: String = k.chars().take(24).collect();
    if cut.len() < k.len() {
        format!("{:?}", format!("{cut}..."))
    } else {
        format!("{cut:?}")
    }
}

/// Standard base64 with padding (as in OpenSSH key lines); `None` if invalid.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(4) {
        return None;
    }
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let b = s.as_bytes();
    let pad = b.iter().rev().take_while(|&&c| c == b'=').count();
    if pad > 2 {
        return None;
    }
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for (i, chunk) in b.chunks(4).enumerate() {
        let last = i == b.len() / 4 - 1;
        let mut n = 0u32;
        for (j, &c) in chunk.iter().enumerate() {
            let v = if c == b'=' && last && j >= 4 - pad {
                0
            } else {
                val(c)?
            };
            n = (n << 6) | v;
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        let keep = if last { 3 - pad } else { 3 };
        out.extend_from_slice(&bytes[..keep]);
    }
    Some(out)
}

/// A network configuration (see [`crate::guest`]); messages name the field
/// as `network.ethernets[I].FIELD`.
pub fn network(n: &NetworkConfig) -> Result<(), String> {
    if n.ethernets.is_empty() {
        return Err(
            "network.ethernets is empty: configure at least one interface, or leave network out for the image's default"
                .into(),
        );
    }
    if n.ethernets.len() > MAX_INTERFACES {
        return Err(format!(
            "network.ethernets has {} interfaces; at most {MAX_INTERFACES} are allowed",
            n.ethernets.len()
        ));
    }
    for (i, e) in n.ethernets.iter().enumerate() {
        let at = format!("network.ethernets[{i}]");
        ethernet(&at, e)?;
        if let Some(j) = n.ethernets[..i].iter().position(|o| o.match_ == e.match_) {
            return Err(match &e.match_ {
                None => format!(
                    "{at}: network.ethernets[{j}] is already the first NIC (no match); give this one a match"
                ),
                Some(_) => format!("{at}: the same match as network.ethernets[{j}]"),
            });
        }
    }
    Ok(())
}

fn ethernet(at: &str, e: &EthernetConfig) -> Result<(), String> {
    if let Some(m) = &e.match_ {
        if m.name.is_none() && m.macaddress.is_none() {
            return Err(format!(
                "{at}.match: give a name, a macaddress or both (or no match for the first NIC)"
            ));
        }
        if let Some(name) = &m.name {
            let ok = !name.is_empty()
                && name.len() <= 15
                && name != "."
                && name != ".."
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !ok {
                return Err(format!(
                    "{at}.match.name: {name:?} is not an interface name (1-15 letters, digits, '_', '.' or '-'; no wildcards)"
                ));
            }
        }
        if let Some(mac) = &m.macaddress {
            let ok = mac.len() == 17
                && mac.split(':').count() == 6
                && mac
                    .split(':')
                    .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
            if !ok {
                return Err(format!(
                    "{at}.match.macaddress: {mac:?} is not a MAC address (six hex pairs separated by ':', e.g. 52:54:00:12:34:56)"
                ));
            }
        }
    }
    if !e.dhcp4 && e.addresses.is_empty() {
        return Err(format!(
            "{at}: configures no address: set dhcp4: true or give addresses"
        ));
    }
    if e.addresses.len() > MAX_ADDRESSES {
        return Err(format!(
            "{at}.addresses: {} addresses; at most {MAX_ADDRESSES} are allowed",
            e.addresses.len()
        ));
    }
    for (j, a) in e.addresses.iter().enumerate() {
        cidr(a).map_err(|why| format!("{at}.addresses[{j}]: {why}"))?;
        if e.addresses[..j].contains(a) {
            return Err(format!("{at}.addresses[{j}]: {a:?} is given twice"));
        }
    }
    if let Some(g) = &e.gateway4 {
        if !matches!(g.parse::<IpAddr>(), Ok(IpAddr::V4(_))) {
            return Err(format!(
                "{at}.gateway4: {g:?} is not an IPv4 address (e.g. 10.0.2.2)"
            ));
        }
    }
    if let Some(ns) = &e.nameservers {
        if ns.addresses.len() > MAX_NAMESERVERS {
            return Err(format!(
                "{at}.nameservers.addresses: {} name servers; at most {MAX_NAMESERVERS} are allowed",
                ns.addresses.len()
            ));
        }
        for (j, a) in ns.addresses.iter().enumerate() {
            if a.parse::<IpAddr>().is_err() {
                return Err(format!(
                    "{at}.nameservers.addresses[{j}]: {a:?} is not an IP address (e.g. 10.0.2.3)"
                ));
            }
        }
        if ns.search.len() > MAX_SEARCH_DOMAINS {
            return Err(format!(
                "{at}.nameservers.search: {} domains; at most {MAX_SEARCH_DOMAINS} are allowed",
                ns.search.len()
            ));
        }
        for (j, d) in ns.search.iter().enumerate() {
            if !is_domain(d) {
                return Err(format!(
                    "{at}.nameservers.search[{j}]: {d:?} is not a domain name (e.g. example.org)"
                ));
            }
        }
    }
    if let Some(mtu) = e.mtu {
        if !(68..=65535).contains(&mtu) {
            return Err(format!("{at}.mtu: {mtu} is outside 68..65535"));
        }
    }
    Ok(())
}

/// An IPv4 or IPv6 address with a prefix length, e.g. `10.0.2.15/24`.
pub fn cidr(s: &str) -> Result<(), String> {
    let bad = || format!("{s:?} is not an address in CIDR notation (e.g. 10.0.2.15/24)");
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let len: u32 = len.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(format!("{s:?}: the prefix length {len} is above {max}"));
    }
    Ok(())
}

/// A DNS name: dot-separated labels of 1-63 letters, digits and '-'.
fn is_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
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

    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOiakisE7iP/Y3q4YCqhXcGDKYvynw8ekG2NX341waDN alice@example";
    const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBOv9DOFAcQFTnTy9k6+JBMkFvfMxd1Thh/UOg9eVCsJSPCgb0YjogP2uCSh1Rmo3Hld0mx3URkfUxC2OHPx4B6U= e";
    const RSA_NO_COMMENT: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC6v8INylJkQCEx/FyBWvtTkbuC6DlOxFjwTZMrrIJ17xGGOVtfO/ldQlTopQERpWu4mPhwUFPYsFOorS+uaiXSQAeW5ZhGBF50qQ9qZ9gRuMR7CR6ISOXyo7kZAkXSYdSVMh6MwuFoaan6GPZFuMBFzq4I0rBOy1nE0ZyMLCw51w== ";

    #[test]
    fn ssh_key_lines_from_ssh_keygen_are_accepted() {
        for k in [ED25519, ECDSA, RSA_NO_COMMENT] {
            assert_eq!(ssh_key(k), Ok(()), "{k}");
        }
        // A comment may hold spaces and any printable character.
        assert!(ssh_key(&format!("{ED25519} and \"more\" ünïcode")).is_ok());
    }

    #[test]
    fn bad_ssh_keys_say_what_is_wrong() {
        let blob = ED25519.split(' ').nth(1).unwrap();
        let cases = [
            ("", "must start with the key type"),
            (
                "AAAAC3NzaC1lZDI1NTE5AAAAIOiak",
                "must start with the key type",
            ),
            ("ssh-ed25519", "is not base64"),
            ("ssh-ed25519 not*base64!", "is not base64"),
            (
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOiakisE7iP",
                "is not base64",
            ),
            (&format!("ssh-rsa {blob}"), "is not a ssh-rsa key"),
            ("ssh-ed25519 AAAA", "is not a ssh-ed25519 key"),
            (&format!("{ED25519}\nssh-rsa x"), "one line"),
            (
                &format!("command=\"ls\" {ED25519}"),
                "must start with the key type",
            ),
            ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn", "private key"),
        ];
        for (k, want) in cases {
            let e = ssh_key(k).unwrap_err();
            assert!(e.contains(want), "{k:?}: {e}");
            assert!(!e.contains("b3Blbn"), "a private key is not echoed: {e}");
        }
        let long = format!("{ED25519} {}", "x".repeat(MAX_SSH_KEY_LEN));
        assert!(ssh_key(&long).unwrap_err().contains("at most 8192"));
    }

    #[test]
    fn vm_ssh_keys_are_checked_by_position() {
        let mut v = vm_create();
        v.ssh_authorized_keys = vec![ED25519.into(), "ssh-ed25519 AAAA".into()];
        let e = vm(&v).unwrap_err();
        assert!(e.starts_with("ssh_authorized_keys[1]: "), "{e}");
        v.ssh_authorized_keys = vec![ED25519.into(), ED25519.into()];
        assert!(vm(&v).unwrap_err().contains("twice"));
        v.ssh_authorized_keys = vec![ED25519.into(); MAX_SSH_KEYS + 1];
        assert!(vm(&v).unwrap_err().contains("at most 32"));
        v.ssh_authorized_keys = vec![ED25519.into(), ECDSA.into()];
        assert!(vm(&v).is_ok());
    }

    fn net(yaml: &str) -> NetworkConfig {
        serde_json::from_str(yaml).expect("parse")
    }

    #[test]
    fn network_configs_are_checked() {
        let ok = net(r#"{"ethernets": [
                {"addresses": ["10.0.2.15/24", "10.0.2.77/24", "fd00::5/64"], "gateway4": "10.0.2.2",
                 "nameservers": {"addresses": ["10.0.2.3"], "search": ["example.test"]}, "mtu": 1500},
                {"match": {"name": "eth1"}, "dhcp4": true},
                {"match": {"macaddress": "52:54:00:AB:cd:01", "name": "ens4"}, "dhcp4": true}]}"#);
        assert_eq!(network(&ok), Ok(()));
        let cases = [
            (r#"{"ethernets": []}"#, "network.ethernets is empty"),
            (r#"{"ethernets": [{}]}"#, "network.ethernets[0]: configures no address"),
            (r#"{"ethernets": [{"addresses": ["10.0.2.300/24"]}]}"#,
             "network.ethernets[0].addresses[0]: \"10.0.2.300/24\" is not an address in CIDR notation"),
            (r#"{"ethernets": [{"addresses": ["10.0.2.15"]}]}"#, "not an address in CIDR notation"),
            (r#"{"ethernets": [{"addresses": ["10.0.2.15/"]}]}"#, "not an address in CIDR notation"),
            (r#"{"ethernets": [{"addresses": ["10.0.2.15/33"]}]}"#, "prefix length 33 is above 32"),
            (r#"{"ethernets": [{"addresses": ["fd00::1/129"]}]}"#, "above 128"),
            (r#"{"ethernets": [{"addresses": ["10.0.2.15/24", "10.0.2.15/24"]}]}"#, "addresses[1]: \"10.0.2.15/24\" is given twice"),
            (r#"{"ethernets": [{"dhcp4": true, "gateway4": "fd00::1"}]}"#, "gateway4: \"fd00::1\" is not an IPv4 address"),
            (r#"{"ethernets": [{"dhcp4": true, "nameservers": {"addresses": ["dns.example"]}}]}"#,
             "nameservers.addresses[0]: \"dns.example\" is not an IP address"),
            (r#"{"ethernets": [{"dhcp4": true, "nameservers": {"addresses": ["1.1.1.1","1.0.0.1","8.8.8.8","9.9.9.9"]}}]}"#,
             "at most 3"),
            (r#"{"ethernets": [{"dhcp4": true, "nameservers": {"search": ["a b"]}}]}"#, "search[0]: \"a b\" is not a domain name"),
            (r#"{"ethernets": [{"dhcp4": true, "mtu": 10}]}"#, "mtu: 10 is outside 68..65535"),
            (r#"{"ethernets": [{"dhcp4": true, "match": {}}]}"#, "match: give a name, a macaddress or both"),
            (r#"{"ethernets": [{"dhcp4": true, "match": {"name": "eth*"}}]}"#, "is not an interface name"),
            (r#"{"ethernets": [{"dhcp4": true, "match": {"name": "a-very-long-interface"}}]}"#, "is not an interface name"),
            (r#"{"ethernets": [{"dhcp4": true, "match": {"macaddress": "52:54:00:12:34"}}]}"#, "is not a MAC address"),
            (r#"{"ethernets": [{"dhcp4": true}, {"dhcp4": true}]}"#, "network.ethernets[1]: network.ethernets[0] is already the first NIC"),
            (r#"{"ethernets": [{"dhcp4": true, "match": {"name": "eth1"}}, {"dhcp4": true, "match": {"name": "eth1"}}]}"#,
             "the same match as network.ethernets[0]"),
        ];
        for (doc, want) in cases {
            let e = network(&net(doc)).unwrap_err();
            assert!(e.contains(want), "{doc}: {e}");
        }
        let many = format!(
            r#"{{"ethernets": [{}]}}"#,
            [r#"{"dhcp4": true, "match": {"name": "e"}}"#; 9].join(",")
        );
        assert!(network(&net(&many)).unwrap_err().contains("at most 8"));
        // Unknown fields (e.g. parts of v2 outside the subset) are refused.
        let r: Result<NetworkConfig, _> =
            serde_json::from_str(r#"{"ethernets": [{"dhcp4": true, "dhcp6": true}]}"#);
        assert!(r.unwrap_err().to_string().contains("unknown field `dhcp6`"));
    }

    #[test]
    fn a_vm_with_a_bad_network_is_refused() {
        let mut v = vm_create();
        v.network = Some(net(r#"{"ethernets": [{"addresses": ["bad"]}]}"#));
        assert!(vm(&v)
            .unwrap_err()
            .starts_with("network.ethernets[0].addresses[0]"));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let r: Result<VmCreate, _> = serde_json::from_str(r#"{"name":"a","image":"i","vcpu":2}"#);
        assert!(r.unwrap_err().to_string().contains("unknown field `vcpu`"));
    }
}
