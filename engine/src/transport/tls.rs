//! TLS with rustls (the `ring` provider, TLS 1.2 and 1.3, ALPN `http/1.1`): the
//! certificate, reloadable while the server runs, and the streams both transports use.
//!
//! Broadcast frames are still encoded once and encrypted per connection. rustls's
//! unbuffered connection runs the handshake; after it, the connection's traffic keys
//! move to our record layer ([`Records`], rustls's own record encrypters), so an idle
//! connection keeps only its keys, plus the bytes of a record that arrived in part or
//! could not be sent yet. Records are read into one per-core buffer and sealed into
//! another.
//!
//! An active connection's pump encrypts its queued frames itself. An idle one parks
//! like a plain one: its record layer waits in the core's table of parked TLS
//! connections, and the core's flusher seals broadcasts with it and writes them to the
//! socket ([`flush_parked`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::shard::conn::{Conn, ConnId};
use crate::shard::Shard;
use crate::transport::records::{Handshake, Records, Step};
use crate::transport::websocket::WRITE_BUF;

pub use crate::shard::app::TlsSource;

/// A byte stream a connection runs over: TCP, or TLS over TCP.
pub(crate) trait Wire: AsyncRead + AsyncWrite + Unpin + 'static {
    /// The TCP stream underneath.
    fn tcp(&self) -> &TcpStream;
    /// The socket the core's flusher may write broadcast frames to directly; `None`
    /// when bytes must pass through this stream (TLS encrypts them).
    fn direct_fd(&self) -> Option<RawFd>;
    /// The socket, when nothing is buffered in this stream, so that its connection
    /// may park.
    fn idle_fd(&self) -> Option<RawFd> {
        self.direct_fd()
    }
    /// What a parked connection keeps to write to its socket (TLS: the record layer).
    fn take_records(&mut self) -> Option<Box<Records>> {
        None
    }
}

impl Wire for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
    fn direct_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

impl Wire for TlsStream {
    fn tcp(&self) -> &TcpStream {
        &self.tcp
    }
    fn direct_fd(&self) -> Option<RawFd> {
        None
    }
    fn idle_fd(&self) -> Option<RawFd> {
        let idle = self.partial_in.is_empty()
            && self.plain_in.is_empty()
            && !self.eof
            && !self.notified
            && self.records.as_ref().is_some_and(|r| r.unsent.is_empty());
        idle.then(|| self.tcp.as_raw_fd())
    }
    fn take_records(&mut self) -> Option<Box<Records>> {
        self.records.take()
    }
}

/// The server's certificate, swapped whole on reload; handshakes under way keep the
/// one they started with.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// TLS for one server: its rustls configuration and the certificate behind it.
pub struct Tls {
    source: TlsSource,
    current: Arc<Current>,
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("source", &self.source).finish()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain and private key into a signing key.
fn load_files(cert: &Path, key: &Path) -> io::Result<CertifiedKey> {
    let bad = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} {}: {e}", path.display()),
        )
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad("cannot read the certificate", cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("no PEM certificate in", cert, &e))?;
    if chain.is_empty() {
        return Err(bad("no certificate in", cert, &"empty"));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| bad("cannot read the private key", key, &e))?;
    let certified = CertifiedKey::from_der(chain, key_der, &provider())
        .map_err(|e| bad("the key does not fit the certificate in", cert, &e))?;
    Ok(certified)
}

/// A fresh self-signed certificate for `localhost` and `127.0.0.1`.
fn self_signed() -> io::Result<CertifiedKey> {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let made = rcgen::generate_simple_self_signed(names).map_err(io::Error::other)?;
    let key = PrivateKeyDer::try_from(made.key_pair.serialize_der()).map_err(io::Error::other)?;
    CertifiedKey::from_der(vec![made.cert.der().clone()], key, &provider()).map_err(io::Error::other)
}

fn load(source: &TlsSource) -> io::Result<CertifiedKey> {
    match source {
        TlsSource::Files { cert, key } => load_files(cert, key),
        TlsSource::SelfSigned => self_signed(),
    }
}

impl Tls {
    /// Loads the certificate and builds the rustls configuration; a file that cannot
    /// be read or a key that does not fit is an error naming it.
    pub fn new(source: TlsSource) -> io::Result<Tls> {
        let current = Arc::new(Current(RwLock::new(Arc::new(load(&source)?))));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(io::Error::other)?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // After the handshake the traffic keys move to our record layer.
        config.enable_secret_extraction = true;
        Ok(Tls {
            source,
            current,
            config: Arc::new(config),
        })
    }

