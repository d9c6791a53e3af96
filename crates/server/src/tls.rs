//! HTTPS for the control plane (`virt8ra server --tls-cert FILE --tls-key FILE`).
//!
//! Everything the control plane serves — the API, the agents' WebSocket
//! channel and its mux extension, migration relays, image and staging
//! transfers — goes through one listener, so serving TLS there makes all of
//! it HTTPS and WSS. The accept loop ([`crate::serve`]) runs each TLS
//! handshake ([`handshake`]) in the connection's own task, with a timeout
//! (`--header-timeout`), so a slow or failing client never holds up the
//! others.
//!
//! A client that speaks plain HTTP to the TLS port gets a plain-HTTP 400
//! saying to use `https://` (an API error body the CLI prints), not a hang
//! or a bare reset.
//!
//! The certificate and key are PEM files (the chain with the server's
//! certificate first; a PKCS#8, PKCS#1 or SEC1 key). They are checked
//! against each other at start, and read again on SIGHUP
//! ([`ServerTls::reload`]): a renewed certificate takes effect for new
//! connections without a restart; a bad one is refused and the old one kept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's certificate, reloadable.
pub struct ServerTls {
    cert: PathBuf,
    key: PathBuf,
    current: Arc<Current>,
    config: Arc<rustls::ServerConfig>,
}

/// The certificate handed to every new handshake.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// Reads and checks a certificate chain and its key.
fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    let pem = std::fs::read(cert).with_context(|| format!("--tls-cert {}", cert.display()))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--tls-cert {}: not PEM: {e}", cert.display()))?;
    if chain.is_empty() {
        bail!(
            "--tls-cert {}: no CERTIFICATE block (expected a PEM chain, the server's certificate first)",
            cert.display()
        );
    }
    let pem = std::fs::read(key).with_context(|| format!("--tls-key {}", key.display()))?;
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => anyhow::anyhow!(
            "--tls-key {}: no private key in the file (expected PEM: PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)",
            key.display()
        ),
        e => anyhow::anyhow!("--tls-key {}: not PEM: {e}", key.display()),
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| anyhow::anyhow!("--tls-key {}: not a usable key: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => bail!(
            "--tls-key {} does not belong to the certificate in {} (the first certificate must be the server's own)",
            key.display(),
            cert.display()
        ),
        Err(e) => bail!(
            "--tls-cert {}: the server's certificate cannot be read: {e}",
            cert.display()
        ),
    }
    Ok(Arc::new(certified))
}

impl ServerTls {
    /// Loads `cert` and `key`, or says in one line what is wrong with them.
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<ServerTls> {
        let current = Arc::new(Current(RwLock::new(load(cert, key)?)));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        // HTTP/1.1: the WebSocket upgrades (agent channel, relay) need it.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current,
            config: Arc::new(config),
        })
    }

    /// Reads the files again; new connections get the new certificate. On
    /// an error the current one stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let fresh = load(&self.cert, &self.key)?;
        *self.current.0.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.clone())
    }
}

impl virt8ra_serve::Handshake for ServerTls {
    fn handshake(&self, tcp: TcpStream) -> virt8ra_serve::HandshakeFuture {
        let acceptor = self.acceptor();
        Box::pin(async move { handshake(&acceptor, tcp).await })
    }
}

/// The handshake, or `None` when the client spoke plain HTTP (it was
/// answered with a 400).
pub(crate) async fn handshake(
    acceptor: &TlsAcceptor,
    mut stream: TcpStream,
) -> std::io::Result<Option<TlsStream<TcpStream>>> {
    let mut first = [0u8; 1];
    if stream.peek(&mut first).await? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before the handshake",
        ));
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        refuse_plain_http(&mut stream).await;
        return Ok(None);
    }
    let _ = stream.set_nodelay(true);
    acceptor.accept(stream).await.map(Some)
}

/// Answers a plain-HTTP request on the TLS port with a 400 in the API's
/// error format, then closes.
async fn refuse_plain_http(stream: &mut TcpStream) {
    let body = r#"{"error":{"code":"https_required","message":"this control plane serves HTTPS on this port: use an https:// URL"}}"#;
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // Read the request first: closing with unread bytes would reset the
    // connection before the client reads the answer.
    let mut buf = vec![0u8; 16 << 10];
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await;
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use virt8ra_tls::testing::TestCa;

    #[test]
    fn certificate_and_key_problems_are_one_line_each() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("test CA");
        let a = ca.issue(dir.path(), "a", &["127.0.0.1"]);
        let b = ca.issue(dir.path(), "b", &["127.0.0.1"]);
        assert!(ServerTls::load(&a.cert, &a.key).is_ok());

        let err = |cert: &Path, key: &Path| {
            let e = format!("{:#}", ServerTls::load(cert, key).err().unwrap());
            assert!(!e.contains('\n'), "{e}");
            e
        };
        let e = err(&a.cert, &b.key);
        assert!(e.contains("does not belong to the certificate"), "{e}");
        let e = err(&dir.path().join("missing.crt"), &a.key);
        assert!(
            e.starts_with("--tls-cert ") && e.contains("missing.crt"),
            "{e}"
        );
        // Key and certificate swapped.
        let e = err(&a.key, &a.cert);
        assert!(e.contains("no CERTIFICATE block"), "{e}");
        let empty = dir.path().join("empty.key");
        std::fs::write(&empty, "").unwrap();
        let e = err(&a.cert, &empty);
        assert!(e.contains("no private key"), "{e}");
    }

    #[test]
    fn reload_keeps_the_old_certificate_when_the_new_one_is_bad() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("test CA");
        let a = ca.issue(dir.path(), "a", &["127.0.0.1"]);
        let tls = ServerTls::load(&a.cert, &a.key).unwrap();
        let before = tls.current.0.read().unwrap().cert[0].clone();
        // Renewed: a new certificate and key under the same file names.
        let renewed = ca.issue(dir.path(), "a", &["127.0.0.1", "localhost"]);
        tls.reload().unwrap();
        let after = tls.current.0.read().unwrap().cert[0].clone();
        assert_ne!(before, after);
        // A broken renewal is refused; the certificate in use stays.
        std::fs::write(&renewed.key, "").unwrap();
        assert!(tls.reload().is_err());
        assert_eq!(tls.current.0.read().unwrap().cert[0], after);
    }
}
