//! Identifiers in the forms AWS hands them out: API Gateway's connection and
//! request ids (10 random bytes, base64: `L0SM9cOFvHcCIhw=`, so an id that
//! must be percent-encoded in a URL path is the normal case) and UUIDs
//! (Lambda request ids, the topic rule's `newuuid()`).

use base64::Engine;

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    for x in &mut b {
        *x = fastrand::u8(..);
    }
    b
}

/// An API Gateway connection or request id.
pub fn gateway_id() -> String {
    base64::engine::general_purpose::STANDARD.encode(random_bytes::<10>())
}

/// A random (version 4) UUID.
pub fn uuid() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let id = gateway_id();
        assert_eq!(id.len(), 16);
        assert!(id.ends_with('='));
        assert_ne!(gateway_id(), gateway_id());
        let u = uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"));
    }
}
