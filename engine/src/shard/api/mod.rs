//! What embedders use: the `Channel` trait, the `Socket` a channel holds, the socket
//! handler and router, the `Endpoint` handle, and PubSub for Rust code outside channels.

pub mod channel;
pub mod endpoint;
pub mod pubsub;
pub mod router;
pub mod socket;
