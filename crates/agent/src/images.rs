//! The agent's image cache.
//!
//! Base images are fetched from the control plane on first use, verified
//! against their sha256 and kept as `<sha256>.qcow2`. Concurrent VMs that need
//! the same image wait on one per-image lock, so the image is downloaded once.
//! A broken transfer leaves `<sha256>.part`, and the next attempt resumes it
//! with an HTTP range request instead of starting over.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use virt8ra_api::protocol::ImageRef;

pub struct ImageCache {
    dir: PathBuf,
    server: String,
    token: String,
    client: reqwest::Client,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
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
    #[error("image cache: {0}")]
    Io(#[from] std::io::Error),
}

fn valid_sha(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl ImageCache {
    pub fn new(dir: PathBuf, server: &str, token: &str) -> std::io::Result<ImageCache> {
        std::fs::create_dir_all(&dir)?;
        Ok(ImageCache {
            dir,
            server: server.trim_end_matches('/').to_string(),
            token: token.to_string(),
            client: reqwest::Client::new(),
            locks: Mutex::new(HashMap::new()),
        })
    }

    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.qcow2"))
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
            if md.len() == r.size_bytes {
                return Ok(path);
            }
            tracing::warn!(image = %r.name, "cached copy has the wrong size; fetching again");
            tokio::fs::remove_file(&path).await?;
        }
        self.download(r, &path).await?;
        Ok(path)
    }

    async fn download(&self, r: &ImageRef, dest: &Path) -> Result<(), ImageError> {
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
        let url = format!("{}{}", self.server, r.url_path);
        let mut req = self.client.get(&url).bearer_auth(&self.token);
        if have > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
            tracing::info!(image = %r.name, offset = have, "resuming image download");
        } else {
            tracing::info!(image = %r.name, bytes = r.size_bytes, "downloading image");
        }
        let resp = req
            .send()
            .await
            .map_err(|e| fetch_err(format!("request {url}: {e}")))?;
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
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| fetch_err(format!("transfer broke at {have} bytes: {e}")))?;
            hasher.update(&chunk);
            f.write_all(&chunk).await?;
            have += chunk.len() as u64;
        }
        f.sync_all().await?;
        drop(f);
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
        tracing::info!(image = %r.name, bytes = have, "image cached");
        Ok(())
    }
}
