//! The WebSocket pump of one connection: a hand-written future that reads into the
//! core's shared read buffer, feeds frames to the connection's [`Session`], and writes
//! every queued frame in as few sends as it can (all queued frames coalesced into one
//! buffer per send).
//!
//! An idle connection holds no buffer here: bytes of an incomplete frame are the only
//! thing kept between reads.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use glommio::net::TcpStream;
use glommio::timer::Timer;

use crate::proto::serializer::{decode_binary, decode_text};
use crate::proto::ws::deflate::InboundContext;
use crate::proto::ws::{close_code, close_frame, pong_frame, FrameReader, Parsed, WsMessage};
use crate::proto::ProtocolError;
use crate::shard::conn::{why, OutFrame};
use crate::shard::session::{Session, Turn};
use crate::transport::park;
use crate::transport::tls::{self, Wire};

/// Size of the per-core read buffer and of one coalesced write.
pub(crate) const IO_CHUNK: usize = 64 * 1024;
/// Reads handled in one poll before the pump yields to other connections.
const READS_PER_POLL: usize = 16;
/// How long a closing connection waits for the client's close before dropping TCP.
const LINGER: Duration = Duration::from_secs(2);

thread_local! {
    static READ_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; IO_CHUNK]);
    pub(crate) static WRITE_BUF: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(IO_CHUNK));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// Close frame queued; flushing.
    Closing,
    /// Close frame sent and write side shut; discarding input until EOF or the linger
    /// deadline.
    Lingering,
}

pub(crate) struct Pump<S: Wire = TcpStream> {
    stream: S,
    session: Session,
    reader: FrameReader,
    partial: Vec<u8>,
    phase: Phase,
    /// Handed over to [`park`]: dropping the pump ends its task, not the connection.
    parked: bool,
    /// When this pump started (shard clock, ms): a pump restarted from parking reads
    /// what woke it before it may park again.
    started: u32,
    linger: Option<Timer>,
}

impl<S: Wire> Pump<S> {
    pub(crate) fn new(stream: S, session: Session, leftover: Vec<u8>) -> Self {
        let max_frame = session.shard.app.config.max_frame;
        let started = session.shard.now_ms();
        // Broadcasts are written straight to the socket by the core's flusher, unless
        // they must pass through the stream (TLS): then this pump is woken to write them.
        session.conn.fd.set(stream.direct_fd().unwrap_or(-1));
        let reader = if session.conn.deflate.get() {
            let inbound = session.shard.app.config.compression.inbound;
            FrameReader::with_deflate(max_frame, inbound == InboundContext::Reset)
        } else {
            FrameReader::new(max_frame)
        };
        Pump {
            stream,
            session,
            reader,
            partial: leftover,
            phase: Phase::Open,
            parked: false,
            started,
            linger: None,
        }
    }

    /// Parses and handles complete frames at the front of `data`; returns the bytes
    /// consumed. Stops early when a handler is pending or a close was requested.
    fn process(&mut self, data: &mut [u8], cx: &mut Context<'_>) -> usize {
        let mut at = 0;
        while at < data.len() && !self.session.busy() && self.session.conn.close.get().is_none() {
            let parsed = self.reader.read(&mut data[at..]);
            let (consumed, message) = match parsed {
                Ok(Parsed::NeedMore) => break,
                Ok(Parsed::Frame { consumed, message }) => (consumed, message),
                Err(e) => {
                    self.refuse(e);
                    return data.len();
                }
            };
            at += consumed;
            let conn = &self.session.conn;
            let decoded = match message {
                None | Some(WsMessage::Pong) => continue,
                Some(WsMessage::Ping(payload)) => {
                    // Pings cost a pong each: they count against the message rate.
                    if !conn.take_token(self.session.shard.now_ms()) {
                        break;
                    }
                    conn.enqueue_own(pong_frame(payload));
                    continue;
                }
                Some(WsMessage::Close(_)) => {
                    conn.request_close(close_code::NORMAL);
                    break;
                }
                Some(WsMessage::Text(mut text)) => decode_text(conn.vsn, text.as_mut_slice()),
                Some(WsMessage::Binary(bin)) => decode_binary(conn.vsn, bin.as_slice()),
            };
            match decoded {
                Ok(msg) => self.session.handle_message(msg, cx),
                Err(e) => {
                    self.refuse(e);
                    return data.len();
                }
            }
        }
        at
    }

