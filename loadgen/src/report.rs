//! Final figures: built from the merged slice reports, printed for people on stdout,
//! written whole as JSON with `--json`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::presence::PresenceTally;
use crate::run::{self, HistData, Job, Pace, PubShared, SliceReport};
use crate::sys::ProcSample;
use crate::{ChurnArgs, ConnectArgs, FanoutArgs, RoomsArgs};

/// Percentiles of a histogram of nanoseconds, in microseconds, and the histogram itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// The histogram (nanoseconds) in HdrHistogram's V2 format, base64: what runs are
    /// combined by ([`Latency::merge`]), since percentiles do not add up. None when
    /// nothing was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histogram: Option<String>,
}

impl Latency {
    pub fn of(d: &HistData) -> Latency {
        let mut h = run::new_hist();
        run::hist_add_data(&mut h, d);
        Latency::from_hist(&h)
    }

    /// Percentiles of `h` (nanoseconds), with `h` itself encoded.
    pub fn from_hist(h: &Histogram<u64>) -> Latency {
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            count: h.len(),
            mean_us: if h.is_empty() { 0.0 } else { h.mean() / 1000.0 },
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            histogram: (!h.is_empty()).then(|| encode_histogram(h)),
        }
    }

    /// The histogram back (empty when nothing was recorded).
    pub fn histogram(&self) -> anyhow::Result<Histogram<u64>> {
        match &self.histogram {
            Some(text) => decode_histogram(text),
            None if self.count == 0 => Ok(run::new_hist()),
            None => anyhow::bail!(
                "{} samples but no histogram (a report from an older loadgen?)",
                self.count
            ),
        }
    }

    /// The latency of several runs together: their histograms added, percentiles taken
    /// of the sum.
    ///
    /// ```
    /// use ringcast_loadgen::report::Latency;
    /// let mut a = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    /// let mut b = a.clone();
    /// a.record(1_000).unwrap();
    /// b.record(9_000_000).unwrap();
    /// let m = Latency::merge([&Latency::from_hist(&a), &Latency::from_hist(&b)]).unwrap();
    /// assert_eq!(m.count, 2);
    /// assert!(m.max_us >= 9_000.0);
    /// ```
    pub fn merge<'a>(parts: impl IntoIterator<Item = &'a Latency>) -> anyhow::Result<Latency> {
        let mut sum = run::new_hist();
        for part in parts {
            sum.add(part.histogram()?)
                .map_err(|e| anyhow::anyhow!("cannot add histograms: {e:?}"))?;
        }
        Ok(Latency::from_hist(&sum))
    }

    fn line(&self) -> String {
        if self.count == 0 {
            return "none recorded".into();
        }
        format!(
            "p50 {} p90 {} p99 {} p99.9 {} max {} (mean {}, n={})",
            fmt_us(self.p50_us),
            fmt_us(self.p90_us),
            fmt_us(self.p99_us),
            fmt_us(self.p999_us),
            fmt_us(self.max_us),
            fmt_us(self.mean_us),
            self.count
        )
    }
}

/// `h` in HdrHistogram's V2 format (uncompressed), base64.
pub fn encode_histogram(h: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut bytes)
        .expect("a u64 histogram serializes into memory");
    STANDARD.encode(bytes)
}

/// The histogram of [`encode_histogram`]'s text (the V2 deflate format is read too).
pub fn decode_histogram(text: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|e| anyhow::anyhow!("histogram is not base64: {e}"))?;
    Deserializer::new()
        .deserialize(&mut std::io::Cursor::new(bytes))
        .map_err(|e| anyhow::anyhow!("histogram does not decode: {e:?}"))
}

fn fmt_us(us: f64) -> String {
    if us >= 1_000_000.0 {
        format!("{:.2}s", us / 1_000_000.0)
    } else if us >= 1000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{us:.0}µs")
    }
}

