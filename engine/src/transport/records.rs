//! The TLS record layer of an established connection, sans-IO: rustls runs the
//! handshake, then hands over the traffic secrets (its kernel-TLS interface,
//! [`rustls::kernel`]) and this layer seals and opens records with rustls's own
//! record encrypters for the negotiated suite.
//!
//! Why not keep rustls's connection: an idle connection should cost little, and a
//! parked one should be writable by the core's flusher without a task. A
//! [`Records`] is the two record keys, their sequence numbers and what a TLS 1.3 key
//! update needs; a parked connection's waits in its core's table
//! ([`crate::transport::tls`]), and the flusher encrypts broadcasts with it.
//!
//! What is handled after the handshake, as rustls would: application data; a
//! `close_notify` (the end of the stream); TLS 1.3 `KeyUpdate` from the client (new
//! receive keys, and ours updated too when it asks); our own key update before a
//! suite's confidentiality limit (TLS 1.3; a TLS 1.2 connection ends there). Anything
//! else (renegotiation, other handshake messages, fatal alerts, oversized or forged
//! records) is an error that ends the connection.

use std::io;
use std::sync::Arc;

use rustls::crypto::cipher::{
    InboundOpaqueMessage, MessageDecrypter, MessageEncrypter, OutboundChunks, OutboundPlainMessage,
};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError};
use rustls::{ConnectionTrafficSecrets, ContentType, ProtocolVersion, SupportedCipherSuite};

/// Largest plaintext of one record (RFC 8446 §5.1, RFC 5246 §6.2.1).
pub(crate) const MAX_PLAIN: usize = 16 * 1024;
/// A record's header: type, version, length.
const HEADER: usize = 5;
/// Largest ciphertext of a TLS 1.3 record (RFC 8446 §5.2) and of a TLS 1.2 one (RFC
/// 5246 §6.2.3).
const MAX_CIPHER_13: usize = MAX_PLAIN + 256;
const MAX_CIPHER_12: usize = MAX_PLAIN + 2048;
/// Sequence numbers stop short of wrapping (rustls's own soft limit).
const SEQ_LIMIT: u64 = 0xffff_ffff_ffff_0000;
/// Key updates a client may ask for with no application data between them.
const MAX_KEY_UPDATES: u8 = 32;
/// `KeyUpdate(update_not_requested)`: handshake type 24, length 1.
const KEY_UPDATE_NOT_REQUESTED: [u8; 5] = [24, 0, 0, 1, 0];
/// A `close_notify` alert: level warning, description 0.
const CLOSE_NOTIFY: [u8; 2] = [1, 0];
/// Alert descriptions that end nothing by themselves.
const USER_CANCELED: u8 = 90;

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

pub(crate) fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// What one handshake step asked for, once handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing more until more records arrive.
    NeedInput,
    /// The handshake is complete: [`Handshake::finish`].
    Ready,
    /// The peer closed.
    Eof,
}

/// A handshake under way: rustls's unbuffered server connection, the records it wants
/// sent, and any application data that arrived before it finished.
pub(crate) struct Handshake {
    tls: Box<UnbufferedServerConnection>,
    /// Records to send, in order.
    pub(crate) out: Vec<u8>,
    /// Application data already decrypted.
    pub(crate) plain: Vec<u8>,
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

impl Handshake {
    /// A server handshake; `config` must allow secret extraction.
    pub(crate) fn new(config: Arc<rustls::ServerConfig>) -> io::Result<Handshake> {
        Ok(Handshake {
            tls: Box::new(UnbufferedServerConnection::new(config).map_err(tls_error)?),
            out: Vec::new(),
            plain: Vec::new(),
        })
    }

