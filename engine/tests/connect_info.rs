//! What an embedder's `connect` sees, through a real server and real sockets: the
//! request URI, user agent, `x-*` headers, peer and (behind a trusted proxy) client
//! address, the Phoenix 1.8 auth token; and a `connect` that awaits does not hold up
//! the core's other connections.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringcast::{Config, ConnectInfo, Router, Server, SocketHandler};

/// Records every `ConnectInfo` it is given; a `slow` param makes it wait 2 s first, as
/// an auth service might.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<ConnectInfo>>>);

impl SocketHandler for Recorder {
    type Assigns = ();
    async fn connect(&self, info: &ConnectInfo) -> Option<()> {
        if info.param("slow").is_some() {
            glommio::timer::sleep(Duration::from_secs(2)).await;
        }
        self.0.lock().unwrap().push(info.clone());
        (info.token() != Some("bad")).then_some(())
    }
}

fn start(trusted: &[&str]) -> (std::net::SocketAddr, Recorder) {
    let recorder = Recorder::default();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        cores: 1,
        trusted_proxies: trusted.iter().map(|n| n.parse().unwrap()).collect(),
        ..Config::default()
    };
    let running = Server::bind(config, recorder.clone(), Router::new())
        .unwrap()
        .start()
        .unwrap();
    let addr = running.local_addr();
    std::mem::forget(running);
    (addr, recorder)
}

/// Sends a WebSocket upgrade with `extra` headers; returns the response head.
fn upgrade(addr: std::net::SocketAddr, query: &str, extra: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /socket/websocket?{query} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap() == 1 {
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

#[test]
fn connect_sees_uri_agent_x_headers_peer_and_the_client_behind_a_trusted_proxy() {
    let (addr, seen) = start(&["127.0.0.0/8"]);
    let head = upgrade(
        addr,
        "vsn=2.0.0&token=q",
        "User-Agent: embedder-test/1\r\nX-Request-Id: r-7\r\nX-Forwarded-For: 203.0.113.9, 127.0.0.5\r\n\
         Origin: http://app.example\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let info = seen.0.lock().unwrap().pop().expect("connect ran");
    assert_eq!(info.uri, "/socket/websocket?vsn=2.0.0&token=q");
    assert_eq!(info.user_agent.as_deref(), Some("embedder-test/1"));
    assert_eq!(info.param("token"), Some("q"));
    assert_eq!(info.token(), Some("q"), "no header token: the query one");
    assert_eq!(info.origin.as_deref(), Some("http://app.example"));
    assert!(info.x_headers.contains(&("x-request-id".into(), "r-7".into())));
    assert!(info.x_headers.iter().any(|(k, _)| k == "x-forwarded-for"));
    let peer = info.peer_addr.expect("the TCP peer");
    assert!(peer.ip().is_loopback());
    assert_eq!(
        info.client_ip,
        Some("203.0.113.9".parse().unwrap()),
        "the first untrusted hop"
    );
}

#[test]
fn an_untrusted_peer_is_its_own_client_whatever_it_forwards() {
    let (addr, seen) = start(&[]);
    let head = upgrade(addr, "vsn=2.0.0", "X-Forwarded-For: 203.0.113.9\r\n");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let info = seen.0.lock().unwrap().pop().unwrap();
    assert_eq!(info.client_ip, info.peer_addr.map(|p| p.ip()));
}

#[test]
fn an_auth_token_subprotocol_wins_over_the_query_and_is_answered_with_phoenix() {
    let (addr, seen) = start(&[]);
    // base64 of "header.token" in the URL-safe alphabet without padding.
    let head = upgrade(
        addr,
        "vsn=2.0.0&token=bad",
        "Sec-WebSocket-Protocol: phoenix, base64url.bearer.phx.aGVhZGVyLnRva2Vu\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-protocol: phoenix\r\n"),
        "{head}"
    );
    let info = seen.0.lock().unwrap().pop().unwrap();
    assert_eq!(info.auth_token.as_deref(), Some("header.token"));
    assert_eq!(info.token(), Some("header.token"));

    // A header token that is not base64 is refused before `connect` runs.
    let before = seen.0.lock().unwrap().len();
    let head = upgrade(
        addr,
        "vsn=2.0.0",
        "Sec-WebSocket-Protocol: phoenix, base64url.bearer.phx.%%%\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert_eq!(seen.0.lock().unwrap().len(), before);
    // No subprotocol offered: none answered.
    let head = upgrade(addr, "vsn=2.0.0", "");
    assert!(
        !head.to_ascii_lowercase().contains("sec-websocket-protocol"),
        "{head}"
    );
}

#[test]
fn a_connect_that_waits_does_not_hold_up_the_core() {
    let (addr, seen) = start(&[]);
    let slow = std::thread::spawn(move || {
        let started = Instant::now();
        let head = upgrade(addr, "vsn=2.0.0&slow=1", "");
        (head, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(200));
    // The one core serves another client while the first connect waits.
    let head = upgrade(addr, "vsn=2.0.0", "");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // Not a speed bound: the slow connect sleeps 2 s, so if the core were held by it,
    // this client could not have been answered before it.
    assert!(
        !slow.is_finished(),
        "the other client was served while the connect waited"
    );
    let (head, waited) = slow.join().unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        waited >= Duration::from_secs(2),
        "the slow connect was awaited: {waited:?}"
    );
    assert_eq!(seen.0.lock().unwrap().len(), 2);
}
