//! The SPSC ring mesh between cores (glommio's `channel_mesh`): forwards broadcasts to
//! the cores that have subscribers for their topic, and keeps that interest table.
//!
//! A ring that is full never blocks a publisher: messages wait, in order, in a per-peer
//! backlog drained by a pump task.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Waker};

use glommio::channels::channel_mesh::Senders;
use glommio::{GlommioError, ResourceType};

use super::stats::CoreStats;
use super::Broadcast;
use crate::proto::http::{Request, Response};
use crate::proto::presence::Delta;

/// What crosses from one core to another.
pub(crate) enum MeshMsg {
    /// Deliver to your local subscribers.
    Broadcast(Arc<Broadcast>),
    /// Core `core` now has (`on`) or no longer has subscribers for `topic`.
    /// Core `core` now has (`on`) or no longer has subscribers for `topic`; with
    /// `ack`, the receiver answers [`MeshMsg::InterestAck`] once it knows.
    Interest {
        topic: Arc<str>,
        core: usize,
        on: bool,
        ack: Option<u64>,
    },
    /// The receiver of `Interest` with this ack id now forwards the topic's broadcasts.
    InterestAck { id: u64 },
    /// A presence delta issued by the sending core for its own connections.
    Presence { topic: Arc<str>, delta: Arc<Delta> },
    /// A long-poll request for a session on the receiving core.
    LongPoll {
        origin: usize,
        id: u64,
        req: Request,
        body: Vec<u8>,
    },
    /// The answer to a forwarded long-poll request.
    LongPollReply { id: u64, response: Response },
}

struct Inner {
    index: usize,
    senders: Senders<MeshMsg>,
    backlog: Vec<RefCell<VecDeque<MeshMsg>>>,
    pumping: Vec<Cell<bool>>,
    /// Topic -> bit set of the other cores with subscribers.
    interest: RefCell<HashMap<Box<str>, u64>>,
    /// Interest announcements waiting for acks, by id.
    acks: RefCell<HashMap<u64, PendingAck>>,
    stats: Arc<CoreStats>,
    next_ack: Cell<u64>,
}

/// Messages one core holds for another whose ring is full; past it broadcasts are
/// dropped and counted (`ringcast_mesh_dropped_total`).
pub(crate) const MESH_BACKLOG_BOUND: usize = 65_536;

/// An interest announcement waiting for acks: how many are missing, who waits, and
/// when it was announced (the shard's clock, ms).
type PendingAck = (usize, Option<Waker>, u32);

pub(crate) struct Mesh(Rc<Inner>);

impl Mesh {
    pub(crate) fn new(senders: Senders<MeshMsg>, stats: Arc<CoreStats>) -> Self {
        let peers = senders.nr_consumers();
        assert!(peers <= 64, "at most 64 cores");
        Mesh(Rc::new(Inner {
            index: senders.peer_id(),
            senders,
            backlog: (0..peers).map(|_| RefCell::default()).collect(),
            pumping: (0..peers).map(|_| Cell::new(false)).collect(),
            interest: RefCell::default(),
            acks: RefCell::default(),
            next_ack: Cell::new(0),
            stats,
        }))
    }

    pub(crate) fn index(&self) -> usize {
        self.0.index
    }

    pub(crate) fn peers(&self) -> usize {
        self.0.backlog.len()
    }

    pub(crate) fn send_to(&self, peer: usize, msg: MeshMsg) {
        send(&self.0, peer, msg);
    }

    pub(crate) fn forward(&self, b: &Arc<Broadcast>) {
        // A disconnect concerns socket ids, which are no subscriptions: every core looks.
        let everyone = &*b.event == super::DISCONNECT;
        let mask = if everyone {
            u64::MAX
        } else {
            self.0.interest.borrow().get(&*b.topic).copied().unwrap_or(0)
        };
        for peer in (0..self.0.backlog.len()).filter(|p| *p != self.0.index) {
            if mask & (1 << peer) != 0 {
                send(&self.0, peer, MeshMsg::Broadcast(b.clone()));
            }
        }
    }

