//! One Phoenix V2 client connection over a hand-rolled WebSocket: connect (bound to a
//! chosen loopback source address), upgrade, join, then read frames.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use glommio::net::TcpStream;
use socket2::{Domain, Protocol, Socket, Type};

use crate::phx;
use crate::tls::{TlsStream, TlsTarget, Wire};
use ringcast::proto::ws::client::{self as ws, opcode, MaskGen, Parsed};

/// Bytes of read buffer a connection starts with; it grows only for larger frames.
const INITIAL_BUF: usize = 1024;
/// Largest server message accepted: a `presence_state` of a 100,000-member room is
/// about 10 MB (the server's own bound for presence is 16 x 4 MiB).
const MAX_MESSAGE: usize = 64 << 20;
/// Skimming connections (see [`Conn::skim`]): messages up to this size are buffered
/// whole, larger ones are handed over in pieces as they arrive.
const SKIM_WHOLE: usize = 16 << 10;
/// Skimming connections read at most this much at once (while a big message streams).
const SKIM_BUF: usize = 64 << 10;
/// A skimming connection's idle buffer shrinks back to the initial size above this.
const SKIM_KEEP: usize = 8 << 10;
/// Largest HTTP upgrade response accepted.
const MAX_RESPONSE_HEAD: usize = 8192;

/// Where to connect and how.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host: String,
    /// Path of the WebSocket endpoint, e.g. `/socket/websocket`.
    pub path: String,
    /// `wss://`: TLS with this configuration.
    pub tls: Option<TlsTarget>,
    /// Offer `permessage-deflate` (`--compress`), as browsers do.
    pub compress: bool,
}

thread_local! {
    /// What this executor's connections read: WebSocket bytes (after TLS), connections
    /// that negotiated compression, and compressed messages inflated. Read with
    /// [`wire_tally`].
    static WIRE: std::cell::Cell<WireTally> = const { std::cell::Cell::new(WireTally { bytes_in: 0, compressed_conns: 0, inflated: 0 }) };
}

/// Per executor thread: what its connections read ([`wire_tally`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireTally {
    pub bytes_in: u64,
    pub compressed_conns: u64,
    pub inflated: u64,
}

/// What this thread's connections have read so far.
pub fn wire_tally() -> WireTally {
    WIRE.with(|w| w.get())
}

fn tally(f: impl FnOnce(&mut WireTally)) {
    WIRE.with(|w| {
        let mut t = w.get();
        f(&mut t);
        w.set(t);
    });
}

/// Why opening a connection failed. `kind()` is the key of the failure table.
#[derive(Debug, Clone)]
pub enum Fail {
    Refused,
    Connect(String),
    Status(u16),
    Handshake(String),
    /// The TLS handshake failed (a certificate not trusted, say).
    Tls(String),
    Join(String),
    /// Writing a push failed (churn).
    Push(String),
    /// The `phx_leave` failed or was refused (churn).
    Leave(String),
    Timeout(&'static str),
}

impl Fail {
    pub fn kind(&self) -> String {
        match self {
            Fail::Refused => "connect refused".into(),
            Fail::Connect(e) => format!("connect error: {e}"),
            Fail::Status(s) => format!("handshake status {s}"),
            Fail::Handshake(e) => format!("handshake error: {e}"),
            Fail::Tls(e) => format!("tls error: {e}"),
            Fail::Join(r) => format!("join error: {r}"),
            Fail::Push(e) => format!("push error: {e}"),
            Fail::Leave(r) => format!("leave error: {r}"),
            Fail::Timeout(stage) => format!("timeout: {stage}"),
        }
    }
}

/// How an open connection ended (when the server ended it, or on an error).
#[derive(Debug, Clone)]
pub enum End {
    /// The server sent a close frame with this code.
    Closed(u16),
    /// TCP end of stream without a close frame.
    Eof,
    Io(io::ErrorKind),
    Protocol(String),
}

impl End {
    pub fn kind(&self) -> String {
        match self {
            End::Closed(code) => format!("server close {code}"),
            End::Eof => "eof without close frame".into(),
            End::Io(k) => format!("io error: {k:?}"),
            End::Protocol(e) => format!("protocol error: {e}"),
        }
    }
}

pub struct Conn {
    stream: Wire,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Data of a fragmented message being assembled.
    frag: Vec<u8>,
    out: Vec<u8>,
    mask: MaskGen,
    next_ref: u64,
    /// Set: read messages as [`Piece`]s without buffering big ones (presence members).
    skim: Option<Stream>,
    /// `permessage-deflate` was negotiated: RSV1 frames are compressed messages.
    deflate: bool,
    /// The message being reassembled from fragments came compressed.
    frag_compressed: bool,
}

/// The data frame a skimming connection is reading in pieces.
#[derive(Debug, Default)]
struct Stream {
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// The current frame ends its message.
    fin: bool,
    /// A message is under way (its first piece was handed over).
    in_msg: bool,
}

/// A part of a server message, as a skimming connection hands it over.
#[derive(Debug, Clone, Copy)]
pub struct Piece<'a> {
    pub bytes: &'a [u8],
    /// The message starts here; `bytes` holds at least
    /// [`crate::presence::PREFIX`] bytes of it (or all of it).
    pub first: bool,
    /// The message ends here.
    pub last: bool,
}

