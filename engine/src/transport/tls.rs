//! TLS with rustls (the `ring` provider, TLS 1.2 and 1.3, ALPN `http/1.1`): the
//! certificate, reloadable while the server runs, and the streams both transports use.
//!
//! Broadcast frames are still encoded once; a TLS connection's pump encrypts its
//! queued frames itself (rustls per connection) instead of the core's flusher writing
//! them to the socket.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, RwLock};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

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

/// A TLS connection.
pub(crate) type TlsStream = futures_rustls::server::TlsStream<TcpStream>;

impl Wire for TlsStream {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
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
    acceptor: futures_rustls::TlsAcceptor,
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
            acceptor: futures_rustls::TlsAcceptor::from(Arc::new(config)),
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
    pub(crate) async fn accept(&self, stream: TcpStream) -> io::Result<TlsStream> {
        self.acceptor.accept(stream).await
    }
}