    /// Tells the other cores whether this core has subscribers for `topic`. A first
    /// subscription returns an ack id: until every core acked ([`Mesh::poll_acked`]),
    /// a broadcast published elsewhere might not be forwarded here yet.
    pub(crate) fn announce(&self, topic: &str, on: bool, now_ms: u32) -> Option<u64> {
        let topic: Arc<str> = topic.into();
        let peers = self.0.backlog.len() - 1;
        let ack = (on && peers > 0).then(|| {
            let id = self.0.next_ack.get() + 1;
            self.0.next_ack.set(id);
            self.0.acks.borrow_mut().insert(id, (peers, None, now_ms));
            id
        });
        for peer in (0..self.0.backlog.len()).filter(|p| *p != self.0.index) {
            let msg = MeshMsg::Interest {
                topic: topic.clone(),
                core: self.0.index,
                on,
                ack,
            };
            send(&self.0, peer, msg);
        }
        ack
    }

    /// Counts one ack of an interest announcement.
    pub(crate) fn acked(&self, id: u64) {
        let mut acks = self.0.acks.borrow_mut();
        if let Some((missing, waiter, _)) = acks.get_mut(&id) {
            *missing -= 1;
            if *missing == 0 {
                if let Some(w) = waiter.take() {
                    w.wake();
                }
            }
        }
    }

    /// Whether every core acked announcement `id`; registers the waker if not.
    pub(crate) fn poll_acked(&self, id: u64, cx: &mut Context<'_>) -> bool {
        let mut acks = self.0.acks.borrow_mut();
        match acks.get_mut(&id) {
            Some((0, _, _)) | None => {
                acks.remove(&id);
                true
            }
            Some((_, waiter, _)) => {
                *waiter = Some(cx.waker().clone());
                false
            }
        }
    }

    /// Gives up on announcements older than `limit_ms` at `now_ms` (a core that does
    /// not answer, because it died or is wedged, must not hold first joins forever):
    /// their waiters go on as if acked. Returns how many were given up.
    pub(crate) fn expire_acks(&self, now_ms: u32, limit_ms: u32) -> usize {
        let mut expired = 0;
        for (id, (missing, waiter, since)) in self.0.acks.borrow_mut().iter_mut() {
            if *missing > 0 && now_ms.wrapping_sub(*since) >= limit_ms {
                tracing::warn!(
                    core = self.0.index,
                    ack = id,
                    missing = *missing,
                    "interest not acked by every core within {limit_ms} ms; answering the join anyway"
                );
                *missing = 0;
                if let Some(w) = waiter.take() {
                    w.wake();
                }
                expired += 1;
            }
        }
        expired
    }

    /// Every core keeps a full presence replica, so deltas go to all of them.
    pub(crate) fn replicate_presence(&self, topic: &str, delta: &Arc<Delta>) {
        let topic: Arc<str> = topic.into();
        for peer in (0..self.0.backlog.len()).filter(|p| *p != self.0.index) {
            let msg = MeshMsg::Presence {
                topic: topic.clone(),
                delta: delta.clone(),
            };
            send(&self.0, peer, msg);
        }
    }

    pub(crate) fn set_interest(&self, topic: &str, core: usize, on: bool) {
        let mut interest = self.0.interest.borrow_mut();
        if on {
            *interest.entry(topic.into()).or_default() |= 1 << core;
        } else if let Some(mask) = interest.get_mut(topic) {
            *mask &= !(1 << core);
            if *mask == 0 {
                interest.remove(topic);
            }
        }
    }
}

fn send(inner: &Rc<Inner>, peer: usize, msg: MeshMsg) {
    let mut backlog = inner.backlog[peer].borrow_mut();
    let msg = if backlog.is_empty() {
        match inner.senders.try_send_to(peer, msg) {
            Ok(()) => return,
            Err(GlommioError::WouldBlock(ResourceType::Channel(msg))) => msg,
            Err(e) => {
                tracing::error!("mesh send to core {peer} failed: {e}");
                return;
            }
        }
    } else {
        msg
    };
    // Broadcasts are the volume and may be dropped, at most once like any delivery:
    // past the bound they are, and counted. Interest, acks, presence and long-poll
    // messages are few and keep the cores' tables right: they always queue.
    if backlog.len() >= MESH_BACKLOG_BOUND && matches!(msg, MeshMsg::Broadcast(_)) {
        inner.stats.mesh_dropped.add(1);
        return;
    }
    backlog.push_back(msg);
    drop(backlog);
    if !inner.pumping[peer].replace(true) {
        let inner = inner.clone();
        glommio::spawn_local(async move {
            loop {
                let next = inner.backlog[peer].borrow_mut().pop_front();
                let Some(msg) = next else { break };
                if inner.senders.send_to(peer, msg).await.is_err() {
                    break;
                }
            }
            inner.pumping[peer].set(false);
        })
        .detach();
    }
}
