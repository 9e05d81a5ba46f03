//! `ringcast-bench`: the side-by-side benchmark harness.
//!
//! For each server core count, repeat and subscriber count it starts each server under
//! test (the ringcast release binary, `ringcast-floor`, `ringcast-tokio-peer`), pinned
//! with `taskset` to its cores, and drives it with `ringcast-loadgen` pinned to the
//! remaining core(s):
//!
//! - `connect`: N idle joined connections; user-space memory per connection is the
//!   server's RSS delta divided by N;
//! - `fanout`: N subscribers, as many broadcasts as fit a delivery budget, as fast as
//!   the server delivers: deliveries/s, server CPU-µs per delivery (→ deliveries per
//!   CPU-second), latency percentiles;
//! - a paced fanout (10 broadcasts/s to 10k subscribers) for the latency target.
//!
//! It takes medians over the repeats and writes `results/<date>-<host>/results.json`,
//! the raw loadgen JSON, PNG plots and a README with the table, and regenerates
//! `results/README.md`. `--replot DIR` redraws the plots and READMEs from a
//! `results.json`.

mod cluster;
mod plots;
mod report;
mod server;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, ExitCode, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use ringcast_bench::median;
use ringcast_loadgen::report::{ConnectReport, FanoutReport};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use server::{Server, Spawn};

#[derive(Parser, Debug)]
#[command(
    name = "ringcast-bench",
    about = "Side-by-side benchmark: ringcast vs the floor vs a tokio peer (no subcommand), \
             or the many-node cluster run (`cluster`)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Quick mode: 1 repeat, 1k/5k/10k subscribers, 1 server core (under 5 minutes).
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// Full mode: 3 repeats, 1k/5k/10k/19k subscribers, 1 and 2 server cores.
    #[arg(long)]
    full: bool,
    /// Subscriber counts (overrides the mode's), e.g. 1000,5000.
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<u64>>,
    /// Server core counts (overrides the mode's), e.g. 1,2.
    #[arg(long, value_delimiter = ',')]
    cores: Option<Vec<usize>>,
    /// Repeats (overrides the mode's).
    #[arg(long)]
    repeats: Option<usize>,
    /// Servers to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ringcast,ringcast-send,floor,tokio"
    )]
    servers: Vec<ServerKind>,
    /// Where the release binaries are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Results root; the run goes to <root>/<YYYY-MM-DD>-<host>/.
    #[arg(long, default_value = "results")]
    results: PathBuf,
    /// Criterion output to record (medians of every `new/estimates.json`).
    #[arg(long)]
    criterion_dir: Option<PathBuf>,
    /// Only record criterion estimates written at or after this unix time.
    #[arg(long)]
    criterion_since: Option<u64>,
    /// First TCP port for the servers (each start takes the next free one; the default
    /// sits below the ephemeral range and away from the 4000s other tests use).
    #[arg(long, default_value_t = 18700)]
    port_base: u16,
    /// Redraw plots and READMEs from this run directory's results.json; run nothing.
    #[arg(long)]
    replot: Option<PathBuf>,
    /// Write the run to exactly this directory, not <results>/<date>-<host>/, and leave
    /// <results>/README.md (the main benchmark's) alone: for side runs such as
    /// `--servers ringcast,ringcast-tls --sizes 10000`.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Pad every fanout message's body with this many bytes of chat-like text (loadgen
    /// `fanout --pad`): the seed's `new_msg` is under the server's 1 KiB compression
    /// threshold; `--servers ringcast,ringcast-deflate --pad 4000` compares compression.
    #[arg(long, default_value_t = 0)]
    pad: usize,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Redis and K `ringcast serve --cores 1 --redis` nodes on this box, one loadgen
    /// `connect` per node, N connections on one topic, one broadcast to all of them:
    /// reach, loss, latency of every subscriber (histograms merged), memory per
    /// connection. Writes DIR/size-N/ and DIR/README.md.
    Cluster(cluster::ClusterArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerKind {
    Ringcast,
    /// The same ringcast build writing with one `send` per connection instead of one
    /// io_uring submission per batch (`RINGCAST_WRITE_PATH=send`): what that step buys.
    #[value(name = "ringcast-send")]
    #[serde(rename = "ringcast-send")]
    RingcastSend,
    /// The same ringcast build over TLS (`serve --tls-self-signed`; the loadgen speaks
    /// `wss://` with `--tls-insecure`): what TLS costs, next to `ringcast`.
    #[value(name = "ringcast-tls")]
    #[serde(rename = "ringcast-tls")]
    RingcastTls,
    /// The same ringcast build with the loadgen offering `permessage-deflate`
    /// (`--compress`, as browsers do): what compression costs and saves, next to
    /// `ringcast`.
    #[value(name = "ringcast-deflate")]
    #[serde(rename = "ringcast-deflate")]
    RingcastDeflate,
    Floor,
    Tokio,
}

impl ServerKind {
    pub fn label(self) -> &'static str {
        match self {
            ServerKind::Ringcast => "ringcast",
            ServerKind::RingcastSend => "ringcast, send() per connection",
            ServerKind::RingcastTls => "ringcast over TLS (wss)",
            ServerKind::RingcastDeflate => "ringcast, permessage-deflate",
            ServerKind::Floor => "floor",
            ServerKind::Tokio => "tokio peer",
        }
    }

    /// Names the raw files of this server's runs.
    fn slug(self) -> &'static str {
        match self {
            ServerKind::Ringcast => "ringcast",
            ServerKind::RingcastSend => "ringcast-send",
            ServerKind::RingcastTls => "ringcast-tls",
            ServerKind::RingcastDeflate => "ringcast-deflate",
            ServerKind::Floor => "floor",
            ServerKind::Tokio => "tokio-peer",
        }
    }

    fn binary(self) -> &'static str {
        match self {
            ServerKind::Ringcast
            | ServerKind::RingcastSend
            | ServerKind::RingcastTls
            | ServerKind::RingcastDeflate => "ringcast",
            ServerKind::Floor => "ringcast-floor",
            ServerKind::Tokio => "ringcast-tokio-peer",
        }
    }

    /// The loadgen arguments that reach this server on `port`: its URL, and for TLS
    /// the flag that accepts its self-signed certificate.
    fn url_args(self, port: u16) -> Vec<String> {
        match self {
            ServerKind::RingcastTls => vec![
                "--url".into(),
                format!("wss://127.0.0.1:{port}"),
                "--tls-insecure".into(),
            ],
            ServerKind::RingcastDeflate => {
                vec![
                    "--url".into(),
                    format!("ws://127.0.0.1:{port}"),
                    "--compress".into(),
                ]
            }
            _ => vec!["--url".into(), format!("ws://127.0.0.1:{port}")],
        }
    }
}

