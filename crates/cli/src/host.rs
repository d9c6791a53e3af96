//! `virt8ra host`: machines registered by their agents, and the join
//! tokens with which agents register.

use anyhow::bail;
use clap::Subcommand;
use virt8ra_api::*;

use crate::client::{seg, Client};
use crate::output::{ago, done, emit, fields, table, Format};
use crate::{migrate, WaitOpts};

#[derive(Debug, Subcommand)]
pub enum HostCmd {
    List {
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        provider: Option<String>,
        #[arg(long)]
        country: Option<String>,
    },
    Show {
        name: String,
    },
    /// Take a host out of placement (disabled, maintenance) or back (ready).
    SetState {
        name: String,
        state: String,
    },
    /// Set the host's overcommit ratios (vCPUs and memory placed per physical unit).
    SetOvercommit {
        name: String,
        #[arg(long)]
        cpu: Option<f64>,
        #[arg(long)]
        memory: Option<f64>,
    },
    Delete {
        name: String,
    },
    /// Move every VM away (under their placement rules), after putting its
    /// hosts in maintenance.
    Evacuate {
        name: String,
        /// live, cold, or auto.
        #[arg(long, default_value = "auto")]
        mode: String,
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Join tokens, with which agents register.
    #[command(subcommand)]
    JoinToken(JoinTokenCmd),
}

#[derive(Debug, Subcommand)]
pub enum JoinTokenCmd {
    Create {
        /// Site the host will belong to.
        #[arg(long)]
        site: String,
        /// Validity in seconds (default 3600).
        #[arg(long)]
        ttl: Option<u64>,
        /// How many hosts may join with it (default 1).
        #[arg(long)]
        max_uses: Option<u32>,
    },
    /// The join tokens that can still admit a host (never their secrets).
    List,
    /// Revoke a join token by its id (from `list`): no host can join with it any more.
    Revoke { id: String },
}

fn host_row(h: &Host) -> Vec<String> {
    vec![
        h.name.clone(),
        h.site.clone(),
        h.provider.clone(),
        h.country.clone(),
        h.state.as_str().into(),
        h.inventory.hypervisor.as_str().into(),
        format!("{}/{}", h.allocated.vcpus, h.inventory.vcpus),
        format!("{}/{}", h.allocated.memory_mib, h.inventory.memory_mib),
        h.allocated.vms.to_string(),
        ago(&h.last_heartbeat),
    ]
}

/// How the other hosts reach a host: `direct`, `relayed via HOST`,
/// `isolated`, with its tunnel address.
pub(crate) fn reach(
    r: virt8ra_api::Reachability,
    via: Option<&str>,
    tunnel: Option<std::net::Ipv4Addr>,
) -> String {
    let how = match r {
        virt8ra_api::Reachability::Direct => "direct".to_string(),
        virt8ra_api::Reachability::Relayed => format!("relayed via {}", via.unwrap_or("?")),
        virt8ra_api::Reachability::Isolated => "isolated (no address, no relay)".to_string(),
    };
    match tunnel {
        Some(t) => format!("{how}, tunnel {t}"),
        None => how,
    }
}

fn overlay(o: Option<&virt8ra_api::HostOverlay>) -> String {
    o.map_or("-".into(), |o| {
        reach(o.reachable, o.relayed_via.as_deref(), o.tunnel_address)
    })
}

pub(crate) async fn host(c: &Client, o: Format, cmd: HostCmd) -> anyhow::Result<()> {
    let show = |h: &Host| {
        fields(vec![
            ("name", h.name.clone()),
            ("id", h.id.clone()),
            ("site", h.site.clone()),
            ("provider", h.provider.clone()),
            ("country", h.country.clone()),
            ("state", h.state.as_str().into()),
            ("connected", h.connected.to_string()),
            ("overlay", overlay(h.overlay.as_ref())),
            ("last heartbeat", ago(&h.last_heartbeat)),
            ("arch", h.inventory.arch.clone()),
            ("hypervisor", h.inventory.hypervisor.as_str().into()),
            ("cpu", h.inventory.cpu_model.clone()),
            (
                "vcpus (allocated/total)",
                format!("{}/{}", h.allocated.vcpus, h.inventory.vcpus),
            ),
            (
                "memory MiB (allocated/total)",
                format!("{}/{}", h.allocated.memory_mib, h.inventory.memory_mib),
            ),
            (
                "disk GiB (allocated/total)",
                format!("{}/{}", h.allocated.disk_gib, h.inventory.disk_gib),
            ),
            ("vms", h.allocated.vms.to_string()),
            ("load 1m", format!("{:.2}", h.usage.load_1m)),
            ("agent", h.inventory.agent_version.clone()),
            ("qemu", h.inventory.qemu_version.clone()),
        ])
    };
    match cmd {
        HostCmd::List {
            site,
            provider,
            country,
        } => {
            let mut q = Vec::new();
            for (k, v) in [("site", site), ("provider", provider), ("country", country)] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", seg(&v)));
                }
            }
            let path = if q.is_empty() {
                "/hosts".to_string()
            } else {
                format!("/hosts?{}", q.join("&"))
            };
            let page: Page<Host> = c.get(&path).await?;
            emit(o, &page.items, |hs| {
                table(
                    &[
                        "name",
                        "site",
                        "provider",
                        "country",
                        "state",
                        "hypervisor",
                        "vcpus",
                        "memory",
                        "vms",
                        "heartbeat",
                    ],
                    hs.iter().map(host_row).collect(),
                )
            })
        }
        HostCmd::Show { name } => {
            let h: Host = c.get(&format!("/hosts/{}", seg(&name))).await?;
            emit(o, &h, show)
        }
        HostCmd::SetState { name, state } => {
            let state = match state.as_str() {
                "ready" => HostState::Ready,
                "disabled" => HostState::Disabled,
                "maintenance" => HostState::Maintenance,
                s => bail!("unknown state {s:?}: use ready, disabled or maintenance"),
            };
            let h: Host = c
                .request(
                    reqwest::Method::PATCH,
                    &format!("/hosts/{}", seg(&name)),
                    Some(&HostUpdate {
                        state: Some(state),
                        cpu_overcommit: None,
                        memory_overcommit: None,
                    }),
                )
                .await?;
            emit(o, &h, show)
        }
        HostCmd::SetOvercommit { name, cpu, memory } => {
            let h: Host = c
                .request(
                    reqwest::Method::PATCH,
                    &format!("/hosts/{}", seg(&name)),
                    Some(&HostUpdate {
                        state: None,
                        cpu_overcommit: cpu,
                        memory_overcommit: memory,
                    }),
                )
                .await?;
            emit(o, &h, show)
        }
        HostCmd::Delete { name } => {
            c.delete(&format!("/hosts/{}", seg(&name))).await?;
            done(o, &format!("host {name} deleted"))
        }
        HostCmd::Evacuate { name, mode, wait } => {
            migrate::evacuate(c, o, "hosts", &name, &mode, wait.timeout()).await
        }
        HostCmd::JoinToken(j) => join_token(c, o, j).await,
    }
}

