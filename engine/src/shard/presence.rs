//! Presence on a shard: this core's replica of every topic's presences, the deltas it
//! issues for its own connections (replicated to the other cores over the mesh), and
//! the `presence_diff` broadcasts to its local subscribers.
//!
//! Diffs are batched per topic: the first change after a quiet spell goes out at once,
//! changes that follow within [`DIFF_WINDOW`] are merged into one diff sent at the end
//! of the window. A join storm of thousands thus costs each member a few diffs a
//! second, not thousands.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crate::proto::presence::{Delta, Diff, Meta, Owner, PresenceState};
use crate::shard::conn::Conn;
use crate::shard::{Broadcast, Shard};

/// How long diffs to one topic are merged after one was sent.
pub(crate) const DIFF_WINDOW: Duration = Duration::from_millis(50);

/// What one connection tracked: needed to untrack it when its channel or itself ends.
#[derive(Debug, Clone)]
pub(crate) struct Tracked {
    pub(crate) topic: Rc<str>,
    pub(crate) key: Box<str>,
    pub(crate) phx_ref: Box<str>,
}

/// A topic inside a batching window: what changed since its last diff went out.
#[derive(Default)]
struct Outbox {
    pending: Option<Diff>,
}

pub(crate) struct PresenceHub {
    state: RefCell<PresenceState>,
    outbox: RefCell<HashMap<Box<str>, Outbox>>,
    nonce: u64,
    next_ref: Cell<u64>,
}

impl PresenceHub {
    pub(crate) fn new() -> Self {
        let nonce = crate::clock::unix_nanos();
        PresenceHub {
            state: RefCell::default(),
            outbox: RefCell::default(),
            nonce,
            next_ref: Cell::new(0),
        }
    }

    fn new_ref(&self, core: usize) -> Box<str> {
        let n = self.next_ref.get() + 1;
        self.next_ref.set(n);
        format!("F{:x}-{core}-{n:x}", self.nonce).into_boxed_str()
    }

    pub(crate) fn list_json(&self, topic: &str) -> String {
        self.state.borrow().list_json(topic)
    }

    /// Presences on `topic` (every core's and node's).
    pub(crate) fn count(&self, topic: &str) -> usize {
        self.state.borrow().count(topic)
    }
}

impl Shard {
    /// Tracks `conn` under `key` on `topic` with the application's `fields`.
    pub(crate) fn presence_track(&self, conn: &Conn, topic: &Rc<str>, key: &str, fields: serde_json::Value) {
        let phx_ref = self.presence.new_ref(self.index);
        let meta = Meta::new(
            fields,
            phx_ref.clone(),
            None,
            Owner::new(self.node_id(), self.index, conn.id.key),
        );
        conn.tracked.borrow_mut().push(Tracked {
            topic: topic.clone(),
            key: key.into(),
            phx_ref,
        });
        self.presence_issue(
            topic,
            Delta {
                joins: vec![(key.into(), meta)],
                leaves: vec![],
            },
        );
    }

    /// Replaces the meta of `conn` under `key` on `topic` (a leave of the old meta and a
    /// join of the new one, which carries `phx_ref_prev`).
    pub(crate) fn presence_update(
        &self,
        conn: &Conn,
        topic: &Rc<str>,
        key: &str,
        fields: serde_json::Value,
    ) -> bool {
        let phx_ref = self.presence.new_ref(self.index);
        let prev = {
            let mut tracked = conn.tracked.borrow_mut();
            let Some(t) = tracked.iter_mut().find(|t| *t.topic == **topic && &*t.key == key) else {
                return false;
            };
            std::mem::replace(&mut t.phx_ref, phx_ref.clone())
        };
        let meta = Meta::new(
            fields,
            phx_ref,
            Some(&prev),
            Owner::new(self.node_id(), self.index, conn.id.key),
        );
        self.presence_issue(
            topic,
            Delta {
                joins: vec![(key.into(), meta)],
                leaves: vec![(key.into(), prev)],
            },
        );
        true
    }

    /// Untracks what `conn` tracked on `topic` (under `key`, or every key).
    pub(crate) fn presence_untrack(&self, conn: &Conn, topic: &str, key: Option<&str>) {
        let gone: Vec<Tracked> = {
            let mut tracked = conn.tracked.borrow_mut();
            let (gone, kept): (Vec<Tracked>, Vec<Tracked>) = tracked
                .drain(..)
                .partition(|t| &*t.topic == topic && key.is_none_or(|k| &*t.key == k));
            *tracked = kept.into_iter().collect();
            gone
        };
        if gone.is_empty() {
            return;
        }
        let topic = gone[0].topic.clone();
        let leaves = gone.into_iter().map(|t| (t.key, t.phx_ref)).collect();
        self.presence_issue(
            &topic,
            Delta {
                joins: vec![],
                leaves,
            },
        );
    }

