//! Each core's inbox for work from threads outside the server's cores (the `Endpoint`
//! from a plain thread, the cluster link): a bounded crossbeam channel plus a wake-up
//! the server provides (a byte on a Unix socket that the core reads through io_uring).
//! The core's driver drains it ([`InboxReceiver::drain`]) when woken.

use std::any::Any;
use std::sync::Arc;

use crate::proto::presence::{Delta, Meta};
use crate::shard::api::pubsub::{InfoMsg, SubSink};
use crate::shard::conn::ConnId;
use crate::shard::history::{Answer, Publish};
use crate::shard::stats::CoreStats;
use crate::shard::{Broadcast, Shard};

/// Tells a core that its inbox has work (called on the sender's thread).
pub(crate) type Wake = Arc<dyn Fn() + Send + Sync>;

/// Work handed to a core from outside.
pub(crate) enum CoreCommand {
    /// Deliver to this core's subscribers (the broadcast was published elsewhere).
    Deliver(Arc<Broadcast>),
    /// A presence delta from another node.
    Presence(Arc<str>, Arc<Delta>),
    /// Another node's complete presence on a topic (after it (re)joined the cluster).
    PresenceState(Arc<str>, u32, Arc<Vec<(Box<str>, Meta)>>),
    /// Every entry owned by these owners' node is gone ([`crate::proto::presence::Owner::node`]).
    DropNode(u32),
    /// Stop accepting, close every connection with 1001, drain, stop.
    Shutdown,
    /// Broadcast from a thread outside the cores ([`crate::Endpoint::broadcast`]):
    /// the core publishes it as its own channels would.
    Publish(Box<Publish>),
    /// The answer (from Redis, in cluster mode) to this core's history fetch `id`.
    HistoryReply(u64, Box<Answer>),
    /// Redis confirmed the node's subscription for this core's interest announcement
    /// `id` (or the link gave up on it: Redis is away); see [`super::acks`].
    InterestConfirmed(u64),
    /// A Rust subscription to a topic; `registered` hears once it listens and the other
    /// cores know.
    Listen {
        topic: Arc<str>,
        sink: Arc<SubSink>,
        registered: crossbeam_channel::Sender<()>,
    },
    /// The subscription with this id was dropped.
    Unlisten(Arc<str>, u64),
    /// `Endpoint::send_info`: for `handle_info` of every channel of the topic on this core.
    Info(Arc<str>, Box<dyn InfoMsg>),
    /// `RemoteChannelRef::send`: for `handle_info` of one channel.
    ChannelInfo {
        conn: ConnId,
        topic: Arc<str>,
        join_ref: Arc<str>,
        msg: Box<dyn Any + Send>,
    },
    /// `Endpoint::presence_list` from outside the cores: this core's view, as JSON.
    PresenceList(Arc<str>, crossbeam_channel::Sender<String>),
}

/// Commands a core's inbox holds; past it new ones are dropped and counted
/// (`ringcast_inbox_dropped_total`), except a shutdown and the answers a join waits for
/// (history, a subscription's confirmation), which wait for room.
pub(crate) const INBOX_BOUND: usize = 65_536;

/// The sending side of one core's inbox (`Send + Clone`).
#[derive(Clone)]
pub(crate) struct CoreInbox {
    tx: crossbeam_channel::Sender<CoreCommand>,
    wake: Wake,
    stats: Arc<CoreStats>,
}

impl CoreInbox {
    /// The counters of the core behind this inbox.
    pub(crate) fn stats(&self) -> &Arc<CoreStats> {
        &self.stats
    }

    /// Hands `cmd` to the core; a full inbox drops it (a core that far behind must not
    /// make its senders' memory grow) and counts the drop.
    pub(crate) fn send(&self, cmd: CoreCommand) {
        let sent = match cmd {
            // A shutdown, a subscription whose thread waits for it and a history answer
            // a join waits for, wait for room.
            CoreCommand::Shutdown
            | CoreCommand::Listen { .. }
            | CoreCommand::HistoryReply(..)
            | CoreCommand::InterestConfirmed(..) => self.tx.send(cmd).is_ok(),
            cmd => match self.tx.try_send(cmd) {
                Ok(()) => true,
                Err(crossbeam_channel::TrySendError::Full(_)) => {
                    self.stats.inbox_dropped.add_shared(1);
                    false
                }
                Err(crossbeam_channel::TrySendError::Disconnected(_)) => false,
            },
        };
        if sent {
            (self.wake)();
        }
    }
}

/// The receiving side, drained on its core.
pub(crate) struct InboxReceiver {
    rx: crossbeam_channel::Receiver<CoreCommand>,
}

/// A new inbox holding at most `bound` commands, counting its drops in `stats` (the
/// core's own); every accepted command calls `wake`.
pub(crate) fn inbox(bound: usize, stats: Arc<CoreStats>, wake: Wake) -> (CoreInbox, InboxReceiver) {
    let (tx, rx) = crossbeam_channel::bounded(bound);
    (CoreInbox { tx, wake, stats }, InboxReceiver { rx })
}

impl InboxReceiver {
    /// Runs every command waiting, in order; returns how many ran.
    pub(crate) fn drain(&self, shard: &Shard) -> usize {
        let mut n = 0;
        while let Ok(cmd) = self.rx.try_recv() {
            shard.run_command(cmd);
            n += 1;
        }
        n
    }

    /// The next command, if one comes within `timeout` (for fixtures standing in for
    /// a core).
    pub(crate) fn recv_timeout(&self, timeout: std::time::Duration) -> Option<CoreCommand> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// The next command waiting, if any.
    pub(crate) fn try_next(&self) -> Option<CoreCommand> {
        self.rx.try_recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Payload;

    #[test]
    fn a_full_inbox_drops_and_counts_but_keeps_a_shutdown() {
        let stats = Arc::new(CoreStats::default());
        let wakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = wakes.clone();
        let wake: Wake = Arc::new(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });
        let (tx, rx) = inbox(4, stats.clone(), wake);
        let deliver = || CoreCommand::Deliver(Arc::new(Broadcast::new("t", "e", Payload::empty(), None)));
        for _ in 0..6 {
            tx.send(deliver());
        }
        assert_eq!(stats.inbox_dropped.get(), 2, "two over the bound of four");
        assert_eq!(rx.rx.len(), 4);
        assert_eq!(
            wakes.load(std::sync::atomic::Ordering::Relaxed),
            4,
            "a wake-up per accepted command"
        );
        // A shutdown waits for room instead of being dropped.
        let sender = std::thread::spawn(move || tx.send(CoreCommand::Shutdown));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(rx.rx.try_recv().is_ok());
        sender.join().unwrap();
        let left: Vec<_> = rx.rx.try_iter().collect();
        assert_eq!(left.len(), 4);
        assert!(matches!(left.last(), Some(CoreCommand::Shutdown)));
        assert_eq!(stats.inbox_dropped.get(), 2);
    }
}
