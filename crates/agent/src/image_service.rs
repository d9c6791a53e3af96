//! The agent's image service: serves its image cache over HTTP to the other
//! hosts of its site, so an image crosses the long link to the control plane
//! once per site rather than once per host.
//!
//! `GET /images/<sha256>?id=ID&size=BYTES` answers with the cached copy
//! (with `Range: bytes=START-` for resuming). When this host does not have
//! the image yet, it fetches it first through its own [`ImageCache`] from
//! the control plane (pull-through), so several peers asking at once cause one
//! transfer over the long link. A cached copy is checked against its hash
//! before it is first served, so a copy damaged on disk is fetched again
//! rather than passed on. `GET /stats` reports the bytes served and
//! received, for tests and benchmarks.
//!
//! Images are served to the hosts of this host's site only: a request must
//! carry `Authorization: Bearer SITE_SECRET`, the secret the control plane
//! gives every agent of the site in its welcome (see
//! `virt8ra_api::protocol::ServerMessage::Welcome`); anything else is
//! refused with 401, and so is every request until this agent has the
//! secret (an older control plane sends none: the site's hosts then fetch
//! from the control plane). `GET /stats` holds only counters and needs no
//! secret. Listen on the site's private network all the same.
//!
//! It is served by [`virt8ra_serve`], with [`LIMITS`] on what a client that
//! does not finish its request may hold.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncSeekExt;
use virt8ra_api::protocol::ImageRef;

use crate::images::{valid_sha, ImageCache};

pub struct ImageService {
    cache: Arc<ImageCache>,
    served: AtomicU64,
    requests: AtomicU64,
}

/// What `GET /stats` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageServiceStats {
    /// Bytes this host served to its peers.
    pub served_bytes: u64,
    pub requests: u64,
    /// Bytes this host received, by source (`control-plane` or a peer URL).
    pub received_bytes: BTreeMap<String, u64>,
}

#[derive(Debug, Deserialize)]
struct Want {
    id: Option<String>,
    size: Option<u64>,
}

fn err(status: StatusCode, msg: String) -> Response {
    (status, msg).into_response()
}

/// What a peer may hold: a request head must arrive within 10 s (an idle
/// keep-alive connection is closed after as long), and past 1,024 open
/// connections new ones are answered 503, so a slow or hostile client
/// cannot hold the agent's file descriptors (as with `axum::serve`, which
/// sets no timer).
const LIMITS: virt8ra_serve::Limits = virt8ra_serve::Limits {
    header_timeout: std::time::Duration::from_secs(10),
    max_connections: 1024,
    busy_message: "the image service has 1024 open connections; try again later",
    tcp_keepalive: None,
};

/// Binds `listen` and serves until the process ends. Returns the bound address.
pub async fn start(cache: Arc<ImageCache>, listen: &str) -> anyhow::Result<SocketAddr> {
    start_with(cache, listen, LIMITS).await
}

async fn start_with(
    cache: Arc<ImageCache>,
    listen: &str,
    limits: virt8ra_serve::Limits,
) -> anyhow::Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("image service: cannot listen on {listen}: {e}"))?;
    let addr = l.local_addr()?;
    let svc = Arc::new(ImageService {
        cache,
        served: AtomicU64::new(0),
        requests: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/images/{sha}", get(serve_image))
        .route("/stats", get(stats))
        .with_state(svc);
    tokio::spawn(virt8ra_serve::serve(
        l,
        None,
        app,
        limits,
        std::future::pending(),
    ));
    tracing::info!(%addr, "serving the image cache to the site");
    Ok(addr)
}

async fn stats(State(s): State<Arc<ImageService>>) -> Json<ImageServiceStats> {
    Json(ImageServiceStats {
        served_bytes: s.served.load(Ordering::Relaxed),
        requests: s.requests.load(Ordering::Relaxed),
        received_bytes: s.cache.received(),
    })
}

/// `Range: bytes=START-`; `Err(())` when malformed.
fn range_start(h: &HeaderMap) -> Result<Option<u64>, ()> {
    let Some(v) = h.get(header::RANGE) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|s| s.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<u64>().ok())
        .map(Some)
        .ok_or(())
}

/// Whether the request carries this site's secret.
fn authorized(cache: &ImageCache, h: &HeaderMap) -> Result<(), &'static str> {
    let Some(secret) = cache.site_secret() else {
        return Err("this host has no site secret from the control plane yet: it serves no images");
    };
    let presented = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or("missing 'Authorization: Bearer SITE_SECRET': images are served to the hosts of this site only")?;
    if constant_time_eq(presented.trim().as_bytes(), secret.as_bytes()) {
        Ok(())
    } else {
        Err("wrong site secret: images are served to the hosts of this site only")
    }
}

