//! One shard per core: its connections, its topic table (topic -> local subscribers),
//! which other cores have subscribers for a topic, and the fanout of broadcasts.
//!
//! A broadcast is encoded once into a finished WebSocket frame ([`Broadcast`]), shared
//! with other cores as an `Arc` over the SPSC mesh, and wrapped once per core in an `Rc`
//! whose (non-atomic) clones go to every local subscriber's queue. Nothing here is
//! shared between threads except that `Arc` and the per-core inboxes.

pub(crate) mod acks;
pub(crate) mod admission;
pub mod api;
pub mod app;
pub mod cluster;
pub mod conn;
pub(crate) mod history;
pub(crate) mod inbox;
pub(crate) mod listeners;
pub(crate) mod mesh;
pub(crate) mod presence;
pub(crate) mod recovery;
pub(crate) mod session;
pub mod stats;
pub(crate) mod timers;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use slab::Slab;

use crate::clock::Clock;
use crate::proto::position::Position;
use crate::proto::serializer::{encode, Body, EncodeError, Outgoing};
use crate::proto::ws::{close_code, deflate};
use crate::proto::{Payload, Vsn};
use crate::shard::api::endpoint::Endpoint;
use app::App;
use conn::{Conn, ConnId, ConnLimits, Mail, OutFrame};
use mesh::{Mesh, MeshMsg};

/// A broadcast, encoded once: the V2 frame eagerly, the V1 frame the first time a V1
/// subscriber needs it. On a topic with history it carries its position in the frames'
/// `ref` slot.
pub struct Broadcast {
    pub(crate) topic: Box<str>,
    pub(crate) event: Box<str>,
    payload: OnceLock<Payload>,
    /// The payload as JSON text, when it was built as text (presence).
    raw: Option<Box<str>>,
    v2: Result<Bytes, EncodeError>,
    v1: OnceLock<Result<Bytes, EncodeError>>,
    /// `broadcast_from`: the (shard, connection) that must not receive it.
    pub(crate) from: Option<(usize, ConnId)>,
    /// Its place in the topic's history, which the frames carry in their `ref` slot.
    pub(crate) position: Option<Position>,
    /// When it was accepted (Unix µs): the start of `ringcast_fanout_seconds`.
    pub(crate) accepted_us: u64,
}

impl Broadcast {
    pub(crate) fn new(topic: &str, event: &str, payload: Payload, from: Option<(usize, ConnId)>) -> Self {
        let v2 = encode(Vsn::V2, &Outgoing::broadcast(topic, event, &payload));
        Self::encoded(topic, event, payload, from, None, v2)
    }

    /// A broadcast of `payload` whose V2 frame is `v2`, accepted now.
    fn encoded(
        topic: &str,
        event: &str,
        payload: Payload,
        from: Option<(usize, ConnId)>,
        position: Option<Position>,
        v2: Result<Bytes, EncodeError>,
    ) -> Self {
        Broadcast {
            topic: topic.into(),
            event: event.into(),
            payload: OnceLock::from(payload),
            raw: None,
            v2,
            v1: OnceLock::new(),
            from,
            position,
            accepted_us: crate::clock::unix_nanos() / 1000,
        }
    }

    /// A broadcast at `position` in its topic's history: the position goes in the
    /// frames' `ref` slot (a JSON payload's; binary frames have no such slot).
    pub(crate) fn at(
        topic: &str,
        event: &str,
        payload: Payload,
        from: Option<(usize, ConnId)>,
        position: Position,
    ) -> Self {
        let pos_ref = position.to_ref();
        let msg = Outgoing {
            msg_ref: Some(&pos_ref),
            ..Outgoing::broadcast(topic, event, &payload)
        };
        let v2 = encode(Vsn::V2, &msg);
        Self::encoded(topic, event, payload, from, Some(position), v2)
    }

    /// A broadcast whose payload is already JSON text.
    pub(crate) fn raw(topic: &str, event: &str, json: String) -> Self {
        let raw = json.into_boxed_str();
        let v2 = encode(Vsn::V2, &Self::raw_outgoing(topic, event, &raw));
        Broadcast {
            topic: topic.into(),
            event: event.into(),
            payload: OnceLock::new(),
            raw: Some(raw),
            v2,
            v1: OnceLock::new(),
            from: None,
            position: None,
            accepted_us: crate::clock::unix_nanos() / 1000,
        }
    }

    fn raw_outgoing<'a>(topic: &'a str, event: &'a str, raw: &'a str) -> Outgoing<'a> {
        Outgoing {
            join_ref: None,
            msg_ref: None,
            topic,
            event,
            body: Body::RawJson(raw),
        }
    }

    /// The payload (parsed on first use when the broadcast was built as text).
    pub(crate) fn payload(&self) -> &Payload {
        self.payload.get_or_init(|| {
            let raw = self.raw.as_deref().unwrap_or("null");
            Payload::Json(serde_json::from_str(raw).unwrap_or(serde_json::Value::Null))
        })
    }

    fn frame(&self, vsn: Vsn) -> Option<&Bytes> {
        let frame = match vsn {
            Vsn::V2 => &self.v2,
            Vsn::V1 => self.v1.get_or_init(|| match &self.raw {
                Some(raw) => encode(Vsn::V1, &Self::raw_outgoing(&self.topic, &self.event, raw)),
                None => encode(
                    Vsn::V1,
                    &Outgoing {
                        msg_ref: self.position.map(|p| p.to_ref()).as_ref(),
                        ..Outgoing::broadcast(&self.topic, &self.event, self.payload())
                    },
                ),
            }),
        };
        frame.as_ref().ok()
    }
}

