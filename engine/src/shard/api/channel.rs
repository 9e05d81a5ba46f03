//! The `Channel` trait: Phoenix's channel callbacks, in Rust.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;

use crate::proto::Payload;
use crate::shard::api::socket::Socket;

/// What a channel answers to a client message (Phoenix's `{:reply, {status, payload}, socket}`).
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `{"status":"ok","response":payload}`.
    Ok(Payload),
    /// `{"status":"error","response":payload}`.
    Error(Payload),
}

impl Reply {
    /// Ok with `{}`.
    pub fn ok() -> Self {
        Reply::Ok(Payload::empty())
    }

    /// Error with `{"reason": reason}`.
    ///
    /// ```
    /// use ringcast::{Payload, Reply};
    /// assert_eq!(Reply::error("invalid"), Reply::Error(Payload::from(serde_json::json!({"reason": "invalid"}))));
    /// ```
    pub fn error(reason: &str) -> Self {
        Reply::Error(Payload::Json(serde_json::json!({ "reason": reason })))
    }

    pub(crate) fn parts(&self) -> (&'static str, &Payload) {
        match self {
            Reply::Ok(p) => ("ok", p),
            Reply::Error(p) => ("error", p),
        }
    }
}

/// What a handler tells the channel to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum HandleResult {
    /// Reply to the message (only meaningful from `handle_in`).
    Reply(Reply),
    /// Carry on without replying.
    NoReply,
    /// Stop the channel normally (`phx_close` is sent), after the optional reply.
    Stop(Option<Reply>),
}

/// Why a channel ended; passed to [`Channel::terminate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The client sent `phx_leave`.
    Leave,
    /// The channel stopped itself ([`HandleResult::Stop`]).
    Normal,
    /// The client joined the same topic again; this join is replaced.
    Rejoined,
    /// The connection ended.
    Closed,
}

/// A channel: the state one connection keeps for one joined topic, and its callbacks.
///
/// Handlers run on the core that owns the connection, one message at a time per
/// connection. `join`, `handle_in` and `handle_info` are `async`: while one is waiting on
/// I/O the connection reads nothing more, but broadcasts still reach it. A handler that
/// panics crashes only its channel: the client gets `phx_error` and rejoins.
///
/// ```
/// use ringcast::{Channel, HandleResult, Payload, Reply, Socket};
///
/// struct Echo;
///
/// impl Channel for Echo {
///     async fn join(_topic: &str, _payload: Payload, _socket: &mut Socket) -> Result<(Self, Payload), Payload> {
///         Ok((Echo, Payload::empty()))
///     }
///     async fn handle_in(&mut self, event: &str, payload: Payload, socket: &mut Socket) -> HandleResult {
///         match event {
///             "echo" => HandleResult::Reply(Reply::Ok(payload)),
///             "shout" => { socket.broadcast("shout", payload); HandleResult::NoReply }
///             _ => HandleResult::Reply(Reply::error("unknown event")),
///         }
///     }
/// }
/// ```
#[allow(async_fn_in_trait)]
pub trait Channel: Sized + 'static {
    /// Broadcast events this channel intercepts: instead of the shared fastlane frame,
    /// each subscriber's [`Channel::handle_out`] decides what to push.
    const INTERCEPTS: &'static [&'static str] = &[];

    /// Joins `topic`: `Ok((state, response))` accepts with an ok reply, `Err(response)`
    /// refuses with an error reply. Pushes made here reach the client after the reply.
    async fn join(topic: &str, payload: Payload, socket: &mut Socket) -> Result<(Self, Payload), Payload>;

    /// A client message on the joined topic.
    async fn handle_in(&mut self, event: &str, payload: Payload, socket: &mut Socket) -> HandleResult;

    /// An intercepted broadcast. The default pushes it unchanged.
    fn handle_out(&mut self, event: &str, payload: &Payload, socket: &mut Socket) {
        socket.push(event, payload.clone());
    }

    /// A message sent to this channel with [`crate::ChannelRef::send`],
    /// [`crate::RemoteChannelRef::send`], [`Socket::send_after`] or
    /// [`crate::Endpoint::send_info`], or a broadcast on a topic it listens to with
    /// [`Socket::subscribe`] (a [`crate::Message`]). The default ignores it.
    async fn handle_info(&mut self, msg: Box<dyn Any>, socket: &mut Socket) -> HandleResult {
        let _ = (msg, socket);
        HandleResult::NoReply
    }

    /// The channel is ending (not called on a crash).
    fn terminate(&mut self, reason: StopReason, socket: &mut Socket) {
        let _ = (reason, socket);
    }
}

pub(crate) type LocalFuture<T> = Pin<Box<dyn Future<Output = T>>>;

/// What a handler future hands back: the channel (moved out while it ran), its socket and
/// the result.
pub(crate) type Handled = (Box<dyn DynChannel>, Socket, HandleResult);

/// Object-safe face of [`Channel`] used by the runtime.
pub(crate) trait DynChannel {
    fn handle_in(self: Box<Self>, event: String, payload: Payload, socket: Socket) -> LocalFuture<Handled>;
    fn handle_info(self: Box<Self>, msg: Box<dyn Any>, socket: Socket) -> LocalFuture<Handled>;
    fn handle_out(&mut self, event: &str, payload: &Payload, socket: &mut Socket);
    fn terminate(&mut self, reason: StopReason, socket: &mut Socket);
}

pub(crate) struct Erased<C>(pub(crate) C);

impl<C: Channel> DynChannel for Erased<C> {
    fn handle_in(
        self: Box<Self>,
        event: String,
        payload: Payload,
        mut socket: Socket,
    ) -> LocalFuture<Handled> {
        Box::pin(async move {
            let mut this = self;
            let result = this.0.handle_in(&event, payload, &mut socket).await;
            (this as Box<dyn DynChannel>, socket, result)
        })
    }

    fn handle_info(self: Box<Self>, msg: Box<dyn Any>, mut socket: Socket) -> LocalFuture<Handled> {
        Box::pin(async move {
            let mut this = self;
            let result = this.0.handle_info(msg, &mut socket).await;
            (this as Box<dyn DynChannel>, socket, result)
        })
    }

    fn handle_out(&mut self, event: &str, payload: &Payload, socket: &mut Socket) {
        self.0.handle_out(event, payload, socket)
    }

    fn terminate(&mut self, reason: StopReason, socket: &mut Socket) {
        self.0.terminate(reason, socket)
    }
}

/// Result of a join future: the socket back, and the channel with its reply or a refusal.
pub(crate) type Joined = (Socket, Result<(Box<dyn DynChannel>, Payload), Payload>);

pub(crate) fn join_erased<C: Channel>(
    topic: String,
    payload: Payload,
    mut socket: Socket,
) -> LocalFuture<Joined> {
    Box::pin(async move {
        let result = C::join(&topic, payload, &mut socket).await;
        let result = result.map(|(c, reply)| (Box::new(Erased(c)) as Box<dyn DynChannel>, reply));
        (socket, result)
    })
}
