//! The load generator's HTTP/1.1 client.
//!
//! The benchmark's load generator shares the machine's cores with the
//! control plane it measures, so what it spends per call is taken from the
//! system under test. Through reqwest a create call cost about 12% of the
//! machine (profile of a 300,000-VM run): per request it parsed the URL
//! (with IDNA), built a header map, went through the redirect policy and
//! the tower layers, checked a connection out of a keyed pool, and handed
//! the request to a connection task over a channel and back. This client
//! does what the benchmark needs and nothing else: keep-alive connections
//! to one plain-HTTP address, each used by one call at a time from the
//! caller's own task, request heads written from a prefix made once, and
//! responses parsed with `httparse` and framed by `Content-Length`.
//!
//! It is not a general HTTP client: no TLS, no redirects, no chunked
//! responses (an error that names them; every answer the benchmark reads
//! has a length), no `Expect`. Those are what the control plane's own
//! clients (the CLI, the agents) use reqwest for. The benchmark makes all
//! its calls with it, the health checks and the image upload included.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response: its status and its whole body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Keep-alive connections to one address, shared by the load generator's
/// tasks: a call takes an idle connection (or opens one) and puts it back
/// when its response has been read whole.
pub struct Client {
    addr: SocketAddr,
    /// The header lines every request carries (`Host`, and `Authorization`
    /// when the client has a token).
    common: String,
    idle: Mutex<Vec<Conn>>,
    timeout: Duration,
}

/// Largest response head accepted; the API's are a few hundred bytes.
const MAX_HEAD: usize = 64 * 1024;
/// Largest response body accepted (a list page of 1,000 VMs is about 2 MB).
const MAX_BODY: usize = 256 * 1024 * 1024;

impl Client {
    /// A client of `addr` sending `token`, if any, as its bearer token.
    pub fn new(addr: SocketAddr, token: Option<&str>, timeout: Duration) -> Self {
        let mut common = format!("Host: {addr}\r\n");
        if let Some(t) = token {
            common.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        Self {
            addr,
            common,
            idle: Mutex::new(Vec::new()),
            timeout,
        }
    }

    /// Sends one request with a JSON body, if any, and reads its response
    /// whole; see [`Client::request_as`].
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> anyhow::Result<Response> {
        self.request_as(method, path, body.map(|b| ("application/json", b)))
            .await
    }

    /// Sends one request with a body of a given type, `(content type,
    /// bytes)`, and reads its response whole. Any status is a response; only
    /// a failure to exchange one (I/O, a malformed or unsupported response,
    /// the timeout) is an error.
    pub async fn request_as(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
    ) -> anyhow::Result<Response> {
        let exchange = async {
            let pooled = self.take_idle();
            let reused = pooled.is_some();
            let mut conn = match pooled {
                Some(c) => c,
                None => Conn::connect(self.addr).await?,
            };
            let mut r = conn.exchange(&self.common, method, path, body).await;
            // A connection that sat idle may have been closed by the server
            // before this request reached it: it then ends without a byte
            // of response, and the request was not seen. Once, on a new one.
            if reused && matches!(r, Err(Exchange::ClosedBeforeResponse)) {
                conn = Conn::connect(self.addr).await?;
                r = conn.exchange(&self.common, method, path, body).await;
            }
            match r {
                Ok((resp, reusable)) => {
                    if reusable {
                        self.put_idle(conn);
                    }
                    Ok(resp)
                }
                Err(Exchange::ClosedBeforeResponse) => {
                    bail!("the connection closed before a response")
                }
                Err(Exchange::Failed(e)) => Err(e),
            }
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r.with_context(|| format!("{method} {path}")),
            Err(_) => bail!("{method} {path}: no response within {:?}", self.timeout),
        }
    }

    fn take_idle(&self) -> Option<Conn> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn put_idle(&self, c: Conn) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(c);
    }
}

