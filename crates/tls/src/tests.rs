//! Real sockets on loopback: a tiny HTTPS server with a certificate from a
//! test CA, and the clients built by [`Trust`].

use std::sync::Arc;

use rustls::pki_types::PrivateKeyDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::testing::{Issued, TestCa};

/// Serves `HTTP/1.1 200 ok` over TLS with `issued` until dropped; returns
/// the port.
async fn https_server(issued: &Issued) -> (u16, tokio::task::JoinHandle<()>) {
    let certs = read_pem_certs(&issued.cert).unwrap();
    let key = PrivateKeyDer::from_pem_file(&issued.key).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    (port, task)
}

async fn get(trust: &Trust, url: &str) -> Result<String, String> {
    let c = trust.http_client().unwrap();
    match c.get(url).send().await {
        Ok(r) => Ok(r.text().await.unwrap()),
        Err(e) => Err(trust.describe(&e, url)),
    }
}

#[tokio::test]
async fn a_server_signed_by_the_operator_ca_is_trusted_only_with_that_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let ca_file = ca.write(&dir.path().join("ca.pem"));
    let issued = ca.issue(dir.path(), "server", &["127.0.0.1", "localhost"]);
    let (port, _server) = https_server(&issued).await;

    let with_ca = Trust::new(Some(&ca_file), "pass --ca-cert").unwrap();
    for host in ["127.0.0.1", "localhost"] {
        let url = format!("https://{host}:{port}/");
        assert_eq!(get(&with_ca, &url).await.unwrap(), "ok", "{url}");
    }

    let url = format!("https://127.0.0.1:{port}/");
    let err = get(&Trust::public(), &url).await.unwrap_err();
    assert_eq!(
        err,
        "TLS: the certificate of 127.0.0.1 is not trusted (pass --ca-cert FILE, the CA that signed it)"
    );

    // Another CA does not vouch for it either, and the message names the file.
    let other = TestCa::new("other CA").write(&dir.path().join("other.pem"));
    let err = get(&Trust::new(Some(&other), "x").unwrap(), &url)
        .await
        .unwrap_err();
    assert!(err.contains("is not trusted"), "{err}");
    assert!(err.contains("other.pem"), "{err}");
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused_with_its_names() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let ca_file = ca.write(&dir.path().join("ca.pem"));
    let issued = ca.issue(dir.path(), "server", &["cp.example"]);
    let (port, _server) = https_server(&issued).await;
    let trust = Trust::new(Some(&ca_file), "pass --ca-cert").unwrap();
    let err = get(&trust, &format!("https://127.0.0.1:{port}/"))
        .await
        .unwrap_err();
    assert!(
        err.starts_with("TLS: the certificate of 127.0.0.1 is not valid for the name 127.0.0.1"),
        "{err}"
    );
    assert!(err.contains("cp.example"), "{err}");
}

#[tokio::test]
async fn https_to_a_plain_http_port_says_so() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            let mut buf = [0u8; 1024];
            let _ = tcp.read(&mut buf).await;
            let _ = tcp
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    });
    let err = get(&Trust::public(), &format!("https://127.0.0.1:{port}/"))
        .await
        .unwrap_err();
    assert!(
        err.starts_with("TLS: 127.0.0.1 does not speak TLS on this port"),
        "{err}"
    );
}

#[tokio::test]
async fn websockets_use_the_same_trust() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let ca_file = ca.write(&dir.path().join("ca.pem"));
    let issued = ca.issue(dir.path(), "server", &["127.0.0.1"]);
    let (port, _server) = https_server(&issued).await;
    let url = format!("wss://127.0.0.1:{port}/ws");
    // The TLS handshake succeeds with the CA; the tiny server then answers
    // 200 instead of 101, which is a WebSocket (not a TLS) failure.
    let with_ca = Trust::new(Some(&ca_file), "pass --ca-cert").unwrap();
    let err = with_ca.connect_ws(url.as_str(), None).await.unwrap_err();
    assert!(with_ca.explain(&err, &url).is_none(), "{err}");
    assert!(
        matches!(err, tokio_tungstenite::tungstenite::Error::Http(ref r) if r.status() == 200),
        "{err}"
    );
    let public = Trust::public();
    let err = public.connect_ws(url.as_str(), None).await.unwrap_err();
    assert_eq!(
        public.explain(&err, &url).as_deref(),
        Some("TLS: the certificate of 127.0.0.1 is not trusted (pass --ca-cert FILE, the CA that signed it)")
    );
}

#[test]
fn unusable_ca_files_are_reported_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let e = Trust::new(Some(&missing), "x").unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("CA certificate {}: ", missing.display())),
        "{e}"
    );

    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let e = Trust::new(Some(&garbage), "x").unwrap_err().to_string();
    assert!(e.contains("no CERTIFICATE block"), "{e}");

    let broken = dir.path().join("broken.pem");
    std::fs::write(
        &broken,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let e = Trust::new(Some(&broken), "x").unwrap_err().to_string();
    assert!(e.contains("broken.pem"), "{e}");
}

#[test]
fn hosts_in_messages() {
    assert_eq!(host_of("https://127.0.0.1:8480/api"), "127.0.0.1");
    assert_eq!(host_of("wss://cp.example/x"), "cp.example");
    assert_eq!(host_of("https://[::1]:1/"), "::1");
}
