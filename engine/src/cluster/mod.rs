//! Cluster mode: ringcast nodes share topics through Redis pub/sub.
//!
//! One Redis channel per topic (`ringcast:t:<topic>` for broadcasts, `ringcast:p:<topic>`
//! for presence), subscribed while the node has subscribers for the topic: a node only
//! receives traffic for its own topics, at the price of one Redis subscription per topic
//! in use. Local subscribers are served locally; Redis carries only what other nodes
//! need. Delivery across nodes is at most once, as with Phoenix's PubSub: while Redis is
//! away, local delivery goes on and what could not be published is counted
//! (`ringcast_cluster_lost_total`) and logged.
//!
//! The link runs on a thread of its own, beside the shards: cores talk to it through a
//! channel ([`ClusterHandle`]) and it hands work to cores through their inboxes. Every
//! node sends a heartbeat each second; a node silent for [`NODE_EXPIRY`] is taken for
//! dead and its presences leave everyone's view.

pub mod envelope;
pub(crate) mod history;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::proto::presence::PresenceState;
use crate::shard::cluster::LinkCmd;
pub use crate::shard::cluster::{ClusterConfig, ClusterHandle, ClusterStats, DEFAULT_PIPELINE};
use crate::shard::history::{Answer, Publish};
use crate::shard::inbox::{CoreCommand, CoreInbox};
use crate::shard::Broadcast;
use envelope::Envelope;

/// How often a node says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node not heard from for this long is dead; its presences are dropped.
pub const NODE_EXPIRY: Duration = Duration::from_secs(5);
/// How long a command to Redis may take before the link is taken for broken. Generous:
/// a busy Redis is slow, not gone, and a timed-out reply would desynchronise the
/// connection anyway.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the subscriber waits for a message before it looks at its commands again.
const POLL_MESSAGES: Duration = Duration::from_millis(5);
const HEARTBEAT_CHANNEL: &str = "ringcast:hb";
/// `disconnect` broadcasts concern socket ids, which no node subscribes to: they go to
/// `ringcast:d:<topic>`, which every node listens to.
const DISCONNECT_PATTERN: &str = "ringcast:d:*";

/// Creates the handle now; the link thread starts with [`Link::spawn`] once the cores'
/// inboxes exist.
pub(crate) fn handle(config: &ClusterConfig) -> Result<(ClusterHandle, Link), redis::RedisError> {
    let client = redis::Client::open(config.redis_url.as_str())?;
    let (tx, rx) = crossbeam_channel::bounded(crate::shard::cluster::LINK_QUEUE_BOUND);
    let node = envelope::node_id(&config.node_name);
    let stats = Arc::new(ClusterStats::default());
    let handle = ClusterHandle::new(tx, node, stats.clone());
    let link = Link {
        client,
        rx,
        node,
        name: config.node_name.clone(),
        signer: envelope::Signer::new(&config.secret),
        pipeline: config.pipeline.max(1),
        stats,
        cores: Vec::new(),
        interest: HashMap::new(),
        own: PresenceState::default(),
        peers: HashMap::new(),
        epoch_seed: crate::clock::unix_nanos(),
        epochs_made: 0,
    };
    Ok((handle, link))
}

