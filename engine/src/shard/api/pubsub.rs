//! The embedder's half of Phoenix's PubSub: listen to a topic from Rust code that is not
//! a channel ([`Subscription`], from `Endpoint::subscribe`), and reach a channel from any
//! thread ([`RemoteChannelRef`]).
//!
//! A subscription lives on one core, which delivers every broadcast on its topic to it
//! in the order that core saw them, wherever they came from. Its queue is bounded: a
//! subscriber that does not keep up never blocks the core; what does not fit is counted
//! and reported to it as [`Lagged`], in its place in the stream, as tokio's broadcast
//! channel does.

use std::any::Any;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::proto::Payload;
use crate::shard::conn::ConnId;
use crate::shard::inbox::{CoreCommand, CoreInbox};
use crate::shard::stats::CoreStats;

/// A broadcast as a Rust subscriber (or a channel's `handle_info`, for topics it
/// subscribed to with [`crate::Socket::subscribe`]) receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The topic it was broadcast on.
    pub topic: String,
    /// Its event.
    pub event: String,
    /// Its payload: a JSON value or bytes.
    pub payload: Payload,
}

/// The subscriber did not keep up: `missed` broadcasts did not fit in its queue and are
/// lost to it. The stream goes on after them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("subscriber lagged: {missed} broadcast(s) missed")]
pub struct Lagged {
    /// Broadcasts dropped since the last message.
    pub missed: u64,
}

/// What a subscription's queue holds: a message, or the place where some were lost.
pub(crate) enum Item {
    Msg(Message),
    Lagged(u64),
}

/// The core's side of a subscription: a bounded queue into it, and its waker.
pub(crate) struct SubSink {
    pub(crate) id: u64,
    tx: crossbeam_channel::Sender<Item>,
    /// Broadcasts dropped and not yet reported, shared with the subscription.
    missed: Arc<AtomicU64>,
    waker: Arc<Mutex<Option<Waker>>>,
    stats: Arc<CoreStats>,
}

impl SubSink {
    /// Queues `msg`, or counts it missed when the queue is full. Never blocks. `false`
    /// once the subscription is gone (dropped while its unsubscribe was lost).
    pub(crate) fn deliver(&self, msg: &Message) -> bool {
        use crossbeam_channel::TrySendError;
        // A gap not yet reported takes its place in the stream before this message
        // (the subscriber may also have taken it, finding its queue empty).
        let gap = self.missed.swap(0, Ordering::AcqRel);
        let sent = match gap {
            0 => Ok(()),
            n => self.tx.try_send(Item::Lagged(n)).map_err(|e| (e, n)),
        }
        .and_then(|()| self.tx.try_send(Item::Msg(msg.clone())).map_err(|e| (e, 0)));
        match sent {
            Ok(()) => {}
            Err((TrySendError::Full(_), unreported)) => {
                self.missed.fetch_add(unreported + 1, Ordering::AcqRel);
                self.stats.subscription_lagged.add(1);
            }
            Err((TrySendError::Disconnected(_), _)) => return false,
        }
        if let Some(w) = self.waker.lock().expect("waker lock").as_ref() {
            w.wake_by_ref();
        }
        true
    }
}

static NEXT_SUBSCRIPTION: AtomicU64 = AtomicU64::new(1);

/// A subscription to one topic (`Endpoint::subscribe`): every broadcast on it, exactly
/// once, in the order its core delivered them.
///
/// As an [`Iterator`] it blocks until the next message (for plain threads); as a
/// [`futures_core::Stream`] it waits without blocking, on any runtime. Both end (`None`)
/// when the server stops. Dropping it unsubscribes.
pub struct Subscription {
    topic: Arc<str>,
    id: u64,
    rx: crossbeam_channel::Receiver<Item>,
    missed: Arc<AtomicU64>,
    waker: Arc<Mutex<Option<Waker>>>,
    /// Where it listens: the server, the core and that core's inbox (none in the test
    /// kit, where the only core is the caller's).
    endpoint: u64,
    core: usize,
    inbox: Option<CoreInbox>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic)
            .field("queued", &self.rx.len())
            .finish()
    }
}