/// The machine a run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub host: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub mem_total_gib: f64,
    pub kernel: String,
    pub nofile_limit: u64,
}

/// What the harness decided to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub mode: String,
    pub sizes: Vec<u64>,
    pub skipped_sizes: Vec<u64>,
    pub cores: Vec<usize>,
    pub repeats: usize,
    pub servers: Vec<ServerKind>,
    /// Server cores → (server CPU list, loadgen CPU list, loadgen shares a core).
    pub placement: BTreeMap<usize, (String, String, bool)>,
    pub delivery_budget: u64,
    pub connect_rate: f64,
    /// Arrival rate of the memory phase's connections: idle connections arrive over
    /// time in a real deployment, and a server may shed per-connection state once one
    /// is idle (ringcast parks it after 1 s), so the phase is not a burst.
    pub idle_connect_rate: f64,
    /// Both rates, at most, for `ringcast-tls`: a TLS handshake costs the server about
    /// 0.4 ms of CPU on the 2-core VM, so 2,000/s keep its core 80% busy, and with any
    /// other load the handshakes queue past `--max-http-connections` and are refused.
    #[serde(default)]
    pub tls_connect_rate: Option<f64>,
    pub hold_secs: u64,
    pub paced_subscribers: u64,
    pub paced_rate: f64,
    pub paced_messages: u64,
    /// Bytes of padding in every fanout message's body (0: the seed's plain `new_msg`).
    #[serde(default)]
    pub pad: usize,
}

impl Plan {
    /// `rate`, or the TLS cap for a TLS server.
    fn connect_rate_for(&self, kind: ServerKind, rate: f64) -> f64 {
        match (kind, self.tls_connect_rate) {
            (ServerKind::RingcastTls, Some(cap)) => rate.min(cap),
            _ => rate,
        }
    }
}

/// Figures of one `connect` run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectFig {
    pub joined: u64,
    pub failed: u64,
    pub rss_before: Option<u64>,
    pub rss_full: Option<u64>,
    pub rss_per_connection: Option<f64>,
    pub problems: Vec<String>,
}

