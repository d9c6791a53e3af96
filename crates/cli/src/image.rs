//! `virt8ra image`: base disks for VMs.

use std::path::PathBuf;

use anyhow::bail;
use clap::Subcommand;
use virt8ra_api::*;

use crate::client::{seg, Client};
use crate::output::{done, emit, fields, table, Format};

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Import a disk image (qcow2, raw, VMDK, VHD, VHDX) from a file or an
    /// http(s) URL; it is stored as qcow2.
    Import {
        /// A local file (or give --url).
        file: Option<PathBuf>,
        #[arg(long)]
        name: String,
        #[arg(long)]
        arch: Option<String>,
        /// Version tag, e.g. 1.0.0.
        #[arg(long)]
        version: Option<String>,
        /// Have the control plane download it from this http(s) URL.
        #[arg(long = "from-url", conflicts_with = "file")]
        from_url: Option<String>,
        /// With --from-url: refuse the download unless its sha256 is this.
        #[arg(long, requires = "from_url")]
        sha256: Option<String>,
    },
    /// Pre-stage an image at sites: each site's image cache host fetches it
    /// once, and the site's other hosts get it from there.
    Replicate {
        name: String,
        /// Comma-separated site names.
        #[arg(long, value_delimiter = ',', required = true)]
        sites: Vec<String>,
    },
    /// Bytes of image data the control plane sent to hosts (the long link).
    Transfers,
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
}

pub(crate) async fn image(c: &Client, o: Format, cmd: ImageCmd) -> anyhow::Result<()> {
    let show = |i: &Image| {
        fields(vec![
            ("name", i.name.clone()),
            ("id", i.id.clone()),
            ("sha256", i.sha256.clone()),
            (
                "format",
                format!("{} (imported as {})", i.format, i.source_format),
            ),
            ("size", format!("{} bytes", i.size_bytes)),
            ("virtual size", format!("{} bytes", i.virtual_size_bytes)),
            ("arch", i.arch.clone()),
            ("version", i.version.clone().unwrap_or("-".into())),
            ("provenance", i.provenance.clone().unwrap_or("-".into())),
            (
                "staged at",
                if i.sites.is_empty() {
                    "-".into()
                } else {
                    i.sites.join(", ")
                },
            ),
        ])
    };
    match cmd {
        ImageCmd::Import {
            file: None,
            name,
            arch,
            version,
            from_url,
            sha256,
        } => {
            let Some(url) = from_url else {
                bail!("give a file to import, or --from-url URL");
            };
            let i: Image = c
                .post(
                    "/images/import",
                    &ImageImportUrl {
                        name,
                        url,
                        sha256,
                        arch,
                        version,
                    },
                )
                .await?;
            emit(o, &i, show)
        }
        ImageCmd::Replicate { name, sites } => {
            let i: Image = c
                .post(
                    &format!("/images/{}/replicate", seg(&name)),
                    &ImageReplicate { sites },
                )
                .await?;
            emit(o, &i, |i| {
                println!("image {} is being staged at {}", i.name, i.sites.join(", "))
            })
        }
        ImageCmd::Transfers => {
            let t: ImageTransfers = c.get("/images/transfers").await?;
            emit(o, &t, |t| {
                fields(vec![("long link", format!("{} bytes", t.long_link_bytes))]);
                for (h, n) in &t.long_link_bytes_by_host {
                    println!("  {h}: {n} bytes");
                }
            })
        }
        ImageCmd::Import {
            file: Some(file),
            name,
            arch,
            version,
            ..
        } => {
            if !file.is_file() {
                bail!("{} is not a file", file.display());
            }
            let mut path = format!("/images?name={}", seg(&name));
            if let Some(a) = arch {
                path.push_str(&format!("&arch={}", seg(&a)));
            }
            if let Some(v) = version {
                path.push_str(&format!("&version={}", seg(&v)));
            }
            if o == Format::Table {
                eprintln!("uploading {} ...", file.display());
            }
            let i: Image = c.upload(&path, &file).await?;
            emit(o, &i, show)
        }
        ImageCmd::List => {
            let page: Page<Image> = c.get("/images").await?;
            emit(o, &page.items, |is| {
                table(
                    &["name", "sha256", "size", "arch"],
                    is.iter()
                        .map(|i| {
                            vec![
                                i.name.clone(),
                                i.sha256.chars().take(12).collect(),
                                format!("{:.1} MiB", i.size_bytes as f64 / 1048576.0),
                                i.arch.clone(),
                            ]
                        })
                        .collect(),
                )
            })
        }
        ImageCmd::Show { name } => {
            let i: Image = c.get(&format!("/images/{}", seg(&name))).await?;
            emit(o, &i, show)
        }
        ImageCmd::Delete { name } => {
            c.delete(&format!("/images/{}", seg(&name))).await?;
            done(o, &format!("image {name} deleted"))
        }
    }
}
