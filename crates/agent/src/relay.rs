//! Live-migration streams relayed through the control plane, for a target
//! that cannot be reached (no migration address: behind NAT).
//!
//! Source: for each stream (`migrate`, `nbd`) the agent listens on
//! 127.0.0.1 and gives QEMU those addresses instead of the target's
//! ([`SourceRelay`]). Every TCP connection QEMU opens is carried over a
//! WebSocket the agent dials to `GET /api/v1/relay/{migration}/{stream}/{conn}`
//! (host token; `conn` is fresh per connection).
//!
//! Target: its incoming QEMU and qemu-nbd listen on 127.0.0.1; when the
//! control plane says a connection was opened
//! ([`virt8ra_api::protocol::ServerMessage::RelayOpen`]), the agent dials the
//! same URL and connects it to the local endpoint of that stream
//! ([`serve_target`]).
//!
//! Bytes travel as binary frames. A relayed connection closes as a whole
//! when either end closes. Relayed connections do not survive an agent
//! restart: the migration then fails and is rolled back.

use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use virt8ra_api::protocol::{LiveEndpoints, RELAY_STREAMS};

/// Bytes read from a TCP connection per frame, at most.
const FRAME: usize = 64 << 10;

/// `ws(s)://…/api/v1/relay/{migration_id}/{stream}` (the connection id follows).
fn stream_url(server: &str, migration_id: &str, stream: &str) -> anyhow::Result<String> {
    Ok(format!(
        "{}/api/v1/relay/{migration_id}/{stream}",
        crate::net::ws_base(server)?
    ))
}

fn new_conn_id() -> String {
    hex::encode(rand::thread_rng().gen::<[u8; 16]>())
}

/// The source's loopback listeners of one relayed migration; they stop when
/// this is dropped (connections already open run until they close).
pub struct SourceRelay {
    /// What to give QEMU instead of the target's endpoints.
    pub local: LiveEndpoints,
    listeners: Vec<JoinHandle<()>>,
}

impl Drop for SourceRelay {
    fn drop(&mut self) {
        for l in &self.listeners {
            l.abort();
        }
    }
}

