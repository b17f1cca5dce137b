//! Optional device credentials for the embedded broker: the username/password
//! pairs devices connect with, and the login the bridge itself uses then.
//!
//! With no users the broker admits anonymous devices (as before). With users,
//! a CONNECT must carry one of them: a wrong password gets CONNACK 4 (bad
//! username or password), no username CONNACK 5 (not authorized). Passwords
//! are compared in constant time and never printed, not even by `Debug`.

use std::collections::HashMap;
use std::fmt;

use async_trait::async_trait;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::types::{AuthResult, ConnectInfo};
use subtle::ConstantTimeEq;

use super::BrokerError;

/// A password: bytes nobody prints.
#[derive(Clone)]
struct Secret(Box<[u8]>);

impl Secret {
    fn matches(&self, given: &[u8]) -> bool {
        self.0.as_ref().ct_eq(given).into()
    }
}

/// The username/password pairs devices may connect with. Empty (the default):
/// devices connect without credentials.
#[derive(Clone, Default)]
pub struct Users(HashMap<String, Secret>);

impl Users {
    /// Adds (or replaces) a user. An empty password is refused: it would look
    /// like protection and be none.
    pub fn add(&mut self, name: impl Into<String>, password: &str) -> Result<(), BrokerError> {
        let name = name.into();
        if password.is_empty() {
            return Err(BrokerError::EmptyPassword { user: name });
        }
        self.0
            .insert(name, Secret(password.as_bytes().to_vec().into()));
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds a user for the bridge's own connections (a fresh random
    /// password, so nothing outside this process knows it) when there are
    /// users at all.
    pub(super) fn with_bridge_login(mut self) -> (Users, Option<Login>) {
        if self.is_empty() {
            return (self, None);
        }
        let login = Login {
            username: format!("bridge-{}", random_hex(8)),
            password: random_hex(32),
        };
        self.0.insert(
            login.username.clone(),
            Secret(login.password.as_bytes().to_vec().into()),
        );
        (self, Some(login))
    }

    fn admits(&self, connect: &ConnectInfo) -> AuthResult {
        let Some(name) = connect.username() else {
            return AuthResult::NotAuthorized;
        };
        let given = connect.password().map(|p| p.as_ref()).unwrap_or_default();
        match self.0.get(name.as_ref() as &str) {
            Some(secret) if secret.matches(given) => AuthResult::Allow(false, None),
            _ => AuthResult::BadUsernameOrPassword,
        }
    }
}

impl fmt::Debug for Users {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.0.keys().collect();
        names.sort();
        f.debug_struct("Users")
            .field("names", &names)
            .field("passwords", &"<redacted>")
            .finish()
    }
}

/// The username and password the bridge's MQTT connections to the embedded
/// broker present (`MqttOptions::set_credentials`).
#[derive(Clone)]
pub struct Login {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Login")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// `2 * bytes` hex digits from the system's secure random source (the one
/// rustls uses).
fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut buf)
        .expect("the system's random source failed");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// rmqtt asks this hook about every CONNECT (the listener admits no
/// anonymous client once it is installed).
struct Check(Users);

#[async_trait]
impl Handler for Check {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(connect) => {
                (false, Some(HookResult::AuthResult(self.0.admits(connect))))
            }
            _ => (true, acc),
        }
    }
}

pub(super) async fn install(scx: &ServerContext, users: Users) {
    let register = scx.extends.hook_mgr().register();
    register
        .add(Type::ClientAuthenticate, Box::new(Check(users)))
        .await;
    register.start().await;
}
