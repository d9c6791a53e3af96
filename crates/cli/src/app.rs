//! `virt8ra app`, `virt8ra appliance` and `virt8ra catalog`: the marketplace
//! and deployments of one appliance at several locations.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;
use virt8ra_api::*;

use crate::client::{seg, Client};
use crate::output::{emit, fields, table, Format};
use crate::progress::Progress;

#[derive(Debug, Subcommand)]
pub enum AppCmd {
    /// Deploy an appliance at several locations (sites, providers or countries) in one step.
    Deploy {
        /// `NAME`, `NAME@VERSION` or `CATALOG/NAME[@VERSION]`.
        appliance: String,
        #[arg(long)]
        name: String,
        /// Comma-separated sites, providers or country codes, e.g. es,de,pl.
        #[arg(long, value_delimiter = ',', required = true)]
        locations: Vec<String>,
        #[arg(long, default_value_t = 1)]
        replicas_per_location: u32,
        /// A parameter, KEY=VALUE (repeatable).
        #[arg(long = "param")]
        params: Vec<String>,
        /// An SSH public key every replica accepts: a .pub file or the key
        /// line (repeatable).
        #[arg(long = "ssh-key", value_name = "FILE_OR_LINE")]
        ssh_keys: Vec<String>,
        /// Wait until every replica runs.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 600)]
        wait_timeout: u64,
    },
    List,
    Show {
        name: String,
    },
    /// Delete every VM of the app (cached images stay).
    Delete {
        name: String,
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 300)]
        wait_timeout: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApplianceCmd {
    /// Publish an appliance definition (JSON or YAML) in this control plane's catalog.
    Publish { file: PathBuf },
    /// Appliances of this control plane and of the catalogs it trusts.
    List,
    Show {
        /// `[CATALOG/]NAME[@VERSION]`
        name: String,
    },
    /// Withdraw a local appliance (NAME@VERSION).
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
pub enum CatalogCmd {
    /// Trust another provider's catalog (a control plane's /api/v1/catalog or a static index).
    Add {
        name: String,
        /// URL of the signed index, e.g. https://cp.example/api/v1/catalog.
        #[arg(value_name = "URL")]
        index_url: String,
        /// The ed25519 public key (hex) to verify it with.
        #[arg(long)]
        key: String,
    },
    List,
    Refresh {
        name: String,
    },
    Remove {
        name: String,
    },
    /// This control plane's catalog URL and public key, to give to others.
    Key,
    /// Offline: create an ed25519 signing key for a static catalog (writes
    /// the secret to FILE, mode 0600; prints the public key).
    Keygen {
        file: PathBuf,
    },
    /// Offline: sign a catalog index (JSON or YAML: publisher, appliances with
    /// each image's sha256, size_bytes and url relative to the index) with a
    /// key from `catalog keygen`; prints the signed catalog to serve.
    Sign {
        index: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
}

impl CatalogCmd {
    /// Whether the command works without a control plane.
    pub fn offline(&self) -> bool {
        matches!(self, CatalogCmd::Keygen { .. } | CatalogCmd::Sign { .. })
    }
}

fn read_key(path: &std::path::Path) -> anyhow::Result<ed25519_dalek::SigningKey> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let bytes = hex::decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{} is not a signing key (64 hex digits, from `virt8ra catalog keygen`)",
                path.display()
            )
        })?;
    Ok(ed25519_dalek::SigningKey::from_bytes(&bytes))
}

