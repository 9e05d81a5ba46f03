//! The application a server runs, as every core sees it: its settings ([`Config`]), its
//! router and socket handler, the presence hook and the per-core counters.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use crate::proto::ws::deflate::InboundContext;
use crate::shard::api::router::{DynSocketHandler, Router};
use crate::shard::cluster::ClusterConfig;
use crate::shard::stats::CoreStats;

/// Server settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on (one port serves everything).
    pub listen: SocketAddr,
    /// Number of cores (executors), each pinned to one CPU.
    pub cores: usize,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Largest inbound frame or message, in bytes.
    pub max_frame: usize,
    /// Serve TLS only (`wss://`, `https://`) with this certificate; `None`: plain.
    pub tls: Option<TlsSource>,
    /// Origins allowed to upgrade; empty allows every origin.
    pub allowed_origins: Vec<String>,
    /// Proxies whose `Forwarded` / `X-Forwarded-For` headers name the client
    /// ([`crate::ConnectInfo::client_ip`]); empty trusts none.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Bytes a connection may have queued before it is cut off (1008).
    pub max_outbound_bytes: usize,
    /// Client messages a connection may send per second on average ...
    pub max_messages_per_sec: u32,
    /// ... and in a burst; past that it is closed with 1008.
    pub message_burst: u32,
    /// Open connections the whole server accepts (split evenly over the cores); past
    /// that, upgrades and long-poll opens are answered 503. Keep it under the process's
    /// open-file limit.
    pub max_connections: usize,
    /// TCP connections one core may hold in their HTTP phase (before an upgrade, or
    /// between keep-alive requests); past it new ones are closed at accept, so that
    /// connections that never finish a request cannot use up the file limit.
    pub max_http_connections: usize,
    /// How long a request may take to arrive whole, head and body, however slowly its
    /// bytes trickle in: from the connection's accept for its first request, from the
    /// first byte for later keep-alive ones.
    pub request_timeout: Duration,
    /// Graceful shutdown: connections closed (1001) per step, for the whole server ...
    pub drain_batch: usize,
    /// ... one step every this long, so that reconnects do not come back as one wave ...
    pub drain_interval: Duration,
    /// ... and the longest a shutdown waits before the cores stop anyway.
    pub drain_timeout: Duration,
    /// Bearer key of the HTTP server API; `None` answers 401 to every API request.
    pub api_key: Option<String>,
    /// Secret with which `GET /demo/token` mints tokens for the demo page; `None`
    /// (the default) answers that path 404. `ringcast serve` sets it only with `--dev`.
    pub demo_token_secret: Option<String>,
    /// Cluster mode: share topics with other nodes through Redis.
    pub cluster: Option<ClusterConfig>,
    /// Park WebSocket connections silent for a second: their task and I/O source are
    /// freed until input or a wake-up restarts them. `false` is for comparisons.
    pub park_idle: bool,
    /// Write a fanout's frames with one io_uring submission per batch; `false` writes
    /// with one `send` per connection (for comparisons).
    pub batched_writes: bool,
    /// `permessage-deflate` (RFC 7692).
    pub compression: CompressionConfig,
    /// Messages a Rust subscription (`Endpoint::subscribe`) may hold before it lags.
    pub subscription_bound: usize,
}

/// `permessage-deflate`: whether it is accepted, from what size messages go
/// compressed, and what the server asks of the client's compressor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressionConfig {
    /// Accept a client's offer; `false` declines every offer.
    pub enabled: bool,
    /// Messages at least this long (bytes, uncompressed) go compressed to clients that
    /// negotiated it; smaller ones go as they are.
    pub threshold: usize,
    /// Ask clients to reset their compressor between messages (the default), or accept
    /// their context takeover at the cost of an inflater per connection.
    pub inbound: InboundContext,
    /// Compress each broadcast once per core for all its subscribers (the default);
    /// `false` compresses it again for every delivery, as servers that keep a
    /// compressor per connection do (for comparisons).
    pub once_per_broadcast: bool,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            enabled: true,
            threshold: 1024,
            inbound: InboundContext::Reset,
            once_per_broadcast: true,
        }
    }
}

/// Per core: TCP connections in their HTTP phase (being read, answered, held by a
/// long-poll, or idle between keep-alive requests).
pub const DEFAULT_MAX_HTTP_CONNECTIONS: usize = 1024;

impl Default for Config {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Config {
            listen: "127.0.0.1:4000".parse().expect("valid address"),
            cores,
            idle_timeout: Duration::from_secs(60),
            max_frame: 256 << 10,
            tls: None,
            allowed_origins: Vec::new(),
            trusted_proxies: Vec::new(),
            max_outbound_bytes: 4 << 20,
            max_messages_per_sec: 5_000,
            message_burst: 10_000,
            max_connections: default_max_connections(cores, DEFAULT_MAX_HTTP_CONNECTIONS),
            max_http_connections: DEFAULT_MAX_HTTP_CONNECTIONS,
            request_timeout: Duration::from_secs(10),
            drain_batch: 10_000,
            drain_interval: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(30),
            api_key: None,
            demo_token_secret: None,
            cluster: None,
            park_idle: true,
            batched_writes: true,
            compression: CompressionConfig::default(),
            subscription_bound: crate::shard::api::endpoint::DEFAULT_SUBSCRIPTION_BOUND,
        }
    }
}

/// Enriches presence payloads before they are sent (Phoenix's `fetch/2`): called with
/// the topic and a map `{key: {"metas": [...]}}` to change in place.
pub type PresenceFetch = Box<dyn Fn(&str, &mut serde_json::Value) + Send + Sync>;

/// Descriptors kept for listeners, rings, eventfds, Redis and the odd file.
const FD_RESERVE: usize = 256;

/// What the open-file limit leaves for upgraded connections: the limit less a reserve
/// and less what `cores` cores may hold in their HTTP phase.
fn default_max_connections(cores: usize, max_http_connections: usize) -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    let nofile = if ok { limit.rlim_cur as usize } else { 1024 };
    nofile
        .saturating_sub(FD_RESERVE + cores * max_http_connections)
        .max(64)
}

impl Config {
    /// The default of [`Config::max_connections`] for `cores` cores that each hold at
    /// most `max_http_connections` in their HTTP phase: the process's open-file limit
    /// less those and a reserve of 256, so that accepting never runs out of files.
    pub fn max_connections_for(cores: usize, max_http_connections: usize) -> usize {
        default_max_connections(cores, max_http_connections)
    }
}

/// Where the TLS certificate comes from (`Config::tls`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// PEM files: the certificate chain (leaf first) and its private key. SIGHUP reads
    /// them again.
    Files {
        /// The PEM certificate chain, leaf first.
        cert: std::path::PathBuf,
        /// Its PEM private key.
        key: std::path::PathBuf,
    },
    /// A certificate made at start for `localhost` and `127.0.0.1`, for trying `wss://`
    /// locally (clients must be told to trust it).
    SelfSigned,
}

pub(crate) struct App {
    pub(crate) config: Config,
    pub(crate) router: Router,
    pub(crate) socket: Box<dyn DynSocketHandler>,
    pub(crate) presence_fetch: Option<PresenceFetch>,
    pub(crate) stats: Vec<Arc<CoreStats>>,
    /// Different at every start: the epochs of topic histories are made from it, so
    /// that a position from before a restart is never taken for a current one.
    pub(crate) epoch_seed: u64,
}
