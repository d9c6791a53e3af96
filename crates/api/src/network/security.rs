//! Who may reach a NIC (its security group: ingress rules) and which of
//! its ports the host publishes on its own address (issue 27, item 4).
//!
//! Both are part of a [`LocalNic`](super::LocalNic) in the host's network
//! state, so the host that runs the NIC enforces them (nftables), and they
//! follow the VM when it moves. Without rules a NIC takes what comes from
//! its network's own subnet (the network's members) and nothing else;
//! replies to the guest's own connections always pass, and a published
//! port is open to anyone who reaches the host.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Ipv4Cidr;

/// Most ingress rules a NIC may have.
pub const MAX_INGRESS_RULES: usize = 64;
/// Most ports a NIC may publish.
pub const MAX_PUBLISHED_PORTS: usize = 32;

/// A transport protocol a rule matches.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Every protocol (the default of an ingress rule).
    #[default]
    Any,
    Tcp,
    Udp,
    Icmp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Any => "any",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        }
    }

    fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }
}

/// A port or a range of ports, written `80` or `8000-8100`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<PortRange, String> {
        let port = |p: &str| match p.trim().parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("port {p:?} is not 1-65535")),
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(s)?, port(s)?),
        };
        if first > last {
            return Err(format!("port range {s:?} runs backwards"));
        }
        Ok(PortRange { first, last })
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Number(n) => n.to_string(),
            Raw::Text(t) => t,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One ingress rule: traffic from `from`, of `protocol`, to `ports` (TCP
/// and UDP only; none: every port) is let in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IngressRule {
    /// Where the traffic comes from, an IPv4 CIDR (default `0.0.0.0/0`).
    #[serde(default = "anywhere")]
    #[schema(value_type = String, example = "192.0.2.0/24")]
    pub from: Ipv4Cidr,
    /// `any` (the default), `tcp`, `udp` or `icmp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// A port (`443`) or a range (`8000-8100`); TCP and UDP only. None:
    /// every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "8000-8100")]
    pub ports: Option<PortRange>,
}

fn anywhere() -> Ipv4Cidr {
    Ipv4Cidr::containing(Ipv4Addr::UNSPECIFIED, 0).unwrap_or_else(|_| unreachable!())
}

/// A guest port the host publishes: connections to `host_port` on the
/// host's `address` (none: any of the host's own addresses) go to the
/// guest's `guest_port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishedPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Ipv4)]
    pub address: Option<Ipv4Addr>,
    #[schema(minimum = 1, maximum = 65535)]
    pub host_port: u16,
    #[schema(minimum = 1, maximum = 65535)]
    pub guest_port: u16,
    /// `tcp` (the default) or `udp`.
    #[serde(default = "tcp")]
    pub protocol: Protocol,
}

impl PublishedPort {
    /// `[ADDR:]HOSTPORT/PROTO`, the host's side, as messages name it.
    pub fn host_side(&self) -> String {
        match self.address {
            Some(a) => format!("{a}:{}/{}", self.host_port, self.protocol.as_str()),
            None => format!("{}/{}", self.host_port, self.protocol.as_str()),
        }
    }

    /// Whether the two take the same port of one host: the same protocol
    /// and port, on the same address or either on every address.
    pub fn clashes(&self, other: &PublishedPort) -> bool {
        self.protocol == other.protocol
            && self.host_port == other.host_port
            && (self.address.is_none() || other.address.is_none() || self.address == other.address)
    }
}

impl fmt::Display for PublishedPort {
    /// As `--publish` takes it: `[ADDR:]HOSTPORT:GUESTPORT/PROTO`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(a) = self.address {
            write!(f, "{a}:")?;
        }
        write!(
            f,
            "{}:{}/{}",
            self.host_port,
            self.guest_port,
            self.protocol.as_str()
        )
    }
}

