//! Transports: the accept loop of a core, the HTTP request head that starts every
//! connection, and the WebSocket upgrade into a [`websocket::Pump`].

pub(crate) mod api;
pub(crate) mod flusher;
pub(crate) mod longpoll;
pub(crate) mod park;
mod records;
pub(crate) mod send_ring;
pub(crate) mod timers;
pub mod tls;
pub(crate) mod websocket;

use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use crate::proto::http::{self, Request, MAX_HEAD};
use crate::proto::ws::deflate;
use crate::shard::admission::{connect_info, Admitted, Refused};
use crate::shard::session::Session;
use crate::shard::Shard;
use tls::{Tls, Wire};

/// Accepts connections on this core until shutdown and while it drains (HTTP goes on:
/// `/healthz` answers 503, upgrades are refused), then stops once every connection is
/// gone or `drain_timeout` passed.
/// `listener_fd` is `listener`'s descriptor, which glommio does not hand out.
pub(crate) async fn run_core(
    shard: Rc<Shard>,
    listener: TcpListener,
    listener_fd: RawFd,
    tls: Option<Arc<Tls>>,
) {
    let drained = async {
        shard.stopped().await;
        let deadline = std::time::Instant::now() + shard.app.config.drain_timeout;
        while shard.conn_count() > 0 && std::time::Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        if shard.conn_count() > 0 {
            tracing::warn!(
                core = shard.index,
                left = shard.conn_count(),
                "drain timeout passed"
            );
        }
    };
    futures_lite::future::or(drained, accept_loop(shard.clone(), listener, listener_fd, tls)).await;
}

/// Longest pause of the accept loop after failed accepts.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line about failed accepts in this long.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// How long an accept may stay pending before the loop looks at the listener itself.
///
/// Under full load on a 2-CPU VM (the million-connection run, 2026-12-02), two of 53
/// nodes stopped accepting for good: each listener's queue held 4,097 connections while
/// the core's one io_uring `ACCEPT` stayed pending, its completion never came, and the
/// clients waited in SYN-SENT. Cancelling the accept and asking again picks up what is
/// waiting; `accept_stalls` counts the times that was needed.
const ACCEPT_RECHECK: Duration = Duration::from_secs(1);

/// Whether connections are waiting on the listening socket `fd` (a poll that does not
/// wait).
fn listener_readable(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout; `fd` is the listener this loop owns.
    unsafe { libc::poll(&mut pfd, 1, 0) == 1 && pfd.revents & libc::POLLIN != 0 }
}

async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, listener_fd: RawFd, tls: Option<Arc<Tls>>) {
    let mut backoff = Duration::ZERO;
    let mut logged: Option<std::time::Instant> = None;
    let mut unlogged = 0u64;
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            glommio::timer::sleep(ACCEPT_RECHECK).await;
            None
        })
        .await;
        let Some(accepted) = accepted else {
            if listener_readable(listener_fd) {
                shard.stats.accept_stalls.add(1);
                tracing::warn!(
                    core = shard.index,
                    "connections were waiting while an accept was pending; accepting again"
                );
            }
            continue;
        };
        match accepted {
            Ok(stream) => {
                backoff = Duration::ZERO;
                let stats = &shard.stats;
                if stats.http_connections.get() >= shard.app.config.max_http_connections as u64 {
                    // Connections that never finish a request hold this many already:
                    // close at once rather than spend a file on one more.
                    stats.http_refused.add(1);
                    drop(stream);
                    continue;
                }
                match &tls {
                    None => glommio::spawn_local(serve(shard.clone(), stream)).detach(),
                    Some(tls) => glommio::spawn_local(serve_tls(shard.clone(), stream, tls.clone())).detach(),
                };
            }
            Err(e) => {
                // Out of file descriptors or memory: back off (doubling, up to a second)
                // instead of spinning, and say so once in a while, not per attempt.
                shard.stats.accept_errors.add(1);
                unlogged += 1;
                if logged.is_none_or(|t| t.elapsed() >= ACCEPT_LOG_EVERY) {
                    tracing::warn!(
                        core = shard.index,
                        failures = unlogged,
                        "accept failed: {e}; backing off"
                    );
                    logged = Some(std::time::Instant::now());
                    unlogged = 0;
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(10), ACCEPT_BACKOFF_MAX);
                glommio::timer::sleep(backoff).await;
            }
        }
    }
}