    /// Feeds `incoming` to rustls until it needs more or is done; returns how many
    /// bytes it consumed. What remains is the front of a record, or (once `Ready`)
    /// records for [`Records::open`].
    pub(crate) fn process(&mut self, incoming: &mut [u8]) -> io::Result<(usize, Step)> {
        let mut at = 0;
        loop {
            let status = self.tls.process_tls_records(&mut incoming[at..]);
            let mut discard = status.discard;
            let step = match status.state.map_err(tls_error)? {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(tls_error)?;
                        discard += record.discard;
                        self.plain.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::ReadEarlyData(mut records) => {
                    // Early data is not enabled; anything offered is skipped.
                    while let Some(record) = records.next_record() {
                        discard += record.map_err(tls_error)?.discard;
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    encode_into(&mut self.out, |buf| data.encode(buf))?;
                    None
                }
                // What was encoded waits in `out` and goes out in order.
                ConnectionState::TransmitTlsData(data) => {
                    data.done();
                    None
                }
                ConnectionState::BlockedHandshake => Some(Step::NeedInput),
                ConnectionState::WriteTraffic(_) => Some(Step::Ready),
                ConnectionState::PeerClosed | ConnectionState::Closed => Some(Step::Eof),
                _ => return Err(io::Error::other("unexpected TLS connection state")),
            };
            at += discard;
            if let Some(step) = step {
                return Ok((at, step));
            }
        }
    }

    /// The record layer of the finished handshake (call once `process` said `Ready`
    /// and `out` was sent).
    pub(crate) fn finish(self) -> io::Result<Records> {
        let (secrets, keys) = self.tls.dangerous_into_kernel_connection().map_err(tls_error)?;
        let suite = keys.negotiated_cipher_suite();
        let tx_limit = match suite {
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
        };
        Ok(Records {
            tx: encrypter(suite, secrets.tx.1)?,
            tx_seq: secrets.tx.0,
            rx: decrypter(suite, secrets.rx.1)?,
            rx_seq: secrets.rx.0,
            tx_limit: tx_limit.min(SEQ_LIMIT),
            keys,
            key_updates: 0,
            unsent: Vec::new(),
        })
    }
}

fn key_and_iv(
    secrets: ConnectionTrafficSecrets,
) -> io::Result<(rustls::crypto::cipher::AeadKey, rustls::crypto::cipher::Iv)> {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Ok((key, iv)),
        _ => Err(io::Error::other("unsupported TLS cipher for the record layer")),
    }
}

fn encrypter(
    suite: SupportedCipherSuite,
    secrets: ConnectionTrafficSecrets,
) -> io::Result<Box<dyn MessageEncrypter>> {
    let (key, iv) = key_and_iv(secrets)?;
    Ok(match suite {
        SupportedCipherSuite::Tls13(s) => s.aead_alg.encrypter(key, iv),
        SupportedCipherSuite::Tls12(s) => {
            // TLS 1.2's nonce is a fixed part and an explicit part (RFC 5288 §3).
            let shape = s.aead_alg.key_block_shape();
            let iv = iv.as_ref();
            let (fixed, explicit) = iv.split_at(shape.fixed_iv_len);
            s.aead_alg
                .encrypter(key, fixed, &explicit[..shape.explicit_nonce_len])
        }
    })
}

fn decrypter(
    suite: SupportedCipherSuite,
    secrets: ConnectionTrafficSecrets,
) -> io::Result<Box<dyn MessageDecrypter>> {
    let (key, iv) = key_and_iv(secrets)?;
    Ok(match suite {
        SupportedCipherSuite::Tls13(s) => s.aead_alg.decrypter(key, iv),
        SupportedCipherSuite::Tls12(s) => {
            let fixed = s.aead_alg.key_block_shape().fixed_iv_len;
            s.aead_alg.decrypter(key, &iv.as_ref()[..fixed])
        }
    })
}

/// The record layer of one established TLS connection.
pub(crate) struct Records {
    tx: Box<dyn MessageEncrypter>,
    tx_seq: u64,
    /// Records one send key may protect (the suite's confidentiality limit).
    tx_limit: u64,
    rx: Box<dyn MessageDecrypter>,
    rx_seq: u64,
    /// rustls's remaining state: the traffic secrets a key update derives from.
    keys: KernelConnection<ServerConnectionData>,
    /// Key updates received since the last application data.
    key_updates: u8,
    /// Sealed records the socket has not taken yet, in order; they go out before
    /// anything sealed later.
    pub(crate) unsent: Vec<u8>,
}

/// What [`Records::open`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Opened {
    /// Bytes of the input consumed: every complete record at its front.
    pub(crate) consumed: usize,
    /// The peer sent `close_notify`: nothing more will be read.
    pub(crate) closed: bool,
}

