//! `virt8ra site`: core and edge locations of providers.

use anyhow::bail;
use clap::Subcommand;
use virt8ra_api::*;

use crate::client::{seg, Client};
use crate::output::{done, emit, fields, opt, table, Format};
use crate::{migrate, WaitOpts};

#[derive(Debug, Subcommand)]
pub enum SiteCmd {
    Create {
        name: String,
        #[arg(long)]
        provider: String,
        #[arg(long)]
        country: String,
        #[arg(long)]
        city: String,
        #[arg(long, allow_negative_numbers = true)]
        lat: f64,
        #[arg(long, allow_negative_numbers = true)]
        lon: f64,
        /// core or edge.
        #[arg(long, default_value = "core")]
        tier: String,
        /// Grid carbon intensity, gCO2eq/kWh.
        #[arg(long)]
        carbon: Option<f64>,
        #[arg(long)]
        pue: Option<f64>,
        /// EUR per vCPU-hour.
        #[arg(long)]
        price_vcpu_hour: Option<f64>,
        /// EUR per GiB-hour.
        #[arg(long)]
        price_gib_hour: Option<f64>,
        /// EUR per GiB of disk per hour (showback).
        #[arg(long)]
        price_disk_gib_hour: Option<f64>,
        /// A label placement rules can select on, KEY=VALUE (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// The network between the site's hosts is trusted: virtual
        /// networks use plain VXLAN between them instead of the encrypted
        /// tunnels used everywhere else.
        #[arg(long)]
        trusted_fabric: bool,
    },
    List,
    Show {
        name: String,
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
}

pub(crate) async fn site(c: &Client, o: Format, cmd: SiteCmd) -> anyhow::Result<()> {
    let show = |s: &Site| {
        fields(vec![
            ("name", s.name.clone()),
            ("id", s.id.clone()),
            ("provider", s.provider.clone()),
            ("country", s.country.clone()),
            ("city", s.city.clone()),
            ("location", format!("{:.4}, {:.4}", s.latitude, s.longitude)),
            ("tier", s.tier.as_str().into()),
            ("carbon gCO2/kWh", opt(&s.facts.grid_gco2_per_kwh)),
            ("pue", opt(&s.facts.pue)),
            (
                "trusted fabric",
                if s.trusted_fabric {
                    "yes (plain VXLAN)"
                } else {
                    "no (encrypted)"
                }
                .into(),
            ),
        ])
    };
    match cmd {
        SiteCmd::Create {
            name,
            provider,
            country,
            city,
            lat,
            lon,
            tier,
            carbon,
            pue,
            price_vcpu_hour,
            price_gib_hour,
            price_disk_gib_hour,
            labels,
            trusted_fabric,
        } => {
            let mut label_map = std::collections::BTreeMap::new();
            for l in &labels {
                let Some((k, v)) = l.split_once('=') else {
                    bail!("label {l:?} must be KEY=VALUE");
                };
                label_map.insert(k.to_string(), v.to_string());
            }
            let tier = match tier.as_str() {
                "core" => Tier::Core,
                "edge" => Tier::Edge,
                t => bail!("unknown tier {t:?}: use core or edge"),
            };
            let s: Site = c
                .post(
                    "/sites",
                    &SiteCreate {
                        name,
                        provider,
                        country,
                        city,
                        latitude: lat,
                        longitude: lon,
                        tier,
                        facts: SiteFacts {
                            grid_gco2_per_kwh: carbon,
                            pue,
                            price_vcpu_hour,
                            price_gib_hour,
                            price_disk_gib_hour,
                            access_latency_ms: None,
                        },
                        labels: label_map,
                        trusted_fabric,
                    },
                )
                .await?;
            emit(o, &s, show)
        }
        SiteCmd::List => {
            let page: Page<Site> = c.get("/sites").await?;
            emit(o, &page.items, |ss| {
                table(
                    &["name", "provider", "country", "city", "tier", "gco2/kwh"],
                    ss.iter()
                        .map(|s| {
                            vec![
                                s.name.clone(),
                                s.provider.clone(),
                                s.country.clone(),
                                s.city.clone(),
                                s.tier.as_str().into(),
                                opt(&s.facts.grid_gco2_per_kwh),
                            ]
                        })
                        .collect(),
                )
            })
        }
        SiteCmd::Show { name } => {
            let s: Site = c.get(&format!("/sites/{}", seg(&name))).await?;
            emit(o, &s, show)
        }
        SiteCmd::Delete { name } => {
            c.delete(&format!("/sites/{}", seg(&name))).await?;
            done(o, &format!("site {name} deleted"))
        }
        SiteCmd::Evacuate { name, mode, wait } => {
            migrate::evacuate(c, o, "sites", &name, &mode, wait.timeout()).await
        }
    }
}
