//! `Socket`: what a channel's handlers hold, Phoenix's `socket` argument. It pushes to the
//! client, broadcasts to the topic, reads the connection's assigns and schedules
//! messages to the channel itself.

use std::any::Any;
use std::rc::{Rc, Weak};
use std::time::Duration;

use crate::proto::serializer::{encode, Body, Outgoing};
use crate::proto::{Payload, Ref};
use crate::shard::api::endpoint::Endpoint;
use crate::shard::conn::{Conn, Mail, OutFrame};
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
        }
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
