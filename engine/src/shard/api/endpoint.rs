//! `Endpoint`: broadcast to a topic from anywhere, like `MyAppWeb.Endpoint.broadcast/3`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::proto::Payload;
use crate::shard::cluster::ClusterHandle;
use crate::shard::inbox::{CoreCommand, CoreInbox};
use crate::shard::{self, Broadcast};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

struct Inner {
    id: u64,
    cores: Vec<CoreInbox>,
    cluster: Option<ClusterHandle>,
}

/// A `Clone + Send` handle that broadcasts into a running server from any thread.
///
/// On one of the server's cores it publishes directly (the frame is encoded once and
/// crosses the core mesh); from any other thread it hands the broadcast to every core's
/// inbox and wakes it. In cluster mode the broadcast also goes to the other nodes.
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
            }),
        }
    }

    pub(crate) fn id(&self) -> u64 {
        self.inner.id
    }

    pub(crate) fn cluster(&self) -> Option<&ClusterHandle> {
        self.inner.cluster.as_ref()
    }

    pub(crate) fn cores(&self) -> &[CoreInbox] {
        &self.inner.cores
    }

    /// Broadcasts `event` with `payload` to every subscriber of `topic` (fastlane, or
    /// the subscriber's `handle_out` when its channel intercepts the event).
    ///
    /// A payload must be a JSON object or bytes, as in Phoenix.
    pub fn broadcast(&self, topic: &str, event: &str, payload: impl Into<Payload>) {
        let broadcast = Broadcast::new(topic, event, payload.into(), None);
        match shard::current() {
            Ok(shard) if shard.endpoint.id() == self.id() => shard.publish(broadcast),
            _ => {
                let broadcast = Arc::new(broadcast);
                if let Some(cluster) = &self.inner.cluster {
                    cluster.publish(&broadcast);
                }
                for core in &self.inner.cores {
                    core.send(CoreCommand::Deliver(broadcast.clone()));
                }
            }
        }
    }
}