/// Latency percentiles, µs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Lat {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// Figures of one `fanout` run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FanoutFig {
    pub joined: u64,
    pub messages: u64,
    pub deliveries: u64,
    pub loss: i64,
    pub deliveries_per_sec: f64,
    pub cpu_secs: Option<f64>,
    pub cpu_us_per_delivery: Option<f64>,
    pub deliveries_per_cpu_sec: Option<f64>,
    pub latency: Lat,
    pub problems: Vec<String>,
    /// WebSocket bytes the subscribers read per delivery (joins included).
    #[serde(default)]
    pub wire_bytes_per_delivery: f64,
    /// Subscribers that negotiated `permessage-deflate`.
    #[serde(default)]
    pub compressed_connections: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseRun {
    pub server: ServerKind,
    pub cores: usize,
    pub size: u64,
    pub repeat: usize,
    pub connect: Option<ConnectFig>,
    pub fanout: Option<FanoutFig>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PacedRun {
    pub server: ServerKind,
    pub cores: usize,
    pub size: u64,
    pub repeat: usize,
    pub fanout: Option<FanoutFig>,
    /// The floor only: its own time from taking a broadcast in to having written it to
    /// every member, per broadcast (from its `floor-stats` line), µs.
    #[serde(default)]
    pub floor_write: Option<Lat>,
    pub error: Option<String>,
}

/// Medians over the repeats of one (server, cores, size).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub server: ServerKind,
    pub cores: usize,
    pub size: u64,
    pub runs: usize,
    pub rss_per_connection: Option<f64>,
    pub deliveries_per_sec: Option<f64>,
    pub deliveries_per_cpu_sec: Option<f64>,
    pub latency: Option<Lat>,
    pub loss: i64,
    /// Median WebSocket bytes read per delivery.
    #[serde(default)]
    pub wire_bytes_per_delivery: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PacedSummary {
    pub server: ServerKind,
    pub cores: usize,
    pub size: u64,
    pub runs: usize,
    pub latency: Option<Lat>,
    #[serde(default)]
    pub floor_write: Option<Lat>,
    /// Server CPU per delivery while paced (one frame per send), µs.
    #[serde(default)]
    pub cpu_us_per_delivery: Option<f64>,
    pub loss: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub date: String,
    pub started_unix: u64,
    pub duration_secs: f64,
    pub machine: Machine,
    pub plan: Plan,
    pub runs: Vec<CaseRun>,
    pub paced: Vec<PacedRun>,
    pub summary: Vec<Summary>,
    pub paced_summary: Vec<PacedSummary>,
    /// Criterion medians, ns, by benchmark id.
    pub criterion: BTreeMap<String, f64>,
    /// The harness's command line.
    #[serde(default)]
    pub command: String,
    /// The run went to its own directory (`--run-dir`) and left results/README.md alone.
    #[serde(default)]
    pub side_run: bool,
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn machine(nofile: u64) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')))
        .map_or("unknown".to_string(), |(_, m)| m.trim().to_string());
    let mem_total = cluster::host::meminfo().mem_total as f64;
    Machine {
        host: read_trim("/proc/sys/kernel/hostname"),
        cpu_model,
        cpus: ringcast_bench::allowed_cpus().len(),
        mem_total_gib: mem_total / (1024.0 * 1024.0 * 1024.0),
        kernel: read_trim("/proc/sys/kernel/osrelease"),
        nofile_limit: nofile,
    }
}

/// YYYY-MM-DD (UTC) of a unix time.
fn civil_date(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

fn plan(cli: &Cli, m: &Machine) -> anyhow::Result<(Plan, Vec<usize>)> {
    let full = cli.full;
    let mode = if full { "full" } else { "quick" };
    let wanted_sizes = cli.sizes.clone().unwrap_or_else(|| {
        if full {
            vec![1000, 5000, 10_000, 19_000]
        } else {
            vec![1000, 5000, 10_000]
        }
    });
    let wanted_cores = cli
        .cores
        .clone()
        .unwrap_or_else(|| if full { vec![1, 2] } else { vec![1] });
    let cpus = ringcast_bench::allowed_cpus();
    // The server holds N subscribers + the sample subscriber + the publisher + its own
    // fds (listeners, eventfds, io_uring, logs): keep 200 spare under the limit, and
    // every process under 20,000 fds.
    let fd_cap = m.nofile_limit.min(20_000).saturating_sub(200);
    let (sizes, skipped): (Vec<u64>, Vec<u64>) = wanted_sizes.iter().partition(|&&n| n <= fd_cap);
    for n in &skipped {
        eprintln!(
            "skipping {n} subscribers: over the fd budget of {fd_cap} per process (RLIMIT_NOFILE {})",
            m.nofile_limit
        );
    }
    if sizes.is_empty() {
        bail!("no size fits RLIMIT_NOFILE {}", m.nofile_limit);
    }
    let mut placement = BTreeMap::new();
    let mut cores = Vec::new();
    for &c in &wanted_cores {
        if c == 0 || c > cpus.len() {
            eprintln!(
                "skipping {c} server core(s): this process may use {} CPU(s)",
                cpus.len()
            );
            continue;
        }
        let server = &cpus[..c];
        let (loadgen, shared) = if c < cpus.len() {
            (cpus[c..].to_vec(), false)
        } else {
            (vec![*cpus.last().expect("at least one cpu")], true)
        };
        placement.insert(c, (cpu_list(server), cpu_list(&loadgen), shared));
        cores.push(c);
    }
    if cores.is_empty() {
        bail!("no server core count fits the {} CPU(s) available", cpus.len());
    }
    let paced_subscribers = sizes
        .iter()
        .copied()
        .filter(|&n| n <= 10_000)
        .max()
        .unwrap_or(sizes[0]);
    let p = Plan {
        mode: mode.to_string(),
        sizes,
        skipped_sizes: skipped,
        cores,
        repeats: cli.repeats.unwrap_or(if full { 3 } else { 1 }).max(1),
        servers: cli.servers.clone(),
        placement,
        delivery_budget: if full { 4_000_000 } else { 2_000_000 },
        connect_rate: 4000.0,
        idle_connect_rate: 2000.0,
        tls_connect_rate: Some(1000.0),
        // Long enough for idle connections to park (1 s of silence, then the next
        // sweep): memory is measured at the end of the hold.
        hold_secs: if full { 5 } else { 4 },
        paced_subscribers,
        paced_rate: 10.0,
        paced_messages: if full { 100 } else { 50 },
        pad: cli.pad,
    };
    Ok((p, cpus))
}

/// How the harness starts `kind`: pinned to `cpus`, on `cores` cores, listening on
/// 127.0.0.1:`port`.
fn server_spawn(
    kind: ServerKind,
    cli: &Cli,
    cpus: &str,
    cores: usize,
    port: u16,
    log: &Path,
) -> anyhow::Result<Spawn> {
    let bin = cli.bin_dir.join(kind.binary());
    if !bin.exists() {
        bail!(
            "{} not found (build with scripts/bench.sh or cargo build --release)",
            bin.display()
        );
    }
    let listen = format!("127.0.0.1:{port}");
    let cores = cores.to_string();
    let spec = Spawn::new(kind.label(), bin, log).pinned(Some(cpus.to_string()));
    Ok(match kind {
        ServerKind::Ringcast
        | ServerKind::RingcastSend
        | ServerKind::RingcastTls
        | ServerKind::RingcastDeflate => {
            let spec = spec
                .args(["serve", "--listen", &listen, "--cores", &cores])
                .env("RINGCAST_SECRET", ringcast::seed::DEV_SECRET)
                .env("RINGCAST_LOG", "warn");
            match kind {
                ServerKind::RingcastSend => spec.env("RINGCAST_WRITE_PATH", "send"),
                ServerKind::RingcastTls => spec.args(["--tls-self-signed"]),
                _ => spec,
            }
        }
        ServerKind::Floor | ServerKind::Tokio => spec.args(["--listen", &listen, "--cores", &cores]),
    })
}

struct Ctx<'a> {
    cli: &'a Cli,
    plan: &'a Plan,
    raw: PathBuf,
    next_port: u16,
}

impl Ctx<'_> {
    /// The next port nobody listens on.
    fn port(&mut self) -> u16 {
        for _ in 0..1000 {
            let p = self.next_port;
            self.next_port = if self.next_port >= self.cli.port_base.saturating_add(999) {
                self.cli.port_base
            } else {
                self.next_port + 1
            };
            if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
                return p;
            }
        }
        self.next_port
    }

    /// Runs the loadgen pinned to the loadgen CPUs; returns its JSON report.
    /// Starts `kind` on the server CPUs of the `cores` placement, logging to
    /// `<tag>-server.log`.
    fn start_server(&mut self, kind: ServerKind, cores: usize, tag: &str) -> anyhow::Result<Server> {
        let port = self.port();
        let (srv_cpus, _, _) = self.plan.placement[&cores].clone();
        let log = self.raw.join(format!("{tag}-server.log"));
        Server::start(&server_spawn(kind, self.cli, &srv_cpus, cores, port, &log)?, port)
    }

    /// Runs one loadgen command and reads its JSON report as the loadgen's own type.
    fn loadgen<R: serde::de::DeserializeOwned>(
        &self,
        cores: usize,
        name: &str,
        args: &[String],
    ) -> anyhow::Result<R> {
        let (_, lg_cpus, _) = &self.plan.placement[&cores];
        let json = self.raw.join(format!("{name}.json"));
        let log = File::create(self.raw.join(format!("{name}.log")))?;
        let _ = std::fs::remove_file(&json);
        let lg_cores = lg_cpus.split(',').count();
        let status = Process::new("taskset")
            .arg("-c")
            .arg(lg_cpus)
            .arg(self.cli.bin_dir.join("ringcast-loadgen"))
            .args([
                "--quiet",
                "--cores",
                &lg_cores.to_string(),
                "--secret",
                ringcast::seed::DEV_SECRET,
            ])
            .arg("--json")
            .arg(&json)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .context("running ringcast-loadgen")?;
        let text = std::fs::read_to_string(&json)
            .with_context(|| format!("loadgen {name} wrote no JSON ({status}); see raw/{name}.log"))?;
        serde_json::from_str(&text).with_context(|| format!("loadgen {name}'s report (raw/{name}.json)"))
    }
}