    /// Untracks everything `conn` tracked (the connection ended).
    pub(crate) fn presence_untrack_all(&self, conn: &Conn) {
        let topics: Vec<Rc<str>> = conn.tracked.borrow().iter().map(|t| t.topic.clone()).collect();
        for topic in topics {
            self.presence_untrack(conn, &topic, None);
        }
    }

    /// Applies a delta this core issued and replicates it to the other cores.
    fn presence_issue(&self, topic: &Rc<str>, delta: Delta) {
        let delta = Arc::new(delta);
        if let Some(mesh) = &self.mesh {
            mesh.replicate_presence(topic, &delta);
        }
        if let Some(cluster) = self.endpoint.cluster() {
            cluster.presence(topic, &delta);
        }
        self.presence_apply(topic, &delta);
    }

    fn node_id(&self) -> u32 {
        self.endpoint.cluster().map_or(0, |c| c.node())
    }

    /// Another node's full presence on `topic` replaces what this replica held of it.
    pub(crate) fn presence_replace_node(&self, topic: &str, node: u32, entries: &[(Box<str>, Meta)]) {
        let diff = self
            .presence
            .state
            .borrow_mut()
            .replace_origin(topic, |o| o.node() == node, entries);
        if !diff.is_empty() {
            self.presence_queue_diff(topic, diff);
        }
    }

    /// A node died: its presences leave.
    pub(crate) fn presence_drop_node(&self, node: u32) {
        let diffs = self.presence.state.borrow_mut().drop_owner(|o| o.node() == node);
        for (topic, diff) in diffs {
            self.presence_queue_diff(&topic, diff);
        }
    }

    /// Applies a delta (ours or replicated) and schedules the resulting diff.
    pub(crate) fn presence_apply(self: &Shard, topic: &str, delta: &Delta) {
        let diff = self.presence.state.borrow_mut().apply(topic, delta);
        if !diff.is_empty() {
            self.presence_queue_diff(topic, diff);
        }
    }

    fn presence_queue_diff(&self, topic: &str, diff: Diff) {
        let mut outboxes = self.presence.outbox.borrow_mut();
        match outboxes.get_mut(topic) {
            // Inside a window: merge; the scheduled flush sends it.
            Some(outbox) => match outbox.pending.as_mut() {
                Some(pending) => pending.merge(diff),
                None => outbox.pending = Some(diff),
            },
            // Quiet topic: send now and open a window.
            None => {
                outboxes.insert(topic.into(), Outbox::default());
                drop(outboxes);
                self.send_diff(topic, &diff);
                self.presence_schedule_flush(topic);
            }
        }
    }

    fn presence_schedule_flush(&self, topic: &str) {
        let topic: Box<str> = topic.into();
        self.after(DIFF_WINDOW, Box::new(move |shard| shard.presence_flush(&topic)));
    }

    /// End of a window: send what accumulated and open a new window, or close it.
    fn presence_flush(&self, topic: &str) {
        let pending = {
            let mut outboxes = self.presence.outbox.borrow_mut();
            match outboxes.get_mut(topic).map(|o| o.pending.take()) {
                Some(Some(diff)) => diff,
                _ => {
                    outboxes.remove(topic);
                    return;
                }
            }
        };
        if !pending.is_empty() {
            self.send_diff(topic, &pending);
        }
        self.presence_schedule_flush(topic);
    }

    fn send_diff(&self, topic: &str, diff: &Diff) {
        let json = match &self.app.presence_fetch {
            Some(fetch) => {
                let mut value: serde_json::Value = serde_json::from_str(&diff.to_json()).unwrap_or_default();
                for side in ["joins", "leaves"] {
                    fetch(topic, &mut value[side]);
                }
                value.to_string()
            }
            None => diff.to_json(),
        };
        self.deliver_local(&Arc::new(Broadcast::raw(topic, "presence_diff", json)));
    }

    /// The `presence_state` payload for `topic`, through the fetch hook if any.
    /// Presences on `topic`, every core's and node's.
    pub(crate) fn presence_count(&self, topic: &str) -> usize {
        self.presence.count(topic)
    }

    pub(crate) fn presence_state_json(&self, topic: &str) -> String {
        let json = self.presence.list_json(topic);
        match &self.app.presence_fetch {
            Some(fetch) => {
                let mut value: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
                fetch(topic, &mut value);
                value.to_string()
            }
            None => json,
        }
    }
}
