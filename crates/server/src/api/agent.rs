//! The agents' side of the API: joining with a join token, and the
//! persistent channel (a WebSocket) that every agent dials out to.
//! The message flow is documented in `virt8ra_api::protocol`.

use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use chrono::Utc;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use virt8ra_api::protocol::{negotiate, AgentMessage, ServerMessage, PROTOCOL_VERSION};
use virt8ra_api::{validate, AgentJoin, AgentJoined, Host, HostState};
use virt8ra_store::{TokenKind, TokenRecord};

use super::{vms, Body};
use crate::auth::{self, HostAuth, JoinAuth};
use crate::error::{ApiError, ApiResult};
use crate::hub::ConsoleReply;
use crate::scheduler;
use crate::state::App;

#[utoipa::path(post, path = "/api/v1/agent/join", tag = "agent", request_body = AgentJoin,
    responses((status = 201, body = AgentJoined), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 401, body = virt8ra_api::ErrorBody), (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn join(
    State(app): State<App>,
    JoinAuth(token): JoinAuth,
    Body(req): Body<AgentJoin>,
) -> ApiResult<(StatusCode, Json<AgentJoined>)> {
    validate::name("host", &req.name).map_err(ApiError::Invalid)?;
    let site_name = token
        .site
        .clone()
        .ok_or_else(|| ApiError::Internal("join token without site".into()))?;
    let site = app.store.get_site(&site_name).await?;
    let host = Host {
        id: uuid::Uuid::new_v4().to_string(),
        name: req.name,
        site: site.name.clone(),
        provider: site.provider.clone(),
        country: site.country.clone(),
        inventory: req.inventory,
        state: HostState::Ready,
        connected: false,
        last_heartbeat: None,
        usage: Default::default(),
        allocated: Default::default(),
        cpu_overcommit: None,
        memory_overcommit: None,
        created_at: Utc::now(),
    };
    let secret = auth::new_secret();
    let rec = TokenRecord {
        id: uuid::Uuid::new_v4().to_string(),
        kind: TokenKind::Host,
        hash: auth::hash(&secret),
        site: None,
        host_id: Some(host.id.clone()),
        expires_at: None,
        uses_left: None,
        created_at: Utc::now(),
    };
    app.store.create_host(&host, &rec, &token.id).await?;
    app.hosts.put(&host);
    app.placement.invalidate();
    tracing::info!(host = %host.name, site = %site.name, "host joined");
    Ok((
        StatusCode::CREATED,
        Json(AgentJoined {
            host_id: host.id,
            host_name: host.name,
            site: site.name,
            host_token: secret,
        }),
    ))
}

#[utoipa::path(get, path = "/api/v1/agent/connect", tag = "agent",
    responses((status = 101, description = "WebSocket upgrade; see the agent protocol")),
    security(("bearer" = [])))]
pub async fn connect(
    State(app): State<App>,
    auth: HostAuth,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    // The host must still exist (a deleted host's tokens are revoked too).
    let host = app.host(&auth.host_id)?;
    Ok(ws
        .max_message_size(16 << 20)
        .on_upgrade(move |socket| session(app, host.id, socket)))
}

async fn session(app: App, host_id: String, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();

    // 1. Hello and version negotiation.
    let hello = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
    let (min, max, inventory) = match hello {
        Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<AgentMessage>(&t) {
            Ok(AgentMessage::Hello {
                protocol,
                min_protocol,
                inventory,
            }) => (min_protocol, protocol, inventory),
            _ => {
                reject(&mut sink, "the first message must be hello").await;
                return;
            }
        },
        _ => return,
    };
    let Some(version) = negotiate(min, max) else {
        reject(
            &mut sink,
            &format!(
                "agent speaks protocol {min}..{max}, control plane speaks ..{PROTOCOL_VERSION}; upgrade one of them"
            ),
        )
        .await;
        return;
    };

    // 2. Record the inventory (it may have changed since the join).
    match app.host(&host_id) {
        Ok(mut h) => {
            h.inventory = inventory;
            h.last_heartbeat = Some(Utc::now());
            if let Err(e) = app.update_host(&h).await {
                tracing::warn!(error = %e, "recording host inventory");
            }
            app.placement.invalidate();
            tracing::info!(host = %h.name, protocol = version, "agent connected");
        }
        Err(e) => {
            reject(&mut sink, &e.to_string()).await;
            return;
        }
    }

    // 3. Register and start the writer.
    let (tx, mut rx) = mpsc::unbounded_channel::<ServerMessage>();
    let conn = app.hub.register(&host_id, tx.clone());
    let _ = tx.send(ServerMessage::Welcome {
        protocol: version,
        host_id: host_id.clone(),
        heartbeat_interval_s: app.heartbeat_interval.as_secs().max(1),
    });
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let Ok(text) = serde_json::to_string(&m) else {
                continue;
            };
            if sink.send(Message::Text(text.into())).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    if let Err(e) = scheduler::sync_host(&app, &host_id).await {
        tracing::warn!(error = %e, "sending desired state");
    }
    app.wake.notify_one();

    // 4. Read until the agent goes away or falls silent. Every message
    //    already received is taken at once, and their VM reports applied as
    //    one batch (see `handle_batch`).
    let silence = app.liveness_window() * 2;
    let mut open = true;
    while open {
        let first = match tokio::time::timeout(silence, stream.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(_))) | Ok(None) => break,
            Err(_) => {
                tracing::warn!(host = %host_id, "agent silent; closing its channel");
                break;
            }
        };
        let mut raw = vec![first];
        while raw.len() < MAX_BATCH {
            use futures_util::FutureExt;
            match stream.next().now_or_never() {
                Some(Some(Ok(m))) => raw.push(m),
                Some(Some(Err(_))) | Some(None) => {
                    open = false;
                    break;
                }
                None => break,
            }
        }
        let mut batch = Vec::with_capacity(raw.len());
        for msg in raw {
            let text = match msg {
                Message::Text(t) => t,
                Message::Close(_) => {
                    open = false;
                    break;
                }
                _ => continue,
            };
            match serde_json::from_str::<AgentMessage>(&text) {
                Ok(m) => batch.push(m),
                Err(e) => {
                    tracing::warn!(host = %host_id, error = %e, "ignoring malformed agent message")
                }
            }
        }
        handle_batch(&app, &host_id, batch).await;
    }

    writer.abort();
    if app.hub.unregister(&host_id, conn) {
        if let Ok(mut h) = app.host(&host_id) {
            h.last_heartbeat = Some(Utc::now());
            let _ = app.update_host(&h).await;
        }
        tracing::info!(host = %host_id, "agent disconnected");
    }
}

