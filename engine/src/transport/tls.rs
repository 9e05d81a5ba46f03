//! TLS with rustls (the `ring` provider, TLS 1.2 and 1.3, ALPN `http/1.1`): the
//! certificate, reloadable while the server runs, and the streams both transports use.
//!
//! Broadcast frames are still encoded once; a TLS connection's pump encrypts its
//! queued frames itself (rustls per connection) instead of the core's flusher writing
//! them to the socket.
//!
//! The stream is rustls's unbuffered connection over the core's shared buffers: records
//! are read into one per-core buffer and encrypted into another, so an idle connection
//! keeps only its keys and state, plus the bytes of a record that arrived in part or
//! could not be sent yet.

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
use rustls::server::UnbufferedServerConnection;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError};

pub use crate::shard::app::TlsSource;

/// A byte stream a connection runs over: TCP, or TLS over TCP.
pub(crate) trait Wire: AsyncRead + AsyncWrite + Unpin + 'static {
    /// The TCP stream underneath.
    fn tcp(&self) -> &TcpStream;
    /// The socket the core's flusher may write broadcast frames to directly; `None`
    /// when bytes must pass through this stream (TLS encrypts them).
    fn direct_fd(&self) -> Option<RawFd>;
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
    static TLS_IN: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; TLS_CHUNK]);
    static TLS_OUT: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; TLS_CHUNK]);
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A TLS connection: rustls's unbuffered server connection over a TCP stream.
pub(crate) struct TlsStream {
    tcp: TcpStream,
    tls: Box<UnbufferedServerConnection>,
    /// The front of a record that arrived in part.
    partial_in: Vec<u8>,
    /// Decrypted bytes the reader has not taken yet.
    plain_in: Vec<u8>,
    /// Encrypted bytes not written yet, in order.
    out: Vec<u8>,
    /// The peer sent close_notify (or the connection closed): reads end.
    eof: bool,
    /// Our close_notify is queued.
    notified: bool,
}

