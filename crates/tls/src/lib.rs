//! Trust for every TLS client in virt8ra.
//!
//! The CLI, the agent and the control plane's own outbound fetches (catalog
//! URLs, `image import --from-url`) all build their HTTP and WebSocket
//! clients from one [`Trust`]: the public web PKI roots, bundled at build
//! time (`webpki-roots`, so no network and no system store are needed), plus
//! the operator's own CA when one is given (`--ca-cert FILE`). A client built
//! any other way would trust nothing or something else, so `clippy.toml`
//! bans the direct constructors outside this crate.
//!
//! Certificate problems come back in plain words through [`Trust::explain`]
//! ("TLS: the certificate of 127.0.0.1 is not trusted (pass --ca-cert FILE, the CA that signed it)"),
//! since the error chains of reqwest and tungstenite bury them several
//! levels deep.
//!
//! The crypto provider is rustls' `ring` (it builds with a C compiler alone).

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{CertificateError, RootCertStore};

pub use rustls;

#[cfg(any(test, feature = "test-pki"))]
pub mod testing;

/// A WebSocket dialled through [`Trust::connect_ws`].
pub type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Why a CA file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("CA certificate {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CA certificate {}: {msg}", path.display())]
    Invalid { path: PathBuf, msg: String },
    #[error("TLS client: {0}")]
    Client(String),
}

/// The certificates a client trusts, and the clients built with them.
/// Cheap to clone.
#[derive(Clone)]
pub struct Trust {
    config: Arc<rustls::ClientConfig>,
    /// The operator's CA file, if one was given.
    ca: Option<PathBuf>,
    /// How to fix an untrusted certificate, for messages: e.g. "pass
    /// --ca-cert FILE, the CA that signed it".
    hint: &'static str,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

/// The ring provider, explicitly: no process-wide default is needed.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(roots: RootCertStore) -> Result<rustls::ClientConfig, TrustError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TrustError::Client(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // HTTP/1.1 only: WebSockets (the agent channel, the relay) upgrade it,
    // and the control plane speaks nothing else.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

fn public_roots() -> RootCertStore {
    RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

/// Reads every certificate of a PEM file (at least one).
pub fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TrustError> {
    let pem = std::fs::read(path).map_err(|source| TrustError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TrustError::Invalid {
            path: path.to_path_buf(),
            msg: format!("not PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TrustError::Invalid {
            path: path.to_path_buf(),
            msg: "no CERTIFICATE block in the file (expected PEM)".into(),
        });
    }
    Ok(certs)
}

impl Trust {
    /// The public web PKI roots only. Built once per process.
    pub fn public() -> Trust {
        static PUBLIC: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
        let config = PUBLIC
            .get_or_init(|| {
                Arc::new(
                    client_config(public_roots())
                        .expect("the ring provider supports the default TLS versions"),
                )
            })
            .clone();
        Trust {
            config,
            ca: None,
            hint: "pass --ca-cert FILE, the CA that signed it",
        }
    }

    /// The public roots plus every certificate in `ca` (a PEM file of the
    /// operator's CA, or of a self-signed server certificate), if given.
    /// `hint` tells the user how to pass a CA, for error messages.
    pub fn new(ca: Option<&Path>, hint: &'static str) -> Result<Trust, TrustError> {
        let Some(path) = ca else {
            return Ok(Trust {
                hint,
                ..Trust::public()
            });
        };
        let mut roots = public_roots();
        for cert in read_pem_certs(path)? {
            roots.add(cert).map_err(|e| TrustError::Invalid {
                path: path.to_path_buf(),
                msg: format!("not a usable CA certificate: {e}"),
            })?;
        }
        Ok(Trust {
            config: Arc::new(client_config(roots)?),
            ca: Some(path.to_path_buf()),
            hint,
        })
    }

    /// The operator CA file this trust includes, if any.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca.as_deref()
    }

    /// The rustls configuration (for a client this crate does not build).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.config.clone()
    }

    /// A reqwest client builder that trusts exactly these certificates;
    /// add timeouts and build it.
    #[allow(clippy::disallowed_methods)] // the one place clients are built
    pub fn http(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder().use_preconfigured_tls((*self.config).clone())
    }

