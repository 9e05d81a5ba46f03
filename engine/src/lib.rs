//! # ringcast
//!
//! A Phoenix Channels server engine: thread-per-core on glommio (io_uring), one pinned
//! executor per core, a broadcast encoded once into a finished WebSocket frame and fanned
//! out through per-core topic tables. Any app using the `phoenix` JavaScript client can
//! point at it unchanged.
//!
//! The layers, from the wire up; each uses only the ones before it
//! (`scripts/check-layers.py` checks it in CI):
//! 0. [`proto`]: sans-IO protocol (WebSocket frames, HTTP heads, Phoenix serializers,
//!    channel routing, tokens, presence state), and [`clock`];
//! 1. `shard`: the state of one core, driven by the layers above and doing no I/O:
//!    connections, topic table and fanout, presence replica, mesh routing, timers, and
//!    the channel runtime ([`api`]: [`Channel`], [`Socket`], [`SocketHandler`],
//!    [`Router`], [`Endpoint`]; [`Config`]; the cluster handle). It is given a clock and
//!    hands work back: connections with frames to write (`poll_dirty`), parked
//!    connections to wake, timer deadlines (`poll_timeout` / `handle_timeout`), and
//!    messages for other cores through a `MeshLink`;
//! 2. `transport` (accept loop, HTTP, the WebSocket pump, long-poll, parking, the
//!    flusher, the timer driver) and [`cluster`] (the Redis link): the I/O around the
//!    shard;
//! 3. [`server`]: executors, the core mesh's rings, inbox wake-ups, listeners
//!    ([`Server`]);
//! 4. [`seed`], the seed app that `ringcast serve` runs, and [`testing`], an in-process
//!    test kit for channels like Phoenix's `ChannelTest`.
//!
//! ```no_run
//! use ringcast::{Channel, Config, HandleResult, Payload, Reply, Router, Server, Socket};
//!
//! struct Room;
//!
//! impl Channel for Room {
//!     async fn join(_topic: &str, _payload: Payload, _socket: &mut Socket) -> Result<(Self, Payload), Payload> {
//!         Ok((Room, Payload::empty()))
//!     }
//!     async fn handle_in(&mut self, event: &str, payload: Payload, socket: &mut Socket) -> HandleResult {
//!         socket.broadcast(event, payload);
//!         HandleResult::Reply(Reply::ok())
//!     }
//! }
//!
//! let router = Router::new().channel::<Room>("rooms:*");
//! let socket = ringcast::seed::UserSocket::new("secret");
//! Server::bind(Config::default(), socket, router).unwrap().start().unwrap().join();
//! ```
#![warn(missing_docs)]

#[doc(hidden)]
pub mod bench_support;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod proto;
pub mod seed;
pub mod server;
pub(crate) mod shard;
pub mod testing;
pub(crate) mod transport;

pub use shard::api;

pub use proto::Payload;
pub use server::{CompressionConfig, Config, InboundContext, RunningServer, Server, ShutdownHandle};
pub use shard::api::channel::{Channel, HandleResult, Reply, StopReason};
pub use shard::api::endpoint::Endpoint;
pub use shard::api::pubsub::{Lagged, Message, RemoteChannelRef, Subscription};
pub use shard::api::router::{ConnectInfo, Router, SocketHandler};
pub use shard::api::socket::{ChannelRef, Socket};
pub use shard::stats::CoreStats;
