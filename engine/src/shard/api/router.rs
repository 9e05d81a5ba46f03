//! The socket handler (connect and id) and the channel router (topic patterns to
//! channel types): Phoenix's `UserSocket` module.

use std::any::Any;
use std::net::SocketAddr;
use std::rc::Rc;

use crate::proto::socket::pattern_matches;
use crate::proto::Payload;
use crate::shard::api::channel::{join_erased, Channel, Joined, LocalFuture};
use crate::shard::api::socket::Socket;

/// What a connecting client presented: its connect params and where it came from.
#[derive(Debug, Clone, Default)]
pub struct ConnectInfo {
    /// Query parameters of the connect request, in order (`vsn` included).
    pub params: Vec<(String, String)>,
    /// The client's address.
    pub peer_addr: Option<SocketAddr>,
    /// The `Origin` header, if sent.
    pub origin: Option<String>,
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
}

/// Authenticates connections (Phoenix's `connect/3` and `id/1`). Shared by every core.
///
/// ```
/// use ringcast::{ConnectInfo, SocketHandler};
/// struct Anyone;
/// impl SocketHandler for Anyone {
///     type Assigns = String;
///     fn connect(&self, info: &ConnectInfo) -> Option<String> {
///         info.param("name").map(str::to_string)
///     }
///     fn id(&self, name: &String) -> Option<String> {
///         Some(format!("user_socket:{name}"))
///     }
/// }
/// ```
pub trait SocketHandler: Send + Sync + 'static {
    /// What a connection carries for its channels ([`Socket::assigns`]).
    type Assigns: 'static;

    /// Accepts the connection with its assigns, or refuses it (`None`: HTTP 403).
    fn connect(&self, info: &ConnectInfo) -> Option<Self::Assigns>;

    /// The socket id: a topic that, broadcast `disconnect`, closes every connection
    /// that has it.
    fn id(&self, assigns: &Self::Assigns) -> Option<String> {
        let _ = assigns;
        None
    }
}

pub(crate) trait DynSocketHandler: Send + Sync {
    fn connect(&self, info: &ConnectInfo) -> Option<(Rc<dyn Any>, Option<String>)>;
}

impl<H: SocketHandler> DynSocketHandler for H {
    fn connect(&self, info: &ConnectInfo) -> Option<(Rc<dyn Any>, Option<String>)> {
        let assigns = SocketHandler::connect(self, info)?;
        let id = self.id(&assigns);
        Some((Rc::new(assigns), id))
    }
}

pub(crate) type JoinFn = fn(String, Payload, Socket) -> LocalFuture<Joined>;

pub(crate) struct RouteEntry {
    pattern: String,
    pub(crate) join: JoinFn,
    pub(crate) intercepts: &'static [&'static str],
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
        });
        self
    }

    /// Whether some route matches `topic`.
    pub fn matches(&self, topic: &str) -> bool {
        self.find(topic).is_some()
    }

    pub(crate) fn find(&self, topic: &str) -> Option<&RouteEntry> {
        self.routes.iter().find(|r| pattern_matches(&r.pattern, topic))
    }
}
