//! The tunnel's configuration: what one host's end of the encrypted overlay
//! needs (its interface, key, port, MTU and peers), parsed from YAML and
//! checked before anything is created, so that a bad file is one clear
//! error and never a half-configured interface.
//!
//! Peers are kept apart from the rest ([`PeerSpec`]) because the agent will
//! change them while the tunnel runs (`TunnelHandle::set_peers`), as the
//! control plane hands out other hosts' public keys.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::keys::{self, PublicKey, StaticSecret};
use crate::Error;

/// The largest MTU accepted: a jumbo frame. The smallest is IPv4's 576.
pub const MAX_MTU: u16 = 9000;
/// The smallest MTU accepted.
pub const MIN_MTU: u16 = 576;
/// WireGuard's default: 1500 minus IPv6 (40), UDP (8) and WireGuard (32)
/// overhead, so the tunnel works over any 1500-byte underlay.
pub const DEFAULT_MTU: u16 = 1420;

/// The configuration file, as written (YAML).
///
/// ```yaml
/// interface: v8a-wg0
/// private_key_file: /var/lib/virt8ra/agent/tunnel.key   # mode 0600
/// listen_port: 51820
/// mtu: 1420
/// address: 10.99.0.1/24
/// peers:
///   - public_key: "base64 as WireGuard writes it"
///     endpoint: 192.0.2.7:51820     # omit: the peer connects to us
///     allowed_ips: [10.99.0.2/32]
///     persistent_keepalive: 25
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub interface: String,
    pub private_key_file: PathBuf,
    #[serde(default)]
    pub listen_port: u16,
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// The interface's own address and prefix (`10.99.0.1/24`), optional.
    #[serde(default)]
    pub address: Option<String>,
    /// TUN offloads (IFF_VNET_HDR with TSO) and UDP GSO/GRO; on by default,
    /// `false` moves one packet per system call (for comparison).
    #[serde(default = "default_true")]
    pub offload: bool,
    #[serde(default)]
    pub peers: Vec<PeerFile>,
}

/// One peer, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerFile {
    pub public_key: String,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    #[serde(default)]
    pub persistent_keepalive: Option<u16>,
}

fn default_mtu() -> u16 {
    DEFAULT_MTU
}

fn default_true() -> bool {
    true
}

/// A checked configuration: what [`crate::Tunnel::start`] takes.
#[derive(Clone)]
pub struct Config {
    pub interface: String,
    pub private_key: StaticSecret,
    pub listen_port: u16,
    pub mtu: u16,
    pub address: Option<Cidr>,
    pub offload: bool,
    pub peers: Vec<PeerSpec>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("interface", &self.interface)
            .field("private_key", &"(secret)")
            .field("listen_port", &self.listen_port)
            .field("mtu", &self.mtu)
            .field("address", &self.address)
            .field("offload", &self.offload)
            .field("peers", &self.peers)
            .finish()
    }
}

/// One checked peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<Cidr>,
    pub persistent_keepalive: Option<u16>,
}

/// An address prefix (`10.99.0.0/24`), host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `ADDR/PREFIX` (or a bare address: a host route).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or prefix (ADDR/LEN)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    /// Whether `ip` is inside this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                mask(ip, self.prefix) == self.addr
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((bits & m).into())
        }
    }
}

/// The interface's own address: the prefix as written, host bits kept.
fn parse_address(s: &str) -> Result<Cidr, String> {
    let cidr = Cidr::parse(s)?;
    let addr: IpAddr = s
        .split('/')
        .next()
        .unwrap_or(s)
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an address"))?;
    Ok(Cidr {
        addr,
        prefix: cidr.prefix,
    })
}