    /// A reqwest client with these certificates and no timeouts.
    pub fn http_client(&self) -> Result<reqwest::Client, TrustError> {
        self.http()
            .build()
            .map_err(|e| TrustError::Client(error_chain(&e)))
    }

    /// Dials a WebSocket (`ws://` or `wss://`) trusting these certificates.
    #[allow(clippy::disallowed_methods)] // the one place WebSockets are dialled
    pub async fn connect_ws<R>(
        &self,
        req: R,
        config: Option<tokio_tungstenite::tungstenite::protocol::WebSocketConfig>,
    ) -> Result<
        (
            WebSocket,
            tokio_tungstenite::tungstenite::handshake::client::Response,
        ),
        tokio_tungstenite::tungstenite::Error,
    >
    where
        R: tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
    {
        tokio_tungstenite::connect_async_tls_with_config(
            req,
            config,
            false,
            Some(tokio_tungstenite::Connector::Rustls(self.config.clone())),
        )
        .await
    }

    /// A sentence for a TLS failure somewhere in `err`'s chain while talking
    /// to `url`, or `None` if the failure has nothing to do with TLS.
    pub fn explain(&self, err: &(dyn StdError + 'static), url: &str) -> Option<String> {
        let host = host_of(url);
        let e = find_rustls(err)?;
        let untrusted = || {
            match &self.ca {
            None => format!(
                "TLS: the certificate of {host} is not trusted ({})",
                self.hint
            ),
            Some(ca) => format!(
                "TLS: the certificate of {host} is not trusted: neither a public root nor the CA in {} signed it",
                ca.display()
            ),
        }
        };
        Some(match e {
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => untrusted(),
                CertificateError::NotValidForName => {
                    format!("TLS: the certificate of {host} is not valid for the name {host}")
                }
                CertificateError::NotValidForNameContext { presented, .. } => format!(
                    "TLS: the certificate of {host} is not valid for the name {host} (it names {})",
                    if presented.is_empty() {
                        "nothing".to_string()
                    } else {
                        presented.join(", ")
                    }
                ),
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    format!("TLS: the certificate of {host} has expired")
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    format!("TLS: the certificate of {host} is not valid yet (check the clocks)")
                }
                CertificateError::Revoked => format!("TLS: the certificate of {host} is revoked"),
                other => format!("TLS: the certificate of {host} is refused: {other:?}"),
            },
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
                format!(
                    "TLS: {host} does not speak TLS on this port (is it serving plain http? then use an http:// URL)"
                )
            }
            rustls::Error::AlertReceived(a) => {
                format!("TLS: {host} refused the connection ({a:?})")
            }
            other => format!("TLS: connection to {host} failed: {other}"),
        })
    }

    /// [`Trust::explain`], or else the whole error chain on one line.
    pub fn describe(&self, err: &(dyn StdError + 'static), url: &str) -> String {
        self.explain(err, url)
            .unwrap_or_else(|| error_chain_dyn(err))
    }
}

/// An error and its sources on one line ("a: b: c"), without repeats.
pub fn error_chain<E: StdError + 'static>(e: &E) -> String {
    error_chain_dyn(e)
}

fn error_chain_dyn(e: &(dyn StdError + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = s.source();
    }
    out
}

/// The rustls error somewhere in `err`'s chain. `std::io::Error` hides the
/// error it wraps from `source()` (it returns the inner error's source), so
/// each I/O error is opened with `get_ref` as well.
fn find_rustls<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(r) = find_rustls(inner) {
                    return Some(r);
                }
            }
        }
        if let Some(tokio_tungstenite::tungstenite::Error::Tls(
            tokio_tungstenite::tungstenite::error::TlsError::Rustls(r),
        )) = e.downcast_ref::<tokio_tungstenite::tungstenite::Error>()
        {
            return Some(r);
        }
        cur = e.source();
    }
    None
}

/// The host of a URL, for messages (the URL itself if it has none).
fn host_of(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_string()))
        .unwrap_or_else(|| url.to_string())
}

#[cfg(test)]
mod tests;