fn f(v: &Value, path: &[&str]) -> Option<f64> {
    let mut v = v;
    for p in path {
        v = v.get(p)?;
    }
    v.as_f64()
}

fn connect_fig(r: &ConnectReport) -> ConnectFig {
    let server = r.server.as_ref();
    ConnectFig {
        joined: r.joined,
        failed: r.failed,
        rss_before: server.and_then(|s| s.samples.before).map(|x| x.rss_bytes),
        rss_full: server.and_then(|s| s.samples.full).map(|x| x.rss_bytes),
        rss_per_connection: server.and_then(|s| s.rss_per_connection_bytes),
        problems: r.problems.clone(),
    }
}

fn fanout_fig(r: &FanoutReport) -> FanoutFig {
    let server = r.server.as_ref();
    let cpu_us = server.and_then(|s| s.cpu_us_per_delivery).filter(|&x| x > 0.0);
    FanoutFig {
        joined: r.subscribers_joined,
        messages: r.sent,
        deliveries: r.deliveries,
        loss: r.loss,
        deliveries_per_sec: r.deliveries_per_sec,
        cpu_secs: server.and_then(|s| s.cpu_secs_publish),
        cpu_us_per_delivery: cpu_us,
        deliveries_per_cpu_sec: cpu_us.map(|us| 1e6 / us),
        latency: Lat {
            p50: r.latency.p50_us,
            p90: r.latency.p90_us,
            p99: r.latency.p99_us,
            p999: r.latency.p999_us,
            max: r.latency.max_us,
        },
        problems: r.problems.clone(),
        wire_bytes_per_delivery: r.wire_bytes_per_delivery,
        compressed_connections: r.compressed_connections,
    }
}

