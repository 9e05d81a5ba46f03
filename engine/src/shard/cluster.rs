//! How a core reaches the Redis link of cluster mode ([`crate::cluster`]): the handle
//! that queues broadcasts, interest changes and presence deltas for the link thread,
//! the link's counters and its settings. The link itself is I/O and lives above.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::Sender;

use crate::proto::position::Position;
use crate::proto::presence::Delta;
use crate::shard::history::{History, Publish};
use crate::shard::Broadcast;

/// Counters of the Redis link, shown in `/metrics` and `/api/stats`.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Whether the link to Redis is up.
    pub connected: AtomicBool,
    /// Other nodes heard from recently.
    pub peers: AtomicU64,
    /// Messages for other nodes that could not be published.
    pub lost: AtomicU64,
    /// Messages published to Redis.
    pub published: AtomicU64,
    /// Messages received from other nodes.
    pub received: AtomicU64,
    /// Commands dropped because the link's queue was full.
    pub dropped: AtomicU64,
    /// Messages from Redis dropped for a missing or wrong signature, a presence not
    /// from its owner node, or a meta that is not JSON.
    pub forged: AtomicU64,
    /// The other nodes heard from recently, by id: their names (for the admin page;
    /// written by the link on heartbeats, never on a core's path).
    pub nodes: std::sync::Mutex<std::collections::BTreeMap<u32, String>>,
}

/// Commands the link's queue holds; past it new ones are dropped and counted (a slow or
/// absent Redis must not grow the cores' memory, nor block them).
pub(crate) const LINK_QUEUE_BOUND: usize = 65_536;

pub(crate) enum LinkCmd {
    /// With `ack`, the link answers [`crate::shard::inbox::CoreCommand::InterestConfirmed`]
    /// once Redis confirmed the node's subscription.
    Interest {
        core: usize,
        topic: Arc<str>,
        on: bool,
        ack: Option<u64>,
    },
    Publish(Arc<Broadcast>),
    Presence(Arc<str>, Arc<Delta>),
    /// A broadcast on a topic with history: Redis sequences, keeps and publishes it.
    Sequence(Box<Publish>, History),
    /// A join on `core` asks for the topic's position and replay
    /// ([`crate::shard::inbox::CoreCommand::HistoryReply`] with `id`).
    Fetch {
        core: usize,
        id: u64,
        topic: Arc<str>,
        since: Option<Position>,
        history: History,
    },
}

/// How cores reach the Redis link (`Send + Clone`).
#[derive(Clone)]
pub struct ClusterHandle {
    tx: Sender<LinkCmd>,
    node: u32,
    stats: Arc<ClusterStats>,
}

impl ClusterHandle {
    pub(crate) fn new(tx: Sender<LinkCmd>, node: u32, stats: Arc<ClusterStats>) -> Self {
        ClusterHandle { tx, node, stats }
    }

