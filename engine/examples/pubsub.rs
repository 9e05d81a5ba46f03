//! Rust code that is not a channel, talking to channels: the embedder's half of
//! Phoenix's PubSub, on the seed app plus a `profile:<user>` channel.
//!
//! - A plain thread subscribed to `rooms:lobby` prints every broadcast there
//!   (`thread: ...`), from the phoenix client, the HTTP API or another node.
//! - A tokio task does the same through the subscription's `Stream` (`tokio: ...`).
//! - A thread prints `presence_list("rooms:lobby")` every second (`presence: ...`).
//! - A `profile:<user>` channel subscribes to `updates:<user>` and pushes `user_updated`
//!   when `Endpoint::send_info` delivers a typed `UserUpdated`. A thread listening to
//!   `rooms:admin` sends one for `rename:<name>` messages there, to the sender's profile.
//!
//! - `--stalled TOPIC` adds a subscription that is never read: it lags, and the core
//!   goes on (for measuring what a stalled subscriber costs everyone else).
//!
//! Run: `cargo run --example pubsub -- [--listen 127.0.0.1:4200] [--redis redis://127.0.0.1:6379] [--stalled TOPIC]`
//! (with `--redis`, `RINGCAST_CLUSTER_SECRET` must hold the cluster's secret),
//! with `RINGCAST_SECRET` set or the development secret, then join `rooms:lobby` with a
//! `phoenix` client (token from `ringcast token --user 1`). Output lines are flushed as
//! they happen; the test suite runs it (tests/e2e/pubsub.test.mjs).

use std::io::Write;
use std::time::Duration;

use ringcast::seed::{self, UserSocket};
use ringcast::{Channel, Config, Endpoint, HandleResult, Message, Payload, Server, Socket};
use serde_json::json;

/// What `send_info` hands to a profile channel: a Rust value, never on the wire.
#[derive(Clone, Debug)]
struct UserUpdated {
    name: String,
}

struct Profile;

impl Channel for Profile {
    async fn join(topic: &str, _payload: Payload, socket: &mut Socket) -> Result<(Self, Payload), Payload> {
        let user = topic.trim_start_matches("profile:");
        if socket.try_assigns::<seed::User>().map(|u| u.id.as_str()) != Some(user) {
            return Err(json!({"reason": "unauthorized"}).into());
        }
        socket.subscribe(&format!("updates:{user}"));
        Ok((Profile, Payload::empty()))
    }

    async fn handle_in(&mut self, _event: &str, _payload: Payload, _socket: &mut Socket) -> HandleResult {
        HandleResult::NoReply
    }

    async fn handle_info(&mut self, msg: Box<dyn std::any::Any>, socket: &mut Socket) -> HandleResult {
        if let Some(update) = msg.downcast_ref::<UserUpdated>() {
            socket.push("user_updated", json!({"name": update.name}));
        } else if let Some(m) = msg.downcast_ref::<Message>() {
            // A broadcast on updates:<user> from elsewhere: passed on as it is.
            socket.push(&m.event, m.payload.clone());
        }
        HandleResult::NoReply
    }
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn text(m: &Message) -> String {
    match &m.payload {
        Payload::Json(v) => format!("{} {} {v}", m.topic, m.event),
        Payload::Binary(b) => format!("{} {} <{} bytes>", m.topic, m.event, b.len()),
    }
}

/// The plain-thread listeners: the lobby printer, the presence printer, the admin.
fn spawn_threads(endpoint: &Endpoint) {
    let lobby = endpoint.subscribe("rooms:lobby");
    std::thread::spawn(move || {
        for m in lobby {
            match m {
                Ok(m) => say(format!("thread: {}", text(&m))),
                Err(lagged) => say(format!("thread: {lagged}")),
            }
        }
    });
    let e = endpoint.clone();
    std::thread::spawn(move || loop {
        say(format!("presence: {}", e.presence_list("rooms:lobby")));
        std::thread::sleep(Duration::from_secs(1));
    });
    let admin = endpoint.subscribe("rooms:admin");
    let e = endpoint.clone();
    std::thread::spawn(move || {
        for m in admin.flatten() {
            let Payload::Json(v) = &m.payload else { continue };
            let (Some(body), Some(user)) = (v["body"].as_str(), v["user"].as_str()) else {
                continue;
            };
            if let Some(name) = body.strip_prefix("rename:") {
                e.send_info(&format!("updates:{user}"), UserUpdated { name: name.into() });
                say(format!("admin: sent UserUpdated({name}) to updates:{user}"));
            }
        }
    });
}

fn main() -> anyhow::Result<()> {
    let mut listen = "127.0.0.1:4200".to_string();
    let mut redis = None;
    let mut stalled = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().expect("--listen ADDR"),
            "--redis" => redis = Some(args.next().expect("--redis URL")),
            "--stalled" => stalled = Some(args.next().expect("--stalled TOPIC")),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let secret = std::env::var("RINGCAST_SECRET").unwrap_or_else(|_| seed::DEV_SECRET.into());
    let config = Config {
        listen: listen.parse()?,
        cores: 2,
        cluster: redis.map(|redis_url| {
            ringcast::cluster::ClusterConfig::new(
                redis_url,
                format!("pubsub-example-{}", std::process::id()),
                std::env::var("RINGCAST_CLUSTER_SECRET").expect("--redis needs RINGCAST_CLUSTER_SECRET"),
            )
        }),
        ..Config::default()
    };
    let router = seed::router().channel::<Profile>("profile:*");
    let running = Server::bind(config, UserSocket::new(&secret), router)?.start()?;
    let endpoint = running.endpoint();
    spawn_threads(&endpoint);
    // Held, never read.
    let _stalled = stalled.map(|topic| endpoint.subscribe(&topic));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let lobby = endpoint.subscribe("rooms:lobby");
    runtime.spawn(async move {
        let mut lobby = lobby;
        while let Some(m) = lobby.recv().await {
            match m {
                Ok(m) => say(format!("tokio: {}", text(&m))),
                Err(lagged) => say(format!("tokio: {lagged}")),
            }
        }
    });
    eprintln!("pubsub example listening on {}", running.local_addr());
    running.join();
    Ok(())
}
