//! `virt8ra org|project|user|token|whoami`: tenants, people and their API
//! tokens. `token create` prints the secret once; only its hash is kept.

use anyhow::bail;
use clap::Subcommand;
use virt8ra_api::*;

use crate::client::{seg, Client};
use crate::output::{done, emit, fields, opt, table, Format};

#[derive(Debug, Subcommand)]
pub enum OrgCmd {
    Create { name: String },
    List,
    Show { name: String },
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
pub enum ProjectCmd {
    Create {
        name: String,
        /// The organisation (default: default).
        #[arg(long)]
        org: Option<String>,
    },
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    Create {
        name: String,
        /// May hold platform tokens (everything).
        #[arg(long)]
        platform_admin: bool,
    },
    List,
    Show {
        name: String,
    },
    /// Deletes the user with its tokens and memberships.
    Delete {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// A new token for a user, printed once: scoped to the project of
    /// --project / VIRT8RA_PROJECT (with --role), to --provider (an
    /// operator's), or, with neither, to the platform (platform admins only).
    Create {
        #[arg(long)]
        user: String,
        /// The provider whose sites and hosts the token manages.
        #[arg(long)]
        provider: Option<String>,
        /// viewer, member or admin (in a project).
        #[arg(long)]
        role: Option<String>,
        /// Lifetime: e.g. 3600, 90m, 12h, 30d (default: until revoked).
        #[arg(long)]
        ttl: Option<String>,
        #[arg(long)]
        name: Option<String>,
    },
    /// The tokens you manage (never their secrets).
    List,
    /// Revokes a token by id: it is refused from now on.
    Revoke { id: String },
}

/// `3600`, `90s`, `90m`, `12h`, `30d` as seconds.
pub fn parse_ttl(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("--ttl {s:?}: a number with s, m, h or d, e.g. 30d"))?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86400,
        _ => bail!("--ttl {s:?}: the unit is s, m, h or d"),
    };
    n.checked_mul(mult)
        .ok_or_else(|| anyhow::anyhow!("--ttl {s:?} is too long"))
}

fn parse_role(s: &str) -> anyhow::Result<Role> {
    Role::parse(s).ok_or_else(|| {
        anyhow::anyhow!("--role {s:?}: use viewer, member or admin (operator for --provider)")
    })
}

pub(crate) async fn org(c: &Client, o: Format, cmd: OrgCmd) -> anyhow::Result<()> {
    let show = |x: &Org| fields(vec![("name", x.name.clone()), ("id", x.id.clone())]);
    match cmd {
        OrgCmd::Create { name } => {
            let x: Org = c.post("/orgs", &OrgCreate { name }).await?;
            emit(o, &x, show)
        }
        OrgCmd::List => {
            let p: Page<Org> = c.get("/orgs").await?;
            emit(o, &p.items, |xs| {
                table(
                    &["name", "id"],
                    xs.iter()
                        .map(|x| vec![x.name.clone(), x.id.clone()])
                        .collect(),
                )
            })
        }
        OrgCmd::Show { name } => {
            let x: Org = c.get(&format!("/orgs/{}", seg(&name))).await?;
            emit(o, &x, show)
        }
        OrgCmd::Delete { name } => {
            c.delete(&format!("/orgs/{}", seg(&name))).await?;
            done(o, &format!("org {name} deleted"))
        }
    }
}

fn members(p: &Project) -> String {
    p.members
        .iter()
        .map(|m| format!("{}:{}", m.user, m.role.as_str()))
        .collect::<Vec<_>>()
        .join(",")
}

