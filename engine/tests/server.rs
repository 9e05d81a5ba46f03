//! A real server in this process, real sockets: the `Endpoint` from a plain thread, the
//! `disconnect` broadcast, and cores seen through the `x-ringcast-core` header.

use std::net::TcpStream;
use std::time::Duration;

use ringcast::proto::token;
use ringcast::testing::unix_now;
use ringcast::{seed, Config, Endpoint, Server};
use serde_json::{json, Value};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

const SECRET: &str = "server-test";

fn start(cores: usize) -> (std::net::SocketAddr, Endpoint) {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        cores,
        ..Config::default()
    };
    let server = Server::bind(config, seed::UserSocket::new(SECRET), seed::router()).unwrap();
    let running = server.start().unwrap();
    let out = (running.local_addr(), running.endpoint());
    // The cores run until the test process exits.
    std::mem::forget(running);
    out
}

struct Client {
    ws: WebSocket<TcpStream>,
    core: String,
}

fn connect(addr: std::net::SocketAddr, user: &str) -> Client {
    let t = token::sign(SECRET.as_bytes(), user, unix_now());
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let url = format!("ws://{addr}/socket/websocket?token={t}&vsn=2.0.0");
    let (ws, response) = tungstenite::client(url.as_str(), stream).unwrap();
    let core = response.headers()["x-ringcast-core"]
        .to_str()
        .unwrap()
        .to_string();
    Client { ws, core }
}

impl Client {
    fn send(&mut self, msg: Value) {
        self.ws.send(Message::text(msg.to_string())).unwrap();
    }

    fn next(&mut self) -> Value {
        loop {
            match self.ws.read().unwrap() {
                Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn join(&mut self, topic: &str) {
        self.send(json!(["1", "1", topic, "phx_join", {}]));
        let reply = self.next();
        assert_eq!(reply[3], "phx_reply");
        assert_eq!(reply[4]["status"], "ok");
    }
}

#[test]
fn endpoint_broadcast_from_a_plain_thread_reaches_every_core() {
    let (addr, endpoint) = start(2);
    let mut clients = Vec::new();
    while clients.len() < 64 {
        clients.push(connect(addr, &clients.len().to_string()));
        let cores: std::collections::HashSet<_> = clients.iter().map(|c| c.core.clone()).collect();
        if clients.len() >= 8 && cores.len() == 2 {
            break;
        }
    }
    let cores: std::collections::HashSet<_> = clients.iter().map(|c| c.core.clone()).collect();
    assert_eq!(cores.len(), 2, "the kernel spread connections over both cores");
    for c in &mut clients {
        c.join("bench:endpoint");
    }
    for i in 0..3 {
        endpoint.broadcast("bench:endpoint", "tick", json!({"i": i}));
    }
    for c in &mut clients {
        for i in 0..3 {
            assert_eq!(c.next(), json!([null, null, "bench:endpoint", "tick", {"i": i}]));
        }
    }
}

#[test]
fn disconnect_closes_every_socket_of_the_user_with_1001() {
    let (addr, endpoint) = start(2);
    let mut mine: Vec<Client> = (0..6).map(|_| connect(addr, "9")).collect();
    let mut other = connect(addr, "10");
    other.join("bench:d");
    endpoint.broadcast("user_socket:9", "disconnect", json!({}));
    for c in &mut mine {
        match c.ws.read() {
            Ok(Message::Close(Some(frame))) => assert_eq!(frame.code, CloseCode::Away),
            other => panic!("expected close 1001, got {other:?}"),
        }
    }
    other.send(json!([null, "2", "phoenix", "heartbeat", {}]));
    assert_eq!(
        other.next(),
        json!([null, "2", "phoenix", "phx_reply", {"status": "ok", "response": {}}])
    );
}

#[test]
fn handshake_refusals() {
    let (addr, _) = start(1);
    let forged = token::sign(b"wrong", "1", unix_now());
    for query in [
        String::new(),
        format!("token={forged}&vsn=2.0.0"),
        format!(
            "token={}&vsn=3.0.0",
            token::sign(SECRET.as_bytes(), "1", unix_now())
        ),
    ] {
        let stream = TcpStream::connect(addr).unwrap();
        let url = format!("ws://{addr}/socket/websocket?{query}");
        match tungstenite::client(url.as_str(), stream) {
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
                assert_eq!(r.status(), 403)
            }
            other => panic!("expected 403 for {query:?}, got {:?}", other.map(|_| ())),
        }
    }
}

/// The seed's socket, except that a `boom` token makes `connect` panic.
struct Fragile(seed::UserSocket);

impl ringcast::SocketHandler for Fragile {
    type Assigns = seed::User;
    async fn connect(&self, info: &ringcast::ConnectInfo) -> Option<seed::User> {
        if info.param("token") == Some("boom") {
            panic!("a connect hook that fails");
        }
        ringcast::SocketHandler::connect(&self.0, info).await
    }
    fn id(&self, user: &seed::User) -> Option<String> {
        ringcast::SocketHandler::id(&self.0, user)
    }
}

#[test]
fn a_connect_that_panics_refuses_its_client_and_nobody_else() {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        cores: 1,
        ..Config::default()
    };
    let server = Server::bind(config, Fragile(seed::UserSocket::new(SECRET)), seed::router()).unwrap();
    let running = server.start().unwrap();
    let addr = running.local_addr();
    std::mem::forget(running);
    let mut bystander = connect(addr, "by");
    bystander.join("rooms:fragile");
    for _ in 0..3 {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let url = format!("ws://{addr}/socket/websocket?token=boom&vsn=2.0.0");
        match tungstenite::client(url.as_str(), stream) {
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
                assert_eq!(response.status(), 500)
            }
            other => panic!("expected HTTP 500, got {other:?}"),
        }
    }
    // The core that ran the panicking hook still serves: the bystander and a newcomer.
    bystander.send(json!(["1", "2", "rooms:fragile", "ping", {"still": "here"}]));
    let reply = loop {
        let m = bystander.next();
        if m[3] == "phx_reply" {
            break m;
        }
    };
    assert_eq!(reply[4]["response"]["still"], "here");
    let mut newcomer = connect(addr, "new");
    newcomer.join("rooms:fragile");
}