/// One channel subscribed to a topic: it takes the fastlane frame, or goes through
/// `handle_out` for the events it intercepts. It holds its connection directly: fanout
/// touches the connection and nothing else per subscriber.
///
/// Socket ids are not subscriptions: a `disconnect` broadcast reaches every core and
/// node, and each core looks for connections with that id ([`Shard::disconnect`]), so an
/// idle connection costs no topic entry, no interest announcement and no Redis
/// subscription for its id.
#[derive(Clone)]
pub(crate) struct Sub {
    pub(crate) conn: Rc<Conn>,
    pub(crate) vsn: Vsn,
    pub(crate) intercepts: &'static [&'static str],
}

/// How long a first join waits for every core to ack its interest before it is answered
/// anyway (a core that died or is wedged must not hold joins forever).
pub(crate) const INTEREST_ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a WebSocket must have sent nothing before its pump parks it.
pub(crate) const PARK_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// The event that closes every connection whose socket id is the topic.
pub(crate) const DISCONNECT: &str = "disconnect";

pub(crate) struct Shard {
    pub(crate) index: usize,
    pub(crate) app: Arc<App>,
    pub(crate) endpoint: Endpoint,
    pub(crate) stats: Arc<stats::CoreStats>,
    clock: Clock,
    timers: timers::Timers,
    next_gen: Cell<u32>,
    conns: RefCell<Slab<Rc<Conn>>>,
    topics: RefCell<HashMap<Box<str>, Vec<Sub>>>,
    /// Rust subscriptions and channels listening to topics they did not join.
    listeners: RefCell<HashMap<Box<str>, Vec<listeners::Listener>>>,
    mesh: Option<Mesh>,
    /// First joins waiting for their topic's interest to be acked.
    acks: acks::Acks,
    presence: presence::PresenceHub,
    /// Connections with broadcast frames for the flusher, and the flusher's waker.
    dirty: RefCell<Vec<Rc<Conn>>>,
    flusher: RefCell<Option<std::task::Waker>>,
    /// When the oldest broadcast waiting for the flusher was accepted (Unix µs; 0: none).
    fanout_since: Cell<u64>,
    /// Set once shutdown began; wakes the accept loop.
    stopping: Cell<bool>,
    /// The first slab key the drain has not asked to go yet.
    drain_next: Cell<usize>,
    stop_waker: RefCell<Option<std::task::Waker>>,
    /// The histories of the topics this core owns ([`history`]).
    histories: RefCell<HashMap<Box<str>, history::Ring<Arc<Broadcast>>>>,
    /// Epochs this core made so far.
    epochs_made: Cell<u64>,
    /// Joins waiting for their topic's owner core, by fetch id, and the next id.
    awaiting: RefCell<HashMap<u64, recovery::Recovery>>,
    next_fetch: Cell<u64>,
    /// Topics with joins waiting for their owner's answer: they count as subscribed,
    /// so that the owner forwards the topic here from the fetch on.
    held: RefCell<HashMap<Box<str>, u32>>,
    /// Cluster mode: answered joins subscribed once the topic's broadcasts pass the
    /// position their replay ended at.
    admitting: RefCell<HashMap<Box<str>, Vec<recovery::Admit>>>,
}

/// Keeps a subscription's position where its owner can find it.
fn record_position(sub: &Sub, topic: &str, pos: u32) {
    let channels = sub.conn.channels.borrow();
    if let Some(i) = channels.position(topic) {
        channels.get(i).state.sub_pos.set(pos);
    }
}

thread_local! {
    /// The shard whose core runs on this thread, while one is entered ([`Shard::enter`]).
    static CURRENT: RefCell<Option<Rc<Shard>>> = const { RefCell::new(None) };
}

/// Code that needs a shard ran on a thread that runs none (not a core of a running
/// server, nor a test kit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not on a core of a running ringcast server")]
pub struct NotOnACore;

/// The shard entered on this thread.
pub(crate) fn current() -> Result<Rc<Shard>, NotOnACore> {
    CURRENT.with(|c| c.borrow().clone()).ok_or(NotOnACore)
}

/// While it lives, [`current`] answers its shard on this thread; dropping it restores
/// whatever was entered before (tokio's `SetCurrentGuard` pattern).
#[must_use = "the shard is current only while the guard lives"]
pub(crate) struct Entered {
    previous: Option<Rc<Shard>>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}

impl Shard {
    /// A core's state. Nothing is installed anywhere: the caller drives it, and enters
    /// it ([`Shard::enter`]) on the thread that runs it if code there must find it
    /// without a handle (the [`Endpoint`]'s on-core fast path).
    pub(crate) fn new(
        index: usize,
        app: Arc<App>,
        endpoint: Endpoint,
        mesh: Option<Mesh>,
        clock: Clock,
    ) -> Rc<Shard> {
        Rc::new(Shard {
            index,
            app: app.clone(),
            endpoint,
            stats: app.stats[index % app.stats.len()].clone(),
            clock,
            timers: timers::Timers::default(),
            next_gen: Cell::new(0),
            conns: RefCell::default(),
            topics: RefCell::default(),
            listeners: RefCell::default(),
            mesh,
            acks: acks::Acks::default(),
            presence: presence::PresenceHub::new(),
            dirty: RefCell::default(),
            flusher: RefCell::new(None),
            fanout_since: Cell::new(0),
            stopping: Cell::new(false),
            drain_next: Cell::new(0),
            stop_waker: RefCell::new(None),
            histories: RefCell::default(),
            epochs_made: Cell::new(0),
            awaiting: RefCell::default(),
            next_fetch: Cell::new(0),
            held: RefCell::default(),
            admitting: RefCell::default(),
        })
    }

