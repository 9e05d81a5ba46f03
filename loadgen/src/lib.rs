//! `ringcast-loadgen`: opens many Phoenix Channels V2 WebSocket connections against a
//! ringcast (or any Phoenix-compatible) server and measures it.
//!
//! - `connect`: ramp to N joined connections at a fixed rate, hold them, report the
//!   ramp, the failures by kind and (with `--server-pid`) the server's memory per
//!   connection.
//! - `fanout`: N subscribers join one topic, a publisher sends M `new_msg`
//!   broadcasts, every delivery is checked (loss, duplicates, reorders) and timed.
//! - `rooms`: R rooms of M members, every member sending `new_msg` at a fixed rate;
//!   every delivery is checked per sender and timed.
//! - `churn`: N slots cycling connect → join → pushes → leave → close at a fixed total
//!   rate; cycles, failures by kind, cycle latency, server RSS growth.
//! - `presence`: N members of one `rooms:*` room, joined a few at a time, reading all
//!   the presence traffic without parsing it (bytes and frames counted, replies found
//!   by a prefix check); on a signal file they time the first diff with a newcomer's key.
//! - `newcomer`: one connection joins the room and checks its `presence_state` (and the
//!   diffs after it, applied as phoenix.js `Presence` does) against the expected members.
//! - `recover`: subscribers of a topic with history drop their connections and rejoin
//!   with `since` while a publisher sends; lost, duplicated and reordered messages,
//!   recovered joins and the time to recover.
//!
//! Thread-per-core on glommio; one process holds at most RLIMIT_NOFILE - 100
//! connections and spawns worker processes of itself beyond that.

//!
//! The library is what the binary runs ([`main`]), and what the benchmark harness reads
//! the reports with ([`report`]) and samples processes with ([`sys`]).

mod client;
mod newcomer;
mod orchestrate;
mod phx;
pub mod presence;
mod recover;
pub mod report;
mod run;
pub mod sys;
pub mod tls;

