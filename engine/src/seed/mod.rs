//! The seed app that `ringcast serve` runs (shared/seed-app.md): the chat and
//! notifications application of the Phoenix guides, written against ringcast's API. It
//! is also the target of the loadgen, the benchmarks and the end-to-end tests.

use std::time::Duration;

use serde_json::json;

use crate::clock::unix_now;
use crate::proto::token;
use crate::{Channel, ConnectInfo, HandleResult, Payload, Reply, Router, Socket, SocketHandler};

/// Socket secret used when none is configured (the server says so loudly).
pub const DEV_SECRET: &str = "ringcast-dev-secret-do-not-use-in-production";

/// What a seed-app connection carries: the user id from its token.
#[derive(Debug, Clone)]
pub struct User {
    /// The `user_id` claim of the socket token.
    pub id: String,
}

/// Authenticates with the `token` connect param; id `user_socket:<user_id>`.
pub struct UserSocket {
    secret: Vec<u8>,
}

impl UserSocket {
    /// A socket handler verifying tokens with `secret`.
    pub fn new(secret: &str) -> Self {
        UserSocket {
            secret: secret.as_bytes().to_vec(),
        }
    }
}

impl SocketHandler for UserSocket {
    type Assigns = User;

    /// The token is the Phoenix 1.8 `authToken` when the client sent one (it wins),
    /// else the `token` connect param.
    async fn connect(&self, info: &ConnectInfo) -> Option<User> {
        let id = token::verify(&self.secret, info.token()?, unix_now()).ok()?;
        Some(User { id })
    }

    fn id(&self, user: &User) -> Option<String> {
        Some(format!("user_socket:{}", user.id))
    }
}

/// Broadcasts `rooms:*` keeps per topic by default (`--history-size`).
pub const HISTORY_SIZE: usize = 100;
/// How long `rooms:*` keeps each by default (`--history-ttl`).
pub const HISTORY_TTL: Duration = Duration::from_secs(300);

/// The seed app's routes, `rooms:*` with the default history.
pub fn router() -> Router {
    router_with_history(HISTORY_SIZE, HISTORY_TTL)
}

/// The seed app's routes, `rooms:*` keeping the last `size` broadcasts of each room
/// for `ttl`.
///
/// ```
/// let router = ringcast::seed::router_with_history(10, std::time::Duration::from_secs(60));
/// assert!(router.keeps_history("rooms:lobby"));
/// assert!(!router.keeps_history("bench:x"));
/// ```
pub fn router_with_history(size: usize, ttl: Duration) -> Router {
    Router::new()
        .channel::<RoomChannel>("rooms:*")
        .history(size, ttl)
        .channel::<NotificationsChannel>("notifications:*")
        .channel::<BenchChannel>("bench:*")
}

/// The seed app's routes with history on `bench:*` too: the same raw fanout with and
/// without history, for measuring what history costs (`ringcast serve
/// --bench-history`). Not the seed app's contract.
///
/// ```
/// let router = ringcast::seed::router_with_bench_history(10, std::time::Duration::from_secs(60));
/// assert!(router.keeps_history("bench:x"));
/// ```
pub fn router_with_bench_history(size: usize, ttl: Duration) -> Router {
    Router::new()
        .channel::<RoomChannel>("rooms:*")
        .history(size, ttl)
        .channel::<NotificationsChannel>("notifications:*")
        .channel::<BenchChannel>("bench:*")
        .history(size, ttl)
}

fn body(payload: &Payload) -> Option<&str> {
    payload.str_field("body")
}

/// Longest `body` a room message may carry, in bytes: a room's members each queue
/// every message, so one client must not fill their queues with a few big ones.
pub const MAX_BODY: usize = 8192;
/// Longest presence `name` a room join may carry, in bytes: it goes into every
/// member's `presence_diff` and every joiner's `presence_state`.
pub const MAX_NAME: usize = 256;

/// A room message's `body`: a string of at most [`MAX_BODY`] bytes.
fn room_body(payload: &Payload) -> Option<&str> {
    body(payload).filter(|b| b.len() <= MAX_BODY)
}

fn invalid() -> HandleResult {
    HandleResult::Reply(Reply::error("invalid"))
}

fn unknown_event() -> HandleResult {
    HandleResult::Reply(Reply::error("unknown event"))
}

/// `rooms:*`: chat with welcome, presence, shout, whisper, ping and friends.
pub struct RoomChannel {
    user: String,
    name: String,
}

