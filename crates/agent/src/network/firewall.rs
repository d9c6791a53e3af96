//! nftables: outbound NAT per network, isolation between networks, and
//! the anycast gateway's fences on the VXLAN ports.
//!
//! Everything lives in two tables of our own, `ip virt8ra` and `bridge
//! virt8ra`; no other table is read or touched. Each table is generated
//! whole from the desired state and carries the hash of its text in its
//! comment: when the hash matches, nothing is done (idempotent, and no
//! rule is rewritten under live traffic); otherwise the table is replaced
//! in one `nft -f` transaction (delete and create together), so stale
//! rules of a removed network cannot survive. With no network needing a
//! table, it is deleted.
//!
//! - `ip virt8ra`: guests' traffic leaving a network's subnet is
//!   masqueraded (networks with `nat`); forwarding from one of our bridges
//!   to another is dropped, so two networks meet only outside the host.
//!   Traffic bridged within a network is tracked in a conntrack zone of
//!   that network's own ([`zones`]): two networks with the same CIDR (and
//!   the same addresses) on one host never share a connection's entry,
//!   so one's replies cannot pass another's security group as
//!   "established". What a guest sends to the gateway (routed: NAT out,
//!   replies of published ports) stays in the host's zone, where the
//!   other half of those connections is seen (on the host's own
//!   interfaces), and one network per CIDR only has a gateway on a host.
//! - `bridge virt8ra`: every host answers for the gateway with the same
//!   MAC, so frames from or to that MAC, ARP for the gateway's address and
//!   DHCP never cross the VXLAN device: each host's gateway and DHCP server
//!   serve its own guests only.

use sha2::{Digest, Sha256};
use virt8ra_api::{device_names, gateway_mac, HostNetwork, IngressRule, Protocol};

use super::cmd::{self, Changes, Result};

const TABLE: &str = "virt8ra";

fn ip_table(networks: &[HostNetwork]) -> Option<String> {
    if networks.is_empty() {
        return None;
    }
    let mut fwd = String::new();
    let mut nat = String::new();
    for hn in networks {
        let br = device_names(&hn.network.id).bridge;
        fwd.push_str(&format!(
            "\t\tiifname \"{br}\" oifname \"v8b-*\" oifname != \"{br}\" drop\n"
        ));
        if hn.nat {
            nat.push_str(&format!(
                "\t\tip saddr {c} ip daddr != {c} oifname != \"{br}\" masquerade\n",
                c = hn.network.cidr
            ));
        }
    }
    let (guards, dnat) = nic_rules(networks);
    if !guards.is_empty() {
        fwd.push_str("\t\tct state established,related accept\n");
        fwd.push_str(&guards);
    }
    let zones = zone_rules(networks);
    Some(format!(
        "\tchain zones {{\n\t\ttype filter hook prerouting priority raw; policy accept;\n{zones}\t}}\n\
         \tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n{fwd}\t}}\n\
         \tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n{dnat}\t}}\n\
         \tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n{nat}\t}}\n"
    ))
}

/// The conntrack zone of each network on this host: its VNI folded into
/// 1-65535 (zone 0 is the host's own), the next free one on a collision,
/// in VNI order, so a network keeps its zone while the others change.
pub fn zones(networks: &[HostNetwork]) -> Vec<(String, u16)> {
    let mut by_vni: Vec<&HostNetwork> = networks.iter().collect();
    by_vni.sort_by_key(|hn| hn.network.vni);
    let mut used = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(by_vni.len());
    for hn in by_vni {
        let mut z = (hn.network.vni.saturating_sub(1) % 65535) as u16 + 1;
        while !used.insert(z) {
            z = if z == u16::MAX { 1 } else { z + 1 };
        }
        out.push((hn.network.id.clone(), z));
    }
    out
}

/// Sets each network's conntrack zone on what enters from its bridge
/// (also bridged frames: br_netfilter gives them the bridge as input),
/// before conntrack sees it (priority raw), except frames to the
/// gateway's MAC: those are routed, and their other half is in zone 0.
fn zone_rules(networks: &[HostNetwork]) -> String {
    let mut out = String::new();
    for (id, zone) in zones(networks) {
        let Some(hn) = networks.iter().find(|hn| hn.network.id == id) else {
            continue;
        };
        let br = device_names(&id).bridge;
        let routed = match hn.network.gateway {
            Some(_) => format!(" ether daddr != {}", gateway_mac(&id)),
            None => String::new(),
        };
        out.push_str(&format!(
            "\t\tiifname \"{br}\"{routed} ct zone set {zone}\n"
        ));
    }
    out
}

