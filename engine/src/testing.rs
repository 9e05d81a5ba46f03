//! An in-process test kit for channels, after Phoenix's `ChannelTest`: connect a socket,
//! join, push, and assert on replies, pushes and broadcasts, with the real shard,
//! router and serializer but no network.
//!
//! ```
//! use ringcast::testing::{self, Frame};
//! use ringcast::{seed, Payload, Reply};
//! use serde_json::json;
//!
//! testing::run(seed::UserSocket::new("s"), seed::router(), |kit| async move {
//!     let token = ringcast::proto::token::sign(b"s", "42", testing::unix_now());
//!     let mut client = kit.socket(&[("token", &token)]).await.expect("connects");
//!     assert_eq!(client.subscribe_and_join("notifications:42", json!({})).await, Reply::ok());
//!     // rooms:* keeps history: its join reply carries the room's position.
//!     let Reply::Ok(joined) = client.subscribe_and_join("rooms:lobby", json!({})).await else { panic!() };
//!     assert_eq!(joined.str_field("position").map(|p| p.ends_with(":0")), Some(true));
//!     client.assert_push("rooms:lobby", "welcome", json!({"msg": "Welcome to room lobby!"})).await;
//!     let r = client.push("rooms:lobby", "ping", json!({"n": 1}));
//!     client.assert_reply(&r, Reply::Ok(json!({"n": 1}).into())).await;
//!     client.push("rooms:lobby", "new_msg", json!({"body": "hi"}));
//!     let position = client.assert_broadcast("rooms:lobby", "new_msg", json!({"body": "hi", "user": "42"})).await;
//!     assert!(position.unwrap().ends_with(":1"));
//! });
//! ```

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;

use crate::proto::position::Position;
use crate::proto::ws::{opcode, split_frame};
use crate::proto::{Message, Payload, Ref, Vsn};
use crate::shard::api::endpoint::Endpoint;
use crate::shard::api::router::{ConnectInfo, Router, SocketHandler};
use crate::shard::app::{App, Config};
use crate::shard::conn::Conn;
use crate::shard::session::{Session, Turn};
use crate::shard::Shard;
use crate::Reply;

/// How long an assertion waits for its frame.
pub const ASSERT_TIMEOUT: Duration = Duration::from_secs(1);

/// Seconds since the Unix epoch (for minting tokens in tests).
pub use crate::clock::unix_now;

/// Runs `test` on a fresh single-core shard serving `socket` and `router`.
pub fn run<H, F, Fut>(socket: H, router: Router, test: F) -> Fut::Output
where
    H: SocketHandler,
    F: FnOnce(Kit) -> Fut,
    Fut: Future + 'static,
    Fut::Output: 'static,
{
    let app = Arc::new(App {
        config: Config {
            cores: 1,
            ..Config::default()
        },
        router,
        socket: Box::new(socket),
        presence_fetch: None,
        stats: vec![Default::default()],
        epoch_seed: crate::clock::unix_nanos(),
    });
    let executor = glommio::LocalExecutorBuilder::default()
        .make()
        .expect("a glommio executor for the test");
    executor.run(async move {
        let shard = Shard::new(
            0,
            app,
            Endpoint::new(Vec::new(), None),
            None,
            crate::clock::Clock::system(),
        );
        let _entered = shard.enter();
        glommio::spawn_local(crate::transport::timers::run(shard.clone())).detach();
        test(Kit { shard }).await
    })
}

/// The test's handle on the shard.
pub struct Kit {
    shard: Rc<Shard>,
}

impl Kit {
    /// Connects a V2 client with these connect params; `None` if the socket handler
    /// refuses it.
    pub async fn socket(&self, params: &[(&str, &str)]) -> Option<Client> {
        let info = ConnectInfo {
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..ConnectInfo::default()
        };
        let (assigns, socket_id) = self.shard.app.socket.connect(&info).await?;
        let conn = self.shard.add_conn(Vsn::V2, assigns, socket_id, false);
        let inbound = Rc::new(RefCell::new(VecDeque::new()));
        let closed = Rc::new(Cell::new(false));
        let pump = TestPump {
            session: Session::new(self.shard.clone(), conn.clone()),
            inbound: inbound.clone(),
            closed: closed.clone(),
        };
        glommio::spawn_local(pump).detach();
        Some(Client {
            conn,
            inbound,
            closed,
            seen: VecDeque::new(),
            next_ref: 0,
            join_refs: Vec::new(),
        })
    }

    /// Broadcasts from outside any channel, like `Endpoint.broadcast`.
    pub fn broadcast(&self, topic: &str, event: &str, payload: impl Into<Payload>) {
        self.shard.endpoint.broadcast(topic, event, payload);
    }

    /// Listens to `topic` like `Endpoint::subscribe` (read it with `try_next` or as a
    /// `Stream`; this test's core delivers into it).
    pub fn subscribe(&self, topic: &str) -> crate::Subscription {
        self.shard.endpoint.subscribe(topic)
    }

