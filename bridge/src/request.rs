//! The order in which a decided request is carried out, written once for
//! both deployments.
//!
//! [`crate::session::decide`] says *what* a frame means; [`carry_out`] says
//! in which *order* its effects happen and what the client hears. Each shell
//! implements [`Effects`] (`bridge serve` over its socket, hub and MQTT link;
//! the `ws-handler` Lambda over DynamoDB, IoT Core and `@connections`) and
//! calls [`carry_out`]; neither writes the sequence itself.
//!
//! | action | sequence |
//! |---|---|
//! | reply | the reply, if any |
//! | refuse | the error |
//! | subscribe | hold the filter; with `retained`, replay the retained messages, and if that fails take back a hold *this* request made (never one held before) and answer the error; then the ack |
//! | unsubscribe | release the filter; the ack |
//! | publish | hand the message to the broker; the shell answers through [`Settle`] once the broker has it (pipelined by `bridge serve`, awaited on AWS) |
//! | auth | store the new credentials; the ack |
//!
//! An effect that fails returns a [`Refusal`]: the client gets it as an
//! `error` carrying the request's `id`, and no later step of the sequence
//! runs. Acks are sent only after every step took effect.

use std::future::Future;

use crate::auth::Credentials;
use crate::frame::{ErrorCode, FrameError, Id};
use crate::session::Action;

/// Why an effect could not be carried out (the request's id is added here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }

    /// The error frame for the request `id`.
    pub fn with_id(self, id: Option<Id>) -> FrameError {
        FrameError::new(id, self.code, self.message)
    }
}

/// What `hold` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// This request added the filter.
    Added,
    /// The connection held it already (an earlier or a concurrent request).
    AlreadyHeld,
}

/// A publish to hand to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// The broker topic.
    pub mqtt: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
}

/// The answer owed for a publish, given once the broker has it (or refused it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settle {
    id: Option<Id>,
    ack: Option<String>,
}

impl Settle {
    /// What to send the client: the ack (if the request had an id) when the
    /// broker took the message, the error otherwise.
    pub fn answer(self, outcome: Result<(), Refusal>) -> Result<Option<String>, FrameError> {
        match outcome {
            Ok(()) => Ok(self.ack),
            Err(refusal) => Err(refusal.with_id(self.id)),
        }
    }
}

/// The effects one deployment carries out for a connection. Each method does
/// one thing to the deployment's state; the order is [`carry_out`]'s.
pub trait Effects: Send {
    /// Adds the client filter `channel` (broker filter `mqtt`) to the
    /// connection's subscriptions, so that matching messages flow from now on.
    fn hold(
        &mut self,
        channel: &str,
        mqtt: &str,
    ) -> impl Future<Output = Result<Hold, Refusal>> + Send;

    /// Removes `channel` from the connection's subscriptions. Not holding it
    /// is not an error.
    fn release(
        &mut self,
        channel: &str,
        mqtt: &str,
    ) -> impl Future<Output = Result<(), Refusal>> + Send;

    /// Sends the connection the retained messages `mqtt` matches, marked
    /// `"retained": true`, before anything this request still answers.
    fn replay_retained(&mut self, mqtt: &str) -> impl Future<Output = Result<(), Refusal>> + Send;

    /// Hands a publish to the broker and, once the broker has it (PUBACK for
    /// QoS 1), sends the client what `settle` answers.
    fn publish(&mut self, publish: Publish, settle: Settle) -> impl Future<Output = ()> + Send;

    /// Replaces the connection's permissions and expiry.
    fn store_credentials(
        &mut self,
        credentials: Credentials,
    ) -> impl Future<Output = Result<(), Refusal>> + Send;

    /// Sends a frame to the client.
    fn reply(&mut self, frame: String) -> impl Future<Output = ()> + Send;

    /// Sends an error frame to the client (shells count or log it).
    fn refuse(&mut self, error: FrameError) -> impl Future<Output = ()> + Send;
}

