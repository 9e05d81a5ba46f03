//! Per-core counters. Each core writes only its own [`CoreStats`] (a relaxed load and
//! store, no read-modify-write, no contention); any core may read all of them for
//! `/api/stats` and `/metrics`. Counted per message or per broadcast, never per
//! subscriber.

use std::sync::atomic::{AtomicU64, Ordering};

/// One single-writer counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n` (only the owning core calls this).
    pub fn add(&self, n: u64) {
        self.0
            .store(self.0.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    /// Subtracts `n`, saturating at zero (gauges).
    pub fn sub(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).saturating_sub(n),
            Ordering::Relaxed,
        );
    }

    /// Sets the value (gauges).
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }

    /// Adds `n` from any thread: for the few counters that more than one thread
    /// writes (drops at a core's inbox, counted by its senders).
    pub fn add_shared(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the latency histograms' buckets, in microseconds (`+Inf` after).
pub const LATENCY_BUCKETS_US: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 10_000_000,
];

/// A single-writer latency histogram with [`LATENCY_BUCKETS_US`] (Prometheus's shape:
/// cumulative buckets, a sum and a count, in seconds on the way out).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative), the last one for `+Inf`.
    buckets: [Counter; LATENCY_BUCKETS_US.len() + 1],
    sum_us: Counter,
}

impl Histogram {
    /// Records one observation of `us` microseconds (only the owning core calls this).
    pub fn observe_us(&self, us: u64) {
        let i = LATENCY_BUCKETS_US.partition_point(|&b| b < us);
        self.buckets[i].add(1);
        self.sum_us.add(us);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(Counter::get).sum()
    }