    /// Reads the certificate files again: new handshakes use the new certificate,
    /// established connections keep theirs. On error the old one stays.
    pub fn reload(&self) -> io::Result<()> {
        let fresh = Arc::new(load(&self.source)?);
        *self.current.0.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// The TLS handshake on an accepted connection.
    pub(crate) async fn accept(&self, tcp: TcpStream) -> io::Result<TlsStream> {
        TlsStream::accept(self.config.clone(), tcp).await
    }
}

/// Size of the per-core buffers for TLS records in and out (several 16 KiB records).
const TLS_CHUNK: usize = 64 * 1024;
/// Largest handshake flight accepted from a client.
const MAX_HANDSHAKE: usize = 64 * 1024;

thread_local! {
    static TLS_IN: RefCell<Vec<u8>> = RefCell::new(vec![0; TLS_CHUNK]);
    static TLS_OUT: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(TLS_CHUNK + 1024));
}

/// A TLS connection over a TCP stream: rustls's handshake, then our record layer
/// ([`Records`]), which waits in the core's table while the connection is parked.
pub(crate) struct TlsStream {
    tcp: TcpStream,
    /// `None` once handed over to the parked connection.
    records: Option<Box<Records>>,
    /// The front of a record that arrived in part.
    partial_in: Vec<u8>,
    /// Decrypted bytes the reader has not taken yet.
    plain_in: Vec<u8>,
    /// The peer sent close_notify (or the connection closed): reads end.
    eof: bool,
    /// Our close_notify is queued.
    notified: bool,
}

impl TlsStream {
    /// Runs the handshake on `tcp`.
    async fn accept(config: Arc<rustls::ServerConfig>, mut tcp: TcpStream) -> io::Result<TlsStream> {
        let mut hs = Handshake::new(config)?;
        let mut buf = vec![0u8; 16 * 1024];
        let mut used = 0;
        loop {
            let (consumed, step) = hs.process(&mut buf[..used])?;
            buf.copy_within(consumed..used, 0);
            used -= consumed;
            if !hs.out.is_empty() {
                tcp.write_all(&hs.out).await?;
                hs.out = Vec::new();
            }
            match step {
                Step::Ready => break,
                Step::Eof => return Err(io::ErrorKind::UnexpectedEof.into()),
                Step::NeedInput => {
                    if used == buf.len() {
                        if buf.len() >= MAX_HANDSHAKE {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "TLS handshake too large",
                            ));
                        }
                        buf.resize(buf.len() * 2, 0);
                    }
                    let n = tcp.read(&mut buf[used..]).await?;
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    used += n;
                }
            }
        }
        let mut plain_in = std::mem::take(&mut hs.plain);
        let mut records = Box::new(hs.finish()?);
        // What came after the client's Finished (its first request, often): complete
        // records are opened now, so that what is kept is only ever the front of one.
        let opened = records.open(&mut buf[..used], &mut plain_in)?;
        Ok(TlsStream {
            tcp,
            records: Some(records),
            partial_in: buf[opened.consumed..used].to_vec(),
            plain_in,
            eof: opened.closed,
            notified: false,
        })
    }

    /// A parked connection's stream again, from its socket and its record layer.
    pub(crate) fn resume(tcp: TcpStream, records: Box<Records>) -> TlsStream {
        TlsStream {
            tcp,
            records: Some(records),
            partial_in: Vec::new(),
            plain_in: Vec::new(),
            eof: false,
            notified: false,
        }
    }

    /// Writes the records not sent yet until there are none (and frees their buffer)
    /// or the socket is full.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(records) = self.records.as_deref_mut() else {
            return Poll::Ready(Ok(()));
        };
        while !records.unsent.is_empty() {
            match Pin::new(&mut self.tcp).poll_write(cx, &records.unsent) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => records.sent(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The error of a stream whose record layer went to its parked connection (its pump
/// ends as it parks, so nothing should read or write it any more).
fn handed_over() -> io::Error {
    io::Error::other("TLS stream handed over to its parked connection")
}

impl AsyncRead for TlsStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, dst: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if !this.plain_in.is_empty() {
                let n = this.plain_in.len().min(dst.len());
                dst[..n].copy_from_slice(&this.plain_in[..n]);
                this.plain_in.drain(..n);
                if this.plain_in.is_empty() {
                    this.plain_in = Vec::new();
                }
                return Poll::Ready(Ok(n));
            }
            if this.eof {
                return Poll::Ready(Ok(0));
            }
            let read = TLS_IN.with(|buf| {
                let mut buf = buf.borrow_mut();
                let kept = this.partial_in.len();
                buf[..kept].copy_from_slice(&this.partial_in);
                let n = match Pin::new(&mut this.tcp).poll_read(cx, &mut buf[kept..]) {
                    Poll::Ready(Ok(0)) => {
                        // TCP ended without close_notify: the reader sees the end.
                        this.eof = true;
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                };
                let filled = kept + n;
                let records = this.records.as_deref_mut().ok_or_else(handed_over)?;
                let opened = records.open(&mut buf[..filled], &mut this.plain_in)?;
                this.partial_in = buf[opened.consumed..filled].to_vec();
                this.eof |= opened.closed;
                Poll::Ready(Ok(()))
            });
            match read {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
            // A key update that reading produced: sent now if the socket takes it,
            // else before the next write.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.poll_send(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other.map(|r| r.map(|()| 0)),
        }
        // At most a few records per call; the caller writes the rest next.
        let data = &data[..data.len().min(TLS_CHUNK)];
        let written = TLS_OUT.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            let records = this.records.as_deref_mut().ok_or_else(handed_over)?;
            records.seal_into(data, &mut buf)?;
            let mut sent = 0;
            while sent < buf.len() {
                match Pin::new(&mut this.tcp).poll_write(cx, &buf[sent..]) {
                    Poll::Ready(Ok(0)) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                    Poll::Ready(Ok(k)) => sent += k,
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Pending => break,
                }
            }
            // The socket is full: the rest waits, and holds further writes back.
            records.unsent.extend_from_slice(&buf[sent..]);
            Ok(data.len())
        });
        Poll::Ready(written)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_send(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.notified {
            this.notified = true;
            if let Some(records) = this.records.as_deref_mut() {
                let _ = records.seal_close_notify();
            }
        }
        match this.poll_send(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.tcp).poll_close(cx),
            other => other,
        }
    }
}