fn run_case(ctx: &mut Ctx, kind: ServerKind, cores: usize, size: u64, repeat: usize) -> CaseRun {
    let mut run = CaseRun {
        server: kind,
        cores,
        size,
        repeat,
        connect: None,
        fanout: None,
        error: None,
    };
    let tag = format!("{}-c{cores}-n{size}-r{repeat}", kind.slug());
    let result = (|| -> anyhow::Result<()> {
        let server = ctx.start_server(kind, cores, &tag)?;
        let url = kind.url_args(server.port);
        let pid = server.pid().to_string();
        let rate = ctx
            .plan
            .connect_rate_for(kind, ctx.plan.idle_connect_rate)
            .to_string();
        let v: ConnectReport = ctx.loadgen(
            cores,
            &format!("{tag}-connect"),
            &[
                &["connect".into()][..],
                &url,
                &[
                    "-n".into(),
                    size.to_string(),
                    "--rate".into(),
                    rate.clone(),
                    "--hold".into(),
                    format!("{}s", ctx.plan.hold_secs),
                    "--server-pid".into(),
                    pid.clone(),
                ],
            ]
            .concat(),
        )?;
        run.connect = Some(connect_fig(&v));
        let messages = (ctx.plan.delivery_budget / size).clamp(20, 2000);
        let v: FanoutReport = ctx.loadgen(
            cores,
            &format!("{tag}-fanout"),
            &[
                &["fanout".into()][..],
                &url,
                &[
                    "-n".into(),
                    size.to_string(),
                    "-m".into(),
                    messages.to_string(),
                    "--connect-rate".into(),
                    ctx.plan.connect_rate_for(kind, ctx.plan.connect_rate).to_string(),
                    "--pad".into(),
                    ctx.plan.pad.to_string(),
                    "--server-pid".into(),
                    pid,
                ],
            ]
            .concat(),
        )?;
        run.fanout = Some(fanout_fig(&v));
        drop(server);
        Ok(())
    })();
    if let Err(e) = result {
        run.error = Some(format!("{e:#}"));
    }
    run
}