impl PeerFile {
    /// Checks one peer; `what` names it in errors.
    pub fn check(&self, what: &str) -> Result<PeerSpec, Error> {
        let bad = |m: String| Error::Config(format!("{what}: {m}"));
        let public_key = keys::parse_public(&self.public_key).map_err(|m| bad(m.to_string()))?;
        let endpoint = match &self.endpoint {
            None => None,
            Some(e) => {
                let addr: SocketAddr = e.trim().parse().map_err(|_| {
                    bad(format!(
                        "endpoint {e:?} is not IPv4-ADDRESS:PORT (names are not resolved)"
                    ))
                })?;
                if !addr.is_ipv4() || addr.port() == 0 {
                    return Err(bad(format!(
                        "endpoint {e:?}: only IPv4 underlay addresses with a port are supported"
                    )));
                }
                Some(addr)
            }
        };
        let allowed_ips = self
            .allowed_ips
            .iter()
            .map(|s| Cidr::parse(s).map_err(|m| bad(format!("allowed_ips: {m}"))))
            .collect::<Result<Vec<_>, _>>()?;
        if self.persistent_keepalive == Some(0) {
            return Err(bad(
                "persistent_keepalive must be 1 to 65535 seconds, or omitted".into(),
            ));
        }
        Ok(PeerSpec {
            public_key,
            endpoint,
            allowed_ips,
            persistent_keepalive: self.persistent_keepalive,
        })
    }
}

/// Checks a set of peers together: no key twice, no prefix claimed by two
/// peers (which one would get the packets?), not our own key.
pub fn check_peers(peers: &[PeerSpec], own: &PublicKey) -> Result<(), Error> {
    for (i, p) in peers.iter().enumerate() {
        if p.public_key == *own {
            return Err(Error::Config(format!(
                "peer {}: that is this tunnel's own public key",
                i + 1
            )));
        }
        for (j, q) in peers.iter().enumerate().take(i) {
            if q.public_key == p.public_key {
                return Err(Error::Config(format!(
                    "peers {} and {} have the same public key",
                    j + 1,
                    i + 1
                )));
            }
            if let Some(c) = p.allowed_ips.iter().find(|c| q.allowed_ips.contains(c)) {
                return Err(Error::Config(format!(
                    "peers {} and {} both claim allowed IP {c}",
                    j + 1,
                    i + 1
                )));
            }
        }
    }
    Ok(())
}

fn check_interface(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "interface {name:?}: 1 to 15 characters of letters, digits, '-', '_' or '.'"
        )))
    }
}

impl ConfigFile {
    /// Parses YAML text.
    pub fn parse(text: &str) -> Result<ConfigFile, Error> {
        serde_yaml::from_str(text).map_err(|e| Error::Config(e.to_string()))
    }

    /// Checks everything and reads the private key file.
    pub fn check(&self) -> Result<Config, Error> {
        check_interface(&self.interface)?;
        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            return Err(Error::Config(format!(
                "mtu {}: must be {MIN_MTU} to {MAX_MTU}",
                self.mtu
            )));
        }
        let address = match &self.address {
            None => None,
            Some(a) => Some(parse_address(a).map_err(|m| Error::Config(format!("address: {m}")))?),
        };
        let private_key = keys::read_private(&self.private_key_file)?;
        let peers = self
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| p.check(&format!("peer {}", i + 1)))
            .collect::<Result<Vec<_>, _>>()?;
        check_peers(&peers, &PublicKey::from(&private_key))?;
        Ok(Config {
            interface: self.interface.clone(),
            private_key,
            listen_port: self.listen_port,
            mtu: self.mtu,
            address,
            offload: self.offload,
            peers,
        })
    }
}

