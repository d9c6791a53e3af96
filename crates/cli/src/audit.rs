//! `virt8ra audit` (the audit log), `virt8ra usage` (showback) and
//! `virt8ra vm history` (a VM's residency trail).

use clap::{Args, Subcommand};
use virt8ra_api::{AuditRecord, Page, UsageReport, VmHistory};

use crate::client::{seg, Client};
use crate::output::{emit, fields, table, Format};

#[derive(Debug, Clone, Default, Args)]
pub struct AuditFilterArgs {
    /// Records at or after this time (RFC 3339, or a date YYYY-MM-DD).
    #[arg(long)]
    pub since: Option<String>,
    /// Records before this time.
    #[arg(long)]
    pub until: Option<String>,
    /// A token id, or a token kind (admin, host, join).
    #[arg(long)]
    pub actor: Option<String>,
    /// A resource (e.g. vms/web): it and everything under it.
    #[arg(long)]
    pub resource: Option<String>,
    /// Calls made with a token of this user (one project's calls: the
    /// global --project).
    #[arg(long)]
    pub user: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Changing calls, oldest first (one page; --all for every match).
    List {
        #[command(flatten)]
        filter: AuditFilterArgs,
        /// Page size (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// `next_cursor` of the previous page.
        #[arg(long)]
        cursor: Option<String>,
        /// Every matching record, page after page.
        #[arg(long)]
        all: bool,
    },
    /// Every matching record as JSON lines on stdout.
    Export {
        #[command(flatten)]
        filter: AuditFilterArgs,
    },
}

/// The query string of a filter (after `?`, without the limit and cursor).
fn query(f: &AuditFilterArgs) -> String {
    let mut q = Vec::new();
    for (k, v) in [
        ("since", &f.since),
        ("until", &f.until),
        ("actor", &f.actor),
        ("resource", &f.resource),
        ("user", &f.user),
    ] {
        if let Some(v) = v {
            q.push(format!("{k}={}", seg(v)));
        }
    }
    q.join("&")
}

async fn page(
    c: &Client,
    f: &AuditFilterArgs,
    limit: usize,
    cursor: Option<&str>,
) -> anyhow::Result<Page<AuditRecord>> {
    let mut path = format!("/audit?limit={limit}&{}", query(f));
    if let Some(cur) = cursor {
        path.push_str(&format!("&cursor={}", seg(cur)));
    }
    c.get(&path).await
}

/// Every page from `cursor` on, each handed to `each`.
async fn walk(
    c: &Client,
    f: &AuditFilterArgs,
    mut cursor: Option<String>,
    mut each: impl FnMut(Vec<AuditRecord>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    loop {
        let p = page(c, f, 1000, cursor.as_deref()).await?;
        each(p.items)?;
        match p.next_cursor {
            Some(n) => cursor = Some(n),
            None => return Ok(()),
        }
    }
}

pub async fn audit(c: &Client, o: Format, cmd: AuditCmd) -> anyhow::Result<()> {
    match cmd {
        AuditCmd::List {
            filter,
            limit,
            cursor,
            all,
        } => {
            let items = if all {
                let mut items = Vec::new();
                walk(c, &filter, cursor, |p| {
                    items.extend(p);
                    Ok(())
                })
                .await?;
                items
            } else {
                let p = page(c, &filter, limit, cursor.as_deref()).await?;
                if let (Some(n), Format::Table) = (&p.next_cursor, o) {
                    eprintln!("more: --cursor {n}");
                }
                p.items
            };
            emit(o, &items, |rs| table_of(rs))
        }
        AuditCmd::Export { filter } => {
            walk(c, &filter, None, |p| {
                for r in p {
                    println!("{}", serde_json::to_string(&r)?);
                }
                Ok(())
            })
            .await
        }
    }
}

fn table_of(rs: &[AuditRecord]) {
    table(
        &[
            "seq", "time", "actor", "method", "resource", "status", "from",
        ],
        rs.iter()
            .map(|r| {
                let actor = match (&r.actor.token_kind, &r.actor.token_id) {
                    (Some(k), Some(id)) => format!("{k}:{id}"),
                    _ => "-".into(),
                };
                vec![
                    r.seq.to_string(),
                    r.at.format("%Y-%m-%d %H:%M:%S").to_string(),
                    actor,
                    r.method.clone(),
                    r.resource.clone(),
                    r.status.to_string(),
                    r.remote_addr.clone().unwrap_or_default(),
                ]
            })
            .collect(),
    )
}

/// `virt8ra vm history VM`.
pub async fn vm_history(c: &Client, o: Format, name: &str) -> anyhow::Result<()> {
    let h: VmHistory = c.get(&format!("/vms/{}/history", seg(name))).await?;
    emit(o, &h, |h| {
        table(
            &["from", "to", "where", "country", "size", "why"],
            h.intervals
                .iter()
                .map(|i| {
                    let at = |t: &chrono::DateTime<chrono::Utc>| {
                        t.format("%Y-%m-%d %H:%M:%S").to_string()
                    };
                    let place = match (&i.site, &i.provider, &i.host) {
                        (Some(s), Some(p), Some(host)) => format!("{host} ({s}, {p})"),
                        _ => "control plane (export)".into(),
                    };
                    vec![
                        at(&i.from),
                        i.to.as_ref().map(at).unwrap_or_else(|| "now".into()),
                        place,
                        i.country.clone().unwrap_or_else(|| "-".into()),
                        format!("{} vCPU, {} MiB, {} GiB", i.vcpus, i.memory_mib, i.disk_gib),
                        format!("{}: {}", i.reason.as_str(), i.detail),
                    ]
                })
                .collect(),
        );
        println!("countries: {}", h.countries.join(", "));
    })
}

/// `virt8ra usage [--month YYYY-MM]`.
pub async fn usage(c: &Client, o: Format, month: Option<&str>) -> anyhow::Result<()> {
    let path = match month {
        Some(m) => format!("/usage?month={}", seg(m)),
        None => "/usage".into(),
    };
    let r: UsageReport = c.get(&path).await?;
    emit(o, &r, |r| {
        table(
            &["vm", "vcpu-h", "gib-h", "disk-gib-h", "eur", "kwh", "gco2"],
            r.vms
                .iter()
                .map(|v| (v.vm.clone(), &v.amounts))
                .chain([("TOTAL".to_string(), &r.total)])
                .map(|(name, a)| {
                    vec![
                        name,
                        format!("{:.2}", a.vcpu_hours),
                        format!("{:.2}", a.gib_hours),
                        format!("{:.2}", a.disk_gib_hours),
                        format!("{:.4}", a.cost_eur),
                        format!("{:.4}", a.energy_kwh),
                        format!("{:.1}", a.carbon_g),
                    ]
                })
                .collect(),
        );
        fields(vec![
            ("month", r.month.clone()),
            ("from", r.from.to_rfc3339()),
            ("to", r.to.to_rfc3339()),
        ]);
    })
}
