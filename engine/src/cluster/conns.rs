//! The link's connections to Redis for one session: one server, or every master of a
//! Redis Cluster. Per server (a *shard*), a connection for commands and a subscriber
//! connection ([`Subscriber`], read by a thread of its own), and the publishes queued
//! for its next pipeline. Every shard's reader hands its messages to one channel.
//!
//! On a Redis Cluster, a topic's channels and history keys carry the topic as their
//! hash tag (`ringcast:t:{<topic>}`), so they live in one slot, on one master:
//! broadcasts go out with `SPUBLISH` and are received with `SSUBSCRIBE` (sharded
//! pub/sub, Redis ≥ 7), and the topics spread over the masters. Only the rare
//! `disconnect` broadcasts use classic `PUBLISH`, which the cluster bus carries to
//! every node. A moved slot, a failed master or any error ends the session; the next
//! one asks the cluster for its masters again.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, Sender};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo};

use super::subscriber::{self, Incoming, Message, Subscriber, Verb};
use crate::shard::cluster::RedisAddr;
use crate::shard::history::Publish;

/// How many slots a Redis Cluster has.
const SLOTS: usize = 16384;

/// The slot of `key` in a Redis Cluster: CRC16 of its hash tag (what is between the
/// first `{` and the next `}`, when that is not empty) or of the whole key.
pub(crate) fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &bytes[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(bytes)) % SLOTS as u16
}

/// Where the link's Redis is, and how to reach it.
pub(crate) struct Endpoints {
    /// The server, or any nodes of the cluster (each is asked for the masters until
    /// one answers).
    seeds: Vec<ConnectionInfo>,
    cluster: bool,
    /// The CA a `rediss://` server's certificate must chain to (PEM), if not the
    /// system's roots.
    ca: Option<Vec<u8>>,
}

/// Publishes queued for one pipelined round trip to one shard.
#[derive(Default)]
pub(crate) struct Batch {
    pipe: redis::Pipeline,
    pub(crate) len: usize,
    /// The broadcasts on topics with history in the batch (their scripts): if it fails,
    /// this node still delivers them, unsequenced.
    sequenced: Vec<Publish>,
}

/// A batch that failed: how many it lost, and its broadcasts on topics with history.
pub(crate) struct Failed {
    pub(crate) lost: u64,
    pub(crate) sequenced: Vec<Publish>,
    pub(crate) error: redis::RedisError,
}

pub(crate) struct Shard {
    /// `host:port`, for the log.
    pub(crate) name: String,
    pub(crate) commands: redis::Connection,
    pub(crate) sub: Subscriber,
    batch: Batch,
}

pub(crate) struct Conns {
    pub(crate) shards: Vec<Shard>,
    /// Slot -> shard, on a Redis Cluster; `None` with one server.
    slots: Option<Box<[u16]>>,
    /// What the shards' readers received, in order per shard.
    messages: Receiver<Incoming>,
    /// Messages taken from `messages` while a change of subscriptions waited for its
    /// confirmation: they come first.
    pending: VecDeque<Message>,
    /// How long a change may wait for its confirmations.
    timeout: Duration,
}

impl Endpoints {
    pub(crate) fn new(addr: &RedisAddr, ca: Option<Vec<u8>>) -> redis::RedisResult<Self> {
        let (urls, cluster) = match addr {
            RedisAddr::Server(url) => (std::slice::from_ref(url), false),
            RedisAddr::Cluster(urls) => (urls.as_slice(), true),
        };
        let seeds = urls
            .iter()
            .map(|u| u.as_str().into_connection_info())
            .collect::<redis::RedisResult<_>>()?;
        Ok(Endpoints { seeds, cluster, ca })
    }

