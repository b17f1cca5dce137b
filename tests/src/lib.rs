//! Black-box test harness: starts real processes (the `bridge` binary, a
//! Mosquitto of its own on a free port, a RabbitMQ node shared by the tests of
//! one binary) and talks to them over real sockets
//! with ordinary clients (tokio-tungstenite for the browser side, rumqttc for
//! devices). Nothing here knows the bridge's internals.
//!
//! One module per concept; everything is re-exported here, so tests write
//! `use tests::{Setup, Client, ...}`.

mod bridge;
mod client;
mod device;
mod http;
mod mosquitto;
mod pki;
mod processes;
mod rabbitmq;
mod setup;
mod tokens;

pub use bridge::{bridge_bin, Bridge, Opts};
pub use client::{Client, Frame};
pub use device::Device;
pub use http::{http_get, https_healthz};
pub use mosquitto::Mosquitto;
pub use pki::{client_tls, make_pki, openssl};
pub use processes::{free_port, QUIET, WAIT};
pub use rabbitmq::RabbitMq;
pub use setup::{Backend, Setup};
pub use tokens::{hs256_token, now};
