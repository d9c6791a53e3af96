//! The control plane's public API as the load generator calls it, over the
//! benchmark's own HTTP client (see [`super::http`]): an answer other than
//! 2xx is an error that carries its body, and answers the phases do not
//! look at are read whole but not parsed.

use std::time::Duration;

use anyhow::bail;
use serde_json::Value;

use super::http;

/// The public API as the load generator calls it (see [`http`]).
pub struct Api {
    pub client: http::Client,
}

impl Api {
    pub fn new(port: u16, token: &str) -> Self {
        Self {
            client: http::Client::new(local(port), Some(token), Duration::from_secs(120)),
        }
    }

    /// Sends one call; an answer other than 2xx is an error with its body.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> anyhow::Result<http::Response> {
        let r = self
            .client
            .request(method, &format!("/api/v1{path}"), body)
            .await?;
        if !r.is_success() {
            bail!("{path}: {}: {}", r.status, String::from_utf8_lossy(&r.body));
        }
        Ok(r)
    }
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let body = body.map(|b| serde_json::to_vec(&b)).transpose()?;
        let r = self.send(method, path, body.as_deref()).await?;
        Ok(serde_json::from_slice(&r.body).unwrap_or(Value::Null))
    }
    /// A call whose answer the load generator does not look at (its CPU is
    /// shared with the control plane being measured): read whole, so that
    /// the connection is reused, but not parsed.
    pub async fn call_unread(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> anyhow::Result<()> {
        self.send(method, path, body).await.map(drop)
    }
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call("GET", path, None).await
    }
    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call("POST", path, Some(body)).await
    }
    pub async fn post_unread(&self, path: &str, body: Value) -> anyhow::Result<()> {
        self.call_unread("POST", path, Some(&serde_json::to_vec(&body)?))
            .await
    }
}

/// The control plane's address on this machine.
pub fn local(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}