fn run_paced(ctx: &mut Ctx, kind: ServerKind, cores: usize, repeat: usize) -> PacedRun {
    let size = ctx.plan.paced_subscribers;
    let mut run = PacedRun {
        server: kind,
        cores,
        size,
        repeat,
        fanout: None,
        floor_write: None,
        error: None,
    };
    let tag = format!("{}-c{cores}-n{size}-r{repeat}-paced", kind.slug());
    let server_log = ctx.raw.join(format!("{tag}-server.log"));
    let result = (|| -> anyhow::Result<()> {
        let server = ctx.start_server(kind, cores, &tag)?;
        let v: FanoutReport = ctx.loadgen(
            cores,
            &tag,
            &[
                &["fanout".into()][..],
                &kind.url_args(server.port),
                &[
                    "-n".into(),
                    size.to_string(),
                    "-m".into(),
                    ctx.plan.paced_messages.to_string(),
                    "--rate".into(),
                    ctx.plan.paced_rate.to_string(),
                    "--connect-rate".into(),
                    ctx.plan.connect_rate_for(kind, ctx.plan.connect_rate).to_string(),
                    "--pad".into(),
                    ctx.plan.pad.to_string(),
                    "--server-pid".into(),
                    server.pid().to_string(),
                ],
            ]
            .concat(),
        )?;
        run.fanout = Some(fanout_fig(&v));
        // SIGTERM makes the floor print its `floor-stats` line.
        drop(server);
        if kind == ServerKind::Floor {
            run.floor_write = floor_stats(&server_log);
        }
        Ok(())
    })();
    if let Err(e) = result {
        run.error = Some(format!("{e:#}"));
    }
    run
}

fn floor_stats(log: &Path) -> Option<Lat> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().rev().find_map(|l| l.strip_prefix("floor-stats "))?;
    let v: Value = serde_json::from_str(line).ok()?;
    let g = |k: &str| f(&v, &["write_us", k]);
    Some(Lat {
        p50: g("p50")?,
        p90: g("p90")?,
        p99: g("p99")?,
        p999: g("p999")?,
        max: g("max")?,
    })
}

fn median_lat(lats: &[&Lat]) -> Option<Lat> {
    if lats.is_empty() {
        return None;
    }
    let m = |g: fn(&Lat) -> f64| median(lats.iter().map(|l| g(l)).collect()).unwrap_or(0.0);
    Some(Lat {
        p50: m(|l| l.p50),
        p90: m(|l| l.p90),
        p99: m(|l| l.p99),
        p999: m(|l| l.p999),
        max: m(|l| l.max),
    })
}

fn summarize(plan: &Plan, runs: &[CaseRun], paced: &[PacedRun]) -> (Vec<Summary>, Vec<PacedSummary>) {
    let mut out = Vec::new();
    let mut paced_out = Vec::new();
    for &cores in &plan.cores {
        for &server in &plan.servers {
            for &size in &plan.sizes {
                let rs: Vec<&CaseRun> = runs
                    .iter()
                    .filter(|r| r.server == server && r.cores == cores && r.size == size)
                    .collect();
                let fan: Vec<&FanoutFig> = rs.iter().filter_map(|r| r.fanout.as_ref()).collect();
                out.push(Summary {
                    server,
                    cores,
                    size,
                    runs: rs.len(),
                    rss_per_connection: median(
                        rs.iter()
                            .filter_map(|r| r.connect.as_ref()?.rss_per_connection)
                            .collect(),
                    ),
                    deliveries_per_sec: median(fan.iter().map(|f| f.deliveries_per_sec).collect()),
                    deliveries_per_cpu_sec: median(
                        fan.iter().filter_map(|f| f.deliveries_per_cpu_sec).collect(),
                    ),
                    latency: median_lat(&fan.iter().map(|f| &f.latency).collect::<Vec<_>>()),
                    loss: fan.iter().map(|f| f.loss).sum(),
                    wire_bytes_per_delivery: median(
                        fan.iter()
                            .map(|f| f.wire_bytes_per_delivery)
                            .filter(|&b| b > 0.0)
                            .collect(),
                    ),
                });
            }
            let prs: Vec<&PacedRun> = paced
                .iter()
                .filter(|r| r.server == server && r.cores == cores)
                .collect();
            let ps: Vec<&FanoutFig> = prs.iter().filter_map(|r| r.fanout.as_ref()).collect();
            let fw: Vec<&Lat> = prs.iter().filter_map(|r| r.floor_write.as_ref()).collect();
            paced_out.push(PacedSummary {
                server,
                cores,
                size: plan.paced_subscribers,
                runs: ps.len(),
                latency: median_lat(&ps.iter().map(|f| &f.latency).collect::<Vec<_>>()),
                floor_write: median_lat(&fw),
                cpu_us_per_delivery: median(ps.iter().filter_map(|f| f.cpu_us_per_delivery).collect()),
                loss: ps.iter().map(|f| f.loss).sum(),
            });
        }
    }
    (out, paced_out)
}