    fn write(&self, out: &mut String, metric: &str, core: usize) {
        use std::fmt::Write;
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.get();
            let le = LATENCY_BUCKETS_US
                .get(i)
                .map_or("+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
            let _ = writeln!(out, "{metric}_bucket{{core=\"{core}\",le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(
            out,
            "{metric}_sum{{core=\"{core}\"}} {}",
            self.sum_us.get() as f64 / 1e6
        );
        let _ = writeln!(out, "{metric}_count{{core=\"{core}\"}} {cumulative}");
    }
}

/// Close codes counted one by one (`ringcast_closes_total{code}`); others count as
/// "other", and a connection the client ended without a close frame as "none".
pub const CLOSE_CODES: [u16; 8] = [1000, 1001, 1002, 1007, 1008, 1009, 1011, 4000];

/// What one core counts.
#[derive(Debug, Default)]
pub struct CoreStats {
    /// Broadcast accepted (made here or arrived from another core or node) until the
    /// frames of its fanout on this core were handed to the kernel.
    pub fanout_latency: Histogram,
    /// A join received until its reply was queued.
    pub join_latency: Histogram,
    /// An HTTP API request read until its answer was ready.
    pub api_latency: Histogram,
    /// WebSocket closes by code: [`CLOSE_CODES`], then "other", then "none".
    pub closes: [Counter; CLOSE_CODES.len() + 2],
    /// Connections closed (1008) for sending past `--max-rate`.
    pub flood_closed: Counter,
    /// The biggest topics on this core by subscribers, refreshed about once a second
    /// (read by `/metrics`; never touched by fanout).
    pub top_topics: std::sync::Mutex<Vec<(String, u64)>>,
    /// Open connections (WebSocket and long-poll sessions).
    pub connections: Counter,
    /// Open long-poll sessions.
    pub longpoll_sessions: Counter,
    /// Joined channels.
    pub channels: Counter,
    /// Joins accepted.
    pub joins: Counter,
    /// Topics with subscribers on this core.
    pub topics: Counter,
    /// Client messages handled.
    pub messages_in: Counter,
    /// Frames queued to clients (fanout deliveries included).
    pub messages_out: Counter,
    /// Bytes read from clients.
    pub bytes_in: Counter,
    /// Bytes written to clients.
    pub bytes_out: Counter,
    /// Broadcasts published from this core.
    pub broadcasts: Counter,
    /// Frames handed to local subscribers by fanout.
    pub deliveries: Counter,
    /// Connections cut off because their outbound queue passed its bound.
    pub slow_closed: Counter,
    /// Idle WebSocket connections parked: no task, no pump, one kernel poll.
    pub parked: Counter,
    /// TCP connections still in their HTTP phase (not upgraded).
    pub http_connections: Counter,
    /// TCP connections closed at accept: the core's HTTP-phase cap was reached.
    pub http_refused: Counter,
    /// Requests closed for not sending a complete head and body in time.
    pub http_timeouts: Counter,
    /// Accepts that failed (out of file descriptors or memory).
    pub accept_errors: Counter,
    /// Times the accept loop found connections waiting on the listener while its
    /// pending accept had not completed, and accepted them by asking again.
    pub accept_stalls: Counter,
    /// TLS handshakes that failed or did not finish within the request timeout.
    pub tls_failed: Counter,
    /// Binary frames for long-poll clients, which have no representation there:
    /// replies answered as errors, pushes and broadcasts left out.
    pub longpoll_binary: Counter,
    /// Commands for this core dropped at its full inbox (written by the senders).
    pub inbox_dropped: Counter,
    /// Broadcasts for another core dropped because the ring to it and its backlog
    /// were full.
    pub mesh_dropped: Counter,
    /// Connections closed (1008) because their mailbox of intercepted broadcasts and
    /// `handle_info` messages passed its bound.
    pub mailbox_closed: Counter,
    /// Long-poll sessions closed because their queue of posted messages passed its
    /// bound.
    pub longpoll_inbound_closed: Counter,
    /// Topics whose history this core owns (sequences and keeps).
    pub history_topics: Counter,
    /// Broadcasts kept in the histories this core owns.
    pub history_entries: Counter,
    /// Joins with `since` answered `"recovered": true`.
    pub history_recovered: Counter,
    /// Joins with `since` answered `"recovered": false`.
    pub history_lost: Counter,
    /// Broadcasts replayed to recovering joins.
    pub history_replayed: Counter,
    /// Open WebSocket connections that negotiated `permessage-deflate`.
    pub deflate_connections: Counter,
    /// Broadcast frames compressed: once per broadcast on each core that has
    /// subscribers which negotiated compression.
    pub deflate_broadcasts: Counter,
    /// Rust subscriptions (`Endpoint::subscribe`) and channel subscriptions
    /// (`Socket::subscribe`) listening on this core.
    pub subscriptions: Counter,
    /// Broadcasts a Rust subscription missed because its queue was full (`Lagged`).
    pub subscription_lagged: Counter,
}

/// The fields in output order, with Prometheus type and help.
pub(crate) const FIELDS: &[(&str, &str, &str)] = &[
    (
        "connections",
        "gauge",
        "Open connections (WebSocket and long-poll).",
    ),
    ("longpoll_sessions", "gauge", "Open long-poll sessions."),
    ("channels", "gauge", "Joined channels."),
    ("joins", "counter", "Joins accepted."),
    ("topics", "gauge", "Topics with local subscribers."),
    ("messages_in", "counter", "Client messages handled."),
    ("messages_out", "counter", "Frames queued to clients."),
    ("bytes_in", "counter", "Bytes read from clients."),
    ("bytes_out", "counter", "Bytes written to clients."),
    ("broadcasts", "counter", "Broadcasts published."),
    (
        "deliveries",
        "counter",
        "Broadcast frames handed to local subscribers.",
    ),
    (
        "slow_closed",
        "counter",
        "Connections closed for not reading (1008).",
    ),
    (
        "parked",
        "gauge",
        "Idle WebSocket connections parked (no task, one kernel poll).",
    ),
    (
        "http_connections",
        "gauge",
        "TCP connections in their HTTP phase (not upgraded).",
    ),
    (
        "http_refused",
        "counter",
        "TCP connections closed at accept: the per-core HTTP-phase cap was reached.",
    ),
    (
        "http_timeouts",
        "counter",
        "Requests closed for not arriving whole within the request timeout.",
    ),
    (
        "accept_errors",
        "counter",
        "Accepts that failed (file descriptors, memory).",
    ),
    (
        "accept_stalls",
        "counter",
        "Times a pending accept had not completed although connections were waiting; the accept loop asked again.",
    ),
    (
        "tls_failed",
        "counter",
        "TLS handshakes that failed or did not finish within the request timeout.",
    ),
    (
        "longpoll_binary",
        "counter",
        "Binary frames for long-poll clients (replies answered as errors, pushes left out).",
    ),
    (
        "inbox_dropped",
        "counter",
        "Commands dropped at this core's full inbox.",
    ),
    (
        "mesh_dropped",
        "counter",
        "Broadcasts for another core dropped: its ring and backlog were full.",
    ),
    (
        "mailbox_closed",
        "counter",
        "Connections closed (1008) for a mailbox over its bound.",
    ),
    (
        "longpoll_inbound_closed",
        "counter",
        "Long-poll sessions closed for posted messages over their bound.",
    ),
    (
        "history_topics",
        "gauge",
        "Topics with history this core owns (sequences and keeps).",
    ),
    (
        "history_entries",
        "gauge",
        "Broadcasts kept in the histories this core owns.",
    ),
    (
        "history_recovered",
        "counter",
        "Joins with since answered recovered: true.",
    ),
    (
        "history_lost",
        "counter",
        "Joins with since answered recovered: false.",
    ),
    (
        "history_replayed",
        "counter",
        "Broadcasts replayed to recovering joins.",
    ),
    (
        "deflate_connections",
        "gauge",
        "Open WebSocket connections that negotiated permessage-deflate.",
    ),
    (
        "deflate_broadcasts",
        "counter",
        "Broadcast frames compressed (once per broadcast per core with compressing subscribers).",
    ),
    (
        "subscriptions",
        "gauge",
        "Rust and channel subscriptions (Endpoint::subscribe, Socket::subscribe) on this core.",
    ),
    (
        "subscription_lagged",
        "counter",
        "Broadcasts Rust subscriptions missed for a full queue (Lagged).",
    ),
];

impl CoreStats {
    /// Counts a WebSocket close with `code` (`None`: ended without a close frame).
    pub fn count_close(&self, code: Option<u16>) {
        let i = match code {
            None => CLOSE_CODES.len() + 1,
            Some(c) => CLOSE_CODES
                .iter()
                .position(|&k| k == c)
                .unwrap_or(CLOSE_CODES.len()),
        };
        self.closes[i].add(1);
    }