impl Records {
    /// Whether the connection speaks TLS 1.3 (else 1.2).
    fn tls13(&self) -> bool {
        matches!(
            self.keys.negotiated_cipher_suite(),
            SupportedCipherSuite::Tls13(_)
        )
    }

    /// Seals one record of `typ` onto `out`.
    fn seal_record(&mut self, typ: ContentType, plain: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        if self.tx_seq >= SEQ_LIMIT {
            return Err(io::Error::other("TLS send sequence exhausted"));
        }
        let message = OutboundPlainMessage {
            typ,
            // TLS 1.3 records carry the legacy version 0x0303 too (RFC 8446 §5.1).
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(plain),
        };
        let record = self.tx.encrypt(message, self.tx_seq).map_err(tls_error)?.encode();
        self.tx_seq += 1;
        if out.capacity() == 0 {
            // An empty queue takes the record's own buffer.
            *out = record;
        } else {
            out.extend_from_slice(&record);
        }
        Ok(())
    }

    /// Seals `plain` as application data records onto `out`, updating the send key
    /// first when it is due.
    pub(crate) fn seal_into(&mut self, plain: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        for chunk in plain.chunks(MAX_PLAIN) {
            if self.tx_seq + 1 >= self.tx_limit {
                self.update_tx(out)?;
            }
            self.seal_record(ContentType::ApplicationData, chunk, out)?;
        }
        Ok(())
    }

    /// Runs `seal` onto [`Records::unsent`] (taken out for the call, which needs
    /// `self` too).
    fn onto_unsent(
        &mut self,
        seal: impl FnOnce(&mut Self, &mut Vec<u8>) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut unsent = std::mem::take(&mut self.unsent);
        let sealed = seal(self, &mut unsent);
        self.unsent = unsent;
        sealed
    }

    /// Seals `plain` onto the end of [`Records::unsent`].
    pub(crate) fn seal(&mut self, plain: &[u8]) -> io::Result<()> {
        self.onto_unsent(|this, out| this.seal_into(plain, out))
    }

    /// Seals our `close_notify` onto the end of [`Records::unsent`].
    pub(crate) fn seal_close_notify(&mut self) -> io::Result<()> {
        self.onto_unsent(|this, out| this.seal_record(ContentType::Alert, &CLOSE_NOTIFY, out))
    }

    /// The socket took the first `n` bytes of [`Records::unsent`].
    pub(crate) fn sent(&mut self, n: usize) {
        self.unsent.drain(..n);
        if self.unsent.is_empty() {
            self.unsent = Vec::new();
        }
    }

    /// Sends our `KeyUpdate` under the old key and switches to the next one.
    fn update_tx(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        if !self.tls13() {
            return Err(io::Error::other(
                "TLS 1.2 connection reached its cipher's record limit",
            ));
        }
        self.seal_record(ContentType::Handshake, &KEY_UPDATE_NOT_REQUESTED, out)?;
        let (seq, secrets) = self.keys.update_tx_secret().map_err(tls_error)?;
        self.tx = encrypter(self.keys.negotiated_cipher_suite(), secrets)?;
        self.tx_seq = seq;
        Ok(())
    }

    fn max_cipher(&self) -> usize {
        if self.tls13() {
            MAX_CIPHER_13
        } else {
            MAX_CIPHER_12
        }
    }

