//! The protocol layer, sans-IO: WebSocket framing, HTTP heads, Phoenix messages and
//! serializers, the per-connection channel state machine and socket tokens.
//!
//! Nothing here knows of glommio, sockets or clocks (callers pass `now`); everything is
//! tested in memory. `scripts/check-layers.py` keeps it that way.

pub mod error;
pub mod http;
pub mod message;
pub mod position;
pub mod presence;
pub mod serializer;
pub mod socket;
pub mod token;
pub mod ws;

pub use error::ProtocolError;
pub use message::{Message, Payload, Ref, Vsn};
