//! Each core's inbox for work from threads outside the server's cores (the `Endpoint`
//! from a plain thread, the cluster link): a crossbeam channel plus a wake-up byte on
//! a Unix socket that the core reads through io_uring.

use std::io::Write;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::Arc;

use futures_lite::AsyncReadExt;

use crate::proto::presence::{Delta, Meta};
use crate::shard::stats::CoreStats;
use crate::shard::{Broadcast, Shard};

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
}

/// Commands a core's inbox holds; past it new ones are dropped and counted
/// (`ringcast_inbox_dropped_total`), except a shutdown, which waits for room.
pub(crate) const INBOX_BOUND: usize = 65_536;

/// The sending side of one core's inbox (`Send + Clone`).
#[derive(Clone)]
pub(crate) struct CoreInbox {
    tx: crossbeam_channel::Sender<CoreCommand>,
    wake: Arc<UnixStream>,
    stats: Arc<CoreStats>,
}

impl CoreInbox {
    /// Hands `cmd` to the core; a full inbox drops it (a core that far behind must not
    /// make its senders' memory grow) and counts the drop.
    pub(crate) fn send(&self, cmd: CoreCommand) {
        let sent = match cmd {
            CoreCommand::Shutdown => self.tx.send(cmd).is_ok(),
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
            // A full wake socket means a wake-up is pending already.
            let _ = (&*self.wake).write(&[1]);
        }
    }
}

/// The receiving side, run by a task on its core.
pub(crate) struct InboxReceiver {
    rx: crossbeam_channel::Receiver<CoreCommand>,
    wake: UnixStream,
}

/// A new inbox holding at most `bound` commands, counting its drops in `stats` (the
/// core's own).
pub(crate) fn inbox(bound: usize, stats: Arc<CoreStats>) -> std::io::Result<(CoreInbox, InboxReceiver)> {
    let (tx, rx) = crossbeam_channel::bounded(bound);
    let (wake_tx, wake_rx) = UnixStream::pair()?;
    wake_tx.set_nonblocking(true)?;
    Ok((
        CoreInbox {
            tx,
            wake: Arc::new(wake_tx),
            stats,
        },
        InboxReceiver { rx, wake: wake_rx },
    ))
}

impl InboxReceiver {
    /// Runs commands as they come, until every sender is gone.
    pub(crate) async fn run(self, shard: Rc<Shard>) {
        // SAFETY: `wake` is a connected Unix stream socket owned by this task from here on.
        let mut wake = unsafe { glommio::net::UnixStream::from_raw_fd(self.wake.into_raw_fd()) };
        let mut buf = [0u8; 64];
        loop {
            while let Ok(cmd) = self.rx.try_recv() {
                shard.run_command(cmd);
            }
            match wake.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Payload;

    #[test]
    fn a_full_inbox_drops_and_counts_but_keeps_a_shutdown() {
        let stats = Arc::new(CoreStats::default());
        let (tx, rx) = inbox(4, stats.clone()).unwrap();
        let deliver = || CoreCommand::Deliver(Arc::new(Broadcast::new("t", "e", Payload::empty(), None)));
        for _ in 0..6 {
            tx.send(deliver());
        }
        assert_eq!(stats.inbox_dropped.get(), 2, "two over the bound of four");
        assert_eq!(rx.rx.len(), 4);
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