impl<'a> Piece<'a> {
    /// A whole message as one piece.
    pub fn whole(bytes: &'a [u8]) -> Piece<'a> {
        Piece {
            bytes,
            first: true,
            last: true,
        }
    }

    /// The message, when this piece is all of it.
    pub fn as_whole(&self) -> Option<&'a [u8]> {
        (self.first && self.last).then_some(self.bytes)
    }
}

/// A compressed server message, inflated (the server resets its context per message).
fn inflate(deflated: &[u8]) -> Result<Vec<u8>, End> {
    tally(|t| t.inflated += 1);
    ringcast::proto::ws::deflate::inflate_message(deflated, MAX_MESSAGE)
        .map_err(|e| End::Protocol(e.to_string()))
}

fn io_fail(e: &io::Error) -> Fail {
    if e.kind() == io::ErrorKind::ConnectionRefused {
        Fail::Refused
    } else {
        Fail::Connect(format!("{:?}", e.kind()))
    }
}

/// A fresh `Sec-WebSocket-Key`: base64 of 16 pseudo-random bytes.
fn ws_key(mask: &mut MaskGen) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut raw = [0u8; 18]; // 16 bytes + 2 zero pad bytes to make 6 groups of 3
    for c in raw[..16].chunks_mut(4) {
        c.copy_from_slice(&mask.next_mask());
    }
    let mut s = String::with_capacity(24);
    for g in raw.chunks(3) {
        let n = (u32::from(g[0]) << 16) | (u32::from(g[1]) << 8) | u32::from(g[2]);
        for shift in [18, 12, 6, 0] {
            s.push(T[((n >> shift) & 63) as usize] as char);
        }
    }
    s.truncate(22);
    s.push_str("==");
    s
}

/// Races `fut` against a timer; on expiry the result is `Fail::Timeout(stage)`.
async fn bounded<T>(
    stage: &'static str,
    dur: Duration,
    fut: impl std::future::Future<Output = Result<T, Fail>>,
) -> Result<T, Fail> {
    futures_lite::future::or(fut, async move {
        glommio::timer::sleep(dur).await;
        Err(Fail::Timeout(stage))
    })
    .await
}

/// A non-blocking TCP socket bound to `src` (port chosen at connect time), with
/// `connect` started. The connection completes in the background; the first write
/// waits for it.
fn start_connect(target: SocketAddr, src: Option<Ipv4Addr>) -> Result<Socket, Fail> {
    let domain = if target.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let sock = Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))
        .map_err(|e| Fail::Connect(format!("socket: {:?}", e.kind())))?;
    sock.set_nodelay(true).ok();
    if let Some(ip) = src {
        // Let connect() pick the port per destination, so one source address serves
        // a full ephemeral range for each server address.
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a valid fd with a pointer to a local c_int.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.bind(&SocketAddr::V4(SocketAddrV4::new(ip, 0)).into())
            .map_err(|e| Fail::Connect(format!("bind {ip}: {:?}", e.kind())))?;
    }
    match sock.connect(&target.into()) {
        Ok(()) => Ok(sock),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(sock),
        Err(e) => Err(io_fail(&e)),
    }
}

