//! How a VM and its parts print for people.

use virt8ra_api::*;

use crate::output::{ago, fields, opt};

/// Data disks for a table:
/// `vdc: image NAME (N GiB), vdd: blank N GiB` (the guest's names).
pub(crate) fn data_disk_summary(disks: &[virt8ra_api::DataDisk]) -> String {
    if disks.is_empty() {
        return "-".into();
    }
    disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            // vda is the boot disk, vdb the NoCloud seed.
            let dev = format!("vd{}", (b'c' + i as u8) as char);
            match (&d.image, d.size_gib) {
                (Some(img), Some(s)) => format!("{dev}: image {img} ({s} GiB)"),
                (Some(img), None) => format!("{dev}: image {img}"),
                (None, s) => format!("{dev}: blank {} GiB", s.unwrap_or(0)),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// SSH keys for a table: their comments (or types), or "-".
pub(crate) fn ssh_key_summary(keys: &[String]) -> String {
    if keys.is_empty() {
        return "-".into();
    }
    keys.iter()
        .map(|k| {
            let mut p = k.splitn(3, ' ');
            let kind = p.next().unwrap_or_default();
            match p.nth(1).map(str::trim).filter(|c| !c.is_empty()) {
                Some(comment) => format!("{comment} ({kind})"),
                None => kind.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A network configuration on one line, e.g.
/// `first NIC: 10.0.2.15/24 via 10.0.2.2, dns 10.0.2.3; eth1: dhcp4`.
pub(crate) fn network_summary(n: Option<&NetworkConfig>) -> String {
    let Some(n) = n else {
        return "image default".into();
    };
    n.ethernets
        .iter()
        .map(|e| {
            let which = match &e.match_ {
                None => "first NIC".to_string(),
                Some(m) => [m.name.clone(), m.macaddress.clone()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(" "),
            };
            let mut what = Vec::new();
            if e.dhcp4 {
                what.push("dhcp4".to_string());
            }
            if !e.addresses.is_empty() {
                what.push(e.addresses.join(" "));
            }
            if let Some(g) = &e.gateway4 {
                what.push(format!("via {g}"));
            }
            if let Some(ns) = &e.nameservers {
                if !ns.addresses.is_empty() {
                    what.push(format!("dns {}", ns.addresses.join(" ")));
                }
                if !ns.search.is_empty() {
                    what.push(format!("search {}", ns.search.join(" ")));
                }
            }
            if let Some(m) = e.mtu {
                what.push(format!("mtu {m}"));
            }
            format!("{which}: {}", what.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The published ports, `HOST:HOSTPORT -> GUESTPORT/PROTO` on the host
/// that runs the VM (its `--address`, else every address of it).
pub(crate) fn published_summary(v: &Vm) -> String {
    if v.spec.publish.is_empty() {
        return "-".into();
    }
    let host = v.status.host.as_deref().unwrap_or("its host");
    v.spec
        .publish
        .iter()
        .map(|p| {
            let at = p
                .address
                .map_or_else(|| host.to_string(), |a| a.to_string());
            format!(
                "{at}:{} -> {}/{}",
                p.host_port,
                p.guest_port,
                p.protocol.as_str()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A security group on one line: its rules as `--allow` takes them.
pub(crate) fn ingress_summary(rules: Option<&[IngressRule]>) -> String {
    match rules {
        None => "default (each NIC's own network)".into(),
        Some([]) => "none (replies and published ports only)".into(),
        Some(rs) => rs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

pub(crate) fn show_vm(v: &Vm) {
    let s = &v.status;
    fields(vec![
        ("name", v.name.clone()),
        ("id", v.id.clone()),
        ("project", v.project.clone()),
        ("phase", s.phase.as_str().into()),
        (
            "power (desired)",
            match v.power {
                PowerState::Running => "running".into(),
                PowerState::Stopped => "stopped".into(),
            },
        ),
        ("host", opt(&s.host)),
        ("site", opt(&s.site)),
        ("provider", opt(&s.provider)),
        ("country", opt(&s.country)),
        (
            "hypervisor",
            s.hypervisor
                .map(|h| h.as_str().to_string())
                .unwrap_or("-".into()),
        ),
        ("vcpus", v.spec.vcpus.to_string()),
        ("memory", format!("{} MiB", v.spec.memory_mib)),
        ("disk", format!("{} GiB", v.spec.disk_gib)),
        ("image", v.spec.image.clone()),
        ("data disks", data_disk_summary(&v.spec.data_disks)),
        ("ssh keys", ssh_key_summary(&v.spec.ssh_authorized_keys)),
        ("network", network_summary(v.spec.network.as_ref())),
        ("nics", crate::network::nics_summary(&s.nics)),
        ("published", published_summary(v)),
        ("security group", ingress_summary(v.spec.ingress.as_deref())),
        (
            "ports",
            if s.ports.is_empty() {
                "-".into()
            } else {
                s.ports
                    .iter()
                    .map(|p| format!("{} -> {}", p.host_addr, p.guest_port))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ),
        ("placement", opt(&s.placement_reason)),
        ("last error", opt(&s.last_error)),
        ("started", ago(&s.started_at)),
        ("created", v.created_at.to_rfc3339()),
    ])
}
