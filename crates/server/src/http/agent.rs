//! The agents' side of the API: joining with a join token, and the
//! persistent channel (a WebSocket) that every agent dials out to.
//! The message flow is documented in `virt8ra_api::protocol`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use chrono::Utc;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use virt8ra_api::mux::{MuxDown, MuxUp, MUX_VERSION};
use virt8ra_api::protocol::{negotiate, AgentMessage, ServerMessage, PROTOCOL_VERSION};
use virt8ra_api::{AgentJoin, AgentJoined};
use virt8ra_store::TokenKind;

use super::extract::Body;
use crate::error::{ApiError, ApiResult};
use crate::http::auth::{HostAuth, JoinAuth};
use crate::registry::hub::{ConsoleReply, Outbox};
use crate::services::{scheduler, tokens, topology};
use crate::state::Ctx;

#[utoipa::path(post, path = "/api/v1/agent/join", tag = "agent", request_body = AgentJoin,
    responses((status = 201, body = AgentJoined), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 401, body = virt8ra_api::ErrorBody), (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn join(
    State(app): State<Ctx>,
    JoinAuth(token): JoinAuth,
    Body(req): Body<AgentJoin>,
) -> ApiResult<(StatusCode, Json<AgentJoined>)> {
    let j = topology::join(&app, &token, req).await?;
    Ok((
        StatusCode::CREATED,
        Json(AgentJoined {
            host_id: j.host.id,
            host_name: j.host.name,
            site: j.site,
            host_token: j.secret,
        }),
    ))
}

#[utoipa::path(get, path = "/api/v1/agent/connect", tag = "agent",
    responses((status = 101, description = "WebSocket upgrade; see the agent protocol")),
    security(("bearer" = [])))]
pub async fn connect(
    State(app): State<Ctx>,
    auth: HostAuth,
    super::extract::Upgrade(ws): super::extract::Upgrade,
) -> ApiResult<Response> {
    // The host must still exist (a deleted host's tokens are revoked too).
    let host = app.host(&auth.host_id)?;
    Ok(ws
        .max_message_size(16 << 20)
        // One per host: the default 128 KiB read buffer would cost 1.2 GiB
        // at 10,000 hosts; frames larger than this are still read whole.
        .read_buffer_size(8 << 10)
        .on_upgrade(move |socket| session(app, host.id, socket)))
}

