//! Many simulated hosts in one process, for scale benchmarks.
//!
//! Each simulated host is a complete agent — join, its own persistent
//! session with the control plane, reconciler, local desired state — with
//! the simulated driver ([`crate::driver::sim`]). Only the process is
//! shared, and, with a [`Mux`], the connection: many hosts' sessions on one
//! WebSocket (the mux protocol extension), so that 100,000 hosts need not
//! hold 100,000 sockets.
//!
//! Simulated hosts trust the public web roots only ([`Trust::public`]):
//! benchmarks run them against a control plane on loopback. The in-process
//! test harness (`crates/testkit`) runs a few, each on a runtime of its
//! own, and [`restart`]s one after crashing it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use virt8ra_api::mux::{MuxDown, MuxUp, MUX_VERSION};
use virt8ra_api::protocol::{AgentMessage, ServerMessage};
use virt8ra_api::{AgentJoin, HostInventory, Hypervisor};

use crate::channel::Link;
use crate::driver::sim::{SimDriver, SimTimings};
use crate::liveness::{keepalive, Due, Liveness, DEAD_AFTER, DEFAULT_INTERVAL};
use crate::{channel, images, reconciler};
use virt8ra_tls::Trust;

pub struct SimHost {
    pub name: String,
    pub host_id: String,
    /// The host's credential, to start its agent again ([`restart`]).
    pub host_token: String,
    pub driver: Arc<SimDriver>,
    pub task: tokio::task::JoinHandle<()>,
}

/// What a simulated host reports and offers.
#[derive(Debug, Clone)]
pub struct SimSpec {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Where its incoming live migrations listen (e.g. `127.0.0.1`):
    /// `None` (the benchmarks' hosts) offers none, so its VMs move cold.
    pub migration_address: Option<String>,
}