fn fmt_bytes(b: f64) -> String {
    if b.abs() >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b.abs() >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

/// Samples of the server process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerFigures {
    pub pid: u32,
    pub before: Option<ProcSample>,
    pub full: Option<ProcSample>,
    pub after_hold: Option<ProcSample>,
    pub after_close: Option<ProcSample>,
    pub before_publish: Option<ProcSample>,
    pub after_publish: Option<ProcSample>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerConnect {
    #[serde(flatten)]
    pub samples: ServerFigures,
    /// (RSS at the end of the hold - RSS before) / joined connections: what an idle
    /// joined connection costs (a server may shed per-connection state once idle).
    pub rss_per_connection_bytes: Option<f64>,
    /// The same with the RSS taken the moment the last connection joined.
    pub rss_per_connection_at_join_bytes: Option<f64>,
    pub cpu_secs_ramp: Option<f64>,
    pub cpu_secs_hold: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectReport {
    pub command: String,
    pub url: String,
    pub topic: String,
    pub topics: u64,
    pub requested: u64,
    pub target_rate: f64,
    pub processes: usize,
    pub cores_per_process: usize,
    pub attempted: u64,
    pub joined: u64,
    pub failed: u64,
    pub failures: BTreeMap<String, u64>,
    /// Failed attempts that `--retries` tried again, by kind.
    #[serde(default)]
    pub retried: BTreeMap<String, u64>,
    /// Executors whose controller went silent for 2 s or more, by what the thread was
    /// doing (`SliceReport::executor_stalls`).
    #[serde(default)]
    pub executor_stalls: BTreeMap<String, u64>,
    /// From the first attempt to the last successful join.
    pub time_to_last_join_secs: f64,
    /// Time to N when every connection joined.
    pub time_to_n_secs: Option<f64>,
    pub achieved_rate: f64,
    /// Connect + upgrade + join per connection.
    pub join_latency: Latency,
    pub hold_secs: f64,
    pub connected_at_hold_end: u64,
    pub ended_early: u64,
    pub ends: BTreeMap<String, u64>,
    /// Timed broadcasts that reached the held connections (sent by someone else).
    #[serde(default)]
    pub broadcasts: HeldBroadcasts,
    pub server: Option<ServerConnect>,
    pub problems: Vec<String>,
    /// `presence`: what the members of the room read.
    #[serde(default)]
    pub presence: Option<PresenceFigures>,
}

/// What the members of a presence room read (`ringcast-loadgen presence`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PresenceFigures {
    /// Frame and byte counts (its histograms are below, as [`Latency`]).
    pub tally: PresenceTally,
    /// Join sent → the member's own `presence_state` read whole.
    pub join_to_state: Latency,
    /// The key the members looked for once armed.
    pub watch: Option<String>,
    /// The arm time (unix nanos) the reach times count from; None: never armed.
    pub armed_unix_nanos: Option<u64>,
    /// Arm time → the first diff with the watched key, per member that saw it.
    pub reach: Latency,
}

impl PresenceFigures {
    pub fn of(t: &PresenceTally, watch: Option<String>, armed_unix_nanos: Option<u64>) -> PresenceFigures {
        PresenceFigures {
            join_to_state: Latency::of(&t.join_to_state),
            reach: Latency::of(&t.reach),
            tally: PresenceTally {
                join_to_state: Vec::new(),
                reach: Vec::new(),
                ..t.clone()
            },
            watch,
            armed_unix_nanos,
        }
    }
}

/// `new_msg` broadcasts with a timed body (`"<seq>:<send unix nanos>"`, see
/// [`crate::timed_body`]) that reached `connect`'s connections while they were held.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HeldBroadcasts {
    /// Every delivery, repeats included.
    pub deliveries: u64,
    /// Connections that received at least one.
    pub receivers: u64,
    pub first_recv_unix_nanos: u64,
    pub last_recv_unix_nanos: u64,
    /// Send (the time in the body) to receive.
    pub latency: Latency,
}

fn secs(a: u64, b: u64) -> f64 {
    b.saturating_sub(a) as f64 / 1e9
}

