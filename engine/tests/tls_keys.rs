//! TLS after the handshake against a real server (in this process, real sockets): a
//! rustls client asks for TLS 1.3 key updates (`update_requested`, so the server must
//! update its own keys too) while its connection runs and while it is parked, and
//! replies and broadcasts keep decrypting both ways; TLS 1.2 carries the same traffic.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ringcast::proto::token;
use ringcast::server::TlsSource;
use ringcast::testing::unix_now;
use ringcast::{seed, Config, Endpoint, Server};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

const SECRET: &str = "tls-keys-test";

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A server with a certificate for localhost made here; its address, endpoint, the
/// certificate to trust, and a count of its parked connections.
fn start() -> (SocketAddr, Endpoint, CertificateDer<'static>, impl Fn() -> u64) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir: PathBuf = std::env::temp_dir().join(format!("ringcast-tls-keys-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        cores: 1,
        tls: Some(TlsSource::Files { cert, key }),
        ..Config::default()
    };
    let running = Server::bind(config, seed::UserSocket::new(SECRET), seed::router())
        .unwrap()
        .start()
        .unwrap();
    let stats = running.stats();
    let parked = move || stats.iter().map(|s| s.parked.get()).sum::<u64>();
    let out = (
        running.local_addr(),
        running.endpoint(),
        made.cert.der().clone(),
        parked,
    );
    // The cores run until the test process exits.
    std::mem::forget(running);
    out
}

fn connect(
    addr: SocketAddr,
    cert: &CertificateDer<'static>,
    version: &'static rustls::SupportedProtocolVersion,
    user: &str,
) -> WebSocket<Tls> {
    let mut roots = RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn = ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap()).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = token::sign(SECRET.as_bytes(), user, unix_now());
    let url = format!(
        "wss://localhost:{}/socket/websocket?token={t}&vsn=2.0.0",
        addr.port()
    );
    let (ws, _) = tungstenite::client(url.as_str(), StreamOwned::new(conn, tcp)).unwrap();
    ws
}

fn send(ws: &mut WebSocket<Tls>, msg: Value) {
    ws.send(Message::text(msg.to_string())).unwrap();
}

/// The next text message, skipping control frames.
fn next(ws: &mut WebSocket<Tls>) -> Value {
    loop {
        match ws.read().unwrap() {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Waits until the server holds `n` parked connections.
fn wait_parked(parked: &impl Fn() -> u64, n: u64) {
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while parked() != n {
        assert!(std::time::Instant::now() < end, "{} parked, not {n}", parked());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn heartbeat(ws: &mut WebSocket<Tls>, r: &str) {
    send(ws, json!([null, r, "phoenix", "heartbeat", {}]));
    let reply = next(ws);
    assert_eq!(reply[1], r);
    assert_eq!(reply[4]["status"], "ok", "{reply}");
}

fn join(ws: &mut WebSocket<Tls>, topic: &str) {
    send(ws, json!(["1", "1", topic, "phx_join", {}]));
    let reply = next(ws);
    assert_eq!(reply[4]["status"], "ok", "{reply}");
}

#[test]
fn key_updates_asked_by_the_client_while_active_and_while_parked_keep_both_directions_working() {
    let (addr, endpoint, cert, parked) = start();
    let mut ws = connect(addr, &cert, &rustls::version::TLS13, "keys");
    join(&mut ws, "bench:keys");
    for round in 0..3 {
        ws.get_mut().conn.refresh_traffic_keys().unwrap();
        // The KeyUpdate goes out ahead of this heartbeat; the reply comes after the
        // server's own KeyUpdate, under its new key.
        heartbeat(&mut ws, &format!("active-{round}"));
    }
    endpoint.broadcast("bench:keys", "m", json!({"i": 1}));
    assert_eq!(next(&mut ws)[4]["i"], 1);

    // Parked: the key update wakes the connection, which answers under new keys.
    wait_parked(&parked, 1);
    ws.get_mut().conn.refresh_traffic_keys().unwrap();
    heartbeat(&mut ws, "parked");
    // Parked again: the flusher seals the broadcast with the updated key, and the
    // connection stays parked.
    wait_parked(&parked, 1);
    endpoint.broadcast("bench:keys", "m", json!({"i": 2}));
    assert_eq!(next(&mut ws)[4]["i"], 2);
    assert_eq!(parked(), 1, "a broadcast did not wake the parked connection");
    heartbeat(&mut ws, "after");
}

#[test]
fn tls_1_2_carries_joins_heartbeats_and_broadcasts_active_and_parked() {
    let (addr, endpoint, cert, parked) = start();
    let mut ws = connect(addr, &cert, &rustls::version::TLS12, "twelve");
    join(&mut ws, "bench:twelve");
    heartbeat(&mut ws, "one");
    endpoint.broadcast("bench:twelve", "m", json!({"i": 1}));
    assert_eq!(next(&mut ws)[4]["i"], 1);
    wait_parked(&parked, 1);
    let big = "b".repeat(100_000);
    endpoint.broadcast("bench:twelve", "m", json!({"i": 2, "big": big}));
    let got = next(&mut ws);
    assert_eq!(
        (got[4]["i"].clone(), got[4]["big"].as_str().map(str::len)),
        (json!(2), Some(100_000))
    );
    heartbeat(&mut ws, "two");
}
