//! The long-poll transport (PROTOCOL.md §12): sessions that live on one core, polled
//! with GET and fed with ndjson POSTs. A request that lands on another core is passed
//! over the mesh to the session's core and answered from there.
//!
//! A session is a connection like any other: a `Conn` with its channel `Session`, driven
//! by a small task; its outbound frames are WebSocket text frames, and a poll answers
//! their payloads as JSON strings.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::proto::http::{Request, Response};
use crate::proto::serializer::{decode_binary, decode_text};
use crate::proto::ws::{opcode, split_frame};
use crate::proto::{Message, Vsn};
use crate::shard::admission::Refused;
use crate::shard::conn::Conn;
use crate::shard::mesh::MeshMsg;
use crate::shard::session::{Session, Turn};
use crate::shard::Shard;

/// How long a poll is held when there is nothing to send.
pub(crate) const POLL_WINDOW: Duration = Duration::from_secs(10);
/// A session with no poll for this long is closed like a dropped WebSocket.
pub(crate) const SESSION_EXPIRY: Duration = Duration::from_secs(15);
/// Posted messages a session holds before it handles them; past it the session closes.
const INBOUND_BOUND: usize = 1000;
/// Lines of one POST handled; the rest are ignored, as Phoenix does.
const MAX_LINES: usize = 100;

/// This core's long-poll sessions by token, and the requests it forwarded to other
/// cores, waiting for their answers. Transport state of the core's thread, beside the
/// shard (which knows sessions only as connections).
#[derive(Default)]
struct Hub {
    sessions: HashMap<Box<str>, Rc<LpSession>>,
    forwarded: HashMap<u64, glommio::channels::local_channel::LocalSender<Response>>,
    next_forward: u64,
}

thread_local! {
    static HUB: RefCell<Hub> = RefCell::default();
}

fn session(token: &str) -> Option<Rc<LpSession>> {
    HUB.with(|h| h.borrow().sessions.get(token).cloned())
}

fn insert_session(shard: &Shard, token: Box<str>, lp: Rc<LpSession>) {
    HUB.with(|h| h.borrow_mut().sessions.insert(token, lp));
    shard.stats.longpoll_sessions.add(1);
}

fn remove_session(shard: &Shard, token: &str) {
    if HUB.with(|h| h.borrow_mut().sessions.remove(token)).is_some() {
        shard.stats.longpoll_sessions.sub(1);
    }
}

/// Closes the sessions that went unpolled past [`SESSION_EXPIRY`], like dropped
/// WebSockets.
/// Closed sessions whose last messages were never polled go too.
pub(crate) fn sweep(shard: &Shard, now: Instant) {
    let abandoned: Vec<Box<str>> = HUB.with(|h| {
        let hub = h.borrow();
        let mut abandoned = Vec::new();
        for lp in hub.sessions.values() {
            if !lp.expired(now) {
                continue;
            }
            if lp.gone.get() {
                abandoned.push(lp.token.clone());
            } else {
                lp.expire();
            }
        }
        abandoned
    });
    for token in abandoned {
        remove_session(shard, &token);
    }
}

