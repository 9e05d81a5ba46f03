//! `wss://`: the rustls client configuration (built once per process from the flags and
//! shared by every connection) and the byte stream a connection runs over, plain TCP or
//! rustls over TCP.
//!
//! The plain stream is the glommio `TcpStream` itself, read straight into the
//! connection's buffer. The TLS stream reads ciphertext into that same buffer, hands it
//! to rustls and takes the plaintext back out into it, so an idle connection holds no
//! read buffer of its own beyond what rustls keeps.

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};

/// What a `wss://` target needs: the shared configuration and the name to check the
/// server's certificate against (also sent as SNI when it is a DNS name).
#[derive(Debug, Clone)]
pub struct TlsTarget {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
}

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust<'a> {
    /// No flag: no system roots are bundled, so every certificate is refused (and
    /// the error says which flag to give).
    Nothing,
    /// Certificates chaining to the CA certificates in this PEM file.
    CaFile(&'a Path),
    /// Any certificate (self-signed included); handshake signatures are still checked.
    Any,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client configuration for one process: TLS 1.3 and 1.2, ALPN `http/1.1`.
pub fn client_config(trust: Trust) -> anyhow::Result<Arc<ClientConfig>> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?;
    let mut config = match trust {
        Trust::Any => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth(),
        Trust::CaFile(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .with_context(|| format!("--tls-ca {}: cannot read it", path.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("--tls-ca {}: not a PEM certificate file", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                anyhow::bail!("--tls-ca {}: no usable certificate in it", path.display());
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Nothing => builder
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The name a certificate is checked against, from a URL's host (without the port;
/// IPv6 in brackets).
pub fn server_name(host: &str) -> anyhow::Result<ServerName<'static>> {
    let bare = match host.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => host,
    };
    let bare = bare.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_string()).with_context(|| format!("{bare:?} is not a TLS server name"))
}

/// What to tell the user when the server's certificate was refused.
pub const TRUST_HINT: &str = "trust its CA with --tls-ca PATH, or accept any certificate with --tls-insecure";

/// `--tls-insecure`: accepts any certificate chain and name, but still checks that the
/// server signed the handshake with the key of the certificate it sent, using the
/// provider's algorithms (so the TLS exchange is the one a verifying client does).
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A connection's byte stream.
pub enum Wire {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl Wire {
    /// Reads into `dst`; `Ok(0)` is the end of the stream.
    pub async fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        match self {
            Wire::Plain(s) => s.read(dst).await,
            Wire::Tls(s) => s.read(dst).await,
        }
    }

    /// Writes all of `data`.
    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Wire::Plain(s) => s.write_all(data).await,
            Wire::Tls(s) => s.write_all(data).await,
        }
    }
}

/// rustls keeps at most this much decrypted data before it stops taking records.
const PLAINTEXT_LIMIT: usize = 16 * 1024;

thread_local! {
    /// A buffer for the records of one write, lent to one write at a time.
    static RECORDS_OUT: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// rustls's buffered client connection over a glommio TCP stream.
pub struct TlsStream {
    tcp: TcpStream,
    tls: ClientConnection,
    /// Ciphertext read from the socket that rustls did not take yet (its plaintext
    /// buffer was full); fed before anything new is read.
    backlog: Vec<u8>,
}

impl TlsStream {
    /// Runs the handshake on `tcp` (which may still be connecting: the ClientHello's
    /// write waits for it).
    pub async fn connect(tcp: TcpStream, target: &TlsTarget) -> io::Result<TlsStream> {
        let mut tls = ClientConnection::new(target.config.clone(), target.name.clone()).map_err(tls_error)?;
        // Writes are encrypted whole and sent at once; the caller bounds them.
        tls.set_buffer_limit(None);
        let mut this = TlsStream {
            tcp,
            tls,
            backlog: Vec::new(),
        };
        let mut buf = vec![0u8; 16 * 1024];
        while this.tls.is_handshaking() {
            this.send_pending().await?;
            if !this.tls.is_handshaking() {
                break;
            }
            let n = this.tcp.read(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection during the TLS handshake",
                ));
            }
            match this.feed(&buf[..n]) {
                Ok(used) => this.backlog.extend_from_slice(&buf[used..n]),
                Err(e) => {
                    // The alert rustls queued (bad_certificate, say), if the socket takes it.
                    let _ = this.send_pending().await;
                    return Err(e);
                }
            }
        }
        this.send_pending().await?;
        Ok(this)
    }

    /// Hands `ciphertext` to rustls until it is all taken or rustls holds as much
    /// plaintext as it will; returns how many bytes were taken.
    fn feed(&mut self, ciphertext: &[u8]) -> io::Result<usize> {
        let mut rest = ciphertext;
        while !rest.is_empty() {
            if self.tls.read_tls(&mut rest)? == 0 {
                // close_notify came: nothing after it counts.
                return Ok(ciphertext.len());
            }
            let state = self.tls.process_new_packets().map_err(tls_error)?;
            if state.plaintext_bytes_to_read() >= PLAINTEXT_LIMIT {
                break;
            }
        }
        Ok(ciphertext.len() - rest.len())
    }

    /// Writes the records rustls has ready.
    async fn send_pending(&mut self) -> io::Result<()> {
        if !self.tls.wants_write() {
            return Ok(());
        }
        let mut out = RECORDS_OUT.take();
        while self.tls.wants_write() {
            self.tls.write_tls(&mut out)?;
        }
        let r = self.tcp.write_all(&out).await;
        out.clear();
        if out.capacity() <= 64 * 1024 {
            RECORDS_OUT.set(out);
        }
        r
    }

    async fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.tls.reader().read(dst) {
                // 0: the server sent close_notify.
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The TCP stream ended without close_notify.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            // Alerts or key updates that processing produced.
            self.send_pending().await?;
            if !self.backlog.is_empty() {
                let backlog = std::mem::take(&mut self.backlog);
                let used = self.feed(&backlog)?;
                self.backlog = backlog[used..].to_vec();
                continue;
            }
            // The ciphertext lands where the plaintext will go: rustls copies it in
            // before any plaintext is copied out.
            let n = self.tcp.read(dst).await?;
            if n == 0 {
                return Ok(0);
            }
            let used = self.feed(&dst[..n])?;
            if used < n {
                self.backlog = dst[used..n].to_vec();
            }
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.tls.writer().write_all(data)?;
        self.send_pending().await
    }
}

