//! The channel layer of one connection: routes each client message (PROTOCOL.md §7),
//! runs joins and handlers, sends replies, `phx_close` and `phx_error`, and cleans up
//! when the connection ends. Transport-agnostic: the WebSocket driver and the in-memory
//! test kit both run a `Session`.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::task::{Context, Poll};

use crate::proto::position::Position;
use crate::proto::serializer::{encode, Body, Outgoing};
use crate::proto::socket::Route;
use crate::proto::{Message, Payload, Ref};
use crate::shard::api::channel::{HandleResult, Handled, Joined, LocalFuture, Reply, StopReason};
use crate::shard::api::socket::Socket;
use crate::shard::conn::{Conn, Mail, OutFrame, Slot};
use crate::shard::recovery::Recovery;
use crate::shard::{Shard, Sub};

/// Most channels one connection may join (Phoenix's default).
pub(crate) const MAX_CHANNELS: usize = 100;

enum Pending {
    /// A join is done but its answer waits until every core forwards the topic here.
    Barrier {
        ack: u64,
        frames: Vec<OutFrame>,
        /// When the join came in (Unix µs).
        started_us: u64,
    },
    /// A join on a topic with history waits for the topic's owner core (or Redis) to
    /// answer.
    Recover { done: Rc<Cell<bool>>, started_us: u64 },
    Join {
        started_us: u64,
        fut: LocalFuture<Joined>,
        msg_ref: Option<Ref>,
        replaced: Option<Ref>,
        intercepts: &'static [&'static str],
        topic: Rc<str>,
        join_ref: Ref,
        /// On a topic with history: the join's `since`, if it gave one.
        history: Option<Option<Position>>,
    },
    Run {
        fut: LocalFuture<Handled>,
        msg_ref: Option<Ref>,
        topic: Rc<str>,
        join_ref: Ref,
    },
}

/// The `since` of a join on a topic with history: none, a position, or `Err` for
/// anything else (answered `{"reason":"invalid"}`).
fn since(payload: &Payload) -> Result<Option<Position>, ()> {
    match payload.json().and_then(|p| p.get("since")) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Position::parse(s).map(Some).ok_or(()),
        Some(_) => Err(()),
    }
}

/// Polls a handler future; a panic inside it is `Ready(None)` (the channel crashed).
fn poll_caught<T>(fut: &mut LocalFuture<T>, cx: &mut Context<'_>) -> Poll<Option<T>> {
    match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
        Ok(Poll::Pending) => Poll::Pending,
        Ok(Poll::Ready(value)) => Poll::Ready(Some(value)),
        Err(_) => Poll::Ready(None),
    }
}

/// How a [`Session::turn`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Turn {
    /// A handler is pending; it wakes the driver when it can go on.
    Busy,
    /// Nothing left to do until the driver is woken (new input, mail, a close).
    Idle,
    /// The connection is to close with this code.
    Closing(u16),
}

/// A channel as the connection's table holds it.
type ChannelEntry = crate::proto::socket::Joined<Slot>;

pub(crate) struct Session {
    pub(crate) conn: Rc<Conn>,
    pub(crate) shard: Rc<Shard>,
    /// Boxed: only a connection with a handler in flight pays for it.
    pending: Option<Box<Pending>>,
}

impl Session {
    pub(crate) fn new(shard: Rc<Shard>, conn: Rc<Conn>) -> Self {
        Session {
            conn,
            shard,
            pending: None,
        }
    }

    /// One turn of the session, in the order every driver keeps (the WebSocket pump,
    /// long-poll and the test kit all go through here):
    /// 1. poll the pending handler (join, `handle_in` or `handle_info`), if any;
    /// 2. while none is pending, run the mailbox (intercepted broadcasts, `handle_info`);
    /// 3. a close requested by anyone ends the turn: [`Turn::Closing`];
    /// 4. while no handler is pending, hand it the client's next messages from `next`,
    ///    one at a time, until `next` has none: [`Turn::Idle`].
    ///
    /// A turn that leaves a handler pending answers [`Turn::Busy`]; the waker of `cx`
    /// is woken when it can go on. The driver registers that waker with the connection
    /// ([`Conn::set_waker`]) before the turn, and runs [`Session::finish`] once it is
    /// done with a closing connection.
    pub(crate) fn turn(&mut self, cx: &mut Context<'_>, mut next: impl FnMut() -> Option<Message>) -> Turn {
        loop {
            if self.busy() {
                self.poll_pending(cx);
            }
            if !self.busy() {
                self.run_mailbox(cx);
            }
            if let Some(code) = self.conn.close.get() {
                return Turn::Closing(code);
            }
            if self.busy() {
                return Turn::Busy;
            }
            match next() {
                Some(msg) => self.handle_message(msg, cx),
                None => return Turn::Idle,
            }
        }
    }