pub use newcomer::NewcomerReport;
pub use phx::timed_body;
pub use recover::RecoverReport;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::client::Target;
use crate::run::{Job, Mode};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "ringcast-loadgen",
    version,
    about = "Load generator for ringcast (Phoenix Channels V2 over WebSocket)"
)]
pub struct Cli {
    /// Executors (threads) per process; each opens its share of the connections.
    #[arg(long, global = true, default_value_t = 1)]
    pub cores: usize,
    /// Secret that signs the socket tokens (must match the server's).
    #[arg(
        long,
        global = true,
        env = "RINGCAST_SECRET",
        hide_env_values = true,
        default_value = ringcast::seed::DEV_SECRET
    )]
    pub secret: String,
    /// Write every figure of the run as JSON to this file.
    #[arg(long, global = true)]
    pub json: Option<PathBuf>,
    /// Server process to sample (RSS from /proc/PID/status, CPU from /proc/PID/stat).
    #[arg(long, global = true)]
    pub server_pid: Option<u32>,
    /// Loopback source addresses to rotate over, from 127.0.0.2 upward (max 253).
    #[arg(long, global = true, default_value_t = 64)]
    pub sources: u32,
    /// Connections per process at most (default: RLIMIT_NOFILE - 100); more are
    /// spread over worker processes.
    #[arg(long, global = true)]
    pub max_per_process: Option<u64>,
    /// Time limit for each stage of opening a connection (TCP connect, upgrade, join).
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    pub stage_timeout: Duration,
    /// connect, fanout and rooms: attempts again, up to this many times, a connection
    /// that failed to connect, upgrade or join, after phoenix.js's reconnect delays
    /// (10 ms, 50 ms, ... 2 s, then 5 s); what was retried is counted apart from what
    /// failed for good. Churn and presence count every failure as they did.
    #[arg(long, global = true, default_value_t = 0)]
    pub retries: u32,
    /// Phoenix heartbeat interval of every connection.
    #[arg(long, global = true, default_value = "25s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,
    /// No progress bars.
    #[arg(long, global = true)]
    pub quiet: bool,
    /// `wss://`: trust the CA certificates in this PEM file.
    #[arg(long, global = true, value_name = "PATH", conflicts_with = "tls_insecure")]
    pub tls_ca: Option<PathBuf>,
    /// `wss://`: accept any server certificate, self-signed included (handshake
    /// signatures are still checked). For trying a server locally.
    #[arg(long, global = true)]
    pub tls_insecure: bool,
    /// Offer `permessage-deflate`, as browsers do; reports then count the WebSocket
    /// bytes received per delivery.
    #[arg(long, global = true)]
    pub compress: bool,
    /// Internal: run as a worker for connections START:COUNT, reporting JSON lines on
    /// stdout.
    #[arg(long, global = true, hide = true)]
    pub worker_of: Option<String>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Cmd {
    /// Ramp to N joined connections at R per second, hold them, report.
    Connect(ConnectArgs),
    /// N subscribers on one topic, one publisher sending M messages: delivery rate,
    /// loss, duplicates, reorders, latency.
    Fanout(FanoutArgs),
    /// R rooms x M members, every member sending at a fixed rate: delivery rate, loss,
    /// duplicates, reorders per sender, latency.
    Rooms(RoomsArgs),
    /// N slots cycling connect → join → pushes → leave → close: cycles, failures,
    /// cycle latency, server RSS growth.
    Churn(ChurnArgs),
    /// N members of one presence room (`rooms:*`), joined at most --window at a time,
    /// reading every presence frame cheaply; held until --release-file appears.
    Presence(PresenceArgs),
    /// One newcomer joins a presence room and counts the keys of its presence_state
    /// and the diffs after it, against the members expected.
    Newcomer(NewcomerArgs),
    /// Subscribers of a topic with history drop their connections (at random, or all
    /// at once) and rejoin with `since` while a publisher sends at a steady rate: lost,
    /// duplicated, reordered, recovered joins, time to recover.
    Recover(RecoverArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RecoverArgs {
    /// Server URL (ws://HOST:PORT[/path]).
    #[arg(long, default_value = "ws://127.0.0.1:4000")]
    pub url: String,
    /// The topic (one with history, e.g. `rooms:*` of the seed app).
    #[arg(long, default_value = "rooms:recover")]
    pub topic: String,
    /// Subscribers; each drops its connection once.
    #[arg(long, short = 'n', default_value_t = 50)]
    pub subscribers: u64,
    /// Messages the publisher sends per second ...
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// ... for this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// How long a dropped subscriber stays away before it connects again.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub away: Duration,
    /// Drop every subscriber at the same moment (else each at a random one).
    #[arg(long)]
    pub all_at_once: bool,
    /// After the last message, how long the subscribers keep reading.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// Seed of the random drop times.
    #[arg(long, default_value_t = 16)]
    pub seed: u64,
}

#[derive(Args, Debug, Clone)]
pub struct PresenceArgs {
    /// Server URL (ws:// or wss://HOST:PORT[/path]).
    #[arg(long, default_value = "ws://127.0.0.1:4000")]
    pub url: String,
    /// Members to join.
    #[arg(long, short = 'n')]
    pub connections: u64,
    /// New members per second at most.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Joins under way at once at most (sent, their presence_state not yet read): the
    /// ramp slows down as the room's state grows.
    #[arg(long, default_value_t = 8)]
    pub window: u64,
    /// The room (a `rooms:*` topic).
    #[arg(long, default_value = "rooms:presence")]
    pub topic: String,
    /// The `name` every member joins with.
    #[arg(long, default_value = "m")]
    pub name: String,
    /// Member i's user id (its presence key) is `<user-prefix><i>`; give every
    /// loadgen of one room its own.
    #[arg(long, default_value = "m-")]
    pub user_prefix: String,
    /// The key whose join the members time once armed (e.g. newcomer-0).
    #[arg(long)]
    pub watch: Option<String>,
    /// When this file appears, the members start looking for --watch; it holds the arm
    /// time (unix nanoseconds) that reach times count from.
    #[arg(long)]
    pub arm_file: Option<PathBuf>,
    /// When this file appears, the members close and the report is written.
    #[arg(long)]
    pub release_file: Option<PathBuf>,
    /// Longest ramp.
    #[arg(long, default_value = "3600s", value_parser = humantime::parse_duration)]
    pub ramp_timeout: Duration,
    /// Longest hold once all are joined (without a --release-file: the hold).
    #[arg(long, default_value = "600s", value_parser = humantime::parse_duration)]
    pub max_hold: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct NewcomerArgs {
    /// Server URL (ws:// or wss://HOST:PORT[/path]).
    #[arg(long, default_value = "ws://127.0.0.1:4000")]
    pub url: String,
    /// The room.
    #[arg(long, default_value = "rooms:presence")]
    pub topic: String,
    /// Its user id, i.e. its presence key; starts with `newcomer-`.
    #[arg(long, default_value = "newcomer-0")]
    pub key: String,
    /// Members expected in the room (keys not starting with `newcomer-`).
    #[arg(long)]
    pub members: u64,
    /// Newcomers joining about now, this one included: the view is complete with
    /// members + newcomers keys.
    #[arg(long, default_value_t = 1)]
    pub newcomers: u64,
    /// With the state and its own join seen, stop after this long without a message.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub quiet_for: Duration,
    /// Longest the whole check may take.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    /// Server URL (ws:// or wss://HOST:PORT, optionally with the socket path, default
    /// /socket/websocket).
    #[arg(long, default_value = "ws://127.0.0.1:4000")]
    pub url: String,
    /// Connections to open.
    #[arg(long, short = 'n')]
    pub connections: u64,
    /// New connections per second.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Topic every connection joins.
    #[arg(long, default_value = "bench:load")]
    pub topic: String,
    /// Spread the connections over this many topics (`<topic>:<i mod K>`).
    #[arg(long, default_value_t = 1)]
    pub topics: u64,
    /// How long to hold the connections once all are up.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub hold: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    /// Server URL (ws:// or wss://HOST:PORT[/path]).
    #[arg(long, default_value = "ws://127.0.0.1:4000")]
    pub url: String,
    /// Subscriber connections.
    #[arg(long, short = 'n')]
    pub subscribers: u64,
    /// Topic of the broadcast.
    #[arg(long, default_value = "bench:fan")]
    pub topic: String,
    /// Messages the publisher sends.
    #[arg(long, short = 'm', default_value_t = 200)]
    pub messages: u64,
    /// Messages per second; 0 = as fast as the server delivers, bounded by --window.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// With --rate 0: messages in flight at most, counted on a sample subscriber that
    /// joins after all others.
    #[arg(long, default_value_t = 64)]
    pub window: u64,
    /// New subscriber connections per second during the ramp.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// After the last send, wait at most this long for outstanding deliveries.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Time limit of the publish phase (from the first send to the last).
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub publish_timeout: Duration,
    /// Pad each message's body with this many bytes of chat-like text (for compression:
    /// the seed's `new_msg` is small, under the server's 1 KiB threshold).
    #[arg(long, default_value_t = 0)]
    pub pad: usize,
    /// Publish through this server instead of --url (another node of a cluster): the
    /// subscribers, the sample one included, stay on --url, so every delivery crosses
    /// the cluster link.
    #[arg(long)]
    pub publish_url: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct RoomsArgs {
    /// Server URL (ws:// or wss://HOST:PORT[/path]).
    #[arg(long, default_value = "ws://127.0.0.1:4000")]
    pub url: String,
    /// Rooms.
    #[arg(long, short = 'r')]
    pub rooms: u64,
    /// Members per room (each one connection).
    #[arg(long, short = 'm')]
    pub members: u64,
    /// Topic prefix; room i is `<prefix>room-<i>`. `bench:` has no presence traffic,
    /// `rooms:` runs the seed app's chat rooms (with presence).
    #[arg(long, default_value = "bench:")]
    pub topic_prefix: String,
    /// `new_msg` per second that every member sends.
    #[arg(long, default_value_t = 1.0)]
    pub rate_per_member: f64,
    /// How long the members send.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// New member connections per second during the ramp.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// After the last send, wait at most this long for outstanding deliveries.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct ChurnArgs {
    /// Server URL (ws:// or wss://HOST:PORT[/path]).
    #[arg(long, default_value = "ws://127.0.0.1:4000")]
    pub url: String,
    /// Concurrent slots, each running one cycle at a time.
    #[arg(long, short = 'n')]
    pub connections: u64,
    /// Cycles per second, all slots together.
    #[arg(long, default_value_t = 100.0)]
    pub cycle_rate: f64,
    /// How long new cycles start; cycles under way then finish.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Topic every cycle joins.
    #[arg(long, default_value = "bench:churn")]
    pub topic: String,
    /// Spread the slots over this many topics (`<topic>:<i mod K>`).
    #[arg(long, default_value_t = 1)]
    pub topics: u64,
    /// `new_msg` pushes per cycle, between the join and the leave.
    #[arg(long, default_value_t = 0)]
    pub pushes: u64,
}

/// Rooms: messages each member sends, and the interval between them.
pub fn room_schedule(rate_per_member: f64, duration: Duration) -> (u64, Duration) {
    let n = (rate_per_member * duration.as_secs_f64()).round().max(1.0) as u64;
    (n, Duration::from_secs_f64(1.0 / rate_per_member))
}

/// How `wss://` URLs check the server's certificate, from the flags.
pub fn trust_of(cli: &Cli) -> tls::Trust<'_> {
    match (&cli.tls_ca, cli.tls_insecure) {
        (_, true) => tls::Trust::Any,
        (Some(ca), false) => tls::Trust::CaFile(ca),
        (None, false) => tls::Trust::Nothing,
    }
}

/// `ws://` or `wss://host:port[/path]` → target address, Host header, WebSocket path
/// and, for `wss://`, the TLS configuration (checking certificates as `trust` says).
pub fn parse_url(url: &str, trust: tls::Trust) -> anyhow::Result<Target> {
    let (secure, rest) = if let Some(rest) = url.strip_prefix("wss://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("ws://") {
        (false, rest)
    } else {
        bail!("--url {url}: only ws:// and wss:// URLs are supported");
    };
    if !secure && trust != tls::Trust::Nothing {
        bail!("--url {url}: --tls-ca and --tls-insecure need a wss:// URL");
    }
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let path = path.split('?').next().unwrap_or("").trim_end_matches('/');
    let path = if path.is_empty() {
        "/socket/websocket".to_string()
    } else if path.ends_with("/websocket") {
        path.to_string()
    } else {
        format!("{path}/websocket")
    };
    let with_port = if hostport
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        hostport.to_string()
    } else if secure {
        format!("{hostport}:443")
    } else {
        format!("{hostport}:80")
    };
    let addrs: Vec<SocketAddr> = with_port
        .to_socket_addrs()
        .with_context(|| format!("--url {url}: cannot resolve {hostport}"))?
        .collect();
    let addr = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .with_context(|| format!("--url {url}: {hostport} resolves to nothing"))?;
    let tls = match secure {
        false => None,
        true => Some(tls::TlsTarget {
            config: tls::client_config(trust)?,
            name: tls::server_name(hostport).with_context(|| format!("--url {url}"))?,
        }),
    };
    Ok(Target {
        addr,
        host: hostport.to_string(),
        path,
        tls,
        compress: false,
    })
}

/// Source addresses 127.0.0.2 .. for a loopback IPv4 target; none otherwise.
pub fn sources_for(target: &SocketAddr, n: u32) -> anyhow::Result<Vec<Ipv4Addr>> {
    match target.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => {
            if n == 0 || n > 253 {
                bail!("--sources {n}: between 1 and 253 (127.0.0.2 .. 127.0.0.254)");
            }
            Ok((0..n).map(|i| Ipv4Addr::new(127, 0, 0, 2 + i as u8)).collect())
        }
        _ => Ok(Vec::new()),
    }
}

/// The job of this run, as every process sees it.
pub fn job_of(cli: &Cli) -> anyhow::Result<(Job, u64)> {
    let job = match &cli.cmd {
        Cmd::Connect(a) => {
            if a.rate.is_nan() || a.rate <= 0.0 {
                bail!("--rate must be above 0");
            }
            let target = Target {
                compress: cli.compress,
                ..parse_url(&a.url, trust_of(cli))?
            };
            Job {
                mode: Mode::Hold,
                sources: sources_for(&target.addr, cli.sources)?,
                target,
                secret: cli.secret.clone(),
                topic: a.topic.clone(),
                topics: a.topics.max(1),
                rate: a.rate,
                total: a.connections,
                stage_timeout: cli.stage_timeout,
                cores: cli.cores.max(1),
                heartbeat: cli.heartbeat,
                exact_duplicates: true,
                join_payload: "{}".into(),
                user_prefix: "lg".into(),
                watch: None,
                ramp_limit: None,
                retries: cli.retries,
            }
        }
        Cmd::Fanout(a) => {
            if a.connect_rate.is_nan() || a.connect_rate <= 0.0 {
                bail!("--connect-rate must be above 0");
            }
            if a.messages == 0 || a.subscribers == 0 {
                bail!("--subscribers and --messages must be at least 1");
            }
            if a.rate < 0.0 || (a.rate == 0.0 && a.window == 0) {
                bail!("--rate must be >= 0, and --window > 0 when --rate is 0");
            }
            let target = Target {
                compress: cli.compress,
                ..parse_url(&a.url, trust_of(cli))?
            };
            Job {
                mode: Mode::Subscribe { messages: a.messages },
                sources: sources_for(&target.addr, cli.sources)?,
                target,
                secret: cli.secret.clone(),
                topic: a.topic.clone(),
                topics: 1,
                rate: a.connect_rate,
                total: a.subscribers,
                stage_timeout: cli.stage_timeout,
                cores: cli.cores.max(1),
                heartbeat: cli.heartbeat,
                // A seen-bitset per subscriber, while the bitsets stay under 256 MiB.
                exact_duplicates: a.messages.div_ceil(8).saturating_mul(a.subscribers) <= 256 << 20,
                join_payload: "{}".into(),
                user_prefix: "lg".into(),
                watch: None,
                ramp_limit: None,
                retries: cli.retries,
            }
        }
        Cmd::Rooms(a) => {
            if a.connect_rate.is_nan() || a.connect_rate <= 0.0 {
                bail!("--connect-rate must be above 0");
            }
            if a.rooms == 0 || a.members == 0 {
                bail!("--rooms and --members must be at least 1");
            }
            if a.rate_per_member.is_nan() || a.rate_per_member <= 0.0 {
                bail!("--rate-per-member must be above 0");
            }
            let total = a
                .rooms
                .checked_mul(a.members)
                .context("--rooms x --members is too large")?;
            let (per_sender, interval) = room_schedule(a.rate_per_member, a.duration);
            let target = Target {
                compress: cli.compress,
                ..parse_url(&a.url, trust_of(cli))?
            };
            Job {
                mode: Mode::Room {
                    rooms: a.rooms,
                    members: a.members,
                    per_sender,
                    interval,
                },
                sources: sources_for(&target.addr, cli.sources)?,
                target,
                secret: cli.secret.clone(),
                topic: a.topic_prefix.clone(),
                topics: 1,
                rate: a.connect_rate,
                total,
                stage_timeout: cli.stage_timeout,
                cores: cli.cores.max(1),
                heartbeat: cli.heartbeat,
                // A seen-bitset per (member, sender), while they stay under 256 MiB.
                exact_duplicates: per_sender
                    .div_ceil(8)
                    .saturating_mul(a.members)
                    .saturating_mul(total)
                    <= 256 << 20,
                join_payload: "{}".into(),
                user_prefix: "lg".into(),
                watch: None,
                ramp_limit: None,
                retries: cli.retries,
            }
        }
        Cmd::Churn(a) => {
            if a.cycle_rate.is_nan() || a.cycle_rate <= 0.0 {
                bail!("--cycle-rate must be above 0");
            }
            if a.connections == 0 {
                bail!("--connections must be at least 1");
            }
            let target = Target {
                compress: cli.compress,
                ..parse_url(&a.url, trust_of(cli))?
            };
            Job {
                // Each slot runs a cycle every N / rate seconds; the ramp staggers them.
                mode: Mode::Churn {
                    period: Duration::from_secs_f64(a.connections as f64 / a.cycle_rate),
                    duration: a.duration,
                    pushes: a.pushes,
                },
                sources: sources_for(&target.addr, cli.sources)?,
                target,
                secret: cli.secret.clone(),
                topic: a.topic.clone(),
                topics: a.topics.max(1),
                rate: a.cycle_rate,
                total: a.connections,
                stage_timeout: cli.stage_timeout,
                cores: cli.cores.max(1),
                heartbeat: cli.heartbeat,
                exact_duplicates: false,
                join_payload: "{}".into(),
                user_prefix: "lg".into(),
                watch: None,
                ramp_limit: None,
                retries: cli.retries,
            }
        }
        Cmd::Presence(a) => {
            if a.rate.is_nan() || a.rate <= 0.0 || a.window == 0 || a.connections == 0 {
                bail!("--rate, --window and --connections must be above 0");
            }
            if a.user_prefix.starts_with(presence::NEWCOMER_PREFIX) {
                bail!("--user-prefix may not start with {}", presence::NEWCOMER_PREFIX);
            }
            let target = Target {
                compress: cli.compress,
                ..parse_url(&a.url, trust_of(cli))?
            };
            Job {
                mode: Mode::Presence { window: a.window },
                sources: sources_for(&target.addr, cli.sources)?,
                target,
                secret: cli.secret.clone(),
                topic: a.topic.clone(),
                topics: 1,
                rate: a.rate,
                total: a.connections,
                stage_timeout: cli.stage_timeout,
                cores: cli.cores.max(1),
                heartbeat: cli.heartbeat,
                exact_duplicates: false,
                join_payload: serde_json::json!({ "name": a.name }).to_string(),
                user_prefix: a.user_prefix.clone(),
                watch: a.watch.as_ref().map(|k| format!("\"{k}\"").into_bytes()),
                ramp_limit: Some(a.ramp_timeout),
                retries: cli.retries,
            }
        }
        Cmd::Newcomer(_) => bail!("newcomer runs no slices"),
        Cmd::Recover(_) => bail!("recover runs no slices"),
    };
    let total = job.total;
    Ok((job, total))
}

/// The longest the whole run may take; every process ends itself after it.
pub fn hard_deadline(cli: &Cli) -> Duration {
    let st = cli.stage_timeout.as_secs_f64();
    let secs = match &cli.cmd {
        // On a starved box the ramp runs well behind its rate (the million-connection
        // run's took 1.25x as long): twice the planned ramp, then the hold, then what
        // the parent allows for closing and reporting (orchestrate::end_hold).
        Cmd::Connect(a) => {
            2.0 * a.connections as f64 / a.rate
                + 3.0 * st
                + 10.0
                + a.hold.as_secs_f64()
                + 70.0
                + a.connections as f64 / 250.0
        }
        Cmd::Fanout(a) => {
            a.subscribers as f64 / a.connect_rate
                + 6.0 * st
                + 10.0
                + a.publish_timeout.as_secs_f64()
                + a.drain_timeout.as_secs_f64()
                + 40.0
        }
        Cmd::Rooms(a) => {
            (a.rooms.saturating_mul(a.members)) as f64 / a.connect_rate
                + 4.0 * st
                + 10.0
                + a.duration.as_secs_f64()
                + a.drain_timeout.as_secs_f64()
                + 40.0
        }
        // The last cycle starts before the duration ends and takes at most four stages
        // plus the close.
        Cmd::Churn(a) => a.duration.as_secs_f64() + 5.0 * st + 45.0,
        Cmd::Presence(a) => {
            a.ramp_timeout.as_secs_f64()
                + a.max_hold.as_secs_f64()
                + 3.0 * st
                + 60.0
                + a.connections as f64 / 1000.0
        }
        Cmd::Newcomer(a) => a.timeout.as_secs_f64() + 3.0 * st + 20.0,
        Cmd::Recover(a) => (a.duration + a.away + a.grace).as_secs_f64() + 3.0 * st + 20.0,
    };
    Duration::from_secs_f64(secs)
}

/// The `ringcast-loadgen` command line: parses the arguments and runs the command.
pub fn main() {
    let cli = Cli::parse();
    let result = match &cli.worker_of {
        Some(range) => orchestrate::worker_main(&cli, range),
        None => orchestrate::parent_main(&cli),
    };
    match result {
        Ok(true) => {}
        // The run finished, but its report lists problems (see PROBLEM lines).
        Ok(false) => std::process::exit(2),
        Err(e) => {
            eprintln!("ringcast-loadgen: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Runs the single-connection check `check` on one executor of its own, named `name`,
/// prints its report with `print` and writes it to `--json`.
fn one_executor_check<R, F, Fut>(cli: &Cli, name: &'static str, check: F, print: fn(&R)) -> anyhow::Result<R>
where
    R: serde::Serialize + Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = R> + 'static,
{
    let r = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name(name)
        .spawn(check)
        .and_then(|h| h.join())
        .map_err(|e| anyhow::anyhow!("{name} executor failed: {e}"))?;
    print(&r);
    if let Some(path) = &cli.json {
        report::write_json(path, &r)?;
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let none = tls::Trust::Nothing;
        let t = parse_url("ws://127.0.0.1:4600", none).unwrap();
        assert_eq!(t.addr, "127.0.0.1:4600".parse().unwrap());
        assert_eq!(t.path, "/socket/websocket");
        assert_eq!(t.host, "127.0.0.1:4600");
        assert!(t.tls.is_none());
        assert_eq!(
            parse_url("ws://127.0.0.1:1/socket", none).unwrap().path,
            "/socket/websocket"
        );
        assert_eq!(
            parse_url("ws://127.0.0.1:1/live/websocket?x=1", none)
                .unwrap()
                .path,
            "/live/websocket"
        );
        assert!(parse_url("http://127.0.0.1:1", none).is_err());
        // wss: TLS, port 443 by default, the certificate checked against the host.
        let t = parse_url("wss://localhost/socket", tls::Trust::Any).unwrap();
        assert_eq!(t.addr.port(), 443);
        assert_eq!(t.path, "/socket/websocket");
        let tls = t.tls.expect("wss has TLS");
        assert_eq!(
            tls.name,
            rustls::pki_types::ServerName::try_from("localhost").unwrap()
        );
        assert!(parse_url("wss://127.0.0.1:4600", none).unwrap().tls.is_some());
        // The trust flags mean nothing to ws://.
        assert!(parse_url("ws://127.0.0.1:4600", tls::Trust::Any).is_err());
    }

    #[test]
    fn loopback_sources() {
        let s = sources_for(&"127.0.0.1:1".parse().unwrap(), 3).unwrap();
        assert_eq!(
            s,
            [
                Ipv4Addr::new(127, 0, 0, 2),
                Ipv4Addr::new(127, 0, 0, 3),
                Ipv4Addr::new(127, 0, 0, 4)
            ]
        );
        assert!(sources_for(&"127.0.0.1:1".parse().unwrap(), 300).is_err());
        assert!(sources_for(&"[::1]:1".parse().unwrap(), 3).unwrap().is_empty());
    }

    #[test]
    fn room_schedules() {
        assert_eq!(
            room_schedule(2.0, Duration::from_secs(5)),
            (10, Duration::from_millis(500))
        );
        // At least one message, even for a short run.
        assert_eq!(room_schedule(0.1, Duration::from_secs(1)).0, 1);
    }

    #[test]
    fn new_commands_parse() {
        let cli = Cli::try_parse_from([
            "lg",
            "rooms",
            "--rooms",
            "3",
            "--members",
            "4",
            "--rate-per-member",
            "2",
            "--duration",
            "5s",
            "--topic-prefix",
            "rooms:",
        ])
        .unwrap();
        let (job, total) = job_of(&cli).unwrap();
        assert_eq!(total, 12);
        assert_eq!(job.topic_of(4), "rooms:room-1");
        assert!(matches!(
            job.mode,
            Mode::Room {
                rooms: 3,
                members: 4,
                per_sender: 10,
                ..
            }
        ));
        let cli = Cli::try_parse_from(["lg", "churn", "-n", "200", "--cycle-rate", "400", "--pushes", "2"])
            .unwrap();
        let (job, total) = job_of(&cli).unwrap();
        assert_eq!(total, 200);
        match job.mode {
            Mode::Churn { period, pushes, .. } => {
                assert_eq!(period, Duration::from_millis(500));
                assert_eq!(pushes, 2);
            }
            m => panic!("unexpected mode {m:?}"),
        }
        assert!(
            Cli::try_parse_from(["lg", "rooms", "--rooms", "0", "--members", "1"])
                .map_err(anyhow::Error::from)
                .and_then(|c| job_of(&c))
                .is_err()
        );
    }
}
