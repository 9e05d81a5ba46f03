//! How a core reaches the Redis link of cluster mode ([`crate::cluster`]): the handle
//! that queues broadcasts, interest changes and presence deltas for the link thread,
//! the link's counters and its settings. The link itself is I/O and lives above.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use crossbeam_channel::Sender;

use crate::proto::presence::Delta;
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
}

pub(crate) enum LinkCmd {
    Interest { core: usize, topic: Arc<str>, on: bool },
    Publish(Arc<Broadcast>),
    Presence(Arc<str>, Arc<Delta>),
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

    pub(crate) fn interest(&self, core: usize, topic: &str, on: bool) {
        let _ = self.tx.send(LinkCmd::Interest {
            core,
            topic: topic.into(),
            on,
        });
    }

    pub(crate) fn publish(&self, broadcast: &Arc<Broadcast>) {
        let _ = self.tx.send(LinkCmd::Publish(broadcast.clone()));
    }

    pub(crate) fn presence(&self, topic: &str, delta: &Arc<Delta>) {
        let _ = self.tx.send(LinkCmd::Presence(topic.into(), delta.clone()));
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
    /// `redis://host:port`.
    pub redis_url: String,
    /// This node's name, unique in the cluster.
    pub node_name: String,
}
