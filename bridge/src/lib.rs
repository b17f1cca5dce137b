//! The channel bridge: MQTT topics as WebSocket channels.
//!
//! The core (no sockets, no AWS) decides what a frame means:
//! [`channel`] names and filters, [`frame`] the wire format, [`payload`] the
//! encodings, [`permissions`] and [`auth`] who may do what, [`session`] the
//! decision both deployments execute, [`request`] the order in which they
//! carry it out, [`cover`] the broker subscriptions that guarantee one copy
//! per connection, [`rate`] the per-connection rate limits.
//!
//! With the `server` feature (default), [`server`] is the self-hosted
//! `bridge serve`, [`config`] its settings, [`client`] the little
//! `bridge sub` / `bridge pub` client, [`smoke`] the end-to-end check of
//! a deployed AWS stack and [`simulate`] the simulated device fleet.

pub mod auth;
pub mod channel;
pub mod cover;
pub mod frame;
pub mod payload;
pub mod permissions;
pub mod rate;
pub mod request;
pub mod session;

#[cfg(feature = "server")]
pub mod client;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod simulate;
#[cfg(feature = "server")]
pub mod smoke;
