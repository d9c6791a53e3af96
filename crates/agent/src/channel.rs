//! The agent's one outbound channel to the control plane.
//!
//! A WebSocket dialled from the host, so a host behind NAT needs no inbound
//! port. On any failure the agent waits (exponential backoff with jitter, at
//! most 30 s) and dials again; meanwhile the reconciler keeps the VMs going
//! from the local desired state.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use virt8ra_api::protocol::{
    AgentMessage, ServerMessage, VmReport, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use virt8ra_api::HostInventory;

use crate::driver::Driver;
use crate::reconciler::{Reconciler, Reports};

pub struct Channel {
    pub server: String,
    pub host_token: String,
    pub inventory: HostInventory,
    pub data_dir: std::path::PathBuf,
    pub driver: Arc<dyn Driver>,
    pub reconciler: Arc<Reconciler>,
    pub reports: Arc<Reports>,
    /// Migrations and exports (absent for simulated hosts).
    pub mover: Option<Arc<crate::mover::Mover>>,
}

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

impl Channel {
    /// Keeps the channel up until the process ends.
    pub async fn run(self, mut changes: mpsc::UnboundedReceiver<VmReport>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let started = std::time::Instant::now();
            match self.session(&mut changes).await {
                Ok(()) => tracing::info!("control plane closed the channel"),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "channel to the control plane failed")
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(500);
            }
            let jitter = rand::thread_rng().gen_range(0..=backoff.as_millis() as u64 / 2);
            let wait = backoff + Duration::from_millis(jitter);
            tracing::info!(retry_in_ms = wait.as_millis() as u64, "reconnecting");
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    async fn session(&self, changes: &mut mpsc::UnboundedReceiver<VmReport>) -> anyhow::Result<()> {
        let mut req = ws_url(&self.server)?.into_client_request()?;
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", self.host_token).parse()?,
        );
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .context("connect")?;
        let (mut sink, mut stream) = ws.split();
        let send = |m: &AgentMessage| -> anyhow::Result<Message> {
            Ok(Message::Text(serde_json::to_string(m)?.into()))
        };
        sink.send(send(&AgentMessage::Hello {
            protocol: PROTOCOL_VERSION,
            min_protocol: MIN_PROTOCOL_VERSION,
            inventory: self.inventory.clone(),
        })?)
        .await?;

        // Welcome or reject.
        let interval = loop {
            let m = tokio::time::timeout(Duration::from_secs(15), stream.next())
                .await
                .context("no welcome from the control plane")?;
            let Some(m) = m else {
                bail!("closed before welcome")
            };
            if let Message::Text(t) = m? {
                match serde_json::from_str::<ServerMessage>(&t)? {
                    ServerMessage::Welcome {
                        protocol,
                        heartbeat_interval_s,
                        ..
                    } => {
                        tracing::info!(protocol, "connected to the control plane");
                        break Duration::from_secs(heartbeat_interval_s.clamp(1, 300));
                    }
                    ServerMessage::RelayOpen {
                        migration_id,
                        stream,
                        conn_id,
                    } => {
                        let local = self
                            .mover
                            .as_ref()
                            .and_then(|m| m.relay_endpoint(&migration_id, &stream));
                        let Some(local) = local else {
                            tracing::warn!(migration = %migration_id, stream, "relay for a stream this host does not receive; ignored");
                            return Ok(());
                        };
                        let (server, token) = (self.server.clone(), self.host_token.clone());
                        tokio::spawn(async move {
                            let r = crate::relay::serve_target(
                                &server,
                                &token,
                                &migration_id,
                                &stream,
                                &conn_id,
                                &local,
                            )
                            .await;
                            match r {
                                Ok(()) => {
                                    tracing::debug!(migration = %migration_id, stream, "relay: connection closed")
                                }
                                Err(e) => {
                                    tracing::warn!(migration = %migration_id, stream, error = %format!("{e:#}"), "relay: connection failed")
                                }
                            }
                        });
                    }
                    ServerMessage::Reject { reason } => bail!("rejected: {reason}"),
                    _ => bail!("expected welcome"),
                }
            }
        };