impl ConnectReport {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        a: &ConnectArgs,
        job: &Job,
        processes: usize,
        m: &SliceReport,
        t_start: u64,
        connected_at_hold_end: u64,
        server: Option<ServerFigures>,
        problems: Vec<String>,
    ) -> ConnectReport {
        let first = if m.first_attempt_nanos > 0 {
            m.first_attempt_nanos
        } else {
            t_start
        };
        let ttl = if m.last_join_nanos > 0 {
            secs(first, m.last_join_nanos)
        } else {
            0.0
        };
        let server = server.map(|s| {
            let per = |at: Option<ProcSample>| match (s.before, at) {
                (Some(b), Some(f)) if m.joined > 0 => {
                    Some((f.rss_bytes as f64 - b.rss_bytes as f64) / m.joined as f64)
                }
                _ => None,
            };
            let rss_per_at_join = per(s.full);
            let rss_per = per(s.after_hold).or(rss_per_at_join);
            let d = |x: Option<ProcSample>, y: Option<ProcSample>| match (x, y) {
                (Some(x), Some(y)) => Some(y.cpu_secs - x.cpu_secs),
                _ => None,
            };
            ServerConnect {
                rss_per_connection_bytes: rss_per,
                rss_per_connection_at_join_bytes: rss_per_at_join,
                cpu_secs_ramp: d(s.before, s.full),
                cpu_secs_hold: d(s.full, s.after_hold),
                samples: s,
            }
        });
        ConnectReport {
            command: "connect".into(),
            url: a.url.clone(),
            topic: a.topic.clone(),
            topics: a.topics,
            requested: a.connections,
            target_rate: a.rate,
            processes,
            cores_per_process: job.cores,
            attempted: m.attempted,
            joined: m.joined,
            failed: m.failed,
            failures: m.failures.clone(),
            retried: m.retried.clone(),
            executor_stalls: m.executor_stalls.clone(),
            time_to_last_join_secs: ttl,
            time_to_n_secs: (m.joined == a.connections).then_some(ttl),
            achieved_rate: if ttl > 0.0 { m.joined as f64 / ttl } else { 0.0 },
            join_latency: Latency::of(&m.join_latency),
            hold_secs: a.hold.as_secs_f64(),
            connected_at_hold_end,
            ended_early: m.ended_early,
            ends: m.ends.clone(),
            broadcasts: HeldBroadcasts {
                deliveries: m.deliveries,
                receivers: m.subscribers_complete,
                first_recv_unix_nanos: m.first_recv_nanos,
                last_recv_unix_nanos: m.last_recv_nanos,
                latency: Latency::of(&m.latency),
            },
            server,
            problems,
            presence: None,
        }
    }
}