impl Subscription {
    /// A subscription to `topic` on core `core` of server `endpoint` (reached through
    /// `inbox` from other threads), with room for `bound` messages, and the sink for
    /// that core to deliver into, counting in `stats`.
    pub(crate) fn new(
        topic: &str,
        bound: usize,
        (endpoint, core, inbox): (u64, usize, Option<CoreInbox>),
        stats: Arc<CoreStats>,
    ) -> (Subscription, Arc<SubSink>) {
        let (tx, rx) = crossbeam_channel::bounded(bound.max(1));
        let waker = Arc::new(Mutex::new(None));
        let id = NEXT_SUBSCRIPTION.fetch_add(1, Ordering::Relaxed);
        let missed = Arc::new(AtomicU64::new(0));
        let sink = Arc::new(SubSink {
            id,
            tx,
            missed: missed.clone(),
            waker: waker.clone(),
            stats,
        });
        let sub = Subscription {
            topic: topic.into(),
            id,
            rx,
            missed,
            waker,
            endpoint,
            core,
            inbox,
        };
        (sub, sink)
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The next message if one is queued, without waiting.
    pub fn try_next(&mut self) -> Option<Result<Message, Lagged>> {
        match self.rx.try_recv() {
            Ok(i) => Some(item(i)),
            Err(_) => self.gap(),
        }
    }

    /// The next message, waiting at most `timeout`; `None` on timeout or once the
    /// server stopped.
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<Result<Message, Lagged>> {
        self.try_next()
            .or_else(|| self.rx.recv_timeout(timeout).ok().map(item))
    }

    /// The next message, awaited without blocking the thread (any runtime): the
    /// [`futures_core::Stream`] as one call, as tokio's `broadcast::Receiver::recv`.
    /// (`StreamExt::next` works too, called as `StreamExt::next(&mut sub)`: the
    /// blocking `Iterator::next` has the same name.)
    pub async fn recv(&mut self) -> Option<Result<Message, Lagged>> {
        std::future::poll_fn(|cx| futures_core::Stream::poll_next(Pin::new(&mut *self), cx)).await
    }

    /// With the queue empty: what was missed since its last message, if anything.
    fn gap(&self) -> Option<Result<Message, Lagged>> {
        match self.missed.swap(0, Ordering::AcqRel) {
            0 => None,
            missed => Some(Err(Lagged { missed })),
        }
    }
}

fn item(i: Item) -> Result<Message, Lagged> {
    match i {
        Item::Msg(m) => Ok(m),
        Item::Lagged(missed) => Err(Lagged { missed }),
    }
}

impl Iterator for Subscription {
    type Item = Result<Message, Lagged>;

    /// Blocks until the next message; `None` once the server stopped.
    fn next(&mut self) -> Option<Self::Item> {
        self.try_next().or_else(|| self.rx.recv().ok().map(item))
    }
}

impl futures_core::Stream for Subscription {
    type Item = Result<Message, Lagged>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match this.rx.try_recv() {
                Ok(i) => return Poll::Ready(Some(item(i))),
                Err(crossbeam_channel::TryRecvError::Disconnected) => return Poll::Ready(None),
                Err(crossbeam_channel::TryRecvError::Empty) => {
                    if let Some(gap) = this.gap() {
                        return Poll::Ready(Some(gap));
                    }
                }
            }
            let mut slot = this.waker.lock().expect("waker lock");
            if slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                // Registered before: a message that came since would have woken us.
                if this.rx.is_empty() {
                    return Poll::Pending;
                }
                continue;
            }
            *slot = Some(cx.waker().clone());
            drop(slot);
            // Look again: a message may have come before the waker was in place.
            if this.rx.is_empty() {
                return Poll::Pending;
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        match crate::shard::current() {
            Ok(shard) if shard.endpoint.id() == self.endpoint && shard.index == self.core => {
                shard.unlisten_rust(&self.topic, self.id)
            }
            _ => {
                if let Some(inbox) = &self.inbox {
                    inbox.send(CoreCommand::Unlisten(self.topic.clone(), self.id));
                }
            }
        }
    }
}

/// A value `Endpoint::send_info` hands to every channel of a topic: cloned for each.
pub(crate) trait InfoMsg: Send {
    /// A copy for one channel.
    fn clone_any(&self) -> Box<dyn Any>;
    /// A copy for another core.
    fn clone_box(&self) -> Box<dyn InfoMsg>;
}

impl<T: Any + Send + Clone> InfoMsg for T {
    fn clone_any(&self) -> Box<dyn Any> {
        Box::new(self.clone())
    }
    fn clone_box(&self) -> Box<dyn InfoMsg> {
        Box::new(self.clone())
    }
}

/// A `Send + Clone` handle to one channel (`Socket::remote_ref`), Phoenix's
/// `send(pid, msg)` from any thread or runtime: what it sends arrives in the channel's
/// `handle_info`, on the channel's core.
#[derive(Clone)]
pub struct RemoteChannelRef {
    pub(crate) core: CoreInbox,
    pub(crate) conn: ConnId,
    pub(crate) topic: Arc<str>,
    pub(crate) join_ref: Arc<str>,
    /// Cleared when the channel ends.
    pub(crate) alive: Arc<AtomicBool>,
}

impl std::fmt::Debug for RemoteChannelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteChannelRef")
            .field("topic", &self.topic)
            .field("alive", &self.alive())
            .finish()
    }
}

impl RemoteChannelRef {
    /// Sends `msg` to the channel's `handle_info`. `false` once the channel has ended
    /// (the message is dropped). A message sent just as the channel ends is dropped on
    /// its core.
    pub fn send(&self, msg: impl Any + Send) -> bool {
        if !self.alive() {
            return false;
        }
        self.core.send(CoreCommand::ChannelInfo {
            conn: self.conn,
            topic: self.topic.clone(),
            join_ref: self.join_ref.clone(),
            msg: Box::new(msg),
        });
        true
    }

    /// Whether the channel is still joined.
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }
}
