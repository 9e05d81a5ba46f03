//! The `ringcast` binary: `ringcast serve` runs the seed app, `ringcast token` mints a
//! socket token.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ringcast::clock::unix_now;
use ringcast::proto::token;
use ringcast::seed::{self, UserSocket};
use ringcast::{Config, Server};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ringcast",
    version,
    about = "Phoenix Channels broadcast engine, thread-per-core on io_uring"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the seed app server.
    Serve(Box<ServeArgs>),
    /// Print a socket token for a user.
    Token(TokenArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on (WebSocket, long-poll and HTTP share it).
    #[arg(long, default_value = "127.0.0.1:4000")]
    listen: SocketAddr,
    /// Cores to run on, one pinned executor each (default: all).
    #[arg(long)]
    cores: Option<usize>,
    /// Key that signs and verifies socket tokens (required unless --dev).
    #[arg(long, env = "RINGCAST_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Development mode: without a --secret, sign tokens with the fixed development
    /// secret that anyone can read in the source; serve GET /demo/token, which mints a
    /// token for any user. Never on a server others can reach.
    #[arg(long)]
    dev: bool,
    /// Bearer key of the HTTP server API.
    #[arg(long, env = "RINGCAST_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Origin allowed to connect (repeat for several); none given allows any. As
    /// Phoenix's check_origin: `https://example.com`, `//example.com` (any scheme),
    /// `//*.example.com` (the domain and its subdomains), `http://localhost:4000`.
    #[arg(long = "allowed-origin")]
    allowed_origins: Vec<String>,
    /// Serve TLS only (`wss://`, `https://`) with this PEM certificate chain (leaf
    /// first); needs --tls-key. SIGHUP reads both files again.
    #[arg(long, requires = "tls_key", conflicts_with = "tls_self_signed")]
    tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Serve TLS with a certificate made at start for localhost and 127.0.0.1 (for
    /// trying wss:// locally; clients must be told to accept it).
    #[arg(long)]
    tls_self_signed: bool,
    /// A proxy (address or CIDR, repeat for several) whose `Forwarded` /
    /// `X-Forwarded-For` headers tell the client's address to `connect`.
    #[arg(long = "trusted-proxy", value_parser = parse_net)]
    trusted_proxies: Vec<ipnet::IpNet>,
    /// Close connections that send nothing for this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Largest inbound frame or message (kept well under --max-outbound, so that no
    /// single message can fill another client's queue).
    #[arg(long, default_value = "256KiB", value_parser = parse_size)]
    max_frame: usize,
    /// Bytes a connection may have queued before it is cut off (1008).
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    max_outbound: usize,
    /// Client messages per second a connection may send on average (burst: twice that);
    /// past it the connection is closed with 1008.
    #[arg(long, default_value_t = 5_000)]
    max_rate: u32,
    /// Connections the server accepts in all (default: the open-file limit less 256
    /// and less what the cores may hold in their HTTP phase); past it upgrades get 503.
    #[arg(long)]
    max_connections: Option<usize>,
    /// TCP connections one core may hold before they upgrade or finish a request;
    /// past it new ones are closed at once.
    #[arg(long, default_value_t = ringcast::server::DEFAULT_MAX_HTTP_CONNECTIONS)]
    max_http_connections: usize,
    /// How long a request (head and body) may take to arrive, however slowly.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// On SIGTERM, close this many connections (1001) per step, for the whole node ...
    #[arg(long, default_value_t = 10_000)]
    drain_batch: usize,
    /// ... one step every this long ...
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    drain_interval: Duration,
    /// ... and exit at the latest this long after the signal.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Broadcasts each `rooms:*` topic keeps for recovery (a rejoin with `since`).
    #[arg(long, default_value_t = seed::HISTORY_SIZE)]
    history_size: usize,
    /// How long each kept broadcast stays recoverable.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    history_ttl: Duration,
    /// Keep history on `bench:*` too, to measure what history costs (comparisons only).
    #[arg(long, hide = true)]
    bench_history: bool,
    /// Cluster mode: share topics with other nodes through this Redis server.
    #[arg(long, value_name = "redis://HOST:PORT")]
    redis: Option<String>,
    /// This node's name in the cluster (default: host name, port and process id).
    #[arg(long)]
    node_name: Option<String>,
    /// `off`: idle connections keep their tasks (parking off), for comparisons.
    #[arg(long, env = "RINGCAST_PARK", default_value = "on", hide = true)]
    park: Park,
    /// `send`: one syscall per connection instead of batched io_uring writes, for
    /// comparisons.
    #[arg(long, env = "RINGCAST_WRITE_PATH", default_value = "uring", hide = true)]
    write_path: WritePath,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Park {
    On,
    Off,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum WritePath {
    Uring,
    Send,
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The user id the token names.
    #[arg(long)]
    user: String,
    /// Signing key (defaults to the development secret, like `serve`).
    #[arg(long, env = "RINGCAST_SECRET", hide_env_values = true)]
    secret: Option<String>,
}

/// A CIDR (`10.0.0.0/8`) or a single address (`127.0.0.1`, a /32 or /128).
fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is neither an address nor a CIDR"))
}

fn parse_size(s: &str) -> Result<usize, String> {
    let size: bytesize::ByteSize = s.parse()?;
    usize::try_from(size.as_u64()).map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Token(args) => {
            let secret = args.secret.unwrap_or_else(|| seed::DEV_SECRET.to_string());
            println!("{}", token::sign(secret.as_bytes(), &args.user, unix_now()));
            Ok(())
        }
        Command::Serve(args) => serve(*args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RINGCAST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // A channel handler that panics is a channel crash, not a server fault: one log line,
    // with the backtrace when RUST_BACKTRACE asks for one (a client can make the seed's
    // handlers panic at will, so capturing one every time would be a cost it controls).
    std::panic::set_hook(Box::new(|info| {
        let backtrace = std::backtrace::Backtrace::capture();
        match backtrace.status() {
            std::backtrace::BacktraceStatus::Captured => tracing::warn!("panicked: {info}\n{backtrace}"),
            _ => tracing::warn!("panicked: {info} (RUST_BACKTRACE=1 for a backtrace)"),
        }
    }));
    let secret = match (args.secret, args.dev) {
        (Some(secret), _) => secret,
        (None, true) => {
            tracing::warn!("--dev without --secret: tokens are signed with the public development secret; anyone can mint them (GET /demo/token too). Never run like this where others can connect.");
            seed::DEV_SECRET.to_string()
        }
        (None, false) => anyhow::bail!(
            "ringcast serve needs --secret (or RINGCAST_SECRET) to sign socket tokens; pass --dev to try it locally on the public development secret"
        ),
    };
    if args.dev {
        tracing::warn!("--dev: GET /demo/token mints a token for any user");
    }
    if args.api_key.is_none() {
        tracing::info!("no --api-key: the HTTP server API answers 401 to everything");
    }
    let cluster = args.redis.map(|redis_url| ringcast::cluster::ClusterConfig {
        redis_url,
        node_name: args.node_name.unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}:{}:{}", host.trim(), args.listen.port(), std::process::id())
        }),
    });
    let defaults = Config::default();
    let router = if args.bench_history {
        seed::router_with_bench_history(args.history_size, args.history_ttl)
    } else {
        seed::router_with_history(args.history_size, args.history_ttl)
    };
    let cores = args.cores.unwrap_or(defaults.cores);
    let config = Config {
        listen: args.listen,
        cores,
        idle_timeout: args.idle_timeout,
        max_frame: args.max_frame,
        allowed_origins: args.allowed_origins,
        tls: match (args.tls_cert, args.tls_key) {
            (Some(cert), Some(key)) => Some(ringcast::server::TlsSource::Files { cert, key }),
            _ if args.tls_self_signed => Some(ringcast::server::TlsSource::SelfSigned),
            _ => None,
        },
        trusted_proxies: args.trusted_proxies,
        max_outbound_bytes: args.max_outbound,
        max_messages_per_sec: args.max_rate,
        message_burst: args.max_rate.saturating_mul(2),
        max_connections: args
            .max_connections
            .unwrap_or_else(|| Config::max_connections_for(cores, args.max_http_connections)),
        max_http_connections: args.max_http_connections,
        request_timeout: args.request_timeout,
        drain_batch: args.drain_batch.max(1),
        drain_interval: args.drain_interval,
        drain_timeout: args.drain_timeout,
        api_key: args.api_key,
        demo_token_secret: args.dev.then(|| secret.clone()),
        cluster,
        park_idle: args.park == Park::On,
        batched_writes: args.write_path == WritePath::Uring,
    };
    let cores = config.cores;
    let listen = config.listen;
    let server = Server::bind(config, UserSocket::new(&secret), router)
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let addr = server.local_addr();
    let running = server.start()?;
    let shutdown = running.shutdown_handle();
    let tls = running.tls();
    let scheme = if tls.is_some() { "TLS" } else { "plain TCP" };
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::spawn(move || {
        let mut draining = false;
        for signal in signals.forever() {
            if signal == SIGHUP {
                match tls.as_ref().map(|tls| tls.reload()) {
                    Some(Ok(())) => tracing::info!("SIGHUP: certificate reloaded; new handshakes use it"),
                    Some(Err(e)) => {
                        tracing::error!("SIGHUP: certificate not reloaded, the old one stays: {e}")
                    }
                    None => tracing::info!("SIGHUP: no TLS certificate to reload"),
                }
            } else if draining {
                // A second signal does not wait for the drain.
                tracing::warn!("signal {signal} again: exiting without waiting for the drain");
                std::process::exit(0);
            } else {
                draining = true;
                tracing::info!(
                    "signal {signal}: draining (healthz 503, connections closed with 1001 in batches)"
                );
                shutdown.shutdown();
            }
        }
    });
    eprintln!("ringcast listening on {addr} with {cores} core(s), {scheme}");
    running.join();
    tracing::info!("stopped");
    Ok(())
}
