//! The accept loop of virt8ra's HTTP servers (the control plane's API and
//! the agent's image service): HTTP/1.1, plain or over TLS, with limits on
//! what a client that does not finish its request may hold.
//!
//! `axum::serve` sets no timer, so a connection that sends half a request
//! head (or nothing) stays open for ever: 2,000 of them held 2,000 file
//! descriptors and 110 MB for as long as their clients liked (issue 25).
//! Here every connection is served by hyper's HTTP/1 connection builder
//! with:
//!
//! - a header-read timeout (the control plane's `--header-timeout`, 10 s): a request head must
//!   arrive whole within it. hyper starts that clock when the connection
//!   opens and again when a response is done, so it is also the keep-alive
//!   idle timeout: a connection idle between requests that long is closed.
//!   It never runs while a request is served (a slow upload or a long
//!   download), nor after a WebSocket upgrade: the agents' channels, the
//!   mux and migration relays keep their connection for as long as they
//!   live (hyper hands the socket over and keeps no timer on it).
//! - the same limit on the TLS handshake, before any of that;
//! - a cap on open connections (the control plane's `--max-connections`,
//!   10,000), upgraded ones
//!   included (the slot goes with the socket, so it is freed when the
//!   socket closes, whoever holds it): past it a new connection is answered
//!   503 and closed at once instead of holding a file descriptor and a task;
//! - TCP keepalive per accepted socket when asked (the control plane: in
//!   units of its heartbeat interval), so that an agent's channel to a
//!   host that vanished is dropped by the kernel too;
//! - graceful shutdown on SIGTERM or Ctrl-C: no new connections; requests
//!   under way get up to 10 s to finish and idle connections close.
//!   (`axum::serve` waited for ever, so one open `watch` stream kept a
//!   stopped server running.)
//! - the peer's address in every request, as axum's `ConnectInfo` (what
//!   `axum::serve` with connect info gave): the audit log records it.
//!
//! At start the soft limit on open files is raised to the hard one (as Go
//! programs do), since a service manager's default soft limit of 1,024
//! would cap connections far below `--max-connections`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

/// A TLS server side: the handshake on an accepted connection, or `None`
/// when the client spoke plain HTTP (and was answered already).
pub trait Handshake: Send + Sync + 'static {
    fn handshake(&self, tcp: TcpStream) -> HandshakeFuture;
}

/// What [`Handshake::handshake`] returns.
pub type HandshakeFuture = Pin<
    Box<
        dyn Future<Output = std::io::Result<Option<tokio_rustls::server::TlsStream<TcpStream>>>>
            + Send,
    >,
>;

/// What a client may hold, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request head (and a TLS handshake) must arrive within this; also
    /// how long a keep-alive connection may sit idle between requests.
    pub header_timeout: Duration,
    /// Open connections at most, upgraded ones included.
    pub max_connections: usize,
    /// The message of the 503 sent past `max_connections` (JSON-safe
    /// text: no quotes or backslashes).
    pub busy_message: &'static str,
    /// TCP keepalive on every accepted socket, in units of this period
    /// (the control plane's heartbeat interval): first probe after two
    /// silent periods, then one a period, dead after three unanswered. The
    /// agents' channels live on these sockets after their upgrade, and a
    /// peer that vanished (power cut, partition) is otherwise kept until
    /// the next write times out. `None`: the kernel's default (off).
    pub tcp_keepalive: Option<Duration>,
}

