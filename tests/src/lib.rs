//! Black-box test harness: starts real processes (the `bridge` binary, a
//! Mosquitto of its own on a free port, a RabbitMQ node shared by the tests of
//! one binary, `bridge simulate`, headless Chromium, the AWS deployment under
//! `aws-local`) and talks to them over real sockets with ordinary clients
//! (tokio-tungstenite for the browser side, rumqttc for devices, the DevTools
//! protocol for Chromium). Nothing here knows the bridge's internals.
//!
//! One module per concept; everything is re-exported here, so tests write
//! `use tests::{Setup, Client, ...}`.

mod awslocal;
mod bridge;
mod browser;
mod client;
mod device;
mod http;
mod mosquitto;
mod pki;
mod processes;
mod rabbitmq;
mod setup;
mod simulator;
mod stalled;
mod tokens;

pub use awslocal::aws_local_bin;
pub use bridge::{bridge_bin, Bridge, Opts};
pub use browser::{chromium, Browser, Page, Problem};
pub use client::{Client, Frame};
pub use device::Device;
pub use http::{http_get, https_healthz};
pub use mosquitto::Mosquitto;
pub use pki::{client_tls, make_pki, openssl};
pub use processes::{free_port, QUIET, WAIT};
pub use rabbitmq::RabbitMq;
pub use setup::{Backend, Setup};
pub use simulator::Simulator;
pub use stalled::stalled_ws;
pub use tokens::{hostile_header_tokens, hs256_token, now, refused_without_echo};