/// One blocking handshake with `addr`, to tell a certificate the flags do not trust
/// apart from an unreachable server before the run starts.
pub fn probe(
    addr: std::net::SocketAddr,
    target: &TlsTarget,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let mut sock = std::net::TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("no server reachable at {addr}"))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    let mut tls = ClientConnection::new(target.config.clone(), target.name.clone())?;
    while tls.is_handshaking() {
        if let Err(e) = tls.complete_io(&mut sock) {
            let refused = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|r| {
                    matches!(
                        r,
                        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
                    )
                });
            if refused {
                anyhow::bail!(
                    "TLS handshake with {addr} failed: {e}; the server's certificate is not trusted: {TRUST_HINT}"
                );
            }
            anyhow::bail!("TLS handshake with {addr} failed: {e}");
        }
    }
    tls.send_close_notify();
    let _ = tls.complete_io(&mut sock);
    let _ = sock.flush();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_drop_the_port_and_brackets() {
        assert_eq!(
            server_name("localhost:4000").unwrap(),
            ServerName::try_from("localhost").unwrap()
        );
        assert!(matches!(
            server_name("127.0.0.1:4000").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]:443").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("example.com").unwrap(),
            ServerName::DnsName(_)
        ));
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = std::env::temp_dir().join(format!("lg-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let e = client_config(Trust::CaFile(&path)).unwrap_err();
        assert!(format!("{e:#}").contains("no usable certificate"), "{e:#}");
        assert!(client_config(Trust::CaFile(&dir.join("missing.pem"))).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