/// Carries out one decided request through the shell's effects.
pub async fn carry_out<E: Effects>(fx: &mut E, action: Action) {
    let ack = action.ack();
    match action {
        Action::Reply(None) => {}
        Action::Reply(Some(text)) => fx.reply(text).await,
        Action::Refuse(e) => fx.refuse(e).await,
        Action::Subscribe {
            id,
            channel,
            mqtt,
            retained,
        } => {
            let hold = match fx.hold(&channel, &mqtt).await {
                Ok(hold) => hold,
                Err(refusal) => return fx.refuse(refusal.with_id(id)).await,
            };
            if retained {
                if let Err(refusal) = fx.replay_retained(&mqtt).await {
                    if hold == Hold::Added {
                        if let Err(e) = fx.release(&channel, &mqtt).await {
                            tracing::warn!(channel, error = %e.message, "could not take back a subscription");
                        }
                    }
                    return fx.refuse(refusal.with_id(id)).await;
                }
            }
            if let Some(ack) = ack {
                fx.reply(ack).await;
            }
        }
        Action::Unsubscribe { id, channel, mqtt } => match fx.release(&channel, &mqtt).await {
            Ok(()) => {
                if let Some(ack) = ack {
                    fx.reply(ack).await;
                }
            }
            Err(refusal) => fx.refuse(refusal.with_id(id)).await,
        },
        Action::Publish {
            id,
            mqtt,
            payload,
            qos,
            retain,
            ..
        } => {
            let publish = Publish {
                mqtt,
                payload,
                qos,
                retain,
            };
            fx.publish(publish, Settle { id, ack }).await;
        }
        Action::Auth { id, credentials } => match fx.store_credentials(credentials).await {
            Ok(()) => {
                if let Some(ack) = ack {
                    fx.reply(ack).await;
                }
            }
            Err(refusal) => fx.refuse(refusal.with_id(id)).await,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::permissions::Permissions;
    use std::collections::BTreeSet;

    /// Records every effect; fails the ones it is told to.
    #[derive(Default)]
    struct Fake {
        log: Vec<String>,
        held: BTreeSet<String>,
        fail_hold: bool,
        fail_replay: bool,
        fail_store: bool,
    }

    impl Effects for Fake {
        async fn hold(&mut self, channel: &str, _mqtt: &str) -> Result<Hold, Refusal> {
            self.log.push(format!("hold {channel}"));
            if self.fail_hold {
                return Err(Refusal::new(ErrorCode::Unavailable, "down"));
            }
            Ok(if self.held.insert(channel.to_string()) {
                Hold::Added
            } else {
                Hold::AlreadyHeld
            })
        }
        async fn release(&mut self, channel: &str, _mqtt: &str) -> Result<(), Refusal> {
            self.log.push(format!("release {channel}"));
            self.held.remove(channel);
            Ok(())
        }
        async fn replay_retained(&mut self, mqtt: &str) -> Result<(), Refusal> {
            self.log.push(format!("replay {mqtt}"));
            if self.fail_replay {
                return Err(Refusal::new(ErrorCode::Unavailable, "no retained"));
            }
            Ok(())
        }
        async fn publish(&mut self, publish: Publish, settle: Settle) {
            self.log.push(format!("publish {}", publish.mqtt));
            match settle.answer(Ok(())) {
                Ok(Some(ack)) => self.log.push(ack),
                Ok(None) => {}
                Err(e) => self.log.push(e.to_json()),
            }
        }
        async fn store_credentials(&mut self, c: Credentials) -> Result<(), Refusal> {
            self.log.push(format!("store {:?}", c.expires_at));
            if self.fail_store {
                return Err(Refusal::new(ErrorCode::Unavailable, "store down"));
            }
            Ok(())
        }
        async fn reply(&mut self, frame: String) {
            self.log.push(frame);
        }
        async fn refuse(&mut self, error: FrameError) {
            self.log.push(error.to_json());
        }
    }

    /// Runs a future whose effects are all immediately ready.
    fn run(fx: &mut Fake, action: Action) -> Vec<String> {
        {
            let mut fut = std::pin::pin!(carry_out(fx, action));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            match fut.as_mut().poll(&mut cx) {
                std::task::Poll::Ready(()) => {}
                std::task::Poll::Pending => panic!("the fake effects never wait"),
            }
        }
        std::mem::take(&mut fx.log)
    }

    fn subscribe(channel: &str, retained: bool) -> Action {
        Action::Subscribe {
            id: Some(Id::Int(1.into())),
            channel: channel.into(),
            mqtt: format!("p/{channel}"),
            retained,
        }
    }

    const ACK: &str = r#"{"type":"ack","id":1}"#;

    #[test]
    fn subscribe_holds_replays_then_acks() {
        let mut fx = Fake::default();
        assert_eq!(run(&mut fx, subscribe("a", false)), ["hold a", ACK]);
        assert_eq!(
            run(&mut fx, subscribe("b", true)),
            ["hold b", "replay p/b", ACK]
        );
    }

    #[test]
    fn failed_replay_takes_back_only_a_fresh_hold() {
        let mut fx = Fake {
            fail_replay: true,
            ..Fake::default()
        };
        let log = run(&mut fx, subscribe("a", true));
        assert_eq!(log[..3], ["hold a", "replay p/a", "release a"]);
        assert!(log[3].contains("\"code\":\"unavailable\"") && log[3].contains("\"id\":1"));
        assert!(fx.held.is_empty());
        // Held before this request: the hold stays, no release.
        fx.held.insert("b".into());
        let log = run(&mut fx, subscribe("b", true));
        assert_eq!(log[..2], ["hold b", "replay p/b"]);
        assert!(log[2].contains("unavailable"));
        assert!(fx.held.contains("b"));
    }

    #[test]
    fn failed_hold_is_the_answer_and_nothing_follows() {
        let mut fx = Fake {
            fail_hold: true,
            ..Fake::default()
        };
        let log = run(&mut fx, subscribe("a", true));
        assert_eq!(log.len(), 2);
        assert!(log[1].contains("unavailable"));
    }

    #[test]
    fn unsubscribe_publish_auth_and_replies() {
        let mut fx = Fake::default();
        let unsub = Action::Unsubscribe {
            id: Some(Id::Int(1.into())),
            channel: "a".into(),
            mqtt: "a".into(),
        };
        assert_eq!(run(&mut fx, unsub), ["release a", ACK]);
        let publish = Action::Publish {
            id: Some(Id::Int(1.into())),
            channel: "t".into(),
            mqtt: "p/t".into(),
            payload: b"1".to_vec(),
            qos: 1,
            retain: false,
        };
        assert_eq!(run(&mut fx, publish), ["publish p/t", ACK]);
        let auth = |id| Action::Auth {
            id,
            credentials: Credentials {
                perms: Permissions::allow_all(),
                expires_at: Some(9),
            },
        };
        assert_eq!(
            run(&mut fx, auth(Some(Id::Int(1.into())))),
            ["store Some(9)", ACK]
        );
        assert_eq!(run(&mut fx, auth(None)), ["store Some(9)"]);
        fx.fail_store = true;
        let log = run(&mut fx, auth(Some(Id::Int(1.into()))));
        assert!(log[1].contains("store down"));
        assert_eq!(run(&mut fx, Action::Reply(None)), Vec::<String>::new());
        assert_eq!(run(&mut fx, Action::Reply(Some("x".into()))), ["x"]);
    }

    #[test]
    fn settle_answers_with_the_id() {
        let s = Settle {
            id: Some(Id::Str("p".into())),
            ack: Some(r#"{"type":"ack","id":"p"}"#.into()),
        };
        assert_eq!(
            s.clone().answer(Ok(())),
            Ok(Some(r#"{"type":"ack","id":"p"}"#.into()))
        );
        let e = s
            .answer(Err(Refusal::new(ErrorCode::Unavailable, "gone")))
            .unwrap_err();
        assert_eq!(e.id, Some(Id::Str("p".into())));
        assert_eq!(e.code, ErrorCode::Unavailable);
    }
}
