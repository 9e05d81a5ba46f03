//! Plain HTTP routes on the socket port: the server API (`/api/*`, bearer key), metrics,
//! health, the demo page, and long-poll dispatch to the session's core.

use std::rc::Rc;

use std::sync::atomic::Ordering::Relaxed;

use subtle::ConstantTimeEq;

use crate::shard::cluster::ClusterStats;

use crate::proto::http::{Request, Response};
use crate::proto::{token, Payload};
use crate::shard::stats;
use crate::shard::Shard;
use crate::transport::longpoll;

const INDEX_HTML: &str = include_str!("../../assets/index.html");
const PHOENIX_JS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/phoenix.min.js"));
const ADMIN_HTML: &str = include_str!("../../assets/admin.html");
const UPLOT_JS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/uplot.min.js"));
const UPLOT_CSS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/uplot.min.css"));

fn error(status: u16, message: &str) -> Response {
    Response::json(status, serde_json::json!({ "error": message }).to_string())
}

/// Whether the request carries `Authorization: Bearer <key>`, compared in constant time.
fn authorized(req: &Request, key: Option<&str>) -> bool {
    let Some(key) = key else { return false };
    let Some(given) = req
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    given.as_bytes().ct_eq(key.as_bytes()).into()
}

/// Answers one HTTP request that came from `peer`.
pub(crate) async fn route(
    shard: &Rc<Shard>,
    req: Request,
    body: Vec<u8>,
    peer: Option<std::net::SocketAddr>,
) -> Response {
    let app = shard.app.clone();
    match (req.method.as_str(), req.path.as_str()) {
        (_, "/socket/longpoll") => {
            let session = longpoll::session_candidate(&req, &req.query_params());
            let core = session.as_deref().and_then(longpoll::token_core);
            longpoll::route(shard, core, req, body, peer).await
        }
        (_, "/api/broadcast") | (_, "/api/stats") | (_, "/api/admin")
            if !authorized(&req, app.config.api_key.as_deref()) =>
        {
            error(401, "missing or wrong bearer key").header("www-authenticate", "Bearer")
        }
        ("POST", "/api/broadcast") => broadcast(shard, &body),
        ("GET", "/api/stats") => {
            let mut json: serde_json::Value =
                serde_json::from_str(&stats::stats_json(app.stats.iter().map(|s| &**s))).unwrap_or_default();
            if let Some(cluster) = shard.endpoint.cluster() {
                json["cluster"] = cluster_json(cluster.stats());
            }
            Response::json(200, json.to_string())
        }
        ("GET", "/api/admin") => Response::json(200, admin_json(shard).to_string()),
        // The page holds no data: it asks /api/admin with the key the operator types in.
        ("GET", "/admin") => Response::new(200, "text/html; charset=utf-8", ADMIN_HTML),
        ("GET", "/admin/uplot.min.js") => {
            Response::new(200, "application/javascript", UPLOT_JS).header("cache-control", "max-age=3600")
        }
        ("GET", "/admin/uplot.min.css") => {
            Response::new(200, "text/css", UPLOT_CSS).header("cache-control", "max-age=3600")
        }
        ("GET", "/metrics") => {
            let cluster_dropped = shard.endpoint.cluster().map(|c| {
                c.stats().dropped.load(Relaxed)
                    + c.stats().lost.load(Relaxed)
                    + c.stats().forged.load(Relaxed)
            });
            let mut text = stats::prometheus(app.stats.iter().map(|s| &**s), cluster_dropped);
            if let Some(cluster) = shard.endpoint.cluster() {
                text.push_str(&cluster_prometheus(cluster.stats()));
            }
            Response::new(200, "text/plain; version=0.0.4", text)
        }
        // A draining server tells its load balancer to stop sending clients.
        ("GET", "/healthz") if shard.is_stopping() || shard.endpoint.is_draining() => {
            Response::new(503, "text/plain", "draining\n")
        }
        ("GET", "/healthz") => Response::new(200, "text/plain", "ok\n"),
        ("GET", "/") => Response::new(200, "text/html; charset=utf-8", INDEX_HTML),
        ("GET", "/assets/phoenix.min.js") => {
            Response::new(200, "application/javascript", PHOENIX_JS).header("cache-control", "max-age=3600")
        }
        ("GET", "/demo/token") => match &app.config.demo_token_secret {
            Some(secret) => {
                let params = req.query_params();
                let user = params
                    .iter()
                    .find(|(k, _)| k == "user")
                    .map_or("demo", |(_, v)| v.as_str());
                let now = crate::clock::unix_now();
                Response::new(200, "text/plain", token::sign(secret.as_bytes(), user, now))
            }
            None => error(404, "demo tokens exist only with --dev"),
        },
        (_, "/api/broadcast") | (_, "/api/stats") | (_, "/metrics") | (_, "/healthz") | (_, "/") => {
            error(405, "method not allowed")
        }
        _ => error(404, "not found"),
    }
}