async fn join_token(c: &Client, o: Format, cmd: JoinTokenCmd) -> anyhow::Result<()> {
    match cmd {
        JoinTokenCmd::Create {
            site,
            ttl,
            max_uses,
        } => {
            let t: JoinToken = c
                .post(
                    "/join-tokens",
                    &JoinTokenCreate {
                        site,
                        ttl_s: ttl,
                        max_uses,
                    },
                )
                .await?;
            emit(o, &t, |t| println!("{}", t.token))
        }
        JoinTokenCmd::List => {
            let page: Page<JoinTokenInfo> = c.get("/join-tokens").await?;
            emit(o, &page.items, |ts| {
                table(
                    &["id", "site", "created", "expires", "uses left"],
                    ts.iter()
                        .map(|t| {
                            vec![
                                t.id.clone(),
                                t.site.clone(),
                                t.created_at.format("%Y-%m-%d %H:%M:%SZ").to_string(),
                                t.expires_at
                                    .map(|e| e.format("%Y-%m-%d %H:%M:%SZ").to_string())
                                    .unwrap_or_else(|| "never".into()),
                                t.uses_left
                                    .map(|u| u.to_string())
                                    .unwrap_or_else(|| "unlimited".into()),
                            ]
                        })
                        .collect(),
                )
            })
        }
        JoinTokenCmd::Revoke { id } => {
            c.delete(&format!("/join-tokens/{}", seg(&id))).await?;
            done(o, &format!("join token {id} revoked"))
        }
    }
}
