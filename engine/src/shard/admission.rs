//! Admission: whether a connecting client becomes a connection of this core. One path
//! for every transport (WebSocket upgrades and long-poll opens): the serializer version
//! it asks for, the origin check, the application's `connect`, then the core's state
//! (shutting down, full). The transport turns the answer into its own wire form.

use std::any::Any;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;

use futures_lite::FutureExt;

use crate::proto::http::Request;
use crate::proto::Vsn;
use crate::shard::api::router::ConnectInfo;
use crate::shard::app::Config;
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
    /// An unknown `vsn`, a foreign origin, an unreadable auth token, or the
    /// application's `connect` said no (HTTP 403 / long-poll `{"status":403}`).
    Forbidden,
    /// The server is shutting down (503).
    ShuttingDown,
    /// This core holds as many connections as it may (503).
    Full,
    /// The application's `connect` panicked (500); the core goes on.
    Crashed,
    /// The application's `connect` did not answer within the request timeout (503).
    TimedOut,
}

/// What `connect` sees of a request: one reading for every transport. `peer` is the
/// TCP peer, when the request came straight from one. An auth token that is offered
/// but unreadable refuses the request.
pub(crate) fn connect_info(
    req: &Request,
    peer: Option<SocketAddr>,
    config: &Config,
) -> Result<ConnectInfo, Refused> {
    let auth_token = req.auth_token().transpose().map_err(|_| Refused::Forbidden)?;
    let trusted = |ip: std::net::IpAddr| config.trusted_proxies.iter().any(|net| net.contains(&ip));
    Ok(ConnectInfo {
        params: req.query_params(),
        auth_token,
        peer_addr: peer,
        client_ip: peer.map(|p| req.forwarded_client(p.ip(), trusted)),
        origin: req.header("origin").map(str::to_string),
        uri: req.uri(),
        user_agent: req.header("user-agent").map(str::to_string),
        x_headers: req.x_headers(),
    })
}

impl Shard {
    /// Decides whether the client described by `info` may connect here. The connection
    /// itself is made by the caller ([`Shard::add_conn`]) once its transport has
    /// answered, so that a client that went away costs nothing. The application's
    /// `connect` may take its time; the caller bounds it.
    pub(crate) async fn admit(&self, info: &ConnectInfo) -> Result<Admitted, Refused> {
        let vsn = Vsn::from_param(info.param("vsn")).ok_or(Refused::Forbidden)?;
        if !origin_allowed(&self.app.config.allowed_origins, info.origin.as_deref()) {
            return Err(Refused::Forbidden);
        }
        // `connect` is application code, isolated like the channel handlers: a panic
        // there refuses this client and nothing else.
        let connected = AssertUnwindSafe(self.app.socket.connect(info))
            .catch_unwind()
            .await;
        let (assigns, socket_id) = connected
            .map_err(|_| {
                tracing::warn!(core = self.index, "the socket handler's connect panicked");
                Refused::Crashed
            })?
            .ok_or(Refused::Forbidden)?;
        if self.is_stopping() || self.endpoint.is_draining() {
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
/// a browser) or without a configured list, otherwise when a pattern of the list
/// matches it ([`origin_matches`]).
pub(crate) fn origin_allowed(allowed: &[String], origin: Option<&str>) -> bool {
    match origin {
        None => true,
        Some(_) if allowed.is_empty() => true,
        Some(origin) => allowed.iter().any(|pattern| origin_matches(pattern, origin)),
    }
}

/// The scheme, host and port of an origin or an origin pattern; `None` where the
/// pattern leaves it open. A port left out of a URL with a scheme is the scheme's.
fn origin_parts(text: &str) -> Option<(Option<String>, String, Option<u16>)> {
    let text = text.trim().trim_end_matches('/');
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme, rest)) => (Some(scheme.to_ascii_lowercase()), rest),
        None => (None, text.strip_prefix("//")?),
    };
    // An origin has no path; a pattern may carry one, which does not count.
    let authority = rest.split('/').next()?;
    let (host, port) = match authority.strip_prefix('[') {
        // An IPv6 literal: `[::1]` or `[::1]:4000`.
        Some(v6) => {
            let (addr, after) = v6.split_once(']')?;
            let port = match after.strip_prefix(':') {
                Some(port) => Some(port.parse().ok()?),
                None if after.is_empty() => None,
                None => return None,
            };
            (&authority[..addr.len() + 2], port)
        }
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port.parse().ok()?)),
            None => (authority, None),
        },
    };
    let port = port.or(match scheme.as_deref() {
        Some("http") | Some("ws") => Some(80),
        Some("https") | Some("wss") => Some(443),
        _ => None,
    });
    (!host.is_empty()).then(|| (scheme, host.to_ascii_lowercase(), port))
}

