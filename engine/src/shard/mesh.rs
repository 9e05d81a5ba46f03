//! What a core knows of the other cores: which of them have subscribers for a topic
//! (so broadcasts go only there), and the messages between cores. How a message gets there is the server's [`MeshLink`] (the
//! SPSC rings of glommio's `channel_mesh`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use super::history::{Answer, Publish};
use super::Broadcast;
use crate::proto::http::{Request, Response};
use crate::proto::position::Position;
use crate::proto::presence::Delta;

/// What crosses from one core to another.
pub(crate) enum MeshMsg {
    /// Deliver to your local subscribers.
    Broadcast(Arc<Broadcast>),
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
    /// A broadcast on a topic with history, for the receiver (its owner) to sequence.
    Sequence(Box<Publish>),
    /// A join on core `core` asks the owner of `topic` for its position and, with
    /// `since`, the broadcasts after it ([`MeshMsg::HistoryReply`] with `id`).
    HistoryFetch {
        topic: Arc<str>,
        since: Option<Position>,
        core: usize,
        id: u64,
    },
    /// The owner's answer to [`MeshMsg::HistoryFetch`] `id`.
    HistoryReply { id: u64, answer: Box<Answer> },
}

/// Carries messages to the other cores. It never blocks: what it cannot hand over at
/// once waits in order, within a bound past which broadcasts (and only broadcasts) are
/// dropped and counted.
pub(crate) trait MeshLink {
    /// Hands `msg` to core `peer`.
    fn send(&self, peer: usize, msg: MeshMsg);
}

struct Inner {
    index: usize,
    peers: usize,
    link: Box<dyn MeshLink>,
    /// Topic -> bit set of the other cores with subscribers.
    interest: RefCell<HashMap<Box<str>, u64>>,
}

pub(crate) struct Mesh(Rc<Inner>);

impl Mesh {
    /// Core `index` of `peers` cores (itself included), reaching them through `link`.
    pub(crate) fn new(index: usize, peers: usize, link: Box<dyn MeshLink>) -> Self {
        assert!(peers <= 64, "at most 64 cores");
        Mesh(Rc::new(Inner {
            index,
            peers,
            link,
            interest: RefCell::default(),
        }))
    }

    pub(crate) fn index(&self) -> usize {
        self.0.index
    }

    /// How many cores the mesh joins, this one included.
    pub(crate) fn peers(&self) -> usize {
        self.0.peers
    }

    pub(crate) fn send_to(&self, peer: usize, msg: MeshMsg) {
        self.0.link.send(peer, msg);
    }

    fn others(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.0.peers).filter(|p| *p != self.0.index)
    }

    pub(crate) fn forward(&self, b: &Arc<Broadcast>) {
        // A disconnect concerns socket ids, which are no subscriptions: every core looks.
        let everyone = &*b.event == super::DISCONNECT;
        let mask = if everyone {
            u64::MAX
        } else {
            self.0.interest.borrow().get(&*b.topic).copied().unwrap_or(0)
        };
        for peer in self.others() {
            if mask & (1 << peer) != 0 {
                self.send_to(peer, MeshMsg::Broadcast(b.clone()));
            }
        }
    }

    /// Tells the other cores whether this core has subscribers for `topic`; with `ack`
    /// (see [`super::acks`]), each answers [`MeshMsg::InterestAck`] once it knows.
    pub(crate) fn announce(&self, topic: &str, on: bool, ack: Option<u64>) {
        let topic: Arc<str> = topic.into();
        for peer in self.others() {
            let msg = MeshMsg::Interest {
                topic: topic.clone(),
                core: self.0.index,
                on,
                ack,
            };
            self.send_to(peer, msg);
        }
    }

    /// Whether any other core has subscribers for `topic`.
    pub(crate) fn has_interest(&self, topic: &str) -> bool {
        self.0.interest.borrow().contains_key(topic)
    }

    /// Every core keeps a full presence replica, so deltas go to all of them.
    pub(crate) fn replicate_presence(&self, topic: &str, delta: &Arc<Delta>) {
        let topic: Arc<str> = topic.into();
        for peer in self.others() {
            let msg = MeshMsg::Presence {
                topic: topic.clone(),
                delta: delta.clone(),
            };
            self.send_to(peer, msg);
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
