//! A test's broker-and-bridge pair (`Setup`, chosen by `Backend`) and the
//! macro that runs one test body against each backend.

use crate::bridge::{Bridge, Opts};
use crate::client::Client;
use crate::device::Device;
use crate::mosquitto::Mosquitto;

/// Which broker the bridge talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Mosquitto,
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
        }
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.bridge.ws_url()).await
    }

    pub async fn device(&self, id: &str) -> Device {
        Device::connect(self.bridge.mqtt_port, id).await
    }
}

/// Generates one test per backend from `async fn body(setup: Setup)`.
#[macro_export]
macro_rules! both_backends {
    ($name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                ($body)($crate::Setup::new($crate::Backend::Embedded)).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mosquitto() {
                ($body)($crate::Setup::new($crate::Backend::Mosquitto)).await;
            }
        }
    };
    ($name:ident, $opts:expr, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                ($body)($crate::Setup::with($crate::Backend::Embedded, $opts)).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mosquitto() {
                ($body)($crate::Setup::with($crate::Backend::Mosquitto, $opts)).await;
            }
        }
    };
}