enum Exchange {
    /// The connection ended before any byte of the response.
    ClosedBeforeResponse,
    Failed(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Exchange {
    fn from(e: E) -> Self {
        Exchange::Failed(e.into())
    }
}

struct Conn {
    stream: TcpStream,
    /// The request being written.
    out: Vec<u8>,
    /// Bytes read and not yet consumed.
    buf: Vec<u8>,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            out: Vec::with_capacity(512),
            buf: Vec::with_capacity(8192),
        })
    }

    /// Writes one request and reads its response; also says whether the
    /// connection can carry another request.
    async fn exchange(
        &mut self,
        common: &str,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
    ) -> Result<(Response, bool), Exchange> {
        use std::io::Write;
        self.out.clear();
        write!(self.out, "{method} {path} HTTP/1.1\r\n{common}")?;
        match body {
            Some((content_type, b)) => {
                write!(
                    self.out,
                    "Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
                    b.len()
                )?;
                self.out.extend_from_slice(b);
            }
            None => self.out.extend_from_slice(b"\r\n"),
        }
        self.stream.write_all(&self.out).await?;
        self.read_response(method == "HEAD").await
    }

    async fn read_response(&mut self, head_only: bool) -> Result<(Response, bool), Exchange> {
        // The head.
        let (status, len, close, head_len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut r = httparse::Response::new(&mut headers);
            match r.parse(&self.buf).context("malformed response head")? {
                httparse::Status::Complete(n) => {
                    let status = r.code.unwrap_or(0);
                    let mut len = None;
                    let mut close = r.version == Some(0);
                    for h in r.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            let v = std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .context("Content-Length is not a number")?;
                            len = Some(v);
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            return Err(Exchange::Failed(anyhow::anyhow!(
                                "{status} with Transfer-Encoding: the load generator reads only \
                                 responses framed by Content-Length"
                            )));
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            close |= h.value.eq_ignore_ascii_case(b"close");
                        }
                    }
                    break (status, len, close, n);
                }
                httparse::Status::Partial => {
                    if self.buf.len() >= MAX_HEAD {
                        return Err(Exchange::Failed(anyhow::anyhow!(
                            "response head longer than {MAX_HEAD} bytes"
                        )));
                    }
                    if self.fill().await? == 0 {
                        return Err(if self.buf.is_empty() {
                            Exchange::ClosedBeforeResponse
                        } else {
                            Exchange::Failed(anyhow::anyhow!(
                                "connection closed in a response head"
                            ))
                        });
                    }
                }
            }
        };
        if (100..200).contains(&status) {
            return Err(Exchange::Failed(anyhow::anyhow!(
                "unexpected informational response {status}"
            )));
        }
        self.buf.drain(..head_len);
        // The body: its length, none, or (without a length) up to the end.
        let no_body = head_only || status == 204 || status == 304;
        let (body, reusable) = match (no_body, len) {
            (true, _) => (Vec::new(), !close),
            (false, Some(n)) => {
                if n > MAX_BODY {
                    return Err(Exchange::Failed(anyhow::anyhow!(
                        "response body of {n} bytes is over {MAX_BODY}"
                    )));
                }
                while self.buf.len() < n {
                    if self.fill().await? == 0 {
                        return Err(Exchange::Failed(anyhow::anyhow!(
                            "connection closed after {} of {n} body bytes",
                            self.buf.len()
                        )));
                    }
                }
                let rest = self.buf.split_off(n);
                (std::mem::replace(&mut self.buf, rest), !close)
            }
            (false, None) => {
                while self.fill().await? > 0 {
                    if self.buf.len() > MAX_BODY {
                        return Err(Exchange::Failed(anyhow::anyhow!(
                            "response body over {MAX_BODY} bytes"
                        )));
                    }
                }
                (std::mem::take(&mut self.buf), false)
            }
        };
        Ok((Response { status, body }, reusable))
    }

    /// Reads what is available into `buf`; 0 at the end of the stream.
    async fn fill(&mut self) -> std::io::Result<usize> {
        self.buf.reserve(8192);
        self.stream.read_buf(&mut self.buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server that answers each connection's requests with the next of
    /// `answers` (raw bytes), and records the requests it read.
    async fn serve(
        answers: Vec<&'static [u8]>,
    ) -> (SocketAddr, tokio::task::JoinHandle<Vec<(usize, String)>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let h = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut answers = answers.into_iter();
            let mut conn_no = 0;
            'conns: loop {
                let Ok(Ok((mut s, _))) =
                    tokio::time::timeout(Duration::from_millis(500), l.accept()).await
                else {
                    return seen;
                };
                conn_no += 1;
                let mut buf = Vec::new();
                loop {
                    // One request: a head, then its Content-Length of body.
                    let mut chunk = [0u8; 4096];
                    let end = loop {
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => continue 'conns,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    while buf.len() < end + len {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => continue 'conns,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let req = String::from_utf8_lossy(&buf[..end + len]).to_string();
                    buf.drain(..end + len);
                    seen.push((conn_no, req));
                    let Some(a) = answers.next() else {
                        return seen;
                    };
                    if a.is_empty() {
                        // Close without answering.
                        continue 'conns;
                    }
                    if s.write_all(a).await.is_err() {
                        continue 'conns;
                    }
                    if a.windows(17).any(|w| w == b"Connection: close") {
                        continue 'conns;
                    }
                }
            }
        });
        (addr, h)
    }

    fn client(addr: SocketAddr) -> Client {
        Client::new(addr, Some("tok"), Duration::from_secs(5))
    }

    #[tokio::test]
    async fn requests_share_a_connection_and_carry_their_head_and_body() {
        let (addr, srv) = serve(vec![
            b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"a\":[1,2]}",
        ])
        .await;
        let c = client(addr);
        let r = c
            .request("POST", "/api/v1/vms", Some(br#"{"name":"v1"}"#))
            .await
            .expect("post");
        assert_eq!((r.status, r.body.as_slice()), (201, &b"{}"[..]));
        let r = c.request("GET", "/api/v1/vms/v1", None).await.expect("get");
        assert_eq!((r.status, r.body.as_slice()), (200, &br#"{"a":[1,2]}"#[..]));
        drop(c);
        let seen = srv.await.expect("server");
        assert_eq!(seen.len(), 2);
        // Both on the first connection.
        assert_eq!((seen[0].0, seen[1].0), (1, 1));
        let post = &seen[0].1;
        assert!(post.starts_with("POST /api/v1/vms HTTP/1.1\r\n"), "{post}");
        assert!(post.contains("\r\nAuthorization: Bearer tok\r\n"), "{post}");
        assert!(post.contains("\r\nContent-Length: 13\r\n"), "{post}");
        assert!(post.ends_with("\r\n\r\n{\"name\":\"v1\"}"), "{post}");
        assert!(seen[1].1.starts_with("GET /api/v1/vms/v1 HTTP/1.1\r\n"));
        assert!(!seen[1].1.contains("Content-Length"));
    }

    #[tokio::test]
    async fn an_error_status_is_a_response_with_its_body() {
        let (addr, _srv) = serve(vec![
            b"HTTP/1.1 409 Conflict\r\nContent-Length: 7\r\n\r\ntaken!!",
        ])
        .await;
        let r = client(addr)
            .request("POST", "/x", Some(b"{}"))
            .await
            .expect("response");
        assert!(!r.is_success());
        assert_eq!((r.status, r.body.as_slice()), (409, &b"taken!!"[..]));
    }

    #[tokio::test]
    async fn a_closed_connection_is_not_reused_and_a_stale_one_is_retried_once() {
        let (addr, srv) = serve(vec![
            // Answered, then the server closes: the next call opens a new one.
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\na",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb",
            // Read, then closed without an answer: a stale connection, so
            // the call is retried once on a new one.
            b"",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nc",
        ])
        .await;
        let c = client(addr);
        for want in [b"a", b"b", b"c"] {
            let r = c.request("GET", "/", None).await.expect("get");
            assert_eq!(r.body, want);
        }
        drop(c);
        let conns: Vec<usize> = srv.await.expect("server").iter().map(|s| s.0).collect();
        assert_eq!(conns, vec![1, 2, 2, 3]);
    }

    #[tokio::test]
    async fn unsupported_or_broken_responses_are_errors_that_say_why() {
        for (answer, want) in [
            (
                &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n"[..],
                "Transfer-Encoding",
            ),
            (
                &b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"[..],
                "not a number",
            ),
            (
                &b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nshort"[..],
                "5 of 10",
            ),
            (&b"garbage\r\n\r\n"[..], "malformed"),
        ] {
            let (addr, _srv) = serve(vec![answer]).await;
            let e = client(addr)
                .request("GET", "/", None)
                .await
                .expect_err("an error");
            assert!(format!("{e:#}").contains(want), "{want}: {e:#}");
        }
        // Nobody listening.
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        let e = client(addr)
            .request("GET", "/", None)
            .await
            .expect_err("refused");
        assert!(format!("{e:#}").contains("connect"), "{e:#}");
    }

    #[tokio::test]
    async fn a_call_without_an_answer_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let _keep = tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            tokio::time::sleep(Duration::from_secs(10)).await;
            drop(s);
        });
        let c = Client::new(addr, Some("t"), Duration::from_millis(200));
        let e = c.request("GET", "/slow", None).await.expect_err("timeout");
        assert!(format!("{e:#}").contains("no response within"), "{e:#}");
    }
}