    /// A handler is running; the connection should not read more messages.
    pub(crate) fn busy(&self) -> bool {
        self.pending.is_some()
    }

    fn send(&self, msg: Outgoing<'_>) {
        match encode(self.conn.vsn, &msg) {
            Ok(frame) => self.conn.enqueue_own(frame),
            Err(e) => tracing::debug!(topic = msg.topic, event = msg.event, "message dropped: {e}"),
        }
    }

    fn reply(&self, join_ref: Option<&Ref>, msg_ref: Option<&Ref>, topic: &str, reply: &Reply) {
        let (status, response) = reply.parts();
        self.send(Outgoing::reply(join_ref, msg_ref, topic, status, response));
    }

    fn control(&self, join_ref: &Ref, topic: &str, event: &str, payload: &Payload) {
        self.send(Outgoing {
            join_ref: Some(join_ref),
            msg_ref: Some(join_ref),
            topic,
            event,
            body: Body::Payload(payload),
        });
    }

    /// The `phx_close` frame of the channel `old` on `topic` (a join replaced it).
    fn close_frame(&self, topic: &str, old: &Ref) -> Option<bytes::Bytes> {
        let close = Payload::empty();
        let msg = Outgoing {
            join_ref: Some(old),
            msg_ref: Some(old),
            topic,
            event: "phx_close",
            body: Body::Payload(&close),
        };
        encode(self.conn.vsn, &msg).ok()
    }

    /// Puts the joined channel in its connection's table; returns what its `join`
    /// pushed, to be sent after the reply.
    fn install(
        &self,
        topic: &Rc<str>,
        join_ref: &Ref,
        channel: Box<dyn crate::shard::api::channel::DynChannel>,
        mut socket: Socket,
    ) -> Vec<OutFrame> {
        let deferred = socket.deferred.take().unwrap_or_default();
        self.conn.channels.borrow_mut().insert(
            topic.clone(),
            join_ref.clone(),
            Slot {
                running: Some((channel, socket)),
                sub_pos: Cell::new(0),
            },
        );
        deferred
    }

    /// Answers a join that did not make a channel with the error `reply`; the channel it
    /// was to replace (ended when the rejoin began) gets its `phx_close`.
    fn refuse_join(
        &self,
        join_ref: Option<&Ref>,
        msg_ref: Option<&Ref>,
        topic: &str,
        reply: &Reply,
        replaced: Option<&Ref>,
    ) {
        self.reply(join_ref, msg_ref, topic, reply);
        if let Some(old) = replaced {
            self.control(old, topic, "phx_close", &Payload::empty());
        }
    }

    /// Handles one decoded client message; a handler that does not finish at once stays
    /// pending (see [`Session::busy`]).
    pub(crate) fn handle_message(&mut self, msg: Message, cx: &mut Context<'_>) {
        debug_assert!(!self.busy());
        self.shard.stats.messages_in.add(1);
        if !self.conn.take_token(self.shard.now_ms()) {
            return;
        }
        let route = self
            .conn
            .channels
            .borrow()
            .route(msg.join_ref.as_ref(), &msg.topic, &msg.event);
        match route {
            Route::Heartbeat => self.reply(None, msg.msg_ref.as_ref(), "phoenix", &Reply::ok()),
            Route::LeaveUnjoined => self.reply(
                msg.join_ref.as_ref(),
                msg.msg_ref.as_ref(),
                &msg.topic,
                &Reply::ok(),
            ),
            Route::Unmatched => self.reply(
                None,
                msg.msg_ref.as_ref(),
                &msg.topic,
                &Reply::error("unmatched topic"),
            ),
            Route::Stale => {}
            Route::Join => self.start_join(msg, None, cx),
            Route::Rejoin(index) => {
                let (_, old_join_ref) = self.end_channel(index, StopReason::Rejoined);
                self.start_join(msg, Some(old_join_ref), cx);
            }
            Route::Deliver(index) if msg.event == "phx_leave" => {
                let join_ref = self.conn.channels.borrow().get(index).join_ref.clone();
                self.reply(Some(&join_ref), msg.msg_ref.as_ref(), &msg.topic, &Reply::ok());
                let (topic, join_ref) = self.end_channel(index, StopReason::Leave);
                self.control(&join_ref, &topic, "phx_close", &Payload::empty());
            }
            Route::Deliver(index) => {
                let running = self.take_running(index);
                let Some((channel, socket)) = running else {
                    return;
                };
                let (topic, join_ref) = (socket.topic.clone(), socket.join_ref.clone());
                let fut = channel.handle_in(msg.event, msg.payload, socket);
                self.pending = Some(Box::new(Pending::Run {
                    fut,
                    msg_ref: msg.msg_ref,
                    topic,
                    join_ref,
                }));
                self.poll_pending(cx);
            }
        }
    }

