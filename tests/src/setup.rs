//! A test's broker-and-bridge pair (`Setup`, chosen by `Backend`) and the
//! macros that run one test body against each backend: `all_backends!`
//! (embedded, Mosquitto, RabbitMQ) and `both_backends!` (embedded and
//! Mosquitto, for tests that do not apply to RabbitMQ; say why where used).
//!
//! Every RabbitMQ setup shares the test binary's one node and gets a topic
//! prefix of its own (`--topic-prefix`), so tests that run at the same time
//! and use the same channel names do not see each other; its devices live
//! under the same prefix.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::bridge::{Bridge, Opts};
use crate::client::Client;
use crate::device::Device;
use crate::mosquitto::Mosquitto;
use crate::rabbitmq::RabbitMq;

/// Which broker the bridge talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Mosquitto,
    /// RabbitMQ's MQTT plugin, shared by the tests of one test binary.
    RabbitMq,
}

/// One broker and one bridge on it.
pub struct Setup {
    pub backend: Backend,
    pub mosquitto: Option<Mosquitto>,
    pub bridge: Bridge,
}

impl Setup {
    pub fn new(backend: Backend) -> Setup {
        Setup::with(backend, Opts::default())
    }

    pub fn with(backend: Backend, opts: Opts) -> Setup {
        match backend {
            Backend::Embedded => Setup {
                backend,
                mosquitto: None,
                bridge: Bridge::embedded(opts),
            },
            Backend::Mosquitto => {
                let m = Mosquitto::start();
                let bridge = Bridge::external(&m, opts);
                Setup {
                    backend,
                    mosquitto: Some(m),
                    bridge,
                }
            }
            Backend::RabbitMq => {
                static SETUPS: AtomicU32 = AtomicU32::new(0);
                assert!(
                    opts.topic_prefix().is_none(),
                    "a RabbitMQ setup chooses its own topic prefix; use Bridge::spawn for another"
                );
                let rabbit = RabbitMq::shared();
                let prefix = format!("t{}", SETUPS.fetch_add(1, Ordering::Relaxed));
                let opts = opts.args(["--mqtt-url".to_string(), rabbit.url()]);
                let bridge = Bridge::spawn(
                    opts.args(["--topic-prefix".to_string(), prefix]),
                    rabbit.mqtt_port,
                );
                Setup {
                    backend,
                    mosquitto: None,
                    bridge,
                }
            }
        }
    }

    /// Called by every test the backend macros generate, with the backends of
    /// its invocation: if RabbitMQ is among them, the shared node starts
    /// booting now, while the tests of the other backends run (libtest runs
    /// `x::embedded` before `x::rabbitmq`).
    pub fn warm_up(backends: &[Backend]) {
        if backends.contains(&Backend::RabbitMq) {
            RabbitMq::warm_up();
        }
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.bridge.ws_url()).await
    }

    pub async fn device(&self, id: &str) -> Device {
        Device::connect_under(self.bridge.mqtt_port, id, self.bridge.topic_prefix()).await
    }
}

/// Generates one test per backend (`embedded`, `mosquitto`, `rabbitmq`)
/// from `async fn body(setup: Setup)`, optionally with `Opts`.
#[macro_export]
macro_rules! all_backends {
    ($name:ident, $body:expr) => {
        $crate::backend_tests!($name, $crate::Opts::default(), $body, embedded: Embedded, mosquitto: Mosquitto, rabbitmq: RabbitMq);
    };
    ($name:ident, $opts:expr, $body:expr) => {
        $crate::backend_tests!($name, $opts, $body, embedded: Embedded, mosquitto: Mosquitto, rabbitmq: RabbitMq);
    };
}

/// Like `all_backends!` without RabbitMQ (`embedded`, `mosquitto`), for tests
/// that do not apply to it; the call site says why.
#[macro_export]
macro_rules! both_backends {
    ($name:ident, $body:expr) => {
        $crate::backend_tests!($name, $crate::Opts::default(), $body, embedded: Embedded, mosquitto: Mosquitto);
    };
    ($name:ident, $opts:expr, $body:expr) => {
        $crate::backend_tests!($name, $opts, $body, embedded: Embedded, mosquitto: Mosquitto);
    };
}

/// A module `$name` with one test per `test_name: Backend` pair.
#[doc(hidden)]
#[macro_export]
macro_rules! backend_tests {
    ($name:ident, $opts:expr, $body:expr, $($test:ident: $backend:ident),+) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            const BACKENDS: &[$crate::Backend] = &[$($crate::Backend::$backend),+];
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    $crate::Setup::warm_up(BACKENDS);
                    ($body)($crate::Setup::with($crate::Backend::$backend, $opts)).await;
                }
            )+
        }
    };
}
