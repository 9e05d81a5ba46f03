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

mod conns;
pub mod envelope;
pub(crate) mod history;
mod subscriber;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::proto::position::Position;
use crate::proto::presence::PresenceState;
use crate::shard::cluster::LinkCmd;
pub use crate::shard::cluster::{ClusterConfig, ClusterHandle, ClusterStats, RedisAddr, DEFAULT_PIPELINE};
use crate::shard::history::{Answer, History, Publish};
use crate::shard::inbox::{CoreCommand, CoreInbox};
use crate::shard::Broadcast;
use conns::{Conns, Endpoints};
use envelope::Envelope;
use subscriber::Verb;

/// How often a node says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node not heard from for this long is dead; its presences are dropped.
pub const NODE_EXPIRY: Duration = Duration::from_secs(5);
/// How long a command to Redis may take before the link is taken for broken. Generous:
/// a busy Redis is slow, not gone, and a timed-out reply would desynchronise the
/// connection anyway.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a subscriber connection's reader waits in a read before it looks for a
/// change of subscriptions to make unwoken. Changes do not wait for it (the link wakes
/// the reader through its wake channel), nor do broadcasts (the link thread sleeps on
/// its command queue and the readers' messages at once); it only bounds a lost wake.
const POLL_MESSAGES: Duration = Duration::from_millis(250);
/// Messages from Redis handled per turn at most, before the queued commands' turn.
const MESSAGES_PER_TURN: usize = 256;
const HEARTBEAT_CHANNEL: &str = "ringcast:hb";
/// `disconnect` broadcasts concern socket ids, which no node subscribes to: they go to
/// `ringcast:d:<topic>`, which every node listens to.
const DISCONNECT_PATTERN: &str = "ringcast:d:*";

/// Creates the handle now; the link thread starts with [`Link::spawn`] once the cores'
/// inboxes exist.
pub(crate) fn handle(config: &ClusterConfig) -> Result<(ClusterHandle, Link), redis::RedisError> {
    let ca = match &config.redis_ca {
        None => None,
        Some(path) => Some(std::fs::read(path).map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "cannot read the Redis CA file",
                format!("{}: {e}", path.display()),
            ))
        })?),
    };
    let endpoints = Endpoints::new(&config.redis, ca)?;
    let (tx, rx) = crossbeam_channel::bounded(crate::shard::cluster::LINK_QUEUE_BOUND);
    let node = envelope::node_id(&config.node_name);
    let stats = Arc::new(ClusterStats::default());
    let handle = ClusterHandle::new(tx, node, stats.clone());
    let link = Link {
        endpoints,
        rx,
        node,
        name: config.node_name.clone(),
        signer: envelope::Signer::new(&config.secret),
        pipeline: config.pipeline.max(1),
        stats,
        cores: Vec::new(),
        interest: HashMap::new(),
        subscribed: HashSet::new(),
        changed: Vec::new(),
        waiting: Vec::new(),
        own: PresenceState::default(),
        peers: HashMap::new(),
        epoch_seed: crate::clock::unix_nanos(),
        epochs_made: 0,
    };
    Ok((handle, link))
}

/// A topic's channel for broadcasts. The topic is the hash tag: on a Redis Cluster,
/// its channels and history keys are in one slot.
fn topic_channel(topic: &str) -> String {
    format!("ringcast:t:{{{topic}}}")
}

fn presence_channel(topic: &str) -> String {
    format!("ringcast:p:{{{topic}}}")
}

/// The topic of a channel named by [`topic_channel`] or [`presence_channel`] (`prefix`
/// tells which).
fn topic_of<'a>(channel: &'a str, prefix: &str) -> Option<&'a str> {
    channel.strip_prefix(prefix)?.strip_prefix('{')?.strip_suffix('}')
}

