//! `Endpoint`: broadcast to a topic from anywhere, like `MyAppWeb.Endpoint.broadcast/3`.

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::proto::Payload;
use crate::shard;
use crate::shard::api::pubsub::{InfoMsg, Subscription};
use crate::shard::cluster::ClusterHandle;
use crate::shard::history::Publish;
use crate::shard::inbox::{CoreCommand, CoreInbox};
use crate::shard::listeners::Listener;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

struct Inner {
    id: u64,
    cores: Vec<CoreInbox>,
    cluster: Option<ClusterHandle>,
    /// Set the moment a shutdown is asked for, from any thread, before the cores hear
    /// of it through their inboxes.
    draining: AtomicBool,
    /// Messages a Rust subscription may hold before it lags.
    subscription_bound: usize,
    /// The core of the next subscription from outside the cores.
    next_core: AtomicUsize,
}

/// Messages a Rust subscription holds by default before it lags.
pub const DEFAULT_SUBSCRIPTION_BOUND: usize = 1024;

/// How long a call from outside the cores waits for a core's answer.
const CORE_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// A `Clone + Send` handle that broadcasts into a running server from any thread.
///
/// On one of the server's cores it publishes directly (the frame is encoded once and
/// crosses the core mesh); from any other thread it hands the broadcast to every core's
/// inbox (one core's, which publishes it) and wakes it. In cluster mode the broadcast
/// also goes to the other nodes.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

impl Endpoint {
    pub(crate) fn new(cores: Vec<CoreInbox>, cluster: Option<ClusterHandle>) -> Self {
        Endpoint {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                cores,
                cluster,
                draining: AtomicBool::new(false),
                subscription_bound: DEFAULT_SUBSCRIPTION_BOUND,
                next_core: AtomicUsize::new(0),
            }),
        }
    }

    /// This endpoint with subscriptions bounded to `bound` messages (before it is
    /// shared).
    pub(crate) fn with_subscription_bound(mut self, bound: usize) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.subscription_bound = bound.max(1);
        }
        self
    }

    /// The inbox of core `index`.
    pub(crate) fn core_inbox(&self, index: usize) -> Option<&CoreInbox> {
        self.inner.cores.get(index)
    }

    /// The shard of this server entered on this thread, if the caller runs on a core.
    fn on_core(&self) -> Option<std::rc::Rc<shard::Shard>> {
        shard::current().ok().filter(|s| s.endpoint.id() == self.id())
    }

    /// Starts a graceful shutdown of every core (see [`crate::server::ShutdownHandle`]).
    pub(crate) fn drain(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        for core in &self.inner.cores {
            core.send(CoreCommand::Shutdown);
        }
    }

    /// Whether a shutdown was asked for.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    pub(crate) fn id(&self) -> u64 {
        self.inner.id
    }

    pub(crate) fn cluster(&self) -> Option<&ClusterHandle> {
        self.inner.cluster.as_ref()
    }

    /// Listens to `topic`: every broadcast on it, from channels, the HTTP API, any core
    /// or (in cluster mode) any node, reaches the subscription once, in the order its
    /// core delivered them. Dropping it unsubscribes; in cluster mode the node's Redis
    /// interest goes too, unless something else on the node still listens.
    ///
    /// From a thread outside the server this returns once the subscription is in place
    /// on every core (a broadcast made after it returns is not missed). On a core (in
    /// a channel's handler) it registers at once; broadcasts from other cores reach it
    /// once they learnt of it, within microseconds.
    ///
    /// The queue holds `Config::subscription_bound` messages; a subscriber that falls
    /// further behind gets `Err(Lagged { missed })` in place of what it missed
    /// (`ringcast_subscription_lagged_total`), and the core never waits for it.
    ///
    /// # Panics
    /// Off the cores, if the endpoint belongs to a server with no cores.
    pub fn subscribe(&self, topic: &str) -> Subscription {
        let bound = self.inner.subscription_bound;
        if let Some(shard) = self.on_core() {
            let place = (self.id(), shard.index, self.inner.cores.get(shard.index).cloned());
            let (subscription, sink) = Subscription::new(topic, bound, place, shard.stats.clone());
            shard.listen(topic, Listener::Rust(sink));
            return subscription;
        }
        assert!(
            !self.inner.cores.is_empty(),
            "subscribe on a server with no cores"
        );
        let index = self.inner.next_core.fetch_add(1, Ordering::Relaxed) % self.inner.cores.len();
        let core = self.inner.cores[index].clone();
        let place = (self.id(), index, Some(core.clone()));
        let (subscription, sink) = Subscription::new(topic, bound, place, core.stats().clone());
        let (registered, confirmed) = crossbeam_channel::bounded(1);
        core.send(CoreCommand::Listen {
            topic: topic.into(),
            sink,
            registered,
        });
        if confirmed.recv_timeout(CORE_ANSWER_TIMEOUT).is_err() {
            tracing::warn!(topic, "subscription not confirmed by its core in time");
        }
        subscription
    }

    /// Sends `msg` to `handle_info` of every channel on this node, on every core, that
    /// joined `topic` or subscribed to it (`Socket::subscribe`), Phoenix's
    /// `PubSub.broadcast` of a term. Each gets its own clone. A typed Rust value does not
    /// cross Redis: other nodes never see it (broadcast a payload for them).
    pub fn send_info(&self, topic: &str, msg: impl Any + Send + Clone) {
        let here = self.on_core();
        if let Some(shard) = &here {
            shard.send_info_local(topic, &msg);
        }
        for (i, core) in self.inner.cores.iter().enumerate() {
            if here.as_ref().is_some_and(|s| s.index == i) {
                continue;
            }
            core.send(CoreCommand::Info(topic.into(), InfoMsg::clone_box(&msg)));
        }
    }

    /// Every presence on `topic`, cluster-wide, in the shape of a `presence_state`:
    /// `{key: {"metas": [...]}}`. From outside the cores it asks one core and waits for
    /// its answer (an empty object if none comes within 5 s).
    pub fn presence_list(&self, topic: &str) -> serde_json::Value {
        let json = match self.on_core() {
            Some(shard) => shard.presence_state_json(topic),
            None => {
                let Some(core) = self.inner.cores.first() else {
                    return serde_json::json!({});
                };
                let (answer, answered) = crossbeam_channel::bounded(1);
                core.send(CoreCommand::PresenceList(topic.into(), answer));
                answered
                    .recv_timeout(CORE_ANSWER_TIMEOUT)
                    .unwrap_or_else(|_| "{}".into())
            }
        };
        serde_json::from_str(&json).unwrap_or_else(|_| serde_json::json!({}))
    }

    /// Broadcasts `event` with `payload` to every subscriber of `topic` (fastlane, or
    /// the subscriber's `handle_out` when its channel intercepts the event).
    ///
    /// A payload must be a JSON object or bytes, as in Phoenix.
    pub fn broadcast(&self, topic: &str, event: &str, payload: impl Into<Payload>) {
        let payload = payload.into();
        match shard::current() {
            Ok(shard) if shard.endpoint.id() == self.id() => shard.broadcast(topic, event, payload, None),
            _ => {
                // One core publishes it as its channels would: through the mesh, the
                // topic's owner core or Redis, as the topic needs.
                let publish = Publish {
                    topic: topic.into(),
                    event: event.into(),
                    payload,
                    from: None,
                };
                let core = crate::shard::history::owner_core(topic, self.inner.cores.len());
                if let Some(inbox) = self.inner.cores.get(core) {
                    inbox.send(CoreCommand::Publish(Box::new(publish)));
                }
            }
        }
    }
}