/// Protocol v1: one WebSocket per host. Frames are pumped into a
/// transport-independent [`host_session`]; the pumps keep the
/// connection's liveness: a ping every heartbeat interval from the writer,
/// and a read deadline of [`DEAD_AFTER`] intervals in the reader (no
/// message, no pong: the connection is closed and the host unregistered,
/// hence unreachable, at once).
async fn session(app: Ctx, host_id: String, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let (in_tx, in_rx) = flume::bounded::<AgentMessage>(INBOX);
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<ServerMessage>();
    let every = app.heartbeat_interval;
    let mut writer = tokio::spawn(async move {
        let mut ping = pings(every);
        loop {
            let m = tokio::select! {
                m = out_rx.recv() => match m {
                    Some(m) => m,
                    None => break,
                },
                _ = ping.tick() => {
                    if sink.send(Message::Ping(Default::default())).await.is_err() {
                        break;
                    }
                    continue;
                }
            };
            let Ok(text) = serde_json::to_string(&m) else {
                continue;
            };
            if sink.send(Message::Text(text.into())).await.is_err() {
                break;
            }
            if matches!(m, ServerMessage::Reject { .. }) {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let reader = {
        let host_id = host_id.clone();
        tokio::spawn(async move {
            let mut deadline = Deadline::new(every * DEAD_AFTER);
            loop {
                let msg = tokio::select! {
                    // Frames already received before the deadline.
                    biased;
                    m = stream.next() => match m {
                        Some(Ok(m)) => m,
                        _ => break,
                    },
                    silent = deadline.expired() => {
                        tracing::warn!(
                            host = %host_id,
                            silent_s = format!("{:.1}", silent.as_secs_f64()),
                            "agent channel silent for {DEAD_AFTER} heartbeat intervals \
                             (no message, no pong): closing it; the host is unreachable"
                        );
                        break;
                    }
                };
                deadline.heard();
                let text = match msg {
                    Message::Text(t) => t,
                    Message::Close(_) => break,
                    _ => continue,
                };
                match serde_json::from_str::<AgentMessage>(&text) {
                    Ok(m) => {
                        if in_tx.send_async(m).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(host = %host_id, error = %e, "ignoring malformed agent message")
                    }
                }
            }
        })
    };
    host_session(&app, &host_id, in_rx, Outbox::Direct(out_tx), None).await;
    reader.abort();
    // The writer ends once every sender is gone (the hub's went with the
    // unregistration); give it a moment to flush a rejection, then stop
    // it (on a dead link its last write may never finish).
    if tokio::time::timeout(Duration::from_secs(5), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

/// Heartbeat intervals without a frame from an agent's connection (a
/// message, a pong, a ping) after which the control plane closes it.
pub const DEAD_AFTER: u32 = 3;

/// The ping clock of a connection's writer: every `every`, the first one
/// interval after the start, late ticks not caught up.
fn pings(every: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

/// A connection's read deadline: one timer, moved on only when it fires
/// (not for every frame: a mux connection carries thousands a second).
struct Deadline {
    after: Duration,
    last: tokio::time::Instant,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Deadline {
    fn new(after: Duration) -> Deadline {
        let last = tokio::time::Instant::now();
        Deadline {
            after,
            last,
            timer: Box::pin(tokio::time::sleep_until(last + after)),
        }
    }

    /// A frame arrived.
    fn heard(&mut self) {
        self.last = tokio::time::Instant::now();
    }

    /// Resolves, with how long it was silent, once nothing has been heard
    /// for the deadline. Cancel-safe.
    async fn expired(&mut self) -> Duration {
        loop {
            self.timer.as_mut().await;
            let silent = self.last.elapsed();
            if silent >= self.after {
                return silent;
            }
            let at = self.last + self.after;
            self.timer.as_mut().reset(at);
        }
    }
}

/// Messages queued per host before its transport waits. A flume channel,
/// not tokio's: tokio's allocates a block of 32 messages per channel up
/// front, 4 KiB per host at 100,000 hosts; flume's queue grows on demand.
const INBOX: usize = 1024;

/// One host's session over any transport (its own WebSocket, or a channel
/// of a multiplexed one): `inbox` yields the agent's messages and ends when
/// the transport closes; `outbox` carries the control plane's. A
/// multiplexed transport passes `attached`, where the session leaves its
/// hub connection id once registered, so that the transport can record
/// quiet heartbeats itself (see [`beat_inline`]).
async fn host_session(
    app: &Ctx,
    host_id: &str,
    inbox: flume::Receiver<AgentMessage>,
    outbox: Outbox,
    attached: Option<&AtomicU64>,
) {
    let reject = |reason: String| {
        let _ = outbox.send(ServerMessage::Reject { reason });
    };
    // 1. Hello and version negotiation.
    let (min, max, inventory, networks) =
        match tokio::time::timeout(Duration::from_secs(10), inbox.recv_async()).await {
            Ok(Ok(AgentMessage::Hello {
                protocol,
                min_protocol,
                inventory,
                networks,
            })) => (min_protocol, protocol, inventory, networks),
            Ok(Ok(_)) => return reject("the first message must be hello".into()),
            _ => return,
        };
    let Some(version) = negotiate(min, max) else {
        return reject(format!(
            "agent speaks protocol {min}..{max}, control plane speaks ..{PROTOCOL_VERSION}; upgrade one of them"
        ));
    };

    // 2. Record the inventory (it may have changed since the join).
    match app.host(host_id) {
        Ok(mut h) => {
            h.inventory = *inventory;
            topology::take_tunnel_address(app, &mut h);
            h.last_heartbeat = Some(Utc::now());
            if let Err(e) = Box::pin(app.update_host(&h)).await {
                tracing::warn!(error = %e, "recording host inventory");
            }
            tracing::info!(host = %h.name, protocol = version, "agent connected");
        }
        Err(e) => return reject(e.to_string()),
    }

    // 3. Register.
    let conn = app.hub.register(host_id, outbox.clone());
    app.hub.set_protocol(host_id, version);
    if let Some(a) = attached {
        a.store(conn, Ordering::Release);
    }
    // Ready for placement at once (connected, so alive), inventory and all.
    if let Ok(h) = app.host(host_id) {
        app.placement.upsert_host(app, &h);
    }
    let _ = outbox.send(ServerMessage::Welcome {
        protocol: version,
        host_id: host_id.to_string(),
        heartbeat_interval_s: app.heartbeat_interval.as_secs().max(1),
        site_secret: topology::site_secret(app, host_id).await,
    });
    drop(outbox);
    crate::services::netplane::host_connected(app, host_id, networks);
    // Boxed, here and below: a session lives as long as its host is
    // connected, and inlining these futures made each session's task 7 KiB.
    if let Err(e) = Box::pin(scheduler::sync_host(app, host_id)).await {
        tracing::warn!(error = %e, "sending desired state");
    }
    app.wake.notify_one();

    // 4. Read until the agent goes away or falls silent. Every message
    //    already received is taken at once, and their VM reports applied as
    //    one batch (see `handle_batch`).
    //    Silence is checked lazily: one timer for the session, moved on
    //    only when it fires, instead of a timer set and cancelled for every
    //    message (at 100,000 hosts, 20,000 heartbeats a second). Quiet
    //    heartbeats a mux transport recorded itself count too: they are in
    //    the hub's last beat of this connection.
    let silence = app.liveness_window() * 2;
    let mut last = tokio::time::Instant::now();
    let timer = tokio::time::sleep(silence);
    tokio::pin!(timer);
    loop {
        let first = tokio::select! {
            // A message already waiting wins over the timer.
            biased;
            m = inbox.recv_async() => match m {
                Ok(m) => m,
                Err(_) => break,
            },
            () = &mut timer => {
                if let Some(t) = app.hub.last_beat(host_id, conn) {
                    last = last.max(tokio::time::Instant::from_std(t));
                }
                if last.elapsed() >= silence {
                    tracing::warn!(host = %host_id, "agent silent; closing its channel");
                    break;
                }
                timer.as_mut().reset(last + silence);
                continue;
            }
        };
        last = tokio::time::Instant::now();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match inbox.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        Box::pin(handle_batch(app, host_id, batch)).await;
    }

    if app.hub.unregister(host_id, conn) {
        if let Ok(mut h) = app.host(host_id) {
            h.last_heartbeat = Some(Utc::now());
            let _ = Box::pin(app.update_host(&h)).await;
        }
        tracing::info!(host = %host_id, "agent disconnected");
    }
}

#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct MuxQuery {
    /// The mux version the client speaks (this control plane: 1).
    pub version: u32,
}

/// Channels one mux connection may carry.
const MAX_CHANNELS: usize = 100_000;

/// A mux connection's read buffer (see [`mux`]).
const MUX_READ_BUFFER: usize = 16 << 10;

/// Most frames a mux connection's writer sends with one flush.
const MUX_WRITE_BATCH: usize = 256;

#[utoipa::path(get, path = "/api/v1/agent/mux", tag = "agent", params(MuxQuery),
    responses((status = 101, description = "WebSocket upgrade; many hosts on one connection, see `virt8ra_api::mux`"),
              (status = 400, body = virt8ra_api::ErrorBody), (status = 401, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn mux(
    State(app): State<Ctx>,
    _auth: HostAuth,
    super::extract::Query(q): super::extract::Query<MuxQuery>,
    super::extract::Upgrade(ws): super::extract::Upgrade,
) -> ApiResult<Response> {
    if q.version != MUX_VERSION {
        return Err(ApiError::Invalid(format!(
            "mux version {} is not spoken here (this control plane speaks {MUX_VERSION}); \
             use one connection per host",
            q.version
        )));
    }
    Ok(ws
        .max_message_size(16 << 20)
        // tungstenite zero-fills its free read buffer before every read:
        // with the default 128 KiB that was a 128 KiB memset per read, for
        // frames of a few hundred bytes (most of them heartbeats). Larger
        // frames still arrive whole (the buffer grows to fit them).
        .read_buffer_size(MUX_READ_BUFFER)
        .on_upgrade(move |socket| mux_session(app, socket)))
}

/// The multiplexed transport: demultiplexes channel frames into one
/// [`host_session`] per attached host, and multiplexes their answers.
async fn mux_session(app: Ctx, socket: WebSocket) {
    use std::collections::HashMap;
    let (sink, mut stream) = socket.split();
    let (down_tx, down_rx) = mpsc::unbounded_channel::<MuxDown>();
    let every = app.heartbeat_interval;
    let mut writer = tokio::spawn(mux_writer(sink, down_rx, every));
    let mut channels: HashMap<u32, MuxChannel> = HashMap::new();
    let mut sessions = tokio::task::JoinSet::new();
    // One read deadline for the connection, none per host.
    let mut deadline = Deadline::new(every * DEAD_AFTER);
    loop {
        let msg = tokio::select! {
            biased;
            m = stream.next() => match m {
                Some(Ok(m)) => m,
                _ => break,
            },
            silent = deadline.expired() => {
                tracing::warn!(
                    hosts = channels.len(),
                    silent_s = format!("{:.1}", silent.as_secs_f64()),
                    "mux connection silent for {DEAD_AFTER} heartbeat intervals \
                     (no frame, no pong): closing it; its hosts are unreachable"
                );
                break;
            }
        };
        deadline.heard();
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(_) => break,
            _ => continue,
        };
        let frame = match serde_json::from_str::<MuxUp>(&text) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring malformed mux frame");
                continue;
            }
        };
        match frame {
            MuxUp::Attach { ch, host_token } => {
                let closed = |reason: String| {
                    let _ = down_tx.send(MuxDown::Closed { ch, reason });
                };
                if channels.get(&ch).is_some_and(|c| c.tx.is_disconnected()) {
                    channels.remove(&ch);
                }
                if channels.contains_key(&ch) {
                    closed(format!("channel {ch} is already attached"));
                    continue;
                }
                if channels.len() >= MAX_CHANNELS {
                    closed(format!(
                        "this connection carries {MAX_CHANNELS} channels already"
                    ));
                    continue;
                }
                let host_id = match tokens::authenticate(&app, &host_token).await {
                    Ok(rec) if rec.kind == TokenKind::Host => rec.host_id,
                    Ok(_) => None,
                    Err(e) => {
                        closed(e.to_string());
                        continue;
                    }
                };
                let Some(host_id) = host_id.filter(|h| app.hosts.get(h).is_some()) else {
                    closed("not a host credential, or the host was deleted".into());
                    continue;
                };
                let (in_tx, in_rx) = flume::bounded::<AgentMessage>(INBOX);
                let host_id: Arc<str> = host_id.into();
                let conn = Arc::new(AtomicU64::new(0));
                channels.insert(
                    ch,
                    MuxChannel {
                        tx: in_tx,
                        host_id: host_id.clone(),
                        conn: conn.clone(),
                    },
                );
                let (app, down) = (app.clone(), down_tx.clone());
                sessions.spawn(async move {
                    let outbox = Outbox::Mux {
                        ch,
                        down: down.clone(),
                    };
                    host_session(&app, &host_id, in_rx, outbox, Some(&conn)).await;
                    // After anything the session queued (a rejection).
                    let _ = down.send(MuxDown::Closed {
                        ch,
                        reason: "session ended".into(),
                    });
                });
            }
            MuxUp::Msg { ch, msg } => {
                let gone = match channels.get(&ch) {
                    Some(c) => match beat_inline(&app, c, *msg) {
                        None => false,
                        Some(msg) => c.tx.send_async(msg).await.is_err(),
                    },
                    None => {
                        let _ = down_tx.send(MuxDown::Closed {
                            ch,
                            reason: format!("channel {ch} is not attached"),
                        });
                        false
                    }
                };
                if gone {
                    channels.remove(&ch);
                }
            }
            MuxUp::Detach { ch } => {
                channels.remove(&ch);
            }
        }
        while sessions.try_join_next().is_some() {}
    }
    // The connection is gone: every channel's session ends.
    drop(channels);
    while sessions.join_next().await.is_some() {}
    drop(down_tx);
    if tokio::time::timeout(Duration::from_secs(5), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

/// A mux connection's writer: the sessions' frames, batched, and a ping
/// every heartbeat interval.
async fn mux_writer(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut down_rx: mpsc::UnboundedReceiver<MuxDown>,
    every: Duration,
) {
    // One ping clock for the connection, none per host.
    let mut ping = pings(every);
    // Every frame queued meanwhile goes out with one flush (one write
    // to the socket) instead of one each.
    let mut batch = Vec::new();
    loop {
        let n = tokio::select! {
            n = down_rx.recv_many(&mut batch, MUX_WRITE_BATCH) => n,
            _ = ping.tick() => {
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    break;
                }
                continue;
            }
        };
        if n == 0 {
            break;
        }
        // The task that queued the first frame woke this writer, which
        // then runs next on that worker, before the other tasks already
        // ready there (host sessions about to queue theirs): let them
        // run first, so that their frames share this write.
        if batch.len() < MUX_WRITE_BATCH {
            tokio::task::yield_now().await;
            while batch.len() < MUX_WRITE_BATCH {
                let Ok(m) = down_rx.try_recv() else { break };
                batch.push(m);
            }
        }
        let mut ok = true;
        for m in batch.drain(..) {
            let Ok(text) = serde_json::to_string(&m) else {
                continue;
            };
            if sink.feed(Message::Text(text.into())).await.is_err() {
                ok = false;
                break;
            }
        }
        if !ok || sink.flush().await.is_err() {
            break;
        }
    }
    let _ = sink.close().await;
}

/// A channel of a mux connection, as its reader sees it.
struct MuxChannel {
    /// The host session's inbox.
    tx: flume::Sender<AgentMessage>,
    host_id: Arc<str>,
    /// The session's hub connection id once it is registered, 0 before.
    conn: Arc<AtomicU64>,
}

/// Records a quiet heartbeat (v3: no VM report changed, no migration on
/// the host) in the reader of a mux connection instead of passing it to
/// the host's session: at 100,000 hosts most of the 20,000 heartbeats a
/// second are quiet, and each would otherwise wake a session task to do
/// what is done here. Only when the session's inbox is empty, so that the
/// heartbeat is not recorded ahead of messages still waiting for the
/// session, and only once the session is registered. A batch the session
/// has already taken may still be in progress and hold an older heartbeat;
/// the hub keeps the usage of the highest `seq` (see `Live::beat`). Gives
/// the message back when it is anything else, for the session.
fn beat_inline(app: &Ctx, chan: &MuxChannel, msg: AgentMessage) -> Option<AgentMessage> {
    let conn = chan.conn.load(Ordering::Acquire);
    if conn == 0 || !chan.tx.is_empty() {
        return Some(msg);
    }
    match msg {
        AgentMessage::Heartbeat {
            usage,
            vms_unchanged: true,
            migrations,
            seq,
            vms,
        } if migrations.is_empty() => {
            if let Err(usage) = app.hub.heartbeat_on(&chan.host_id, conn, seq, usage) {
                // Not (or no longer) this session's connection: the
                // session decides.
                return Some(AgentMessage::Heartbeat {
                    seq,
                    usage,
                    vms,
                    vms_unchanged: true,
                    migrations,
                });
            }
            // As `handle_batch` does for a quiet heartbeat.
            if app.has_deletions(&chan.host_id) || app.migrations.waits_on(&chan.host_id) {
                app.hub.send(&chan.host_id, ServerMessage::ReportRequest);
            }
            None
        }
        other => Some(other),
    }
}

/// Most agent messages taken in one batch.
const MAX_BATCH: usize = 1024;

/// Handles the messages an agent sent meanwhile. Their VM reports (from
/// heartbeats and single reports) are reduced to the latest per VM and
/// applied concurrently, so that the changes they carry share the store's
/// group commits instead of waiting for one fsync each; a report equal to
/// the last one seen writes nothing.
async fn handle_batch(app: &Ctx, host_id: &str, msgs: Vec<AgentMessage>) {
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
            AgentMessage::Heartbeat {
                seq,
                usage,
                vms,
                vms_unchanged,
                migrations,
            } => {
                app.hub.heartbeat(host_id, seq, usage);
                for r in migrations {
                    handle_migration_report(app, host_id, r).await;
                }
                if vms_unchanged {
                    // A quiet heartbeat (v3): nothing changed. When this
                    // host's list of VMs is needed, ask for it.
                    if app.has_deletions(host_id) || app.migrations.waits_on(host_id) {
                        app.hub.send(host_id, ServerMessage::ReportRequest);
                    }
                    continue;
                }
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
    for r in reports.iter().filter(|r| r.phase == AgentVmPhase::Deleted) {
        app.migrations.note_gone(host_id, &r.id);
    }
    use futures_util::StreamExt;
    futures_util::stream::iter(reports)
        .for_each_concurrent(256, |r| async move {
            if let Err(e) = crate::services::reports::apply_report(app, host_id, &r).await {
                tracing::warn!(host = %host_id, error = %e, "applying a VM report");
            }
        })
        .await;
    if let Some(present) = present {
        app.migrations.note_present(host_id, &present);
        if let Err(e) = crate::services::reports::confirm_deletions(app, host_id, &present).await {
            tracing::warn!(host = %host_id, error = %e, "confirming deletions");
        }
    }
    if deleted {
        app.wake.notify_one();
    }
}

async fn handle(app: &Ctx, host_id: &str, msg: AgentMessage) -> ApiResult<()> {
    match msg {
        AgentMessage::Hello { .. } => {}
        // Taken in batches by `handle_batch`.
        AgentMessage::Heartbeat { .. } | AgentMessage::VmReport(_) => {}
        AgentMessage::DesiredRequest => {
            tracing::info!(host = %host_id, "agent asked for its whole desired state");
            app.hub.forget_sent(host_id);
            app.mark_host(host_id);
            app.wake.notify_one();
        }
        AgentMessage::MigrationReport(r) => handle_migration_report(app, host_id, *r).await,
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

async fn handle_migration_report(
    app: &Ctx,
    host_id: &str,
    r: virt8ra_api::protocol::MigrationReport,
) {
    let is_export = app
        .migrations
        .active_exports()
        .iter()
        .any(|e| e.id == r.migration_id);
    let r2 = r.clone();
    app.migrations.note_report(host_id, r);
    if is_export {
        if let Err(e) = crate::workflows::export::finish(app, &r2).await {
            tracing::warn!(export = %r2.migration_id, error = %e, "recording an export");
        }
    }
}