    /// Moves the channel at `index` and its socket out of their slot while a handler
    /// runs (`None` if a handler already has them).
    fn take_running(
        &self,
        index: usize,
    ) -> Option<(Box<dyn crate::shard::api::channel::DynChannel>, Socket)> {
        self.conn
            .channels
            .borrow_mut()
            .get_mut(index)
            .state
            .running
            .take()
    }

    fn start_join(&mut self, msg: Message, replaced: Option<Ref>, cx: &mut Context<'_>) {
        let join_ref = msg
            .join_ref
            .clone()
            .or_else(|| msg.msg_ref.clone())
            .unwrap_or_else(Ref::null);
        let refuse = |this: &Self, reason: &str| {
            let reply = Reply::error(reason);
            this.refuse_join(None, msg.msg_ref.as_ref(), &msg.topic, &reply, replaced.as_ref());
        };
        let app = self.shard.app.clone();
        let Some(route) = app.router.find(&msg.topic) else {
            return refuse(self, "unmatched topic");
        };
        if self.conn.channels.borrow().len() >= MAX_CHANNELS {
            return refuse(self, "too many channels joined");
        }
        let history = match self.shard.history_of(&msg.topic) {
            None => None,
            Some(_) => match since(&msg.payload) {
                Ok(since) => Some(since),
                Err(()) => {
                    let reply = Reply::error("invalid");
                    let topic = &msg.topic;
                    return self.refuse_join(
                        Some(&join_ref),
                        msg.msg_ref.as_ref(),
                        topic,
                        &reply,
                        replaced.as_ref(),
                    );
                }
            },
        };
        let topic: Rc<str> = msg.topic.as_str().into();
        let socket = Socket::new(
            self.conn.clone(),
            self.shard.clone(),
            topic.clone(),
            join_ref.clone(),
        );
        let fut = (route.join)(msg.topic, msg.payload, socket);
        self.pending = Some(Box::new(Pending::Join {
            started_us: crate::clock::unix_nanos() / 1000,
            fut,
            msg_ref: msg.msg_ref,
            replaced,
            intercepts: route.intercepts,
            topic,
            join_ref,
            history,
        }));
        self.poll_pending(cx);
    }

    /// Drives a pending join or handler; returns whether one is still pending.
    pub(crate) fn poll_pending(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(pending) = self.pending.as_deref_mut() else {
            return false;
        };
        match pending {
            Pending::Barrier { ack, .. } => {
                if !self.shard.poll_interest_acked(*ack, cx) {
                    return true;
                }
                let Some(Pending::Barrier {
                    frames, started_us, ..
                }) = self.pending.take().map(|p| *p)
                else {
                    unreachable!("matched above")
                };
                for frame in frames {
                    self.conn.enqueue(frame);
                }
                self.joined_in(started_us);
            }
            Pending::Recover { done, started_us } => {
                if !done.get() {
                    return true;
                }
                let started_us = *started_us;
                self.pending = None;
                self.joined_in(started_us);
            }
            Pending::Join { fut, .. } => {
                let Poll::Ready(outcome) = poll_caught(fut, cx) else {
                    return true;
                };
                let Some(Pending::Join {
                    msg_ref,
                    replaced,
                    intercepts,
                    topic,
                    join_ref,
                    history,
                    started_us,
                    ..
                }) = self.pending.take().map(|p| *p)
                else {
                    unreachable!("matched above")
                };
                match outcome {
                    Some(joined) => {
                        self.finish_join(joined, msg_ref, replaced, intercepts, history, started_us)
                    }
                    None => {
                        tracing::warn!(%topic, "join handler crashed");
                        let reply = Reply::error("join crashed");
                        self.refuse_join(
                            Some(&join_ref),
                            msg_ref.as_ref(),
                            &topic,
                            &reply,
                            replaced.as_ref(),
                        );
                    }
                }
            }
            Pending::Run { fut, .. } => {
                let Poll::Ready(outcome) = poll_caught(fut, cx) else {
                    return true;
                };
                let Some(Pending::Run {
                    msg_ref,
                    topic,
                    join_ref,
                    ..
                }) = self.pending.take().map(|p| *p)
                else {
                    unreachable!("matched above")
                };
                match outcome {
                    Some((channel, socket, result)) => self.finish_run(channel, socket, result, msg_ref),
                    None => self.crash(&topic, &join_ref),
                }
            }
        }
        false
    }