/// Adds the counts by kind of `from` into `into` (failures, retries, ends).
pub fn add_counts(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

fn print_map(title: &str, m: &BTreeMap<String, u64>) {
    if m.is_empty() {
        return;
    }
    println!("  {title}:");
    for (k, v) in m {
        println!("    {v:>9}  {k}");
    }
}

pub fn print_connect(r: &ConnectReport) {
    println!("== connect: {} ({})", r.url, r.topic);
    println!(
        "  requested      {} at {}/s ({} process(es) x {} core(s))",
        r.requested, r.target_rate, r.processes, r.cores_per_process
    );
    println!("  joined         {}", r.joined);
    println!("  failed         {}", r.failed);
    print_map("failures by kind", &r.failures);
    print_map("retried by kind", &r.retried);
    print_map(
        "executor stalls (controller silent 2 s or more, woken) by thread state",
        &r.executor_stalls,
    );
    match r.time_to_n_secs {
        Some(t) => println!("  time to N      {t:.3}s"),
        None => println!(
            "  time to N      not reached (last join after {:.3}s)",
            r.time_to_last_join_secs
        ),
    }
    println!("  achieved rate  {:.0} joins/s", r.achieved_rate);
    println!("  join latency   {}", r.join_latency.line());
    println!(
        "  hold {:.1}s: {} still connected at the end, {} ended early",
        r.hold_secs, r.connected_at_hold_end, r.ended_early
    );
    print_map("ended early, by kind", &r.ends);
    if let Some(p) = &r.presence {
        let t = &p.tally;
        println!(
            "  presence       {} diffs ({}), {} states ({}, largest {}), {} other frames ({}); {} read in pieces",
            t.diff_frames,
            fmt_bytes(t.diff_bytes as f64),
            t.state_frames,
            fmt_bytes(t.state_bytes as f64),
            fmt_bytes(t.largest_state_bytes as f64),
            t.other_frames,
            fmt_bytes(t.other_bytes as f64),
            t.streamed_messages
        );
        println!("  join → state   {}", p.join_to_state.line());
        if let Some(w) = &p.watch {
            println!(
                "  {w} reached {} members; from the arm time: {}",
                t.reached,
                p.reach.line()
            );
        }
    }
    if r.broadcasts.deliveries > 0 {
        println!(
            "  broadcasts     {} deliveries to {} connections, latency {}",
            r.broadcasts.deliveries,
            r.broadcasts.receivers,
            r.broadcasts.latency.line()
        );
    }
    if let Some(s) = &r.server {
        println!("  server pid {}:", s.samples.pid);
        let rss = |x: &Option<ProcSample>| x.map_or("?".to_string(), |x| fmt_bytes(x.rss_bytes as f64));
        println!(
            "    RSS before {} | at full {} | after hold {} | after close {}",
            rss(&s.samples.before),
            rss(&s.samples.full),
            rss(&s.samples.after_hold),
            rss(&s.samples.after_close)
        );
        if let Some(b) = s.rss_per_connection_bytes {
            let at_join = s.rss_per_connection_at_join_bytes.map_or(String::new(), |j| {
                format!(" ({} the moment all had joined)", fmt_bytes(j))
            });
            println!(
                "    RSS per idle connection after the hold {}{at_join}",
                fmt_bytes(b)
            );
        }
        if let (Some(a), Some(b)) = (s.cpu_secs_ramp, s.cpu_secs_hold) {
            println!("    CPU seconds: ramp {a:.2}, hold {b:.2}");
        }
    }
    print_problems(&r.problems);
}

fn print_problems(p: &[String]) {
    for e in p {
        println!("  PROBLEM: {e}");
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerFanout {
    #[serde(flatten)]
    pub samples: ServerFigures,
    /// From just before the first send to when the last delivery was seen.
    pub cpu_secs_publish: Option<f64>,
    pub cpu_us_per_delivery: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FanoutReport {
    pub command: String,
    pub url: String,
    /// `--publish-url`: the node the publisher sent through, when not `url`.
    #[serde(default)]
    pub publish_url: Option<String>,
    pub topic: String,
    pub processes: usize,
    pub cores_per_process: usize,
    pub subscribers_requested: u64,
    pub subscribers_joined: u64,
    pub subscriber_failures: BTreeMap<String, u64>,
    pub messages: u64,
    pub pace: String,
    pub sent: u64,
    pub sample_subscriber_received: u64,
    /// subscribers_joined x sent
    pub expected: u64,
    /// Delivered `new_msg` frames, duplicates included.
    pub deliveries: u64,
    pub duplicates: u64,
    pub reorders: u64,
    pub unexpected: u64,
    pub duplicates_exact: bool,
    /// expected - (deliveries - duplicates - unexpected)
    pub loss: i64,
    pub subscribers_complete: u64,
    pub ended_early: u64,
    pub ends: BTreeMap<String, u64>,
    /// First send to last delivery.
    pub duration_secs: f64,
    pub deliveries_per_sec: f64,
    pub publish_secs: f64,
    pub latency: Latency,
    /// WebSocket bytes the subscribers read, joins and replies included.
    pub wire_bytes_in: u64,
    /// `wire_bytes_in` over `deliveries`.
    pub wire_bytes_per_delivery: f64,
    /// Subscribers that negotiated `permessage-deflate`, and the messages they inflated.
    pub compressed_connections: u64,
    pub inflated_messages: u64,
    pub stopped_because: String,
    pub server: Option<ServerFanout>,
    pub problems: Vec<String>,
}

impl FanoutReport {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        a: &FanoutArgs,
        job: &Job,
        processes: usize,
        m: &SliceReport,
        ps: &PubShared,
        pace: Pace,
        why: &str,
        server: Option<ServerFigures>,
        problems: Vec<String>,
    ) -> FanoutReport {
        let sent = ps.sent.load(Relaxed);
        let first_send = ps.first_send_nanos.load(Relaxed);
        let last_send = ps.last_send_nanos.load(Relaxed);
        let duration = if first_send > 0 && m.last_recv_nanos > first_send {
            secs(first_send, m.last_recv_nanos)
        } else {
            0.0
        };
        let expected = m.joined * sent;
        let server = server.map(|s| ServerFanout::of(s, m.deliveries));
        FanoutReport {
            command: "fanout".into(),
            url: a.url.clone(),
            publish_url: a.publish_url.clone(),
            topic: a.topic.clone(),
            processes,
            cores_per_process: job.cores,
            subscribers_requested: a.subscribers,
            subscribers_joined: m.joined,
            subscriber_failures: m.failures.clone(),
            messages: a.messages,
            pace: match pace {
                Pace::Rate(r) => format!("{r} msg/s"),
                Pace::Window(w) => format!("as fast as possible, window {w}"),
            },
            sent,
            sample_subscriber_received: ps.sample_received.load(Relaxed),
            expected,
            deliveries: m.deliveries,
            duplicates: m.duplicates,
            reorders: m.reorders,
            unexpected: m.unexpected,
            duplicates_exact: job.exact_duplicates,
            loss: loss(expected, m),
            subscribers_complete: m.subscribers_complete,
            ended_early: m.ended_early,
            ends: m.ends.clone(),
            duration_secs: duration,
            deliveries_per_sec: if duration > 0.0 {
                m.deliveries as f64 / duration
            } else {
                0.0
            },
            publish_secs: if last_send > first_send {
                secs(first_send, last_send)
            } else {
                0.0
            },
            latency: Latency::of(&m.latency),
            wire_bytes_in: m.wire_bytes_in,
            wire_bytes_per_delivery: m.wire_bytes_in as f64 / m.deliveries.max(1) as f64,
            compressed_connections: m.compressed_connections,
            inflated_messages: m.inflated_messages,
            stopped_because: why.to_string(),
            server,
            problems,
        }
    }
}

impl ServerFanout {
    /// CPU from `before_publish` to `after_publish`, per delivery.
    fn of(s: ServerFigures, deliveries: u64) -> ServerFanout {
        let cpu = match (s.before_publish, s.after_publish) {
            (Some(b), Some(a)) => Some(a.cpu_secs - b.cpu_secs),
            _ => None,
        };
        ServerFanout {
            cpu_us_per_delivery: cpu
                .filter(|_| deliveries > 0)
                .map(|c| c * 1e6 / deliveries as f64),
            cpu_secs_publish: cpu,
            samples: s,
        }
    }

    fn print(&self, joined_what: &str) {
        if let (Some(c), Some(per)) = (self.cpu_secs_publish, self.cpu_us_per_delivery) {
            println!(
                "  server pid {}: {c:.3} CPU seconds during publish, {per:.3} CPU-µs per delivery",
                self.samples.pid
            );
        }
        if let Some(f) = self.samples.full {
            println!(
                "  server RSS with {joined_what} joined: {}",
                fmt_bytes(f.rss_bytes as f64)
            );
        }
    }
}

/// expected - (deliveries - duplicates - unexpected)
fn loss(expected: u64, m: &SliceReport) -> i64 {
    let received = m.deliveries - m.duplicates - m.unexpected;
    expected as i64 - received as i64
}

/// From `first` to `last` (unix nanos), 0 when either is missing.
fn span(first: u64, last: u64) -> f64 {
    if first > 0 && last > first {
        secs(first, last)
    } else {
        0.0
    }
}

fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

fn print_delivery_checks(loss: i64, duplicates: u64, exact: bool, reorders: u64, unexpected: u64) {
    println!(
        "  loss {loss}  duplicates {duplicates}{}  reorders {reorders}  unexpected {unexpected}",
        if exact {
            ""
        } else {
            " (only immediate repeats detected)"
        },
    );
}

pub fn print_fanout(r: &FanoutReport) {
    println!("== fanout: {} ({})", r.url, r.topic);
    println!(
        "  subscribers    {} joined of {} ({} process(es) x {} core(s))",
        r.subscribers_joined, r.subscribers_requested, r.processes, r.cores_per_process
    );
    print_map("subscriber failures by kind", &r.subscriber_failures);
    println!(
        "  published      {} of {} messages in {:.3}s ({})",
        r.sent, r.messages, r.publish_secs, r.pace
    );
    println!(
        "  deliveries     {} of {} expected in {:.3}s = {:.0} deliveries/s",
        r.deliveries, r.expected, r.duration_secs, r.deliveries_per_sec
    );
    print_delivery_checks(r.loss, r.duplicates, r.duplicates_exact, r.reorders, r.unexpected);
    println!(
        "  subscribers    {} complete, {} ended early",
        r.subscribers_complete, r.ended_early
    );
    print_map("ended early, by kind", &r.ends);
    println!("  latency        {}", r.latency.line());
    println!(
        "  received       {} WebSocket bytes, {:.1} per delivery; {} subscriber(s) compressed, {} message(s) inflated",
        r.wire_bytes_in, r.wire_bytes_per_delivery, r.compressed_connections, r.inflated_messages
    );
    println!("  stopped        {}", r.stopped_because);
    if let Some(s) = &r.server {
        s.print("subscribers");
    }
    print_problems(&r.problems);
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomsReport {
    pub command: String,
    pub url: String,
    pub topic_prefix: String,
    pub rooms: u64,
    pub members_per_room: u64,
    pub rate_per_member: f64,
    /// Messages each member sends.
    pub messages_per_member: u64,
    pub send_duration_secs: f64,
    pub processes: usize,
    pub cores_per_process: usize,
    pub members_requested: u64,
    pub members_joined: u64,
    pub member_failures: BTreeMap<String, u64>,
    pub join_latency: Latency,
    pub sent: u64,
    /// Σ over rooms of messages sent in the room × members joined to it.
    pub expected: u64,
    /// Delivered `new_msg` frames, duplicates included.
    pub deliveries: u64,
    pub duplicates: u64,
    /// A sender's seq lower than the one before from the same sender.
    pub reorders: u64,
    pub unexpected: u64,
    pub duplicates_exact: bool,
    /// expected - (deliveries - duplicates - unexpected)
    pub loss: i64,
    pub ended_early: u64,
    pub ends: BTreeMap<String, u64>,
    /// First send to last delivery.
    pub duration_secs: f64,
    pub deliveries_per_sec: f64,
    pub latency: Latency,
    pub stopped_because: String,
    pub server: Option<ServerFanout>,
    pub problems: Vec<String>,
}

impl RoomsReport {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        a: &RoomsArgs,
        job: &Job,
        processes: usize,
        m: &SliceReport,
        per_member: u64,
        why: &str,
        server: Option<ServerFigures>,
        problems: Vec<String>,
    ) -> RoomsReport {
        let expected = m.room_expected();
        let duration = span(m.first_send_nanos, m.last_recv_nanos);
        RoomsReport {
            command: "rooms".into(),
            url: a.url.clone(),
            topic_prefix: a.topic_prefix.clone(),
            rooms: a.rooms,
            members_per_room: a.members,
            rate_per_member: a.rate_per_member,
            messages_per_member: per_member,
            send_duration_secs: span(m.first_send_nanos, m.last_send_nanos),
            processes,
            cores_per_process: job.cores,
            members_requested: job.total,
            members_joined: m.joined,
            member_failures: m.failures.clone(),
            join_latency: Latency::of(&m.join_latency),
            sent: m.sent,
            expected,
            deliveries: m.deliveries,
            duplicates: m.duplicates,
            reorders: m.reorders,
            unexpected: m.unexpected,
            duplicates_exact: job.exact_duplicates,
            loss: loss(expected, m),
            ended_early: m.ended_early,
            ends: m.ends.clone(),
            duration_secs: duration,
            deliveries_per_sec: per_sec(m.deliveries, duration),
            latency: Latency::of(&m.latency),
            stopped_because: why.to_string(),
            server: server.map(|s| ServerFanout::of(s, m.deliveries)),
            problems,
        }
    }
}

pub fn print_rooms(r: &RoomsReport) {
    println!(
        "== rooms: {} ({} rooms x {} members, {}room-<i>)",
        r.url, r.rooms, r.members_per_room, r.topic_prefix
    );
    println!(
        "  members        {} joined of {} ({} process(es) x {} core(s))",
        r.members_joined, r.members_requested, r.processes, r.cores_per_process
    );
    print_map("member failures by kind", &r.member_failures);
    println!("  join latency   {}", r.join_latency.line());
    println!(
        "  sent           {} messages ({} per member at {}/s) in {:.3}s",
        r.sent, r.messages_per_member, r.rate_per_member, r.send_duration_secs
    );
    println!(
        "  deliveries     {} of {} expected in {:.3}s = {:.0} deliveries/s",
        r.deliveries, r.expected, r.duration_secs, r.deliveries_per_sec
    );
    print_delivery_checks(r.loss, r.duplicates, r.duplicates_exact, r.reorders, r.unexpected);
    println!("  ended early    {}", r.ended_early);
    print_map("ended early, by kind", &r.ends);
    println!("  latency        {}", r.latency.line());
    println!("  stopped        {}", r.stopped_because);
    if let Some(s) = &r.server {
        s.print("members");
    }
    print_problems(&r.problems);
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerChurn {
    #[serde(flatten)]
    pub samples: ServerFigures,
    pub rss_start_bytes: Option<u64>,
    pub rss_end_bytes: Option<u64>,
    /// RSS at the end of the churn minus RSS before it.
    pub rss_growth_bytes: Option<i64>,
    pub cpu_secs: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChurnReport {
    pub command: String,
    pub url: String,
    pub topic: String,
    pub topics: u64,
    pub slots: u64,
    pub target_cycle_rate: f64,
    pub pushes_per_cycle: u64,
    pub duration_secs: f64,
    pub processes: usize,
    pub cores_per_process: usize,
    pub cycles_attempted: u64,
    pub cycles_completed: u64,
    pub cycles_failed: u64,
    pub failures: BTreeMap<String, u64>,
    /// Completed cycles / duration.
    pub achieved_cycle_rate: f64,
    /// connect + upgrade + join + pushes + leave + close, completed cycles only.
    pub cycle_latency: Latency,
    /// connect + upgrade + join of every cycle that got that far.
    pub join_latency: Latency,
    /// From the start until every slot ended.
    pub elapsed_secs: f64,
    pub server: Option<ServerChurn>,
    pub problems: Vec<String>,
}

impl ChurnReport {
    pub fn build(
        a: &ChurnArgs,
        job: &Job,
        processes: usize,
        m: &SliceReport,
        elapsed_secs: f64,
        server: Option<ServerFigures>,
        problems: Vec<String>,
    ) -> ChurnReport {
        let server = server.map(|s| {
            let (start, end) = (s.before.map(|x| x.rss_bytes), s.full.map(|x| x.rss_bytes));
            ServerChurn {
                rss_start_bytes: start,
                rss_end_bytes: end,
                rss_growth_bytes: start.zip(end).map(|(a, b)| b as i64 - a as i64),
                cpu_secs: s.before.zip(s.full).map(|(a, b)| b.cpu_secs - a.cpu_secs),
                samples: s,
            }
        });
        ChurnReport {
            command: "churn".into(),
            url: a.url.clone(),
            topic: a.topic.clone(),
            topics: a.topics,
            slots: a.connections,
            target_cycle_rate: a.cycle_rate,
            pushes_per_cycle: a.pushes,
            duration_secs: a.duration.as_secs_f64(),
            processes,
            cores_per_process: job.cores,
            cycles_attempted: m.attempted,
            cycles_completed: m.joined,
            cycles_failed: m.failed,
            failures: m.failures.clone(),
            achieved_cycle_rate: per_sec(m.joined, a.duration.as_secs_f64()),
            cycle_latency: Latency::of(&m.cycle_latency),
            join_latency: Latency::of(&m.join_latency),
            elapsed_secs,
            server,
            problems,
        }
    }
}

pub fn print_churn(r: &ChurnReport) {
    println!("== churn: {} ({})", r.url, r.topic);
    println!(
        "  slots          {} at {} cycles/s for {:.1}s, {} push(es) per cycle ({} process(es) x {} core(s))",
        r.slots, r.target_cycle_rate, r.duration_secs, r.pushes_per_cycle, r.processes, r.cores_per_process
    );
    println!(
        "  cycles         {} completed, {} failed, of {} started = {:.0} cycles/s",
        r.cycles_completed, r.cycles_failed, r.cycles_attempted, r.achieved_cycle_rate
    );
    print_map("failures by kind", &r.failures);
    println!("  cycle latency  {}", r.cycle_latency.line());
    println!("  join latency   {}", r.join_latency.line());
    println!("  ended after    {:.1}s", r.elapsed_secs);
    if let Some(s) = &r.server {
        let rss = |x: Option<u64>| x.map_or("?".to_string(), |x| fmt_bytes(x as f64));
        println!(
            "  server pid {}: RSS start {} | end {} | growth {} | after close {}",
            s.samples.pid,
            rss(s.rss_start_bytes),
            rss(s.rss_end_bytes),
            s.rss_growth_bytes
                .map_or("?".to_string(), |g| fmt_bytes(g as f64)),
            rss(s.samples.after_close.map(|x| x.rss_bytes))
        );
        if let Some(c) = s.cpu_secs {
            println!("    CPU seconds during the churn {c:.2}");
        }
    }
    print_problems(&r.problems);
}

pub fn write_json<T: Serialize>(path: &Path, v: &T) -> anyhow::Result<()> {
    let s = serde_json::to_string_pretty(v)?;
    std::fs::write(path, s + "\n").map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    eprintln!("figures written to {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_counts_only_good_deliveries() {
        let m = SliceReport {
            deliveries: 12,
            duplicates: 2,
            unexpected: 1,
            ..Default::default()
        };
        assert_eq!(loss(10, &m), 1);
        assert_eq!(loss(9, &m), 0);
        assert_eq!(span(0, 5), 0.0);
        assert_eq!(span(1_000_000_000, 3_000_000_000), 2.0);
        assert_eq!(per_sec(10, 0.0), 0.0);
        assert_eq!(per_sec(10, 2.0), 5.0);
    }

    fn hist_of(values: &[u64]) -> Histogram<u64> {
        let mut h = run::new_hist();
        for &v in values {
            h.record(v).unwrap();
        }
        h
    }

    #[test]
    fn histograms_survive_the_report() {
        let h = hist_of(&[1_000, 2_000, 2_000, 5_000_000]);
        let lat = Latency::from_hist(&h);
        let json = serde_json::to_string(&lat).unwrap();
        let back: Latency = serde_json::from_str(&json).unwrap();
        let h2 = back.histogram().unwrap();
        assert_eq!(h2, h);
        assert_eq!(back.count, 4);
        // Nothing recorded: no histogram, and it reads back as empty.
        let empty = Latency::from_hist(&run::new_hist());
        assert!(empty.histogram.is_none());
        assert!(empty.histogram().unwrap().is_empty());
        // Percentiles without a histogram cannot be merged.
        let old = Latency {
            histogram: None,
            ..lat.clone()
        };
        assert!(Latency::merge([&old]).is_err());
        assert!(decode_histogram("not base64!").is_err());
    }

    #[test]
    fn merged_percentiles_come_from_the_sum_not_the_worst_part() {
        // One node reached 100 connections in 1 ms and one in 1 s; another reached 50
        // in 2 ms. Taken together (151 deliveries): p50 1 ms, p99 2 ms, max 1 s; no
        // single node's percentiles say that.
        let mut a = vec![1_000_000u64; 100];
        a.push(1_000_000_000);
        let b = vec![2_000_000u64; 50];
        let m = Latency::merge([
            &Latency::from_hist(&hist_of(&a)),
            &Latency::from_hist(&hist_of(&b)),
        ])
        .unwrap();
        assert_eq!(m.count, 151);
        let near = |x: f64, want: f64| (x - want).abs() / want < 0.01;
        assert!(near(m.p50_us, 1_000.0), "{}", m.p50_us);
        assert!(near(m.p99_us, 2_000.0), "{}", m.p99_us);
        assert!(near(m.max_us, 1_000_000.0), "{}", m.max_us);
        assert_eq!(m.histogram().unwrap(), {
            let mut all = a.clone();
            all.extend(&b);
            hist_of(&all)
        });
    }

    #[test]
    fn server_cpu_per_delivery() {
        let at = |cpu: f64, rss: u64| ProcSample {
            rss_bytes: rss,
            cpu_secs: cpu,
            unix_nanos: 0,
        };
        let s = ServerFigures {
            pid: 1,
            before: None,
            full: None,
            after_hold: None,
            after_close: None,
            before_publish: Some(at(1.0, 10)),
            after_publish: Some(at(1.5, 10)),
        };
        let f = ServerFanout::of(s, 1000);
        assert!((f.cpu_us_per_delivery.unwrap() - 500.0).abs() < 1e-6);
        assert_eq!(ServerFanout::of(f.samples, 0).cpu_us_per_delivery, None);
    }
}
