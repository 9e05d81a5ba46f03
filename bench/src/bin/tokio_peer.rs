//! `ringcast-tokio-peer`: the seed app's `bench:*` channel as a Rust user would build it
//! with tokio and tokio-tungstenite, to compare ringcast against.
//!
//! A multi-threaded runtime with one worker per core, one task per connection, one
//! `tokio::sync::broadcast` channel per topic carrying the broadcast text encoded once
//! (`Utf8Bytes`, so every subscriber shares the same bytes), serde_json for messages.
//! The connection task selects over its WebSocket stream and its topic subscriptions;
//! frames that are ready together are fed to the sink and flushed once.
//!
//! Handled: the upgrade (any path, the token's user id is read but not verified),
//! `phx_join` on `bench:*` (ok `{}`), `heartbeat` (ok `{}`), `new_msg` (broadcast
//! `{"body","user"}` to every member, sender included, no reply). Anything else on an
//! unjoined topic gets the "unmatched topic" error, like the seed app.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use clap::Parser;
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamMap;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Messages a slow subscriber may fall behind before it skips ahead.
const CHANNEL_CAPACITY: usize = 1024;

#[derive(Parser)]
#[command(
    name = "ringcast-tokio-peer",
    about = "tokio + tokio-tungstenite peer of the seed app's bench:* channel"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:4602")]
    listen: SocketAddr,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 1)]
    cores: usize,
}

#[derive(Default)]
struct Topics {
    senders: Mutex<HashMap<String, broadcast::Sender<Utf8Bytes>>>,
}

impl Topics {
    fn sender(&self, topic: &str) -> broadcast::Sender<Utf8Bytes> {
        let mut map = self.senders.lock().expect("topics lock");
        map.entry(topic.to_string())
            .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0)
            .clone()
    }
}

type Incoming = (Option<String>, Option<String>, String, String, Value);

fn reply(m: &Incoming, status: &str, response: Value) -> Message {
    let text = serde_json::to_string(&(
        &m.0,
        &m.1,
        &m.2,
        "phx_reply",
        json!({"status": status, "response": response}),
    ))
    .expect("JSON encodes");
    Message::text(text)
}

async fn connection(stream: TcpStream, topics: Arc<Topics>) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let mut user = String::from("anonymous");
    #[allow(clippy::result_large_err)] // the callback's signature is tungstenite's
    let ws = tokio_tungstenite::accept_hdr_async(stream, |req: &Request, resp: Response| {
        user = ringcast_bench::user_from_query(req.uri().query().unwrap_or(""));
        Ok(resp)
    })
    .await?;
    let (mut sink, mut source) = ws.split();
    let mut subscriptions: StreamMap<String, BroadcastStream<Utf8Bytes>> = StreamMap::new();
    let mut joined: HashMap<String, broadcast::Sender<Utf8Bytes>> = HashMap::new();
    loop {
        tokio::select! {
            incoming = source.next() => {
                let text = match incoming {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    // Pings are answered by tungstenite itself on the next write or flush.
                    Some(Ok(_)) => continue,
                };
                let Ok(msg) = serde_json::from_str::<Incoming>(&text) else {
                    break;
                };
                match (msg.2.as_str(), msg.3.as_str()) {
                    ("phoenix", "heartbeat") => sink.send(reply(&msg, "ok", json!({}))).await?,
                    (topic, "phx_join") if topic.starts_with("bench:") => {
                        if !joined.contains_key(topic) {
                            let tx = topics.sender(topic);
                            subscriptions.insert(topic.to_string(), BroadcastStream::new(tx.subscribe()));
                            joined.insert(topic.to_string(), tx);
                        }
                        sink.send(reply(&msg, "ok", json!({}))).await?;
                    }
                    (topic, "new_msg") if joined.contains_key(topic) => {
                        if let Some(body) = msg.4.get("body").and_then(Value::as_str) {
                            let frame = serde_json::to_string(&(
                                (),
                                (),
                                topic,
                                "new_msg",
                                json!({"body": body, "user": user}),
                            ))?;
                            // Encoded once; every subscriber's task clones the same bytes.
                            let _ = joined[topic].send(Utf8Bytes::from(frame));
                        } else {
                            sink.send(reply(&msg, "error", json!({"reason": "invalid"}))).await?;
                        }
                    }
                    _ => sink.send(reply(&msg, "error", json!({"reason": "unmatched topic"}))).await?,
                }
            }
            Some((_, item)) = subscriptions.next(), if !subscriptions.is_empty() => {
                if let Ok(frame) = item {
                    sink.feed(Message::Text(frame)).await?;
                }
                // Whatever else is already waiting goes out in the same flush.
                while let Some(Some((_, item))) = subscriptions.next().now_or_never() {
                    if let Ok(frame) = item {
                        sink.feed(Message::Text(frame)).await?;
                    }
                }
                sink.flush().await?;
            }
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.cores.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(args.listen).await?;
        eprintln!(
            "ringcast-tokio-peer listening on {} with {} worker(s)",
            args.listen, args.cores
        );
        let topics = Arc::new(Topics::default());
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of fds and the like: wait a little instead of spinning.
                    eprintln!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            tokio::spawn(connection(stream, topics.clone()));
        }
    })
}