/// Most agent messages taken in one batch.
const MAX_BATCH: usize = 1024;

/// Handles the messages an agent sent meanwhile. Their VM reports (from
/// heartbeats and single reports) are reduced to the latest per VM and
/// applied concurrently, so that the changes they carry share the store's
/// group commits instead of waiting for one fsync each; a report equal to
/// the last one seen writes nothing.
async fn handle_batch(app: &App, host_id: &str, msgs: Vec<AgentMessage>) {
    use std::collections::HashMap;
    use virt8ra_api::protocol::{AgentVmPhase, VmReport};
    let mut reports: Vec<VmReport> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    let mut push = |r: VmReport, reports: &mut Vec<VmReport>| match at.get(&r.id) {
        Some(&i) => reports[i] = r,
        None => {
            at.insert(r.id.clone(), reports.len());
            reports.push(r);
        }
    };
    let mut present: Option<Vec<String>> = None;
    for msg in msgs {
        match msg {
            AgentMessage::Heartbeat { usage, vms, .. } => {
                app.hub.heartbeat(host_id, usage);
                present = Some(
                    vms.iter()
                        .filter(|r| r.phase != AgentVmPhase::Deleted)
                        .map(|r| r.id.clone())
                        .collect(),
                );
                for r in vms {
                    push(r, &mut reports);
                }
            }
            AgentMessage::VmReport(r) => push(r, &mut reports),
            other => {
                if let Err(e) = handle(app, host_id, other).await {
                    tracing::warn!(host = %host_id, error = %e, "handling agent message");
                }
            }
        }
    }
    let deleted = reports.iter().any(|r| r.phase == AgentVmPhase::Deleted);
    use futures_util::StreamExt;
    futures_util::stream::iter(reports)
        .for_each_concurrent(256, |r| async move {
            if let Err(e) = vms::apply_report(app, host_id, &r).await {
                tracing::warn!(host = %host_id, error = %e, "applying a VM report");
            }
        })
        .await;
    if let Some(present) = present {
        if let Err(e) = vms::confirm_deletions(app, host_id, &present).await {
            tracing::warn!(host = %host_id, error = %e, "confirming deletions");
        }
    }
    if deleted {
        app.wake.notify_one();
    }
}

async fn handle(app: &App, host_id: &str, msg: AgentMessage) -> ApiResult<()> {
    match msg {
        AgentMessage::Hello { .. } => {}
        AgentMessage::Heartbeat { usage, vms, .. } => {
            app.hub.heartbeat(host_id, usage);
            for r in &vms {
                vms::apply_report(app, host_id, r).await?;
            }
            let present: Vec<String> = vms
                .iter()
                .filter(|r| r.phase != virt8ra_api::protocol::AgentVmPhase::Deleted)
                .map(|r| r.id.clone())
                .collect();
            vms::confirm_deletions(app, host_id, &present).await?;
        }
        AgentMessage::VmReport(r) => {
            vms::apply_report(app, host_id, &r).await?;
            if r.phase == virt8ra_api::protocol::AgentVmPhase::Deleted {
                app.wake.notify_one();
            }
        }
        AgentMessage::ConsoleData {
            request_id,
            data,
            truncated,
            error,
            ..
        } => app.hub.console_reply(
            request_id,
            ConsoleReply {
                data,
                truncated,
                error,
            },
        ),
    }
    Ok(())
}

async fn reject(sink: &mut futures_util::stream::SplitSink<WebSocket, Message>, reason: &str) {
    let msg = ServerMessage::Reject {
        reason: reason.to_string(),
    };
    if let Ok(t) = serde_json::to_string(&msg) {
        let _ = sink.send(Message::Text(t.into())).await;
    }
    let _ = sink.close().await;
}