    /// Sends `msg` to `handle_info` of every channel of `topic`, like
    /// `Endpoint::send_info`.
    pub fn send_info(&self, topic: &str, msg: impl std::any::Any + Send + Clone) {
        self.shard.endpoint.send_info(topic, msg);
    }

    /// Every presence on `topic` (what `track`, `track_on` and their untracks left),
    /// like `Endpoint::presence_list`.
    pub fn presence_list(&self, topic: &str) -> Value {
        self.shard.endpoint.presence_list(topic)
    }
}

/// Drives one test client's session: the in-memory counterpart of the WebSocket pump.
struct TestPump {
    session: Session,
    inbound: Rc<RefCell<VecDeque<Message>>>,
    closed: Rc<Cell<bool>>,
}

impl Future for TestPump {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        this.session.conn.set_waker(cx.waker());
        let closing = this.closed.get()
            || matches!(
                this.session.turn(cx, || this.inbound.borrow_mut().pop_front()),
                Turn::Closing(_)
            );
        if !closing {
            return Poll::Pending;
        }
        this.closed.set(true);
        this.session.finish();
        Poll::Ready(())
    }
}

/// One decoded server frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// join_ref, if any.
    pub join_ref: Option<String>,
    /// ref, if any.
    pub msg_ref: Option<String>,
    /// Topic.
    pub topic: String,
    /// Event.
    pub event: String,
    /// Payload (replies: `{"status","response"}`; binary replies: the response bytes,
    /// their status in [`Frame::status`]).
    pub payload: Payload,
    /// The status of a binary reply (`ok`, `error`); `None` for every other frame.
    pub status: Option<String>,
}

fn decode_frame(frame: &[u8]) -> Frame {
    let (kind, body) = split_frame(frame).expect("the shard queues whole frames");
    if kind == opcode::BINARY {
        let lens = |n: usize| body[1..1 + n].iter().map(|&l| l as usize).collect::<Vec<_>>();
        let fields = |header: usize, lens: &[usize]| {
            let mut at = header;
            let mut out = Vec::new();
            for l in lens {
                out.push(String::from_utf8_lossy(&body[at..at + l]).into_owned());
                at += l;
            }
            (out, Bytes::copy_from_slice(&body[at..]))
        };
        return match body[0] {
            0 => {
                let (f, data) = fields(4, &lens(3));
                Frame {
                    join_ref: Some(f[0].clone()),
                    msg_ref: None,
                    topic: f[1].clone(),
                    event: f[2].clone(),
                    payload: Payload::Binary(data),
                    status: None,
                }
            }
            1 => {
                let (f, data) = fields(5, &lens(4));
                Frame {
                    join_ref: Some(f[0].clone()),
                    msg_ref: Some(f[1].clone()),
                    topic: f[2].clone(),
                    event: "phx_reply".into(),
                    payload: Payload::Binary(data),
                    status: Some(f[3].clone()),
                }
            }
            _ => {
                let (f, data) = fields(3, &lens(2));
                Frame {
                    join_ref: None,
                    msg_ref: None,
                    topic: f[0].clone(),
                    event: f[1].clone(),
                    payload: Payload::Binary(data),
                    status: None,
                }
            }
        };
    }
    let v: Value = serde_json::from_slice(body).expect("server frames are JSON");
    let s = |i: usize| v[i].as_str().map(str::to_string);
    Frame {
        join_ref: s(0),
        msg_ref: s(1),
        topic: s(2).unwrap_or_default(),
        event: s(3).unwrap_or_default(),
        payload: Payload::Json(v[4].clone()),
        status: None,
    }
}

/// A connected test client.
pub struct Client {
    conn: Rc<Conn>,
    inbound: Rc<RefCell<VecDeque<Message>>>,
    closed: Rc<Cell<bool>>,
    seen: VecDeque<Frame>,
    next_ref: u64,
    join_refs: Vec<(String, String)>,
}

impl Client {
    fn next_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    fn send(&mut self, msg: Message) {
        self.inbound.borrow_mut().push_back(msg);
        self.conn.wake();
    }

    fn collect(&mut self) {
        let mut out = self.conn.out.borrow_mut();
        let n = out.bytes;
        for f in out.frames.iter() {
            self.seen.push_back(decode_frame(f.bytes()));
        }
        out.consume(n);
    }