/// A TLS connection: the handshake, within the request timeout (counted in the HTTP
/// phase, so that handshakes that never finish are capped like slow requests), then
/// HTTP as on a plain one.
async fn serve_tls(shard: Rc<Shard>, stream: TcpStream, tls: Arc<Tls>) {
    let phase = HttpPhase::new(&shard);
    let _ = stream.set_nodelay(true);
    let timeout = shard.app.config.request_timeout;
    let handshake = futures_lite::future::or(async { Some(tls.accept(stream).await) }, async {
        glommio::timer::sleep(timeout).await;
        None
    });
    match handshake.await {
        Some(Ok(stream)) => {
            drop(phase);
            serve(shard, stream).await;
        }
        Some(Err(e)) => {
            shard.stats.tls_failed.add(1);
            tracing::debug!(core = shard.index, "TLS handshake failed: {e}");
        }
        None => {
            shard.stats.tls_failed.add(1);
            shard.stats.http_timeouts.add(1);
        }
    }
}

/// Counts a connection in its HTTP phase for as long as it lives.
struct HttpPhase(Rc<Shard>);

impl HttpPhase {
    fn new(shard: &Rc<Shard>) -> Self {
        shard.stats.http_connections.add(1);
        HttpPhase(shard.clone())
    }
}

impl Drop for HttpPhase {
    fn drop(&mut self) {
        self.0.stats.http_connections.sub(1);
    }
}

/// Largest request body accepted (API and long-poll).
const MAX_BODY: usize = 1 << 20;
/// How long a kept-alive connection may wait before its next request.
const KEEP_ALIVE: Duration = Duration::from_secs(60);

/// Reads one request (head and body) from `buf` and the stream. `Err` carries the
/// response to send before closing, if any.
async fn read_request<S: Wire>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Result<(Request, Vec<u8>), Option<Vec<u8>>> {
    let (req, head_len) = loop {
        match Request::parse(buf) {
            Ok(Some(head)) => break head,
            Ok(None) => {}
            Err(http::HttpError::TooLarge) => {
                return Err(Some(http::response(
                    431,
                    "text/plain",
                    b"request head too large\n",
                )))
            }
            Err(_) => {
                return Err(Some(http::response(
                    400,
                    "text/plain",
                    b"malformed HTTP request\n",
                )))
            }
        }
        if buf.len() > MAX_HEAD {
            return Err(Some(http::response(
                431,
                "text/plain",
                b"request head too large\n",
            )));
        }
        read_more(stream, buf).await.map_err(|_| None)?;
    };
    if req.header("transfer-encoding").is_some() {
        return Err(Some(http::response(
            411,
            "text/plain",
            b"send a content-length body\n",
        )));
    }
    let length = match req.content_length() {
        Ok(n) if n <= MAX_BODY as u64 => n as usize,
        Ok(_) => {
            return Err(Some(http::response(
                413,
                "text/plain",
                b"request body too large\n",
            )))
        }
        Err(_) => {
            return Err(Some(http::response(
                400,
                "text/plain",
                b"bad content-length: one header, all digits\n",
            )))
        }
    };
    while buf.len() < head_len + length {
        read_more(stream, buf).await.map_err(|_| None)?;
    }
    let body = buf[head_len..head_len + length].to_vec();
    buf.drain(..head_len + length);
    Ok((req, body))
}

async fn read_more<S: Wire>(stream: &mut S, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let filled = buf.len();
    buf.resize(filled + 4096, 0);
    let n = stream.read(&mut buf[filled..]).await;
    buf.truncate(filled + *n.as_ref().unwrap_or(&0));
    match n {
        Ok(0) => Err(std::io::ErrorKind::UnexpectedEof.into()),
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    }
}