/// Each local NIC's security group and published ports: the rules that
/// let in what may reach it and drop the rest (forward chain; bridged
/// frames pass it too, see [`ensure_bridge_filtering`]), and the DNAT
/// rules of its published ports (prerouting).
fn nic_rules(networks: &[HostNetwork]) -> (String, String) {
    let mut fwd = String::new();
    let mut dnat = String::new();
    for hn in networks {
        let br = device_names(&hn.network.id).bridge;
        for nic in &hn.nics {
            let to = format!("oifname \"{br}\" ip daddr {}", nic.ip);
            match &nic.ingress {
                None => fwd.push_str(&format!("\t\t{to} ip saddr {} accept\n", hn.network.cidr)),
                Some(rules) => {
                    for r in rules {
                        fwd.push_str(&format!(
                            "\t\t{to} ip saddr {}{} accept\n",
                            r.from,
                            matcher(r)
                        ));
                    }
                }
            }
            for p in &nic.publish {
                let proto = p.protocol.as_str();
                fwd.push_str(&format!(
                    "\t\t{to} ct status dnat {proto} dport {} accept\n",
                    p.guest_port
                ));
                let on = match p.address {
                    Some(a) => format!("ip daddr {a}"),
                    None => "fib daddr type local".to_string(),
                };
                dnat.push_str(&format!(
                    "\t\t{on} {proto} dport {} dnat to {}:{}\n",
                    p.host_port, nic.ip, p.guest_port
                ));
            }
            fwd.push_str(&format!("\t\t{to} drop\n"));
        }
    }
    (fwd, dnat)
}

/// The protocol and port part of an ingress rule.
fn matcher(r: &IngressRule) -> String {
    match (r.protocol, r.ports) {
        (Protocol::Any, _) => String::new(),
        (p, Some(ports)) => format!(" {} dport {ports}", p.as_str()),
        (p, None) => format!(" meta l4proto {}", p.as_str()),
    }
}

fn bridge_table(networks: &[HostNetwork]) -> Option<String> {
    let mut rules = String::new();
    for hn in networks {
        let Some(gw) = hn.network.gateway else {
            continue;
        };
        let vx = device_names(&hn.network.id).vxlan;
        let mac = gateway_mac(&hn.network.id);
        rules.push_str(&format!(
            "\t\toifname \"{vx}\" ether saddr {mac} drop\n\
             \t\toifname \"{vx}\" ether daddr {mac} drop\n\
             \t\toifname \"{vx}\" ether type arp arp daddr ip {gw} drop\n\
             \t\toifname \"{vx}\" ether type ip udp dport {{ 67, 68 }} drop\n"
        ));
    }
    if rules.is_empty() {
        return None;
    }
    Some(format!(
        "\tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n{rules}\t}}\n\
         \tchain output {{\n\t\ttype filter hook output priority filter; policy accept;\n{rules}\t}}\n"
    ))
}

fn hash(body: &str) -> String {
    hex::encode(&Sha256::digest(body.as_bytes())[..8])
}

/// The hash in the comment of table `family virt8ra`, or `None` without
/// the table.
fn current(family: &str) -> Result<Option<String>> {
    let text = cmd::output("nft", &["list", "tables", family])?;
    if !text
        .lines()
        .any(|l| l.trim() == format!("table {family} {TABLE}"))
    {
        return Ok(None);
    }
    let text = cmd::output("nft", &["list", "table", family, TABLE])?;
    Ok(Some(
        text.lines()
            .find_map(|l| l.trim().strip_prefix("comment \"v8:"))
            .map(|h| h.trim_end_matches(['"', ';']).to_string())
            .unwrap_or_default(),
    ))
}

