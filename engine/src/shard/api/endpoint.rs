//! `Endpoint`: broadcast to a topic from anywhere, like `MyAppWeb.Endpoint.broadcast/3`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::proto::Payload;
use crate::shard;
use crate::shard::cluster::ClusterHandle;
use crate::shard::history::Publish;
use crate::shard::inbox::{CoreCommand, CoreInbox};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

struct Inner {
    id: u64,
    cores: Vec<CoreInbox>,
    cluster: Option<ClusterHandle>,
    /// Set the moment a shutdown is asked for, from any thread, before the cores hear
    /// of it through their inboxes.
    draining: AtomicBool,
}

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
            }),
        }
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
