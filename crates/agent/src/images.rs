//! The agent's image cache.
//!
//! Base images are fetched on first use, verified against their sha256 and
//! kept as `<sha256>.qcow2`. Concurrent VMs that need the same image wait on
//! one per-image lock, so the image is downloaded once. A broken transfer
//! leaves `<sha256>.part`, and the next attempt resumes it with an HTTP range
//! request instead of starting over.
//!
//! Sources are tried in order: the site-local copies the control plane names
//! in [`ImageRef::sources`] (peer agents' image services, see
//! [`crate::image_service`]), then the control plane itself over the long
//! link. Since the content is addressed by its hash, a transfer that breaks
//! on one source resumes on the next at the same offset; a copy whose hash is
//! wrong is discarded and fetched again from the next source.
//!
//! A copy whose hash is right is still inspected (`virt8ra_image`) before
//! it is used as a backing file or served to the site: a self-contained
//! qcow2 that passes `qemu-img check`, nothing else. The control plane
//! checked it on import, but an image stored before that check existed, or
//! a control plane that was compromised, must not make QEMU on this host
//! open a host file as a backing or data file. A refused copy is deleted
//! and the VM reports why.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use virt8ra_api::protocol::ImageRef;

/// The key under which bytes fetched from the control plane are counted.
pub const LONG_LINK: &str = "control-plane";

