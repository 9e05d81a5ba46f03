//! `Socket`: what a channel's handlers hold, Phoenix's `socket` argument. It pushes to the
//! client, broadcasts to the topic, reads the connection's assigns and schedules
//! messages to the channel itself.

use std::any::Any;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::proto::serializer::{encode, Body, Outgoing};
use crate::proto::{Payload, Ref};
use crate::shard::api::endpoint::Endpoint;
use crate::shard::api::pubsub::RemoteChannelRef;
use crate::shard::conn::{Conn, Mail, OutFrame};
use crate::shard::listeners::Listener;
use crate::shard::Shard;

/// One channel's view of its connection.
pub struct Socket {
    pub(crate) conn: Rc<Conn>,
    pub(crate) shard: Rc<Shard>,
    pub(crate) topic: Rc<str>,
    pub(crate) join_ref: Ref,
    /// Pushes made while joining wait here until the join reply has gone out.
    pub(crate) deferred: Option<Vec<OutFrame>>,
    /// While `handle_out` runs for a broadcast on a topic with history: its position,
    /// which the pushes it makes carry in their `ref`.
    pub(crate) position: Option<Ref>,
    /// What the channel holds beyond its own topic, let go when it ends.
    extras: Option<Box<Extras>>,
}

/// A channel's subscriptions to other topics, its presences on them, and the liveness
/// its remote refs read. Most channels have none: one pointer, allocated at first use.
#[derive(Default)]
struct Extras {
    listens: Vec<Box<str>>,
    tracks_on: Vec<(Rc<str>, Box<str>)>,
    alive: Option<Arc<AtomicBool>>,
}

impl Socket {
    pub(crate) fn new(conn: Rc<Conn>, shard: Rc<Shard>, topic: Rc<str>, join_ref: Ref) -> Self {
        Socket {
            conn,
            shard,
            topic,
            join_ref,
            deferred: Some(Vec::new()),
            position: None,
            extras: None,
        }
    }

    fn extras(&mut self) -> &mut Extras {
        self.extras.get_or_insert_with(Box::default)
    }

    /// The joined topic, e.g. `rooms:lobby`.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The ref of the join that created this channel, as the client sent it.
    pub fn join_ref(&self) -> &Ref {
        &self.join_ref
    }

