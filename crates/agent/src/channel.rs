//! The agent's one outbound channel to the control plane.
//!
//! A WebSocket dialled from the host, so a host behind NAT needs no inbound
//! port. A connection that falls silent is found dead within three
//! heartbeat intervals ([`crate::liveness`]) and dialled again at once; on
//! any other failure the agent waits (exponential backoff with jitter, at
//! most 10 s, [`MAX_REDIAL_WAIT`]) and dials again; meanwhile the
//! reconciler keeps the VMs going from the local desired state.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use virt8ra_api::protocol::{
    AgentMessage, ServerMessage, VmReport, FULL_HEARTBEAT_EVERY, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION, QUIET_HEARTBEAT_PROTOCOL_VERSION,
};
use virt8ra_api::HostInventory;

use crate::driver::Driver;
use crate::liveness::{keepalive, Due, Liveness, DEAD_AFTER, DEFAULT_INTERVAL};
use crate::reconciler::{Reconciler, Reports};

pub struct Channel {
    pub server: String,
    pub host_token: String,
    /// Whose certificates a `wss://` control plane may present.
    pub trust: virt8ra_tls::Trust,
    pub inventory: HostInventory,
    pub data_dir: std::path::PathBuf,
    pub driver: Arc<dyn Driver>,
    pub reconciler: Arc<Reconciler>,
    pub reports: Arc<Reports>,
    /// Migrations and exports (absent for simulated hosts).
    pub mover: Option<Arc<crate::mover::Mover>>,
}

/// A session's transport, as channels of protocol v1 messages: a WebSocket
/// of its own ([`connect_ws`]) or a channel of a multiplexed connection.
/// `rx` ends when the transport closes; sends fail once it has.
///
/// Small on purpose: a process of simulated hosts holds one per host, and a
/// tokio channel allocates room for 32 messages up front, so messages down
/// are boxed and messages up go straight to the transport ([`LinkTx`]).
pub struct Link {
    pub tx: LinkTx,
    pub rx: mpsc::UnboundedReceiver<Box<ServerMessage>>,
}

/// Sends a message up a [`Link`]; fails once the transport has closed.
pub type LinkTx = Arc<dyn Fn(AgentMessage) -> anyhow::Result<()> + Send + Sync>;

/// Dials the host's own WebSocket (protocol v1) and pumps it into a [`Link`].
/// The pump keeps the connection's liveness ([`crate::liveness`]): pings,
/// a read deadline, TCP keepalive.
pub async fn connect_ws(
    server: &str,
    host_token: &str,
    trust: &virt8ra_tls::Trust,
) -> anyhow::Result<Link> {
    let url = crate::net::ws_url(server)?;
    let mut req = url.as_str().into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {host_token}").parse()?);
    // A small read buffer (the default is 128 KiB): one process may run
    // thousands of simulated hosts.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(8 << 10);
    let (ws, _) = trust
        .connect_ws(req, Some(config))
        .await
        .map_err(|e| anyhow::anyhow!("connect {url}: {}", trust.describe(&e, &url)))?;
    let (tx, up) = mpsc::unbounded_channel::<AgentMessage>();
    let (down, rx) = mpsc::unbounded_channel::<Box<ServerMessage>>();
    tokio::spawn(pump_ws(ws, up, down));
    let tx: LinkTx = Arc::new(move |m| {
        tx.send(m)
            .map_err(|_| anyhow::anyhow!("the connection to the control plane closed"))
    });
    Ok(Link { tx, rx })
}