pub(crate) struct Link {
    /// Where Redis is (one server, or a Redis Cluster).
    endpoints: Endpoints,
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
    /// Topics whose channels Redis has this node subscribed to (in this session).
    subscribed: HashSet<Arc<str>>,
    /// Subscription changes waiting for the next batch: the topics whose node-level
    /// interest may have flipped, and the first joins waiting for their confirmation.
    changed: Vec<Arc<str>>,
    waiting: Vec<(usize, u64)>,
    /// This node's own presence entries, to answer sync requests.
    own: PresenceState,
    /// Other nodes -> when last heard.
    peers: HashMap<u32, Instant>,
    /// Fresh epochs for topics Redis holds no history of (see [`history`]).
    epoch_seed: u64,
    epochs_made: u64,
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
        // Whether the operator was told of the current outage (the first failure of a
        // streak is an error in the log, the retries are not).
        let mut told = false;
        loop {
            match self.session(&mut backoff) {
                End::Shutdown => return,
                End::Redis(e) => {
                    // Joins waiting for a subscription go on (the next session
                    // subscribes every topic again).
                    self.changed.clear();
                    for (core, id) in std::mem::take(&mut self.waiting) {
                        self.confirm(core, Some(id));
                    }
                    if self.stats.connected.swap(false, Ordering::Relaxed) {
                        tracing::error!(node = %self.name, "Redis link lost: {e}; local delivery goes on");
                        told = true;
                    } else if !told {
                        tracing::error!(
                            node = %self.name,
                            "cannot reach Redis: {e}; local delivery goes on, and the link retries"
                        );
                        told = true;
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
            LinkCmd::Interest { core, topic, on, ack } => {
                self.set_interest(core, topic, on);
                // Nothing to wait for while Redis is away: the join goes on, and the
                // node subscribes when the link is back.
                self.confirm(core, ack);
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
        self.deliver(
            mask,
            Broadcast::new(&p.topic, &p.event, p.payload.clone(), p.from),
        );
    }

    /// Hands `b`, encoded once for this node, to every core in `mask`.
    fn deliver(&self, mask: u64, b: Broadcast) {
        let b = Arc::new(b);
        for (core, inbox) in self.cores.iter().enumerate() {
            if mask & (1 << core) != 0 {
                inbox.send(CoreCommand::Deliver(b.clone()));
            }
        }
    }

    /// Tells `core` that its interest announcement `ack` needs nothing more from Redis.
    fn confirm(&self, core: usize, ack: Option<u64>) {
        if let (Some(id), Some(inbox)) = (ack, self.cores.get(core)) {
            inbox.send(CoreCommand::InterestConfirmed(id));
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

    /// Updates the interest table.
    fn set_interest(&mut self, core: usize, topic: Arc<str>, on: bool) {
        let mask = self.interest.entry(topic.clone()).or_default();
        if on {
            *mask |= 1 << core;
        } else {
            *mask &= !(1 << core);
        }
        if *mask == 0 {
            self.interest.remove(&topic);
        }
    }

    fn session(&mut self, backoff: &mut Duration) -> End {
        let mut conns = match self.endpoints.connect(COMMAND_TIMEOUT, POLL_MESSAGES) {
            Ok(c) => c,
            Err(e) => return End::Redis(e),
        };
        let end = self.serve(&mut conns, backoff);
        // What the session had not sent yet is lost (and counted); this node's
        // subscribers still get its broadcasts on topics with history.
        let (lost, unsequenced) = conns.take_unsent();
        self.stats.lost.fetch_add(lost, Ordering::Relaxed);
        for p in unsequenced {
            self.deliver_unsequenced(&p);
        }
        end
    }

    fn serve(&mut self, conns: &mut Conns, backoff: &mut Duration) -> End {
        let hb = conns.shard_of(HEARTBEAT_CHANNEL);
        let hb_verb = if conns.sharded() {
            Verb::SSubscribe
        } else {
            Verb::Subscribe
        };
        let resubscribe = |conns: &mut Conns| -> redis::RedisResult<()> {
            conns.change(hb, hb_verb, &[[HEARTBEAT_CHANNEL]])?;
            conns.change(0, Verb::PSubscribe, &[[DISCONNECT_PATTERN]])
        };
        if let Err(e) = resubscribe(conns) {
            return End::Redis(e);
        }
        for shard in &mut conns.shards {
            if let Err(e) = history::load(&mut shard.commands) {
                return End::Redis(e);
            }
        }
        // A new session: Redis knows none of this node's topics. They are subscribed
        // (and this node's presences republished) in one batch.
        self.subscribed.clear();
        self.changed.extend(self.interest.keys().cloned());
        if let Err(e) = self.apply_subscriptions(conns) {
            return End::Redis(e);
        }
        self.stats.connected.store(true, Ordering::Relaxed);
        let shards: Vec<&str> = conns.shards.iter().map(|s| s.name.as_str()).collect();
        tracing::info!(node = %self.name, redis = ?shards, "Redis link up");
        *backoff = Duration::from_millis(100);
        let mut next_heartbeat = Instant::now();
        loop {
            if let Err(e) = self.turn(conns, &mut next_heartbeat) {
                return e;
            }
        }
    }

    /// One turn of a session: every command queued goes out (publishes and
    /// subscription changes batched), then a heartbeat if one is due, then the messages
    /// from Redis already here (up to [`MESSAGES_PER_TURN`]); with none, it sleeps until
    /// a command or a message comes.
    fn turn(&mut self, conns: &mut Conns, next_heartbeat: &mut Instant) -> Result<(), End> {
        loop {
            match self.rx.try_recv() {
                // Broadcasts and presences go out in one pipeline per batch: one round
                // trip for as many as were queued (up to the configured depth).
                Ok(LinkCmd::Publish(b)) => {
                    self.queue_broadcast(&b, conns)?;
                }
                Ok(LinkCmd::Presence(topic, delta)) => {
                    self.own.apply(&topic, &delta);
                    let envelope = Envelope::Presence {
                        node: self.node,
                        delta: (*delta).clone(),
                    };
                    let channel = presence_channel(&topic);
                    let sealed = self.signer.seal(&channel, envelope.encode());
                    self.queue_publish(&channel, sealed, conns)?;
                }
                // Broadcasts on topics with history too: their scripts go in the
                // pipeline of the topic's shard.
                Ok(LinkCmd::Sequence(p, h)) => {
                    let epoch = self.fresh_epoch();
                    let channel = topic_channel(&p.topic);
                    let script = history::publish_cmd(
                        conns.sharded(),
                        &self.signer,
                        self.node,
                        &channel,
                        &p,
                        h,
                        epoch,
                    );
                    if conns.queue_sequenced(&channel, script, *p) >= self.pipeline {
                        self.flush(conns)?;
                    }
                }
                // Subscription changes go out in one SUBSCRIBE (and one UNSUBSCRIBE)
                // per batch too.
                Ok(LinkCmd::Interest { core, topic, on, ack }) => {
                    self.set_interest(core, topic.clone(), on);
                    self.changed.push(topic);
                    if let Some(id) = ack {
                        self.waiting.push((core, id));
                    }
                }
                Ok(LinkCmd::Fetch {
                    core,
                    id,
                    topic,
                    since,
                    history,
                }) => {
                    // A history fetch needs its answer: it keeps its place after the
                    // subscription changes and publishes before it (a fetch after its
                    // topic's subscription and the broadcasts sequenced before it).
                    self.apply_subscriptions(conns)?;
                    self.flush(conns)?;
                    self.fetch(conns, core, id, &topic, since, history)?;
                }
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => return Err(End::Shutdown),
            }
        }
        self.apply_subscriptions(conns)?;
        if Instant::now() >= *next_heartbeat {
            *next_heartbeat = Instant::now() + HEARTBEAT;
            let beat = Envelope::Heartbeat {
                node: self.node,
                name: self.name.clone(),
            };
            let sealed = self.signer.seal(HEARTBEAT_CHANNEL, beat.encode());
            self.queue_publish(HEARTBEAT_CHANNEL, sealed, conns)?;
            self.expire_peers();
        }
        self.flush(conns)?;
        let mut handled = 0;
        while handled < MESSAGES_PER_TURN {
            let Some((channel, payload)) = conns.try_message()? else {
                break;
            };
            self.message(&channel, &payload, conns);
            handled += 1;
        }
        if handled == 0 {
            // Every batch went out: sleep until a command or a message comes, or the
            // next heartbeat is due.
            conns.wait(&self.rx, next_heartbeat.saturating_duration_since(Instant::now()));
        }
        Ok(())
    }

    /// Queues a publish for its shard's next pipelined round trip; the batches go out
    /// at once when one is full (with a pipeline depth of 1, every publish is a round
    /// trip).
    fn queue_publish(&mut self, channel: &str, sealed: Vec<u8>, conns: &mut Conns) -> redis::RedisResult<()> {
        if conns.queue(channel, sealed) >= self.pipeline {
            self.flush(conns)?;
        }
        Ok(())
    }

    /// Queues a broadcast, signed. A `disconnect` goes to `ringcast:d:<topic>`, which
    /// every node listens to by pattern (classic pub/sub, which a cluster carries
    /// everywhere).
    fn queue_broadcast(&mut self, b: &Broadcast, conns: &mut Conns) -> redis::RedisResult<()> {
        let envelope = Envelope::Broadcast {
            node: self.node,
            event: b.event.to_string(),
            payload: b.payload().clone(),
        };
        if &*b.event == crate::shard::DISCONNECT {
            let channel = format!("ringcast:d:{}", b.topic);
            let sealed = self.signer.seal(&channel, envelope.encode());
            if conns.queue_everywhere(&channel, sealed) >= self.pipeline {
                self.flush(conns)?;
            }
            Ok(())
        } else {
            let channel = topic_channel(&b.topic);
            let sealed = self.signer.seal(&channel, envelope.encode());
            self.queue_publish(&channel, sealed, conns)
        }
    }

    /// Sends the pipelined publishes, if any: one round trip per shard.
    fn flush(&mut self, conns: &mut Conns) -> redis::RedisResult<()> {
        match conns.flush() {
            Ok(n) => {
                self.stats.published.fetch_add(n, Ordering::Relaxed);
                Ok(())
            }
            Err(failed) => {
                self.stats.lost.fetch_add(failed.lost, Ordering::Relaxed);
                // Whether Redis ran any of the batch is unknown; what it did not, this
                // node's subscribers would miss. At most once across nodes, and this
                // node's own broadcasts still reach its own subscribers.
                for p in &failed.sequenced {
                    self.deliver_unsequenced(p);
                }
                Err(failed.error)
            }
        }
    }

    /// Brings Redis's subscriptions in line with the interest table for the topics
    /// changed since the last batch: one `SUBSCRIBE` for every topic the node took an
    /// interest in and one `UNSUBSCRIBE` for every topic it lost. Once Redis confirmed
    /// every channel, every waiting first join is confirmed, and this node's presence
    /// on each new topic is queued for the next pipeline.
    fn apply_subscriptions(&mut self, conns: &mut Conns) -> redis::RedisResult<()> {
        let mut on = Vec::new();
        let mut off = Vec::new();
        for topic in std::mem::take(&mut self.changed) {
            let wanted = self.interest.contains_key(&topic);
            if wanted && self.subscribed.insert(topic.clone()) {
                on.push(topic);
            } else if !wanted && self.subscribed.remove(&topic) {
                off.push(topic);
            }
        }
        let channels = |topics: &[Arc<str>]| -> Vec<[String; 2]> {
            topics
                .iter()
                .map(|t| [topic_channel(t), presence_channel(t)])
                .collect()
        };
        let result = conns
            .subscribe(true, &channels(&on))
            .and_then(|()| conns.subscribe(false, &channels(&off)));
        // Confirmed, or Redis failed: either way the joins go on (at most once; the
        // next session subscribes again).
        for (core, id) in std::mem::take(&mut self.waiting) {
            self.confirm(core, Some(id));
        }
        result?;
        self.announce_presence(&on, conns);
        Ok(())
    }

    /// Queues this node's full presence on each of `topics` and a request for the
    /// others' (they go out with the batch's next round trip).
    fn announce_presence(&mut self, topics: &[Arc<str>], conns: &mut Conns) {
        let node = self.node;
        for topic in topics {
            let channel = presence_channel(topic);
            let entries = self.own.entries(topic, |o| o.node() == node);
            if !entries.is_empty() {
                let state = Envelope::PresenceState { node, entries };
                let sealed = self.signer.seal(&channel, state.encode());
                conns.queue(&channel, sealed);
            }
            let sync = Envelope::SyncRequest { node };
            let sealed = self.signer.seal(&channel, sync.encode());
            conns.queue(&channel, sealed);
        }
    }

    /// Asks Redis for `topic`'s position and replay after `since`, for the join
    /// `id` on `core`; a failure answers "unavailable" (the join goes on).
    fn fetch(
        &mut self,
        conns: &mut Conns,
        core: usize,
        id: u64,
        topic: &str,
        since: Option<Position>,
        h: History,
    ) -> redis::RedisResult<()> {
        let epoch = self.fresh_epoch();
        let conn = conns.commands_for(&topic_channel(topic));
        match history::fetch(conn, &self.signer, topic, since, h, epoch) {
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

    fn message(&mut self, channel: &str, data: &[u8], conns: &mut Conns) {
        // This node's own broadcasts come back from Redis to it: dropped before the
        // signature is checked or anything decoded (one forged to look like ours would
        // be dropped as well, only not counted).
        if envelope::is_own_echo(data, self.node) {
            return;
        }
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
            return;
        };
        let envelope = match Envelope::decode(data) {
            Ok(e) => e,
            Err(why) => {
                tracing::warn!(channel, "{why}");
                return;
            }
        };
        if let Envelope::Sequenced { .. } = envelope {
            // Every node delivers these as Redis ordered them, the sender's included.
            let Some(topic) = topic_of(channel, "ringcast:t:") else {
                return;
            };
            if envelope.node() != self.node {
                self.stats.received.fetch_add(1, Ordering::Relaxed);
            }
            let mask = self.interest.get(topic).copied().unwrap_or(0);
            match history::broadcast(topic, envelope, Some(self.node)) {
                Ok(b) => self.deliver(mask, b),
                Err(why) => tracing::warn!(channel, "{why}"),
            }
            return;
        }
        if envelope.node() == self.node {
            return;
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
                    topic_of(channel, "ringcast:t:"),
                    channel.strip_prefix("ringcast:d:"),
                ) {
                    (Some(topic), _) => (topic, self.interest.get(topic).copied().unwrap_or(0)),
                    // A disconnect: every core looks for sockets with that id.
                    (None, Some(topic)) => (topic, u64::MAX),
                    _ => return,
                };
                self.deliver(mask, Broadcast::new(topic, &event, payload, None));
            }
            Envelope::Presence { node, delta } => {
                let Some(topic) = topic_of(channel, "ringcast:p:") else {
                    return;
                };
                if !self.presence_acceptable(node, &delta.joins) {
                    return;
                }
                let (topic, delta): (Arc<str>, _) = (topic.into(), Arc::new(delta));
                for inbox in &self.cores {
                    inbox.send(CoreCommand::Presence(topic.clone(), delta.clone()));
                }
            }
            Envelope::PresenceState { node, entries } => {
                let Some(topic) = topic_of(channel, "ringcast:p:") else {
                    return;
                };
                if !self.presence_acceptable(node, &entries) {
                    return;
                }
                let (topic, entries): (Arc<str>, _) = (topic.into(), Arc::new(entries));
                for inbox in &self.cores {
                    inbox.send(CoreCommand::PresenceState(topic.clone(), node, entries.clone()));
                }
            }
            Envelope::Sequenced { .. } => unreachable!("handled above"),
            Envelope::SyncRequest { .. } => {
                let Some(topic) = topic_of(channel, "ringcast:p:") else {
                    return;
                };
                let node = self.node;
                let entries = self.own.entries(topic, |o| o.node() == node);
                let state = Envelope::PresenceState { node, entries };
                let sealed = self.signer.seal(channel, state.encode());
                conns.queue(channel, sealed);
            }
        }
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