    /// Opens the complete records at the front of `input` (decrypted in place):
    /// application data goes onto `plain`, records due in answer (a key update) onto
    /// `unsent`. Stops after a `close_notify`.
    pub(crate) fn open(&mut self, input: &mut [u8], plain: &mut Vec<u8>) -> io::Result<Opened> {
        let mut at = 0;
        loop {
            let rest = &mut input[at..];
            let Some(&[typ, v0, v1, l0, l1]) = rest.get(..HEADER) else {
                return Ok(Opened {
                    consumed: at,
                    closed: false,
                });
            };
            let len = usize::from(u16::from_be_bytes([l0, l1]));
            if len > self.max_cipher() {
                return Err(invalid("TLS record too large"));
            }
            if rest.len() < HEADER + len {
                return Ok(Opened {
                    consumed: at,
                    closed: false,
                });
            }
            let typ = ContentType::from(typ);
            if self.tls13() && typ != ContentType::ApplicationData {
                return Err(invalid(format!("unexpected TLS 1.3 record of type {typ:?}")));
            }
            if self.rx_seq >= SEQ_LIMIT {
                return Err(invalid("TLS receive sequence exhausted"));
            }
            let version = ProtocolVersion::from(u16::from_be_bytes([v0, v1]));
            let record = InboundOpaqueMessage::new(typ, version, &mut rest[HEADER..HEADER + len]);
            let message = self.rx.decrypt(record, self.rx_seq).map_err(tls_error)?;
            self.rx_seq += 1;
            at += HEADER + len;
            if message.payload.len() > MAX_PLAIN {
                return Err(invalid("TLS record plaintext too large"));
            }
            match message.typ {
                ContentType::ApplicationData => {
                    self.key_updates = 0;
                    plain.extend_from_slice(message.payload);
                }
                ContentType::Alert => match *message.payload {
                    [_, 0] => {
                        return Ok(Opened {
                            consumed: at,
                            closed: true,
                        })
                    }
                    [_, USER_CANCELED] => {}
                    // TLS 1.2 warnings end nothing; TLS 1.3 has no warnings but these.
                    [1, _] if !self.tls13() => {}
                    [level, description] => {
                        return Err(invalid(format!(
                            "TLS alert from the client: level {level}, description {description}"
                        )))
                    }
                    _ => return Err(invalid("malformed TLS alert")),
                },
                ContentType::Handshake if self.tls13() => {
                    self.post_handshake(message.payload)?;
                }
                ContentType::Handshake => {
                    return Err(invalid("TLS renegotiation is not supported"));
                }
                other => return Err(invalid(format!("unexpected TLS message {other:?}"))),
            }
        }
    }