fn apply(family: &str, body: Option<String>, changes: &mut Changes) -> Result<()> {
    let have = current(family)?;
    match body {
        None => {
            if have.is_some() {
                changes.run("nft", &["delete", "table", family, TABLE])?;
            }
        }
        Some(body) => {
            let h = hash(&body);
            if have.as_deref() == Some(h.as_str()) {
                return Ok(());
            }
            // `table` first so that `delete` finds one even when none
            // existed; the three run as one transaction.
            let script = format!(
                "table {family} {TABLE}\ndelete table {family} {TABLE}\n\
                 table {family} {TABLE} {{\n\tcomment \"v8:{h}\"\n{body}}}\n"
            );
            cmd::with_input("nft", &["-f", "-"], Some(&script))?;
            changes.note(format!("nft: table {family} {TABLE} replaced ({h})"));
        }
    }
    Ok(())
}

/// Makes both tables what `networks` need.
pub fn ensure(networks: &[HostNetwork], changes: &mut Changes) -> Result<()> {
    apply("ip", ip_table(networks), changes)?;
    apply("bridge", bridge_table(networks), changes)
}

/// Makes bridged IPv4 frames pass the `ip` tables' forward hook
/// (br_netfilter, per network namespace) once a NIC is here, so that its
/// security group applies to frames from guests on the same network too,
/// local or behind VXLAN. Never turned off: other software on the host
/// may need it.
pub fn ensure_bridge_filtering(networks: &[HostNetwork], changes: &mut Changes) -> Result<()> {
    if networks.iter().all(|n| n.nics.is_empty()) {
        return Ok(());
    }
    let path = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    if !std::path::Path::new(path).exists() {
        // Not loaded yet: loading makes it appear (0 in new namespaces).
        let _ = cmd::output("modprobe", &["br_netfilter"]);
    }
    let now = std::fs::read_to_string(path).map_err(|e| {
        cmd::NetError(format!(
            "read {path}: {e} (security groups need the kernel's br_netfilter)"
        ))
    })?;
    if now.trim() != "1" {
        std::fs::write(path, "1").map_err(|e| cmd::NetError(format!("write {path}: {e}")))?;
        changes.note("sysctl net.bridge.bridge-nf-call-iptables=1".into());
    }
    Ok(())
}

