//! The AWS deployment of the channel bridge: three Lambda functions behind an
//! API Gateway WebSocket API and an AWS IoT Core topic rule.
//!
//! * [`handler`]: `ws-handler`, the WebSocket routes (`$connect`,
//!   `$disconnect`, `$default`);
//! * [`authorizer`]: `ws-authorizer`, the REQUEST authorizer of `$connect`;
//! * [`fanout`]: `iot-fanout`, the IoT rule's target that pushes one MQTT
//!   message to every subscribed connection, in [`parts`] handed to
//!   parallel invocations of itself ([`invoke`]) when there are many.
//!
//! What a frame means is decided by the core ([`bridge::session`],
//! [`bridge::frame`], [`bridge::channel`]); these modules only move bytes and
//! store state: [`store`] (DynamoDB), [`lookup`] (the fan-out's cached
//! reads of it, aged by [`clock`]), [`iot`] (IoT Data Plane), [`sender`]
//! (`@connections`, within an invocation's [`budget`], its requests signed
//! by [`signed`]), [`keys`] (the token
//! keys the authorizer and the handler share). [`config`] reads the
//! environment once, [`aws`] builds the SDK clients once per process,
//! [`calls`] counts the requests they make and [`emf`] reports counts as
//! CloudWatch Embedded Metric Format lines.
//!
//! With the `local` feature (default), [`local`] is `aws-local`: the
//! deployment on one machine, around the unmodified function binaries.

pub mod authorizer;
pub mod aws;
pub mod budget;
pub mod calls;
pub mod clock;
pub mod config;
pub mod emf;
pub mod fanout;
pub mod handler;
pub mod invoke;
pub mod iot;
pub mod keys;
#[cfg(feature = "local")]
pub mod local;
pub mod lookup;
pub mod parts;
pub mod sender;
pub mod signed;
pub mod store;

/// Seconds since the Unix epoch, the unit of DynamoDB TTL attributes.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
