//! The device's message and how receivers read it back.
//!
//! A payload is exactly `size` bytes of valid JSON (so the bridge embeds it
//! verbatim as `data`, no re-encoding):
//!
//! ```text
//! {"run":1,"seq":42,"ts":1234567,"pad":"xxxx...xxxx"}
//! ```
//!
//! `run` is the bench phase, `seq` counts within the phase and `ts` is the
//! send time in microseconds since the bench's own start (one process sends
//! and receives, so one monotonic clock). Receivers find the header with one
//! substring search and parse three integers: no JSON parse per message, so
//! the load tool stays cheap on 2 cores.

use std::sync::LazyLock;

use memchr::memmem::Finder;

/// The smallest payload that holds the header with large numbers.
pub const MIN_SIZE: usize = 80;

static HEADER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"{\"run\":"));
static LAGGED: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"type\":\"lagged\",\"dropped\":"));

/// What a receiver reads from a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub run: u32,
    pub seq: u64,
    pub ts_us: u64,
}

/// Builds a payload of exactly `size` bytes (at least [`MIN_SIZE`]).
pub fn encode(stamp: Stamp, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size.max(MIN_SIZE));
    out.extend_from_slice(
        format!(
            "{{\"run\":{},\"seq\":{},\"ts\":{},\"pad\":\"",
            stamp.run, stamp.seq, stamp.ts_us
        )
        .as_bytes(),
    );
    let tail = b"\"}";
    let pad = size.saturating_sub(out.len() + tail.len());
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(tail);
    out
}

/// Finds the stamp in a payload, or in a bridge `message` frame that embeds
/// it.
pub fn decode(bytes: &[u8]) -> Option<Stamp> {
    let at = HEADER.find(bytes)? + b"{\"run\":".len();
    let (run, rest) = number(&bytes[at..])?;
    let rest = rest.strip_prefix(b",\"seq\":")?;
    let (seq, rest) = number(rest)?;
    let rest = rest.strip_prefix(b",\"ts\":")?;
    let (ts_us, _) = number(rest)?;
    Some(Stamp {
        run: u32::try_from(run).ok()?,
        seq,
        ts_us,
    })
}

/// The `dropped` count of a bridge `lagged` frame.
pub fn lagged(bytes: &[u8]) -> Option<u64> {
    let at = LAGGED.find(bytes)? + b"\"type\":\"lagged\",\"dropped\":".len();
    number(&bytes[at..]).map(|(n, _)| n)
}

fn number(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    let n = bytes[..digits]
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some((n, &bytes[digits..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_exact_size_valid_json() {
        let stamp = Stamp {
            run: 3,
            seq: 123_456,
            ts_us: 9_876_543_210,
        };
        let p = encode(stamp, 256);
        assert_eq!(p.len(), 256);
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["seq"], 123_456);
        assert_eq!(decode(&p), Some(stamp));
        let frame = format!(
            "{{\"type\":\"message\",\"channel\":\"bench/t\",\"data\":{}}}",
            String::from_utf8(p).unwrap()
        );
        assert_eq!(decode(frame.as_bytes()), Some(stamp));
    }

    #[test]
    fn large_numbers_fit_min_size() {
        let stamp = Stamp {
            run: u32::MAX,
            seq: u64::MAX / 10,
            ts_us: u64::MAX / 10,
        };
        let p = encode(stamp, MIN_SIZE);
        assert_eq!(p.len(), MIN_SIZE);
        assert_eq!(decode(&p), Some(stamp));
    }

    #[test]
    fn lagged_frames() {
        assert_eq!(lagged(br#"{"type":"lagged","dropped":17}"#), Some(17));
        assert_eq!(lagged(br#"{"type":"ack","id":1}"#), None);
        assert_eq!(decode(br#"{"type":"lagged","dropped":17}"#), None);
    }
}
