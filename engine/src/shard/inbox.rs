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

/// The sending side of one core's inbox (`Send + Clone`).
#[derive(Clone)]
pub(crate) struct CoreInbox {
    tx: crossbeam_channel::Sender<CoreCommand>,
    wake: Arc<UnixStream>,
}

impl CoreInbox {
    pub(crate) fn send(&self, cmd: CoreCommand) {
        if self.tx.send(cmd).is_ok() {
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

/// A new inbox.
pub(crate) fn inbox() -> std::io::Result<(CoreInbox, InboxReceiver)> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let (wake_tx, wake_rx) = UnixStream::pair()?;
    wake_tx.set_nonblocking(true)?;
    Ok((
        CoreInbox {
            tx,
            wake: Arc::new(wake_tx),
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