pub struct ImageCache {
    dir: PathBuf,
    server: String,
    token: String,
    trust: virt8ra_tls::Trust,
    client: reqwest::Client,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Bytes received, by source (`control-plane` or a peer's URL).
    received: Mutex<BTreeMap<String, u64>>,
    /// Cached images whose hash this process checked (or fetched itself).
    verified: Mutex<std::collections::HashSet<String>>,
    /// The secret of this host's site, from the control plane's welcome:
    /// sent to peers' image services, and required by this host's own
    /// (see [`crate::image_service`]).
    site_secret: Mutex<Option<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {name}: {msg}")]
    Fetch { name: String, msg: String },
    #[error("image {name}: checksum mismatch (expected {expected}, got {actual}); the copy was discarded")]
    Checksum {
        name: String,
        expected: String,
        actual: String,
    },
    #[error("image {name}: refused on this host: {msg}; the copy was deleted")]
    Refused { name: String, msg: String },
    #[error("image cache: {0}")]
    Io(#[from] std::io::Error),
}

pub fn valid_sha(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl ImageCache {
    pub fn new(
        dir: PathBuf,
        server: &str,
        token: &str,
        trust: &virt8ra_tls::Trust,
    ) -> anyhow::Result<ImageCache> {
        ImageCache::with_client(dir, server, token, trust, trust.http_client()?)
    }

    /// [`ImageCache::new`] with an HTTP client shared with others (many
    /// simulated hosts in one process share one).
    pub fn with_client(
        dir: PathBuf,
        server: &str,
        token: &str,
        trust: &virt8ra_tls::Trust,
        client: reqwest::Client,
    ) -> anyhow::Result<ImageCache> {
        crate::private::make_dir(&dir)?;
        Ok(ImageCache {
            dir,
            server: server.trim_end_matches('/').to_string(),
            token: token.to_string(),
            trust: trust.clone(),
            client,
            locks: Mutex::new(HashMap::new()),
            received: Mutex::new(BTreeMap::new()),
            verified: Mutex::new(Default::default()),
            site_secret: Mutex::new(None),
        })
    }

    /// Keeps the site's secret the control plane sent (none: an older
    /// control plane).
    pub fn set_site_secret(&self, secret: Option<String>) {
        *self.site_secret.lock().unwrap_or_else(|p| p.into_inner()) = secret;
    }

    /// The site's secret, once the control plane has sent it.
    pub fn site_secret(&self) -> Option<String> {
        self.site_secret
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.qcow2"))
    }

    /// Bytes received so far, by source.
    pub fn received(&self) -> BTreeMap<String, u64> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn mark_verified(&self, sha: &str) {
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sha.to_string());
    }

    fn count(&self, source: &str, n: u64) {
        *self
            .received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(source.to_string())
            .or_default() += n;
    }

    /// The local path of the image, downloading it first if needed.
    pub async fn get(&self, r: &ImageRef) -> Result<PathBuf, ImageError> {
        if !valid_sha(&r.sha256) {
            return Err(ImageError::Fetch {
                name: r.name.clone(),
                msg: format!("invalid sha256 {:?}", r.sha256),
            });
        }
        let lock = {
            let mut m = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(r.sha256.clone()).or_default().clone()
        };
        let _g = lock.lock().await;
        let path = self.path_of(&r.sha256);
        if let Ok(md) = tokio::fs::metadata(&path).await {
            let known = self
                .verified
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&r.sha256);
            if md.len() == r.size_bytes && known {
                return Ok(path);
            }
            // Checked once per process: a copy damaged on disk is noticed
            // before it is used or served to the site.
            if md.len() == r.size_bytes && hash_file(&path).await? == r.sha256 {
                self.inspect(r, &path).await?;
                self.mark_verified(&r.sha256);
                return Ok(path);
            }
            tracing::warn!(image = %r.name, "cached copy is corrupt (wrong size or checksum); fetching again");
            tokio::fs::remove_file(&path).await?;
        }
        let mut last = None;
        for peer in &r.sources {
            let base = peer.trim_end_matches('/');
            let url = format!(
                "{base}/images/{}?id={}&size={}",
                r.sha256,
                enc(&r.id),
                r.size_bytes
            );
            match self.download(r, &path, &url, base, false).await {
                Ok(()) => {
                    self.inspect(r, &path).await?;
                    self.mark_verified(&r.sha256);
                    return Ok(path);
                }
                Err(e @ ImageError::Io(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(image = %r.name, source = %base, error = %e,
                        "site-local source failed; trying the next");
                    last = Some(e);
                }
            }
        }
        let url = format!("{}{}", self.server, r.url_path);
        match self.download(r, &path, &url, LONG_LINK, true).await {
            Ok(()) => {
                self.inspect(r, &path).await?;
                self.mark_verified(&r.sha256);
                Ok(path)
            }
            Err(e) => {
                if let Some(prev) = last {
                    tracing::debug!(error = %prev, "earlier source's error");
                }
                Err(e)
            }
        }
    }

    /// Inspects a copy whose hash is right; deletes it if it is refused.
    async fn inspect(&self, r: &ImageRef, path: &Path) -> Result<(), ImageError> {
        let policy = virt8ra_image::Policy::stored(u64::MAX);
        match virt8ra_image::inspect(path, &policy).await {
            Ok(_) => Ok(()),
            Err(virt8ra_image::ImageError::Refused(msg)) => {
                tracing::warn!(image = %r.name, sha256 = %r.sha256, error = %msg, "image refused; deleted");
                tokio::fs::remove_file(path).await?;
                Err(ImageError::Refused {
                    name: r.name.clone(),
                    msg,
                })
            }
            Err(virt8ra_image::ImageError::Internal(msg)) => Err(ImageError::Fetch {
                name: r.name.clone(),
                msg: format!("cannot inspect the image: {msg}"),
            }),
        }
    }

    async fn download(
        &self,
        r: &ImageRef,
        dest: &Path,
        url: &str,
        source: &str,
        auth: bool,
    ) -> Result<(), ImageError> {
        let part = self.dir.join(format!("{}.part", r.sha256));
        let fetch_err = |msg: String| ImageError::Fetch {
            name: r.name.clone(),
            msg,
        };
        // Hash what an earlier, interrupted attempt already has.
        let mut hasher = Sha256::new();
        let mut have: u64 = 0;
        if let Ok(mut f) = tokio::fs::File::open(&part).await {
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                have += n as u64;
            }
        }
        if have > r.size_bytes {
            tokio::fs::remove_file(&part).await?;
            hasher = Sha256::new();
            have = 0;
        }
        let mut req = self.client.get(url);
        if auth {
            req = req.bearer_auth(&self.token);
        } else if let Some(secret) = self.site_secret() {
            // A peer's image service serves the hosts of its site only.
            req = req.bearer_auth(secret);
        }
        if have > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
            tracing::info!(image = %r.name, offset = have, source, "resuming image download");
        } else {
            tracing::info!(image = %r.name, bytes = r.size_bytes, source, "downloading image");
        }
        let resp = req
            .send()
            .await
            .map_err(|e| fetch_err(format!("request {url}: {}", self.trust.describe(&e, url))))?;
        let status = resp.status();
        if have > 0 && status == reqwest::StatusCode::OK {
            // The server ignored the range: start over.
            hasher = Sha256::new();
            have = 0;
            let _ = tokio::fs::remove_file(&part).await;
        } else if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(fetch_err(format!("{url} answered {status}: {body}")));
        }
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .await?;
        let mut stream = resp.bytes_stream();
        let mut broke = None;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    broke = Some(fetch_err(format!("transfer broke at {have} bytes: {e}")));
                    break;
                }
            };
            if have + chunk.len() as u64 > r.size_bytes {
                broke = Some(fetch_err(format!(
                    "{url} sent more than the image's {} bytes",
                    r.size_bytes
                )));
                break;
            }
            hasher.update(&chunk);
            f.write_all(&chunk).await?;
            have += chunk.len() as u64;
            self.count(source, chunk.len() as u64);
        }
        // Whatever arrived is kept, flushed, so the next attempt resumes
        // exactly where this one stopped.
        f.flush().await?;
        f.sync_all().await?;
        drop(f);
        if let Some(e) = broke {
            if have >= r.size_bytes {
                let _ = tokio::fs::remove_file(&part).await;
            }
            return Err(e);
        }
        if have < r.size_bytes {
            return Err(fetch_err(format!(
                "{url} ended the transfer at {have} of {} bytes",
                r.size_bytes
            )));
        }
        let actual = hex::encode(hasher.finalize());
        if actual != r.sha256 {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(ImageError::Checksum {
                name: r.name.clone(),
                expected: r.sha256.clone(),
                actual,
            });
        }
        tokio::fs::rename(&part, dest).await?;
        tracing::info!(image = %r.name, bytes = have, source, "image cached");
        Ok(())
    }
}

async fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut f = tokio::fs::File::open(path).await?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Percent-encodes a query value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A tiny HTTP server for one file. The first `cut_first` responses stop
    /// after half the bytes and close the connection (a broken transfer).
    /// Returns the base URL, the request count and the ranges asked for.
    async fn serve(
        body: Vec<u8>,
        cut_first: usize,
    ) -> (String, Arc<AtomicUsize>, Arc<Mutex<Vec<u64>>>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let (c, r) = (count.clone(), ranges.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let n = c.fetch_add(1, Ordering::SeqCst);
                let body = body.clone();
                let r = r.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        let Ok(k) = s.read(&mut buf).await else {
                            return;
                        };
                        if k == 0 {
                            return;
                        }
                        req.extend_from_slice(&buf[..k]);
                    }
                    let text = String::from_utf8_lossy(&req).to_lowercase();
                    let start: u64 = text
                        .lines()
                        .find_map(|l| l.strip_prefix("range: bytes="))
                        .and_then(|v| v.trim().trim_end_matches('-').parse().ok())
                        .unwrap_or(0);
                    r.lock().unwrap().push(start);
                    let rest = &body[start as usize..];
                    let status = if start > 0 {
                        "206 Partial Content"
                    } else {
                        "200 OK"
                    };
                    let head = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        rest.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    if n < cut_first {
                        let _ = s.write_all(&rest[..rest.len() / 2]).await;
                        let _ = s.flush().await;
                        // Drop the connection mid-body.
                        return;
                    }
                    let _ = s.write_all(rest).await;
                });
            }
        });
        (url, count, ranges)
    }

    fn image(body: &[u8]) -> ImageRef {
        ImageRef {
            id: "i".into(),
            name: "img".into(),
            sha256: hex::encode(Sha256::digest(body)),
            size_bytes: body.len() as u64,
            url_path: "/api/v1/images/i/data".into(),
            sources: vec![],
        }
    }

    /// A real qcow2 of about 3 MB (the cache serves only self-contained
    /// qcow2 images), made once per test process.
    fn body() -> Vec<u8> {
        static BODY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        BODY.get_or_init(|| {
            let d = tempfile::tempdir().unwrap();
            let raw = d.path().join("r.raw");
            let pattern: Vec<u8> = (0..2_999_808u32).map(|i| (i % 251) as u8).collect();
            std::fs::write(&raw, pattern).unwrap();
            qcow2_of(&raw, &[])
        })
        .clone()
    }

    /// `qemu-img convert -O qcow2` of `raw` (with extra options).
    fn qcow2_of(raw: &Path, opts: &[&str]) -> Vec<u8> {
        let out = raw.with_extension("qcow2");
        let st = std::process::Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .args(opts)
            .arg(raw)
            .arg(&out)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::read(out).unwrap()
    }

    #[tokio::test]
    async fn a_copy_that_refers_to_a_host_file_is_refused_and_deleted() {
        let d = tempfile::tempdir().unwrap();
        let secret = d.path().join("secret");
        std::fs::write(&secret, vec![b's'; 4096]).unwrap();
        let bad_path = d.path().join("bad.qcow2");
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&secret)
            .arg(&bad_path)
            .status()
            .unwrap();
        assert!(st.success());
        let bad = std::fs::read(&bad_path).unwrap();
        // The right hash, from the control plane: still refused.
        let (url, _, _) = serve(bad.clone(), 0).await;
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(
            dir.path().to_path_buf(),
            &url,
            "t",
            &virt8ra_tls::Trust::public(),
        )
        .unwrap();
        let r = image(&bad);
        let e = cache.get(&r).await.unwrap_err();
        let m = e.to_string();
        assert!(
            matches!(e, ImageError::Refused { .. })
                && m.contains("refers to another file (qcow2 backing file")
                && m.contains("the copy was deleted"),
            "{m}"
        );
        assert!(!cache.path_of(&r.sha256).exists());
        // A copy already in the cache (from before the check) is refused
        // by the next process too, and deleted.
        std::fs::write(cache.path_of(&r.sha256), &bad).unwrap();
        let fresh = ImageCache::new(
            dir.path().to_path_buf(),
            &url,
            "t",
            &virt8ra_tls::Trust::public(),
        )
        .unwrap();
        assert!(matches!(
            fresh.get(&r).await,
            Err(ImageError::Refused { .. })
        ));
        assert!(!cache.path_of(&r.sha256).exists());
    }

    #[tokio::test]
    async fn concurrent_users_share_one_download() {
        let body = body();
        let (url, count, _) = serve(body.clone(), 0).await;
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(
            ImageCache::new(
                dir.path().to_path_buf(),
                &url,
                "t",
                &virt8ra_tls::Trust::public(),
            )
            .unwrap(),
        );
        let r = image(&body);
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let (c, r) = (cache.clone(), r.clone());
                tokio::spawn(async move { c.get(&r).await })
            })
            .collect();
        for t in tasks {
            let p = t.await.unwrap().unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), body);
        }
        assert_eq!(count.load(Ordering::SeqCst), 1, "one download for four VMs");
    }

    #[tokio::test]
    async fn a_broken_transfer_resumes_where_it_stopped() {
        let body = body();
        let (url, count, ranges) = serve(body.clone(), 1).await;
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(
            dir.path().to_path_buf(),
            &url,
            "t",
            &virt8ra_tls::Trust::public(),
        )
        .unwrap();
        let r = image(&body);
        assert!(cache.get(&r).await.is_err(), "the first transfer breaks");
        let part = dir.path().join(format!("{}.part", r.sha256));
        let have = std::fs::metadata(&part).unwrap().len();
        assert!(have > 0 && have < body.len() as u64);
        let p = cache.get(&r).await.unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), body);
        assert_eq!(count.load(Ordering::SeqCst), 2);
        assert_eq!(*ranges.lock().unwrap(), vec![0, have], "resumed at {have}");
        assert!(!part.exists());
    }

    #[tokio::test]
    async fn a_corrupt_download_or_cached_copy_is_refused_and_fetched_again() {
        let body = body();
        let (url, count, _) = serve(body.clone(), 0).await;
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(
            dir.path().to_path_buf(),
            &url,
            "t",
            &virt8ra_tls::Trust::public(),
        )
        .unwrap();
        // The server's bytes do not match the checksum the control plane gave.
        let mut wrong = image(&body);
        wrong.sha256 = hex::encode(Sha256::digest(b"something else"));
        let e = cache.get(&wrong).await.unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
        assert!(!cache.path_of(&wrong.sha256).exists());
        // A truncated cached copy is noticed and replaced.
        let r = image(&body);
        std::fs::write(cache.path_of(&r.sha256), &body[..1000]).unwrap();
        let p = cache.get(&r).await.unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), body);
        assert_eq!(count.load(Ordering::SeqCst), 2);
        // So is a copy of the right size damaged on disk (seen by a fresh
        // process, which checks each cached image once).
        let mut flipped = body.clone();
        flipped[12345] ^= 0x40;
        std::fs::write(cache.path_of(&r.sha256), &flipped).unwrap();
        let fresh = ImageCache::new(
            dir.path().to_path_buf(),
            &url,
            "t",
            &virt8ra_tls::Trust::public(),
        )
        .unwrap();
        let p = fresh.get(&r).await.unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), body);
        assert_eq!(count.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_site_local_source_is_tried_first_and_the_control_plane_is_the_fallback() {
        let body = body();
        let (cp, cp_count, _) = serve(body.clone(), 0).await;
        let (peer, peer_count, _) = serve(body.clone(), 0).await;
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(
            dir.path().to_path_buf(),
            &cp,
            "t",
            &virt8ra_tls::Trust::public(),
        )
        .unwrap();
        let mut r = image(&body);
        r.sources = vec!["http://127.0.0.1:1".into(), peer.clone()];
        let p = cache.get(&r).await.unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), body);
        assert_eq!(peer_count.load(Ordering::SeqCst), 1);
        assert_eq!(
            cp_count.load(Ordering::SeqCst),
            0,
            "nothing over the long link"
        );
        assert_eq!(cache.received()[&peer], body.len() as u64);
        assert!(!cache.received().contains_key(LONG_LINK));
    }

    #[tokio::test]
    async fn a_corrupt_peer_copy_is_refused_and_fetched_from_the_control_plane() {
        let body = body();
        let mut bad = body.clone();
        bad[1000] ^= 1;
        let (cp, cp_count, _) = serve(body.clone(), 0).await;
        let (peer, _, _) = serve(bad, 0).await;
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(
            dir.path().to_path_buf(),
            &cp,
            "t",
            &virt8ra_tls::Trust::public(),
        )
        .unwrap();
        let mut r = image(&body);
        r.sources = vec![peer];
        let p = cache.get(&r).await.unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), body);
        assert_eq!(cp_count.load(Ordering::SeqCst), 1);
        assert_eq!(cache.received()[LONG_LINK], body.len() as u64);
    }

    #[tokio::test]
    async fn a_transfer_broken_by_a_peer_resumes_from_the_control_plane_at_the_same_offset() {
        let body = body();
        let (cp, _, cp_ranges) = serve(body.clone(), 0).await;
        let (peer, _, _) = serve(body.clone(), 1).await;
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(
            dir.path().to_path_buf(),
            &cp,
            "t",
            &virt8ra_tls::Trust::public(),
        )
        .unwrap();
        let mut r = image(&body);
        r.sources = vec![peer.clone()];
        let p = cache.get(&r).await.unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), body);
        let from_peer = cache.received()[&peer];
        assert!(from_peer > 0 && from_peer < body.len() as u64);
        assert_eq!(*cp_ranges.lock().unwrap(), vec![from_peer]);
        assert_eq!(
            cache.received()[LONG_LINK],
            body.len() as u64 - from_peer,
            "only the rest crossed the long link"
        );
    }
}
