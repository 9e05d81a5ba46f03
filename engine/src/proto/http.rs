//! HTTP/1.1 requests (parsed by httparse) and the answers the transport writes: the
//! WebSocket upgrade and plain responses. Sans-IO: bytes in, bytes out.

use tungstenite::handshake::derive_accept_key;

/// Longest request head accepted before the connection is refused.
pub const MAX_HEAD: usize = 8 * 1024;
const MAX_HEADERS: usize = 32;

/// A parsed request head (body handling lives with the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path without the query, e.g. `/socket/websocket`.
    pub path: String,
    /// Raw query string (no `?`), possibly empty.
    pub query: String,
    /// Header names lower-cased, values as sent.
    pub headers: Vec<(String, String)>,
}

/// Why a request head was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// Not HTTP/1.x, or a header is not text.
    #[error("malformed HTTP request")]
    Malformed,
    /// Head over [`MAX_HEAD`] or too many headers.
    #[error("request head too large")]
    TooLarge,
    /// A repeated `Content-Length`, or one that is not all digits.
    #[error("bad content-length")]
    BadContentLength,
}

impl Request {
    /// Parses a request head from the front of `buf`: `Ok(None)` while incomplete, else the
    /// request and the head's length.
    ///
    /// ```
    /// use ringcast::proto::http::Request;
    /// let (req, len) = Request::parse(b"GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: x\r\n\r\n")
    ///     .unwrap().unwrap();
    /// assert_eq!((req.path.as_str(), req.query.as_str(), len), ("/socket/websocket", "vsn=2.0.0", 53));
    /// assert_eq!(req.header("host"), Some("x"));
    /// ```
    pub fn parse(buf: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => Err(HttpError::TooLarge),
            Ok(httparse::Status::Complete(len)) => {
                let target = req.path.ok_or(HttpError::Malformed)?;
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                let headers = req
                    .headers
                    .iter()
                    .map(|h| {
                        let value = std::str::from_utf8(h.value).map_err(|_| HttpError::Malformed)?;
                        Ok((h.name.to_ascii_lowercase(), value.trim().to_string()))
                    })
                    .collect::<Result<_, HttpError>>()?;
                Ok(Some((
                    Request {
                        method: req.method.ok_or(HttpError::Malformed)?.to_string(),
                        path: path.to_string(),
                        query: query.to_string(),
                        headers,
                    },
                    len,
                )))
            }
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => Err(HttpError::TooLarge),
            Ok(httparse::Status::Partial) => Ok(None),
            Err(httparse::Error::TooManyHeaders) => Err(HttpError::TooLarge),
            Err(_) => Err(HttpError::Malformed),
        }
    }

    /// The first value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header contains `token`, case-insensitively.
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The body length the request announces: `Ok(0)` without a `Content-Length`, an
    /// error when the header is repeated, empty or not all ASCII digits (`+5`, `5, 5`,
    /// ` 5x`): a request that two parsers could read with two lengths is refused
    /// rather than guessed at (request smuggling).
    ///
    /// ```
    /// use ringcast::proto::http::Request;
    /// let req = |head: &str| Request::parse(head.as_bytes()).unwrap().unwrap().0;
    /// assert_eq!(req("POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n").content_length(), Ok(12));
    /// assert_eq!(req("GET / HTTP/1.1\r\n\r\n").content_length(), Ok(0));
    /// assert!(req("POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n").content_length().is_err());
    /// assert!(req("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n").content_length().is_err());
    /// ```
    pub fn content_length(&self) -> Result<u64, HttpError> {
        let mut values = self.headers.iter().filter(|(n, _)| n == "content-length");
        let Some((_, value)) = values.next() else {
            return Ok(0);
        };
        if values.next().is_some() || value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HttpError::BadContentLength);
        }
        value.parse().map_err(|_| HttpError::BadContentLength)
    }

    /// Decoded query parameters, in order (repeated keys kept).
    pub fn query_params(&self) -> Vec<(String, String)> {
        form_urlencoded::parse(self.query.as_bytes())
            .into_owned()
            .collect()
    }

    /// The `Sec-WebSocket-Key` when this is a valid WebSocket upgrade request.
    pub fn websocket_key(&self) -> Option<&str> {
        let upgrade = self.method == "GET"
            && self.header_has_token("connection", "upgrade")
            && self.header_has_token("upgrade", "websocket")
            && self.header("sec-websocket-version") == Some("13");
        upgrade.then(|| self.header("sec-websocket-key")).flatten()
    }
}

/// The `101 Switching Protocols` answer for `key`, with extra `headers`.
pub fn upgrade_response(key: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {}\r\n",
        derive_accept_key(key.as_bytes())
    );
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// An HTTP response with a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers besides content-length and connection.
    pub headers: Vec<(&'static str, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl Response {
    /// A response with a content type and body.
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            headers: vec![("content-type", content_type.to_string())],
            body: body.into(),
        }
    }

    /// A JSON response.
    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Response::new(status, "application/json", body)
    }

    /// Adds a header.
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// The response on the wire; `keep_alive` false adds `connection: close`.
    ///
    /// ```
    /// use ringcast::proto::http::Response;
    /// let bytes = Response::json(202, r#"{"ok":true}"#).to_bytes(true);
    /// assert_eq!(bytes, b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}");
    /// ```
    pub fn to_bytes(&self, keep_alive: bool) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str(&format!("content-length: {}\r\n", self.body.len()));
        if !keep_alive {
            out.push_str("connection: close\r\n");
        }
        out.push_str("\r\n");
        let mut out = out.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

/// A complete response that closes the connection after it.
pub fn response(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    Response::new(status, content_type, body).to_bytes(false)
}

/// Whether the client asked to close the connection after this request.
pub fn wants_close(req: &Request) -> bool {
    req.header_has_token("connection", "close")
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &[u8] = b"GET /socket/websocket?token=a%2Eb&vsn=2.0.0 HTTP/1.1\r\nHost: h\r\n\
Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    #[test]
    fn upgrade_request_and_accept_key() {
        let (req, len) = Request::parse(UPGRADE).unwrap().unwrap();
        assert_eq!(len, UPGRADE.len());
        assert_eq!(req.websocket_key(), Some("dGhlIHNhbXBsZSBub25jZQ=="));
        assert_eq!(
            req.query_params(),
            vec![("token".into(), "a.b".into()), ("vsn".into(), "2.0.0".into())]
        );
        let resp = String::from_utf8(upgrade_response("dGhlIHNhbXBsZSBub25jZQ==", &[("x-a", "1")])).unwrap();
        assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(resp.ends_with("x-a: 1\r\n\r\n"));
    }

    #[test]
    fn partial_garbage_and_oversized_heads() {
        assert_eq!(Request::parse(&UPGRADE[..20]), Ok(None));
        assert_eq!(
            Request::parse(b"\x16\x03\x01garbage\r\n\r\n"),
            Err(HttpError::Malformed)
        );
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        assert_eq!(Request::parse(&big), Err(HttpError::TooLarge));
    }

    #[test]
    fn non_upgrade_has_no_key() {
        let (req, _) = Request::parse(b"GET /socket/websocket HTTP/1.1\r\nHost: h\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(req.websocket_key(), None);
    }
}
