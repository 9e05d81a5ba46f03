//! The link's subscriber connection. It speaks RESP3, where everything Redis sends on a
//! subscribed connection is a push: a (un)subscription's confirmations, one per
//! channel, and the messages. A change of subscriptions is answered once Redis has
//! confirmed every channel of it; messages that arrive meanwhile wait in order.

use std::collections::VecDeque;
use std::time::Duration;

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

pub(crate) struct Subscriber {
    conn: redis::Connection,
    queued: VecDeque<Message>,
    /// How long a change may wait for its confirmations, and a poll for a message.
    command_timeout: Duration,
    poll: Duration,
}

impl Subscriber {
    /// `conn` must speak RESP3.
    pub(crate) fn new(
        conn: redis::Connection,
        command_timeout: Duration,
        poll: Duration,
    ) -> redis::RedisResult<Self> {
        conn.set_read_timeout(Some(poll))?;
        conn.set_write_timeout(Some(command_timeout))?;
        Ok(Subscriber {
            conn,
            queued: VecDeque::new(),
            command_timeout,
            poll,
        })
    }

    /// Sends one `verb` command per group of channels, all in one write, and returns
    /// once Redis has confirmed every channel of every group.
    pub(crate) fn change<G, S>(&mut self, verb: Verb, groups: &[G]) -> redis::RedisResult<()>
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
            return Ok(());
        }
        self.conn.send_packed_command(&packed)?;
        self.conn.set_read_timeout(Some(self.command_timeout))?;
        let result = self.confirmations(verb.confirmation(), channels);
        self.conn.set_read_timeout(Some(self.poll))?;
        result
    }

    fn confirmations(&mut self, kind: PushKind, mut missing: usize) -> redis::RedisResult<()> {
        while missing > 0 {
            match self.conn.recv_response()? {
                Value::Push { kind: k, .. } if k == kind => missing -= 1,
                Value::Push { kind, data } => self.queue(kind, data),
                Value::ServerError(e) => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }

    fn queue(&mut self, kind: PushKind, data: Vec<Value>) {
        if let Some(m) = message(kind, data) {
            self.queued.push_back(m);
        }
    }

    /// The next message, if one comes within the poll timeout.
    pub(crate) fn next(&mut self) -> redis::RedisResult<Option<Message>> {
        loop {
            if let Some(m) = self.queued.pop_front() {
                return Ok(Some(m));
            }
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
                Ok(Value::Push { kind, data }) => self.queue(kind, data),
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