impl fmt::Display for IngressRule {
    /// As `--allow` takes it: `CIDR[:PROTO[:PORTS]]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.from)?;
        if self.protocol != Protocol::Any || self.ports.is_some() {
            write!(f, ":{}", self.protocol.as_str())?;
        }
        if let Some(p) = self.ports {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

impl FromStr for IngressRule {
    type Err = String;

    /// `CIDR[:PROTO[:PORTS]]`, as `--allow` takes it: `0.0.0.0/0:tcp:80`,
    /// `192.0.2.0/24:icmp`, `10.0.0.0/8` (every protocol). A bare address
    /// is its /32.
    fn from_str(s: &str) -> Result<IngressRule, String> {
        let bad = |why: String| {
            format!("--allow {s:?}: {why} (want CIDR[:tcp|udp|icmp|any[:PORT[-PORT]]])")
        };
        let mut parts = s.split(':');
        let from = parts.next().unwrap_or_default();
        let from: Ipv4Cidr = if from.contains('/') {
            from.parse().map_err(bad)?
        } else {
            let a: Ipv4Addr = from
                .parse()
                .map_err(|_| bad(format!("{from:?} is not an IPv4 address or CIDR")))?;
            Ipv4Cidr::containing(a, 32).map_err(bad)?
        };
        let protocol = match parts.next() {
            None => Protocol::Any,
            Some("any") => Protocol::Any,
            Some("tcp") => Protocol::Tcp,
            Some("udp") => Protocol::Udp,
            Some("icmp") => Protocol::Icmp,
            Some(p) => return Err(bad(format!("protocol {p:?} is not tcp, udp, icmp or any"))),
        };
        let ports = parts
            .next()
            .map(str::parse::<PortRange>)
            .transpose()
            .map_err(bad)?;
        if parts.next().is_some() {
            return Err(bad("too many parts".into()));
        }
        let r = IngressRule {
            from,
            protocol,
            ports,
        };
        r.validate().map_err(bad)?;
        Ok(r)
    }
}

fn tcp() -> Protocol {
    Protocol::Tcp
}

impl FromStr for PublishedPort {
    type Err = String;

    /// `[ADDR:]HOSTPORT:GUESTPORT[/tcp|udp]`, as `--publish` takes it.
    fn from_str(s: &str) -> Result<PublishedPort, String> {
        let bad = |why: &str| {
            format!("--publish {s:?}: {why} (want [ADDR:]HOSTPORT:GUESTPORT[/tcp|udp])")
        };
        let (spec, protocol) = match s.rsplit_once('/') {
            Some((spec, "tcp")) => (spec, Protocol::Tcp),
            Some((spec, "udp")) => (spec, Protocol::Udp),
            Some(_) => return Err(bad("the protocol must be tcp or udp")),
            None => (s, Protocol::Tcp),
        };
        let parts: Vec<&str> = spec.split(':').collect();
        let (address, host, guest) = match parts.as_slice() {
            [h, g] => (None, h, g),
            [a, h, g] => (
                Some(
                    a.parse::<Ipv4Addr>()
                        .map_err(|_| bad("ADDR is not an IPv4 address"))?,
                ),
                h,
                g,
            ),
            _ => return Err(bad("expected two or three parts")),
        };
        let port = |p: &str| match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(bad(&format!("port {p:?} is not 1-65535"))),
        };
        Ok(PublishedPort {
            address,
            host_port: port(host)?,
            guest_port: port(guest)?,
            protocol,
        })
    }
}

impl IngressRule {
    pub fn validate(&self) -> Result<(), String> {
        if self.ports.is_some() && !self.protocol.has_ports() {
            return Err(format!(
                "an ingress rule with ports must be tcp or udp, not {}",
                self.protocol.as_str()
            ));
        }
        Ok(())
    }
}

/// Checks a VM's security group and published ports as asked for (the
/// control plane checks the rest: which NIC gets each port, and that its
/// network has a gateway). Each error names the field.
pub fn validate_vm_security(
    ingress: Option<&[IngressRule]>,
    publish: &[(Option<&str>, &PublishedPort)],
    has_nics: bool,
) -> Result<(), String> {
    if !has_nics && !publish.is_empty() {
        return Err(
            "publish: a VM without NICs has no address a host can publish; \
                    add a NIC on a network with a gateway (nics, --network NAME), or \
                    forward guest ports to the host's loopback (ports, --port)"
                .into(),
        );
    }
    if !has_nics && ingress.is_some() {
        return Err(
            "ingress: a security group applies to a VM's NICs, and this VM has none; \
                    add a NIC (nics, --network NAME)"
                .into(),
        );
    }
    let rules = ingress.unwrap_or_default();
    if rules.len() > MAX_INGRESS_RULES {
        return Err(format!(
            "ingress: {} rules; at most {MAX_INGRESS_RULES} are allowed",
            rules.len()
        ));
    }
    for (i, r) in rules.iter().enumerate() {
        r.validate().map_err(|e| format!("ingress[{i}]: {e}"))?;
    }
    if publish.len() > MAX_PUBLISHED_PORTS {
        return Err(format!(
            "publish: {} ports; at most {MAX_PUBLISHED_PORTS} are allowed",
            publish.len()
        ));
    }
    for (i, (network, p)) in publish.iter().enumerate() {
        if !p.protocol.has_ports() {
            return Err(format!(
                "publish[{i}]: protocol {} has no ports; a published port is tcp or udp",
                p.protocol.as_str()
            ));
        }
        if p.host_port == 0 || p.guest_port == 0 {
            return Err(format!(
                "publish[{i}]: ports must be 1-65535 (host_port {}, guest_port {})",
                p.host_port, p.guest_port
            ));
        }
        if let Some(a) = p.address {
            if a.is_unspecified() || a.is_broadcast() || a.is_multicast() {
                return Err(format!(
                    "publish[{i}]: address {a} is not a host's address (leave it out for every address of the host)"
                ));
            }
        }
        if network.is_some_and(|n| n.trim().is_empty()) {
            return Err(format!(
                "publish[{i}]: network is empty; name a network of the VM's NICs, or leave it out"
            ));
        }
        if let Some(j) = publish[..i].iter().position(|(_, o)| o.clashes(p)) {
            return Err(format!(
                "publish[{i}]: host port {} is already published by publish[{j}]",
                p.host_side()
            ));
        }
    }
    Ok(())
}

/// Checks a NIC's rules and published ports; `published` collects the
/// host's published (address, protocol, port) so that no two NICs of a
/// host publish the same one.
pub fn validate_nic_security(
    nic: &str,
    ingress: Option<&[IngressRule]>,
    publish: &[PublishedPort],
    published: &mut BTreeSet<(Option<Ipv4Addr>, Protocol, u16)>,
) -> Result<(), String> {
    let rules = ingress.unwrap_or_default();
    if rules.len() > MAX_INGRESS_RULES {
        return Err(format!(
            "NIC {nic}: {} ingress rules; at most {MAX_INGRESS_RULES} are allowed",
            rules.len()
        ));
    }
    for r in rules {
        r.validate().map_err(|e| format!("NIC {nic}: {e}"))?;
    }
    if publish.len() > MAX_PUBLISHED_PORTS {
        return Err(format!(
            "NIC {nic}: {} published ports; at most {MAX_PUBLISHED_PORTS} are allowed",
            publish.len()
        ));
    }
    for p in publish {
        if !p.protocol.has_ports() || p.host_port == 0 || p.guest_port == 0 {
            return Err(format!(
                "NIC {nic}: a published port is a tcp or udp port 1-65535"
            ));
        }
        // A port on any address clashes with the same port on one.
        let clash = published.iter().any(|(a, proto, port)| {
            *proto == p.protocol
                && *port == p.host_port
                && (a.is_none() || p.address.is_none() || *a == p.address)
        });
        if clash {
            return Err(format!(
                "NIC {nic}: host port {}/{} is published twice on this host",
                p.host_port,
                p.protocol.as_str()
            ));
        }
        published.insert((p.address, p.protocol, p.host_port));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_parses_the_flag_and_refuses_what_is_not_one() {
        let p: PublishedPort = "8080:80".parse().expect("two parts");
        assert_eq!((p.address, p.host_port, p.guest_port), (None, 8080, 80));
        assert_eq!(p.protocol, Protocol::Tcp);
        let p: PublishedPort = "192.0.2.7:5353:53/udp".parse().expect("three parts");
        assert_eq!(p.address, Some(Ipv4Addr::new(192, 0, 2, 7)));
        assert_eq!(p.protocol, Protocol::Udp);
        for (bad, why) in [
            ("80", "two or three parts"),
            ("0:80", "not 1-65535"),
            ("80:70000", "not 1-65535"),
            ("host:80:80", "not an IPv4 address"),
            ("80:80/icmp", "tcp or udp"),
        ] {
            let e = bad.parse::<PublishedPort>().expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn allow_parses_the_flag_and_prints_it_back() {
        for (arg, printed) in [
            ("0.0.0.0/0:tcp:80", "0.0.0.0/0:tcp:80"),
            ("192.0.2.0/24:icmp", "192.0.2.0/24:icmp"),
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("192.0.2.7:udp:5000-5010", "192.0.2.7/32:udp:5000-5010"),
            ("10.0.0.0/8:any", "10.0.0.0/8"),
        ] {
            let r: IngressRule = arg.parse().unwrap_or_else(|e: String| panic!("{arg}: {e}"));
            assert_eq!(r.to_string(), printed);
        }
        for (bad, why) in [
            ("10.0.0.1/8:tcp", "host bits"),
            ("example.org", "not an IPv4 address"),
            ("0.0.0.0/0:sctp", "not tcp, udp, icmp or any"),
            ("0.0.0.0/0:icmp:8", "must be tcp or udp"),
            ("0.0.0.0/0:tcp:0", "not 1-65535"),
            ("0.0.0.0/0:tcp:80:81", "too many parts"),
        ] {
            let e = bad.parse::<IngressRule>().expect_err(bad);
            assert!(e.contains(why) && e.contains("--allow"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_vms_ports_and_rules_are_checked_naming_the_field() {
        let p = |s: &str| s.parse::<PublishedPort>().expect("publish");
        let (a, b, c) = (p("8080:80"), p("192.0.2.7:8080:81"), p("8080:80/udp"));
        let ok = [(None, &a), (Some("backend"), &c)];
        assert_eq!(validate_vm_security(None, &ok, true), Ok(()));
        let e = validate_vm_security(None, &[(None, &a), (None, &b)], true).expect_err("twice");
        assert!(
            e.starts_with(
                "publish[1]: host port 192.0.2.7:8080/tcp is already published by publish[0]"
            ),
            "{e}"
        );
        let e = validate_vm_security(None, &[(None, &a)], false).expect_err("no NIC");
        assert!(
            e.starts_with("publish: a VM without NICs") && e.contains("--port"),
            "{e}"
        );
        let e = validate_vm_security(Some(&[]), &[], false).expect_err("no NIC");
        assert!(e.starts_with("ingress:"), "{e}");
        let mut icmp = a.clone();
        icmp.protocol = Protocol::Icmp;
        let e = validate_vm_security(None, &[(None, &icmp)], true).expect_err("icmp");
        assert!(e.starts_with("publish[0]: protocol icmp"), "{e}");
        let e = validate_vm_security(None, &[(Some(" "), &a)], true).expect_err("empty");
        assert!(e.starts_with("publish[0]: network is empty"), "{e}");
        let mut zero = a.clone();
        zero.guest_port = 0;
        let e = validate_vm_security(None, &[(None, &zero)], true).expect_err("zero");
        assert!(e.starts_with("publish[0]: ports must be"), "{e}");
        let many: Vec<PublishedPort> = (1..=33).map(|n| p(&format!("{n}:80"))).collect();
        let pairs: Vec<_> = many.iter().map(|x| (None, x)).collect();
        let e = validate_vm_security(None, &pairs, true).expect_err("too many");
        assert!(e.starts_with("publish: 33 ports; at most 32"), "{e}");
        let rule: IngressRule = "0.0.0.0/0:tcp:22".parse().expect("rule");
        let rules = vec![rule; 65];
        let e = validate_vm_security(Some(&rules), &[], true).expect_err("too many");
        assert!(e.starts_with("ingress: 65 rules; at most 64"), "{e}");
        let bad = IngressRule {
            from: anywhere(),
            protocol: Protocol::Any,
            ports: Some("22".parse().expect("port")),
        };
        let e = validate_vm_security(Some(&[bad]), &[], true).expect_err("ports without tcp");
        assert!(
            e.starts_with("ingress[0]: an ingress rule with ports"),
            "{e}"
        );
    }

    #[test]
    fn port_ranges_read_as_written() {
        let r: PortRange = "8000-8100".parse().expect("range");
        assert_eq!((r.first, r.last), (8000, 8100));
        assert_eq!(r.to_string(), "8000-8100");
        let one: PortRange = serde_json::from_str("443").expect("a number");
        assert_eq!(one.to_string(), "443");
        assert!("9-8".parse::<PortRange>().is_err());
        assert!("0".parse::<PortRange>().is_err());
    }

    #[test]
    fn rules_and_published_ports_are_checked() {
        let mut seen = BTreeSet::new();
        let icmp_ports = IngressRule {
            from: anywhere(),
            protocol: Protocol::Icmp,
            ports: Some("22".parse().expect("port")),
        };
        let e = validate_nic_security("n1", Some(&[icmp_ports]), &[], &mut seen)
            .expect_err("icmp with ports");
        assert!(e.contains("must be tcp or udp"), "{e}");
        let any: PublishedPort = "8080:80".parse().expect("publish");
        validate_nic_security("n1", None, &[any], &mut seen).expect("first");
        let one: PublishedPort = "192.0.2.7:8080:81".parse().expect("publish");
        let e = validate_nic_security("n2", None, &[one], &mut seen).expect_err("clash");
        assert!(e.contains("published twice"), "{e}");
        let udp: PublishedPort = "8080:80/udp".parse().expect("publish");
        validate_nic_security("n2", None, &[udp], &mut seen).expect("udp is another port");
        let rule: IngressRule =
            serde_json::from_str(r#"{"protocol":"tcp","ports":"80-81"}"#).expect("rule");
        assert_eq!(rule.from.to_string(), "0.0.0.0/0");
    }
}