impl Conn {
    /// Connects, upgrades with `token` and joins `topic`. Each stage is bounded by
    /// `stage_timeout`.
    pub async fn open(
        target: &Target,
        src: Option<Ipv4Addr>,
        token: &str,
        topic: &str,
        stage_timeout: Duration,
        seed: u32,
    ) -> Result<Conn, Fail> {
        let mut conn = Conn::upgrade(target, src, token, stage_timeout, seed).await?;
        conn.send_text(phx::join(topic).as_bytes())
            .await
            .map_err(|e| Fail::Join(format!("write: {:?}", e.kind())))?;
        bounded("join", stage_timeout, conn.await_join()).await?;
        Ok(conn)
    }

    /// Connects and upgrades with `token`; the caller joins. Each stage is bounded by
    /// `stage_timeout`.
    pub async fn upgrade(
        target: &Target,
        src: Option<Ipv4Addr>,
        token: &str,
        stage_timeout: Duration,
        seed: u32,
    ) -> Result<Conn, Fail> {
        let mut mask = MaskGen::new(seed);
        let sock = start_connect(target.addr, src)?;
        let key = ws_key(&mut mask);
        // glommio builds on another socket2 major version: hand over the raw fd.
        // SAFETY: `into_raw_fd` gives up ownership of a valid, open socket.
        let tcp = unsafe {
            <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(sock))
        };
        let stream = match &target.tls {
            None => Wire::Plain(tcp),
            // The ClientHello's write waits for the TCP handshake.
            Some(tls) => Wire::Tls(Box::new(
                bounded("tls", stage_timeout, async {
                    TlsStream::connect(tcp, tls).await.map_err(|e| match e.kind() {
                        io::ErrorKind::InvalidData => Fail::Tls(e.to_string()),
                        _ => io_fail(&e),
                    })
                })
                .await?,
            )),
        };
        let mut conn = Conn {
            stream,
            buf: vec![0; INITIAL_BUF],
            start: 0,
            end: 0,
            frag: Vec::new(),
            out: Vec::with_capacity(128),
            mask,
            next_ref: 2,
            skim: None,
            deflate: false,
            frag_compressed: false,
        };
        let offer = if target.compress {
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        } else {
            ""
        };
        let request = format!(
            "GET {}?token={token}&vsn=2.0.0 HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n",
            target.path, target.host
        );
        // The write waits for the TCP handshake (the socket is still connecting).
        bounded("connect", stage_timeout, async {
            conn.stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| io_fail(&e))
        })
        .await?;
        bounded("handshake", stage_timeout, conn.read_upgrade()).await?;
        Ok(conn)
    }

    /// From now on, [`Conn::recv_pieces`] hands messages over in pieces: those up to
    /// 16 KiB whole, bigger ones as they arrive, never buffered whole. For members of a
    /// big presence room, whose `presence_state` is megabytes.
    pub fn skim(&mut self) {
        self.skim.get_or_insert_with(Stream::default);
    }

    async fn read_upgrade(&mut self) -> Result<(), Fail> {
        loop {
            let n = self
                .read_more()
                .await
                .map_err(|e| Fail::Handshake(format!("{:?}", e.kind())))?;
            if n == 0 {
                return Err(Fail::Handshake("connection closed".into()));
            }
            let mut headers = [httparse::EMPTY_HEADER; 24];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf[self.start..self.end]) {
                Ok(httparse::Status::Complete(len)) => {
                    let code = resp.code.unwrap_or(0);
                    if code != 101 {
                        return Err(Fail::Status(code));
                    }
                    let upgraded = resp.headers.iter().any(|h| {
                        h.name.eq_ignore_ascii_case("upgrade") && h.value.eq_ignore_ascii_case(b"websocket")
                    });
                    if !upgraded {
                        return Err(Fail::Handshake("101 without Upgrade: websocket".into()));
                    }
                    // The client sends uncompressed (RSV1 never set), so only the
                    // server's side of the agreement matters: it resets its context.
                    self.deflate = resp.headers.iter().any(|h| {
                        h.name.eq_ignore_ascii_case("sec-websocket-extensions")
                            && std::str::from_utf8(h.value)
                                .is_ok_and(|v| v.trim_start().starts_with("permessage-deflate"))
                    });
                    if self.deflate {
                        tally(|t| t.compressed_conns += 1);
                    }
                    self.start += len;
                    return Ok(());
                }
                Ok(httparse::Status::Partial) => {
                    if self.end - self.start >= MAX_RESPONSE_HEAD {
                        return Err(Fail::Handshake("response head too large".into()));
                    }
                }
                Err(e) => return Err(Fail::Handshake(format!("bad response: {e}"))),
            }
        }
    }

    async fn await_join(&mut self) -> Result<(), Fail> {
        loop {
            let mut reply = None;
            self.drain_frames(&mut |m| {
                if reply.is_none() {
                    reply = phx::join_reply(m);
                }
            })
            .map_err(|e| Fail::Join(e.kind()))?;
            self.flush()
                .await
                .map_err(|e| Fail::Join(format!("write: {:?}", e.kind())))?;
            match reply {
                Some(phx::JoinReply::Ok) => return Ok(()),
                Some(phx::JoinReply::Error(reason)) => return Err(Fail::Join(reason)),
                None => {}
            }
            match self.read_more().await {
                Ok(0) => return Err(Fail::Join("connection closed".into())),
                Ok(_) => {}
                Err(e) => return Err(Fail::Join(format!("read: {:?}", e.kind()))),
            }
        }
    }

    /// Reads more bytes into the buffer, making room first. `Ok(0)` is end of stream.
    async fn read_more(&mut self) -> io::Result<usize> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let cap = if self.skim.is_some() {
                    SKIM_BUF
                } else {
                    MAX_MESSAGE + 16
                };
                let grown = (self.buf.len() * 2).min(cap);
                if grown == self.buf.len() {
                    return Err(io::Error::other("frame larger than the buffer limit"));
                }
                self.buf.resize(grown, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        tally(|t| t.bytes_in += n as u64);
        Ok(n)
    }

    /// Handles every complete frame in the buffer: data messages go to `on_msg`, pings
    /// queue a pong, a close frame ends the connection (`Err(End::Closed)`).
    fn drain_frames(&mut self, on_msg: &mut impl FnMut(&[u8])) -> Result<(), End> {
        loop {
            let avail = &self.buf[self.start..self.end];
            let frame = match ws::parse_frame_with(avail, MAX_MESSAGE, self.deflate) {
                Ok(Parsed::Frame(f)) => f,
                Ok(Parsed::Incomplete(need)) => {
                    // Make sure the buffer can hold the whole frame.
                    if need > self.buf.len() - self.start {
                        self.buf.copy_within(self.start..self.end, 0);
                        self.end -= self.start;
                        self.start = 0;
                        if need > self.buf.len() {
                            self.buf.resize(need.next_power_of_two(), 0);
                        }
                    } else if self.start == self.end {
                        self.start = 0;
                        self.end = 0;
                    }
                    return Ok(());
                }
                Err(e) => return Err(End::Protocol(e.to_string())),
            };
            let p0 = self.start + frame.header_len;
            let p1 = self.start + frame.total_len();
            self.start = p1;
            match frame.opcode {
                opcode::TEXT | opcode::BINARY if frame.fin && self.frag.is_empty() => {
                    if frame.compressed {
                        on_msg(&inflate(&self.buf[p0..p1])?);
                    } else {
                        on_msg(&self.buf[p0..p1]);
                    }
                }
                opcode::TEXT | opcode::BINARY => {
                    if !self.frag.is_empty() {
                        return Err(End::Protocol("new message inside a fragmented one".into()));
                    }
                    self.frag_compressed = frame.compressed;
                    // Keep at least one byte so an empty first fragment still counts.
                    self.frag.push(0);
                    self.frag.extend_from_slice(&self.buf[p0..p1]);
                }
                opcode::CONTINUATION => {
                    if self.frag.is_empty() {
                        return Err(End::Protocol("continuation without a message".into()));
                    }
                    if self.frag.len() + (p1 - p0) > MAX_MESSAGE {
                        return Err(End::Protocol("fragmented message too large".into()));
                    }
                    self.frag.extend_from_slice(&self.buf[p0..p1]);
                    if frame.fin {
                        let msg = std::mem::take(&mut self.frag);
                        if self.frag_compressed {
                            on_msg(&inflate(&msg[1..])?);
                        } else {
                            on_msg(&msg[1..]);
                        }
                    }
                }
                _ => self.control(frame.opcode, p0, p1)?,
            }
        }
    }

    /// A control frame at `buf[p0..p1]`: a ping queues a pong, a close ends the
    /// connection (`Err(End::Closed)`) after queueing the echo.
    fn control(&mut self, op: u8, p0: usize, p1: usize) -> Result<(), End> {
        match op {
            opcode::PING => {
                let payload = self.buf[p0..p1].to_vec();
                let m = self.mask.next_mask();
                ws::encode_client_frame(&mut self.out, opcode::PONG, &payload, m);
                Ok(())
            }
            opcode::PONG => Ok(()),
            opcode::CLOSE => {
                let code = ws::close_code(&self.buf[p0..p1]);
                let m = self.mask.next_mask();
                ws::encode_client_frame(&mut self.out, opcode::CLOSE, &code.to_be_bytes(), m);
                Err(End::Closed(code))
            }
            _ => unreachable!("parse_frame rejects other opcodes"),
        }
    }

    /// Moves the unread bytes to the front of the buffer and makes sure it holds at
    /// least `need` bytes (a skimming connection's grows only this far).
    fn make_room(&mut self, need: usize) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if need > self.buf.len() {
            self.buf.resize(need.next_power_of_two(), 0);
        }
    }

    /// The skimming [`Conn::drain_frames`]: data messages up to [`SKIM_WHOLE`] go to
    /// `on` whole, bigger ones in pieces as their bytes arrive (the first piece holds
    /// the message's first [`crate::presence::PREFIX`] bytes at least), so that the
    /// buffer stays small whatever the server sends.
    fn drain_skim(&mut self, on: &mut impl FnMut(Piece)) -> Result<(), End> {
        let mut st = self.skim.take().unwrap_or_default();
        let r = self.drain_skim_with(&mut st, on);
        // An idle buffer that grew for a big message shrinks back.
        if st.left == 0 && self.start == self.end && self.buf.len() > SKIM_KEEP {
            self.buf = vec![0; INITIAL_BUF];
            self.start = 0;
            self.end = 0;
        }
        self.skim = Some(st);
        r
    }

    fn drain_skim_with(&mut self, st: &mut Stream, on: &mut impl FnMut(Piece)) -> Result<(), End> {
        loop {
            if st.left > 0 {
                let avail = self.end - self.start;
                if avail == 0 {
                    self.start = 0;
                    self.end = 0;
                    // Read the rest in big chunks.
                    if self.buf.len() < SKIM_BUF && st.left > self.buf.len() {
                        self.buf = vec![0; st.left.next_power_of_two().min(SKIM_BUF)];
                    }
                    return Ok(());
                }
                let take = st.left.min(avail);
                st.left -= take;
                let last = st.left == 0 && st.fin;
                on(Piece {
                    bytes: &self.buf[self.start..self.start + take],
                    first: false,
                    last,
                });
                self.start += take;
                if last {
                    st.in_msg = false;
                }
                continue;
            }
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
                return Ok(());
            }
            let avail = &self.buf[self.start..self.end];
            let need = match ws::parse_frame_with(avail, MAX_MESSAGE, self.deflate) {
                Ok(Parsed::Frame(frame)) => {
                    let p0 = self.start + frame.header_len;
                    let p1 = self.start + frame.total_len();
                    self.start = p1;
                    match frame.opcode {
                        // A compressed message is read whole (the server never
                        // fragments one) and handed over inflated, in one piece.
                        opcode::TEXT | opcode::BINARY if frame.compressed => {
                            if st.in_msg || !frame.fin {
                                return Err(End::Protocol("fragmented compressed message".into()));
                            }
                            on(Piece::whole(&inflate(&self.buf[p0..p1])?));
                        }
                        opcode::TEXT | opcode::BINARY | opcode::CONTINUATION => {
                            if (frame.opcode == opcode::CONTINUATION) != st.in_msg {
                                return Err(End::Protocol("bad fragment sequence".into()));
                            }
                            on(Piece {
                                bytes: &self.buf[p0..p1],
                                first: !st.in_msg,
                                last: frame.fin,
                            });
                            st.in_msg = !frame.fin;
                        }
                        op => self.control(op, p0, p1)?,
                    }
                    continue;
                }
                Ok(Parsed::Incomplete(need)) => need,
                Err(e) => return Err(End::Protocol(e.to_string())),
            };
            let header_len = match avail.get(1).map(|b| b & 0x7F) {
                Some(126) => 4,
                Some(127) => 10,
                _ => 2,
            };
            let op = avail[0] & 0x0F;
            let data = matches!(op, opcode::TEXT | opcode::BINARY | opcode::CONTINUATION);
            let compressed = avail[0] & 0x40 != 0;
            if avail.len() < header_len || need <= header_len || !data || need <= SKIM_WHOLE || compressed {
                // Not even the header yet, a control frame, small or compressed: wait
                // for all of it.
                self.make_room(need);
                return Ok(());
            }
            // A big data frame: hand over what is here, stream the rest.
            if (op == opcode::CONTINUATION) != st.in_msg {
                return Err(End::Protocol("bad fragment sequence".into()));
            }
            let payload = need - header_len;
            let have = avail.len() - header_len;
            if !st.in_msg && have < payload.min(crate::presence::PREFIX) {
                self.make_room(header_len + crate::presence::PREFIX);
                return Ok(());
            }
            let fin = avail[0] & 0x80 != 0;
            let p0 = self.start + header_len;
            on(Piece {
                bytes: &self.buf[p0..self.end],
                first: !st.in_msg,
                last: false,
            });
            st.in_msg = true;
            st.fin = fin;
            st.left = payload - have;
            self.start = self.end;
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            let r = self.stream.write_all(&self.out).await;
            self.out.clear();
            r?;
        }
        Ok(())
    }

    /// Sends one text frame.
    pub async fn send_text(&mut self, payload: &[u8]) -> io::Result<()> {
        let m = self.mask.next_mask();
        ws::encode_client_frame(&mut self.out, opcode::TEXT, payload, m);
        self.flush().await
    }

    /// Queues one text frame without writing it (see [`Conn::flush_queued`]).
    pub fn queue_text(&mut self, payload: &[u8]) {
        let m = self.mask.next_mask();
        ws::encode_client_frame(&mut self.out, opcode::TEXT, payload, m);
    }

    /// Writes everything queued.
    pub async fn flush_queued(&mut self) -> io::Result<()> {
        self.flush().await
    }

    /// Sends a Phoenix heartbeat.
    pub async fn heartbeat(&mut self) -> io::Result<()> {
        let r = self.next_ref;
        self.next_ref += 1;
        self.send_text(phx::heartbeat(r).as_bytes()).await
    }

    /// A fresh message ref.
    pub fn next_ref(&mut self) -> u64 {
        let r = self.next_ref;
        self.next_ref += 1;
        r
    }

    /// Sends `phx_leave` for `topic` and waits (bounded) for its ok reply; other
    /// messages that arrive meanwhile are skipped.
    pub async fn leave(&mut self, topic: &str, timeout: Duration) -> Result<(), Fail> {
        let r = self.next_ref();
        self.send_text(phx::leave(topic, r).as_bytes())
            .await
            .map_err(|e| Fail::Leave(format!("write: {:?}", e.kind())))?;
        let reference = r.to_string();
        bounded("leave", timeout, async {
            loop {
                let mut reply = None;
                self.recv(&mut |m| {
                    if reply.is_none() {
                        reply = phx::reply_to(m, &reference);
                    }
                })
                .await
                .map_err(|e| Fail::Leave(e.kind()))?;
                match reply {
                    Some(phx::JoinReply::Ok) => return Ok(()),
                    Some(phx::JoinReply::Error(reason)) => return Err(Fail::Leave(reason)),
                    None => {}
                }
            }
        })
        .await
    }

    /// Waits for data, then hands every complete message to `on_msg` (on a skimming
    /// connection only those that come whole). Returns `Err` when the connection
    /// ended.
    pub async fn recv(&mut self, on_msg: &mut impl FnMut(&[u8])) -> Result<(), End> {
        let n = self.read_more().await.map_err(|e| End::Io(e.kind()))?;
        if n == 0 {
            return Err(End::Eof);
        }
        let r = if self.skim.is_some() {
            // Only the messages that come whole (the small ones).
            self.drain_skim(&mut |p| {
                if let Some(m) = p.as_whole() {
                    on_msg(m)
                }
            })
        } else {
            self.drain_frames(on_msg)
        };
        // Pongs and close replies; ignore write errors when already ending.
        let w = self.flush().await;
        r?;
        w.map_err(|e| End::Io(e.kind()))
    }

    /// Waits for data, then hands every message (a skimming connection's in pieces,
    /// see [`Conn::skim`]; others' whole) to `on`. Returns `Err` when the connection
    /// ended.
    pub async fn recv_pieces(&mut self, on: &mut impl FnMut(Piece)) -> Result<(), End> {
        if self.skim.is_none() {
            return self.recv(&mut |m| on(Piece::whole(m))).await;
        }
        let n = self.read_more().await.map_err(|e| End::Io(e.kind()))?;
        if n == 0 {
            return Err(End::Eof);
        }
        let r = self.drain_skim(on);
        let w = self.flush().await;
        r?;
        w.map_err(|e| End::Io(e.kind()))
    }

    /// Closes politely: close frame 1000, then waits (bounded) for the server's close.
    pub async fn close(mut self, wait: Duration) {
        let m = self.mask.next_mask();
        ws::encode_client_frame(&mut self.out, opcode::CLOSE, &1000u16.to_be_bytes(), m);
        if self.flush().await.is_err() {
            return;
        }
        let _ = bounded("close", wait, async {
            loop {
                match self.recv(&mut |_| {}).await {
                    Ok(()) => {}
                    Err(_) => return Ok::<(), Fail>(()),
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// An unmasked server frame.
    fn server_frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![(u8::from(fin) << 7) | op];
        match payload.len() {
            n if n < 126 => f.push(n as u8),
            n if n <= 0xFFFF => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    /// The server side of the skimming test: the upgrade, then `wire` (its first
    /// `first_len` bytes alone, the rest in `chunk`-sized writes).
    fn serve_wire(mut s: impl std::io::Read + std::io::Write, wire: &[u8], first_len: usize, chunk: usize) {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).unwrap();
            head.push(b[0]);
        }
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            .unwrap();
        // First one frame alone, so that a read ends exactly at a frame's end (a
        // drained buffer, the case that once indexed an empty slice); then odd-sized
        // writes, so that frames and headers straddle reads.
        s.write_all(&wire[..first_len]).unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(30));
        for part in wire[first_len..].chunks(chunk) {
            s.write_all(part).unwrap();
            s.flush().unwrap();
            std::thread::sleep(Duration::from_micros(200));
        }
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }

    /// A rustls server configuration with a fresh self-signed certificate.
    fn test_server_tls() -> Arc<rustls::ServerConfig> {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(made.key_pair.serialize_der()).unwrap();
        let config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![made.cert.der().clone()], key)
                .unwrap();
        Arc::new(config)
    }

    #[test]
    fn a_skimming_connection_hands_over_every_message_in_pieces_and_stays_small() {
        skim_over(false, 7_777);
    }

    /// Over TLS, with writes of several records each, so that one read brings more
    /// plaintext than rustls holds at once and the rest of the ciphertext waits.
    #[test]
    fn a_skimming_connection_over_tls_hands_over_every_message_too() {
        skim_over(true, 7_777);
        skim_over(true, 60_000);
    }

    fn skim_over(tls: bool, chunk: usize) {
        let big_state = {
            let mut m = br#"["1",null,"rooms:r","presence_state",{"#.to_vec();
            while m.len() < 300_000 {
                m.extend_from_slice(br#""m-1234":{"metas":[{"name":"m","phx_ref":"F1"}]},"#);
            }
            m.extend_from_slice(b"\"z\":{}}]");
            m
        };
        let small = br#"[null,null,"rooms:r","presence_diff",{"joins":{},"leaves":{}}]"#.to_vec();
        let mid = vec![b'x'; 20_000];
        let mut wire = Vec::new();
        wire.extend(server_frame(true, opcode::TEXT, &small));
        let first_len = wire.len();
        wire.extend(server_frame(true, opcode::TEXT, &big_state));
        wire.extend(server_frame(true, opcode::PING, b"p"));
        // A fragmented message, its middle fragment big.
        wire.extend(server_frame(false, opcode::TEXT, b"[\"frag"));
        wire.extend(server_frame(false, opcode::CONTINUATION, &mid));
        wire.extend(server_frame(true, opcode::CONTINUATION, b"end\"]"));
        wire.extend(server_frame(true, opcode::TEXT, &small));
        wire.extend(server_frame(true, opcode::CLOSE, &1000u16.to_be_bytes()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server_tls = tls.then(test_server_tls);
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            match server_tls {
                None => serve_wire(s, &wire, first_len, chunk),
                Some(config) => {
                    let conn = rustls::ServerConnection::new(config).unwrap();
                    serve_wire(rustls::StreamOwned::new(conn, s), &wire, first_len, chunk)
                }
            }
        });
        let target = Target {
            addr,
            host: addr.to_string(),
            path: "/socket/websocket".into(),
            tls: tls.then(|| TlsTarget {
                config: crate::tls::client_config(crate::tls::Trust::Any).unwrap(),
                name: crate::tls::server_name("localhost").unwrap(),
            }),
            compress: false,
        };
        let (msgs, max_buf, end) = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(move || async move {
                let mut conn = Conn::upgrade(&target, None, "t", Duration::from_secs(5), 1)
                    .await
                    .unwrap();
                conn.skim();
                let (mut msgs, mut cur, mut max_buf) = (Vec::new(), Vec::new(), 0);
                let end = loop {
                    let r = conn
                        .recv_pieces(&mut |p: Piece| {
                            assert_eq!(p.first, cur.is_empty(), "first exactly at a message start");
                            if p.first {
                                assert!(p.bytes.len() >= p.bytes.len().min(crate::presence::PREFIX));
                            }
                            cur.extend_from_slice(p.bytes);
                            if p.last {
                                msgs.push((std::mem::take(&mut cur), p.first));
                            }
                        })
                        .await;
                    max_buf = max_buf.max(conn.buf.len());
                    if let Err(e) = r {
                        break e;
                    }
                };
                (msgs, max_buf, end)
            })
            .unwrap()
            .join()
            .unwrap();
        server.join().unwrap();
        assert!(matches!(end, End::Closed(1000)), "{end:?}");
        let mut frag = b"[\"frag".to_vec();
        frag.extend_from_slice(&mid);
        frag.extend_from_slice(b"end\"]");
        let got: Vec<&Vec<u8>> = msgs.iter().map(|(m, _)| m).collect();
        assert_eq!(got, [&small, &big_state, &frag, &small]);
        // Small ones come whole; the big state in pieces; the buffer never held it.
        assert!(msgs[0].1 && msgs[3].1 && !msgs[1].1);
        assert!(max_buf <= SKIM_BUF, "{max_buf}");
        assert!(
            crate::presence::classify(&big_state[..crate::presence::PREFIX])
                == crate::presence::Kind::PresenceState
        );
    }

    #[test]
    fn websocket_keys_are_24_chars_base64_of_16_bytes() {
        let mut g = MaskGen::new(3);
        let a = ws_key(&mut g);
        let b = ws_key(&mut g);
        assert_eq!(a.len(), 24);
        assert!(a.ends_with("=="));
        assert_ne!(a, b);
        assert!(a[..22]
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/'));
    }

    #[test]
    fn failure_kinds_read_well() {
        assert_eq!(Fail::Refused.kind(), "connect refused");
        assert_eq!(Fail::Status(403).kind(), "handshake status 403");
        assert_eq!(Fail::Timeout("join").kind(), "timeout: join");
        assert_eq!(Fail::Timeout("leave").kind(), "timeout: leave");
        assert_eq!(Fail::Leave("invalid".into()).kind(), "leave error: invalid");
        assert_eq!(
            Fail::Push("write: BrokenPipe".into()).kind(),
            "push error: write: BrokenPipe"
        );
        assert_eq!(End::Closed(1008).kind(), "server close 1008");
    }
}