/// Compares without returning early at the first difference, so the time
/// taken tells nothing about how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn serve_image(
    State(s): State<Arc<ImageService>>,
    Path(sha): Path<String>,
    Query(w): Query<Want>,
    headers: HeaderMap,
) -> Response {
    s.requests.fetch_add(1, Ordering::Relaxed);
    if let Err(why) = authorized(&s.cache, &headers) {
        let mut resp = err(StatusCode::UNAUTHORIZED, why.into());
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return resp;
    }
    if !valid_sha(&sha) {
        return err(StatusCode::BAD_REQUEST, format!("invalid sha256 {sha:?}"));
    }
    let Ok(start) = range_start(&headers) else {
        return err(
            StatusCode::BAD_REQUEST,
            "only 'Range: bytes=START-' is supported".into(),
        );
    };
    // Through the cache, which checks a cached copy's hash once per process
    // and otherwise fetches it from the control plane (pull-through), once
    // for the whole site however many peers ask at the same time.
    let (Some(id), Some(size)) = (w.id, w.size) else {
        return err(
            StatusCode::BAD_REQUEST,
            "name the image: ?id=IMAGE_ID&size=BYTES".into(),
        );
    };
    let r = ImageRef {
        url_path: format!("/api/v1/images/{id}/data"),
        name: id.clone(),
        id,
        sha256: sha.clone(),
        size_bytes: size,
        sources: vec![],
    };
    let path = match s.cache.get(&r).await {
        Ok(p) => p,
        Err(e) => return err(StatusCode::BAD_GATEWAY, e.to_string()),
    };
    let mut f = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => return err(StatusCode::NOT_FOUND, format!("image {sha}: {e}")),
    };
    let len = match f.metadata().await {
        Ok(m) => m.len(),
        Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let mut status = StatusCode::OK;
    let mut remaining = len;
    let mut range = None;
    if let Some(start) = start {
        if start > len {
            return err(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("range start {start} is past the end ({len} bytes)"),
            );
        }
        if let Err(e) = f.seek(std::io::SeekFrom::Start(start)).await {
            return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
        }
        status = StatusCode::PARTIAL_CONTENT;
        remaining = len - start;
        range = Some(format!("bytes {start}-{}/{len}", len.saturating_sub(1)));
    }
    let svc = s.clone();
    let stream = tokio_util::io::ReaderStream::new(f).inspect(move |c| {
        if let Ok(c) = c {
            svc.served.fetch_add(c.len() as u64, Ordering::Relaxed);
        }
    });
    let mut resp = (status, Body::from_stream(stream)).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        header::ACCEPT_RANGES,
        header::HeaderValue::from_static("bytes"),
    );
    if let Ok(v) = remaining.to_string().parse() {
        h.insert(header::CONTENT_LENGTH, v);
    }
    if let Some(r) = range.and_then(|r| r.parse().ok()) {
        h.insert(header::CONTENT_RANGE, r);
    }
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use sha2::{Digest, Sha256};

    /// A cache whose control plane is unreachable: what is served comes
    /// from what the test put in it.
    fn offline_cache(dir: &std::path::Path) -> Arc<ImageCache> {
        let trust = virt8ra_tls::Trust::public();
        let cache = ImageCache::new(
            dir.to_path_buf(),
            "http://127.0.0.1:1",
            "host-token",
            &trust,
        );
        Arc::new(cache.unwrap())
    }

    #[tokio::test]
    async fn only_requests_with_the_site_secret_get_images() {
        let dir = tempfile::tempdir().unwrap();
        let cache = offline_cache(dir.path());
        // A real qcow2: the cache serves only self-contained images.
        let made = dir.path().join("made.qcow2");
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&made)
            .arg("1M")
            .status()
            .unwrap();
        assert!(st.success());
        let body = std::fs::read(&made).unwrap();
        let sha = hex::encode(Sha256::digest(&body));
        std::fs::write(cache.path_of(&sha), &body).unwrap();
        let addr = start(cache.clone(), "127.0.0.1:0").await.unwrap();
        let url = format!("http://{addr}/images/{sha}?id=img&size={}", body.len());
        let client = virt8ra_tls::Trust::public().http_client().unwrap();
        let get = |bearer: Option<&'static str>| {
            let (url, client) = (url.clone(), client.clone());
            async move {
                let mut rb = client.get(&url);
                if let Some(b) = bearer {
                    rb = rb.bearer_auth(b);
                }
                let r = rb.send().await.unwrap();
                (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
            }
        };
        // No secret from the control plane yet: nobody is served.
        let (status, text) = get(Some("s3cret")).await;
        assert_eq!(status, 401);
        assert!(String::from_utf8_lossy(&text).contains("no site secret"));
        cache.set_site_secret(Some("s3cret".into()));
        for bearer in [None, Some("wrong"), Some("s3cre"), Some("s3cret2")] {
            let (status, _) = get(bearer).await;
            assert_eq!(status, 401, "{bearer:?}");
        }
        assert_eq!(get(Some("s3cret")).await, (200, body));
        // The counters stay open; they hold no image.
        let stats = client
            .get(format!("http://{addr}/stats"))
            .send()
            .await
            .unwrap();
        assert_eq!(stats.status().as_u16(), 200);
    }

    /// A client that sends half a request head is cut off after the header
    /// timeout (`axum::serve` kept it for ever), while others are served.
    #[tokio::test]
    async fn a_half_sent_request_is_cut_off_after_the_header_timeout() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let cache = offline_cache(dir.path());
        let limits = virt8ra_serve::Limits {
            header_timeout: std::time::Duration::from_millis(300),
            ..LIMITS
        };
        let addr = start_with(cache, "127.0.0.1:0", limits).await.unwrap();
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /stats HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let t = std::time::Instant::now();
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), slow.read(&mut buf))
            .await
            .expect("the half-open connection was not closed within 5 s");
        // Closed (maybe with a 408 first), not answered with the stats.
        let got = String::from_utf8_lossy(&buf[..read.unwrap_or(0)]).to_string();
        assert!(!got.contains("served_bytes"), "{got}");
        assert!(
            t.elapsed() >= std::time::Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );
        let client = virt8ra_tls::Trust::public().http_client().unwrap();
        let stats: serde_json::Value = client
            .get(format!("http://{addr}/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(stats["requests"], 0);
    }
}
