//! A test's broker-and-bridge pair (`Setup`, chosen by `Backend`) and the
//! macros that run one test body against each backend: `all_backends!`
//! (embedded, Mosquitto, RabbitMQ) and `both_backends!` (embedded and
//! Mosquitto, for tests that do not apply to RabbitMQ; say why where used);
//! `all_backends_and_aws!` and `both_backends_and_aws!` add the AWS
//! deployment (`aws_local`: the Lambdas behind aws-local, on a Mosquitto),
//! for the tests that hold there too. Where AWS differs by design (see
//! tests/tests/aws_local.rs), the difference has its own test.
//!
//! Every RabbitMQ setup shares the test binary's one node and gets a topic
//! prefix of its own (`--topic-prefix`), so tests that run at the same time
//! and use the same channel names do not see each other; its devices live
//! under the same prefix.

use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::Value;

use crate::awslocal;
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
    /// The AWS deployment: the Lambda binaries behind `aws-local serve`, on
    /// a Mosquitto of the test's own.
    AwsLocal,
}

impl Backend {
    /// Whether messages from one publisher on one topic arrive in order.
    /// Not on AWS: every device message is its own asynchronous invocation
    /// of iot-fanout, and several run at once.
    pub fn keeps_order(self) -> bool {
        self != Backend::AwsLocal
    }
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
            Backend::AwsLocal => {
                let m = Mosquitto::start();
                let bridge = awslocal::spawn(&opts, &m);
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
        if backends.contains(&Backend::AwsLocal) {
            awslocal::warm_up();
        }
    }

    /// Asserts that `got` are the `expected` messages: in that order where
    /// the backend keeps order, in any order (each once) where it does not.
    pub fn assert_same_messages(&self, got: Vec<Value>, expected: Vec<Value>) {
        if self.backend.keeps_order() {
            assert_eq!(got, expected);
        } else {
            let sorted = |mut v: Vec<Value>| {
                v.sort_by_key(|x| x.to_string());
                v
            };
            assert_eq!(sorted(got), sorted(expected), "(in any order)");
        }
    }

    /// A client of the server; on AWS one that handles message ids (see
    /// [`Client::with_message_ids`]).
    pub async fn client(&self) -> Client {
        let c = Client::connect(&self.bridge.ws_url()).await;
        match self.backend {
            Backend::AwsLocal => c.with_message_ids(),
            _ => c,
        }
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

/// `all_backends!` and the AWS deployment (`aws_local`).
#[macro_export]
macro_rules! all_backends_and_aws {
    ($name:ident, $body:expr) => {
        $crate::backend_tests!($name, $crate::Opts::default(), $body, embedded: Embedded, mosquitto: Mosquitto, rabbitmq: RabbitMq, aws_local: AwsLocal);
    };
    ($name:ident, $opts:expr, $body:expr) => {
        $crate::backend_tests!($name, $opts, $body, embedded: Embedded, mosquitto: Mosquitto, rabbitmq: RabbitMq, aws_local: AwsLocal);
    };
}

/// `both_backends!` and the AWS deployment (`aws_local`).
#[macro_export]
macro_rules! both_backends_and_aws {
    ($name:ident, $body:expr) => {
        $crate::backend_tests!($name, $crate::Opts::default(), $body, embedded: Embedded, mosquitto: Mosquitto, aws_local: AwsLocal);
    };
    ($name:ident, $opts:expr, $body:expr) => {
        $crate::backend_tests!($name, $opts, $body, embedded: Embedded, mosquitto: Mosquitto, aws_local: AwsLocal);
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