/// Medians (ns) of every `<id>/new/estimates.json` under `dir`, written at or after
/// `since`.
fn criterion_medians(dir: &Path, since: Option<u64>) -> BTreeMap<String, f64> {
    fn walk(root: &Path, dir: &Path, since: Option<u64>, out: &mut BTreeMap<String, f64>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if !path.is_dir() {
                continue;
            }
            if path.file_name().is_some_and(|n| n == "new") {
                let est = path.join("estimates.json");
                let fresh = std::fs::metadata(&est)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .is_some_and(|t| since.is_none_or(|s| t.as_secs() >= s));
                let median = std::fs::read_to_string(&est)
                    .ok()
                    .and_then(|s| serde_json::from_str::<Value>(&s).ok())
                    .and_then(|v| v.get("median")?.get("point_estimate")?.as_f64());
                if let (true, Some(m), Ok(id)) = (fresh, median, dir.strip_prefix(root)) {
                    out.insert(id.to_string_lossy().into_owned(), m);
                }
            } else if path
                .file_name()
                .is_some_and(|n| n != "report" && n != "base" && n != "change")
            {
                walk(root, &path, since, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, since, &mut out);
    out
}

fn write_outputs(results: &Results, dir: &Path, root: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(results)? + "\n",
    )?;
    let plot_note = match plots::draw_all(results, dir) {
        Ok(()) => None,
        Err(e) => {
            eprintln!("plots not drawn: {e:#}");
            Some(format!("plots not drawn: {e:#}"))
        }
    };
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::fs::write(
        dir.join("README.md"),
        report::readme(results, "", plot_note.as_deref()),
    )?;
    if !results.side_run {
        std::fs::write(
            root.join("README.md"),
            report::readme(results, &format!("{name}/"), plot_note.as_deref()),
        )?;
    }
    Ok(())
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    if let Some(Command::Cluster(args)) = &cli.command {
        return cluster::main(args);
    }
    if let Some(dir) = &cli.replot {
        let results: Results = serde_json::from_str(
            &std::fs::read_to_string(dir.join("results.json")).context("reading results.json")?,
        )?;
        let root = dir.parent().unwrap_or(Path::new("."));
        write_outputs(&results, dir, root)?;
        eprintln!("redrawn {}", dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    let (nofile, _) = ringcast_loadgen::sys::raise_nofile();
    let m = machine(nofile);
    let (plan, _) = plan(&cli, &m)?;
    let started = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let date = civil_date(started);
    let dir = cli
        .run_dir
        .clone()
        .unwrap_or_else(|| cli.results.join(format!("{date}-{}", m.host)));
    let raw = dir.join("raw");
    if raw.exists() {
        std::fs::remove_dir_all(&raw)?;
    }
    std::fs::create_dir_all(&raw)?;
    eprintln!(
        "ringcast-bench {} mode: sizes {:?}, server cores {:?}, {} repeat(s), servers {:?}; {} on {} ({} CPUs); writing {}",
        plan.mode,
        plan.sizes,
        plan.cores,
        plan.repeats,
        plan.servers,
        m.cpu_model,
        m.host,
        m.cpus,
        dir.display()
    );
    for (c, (s, l, shared)) in &plan.placement {
        eprintln!(
            "  {c} server core(s): server on CPU {s}, loadgen on CPU {l}{}",
            if *shared { " (shared with the server)" } else { "" }
        );
    }
    let t0 = Instant::now();
    let mut ctx = Ctx {
        cli: &cli,
        plan: &plan,
        raw,
        next_port: cli.port_base,
    };
    let mut runs = Vec::new();
    let mut paced = Vec::new();
    for &cores in &plan.cores {
        for repeat in 0..plan.repeats {
            for &size in &plan.sizes {
                // Servers side by side at each size, so they meet the same conditions.
                for &kind in &plan.servers {
                    let run = run_case(&mut ctx, kind, cores, size, repeat);
                    report::progress_line(&run, t0.elapsed());
                    runs.push(run);
                }
            }
            for &kind in &plan.servers {
                let run = run_paced(&mut ctx, kind, cores, repeat);
                report::paced_line(&run, t0.elapsed());
                paced.push(run);
            }
        }
    }
    let (summary, paced_summary) = summarize(&plan, &runs, &paced);
    let criterion = cli
        .criterion_dir
        .as_deref()
        .map(|d| criterion_medians(d, cli.criterion_since))
        .unwrap_or_default();
    let results = Results {
        date,
        started_unix: started,
        duration_secs: t0.elapsed().as_secs_f64(),
        machine: m,
        plan,
        runs,
        paced,
        summary,
        paced_summary,
        criterion,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        side_run: cli.run_dir.is_some(),
    };
    write_outputs(&results, &dir, &cli.results)?;
    println!("{}", report::targets_table(&results));
    eprintln!("results in {} ({:.0}s)", dir.display(), results.duration_secs);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(951_782_400), "2000-02-29");
        assert_eq!(civil_date(1_732_406_400), "2024-11-24");
    }

    #[test]
    fn the_default_run_and_the_cluster_command_parse() {
        // What scripts/bench.sh passes: no subcommand.
        let cli = Cli::try_parse_from([
            "ringcast-bench",
            "--quick",
            "--criterion-dir",
            "target/criterion",
            "--criterion-since",
            "5",
            "--sizes",
            "1000,2000",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.sizes, Some(vec![1000, 2000]));
        let cli = Cli::try_parse_from([
            "ringcast-bench",
            "cluster",
            "--sweep",
            "10000,40000",
            "--check-only",
        ])
        .unwrap();
        match cli.command {
            Some(Command::Cluster(a)) => {
                assert_eq!(a.sweep.as_deref(), Some("10000,40000"));
                assert!(a.check_only);
                assert_eq!(a.per_node, 19_000);
            }
            None => panic!("no cluster command"),
        }
        // The harness's flags are not the cluster command's.
        assert!(Cli::try_parse_from(["ringcast-bench", "--quick", "cluster"]).is_err());
    }

    #[test]
    fn ringcast_deflate_is_ringcast_with_a_loadgen_that_offers_compression() {
        assert_eq!(
            ServerKind::RingcastDeflate.url_args(5),
            ["--url", "ws://127.0.0.1:5", "--compress"]
        );
        assert_eq!(ServerKind::RingcastDeflate.binary(), "ringcast");
        let cli = Cli::try_parse_from([
            "ringcast-bench",
            "--servers",
            "ringcast,ringcast-deflate",
            "--pad",
            "4000",
        ])
        .unwrap();
        assert_eq!(cli.servers, [ServerKind::Ringcast, ServerKind::RingcastDeflate]);
        assert_eq!(cli.pad, 4000);
    }

    #[test]
    fn ringcast_over_tls_is_a_server_of_its_own_reached_over_wss() {
        let cli = Cli::try_parse_from([
            "ringcast-bench",
            "--servers",
            "ringcast,ringcast-tls",
            "--sizes",
            "10000",
            "--run-dir",
            "results/tls-x",
        ])
        .unwrap();
        assert_eq!(cli.servers, [ServerKind::Ringcast, ServerKind::RingcastTls]);
        assert_eq!(cli.run_dir.as_deref(), Some(Path::new("results/tls-x")));
        assert_eq!(ServerKind::Ringcast.url_args(5), ["--url", "ws://127.0.0.1:5"]);
        assert_eq!(
            ServerKind::RingcastTls.url_args(5),
            ["--url", "wss://127.0.0.1:5", "--tls-insecure"]
        );
        // server_spawn only needs the binary to exist.
        let dir = std::env::temp_dir().join(format!("ringcast-bench-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ringcast"), b"").unwrap();
        let cli = Cli {
            bin_dir: dir.clone(),
            ..cli
        };
        let tls = server_spawn(ServerKind::RingcastTls, &cli, "0", 1, 5, &dir.join("x.log")).unwrap();
        assert!(
            tls.args.iter().any(|a| a == "--tls-self-signed"),
            "{:?}",
            tls.args
        );
        let plain = server_spawn(ServerKind::Ringcast, &cli, "0", 1, 5, &dir.join("x.log")).unwrap();
        assert!(!plain.args.iter().any(|a| a == "--tls-self-signed"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
