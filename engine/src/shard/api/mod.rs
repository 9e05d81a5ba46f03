//! What embedders use: the `Channel` trait, the `Socket` a channel holds, the socket
//! handler and router, and the `Endpoint` handle.

pub mod channel;
pub mod endpoint;
pub mod router;
pub mod socket;