thread_local! {
    /// The record layers of this core's parked TLS connections, by connection key.
    static PARKED: RefCell<HashMap<u32, (ConnId, Box<Records>)>> = RefCell::new(HashMap::new());
}

/// Keeps a parking TLS connection's record layer for the flusher and its next pump.
pub(crate) fn keep_parked(conn: &Conn, records: Box<Records>) {
    PARKED.with(|p| p.borrow_mut().insert(conn.id.key, (conn.id, records)));
    conn.sealed.set(true);
}

/// A parked TLS connection's record layer, taken back as it wakes up.
pub(crate) fn take_parked(conn: &Conn) -> Option<Box<Records>> {
    if !conn.sealed.replace(false) {
        return None;
    }
    PARKED.with(|p| {
        let mut parked = p.borrow_mut();
        match parked.remove(&conn.id.key) {
            Some((id, records)) if id == conn.id => Some(records),
            _ => None,
        }
    })
}

/// Writes a parked TLS connection's queued frames: sealed with its record layer and
/// sent straight to its socket `fd`. `false` if the connection is not a parked TLS one
/// (its frames are plain bytes for the socket). A socket that takes only part, or
/// fails, leaves the rest to the connection's own task, which is woken.
pub(crate) fn flush_parked(shard: &Shard, conn: &Conn, fd: RawFd) -> bool {
    if !conn.sealed.get() {
        return false;
    }
    let flushed = PARKED.with(|p| {
        let mut parked = p.borrow_mut();
        let Some((_, records)) = parked.get_mut(&conn.id.key).filter(|(id, _)| *id == conn.id) else {
            return Err(io::Error::other(
                "a parked TLS connection without its record layer",
            ));
        };
        loop {
            while !records.unsent.is_empty() {
                // SAFETY: `fd` is the parked connection's open socket (owned by the
                // parking until its pump restarts) and `unsent` a live slice.
                let n = unsafe {
                    libc::send(
                        fd,
                        records.unsent.as_ptr().cast(),
                        records.unsent.len(),
                        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                    )
                };
                if n <= 0 {
                    return Ok(false);
                }
                records.sent(n as usize);
            }
            let mut out = conn.out.borrow_mut();
            let sealed = WRITE_BUF.with(|buf| {
                out.next_write(&mut buf.borrow_mut(), TLS_CHUNK, |bytes| {
                    records.seal(bytes).map(|()| bytes.len())
                })
            });
            let Some(sealed) = sealed else {
                return Ok(true);
            };
            let n = sealed?;
            let frames = out.consume(n);
            shard.stats.bytes_out.add(n as u64);
            shard.stats.messages_out.add(frames);
        }
    });
    if !matches!(flushed, Ok(true)) {
        if let Err(e) = flushed {
            tracing::debug!(conn = ?conn.id, "a parked TLS connection cannot send: {e}");
        }
        conn.wake();
    }
    true
}
