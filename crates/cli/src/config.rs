//! Where the CLI finds the control plane: flags, environment, config file.

use std::path::PathBuf;

use crate::client::Client;
use crate::GlobalOpts;

#[derive(Debug, Default, serde::Deserialize)]
struct ConfigFile {
    url: Option<String>,
    token: Option<String>,
    /// A relative path is relative to the config file's directory.
    ca_cert: Option<PathBuf>,
}

fn config_file() -> ConfigFile {
    let Some(home) = std::env::var_os("HOME") else {
        return ConfigFile::default();
    };
    let dir = PathBuf::from(home).join(".config/virt8ra");
    let mut cfg: ConfigFile = std::fs::read_to_string(dir.join("config.yaml"))
        .ok()
        .and_then(|s| serde_yaml::from_str(&s).ok())
        .unwrap_or_default();
    cfg.ca_cert = cfg.ca_cert.map(|p| dir.join(p));
    cfg
}

/// How the CLI is told to trust a control plane's certificate.
const CA_HINT: &str =
    "pass --ca-cert FILE, set VIRT8RA_CA_CERT or put ca_cert: in ~/.config/virt8ra/config.yaml: the CA that signed it";

/// The global `--ca-cert`, else `VIRT8RA_CA_CERT` (for `server` and `agent`,
/// which do not read the CLI's config file).
pub fn ca_cert(g: &GlobalOpts) -> Option<PathBuf> {
    g.ca_cert
        .clone()
        .or_else(|| std::env::var_os("VIRT8RA_CA_CERT").map(PathBuf::from))
        .filter(|p| !p.as_os_str().is_empty())
}

pub(crate) fn connect(g: &GlobalOpts) -> anyhow::Result<Client> {
    let cfg = config_file();
    let url = g
        .url
        .clone()
        .or_else(|| std::env::var("VIRT8RA_URL").ok())
        .or(cfg.url)
        .unwrap_or_else(|| "http://127.0.0.1:8480".into());
    let token = g
        .token
        .clone()
        .or_else(|| std::env::var("VIRT8RA_TOKEN").ok())
        .or(cfg.token)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no API token: set VIRT8RA_TOKEN (the server writes the admin token to DATA_DIR/admin.token)"
            )
        })?;
    let ca = ca_cert(g).or(cfg.ca_cert);
    let trust = virt8ra_tls::Trust::new(ca.as_deref(), CA_HINT)?;
    let project = g
        .project
        .clone()
        .or_else(|| std::env::var("VIRT8RA_PROJECT").ok());
    Ok(Client::new(&url, token.trim(), trust)?.with_project(project))
}
