//! `virt8ra provider`: operators that own sites.

use clap::Subcommand;
use virt8ra_api::*;

use crate::client::{seg, Client};
use crate::output::{done, emit, fields, table, Format};
use crate::{migrate, WaitOpts};

#[derive(Debug, Subcommand)]
pub enum ProviderCmd {
    Create {
        name: String,
        /// ISO country code of the provider's legal seat, e.g. DE.
        #[arg(long)]
        country: String,
        /// Jurisdiction, e.g. EU.
        #[arg(long, default_value = "EU")]
        jurisdiction: String,
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

pub(crate) async fn provider(c: &Client, o: Format, cmd: ProviderCmd) -> anyhow::Result<()> {
    let show = |p: &Provider| {
        fields(vec![
            ("name", p.name.clone()),
            ("id", p.id.clone()),
            ("country", p.country.clone()),
            ("jurisdiction", p.jurisdiction.clone()),
        ])
    };
    match cmd {
        ProviderCmd::Create {
            name,
            country,
            jurisdiction,
        } => {
            let p: Provider = c
                .post(
                    "/providers",
                    &ProviderCreate {
                        name,
                        country,
                        jurisdiction,
                        labels: Default::default(),
                    },
                )
                .await?;
            emit(o, &p, show)
        }
        ProviderCmd::List => {
            let page: Page<Provider> = c.get("/providers").await?;
            emit(o, &page.items, |ps| {
                table(
                    &["name", "country", "jurisdiction"],
                    ps.iter()
                        .map(|p| vec![p.name.clone(), p.country.clone(), p.jurisdiction.clone()])
                        .collect(),
                )
            })
        }
        ProviderCmd::Show { name } => {
            let p: Provider = c.get(&format!("/providers/{}", seg(&name))).await?;
            emit(o, &p, show)
        }
        ProviderCmd::Delete { name } => {
            c.delete(&format!("/providers/{}", seg(&name))).await?;
            done(o, &format!("provider {name} deleted"))
        }
        ProviderCmd::Evacuate { name, mode, wait } => {
            migrate::evacuate(c, o, "providers", &name, &mode, wait.timeout()).await
        }
    }
}
