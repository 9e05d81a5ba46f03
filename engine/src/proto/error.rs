//! Protocol errors: one variant per way a peer can misbehave, each mapped to what goes on
//! the wire.

use super::ws::close_code;

/// A peer broke the WebSocket or Phoenix protocol. The connection that did it is closed
/// with [`ProtocolError::close_code`]; nobody else is affected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A WebSocket frame that breaks RFC 6455.
    #[error("malformed frame: {0}")]
    BadFrame(&'static str),
    /// A text frame or close reason that is not UTF-8.
    #[error("text is not valid UTF-8")]
    BadUtf8,
    /// A frame or message over the configured limit.
    #[error("frame over the size limit")]
    TooBig,
    /// A message the serializer cannot decode.
    #[error("malformed message: {0}")]
    BadMessage(String),
    /// A close frame with a code RFC 6455 §7.4 does not let an endpoint send.
    #[error("close code {0} is not one a peer may send")]
    BadCloseCode(u16),
}

impl ProtocolError {
    /// The WebSocket close code this error ends the connection with.
    ///
    /// ```
    /// use ringcast::proto::ProtocolError;
    /// assert_eq!(ProtocolError::TooBig.close_code(), 1009);
    /// assert_eq!(ProtocolError::BadUtf8.close_code(), 1007);
    /// assert_eq!(ProtocolError::BadCloseCode(1005).close_code(), 1002);
    /// ```
    pub fn close_code(&self) -> u16 {
        match self {
            ProtocolError::TooBig => close_code::TOO_BIG,
            ProtocolError::BadCloseCode(_) => close_code::PROTOCOL_ERROR,
            _ => close_code::INVALID_PAYLOAD,
        }
    }
}