    fn client(&self, info: ConnectionInfo, resp3: bool) -> redis::RedisResult<redis::Client> {
        // Without TCP_NODELAY (redis-rs leaves Nagle on), a pipeline's last segment can
        // wait for the ACK of the one before.
        let tcp = info.tcp_settings().clone().set_nodelay(true);
        let info = info.set_tcp_settings(tcp);
        let info = if resp3 {
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3);
            info.set_redis_settings(settings)
        } else {
            info
        };
        match &self.ca {
            None => redis::Client::open(info),
            Some(ca) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            ),
        }
    }

    fn shard(
        &self,
        info: ConnectionInfo,
        timeout: Duration,
        poll: Duration,
        messages: &Sender<Incoming>,
    ) -> redis::RedisResult<Shard> {
        let name = match info.addr() {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                format!("{host}:{port}")
            }
            other => format!("{other:?}"),
        };
        let commands = self
            .client(info.clone(), false)?
            .get_connection_with_timeout(timeout)?;
        commands.set_read_timeout(Some(timeout))?;
        commands.set_write_timeout(Some(timeout))?;
        let sub = self.client(info, true)?.get_connection_with_timeout(timeout)?;
        Ok(Shard {
            name,
            commands,
            sub: Subscriber::spawn(sub, timeout, poll, messages.clone())?,
            batch: Batch::default(),
        })
    }

    /// Connects: to the server, or to every master of the cluster as one of its nodes
    /// describes it. `poll` is how long a subscriber's read waits before its reader
    /// looks for a change to make.
    pub(crate) fn connect(&self, timeout: Duration, poll: Duration) -> redis::RedisResult<Conns> {
        let (tx, messages) = crossbeam_channel::bounded(subscriber::MESSAGES_BOUND);
        let conns = |shards, slots| Conns {
            shards,
            slots,
            messages,
            pending: VecDeque::new(),
            timeout,
        };
        match (self.cluster, self.seeds.first()) {
            (false, Some(info)) => Ok(conns(vec![self.shard(info.clone(), timeout, poll, &tx)?], None)),
            _ => {
                let mut last = None;
                for seed in &self.seeds {
                    match self.masters(seed, timeout) {
                        Ok((masters, slots)) => {
                            let shards = masters
                                .into_iter()
                                .map(|m| self.shard(m, timeout, poll, &tx))
                                .collect::<redis::RedisResult<_>>()?;
                            return Ok(conns(shards, Some(slots)));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "no Redis Cluster node given",
                    ))
                }))
            }
        }
    }

    /// The masters `seed` knows of (`CLUSTER SLOTS`), and which of them serves each slot.
    fn masters(
        &self,
        seed: &ConnectionInfo,
        timeout: Duration,
    ) -> redis::RedisResult<(Vec<ConnectionInfo>, Box<[u16]>)> {
        let mut conn = self
            .client(seed.clone(), false)?
            .get_connection_with_timeout(timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut conn)?;
        let broken = |why: &'static str| {
            redis::RedisError::from((redis::ErrorKind::Parse, "CLUSTER SLOTS", why.to_string()))
        };
        let mut masters: Vec<(String, u16)> = Vec::new();
        let mut slots = vec![u16::MAX; SLOTS].into_boxed_slice();
        for range in ranges {
            let redis::Value::Array(parts) = range else {
                return Err(broken("a range is not an array"));
            };
            let (
                Some(redis::Value::Int(start)),
                Some(redis::Value::Int(end)),
                Some(redis::Value::Array(master)),
            ) = (parts.first(), parts.get(1), parts.get(2))
            else {
                return Err(broken("a range is not [start, end, master, ...]"));
            };
            let host = match master.first() {
                Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                _ => return Err(broken("a master has no host")),
            };
            let Some(redis::Value::Int(port)) = master.get(1) else {
                return Err(broken("a master has no port"));
            };
            // An empty host means "the node you asked".
            let host = if host.is_empty() { host_of(seed) } else { host };
            let at = (host, *port as u16);
            let index = match masters.iter().position(|m| *m == at) {
                Some(i) => i,
                None => {
                    masters.push(at);
                    masters.len() - 1
                }
            };
            for s in (*start as usize)..=(*end as usize).min(SLOTS - 1) {
                slots[s] = index as u16;
            }
        }
        if slots.contains(&u16::MAX) {
            return Err(redis::RedisError::from((
                redis::ErrorKind::ClusterConnectionNotFound,
                "the Redis Cluster does not cover every slot",
            )));
        }
        let infos = masters
            .into_iter()
            .map(|(host, port)| at(seed, host, port))
            .collect();
        Ok((infos, slots))
    }
}

fn host_of(info: &ConnectionInfo) -> String {
    match info.addr() {
        ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } => host.clone(),
        _ => "127.0.0.1".into(),
    }
}