/// Turns on IPv4 forwarding if a network NATs, a NIC publishes a port or
/// the host relays between tunnel peers (never off: other software on the
/// host may need it).
pub fn ensure_forwarding(
    networks: &[HostNetwork],
    relay: bool,
    changes: &mut Changes,
) -> Result<()> {
    let publishes = networks
        .iter()
        .any(|n| n.nics.iter().any(|nic| !nic.publish.is_empty()));
    if !relay && !publishes && !networks.iter().any(|n| n.nat) {
        return Ok(());
    }
    let path = "/proc/sys/net/ipv4/ip_forward";
    let now =
        std::fs::read_to_string(path).map_err(|e| cmd::NetError(format!("read {path}: {e}")))?;
    if now.trim() != "1" {
        std::fs::write(path, "1").map_err(|e| cmd::NetError(format!("write {path}: {e}")))?;
        changes.note("sysctl net.ipv4.ip_forward=1".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virt8ra_api::{NetworkSpec, DEFAULT_MTU};

    fn hn(id: &str, gateway: Option<&str>, nat: bool) -> HostNetwork {
        HostNetwork {
            network: NetworkSpec {
                id: id.into(),
                name: id.into(),
                cidr: "10.1.0.0/24"
                    .parse()
                    .unwrap_or_else(|e: String| panic!("{e}")),
                gateway: gateway.and_then(|g| g.parse().ok()),
                dns: vec![],
                vni: 1,
                mtu: DEFAULT_MTU,
            },
            nat,
            nics: vec![],
            peers: vec![],
            fdb: vec![],
        }
    }

    #[test]
    fn tables_hold_what_the_networks_need() {
        assert_eq!(ip_table(&[]), None);
        assert_eq!(bridge_table(&[]), None);
        let plain = [hn("l2", None, false)];
        assert_eq!(bridge_table(&plain), None, "no gateway, nothing to fence");
        let ip = ip_table(&plain).unwrap_or_default();
        assert!(
            !ip.contains("masquerade") && ip.contains(&device_names("l2").bridge),
            "{ip}"
        );
        let routed = [hn("gw", Some("10.1.0.1"), true)];
        let ip = ip_table(&routed).unwrap_or_default();
        assert!(
            ip.contains("ip saddr 10.1.0.0/24 ip daddr != 10.1.0.0/24"),
            "{ip}"
        );
        let br = bridge_table(&routed).unwrap_or_default();
        let vx = device_names("gw").vxlan;
        assert!(
            br.contains(&format!(
                "oifname \"{vx}\" ether saddr {}",
                gateway_mac("gw")
            )),
            "{br}"
        );
        assert!(br.contains("arp daddr ip 10.1.0.1 drop"), "{br}");
        // The hash changes with the rules, so a changed network replaces
        // its table, and an unchanged one does not.
        assert_ne!(hash(&ip), hash(&ip_table(&plain).unwrap_or_default()));
        assert_eq!(hash(&ip), hash(&ip_table(&routed).unwrap_or_default()));
    }

    fn nic(id: &str, ip: &str) -> virt8ra_api::LocalNic {
        virt8ra_api::LocalNic {
            id: id.into(),
            vm: id.into(),
            tap: virt8ra_api::tap_name(id),
            mac: virt8ra_api::mac_for_nic(id),
            ip: ip.parse().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
            ingress: None,
            publish: vec![],
        }
    }

    #[test]
    fn each_network_has_a_zone_of_its_own_and_keeps_it() {
        let mut a = hn("a", Some("10.1.0.1"), true);
        a.network.vni = 7;
        let mut b = hn("b", None, false);
        b.network.vni = 65542; // folds onto 7
        let mut c = hn("c", None, false);
        c.network.vni = 8;
        assert_eq!(
            zones(&[b.clone(), a.clone(), c.clone()]),
            [("a".into(), 7), ("c".into(), 8), ("b".into(), 9)]
        );
        assert_eq!(zones(&[b.clone(), a.clone()])[1], ("b".into(), 8));
        let ip = ip_table(&[a, b]).unwrap_or_default();
        let (bra, brb) = (device_names("a").bridge, device_names("b").bridge);
        for want in [
            "type filter hook prerouting priority raw".to_string(),
            format!(
                "iifname \"{bra}\" ether daddr != {} ct zone set 7",
                gateway_mac("a")
            ),
            format!("iifname \"{brb}\" ct zone set 8"),
        ] {
            assert!(ip.contains(&want), "{want:?} missing from {ip}");
        }
    }

    #[test]
    fn security_groups_and_published_ports_become_rules() {
        let mut n = hn("gw", Some("10.1.0.1"), true);
        let mut guarded = nic("a", "10.1.0.5");
        guarded.ingress = serde_json::from_str(
            r#"[{"protocol":"tcp","ports":"22"},{"from":"192.0.2.0/24","protocol":"icmp"}]"#,
        )
        .ok();
        guarded.publish = vec!["8080:80".parse().unwrap_or_else(|e: String| panic!("{e}"))];
        n.nics = vec![guarded, nic("b", "10.1.0.6")];
        let ip = ip_table(&[n]).unwrap_or_default();
        let br = device_names("gw").bridge;
        let to = |a: &str| format!("oifname \"{br}\" ip daddr {a}");
        for want in [
            "ct state established,related accept".to_string(),
            format!("{} ip saddr 0.0.0.0/0 tcp dport 22 accept", to("10.1.0.5")),
            format!(
                "{} ip saddr 192.0.2.0/24 meta l4proto icmp accept",
                to("10.1.0.5")
            ),
            format!("{} ct status dnat tcp dport 80 accept", to("10.1.0.5")),
            format!("{} drop", to("10.1.0.5")),
            "fib daddr type local tcp dport 8080 dnat to 10.1.0.5:80".to_string(),
            // Without rules: the network's members.
            format!("{} ip saddr 10.1.0.0/24 accept", to("10.1.0.6")),
            format!("{} drop", to("10.1.0.6")),
        ] {
            assert!(ip.contains(&want), "{want:?} missing from {ip}");
        }
        // The default rule comes before its drop.
        let allow = ip.find(&format!("{} ip saddr", to("10.1.0.6")));
        let drop = ip.find(&format!("{} drop", to("10.1.0.6")));
        assert!(allow < drop, "{ip}");
    }
}