/// Answers a long-poll request on the core that owns its session: here, or over the
/// mesh.
pub(crate) async fn route(
    shard: &Rc<Shard>,
    core: Option<usize>,
    req: Request,
    body: Vec<u8>,
    peer: Option<std::net::SocketAddr>,
) -> Response {
    let mesh = shard.mesh();
    let remote = core.filter(|c| *c != shard.index && mesh.is_some_and(|m| *c < m.peers()));
    let (Some(core), Some(mesh)) = (remote, mesh) else {
        return handle(shard, req, body, peer).await;
    };
    let (tx, rx) = glommio::channels::local_channel::new_bounded(1);
    let id = HUB.with(|h| {
        let mut hub = h.borrow_mut();
        hub.next_forward += 1;
        let id = hub.next_forward;
        hub.forwarded.insert(id, tx);
        id
    });
    mesh.send_to(
        core,
        MeshMsg::LongPoll {
            origin: shard.index,
            id,
            req,
            body,
        },
    );
    let answer = futures_lite::future::or(async { rx.recv().await }, async {
        glommio::timer::sleep(POLL_WINDOW * 2).await;
        None
    })
    .await;
    HUB.with(|h| h.borrow_mut().forwarded.remove(&id));
    answer.unwrap_or_else(|| Response::json(504, r#"{"error":"the session's core did not answer"}"#))
}

/// A long-poll message from another core ([`Shard::handle_mesh`] hands them back): a
/// request for a session of this core, or the answer to one this core forwarded.
pub(crate) fn on_mesh(shard: &Rc<Shard>, msg: MeshMsg) {
    match msg {
        MeshMsg::LongPoll {
            origin,
            id,
            req,
            body,
        } => {
            let shard = shard.clone();
            glommio::spawn_local(async move {
                let response = handle(&shard, req, body, None).await;
                if let Some(mesh) = shard.mesh() {
                    mesh.send_to(origin, MeshMsg::LongPollReply { id, response });
                }
            })
            .detach();
        }
        MeshMsg::LongPollReply { id, response } => {
            if let Some(tx) = HUB.with(|h| h.borrow_mut().forwarded.remove(&id)) {
                let _ = tx.try_send(response);
            }
        }
        _ => debug_assert!(false, "not a long-poll message"),
    }
}

/// One long-poll session on its core.
pub(crate) struct LpSession {
    token: Box<str>,
    conn: Rc<Conn>,
    inbound: RefCell<VecDeque<Message>>,
    poller: RefCell<Option<Waker>>,
    last_poll: Cell<Instant>,
    polling: Cell<bool>,
    gone: Cell<bool>,
}

impl LpSession {
    fn wake_poller(&self) {
        if let Some(w) = self.poller.borrow_mut().take() {
            w.wake();
        }
    }

    /// Whether the session has gone unpolled past its expiry.
    pub(crate) fn expired(&self, now: Instant) -> bool {
        !self.polling.get() && now.duration_since(self.last_poll.get()) >= SESSION_EXPIRY
    }

    pub(crate) fn expire(&self) {
        self.conn.request_close(crate::proto::ws::close_code::GOING_AWAY);
    }
}

/// Runs a session's channel layer: inbound messages, handler futures, the mailbox.
struct Driver {
    lp: Rc<LpSession>,
    session: Session,
    shard: Rc<Shard>,
}

impl Future for Driver {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        this.lp.conn.set_waker(cx.waker());
        let lp = &this.lp;
        if let Turn::Closing(code) = this.session.turn(cx, || lp.inbound.borrow_mut().pop_front()) {
            let conn = &this.lp.conn;
            tracing::debug!(conn = ?conn.id, code, reason = conn.close_why.get().text(), "long-poll closed");
            this.lp.gone.set(true);
            this.session.finish();
            // What was queued before the close (a last reply, `phx_close`) is still
            // the client's: the session stays until a poll takes it (or it expires).
            if this.lp.conn.out.borrow().frames.is_empty() {
                remove_session(&this.shard, &this.lp.token);
            }
            this.lp.wake_poller();
            return Poll::Ready(());
        }
        if !this.lp.conn.out.borrow().frames.is_empty() {
            this.lp.wake_poller();
        }
        Poll::Pending
    }
}

fn status(status: u16, token: Option<&str>, messages: Option<&str>) -> Response {
    let mut body = format!("{{\"status\":{status}");
    if let Some(token) = token {
        body.push_str(",\"token\":");
        body.push_str(&serde_json::Value::from(token).to_string());
    }
    if let Some(messages) = messages {
        body.push_str(",\"messages\":");
        body.push_str(messages);
    }
    body.push('}');
    Response::json(200, body)
        .header("cache-control", "no-store")
        .header("access-control-allow-origin", "*")
}

/// The session token a request names: the header, else the last `token` param.
pub(crate) fn session_candidate(req: &Request, params: &[(String, String)]) -> Option<String> {
    req.header("x-phoenix-longpoll-token")
        .map(str::to_string)
        .or_else(|| {
            params
                .iter()
                .rev()
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.clone())
        })
}

/// The core a session token belongs to (`<core>.<random>`).
pub(crate) fn token_core(token: &str) -> Option<usize> {
    token.split_once('.')?.0.parse().ok()
}

