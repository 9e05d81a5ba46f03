//! The nodes' HTTP server API as the cluster run uses it: `GET /api/stats` of every
//! node (asked in parallel) and one `POST /api/broadcast`. Plain HTTP to 127.0.0.1,
//! never through a proxy.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The parts of a node's `/api/stats` the run reads.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct NodeStats {
    pub connections: u64,
    pub deliveries: u64,
    /// Bytes written to clients.
    #[serde(default)]
    pub bytes_out: u64,
    /// Connections cut off for not reading (1008).
    #[serde(default)]
    pub slow_closed: u64,
    #[serde(default)]
    pub cluster: Option<LinkStats>,
}

/// The node's Redis link (`cluster` in `/api/stats`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct LinkStats {
    /// 1 while the link is up.
    pub connected: u64,
    #[serde(default)]
    pub peers: u64,
}

impl NodeStats {
    pub fn link_up(&self) -> bool {
        self.cluster.as_ref().is_some_and(|c| c.connected == 1)
    }
}

/// A client for every node of one run.
#[derive(Clone)]
pub struct Api {
    agent: ureq::Agent,
    key: String,
}

/// What the broadcast's `POST` got.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BroadcastAnswer {
    pub port: u16,
    /// The time in the body: what every subscriber's latency counts from.
    pub send_unix_nanos: u64,
    pub answer_unix_nanos: u64,
    /// HTTP status (0: no answer).
    pub status: u16,
    pub answer: String,
}

impl Api {
    pub fn new(key: &str, timeout: Duration) -> Api {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .proxy(None)
            .build()
            .new_agent();
        Api {
            agent,
            key: key.to_string(),
        }
    }

    /// One node's `/api/stats`; `None` when it did not answer.
    pub fn stats(&self, port: u16) -> Option<NodeStats> {
        let mut resp = self
            .agent
            .get(format!("http://127.0.0.1:{port}/api/stats"))
            .header("authorization", format!("Bearer {}", self.key))
            .call()
            .ok()?;
        if resp.status() != 200 {
            return None;
        }
        serde_json::from_str(&resp.body_mut().read_to_string().ok()?).ok()
    }

    /// Every node's `/api/stats`, asked at once (so a round takes as long as the
    /// slowest node, not the sum), in the order of `ports`.
    pub fn all_stats(&self, ports: &[u16]) -> Vec<Option<NodeStats>> {
        let mut out = Vec::with_capacity(ports.len());
        for chunk in ports.chunks(64) {
            std::thread::scope(|s| {
                let handles: Vec<_> = chunk.iter().map(|&p| s.spawn(move || self.stats(p))).collect();
                out.extend(handles.into_iter().map(|h| h.join().ok().flatten()));
            });
        }
        out
    }

    /// `POST /api/broadcast` of `event` with `payload` on `topic` through node `port`.
    pub fn broadcast(
        &self,
        port: u16,
        topic: &str,
        event: &str,
        payload: serde_json::Value,
    ) -> (u16, String) {
        let body = serde_json::json!({ "topic": topic, "event": event, "payload": payload }).to_string();
        match self
            .agent
            .post(format!("http://127.0.0.1:{port}/api/broadcast"))
            .header("authorization", format!("Bearer {}", self.key))
            .header("content-type", "application/json")
            .send(body.as_bytes())
        {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                (status, resp.body_mut().read_to_string().unwrap_or_default())
            }
            Err(e) => (0, e.to_string()),
        }
    }
}

/// Sums over the nodes that answered.
pub fn total(stats: &[Option<NodeStats>], field: fn(&NodeStats) -> u64) -> u64 {
    stats.iter().flatten().map(field).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_stats_of_a_cluster_node() {
        let json = r#"{"connections":13334,"deliveries":7,"broadcasts":1,"bytes_out":99,"cores":[{"connections":13334}],
                       "cluster":{"connected":1,"peers":2,"lost":0,"published":1,"received":0,"dropped":0}}"#;
        let s: NodeStats = serde_json::from_str(json).unwrap();
        assert_eq!(s.connections, 13_334);
        assert_eq!(s.deliveries, 7);
        assert_eq!(s.bytes_out, 99);
        assert!(s.link_up());
        let alone: NodeStats = serde_json::from_str(r#"{"connections":0,"deliveries":0}"#).unwrap();
        assert!(!alone.link_up());
        assert_eq!(total(&[Some(s), None, Some(alone)], |s| s.connections), 13_334);
    }
}
