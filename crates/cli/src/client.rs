//! A thin HTTP client for the API that turns every failure into one clear line.

use anyhow::{anyhow, bail, Context};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use virt8ra_api::ErrorBody;

pub struct Client {
    base: String,
    token: String,
    /// Sent as `X-Virt8ra-Project` (`--project`, `VIRT8RA_PROJECT`).
    project: Option<String>,
    trust: virt8ra_tls::Trust,
    http: reqwest::Client,
}

impl Client {
    /// A client for the control plane at `base` that trusts `trust`'s
    /// certificates (for https URLs).
    pub fn new(base: &str, token: &str, trust: virt8ra_tls::Trust) -> anyhow::Result<Client> {
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            project: None,
            http: trust.http_client()?,
            trust,
        })
    }

    /// A request that could not be sent, in one line: a TLS problem in
    /// plain words, an unreachable control plane, or the error chain.
    fn send_error(&self, e: reqwest::Error) -> anyhow::Error {
        if let Some(why) = self.trust.explain(&e, &self.base) {
            return anyhow!("{why}");
        }
        if e.is_connect() {
            return anyhow!(
                "cannot reach the control plane at {}: is `virt8ra server` running there? (set VIRT8RA_URL)",
                self.base
            );
        }
        anyhow!(
            "request to {} failed: {}",
            self.base,
            virt8ra_tls::error_chain(&e)
        )
    }

    /// GETs a URL that is not the control plane's (no token), with the same
    /// trust; a non-2xx answer is an error.
    pub async fn fetch_external(&self, url: &str) -> anyhow::Result<reqwest::Response> {
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| anyhow!("download {url}: {}", self.trust.describe(&e, url)))?;
        if !resp.status().is_success() {
            bail!("download {url}: {} answered {}", url, resp.status());
        }
        Ok(resp)
    }

    /// The same client, picking `project` for every call (a platform
    /// admin's lists show that project's resources, creates belong to it;
    /// a project token's calls must name its own project).
    pub fn with_project(mut self, project: Option<String>) -> Client {
        self.project = project.filter(|p| !p.is_empty());
        self
    }

    /// The token and the picked project on a request.
    fn authorize(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let rb = rb.bearer_auth(&self.token);
        match &self.project {
            Some(p) => rb.header(virt8ra_api::PROJECT_HEADER, p),
            None => rb,
        }
    }

    /// The project picked with `--project` / `VIRT8RA_PROJECT`.
    pub fn project(&self) -> Option<&str> {
        self.project.as_deref()
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{}", self.base, path)
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let resp = self
            .authorize(rb)
            .send()
            .await
            .map_err(|e| self.send_error(e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<ErrorBody>(&text)
            .map(|b| b.error.message)
            .unwrap_or_else(|_| format!("{status}: {}", text.trim()));
        if status == StatusCode::UNAUTHORIZED {
            bail!("{msg} (set VIRT8RA_TOKEN to the admin token or a valid API token)");
        }
        bail!("{msg}")
    }

    pub async fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> anyhow::Result<T> {
        let mut rb = self.http.request(method, self.url(path));
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = self.send(rb).await?;
        resp.json::<T>()
            .await
            .context("the control plane sent an answer this CLI does not understand")
    }

    /// A GET that answers `None` on 404.
    pub async fn get_opt<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<Option<T>> {
        let resp = self
            .authorize(self.http.get(self.url(path)))
            .send()
            .await
            .map_err(|e| self.send_error(e))?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return self.get(path).await.map(Some);
        }
        resp.json::<T>()
            .await
            .map(Some)
            .context("the control plane sent an answer this CLI does not understand")
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.request(Method::GET, path, None::<&()>).await
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &(impl Serialize + ?Sized),
    ) -> anyhow::Result<T> {
        self.request(Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Option<serde_json::Value>> {
        let resp = self
            .send(self.http.request(Method::DELETE, self.url(path)))
            .await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        Ok(resp.json().await.ok())
    }

    /// Uploads a file as the request body.
    pub async fn upload<T: DeserializeOwned>(
        &self,
        path: &str,
        file: &std::path::Path,
    ) -> anyhow::Result<T> {
        let f = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("open {}", file.display()))?;
        let len = f.metadata().await?.len();
        let body = reqwest::Body::from(f);
        let rb = self
            .http
            .post(self.url(path))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body);
        Ok(self.send(rb).await?.json().await?)
    }
}

impl Client {
    /// Downloads `path` into `dest`, resuming from the bytes already there.
    /// Returns the final size.
    pub async fn download(&self, path: &str, dest: &std::path::Path) -> anyhow::Result<u64> {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        let mut have = tokio::fs::metadata(dest)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        let mut rb = self.http.get(self.url(path));
        if have > 0 {
            rb = rb.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let resp = self.send(rb).await?;
        if have > 0 && resp.status() == StatusCode::OK {
            have = 0;
            let _ = tokio::fs::remove_file(dest).await;
        }
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dest)
            .await
            .with_context(|| format!("write {}", dest.display()))?;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.with_context(|| format!("download broke at {have} bytes"))?;
            f.write_all(&chunk).await?;
            have += chunk.len() as u64;
        }
        f.sync_all().await?;
        Ok(have)
    }
}

/// Bytes escaped in a path segment or query value: all but ASCII letters,
/// digits, `-`, `_` and `.` (names are restricted, but ids and user input
/// pass through here).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.');

/// Escapes a path segment or a query value.
pub fn seg(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn segments_escape_all_but_unreserved_bytes() {
        assert_eq!(super::seg("vm-1_a.b"), "vm-1_a.b");
        assert_eq!(super::seg("a b/c?d&e=%"), "a%20b%2Fc%3Fd%26e%3D%25");
        assert_eq!(super::seg("ä~"), "%C3%A4%7E");
    }
}