/// One TCP connection: HTTP requests (kept alive, pipelined in order) until one of
/// them upgrades to a WebSocket. Each request must arrive whole within the request
/// timeout, counted from the accept for the first one and from its first byte for
/// later ones; between requests a connection may stay idle for [`KEEP_ALIVE`].
async fn serve<S: Wire>(shard: Rc<Shard>, mut stream: S) {
    let phase = HttpPhase::new(&shard);
    let _ = stream.tcp().set_nodelay(true);
    let request_timeout = shard.app.config.request_timeout;
    let mut buf = Vec::new();
    let mut first = true;
    loop {
        if !first && buf.is_empty() {
            let _ = stream.tcp().set_read_timeout(Some(KEEP_ALIVE));
            if read_more(&mut stream, &mut buf).await.is_err() {
                return;
            }
        }
        first = false;
        // The deadline below bounds the whole request; a per-read timeout (which glommio
        // restarts on every read) would only race it.
        let _ = stream.tcp().set_read_timeout(None);
        // Boxed: a request is read once, and its buffers must not stay in the
        // connection's task for a WebSocket's whole life.
        let read = Box::pin(read_request(&mut stream, &mut buf));
        let timed = futures_lite::future::or(async { Some(read.await) }, async {
            glommio::timer::sleep(request_timeout).await;
            None
        });
        let (req, body) = match timed.await {
            Some(Ok(request)) => request,
            Some(Err(response)) => {
                if let Some(response) = response {
                    let _ = stream.write_all(&response).await;
                }
                return;
            }
            None => {
                shard.stats.http_timeouts.add(1);
                let response = http::response(408, "text/plain", b"request not received in time\n");
                let _ = stream.write_all(&response).await;
                return;
            }
        };
        let _ = stream.tcp().set_read_timeout(None);
        if req.path == "/socket/websocket" {
            let upgraded = Box::pin(upgrade(&shard, &mut stream, req)).await;
            if let Some(session) = upgraded {
                drop(phase);
                // Only bytes that followed the head stay with the connection.
                let mut leftover = std::mem::take(&mut buf);
                leftover.shrink_to_fit();
                // The connection's life goes on in a task of its own, sized for the
                // pump alone, not for this HTTP state machine.
                glommio::spawn_local(websocket::Pump::new(stream, session, leftover)).detach();
            }
            return;
        }
        shard.stats.bytes_in.add(body.len() as u64);
        let keep_alive = !http::wants_close(&req);
        let is_api = req.path.starts_with("/api/");
        let t0 = std::time::Instant::now();
        let response = Box::pin(api::route(&shard, req, body, stream.tcp().peer_addr().ok())).await;
        if is_api {
            shard
                .stats
                .api_latency
                .observe_us(t0.elapsed().as_micros() as u64);
        }
        shard.stats.bytes_out.add(response.body.len() as u64);
        if stream.write_all(&response.to_bytes(keep_alive)).await.is_err() || !keep_alive {
            return;
        }
    }
}

/// The WebSocket subprotocol ringcast answers when a client offers it.
const PHOENIX_SUBPROTOCOL: &str = "phoenix";

/// Admission for any transport: reads what `connect` sees of `req`, then asks the
/// shard, bounding the application's `connect` by the request timeout.
pub(crate) async fn admit(
    shard: &Rc<Shard>,
    req: &Request,
    peer: Option<std::net::SocketAddr>,
) -> Result<Admitted, Refused> {
    let info = connect_info(req, peer, &shard.app.config)?;
    let timeout = shard.app.config.request_timeout;
    futures_lite::future::or(shard.admit(&info), async {
        glommio::timer::sleep(timeout).await;
        tracing::warn!(core = shard.index, "connect did not answer within {timeout:?}");
        Err(Refused::TimedOut)
    })
    .await
}

