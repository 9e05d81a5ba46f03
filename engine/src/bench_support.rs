//! Fixtures for the microbenchmarks in `bench/`: a shard's real topic table and
//! outbound queues, without sockets or an executor. Not a stable API.

use std::rc::Rc;
use std::sync::Arc;

use crate::proto::{Payload, Vsn};
use crate::shard::api::endpoint::Endpoint;
use crate::shard::app::{App, Config};
use crate::shard::conn::Conn;
use crate::shard::{Shard, Sub};
use crate::Router;

/// `subscribers` connections subscribed to one topic on one shard.
pub struct FanoutFixture {
    shard: Rc<Shard>,
    conns: Vec<Rc<Conn>>,
    topic: String,
}

struct Nobody;

impl crate::SocketHandler for Nobody {
    type Assigns = ();
    async fn connect(&self, _: &crate::ConnectInfo) -> Option<()> {
        None
    }
}

/// An app with no channels whose socket handler refuses everyone, for shards that
/// tests and fixtures drive without sockets.
pub(crate) fn bare_app(config: Config) -> Arc<App> {
    app_with(config, Router::new())
}

/// A channel for fixtures' routes; fixtures never join it.
struct Quiet;

impl crate::Channel for Quiet {
    async fn join(_: &str, _: Payload, _: &mut crate::Socket) -> Result<(Self, Payload), Payload> {
        Ok((Quiet, Payload::empty()))
    }
    async fn handle_in(&mut self, _: &str, _: Payload, _: &mut crate::Socket) -> crate::HandleResult {
        crate::HandleResult::NoReply
    }
}

fn app_with(config: Config, router: Router) -> Arc<App> {
    Arc::new(App {
        router,
        socket: Box::new(Nobody),
        presence_fetch: None,
        stats: (0..config.cores.max(1)).map(|_| Default::default()).collect(),
        epoch_seed: 1,
        config,
    })
}

/// A one-core shard with no channels and no sockets of its own, not entered anywhere
/// (no executor needed), on a manual clock (`shard.clock().advance(ms)`): for fixtures
/// and unit tests that drive its connections and timers.
pub(crate) fn lone_shard(config: Config) -> Rc<Shard> {
    let app = bare_app(Config { cores: 1, ..config });
    Shard::new(
        0,
        app,
        Endpoint::new(Vec::new(), None),
        None,
        crate::clock::Clock::manual(),
    )
}

impl FanoutFixture {
    /// Builds the fixture; `v1_every` makes every n-th subscriber a V1 client (0: none).
    pub fn new(subscribers: usize, v1_every: usize) -> Self {
        Self::build(subscribers, v1_every, None)
    }

    /// The same on a topic that keeps the last `size` broadcasts (its shard is its
    /// owner core): what history adds to a fanout.
    pub fn with_history(subscribers: usize, v1_every: usize, size: usize) -> Self {
        Self::build(subscribers, v1_every, Some(size))
    }

    fn build(subscribers: usize, v1_every: usize, history: Option<usize>) -> Self {
        let config = Config {
            max_outbound_bytes: usize::MAX,
            cores: 1,
            ..Config::default()
        };
        let shard = match history {
            None => lone_shard(config),
            Some(size) => {
                let router = Router::new()
                    .channel::<Quiet>("bench:*")
                    .history(size, std::time::Duration::from_secs(300));
                Shard::new(
                    0,
                    app_with(config, router),
                    Endpoint::new(Vec::new(), None),
                    None,
                    crate::clock::Clock::manual(),
                )
            }
        };
        let topic = "bench:fanout".to_string();
        let conns = (0..subscribers)
            .map(|i| {
                let vsn = if v1_every > 0 && i % v1_every == 0 {
                    Vsn::V1
                } else {
                    Vsn::V2
                };
                let conn = shard.add_conn(vsn, Rc::new(()), None, false);
                shard.subscribe(
                    &topic,
                    Sub {
                        conn: conn.clone(),
                        vsn,
                        intercepts: &[],
                    },
                );
                conn
            })
            .collect();
        FanoutFixture { shard, conns, topic }
    }

    /// Publishes one broadcast (encoded once; on a topic with history, sequenced and
    /// kept first) and queues its frame to every subscriber.
    pub fn broadcast(&self, payload: &Payload) {
        self.shard
            .broadcast(&self.topic, "new_msg", payload.clone(), None);
    }

    /// Empties every subscriber's queue, as the writers would; returns the bytes.
    pub fn drain(&self) -> usize {
        let mut total = 0;
        for conn in &self.conns {
            let mut out = conn.out.borrow_mut();
            let n = out.bytes;
            out.consume(n);
            total += n;
        }
        total
    }
}

/// Two cluster links, nodes `a` and `b`, on one Redis, with nothing else of a node
/// around them: `a`'s link publishes what [`LinkPair::publish`] hands it, as a core's
/// broadcast would, and `b`'s link, which has one core interested in the topic, hands
/// what it receives to that core's real inbox, which [`LinkPair::recv`] reads in the
/// core's place. What it measures is the link alone: signing, pipelining, Redis, the
/// subscriber connection, checking and decoding, and the hand-over to a core.
pub struct LinkPair {
    a: crate::cluster::ClusterHandle,
    /// Node b's handle: its counters, and while it lives, its link runs.
    b: crate::cluster::ClusterHandle,
    a_core: crate::shard::inbox::InboxReceiver,
    b_core: crate::shard::inbox::InboxReceiver,
    b_stats: Arc<crate::CoreStats>,
    topic: String,
}