    /// Makes this the thread's current shard until the guard drops.
    pub(crate) fn enter(self: &Rc<Self>) -> Entered {
        let previous = CURRENT.with(|c| c.borrow_mut().replace(self.clone()));
        Entered { previous }
    }

    /// The shard's clock in milliseconds, wrapping (idle timeouts and rate limits;
    /// compare with `wrapping_sub`).
    pub(crate) fn now_ms(&self) -> u32 {
        self.clock.now_ms() as u32
    }

    /// The clock this shard was given.
    pub(crate) fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Runs `action` on this shard once `delay` has passed on its clock, when the
    /// driver next calls [`Shard::handle_timeout`].
    pub(crate) fn after(&self, delay: Duration, action: timers::Action) {
        self.timers
            .add(self.clock.now_ms() + delay.as_millis() as u64, action);
    }

    /// The earliest timer deadline (the shard's clock, ms), if any. `waker` is woken
    /// when an earlier one is added.
    ///
    /// The call order for a timer driver: `poll_timeout`; sleep until the deadline or
    /// the wake-up; `handle_timeout(now)`; again.
    pub(crate) fn poll_timeout(&self, waker: &std::task::Waker) -> Option<u64> {
        self.timers.poll_timeout(waker)
    }

    /// Fires every timer due at `now_ms`; returns how many ran. Timers their actions
    /// add run at the next call, even if already due.
    pub(crate) fn handle_timeout(&self, now_ms: u64) -> usize {
        let due = self.timers.take_due(now_ms);
        let n = due.len();
        for action in due {
            action(self);
        }
        n
    }

    /// Timers waiting to fire.
    #[cfg(test)]
    pub(crate) fn timers_pending(&self) -> usize {
        self.timers.len()
    }

    /// Registers a connection that passed its handshake.
    pub(crate) fn add_conn(
        &self,
        vsn: Vsn,
        assigns: Rc<dyn std::any::Any>,
        socket_id: Option<String>,
        long_poll: bool,
    ) -> Rc<Conn> {
        let gen = self.next_gen.get().wrapping_add(1);
        self.next_gen.set(gen);
        let limits = ConnLimits {
            max_outbound_bytes: self.app.config.max_outbound_bytes.min(u32::MAX as usize) as u32,
            messages_per_sec: self.app.config.max_messages_per_sec,
            message_burst: self.app.config.message_burst.max(1),
            deflate_min: self.app.config.compression.threshold.min(u32::MAX as usize) as u32,
        };
        let mut conns = self.conns.borrow_mut();
        let entry = conns.vacant_entry();
        let id = ConnId {
            key: entry.key() as u32,
            gen,
        };
        let socket_id = socket_id.map(String::into_boxed_str);
        let conn = Rc::new(Conn::new(
            id,
            vsn,
            assigns,
            socket_id,
            limits,
            self.now_ms(),
            long_poll,
        ));
        entry.insert(conn.clone());
        drop(conns);
        self.stats.connections.add(1);
        conn
    }

    /// The connection in slab slot `key`, if any (its generation is the caller's to check).
    pub(crate) fn conn_by_key(&self, key: u32) -> Option<Rc<Conn>> {
        self.conns.borrow().get(key as usize).cloned()
    }

    pub(crate) fn remove_conn(&self, conn: &Conn) {
        let mut conns = self.conns.borrow_mut();
        if conns.get(conn.id.key as usize).is_some_and(|c| c.id == conn.id) {
            conns.remove(conn.id.key as usize);
            self.stats.connections.sub(1);
            if conn.deflate.get() {
                self.stats.deflate_connections.sub(1);
            }
        }
    }

    /// Subscribes; the first local subscription of a topic returns the id of the
    /// interest announcement the other cores must ack before its join is answered.
    /// A channel subscription's slot must be in its connection's table already: the
    /// subscription's position is kept there, so that leaving costs O(1).
    pub(crate) fn subscribe(&self, topic: &str, sub: Sub) -> Option<u64> {
        let (first, pos) = {
            let mut topics = self.topics.borrow_mut();
            match topics.get_mut(topic) {
                Some(subs) => {
                    subs.push(sub.clone());
                    (false, subs.len() - 1)
                }
                None => {
                    topics.insert(topic.into(), vec![sub.clone()]);
                    self.stats.topics.add(1);
                    // A join waiting for its history holds the interest already.
                    (!self.held.borrow().contains_key(topic), 0)
                }
            }
        };
        record_position(&sub, topic, pos as u32);
        if !first || self.listeners.borrow().contains_key(topic) {
            return None;
        }
        self.interest_up(topic)
    }

    /// The topic's first interest on this core: the other cores and the cluster hear
    /// of it; the id of the announcement they must ack.
    fn interest_up(&self, topic: &str) -> Option<u64> {
        let cores = self.mesh.as_ref().map_or(0, |mesh| mesh.peers() - 1);
        let redis = self.endpoint.cluster().is_some();
        let ack = self.acks.open(cores + redis as usize, self.now_ms());
        if let Some(cluster) = self.endpoint.cluster() {
            if !cluster.interest(self.index, topic, true, ack) {
                // Not queued (the link's queue is full): nothing will confirm it.
                if let Some(id) = ack {
                    self.acks.acked(id);
                }
            }
        }
        if let Some(mesh) = &self.mesh {
            mesh.announce(topic, true, ack);
        }
        ack
    }