    pub(crate) fn field(&self, name: &str) -> u64 {
        let c = match name {
            "connections" => &self.connections,
            "longpoll_sessions" => &self.longpoll_sessions,
            "channels" => &self.channels,
            "joins" => &self.joins,
            "topics" => &self.topics,
            "messages_in" => &self.messages_in,
            "messages_out" => &self.messages_out,
            "bytes_in" => &self.bytes_in,
            "bytes_out" => &self.bytes_out,
            "broadcasts" => &self.broadcasts,
            "deliveries" => &self.deliveries,
            "slow_closed" => &self.slow_closed,
            "parked" => &self.parked,
            "http_connections" => &self.http_connections,
            "http_refused" => &self.http_refused,
            "http_timeouts" => &self.http_timeouts,
            "accept_errors" => &self.accept_errors,
            "accept_stalls" => &self.accept_stalls,
            "tls_failed" => &self.tls_failed,
            "longpoll_binary" => &self.longpoll_binary,
            "inbox_dropped" => &self.inbox_dropped,
            "mesh_dropped" => &self.mesh_dropped,
            "mailbox_closed" => &self.mailbox_closed,
            "longpoll_inbound_closed" => &self.longpoll_inbound_closed,
            "history_topics" => &self.history_topics,
            "history_entries" => &self.history_entries,
            "history_recovered" => &self.history_recovered,
            "history_lost" => &self.history_lost,
            "history_replayed" => &self.history_replayed,
            "deflate_connections" => &self.deflate_connections,
            "deflate_broadcasts" => &self.deflate_broadcasts,
            "subscriptions" => &self.subscriptions,
            "subscription_lagged" => &self.subscription_lagged,
            _ => return 0,
        };
        c.get()
    }
}

/// `/api/stats`: totals plus one object per core.
pub(crate) fn stats_json<'a>(cores: impl Iterator<Item = &'a CoreStats> + Clone) -> String {
    let object = |f: &dyn Fn(&str) -> u64| {
        let map: serde_json::Map<String, serde_json::Value> = FIELDS
            .iter()
            .map(|(name, _, _)| (name.to_string(), f(name).into()))
            .collect();
        serde_json::Value::Object(map)
    };
    let total = object(&|name| cores.clone().map(|c| c.field(name)).sum());
    let per_core: Vec<_> = cores.map(|c| object(&|name| c.field(name))).collect();
    let mut out = total.as_object().cloned().unwrap_or_default();
    out.insert("cores".into(), per_core.into());
    serde_json::Value::Object(out).to_string()
}