pub(crate) async fn project(c: &Client, o: Format, cmd: ProjectCmd) -> anyhow::Result<()> {
    let show = |x: &Project| {
        fields(vec![
            ("name", x.name.clone()),
            ("id", x.id.clone()),
            ("org", x.org.clone()),
            ("members", members(x)),
        ])
    };
    match cmd {
        ProjectCmd::Create { name, org } => {
            let x: Project = c.post("/projects", &ProjectCreate { name, org }).await?;
            emit(o, &x, show)
        }
        ProjectCmd::List => {
            let p: Page<Project> = c.get("/projects").await?;
            emit(o, &p.items, |xs| {
                table(
                    &["name", "org", "members"],
                    xs.iter()
                        .map(|x| vec![x.name.clone(), x.org.clone(), members(x)])
                        .collect(),
                )
            })
        }
        ProjectCmd::Show { name } => {
            let x: Project = c.get(&format!("/projects/{}", seg(&name))).await?;
            emit(o, &x, show)
        }
        ProjectCmd::Delete { name } => {
            c.delete(&format!("/projects/{}", seg(&name))).await?;
            done(o, &format!("project {name} deleted"))
        }
    }
}

pub(crate) async fn user(c: &Client, o: Format, cmd: UserCmd) -> anyhow::Result<()> {
    let show = |x: &User| {
        fields(vec![
            ("name", x.name.clone()),
            ("id", x.id.clone()),
            ("platform admin", x.platform_admin.to_string()),
            ("operator of", x.operator_of.join(",")),
        ])
    };
    match cmd {
        UserCmd::Create {
            name,
            platform_admin,
        } => {
            let x: User = c
                .post(
                    "/users",
                    &UserCreate {
                        name,
                        platform_admin,
                    },
                )
                .await?;
            emit(o, &x, show)
        }
        UserCmd::List => {
            let p: Page<User> = c.get("/users").await?;
            emit(o, &p.items, |xs| {
                table(
                    &["name", "platform-admin", "operator-of"],
                    xs.iter()
                        .map(|x| {
                            vec![
                                x.name.clone(),
                                x.platform_admin.to_string(),
                                x.operator_of.join(","),
                            ]
                        })
                        .collect(),
                )
            })
        }
        UserCmd::Show { name } => {
            let x: User = c.get(&format!("/users/{}", seg(&name))).await?;
            emit(o, &x, show)
        }
        UserCmd::Delete { name } => {
            c.delete(&format!("/users/{}", seg(&name))).await?;
            done(o, &format!("user {name} deleted"))
        }
    }
}

pub(crate) async fn token(c: &Client, o: Format, cmd: TokenCmd) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create {
            user,
            provider,
            role,
            ttl,
            name,
        } => {
            let project = c.project().map(str::to_string);
            let req = ApiTokenCreate {
                user,
                project: if provider.is_some() { None } else { project },
                provider,
                role: role.as_deref().map(parse_role).transpose()?,
                ttl_s: ttl.as_deref().map(parse_ttl).transpose()?,
                name,
            };
            let t: ApiToken = c.post("/tokens", &req).await?;
            if o == Format::Table {
                eprintln!(
                    "token {} for {} ({} {}): shown once; use it as VIRT8RA_TOKEN",
                    t.id,
                    t.user,
                    t.scope,
                    t.role.as_str()
                );
            }
            emit(o, &t, |t| println!("{}", t.token))
        }
        TokenCmd::List => {
            let p: Page<ApiTokenInfo> = c.get("/tokens").await?;
            emit(o, &p.items, |xs| {
                table(
                    &["id", "user", "scope", "role", "name", "expires"],
                    xs.iter()
                        .map(|t| {
                            vec![
                                t.id.clone(),
                                t.user.clone(),
                                t.scope.clone(),
                                t.role.as_str().into(),
                                t.name.clone(),
                                opt(&t.expires_at),
                            ]
                        })
                        .collect(),
                )
            })
        }
        TokenCmd::Revoke { id } => {
            c.delete(&format!("/tokens/{}", seg(&id))).await?;
            done(o, &format!("token {id} revoked"))
        }
    }
}

pub(crate) async fn whoami(c: &Client, o: Format) -> anyhow::Result<()> {
    let w: Whoami = c.get("/whoami").await?;
    emit(o, &w, |w| {
        fields(vec![
            ("user", opt(&w.user)),
            ("scope", w.scope.clone()),
            ("role", w.role.as_str().into()),
        ])
    })
}

#[cfg(test)]
mod tests {
    use super::parse_ttl;

