//! Channels: the rules for channel names (MQTT topics) and filters, and the
//! three relations everything else is built on.
//!
//! * [`matches()`]: does a filter match a topic (MQTT 3.1.1 §4.7, including the
//!   rule that a wildcard in the first level never matches a `$` topic);
//! * [`covers`]: does filter `a` match every topic filter `b` can match (the
//!   permission rule: `fleet/+/telemetry` allows `fleet/dev-1/telemetry`, not
//!   `fleet/#`);
//! * [`overlaps`]: is there a topic both filters match (what the broker-side
//!   cover must avoid, see [`crate::cover`]).
//!
//! Validation applies the AWS IoT Core limits (256 bytes, 8 levels) so a name
//! that works locally also works on AWS. A [`Prefix`] maps client channel names
//! to broker topics and back; clients never see it.

use std::fmt;

/// Longest channel name in bytes (AWS IoT Core topic limit).
pub const MAX_BYTES: usize = 256;
/// Most levels in a channel name (AWS IoT Core: 7 slashes).
pub const MAX_LEVELS: usize = 8;

/// Why a channel name or filter was refused; the text is what the client reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelError {
    Empty,
    TooLong(usize),
    TooDeep(usize),
    Nul,
    /// A control character or a Unicode non-character (MQTT 3.1.1 §1.5.3
    /// lets a broker drop the client that sends one).
    BadCharacter(char),
    WildcardInTopic,
    BadWildcard,
    HashNotLast,
    Reserved,
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChannelError::Empty => write!(f, "a channel cannot be empty"),
            ChannelError::TooLong(n) => {
                write!(
                    f,
                    "a channel is at most {MAX_BYTES} bytes (this one is {n})"
                )
            }
            ChannelError::TooDeep(n) => {
                write!(
                    f,
                    "a channel has at most {MAX_LEVELS} levels (this one has {n})"
                )
            }
            ChannelError::Nul => write!(f, "a channel cannot contain U+0000"),
            ChannelError::BadCharacter(c) => write!(
                f,
                "a channel cannot contain control characters or Unicode non-characters \
                 (found U+{:04X})",
                u32::from(*c)
            ),
            ChannelError::WildcardInTopic => {
                write!(f, "a publish topic cannot contain wildcards")
            }
            ChannelError::BadWildcard => write!(
                f,
                "a wildcard must be a whole level: '+' alone between slashes, '#' alone at the end"
            ),
            ChannelError::HashNotLast => write!(f, "'#' must be the last level of a filter"),
            ChannelError::Reserved => write!(
                f,
                "channels starting with '$' are reserved unless the deployment allows them"
            ),
        }
    }
}

impl std::error::Error for ChannelError {}

fn check_common(name: &str) -> Result<(), ChannelError> {
    if name.is_empty() {
        return Err(ChannelError::Empty);
    }
    if name.len() > MAX_BYTES {
        return Err(ChannelError::TooLong(name.len()));
    }
    if name.contains('\0') {
        return Err(ChannelError::Nul);
    }
    if let Some(c) = name.chars().find(|&c| is_forbidden_char(c)) {
        return Err(ChannelError::BadCharacter(c));
    }
    let levels = name.split('/').count();
    if levels > MAX_LEVELS {
        return Err(ChannelError::TooDeep(levels));
    }
    Ok(())
}

/// A code point no channel may contain (PROTOCOL.md, v1.1): a control
/// character (U+0001–U+001F, U+007F–U+009F; U+0000 has its own error) or a
/// Unicode non-character (U+FDD0–U+FDEF and every code point ending in FFFE
/// or FFFF). MQTT 3.1.1 §1.5.3 lets a broker drop a client that sends one, and
/// the bridge's broker session is shared by every client.
pub fn is_forbidden_char(c: char) -> bool {
    let u = u32::from(c);
    c.is_control() || (0xFDD0..=0xFDEF).contains(&u) || (u & 0xFFFE) == 0xFFFE
}

/// Checks a topic name (no wildcards). Reserved `$` names pass here; whether
/// they are allowed is the deployment's decision (see [`is_reserved`]).
pub fn validate_topic(topic: &str) -> Result<(), ChannelError> {
    check_common(topic)?;
    if topic.contains(['+', '#']) {
        return Err(ChannelError::WildcardInTopic);
    }
    Ok(())
}

/// Checks a topic filter: `+` is a whole level, `#` a whole last level.
pub fn validate_filter(filter: &str) -> Result<(), ChannelError> {
    check_common(filter)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        match level {
            "+" => {}
            "#" if levels.peek().is_some() => return Err(ChannelError::HashNotLast),
            "#" => {}
            _ if level.contains(['+', '#']) => return Err(ChannelError::BadWildcard),
            _ => {}
        }
    }
    Ok(())
}