    /// The topic's last interest on this core went.
    fn interest_down(&self, topic: &str) {
        if let Some(mesh) = &self.mesh {
            mesh.announce(topic, false, None);
        }
        if let Some(cluster) = self.endpoint.cluster() {
            cluster.interest(self.index, topic, false, None);
        }
    }

    /// Removes `conn`'s subscription at `pos` (found by a scan if `pos` is stale).
    pub(crate) fn unsubscribe(&self, topic: &str, conn: ConnId, pos: u32) {
        let last = {
            let mut topics = self.topics.borrow_mut();
            let Some(subs) = topics.get_mut(topic) else { return };
            let pos = pos as usize;
            let found = if subs.get(pos).is_some_and(|s| s.conn.id == conn) {
                Some(pos)
            } else {
                subs.iter().position(|s| s.conn.id == conn)
            };
            if let Some(i) = found {
                subs.swap_remove(i);
                if let Some(moved) = subs.get(i) {
                    record_position(moved, topic, i as u32);
                }
            }
            let last = subs.is_empty();
            if last {
                topics.remove(topic);
                self.stats.topics.sub(1);
            }
            last && !self.held.borrow().contains_key(topic)
        };
        if last && !self.listeners.borrow().contains_key(topic) {
            self.interest_down(topic);
        }
    }

    /// Whether the interest announcement `id` reached every core (and Redis).
    pub(crate) fn poll_interest_acked(&self, id: u64, cx: &mut std::task::Context<'_>) -> bool {
        self.acks.poll(id, cx)
    }

    /// Delivers on this core and forwards to every other core that has subscribers.
    pub(crate) fn publish(&self, broadcast: Broadcast) {
        self.stats.broadcasts.add(1);
        let broadcast = Arc::new(broadcast);
        if let Some(mesh) = &self.mesh {
            mesh.forward(&broadcast);
        }
        if let Some(cluster) = self.endpoint.cluster() {
            cluster.publish(&broadcast);
        }
        self.deliver_local(&broadcast);
    }

    /// Hands a connection with queued broadcast frames to the core's flusher: one task
    /// writes every such connection's frames after the fanout, instead of one task wake
    /// per subscriber; frames queued meanwhile go out in the same send.
    fn mark_dirty(&self, conn: &Rc<Conn>) {
        if !conn.dirty.replace(true) {
            self.dirty.borrow_mut().push(conn.clone());
        }
        if let Some(w) = self.flusher.borrow_mut().take() {
            w.wake();
        }
    }