    /// Waits until a frame satisfying `pred` arrives, removes and returns it.
    pub async fn expect(&mut self, what: &str, pred: impl Fn(&Frame) -> bool) -> Frame {
        let deadline = Instant::now() + ASSERT_TIMEOUT;
        loop {
            self.collect();
            if let Some(i) = self.seen.iter().position(&pred) {
                return self.seen.remove(i).expect("index found");
            }
            if Instant::now() > deadline {
                panic!("expected {what} within {ASSERT_TIMEOUT:?}; got {:#?}", self.seen);
            }
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Joins `topic` and waits for the reply.
    pub async fn subscribe_and_join(&mut self, topic: &str, payload: impl Into<Payload>) -> Reply {
        let r = self.next_ref();
        self.join_refs.retain(|(t, _)| t != topic);
        self.join_refs.push((topic.to_string(), r.clone()));
        self.send(Message {
            join_ref: Some(Ref::from(r.as_str())),
            msg_ref: Some(Ref::from(r.as_str())),
            topic: topic.to_string(),
            event: "phx_join".into(),
            payload: payload.into(),
        });
        let frame = self
            .expect("join reply", |f| {
                f.event == "phx_reply" && f.msg_ref.as_deref() == Some(&r)
            })
            .await;
        to_reply(&frame)
    }

    /// Pushes `event` on a joined `topic`; returns the ref to match the reply with.
    pub fn push(&mut self, topic: &str, event: &str, payload: impl Into<Payload>) -> String {
        let r = self.next_ref();
        let join_ref = self
            .join_refs
            .iter()
            .find(|(t, _)| t == topic)
            .map(|(_, j)| Ref::from(j.as_str()));
        self.send(Message {
            join_ref,
            msg_ref: Some(Ref::from(r.as_str())),
            topic: topic.to_string(),
            event: event.to_string(),
            payload: payload.into(),
        });
        r
    }

    /// Leaves `topic` and waits for the reply.
    pub async fn leave(&mut self, topic: &str) -> Reply {
        let r = self.push(topic, "phx_leave", Payload::empty());
        self.join_refs.retain(|(t, _)| t != topic);
        let frame = self
            .expect("leave reply", |f| {
                f.event == "phx_reply" && f.msg_ref.as_deref() == Some(&r)
            })
            .await;
        to_reply(&frame)
    }

    /// Asserts the reply to `msg_ref` arrives and equals `reply`.
    pub async fn assert_reply(&mut self, msg_ref: &str, reply: Reply) {
        let frame = self
            .expect(&format!("reply to {msg_ref}"), |f| {
                f.event == "phx_reply" && f.msg_ref.as_deref() == Some(msg_ref)
            })
            .await;
        assert_eq!(to_reply(&frame), reply, "reply to {msg_ref}");
    }

    /// Asserts a channel push (it carries a join_ref) of `event` with `payload` on
    /// `topic`. Its ref is none, or, for a push `handle_out` made for a broadcast on a
    /// topic with history, that broadcast's position.
    pub async fn assert_push(&mut self, topic: &str, event: &str, payload: impl Into<Payload>) {
        let payload = payload.into();
        self.expect(&format!("push {event} {payload:?} on {topic}"), |f| {
            f.topic == topic
                && f.event == event
                && f.join_ref.is_some()
                && f.msg_ref.as_deref().is_none_or(|r| Position::parse(r).is_some())
                && f.payload == payload
        })
        .await;
    }

    /// Asserts a fastlane broadcast of `event` with `payload` on `topic` reached this
    /// client; returns its ref: `None`, or its position on a topic with history.
    pub async fn assert_broadcast(
        &mut self,
        topic: &str,
        event: &str,
        payload: impl Into<Payload>,
    ) -> Option<String> {
        let payload = payload.into();
        let frame = self
            .expect(&format!("broadcast {event} {payload:?} on {topic}"), |f| {
                f.topic == topic
                    && f.event == event
                    && f.join_ref.is_none()
                    && f.msg_ref.as_deref().is_none_or(|r| Position::parse(r).is_some())
                    && f.payload == payload
            })
            .await;
        frame.msg_ref
    }

    /// Asserts nothing matching arrives within `within`.
    pub async fn refute(&mut self, within: Duration, pred: impl Fn(&Frame) -> bool) {
        glommio::timer::sleep(within).await;
        self.collect();
        if let Some(f) = self.seen.iter().find(|f| pred(f)) {
            panic!("unexpected frame {f:#?}");
        }
    }

    /// Every frame received and not yet matched, oldest first.
    pub fn frames(&mut self) -> Vec<Frame> {
        self.collect();
        self.seen.drain(..).collect()
    }

    /// Whether the server closed this connection, and with which code.
    pub fn close_code(&self) -> Option<u16> {
        self.conn.close.get()
    }

    /// Drops the connection, as a client going away does.
    pub fn disconnect(self) {
        self.closed.set(true);
        self.conn.wake();
    }
}

fn to_reply(frame: &Frame) -> Reply {
    match &frame.payload {
        Payload::Json(v) => {
            let response = Payload::Json(v["response"].clone());
            match v["status"].as_str() {
                Some("ok") => Reply::Ok(response),
                _ => Reply::Error(response),
            }
        }
        Payload::Binary(_) => match frame.status.as_deref() {
            Some("ok") => Reply::Ok(frame.payload.clone()),
            _ => Reply::Error(frame.payload.clone()),
        },
    }
}
