//! PubSub for the embedder, through a real server and real WebSocket clients:
//! `Endpoint::subscribe` (blocking `Iterator` and `Stream` on tokio), `Lagged`,
//! `Endpoint::presence_list`, `Socket::subscribe` with `Endpoint::send_info`, and
//! `Socket::remote_ref` used from a tokio runtime.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ringcast::{
    seed, Channel, Config, Endpoint, HandleResult, Lagged, Message, Payload, RemoteChannelRef, Router,
    Server, Socket,
};
use serde_json::{json, Value};
use tungstenite::WebSocket;

const SECRET: &str = "pubsub-test-secret";
const API_KEY: &str = "pubsub-test-key";

fn start(cores: usize, bound: usize, router: Router) -> (SocketAddr, Endpoint) {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        cores,
        api_key: Some(API_KEY.into()),
        subscription_bound: bound,
        ..Config::default()
    };
    let running = Server::bind(config, seed::UserSocket::new(SECRET), router)
        .unwrap()
        .start()
        .unwrap();
    let out = (running.local_addr(), running.endpoint());
    std::mem::forget(running);
    out
}

type Ws = WebSocket<TcpStream>;

fn ws(addr: SocketAddr, user: &str) -> Ws {
    let token = ringcast::proto::token::sign(SECRET.as_bytes(), user, ringcast::clock::unix_now());
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0&token={token}");
    tungstenite::client(url, stream).unwrap().0
}

fn send(ws: &mut Ws, v: Value) {
    ws.send(tungstenite::Message::Text(v.to_string().into())).unwrap();
}

/// The next V2 message for which `pred` holds (others are skipped).
fn next(ws: &mut Ws, pred: impl Fn(&Value) -> bool) -> Value {
    loop {
        match ws.read().expect("a message within 5 s") {
            tungstenite::Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if pred(&v) {
                    return v;
                }
            }
            _ => continue,
        }
    }
}

fn join(ws: &mut Ws, topic: &str, payload: Value) -> Value {
    send(ws, json!(["1", "1", topic, "phx_join", payload]));
    next(ws, |m| m[1] == "1" && m[3] == "phx_reply")
}

fn api_broadcast(addr: SocketAddr, topic: &str, event: &str, payload: Value) {
    let body = json!({"topic": topic, "event": event, "payload": payload}).to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /api/broadcast HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
}

