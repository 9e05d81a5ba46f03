//! The socket handler (connect and id) and the channel router (topic patterns to
//! channel types): Phoenix's `UserSocket` module.

use std::any::Any;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;

use crate::proto::socket::pattern_matches;
use crate::proto::Payload;
use crate::shard::api::channel::{join_erased, Channel, Joined, LocalFuture};
use crate::shard::api::socket::Socket;
use crate::shard::history::History;

/// What a connecting client presented (Phoenix's `connect_info`): its connect params,
/// its auth token, where it came from and the headers a proxy or an app may need.
#[derive(Debug, Clone, Default)]
pub struct ConnectInfo {
    /// Query parameters of the connect request, in order (`vsn` included).
    pub params: Vec<(String, String)>,
    /// The Phoenix 1.8 `authToken`: from the `base64url.bearer.phx.` WebSocket
    /// subprotocol, or the long-poll `X-Phoenix-AuthToken` header, decoded.
    pub auth_token: Option<String>,
    /// The TCP peer's address.
    pub peer_addr: Option<SocketAddr>,
    /// The client's address: the peer's, or, when the peer is a trusted proxy
    /// (`Config::trusted_proxies`), the one `Forwarded` / `X-Forwarded-For` names.
    pub client_ip: Option<IpAddr>,
    /// The `Origin` header, if sent.
    pub origin: Option<String>,
    /// The request target: path and query, e.g. `/socket/websocket?vsn=2.0.0`.
    pub uri: String,
    /// The `User-Agent` header, if sent.
    pub user_agent: Option<String>,
    /// Every `x-*` header, names lower-cased (Phoenix's `x_headers`).
    pub x_headers: Vec<(String, String)>,
}

impl ConnectInfo {
    /// The first value of a connect parameter.
    ///
    /// ```
    /// use ringcast::ConnectInfo;
    /// let info = ConnectInfo { params: vec![("token".into(), "abc".into())], ..Default::default() };
    /// assert_eq!(info.param("token"), Some("abc"));
    /// ```
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The socket token: the auth token when the client sent one (a header token wins),
    /// else the `token` connect param.
    ///
    /// ```
    /// use ringcast::ConnectInfo;
    /// let mut info = ConnectInfo { params: vec![("token".into(), "query".into())], ..Default::default() };
    /// assert_eq!(info.token(), Some("query"));
    /// info.auth_token = Some("header".into());
    /// assert_eq!(info.token(), Some("header"));
    /// ```
    pub fn token(&self) -> Option<&str> {
        self.auth_token.as_deref().or_else(|| self.param("token"))
    }
}

/// Authenticates connections (Phoenix's `connect/3` and `id/1`). Shared by every core.
///
/// `connect` is async, like `join`: it may ask a database or an auth service, and the
/// core serves its other connections meanwhile.
///
/// ```
/// use ringcast::{ConnectInfo, SocketHandler};
/// struct Anyone;
/// impl SocketHandler for Anyone {
///     type Assigns = String;
///     async fn connect(&self, info: &ConnectInfo) -> Option<String> {
///         info.param("name").map(str::to_string)
///     }
///     fn id(&self, name: &String) -> Option<String> {
///         Some(format!("user_socket:{name}"))
///     }
/// }
/// ```
#[allow(async_fn_in_trait)]
pub trait SocketHandler: Send + Sync + 'static {
    /// What a connection carries for its channels ([`Socket::assigns`]).
    type Assigns: 'static;

    /// Accepts the connection with its assigns, or refuses it (`None`: HTTP 403).
    async fn connect(&self, info: &ConnectInfo) -> Option<Self::Assigns>;

    /// The socket id: a topic that, broadcast `disconnect`, closes every connection
    /// that has it.
    fn id(&self, assigns: &Self::Assigns) -> Option<String> {
        let _ = assigns;
        None
    }
}

/// What `connect` made of a client: its assigns and socket id.
pub(crate) type Connected = Option<(Rc<dyn Any>, Option<String>)>;

pub(crate) trait DynSocketHandler: Send + Sync {
    fn connect<'a>(&'a self, info: &'a ConnectInfo) -> Pin<Box<dyn Future<Output = Connected> + 'a>>;
}

