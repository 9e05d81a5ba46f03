//! Admission: whether a connecting client becomes a connection of this core. One path
//! for every transport (WebSocket upgrades and long-poll opens): the serializer version
//! it asks for, the origin check, the application's `connect`, then the core's state
//! (shutting down, full). The transport turns the answer into its own wire form.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;

use crate::proto::Vsn;
use crate::shard::api::router::ConnectInfo;
use crate::shard::Shard;

/// A client that may connect: what its connection is made of.
pub(crate) struct Admitted {
    pub(crate) vsn: Vsn,
    pub(crate) assigns: Rc<dyn Any>,
    pub(crate) socket_id: Option<String>,
}

/// Why a client may not connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// An unknown `vsn`, a foreign origin, or the application's `connect` said no
    /// (HTTP 403 / long-poll `{"status":403}`).
    Forbidden,
    /// The server is shutting down (503).
    ShuttingDown,
    /// This core holds as many connections as it may (503).
    Full,
    /// The application's `connect` panicked (500); the core goes on.
    Crashed,
}

impl Shard {
    /// Decides whether the client described by `info` may connect here. The connection
    /// itself is made by the caller ([`Shard::add_conn`]) once its transport has
    /// answered, so that a client that went away costs nothing.
    pub(crate) fn admit(&self, info: &ConnectInfo) -> Result<Admitted, Refused> {
        let vsn = Vsn::from_param(info.param("vsn")).ok_or(Refused::Forbidden)?;
        if !origin_allowed(&self.app.config.allowed_origins, info.origin.as_deref()) {
            return Err(Refused::Forbidden);
        }
        // `connect` is application code, isolated like the channel handlers: a panic
        // there refuses this client and nothing else.
        let connected = catch_unwind(AssertUnwindSafe(|| self.app.socket.connect(info)));
        let (assigns, socket_id) = connected
            .map_err(|_| {
                tracing::warn!(core = self.index, "the socket handler's connect panicked");
                Refused::Crashed
            })?
            .ok_or(Refused::Forbidden)?;
        if self.is_stopping() {
            return Err(Refused::ShuttingDown);
        }
        if self.full() {
            return Err(Refused::Full);
        }
        Ok(Admitted {
            vsn,
            assigns,
            socket_id,
        })
    }
}

/// Whether a request from `origin` may connect: always without an `Origin` header (not
/// a browser) or without a configured list, otherwise when the list has it.
pub(crate) fn origin_allowed(allowed: &[String], origin: Option<&str>) -> bool {
    match origin {
        None => true,
        Some(_) if allowed.is_empty() => true,
        Some(origin) => allowed
            .iter()
            .any(|a| a.trim_end_matches('/') == origin.trim_end_matches('/')),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::app::Config;

    #[test]
    fn origin_rules() {
        let allowed = vec!["http://good.example".to_string()];
        assert!(origin_allowed(&allowed, None));
        assert!(origin_allowed(&allowed, Some("http://good.example")));
        assert!(!origin_allowed(&allowed, Some("http://evil.example")));
        assert!(origin_allowed(&[], Some("http://anything")));
    }

    /// Accepts a client whose `token` param is "ok"; panics on "boom".
    struct TokenOk;

    impl crate::SocketHandler for TokenOk {
        type Assigns = ();
        fn connect(&self, info: &ConnectInfo) -> Option<()> {
            if info.param("token") == Some("boom") {
                panic!("connect blew up");
            }
            (info.param("token") == Some("ok")).then_some(())
        }
    }

    fn shard(max_connections: usize) -> Rc<Shard> {
        let app = std::sync::Arc::new(crate::shard::app::App {
            config: Config {
                cores: 1,
                allowed_origins: vec!["http://good.example".into()],
                max_connections,
                ..Config::default()
            },
            router: crate::Router::new(),
            socket: Box::new(TokenOk),
            presence_fetch: None,
            stats: vec![Default::default()],
        });
        Shard::new(
            0,
            app,
            crate::Endpoint::new(Vec::new(), None),
            None,
            crate::clock::Clock::manual(),
        )
    }

    fn info(params: &[(&str, &str)], origin: Option<&str>) -> ConnectInfo {
        ConnectInfo {
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            origin: origin.map(str::to_string),
            ..ConnectInfo::default()
        }
    }

    #[test]
    fn vsn_origin_connect_then_the_core_decide() {
        let shard = shard(1);
        let ok = info(&[("token", "ok"), ("vsn", "2.0.0")], Some("http://good.example"));
        let admitted = shard.admit(&ok).expect("a good client is admitted");
        assert_eq!(admitted.vsn, Vsn::V2);
        let no_vsn = info(&[("token", "ok")], None);
        assert_eq!(shard.admit(&no_vsn).map(|a| a.vsn).ok(), Some(Vsn::V1));
        let refused = |i: &ConnectInfo| shard.admit(i).err();
        assert_eq!(
            refused(&info(&[("token", "ok"), ("vsn", "3.0.0")], None)),
            Some(Refused::Forbidden)
        );
        assert_eq!(
            refused(&info(&[("token", "ok")], Some("http://evil.example"))),
            Some(Refused::Forbidden)
        );
        assert_eq!(
            refused(&info(&[("token", "bad")], None)),
            Some(Refused::Forbidden)
        );
        assert_eq!(refused(&info(&[("token", "boom")], None)), Some(Refused::Crashed));
        assert!(
            shard.admit(&ok).is_ok(),
            "the core goes on after a connect panicked"
        );

        let _conn = shard.add_conn(admitted.vsn, admitted.assigns, admitted.socket_id, false);
        assert_eq!(refused(&ok), Some(Refused::Full));
        shard.shutdown();
        assert_eq!(refused(&ok), Some(Refused::ShuttingDown));
        // A refused client is refused for what it is before the core's state counts.
        assert_eq!(
            refused(&info(&[("token", "bad")], None)),
            Some(Refused::Forbidden)
        );
    }
}