    #[test]
    fn ttls_parse_with_their_units() {
        assert_eq!(parse_ttl("30d").unwrap(), 30 * 86400);
        assert_eq!(parse_ttl("12h").unwrap(), 12 * 3600);
        assert_eq!(parse_ttl("90m").unwrap(), 5400);
        assert_eq!(parse_ttl("3600").unwrap(), 3600);
        assert!(parse_ttl("30y").is_err());
        assert!(parse_ttl("d").is_err());
        assert!(parse_ttl("").is_err());
    }
}

#[derive(Debug, Subcommand)]
pub enum QuotaCmd {
    /// Sets limits of a project (those not given stay as they are); with
    /// --country, the limits of its VMs placed in that country.
    Set {
        project: String,
        #[arg(long)]
        vcpus: Option<u64>,
        #[arg(long)]
        memory_mib: Option<u64>,
        #[arg(long)]
        disk_gib: Option<u64>,
        #[arg(long)]
        vms: Option<u64>,
        /// ISO country code: set this country's limits.
        #[arg(long)]
        country: Option<String>,
        /// Remove every limit (of --country only, when given) first.
        #[arg(long)]
        clear: bool,
    },
    /// A project's limits and its use against each (default: --project).
    Show { project: Option<String> },
}

fn show_quota(r: &QuotaReport) {
    let lim = |l: Option<u64>| l.map_or("-".to_string(), |v| v.to_string());
    let rows = |u: &Usage, l: &QuotaLimits| {
        vec![
            ("vcpus", u.vcpus, l.vcpus),
            ("memory_mib", u.memory_mib, l.memory_mib),
            ("disk_gib", u.disk_gib, l.disk_gib),
            ("vms", u.vms, l.vms),
        ]
    };
    let mut out = Vec::new();
    for (what, used, limit) in rows(&r.usage, &r.quota.total) {
        out.push(vec![
            "all".into(),
            what.into(),
            used.to_string(),
            lim(limit),
        ]);
    }
    let mut countries: Vec<&String> = r.quota.countries.keys().collect();
    countries.extend(r.usage_by_country.keys());
    countries.sort();
    countries.dedup();
    for c in countries {
        let u = r.usage_by_country.get(c).copied().unwrap_or_default();
        let l = r.quota.countries.get(c).cloned().unwrap_or_default();
        for (what, used, limit) in rows(&u, &l) {
            out.push(vec![c.clone(), what.into(), used.to_string(), lim(limit)]);
        }
    }
    println!("project {}", r.project);
    table(&["where", "resource", "used", "limit"], out);
}

pub(crate) async fn quota(c: &Client, o: Format, cmd: QuotaCmd) -> anyhow::Result<()> {
    match cmd {
        QuotaCmd::Set {
            project,
            vcpus,
            memory_mib,
            disk_gib,
            vms,
            country,
            clear,
        } => {
            let path = format!("/projects/{}/quota", seg(&project));
            let mut q = c.get::<QuotaReport>(&path).await?.quota;
            let l = match &country {
                Some(cc) => q.countries.entry(cc.to_uppercase()).or_default(),
                None => &mut q.total,
            };
            if clear {
                *l = QuotaLimits::default();
            }
            for (slot, v) in [
                (&mut l.vcpus, vcpus),
                (&mut l.memory_mib, memory_mib),
                (&mut l.disk_gib, disk_gib),
                (&mut l.vms, vms),
            ] {
                if v.is_some() {
                    *slot = v;
                }
            }
            q.countries.retain(|_, l| *l != QuotaLimits::default());
            let r: QuotaReport = c.request(reqwest::Method::PUT, &path, Some(&q)).await?;
            emit(o, &r, show_quota)
        }
        QuotaCmd::Show { project } => {
            let Some(p) = project.or_else(|| c.project().map(str::to_string)) else {
                bail!("name the project: virt8ra quota show PROJECT (or --project)");
            };
            let r: QuotaReport = c.get(&format!("/projects/{}/quota", seg(&p))).await?;
            emit(o, &r, show_quota)
        }
    }
}
