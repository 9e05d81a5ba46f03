//! The link's subscriber connections. Each is read by a thread of its own, which hands
//! the messages to the link thread through a bounded channel: the link thread then
//! waits on its command queue and on the messages at once, and never sleeps in a socket
//! read while a broadcast waits to go out. (It did: a read timeout counts in jiffies,
//! so the 1 ms poll the link slept in was 4 to 8 ms with `CONFIG_HZ=250`; see
//! results/cluster-link-2026-12-02.)
//!
//! The connection speaks RESP3, where everything Redis sends on a subscribed
//! connection is a push: a (un)subscription's confirmations, one per channel, and the
//! messages. The link asks the reader for a change of subscriptions; the reader writes
//! it, forwards the messages that arrive meanwhile in order, and answers once Redis has
//! confirmed every channel.
//!
//! The reader sleeps in a long read ([`Subscriber::spawn`]'s `poll`), so a change
//! would wait for it: each subscriber connection also listens to a wake channel of its
//! own (`ringcast:w:...`, never forwarded), and whoever asks for a change publishes an
//! empty message there ([`Subscriber::wake_channel`]), which ends the read at once.
//! (A short poll instead woke every node's readers 250 times a second, a tenth of the
//! box in an idle 53-node cluster.)

use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use redis::{PushKind, Value};

/// What a subscription change is: the command, and the push that confirms each channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verb {
    Subscribe,
    Unsubscribe,
    PSubscribe,
    /// Sharded pub/sub (Redis Cluster): every channel of one command in one slot.
    SSubscribe,
    SUnsubscribe,
}

impl Verb {
    fn command(self) -> &'static str {
        match self {
            Verb::Subscribe => "SUBSCRIBE",
            Verb::Unsubscribe => "UNSUBSCRIBE",
            Verb::PSubscribe => "PSUBSCRIBE",
            Verb::SSubscribe => "SSUBSCRIBE",
            Verb::SUnsubscribe => "SUNSUBSCRIBE",
        }
    }

    fn confirmation(self) -> PushKind {
        match self {
            Verb::Subscribe => PushKind::Subscribe,
            Verb::Unsubscribe => PushKind::Unsubscribe,
            Verb::PSubscribe => PushKind::PSubscribe,
            Verb::SSubscribe => PushKind::SSubscribe,
            Verb::SUnsubscribe => PushKind::SUnsubscribe,
        }
    }
}

/// A message from a channel: its name and payload.
pub(crate) type Message = (String, Vec<u8>);

/// What a reader hands the link: a message, or why its connection ended.
pub(crate) type Incoming = redis::RedisResult<Message>;

/// Messages the readers of one session hold for the link at most; a full channel makes
/// a reader wait, and Redis buffers for it (`client-output-buffer-limit pubsub`).
pub(crate) const MESSAGES_BOUND: usize = 16_384;

/// A change of subscriptions for a reader to make.
struct Change {
    packed: Vec<u8>,
    kind: PushKind,
    channels: usize,
    done: Sender<redis::RedisResult<()>>,
}

/// The link's side of one subscriber connection; dropping it ends its reader.
pub(crate) struct Subscriber {
    requests: Sender<Change>,
    wake: String,
}

/// A wake channel's name, unique to one subscriber connection of one process.
fn wake_channel() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("ringcast:w:{}:{nanos}:{n}", std::process::id())
}

impl Subscriber {
    /// Starts the reader of `conn` (which must speak RESP3), handing its messages to
    /// `messages`, once the connection listens to its wake channel. `poll` is how long
    /// a read waits before the reader looks for a change to make unwoken;
    /// `command_timeout`, how long a change may wait for its confirmations.
    pub(crate) fn spawn(
        conn: redis::Connection,
        command_timeout: Duration,
        poll: Duration,
        messages: Sender<Incoming>,
    ) -> redis::RedisResult<Self> {
        conn.set_write_timeout(Some(command_timeout))?;
        let (requests, changes) = crossbeam_channel::bounded(16);
        let wake = wake_channel();
        let mut reader = Reader {
            conn,
            changes,
            messages,
            command_timeout,
            poll,
            wake: wake.clone(),
        };
        let packed = redis::cmd("SUBSCRIBE").arg(&wake).get_packed_command();
        reader.change(&packed, PushKind::Subscribe, 1)?;
        std::thread::Builder::new()
            .name("ringcast-rsub".into())
            .spawn(move || reader.run())
            .map_err(redis::RedisError::from)?;
        Ok(Subscriber { requests, wake })
    }

    /// The channel to publish an empty message to after a [`request`](Self::request),
    /// so that the reader makes it now rather than after its poll.
    pub(crate) fn wake_channel(&self) -> &str {
        &self.wake
    }

