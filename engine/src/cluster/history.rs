//! History in Redis, for cluster mode: every node sequences a topic's broadcasts
//! through one Lua script, so that the offset is assigned, the broadcast kept and
//! published in one atomic step, and every node (the sender's included) gets them in
//! Redis's one order. A join fetches its replay through another script.
//!
//! Per topic: a hash `ringcast:hm:{<topic>}` (`epoch`, `last` offset; it lives for
//! [`META_TTL_FACTOR`] ttls after its last use, and its loss means a new epoch), and a
//! stream `ringcast:hs:{<topic>}` of the last `size` broadcasts (entry id `<offset>-0`,
//! fields `at`, Redis's clock in ms, and `e`, the published envelope), which expires a
//! ttl after the last broadcast.

use std::sync::Arc;

use super::envelope::{sequenced_parts, Envelope, Signer};
use crate::proto::position::Position;
use crate::shard::history::{Answer, History, Publish, Replay};
use crate::shard::Broadcast;

/// How many ttls a topic's epoch and last offset outlive its last use.
pub const META_TTL_FACTOR: u64 = 4;

const PUBLISH_LUA: &str = r#"
if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1]) == 1 then redis.call('DEL', KEYS[2]) end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local off = redis.call('HINCRBY', KEYS[1], 'last', 1)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local env = ARGV[5] .. epoch .. ':' .. off .. ARGV[6]
if tonumber(ARGV[2]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], off .. '-0', 'at', now, 'e', env)
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call(ARGV[8], ARGV[4], env)
return off
"#;

const FETCH_LUA: &str = r#"
if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1]) == 1 then redis.call('DEL', KEYS[2]) end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local last = tonumber(redis.call('HGET', KEYS[1], 'last') or '0')
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if ARGV[2] == '' then return {epoch, last, 0} end
local since = tonumber(ARGV[3])
if ARGV[2] ~= epoch or since > last then return {epoch, last, 2} end
if since == last then return {epoch, last, 1} end
local entries = redis.call('XRANGE', KEYS[2], (since + 1) .. '-0', '+')
if #entries == 0 then return {epoch, last, 2} end
local first = tonumber(string.match(entries[1][1], '^(%d+)-'))
if first ~= since + 1 then return {epoch, last, 2} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now - tonumber(entries[1][2][2]) >= tonumber(ARGV[4]) then return {epoch, last, 2} end
local out = {epoch, last, 1}
for _, e in ipairs(entries) do out[#out + 1] = e[2][4] end
return out
"#;

/// The scripts, sent by their SHA1 (`EVALSHA`); Redis is sent the source only when it
/// does not know a script yet (after a restart or `SCRIPT FLUSH`).
static PUBLISH: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(PUBLISH_LUA));
static FETCH: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| redis::Script::new(FETCH_LUA));

fn meta_key(topic: &str) -> String {
    format!("ringcast:hm:{{{topic}}}")
}

fn stream_key(topic: &str) -> String {
    format!("ringcast:hs:{{{topic}}}")
}

fn ms(d: std::time::Duration) -> u64 {
    (d.as_millis().min(u64::MAX as u128) as u64).max(1)
}

/// The command that sequences, keeps and publishes `p` on `channel` (`EVALSHA` of the
/// script [`load`] made known; for a pipeline); `fresh_epoch` becomes the topic's epoch
/// if it has none. `sharded`: on a Redis Cluster, with `SPUBLISH` (the channel is in the
/// keys' slot).
pub(crate) fn publish_cmd(
    sharded: bool,
    signer: &Signer,
    node: u32,
    channel: &str,
    p: &Publish,
    history: History,
    fresh_epoch: u64,
) -> redis::Cmd {
    let from = p.from.map(|(core, id)| (core as u32, id.key, id.gen));
    let (prefix, suffix) = sequenced_parts(node, from, &p.event, &p.payload);
    let suffix = signer.seal_sequenced(channel, &prefix, suffix);
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(PUBLISH.get_hash())
        .arg(2)
        .arg(meta_key(&p.topic))
        .arg(stream_key(&p.topic))
        .arg(format!("{fresh_epoch:x}"))
        .arg(history.size)
        .arg(ms(history.ttl))
        .arg(channel)
        .arg(prefix)
        .arg(suffix)
        .arg(ms(history.ttl).saturating_mul(META_TTL_FACTOR))
        .arg(if sharded { "SPUBLISH" } else { "PUBLISH" });
    cmd
}

