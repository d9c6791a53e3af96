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

use super::Ipv4Cidr;

/// Most ingress rules a NIC may have.
pub const MAX_INGRESS_RULES: usize = 64;
/// Most ports a NIC may publish.
pub const MAX_PUBLISHED_PORTS: usize = 32;

/// A transport protocol a rule matches.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
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
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressRule {
    #[serde(default = "anywhere")]
    pub from: Ipv4Cidr,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortRange>,
}

fn anywhere() -> Ipv4Cidr {
    Ipv4Cidr::containing(Ipv4Addr::UNSPECIFIED, 0).unwrap_or_else(|_| unreachable!())
}

/// A guest port the host publishes: connections to `host_port` on the
/// host's `address` (none: any of the host's own addresses) go to the
/// guest's `guest_port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishedPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
    pub host_port: u16,
    pub guest_port: u16,
    #[serde(default = "tcp")]
    pub protocol: Protocol,
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