/// Answers a long-poll request whose session (if any) is on this core.
/// Answers a long-poll request for a session of this core (or opens one); `peer` is the
/// TCP peer when the request came straight from it rather than over the mesh.
pub(crate) async fn handle(
    shard: &Rc<Shard>,
    req: Request,
    body: Vec<u8>,
    peer: Option<std::net::SocketAddr>,
) -> Response {
    let params = req.query_params();
    if req.method == "OPTIONS" {
        let allow = req
            .header("access-control-request-headers")
            .unwrap_or("")
            .to_string();
        return Response::new(200, "text/plain", "")
            .header("access-control-allow-origin", "*")
            .header("access-control-allow-headers", allow)
            .header("access-control-allow-methods", "get, post, options")
            .header("access-control-max-age", "3600");
    }
    let live = session_candidate(&req, &params).and_then(|t| session(&t));
    match (req.method.as_str(), live) {
        ("GET", Some(lp)) => poll(shard, lp).await,
        ("GET", None) => open(shard, &req, peer).await,
        ("POST", Some(lp)) => publish(shard, &lp, &req, &body),
        ("POST", None) => status(410, None, None),
        _ => Response::json(400, r#"{"error":"long-poll takes GET, POST and OPTIONS"}"#),
    }
}

/// The answer to a long-poll open that admission refused.
fn refused_answer(refused: Refused) -> Response {
    match refused {
        Refused::Forbidden => status(403, None, None),
        Refused::Crashed => status(500, None, None),
        Refused::ShuttingDown | Refused::Full | Refused::TimedOut => Response::json(
            503,
            r#"{"error":"server at its connection limit or shutting down"}"#,
        ),
    }
}

async fn open(shard: &Rc<Shard>, req: &Request, peer: Option<std::net::SocketAddr>) -> Response {
    let admitted = match super::admit(shard, req, peer).await {
        Ok(admitted) => admitted,
        Err(refused) => {
            // Never the URI or headers: they carry tokens.
            tracing::debug!(core = shard.index, ?peer, reason = ?refused, "long-poll refused");
            return refused_answer(refused);
        }
    };

    let mut random = [0u8; 16];
    getrandom::fill(&mut random).expect("the OS random source");
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let token: Box<str> = format!("{}.{hex}", shard.index).into();
    let conn = shard.add_conn(admitted.vsn, admitted.assigns, admitted.socket_id, true);
    // Not the session token: whoever has it can poll the session.
    tracing::debug!(core = shard.index, conn = ?conn.id, ?peer, "long-poll connected");
    let lp = Rc::new(LpSession {
        token: token.clone(),
        conn: conn.clone(),
        inbound: RefCell::default(),
        poller: RefCell::new(None),
        last_poll: Cell::new(Instant::now()),
        polling: Cell::new(false),
        gone: Cell::new(false),
    });
    insert_session(shard, token.clone(), lp.clone());
    glommio::spawn_local(Driver {
        lp,
        session: Session::new(shard.clone(), conn),
        shard: shard.clone(),
    })
    .detach();
    status(410, Some(&token), Some("[]"))
}

/// The JSON text of every queued text frame, as a JSON array of strings.
/// Also returns how many binary frames had to be answered or left out: binary has no
/// long-poll representation (Phoenix has none either), so a binary reply becomes an
/// error reply the client can see, and a binary push or broadcast is counted in
/// `/metrics` (`ringcast_longpoll_binary_total`).
fn take_messages(lp: &LpSession) -> (String, u64, u64, u64) {
    let mut out = lp.conn.out.borrow_mut();
    let mut json = String::from("[");
    let (mut frames, mut bytes, mut binary) = (0, 0, 0);
    let add = |json: &mut String, text: &str| {
        if json.len() > 1 {
            json.push(',');
        }
        json.push_str(&serde_json::Value::from(text).to_string());
    };
    for frame in out.frames.iter() {
        let data = frame.bytes();
        bytes += data.len() as u64;
        frames += 1;
        match split_frame(data) {
            Some((opcode::TEXT, payload)) => {
                if let Ok(text) = std::str::from_utf8(payload) {
                    add(&mut json, text);
                }
            }
            Some((opcode::BINARY, payload)) => {
                binary += 1;
                if let Some(reply) = binary_reply_as_error(payload) {
                    add(&mut json, &reply);
                }
            }
            _ => {}
        }
    }
    json.push(']');
    out.clear();
    (json, frames, bytes, binary)
}

/// A V2 binary reply (kind 1: join_ref, ref, topic, status) as the JSON text of an error
/// reply to the same ref, so that the long-poll client's push is answered.
fn binary_reply_as_error(frame: &[u8]) -> Option<String> {
    let (&kind, lens) = frame.split_first()?;
    if kind != 1 {
        return None;
    }
    let lens = lens.get(..4)?;
    let mut at = 5;
    let mut fields = Vec::with_capacity(3);
    for &len in &lens[..3] {
        let end = at + len as usize;
        fields.push(std::str::from_utf8(frame.get(at..end)?).ok()?);
        at = end;
    }
    fn opt(s: &str) -> Option<&str> {
        (!s.is_empty()).then_some(s)
    }
    let reply = serde_json::json!([
        opt(fields[0]),
        opt(fields[1]),
        fields[2],
        "phx_reply",
        {"status": "error", "response": {"reason": "binary payloads need the WebSocket transport"}}
    ]);
    Some(reply.to_string())
}

async fn poll(shard: &Shard, lp: Rc<LpSession>) -> Response {
    lp.polling.set(true);
    let ready = std::future::poll_fn(|cx| {
        if lp.gone.get() || !lp.conn.out.borrow().frames.is_empty() {
            return Poll::Ready(());
        }
        *lp.poller.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    });
    futures_lite::future::or(ready, glommio::timer::sleep(POLL_WINDOW)).await;
    lp.polling.set(false);
    lp.last_poll.set(Instant::now());
    let queued = !lp.conn.out.borrow().frames.is_empty();
    if lp.gone.get() {
        // A closed session hands out what it still holds, then is forgotten: the next
        // poll is a fresh connect (410 with a new token).
        remove_session(shard, &lp.token);
        if !queued {
            return status(410, None, None);
        }
    } else if !queued {
        return status(204, Some(&lp.token), Some("[]"));
    }
    let (messages, frames, bytes, binary) = take_messages(&lp);
    shard.stats.messages_out.add(frames);
    shard.stats.bytes_out.add(bytes);
    shard.stats.longpoll_binary.add(binary);
    status(200, Some(&lp.token), Some(&messages))
}

/// Decodes a POST body: ndjson of V2 text lines and base64 binary lines, or one message.
fn decode_body(vsn: Vsn, ndjson: bool, body: &[u8]) -> Result<Vec<Message>, String> {
    if !ndjson {
        let mut data = body.to_vec();
        return decode_text(vsn, &mut data)
            .map(|m| vec![m])
            .map_err(|e| e.to_string());
    }
    let text = std::str::from_utf8(body).map_err(|_| "body is not UTF-8".to_string())?;
    let mut messages = Vec::new();
    for line in text
        .split('\n')
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.is_empty())
        .take(MAX_LINES)
    {
        let msg = if line.starts_with('[') {
            let mut data = line.as_bytes().to_vec();
            decode_text(vsn, &mut data).map_err(|e| e.to_string())?
        } else {
            let data = STANDARD
                .decode(line)
                .map_err(|_| "line is neither JSON nor base64".to_string())?;
            decode_binary(vsn, &data).map_err(|e| e.to_string())?
        };
        messages.push(msg);
    }
    Ok(messages)
}