impl SimSpec {
    fn inventory(&self, driver: &SimDriver) -> HostInventory {
        HostInventory {
            hostname: self.name.clone(),
            arch: "x86_64".into(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disk_gib: 2000,
            cpu_model: "simulated".into(),
            cpu_flags: vec![],
            accelerators: vec![],
            hypervisor: Hypervisor::Emulation,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            qemu_version: "simulated".into(),
            machine_types: crate::driver::Driver::machine_types(driver),
            migration_address: self.migration_address.clone(),
            migration_relay: false,
            protocol: 0,
            image_service: None,
            tunnel_public_key: None,
        }
    }
}

/// Joins one simulated host and starts its agent on the current runtime,
/// with a WebSocket of its own, or as a channel of `mux` when given one.
pub async fn start(
    server: &str,
    join_token: &str,
    name: &str,
    data_dir: &Path,
    vcpus: u32,
    memory_mib: u64,
    mux: Option<Arc<Mux>>,
) -> anyhow::Result<SimHost> {
    let spec = SimSpec {
        name: name.to_string(),
        vcpus,
        memory_mib,
        migration_address: None,
    };
    let driver = Arc::new(SimDriver::new(
        data_dir.join("vms"),
        memory_mib,
        SimTimings::default(),
    ));
    join_and_start(server, join_token, &spec, data_dir, driver, mux).await
}

/// [`start`] for a host described by `spec`, with its driver (a driver
/// made with [`SimDriver::with_live`] takes live migrations).
pub async fn join_and_start(
    server: &str,
    join_token: &str,
    spec: &SimSpec,
    data_dir: &Path,
    driver: Arc<SimDriver>,
    mux: Option<Arc<Mux>>,
) -> anyhow::Result<SimHost> {
    std::fs::create_dir_all(data_dir)?;
    let joined = crate::join(
        server,
        join_token,
        &AgentJoin {
            name: spec.name.clone(),
            inventory: spec.inventory(&driver),
        },
        &Trust::public(),
    )
    .await?;
    let host = Joined {
        host_id: joined.host_id,
        host_token: joined.host_token,
    };
    run(server, &host, spec, data_dir, driver, mux, false).await
}

/// Starts the agent of a host that joined already, as after a crash of
/// its agent: from the desired state it persisted, with the VMs its driver
/// kept (simulated guests outlive their agent, as QEMUs do).
pub async fn restart(
    server: &str,
    host_id: &str,
    host_token: &str,
    spec: &SimSpec,
    data_dir: &Path,
    driver: Arc<SimDriver>,
) -> anyhow::Result<SimHost> {
    let joined = Joined {
        host_id: host_id.to_string(),
        host_token: host_token.to_string(),
    };
    run(server, &joined, spec, data_dir, driver, None, true).await
}

struct Joined {
    host_id: String,
    host_token: String,
}

async fn run(
    server: &str,
    joined: &Joined,
    spec: &SimSpec,
    data_dir: &Path,
    driver: Arc<SimDriver>,
    mux: Option<Arc<Mux>>,
    resume: bool,
) -> anyhow::Result<SimHost> {
    // One HTTP client for the whole process (images, migrations): 100,000
    // clients with their own TLS setup and pools would be most of its memory.
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let client = match CLIENT.get() {
        Some(c) => c.clone(),
        None => {
            let c = Trust::public().http_client()?;
            CLIENT.get_or_init(|| c).clone()
        }
    };
    let images = Arc::new(images::ImageCache::with_client(
        data_dir.join("images"),
        server,
        &joined.host_token,
        &Trust::public(),
        client.clone(),
    )?);
    let (reports, changes) = reconciler::Reports::new();
    // Simulated guests never die on their own: re-check them rarely, so that
    // thousands of simulated hosts leave the CPU to the control plane.
    let rec = reconciler::Reconciler::new(data_dir, driver.clone(), images, reports.clone())?
        .with_recheck(std::time::Duration::from_secs(60));
    let mover = crate::mover::Mover::with_client(
        data_dir,
        server,
        &joined.host_token,
        spec.migration_address.clone(),
        &Trust::public(),
        client,
    )?;
    // Simulated hosts migrate through the same mover as real ones.
    rec.set_mover(mover.clone());
    if resume {
        rec.resume().await?;
    }
    let ch = channel::Channel {
        mover: Some(mover),
        server: server.to_string(),
        host_token: joined.host_token.clone(),
        trust: Trust::public(),
        inventory: spec.inventory(&driver),
        data_dir: data_dir.to_path_buf(),
        driver: driver.clone(),
        reconciler: rec,
        reports,
    };
    let task = match mux {
        None => tokio::spawn(ch.run(changes)),
        Some(mux) => {
            let token = joined.host_token.clone();
            tokio::spawn(ch.run_over(changes, move || {
                let (mux, token) = (mux.clone(), token.clone());
                async move { mux.open(&token).await }
            }))
        }
    };
    Ok(SimHost {
        name: spec.name.clone(),
        host_id: joined.host_id.clone(),
        host_token: joined.host_token.clone(),
        driver,
        task,
    })
}

/// Many hosts on one connection to the control plane: the client side of
/// the mux protocol extension (`virt8ra_api::mux`). Each host still runs its
/// own protocol v1 session (hello, heartbeats, reports, desired state) on
/// its own channel, authenticated by its own host token; only the socket is
/// shared. If the control plane does not speak mux (400 or 404 on the
/// upgrade), every host falls back to a WebSocket of its own.
pub struct Mux {
    server: String,
    conn: tokio::sync::Mutex<Option<Arc<MuxConn>>>,
    next_ch: AtomicU32,
    unsupported: AtomicBool,
}

struct MuxConn {
    up: mpsc::UnboundedSender<MuxUp>,
    routes: Arc<Mutex<Routes>>,
}

/// Where a channel's frames from the control plane go, and whether the
/// channel is still attached (cleared when the control plane closes it or
/// the connection ends), so that a send need not take the routes' lock.
struct Route {
    tx: mpsc::UnboundedSender<Box<ServerMessage>>,
    open: Arc<AtomicBool>,
}

type Routes = HashMap<u32, Route>;

/// Most frames a connection's writer sends with one flush.
const WRITE_BATCH: usize = 256;

fn lock_routes(m: &Mutex<Routes>) -> std::sync::MutexGuard<'_, Routes> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One host's channel of a mux connection, as the sending half of its
/// [`Link`]: frames go straight onto the connection (no task or queue per
/// host); dropped with the session, it detaches the channel.
struct MuxChannel {
    conn: Arc<MuxConn>,
    ch: u32,
    open: Arc<AtomicBool>,
}

impl MuxChannel {
    fn send(&self, msg: AgentMessage) -> anyhow::Result<()> {
        // Closed by the control plane (or the connection ended): the session ends.
        if !self.open.load(Ordering::Acquire) {
            anyhow::bail!("the control plane closed this host's channel");
        }
        self.conn
            .up
            .send(MuxUp::Msg {
                ch: self.ch,
                msg: Box::new(msg),
            })
            .map_err(|_| anyhow::anyhow!("the mux connection closed"))
    }
}

impl Drop for MuxChannel {
    fn drop(&mut self) {
        if lock_routes(&self.conn.routes).remove(&self.ch).is_some() {
            let _ = self.conn.up.send(MuxUp::Detach { ch: self.ch });
        }
    }
}

/// Moves a mux connection's frames until it ends or the control plane
/// falls silent for three heartbeat intervals ([`crate::liveness`]: one
/// deadline, ping clock and keepalive for the connection, none per host).
async fn pump(
    mut ws: virt8ra_tls::WebSocket,
    mut up_rx: mpsc::UnboundedReceiver<MuxUp>,
    r: Arc<Mutex<Routes>>,
) {
    let mut live = Liveness::new(DEFAULT_INTERVAL);
    keepalive(&ws, live.interval());
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            // Frames already received first, the deadline last (see
            // `channel::pump_ws`).
            biased;
            m = ws.next() => {
                live.heard();
                let text = match m {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => continue,
                };
                match serde_json::from_str::<MuxDown>(&text) {
                    Ok(MuxDown::Msg { ch, msg }) => {
                        if let Some(every) = Liveness::interval_of(&msg) {
                            if live.learn(every) {
                                keepalive(&ws, every);
                            }
                        }
                        if let Some(route) = lock_routes(&r).get(&ch) {
                            let _ = route.tx.send(Box::new(msg));
                        }
                    }
                    Ok(MuxDown::Closed { ch, reason }) => {
                        tracing::info!(ch, reason, "mux channel closed");
                        if let Some(route) = lock_routes(&r).remove(&ch) {
                            route.open.store(false, Ordering::Release);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring a mux frame"),
                }
            }
            // Every frame queued meanwhile goes out with one flush
            // (one write to the socket), not one each.
            n = up_rx.recv_many(&mut batch, WRITE_BATCH) => {
                if n == 0 {
                    break;
                }
                // A task woken by another runs next on that worker,
                // before the other tasks already ready there: this
                // writer would write each host's frame the moment
                // it was queued. Let them run first, so that the
                // heartbeats due in one slot share one write.
                if n < WRITE_BATCH {
                    tokio::task::yield_now().await;
                    while batch.len() < WRITE_BATCH {
                        let Ok(m) = up_rx.try_recv() else { break };
                        batch.push(m);
                    }
                }
                let frames: Vec<Message> = batch
                    .drain(..)
                    .filter_map(|m| serde_json::to_string(&m).ok())
                    .map(|t| Message::Text(t.into()))
                    .collect();
                if !write(&mut ws, frames, &live).await {
                    break;
                }
            }
            d = live.due() => match d {
                Due::Ping => {
                    if !write(&mut ws, vec![Message::Ping(Default::default())], &live).await {
                        break;
                    }
                }
                Due::Dead(silent) => {
                    channel::warn_dead(silent, live.interval(), "this mux connection (all its hosts)");
                    break;
                }
            },
        }
    }
    // Every channel of this connection ends; their hosts reconnect.
    for (_, route) in lock_routes(&r).drain() {
        route.open.store(false, Ordering::Release);
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), ws.close(None)).await;
}

