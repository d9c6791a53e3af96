//! `virt8ra network`: virtual networks (private layer 2 segments with an
//! IPv4 subnet, across hosts, sites and providers), and the `--network`
//! argument of `vm create`.

use anyhow::{anyhow, bail};
use clap::Subcommand;
use virt8ra_api::*;

use crate::client::{seg, Client};
use crate::output::{done, emit, fields, table, Format};

#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// Create a network (networks are immutable once created).
    Create {
        name: String,
        /// The subnet, e.g. 10.20.0.0/24 (no host bits; /8 to /30).
        #[arg(long)]
        cidr: String,
        /// The guests' gateway (default: the subnet's first address).
        #[arg(long, conflicts_with = "no_gateway")]
        gateway: Option<std::net::Ipv4Addr>,
        /// A plain layer 2 segment: no gateway, DHCP or NAT on the hosts.
        #[arg(long)]
        no_gateway: bool,
        /// A name server handed out by DHCP (repeatable, at most 3).
        #[arg(long = "dns", value_name = "IP")]
        dns: Vec<std::net::Ipv4Addr>,
        /// The guests' MTU (default 1390: VXLAN and the tunnel between sites fit 1500).
        #[arg(long)]
        mtu: Option<u32>,
        /// Only hosts in these countries may carry it (ISO codes, comma-separated).
        #[arg(long, value_delimiter = ',')]
        countries: Vec<String>,
        /// Only hosts of these providers (comma-separated).
        #[arg(long, value_delimiter = ',')]
        providers: Vec<String>,
        /// Only hosts at these sites (comma-separated).
        #[arg(long, value_delimiter = ',')]
        sites: Vec<String>,
        /// No outbound NAT through the hosts.
        #[arg(long)]
        no_nat: bool,
    },
    List,
    Show {
        name: String,
    },
    /// Delete a network (refused while VMs have NICs on it).
    Delete {
        name: String,
    },
}

fn show(n: &Network) {
    fields(vec![
        ("name", n.name.clone()),
        ("id", n.id.clone()),
        ("cidr", n.cidr.clone()),
        (
            "gateway",
            n.gateway.map(|g| g.to_string()).unwrap_or("-".into()),
        ),
        ("dns", list(n.dns.iter().map(|d| d.to_string()))),
        ("mtu", n.mtu.to_string()),
        ("vni", n.vni.to_string()),
        ("nat", if n.nat { "yes" } else { "no" }.into()),
        ("span", n.span.describe()),
        ("created", n.created_at.to_rfc3339()),
    ])
}

fn list(items: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = items.collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}

pub(crate) async fn network(c: &Client, o: Format, cmd: NetworkCmd) -> anyhow::Result<()> {
    match cmd {
        NetworkCmd::Create {
            name,
            cidr,
            gateway,
            no_gateway,
            dns,
            mtu,
            countries,
            providers,
            sites,
            no_nat,
        } => {
            let req = NetworkCreate {
                name,
                cidr,
                gateway,
                no_gateway,
                dns,
                mtu,
                span: NetworkSpan {
                    countries: countries.iter().map(|c| c.trim().to_uppercase()).collect(),
                    providers,
                    sites,
                },
                nat: no_nat.then_some(false),
            };
            let n: Network = c.post("/networks", &req).await?;
            emit(o, &n, show)
        }
        NetworkCmd::List => {
            let page: Page<Network> = c.get("/networks").await?;
            emit(o, &page.items, |ns| {
                table(
                    &["name", "cidr", "gateway", "mtu", "span"],
                    ns.iter()
                        .map(|n| {
                            vec![
                                n.name.clone(),
                                n.cidr.clone(),
                                n.gateway.map(|g| g.to_string()).unwrap_or("-".into()),
                                n.mtu.to_string(),
                                n.span.describe(),
                            ]
                        })
                        .collect(),
                )
            })
        }
        NetworkCmd::Show { name } => {
            let n: Network = c.get(&format!("/networks/{}", seg(&name))).await?;
            let hosts: Page<NetworkHost> =
                c.get(&format!("/networks/{}/hosts", seg(&name))).await?;
            // The network, and the hosts that carry it with their paths
            // (left out when none does, like the API's empty fields).
            let mut v = serde_json::to_value(&n)?;
            if let (Some(m), false) = (v.as_object_mut(), hosts.items.is_empty()) {
                m.insert("hosts".into(), serde_json::to_value(&hosts.items)?);
            }
            emit(o, &v, |_| {
                show(&n);
                println!();
                table(
                    &["host", "site", "reached"],
                    hosts
                        .items
                        .iter()
                        .map(|h| {
                            vec![
                                h.host.clone(),
                                h.site.clone(),
                                crate::host::reach(
                                    h.reachable,
                                    h.relayed_via.as_deref(),
                                    h.tunnel_address,
                                ),
                            ]
                        })
                        .collect(),
                )
            })
        }
        NetworkCmd::Delete { name } => {
            c.delete(&format!("/networks/{}", seg(&name))).await?;
            done(o, &format!("network {name} deleted"))
        }
    }
}

/// One `--network` argument of `vm create`: `NAME` or `NAME,ip=ADDRESS`.
pub fn nic_arg(arg: &str) -> anyhow::Result<NicRequest> {
    let mut parts = arg.split(',');
    let name = parts.next().unwrap_or_default().trim();
    if name.is_empty() || name.contains('=') {
        bail!("--network {arg}: expected NAME or NAME,ip=ADDRESS");
    }
    let mut ip = None;
    for p in parts {
        match p.split_once('=') {
            Some(("ip", v)) if ip.is_none() => {
                ip =
                    Some(v.trim().parse().map_err(|_| {
                        anyhow!("--network {arg}: ip {v:?} is not an IPv4 address")
                    })?);
            }
            _ => bail!("--network {arg}: expected NAME or NAME,ip=ADDRESS"),
        }
    }
    Ok(NicRequest {
        network: name.to_string(),
        ip,
    })
}

/// A VM's NICs for a table: `net-a 02:..:.. 10.0.0.2/24, ...`, or "-".
pub(crate) fn nics_summary(nics: &[VmNic]) -> String {
    if nics.is_empty() {
        return "-".into();
    }
    nics.iter()
        .map(|n| {
            let mut s = format!("{} {} {}/{}", n.network, n.mac, n.ip, n.prefix);
            if !n.publish.is_empty() {
                let each: Vec<String> = n.publish.iter().map(ToString::to_string).collect();
                s.push_str(&format!(" (published {})", each.join(" ")));
            }
            s
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_arguments() {
        let n = nic_arg("backend").unwrap();
        assert_eq!((n.network.as_str(), n.ip), ("backend", None));
        let n = nic_arg("backend,ip=10.0.0.7").unwrap();
        assert_eq!(n.ip, Some("10.0.0.7".parse().unwrap()));
        for bad in [
            "",
            ",ip=10.0.0.7",
            "ip=10.0.0.7",
            "b,ip=10.0.0",
            "b,ip=1.2.3.4,ip=1.2.3.5",
            "b,mac=x",
        ] {
            let e = nic_arg(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--network {bad}: ")), "{e}");
        }
    }
}
