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

/// What one core counts.
#[derive(Debug, Default)]
pub struct CoreStats {
    /// Open connections (WebSocket and long-poll sessions).
    pub connections: Counter,
    /// Open long-poll sessions.
    pub longpoll_sessions: Counter,
    /// Joined channels.
    pub channels: Counter,
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
];

impl CoreStats {
    pub(crate) fn field(&self, name: &str) -> u64 {
        let c = match name {
            "connections" => &self.connections,
            "longpoll_sessions" => &self.longpoll_sessions,
            "channels" => &self.channels,
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

/// `/metrics`: Prometheus text format, one sample per core.
pub(crate) fn prometheus<'a>(cores: impl Iterator<Item = &'a CoreStats> + Clone) -> String {
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
    out
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
        let text = prometheus(cores.iter());
        assert!(text.contains("# TYPE ringcast_messages_in_total counter\n"));
        assert!(text.contains("ringcast_messages_in_total{core=\"1\"} 3\n"));
        assert!(text.contains("ringcast_connections{core=\"0\"} 0\n"));
        let json: serde_json::Value = serde_json::from_str(&stats_json(cores.iter())).unwrap();
        assert_eq!(json["messages_in"], 3);
        assert_eq!(json["cores"][1]["messages_in"], 3);
    }
}