/// Runs a (un)subscribe, whose confirmation may take a while, with the command timeout
/// instead of the short message-polling one.
fn with_command_timeout(
    pubsub: &mut redis::PubSub<'_>,
    f: impl FnOnce(&mut redis::PubSub<'_>) -> redis::RedisResult<()>,
) -> redis::RedisResult<()> {
    pubsub.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    let result = f(pubsub);
    pubsub.set_read_timeout(Some(POLL_MESSAGES))?;
    result
}

fn topic_channel(topic: &str) -> String {
    format!("ringcast:t:{topic}")
}

fn presence_channel(topic: &str) -> String {
    format!("ringcast:p:{topic}")
}

pub(crate) struct Link {
    client: redis::Client,
    rx: Receiver<LinkCmd>,
    node: u32,
    name: String,
    /// Signs what this node publishes and checks what it receives.
    signer: envelope::Signer,
    /// Broadcasts per pipeline at most (1: one round trip each).
    pipeline: usize,
    stats: Arc<ClusterStats>,
    cores: Vec<CoreInbox>,
    /// Topic -> bit set of this node's cores with subscribers.
    interest: HashMap<Arc<str>, u64>,
    /// This node's own presence entries, to answer sync requests.
    own: PresenceState,
    /// Other nodes -> when last heard.
    peers: HashMap<u32, Instant>,
    /// Fresh epochs for topics Redis holds no history of (see [`history`]).
    epoch_seed: u64,
    epochs_made: u64,
}

/// Broadcasts queued for one pipelined round trip.
#[derive(Default)]
struct Batch {
    pipe: redis::Pipeline,
    len: usize,
}

/// Why a link session ended.
enum End {
    /// Every core is gone: stop the thread.
    Shutdown,
    /// Redis failed: reconnect.
    Redis(redis::RedisError),
}

impl From<redis::RedisError> for End {
    fn from(e: redis::RedisError) -> Self {
        End::Redis(e)
    }
}

impl Link {
    pub(crate) fn spawn(mut self, cores: Vec<CoreInbox>) {
        self.cores = cores;
        std::thread::Builder::new()
            .name("ringcast-redis".into())
            .spawn(move || self.run())
            .expect("spawn the Redis link thread");
    }

    fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.session(&mut backoff) {
                End::Shutdown => return,
                End::Redis(e) => {
                    if self.stats.connected.swap(false, Ordering::Relaxed) {
                        tracing::error!(node = %self.name, "Redis link lost: {e}; local delivery goes on");
                    } else {
                        tracing::debug!("Redis unreachable: {e}");
                    }
                }
            }
            // While Redis is away: keep the books, count what cannot go out.
            let until = Instant::now() + backoff;
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                match self.rx.recv_timeout(left) {
                    Ok(cmd) => self.offline(cmd),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => break,
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
                }
            }
            self.expire_peers();
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    fn offline(&mut self, cmd: LinkCmd) {
        match cmd {
            LinkCmd::Interest { core, topic, on } => {
                self.set_interest(core, topic, on);
            }
            LinkCmd::Publish(_) => {
                let lost = self.stats.lost.fetch_add(1, Ordering::Relaxed) + 1;
                if lost.is_power_of_two() {
                    tracing::warn!("Redis away: {lost} cross-node messages lost so far");
                }
            }
            LinkCmd::Presence(topic, delta) => {
                // Kept: the full state is republished on reconnect.
                self.own.apply(&topic, &delta);
            }
            LinkCmd::Sequence(p, _) => {
                self.stats.lost.fetch_add(1, Ordering::Relaxed);
                self.deliver_unsequenced(&p);
            }
            LinkCmd::Fetch { core, id, since, .. } => self.answer(core, id, Answer::unavailable(since)),
        }
    }

    /// A broadcast on a topic with history that Redis could not sequence: this node's
    /// subscribers still get it, as at most once delivery has it while Redis is away,
    /// without a position (it is in no history).
    fn deliver_unsequenced(&self, p: &Publish) {
        let mask = self.interest.get(&*p.topic).copied().unwrap_or(0);
        let b = Arc::new(Broadcast::new(&p.topic, &p.event, p.payload.clone(), p.from));
        for (core, inbox) in self.cores.iter().enumerate() {
            if mask & (1 << core) != 0 {
                inbox.send(CoreCommand::Deliver(b.clone()));
            }
        }
    }

    fn answer(&self, core: usize, id: u64, answer: Answer) {
        if let Some(inbox) = self.cores.get(core) {
            inbox.send(CoreCommand::HistoryReply(id, Box::new(answer)));
        }
    }

    fn fresh_epoch(&mut self) -> u64 {
        self.epochs_made += 1;
        crate::shard::history::epoch(self.epoch_seed, self.node as usize, self.epochs_made)
    }

    /// Updates the interest table; returns whether the node-level interest flipped.
    fn set_interest(&mut self, core: usize, topic: Arc<str>, on: bool) -> bool {
        let mask = self.interest.entry(topic.clone()).or_default();
        let before = *mask != 0;
        if on {
            *mask |= 1 << core;
        } else {
            *mask &= !(1 << core);
        }
        let after = *mask != 0;
        if !after {
            self.interest.remove(&topic);
        }
        before != after
    }

    fn session(&mut self, backoff: &mut Duration) -> End {
        let connect = || -> redis::RedisResult<(redis::Connection, redis::Connection)> {
            let timeout = COMMAND_TIMEOUT;
            let sub = self.client.get_connection_with_timeout(timeout)?;
            let publish = self.client.get_connection_with_timeout(timeout)?;
            publish.set_read_timeout(Some(timeout))?;
            publish.set_write_timeout(Some(timeout))?;
            Ok((sub, publish))
        };
        let (mut sub, mut publish) = match connect() {
            Ok(c) => c,
            Err(e) => return End::Redis(e),
        };
        let mut pubsub = sub.as_pubsub();
        if let Err(e) = pubsub.set_read_timeout(Some(COMMAND_TIMEOUT)) {
            return End::Redis(e);
        }
        let resubscribe = |pubsub: &mut redis::PubSub<'_>,
                           publish: &mut redis::Connection,
                           link: &mut Link|
         -> redis::RedisResult<()> {
            pubsub.subscribe(HEARTBEAT_CHANNEL)?;
            pubsub.psubscribe(DISCONNECT_PATTERN)?;
            let topics: Vec<Arc<str>> = link.interest.keys().cloned().collect();
            for topic in topics {
                pubsub.subscribe(&[topic_channel(&topic), presence_channel(&topic)])?;
                link.announce_presence(publish, &topic)?;
            }
            Ok(())
        };
        if let Err(e) = resubscribe(&mut pubsub, &mut publish, self) {
            return End::Redis(e);
        }
        if let Err(e) = pubsub.set_read_timeout(Some(POLL_MESSAGES)) {
            return End::Redis(e);
        }
        self.stats.connected.store(true, Ordering::Relaxed);
        tracing::info!(node = %self.name, "Redis link up");
        *backoff = Duration::from_millis(100);
        let mut next_heartbeat = Instant::now();
        let mut batch = Batch::default();
        loop {
            loop {
                match self.rx.try_recv() {
                    // Broadcasts go out in one pipeline per batch: one round trip for
                    // as many as were queued (up to the configured depth).
                    Ok(LinkCmd::Publish(b)) if self.pipeline > 1 => {
                        let (channel, bytes) = self.sealed_broadcast(&b);
                        batch.pipe.cmd("PUBLISH").arg(channel).arg(bytes).ignore();
                        batch.len += 1;
                        if batch.len >= self.pipeline {
                            if let Err(e) = self.flush(&mut batch, &mut publish) {
                                return End::Redis(e);
                            }
                        }
                    }
                    Ok(cmd) => {
                        // Anything else keeps its place after the broadcasts before it.
                        if let Err(e) = self.flush(&mut batch, &mut publish) {
                            return End::Redis(e);
                        }
                        if let Err(e) = self.command(cmd, &mut pubsub, &mut publish) {
                            return End::Redis(e);
                        }
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => return End::Shutdown,
                }
            }
            if let Err(e) = self.flush(&mut batch, &mut publish) {
                return End::Redis(e);
            }
            if Instant::now() >= next_heartbeat {
                next_heartbeat = Instant::now() + HEARTBEAT;
                let beat = Envelope::Heartbeat {
                    node: self.node,
                    name: self.name.clone(),
                };
                if let Err(e) = redis::cmd("PUBLISH")
                    .arg(HEARTBEAT_CHANNEL)
                    .arg(self.signer.seal(HEARTBEAT_CHANNEL, beat.encode()))
                    .exec(&mut publish)
                {
                    return End::Redis(e);
                }
                self.expire_peers();
            }
            match pubsub.get_message() {
                Ok(msg) => {
                    let channel = msg.get_channel_name().to_string();
                    if let Err(e) = self.message(&channel, msg.get_payload_bytes(), &mut publish) {
                        return End::Redis(e);
                    }
                }
                Err(e) if e.is_timeout() => {}
                Err(e) => return End::Redis(e),
            }
        }
    }

    /// A broadcast's channel and its signed envelope.
    fn sealed_broadcast(&self, b: &Broadcast) -> (String, Vec<u8>) {
        let envelope = Envelope::Broadcast {
            node: self.node,
            event: b.event.to_string(),
            payload: b.payload().clone(),
        };
        let channel = if &*b.event == crate::shard::DISCONNECT {
            format!("ringcast:d:{}", b.topic)
        } else {
            topic_channel(&b.topic)
        };
        let sealed = self.signer.seal(&channel, envelope.encode());
        (channel, sealed)
    }

    /// Sends the pipelined broadcasts, if any, in one round trip.
    fn flush(&self, batch: &mut Batch, conn: &mut redis::Connection) -> redis::RedisResult<()> {
        if batch.len == 0 {
            return Ok(());
        }
        let n = std::mem::take(&mut batch.len) as u64;
        let r = batch.pipe.exec(conn);
        batch.pipe.clear();
        match r {
            Ok(()) => {
                self.stats.published.fetch_add(n, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.stats.lost.fetch_add(n, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    fn publish(
        &self,
        conn: &mut redis::Connection,
        channel: String,
        envelope: &Envelope,
    ) -> redis::RedisResult<()> {
        let sealed = self.signer.seal(&channel, envelope.encode());
        self.publish_sealed(conn, channel, sealed)
    }

    fn publish_sealed(
        &self,
        conn: &mut redis::Connection,
        channel: String,
        sealed: Vec<u8>,
    ) -> redis::RedisResult<()> {
        match redis::cmd("PUBLISH").arg(channel).arg(sealed).exec(conn) {
            Ok(()) => {
                self.stats.published.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.stats.lost.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Publishes this node's full presence on `topic` and asks the others for theirs.
    fn announce_presence(&self, conn: &mut redis::Connection, topic: &str) -> redis::RedisResult<()> {
        let node = self.node;
        let entries = self.own.entries(topic, |o| o.node() == node);
        if !entries.is_empty() {
            self.publish(
                conn,
                presence_channel(topic),
                &Envelope::PresenceState { node, entries },
            )?;
        }
        self.publish(conn, presence_channel(topic), &Envelope::SyncRequest { node })
    }

    fn command(
        &mut self,
        cmd: LinkCmd,
        pubsub: &mut redis::PubSub<'_>,
        publish: &mut redis::Connection,
    ) -> redis::RedisResult<()> {
        match cmd {
            LinkCmd::Interest { core, topic, on } => {
                if self.set_interest(core, topic.clone(), on) {
                    let channels = [topic_channel(&topic), presence_channel(&topic)];
                    if on {
                        with_command_timeout(pubsub, |p| p.subscribe(&channels))?;
                        self.announce_presence(publish, &topic)?;
                    } else {
                        with_command_timeout(pubsub, |p| p.unsubscribe(&channels))?;
                    }
                }
                Ok(())
            }
            LinkCmd::Publish(b) => {
                let (channel, bytes) = self.sealed_broadcast(&b);
                self.publish_sealed(publish, channel, bytes)
            }
            LinkCmd::Presence(topic, delta) => {
                self.own.apply(&topic, &delta);
                let envelope = Envelope::Presence {
                    node: self.node,
                    delta: (*delta).clone(),
                };
                self.publish(publish, presence_channel(&topic), &envelope)
            }
            LinkCmd::Sequence(p, h) => {
                let epoch = self.fresh_epoch();
                match history::publish(
                    publish,
                    &self.signer,
                    self.node,
                    &topic_channel(&p.topic),
                    &p,
                    h,
                    epoch,
                ) {
                    Ok(_) => {
                        self.stats.published.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                    Err(e) => {
                        self.stats.lost.fetch_add(1, Ordering::Relaxed);
                        self.deliver_unsequenced(&p);
                        Err(e)
                    }
                }
            }
            LinkCmd::Fetch {
                core,
                id,
                topic,
                since,
                history: h,
            } => {
                let epoch = self.fresh_epoch();
                match history::fetch(publish, &self.signer, &topic, since, h, epoch) {
                    Ok(answer) => {
                        self.answer(core, id, answer);
                        Ok(())
                    }
                    Err(e) => {
                        self.answer(core, id, Answer::unavailable(since));
                        Err(e)
                    }
                }
            }
        }
    }

    fn message(
        &mut self,
        channel: &str,
        data: &[u8],
        publish: &mut redis::Connection,
    ) -> redis::RedisResult<()> {
        // Unsigned or forged (someone with access to the Redis): dropped, counted.
        let Ok(data) = self.signer.open(channel, data) else {
            let n = self.stats.forged.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(
                    channel,
                    forged = n + 1,
                    "dropped a message not signed with the cluster secret"
                );
            }
            return Ok(());
        };
        let envelope = match Envelope::decode(data) {
            Ok(e) => e,
            Err(why) => {
                tracing::warn!(channel, "{why}");
                return Ok(());
            }
        };
        if let Envelope::Sequenced { .. } = envelope {
            // Every node delivers these as Redis ordered them, the sender's included.
            let Some(topic) = channel.strip_prefix("ringcast:t:") else {
                return Ok(());
            };
            if envelope.node() != self.node {
                self.stats.received.fetch_add(1, Ordering::Relaxed);
            }
            let mask = self.interest.get(topic).copied().unwrap_or(0);
            match history::decode(topic, data, Some(self.node)) {
                Ok(b) => {
                    let b = Arc::new(b);
                    for (core, inbox) in self.cores.iter().enumerate() {
                        if mask & (1 << core) != 0 {
                            inbox.send(CoreCommand::Deliver(b.clone()));
                        }
                    }
                }
                Err(why) => tracing::warn!(channel, "{why}"),
            }
            return Ok(());
        }
        if envelope.node() == self.node {
            return Ok(());
        }
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        match envelope {
            Envelope::Heartbeat { node, name } => {
                if self.peers.insert(node, Instant::now()).is_none() {
                    self.stats.peers.store(self.peers.len() as u64, Ordering::Relaxed);
                    self.stats.nodes.lock().expect("nodes").insert(node, name);
                }
            }
            Envelope::Broadcast { event, payload, .. } => {
                let (topic, mask) = match (
                    channel.strip_prefix("ringcast:t:"),
                    channel.strip_prefix("ringcast:d:"),
                ) {
                    (Some(topic), _) => (topic, self.interest.get(topic).copied().unwrap_or(0)),
                    // A disconnect: every core looks for sockets with that id.
                    (None, Some(topic)) => (topic, u64::MAX),
                    _ => return Ok(()),
                };
                // Encoded once for this node, shared by its cores.
                let broadcast = Arc::new(Broadcast::new(topic, &event, payload, None));
                for (core, inbox) in self.cores.iter().enumerate() {
                    if mask & (1 << core) != 0 {
                        inbox.send(CoreCommand::Deliver(broadcast.clone()));
                    }
                }
            }
            Envelope::Presence { node, delta } => {
                let Some(topic) = channel.strip_prefix("ringcast:p:") else {
                    return Ok(());
                };
                if !self.presence_acceptable(node, &delta.joins) {
                    return Ok(());
                }
                let (topic, delta): (Arc<str>, _) = (topic.into(), Arc::new(delta));
                for inbox in &self.cores {
                    inbox.send(CoreCommand::Presence(topic.clone(), delta.clone()));
                }
            }
            Envelope::PresenceState { node, entries } => {
                let Some(topic) = channel.strip_prefix("ringcast:p:") else {
                    return Ok(());
                };
                if !self.presence_acceptable(node, &entries) {
                    return Ok(());
                }
                let (topic, entries): (Arc<str>, _) = (topic.into(), Arc::new(entries));
                for inbox in &self.cores {
                    inbox.send(CoreCommand::PresenceState(topic.clone(), node, entries.clone()));
                }
            }
            Envelope::Sequenced { .. } => unreachable!("handled above"),
            Envelope::SyncRequest { .. } => {
                let Some(topic) = channel.strip_prefix("ringcast:p:") else {
                    return Ok(());
                };
                let node = self.node;
                let entries = self.own.entries(topic, |o| o.node() == node);
                self.publish(
                    publish,
                    channel.to_string(),
                    &Envelope::PresenceState { node, entries },
                )?;
            }
        }
        Ok(())
    }

    /// Whether presences from `node` may be applied: every entry is `node`'s own and
    /// its meta a JSON object (it is pasted into client frames as it is). Otherwise
    /// the whole message is dropped and counted.
    fn presence_acceptable(&self, node: u32, entries: &[(Box<str>, crate::proto::presence::Meta)]) -> bool {
        let ok = entries.iter().all(|(_, m)| {
            m.owner.node() == node
                && serde_json::from_str::<serde_json::Value>(&m.json).is_ok_and(|v| v.is_object())
        });
        if !ok {
            self.stats.forged.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "node {node:08x} sent presences not its own, or a meta that is not a JSON object: dropped"
            );
        }
        ok
    }

    fn expire_peers(&mut self) {
        let now = Instant::now();
        let dead: Vec<u32> = self
            .peers
            .iter()
            .filter(|(_, seen)| now.duration_since(**seen) > NODE_EXPIRY)
            .map(|(n, _)| *n)
            .collect();
        for node in dead {
            self.peers.remove(&node);
            self.stats.nodes.lock().expect("nodes").remove(&node);
            tracing::warn!("node {node:08x} silent for {NODE_EXPIRY:?}: dropping its presences");
            for inbox in &self.cores {
                inbox.send(CoreCommand::DropNode(node));
            }
        }
        self.stats.peers.store(self.peers.len() as u64, Ordering::Relaxed);
    }
}