/// `info` (its user, password and TLS) for the server at `host:port`.
fn at(info: &ConnectionInfo, host: String, port: u16) -> ConnectionInfo {
    let addr = match info.addr() {
        ConnectionAddr::TcpTls {
            insecure, tls_params, ..
        } => ConnectionAddr::TcpTls {
            host,
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host, port),
    };
    info.clone().set_addr(addr)
}

impl Conns {
    /// Whether this is a Redis Cluster (sharded pub/sub).
    pub(crate) fn sharded(&self) -> bool {
        self.slots.is_some()
    }

    /// The shard that serves `key` (a channel or a key).
    pub(crate) fn shard_of(&self, key: &str) -> usize {
        match &self.slots {
            None => 0,
            Some(slots) => slots[slot(key) as usize] as usize,
        }
    }

    /// Queues a publish on `channel` for its shard's next pipeline (`SPUBLISH` on a
    /// cluster). Returns how many that shard has queued.
    pub(crate) fn queue(&mut self, channel: &str, message: Vec<u8>) -> usize {
        let verb = if self.sharded() { "SPUBLISH" } else { "PUBLISH" };
        let shard = self.shard_of(channel);
        self.queue_on(shard, verb, channel, message)
    }

    /// Queues a classic `PUBLISH`, which a cluster carries to every node (for what every
    /// node listens to by pattern).
    pub(crate) fn queue_everywhere(&mut self, channel: &str, message: Vec<u8>) -> usize {
        self.queue_on(0, "PUBLISH", channel, message)
    }

    fn queue_on(&mut self, shard: usize, verb: &str, channel: &str, message: Vec<u8>) -> usize {
        let batch = &mut self.shards[shard].batch;
        batch.pipe.cmd(verb).arg(channel).arg(message).ignore();
        batch.len += 1;
        batch.len
    }

    /// Queues `script` (the history script of a broadcast on a topic with history,
    /// `EVALSHA`) for the next pipeline of `channel`'s shard. Returns how many that
    /// shard has queued.
    pub(crate) fn queue_sequenced(&mut self, channel: &str, script: redis::Cmd, publish: Publish) -> usize {
        let shard = self.shard_of(channel);
        let batch = &mut self.shards[shard].batch;
        batch.pipe.add_command(script).ignore();
        batch.sequenced.push(publish);
        batch.len += 1;
        batch.len
    }

    /// Empties every batch (the session ends): how many publishes were in them, and
    /// their broadcasts on topics with history.
    pub(crate) fn take_unsent(&mut self) -> (u64, Vec<Publish>) {
        let mut lost = 0;
        let mut sequenced = Vec::new();
        for shard in &mut self.shards {
            let batch = std::mem::take(&mut shard.batch);
            lost += batch.len as u64;
            sequenced.extend(batch.sequenced);
        }
        (lost, sequenced)
    }

    /// Sends every shard's batch, one round trip each. `Ok(sent)`, or what the failed
    /// batch lost (the batches not yet sent stay queued: the session that ends takes
    /// them).
    pub(crate) fn flush(&mut self) -> Result<u64, Failed> {
        let mut sent = 0;
        for i in 0..self.shards.len() {
            let shard = &mut self.shards[i];
            if shard.batch.len == 0 {
                continue;
            }
            let n = std::mem::take(&mut shard.batch.len) as u64;
            let r = shard.batch.pipe.exec(&mut shard.commands);
            shard.batch.pipe.clear();
            let sequenced = std::mem::take(&mut shard.batch.sequenced);
            if let Err(error) = r {
                return Err(Failed {
                    lost: n,
                    sequenced,
                    error,
                });
            }
            sent += n;
        }
        Ok(sent)
    }

    /// (Un)subscribes each group of channels (one topic's), every group in one slot:
    /// one command per group on a cluster, all of them in one on a single server. Each
    /// shard's commands go out together; returns once Redis confirmed every channel.
    pub(crate) fn subscribe(&mut self, on: bool, groups: &[[String; 2]]) -> redis::RedisResult<()> {
        if groups.is_empty() {
            return Ok(());
        }
        match self.slots.is_some() {
            false => {
                let channels: Vec<&String> = groups.iter().flatten().collect();
                let verb = if on { Verb::Subscribe } else { Verb::Unsubscribe };
                self.change(0, verb, &[channels])
            }
            true => {
                let verb = if on { Verb::SSubscribe } else { Verb::SUnsubscribe };
                let mut per_shard: Vec<Vec<&[String; 2]>> = vec![Vec::new(); self.shards.len()];
                for g in groups {
                    per_shard[self.shard_of(&g[0])].push(g);
                }
                // Every shard's change goes out first, then the link waits for them all.
                let mut outcomes = Vec::new();
                for (i, groups) in per_shard.iter().enumerate() {
                    if let Some(outcome) = self.shards[i].sub.request(verb, groups)? {
                        self.wake(i)?;
                        outcomes.push(outcome);
                    }
                }
                for outcome in outcomes {
                    self.confirmed(&outcome)?;
                }
                Ok(())
            }
        }
    }

