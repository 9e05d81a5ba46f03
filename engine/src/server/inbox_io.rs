//! The I/O half of a core's inbox: the wake-up is a byte on a Unix socket pair, and a
//! task on the core reads it through io_uring and drains the inbox.

use std::io::Write;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_lite::AsyncReadExt;

use crate::shard::inbox::{self, CoreInbox, InboxReceiver};
use crate::shard::stats::CoreStats;
use crate::shard::Shard;

/// One core's inbox: the sender for everyone, and what its core runs.
pub(crate) struct Inbox {
    receiver: InboxReceiver,
    wake: UnixStream,
    /// A wake-up byte is on its way: senders need not write another.
    pending: Arc<AtomicBool>,
}

/// A new inbox of at most `bound` commands whose senders wake the core through a Unix
/// socket pair.
pub(crate) fn inbox(bound: usize, stats: Arc<CoreStats>) -> std::io::Result<(CoreInbox, Inbox)> {
    let (wake_tx, wake_rx) = UnixStream::pair()?;
    wake_tx.set_nonblocking(true)?;
    let pending = Arc::new(AtomicBool::new(false));
    let flag = pending.clone();
    // One byte per drain at most: while a wake-up is pending, senders write nothing (a
    // full wake socket means one is pending too).
    let wake: inbox::Wake = Arc::new(move || {
        if !flag.swap(true, Ordering::AcqRel) {
            let _ = (&wake_tx).write(&[1]);
        }
    });
    let (tx, receiver) = inbox::inbox(bound, stats, wake);
    Ok((
        tx,
        Inbox {
            receiver,
            wake: wake_rx,
            pending,
        },
    ))
}

impl Inbox {
    /// Runs commands as they come, until every sender is gone.
    pub(crate) async fn run(self, shard: Rc<Shard>) {
        // SAFETY: `wake` is a connected Unix stream socket owned by this task from here on.
        let mut wake = unsafe { glommio::net::UnixStream::from_raw_fd(self.wake.into_raw_fd()) };
        let mut buf = [0u8; 64];
        loop {
            // Cleared before draining: a command sent from here on writes a new byte. A
            // swap, so that one whose sender saw the flag still set is visible to the
            // drain (both sides read-modify-write the flag).
            self.pending.swap(false, Ordering::AcqRel);
            self.receiver.drain(&shard);
            match wake.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}