    fn finish_join(
        &mut self,
        (socket, result): Joined,
        msg_ref: Option<Ref>,
        replaced: Option<Ref>,
        intercepts: &'static [&'static str],
        history: Option<Option<Position>>,
        started_us: u64,
    ) {
        let topic = socket.topic.clone();
        let join_ref = socket.join_ref.clone();
        match result {
            Ok((channel, response)) if history.is_some() => {
                let deferred = self.install(&topic, &join_ref, channel, socket);
                self.shard.stats.channels.add(1);
                let closed_old = replaced.as_ref().and_then(|old| self.close_frame(&topic, old));
                let done = Rc::new(Cell::new(false));
                let job = Recovery {
                    conn: self.conn.clone(),
                    topic,
                    join_ref,
                    msg_ref,
                    response,
                    since: history.flatten(),
                    closed_old,
                    deferred,
                    intercepts,
                    done: done.clone(),
                };
                if self.shard.recover(job) {
                    self.joined_in(started_us);
                } else {
                    self.pending = Some(Box::new(Pending::Recover { done, started_us }));
                }
            }
            Ok((channel, response)) => {
                let deferred = self.install(&topic, &join_ref, channel, socket);
                let sub = Sub {
                    conn: self.conn.clone(),
                    vsn: self.conn.vsn,
                    intercepts,
                };
                let ack = self.shard.subscribe(&topic, sub);
                self.shard.stats.channels.add(1);
                self.shard.stats.joins.add(1);
                let mut frames = Vec::with_capacity(2 + deferred.len());
                let reply = Reply::Ok(response);
                let (status, response) = reply.parts();
                let answer = Outgoing::reply(Some(&join_ref), msg_ref.as_ref(), &topic, status, response);
                frames.extend(encode(self.conn.vsn, &answer).ok().map(OutFrame::Own));
                let closed_old = replaced.as_ref().and_then(|old| self.close_frame(&topic, old));
                frames.extend(closed_old.map(OutFrame::Own));
                frames.extend(deferred);
                match ack {
                    Some(ack) => {
                        self.pending = Some(Box::new(Pending::Barrier {
                            ack,
                            frames,
                            started_us,
                        }))
                    }
                    None => {
                        frames.into_iter().for_each(|f| self.conn.enqueue(f));
                        self.joined_in(started_us);
                    }
                }
            }
            Err(response) => {
                let reply = Reply::Error(response);
                self.refuse_join(
                    Some(&join_ref),
                    msg_ref.as_ref(),
                    &topic,
                    &reply,
                    replaced.as_ref(),
                );
            }
        }
    }

    fn finish_run(
        &mut self,
        channel: Box<dyn crate::shard::api::channel::DynChannel>,
        socket: Socket,
        result: HandleResult,
        msg_ref: Option<Ref>,
    ) {
        let topic = socket.topic.clone();
        let join_ref = socket.join_ref.clone();
        let index = {
            let mut channels = self.conn.channels.borrow_mut();
            let index = channels
                .position(&topic)
                .filter(|i| channels.get(*i).join_ref == join_ref);
            if let Some(i) = index {
                channels.get_mut(i).state.running = Some((channel, socket));
            }
            index
        };
        let Some(index) = index else { return };
        match result {
            HandleResult::Reply(reply) => {
                if msg_ref.is_some() {
                    self.reply(Some(&join_ref), msg_ref.as_ref(), &topic, &reply);
                }
            }
            HandleResult::NoReply => {}
            HandleResult::Stop(reply) => {
                if let (Some(reply), Some(_)) = (&reply, &msg_ref) {
                    self.reply(Some(&join_ref), msg_ref.as_ref(), &topic, reply);
                }
                self.end_channel(index, StopReason::Normal);
                self.control(&join_ref, &topic, "phx_close", &Payload::empty());
            }
        }
    }

    /// A join that came in at `started_us` was answered ok just now.
    fn joined_in(&self, started_us: u64) {
        let now = crate::clock::unix_nanos() / 1000;
        self.shard
            .stats
            .join_latency
            .observe_us(now.saturating_sub(started_us));
    }

    /// Removes the channel at `index`, calls its `terminate`, unsubscribes it.
    fn end_channel(&mut self, index: usize, reason: StopReason) -> (Rc<str>, Ref) {
        let joined = self.conn.channels.borrow_mut().remove(index);
        self.release(joined, Some(reason))
    }

    /// Lets go of a channel taken out of the table: its `terminate` with `reason` (none
    /// for a channel that crashed), its presences on the topic, its subscription.
    fn release(&self, joined: ChannelEntry, reason: Option<StopReason>) -> (Rc<str>, Ref) {
        let sub_pos = joined.state.sub_pos.get();
        if let (Some(reason), Some((mut channel, mut socket))) = (reason, joined.state.running) {
            if catch_unwind(AssertUnwindSafe(|| channel.terminate(reason, &mut socket))).is_err() {
                tracing::warn!(topic = %joined.topic, "terminate crashed");
            }
        }
        self.shard.presence_untrack(&self.conn, &joined.topic, None);
        self.shard.unsubscribe(&joined.topic, self.conn.id, sub_pos);
        self.shard.stats.channels.sub(1);
        (joined.topic, joined.join_ref)
    }

    /// A handler panicked: drop the channel and tell the client with `phx_error`.
    fn crash(&mut self, topic: &str, join_ref: &Ref) {
        tracing::warn!(topic, "channel crashed");
        let index = {
            let channels = self.conn.channels.borrow();
            channels
                .position(topic)
                .filter(|i| channels.get(*i).join_ref == *join_ref)
        };
        if let Some(index) = index {
            let joined = self.conn.channels.borrow_mut().remove(index);
            self.release(joined, None);
        }
        let payload = Payload::Json(serde_json::json!({"reason": "channel_crash"}));
        self.control(join_ref, topic, "phx_error", &payload);
    }

    /// Runs queued intercepted broadcasts and `handle_info` messages while no handler
    /// is pending.
    pub(crate) fn run_mailbox(&mut self, cx: &mut Context<'_>) {
        while !self.busy() {
            let Some(mail) = self.conn.next_mail() else {
                return;
            };
            match mail {
                Mail::Out(b) => {
                    let index = self.conn.channels.borrow().position(&b.topic);
                    let Some(index) = index else { continue };
                    let running = self.take_running(index);
                    let Some((mut channel, mut socket)) = running else {
                        continue;
                    };
                    socket.deferred = None;
                    socket.position = b.position.map(|p| p.to_ref());
                    let ok = catch_unwind(AssertUnwindSafe(|| {
                        channel.handle_out(&b.event, b.payload(), &mut socket)
                    }));
                    socket.position = None;
                    let (topic, join_ref) = (socket.topic.clone(), socket.join_ref.clone());
                    self.conn.channels.borrow_mut().get_mut(index).state.running = Some((channel, socket));
                    if ok.is_err() {
                        self.crash(&topic, &join_ref);
                    }
                }
                Mail::Frame(frame) => self.conn.enqueue(frame),
                Mail::Info(topic, join_ref, msg) => {
                    let running = {
                        let mut channels = self.conn.channels.borrow_mut();
                        match channels.position(&topic) {
                            Some(i) if channels.get(i).join_ref == join_ref => {
                                channels.get_mut(i).state.running.take()
                            }
                            _ => None,
                        }
                    };
                    let Some((channel, socket)) = running else {
                        continue;
                    };
                    let fut = channel.handle_info(msg, socket);
                    self.pending = Some(Box::new(Pending::Run {
                        fut,
                        msg_ref: None,
                        topic,
                        join_ref,
                    }));
                    self.poll_pending(cx);
                }
            }
        }
    }

    /// The connection ended: every channel terminates, subscriptions go.
    pub(crate) fn finish(&mut self) {
        if self.conn.close_why.get() == crate::shard::conn::why::MAILBOX {
            self.shard.stats.mailbox_closed.add(1);
        }
        self.pending = None;
        self.conn.clear_mail();
        self.shard.presence_untrack_all(&self.conn);
        let joined: Vec<_> = self.conn.channels.borrow_mut().drain().collect();
        for j in joined {
            self.release(j, Some(StopReason::Closed));
        }
        self.shard.remove_conn(&self.conn);
    }
}