/// Serves `router` on `listener` (over TLS with `tls`) until `shutdown`
/// resolves, then waits for the requests under way.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<dyn Handshake>>,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    raise_open_files_limit(limits.max_connections);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop) = watch::channel(false);
    let tracker = TaskTracker::new();
    let mut last_warn: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, for instance: wait a little,
                    // as axum does, rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                tracing::warn!(
                    max = limits.max_connections,
                    %peer,
                    "connection refused: --max-connections are open (warned at most every 10 s)"
                );
                last_warn = Some(Instant::now());
            }
            refuse_busy(tcp, tls.is_some(), limits.busy_message);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        if let Some(every) = limits.tcp_keepalive {
            keepalive(&tcp, every);
        }
        tracker.spawn(connection(
            tcp,
            peer,
            slot,
            tls.clone(),
            router.clone(),
            limits,
            stop.clone(),
        ));
    }
    let _ = stop_tx.send(true);
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        // A watch stream never ends by itself, nor may a slow download.
        tracing::warn!(
            open = tracker.len(),
            "shutdown: requests still under way after {SHUTDOWN_GRACE:?} are cut"
        );
    }
}

/// Sets TCP keepalive on an accepted socket (see [`Limits::tcp_keepalive`]).
fn keepalive(tcp: &TcpStream, every: Duration) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(every * 2)
        .with_interval(every)
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "TCP keepalive not set");
    }
}

/// How long shutdown waits for requests under way.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Over the cap: a plain-HTTP 503 in the API's error format if the socket
/// takes it right away (never waiting: the accept loop must go on), then
/// the connection is closed. A TLS client just sees the connection close.
fn refuse_busy(tcp: TcpStream, tls: bool, message: &str) {
    if !tls {
        let body = format!(r#"{{"error":{{"code":"unavailable","message":"{message}"}}}}"#);
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = tcp.try_write(answer.as_bytes());
    }
    drop(tcp);
}

/// One connection: the TLS handshake if any, then HTTP until the client
/// leaves, a timeout closes it, or shutdown.
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    slot: OwnedSemaphorePermit,
    tls: Option<Arc<dyn Handshake>>,
    router: Router,
    limits: Limits,
    stop: watch::Receiver<bool>,
) {
    match tls {
        None => {
            http(
                Counted {
                    io: tcp,
                    _slot: slot,
                },
                peer,
                router,
                limits,
                stop,
            )
            .await
        }
        Some(tls) => {
            let handshake = tls.handshake(tcp);
            match tokio::time::timeout(limits.header_timeout, handshake).await {
                Ok(Ok(Some(io))) => {
                    http(Counted { io, _slot: slot }, peer, router, limits, stop).await
                }
                Ok(Ok(None)) => {
                    tracing::debug!(%peer, "plain HTTP on the TLS port; told to use https")
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    }
}

async fn http<I>(
    io: Counted<I>,
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    // Handlers (the audit log) see who called as axum's `ConnectInfo`.
    let router = tower::ServiceExt::map_request(router, move |mut req: Request<Incoming>| {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        req
    });
    let conn = builder
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(router))
        .with_upgrades();
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    // Timeouts, resets, malformed requests: the client's
                    // doing, and answered (or closed) by hyper already.
                    tracing::debug!(%peer, error = %e, "connection ended");
                }
                break;
            }
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// A connection's socket with its slot under `--max-connections`: the slot
/// is freed when the socket is dropped, also when a WebSocket upgrade
/// carried it away from the HTTP connection.
struct Counted<I> {
    io: I,
    _slot: OwnedSemaphorePermit,
}

impl<I: AsyncRead + Unpin> AsyncRead for Counted<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Counted<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Raises the soft limit on open files to the hard one, and warns when even
/// that is below what `max_connections` needs (plus room for the database,
/// images and staging files).
fn raise_open_files_limit(max_connections: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    // `None` is no limit.
    let below_hard = match (lim.current, lim.maximum) {
        (Some(cur), Some(max)) => cur < max,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if below_hard {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::debug!(error = %e, "could not raise the open-files limit");
        }
        lim = getrlimit(Resource::Nofile);
    }
    let want = max_connections as u64 + 256;
    if let Some(have) = lim.current.filter(|&n| n < want) {
        tracing::warn!(
            open_files = have,
            max_connections,
            "the open-files limit is below --max-connections plus 256: raise it (LimitNOFILE=) \
             or lower --max-connections, or accepts will fail when it is reached"
        );
    }
}
