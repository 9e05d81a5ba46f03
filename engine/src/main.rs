//! The `ringcast` binary: `ringcast serve` runs the seed app, `ringcast token` mints a
//! socket token.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
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
    /// Work with a `serve` settings file.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check a settings file (with the RINGCAST_* environment over it) and print the
    /// settings `serve` would run with, secrets masked.
    Check {
        /// The TOML file: the `serve` flags' long names with underscores as keys.
        path: std::path::PathBuf,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Read settings from this TOML file first: keys are these flags' long names with
    /// underscores (`max_rate = 100`). RINGCAST_* environment variables (the names
    /// upper-cased: RINGCAST_MAX_RATE) override the file, and flags override both.
    #[arg(long, value_name = "PATH")]
    config: Option<std::path::PathBuf>,
    /// Log lines as plain text or as one JSON object each.
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
    /// A summary line at info this often: connections, joins/s, deliveries/s, drops
    /// (0s: none). Connection lifecycle events are at debug (RINGCAST_LOG=debug).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    log_summary: Duration,
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
    /// Cluster mode: share topics with other nodes through this Redis server
    /// (`redis://[USER:PASSWORD@]HOST:PORT`, or `rediss://` for TLS).
    #[arg(long, value_name = "redis://HOST:PORT")]
    redis: Option<String>,
    /// Cluster mode through a Redis Cluster (Redis ≥ 7): some of its nodes, comma
    /// separated (any of them; the masters are asked for). Topics spread over the
    /// masters with sharded pub/sub.
    #[arg(long, value_name = "URL,...", value_delimiter = ',', conflicts_with = "redis")]
    redis_cluster: Vec<String>,
    /// This node's name in the cluster (default: host name, port and process id).
    #[arg(long)]
    node_name: Option<String>,
    /// Cluster mode: the key every node signs its messages with and checks others' by
    /// (the same on every node; required with --redis). Messages in Redis without it
    /// are dropped and counted (ringcast_cluster_forged_total).
    #[arg(long, env = "RINGCAST_CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: Option<String>,
    /// Cluster mode over `rediss://`: the CA (PEM) the Redis server's certificate must
    /// chain to (default: the system's roots).
    #[arg(long, value_name = "PATH")]
    redis_ca: Option<std::path::PathBuf>,
    /// Broadcasts the Redis link sends in one pipelined round trip at most; 1 sends
    /// each on its own (for comparisons).
    #[arg(long, env = "RINGCAST_REDIS_PIPELINE", default_value_t = ringcast::cluster::DEFAULT_PIPELINE, hide = true)]
    redis_pipeline: usize,
    /// `permessage-deflate`: `on` accepts a client's offer (browsers always make one),
    /// `off` declines it.
    #[arg(long, default_value = "on")]
    compress: Switch,
    /// Messages at least this long go compressed to clients that negotiated it.
    #[arg(long, default_value = "1KiB", value_parser = parse_size)]
    compress_threshold: usize,
    /// `reset`: ask clients to reset their compressor between messages, so that a
    /// connection keeps no inflater; `keep`: accept their context takeover, at about
    /// 40 KiB per connection that sends compressed messages.
    #[arg(long, default_value = "reset")]
    compress_client_context: ClientContext,
    /// `per-connection`: compress a broadcast again for every delivery instead of once
    /// per core, as servers with a compressor per connection do, for comparisons.
    #[arg(long, env = "RINGCAST_COMPRESS_PATH", default_value = "once", hide = true)]
    compress_path: CompressPath,
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
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ClientContext {
    Reset,
    Keep,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CompressPath {
    Once,
    PerConnection,
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

/// The `serve` subcommand's clap command, with later settings overriding earlier ones
/// (the file's, then the environment's, then the flags').
fn serve_command() -> clap::Command {
    Cli::command()
        .find_subcommand("serve")
        .expect("serve is a subcommand")
        .clone()
        .args_override_self(true)
}

/// `serve`'s settings from the file (`file`, or `--config` among `flags`), the
/// RINGCAST_* environment and `flags`, merged; the flag-level errors of clap exit as
/// clap does.
fn layered_serve(
    file: Option<&std::path::Path>,
    flags: &[String],
) -> anyhow::Result<(ServeArgs, ringcast::cli::Layered, clap::ArgMatches)> {
    let path = file
        .map(std::path::Path::to_path_buf)
        .or_else(|| ringcast::cli::config_path(flags).map(Into::into));
    let text = match &path {
        Some(p) => Some(
            std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("config file {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("RINGCAST_"))
        .collect();
    let cmd = serve_command();
    let layered = ringcast::cli::layered(&cmd, path.as_deref().zip(text.as_deref()), &env, flags)
        .map_err(anyhow::Error::msg)?;
    let mut argv = vec!["serve".to_string()];
    argv.extend(layered.args.iter().cloned());
    let matches = cmd.try_get_matches_from(argv).unwrap_or_else(|e| e.exit());
    let args = ServeArgs::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    Ok((args, layered, matches))
}

/// Logs a summary line every `every`: open connections and channels, joins and
/// deliveries per second, and what was dropped or cut off since the last line.
fn log_summaries(stats: &[std::sync::Arc<ringcast::CoreStats>], every: Duration) {
    let sum = |f: &dyn Fn(&ringcast::CoreStats) -> u64| stats.iter().map(|s| f(s)).sum::<u64>();
    let drops = |s: &ringcast::CoreStats| {
        s.slow_closed.get()
            + s.inbox_dropped.get()
            + s.mesh_dropped.get()
            + s.mailbox_closed.get()
            + s.longpoll_inbound_closed.get()
            + s.subscription_lagged.get()
    };
    let mut last = (sum(&|s| s.joins.get()), sum(&|s| s.deliveries.get()), sum(&drops));
    loop {
        std::thread::sleep(every);
        let now = (sum(&|s| s.joins.get()), sum(&|s| s.deliveries.get()), sum(&drops));
        let secs = every.as_secs_f64();
        tracing::info!(
            connections = sum(&|s| s.connections.get()),
            channels = sum(&|s| s.channels.get()),
            joins_per_sec = format!("{:.1}", (now.0 - last.0) as f64 / secs),
            deliveries_per_sec = format!("{:.0}", (now.1 - last.1) as f64 / secs),
            dropped = now.2 - last.2,
            "summary"
        );
        last = now;
    }
}

/// Flags whose values are secrets: never printed, never logged.
const SECRET_FLAGS: &[&str] = &["secret", "api-key", "cluster-secret"];

/// `ringcast config check PATH`: the effective settings, one per line, with where each
/// came from.
fn config_check(path: &std::path::Path) -> anyhow::Result<()> {
    let (_, layered, matches) = layered_serve(Some(path), &[])?;
    println!(
        "# {}: ok; the settings `ringcast serve --config {}` runs with:",
        path.display(),
        path.display()
    );
    for arg in serve_command().get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if matches!(long, "help" | "version" | "config") {
            continue;
        }
        let key = long.replace('-', "_");
        let source = layered
            .sources
            .get(long)
            .map_or("default".to_string(), ToString::to_string);
        let values: Vec<String> = matches
            .get_raw(arg.get_id().as_str())
            .map(|v| v.map(|s| s.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let shown = match values.as_slice() {
            [] => "(unset)".to_string(),
            _ if SECRET_FLAGS.contains(&long) => "\"********\"".to_string(),
            [one] if !matches!(arg.get_action(), clap::ArgAction::Append) => format!("{one:?}"),
            many => format!("{many:?}"),
        };
        println!("{key} = {shown}  # {source}");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("serve") {
        let (args, _, _) = layered_serve(None, &argv[2..])?;
        return serve(args);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Token(args) => {
            let secret = args.secret.unwrap_or_else(|| seed::DEV_SECRET.to_string());
            println!("{}", token::sign(secret.as_bytes(), &args.user, unix_now()));
            Ok(())
        }
        Command::Config(ConfigCommand::Check { path }) => config_check(&path),
        Command::Serve(args) => serve(*args),
    }
}

fn serve(mut args: ServeArgs) -> anyhow::Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("RINGCAST_LOG").unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
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
    let redis = match (args.redis.take(), std::mem::take(&mut args.redis_cluster)) {
        (Some(url), _) => Some(ringcast::cluster::RedisAddr::Server(url)),
        (None, seeds) if !seeds.is_empty() => Some(ringcast::cluster::RedisAddr::Cluster(seeds)),
        _ => None,
    };
    if let Some(redis) = &redis {
        if args.cluster_secret.as_deref().is_none_or(str::is_empty) {
            let flag = match redis {
                ringcast::cluster::RedisAddr::Server(_) => "--redis",
                ringcast::cluster::RedisAddr::Cluster(_) => "--redis-cluster",
            };
            anyhow::bail!(
                "{flag} needs --cluster-secret (or RINGCAST_CLUSTER_SECRET), the same on every node: anyone who can PUBLISH to the Redis could otherwise speak for a node"
            );
        }
    }
    if let Some(ca) = &args.redis_ca {
        // Read again by the link; a file that is not there is the operator's to fix now.
        std::fs::metadata(ca).map_err(|e| anyhow::anyhow!("cannot read --redis-ca {}: {e}", ca.display()))?;
    }
    let cluster_secret = args.cluster_secret.clone().unwrap_or_default();
    let node_name = args.node_name.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}:{}:{}", host.trim(), args.listen.port(), std::process::id())
    });
    let cluster = redis.map(|redis| ringcast::cluster::ClusterConfig {
        pipeline: args.redis_pipeline,
        redis_ca: args.redis_ca.clone(),
        ..ringcast::cluster::ClusterConfig::new(redis, node_name, cluster_secret)
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
        compression: ringcast::CompressionConfig {
            enabled: args.compress == Switch::On,
            threshold: args.compress_threshold,
            inbound: match args.compress_client_context {
                ClientContext::Reset => ringcast::InboundContext::Reset,
                ClientContext::Keep => ringcast::InboundContext::Keep,
            },
            once_per_broadcast: args.compress_path == CompressPath::Once,
        },
        // The seed app has no Rust subscribers; embedders set their own.
        subscription_bound: defaults.subscription_bound,
    };
    let cores = config.cores;
    let listen = config.listen;
    let server = Server::bind(config, UserSocket::new(&secret), router)
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let addr = server.local_addr();
    let running = server.start()?;
    let shutdown = running.shutdown_handle();
    if !args.log_summary.is_zero() {
        let (stats, every) = (running.stats(), args.log_summary);
        std::thread::spawn(move || log_summaries(&stats, every));
    }
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
    tracing::info!("ringcast listening on {addr} with {cores} core(s), {scheme}");
    running.join();
    tracing::info!("stopped");
    Ok(())
}