/// What a room sends itself right after its join (Phoenix's `:after_join`).
struct AfterJoin;

impl Channel for RoomChannel {
    const INTERCEPTS: &'static [&'static str] = &["whisper"];

    async fn join(topic: &str, payload: Payload, socket: &mut Socket) -> Result<(Self, Payload), Payload> {
        if topic == "rooms:locked" {
            return Err(json!({"reason": "unauthorized"}).into());
        }
        let user = socket.assigns::<User>().id.clone();
        let name = match payload.json().and_then(|p| p.get("name")) {
            None | Some(serde_json::Value::Null) => user.clone(),
            Some(serde_json::Value::String(name)) if name.len() <= MAX_NAME => name.clone(),
            Some(_) => return Err(json!({"reason": "invalid"}).into()),
        };
        let room = topic.strip_prefix("rooms:").unwrap_or(topic);
        socket.push("welcome", json!({"msg": format!("Welcome to room {room}!")}));
        socket.channel_ref().send(AfterJoin);
        Ok((RoomChannel { user, name }, Payload::empty()))
    }

    async fn handle_info(&mut self, msg: Box<dyn std::any::Any>, socket: &mut Socket) -> HandleResult {
        if msg.is::<AfterJoin>() {
            socket.push_presence_state();
            let online_at = unix_now().to_string();
            socket.track(&self.user, json!({"name": self.name, "online_at": online_at}));
        }
        HandleResult::NoReply
    }

    async fn handle_in(&mut self, event: &str, payload: Payload, socket: &mut Socket) -> HandleResult {
        match event {
            "new_msg" => match room_body(&payload) {
                Some(body) => {
                    socket.broadcast("new_msg", json!({"body": body, "user": self.user}));
                    HandleResult::NoReply
                }
                None => invalid(),
            },
            "shout" => match room_body(&payload) {
                Some(body) => {
                    socket.broadcast_from("shout", json!({"body": body, "user": self.user}));
                    HandleResult::Reply(Reply::ok())
                }
                None => invalid(),
            },
            "whisper" => match (payload.str_field("to"), room_body(&payload)) {
                (Some(to), Some(body)) => {
                    socket.broadcast("whisper", json!({"to": to, "body": body, "from": self.user}));
                    HandleResult::Reply(Reply::ok())
                }
                _ => invalid(),
            },
            "ping" => HandleResult::Reply(Reply::Ok(payload)),
            "bad_request" => invalid(),
            "leave" => HandleResult::Stop(None),
            "crash" => panic!("crash requested by the client"),
            _ => unknown_event(),
        }
    }

    fn handle_out(&mut self, event: &str, payload: &Payload, socket: &mut Socket) {
        // Only `whisper` is intercepted: it goes to its addressee's sockets alone.
        if payload.str_field("to") == Some(self.user.as_str()) {
            socket.push(event, payload.clone());
        }
    }
}

/// `notifications:<user_id>`: server-to-user messages; only the user may join.
pub struct NotificationsChannel;

impl Channel for NotificationsChannel {
    async fn join(topic: &str, _payload: Payload, socket: &mut Socket) -> Result<(Self, Payload), Payload> {
        let owner = topic.strip_prefix("notifications:");
        if owner == Some(socket.assigns::<User>().id.as_str()) {
            Ok((NotificationsChannel, Payload::empty()))
        } else {
            Err(json!({"reason": "unauthorized"}).into())
        }
    }

    async fn handle_in(&mut self, _event: &str, _payload: Payload, _socket: &mut Socket) -> HandleResult {
        unknown_event()
    }
}

/// `bench:*`: raw fanout, no pushes and no presence.
pub struct BenchChannel {
    user: String,
}

impl Channel for BenchChannel {
    async fn join(_topic: &str, _payload: Payload, socket: &mut Socket) -> Result<(Self, Payload), Payload> {
        let user = socket.assigns::<User>().id.clone();
        Ok((BenchChannel { user }, Payload::empty()))
    }

    async fn handle_in(&mut self, event: &str, payload: Payload, socket: &mut Socket) -> HandleResult {
        match (event, body(&payload)) {
            ("new_msg", Some(body)) => {
                socket.broadcast("new_msg", json!({"body": body, "user": self.user}));
                HandleResult::NoReply
            }
            ("new_msg", None) => invalid(),
            _ => unknown_event(),
        }
    }
}
