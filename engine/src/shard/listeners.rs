//! Listeners of a topic that are not channels joined to it: Rust subscriptions
//! (`Endpoint::subscribe`) and channels that subscribed to another topic
//! (`Socket::subscribe`). A topic's interest (the other cores, Redis) counts them with
//! its channel subscribers: it is announced by the first of either and withdrawn with
//! the last.
//!
//! Fanout looks at them once per broadcast: one map lookup when any exist, nothing
//! otherwise; the message is built once for all of them.

use std::rc::Rc;
use std::sync::Arc;

use crate::proto::Ref;
use crate::shard::api::pubsub::{InfoMsg, Message, SubSink};
use crate::shard::conn::{Conn, ConnId, Mail};
use crate::shard::{Broadcast, Shard};

/// One listener of a topic.
pub(crate) enum Listener {
    /// A Rust subscription's queue.
    Rust(Arc<SubSink>),
    /// The channel `(topic, join_ref)` of `conn`, which gets broadcasts in `handle_info`.
    Channel {
        conn: Rc<Conn>,
        topic: Rc<str>,
        join_ref: Ref,
    },
}

impl Listener {
    fn is_channel(&self, conn: ConnId, topic: &str) -> bool {
        matches!(self, Listener::Channel { conn: c, topic: t, .. } if c.id == conn && &**t == topic)
    }
}

impl Shard {
    /// Adds a listener of `topic`; the id of the interest announcement the other cores
    /// must ack when this is the topic's first interest on this core.
    pub(crate) fn listen(&self, topic: &str, listener: Listener) -> Option<u64> {
        let first = {
            let mut listeners = self.listeners.borrow_mut();
            let list = listeners.entry(topic.into()).or_default();
            list.push(listener);
            list.len() == 1
                && !self.topics.borrow().contains_key(topic)
                && !self.held.borrow().contains_key(topic)
        };
        self.stats.subscriptions.add(1);
        first.then(|| self.interest_up(topic)).flatten()
    }

    /// Removes the Rust subscription `id` of `topic`.
    pub(crate) fn unlisten_rust(&self, topic: &str, id: u64) {
        self.unlisten(topic, |l| matches!(l, Listener::Rust(s) if s.id == id));
    }

    /// Removes the listening of channel `(conn, channel_topic)` to `topic`.
    pub(crate) fn unlisten_channel(&self, topic: &str, conn: ConnId, channel_topic: &str) {
        self.unlisten(topic, |l| l.is_channel(conn, channel_topic));
    }

    fn unlisten(&self, topic: &str, which: impl Fn(&Listener) -> bool) {
        let last = {
            let mut listeners = self.listeners.borrow_mut();
            let Some(list) = listeners.get_mut(topic) else {
                return;
            };
            let Some(i) = list.iter().position(&which) else {
                return;
            };
            list.swap_remove(i);
            self.stats.subscriptions.sub(1);
            let empty = list.is_empty();
            if empty {
                listeners.remove(topic);
            }
            empty && !self.topics.borrow().contains_key(topic) && !self.held.borrow().contains_key(topic)
        };
        if last {
            self.interest_down(topic);
        }
    }

    /// Hands broadcast `b` to the topic's listeners, if any.
    pub(crate) fn deliver_listeners(&self, b: &Broadcast) {
        let gone = {
            let listeners = self.listeners.borrow();
            if listeners.is_empty() {
                return;
            }
            let Some(list) = listeners.get(&*b.topic) else {
                return;
            };
            let msg = Message {
                topic: b.topic.to_string(),
                event: b.event.to_string(),
                payload: b.payload().clone(),
            };
            let mut gone = Vec::new();
            for listener in list {
                match listener {
                    Listener::Rust(sink) => {
                        if !sink.deliver(&msg) {
                            gone.push(sink.id);
                        }
                    }
                    Listener::Channel {
                        conn,
                        topic,
                        join_ref,
                    } => {
                        conn.mail(Mail::Info(topic.clone(), join_ref.clone(), Box::new(msg.clone())));
                    }
                }
            }
            gone
        };
        // Subscriptions dropped while their unsubscribe was lost (a full inbox).
        for id in gone {
            self.unlisten_rust(&b.topic, id);
        }
    }

    /// `Endpoint::send_info` on this core: `msg` to `handle_info` of every channel
    /// joined to `topic` and every channel listening to it.
    pub(crate) fn send_info_local(&self, topic: &str, msg: &dyn InfoMsg) {
        if let Some(subs) = self.topics.borrow().get(topic) {
            for sub in subs {
                let target = {
                    let channels = sub.conn.channels.borrow();
                    channels.position(topic).map(|i| {
                        let joined = channels.get(i);
                        (joined.topic.clone(), joined.join_ref.clone())
                    })
                };
                if let Some((topic, join_ref)) = target {
                    sub.conn.mail(Mail::Info(topic, join_ref, msg.clone_any()));
                }
            }
        }
        if let Some(list) = self.listeners.borrow().get(topic) {
            for listener in list {
                if let Listener::Channel {
                    conn,
                    topic,
                    join_ref,
                } = listener
                {
                    conn.mail(Mail::Info(topic.clone(), join_ref.clone(), msg.clone_any()));
                }
            }
        }
    }

    /// `RemoteChannelRef::send`: `msg` to the channel `(topic, join_ref)` of `conn`, if
    /// it is still joined.
    pub(crate) fn channel_info(
        &self,
        conn: ConnId,
        topic: &str,
        join_ref: &str,
        msg: Box<dyn std::any::Any>,
    ) {
        let Some(c) = self.conn_by_key(conn.key).filter(|c| c.id == conn) else {
            return;
        };
        let target = {
            let channels = c.channels.borrow();
            channels
                .position(topic)
                .map(|i| channels.get(i))
                .filter(|j| j.join_ref.json() == join_ref)
                .map(|j| (j.topic.clone(), j.join_ref.clone()))
        };
        if let Some((topic, join_ref)) = target {
            c.mail(Mail::Info(topic, join_ref, msg));
        }
    }

    /// A Rust subscription from outside the cores: listens, then tells `registered`
    /// once every other core acked the topic's interest (at most
    /// [`crate::shard::INTEREST_ACK_TIMEOUT`] later).
    pub(crate) fn listen_and_confirm(
        &self,
        topic: &str,
        sink: Arc<SubSink>,
        registered: crossbeam_channel::Sender<()>,
    ) {
        match self.listen(topic, Listener::Rust(sink)) {
            None => {
                let _ = registered.send(());
            }
            Some(ack) => {
                let deadline = self.clock().now_ms() + crate::shard::INTEREST_ACK_TIMEOUT.as_millis() as u64;
                self.confirm_when_acked(ack, deadline, registered);
            }
        }
    }

    fn confirm_when_acked(&self, ack: u64, deadline: u64, registered: crossbeam_channel::Sender<()>) {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if self.poll_interest_acked(ack, &mut cx) || self.clock().now_ms() >= deadline {
            let _ = registered.send(());
            return;
        }
        self.after(
            std::time::Duration::from_millis(1),
            Box::new(move |shard| shard.confirm_when_acked(ack, deadline, registered)),
        );
    }
}