/// Moves one host's messages between its WebSocket and its [`Link`] until
/// either ends or the control plane falls silent for [`DEAD_AFTER`]
/// heartbeat intervals. Frames already received are read before the
/// deadline is looked at (`biased`), so an agent that was merely not
/// scheduled for a while does not call a live link dead.
async fn pump_ws(
    mut ws: virt8ra_tls::WebSocket,
    mut up: mpsc::UnboundedReceiver<AgentMessage>,
    down: mpsc::UnboundedSender<Box<ServerMessage>>,
) {
    let mut live = Liveness::new(DEFAULT_INTERVAL);
    keepalive(&ws, live.interval());
    loop {
        let out = tokio::select! {
            biased;
            m = ws.next() => {
                live.heard();
                let text = match m {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => continue,
                };
                match serde_json::from_str::<ServerMessage>(&text) {
                    Ok(m) => {
                        if let Some(every) = Liveness::interval_of(&m) {
                            if live.learn(every) {
                                keepalive(&ws, every);
                            }
                        }
                        if down.send(Box::new(m)).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring a message this agent does not understand")
                    }
                }
                continue;
            }
            m = up.recv() => {
                let Some(m) = m else { break };
                let Ok(text) = serde_json::to_string(&m) else { continue };
                Message::Text(text.into())
            }
            d = live.due() => match d {
                Due::Ping => Message::Ping(Default::default()),
                Due::Dead(silent) => {
                    warn_dead(silent, live.interval(), "its channel");
                    break;
                }
            },
        };
        // A write that cannot finish (the socket's buffer full on a dead
        // link) is as dead as silence.
        let limit = live.interval() * DEAD_AFTER;
        match tokio::time::timeout(limit, ws.send(out)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break,
            Err(_) => {
                warn_dead(
                    limit,
                    live.interval(),
                    "its channel (a write never finished)",
                );
                break;
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
}

/// The log line of a connection found dead: how long it was silent.
pub(crate) fn warn_dead(silent: Duration, every: Duration, what: &str) {
    tracing::warn!(
        silent_s = format!("{:.1}", silent.as_secs_f64()),
        heartbeat_interval_s = every.as_secs(),
        "nothing from the control plane for {:.1} s ({DEAD_AFTER} heartbeat intervals): \
         {what} is dead; dropping the connection and dialling again",
        silent.as_secs_f64()
    );
}

impl Channel {
    /// Keeps the channel up until the process ends: a WebSocket of its own
    /// (protocol v1), dialled again with backoff whenever it fails.
    pub async fn run(self, changes: mpsc::UnboundedReceiver<Box<VmReport>>) {
        let (server, token) = (self.server.clone(), self.host_token.clone());
        let trust = self.trust.clone();
        self.run_over(changes, move || {
            let (server, token, trust) = (server.clone(), token.clone(), trust.clone());
            async move { connect_ws(&server, &token, &trust).await }
        })
        .await
    }

    /// Runs over links that `connect` opens (one per session; reconnecting
    /// with backoff like [`Channel::run`]), e.g. channels of a multiplexed
    /// connection.
    ///
    /// After a healthy session (welcomed, and up for at least a heartbeat
    /// interval) the first dial is at once; after a failed one the wait
    /// grows ([`Backoff`], at most [`MAX_REDIAL_WAIT`] with jitter), counted
    /// from when that attempt started, and a dial that hangs (its packets
    /// dropped) is given up after [`DIAL_TIMEOUT`]. So attempts start at
    /// most 10 s apart, and a control plane that comes back is found
    /// within about 10 s.
    pub async fn run_over<F, Fut>(
        self,
        mut changes: mpsc::UnboundedReceiver<Box<VmReport>>,
        connect: F,
    ) where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Link>>,
    {
        let mut backoff = Backoff::default();
        loop {
            let started = std::time::Instant::now();
            let mut welcomed = None;
            let r = match tokio::time::timeout(DIAL_TIMEOUT, connect()).await {
                Ok(Ok(link)) => self.session_over(link, &mut changes, &mut welcomed).await,
                Ok(Err(e)) => Err(e),
                Err(_) => Err(anyhow::anyhow!(
                    "no connection to the control plane within {} s",
                    DIAL_TIMEOUT.as_secs()
                )),
            };
            match r {
                Ok(()) => tracing::info!("the channel to the control plane closed"),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "channel to the control plane failed")
                }
            }
            let took = started.elapsed();
            let wait = match welcomed {
                Some(every) if took >= every => {
                    backoff = Backoff::default();
                    Duration::ZERO
                }
                _ => backoff.next(took),
            };
            tracing::info!(retry_in_ms = wait.as_millis() as u64, "reconnecting");
            tokio::time::sleep(wait).await;
        }
    }

    /// One session over a link: hello, welcome, then heartbeats, reports and
    /// the control plane's messages until the link closes.
    /// `welcomed` gets the heartbeat interval once the control plane has
    /// welcomed the host.
    async fn session_over(
        &self,
        link: Link,
        changes: &mut mpsc::UnboundedReceiver<Box<VmReport>>,
        welcomed: &mut Option<Duration>,
    ) -> anyhow::Result<()> {
        let Link { tx, mut rx } = link;
        tx(AgentMessage::Hello {
            protocol: PROTOCOL_VERSION,
            min_protocol: MIN_PROTOCOL_VERSION,
            inventory: Box::new(self.inventory.clone()),
            networks: crate::network::carries_networks(&self.data_dir),
        })?;

        // Welcome or reject.
        let first = tokio::time::timeout(Duration::from_secs(15), rx.recv())
            .await
            .context("no welcome from the control plane")?
            .map(|b| *b);
        let (interval, protocol) = match first {
            None => bail!("closed before welcome"),
            Some(ServerMessage::Welcome {
                protocol,
                heartbeat_interval_s,
                site_secret,
                ..
            }) => {
                tracing::info!(protocol, "connected to the control plane");
                self.reconciler.images().set_site_secret(site_secret);
                (
                    Duration::from_secs(heartbeat_interval_s.clamp(1, 300)),
                    protocol,
                )
            }
            Some(ServerMessage::Reject { reason }) => bail!("rejected: {reason}"),
            Some(_) => bail!("expected welcome"),
        };
        *welcomed = Some(interval);

        // Drop changes queued while disconnected: the first heartbeat carries them all.
        while changes.try_recv().is_ok() {}
        let mut migration_changes = self.mover.as_ref().map(|m| m.subscribe());
        let mut tick = tokio::time::interval_at(next_beat_slot(BEAT_GRID), interval);
        let mut seq = 0u64;
        // The report version the last complete heartbeat carried (v3).
        let mut beat = Beats {
            quiet: protocol >= QUIET_HEARTBEAT_PROTOCOL_VERSION,
            sent: None,
        };
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    seq += 1;
                    tx(self.heartbeat(seq, &mut beat, false))?;
                }
                Some(r) = changes.recv() => {
                    tx(AgentMessage::VmReport(*r))?;
                }
                Some(r) = async {
                    match migration_changes.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    tx(AgentMessage::MigrationReport(r))?;
                }
                m = rx.recv() => {
                    let Some(msg) = m else { return Ok(()) };
                    if *msg == ServerMessage::ReportRequest {
                        seq += 1;
                        tx(self.heartbeat(seq, &mut beat, true))?;
                        continue;
                    }
                    self.handle(*msg, &tx).await?;
                }
            }
        }
    }

    /// A heartbeat: usage, migrations, and every VM's report unless the
    /// connection speaks quiet heartbeats (v3), nothing changed since the
    /// last complete one, it is not a twelfth beat and none was asked for.
    fn heartbeat(&self, seq: u64, beat: &mut Beats, full: bool) -> AgentMessage {
        let running = self.reports.running();
        let usage = self
            .driver
            .usage(running)
            .unwrap_or_else(|| crate::inventory::usage(&self.data_dir, running));
        // Read before the reports: a change in between makes the next
        // heartbeat complete again, never the other way round.
        let version = self.reports.version();
        let quiet = beat.quiet
            && !full
            && beat.sent == Some(version)
            && !seq.is_multiple_of(FULL_HEARTBEAT_EVERY);
        let vms = if quiet {
            Vec::new()
        } else {
            beat.sent = Some(version);
            self.reports.all()
        };
        AgentMessage::Heartbeat {
            seq,
            usage,
            vms,
            vms_unchanged: quiet,
            migrations: self.mover.as_ref().map(|m| m.all()).unwrap_or_default(),
        }
    }

    /// Keeps and applies the host's network state (off the async
    /// threads: it runs commands). A failure is logged, not fatal to the
    /// channel: the state is kept and applied again at the next start.
    ///
    /// An empty state on a host that carries no network is not applied:
    /// nothing of ours can be there to remove (a state is kept before it
    /// is applied), and the data plane would otherwise remove every `v8`
    /// device of this network namespace, which may be another agent's.
    async fn network_state(&self, generation: u64, state: virt8ra_api::HostNetworkState) {
        if !self.driver.uses_taps() {
            // Simulated hosts: their VMs have no taps, and many of them
            // share one network namespace, which none may change.
            tracing::debug!(
                generation,
                "network state ignored: this driver has no data plane"
            );
            return;
        }
        let data_dir = self.data_dir.clone();
        if state.underlay.is_unspecified() && !state.networks.is_empty() {
            tracing::warn!(
                "this host carries virtual networks but has no address other hosts reach it \
                 at (agent --address IP): its guests reach only the guests of this host"
            );
        }
        let r = tokio::task::spawn_blocking(move || {
            let stored = crate::network::Stored { generation, state };
            if let Err(e) = stored.state.validate() {
                return Err(crate::network::NetError(format!(
                    "network state {generation} refused: {e}"
                )));
            }
            if stored.state.networks.is_empty() && !crate::network::carries_networks(&data_dir) {
                return Ok(None);
            }
            if !crate::network::store(&data_dir, &stored)? {
                return Ok(None);
            }
            crate::network::reconcile(&stored.state, &data_dir).map(Some)
        })
        .await;
        match r {
            Ok(Ok(Some(c))) => {
                tracing::info!(generation, changes = c.0.len(), "network state applied")
            }
            Ok(Ok(None)) => tracing::debug!(
                generation,
                "network state older, or empty as before: nothing to do"
            ),
            Ok(Err(e)) => tracing::warn!(generation, error = %e, "network state not applied"),
            Err(e) => tracing::warn!(generation, error = %e, "network state task failed"),
        }
    }

    async fn handle(&self, msg: ServerMessage, out: &LinkTx) -> anyhow::Result<()> {
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
            ServerMessage::DesiredChanges {
                generation,
                base,
                upsert,
                remove,
                prestage,
            } => {
                tracing::debug!(
                    generation,
                    upsert = upsert.len(),
                    remove = remove.len(),
                    "desired-state changes"
                );
                if let Some(p) = prestage {
                    self.reconciler.prestage(p);
                }
                if let Err(e) = self
                    .reconciler
                    .apply_changes(generation, base, upsert, remove)
                    .await?
                {
                    tracing::warn!(
                        base = e.base,
                        have = e.have,
                        "desired-state changes for another generation; asking for the whole state"
                    );
                    out(AgentMessage::DesiredRequest)?;
                }
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
                    let _ = out(AgentMessage::ConsoleData {
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
                let trust = self.trust.clone();
                tokio::spawn(async move {
                    let r = crate::relay::serve_target(
                        &server,
                        &token,
                        &trust,
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
            ServerMessage::NetworkState { generation, state } => {
                self.network_state(generation, state).await;
            }
            ServerMessage::Reject { reason } => bail!("rejected: {reason}"),
            ServerMessage::Welcome { .. } | ServerMessage::ReportRequest => {}
        }
        Ok(())
    }
}

/// The longest wait between two dial attempts, jitter included.
pub const MAX_REDIAL_WAIT: Duration = Duration::from_secs(10);

/// How long one dial (TCP, TLS, WebSocket upgrade) may take: a dial whose
/// packets are dropped would otherwise wait for the kernel's SYN retries
/// (over two minutes).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Redial waits after failures: 0.5 s doubling up to two thirds of
/// [`MAX_REDIAL_WAIT`], plus up to half as much again of jitter, so never
/// over [`MAX_REDIAL_WAIT`] (issue 30 measured 45 s with the old 30 s cap
/// plus jitter).
struct Backoff {
    base: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            base: Duration::from_millis(500),
        }
    }
}

impl Backoff {
    /// The wait before the next attempt, the last one having taken
    /// `took` (counted towards the wait); doubles the next one's base.
    fn next(&mut self, took: Duration) -> Duration {
        let half = self.base.as_millis() as u64 / 2;
        let jitter = Duration::from_millis(rand::thread_rng().gen_range(0..=half));
        let wait = (self.base + jitter).min(MAX_REDIAL_WAIT);
        self.base = (self.base * 2).min(MAX_REDIAL_WAIT * 2 / 3);
        wait.saturating_sub(took)
    }
}

/// Heartbeats of all the hosts in one process start on a shared grid of
/// this step (and, their interval being whole seconds, stay on it), so that
/// the hosts of one multiplexed connection send theirs a few dozen per
/// write instead of one write, TCP segment and wake-up each on both sides.
/// A host of its own only sends its first heartbeat up to this much later.
const BEAT_GRID: Duration = Duration::from_millis(100);

/// The first point of the process-wide grid of step `grid` later than now
/// (the grid starts at the first call).
fn next_beat_slot(grid: Duration) -> tokio::time::Instant {
    static EPOCH: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(tokio::time::Instant::now);
    epoch + slot_after(epoch.elapsed(), grid)
}

/// The first multiple of `grid` greater than `elapsed`.
fn slot_after(elapsed: Duration, grid: Duration) -> Duration {
    let step = grid.as_nanos().max(1);
    let slots = elapsed.as_nanos() / step + 1;
    Duration::from_nanos(u64::try_from(slots * step).unwrap_or(u64::MAX))
}

/// What a session remembers between heartbeats.
struct Beats {
    /// The connection speaks quiet heartbeats (v3).
    quiet: bool,
    /// The report version of the last complete heartbeat.
    sent: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redial_waits_grow_and_never_pass_ten_seconds() {
        for _ in 0..200 {
            let mut b = Backoff::default();
            let waits: Vec<Duration> = (0..12).map(|_| b.next(Duration::ZERO)).collect();
            let ms = |d: &Duration| d.as_millis() as u64;
            assert!((500..=750).contains(&ms(&waits[0])), "{waits:?}");
            assert!((1000..=1500).contains(&ms(&waits[1])), "{waits:?}");
            assert!(waits.iter().all(|w| *w <= MAX_REDIAL_WAIT), "{waits:?}");
            // From the fifth on: at the cap, still spread by jitter.
            assert!(waits[5..].iter().all(|w| ms(w) >= 6666), "{waits:?}");
        }
        // Time spent on the failed attempt counts towards the wait.
        let mut b = Backoff::default();
        assert_eq!(b.next(Duration::from_secs(1)), Duration::ZERO);
        let w = b.next(Duration::from_millis(400));
        assert!(w >= Duration::from_millis(600) && w <= Duration::from_millis(1100));
    }

    #[test]
    fn heartbeats_start_on_a_shared_grid() {
        let ms = Duration::from_millis;
        let grid = ms(100);
        // Sessions that start within one slot beat together, at its end;
        // one that starts on a boundary, a whole step later.
        assert_eq!(slot_after(ms(0), grid), ms(100));
        assert_eq!(slot_after(ms(1), grid), ms(100));
        assert_eq!(slot_after(ms(99), grid), ms(100));
        assert_eq!(slot_after(ms(100), grid), ms(200));
        assert_eq!(
            slot_after(Duration::from_secs(3600) + ms(250), grid),
            Duration::from_secs(3600) + ms(300)
        );
        let first = next_beat_slot(grid);
        let now = tokio::time::Instant::now();
        assert!(first > now && first <= now + grid);
    }
}
