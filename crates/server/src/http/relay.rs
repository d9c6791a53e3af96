//! Relaying live-migration streams between agents that cannot reach each
//! other (a target behind NAT has no migration address).
//!
//! Both agents dial out, so nothing has to reach a host:
//!
//! ```text
//!  source QEMU ─TCP─► source agent ─WS─► control plane ◄─WS─ target agent ─TCP─► target QEMU / qemu-nbd
//!                     (127.0.0.1        GET /api/v1/relay/{migration}/{stream}/{conn}      (127.0.0.1)
//!                      listener)         ──── RelayOpen on the target's channel ────►
//! ```
//!
//! For every TCP connection its QEMU opens, the source agent dials
//! `GET /api/v1/relay/{migration_id}/{stream}/{conn_id}` (`stream` is
//! `migrate` or `nbd`, `conn_id` fresh per connection). The control plane
//! accepts it only from the source host of an active relayed live migration
//! in phase `transferring`, tells the target's agent
//! ([`ServerMessage::RelayOpen`]), waits up to 10 s for the target to dial the
//! same URL, and then pumps binary frames between the two WebSockets until
//! either side closes (a relayed connection closes as a whole). Bytes relayed
//! are counted for `/api/v1/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use axum::extract::{Path, State};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::oneshot;
use virt8ra_api::protocol::{ServerMessage, RELAY_STREAMS};
use virt8ra_api::{MigrationMode, MigrationPhase};

use crate::error::{ApiError, ApiResult};
use crate::http::auth::HostAuth;
use crate::state::Ctx;

/// How long the source's connection waits for the target to dial in.
const TARGET_TIMEOUT: Duration = Duration::from_secs(10);

use crate::registry::relays::Key;

fn valid_conn_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[utoipa::path(get, path = "/api/v1/relay/{migration_id}/{stream}/{conn_id}", tag = "agent",
    params(("migration_id" = String, Path), ("stream" = String, Path, description = "`migrate`, `nbd`, or `nbd-N` (data disk N)"),
           ("conn_id" = String, Path, description = "Chosen by the source for each TCP connection")),
    responses((status = 101, description = "WebSocket upgrade: binary frames carry the stream"),
              (status = 400, body = virt8ra_api::ErrorBody), (status = 403, body = virt8ra_api::ErrorBody),
              (status = 404, body = virt8ra_api::ErrorBody), (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn relay(
    State(app): State<Ctx>,
    host: HostAuth,
    Path((migration_id, stream, conn_id)): Path<(String, String, String)>,
    super::extract::Upgrade(ws): super::extract::Upgrade,
) -> ApiResult<Response> {
    if !virt8ra_api::protocol::is_relay_stream(&stream) {
        return Err(ApiError::Invalid(format!(
            "unknown stream {stream:?}; one of {RELAY_STREAMS:?} or nbd-N for data disk N"
        )));
    }
    if !valid_conn_id(&conn_id) {
        return Err(ApiError::Invalid(
            "conn_id must be 1 to 64 letters, digits, '-' or '_'".into(),
        ));
    }
    let m = app
        .migrations
        .active()
        .into_iter()
        .find(|m| m.id == migration_id)
        .ok_or_else(|| ApiError::Missing(format!("no active migration {migration_id}")))?;
    if m.mode != MigrationMode::Live || !m.relay {
        return Err(ApiError::Conflict(format!(
            "migration {migration_id} is not relayed through the control plane"
        )));
    }
    if m.phase != MigrationPhase::Transferring {
        return Err(ApiError::Conflict(format!(
            "migration {migration_id} is {}, not transferring",
            m.phase.as_str()
        )));
    }
    let key = (migration_id.clone(), stream.clone(), conn_id.clone());
    let ws = ws.max_message_size(16 << 20);
    if host.host_id == m.source.host_id {
        let (tx, rx) = oneshot::channel();
        {
            let mut p = app.migrations.relay.pending();
            if p.contains_key(&key) {
                return Err(ApiError::Conflict(format!(
                    "relay connection {conn_id} is already open"
                )));
            }
            p.insert(key.clone(), tx);
        }
        let open = ServerMessage::RelayOpen {
            migration_id,
            stream,
            conn_id,
        };
        if !app.hub.send(&m.target.host_id, open) {
            app.migrations.relay.pending().remove(&key);
            return Err(ApiError::Conflict(format!(
                "the target host {} is not connected",
                m.target.host
            )));
        }
        // Should the upgrade never complete, the entry must not stay behind.
        let (app2, key2) = (app.clone(), key.clone());
        tokio::spawn(async move {
            tokio::time::sleep(TARGET_TIMEOUT * 2).await;
            app2.migrations.relay.pending().remove(&key2);
        });
        Ok(ws.on_upgrade(move |socket| source_side(app, key, socket, rx)))
    } else if host.host_id == m.target.host_id {
        let tx = app.migrations.relay.pending().remove(&key).ok_or_else(|| {
            ApiError::Missing(format!(
                "no relay connection {conn_id} waits for the target"
            ))
        })?;
        Ok(ws.on_upgrade(move |socket| async move {
            // The source side gave up meanwhile: the socket just closes.
            let _ = tx.send(socket);
        }))
    } else {
        Err(ApiError::Forbidden(format!(
            "this host takes no part in migration {migration_id}"
        )))
    }
}

/// The source's socket: waits for the target's, then pumps between them.
async fn source_side(
    app: Ctx,
    key: Key,
    mut source: WebSocket,
    target: oneshot::Receiver<WebSocket>,
) {
    let target = match tokio::time::timeout(TARGET_TIMEOUT, target).await {
        Ok(Ok(t)) => t,
        _ => {
            app.migrations.relay.pending().remove(&key);
            tracing::warn!(migration = %key.0, stream = %key.1, conn = %key.2,
                "relay: the target did not connect in time");
            let _ = source.close().await;
            return;
        }
    };
    let relays = &app.migrations.relay;
    relays.connected();
    tracing::debug!(migration = %key.0, stream = %key.1, conn = %key.2, "relay: connected");
    let (mut s_tx, mut s_rx) = source.split();
    let (mut t_tx, mut t_rx) = target.split();
    let bytes = relays.byte_counter();
    tokio::select! {
        _ = pump(&mut s_rx, &mut t_tx, bytes) => {}
        _ = pump(&mut t_rx, &mut s_tx, bytes) => {}
    }
    let _ = s_tx.send(Message::Close(None)).await;
    let _ = t_tx.send(Message::Close(None)).await;
    tracing::debug!(migration = %key.0, stream = %key.1, conn = %key.2, "relay: closed");
}

/// Forwards binary frames from `from` to `to` until `from` closes or fails.
async fn pump(
    from: &mut futures_util::stream::SplitStream<WebSocket>,
    to: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    bytes: &AtomicU64,
) {
    while let Some(Ok(msg)) = from.next().await {
        match msg {
            Message::Binary(b) => {
                bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                if to.send(Message::Binary(b)).await.is_err() {
                    return;
                }
            }
            Message::Close(_) => return,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ids_are_plain() {
        assert!(valid_conn_id("3f2a-bc_9"));
        assert!(!valid_conn_id(""));
        assert!(!valid_conn_id("../x"));
        assert!(!valid_conn_id(&"a".repeat(65)));
    }
}