/// Makes the publish script known to the Redis behind `conn` (each session does, on
/// each master: a pipelined `EVALSHA` cannot fall back to `EVAL`).
pub(crate) fn load(conn: &mut redis::Connection) -> redis::RedisResult<()> {
    redis::cmd("SCRIPT").arg("LOAD").arg(PUBLISH_LUA).exec(conn)
}

/// The topic's position and, for `since`, the broadcasts after it if Redis still
/// keeps every one of them.
pub(crate) fn fetch(
    conn: &mut redis::Connection,
    signer: &Signer,
    topic: &str,
    since: Option<Position>,
    history: History,
    fresh_epoch: u64,
) -> redis::RedisResult<Answer> {
    let (since_epoch, since_offset) = match since {
        Some(p) => (format!("{:x}", p.epoch), p.offset),
        None => (String::new(), 0),
    };
    let reply: Vec<redis::Value> = FETCH
        .key(meta_key(topic))
        .key(stream_key(topic))
        .arg(format!("{fresh_epoch:x}"))
        .arg(since_epoch)
        .arg(since_offset)
        .arg(ms(history.ttl))
        .arg(ms(history.ttl).saturating_mul(META_TTL_FACTOR))
        .invoke(conn)?;
    let broken = || redis::RedisError::from((redis::ErrorKind::Parse, "history fetch reply"));
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => Some(b.clone()),
        redis::Value::SimpleString(s) => Some(s.clone().into_bytes()),
        _ => None,
    };
    let int = |v: &redis::Value| match v {
        redis::Value::Int(n) => Some(*n),
        _ => None,
    };
    let (epoch, last, status) = match &reply[..] {
        [e, l, s, ..] => (text(e), int(l), int(s)),
        _ => return Err(broken()),
    };
    let epoch = epoch
        .and_then(|e| u64::from_str_radix(std::str::from_utf8(&e).ok()?, 16).ok())
        .ok_or_else(broken)?;
    let position = Position {
        epoch,
        offset: last.ok_or_else(broken)?.max(0) as u64,
    };
    let replay = match status.ok_or_else(broken)? {
        0 => Replay::NotAsked,
        1 => {
            let mut list = Vec::with_capacity(reply.len() - 3);
            for v in &reply[3..] {
                let bytes = text(v).ok_or_else(broken)?;
                // Kept entries are the messages as published: signed for the channel.
                let Ok(signed) = signer.open(&super::topic_channel(topic), &bytes) else {
                    continue;
                };
                if let Ok(b) = decode(topic, signed, None) {
                    list.push(Arc::new(b));
                }
            }
            Replay::Recovered(list)
        }
        _ => Replay::Lost,
    };
    Ok(Answer { position, replay })
}

/// A sequenced envelope's bytes as a broadcast on `topic` (see [`broadcast`]).
pub(crate) fn decode(topic: &str, data: &[u8], own: Option<u32>) -> Result<Broadcast, String> {
    broadcast(topic, Envelope::decode(data)?, own)
}

/// A sequenced envelope as a broadcast on `topic`, encoded once for this node;
/// `own` is this node's id, for the `broadcast_from` exclusion of its own connections.
pub(crate) fn broadcast(topic: &str, envelope: Envelope, own: Option<u32>) -> Result<Broadcast, String> {
    match envelope {
        Envelope::Sequenced {
            node,
            position,
            from,
            event,
            payload,
        } => {
            let from = from
                .filter(|_| Some(node) == own)
                .map(|(core, key, gen)| (core as usize, crate::shard::conn::ConnId { key, gen }));
            Ok(Broadcast::at(topic, &event, payload, from, position))
        }
        _ => Err("not a sequenced broadcast".into()),
    }
}