impl Config {
    /// Reads, parses and checks a configuration file.
    pub fn from_file(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        ConfigFile::parse(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
            .check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn key_file(dir: &Path, mode: u32) -> (PathBuf, PublicKey) {
        let path = dir.join("key");
        let public = keys::generate(&path).expect("generate");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        (path, public)
    }

    fn yaml(key: &Path, rest: &str) -> String {
        format!(
            "interface: wgt0\nprivate_key_file: {}\nlisten_port: 51820\n{rest}",
            key.display()
        )
    }

    fn other_key() -> String {
        let d = tempfile::tempdir().expect("tempdir");
        keys::encode_public(&keys::generate(&d.path().join("k")).expect("generate"))
    }

    #[test]
    fn parses_a_full_config() {
        let d = tempfile::tempdir().expect("tempdir");
        let (key, _) = key_file(d.path(), 0o600);
        let peer = other_key();
        let text = yaml(
            &key,
            &format!(
                "mtu: 1400\naddress: 10.99.0.1/24\npeers:\n  - public_key: {peer}\n    endpoint: 192.0.2.1:51820\n    allowed_ips: [10.99.0.2/32, 10.1.0.0/16]\n    persistent_keepalive: 25\n  - public_key: {}\n",
                other_key()
            ),
        );
        let c = ConfigFile::parse(&text)
            .expect("parse")
            .check()
            .expect("check");
        assert_eq!(c.interface, "wgt0");
        assert_eq!(c.mtu, 1400);
        assert_eq!(
            c.address.map(|a| a.to_string()).as_deref(),
            Some("10.99.0.1/24")
        );
        assert_eq!(c.peers.len(), 2);
        assert_eq!(
            c.peers[0].endpoint,
            Some("192.0.2.1:51820".parse().expect("addr"))
        );
        assert_eq!(c.peers[0].allowed_ips[1].to_string(), "10.1.0.0/16");
        assert_eq!(c.peers[0].persistent_keepalive, Some(25));
        assert_eq!(c.peers[1].endpoint, None);
        assert!(c.offload);
    }

    fn err(text: &str) -> String {
        match ConfigFile::parse(text).and_then(|c| c.check()) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn rejects_bad_configs_with_the_reason() {
        let d = tempfile::tempdir().expect("tempdir");
        let (key, _) = key_file(d.path(), 0o600);
        let peer = other_key();
        let cases = [
            (yaml(&key, "mtu: 100\n"), "mtu 100"),
            (yaml(&key, "address: 10.0.0.1/40\n"), "prefix length must be 0 to 32"),
            (yaml(&key, "bogus: 1\n"), "unknown field `bogus`"),
            (yaml(&key, "peers:\n  - public_key: nope\n"), "peer 1: public key"),
            (
                yaml(&key, &format!("peers:\n  - public_key: {peer}\n    endpoint: host:1\n")),
                "names are not resolved",
            ),
            (
                yaml(&key, &format!("peers:\n  - public_key: {peer}\n    allowed_ips: [10.0.0.0/33]\n")),
                "allowed_ips",
            ),
            (
                yaml(&key, &format!("peers:\n  - public_key: {peer}\n  - public_key: {peer}\n")),
                "same public key",
            ),
            (
                yaml(&key, &format!("peers:\n  - public_key: {peer}\n    allowed_ips: [10.0.0.0/8]\n  - public_key: {}\n    allowed_ips: [10.0.0.0/8]\n", other_key())),
                "both claim allowed IP 10.0.0.0/8",
            ),
            (
                "interface: this-name-is-far-too-long\nprivate_key_file: /x\n".to_string(),
                "1 to 15 characters",
            ),
            (
                "interface: wg0\nprivate_key_file: /nonexistent/key\n".to_string(),
                "/nonexistent/key",
            ),
        ];
        for (text, want) in cases {
            let got = err(&text);
            assert!(got.contains(want), "{text:?}: got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn refuses_a_key_file_others_can_read() {
        let d = tempfile::tempdir().expect("tempdir");
        let (key, _) = key_file(d.path(), 0o644);
        let got = err(&yaml(&key, ""));
        assert!(got.contains("0600"), "{got}");
    }

    #[test]
    fn refuses_its_own_key_as_a_peer() {
        let d = tempfile::tempdir().expect("tempdir");
        let (key, public) = key_file(d.path(), 0o600);
        let own = keys::encode_public(&public);
        let got = err(&yaml(&key, &format!("peers:\n  - public_key: {own}\n")));
        assert!(got.contains("own public key"), "{got}");
    }

    #[test]
    fn cidr_masks_and_contains() {
        let c = Cidr::parse("10.1.2.3/16").expect("parse");
        assert_eq!(c.to_string(), "10.1.0.0/16");
        assert!(c.contains("10.1.255.1".parse().expect("ip")));
        assert!(!c.contains("10.2.0.1".parse().expect("ip")));
        assert!(!c.contains("::1".parse().expect("ip")));
        let all = Cidr::parse("0.0.0.0/0").expect("parse");
        assert!(all.contains("8.8.8.8".parse().expect("ip")));
        let v6 = Cidr::parse("fd00::/8").expect("parse");
        assert!(v6.contains("fd12::1".parse().expect("ip")));
        assert_eq!(Cidr::parse("10.0.0.1").expect("parse").prefix, 32);
        assert!(Cidr::parse("fd00::/129").is_err());
        assert!(Cidr::parse("x/8").is_err());
    }
}