/// Writes `frames` with one flush; false when the connection failed, or
/// the write did not finish within three heartbeat intervals (the
/// socket's buffer full on a dead link).
async fn write(ws: &mut virt8ra_tls::WebSocket, frames: Vec<Message>, live: &Liveness) -> bool {
    let limit = live.interval() * DEAD_AFTER;
    let all = async {
        for f in frames {
            ws.feed(f).await?;
        }
        ws.flush().await
    };
    match tokio::time::timeout(limit, all).await {
        Ok(r) => r.is_ok(),
        Err(_) => {
            channel::warn_dead(
                limit,
                live.interval(),
                "this mux connection (a write never finished)",
            );
            false
        }
    }
}

impl Mux {
    pub fn new(server: &str) -> Arc<Mux> {
        Arc::new(Mux {
            server: server.to_string(),
            conn: tokio::sync::Mutex::new(None),
            next_ch: AtomicU32::new(1),
            unsupported: AtomicBool::new(false),
        })
    }

    /// Whether the control plane refused the extension (hosts then use a
    /// connection each).
    pub fn fell_back(&self) -> bool {
        self.unsupported.load(Ordering::Relaxed)
    }

    /// The connection, dialled if there is none (the upgrade request is
    /// authenticated by the token of the host that dials).
    async fn conn(&self, bearer: &str) -> anyhow::Result<Option<Arc<MuxConn>>> {
        let mut g = self.conn.lock().await;
        if let Some(c) = g.as_ref() {
            if !c.up.is_closed() {
                return Ok(Some(c.clone()));
            }
        }
        let url = format!(
            "{}?version={MUX_VERSION}",
            crate::net::ws_url(&self.server)?.replace("/agent/connect", "/agent/mux")
        );
        let mut req = url.into_client_request()?;
        req.headers_mut()
            .insert("authorization", format!("Bearer {bearer}").parse()?);
        // tungstenite zero-fills its free read buffer before every read: the
        // default 128 KiB made that a 128 KiB memset per read, for frames of
        // a few hundred bytes. Larger frames still arrive whole.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(16 << 10);
        let ws = match Trust::public().connect_ws(req, Some(config)).await {
            Ok((ws, _)) => ws,
            Err(tokio_tungstenite::tungstenite::Error::Http(r))
                if matches!(r.status().as_u16(), 400 | 404) =>
            {
                self.unsupported.store(true, Ordering::Relaxed);
                return Ok(None);
            }
            Err(e) => return Err(anyhow::Error::new(e).context("connect (mux)")),
        };
        let (up, up_rx) = mpsc::unbounded_channel::<MuxUp>();
        let routes: Arc<Mutex<Routes>> = Default::default();
        tokio::spawn(pump(ws, up_rx, routes.clone()));
        let c = Arc::new(MuxConn { up, routes });
        *g = Some(c.clone());
        Ok(Some(c))
    }

    /// Opens a channel for the host holding `host_token`.
    pub async fn open(&self, host_token: &str) -> anyhow::Result<Link> {
        if self.fell_back() {
            return channel::connect_ws(&self.server, host_token, &Trust::public()).await;
        }
        let Some(conn) = self.conn(host_token).await? else {
            return channel::connect_ws(&self.server, host_token, &Trust::public()).await;
        };
        let ch = self.next_ch.fetch_add(1, Ordering::Relaxed);
        let (down_tx, rx) = mpsc::unbounded_channel::<Box<ServerMessage>>();
        let open = Arc::new(AtomicBool::new(true));
        lock_routes(&conn.routes).insert(
            ch,
            Route {
                tx: down_tx,
                open: open.clone(),
            },
        );
        conn.up
            .send(MuxUp::Attach {
                ch,
                host_token: host_token.to_string(),
            })
            .map_err(|_| anyhow::anyhow!("the mux connection closed"))?;
        let up = MuxChannel { conn, ch, open };
        let tx: channel::LinkTx = Arc::new(move |m| up.send(m));
        Ok(Link { tx, rx })
    }
}