    fn refuse(&self, e: ProtocolError) {
        tracing::debug!(conn = ?self.session.conn.id, "closing: {e}");
        self.session.conn.request_close(e.close_code());
    }

    /// One read; `Ready(Ok(false))` at end of stream.
    fn read_once(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.partial.is_empty() {
            READ_BUF.with(|buf| {
                let mut buf = buf.borrow_mut();
                let n = match Pin::new(&mut self.stream).poll_read(cx, &mut buf[..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Ok(false)),
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                };
                self.touch(n);
                let used = self.process(&mut buf[..n], cx);
                if used < n {
                    self.partial.extend_from_slice(&buf[used..n]);
                }
                Poll::Ready(Ok(true))
            })
        } else {
            let mut partial = std::mem::take(&mut self.partial);
            let old = partial.len();
            // Waiting on a handler with bytes left over: process those first.
            let n = if self.reader_has_frame(&mut partial) {
                0
            } else {
                partial.resize(old + IO_CHUNK, 0);
                match Pin::new(&mut self.stream).poll_read(cx, &mut partial[old..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Ok(false)),
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        partial.truncate(old);
                        self.partial = partial;
                        return Poll::Pending;
                    }
                }
            };
            partial.truncate(old + n);
            if n > 0 {
                self.touch(n);
            }
            let used = self.process(&mut partial, cx);
            partial.drain(..used);
            if partial.capacity() > IO_CHUNK && partial.len() < IO_CHUNK / 4 {
                partial.shrink_to_fit();
            }
            self.partial = partial;
            Poll::Ready(Ok(true))
        }
    }

    /// Whether `buf` starts with a complete frame (so no read is needed first).
    fn reader_has_frame(&self, buf: &mut [u8]) -> bool {
        let mut cursor = io::Cursor::new(&*buf);
        match tungstenite::protocol::frame::FrameHeader::parse(&mut cursor) {
            Ok(Some((_, len))) => (buf.len() as u64 - cursor.position()) >= len,
            Ok(None) => false,
            Err(_) => true,
        }
    }

    fn touch(&self, bytes: usize) {
        self.session.conn.last_in.set(self.session.shard.now_ms());
        self.session.shard.stats.bytes_in.add(bytes as u64);
    }

    /// Writes queued frames until the queue is empty or the socket is full.
    fn flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let conn = self.session.conn.clone();
        loop {
            let mut out = conn.out.borrow_mut();
            let stream = &mut self.stream;
            let written = WRITE_BUF.with(|buf| {
                out.next_write(&mut buf.borrow_mut(), IO_CHUNK, |bytes| {
                    Pin::new(stream).poll_write(cx, bytes)
                })
            });
            let Some(written) = written else {
                drop(out);
                // TLS keeps records it could not send yet; plain TCP keeps nothing.
                if self.stream.direct_fd().is_none() {
                    return Pin::new(&mut self.stream).poll_flush(cx);
                }
                return Poll::Ready(Ok(()));
            };
            match written {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    let frames = out.consume(n);
                    self.session.shard.stats.bytes_out.add(n as u64);
                    self.session.shard.stats.messages_out.add(frames);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn begin_close(&mut self, code: u16) {
        let conn = &self.session.conn;
        let mut out = conn.out.borrow_mut();
        let why = conn.close_why.get();
        if why == why::SLOW {
            self.session.shard.stats.slow_closed.add(1);
            out.clear();
        }
        let reason = match code {
            _ if why != why::Why::None => why.text(),
            close_code::GOING_AWAY => "going away",
            close_code::INVALID_PAYLOAD => "malformed frame or message",
            close_code::TOO_BIG => "frame too large",
            close_code::PROTOCOL_ERROR => "protocol error",
            _ => "",
        };
        let frame = close_frame(code, reason);
        out.bytes += frame.len();
        out.frames.push_back(OutFrame::Own(frame));
        self.phase = Phase::Closing;
        self.linger = Some(Timer::new(LINGER));
    }

    /// Parks the connection if it has been silent for [`park::PARK_AFTER`] and nothing
    /// is in flight: no handler, no partial input, nothing queued, no mail. The socket
    /// is duplicated for the parking, since the stream closes its own descriptor.
    fn try_park(&mut self) -> bool {
        let conn = &self.session.conn;
        let now = self.session.shard.now_ms();
        let after = park::PARK_AFTER.as_millis() as u32;
        let quiet = now.wrapping_sub(conn.last_in.get()) >= after && now.wrapping_sub(self.started) >= after;
        if !quiet
            || self.phase != Phase::Open
            || self.session.busy()
            || !self.partial.is_empty()
            || !self.reader.is_idle()
            || conn.close.get().is_some()
            || !conn.out.borrow().frames.is_empty()
            || conn.has_mail()
            || !park::available()
        {
            return false;
        }
        let Some(raw) = self.stream.idle_fd() else {
            return false;
        };
        // SAFETY: duplicating an open descriptor; the result is checked.
        let fd = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return false;
        }
        if !park::park(&self.session.shard, conn, fd) {
            // SAFETY: `fd` is the duplicate made above, used by nobody.
            unsafe { libc::close(fd) };
            return false;
        }
        // A TLS connection's record layer waits for the flusher and the next pump.
        if let Some(records) = self.stream.take_records() {
            tls::keep_parked(conn, records);
        }
        conn.clear_waker();
        self.parked = true;
        true
    }

    /// Reads and discards input while lingering; `Ready` once the peer is gone.
    fn drain_input(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        READ_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            loop {
                match Pin::new(&mut self.stream).poll_read(cx, &mut buf[..]) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Ready(Ok(_)) => continue,
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
    }
}

impl<S: Wire> Future for Pump<S> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        this.session.conn.set_waker(cx.waker());
        let mut reads = 0;
        loop {
            let mut progress = false;
            // Client messages come from the socket below (`read_once`), not from the
            // turn; a closing connection only finishes the handler it has pending.
            let turn = if this.phase == Phase::Open {
                this.session.turn(cx, || None)
            } else {
                if this.session.busy() {
                    this.session.poll_pending(cx);
                }
                Turn::Busy
            };
            if let Turn::Closing(code) = turn {
                this.begin_close(code);
            }
            if turn == Turn::Idle {
                if reads == READS_PER_POLL {
                    // Let other connections on this core run.
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                match this.read_once(cx) {
                    Poll::Ready(Ok(true)) => {
                        reads += 1;
                        progress = true;
                    }
                    Poll::Ready(Ok(false)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => {}
                }
            }
            // A closing connection gets LINGER in all to flush, send its close and hear
            // the client's: a client that never reads cannot hold it longer.
            if let Some(timer) = this.linger.as_mut() {
                if Pin::new(timer).poll(cx).is_ready() {
                    return Poll::Ready(());
                }
            }
            if this.phase == Phase::Lingering {
                if this.drain_input(cx).is_ready() {
                    return Poll::Ready(());
                }
                return Poll::Pending;
            }
            match this.flush(cx) {
                Poll::Ready(Ok(())) => {
                    if this.phase == Phase::Closing {
                        let _ = Pin::new(&mut this.stream).poll_close(cx);
                        this.phase = Phase::Lingering;
                        progress = true;
                    }
                }
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => {}
            }
            if !progress {
                if this.try_park() {
                    return Poll::Ready(());
                }
                return Poll::Pending;
            }
        }
    }
}

impl<S: Wire> Drop for Pump<S> {
    fn drop(&mut self) {
        if !self.parked {
            let conn = &self.session.conn;
            let stats = &self.session.shard.stats;
            stats.count_close(conn.close.get());
            if conn.close_why.get() == why::FLOOD {
                stats.flood_closed.add(1);
            }
            match conn.close.get() {
                Some(code) => {
                    tracing::debug!(conn = ?conn.id, code, reason = conn.close_why.get().text(), "websocket closed")
                }
                None => tracing::debug!(conn = ?conn.id, "websocket ended by the client"),
            }
            self.session.conn.fd.set(-1);
            self.session.finish();
        }
    }
}