    /// Queues `cmd` for the link; a full queue drops it and counts the drop. Whether
    /// it was queued.
    fn queue(&self, cmd: LinkCmd) -> bool {
        match self.tx.try_send(cmd) {
            Ok(()) => true,
            Err(crossbeam_channel::TrySendError::Full(cmd)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                if let LinkCmd::Interest { topic, .. } = cmd {
                    tracing::error!(%topic, "the Redis link's queue is full: an interest change was dropped");
                }
                false
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => false,
        }
    }

    /// Commands waiting in the link's queue.
    pub(crate) fn queued(&self) -> usize {
        self.tx.len()
    }

    /// Tells the link that `core` has (`on`) or no longer has subscribers for `topic`.
    /// With `ack`, the link confirms once Redis confirmed the subscription; `false`
    /// when the command could not be queued (nothing will confirm it).
    pub(crate) fn interest(&self, core: usize, topic: &str, on: bool, ack: Option<u64>) -> bool {
        self.queue(LinkCmd::Interest {
            core,
            topic: topic.into(),
            on,
            ack,
        })
    }

    pub(crate) fn publish(&self, broadcast: &Arc<Broadcast>) {
        self.queue(LinkCmd::Publish(broadcast.clone()));
    }

    pub(crate) fn sequence(&self, publish: Publish, history: History) {
        self.queue(LinkCmd::Sequence(Box::new(publish), history));
    }

    /// Asks Redis for `topic`'s position and replay; the answer comes back to `core`'s
    /// inbox. `false` (counted as dropped) when the link's queue is full or gone: the
    /// caller answers the join itself.
    pub(crate) fn fetch(
        &self,
        core: usize,
        id: u64,
        topic: &str,
        since: Option<Position>,
        history: History,
    ) -> bool {
        let cmd = LinkCmd::Fetch {
            core,
            id,
            topic: topic.into(),
            since,
            history,
        };
        match self.tx.try_send(cmd) {
            Ok(()) => true,
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    pub(crate) fn presence(&self, topic: &str, delta: &Arc<Delta>) {
        self.queue(LinkCmd::Presence(topic.into(), delta.clone()));
    }

    /// This node's id (the high half of its presence owners).
    pub fn node(&self) -> u32 {
        self.node
    }

    /// The link's counters.
    pub fn stats(&self) -> &ClusterStats {
        &self.stats
    }
}

/// Cluster settings.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The Redis server, or the nodes of a Redis Cluster.
    pub redis: RedisAddr,
    /// The CA whose certificates a `rediss://` server's must chain to (PEM); `None`
    /// trusts the system's roots.
    pub redis_ca: Option<std::path::PathBuf>,
    /// This node's name, unique in the cluster.
    pub node_name: String,
    /// The key every node signs its messages with (HMAC-SHA256) and checks others'
    /// by: the same on every node, unknown to whoever else can reach the Redis.
    pub secret: String,
    /// Broadcasts the Redis link sends in one pipelined round trip at most
    /// ([`DEFAULT_PIPELINE`]); 1 sends each on its own, for comparisons.
    pub pipeline: usize,
}

/// Where cluster mode's Redis is. Each URL is `redis://[user:password@]host:port[/db]`,
/// or `rediss://` for TLS.
#[derive(Debug, Clone)]
pub enum RedisAddr {
    /// One Redis server: classic pub/sub.
    Server(String),
    /// Some nodes of a Redis Cluster (any of them; the link asks for the masters):
    /// sharded pub/sub, each topic on the master of its slot.
    Cluster(Vec<String>),
}

impl From<String> for RedisAddr {
    fn from(url: String) -> Self {
        RedisAddr::Server(url)
    }
}

impl From<&str> for RedisAddr {
    fn from(url: &str) -> Self {
        RedisAddr::Server(url.into())
    }
}

impl ClusterConfig {
    /// Cluster mode through `redis` (a server's URL, or a [`RedisAddr`]), as node
    /// `node_name`, signing with `secret`; the other settings at their defaults.
    pub fn new(redis: impl Into<RedisAddr>, node_name: impl Into<String>, secret: impl Into<String>) -> Self {
        ClusterConfig {
            redis: redis.into(),
            redis_ca: None,
            node_name: node_name.into(),
            secret: secret.into(),
            pipeline: DEFAULT_PIPELINE,
        }
    }
}

/// Broadcasts per pipelined round trip to Redis, by default.
pub const DEFAULT_PIPELINE: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Payload;

    #[test]
    fn a_full_link_queue_drops_and_counts() {
        let (tx, rx) = crossbeam_channel::bounded(3);
        let stats = Arc::new(ClusterStats::default());
        let handle = ClusterHandle::new(tx, 1, stats.clone());
        let b = Arc::new(Broadcast::new("t", "e", Payload::empty(), None));
        for _ in 0..5 {
            handle.publish(&b);
        }
        assert!(!handle.interest(0, "t", true, None));
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 3);
        assert_eq!(rx.len(), 3);
    }
}