/// `/metrics`: Prometheus text format, one sample per core. `cluster_dropped`: what
/// the Redis link dropped or could not publish, in cluster mode (a node-wide figure:
/// `ringcast_dropped_total{reason="cluster"}`, without a core).
pub(crate) fn prometheus<'a>(
    cores: impl Iterator<Item = &'a CoreStats> + Clone,
    cluster_dropped: Option<u64>,
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for (name, kind, help) in FIELDS {
        let metric = match *kind {
            "counter" => format!("ringcast_{name}_total"),
            _ => format!("ringcast_{name}"),
        };
        let _ = writeln!(out, "# HELP {metric} {help}");
        let _ = writeln!(out, "# TYPE {metric} {kind}");
        for (i, core) in cores.clone().enumerate() {
            let _ = writeln!(out, "{metric}{{core=\"{i}\"}} {}", core.field(name));
        }
    }
    let histograms: [(&str, &str, HistogramOf); 3] = [
        (
            "ringcast_fanout_seconds",
            "Broadcast accepted until its fanout's frames on the core were handed to the kernel.",
            |c| &c.fanout_latency,
        ),
        (
            "ringcast_join_seconds",
            "A join received until its reply was queued.",
            |c| &c.join_latency,
        ),
        (
            "ringcast_api_seconds",
            "An HTTP API request read until its answer was ready.",
            |c| &c.api_latency,
        ),
    ];
    for (metric, help, of) in histograms {
        let _ = writeln!(out, "# HELP {metric} {help}");
        let _ = writeln!(out, "# TYPE {metric} histogram");
        for (i, core) in cores.clone().enumerate() {
            of(core).write(&mut out, metric, i);
        }
    }
    let _ = writeln!(
        out,
        "# HELP ringcast_closes_total WebSocket closes by code (none: no close frame)."
    );
    let _ = writeln!(out, "# TYPE ringcast_closes_total counter");
    for (i, core) in cores.clone().enumerate() {
        for (k, c) in core.closes.iter().enumerate() {
            let code = CLOSE_CODES.get(k).map_or(
                if k == CLOSE_CODES.len() {
                    "other".into()
                } else {
                    "none".into()
                },
                u16::to_string,
            );
            let _ = writeln!(
                out,
                "ringcast_closes_total{{core=\"{i}\",code=\"{code}\"}} {}",
                c.get()
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP ringcast_dropped_total What was dropped or cut off, by reason."
    );
    let _ = writeln!(out, "# TYPE ringcast_dropped_total counter");
    for (i, core) in cores.clone().enumerate() {
        for (reason, n) in [
            ("slow_consumer", core.slow_closed.get()),
            ("rate_limit", core.flood_closed.get()),
            ("inbox", core.inbox_dropped.get()),
            ("mesh", core.mesh_dropped.get()),
            ("mailbox", core.mailbox_closed.get()),
            ("longpoll_inbound", core.longpoll_inbound_closed.get()),
            ("subscription_lag", core.subscription_lagged.get()),
        ] {
            let _ = writeln!(
                out,
                "ringcast_dropped_total{{core=\"{i}\",reason=\"{reason}\"}} {n}"
            );
        }
    }
    if let Some(n) = cluster_dropped {
        let _ = writeln!(out, "ringcast_dropped_total{{reason=\"cluster\"}} {n}");
    }
    // Topics: summed over the cores' own top lists, the biggest TOP_TOPICS kept.
    let mut topics: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for core in cores.clone() {
        for (t, n) in core.top_topics.lock().expect("top topics").iter() {
            *topics.entry(t.clone()).or_default() += n;
        }
    }
    let mut topics: Vec<_> = topics.into_iter().collect();
    topics.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    topics.truncate(TOP_TOPICS);
    let _ = writeln!(
        out,
        "# HELP ringcast_topic_subscribers Subscribers of the {TOP_TOPICS} biggest topics (from each core's own top {TOP_TOPICS})."
    );
    let _ = writeln!(out, "# TYPE ringcast_topic_subscribers gauge");
    for (t, n) in topics {
        let _ = writeln!(out, "ringcast_topic_subscribers{{topic=\"{}\"}} {n}", label(&t));
    }
    out
}

/// Which histogram of a core's counters.
type HistogramOf = fn(&CoreStats) -> &Histogram;

/// Topics `/metrics` names (its label cardinality bound).
pub const TOP_TOPICS: usize = 10;

/// A topic as a Prometheus label value: backslash, quote and newline escaped.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_shape() {
        let cores = [CoreStats::default(), CoreStats::default()];
        cores[1].messages_in.add(3);
        cores[0].connections.add(2);
        cores[0].connections.sub(5);
        let text = prometheus(cores.iter(), None);
        assert!(text.contains("# TYPE ringcast_messages_in_total counter\n"));
        assert!(text.contains("ringcast_messages_in_total{core=\"1\"} 3\n"));
        assert!(text.contains("ringcast_connections{core=\"0\"} 0\n"));
        let json: serde_json::Value = serde_json::from_str(&stats_json(cores.iter())).unwrap();
        assert_eq!(json["messages_in"], 3);
        assert_eq!(json["cores"][1]["messages_in"], 3);
    }
}