fn publish(shard: &Shard, lp: &LpSession, req: &Request, body: &[u8]) -> Response {
    if lp.gone.get() {
        return status(410, None, None);
    }
    let ndjson = req
        .header("content-type")
        .is_some_and(|t| t.starts_with("application/x-ndjson"));
    match decode_body(lp.conn.vsn, ndjson, body) {
        Ok(messages) if lp.inbound.borrow().len() + messages.len() > INBOUND_BOUND => {
            // Posted faster than the session handles them: close it, as a WebSocket
            // that floods is closed.
            lp.conn.close_why.set(crate::shard::conn::why::LONG_POLL_INBOUND);
            lp.conn.request_close(crate::proto::ws::close_code::POLICY);
            shard.stats.longpoll_inbound_closed.add(1);
            status(410, None, None)
        }
        Ok(messages) => {
            lp.inbound.borrow_mut().extend(messages);
            lp.conn.last_in.set(shard.now_ms());
            lp.conn.wake();
            status(200, None, None)
        }
        Err(why) => {
            let body = serde_json::json!({"status": 400, "error": format!("malformed message: {why}")});
            Response::json(400, body.to_string())
                .header("cache-control", "no-store")
                .header("access-control-allow-origin", "*")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_bodies() {
        let body =
            b"[\"1\",\"1\",\"rooms:a\",\"phx_join\",{}]\r\n[null,\"2\",\"phoenix\",\"heartbeat\",{}]\n";
        let msgs = decode_body(Vsn::V2, true, body).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[1].event, "heartbeat");
        let binary = STANDARD.encode([0u8, 1, 1, 1, 1, b'1', b'2', b't', b'e', 9]);
        let msgs = decode_body(Vsn::V2, true, binary.as_bytes()).unwrap();
        assert_eq!((msgs[0].topic.as_str(), msgs[0].event.as_str()), ("t", "e"));
        assert!(decode_body(Vsn::V2, true, b"!!not base64!!").is_err());
        assert!(decode_body(Vsn::V2, true, b"[1,2]").is_err());
        let many: String = (0..150)
            .map(|i| format!("[null,\"{i}\",\"phoenix\",\"heartbeat\",{{}}]\n"))
            .collect();
        assert_eq!(
            decode_body(Vsn::V2, true, many.as_bytes()).unwrap().len(),
            MAX_LINES
        );
        let v1 = br#"{"topic":"t","event":"e","payload":{},"ref":"1"}"#;
        assert_eq!(decode_body(Vsn::V1, false, v1).unwrap()[0].event, "e");
    }

    #[test]
    fn a_binary_reply_becomes_an_error_reply_to_its_ref() {
        let reply = [
            1, 1, 1, 7, 2, b'1', b'5', b'r', b'o', b'o', b'm', b's', b':', b'a', b'o', b'k', 9, 9,
        ];
        assert_eq!(
            binary_reply_as_error(&reply).unwrap(),
            r#"["1","5","rooms:a","phx_reply",{"response":{"reason":"binary payloads need the WebSocket transport"},"status":"error"}]"#
        );
        assert_eq!(
            binary_reply_as_error(&[0, 1, 1, 1, b'1', b't', b'e']),
            None,
            "a push is not a reply"
        );
        assert_eq!(binary_reply_as_error(&[1, 9, 9, 9, 9, b'x']), None, "truncated");
    }

    /// A session posted to faster than it handles its messages is closed at the bound
    /// with 410 and a count in /metrics; its queued messages stay, and another session
    /// on the core goes on.
    #[test]
    fn posting_past_the_inbound_bound_closes_only_that_session() {
        let shard = crate::bench_support::lone_shard(crate::shard::app::Config::default());
        let session = |token: &str| LpSession {
            token: token.into(),
            conn: shard.add_conn(Vsn::V2, Rc::new(()), None, true),
            inbound: RefCell::default(),
            poller: RefCell::new(None),
            last_poll: Cell::new(Instant::now()),
            polling: Cell::new(false),
            gone: Cell::new(false),
        };
        let (flooder, bystander) = (session("0.flood"), session("0.calm"));
        let (req, _) =
            Request::parse(b"POST /socket/longpoll HTTP/1.1\r\ncontent-type: application/x-ndjson\r\n\r\n")
                .unwrap()
                .unwrap();
        let lines: String = (0..MAX_LINES)
            .map(|i| format!("[null,\"{i}\",\"phoenix\",\"heartbeat\",{{}}]\n"))
            .collect();
        // Long-poll answers carry their status in the JSON body.
        let answer = |lp: &LpSession| {
            let body = publish(&shard, lp, &req, lines.as_bytes()).body;
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()["status"].clone()
        };
        // Nothing drains the queue here (no driver runs): the bound is what stops it.
        for _ in 0..INBOUND_BOUND / MAX_LINES {
            assert_eq!(answer(&flooder), 200);
        }
        assert_eq!(flooder.inbound.borrow().len(), INBOUND_BOUND);
        assert_eq!(answer(&flooder), 410);
        assert_eq!(shard.stats.longpoll_inbound_closed.get(), 1);
        assert_eq!(
            flooder.conn.close_why.get(),
            crate::shard::conn::why::LONG_POLL_INBOUND
        );
        assert_eq!(
            flooder.inbound.borrow().len(),
            INBOUND_BOUND,
            "what it queued stays queued"
        );

        assert_eq!(answer(&bystander), 200);
        assert_eq!(bystander.inbound.borrow().len(), MAX_LINES);
        assert_eq!(
            shard.stats.longpoll_inbound_closed.get(),
            1,
            "the bystander is not closed"
        );
    }

    #[test]
    fn token_cores() {
        assert_eq!(token_core("3.abcdef"), Some(3));
        assert_eq!(token_core("abcdef"), None);
        assert_eq!(token_core("x.abcdef"), None);
    }

    #[test]
    fn status_bodies() {
        assert_eq!(
            status(410, Some("0.ab"), Some("[]")).body,
            br#"{"status":410,"token":"0.ab","messages":[]}"#
        );
        assert_eq!(status(403, None, None).body, br#"{"status":403}"#);
    }
}