    /// The connections that fanout left with queued frames, for the flusher to write
    /// (each one's `dirty` flag still set; the writer clears it). Pending, with `cx`'s
    /// waker kept, while there are none. Hand the emptied batch back with
    /// [`Shard::recycle_dirty`] so that its allocation serves the next one.
    pub(crate) fn poll_dirty(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Vec<Rc<Conn>>> {
        let mut dirty = self.dirty.borrow_mut();
        if dirty.is_empty() {
            *self.flusher.borrow_mut() = Some(cx.waker().clone());
            return std::task::Poll::Pending;
        }
        std::task::Poll::Ready(std::mem::take(&mut *dirty))
    }

    /// When the oldest broadcast of the batch the flusher just wrote was accepted, if
    /// any: the flusher records its fanout latency.
    pub(crate) fn take_fanout_since(&self) -> Option<u64> {
        Some(self.fanout_since.replace(0)).filter(|&t| t > 0)
    }

    /// The `n` topics with the most subscribers on this core, biggest first, into the
    /// core's counters for `/metrics` (once a second, from the sweeper).
    pub(crate) fn refresh_top_topics(&self, n: usize) {
        let mut all: Vec<(&str, u64)> = Vec::new();
        let topics = self.topics.borrow();
        all.extend(topics.iter().map(|(t, subs)| (&**t, subs.len() as u64)));
        if all.len() > n {
            all.select_nth_unstable_by(n, |a, b| b.1.cmp(&a.1));
            all.truncate(n);
        }
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let top = all.into_iter().map(|(t, c)| (t.to_string(), c)).collect();
        *self.stats.top_topics.lock().expect("top topics") = top;
    }

    /// Gives a written batch's allocation back for the next one.
    pub(crate) fn recycle_dirty(&self, mut batch: Vec<Rc<Conn>>) {
        let mut dirty = self.dirty.borrow_mut();
        if dirty.is_empty() {
            batch.clear();
            *dirty = batch;
        }
    }

    /// Closes every connection on this core whose socket id is `id` (1001, so the
    /// client reconnects and authenticates again). A scan: disconnects are rare, and an
    /// index would cost every connection memory.
    pub(crate) fn disconnect(&self, id: &str) {
        for (_, conn) in self.conns.borrow().iter() {
            if conn.socket_id.as_deref() == Some(id) {
                conn.request_close(close_code::GOING_AWAY);
            }
        }
    }

    /// Fanout to this core's subscribers of the topic.
    pub(crate) fn deliver_local(&self, b: &Arc<Broadcast>) {
        self.deliver_skipping(b, &[]);
    }

    /// Fanout to this core's subscribers but those in `also_skip` (in cluster mode,
    /// joins whose replay already held the broadcast; almost always none).
    pub(crate) fn deliver_skipping(&self, b: &Arc<Broadcast>, also_skip: &[ConnId]) {
        if &*b.event == DISCONNECT {
            self.disconnect(&b.topic);
        }
        self.deliver_listeners(b);
        let topics = self.topics.borrow();
        let Some(subs) = topics.get(&*b.topic) else {
            return;
        };
        let skip = b.from.filter(|(core, _)| *core == self.index).map(|(_, id)| id);
        // The frame per serializer version, plain and compressed: each made at most
        // once per core, for every subscriber alike.
        let mut shared: [[Option<Rc<Bytes>>; 2]; 2] = Default::default();
        let compression = &self.app.config.compression;
        // Built as JSON text: server-made presence (`presence_diff`), under its own bound.
        let presence = b.raw.is_some();
        // On a topic with history a subscriber that intercepts must get the frames in
        // the offsets' order: behind its intercepted broadcasts still in its mailbox.
        let ordered = b.position.is_some();
        let mut delivered = 0u64;
        for sub in subs {
            if Some(sub.conn.id) == skip || (!also_skip.is_empty() && also_skip.contains(&sub.conn.id)) {
                continue;
            }
            let conn = &sub.conn;
            let behind_mail = if sub.intercepts.is_empty() {
                false
            } else if sub.intercepts.contains(&&*b.event) {
                conn.mail(Mail::Out(b.clone()));
                continue;
            } else {
                ordered && conn.has_mail()
            };
            let deflate = conn.deflate.get();
            let [plain, packed] = &mut shared[sub.vsn as usize];
            if plain.is_none() {
                *plain = b.frame(sub.vsn).map(|f| Rc::new(f.clone()));
            }
            let slot = match plain {
                Some(frame) if deflate && frame.len() >= compression.threshold => {
                    if packed.is_none() || !compression.once_per_broadcast {
                        let made = deflate::compress_frame(frame, deflate::BROADCAST_LEVEL);
                        self.stats.deflate_broadcasts.add(1);
                        *packed = Some(made.map_or_else(|| frame.clone(), Rc::new));
                    }
                    &*packed
                }
                _ => &*plain,
            };
            if let Some(frame) = slot {
                let frame = if presence {
                    OutFrame::PresenceShared(frame.clone())
                } else {
                    OutFrame::Shared(frame.clone())
                };
                if behind_mail {
                    conn.mail(Mail::Frame(frame));
                } else if conn.push(frame) {
                    if conn.fd.get() >= 0 {
                        self.mark_dirty(conn);
                    } else {
                        conn.wake();
                    }
                } else {
                    conn.wake();
                }
                delivered += 1;
            }
        }
        self.stats.deliveries.add(delivered);
        // The flusher times the fanout from the oldest broadcast it has frames of.
        if self.fanout_since.get() == 0 && !self.dirty.borrow().is_empty() {
            self.fanout_since.set(b.accepted_us.max(1));
        }
    }

    /// Graceful shutdown, as Phoenix drains: new connections are refused (503) and
    /// `/healthz` answers 503; the open ones are asked to go (1001, so clients
    /// reconnect elsewhere) in batches, this core's share of `drain_batch` every
    /// `drain_interval` from now, so that their reconnects do not arrive as one wave.
    /// The caller stops the core once they are gone or `drain_timeout` passed.
    pub(crate) fn shutdown(&self) {
        if self.stopping.replace(true) {
            return;
        }
        let cores = self.app.stats.len().max(1);
        let batch = self.app.config.drain_batch.div_ceil(cores).max(1);
        tracing::info!(
            core = self.index,
            connections = self.conn_count(),
            batch,
            "draining"
        );
        self.drain_step(batch);
        if let Some(w) = self.stop_waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Asks the next `batch` connections to go, and schedules the next step while any
    /// are left.
    fn drain_step(&self, batch: usize) {
        let from = self.drain_next.get();
        let mut asked = 0;
        let mut next = from;
        for (key, conn) in self.conns.borrow().iter().filter(|(k, _)| *k >= from).take(batch) {
            conn.request_close(close_code::GOING_AWAY);
            asked += 1;
            next = key + 1;
        }
        self.drain_next.set(next);
        let left = self.conns.borrow().iter().filter(|(k, _)| *k >= next).count();
        tracing::debug!(core = self.index, asked, left, "drain step");
        if left > 0 {
            let interval = self.app.config.drain_interval;
            self.after(interval, Box::new(move |shard| shard.drain_step(batch)));
        }
    }

    /// Resolves once shutdown begins.
    pub(crate) async fn stopped(&self) {
        std::future::poll_fn(|cx| {
            if self.stopping.get() {
                return std::task::Poll::Ready(());
            }
            *self.stop_waker.borrow_mut() = Some(cx.waker().clone());
            std::task::Poll::Pending
        })
        .await
    }

    /// Whether shutdown began.
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.get()
    }

    /// Whether this core holds as many connections as it may.
    pub(crate) fn full(&self) -> bool {
        let cores = self.app.stats.len().max(1);
        self.conn_count() >= self.app.config.max_connections / cores
    }

    /// Open connections on this core.
    pub(crate) fn conn_count(&self) -> usize {
        self.conns.borrow().len()
    }

    /// Work handed in from outside the cores.
    pub(crate) fn run_command(&self, cmd: inbox::CoreCommand) {
        use inbox::CoreCommand;
        match cmd {
            CoreCommand::Deliver(b) if b.position.is_some() => self.deliver_sequenced(&b),
            CoreCommand::Deliver(b)
                if self.endpoint.cluster().is_some() && self.history_of(&b.topic).is_some() =>
            {
                self.deliver_unsequenced(&b)
            }
            CoreCommand::Deliver(b) => self.deliver_local(&b),
            CoreCommand::Publish(p) => self.broadcast(&p.topic, &p.event, p.payload, p.from),
            CoreCommand::HistoryReply(id, answer) => {
                let job = self.awaiting.borrow_mut().remove(&id);
                if let Some(job) = job {
                    self.complete_recovery(job, *answer);
                }
            }
            CoreCommand::Presence(topic, delta) => self.presence_apply(&topic, &delta),
            CoreCommand::PresenceState(topic, node, entries) => {
                self.presence_replace_node(&topic, node, &entries)
            }
            CoreCommand::DropNode(node) => self.presence_drop_node(node),
            CoreCommand::InterestConfirmed(id) => self.acks.acked(id),
            CoreCommand::Shutdown => self.shutdown(),
            CoreCommand::Listen {
                topic,
                sink,
                registered,
            } => self.listen_and_confirm(&topic, sink, registered),
            CoreCommand::Unlisten(topic, id) => self.unlisten_rust(&topic, id),
            CoreCommand::Info(topic, msg) => self.send_info_local(&topic, &*msg),
            CoreCommand::ChannelInfo {
                conn,
                topic,
                join_ref,
                msg,
            } => self.channel_info(conn, &topic, &join_ref, msg),
            CoreCommand::PresenceList(topic, answer) => {
                let _ = answer.send(self.presence_state_json(&topic));
            }
        }
    }

    /// Handles a message from another core. Long-poll requests and answers are the
    /// transport's: they are handed back.
    pub(crate) fn handle_mesh(&self, msg: MeshMsg) -> Option<MeshMsg> {
        match msg {
            MeshMsg::Broadcast(b) => self.deliver_local(&b),
            MeshMsg::Presence { topic, delta } => self.presence_apply(&topic, &delta),
            msg @ (MeshMsg::LongPoll { .. } | MeshMsg::LongPollReply { .. }) => return Some(msg),
            MeshMsg::Interest { topic, core, on, ack } => {
                if let Some(mesh) = &self.mesh {
                    mesh.set_interest(&topic, core, on);
                    if let Some(id) = ack {
                        mesh.send_to(core, MeshMsg::InterestAck { id });
                    }
                }
            }
            MeshMsg::InterestAck { id } => self.acks.acked(id),
            MeshMsg::Sequence(p) => self.sequence(*p),
            MeshMsg::HistoryFetch {
                topic,
                since,
                core,
                id,
            } => {
                let answer = Box::new(self.history_answer(&topic, since));
                if let Some(mesh) = &self.mesh {
                    mesh.send_to(core, MeshMsg::HistoryReply { id, answer });
                }
            }
            MeshMsg::HistoryReply { id, answer } => {
                let job = self.awaiting.borrow_mut().remove(&id);
                if let Some(job) = job {
                    self.complete_recovery(job, *answer);
                }
            }
        }
        None
    }

    /// The ring mesh to the other cores (`None` on a one-core server).
    pub(crate) fn mesh(&self) -> Option<&Mesh> {
        self.mesh.as_ref()
    }

    /// Gives up on interest acks older than [`INTEREST_ACK_TIMEOUT`]; asks connections
    /// silent for longer than the idle timeout to close, and (with
    /// `can_park`, when this core can park connections) wakes the ones silent for
    /// [`PARK_AFTER`], so that their pumps park them. `now` is the shard's clock
    /// ([`Shard::now_ms`]) as the caller read it.
    pub(crate) fn sweep_idle(&self, now: u32, can_park: bool) {
        self.acks
            .expire(self.index, now, INTEREST_ACK_TIMEOUT.as_millis() as u32);
        self.sweep_histories();
        let limit = self.app.config.idle_timeout.as_millis().min(u32::MAX as u128 / 2) as u32;
        let park_after = PARK_AFTER.as_millis() as u32;
        for (_, conn) in self.conns.borrow().iter() {
            // Long-poll sessions expire by their own rule (no poll for 15 s).
            if conn.long_poll {
                continue;
            }
            let idle = now.wrapping_sub(conn.last_in.get());
            if idle >= limit {
                conn.request_close(close_code::GOING_AWAY);
            } else if can_park && idle >= park_after && conn.park_seq.get() == 0 {
                // Its pump parks the connection if nothing else is in flight (a TLS
                // one too, whose socket the flusher does not write while it runs).
                conn.wake();
            }
        }
    }
}

/// The shard driven in memory, without a socket or an executor: fanout hands the
/// flusher its dirty connections, wake-ups reach tasks or the parking dispatcher, the
/// idle sweep runs on the time it is given.
#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, Wake, Waker};