    /// The connection's assigns, as returned by [`crate::SocketHandler::connect`].
    ///
    /// # Panics
    /// If `T` is not the handler's `Assigns` type.
    pub fn assigns<T: 'static>(&self) -> &T {
        self.try_assigns().expect("assigns of another type")
    }

    /// The connection's assigns, if they are a `T`.
    pub fn try_assigns<T: 'static>(&self) -> Option<&T> {
        self.conn.assigns.downcast_ref()
    }

    /// Pushes `event` to this client on this channel (carries the join_ref). From
    /// `handle_out` on a topic with history, the push carries the broadcast's position
    /// in its `ref`, so that a client tracking positions never sees it twice.
    pub fn push(&mut self, event: &str, payload: impl Into<Payload>) {
        let payload = payload.into();
        let msg = Outgoing {
            msg_ref: self.position.as_ref(),
            ..Outgoing::push(Some(&self.join_ref), &self.topic, event, &payload)
        };
        match encode(self.conn.vsn, &msg) {
            Ok(frame) => match self.deferred.as_mut() {
                Some(deferred) => deferred.push(OutFrame::Own(frame)),
                None => self.conn.enqueue_own(frame),
            },
            Err(e) => tracing::debug!(topic = %self.topic, event, "push dropped: {e}"),
        }
    }

    fn push_json_text(&mut self, event: &str, json: &str) {
        let msg = Outgoing {
            join_ref: Some(&self.join_ref),
            msg_ref: None,
            topic: &self.topic,
            event,
            body: Body::RawJson(json),
        };
        if let Ok(frame) = encode(self.conn.vsn, &msg) {
            match self.deferred.as_mut() {
                Some(deferred) => deferred.push(OutFrame::PresenceOwn(frame)),
                None => self.conn.enqueue(OutFrame::PresenceOwn(frame)),
            }
        }
    }

    /// Tracks this connection in the topic's presence under `key` with `meta` (a JSON
    /// object; `phx_ref` is added). Every member, this one included, gets a
    /// `presence_diff`. Track after the join, as Phoenix does (from `handle_info` of a
    /// message the join sent itself), so that this connection sees its own diff.
    /// Leaving, crashing or disconnecting untracks.
    pub fn track(&self, key: &str, meta: serde_json::Value) {
        self.shard.presence_track(&self.conn, &self.topic, key, meta);
    }

    /// Replaces this connection's meta under `key`; `false` if it tracked no such key.
    pub fn update_presence(&self, key: &str, meta: serde_json::Value) -> bool {
        self.shard.presence_update(&self.conn, &self.topic, key, meta)
    }

    /// Stops tracking this connection under `key`.
    pub fn untrack(&self, key: &str) {
        self.shard.presence_untrack(&self.conn, &self.topic, Some(key));
    }

    /// Every presence on this topic, on every core: `{key: {"metas": [...]}}`.
    pub fn presence_list(&self) -> serde_json::Value {
        serde_json::from_str(&self.shard.presence_state_json(&self.topic)).unwrap_or_default()
    }

    /// Pushes `presence_state` (the current list) to this client.
    pub fn push_presence_state(&mut self) {
        let json = self.shard.presence_state_json(&self.topic);
        self.push_json_text("presence_state", &json);
    }

    /// Broadcasts `event` to every subscriber of this topic, on every core, this one
    /// included.
    pub fn broadcast(&self, event: &str, payload: impl Into<Payload>) {
        self.shard.broadcast(&self.topic, event, payload.into(), None);
    }

    /// Broadcasts `event` to every subscriber of this topic but this channel.
    pub fn broadcast_from(&self, event: &str, payload: impl Into<Payload>) {
        let from = Some((self.shard.index, self.conn.id));
        self.shard.broadcast(&self.topic, event, payload.into(), from);
    }

    /// A handle that sends messages to this channel's `handle_info` later, from any task
    /// on this core.
    pub fn channel_ref(&self) -> ChannelRef {
        ChannelRef {
            conn: Rc::downgrade(&self.conn),
            topic: self.topic.clone(),
            join_ref: self.join_ref.clone(),
        }
    }

    /// Sends `msg` to this channel's `handle_info` after `delay`.
    pub fn send_after(&self, msg: impl Any, delay: Duration) {
        let target = self.channel_ref();
        self.shard.after(delay, Box::new(move |_| target.send(msg)));
    }

    /// The endpoint of the server this channel runs in.
    pub fn endpoint(&self) -> Endpoint {
        self.shard.endpoint.clone()
    }

    /// Listens to `topic` as well (Phoenix's `PubSub.subscribe` in a channel): its
    /// broadcasts arrive in this channel's `handle_info` as a
    /// [`crate::api::pubsub::Message`], until [`Socket::unsubscribe`] or the channel
    /// ends. Broadcasts from other cores reach it once they learnt of it (microseconds).
    pub fn subscribe(&mut self, topic: &str) {
        if self
            .extras
            .as_ref()
            .is_some_and(|e| e.listens.iter().any(|t| &**t == topic))
        {
            return;
        }
        self.shard.listen(
            topic,
            Listener::Channel {
                conn: self.conn.clone(),
                topic: self.topic.clone(),
                join_ref: self.join_ref.clone(),
            },
        );
        self.extras().listens.push(topic.into());
    }

    /// Stops listening to `topic`.
    pub fn unsubscribe(&mut self, topic: &str) {
        let Some(extras) = self.extras.as_mut() else {
            return;
        };
        let Some(i) = extras.listens.iter().position(|t| &**t == topic) else {
            return;
        };
        extras.listens.swap_remove(i);
        self.shard.unlisten_channel(topic, self.conn.id, &self.topic);
    }

    /// Tracks this connection in the presence of `topic`, a topic other than the
    /// channel's own, under `key` with `meta`. It leaves when the channel ends, or with
    /// [`Socket::untrack_on`].
    pub fn track_on(&mut self, topic: &str, key: &str, meta: serde_json::Value) {
        let topic: Rc<str> = topic.into();
        self.shard.presence_track(&self.conn, &topic, key, meta);
        self.extras().tracks_on.push((topic, key.into()));
    }

    /// Stops tracking this connection on `topic` under `key` (after `track_on`).
    pub fn untrack_on(&mut self, topic: &str, key: &str) {
        self.shard.presence_untrack(&self.conn, topic, Some(key));
        if let Some(extras) = self.extras.as_mut() {
            extras.tracks_on.retain(|(t, k)| !(&**t == topic && &**k == key));
        }
    }

    /// A `Send + Clone` handle to this channel for other threads and runtimes: what it
    /// sends arrives in `handle_info`; once the channel ends, `send` returns `false`.
    ///
    /// # Panics
    /// In a channel of a server with no core inboxes (the test kit has none).
    pub fn remote_ref(&mut self) -> RemoteChannelRef {
        let core = self
            .shard
            .endpoint
            .core_inbox(self.shard.index)
            .expect("remote_ref needs a running server")
            .clone();
        let alive = self
            .extras()
            .alive
            .get_or_insert_with(|| Arc::new(AtomicBool::new(true)))
            .clone();
        RemoteChannelRef {
            core,
            conn: self.conn.id,
            topic: Arc::from(&*self.topic),
            join_ref: Arc::from(self.join_ref.json()),
            alive,
        }
    }
}

impl Drop for Socket {
    /// The channel ended (or never joined): its other subscriptions and presences go,
    /// and its remote refs see it gone.
    fn drop(&mut self) {
        let Some(extras) = self.extras.take() else { return };
        for topic in &extras.listens {
            self.shard.unlisten_channel(topic, self.conn.id, &self.topic);
        }
        for (topic, key) in &extras.tracks_on {
            self.shard.presence_untrack(&self.conn, topic, Some(key));
        }
        if let Some(alive) = &extras.alive {
            alive.store(false, Ordering::Release);
        }
    }
}

/// Sends messages to one channel's `handle_info` (Phoenix's `send(pid, msg)`). Dropped
/// silently once the channel or its connection is gone.
#[derive(Clone)]
pub struct ChannelRef {
    conn: Weak<Conn>,
    topic: Rc<str>,
    join_ref: Ref,
}

impl ChannelRef {
    /// Delivers `msg` to the channel, if it is still joined.
    pub fn send(&self, msg: impl Any) {
        if let Some(conn) = self.conn.upgrade() {
            conn.mail(Mail::Info(
                self.topic.clone(),
                self.join_ref.clone(),
                Box::new(msg),
            ));
        }
    }
}
