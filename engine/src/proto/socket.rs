//! The per-connection state machine of Phoenix channels as pure data: which topics this
//! connection has joined, under which join_ref, and where an incoming message goes
//! (PROTOCOL.md §7). No I/O, no handlers: the shard runs what this decides.

use std::rc::Rc;

use super::message::Ref;

/// Where an incoming message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `phoenix` / `heartbeat`: reply ok `{}`.
    Heartbeat,
    /// `phx_join` on a topic not joined here.
    Join,
    /// `phx_join` on a topic already joined: the channel at this index is replaced.
    Rejoin(usize),
    /// `phx_leave` on a topic not joined: reply ok `{}` anyway.
    LeaveUnjoined,
    /// Any other event on a topic not joined: reply error "unmatched topic".
    Unmatched,
    /// Deliver to the channel at this index (`phx_leave` included).
    Deliver(usize),
    /// A leftover of an earlier join of the topic: drop silently.
    Stale,
}

/// A joined topic on one connection.
#[derive(Debug)]
pub struct Joined<C> {
    /// The topic (shared with whatever else names it, e.g. the channel's socket).
    pub topic: Rc<str>,
    /// The `ref` of the join that created this channel.
    pub join_ref: Ref,
    /// What the runtime keeps per channel.
    pub state: C,
}

/// The channels of one connection: at most one per topic.
#[derive(Debug)]
pub struct ChannelTable<C> {
    joined: Vec<Joined<C>>,
}

impl<C> Default for ChannelTable<C> {
    fn default() -> Self {
        ChannelTable { joined: Vec::new() }
    }
}

impl<C> ChannelTable<C> {
    /// Decides where a message `(join_ref, topic, event)` goes.
    ///
    /// ```
    /// use ringcast::proto::socket::{ChannelTable, Route};
    /// let mut t = ChannelTable::default();
    /// assert_eq!(t.route(Some(&"1".into()), "rooms:a", "phx_join"), Route::Join);
    /// t.insert("rooms:a".into(), "1".into(), ());
    /// assert_eq!(t.route(Some(&"1".into()), "rooms:a", "new_msg"), Route::Deliver(0));
    /// assert_eq!(t.route(Some(&"0".into()), "rooms:a", "new_msg"), Route::Stale);
    /// // A join_ref is compared by value: the number 1 is not the string "1".
    /// assert_eq!(t.route(Some(&1i64.into()), "rooms:a", "new_msg"), Route::Stale);
    /// assert_eq!(t.route(None, "rooms:b", "new_msg"), Route::Unmatched);
    /// ```
    pub fn route(&self, join_ref: Option<&Ref>, topic: &str, event: &str) -> Route {
        if topic == "phoenix" && event == "heartbeat" {
            return Route::Heartbeat;
        }
        match (self.position(topic), event) {
            (None, "phx_join") => Route::Join,
            (None, "phx_leave") => Route::LeaveUnjoined,
            (None, _) => Route::Unmatched,
            (Some(i), "phx_join") => Route::Rejoin(i),
            (Some(i), _) => match join_ref {
                Some(jr) if *jr != self.joined[i].join_ref => Route::Stale,
                _ => Route::Deliver(i),
            },
        }
    }

    /// Index of the channel joined on `topic`.
    pub fn position(&self, topic: &str) -> Option<usize> {
        self.joined.iter().position(|j| &*j.topic == topic)
    }

    /// Records a joined channel; returns its index. The topic must not be joined already.
    pub fn insert(&mut self, topic: Rc<str>, join_ref: Ref, state: C) -> usize {
        debug_assert!(self.position(&topic).is_none());
        // Most connections join one or two topics: grow one slot at a time rather than
        // keeping room for four.
        self.joined.reserve_exact(1);
        self.joined.push(Joined {
            topic,
            join_ref,
            state,
        });
        self.joined.len() - 1
    }

    /// Removes the channel at `index`.
    pub fn remove(&mut self, index: usize) -> Joined<C> {
        self.joined.swap_remove(index)
    }

    /// The channel at `index`.
    pub fn get_mut(&mut self, index: usize) -> &mut Joined<C> {
        &mut self.joined[index]
    }

    /// The channel at `index`.
    pub fn get(&self, index: usize) -> &Joined<C> {
        &self.joined[index]
    }

    /// Number of joined channels.
    pub fn len(&self) -> usize {
        self.joined.len()
    }

    /// Whether no channel is joined.
    pub fn is_empty(&self) -> bool {
        self.joined.is_empty()
    }

    /// Removes every channel (connection end).
    pub fn drain(&mut self) -> impl Iterator<Item = Joined<C>> + '_ {
        self.joined.drain(..)
    }
}

/// Whether a route pattern matches a topic: exact, or `prefix*`.
///
/// ```
/// use ringcast::proto::socket::pattern_matches;
/// assert!(pattern_matches("rooms:*", "rooms:lobby"));
/// assert!(pattern_matches("rooms:*", "rooms:"));
/// assert!(!pattern_matches("rooms:*", "room:x"));
/// assert!(pattern_matches("lobby", "lobby") && !pattern_matches("lobby", "lobby2"));
/// ```
pub fn pattern_matches(pattern: &str, topic: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => pattern == topic,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Ref {
        Ref::from(s)
    }

    #[test]
    fn routing_table_of_section_seven() {
        let mut t: ChannelTable<u8> = ChannelTable::default();
        assert_eq!(t.route(None, "phoenix", "heartbeat"), Route::Heartbeat);
        assert_eq!(t.route(None, "x", "phx_leave"), Route::LeaveUnjoined);
        assert_eq!(t.route(Some(&r("9")), "x", "ping"), Route::Unmatched);
        t.insert("x".into(), "3".into(), 0);
        t.insert("y".into(), "4".into(), 1);
        assert_eq!(t.route(Some(&r("5")), "y", "phx_join"), Route::Rejoin(1));
        assert_eq!(t.route(None, "y", "ping"), Route::Deliver(1));
        assert_eq!(t.route(Some(&r("4")), "y", "phx_leave"), Route::Deliver(1));
        assert_eq!(t.route(Some(&r("3")), "y", "ping"), Route::Stale);
        let removed = t.remove(0);
        assert_eq!((&*removed.topic, removed.state), ("x", 0));
        assert_eq!(t.route(None, "y", "ping"), Route::Deliver(0));
        assert_eq!(t.route(None, "x", "ping"), Route::Unmatched);
        t.insert("n".into(), 7i64.into(), 2);
        assert_eq!(t.route(Some(&7i64.into()), "n", "ping"), Route::Deliver(1));
        assert_eq!(t.route(Some(&r("7")), "n", "ping"), Route::Stale);
        assert_eq!(t.drain().count(), 2);
        assert!(t.is_empty());
    }
}