/// Whether `origin` matches `pattern`, as Phoenix's `check_origin` compares them:
/// `https://example.com` (that scheme, host and default port), `//example.com` (any
/// scheme and port), `//*.example.com` (the domain and any subdomain of it),
/// `http://localhost:4000` (an explicit port).
pub(crate) fn origin_matches(pattern: &str, origin: &str) -> bool {
    let (Some((want_scheme, want_host, want_port)), Some((scheme, host, port))) =
        (origin_parts(pattern), origin_parts(origin))
    else {
        return false;
    };
    let host_ok = match want_host.strip_prefix("*.") {
        Some(domain) => host == domain || host.strip_suffix(domain).is_some_and(|sub| sub.ends_with('.')),
        None => host == want_host,
    };
    host_ok && want_scheme.is_none_or(|s| Some(s) == scheme) && want_port.is_none_or(|p| Some(p) == port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::app::Config;

    #[test]
    fn origin_patterns_as_phoenix_check_origin_reads_them() {
        let yes = |p: &str, o: &str| assert!(origin_matches(p, o), "{p} should allow {o}");
        let no = |p: &str, o: &str| assert!(!origin_matches(p, o), "{p} should refuse {o}");
        // A full URL: scheme, host and (default) port.
        yes("https://example.com", "https://example.com");
        yes("https://example.com/", "https://example.com:443");
        no("https://example.com", "http://example.com");
        no("https://example.com", "https://example.com:8443");
        no("https://example.com", "https://www.example.com");
        // Scheme-less: any scheme, any port.
        yes("//example.com", "http://example.com");
        yes("//example.com", "https://example.com:8443");
        no("//example.com", "https://evil-example.com");
        // A wildcard subdomain: the domain itself and any depth below it.
        yes("//*.example.com", "https://app.example.com");
        yes("//*.example.com", "http://a.b.example.com:3000");
        yes("//*.example.com", "https://example.com");
        no("//*.example.com", "https://badexample.com");
        no("//*.example.com", "https://example.com.evil.net");
        no("https://*.example.com", "http://app.example.com");
        // An explicit port.
        yes("http://localhost:4000", "http://localhost:4000");
        no("http://localhost:4000", "http://localhost:4001");
        no("http://localhost:4000", "http://localhost");
        yes("//localhost:4000", "https://localhost:4000");
        // Case, and garbage on either side.
        yes("HTTPS://Example.COM", "https://example.com");
        no("example.com", "https://example.com");
        no("//example.com", "null");
        no("//example.com", "https://example.com:notaport");
        // IPv6 hosts.
        yes("http://[::1]:4000", "http://[::1]:4000");
        no("http://[::1]:4000", "http://[::1]:4001");
        yes("//[::1]", "http://[::1]:4001");
        yes("http://[::1]", "http://[::1]");
    }

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
        async fn connect(&self, info: &ConnectInfo) -> Option<()> {
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
            epoch_seed: 1,
        });
        Shard::new(
            0,
            app,
            crate::Endpoint::new(Vec::new(), None),
            None,
            crate::clock::Clock::manual(),
        )
    }

    fn admit(shard: &Shard, info: &ConnectInfo) -> Result<Admitted, Refused> {
        futures_lite::future::block_on(shard.admit(info))
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
        let admitted = admit(&shard, &ok).expect("a good client is admitted");
        assert_eq!(admitted.vsn, Vsn::V2);
        let no_vsn = info(&[("token", "ok")], None);
        assert_eq!(admit(&shard, &no_vsn).map(|a| a.vsn).ok(), Some(Vsn::V1));
        let refused = |i: &ConnectInfo| admit(&shard, i).err();
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
            admit(&shard, &ok).is_ok(),
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