        // Drop changes queued while disconnected: the first heartbeat carries them all.
        while changes.try_recv().is_ok() {}
        let mut migration_changes = self.mover.as_ref().map(|m| m.subscribe());
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<AgentMessage>();
        let mut tick = tokio::time::interval(interval);
        let mut seq = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    seq += 1;
                    let hb = AgentMessage::Heartbeat {
                        seq,
                        usage: crate::inventory::usage(&self.data_dir, self.reports.running()),
                        vms: self.reports.all(),
                        migrations: self.mover.as_ref().map(|m| m.all()).unwrap_or_default(),
                    };
                    sink.send(send(&hb)?).await?;
                }
                Some(r) = changes.recv() => {
                    sink.send(send(&AgentMessage::VmReport(r))?).await?;
                }
                Some(r) = async {
                    match migration_changes.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    sink.send(send(&AgentMessage::MigrationReport(r))?).await?;
                }
                Some(m) = out_rx.recv() => {
                    sink.send(send(&m)?).await?;
                }
                m = stream.next() => {
                    let Some(m) = m else { return Ok(()) };
                    let text = match m? {
                        Message::Text(t) => t,
                        Message::Close(_) => return Ok(()),
                        _ => continue,
                    };
                    let msg = match serde_json::from_str::<ServerMessage>(&text) {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!(error = %e, "ignoring a message this agent does not understand");
                            continue;
                        }
                    };
                    self.handle(msg, &out_tx).await?;
                }
            }
        }
    }

    async fn handle(
        &self,
        msg: ServerMessage,
        out: &mpsc::UnboundedSender<AgentMessage>,
    ) -> anyhow::Result<()> {
        match msg {
            ServerMessage::DesiredState {
                generation,
                vms,
                prestage,
            } => {
                tracing::debug!(generation, vms = vms.len(), "desired state");
                self.reconciler.prestage(prestage);
                self.reconciler.apply(generation, vms).await?;
            }
            ServerMessage::ConsoleRequest {
                request_id,
                vm_id,
                max_bytes,
            } => {
                let driver = self.driver.clone();
                let out = out.clone();
                tokio::task::spawn_blocking(move || {
                    let (data, truncated, error) = match driver.console_tail(&vm_id, max_bytes) {
                        Ok((d, t)) => (d, t, None),
                        Err(e) => (String::new(), false, Some(e.to_string())),
                    };
                    let _ = out.send(AgentMessage::ConsoleData {
                        request_id,
                        vm_id,
                        data,
                        truncated,
                        error,
                    });
                });
            }
            ServerMessage::RelayOpen {
                migration_id,
                stream,
                conn_id,
            } => {
                let local = self
                    .mover
                    .as_ref()
                    .and_then(|m| m.relay_endpoint(&migration_id, &stream));
                let Some(local) = local else {
                    tracing::warn!(migration = %migration_id, stream, "relay for a stream this host does not receive; ignored");
                    return Ok(());
                };
                let (server, token) = (self.server.clone(), self.host_token.clone());
                tokio::spawn(async move {
                    let r = crate::relay::serve_target(
                        &server,
                        &token,
                        &migration_id,
                        &stream,
                        &conn_id,
                        &local,
                    )
                    .await;
                    match r {
                        Ok(()) => {
                            tracing::debug!(migration = %migration_id, stream, "relay: connection closed")
                        }
                        Err(e) => {
                            tracing::warn!(migration = %migration_id, stream, error = %format!("{e:#}"), "relay: connection failed")
                        }
                    }
                });
            }
            ServerMessage::Reject { reason } => bail!("rejected: {reason}"),
            ServerMessage::Welcome { .. } => {}
        }
        Ok(())
    }
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
