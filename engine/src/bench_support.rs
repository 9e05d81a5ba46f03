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