/// `catalog keygen` and `catalog sign`, which need no control plane.
pub fn catalog_offline(o: Format, cmd: CatalogCmd) -> anyhow::Result<()> {
    use ed25519_dalek::Signer;
    match cmd {
        CatalogCmd::Keygen { file } => {
            use std::os::unix::fs::OpenOptionsExt;
            let mut secret = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
                .with_context(|| format!("create {} (it must not exist yet)", file.display()))?;
            f.write_all(hex::encode(secret).as_bytes())?;
            f.sync_all()?;
            let public = hex::encode(
                ed25519_dalek::SigningKey::from_bytes(&secret)
                    .verifying_key()
                    .to_bytes(),
            );
            emit(o, &serde_json::json!({ "public_key": public }), |_| {
                println!("{public}")
            })
        }
        CatalogCmd::Sign { index, key } => {
            let key = read_key(&key)?;
            let text = std::fs::read_to_string(&index)
                .with_context(|| format!("read {}", index.display()))?;
            let mut v: serde_json::Value = serde_yaml::from_str(&text)
                .with_context(|| format!("{} is not valid JSON or YAML", index.display()))?;
            if let Some(m) = v.as_object_mut() {
                m.entry("generated_at")
                    .or_insert_with(|| serde_json::json!(chrono::Utc::now()));
            }
            let idx: CatalogIndex = serde_json::from_value(v)
                .with_context(|| format!("{} is not a catalog index", index.display()))?;
            for a in &idx.appliances {
                a.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
                for i in &a.images {
                    let ok =
                        i.sha256.len() == 64 && i.sha256.bytes().all(|b| b.is_ascii_hexdigit());
                    if !ok || i.url.is_none() || i.size_bytes == 0 {
                        bail!(
                            "appliance {}: image {} needs sha256, size_bytes and url",
                            a.key(),
                            i.name
                        );
                    }
                }
            }
            let payload = serde_json::to_string(&idx)?;
            let signed = SignedCatalog {
                signature: hex::encode(key.sign(payload.as_bytes()).to_bytes()),
                public_key: hex::encode(key.verifying_key().to_bytes()),
                payload,
            };
            println!("{}", serde_json::to_string_pretty(&signed)?);
            Ok(())
        }
        other => bail!("{other:?} needs the control plane"),
    }
}

fn show_app(a: &App) {
    fields(vec![
        ("name", a.name.clone()),
        ("appliance", a.appliance.clone()),
        ("status", a.status.clone()),
        (
            "params",
            a.params
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        (
            "ssh keys",
            crate::vm::ssh_key_summary(&a.ssh_authorized_keys),
        ),
    ]);
    println!();
    table(
        &["location", "kind", "running", "status"],
        a.locations
            .iter()
            .map(|l| {
                vec![
                    l.location.clone(),
                    format!("{:?}", l.kind).to_lowercase(),
                    format!("{}/{}", l.running, l.replicas),
                    l.status.clone(),
                ]
            })
            .collect(),
    );
    println!();
    table(
        &["vm", "location", "phase", "site", "country", "ports"],
        a.vms
            .iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    v.location.clone(),
                    v.phase.as_str().into(),
                    v.site.clone().unwrap_or("-".into()),
                    v.country.clone().unwrap_or("-".into()),
                    v.ports
                        .iter()
                        .map(|p| format!("{}->{}", p.host_addr, p.guest_port))
                        .collect::<Vec<_>>()
                        .join(","),
                ]
            })
            .collect(),
    );
}

fn parse_params(raw: &[String]) -> anyhow::Result<BTreeMap<String, serde_json::Value>> {
    let mut out = BTreeMap::new();
    for p in raw {
        let Some((k, v)) = p.split_once('=') else {
            bail!("--param {p:?}: write KEY=VALUE");
        };
        if out
            .insert(
                k.trim().to_string(),
                serde_json::Value::String(v.to_string()),
            )
            .is_some()
        {
            bail!("--param {k} is given twice");
        }
    }
    Ok(out)
}

