//! Permissions: what one connection may subscribe to and publish to, as MQTT
//! filters. Built from a token's `channels` claim (with `{sub}` replaced by the
//! token's subject) or "everything" when auth is off.
//!
//! The rules: a subscribe to filter F is allowed when one allowed filter
//! covers F ([`channel::covers`]); a publish to topic T when T matches one
//! allowed publish filter.

use serde::{Deserialize, Serialize};

use crate::channel;

/// One direction's grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    /// Every channel (auth off). Reserved `$` channels still need the
    /// deployment to name them.
    All,
    /// These filters only.
    Filters(Vec<String>),
}

impl Grant {
    fn allows(&self, channel: &str, relation: fn(&str, &str) -> bool) -> bool {
        match self {
            Grant::All => true,
            Grant::Filters(filters) => filters.iter().any(|f| relation(f, channel)),
        }
    }

    /// Whether a filter of this grant names `channel` explicitly.
    fn names(&self, channel: &str, relation: fn(&str, &str) -> bool) -> bool {
        matches!(self, Grant::Filters(_)) && self.allows(channel, relation)
    }
}

/// What one connection may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permissions {
    /// The token's subject, for logs; `None` when anonymous.
    pub subject: Option<String>,
    pub subscribe: Grant,
    pub publish: Grant,
}

/// The `channels` claim of a token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelsClaim {
    #[serde(default)]
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub publish: Vec<String>,
}

impl Permissions {
    /// Auth off: everything (but reserved channels) is allowed.
    pub fn allow_all() -> Self {
        Permissions {
            subject: None,
            subscribe: Grant::All,
            publish: Grant::All,
        }
    }

    /// From a token's claims. `{sub}` in a pattern is the subject; a pattern
    /// that is not a valid filter after substitution, or a subject that is
    /// not a plain level (empty, starting with `$`, or containing `/`, `+`,
    /// `#` or a character no channel may hold), grants nothing, so a crafted
    /// subject can neither widen a pattern nor name a reserved channel.
    pub fn from_claims(subject: Option<&str>, channels: &ChannelsClaim) -> Self {
        let expand = |patterns: &[String]| -> Vec<String> {
            patterns
                .iter()
                .filter_map(|p| substitute(p, subject))
                .filter(|f| channel::validate_filter(f).is_ok())
                .collect()
        };
        Permissions {
            subject: subject.map(str::to_string),
            subscribe: Grant::Filters(expand(&channels.subscribe)),
            publish: Grant::Filters(expand(&channels.publish)),
        }
    }

    pub fn can_subscribe(&self, filter: &str) -> bool {
        self.subscribe.allows(filter, channel::covers)
    }

    pub fn can_publish(&self, topic: &str) -> bool {
        self.publish.allows(topic, channel::matches)
    }

    /// Whether these permissions name a reserved channel explicitly.
    pub fn names_for_subscribe(&self, filter: &str) -> bool {
        self.subscribe.names(filter, channel::covers)
    }

    pub fn names_for_publish(&self, topic: &str) -> bool {
        self.publish.names(topic, channel::matches)
    }
}

fn substitute(pattern: &str, subject: Option<&str>) -> Option<String> {
    if !pattern.contains("{sub}") {
        return Some(pattern.to_string());
    }
    let sub = subject?;
    if sub.is_empty()
        || channel::is_reserved(sub)
        || sub.contains(['/', '+', '#'])
        || sub
            .chars()
            .any(|c| c == '\0' || channel::is_forbidden_char(c))
    {
        return None;
    }
    Some(pattern.replace("{sub}", sub))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(sub: &[&str], publ: &[&str]) -> ChannelsClaim {
        ChannelsClaim {
            subscribe: sub.iter().map(|s| s.to_string()).collect(),
            publish: publ.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn subscribe_rule() {
        let p = Permissions::from_claims(
            Some("user-42"),
            &claims(
                &["fleet/+/telemetry", "users/{sub}/#"],
                &["fleet/+/commands"],
            ),
        );
        assert!(p.can_subscribe("fleet/dev-1/telemetry"));
        assert!(p.can_subscribe("fleet/+/telemetry"));
        assert!(!p.can_subscribe("fleet/#"));
        assert!(!p.can_subscribe("#"));
        assert!(p.can_subscribe("users/user-42/inbox"));
        assert!(p.can_subscribe("users/user-42/#"));
        assert!(!p.can_subscribe("users/user-43/inbox"));
        assert!(!p.can_subscribe("users/+/inbox"));
        assert!(p.can_publish("fleet/dev-7/commands"));
        assert!(!p.can_publish("fleet/dev-7/telemetry"));
    }

    #[test]
    fn crafted_subject_grants_nothing() {
        for sub in ["#", "a/b", "+", "", "$SYS", "dev\u{7}", "x\u{fffe}"] {
            let p = Permissions::from_claims(Some(sub), &claims(&["users/{sub}/#"], &[]));
            assert!(!p.can_subscribe("users/x/y"), "{sub}");
            assert!(!p.can_subscribe(&format!("users/{sub}/y")), "{sub}");
        }
        // `{sub}/#` with the subject `$SYS` would otherwise name `$SYS/#`.
        let p = Permissions::from_claims(Some("$SYS"), &claims(&["{sub}/#"], &["{sub}/x"]));
        assert!(!p.names_for_subscribe("$SYS/x") && !p.can_subscribe("$SYS/x"));
        assert!(!p.names_for_publish("$SYS/x") && !p.can_publish("$SYS/x"));
        let p = Permissions::from_claims(None, &claims(&["users/{sub}/#", "a/#/b", "ok"], &[]));
        assert_eq!(p.subscribe, Grant::Filters(vec!["ok".into()]));
    }

    #[test]
    fn reserved_needs_naming() {
        let all = Permissions::allow_all();
        assert!(!all.names_for_subscribe("$SYS/x"));
        let p = Permissions::from_claims(None, &claims(&["$SYS/#", "#"], &[]));
        assert!(p.names_for_subscribe("$SYS/broker/load"));
        assert!(!Permissions::from_claims(None, &claims(&["#"], &[])).names_for_subscribe("$SYS/x"));
    }
}
