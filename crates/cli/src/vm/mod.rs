//! `virt8ra vm`: virtual machines.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Subcommand;
use virt8ra_api::*;

use crate::client::{seg, Client};
use crate::output::{emit, fields, opt, table, Format};
use crate::progress::Progress;
use crate::{migrate, WaitOpts};

pub mod show;
pub mod spec;

use show::show_vm;
pub(crate) use show::ssh_key_summary;
use spec::build_spec;
pub use spec::{data_disk_arg, ssh_keys, SpecArgs};

#[derive(Debug, Subcommand)]
pub enum VmCmd {
    Create {
        /// VM name (omit with -f when the spec names it).
        name: Option<String>,
        #[command(flatten)]
        spec: SpecArgs,
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Where would this VM go? A dry run of placement: nothing is created.
    Plan {
        /// VM name (optional for a plan).
        name: Option<String>,
        #[command(flatten)]
        spec: SpecArgs,
    },
    List {
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        provider: Option<String>,
        #[arg(long)]
        country: Option<String>,
        #[arg(long)]
        phase: Option<String>,
        /// Include deleted VMs.
        #[arg(long)]
        all: bool,
    },
    Show {
        name: String,
    },
    Start {
        name: String,
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// Graceful ACPI power-down, forced after the timeout.
    Stop {
        name: String,
        /// Seconds to wait for the guest before forcing it off.
        #[arg(long)]
        timeout: Option<u32>,
        #[command(flatten)]
        wait: WaitOpts,
    },
    Reboot {
        name: String,
    },
    Delete {
        name: String,
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// The guest's serial console output.
    Console {
        name: String,
        /// At most this many bytes from the end.
        #[arg(long, default_value_t = 65536)]
        bytes: u64,
    },
    /// The VM's event history.
    Events {
        name: String,
    },
    /// Where the VM's data has been: every host, site, provider and
    /// country, from when to when and why (its residency trail).
    History {
        name: String,
    },
    /// Move the VM to another host, site, provider or country (live when
    /// possible); without a target the placement engine picks one.
    Migrate {
        name: String,
        #[command(flatten)]
        target: migrate::MigrateArgs,
        #[command(flatten)]
        wait: WaitOpts,
    },
    /// The VM's migrations: where its data has been.
    Migrations {
        name: String,
    },
    /// Write the stopped VM as an open bundle: disk.qcow2 and manifest.json.
    Export {
        name: String,
        /// Directory to write (new or empty). `-o DIR` works too.
        #[arg(long = "dir")]
        dir: PathBuf,
    },
    /// Create a VM from an export bundle or a foreign disk (qcow2, VMDK, VHD, VHDX, raw).
    Import {
        #[command(flatten)]
        args: migrate::ImportArgs,
        #[command(flatten)]
        wait: WaitOpts,
    },
}

pub(crate) async fn vm(c: &Client, o: Format, cmd: VmCmd) -> anyhow::Result<()> {
    match cmd {
        VmCmd::Create { name, spec, wait } => {
            let no_start = spec.no_start;
            let spec = build_spec(name, &spec)?;
            if spec.get("name").is_none() {
                bail!("give the VM a name (virt8ra vm create NAME ...)");
            }
            if spec.get("image").is_none() {
                bail!("name an image with --image (`virt8ra image list` shows what exists)");
            }
            let v: Vm = c.post("/vms", &spec).await?;
            let target = if no_start {
                VmPhase::Stopped
            } else {
                VmPhase::Running
            };
            let v = if wait.wait {
                wait_for(c, &v.id, &[target], &wait, o).await?
            } else {
                v
            };
            emit(o, &v, show_vm)
        }
        VmCmd::Plan { name, spec } => plan(c, o, name, &spec).await,
        VmCmd::List {
            site,
            provider,
            country,
            phase,
            all,
        } => {
            let f = ListFilter {
                site,
                provider,
                country,
                phase,
            };
            list(c, o, f, all).await
        }
        VmCmd::Show { name } => {
            let v: Vm = c.get(&format!("/vms/{}", seg(&name))).await?;
            emit(o, &v, show_vm)
        }
        VmCmd::Start { name, wait } => {
            act(
                c,
                o,
                &name,
                VmAction::Start,
                None,
                &wait,
                &[VmPhase::Running],
            )
            .await
        }
        VmCmd::Stop {
            name,
            timeout,
            wait,
        } => {
            act(
                c,
                o,
                &name,
                VmAction::Stop,
                timeout,
                &wait,
                &[VmPhase::Stopped],
            )
            .await
        }
        VmCmd::Reboot { name } => {
            let wait = WaitOpts {
                wait: false,
                wait_timeout: 0,
            };
            act(c, o, &name, VmAction::Reboot, None, &wait, &[]).await
        }
        VmCmd::Delete { name, wait } => {
            let v: Option<serde_json::Value> = c.delete(&format!("/vms/{}", seg(&name))).await?;
            let id = v
                .as_ref()
                .and_then(|v| v["id"].as_str())
                .unwrap_or(&name)
                .to_string();
            if wait.wait {
                let v = wait_for(c, &id, &[VmPhase::Deleted], &wait, o).await?;
                return emit(o, &v, |_| println!("VM {name} deleted"));
            }
            emit(o, &v, |_| println!("VM {name} is being deleted"))
        }
        VmCmd::Console { name, bytes } => {
            let log: ConsoleLog = c
                .get(&format!("/vms/{}/console?bytes={bytes}", seg(&name)))
                .await?;
            emit(o, &log, |l| {
                if l.truncated {
                    eprintln!("[... earlier output cut; --bytes shows more]");
                }
                print!("{}", l.data);
                let _ = std::io::stdout().flush();
            })
        }
        VmCmd::Migrate { name, target, wait } => {
            migrate::migrate(c, o, &name, &target, wait.timeout()).await
        }
        VmCmd::Migrations { name } => {
            let ms: Vec<Migration> = c.get(&format!("/vms/{}/migrations", seg(&name))).await?;
            migrate::list_migrations(o, &ms)
        }
        VmCmd::Export { name, dir } => migrate::export(c, o, &name, &dir).await,
        VmCmd::Import { args, wait } => {
            let v = migrate::import(c, o, &args).await?;
            let target: &[VmPhase] = if args.no_start {
                &[VmPhase::Stopped]
            } else {
                &[VmPhase::Running]
            };
            let v = if wait.wait {
                wait_for(c, &v.id, target, &wait, o).await?
            } else {
                v
            };
            emit(o, &v, show_vm)
        }
        VmCmd::History { name } => crate::audit::vm_history(c, o, &name).await,
        VmCmd::Events { name } => {
            let ev: Vec<VmEvent> = c.get(&format!("/vms/{}/events", seg(&name))).await?;
            emit(o, &ev, |ev| {
                table(
                    &["time", "phase", "event"],
                    ev.iter()
                        .map(|e| {
                            vec![
                                e.at.format("%Y-%m-%d %H:%M:%S").to_string(),
                                e.phase.as_str().into(),
                                e.message.clone(),
                            ]
                        })
                        .collect(),
                )
            })
        }
    }
}

/// `vm plan`: where the VM would go (nothing is created).
async fn plan(c: &Client, o: Format, name: Option<String>, spec: &SpecArgs) -> anyhow::Result<()> {
    let mut spec = build_spec(name, spec)?;
    if let Some(obj) = spec.as_object_mut() {
        obj.entry("name").or_insert_with(|| "plan".into());
        obj.entry("image").or_insert_with(|| "none".into());
    }
    let p: PlacementPlan = c.post("/vms/plan", &spec).await?;
    emit(o, &p, |p| {
        if p.placed {
            fields(vec![
                ("host", opt(&p.host)),
                ("site", opt(&p.site)),
                ("provider", opt(&p.provider)),
                ("country", opt(&p.country)),
                (
                    "score",
                    p.score.map(|s| format!("{s:.2}")).unwrap_or_default(),
                ),
                ("why", p.reason.clone()),
            ])
        } else {
            println!("no host fits: {}", p.reason);
        }
    })
}

/// `vm list`: every page of VMs that match the filters.
async fn list(c: &Client, o: Format, f: ListFilter, all: bool) -> anyhow::Result<()> {
    let ListFilter {
        site,
        provider,
        country,
        phase,
    } = f;
    let mut q = Vec::new();
    for (k, v) in [
        ("site", site),
        ("provider", provider),
        ("country", country),
        ("phase", phase),
    ] {
        if let Some(v) = v {
            q.push(format!("{k}={}", seg(&v)));
        }
    }
    if all {
        q.push("include_deleted=true".into());
    }
    let mut items: Vec<Vm> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut qq = q.clone();
        if let Some(cur) = &cursor {
            qq.push(format!("cursor={}", seg(cur)));
        }
        let path = if qq.is_empty() {
            "/vms".into()
        } else {
            format!("/vms?{}", qq.join("&"))
        };
        let page: Page<Vm> = c.get(&path).await?;
        items.extend(page.items);
        match page.next_cursor {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    emit(o, &items, |vs| {
        table(
            &[
                "name", "phase", "host", "site", "provider", "country", "vcpus", "memory",
            ],
            vs.iter()
                .map(|v| {
                    vec![
                        v.name.clone(),
                        v.status.phase.as_str().into(),
                        opt(&v.status.host),
                        opt(&v.status.site),
                        opt(&v.status.provider),
                        opt(&v.status.country),
                        v.spec.vcpus.to_string(),
                        format!("{} MiB", v.spec.memory_mib),
                    ]
                })
                .collect(),
        )
    })
}

/// The filters of `vm list`.
struct ListFilter {
    site: Option<String>,
    provider: Option<String>,
    country: Option<String>,
    phase: Option<String>,
}

async fn act(
    c: &Client,
    o: Format,
    name: &str,
    action: VmAction,
    timeout_s: Option<u32>,
    wait: &WaitOpts,
    target: &[VmPhase],
) -> anyhow::Result<()> {
    let v: Vm = c
        .post(
            &format!("/vms/{}/actions", seg(name)),
            &VmActionRequest { action, timeout_s },
        )
        .await?;
    let v = if wait.wait && !target.is_empty() {
        wait_for(c, &v.id, target, wait, o).await?
    } else {
        v
    };
    emit(o, &v, show_vm)
}

/// Polls the VM until it reaches one of `target`, showing progress on stderr.
async fn wait_for(
    c: &Client,
    id: &str,
    target: &[VmPhase],
    w: &WaitOpts,
    o: Format,
) -> anyhow::Result<Vm> {
    let start = Instant::now();
    let mut progress = Progress::stderr(o);
    loop {
        let v: Vm = c.get(&format!("/vms/{}", seg(id))).await?;
        let phase = v.status.phase;
        let on = v
            .status
            .host
            .as_ref()
            .map(|h| format!(" on {h}"))
            .unwrap_or_default();
        progress.update(
            &format!("{}: {}{on}", v.name, phase.as_str()),
            &format!(" ({}s)", start.elapsed().as_secs()),
        );
        if target.contains(&phase) {
            return Ok(v);
        }
        if phase == VmPhase::Failed {
            progress.finish();
            bail!(
                "VM {} failed: {}",
                v.name,
                v.status
                    .last_error
                    .unwrap_or_else(|| "no reason given".into())
            );
        }
        if start.elapsed() > Duration::from_secs(w.wait_timeout) {
            progress.finish();
            let why = v
                .status
                .placement_reason
                .filter(|_| phase == VmPhase::Pending)
                .map(|r| format!(": {r}"))
                .unwrap_or_default();
            bail!(
                "gave up after {} s: VM {} is still {}{why}",
                w.wait_timeout,
                v.name,
                phase.as_str()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