    /// Asks the reader for one `verb` command per group of channels, all in one write.
    /// Returns where its outcome will come (once Redis confirmed every channel of every
    /// group), or `None` when there is nothing to change.
    pub(crate) fn request<G, S>(
        &self,
        verb: Verb,
        groups: &[G],
    ) -> redis::RedisResult<Option<Receiver<redis::RedisResult<()>>>>
    where
        G: AsRef<[S]>,
        S: AsRef<str>,
    {
        let mut packed = Vec::new();
        let mut channels = 0;
        for group in groups {
            let group = group.as_ref();
            if group.is_empty() {
                continue;
            }
            let mut cmd = redis::cmd(verb.command());
            for c in group {
                cmd.arg(c.as_ref());
            }
            cmd.write_packed_command(&mut packed);
            channels += group.len();
        }
        if channels == 0 {
            return Ok(None);
        }
        let (done, outcome) = crossbeam_channel::bounded(1);
        let change = Change {
            packed,
            kind: verb.confirmation(),
            channels,
            done,
        };
        self.requests.send(change).map_err(|_| closed())?;
        Ok(Some(outcome))
    }
}

/// The error of a subscriber connection whose reader is gone (it ended with an error,
/// which the link hears of too).
pub(crate) fn closed() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "the Redis subscriber connection is closed",
    ))
}

struct Reader {
    conn: redis::Connection,
    changes: Receiver<Change>,
    messages: Sender<Incoming>,
    command_timeout: Duration,
    poll: Duration,
    /// This connection's wake channel, whose messages only end a read.
    wake: String,
}

impl Reader {
    fn run(mut self) {
        loop {
            match self.changes.try_recv() {
                Ok(change) => {
                    let outcome = self.change(&change.packed, change.kind, change.channels);
                    let failed = outcome.is_err();
                    let _ = change.done.send(outcome);
                    if failed {
                        return;
                    }
                }
                // The session ended.
                Err(TryRecvError::Disconnected) => return,
                Err(TryRecvError::Empty) => {}
            }
            match self.next() {
                Ok(Some(m)) => {
                    if self.messages.send(Ok(m)).is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = self.messages.send(Err(e));
                    return;
                }
            }
        }
    }

    /// Writes `change` and returns once Redis has confirmed every channel of it; the
    /// messages that arrive meanwhile go to the link in order.
    fn change(&mut self, packed: &[u8], confirmation: PushKind, channels: usize) -> redis::RedisResult<()> {
        self.conn.send_packed_command(packed)?;
        self.conn.set_read_timeout(Some(self.command_timeout))?;
        let mut missing = channels;
        while missing > 0 {
            match self.conn.recv_response()? {
                Value::Push { kind, .. } if kind == confirmation => missing -= 1,
                Value::Push { kind, data } => {
                    if let Some(m) = message(kind, data).filter(|(c, _)| *c != self.wake) {
                        self.messages.send(Ok(m)).map_err(|_| closed())?;
                    }
                }
                Value::ServerError(e) => return Err(e.into()),
                _ => {}
            }
        }
        self.conn.set_read_timeout(Some(self.poll))?;
        Ok(())
    }

    /// The next message, if one comes within the poll timeout (a wake ends the wait
    /// with none).
    fn next(&mut self) -> redis::RedisResult<Option<Message>> {
        loop {
            match self.conn.recv_response() {
                // Redis Cluster moved a slot away (a failover, a resharding): the
                // session ends, and the next one asks where the slots are.
                Ok(Value::Push {
                    kind: PushKind::SUnsubscribe,
                    data,
                }) => {
                    let channel = match data.first() {
                        Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                        _ => String::new(),
                    };
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::ClusterConnectionNotFound,
                        "Redis Cluster unsubscribed a channel (its slot moved)",
                        channel,
                    )));
                }
                Ok(Value::Push { kind, data }) => match message(kind, data) {
                    Some((c, _)) if c == self.wake => return Ok(None),
                    Some(m) => return Ok(Some(m)),
                    None => {}
                },
                Ok(Value::ServerError(e)) => return Err(e.into()),
                Ok(_) => {}
                Err(e) if e.is_timeout() => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }
}

/// A push that carries a message: its channel and payload (a pattern message names its
/// pattern first).
fn message(kind: PushKind, data: Vec<Value>) -> Option<Message> {
    let mut data = data.into_iter();
    match kind {
        PushKind::Message | PushKind::SMessage => {}
        PushKind::PMessage => {
            data.next()?;
        }
        _ => return None,
    }
    let channel = match data.next()? {
        Value::BulkString(b) => String::from_utf8(b).ok()?,
        Value::SimpleString(s) => s,
        _ => return None,
    };
    let payload = match data.next()? {
        Value::BulkString(b) => b,
        _ => return None,
    };
    Some((channel, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn messages_are_told_from_confirmations() {
        assert_eq!(
            message(PushKind::Message, vec![bulk("ringcast:t:a"), bulk("x")]),
            Some(("ringcast:t:a".into(), b"x".to_vec()))
        );
        assert_eq!(
            message(
                PushKind::PMessage,
                vec![bulk("ringcast:d:*"), bulk("ringcast:d:u"), bulk("y")]
            ),
            Some(("ringcast:d:u".into(), b"y".to_vec()))
        );
        assert_eq!(
            message(PushKind::SMessage, vec![bulk("c"), bulk("z")]),
            Some(("c".into(), b"z".to_vec()))
        );
        assert_eq!(message(PushKind::Subscribe, vec![bulk("c"), Value::Int(1)]), None);
        assert_eq!(message(PushKind::Message, vec![bulk("c")]), None);
    }
}