impl<H: SocketHandler> DynSocketHandler for H {
    fn connect<'a>(&'a self, info: &'a ConnectInfo) -> Pin<Box<dyn Future<Output = Connected> + 'a>> {
        Box::pin(async move {
            let assigns = SocketHandler::connect(self, info).await?;
            let id = self.id(&assigns);
            Some((Rc::new(assigns) as Rc<dyn Any>, id))
        })
    }
}

pub(crate) type JoinFn = fn(String, Payload, Socket) -> LocalFuture<Joined>;

pub(crate) struct RouteEntry {
    pattern: String,
    pub(crate) join: JoinFn,
    pub(crate) intercepts: &'static [&'static str],
    pub(crate) history: Option<History>,
}

/// Routes topics to channel types; the first matching pattern wins.
///
/// ```
/// # use ringcast::{Channel, HandleResult, Payload, Reply, Socket};
/// # struct Room;
/// # impl Channel for Room {
/// #     async fn join(_: &str, _: Payload, _: &mut Socket) -> Result<(Self, Payload), Payload> { Ok((Room, Payload::empty())) }
/// #     async fn handle_in(&mut self, _: &str, _: Payload, _: &mut Socket) -> HandleResult { HandleResult::NoReply }
/// # }
/// let router = ringcast::Router::new().channel::<Room>("rooms:*");
/// assert!(router.matches("rooms:lobby"));
/// assert!(!router.matches("other"));
/// ```
#[derive(Default)]
pub struct Router {
    routes: Vec<RouteEntry>,
}

impl Router {
    /// An empty router.
    pub fn new() -> Self {
        Router::default()
    }

    /// Routes topics matching `pattern` (exact, or `prefix*`) to channel `C`.
    pub fn channel<C: Channel>(mut self, pattern: &str) -> Self {
        self.routes.push(RouteEntry {
            pattern: pattern.to_string(),
            join: join_erased::<C>,
            intercepts: C::INTERCEPTS,
            history: None,
        });
        self
    }

    /// Keeps history on the topics of the route added last: the last `size` broadcasts
    /// of each topic, each for `ttl`. Every broadcast on such a topic carries its
    /// position `"<epoch>:<offset>"` in the frame's `ref` slot, the join reply carries
    /// `"position"`, and a join whose params carry `"since": <position>` gets
    /// `"recovered"` and, when true, every broadcast it missed (README, "History and
    /// recovery"). Binary broadcasts keep their order but no position: their frame has
    /// no `ref` slot.
    ///
    /// ```
    /// # use ringcast::{Channel, HandleResult, Payload, Socket};
    /// # struct Room;
    /// # impl Channel for Room {
    /// #     async fn join(_: &str, _: Payload, _: &mut Socket) -> Result<(Self, Payload), Payload> { Ok((Room, Payload::empty())) }
    /// #     async fn handle_in(&mut self, _: &str, _: Payload, _: &mut Socket) -> HandleResult { HandleResult::NoReply }
    /// # }
    /// use std::time::Duration;
    /// let router = ringcast::Router::new()
    ///     .channel::<Room>("rooms:*")
    ///     .history(100, Duration::from_secs(300));
    /// assert!(router.keeps_history("rooms:lobby"));
    /// ```
    ///
    /// # Panics
    /// If no route was added yet.
    pub fn history(mut self, size: usize, ttl: std::time::Duration) -> Self {
        let route = self
            .routes
            .last_mut()
            .expect("history() follows a channel() route");
        route.history = Some(History { size, ttl });
        self
    }

    /// Whether the route of `topic` keeps history.
    pub fn keeps_history(&self, topic: &str) -> bool {
        self.history_of(topic).is_some()
    }

    pub(crate) fn history_of(&self, topic: &str) -> Option<History> {
        self.find(topic).and_then(|r| r.history)
    }

    /// Whether some route matches `topic`.
    pub fn matches(&self, topic: &str) -> bool {
        self.find(topic).is_some()
    }

    pub(crate) fn find(&self, topic: &str) -> Option<&RouteEntry> {
        self.routes.iter().find(|r| pattern_matches(&r.pattern, topic))
    }
}