pub async fn app(c: &Client, o: Format, cmd: AppCmd) -> anyhow::Result<()> {
    match cmd {
        AppCmd::Deploy {
            appliance,
            name,
            locations,
            replicas_per_location,
            params,
            ssh_keys,
            wait,
            wait_timeout,
        } => {
            let req = AppCreate {
                name: name.clone(),
                appliance,
                locations: locations.iter().map(|l| l.trim().to_string()).collect(),
                replicas_per_location,
                params: parse_params(&params)?,
                labels: BTreeMap::new(),
                ssh_authorized_keys: crate::vm::ssh_keys(&ssh_keys)?,
            };
            let mut a: App = c.post("/apps", &req).await?;
            if wait {
                a = wait_running(c, &a.name, wait_timeout, o).await?;
            }
            emit(o, &a, show_app)
        }
        AppCmd::List => {
            let apps: Vec<App> = c.get("/apps").await?;
            emit(o, &apps, |apps| {
                table(
                    &["name", "appliance", "locations", "vms", "status"],
                    apps.iter()
                        .map(|a| {
                            vec![
                                a.name.clone(),
                                a.appliance.clone(),
                                a.locations
                                    .iter()
                                    .map(|l| format!("{}:{}", l.location, l.status))
                                    .collect::<Vec<_>>()
                                    .join(" "),
                                a.vms.len().to_string(),
                                a.status.clone(),
                            ]
                        })
                        .collect(),
                )
            })
        }
        AppCmd::Show { name } => {
            let a: App = c.get(&format!("/apps/{}", seg(&name))).await?;
            emit(o, &a, show_app)
        }
        AppCmd::Delete {
            name,
            wait,
            wait_timeout,
        } => {
            let a: Option<serde_json::Value> = c.delete(&format!("/apps/{}", seg(&name))).await?;
            if wait {
                let start = Instant::now();
                while c
                    .get_opt::<App>(&format!("/apps/{}", seg(&name)))
                    .await?
                    .is_some()
                {
                    if start.elapsed() > Duration::from_secs(wait_timeout) {
                        bail!("gave up after {wait_timeout} s: app {name} is still being deleted");
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
            let msg = if wait {
                format!("app {name} deleted")
            } else {
                format!("app {name}: deletion under way")
            };
            match o {
                Format::Table => {
                    println!("{msg}");
                    Ok(())
                }
                _ => emit(o, &serde_json::json!({"result": msg, "app": a}), |_| {}),
            }
        }
    }
}

async fn wait_running(c: &Client, name: &str, timeout: u64, o: Format) -> anyhow::Result<App> {
    let start = Instant::now();
    let mut progress = Progress::stderr(o);
    loop {
        let a: App = c.get(&format!("/apps/{}", seg(name))).await?;
        let running: u32 = a.locations.iter().map(|l| l.running).sum();
        let total: u32 = a.locations.iter().map(|l| l.replicas).sum();
        progress.update(
            &format!("{name}: {running}/{total} running"),
            &format!(" ({}s)", start.elapsed().as_secs()),
        );
        match a.status.as_str() {
            "running" => {
                progress.finish();
                return Ok(a);
            }
            "failed" => {
                progress.finish();
                let why: Vec<String> = a
                    .vms
                    .iter()
                    .filter(|v| v.phase == VmPhase::Failed)
                    .map(|v| {
                        format!(
                            "{}: {}",
                            v.name,
                            v.last_error
                                .clone()
                                .unwrap_or_else(|| "no reason given".into())
                        )
                    })
                    .collect();
                bail!("app {name} failed: {}", why.join("; "));
            }
            _ => {}
        }
        if start.elapsed() > Duration::from_secs(timeout) {
            progress.finish();
            let waiting: Vec<String> = a
                .vms
                .iter()
                .filter(|v| v.phase != VmPhase::Running)
                .map(|v| format!("{} is {}", v.name, v.phase.as_str()))
                .collect();
            bail!("gave up after {timeout} s: {}", waiting.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn appliance(c: &Client, o: Format, cmd: ApplianceCmd) -> anyhow::Result<()> {
    let show = |e: &CatalogEntry| {
        let a = &e.appliance;
        fields(vec![
            ("name", a.name.clone()),
            ("version", a.version.clone()),
            ("catalog", e.catalog.clone()),
            ("description", a.description.clone()),
            (
                "images",
                a.images
                    .iter()
                    .map(|i| {
                        format!(
                            "{} ({})",
                            i.name,
                            &i.sha256.chars().take(12).collect::<String>()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            (
                "template",
                format!(
                    "{} vCPU, {} MiB, {} GiB, ports {:?}",
                    a.template.vcpus, a.template.memory_mib, a.template.disk_gib, a.template.ports
                ),
            ),
            (
                "parameters",
                a.parameters
                    .iter()
                    .map(|p| {
                        format!(
                            "{} ({}{})",
                            p.name,
                            format!("{:?}", p.kind).to_lowercase(),
                            p.default
                                .as_ref()
                                .map(|d| format!(", default {d}"))
                                .unwrap_or_default()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        ])
    };
    match cmd {
        ApplianceCmd::Publish { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("read {}", file.display()))?;
            let a: serde_json::Value = serde_yaml::from_str(&text)
                .with_context(|| format!("{} is not valid JSON or YAML", file.display()))?;
            let a: Appliance = c.post("/appliances", &a).await?;
            emit(o, &a, |a| {
                println!("published {}", a.key());
                for (i, img) in a.images.iter().enumerate() {
                    let role = if i == 0 { "boot disk" } else { "data disk" };
                    println!("  {role}: {} sha256 {}", img.name, img.sha256);
                }
            })
        }
        ApplianceCmd::List => {
            let list: Vec<CatalogEntry> = c.get("/appliances").await?;
            emit(o, &list, |l| {
                table(
                    &["name", "version", "catalog", "description"],
                    l.iter()
                        .map(|e| {
                            vec![
                                e.appliance.name.clone(),
                                e.appliance.version.clone(),
                                e.catalog.clone(),
                                e.appliance
                                    .description
                                    .lines()
                                    .next()
                                    .unwrap_or("")
                                    .to_string(),
                            ]
                        })
                        .collect(),
                )
            })
        }
        ApplianceCmd::Show { name } => {
            let e: CatalogEntry = c.get(&format!("/appliances/{}", seg(&name))).await?;
            emit(o, &e, show)
        }
        ApplianceCmd::Delete { name } => {
            c.delete(&format!("/appliances/{}", seg(&name))).await?;
            crate::output::done(o, &format!("appliance {name} withdrawn"))
        }
    }
}

pub async fn catalog(c: &Client, o: Format, cmd: CatalogCmd) -> anyhow::Result<()> {
    let show = |k: &Catalog| {
        fields(vec![
            ("name", k.name.clone()),
            ("url", k.url.clone()),
            ("public key", k.public_key.clone()),
            (
                "appliances",
                k.appliances
                    .iter()
                    .map(|a| a.key())
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            ("fetched", k.fetched_at.to_rfc3339()),
        ])
    };
    match cmd {
        CatalogCmd::Add {
            name,
            index_url,
            key,
        } => {
            let k: Catalog = c
                .post(
                    "/catalogs",
                    &CatalogCreate {
                        name,
                        url: index_url,
                        public_key: key,
                    },
                )
                .await?;
            emit(o, &k, show)
        }
        CatalogCmd::List => {
            let l: Vec<Catalog> = c.get("/catalogs").await?;
            emit(o, &l, |l| {
                table(
                    &["name", "url", "appliances"],
                    l.iter()
                        .map(|k| {
                            vec![
                                k.name.clone(),
                                k.url.clone(),
                                k.appliances.len().to_string(),
                            ]
                        })
                        .collect(),
                )
            })
        }
        CatalogCmd::Refresh { name } => {
            let k: Catalog = c
                .post(
                    &format!("/catalogs/{}/refresh", seg(&name)),
                    &serde_json::json!({}),
                )
                .await?;
            emit(o, &k, show)
        }
        CatalogCmd::Remove { name } => {
            c.delete(&format!("/catalogs/{}", seg(&name))).await?;
            crate::output::done(o, &format!("catalog {name} removed"))
        }
        CatalogCmd::Keygen { .. } | CatalogCmd::Sign { .. } => catalog_offline(o, cmd),
        CatalogCmd::Key => {
            let v: serde_json::Value = c.get("/catalog/key").await?;
            let url = format!("{}/api/v1/catalog", c.base());
            let out = serde_json::json!({"url": url, "public_key": v["public_key"]});
            emit(o, &out, |out| {
                fields(vec![
                    ("url", url.clone()),
                    (
                        "public key",
                        out["public_key"].as_str().unwrap_or("-").to_string(),
                    ),
                ])
            })
        }
    }
}
