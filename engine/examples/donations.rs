//! A donation-campaign dashboard on ringcast: donors push `donate` to `campaign:<id>`,
//! every viewer sees each donation and the running total, and a reporter thread outside
//! the server broadcasts a summary through the `Endpoint` every few seconds.
//!
//! Run: `cargo run --example donations -- 127.0.0.1:4100`, then connect a `phoenix`
//! client with a token from `ringcast token --user 1` and join `campaign:school`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ringcast::seed::{UserSocket, DEV_SECRET};
use ringcast::{Channel, Config, HandleResult, Payload, Reply, Router, Server, Socket, StopReason};
use serde_json::json;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Cents raised per campaign. Donations are rare next to broadcasts, so one lock shared
/// by the cores is fine here; the fanout path never touches it.
fn totals() -> &'static Mutex<HashMap<String, u64>> {
    static TOTALS: OnceLock<Mutex<HashMap<String, u64>>> = OnceLock::new();
    TOTALS.get_or_init(Default::default)
}

struct Campaign {
    id: String,
    viewer: String,
}

impl Channel for Campaign {
    async fn join(topic: &str, payload: Payload, socket: &mut Socket) -> Result<(Self, Payload), Payload> {
        let id = topic.trim_start_matches("campaign:").to_string();
        if id.is_empty() {
            return Err(json!({"reason": "no campaign"}).into());
        }
        let raised = totals().lock().expect("totals").get(&id).copied().unwrap_or(0);
        let viewer = payload.str_field("name").unwrap_or("anonymous").to_string();
        socket.push("status", json!({"campaign": id, "raised_cents": raised}));
        Ok((Campaign { id, viewer }, json!({"raised_cents": raised}).into()))
    }

    async fn handle_in(&mut self, event: &str, payload: Payload, socket: &mut Socket) -> HandleResult {
        match event {
            "donate" => {
                let Some(cents) = payload
                    .json()
                    .and_then(|p| p["cents"].as_u64())
                    .filter(|c| *c > 0)
                else {
                    return HandleResult::Reply(Reply::error("invalid amount"));
                };
                let total = {
                    let mut totals = totals().lock().expect("totals");
                    let total = totals.entry(self.id.clone()).or_default();
                    *total += cents;
                    *total
                };
                socket.broadcast(
                    "donation",
                    json!({"from": self.viewer, "cents": cents, "raised_cents": total}),
                );
                HandleResult::Reply(Reply::Ok(json!({"raised_cents": total}).into()))
            }
            _ => HandleResult::Reply(Reply::error("unknown event")),
        }
    }

    fn terminate(&mut self, reason: StopReason, _socket: &mut Socket) {
        eprintln!(
            "[donations] {} left campaign {} ({reason:?})",
            self.viewer, self.id
        );
    }
}

fn main() -> std::io::Result<()> {
    let listen = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:4100".into());
    let config = Config {
        listen: listen.parse().expect("an address like 127.0.0.1:4100"),
        ..Config::default()
    };
    let router = Router::new().channel::<Campaign>("campaign:*");
    let server = Server::bind(config, UserSocket::new(DEV_SECRET), router)?;
    let endpoint = server.endpoint();
    eprintln!("donations dashboard on ws://{}/socket", server.local_addr());
    let running = server.start()?;

    // Any thread may broadcast: here a reporter publishes every campaign's total.
    let reporter = Arc::new(endpoint);
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(5));
        let snapshot = totals().lock().expect("totals").clone();
        for (id, cents) in snapshot {
            reporter.broadcast(
                &format!("campaign:{id}"),
                "summary",
                json!({"raised_cents": cents}),
            );
        }
    });
    running.join();
    Ok(())
}