fn cluster_figures(c: &ClusterStats) -> [(&'static str, &'static str, &'static str, u64); 7] {
    [
        (
            "connected",
            "gauge",
            "Whether the Redis link is up (1) or not (0).",
            c.connected.load(Relaxed) as u64,
        ),
        (
            "peers",
            "gauge",
            "Other nodes heard from recently.",
            c.peers.load(Relaxed),
        ),
        (
            "lost",
            "counter",
            "Cross-node messages that could not be published.",
            c.lost.load(Relaxed),
        ),
        (
            "published",
            "counter",
            "Messages published to Redis.",
            c.published.load(Relaxed),
        ),
        (
            "received",
            "counter",
            "Messages received from other nodes.",
            c.received.load(Relaxed),
        ),
        (
            "dropped",
            "counter",
            "Commands dropped at the Redis link's full queue (the link is behind).",
            c.dropped.load(Relaxed),
        ),
        (
            "forged",
            "counter",
            "Messages from Redis dropped: unsigned or forged, a presence not from its owner, a meta not JSON.",
            c.forged.load(Relaxed),
        ),
    ]
}

/// What the admin page shows: per core connections, parked connections and channels;
/// running totals (the page turns them into rates); the biggest topics with their
/// subscribers and presences; the Redis link.
fn admin_json(shard: &Shard) -> serde_json::Value {
    use serde_json::json;
    let stats = &shard.app.stats;
    let cores: Vec<_> = stats
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({
                "core": i,
                "connections": s.connections.get(),
                "parked": s.parked.get(),
                "channels": s.channels.get(),
            })
        })
        .collect();
    let total = |f: fn(&stats::CoreStats) -> u64| stats.iter().map(|s| f(s)).sum::<u64>();
    let mut topics = std::collections::HashMap::<String, u64>::new();
    for s in stats {
        for (t, n) in s.top_topics.lock().expect("top topics").iter() {
            *topics.entry(t.clone()).or_default() += n;
        }
    }
    let mut topics: Vec<_> = topics.into_iter().collect();
    topics.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    topics.truncate(stats::TOP_TOPICS);
    let top: Vec<_> = topics
        .into_iter()
        .map(|(t, n)| json!({"topic": t, "subscribers": n, "presences": shard.presence_count(&t)}))
        .collect();
    json!({
        "time_ms": crate::clock::unix_nanos() / 1_000_000,
        "cores": cores,
        "totals": {
            "connections": total(|s| s.connections.get()),
            "parked": total(|s| s.parked.get()),
            "channels": total(|s| s.channels.get()),
            "joins": total(|s| s.joins.get()),
            "deliveries": total(|s| s.deliveries.get()),
            "broadcasts": total(|s| s.broadcasts.get()),
        },
        "top_topics": top,
        "cluster": shard.endpoint.cluster().map(|c| {
            let mut v = cluster_json(c.stats());
            v["node"] = c.node().into();
            let nodes = c.stats().nodes.lock().expect("nodes");
            v["nodes"] = nodes.iter().map(|(id, name)| json!({"id": id, "name": name})).collect();
            v
        }),
    })
}

fn cluster_json(c: &ClusterStats) -> serde_json::Value {
    cluster_figures(c)
        .iter()
        .map(|(name, _, _, v)| (name.to_string(), serde_json::Value::from(*v)))
        .collect()
}

fn cluster_prometheus(c: &ClusterStats) -> String {
    let mut out = String::new();
    for (name, kind, help, value) in cluster_figures(c) {
        let metric = if kind == "counter" {
            format!("ringcast_cluster_{name}_total")
        } else {
            format!("ringcast_cluster_{name}")
        };
        out.push_str(&format!(
            "# HELP {metric} {help}\n# TYPE {metric} {kind}\n{metric} {value}\n"
        ));
    }
    out
}

#[derive(serde::Deserialize)]
struct BroadcastBody {
    topic: String,
    event: String,
    payload: serde_json::Value,
}

fn broadcast(shard: &Rc<Shard>, body: &[u8]) -> Response {
    let parsed: BroadcastBody = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                400,
                &format!("body must be {{\"topic\",\"event\",\"payload\"}}: {e}"),
            )
        }
    };
    if !parsed.payload.is_object() {
        return error(400, "payload must be a JSON object");
    }
    if parsed.topic.is_empty() || parsed.event.is_empty() {
        return error(400, "topic and event must not be empty");
    }
    shard.broadcast(&parsed.topic, &parsed.event, Payload::Json(parsed.payload), None);
    Response::json(202, r#"{"ok":true}"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(auth: Option<&str>) -> Request {
        Request {
            method: "GET".into(),
            path: "/api/stats".into(),
            query: String::new(),
            headers: auth
                .map(|a| ("authorization".to_string(), a.to_string()))
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn bearer_keys() {
        assert!(authorized(&req(Some("Bearer k1")), Some("k1")));
        assert!(!authorized(&req(Some("Bearer k2")), Some("k1")));
        assert!(!authorized(&req(Some("k1")), Some("k1")));
        assert!(!authorized(&req(None), Some("k1")));
        assert!(
            !authorized(&req(Some("Bearer k1")), None),
            "no key configured: nobody passes"
        );
    }
}