    use super::*;
    use crate::bench_support::lone_shard;
    use crate::proto::Ref;
    use crate::shard::app::Config;

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn counting() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count::default());
        (count.clone(), Waker::from(count))
    }

    fn woken(count: &Count) -> usize {
        count.0.load(Ordering::Relaxed)
    }

    fn subscriber(shard: &Shard, topic: &str, fd: i32) -> Rc<Conn> {
        let conn = shard.add_conn(Vsn::V2, Rc::new(()), None, false);
        conn.fd.set(fd);
        let sub = Sub {
            conn: conn.clone(),
            vsn: Vsn::V2,
            intercepts: &[],
        };
        shard.subscribe(topic, sub);
        conn
    }

    fn dirty(shard: &Shard, cx: &mut Context<'_>) -> Vec<ConnId> {
        match shard.poll_dirty(cx) {
            Poll::Ready(batch) => batch.iter().map(|c| c.id).collect(),
            Poll::Pending => Vec::new(),
        }
    }

    #[test]
    fn fanout_hands_the_flusher_each_socket_once_and_wakes_the_others() {
        let shard = lone_shard(Config::default());
        let (flusher, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        assert!(shard.poll_dirty(&mut cx).is_pending(), "nothing to write yet");
        let a = subscriber(&shard, "t", 100);
        let b = subscriber(&shard, "t", 101);
        let socketless = subscriber(&shard, "t", -1);
        let (task, task_waker) = counting();
        socketless.set_waker(&task_waker);

        shard.publish(Broadcast::new("t", "e", Payload::empty(), None));
        shard.publish(Broadcast::new("t", "e", Payload::empty(), None));
        assert_eq!(
            woken(&flusher),
            1,
            "the flusher is woken once, on the first frame"
        );
        assert_eq!(
            dirty(&shard, &mut cx),
            vec![a.id, b.id],
            "each socket once, in order"
        );
        assert_eq!(a.out.borrow().frames.len(), 2, "both frames queued for one write");
        assert_eq!(
            woken(&task),
            2,
            "a connection without a socket is woken per frame"
        );
        assert!(shard.poll_dirty(&mut cx).is_pending());

        // The flusher clears the flag when it writes; until then no duplicate entry.
        shard.publish(Broadcast::new("t", "e", Payload::empty(), Some((0, a.id))));
        assert_eq!(
            dirty(&shard, &mut cx),
            Vec::<ConnId>::new(),
            "flags still set: no entry"
        );
        a.dirty.set(false);
        b.dirty.set(false);
        shard.publish(Broadcast::new("t", "e", Payload::empty(), Some((0, a.id))));
        assert_eq!(
            dirty(&shard, &mut cx),
            vec![b.id],
            "broadcast_from skips its sender"
        );
        assert_eq!(a.out.borrow().frames.len(), 2);
        assert_eq!(b.out.borrow().frames.len(), 4);
    }

    #[test]
    fn a_parked_connection_is_handed_to_the_dispatcher_when_woken() {
        let shard = lone_shard(Config::default());
        let (dispatcher, waker) = counting();
        conn::set_unpark_waker(&waker);
        let parked = subscriber(&shard, "t", 100);
        let running = subscriber(&shard, "t", 101);
        let (task, task_waker) = counting();
        running.set_waker(&task_waker);
        parked.park_seq.set(7);

        running.request_close(1000);
        parked.mail(Mail::Info("t".into(), Ref::null(), Box::new(())));
        assert_eq!(woken(&task), 1, "a running connection's own task is woken");
        assert_eq!(woken(&dispatcher), 1);
        assert_eq!(conn::take_unparks(), vec![parked.id]);
        assert!(conn::take_unparks().is_empty());

        // Broadcasts to a parked connection go to the flusher, not the dispatcher.
        shard.publish(Broadcast::new("t", "e", Payload::empty(), None));
        assert!(conn::take_unparks().is_empty());
        assert_eq!(woken(&dispatcher), 1);
    }

    #[test]
    fn presence_diffs_batch_in_windows_on_the_clock_the_shard_is_given() {
        let shard = lone_shard(Config::default());
        let topic: Rc<str> = "rooms:x".into();
        let watcher = subscriber(&shard, &topic, 100);
        let frames = || watcher.out.borrow().frames.len();
        let window = presence::DIFF_WINDOW.as_millis() as u64;

        // A quiet topic: the first change goes out at once and opens a window.
        shard.presence_track(&watcher, &topic, "a", serde_json::json!({}));
        assert_eq!(frames(), 1, "the first diff is not delayed");
        assert_eq!(shard.timers_pending(), 1, "a window is open");
        shard.presence_track(&watcher, &topic, "b", serde_json::json!({}));
        shard.presence_track(&watcher, &topic, "c", serde_json::json!({}));
        assert_eq!(frames(), 1, "changes inside the window wait");

        shard.clock().advance(window - 1);
        assert_eq!(shard.handle_timeout(shard.clock().now_ms()), 0, "not due yet");
        assert_eq!(frames(), 1);
        shard.clock().advance(1);
        assert_eq!(shard.handle_timeout(shard.clock().now_ms()), 1);
        assert_eq!(frames(), 2, "one diff for both joins of the window");
        assert_eq!(shard.timers_pending(), 1, "and a new window");

        // A window with nothing in it closes: the next change goes out at once again.
        shard.clock().advance(window);
        assert_eq!(shard.handle_timeout(shard.clock().now_ms()), 1);
        assert_eq!(frames(), 2);
        assert_eq!(shard.timers_pending(), 0, "the quiet topic has no timer");
        shard.presence_track(&watcher, &topic, "d", serde_json::json!({}));
        assert_eq!(frames(), 3);
    }

    #[test]
    fn timers_fire_in_deadline_order_and_wake_the_driver_for_an_earlier_one() {
        let shard = lone_shard(Config::default());
        let (driver, waker) = counting();
        let fired = Rc::new(RefCell::new(Vec::new()));
        let add = |delay: u64, name: &'static str| {
            let fired = fired.clone();
            shard.after(
                Duration::from_millis(delay),
                Box::new(move |_| fired.borrow_mut().push(name)),
            );
        };
        assert_eq!(shard.poll_timeout(&waker), None);
        add(30, "late");
        assert_eq!(woken(&driver), 1, "the first timer wakes the driver");
        assert_eq!(shard.poll_timeout(&waker), Some(30));
        add(40, "last");
        assert_eq!(woken(&driver), 1, "a later deadline does not");
        add(10, "early");
        add(10, "early too");
        assert_eq!(woken(&driver), 2, "an earlier one does, once");
        assert_eq!(shard.poll_timeout(&waker), Some(10));
        shard.clock().advance(30);
        assert_eq!(shard.handle_timeout(shard.clock().now_ms()), 3);
        assert_eq!(*fired.borrow(), ["early", "early too", "late"]);
        assert_eq!(shard.poll_timeout(&waker), Some(40));
    }

    /// The mesh link of an in-memory test: messages wait on one wire until delivered.
    type Wire = Rc<RefCell<std::collections::VecDeque<(usize, MeshMsg)>>>;

    struct TestLink(Wire);

    impl mesh::MeshLink for TestLink {
        fn send(&self, peer: usize, msg: MeshMsg) {
            self.0.borrow_mut().push_back((peer, msg));
        }
    }

    /// Hands every message on the wire to its core, until none is left.
    fn deliver_all(shards: &[Rc<Shard>], wire: &Wire) -> usize {
        let mut n = 0;
        loop {
            let next = wire.borrow_mut().pop_front();
            let Some((to, msg)) = next else { return n };
            assert!(shards[to].handle_mesh(msg).is_none(), "no long-poll traffic here");
            n += 1;
        }
    }

    #[test]
    fn two_cores_in_memory_forward_a_topic_only_while_the_other_has_subscribers() {
        let app = crate::bench_support::bare_app(Config {
            cores: 2,
            ..Config::default()
        });
        let wire = Wire::default();
        let shards: Vec<_> = (0..2)
            .map(|i| {
                let mesh = Mesh::new(i, 2, Box::new(TestLink(wire.clone())));
                let endpoint = Endpoint::new(Vec::new(), None);
                Shard::new(i, app.clone(), endpoint, Some(mesh), Clock::manual())
            })
            .collect();
        let (_, waker) = counting();
        let mut cx = Context::from_waker(&waker);

        // A first subscription on core 1 waits until core 0 acked its interest.
        let conn = shards[1].add_conn(Vsn::V2, Rc::new(()), None, false);
        conn.fd.set(100);
        let ack = shards[1]
            .subscribe(
                "t",
                Sub {
                    conn: conn.clone(),
                    vsn: Vsn::V2,
                    intercepts: &[],
                },
            )
            .expect("a first subscription is announced");
        assert!(!shards[1].poll_interest_acked(ack, &mut cx));
        assert_eq!(deliver_all(&shards, &wire), 2, "interest, then its ack");
        assert!(shards[1].poll_interest_acked(ack, &mut cx));

        // Core 0 publishes: forwarded to core 1, whose subscriber gets it once.
        shards[0].publish(Broadcast::new("t", "e", Payload::empty(), None));
        shards[0].publish(Broadcast::new("elsewhere", "e", Payload::empty(), None));
        assert_eq!(
            wire.borrow().len(),
            1,
            "only the topic core 1 has subscribers for"
        );
        deliver_all(&shards, &wire);
        assert_eq!(conn.out.borrow().frames.len(), 1);

        // Once core 1's last subscriber leaves, core 0 stops forwarding.
        shards[1].unsubscribe("t", conn.id, 0);
        assert_eq!(deliver_all(&shards, &wire), 1, "interest off");
        shards[0].publish(Broadcast::new("t", "e", Payload::empty(), None));
        assert!(
            wire.borrow().is_empty(),
            "nothing forwarded to a core without subscribers"
        );
    }

    #[test]
    fn a_shutdown_closes_connections_in_batches_one_interval_apart() {
        let shard = lone_shard(Config {
            drain_batch: 2,
            drain_interval: Duration::from_secs(2),
            ..Config::default()
        });
        let conns: Vec<_> = (0..5).map(|i| subscriber(&shard, "t", 100 + i)).collect();
        let asked = || {
            conns
                .iter()
                .filter(|c| c.close.get() == Some(close_code::GOING_AWAY))
                .count()
        };
        assert!(!shard.is_stopping());
        shard.shutdown();
        assert!(shard.is_stopping());
        assert_eq!(asked(), 2, "the first batch at once");
        shard.clock().advance(1999);
        shard.handle_timeout(shard.clock().now_ms());
        assert_eq!(asked(), 2, "the next one an interval later, not sooner");
        shard.clock().advance(1);
        shard.handle_timeout(shard.clock().now_ms());
        assert_eq!(asked(), 4);
        shard.clock().advance(2000);
        shard.handle_timeout(shard.clock().now_ms());
        assert_eq!(asked(), 5);
        assert_eq!(shard.timers_pending(), 0, "nothing left: no more steps");
        shard.shutdown();
        assert_eq!(
            shard.timers_pending(),
            0,
            "a second shutdown starts no second drain"
        );
    }

    #[test]
    fn the_idle_sweep_runs_on_the_time_it_is_given() {
        let shard = lone_shard(Config {
            idle_timeout: std::time::Duration::from_secs(60),
            ..Config::default()
        });
        let conn = subscriber(&shard, "t", 100);
        let (task, waker) = counting();
        conn.set_waker(&waker);
        let start = conn.last_in.get();
        let park_after = PARK_AFTER.as_millis() as u32;

        shard.sweep_idle(start + park_after - 1, true);
        assert_eq!(woken(&task), 0, "not silent for long enough");
        shard.sweep_idle(start + park_after, false);
        assert_eq!(woken(&task), 0, "a core that cannot park wakes nobody to park");
        shard.sweep_idle(start + park_after, true);
        assert_eq!(woken(&task), 1, "woken so that its pump parks it");
        assert_eq!(conn.close.get(), None);
        shard.sweep_idle(start + 60_000, true);
        assert_eq!(conn.close.get(), Some(close_code::GOING_AWAY));
    }
}