/// Appends what `encode` produces to `out`, growing it as asked.
fn encode_into(
    out: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> io::Result<()> {
    let mut room = 2048;
    loop {
        let at = out.len();
        out.resize(at + room, 0);
        match encode(&mut out[at..]) {
            Ok(n) => {
                out.truncate(at + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(e)) => {
                out.truncate(at);
                room = e.required_size;
            }
            Err(e) => {
                out.truncate(at);
                return Err(io::Error::other(e.to_string()));
            }
        }
    }
}

/// What one `process_tls_records` step asked for, once handled.
enum Step {
    /// Handled; process again.
    Again,
    /// Nothing more until more records arrive (or: the handshake is done).
    NeedInput,
    /// The handshake is complete and application data may flow.
    Ready,
    /// The peer closed.
    Eof,
}

impl TlsStream {
    /// Runs the handshake on `tcp`.
    async fn accept(config: Arc<rustls::ServerConfig>, tcp: TcpStream) -> io::Result<TlsStream> {
        let tls = Box::new(UnbufferedServerConnection::new(config).map_err(tls_error)?);
        let mut this = TlsStream {
            tcp,
            tls,
            partial_in: Vec::new(),
            plain_in: Vec::new(),
            out: Vec::new(),
            eof: false,
            notified: false,
        };
        let mut buf = vec![0u8; 16 * 1024];
        let mut used = 0;
        loop {
            let (consumed, step) = this.process(&mut buf[..used])?;
            buf.copy_within(consumed..used, 0);
            used -= consumed;
            if !this.out.is_empty() {
                this.tcp.write_all(&this.out).await?;
                this.out = Vec::new();
            }
            match step {
                Step::Ready => break,
                Step::Eof => return Err(io::ErrorKind::UnexpectedEof.into()),
                Step::Again | Step::NeedInput => {
                    if used == buf.len() {
                        if buf.len() >= MAX_HANDSHAKE {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "TLS handshake too large",
                            ));
                        }
                        buf.resize(buf.len() * 2, 0);
                    }
                    let n = this.tcp.read(&mut buf[used..]).await?;
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    used += n;
                }
            }
        }
        // What came after the client's Finished (its first request, often): complete
        // records are read now, so that what is kept is only ever the front of one.
        let (consumed, step) = this.process(&mut buf[..used])?;
        this.partial_in = buf[consumed..used].to_vec();
        this.eof = matches!(step, Step::Eof);
        Ok(this)
    }

    /// Feeds `incoming` records to rustls until it needs more: decrypted data goes to
    /// `plain_in`, records to send to `out`. Returns how many bytes were consumed.
    fn process(&mut self, incoming: &mut [u8]) -> io::Result<(usize, Step)> {
        let mut at = 0;
        loop {
            let status = self.tls.process_tls_records(&mut incoming[at..]);
            let mut discard = status.discard;
            let step = match status.state.map_err(tls_error)? {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(tls_error)?;
                        discard += record.discard;
                        self.plain_in.extend_from_slice(record.payload);
                    }
                    Step::Again
                }
                ConnectionState::ReadEarlyData(mut records) => {
                    // Early data is not enabled; anything offered is skipped.
                    while let Some(record) = records.next_record() {
                        discard += record.map_err(tls_error)?.discard;
                    }
                    Step::Again
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    encode_into(&mut self.out, |buf| data.encode(buf))?;
                    Step::Again
                }
                // What was encoded waits in `out` and goes out in order before anything
                // encrypted later.
                ConnectionState::TransmitTlsData(data) => {
                    data.done();
                    Step::Again
                }
                ConnectionState::BlockedHandshake => Step::NeedInput,
                ConnectionState::WriteTraffic(_) => Step::Ready,
                ConnectionState::PeerClosed | ConnectionState::Closed => Step::Eof,
                _ => return Err(io::Error::other("unexpected TLS connection state")),
            };
            at += discard;
            match step {
                Step::Again => continue,
                step => return Ok((at, step)),
            }
        }
    }

    /// Writes `out` until it is empty (and then frees it) or the socket is full.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            match Pin::new(&mut self.tcp).poll_write(cx, &self.out) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.out.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.out = Vec::new();
        Poll::Ready(Ok(()))
    }

    /// Encrypts with the connection's traffic keys into `buf` (grown if too small).
    fn encrypt(&mut self, buf: &mut Vec<u8>, data: &[u8], close: bool) -> io::Result<usize> {
        // Handshake messages due first (a key update, say) go to `out`, in order.
        self.process(&mut [])?;
        let status = self.tls.process_tls_records(&mut []);
        let ConnectionState::WriteTraffic(mut traffic) = status.state.map_err(tls_error)? else {
            return Err(io::Error::other("TLS connection cannot send"));
        };
        loop {
            let result = if close {
                traffic.queue_close_notify(buf)
            } else {
                traffic.encrypt(data, buf)
            };
            match result {
                Ok(n) => return Ok(n),
                Err(EncryptError::InsufficientSize(e)) => buf.resize(e.required_size, 0),
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
        }
    }
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
                let (consumed, step) = this.process(&mut buf[..filled])?;
                this.partial_in = buf[consumed..filled].to_vec();
                this.eof |= matches!(step, Step::Eof);
                Poll::Ready(Ok(()))
            });
            match read {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
            // Alerts or tickets that reading produced: sent now if the socket takes
            // them, else with the next write or flush.
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
        let data = &data[..data.len().min(TLS_CHUNK - 1024)];
        let written = TLS_OUT.with(|buf| {
            let mut buf = buf.borrow_mut();
            let n = this.encrypt(&mut buf, data, false)?;
            let mut sent = 0;
            while sent < n {
                match Pin::new(&mut this.tcp).poll_write(cx, &buf[sent..n]) {
                    Poll::Ready(Ok(0)) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                    Poll::Ready(Ok(k)) => sent += k,
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Pending => break,
                }
            }
            // The socket is full: the rest waits here, and holds further writes back.
            this.out.extend_from_slice(&buf[sent..n]);
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
            let mut notify = vec![0; 64];
            if let Ok(n) = this.encrypt(&mut notify, &[], true) {
                this.out.extend_from_slice(&notify[..n]);
            }
        }
        match this.poll_send(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.tcp).poll_close(cx),
            other => other,
        }
    }
}