/// A broadcast [`LinkPair::recv`] took from `b`'s core inbox.
#[derive(Debug, Clone, Copy)]
pub struct LinkDelivery {
    /// The number [`LinkPair::publish`] gave it.
    pub seq: u64,
    /// When it was handed to `a`'s link (Unix ns; one clock, one box).
    pub sent_ns: u64,
    /// When it was read from `b`'s core inbox.
    pub received_ns: u64,
}

/// What the two links counted.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkCounters {
    /// Messages `a` published to Redis.
    pub published: u64,
    /// Broadcasts `a`'s link queue dropped (full).
    pub dropped: u64,
    /// Messages `a` could not publish (Redis away or failing).
    pub lost: u64,
    /// Messages from other nodes `b` received.
    pub received: u64,
    /// Messages `b` dropped as not signed with the cluster secret.
    pub forged: u64,
    /// Deliveries `b`'s core inbox dropped (full).
    pub inbox_dropped: u64,
}

impl LinkPair {
    /// Starts both links on the Redis at `url` with `pipeline` broadcasts per round
    /// trip, and returns once `b` is subscribed to the topic (or the error).
    pub fn start(url: &str, pipeline: usize) -> Result<LinkPair, String> {
        use crate::cluster::ClusterConfig;
        use crate::shard::inbox::{self, CoreCommand, INBOX_BOUND};
        let topic = "bench:link".to_string();
        let node = |name: &str| {
            let config = ClusterConfig {
                pipeline,
                ..ClusterConfig::new(url, name, "link-bench-secret")
            };
            crate::cluster::handle(&config).map_err(|e| format!("node {name}: {e}"))
        };
        let (a, a_link) = node("a")?;
        let (b, b_link) = node("b")?;
        let core = || {
            let stats = Arc::new(crate::CoreStats::default());
            let (tx, rx) = inbox::inbox(INBOX_BOUND, stats.clone(), Arc::new(|| {}));
            (tx, rx, stats)
        };
        let (a_tx, a_core, _) = core();
        let (b_tx, b_core, b_stats) = core();
        a_link.spawn(vec![a_tx]);
        b_link.spawn(vec![b_tx]);
        if !b.interest(0, &topic, true, Some(1)) {
            return Err("node b's link queue refused the subscription".into());
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match b_core.recv_timeout(left) {
                Some(CoreCommand::InterestConfirmed(1))
                    if b.stats().connected.load(std::sync::atomic::Ordering::Relaxed) =>
                {
                    break
                }
                Some(CoreCommand::InterestConfirmed(1)) => {
                    return Err(format!(
                        "Redis at {url} is not reachable (the link confirmed the subscription while away)"
                    ))
                }
                Some(_) => {}
                None => return Err(format!("node b was not subscribed within 10 s (Redis at {url})")),
            }
        }
        Ok(LinkPair {
            a,
            b,
            a_core,
            b_core,
            b_stats,
            topic,
        })
    }

    /// Hands broadcast `seq` to `a`'s link, stamped with the time now: a seed-app
    /// `new_msg` (a user and a 32-byte body).
    pub fn publish(&self, seq: u64) {
        let payload = Payload::Json(serde_json::json!({
            "user": "bench",
            "body": "0123456789abcdef0123456789abcdef",
            "seq": seq,
            "t": crate::clock::unix_nanos(),
        }));
        let b = crate::shard::Broadcast::new(&self.topic, "new_msg", payload, None);
        self.a.publish(&Arc::new(b));
    }

    /// Broadcasts waiting in `a`'s link queue.
    pub fn backlog(&self) -> usize {
        self.a.queued()
    }

    /// The next broadcast `b`'s link handed its core, if one comes within `timeout`.
    pub fn recv(&self, timeout: std::time::Duration) -> Option<LinkDelivery> {
        let deadline = std::time::Instant::now() + timeout;
        while self.a_core.try_next().is_some() {}
        loop {
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            if let crate::shard::inbox::CoreCommand::Deliver(b) = self.b_core.recv_timeout(left)? {
                let p = b.payload();
                let field = |k: &str| p.json().and_then(|v| v.get(k)).and_then(|v| v.as_u64());
                if let (Some(seq), Some(sent_ns)) = (field("seq"), field("t")) {
                    return Some(LinkDelivery {
                        seq,
                        sent_ns,
                        received_ns: crate::clock::unix_nanos(),
                    });
                }
            }
        }
    }

    /// What the links counted so far.
    pub fn counters(&self) -> LinkCounters {
        use std::sync::atomic::Ordering::Relaxed;
        let (a, b) = (self.a.stats(), self.b.stats());
        LinkCounters {
            published: a.published.load(Relaxed),
            dropped: a.dropped.load(Relaxed),
            lost: a.lost.load(Relaxed),
            received: b.received.load(Relaxed),
            forged: b.forged.load(Relaxed),
            inbox_dropped: self.b_stats.inbox_dropped.get(),
        }
    }
}