impl SourceRelay {
    /// Listens on 127.0.0.1 for each stream of `target` (the target's own
    /// loopback endpoints, which only name the NBD export here).
    pub async fn start(
        server: &str,
        token: &str,
        trust: &virt8ra_tls::Trust,
        migration_id: &str,
        target: &LiveEndpoints,
    ) -> anyhow::Result<SourceRelay> {
        let mut local = target.clone();
        let mut listeners = Vec::new();
        // The memory stream, the boot disk's mirror, and each data disk's.
        let streams: Vec<String> = RELAY_STREAMS
            .iter()
            .map(|s| s.to_string())
            .chain((0..target.data_nbd.len()).map(virt8ra_api::protocol::data_relay_stream))
            .collect();
        for stream in streams {
            let l = TcpListener::bind(("127.0.0.1", 0))
                .await
                .context("bind a loopback port for the relay")?;
            let ep = format!("127.0.0.1:{}", l.local_addr()?.port());
            match virt8ra_api::protocol::relay_data_index(&stream) {
                Some(i) => local.data_nbd[i] = ep,
                None if stream == "migrate" => local.migrate = ep,
                None => local.nbd = ep,
            }
            let url = stream_url(server, migration_id, &stream)?;
            let token = token.to_string();
            let trust = trust.clone();
            listeners.push(tokio::spawn(async move {
                loop {
                    let tcp = match l.accept().await {
                        Ok((tcp, _)) => tcp,
                        Err(e) => {
                            tracing::warn!(error = %e, stream, "relay: accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let url = format!("{url}/{}", new_conn_id());
                    let (token, trust) = (token.clone(), trust.clone());
                    tokio::spawn(async move {
                        match dial_and_pipe(&url, &token, &trust, tcp).await {
                            Ok(()) => tracing::debug!(%url, "relay: connection closed"),
                            Err(e) => {
                                tracing::warn!(%url, error = %format!("{e:#}"), "relay: connection failed")
                            }
                        }
                    });
                }
            }));
        }
        Ok(SourceRelay { local, listeners })
    }
}

/// Target: connects relay connection `conn_id` of `stream` to `local`.
pub async fn serve_target(
    server: &str,
    token: &str,
    trust: &virt8ra_tls::Trust,
    migration_id: &str,
    stream: &str,
    conn_id: &str,
    local: &str,
) -> anyhow::Result<()> {
    let url = format!("{}/{conn_id}", stream_url(server, migration_id, stream)?);
    let ws = dial(&url, token, trust).await?;
    let tcp = TcpStream::connect(local)
        .await
        .with_context(|| format!("connect to the local {stream} endpoint {local}"))?;
    pipe(tcp, ws).await
}

async fn dial(
    url: &str,
    token: &str,
    trust: &virt8ra_tls::Trust,
) -> anyhow::Result<virt8ra_tls::WebSocket> {
    let mut req = url.into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let (ws, _) = trust
        .connect_ws(req, None)
        .await
        .map_err(|e| anyhow::anyhow!("dial the relay {url}: {}", trust.describe(&e, url)))?;
    Ok(ws)
}

async fn dial_and_pipe(
    url: &str,
    token: &str,
    trust: &virt8ra_tls::Trust,
    tcp: TcpStream,
) -> anyhow::Result<()> {
    let ws = dial(url, token, trust).await?;
    pipe(tcp, ws).await
}

/// Copies bytes both ways between a TCP connection and a relay WebSocket
/// until either closes.
async fn pipe<S>(tcp: TcpStream, ws: tokio_tungstenite::WebSocketStream<S>) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = tcp.set_nodelay(true);
    let (mut r, mut w) = tcp.into_split();
    let (mut sink, mut stream) = ws.split();
    let up = async {
        let mut buf = vec![0u8; FRAME];
        loop {
            let n = r.read(&mut buf).await.context("read the local stream")?;
            if n == 0 {
                break;
            }
            sink.send(Message::binary(buf[..n].to_vec()))
                .await
                .context("send to the relay")?;
        }
        let _ = sink.send(Message::Close(None)).await;
        anyhow::Ok(())
    };
    let down = async {
        while let Some(m) = stream.next().await {
            match m.context("read from the relay")? {
                Message::Binary(b) => w.write_all(&b).await.context("write the local stream")?,
                Message::Close(_) => break,
                Message::Text(_) => bail!("unexpected text frame on a relay"),
                _ => {}
            }
        }
        let _ = w.shutdown().await;
        anyhow::Ok(())
    };
    tokio::select! {
        r = up => r,
        r = down => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_urls() {
        assert_eq!(
            stream_url("https://cp.example/", "m1", "nbd").unwrap(),
            "wss://cp.example/api/v1/relay/m1/nbd"
        );
        assert_eq!(new_conn_id().len(), 32);
    }

    /// Two pipes joined back to back (as the control plane joins them)
    /// carry bytes both ways.
    #[tokio::test]
    async fn pipe_carries_bytes_both_ways() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let ws_a = tokio_tungstenite::WebSocketStream::from_raw_socket(
            a,
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await;
        let ws_b = tokio_tungstenite::WebSocketStream::from_raw_socket(
            b,
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        // Local "QEMU" on one side, local "qemu-nbd" on the other.
        let src_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let src_addr = src_l.local_addr().unwrap();
        let dst_addr = dst_l.local_addr().unwrap();
        let mut client = TcpStream::connect(src_addr).await.unwrap();
        let (src_tcp, _) = src_l.accept().await.unwrap();
        let dst_tcp = TcpStream::connect(dst_addr).await.unwrap();
        let (mut server, _) = dst_l.accept().await.unwrap();
        tokio::spawn(pipe(src_tcp, ws_a));
        tokio::spawn(pipe(dst_tcp, ws_b));

        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        client.write_all(&data).await.unwrap();
        let mut got = vec![0u8; data.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, data);
        server.write_all(b"reply").await.unwrap();
        let mut r = [0u8; 5];
        client.read_exact(&mut r).await.unwrap();
        assert_eq!(&r, b"reply");
        drop(client);
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
}