    /// Handshake messages after the handshake (TLS 1.3): only `KeyUpdate` is valid
    /// from a client, and it must end its record (RFC 8446 §5.1).
    fn post_handshake(&mut self, messages: &[u8]) -> io::Result<()> {
        let &[typ, l0, l1, l2, request] = messages else {
            return Err(invalid("unexpected TLS handshake message after the handshake"));
        };
        if typ != 24 || [l0, l1, l2] != [0, 0, 1] {
            return Err(invalid(format!(
                "unexpected TLS handshake message {typ} after the handshake"
            )));
        }
        self.key_updates += 1;
        if self.key_updates > MAX_KEY_UPDATES {
            return Err(invalid("too many TLS key updates"));
        }
        let (seq, secrets) = self.keys.update_rx_secret().map_err(tls_error)?;
        self.rx = decrypter(self.keys.negotiated_cipher_suite(), secrets)?;
        self.rx_seq = seq;
        match request {
            0 => Ok(()),
            1 => {
                // Our answer goes before any later data (RFC 8446 §4.6.3).
                self.onto_unsent(Self::update_tx)
            }
            _ => Err(invalid("invalid TLS KeyUpdate request")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    use super::*;

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A server config (secret extraction on, as the server's) and a client config
    /// trusting its certificate, for `versions`.
    fn configs(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Arc<rustls::ServerConfig>, Arc<ClientConfig>) {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = CertificateDer::from(made.cert.der().to_vec());
        let key = PrivateKeyDer::try_from(made.key_pair.serialize_der()).unwrap();
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        server.enable_secret_extraction = true;
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// The server's records, the client, and bytes the server got past the handshake.
    struct Pair {
        server: Records,
        client: ClientConnection,
        /// Server → client bytes not yet read by the client.
        to_client: Vec<u8>,
        /// Client → server bytes not yet opened by the server.
        to_server: Vec<u8>,
        /// What the server has decrypted.
        plain: Vec<u8>,
        closed: bool,
    }

    fn pair(versions: &[&'static rustls::SupportedProtocolVersion]) -> Pair {
        let (server_config, client_config) = configs(versions);
        let mut hs = Handshake::new(server_config).unwrap();
        let mut client =
            ClientConnection::new(client_config, ServerName::try_from("localhost").unwrap()).unwrap();
        let mut to_server = Vec::new();
        for _ in 0..20 {
            while client.wants_write() {
                client.write_tls(&mut to_server).unwrap();
            }
            let (consumed, step) = hs.process(&mut to_server).unwrap();
            to_server.drain(..consumed);
            let mut from_server = &std::mem::take(&mut hs.out)[..];
            while !from_server.is_empty() {
                client.read_tls(&mut from_server).unwrap();
                client.process_new_packets().unwrap();
            }
            if step == Step::Ready && !client.is_handshaking() {
                let plain = std::mem::take(&mut hs.plain);
                return Pair {
                    server: hs.finish().unwrap(),
                    client,
                    to_client: Vec::new(),
                    to_server,
                    plain,
                    closed: false,
                };
            }
        }
        panic!("the handshake did not finish");
    }

    impl Pair {
        /// The client writes `data`; the server opens what arrived.
        fn client_sends(&mut self, data: &[u8]) {
            // In pieces: the client buffers 64 KiB at most.
            for piece in data.chunks(16 * 1024) {
                self.client.writer().write_all(piece).unwrap();
                self.pump_to_server();
            }
        }

        fn pump_to_server(&mut self) {
            while self.client.wants_write() {
                self.client.write_tls(&mut self.to_server).unwrap();
            }
            let opened = self.server.open(&mut self.to_server, &mut self.plain).unwrap();
            self.to_server.drain(..opened.consumed);
            self.closed |= opened.closed;
            // Answers the server owes (a key update) travel with the next delivery.
            let unsent = std::mem::take(&mut self.server.unsent);
            self.to_client.extend_from_slice(&unsent);
        }

        /// The server seals `data`; the client reads everything it was sent.
        fn server_sends(&mut self, data: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            self.server.seal_into(data, &mut out).unwrap();
            self.to_client.extend_from_slice(&out);
            self.client_reads()
        }

        fn client_reads(&mut self) -> Vec<u8> {
            let mut from_server = &std::mem::take(&mut self.to_client)[..];
            let mut got = Vec::new();
            while !from_server.is_empty() {
                self.client.read_tls(&mut from_server).unwrap();
                self.client.process_new_packets().unwrap();
                match self.client.reader().read_to_end(&mut got) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("client read: {e}"),
                }
            }
            got
        }
    }

    const BOTH: [&[&rustls::SupportedProtocolVersion]; 2] =
        [&[&rustls::version::TLS13], &[&rustls::version::TLS12]];

    #[test]
    fn data_both_ways_in_tls_1_3_and_1_2_including_records_split_and_large() {
        for versions in BOTH {
            let mut p = pair(versions);
            p.client_sends(b"GET / HTTP/1.1\r\n\r\n");
            assert_eq!(std::mem::take(&mut p.plain), b"GET / HTTP/1.1\r\n\r\n");
            // More than one record each way.
            let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
            assert_eq!(p.server_sends(&big), big);
            p.client_sends(&big);
            assert_eq!(std::mem::take(&mut p.plain), big);
            // A record that arrives in parts is opened once it is whole.
            p.client.writer().write_all(b"split").unwrap();
            let mut wire = Vec::new();
            while p.client.wants_write() {
                p.client.write_tls(&mut wire).unwrap();
            }
            let mut plain = Vec::new();
            let first = p.server.open(&mut wire[..7], &mut plain).unwrap();
            assert_eq!((first.consumed, plain.len()), (0, 0));
            let whole = p.server.open(&mut wire, &mut plain).unwrap();
            assert_eq!((whole.consumed, &plain[..]), (wire.len(), &b"split"[..]));
        }
    }

    #[test]
    fn close_notify_from_the_client_ends_the_stream_and_ours_reaches_it() {
        for versions in BOTH {
            let mut p = pair(versions);
            p.client.send_close_notify();
            p.pump_to_server();
            assert!(p.closed);
            p.server.seal_close_notify().unwrap();
            p.to_client = std::mem::take(&mut p.server.unsent);
            p.client_reads();
            let mut buf = [0u8; 8];
            assert_eq!(
                p.client.reader().read(&mut buf).unwrap(),
                0,
                "the client sees a clean end"
            );
        }
    }

    #[test]
    fn a_key_update_from_the_client_updates_both_directions() {
        let mut p = pair(&[&rustls::version::TLS13]);
        for round in 0..3 {
            // rustls asks for our update too (update_requested).
            p.client.refresh_traffic_keys().unwrap();
            p.client_sends(format!("after update {round}").as_bytes());
            assert_eq!(
                std::mem::take(&mut p.plain),
                format!("after update {round}").as_bytes()
            );
            assert!(!p.to_client.is_empty(), "our KeyUpdate is due");
            // Our data after our KeyUpdate decrypts only if the client switched too.
            assert_eq!(p.server_sends(b"reply"), b"reply");
        }
    }

    #[test]
    fn our_send_key_is_updated_before_its_limit_in_tls_1_3_and_tls_1_2_ends_there() {
        let mut p = pair(&[&rustls::version::TLS13]);
        p.server.tx_limit = p.server.tx_seq + 3;
        for i in 0..10 {
            assert_eq!(
                p.server_sends(format!("m{i}").as_bytes()),
                format!("m{i}").as_bytes()
            );
        }
        assert!(p.server.tx_seq < 3, "the key was updated and its count restarted");

        let mut p = pair(&[&rustls::version::TLS12]);
        p.server.tx_limit = p.server.tx_seq + 2;
        let mut out = Vec::new();
        assert!(p.server.seal_into(b"one", &mut out).is_ok());
        let err = p.server.seal_into(b"two", &mut out).unwrap_err();
        assert!(err.to_string().contains("record limit"), "{err}");
    }

    #[test]
    fn forged_oversized_and_unexpected_records_are_errors() {
        for versions in BOTH {
            let mut p = pair(versions);
            p.client.writer().write_all(b"payload").unwrap();
            let mut wire = Vec::new();
            while p.client.wants_write() {
                p.client.write_tls(&mut wire).unwrap();
            }
            let mut tampered = wire.clone();
            let last = tampered.len() - 1;
            tampered[last] ^= 1;
            let err = p.server.open(&mut tampered, &mut Vec::new()).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");

            let mut p = pair(versions);
            let mut huge = vec![23, 3, 3, 0xff, 0xff];
            huge.resize(5 + 0xffff, 0);
            let err = p.server.open(&mut huge, &mut Vec::new()).unwrap_err();
            assert!(err.to_string().contains("too large"), "{err}");
        }
        // A plaintext handshake record after a TLS 1.3 handshake.
        let mut p = pair(&[&rustls::version::TLS13]);
        let mut hello = vec![22, 3, 3, 0, 4, 1, 0, 0, 0];
        let err = p.server.open(&mut hello, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("unexpected"), "{err}");
    }

    #[test]
    fn sealed_records_the_socket_did_not_take_stay_in_order() {
        let mut p = pair(&[&rustls::version::TLS13]);
        let records = &mut p.server;
        records.seal(b"first").unwrap();
        records.seal(b"second").unwrap();
        let all = records.unsent.clone();
        records.sent(3);
        let rest = records.unsent.clone();
        assert_eq!(rest, all[3..]);
        records.sent(rest.len());
        assert!(records.unsent.is_empty() && records.unsent.capacity() == 0);
        p.to_client = all;
        assert_eq!(p.client_reads(), b"firstsecond");
    }
}