/// Answers the upgrade request; on success the connection is registered and its
/// session returned.
async fn upgrade<S: Wire>(shard: &Rc<Shard>, stream: &mut S, req: Request) -> Option<Session> {
    let Some(key) = req.websocket_key().map(str::to_string) else {
        let response = http::response(400, "text/plain", b"WebSocket upgrade expected\n");
        let _ = stream.write_all(&response).await;
        return None;
    };
    let peer = stream.tcp().peer_addr().ok();
    let admitted = match admit(shard, &req, peer).await {
        Ok(admitted) => admitted,
        Err(refused) => {
            // Never the URI or headers: they carry tokens.
            tracing::debug!(core = shard.index, ?peer, reason = ?refused, "websocket refused");
            let response = match refused {
                Refused::Forbidden => http::response(403, "text/plain", b""),
                Refused::ShuttingDown => http::response(503, "text/plain", b"shutting down\n"),
                Refused::Full => http::response(503, "text/plain", b"connection limit reached\n"),
                Refused::Crashed => http::response(500, "text/plain", b"connect failed\n"),
                Refused::TimedOut => http::response(503, "text/plain", b"connect timed out\n"),
            };
            let _ = stream.write_all(&response).await;
            return None;
        }
    };
    let core = shard.index.to_string();
    let mut headers = vec![("x-ringcast-core", core.as_str())];
    // Phoenix 1.8 clients offer `phoenix` beside their auth token, and abort the
    // handshake unless the server picks one of the offered subprotocols.
    if req.subprotocols().any(|p| p == PHOENIX_SUBPROTOCOL) {
        headers.push(("sec-websocket-protocol", PHOENIX_SUBPROTOCOL));
    }
    let compression = &shard.app.config.compression;
    let agreed = compression
        .enabled
        .then(|| deflate::negotiate(req.header_values("sec-websocket-extensions"), compression.inbound))
        .flatten();
    if let Some(agreed) = &agreed {
        headers.push(("sec-websocket-extensions", agreed.response()));
    }
    let response = http::upgrade_response(&key, &headers);
    stream.write_all(&response).await.ok()?;
    let conn = shard.add_conn(admitted.vsn, admitted.assigns, admitted.socket_id, false);
    if agreed.is_some() {
        conn.deflate.set(true);
        shard.stats.deflate_connections.add(1);
    }
    tracing::debug!(core = shard.index, conn = ?conn.id, ?peer, compressed = agreed.is_some(), "websocket connected");
    Some(Session::new(shard.clone(), conn))
}

#[cfg(test)]
mod memory {
    /// Pins the per-connection task sizes: a WebSocket connection lives in a task
    /// holding only its pump, not the HTTP state machine that accepted it.
    #[test]
    fn connection_tasks_stay_small() {
        use std::sync::Arc;
        let ex = glommio::LocalExecutorBuilder::default().make().unwrap();
        ex.run(async {
            let app = Arc::new(crate::shard::app::App {
                config: crate::Config::default(),
                router: crate::Router::new(),
                socket: Box::new(crate::seed::UserSocket::new("x")),
                presence_fetch: None,
                stats: vec![Default::default()],
                epoch_seed: 1,
            });
            let shard = crate::shard::Shard::new(
                0,
                app,
                crate::Endpoint::new(vec![], None),
                None,
                crate::clock::Clock::system(),
            );
            let l = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let _c = std::net::TcpStream::connect(addr).unwrap();
            let s = l.accept().await.unwrap();
            let f = super::serve(shard, s);
            let pump = std::mem::size_of::<super::websocket::Pump>();
            assert!(pump <= 320, "the pump grew to {pump} bytes");
            let serve = std::mem::size_of_val(&f);
            assert!(serve <= 1024, "the HTTP connection future grew to {serve} bytes");
        });
    }

    #[test]
    fn a_listener_with_a_connection_waiting_reads_as_readable() {
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(!super::listener_readable(l.as_raw_fd()), "nothing waits yet");
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(super::listener_readable(l.as_raw_fd()), "one connection waits");
        let _accepted = l.accept().unwrap();
        assert!(
            !super::listener_readable(l.as_raw_fd()),
            "accepted: nothing waits"
        );
    }
}