    /// Sends one `verb` command per group of channels to `shard`'s subscriber, and
    /// returns once Redis confirmed every channel of every group.
    pub(crate) fn change<G, S>(&mut self, shard: usize, verb: Verb, groups: &[G]) -> redis::RedisResult<()>
    where
        G: AsRef<[S]>,
        S: AsRef<str>,
    {
        match self.shards[shard].sub.request(verb, groups)? {
            Some(outcome) => {
                self.wake(shard)?;
                self.confirmed(&outcome)
            }
            None => Ok(()),
        }
    }

    /// Ends the wait of `shard`'s reader, so that it makes the change just asked for.
    /// Classic `PUBLISH` reaches the reader on a Redis Cluster too (the cluster bus
    /// carries it everywhere). The commands connection is idle here: batches are
    /// written and answered in `flush`.
    fn wake(&mut self, shard: usize) -> redis::RedisResult<()> {
        let shard = &mut self.shards[shard];
        redis::cmd("PUBLISH")
            .arg(shard.sub.wake_channel())
            .arg("")
            .exec(&mut shard.commands)
    }

    /// Waits for a change's `outcome`, keeping the messages that come meanwhile (a
    /// reader whose channel is full would wait for room, not confirm).
    fn confirmed(&mut self, outcome: &Receiver<redis::RedisResult<()>>) -> redis::RedisResult<()> {
        // The reader makes the change once its read ends (woken, or its poll).
        let deadline = Instant::now() + self.timeout + Duration::from_secs(1);
        loop {
            crossbeam_channel::select! {
                recv(outcome) -> r => return r.unwrap_or_else(|_| Err(subscriber::closed())),
                recv(self.messages) -> m => match m {
                    Ok(Ok(m)) => self.pending.push_back(m),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => return Err(subscriber::closed()),
                },
                default(deadline.saturating_duration_since(Instant::now())) => {
                    return Err(redis::RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "Redis did not confirm a change of subscriptions",
                    )));
                }
            }
        }
    }

    /// The connection for commands to the shard of `key` (history scripts).
    pub(crate) fn commands_for(&mut self, key: &str) -> &mut redis::Connection {
        let shard = self.shard_of(key);
        &mut self.shards[shard].commands
    }

    /// The next message from any shard's subscriber that is already here, or the error
    /// that ended a subscriber connection.
    pub(crate) fn try_message(&mut self) -> redis::RedisResult<Option<Message>> {
        if let Some(m) = self.pending.pop_front() {
            return Ok(Some(m));
        }
        match self.messages.try_recv() {
            Ok(Ok(m)) => Ok(Some(m)),
            Ok(Err(e)) => Err(e),
            Err(crossbeam_channel::TryRecvError::Empty) => Ok(None),
            Err(crossbeam_channel::TryRecvError::Disconnected) => Err(subscriber::closed()),
        }
    }

    /// Sleeps until `commands` or a subscriber has something, or for `timeout`.
    pub(crate) fn wait<T>(&self, commands: &Receiver<T>, timeout: Duration) {
        if !self.pending.is_empty() {
            return;
        }
        let mut select = Select::new();
        select.recv(commands);
        select.recv(&self.messages);
        let _ = select.ready_timeout(timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_redis_cluster_spec() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot("123456789"), 12739);
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("user1000"));
        assert_eq!(slot("ringcast:t:{rooms:1}"), slot("ringcast:hs:{rooms:1}"));
        // An empty tag does not count: the whole key is hashed.
        assert_eq!(
            slot("foo{}{bar}"),
            crc16::State::<crc16::XMODEM>::calculate(b"foo{}{bar}") % 16384
        );
        // Only up to the first `}` after the first `{`.
        assert_eq!(slot("foo{{bar}}zap"), slot("{bar"));
    }
}