fn body(m: &Message) -> String {
    match &m.payload {
        Payload::Json(v) => v["body"].as_str().unwrap_or_default().to_string(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_rust_subscriber_gets_every_broadcast_from_clients_on_every_core_and_the_api_exactly_once() {
    let (addr, endpoint) = start(2, 1024, seed::router());
    let sub = endpoint.subscribe("rooms:lobby");
    assert_eq!(sub.topic(), "rooms:lobby");
    let mut clients: Vec<Ws> = (0..4).map(|i| ws(addr, &format!("u{i}"))).collect();
    for c in &mut clients {
        assert_eq!(join(c, "rooms:lobby", json!({}))[4]["status"], "ok");
    }
    let mut want = Vec::new();
    for (i, c) in clients.iter_mut().enumerate() {
        for n in 0..25 {
            let b = format!("c{i}-{n}");
            send(c, json!(["1", null, "rooms:lobby", "new_msg", {"body": b}]));
            want.push(b);
        }
    }
    for n in 0..20 {
        let b = format!("api-{n}");
        api_broadcast(addr, "rooms:lobby", "new_msg", json!({"body": b, "user": "api"}));
        want.push(b);
    }
    let mut got = Vec::new();
    let mut sub = sub;
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < want.len() && Instant::now() < deadline {
        match sub.next_timeout(Duration::from_millis(200)) {
            Some(Ok(m)) if m.event == "new_msg" => {
                assert_eq!(m.topic, "rooms:lobby");
                got.push(body(&m));
            }
            Some(Ok(_)) => {} // presence_diff
            Some(Err(lag)) => panic!("{lag}"),
            None => {}
        }
    }
    // Nothing more arrives: each exactly once.
    while let Some(Ok(m)) = sub.next_timeout(Duration::from_millis(300)) {
        if m.event == "new_msg" {
            got.push(body(&m));
        }
    }
    let mut sorted = got.clone();
    sorted.sort();
    want.sort();
    assert_eq!(sorted, want);
    // Each client's messages in the order it sent them.
    for i in 0..4 {
        let mine: Vec<_> = got
            .iter()
            .filter(|b| b.starts_with(&format!("c{i}-")))
            .cloned()
            .collect();
        let sent: Vec<_> = (0..25).map(|n| format!("c{i}-{n}")).collect();
        assert_eq!(mine, sent);
    }
}

#[test]
fn a_stalled_subscriber_lags_while_websocket_subscribers_lose_nothing() {
    let (addr, endpoint) = start(1, 8, seed::router());
    let mut stalled = endpoint.subscribe("bench:lag");
    let mut reader = ws(addr, "reader");
    join(&mut reader, "bench:lag", json!({}));
    let mut sender = ws(addr, "sender");
    join(&mut sender, "bench:lag", json!({}));
    for n in 0..100 {
        send(
            &mut sender,
            json!(["1", null, "bench:lag", "new_msg", {"body": format!("{n}")}]),
        );
    }
    for n in 0..100 {
        let m = next(&mut reader, |m| m[3] == "new_msg");
        assert_eq!(
            m[4]["body"],
            format!("{n}"),
            "the WebSocket subscriber gets every one, in order"
        );
    }
    // The stalled subscriber: the 8 that fit, then the gap.
    let mut kept = Vec::new();
    for _ in 0..8 {
        kept.push(body(&stalled.try_next().unwrap().unwrap()));
    }
    assert_eq!(kept, (0..8).map(|n| n.to_string()).collect::<Vec<_>>());
    assert_eq!(stalled.try_next(), Some(Err(Lagged { missed: 92 })));
    assert_eq!(stalled.try_next(), None);
    // It goes on with what comes next.
    send(
        &mut sender,
        json!(["1", null, "bench:lag", "new_msg", {"body": "after"}]),
    );
    let m = stalled.next_timeout(Duration::from_secs(3)).unwrap().unwrap();
    assert_eq!(body(&m), "after");
    let metrics = {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut t = String::new();
        s.read_to_string(&mut t).unwrap();
        t
    };
    assert!(
        metrics.contains("ringcast_subscription_lagged_total{core=\"0\"} 92"),
        "{metrics}"
    );
}

#[test]
fn a_subscription_is_a_stream_on_tokio_and_dropping_it_unsubscribes() {
    let (addr, endpoint) = start(2, 64, seed::router());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let sub = endpoint.subscribe("bench:stream");
    let task = rt.spawn(async move {
        let mut sub = sub;
        let mut got = Vec::new();
        while got.len() < 30 {
            match futures_lite::StreamExt::next(&mut sub).await {
                Some(Ok(m)) => got.push(body(&m)),
                other => panic!("{other:?}"),
            }
        }
        got
    });
    std::thread::sleep(Duration::from_millis(50));
    for n in 0..30 {
        api_broadcast(addr, "bench:stream", "new_msg", json!({"body": format!("{n}")}));
    }
    let got = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), task).await })
        .expect("30 messages within 10 s")
        .unwrap();
    assert_eq!(got, (0..30).map(|n| n.to_string()).collect::<Vec<_>>());
    // The task ended, dropping its subscription: the core lets go of it.
    let gauge = || {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut t = String::new();
        s.read_to_string(&mut t).unwrap();
        t.lines()
            .filter(|l| l.starts_with("ringcast_subscriptions{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum::<u64>()
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while gauge() != 0 {
        assert!(Instant::now() < deadline, "the subscription stayed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn presence_list_from_a_plain_thread_equals_the_presence_state_a_joiner_gets() {
    let (addr, endpoint) = start(2, 64, seed::router());
    let mut members: Vec<Ws> = (0..3).map(|i| ws(addr, &format!("m{i}"))).collect();
    for (i, m) in members.iter_mut().enumerate() {
        join(m, "rooms:p", json!({"name": format!("member {i}")}));
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let list = loop {
        let list = endpoint.presence_list("rooms:p");
        if list.as_object().is_some_and(|o| o.len() == 3) {
            break list;
        }
        assert!(Instant::now() < deadline, "{list}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut joiner = ws(addr, "late");
    join(&mut joiner, "rooms:p", json!({}));
    let state = next(&mut joiner, |m| m[3] == "presence_state");
    assert_eq!(state[4], list);
    assert_eq!(list["m1"]["metas"][0]["name"], "member 1");
    assert_eq!(endpoint.presence_list("rooms:none"), json!({}));
}

// A channel that listens to `updates:<id>` and hands its remote ref to a tokio worker.

#[derive(Clone, Debug)]
struct UserUpdated {
    name: String,
}

static REMOTES: Mutex<Vec<RemoteChannelRef>> = Mutex::new(Vec::new());

struct Profile;

impl Channel for Profile {
    async fn join(topic: &str, _payload: Payload, socket: &mut Socket) -> Result<(Self, Payload), Payload> {
        let id = topic.trim_start_matches("profile:").to_string();
        socket.subscribe(&format!("updates:{id}"));
        socket.track_on("online", &id, json!({"via": "profile"}));
        REMOTES.lock().unwrap().push(socket.remote_ref());
        Ok((Profile, Payload::empty()))
    }

    async fn handle_in(&mut self, event: &str, _payload: Payload, _socket: &mut Socket) -> HandleResult {
        match event {
            "stop" => HandleResult::Stop(None),
            _ => HandleResult::NoReply,
        }
    }

    async fn handle_info(&mut self, msg: Box<dyn std::any::Any>, socket: &mut Socket) -> HandleResult {
        if let Some(u) = msg.downcast_ref::<UserUpdated>() {
            socket.push("user_updated", json!({"name": u.name}));
        } else if let Some(m) = msg.downcast_ref::<Message>() {
            socket.push("update", json!({"event": m.event, "topic": m.topic}));
        } else if let Some(done) = msg.downcast_ref::<String>() {
            socket.push("work_done", json!({"result": done}));
        }
        HandleResult::NoReply
    }
}

#[test]
fn channels_subscribe_get_send_info_and_remote_ref_sends_from_tokio() {
    let (addr, endpoint) = start(2, 64, Router::new().channel::<Profile>("profile:*"));
    let mut c = ws(addr, "7");
    assert_eq!(join(&mut c, "profile:7", json!({}))[4]["status"], "ok");
    // A broadcast on the topic the channel subscribed to reaches handle_info.
    endpoint.broadcast("updates:7", "changed", json!({"x": 1}));
    let m = next(&mut c, |m| m[3] == "update");
    assert_eq!(m[4], json!({"event": "changed", "topic": "updates:7"}));
    // A typed message to every channel of the topic, on every core.
    endpoint.send_info("updates:7", UserUpdated { name: "Ada".into() });
    assert_eq!(
        next(&mut c, |m| m[3] == "user_updated")[4],
        json!({"name": "Ada"})
    );
    // Presence on another topic.
    assert_eq!(
        endpoint.presence_list("online")["7"]["metas"][0]["via"],
        "profile"
    );
    // A tokio task sends its result to the channel across threads.
    let remote = REMOTES
        .lock()
        .unwrap()
        .pop()
        .expect("the join handed out its ref");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let r = remote.clone();
    let sent = rt.block_on(async move {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            r.send("42".to_string())
        })
        .await
        .unwrap()
    });
    assert!(sent);
    assert_eq!(next(&mut c, |m| m[3] == "work_done")[4], json!({"result": "42"}));
    // The channel ends: its subscription, presence and remote ref go with it.
    send(&mut c, json!(["1", "2", "profile:7", "stop", {}]));
    next(&mut c, |m| m[3] == "phx_close");
    let deadline = Instant::now() + Duration::from_secs(3);
    while remote.alive() || endpoint.presence_list("online") != json!({}) {
        assert!(Instant::now() < deadline, "the channel's extras outlived it");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!remote.send("late".to_string()));
    endpoint.broadcast("updates:7", "changed", json!({"x": 2}));
    send(&mut c, json!(["9", "9", "profile:8", "phx_join", {}]));
    let reply = next(&mut c, |m| m[3] == "phx_reply" || m[3] == "update");
    assert_eq!(
        reply[3], "phx_reply",
        "no update after the channel ended: {reply}"
    );
}

// The test kit drives the same: a channel that listens to `news` and tracks itself on
// `lobby`.

struct Feed;

impl Channel for Feed {
    async fn join(topic: &str, _payload: Payload, socket: &mut Socket) -> Result<(Self, Payload), Payload> {
        socket.subscribe("news");
        let id = topic.trim_start_matches("feed:").to_string();
        socket.track_on("lobby", &id, json!({"reading": "news"}));
        Ok((Feed, Payload::empty()))
    }

    async fn handle_in(&mut self, event: &str, _payload: Payload, socket: &mut Socket) -> HandleResult {
        if event == "quiet" {
            socket.unsubscribe("news");
        }
        HandleResult::Reply(ringcast::Reply::ok())
    }

    async fn handle_info(&mut self, msg: Box<dyn std::any::Any>, socket: &mut Socket) -> HandleResult {
        if let Some(m) = msg.downcast_ref::<Message>() {
            socket.push(&m.event, m.payload.clone());
        } else if let Some(u) = msg.downcast_ref::<UserUpdated>() {
            socket.push("user_updated", json!({"name": u.name}));
        }
        HandleResult::NoReply
    }
}

#[test]
fn the_test_kit_drives_handle_info_with_messages_and_sees_track_on() {
    use ringcast::testing;
    testing::run(
        seed::UserSocket::new(SECRET),
        Router::new().channel::<Feed>("feed:*"),
        |kit| async move {
            let token = ringcast::proto::token::sign(SECRET.as_bytes(), "5", testing::unix_now());
            let mut client = kit.socket(&[("token", &token)]).await.expect("connects");
            let mut rust = kit.subscribe("news");
            assert_eq!(
                client.subscribe_and_join("feed:5", json!({})).await,
                ringcast::Reply::ok()
            );
            assert_eq!(kit.presence_list("lobby")["5"]["metas"][0]["reading"], "news");
            kit.broadcast("news", "headline", json!({"title": "hello"}));
            client
                .assert_push("feed:5", "headline", json!({"title": "hello"}))
                .await;
            let m = rust
                .try_next()
                .expect("the kit's subscription got it too")
                .unwrap();
            assert_eq!((m.topic.as_str(), m.event.as_str()), ("news", "headline"));
            kit.send_info("news", UserUpdated { name: "Grace".into() });
            client
                .assert_push("feed:5", "user_updated", json!({"name": "Grace"}))
                .await;
            let r = client.push("feed:5", "quiet", json!({}));
            client.assert_reply(&r, ringcast::Reply::ok()).await;
            kit.broadcast("news", "headline", json!({"title": "unheard"}));
            client
                .refute(Duration::from_millis(100), |f| f.event == "headline")
                .await;
            client.leave("feed:5").await;
            assert_eq!(
                kit.presence_list("lobby"),
                json!({}),
                "track_on left with the channel"
            );
        },
    );
}