/// Whether a valid filter has a wildcard level (`+` or `#`), so that it may
/// match more than one topic.
pub fn has_wildcards(filter: &str) -> bool {
    filter.split('/').any(|level| level == "+" || level == "#")
}

/// A name starting with `$` (`$SYS/...`, `$aws/...`) is reserved.
pub fn is_reserved(name: &str) -> bool {
    name.starts_with('$')
}

/// True when `filter` matches `topic`. Both are assumed valid.
pub fn matches(filter: &str, topic: &str) -> bool {
    if is_reserved(topic) && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// True when every topic `b` can match is matched by `a`: the permission rule.
pub fn covers(a: &str, b: &str) -> bool {
    // A first-level wildcard in `a` never matches `$` topics, which a literal
    // `$` first level in `b` does.
    if a.starts_with(['+', '#']) && is_reserved(b) {
        return false;
    }
    let mut fa = a.split('/');
    let mut fb = b.split('/');
    loop {
        match (fa.next(), fb.next()) {
            // '#' in `a` takes whatever is left of `b`, the parent level too.
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(x), Some(y)) if x == y => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// True when some topic is matched by both filters.
pub fn overlaps(a: &str, b: &str) -> bool {
    let first_a = a.split('/').next().unwrap_or("");
    let first_b = b.split('/').next().unwrap_or("");
    // A wildcard first level cannot meet a `$` literal first level.
    let wild = |l: &str| l == "+" || l == "#";
    if (wild(first_a) && is_reserved(first_b)) || (wild(first_b) && is_reserved(first_a)) {
        return false;
    }
    let mut fa = a.split('/');
    let mut fb = b.split('/');
    loop {
        match (fa.next(), fb.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(x), Some(y)) if x == y => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The most specific filter that covers both `a` and `b`: equal levels are
/// kept, differing levels become `+`, and a `#` or a length difference ends
/// the filter with `#`. Used to merge overlapping broker subscriptions.
pub fn generalize(a: &str, b: &str) -> String {
    let la: Vec<&str> = a.split('/').collect();
    let lb: Vec<&str> = b.split('/').collect();
    let mut out: Vec<&str> = Vec::with_capacity(la.len().max(lb.len()));
    let mut i = 0;
    loop {
        match (la.get(i), lb.get(i)) {
            (Some(&"#"), _) | (_, Some(&"#")) => {
                out.push("#");
                break;
            }
            (Some(x), Some(y)) if x == y => out.push(x),
            (Some(_), Some(_)) => out.push("+"),
            (None, None) => break,
            // One is longer: only '#' can take both lengths.
            _ => {
                out.push("#");
                break;
            }
        }
        i += 1;
    }
    out.join("/")
}

/// An optional topic prefix that maps client channels onto broker topics.
/// `fleet/d1` with prefix `tenant-a` is the MQTT topic `tenant-a/fleet/d1`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prefix(Option<String>);

impl Prefix {
    /// `prefix` without leading or trailing slashes; empty means none.
    pub fn new(prefix: Option<&str>) -> Result<Self, ChannelError> {
        match prefix.map(|p| p.trim_matches('/')) {
            None | Some("") => Ok(Prefix(None)),
            Some(p) => {
                validate_topic(p)?;
                Ok(Prefix(Some(p.to_string())))
            }
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        self.0.as_deref()
    }

    /// The broker name for a client channel (topic or filter).
    pub fn to_mqtt(&self, channel: &str) -> String {
        match &self.0 {
            None => channel.to_string(),
            Some(p) => format!("{p}/{channel}"),
        }
    }

    /// The client channel for a broker topic, or `None` when the topic is
    /// outside the prefix.
    pub fn to_channel<'a>(&self, topic: &'a str) -> Option<&'a str> {
        match &self.0 {
            None => Some(topic),
            Some(p) => topic.strip_prefix(p.as_str())?.strip_prefix('/'),
        }
    }

    /// Checks that the broker name built from `channel` still fits the limits.
    pub fn check_fits(&self, channel: &str) -> Result<(), ChannelError> {
        if self.0.is_none() {
            return Ok(());
        }
        let full = self.to_mqtt(channel);
        if full.len() > MAX_BYTES {
            return Err(ChannelError::TooLong(full.len()));
        }
        let levels = full.split('/').count();
        if levels > MAX_LEVELS {
            return Err(ChannelError::TooDeep(levels));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        assert!(validate_topic("fleet/dev-1/telemetry").is_ok());
        assert!(validate_topic("a//b").is_ok());
        assert!(validate_topic("/").is_ok());
        assert_eq!(validate_topic(""), Err(ChannelError::Empty));
        assert_eq!(validate_topic("a/+"), Err(ChannelError::WildcardInTopic));
        assert_eq!(validate_topic("a/#"), Err(ChannelError::WildcardInTopic));
        assert_eq!(validate_topic("a\0b"), Err(ChannelError::Nul));
        for bad in [
            '\u{1}', '\u{7}', '\u{1f}', '\u{7f}', '\u{9f}', '\u{fdd0}', '\u{fdef}',
        ]
        .into_iter()
        .chain(['\u{fffe}', '\u{ffff}', '\u{1fffe}', '\u{10ffff}'])
        {
            let name = format!("fleet/dev{bad}/commands");
            assert_eq!(validate_topic(&name), Err(ChannelError::BadCharacter(bad)));
            assert_eq!(validate_filter(&name), Err(ChannelError::BadCharacter(bad)));
        }
        for ok in [
            '\u{a0}',
            '\u{fdcf}',
            '\u{fdf0}',
            '\u{fffd}',
            '\u{1f600}',
            'é',
        ] {
            assert!(validate_topic(&format!("a/{ok}")).is_ok(), "{ok:?}");
        }
        assert_eq!(
            validate_topic(&"x".repeat(257)),
            Err(ChannelError::TooLong(257))
        );
        assert!(validate_topic(&"x".repeat(256)).is_ok());
        assert!(validate_topic("1/2/3/4/5/6/7/8").is_ok());
        assert_eq!(
            validate_topic("1/2/3/4/5/6/7/8/9"),
            Err(ChannelError::TooDeep(9))
        );
    }

    #[test]
    fn filters() {
        for ok in ["#", "+", "a/#", "+/+/t", "a/+/#", "$SYS/#"] {
            assert!(validate_filter(ok).is_ok(), "{ok}");
            assert!(has_wildcards(ok), "{ok}");
        }
        assert!(!has_wildcards("a/b"));
        assert_eq!(validate_filter("a/#/b"), Err(ChannelError::HashNotLast));
        assert_eq!(validate_filter("a/b#"), Err(ChannelError::BadWildcard));
        assert_eq!(validate_filter("a+/b"), Err(ChannelError::BadWildcard));
        assert_eq!(validate_filter(""), Err(ChannelError::Empty));
    }

    #[test]
    fn matching() {
        assert!(matches("fleet/+/telemetry", "fleet/dev-7/telemetry"));
        assert!(!matches("fleet/+/telemetry", "fleet/dev-7/x/telemetry"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(matches("+", ""));
        assert!(matches("a/+", "a/"));
        assert!(!matches("a/b", "a"));
    }

    #[test]
    fn covering() {
        assert!(covers("fleet/+/telemetry", "fleet/dev-1/telemetry"));
        assert!(covers("fleet/+/telemetry", "fleet/+/telemetry"));
        assert!(!covers("fleet/+/telemetry", "fleet/#"));
        assert!(covers("a/#", "a"));
        assert!(covers("a/#", "a/+/#"));
        assert!(!covers("a/+/#", "a/#"));
        assert!(!covers("#", "$SYS/x"));
        assert!(covers("#", "+/x"));
        assert!(covers("$SYS/#", "$SYS/x"));
    }

    #[test]
    fn overlapping_and_generalizing() {
        assert!(overlaps("fleet/+/t", "+/d1/t"));
        assert_eq!(generalize("fleet/+/t", "+/d1/t"), "+/+/t");
        assert!(overlaps("a/#", "a"));
        assert_eq!(generalize("a/#", "a"), "a/#");
        assert_eq!(generalize("a/#", "+/b/c"), "+/#");
        assert!(!overlaps("a/b", "a/b/c"));
        assert!(!overlaps("#", "$SYS/x"));
        assert!(!overlaps("a/+", "b/+"));
    }

    #[test]
    fn prefix() {
        let p = Prefix::new(Some("/tenant/")).unwrap();
        assert_eq!(p.to_mqtt("a/b"), "tenant/a/b");
        assert_eq!(p.to_channel("tenant/a/b"), Some("a/b"));
        assert_eq!(p.to_channel("tenantx/a"), None);
        assert_eq!(p.to_channel("other/a"), None);
        assert_eq!(
            p.check_fits("1/2/3/4/5/6/7/8"),
            Err(ChannelError::TooDeep(9))
        );
        assert_eq!(Prefix::new(Some("")).unwrap(), Prefix::default());
        assert!(Prefix::new(Some("a/+")).is_err());
    }
}
