//! How the agent reaches the control plane: its WebSocket URLs from the
//! URL it was given, and failed requests in one line.
//!
//! A leaf module (it imports nothing of the agent) because the channel, the
//! relays, the mover and start-up all need these: kept in any one of them,
//! the others would import it and the modules would import each other.

use anyhow::bail;
use virt8ra_tls::Trust;

/// `http://h:p/` -> `ws://h:p` (and `https` -> `wss`).
pub fn ws_base(server: &str) -> anyhow::Result<String> {
    let s = server.trim_end_matches('/');
    if let Some(r) = s.strip_prefix("http://") {
        Ok(format!("ws://{r}"))
    } else if let Some(r) = s.strip_prefix("https://") {
        Ok(format!("wss://{r}"))
    } else {
        bail!("server URL must start with http:// or https://, got {server:?}");
    }
}

/// `http://h:p` -> `ws://h:p/api/v1/agent/connect`.
pub fn ws_url(server: &str) -> anyhow::Result<String> {
    Ok(format!("{}/api/v1/agent/connect", ws_base(server)?))
}

/// A failed request in one line: a TLS problem in plain words, or the
/// whole error chain.
pub(crate) fn http_error(trust: &Trust, e: reqwest::Error, url: &str) -> anyhow::Error {
    anyhow::anyhow!(trust.describe(&e, url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_url_from_server_url() {
        assert_eq!(
            ws_url("http://127.0.0.1:8480/").unwrap(),
            "ws://127.0.0.1:8480/api/v1/agent/connect"
        );
        assert_eq!(
            ws_url("https://cp.example").unwrap(),
            "wss://cp.example/api/v1/agent/connect"
        );
        assert!(ws_url("ftp://x").is_err());
    }
}
