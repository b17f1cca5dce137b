//! Which web pages may open a WebSocket to the bridge (the `Origin` check).
//!
//! Browsers send `Origin` with every WebSocket handshake, and a WebSocket is
//! not bound by the same-origin policy: without this check, any page open in
//! a browser on the same host (or network) could read and publish every
//! channel of a bridge running with auth off. The rule (PROTOCOL.md, v1.1):
//!
//! * no `Origin` header (not a browser: `bridge sub`, devices' tools): allowed;
//! * auth on: any origin (the token is the credential);
//! * an origin the deployment lists (`--allowed-origin`, `*` for any);
//! * the bridge's own origin: the page it serves at `/`, i.e. an origin whose
//!   host is the request's `Host`, provided that host is an IP address or
//!   `localhost`. A DNS name is not taken on the `Host` header's word: with
//!   DNS rebinding, an attacker's name can point at the bridge and both
//!   headers would name the attacker. Behind a proxy with a name, list that
//!   origin.

use axum::http::{header, HeaderMap};

/// The deployment's allowed origins, normalised.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    any: bool,
    listed: Vec<String>,
}

impl Origins {
    pub fn new(allowed: &[String]) -> Self {
        Origins {
            any: allowed.iter().any(|o| o == "*"),
            listed: allowed
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        }
    }
}

/// Whether a handshake with these headers may proceed.
pub fn allowed(headers: &HeaderMap, origins: &Origins, auth_on: bool) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    if auth_on || origins.any {
        return true;
    }
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim().to_ascii_lowercase();
    if origins.listed.contains(&origin) {
        return true;
    }
    let Some(host) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    let Some(requested) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    host.eq_ignore_ascii_case(requested.trim()) && is_literal_host(host)
}

/// `host[:port]` names an IP address or `localhost`.
fn is_literal_host(authority: &str) -> bool {
    let host = if let Some(v6) = authority.strip_prefix('[') {
        match v6.split_once(']') {
            Some((h, _)) => return h.parse::<std::net::Ipv6Addr>().is_ok(),
            None => return false,
        }
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    host == "localhost" || host.parse::<std::net::Ipv4Addr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
        }
        h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        h
    }

    #[test]
    fn rules() {
        let none = Origins::default();
        let host = "127.0.0.1:8080";
        assert!(allowed(&headers(None, host), &none, false));
        assert!(allowed(
            &headers(Some("http://127.0.0.1:8080"), host),
            &none,
            false
        ));
        assert!(allowed(
            &headers(Some("http://localhost:8080"), "localhost:8080"),
            &none,
            false
        ));
        assert!(allowed(
            &headers(Some("http://[::1]:8080"), "[::1]:8080"),
            &none,
            false
        ));
        // Another page, or DNS rebinding (a name in both headers): refused.
        assert!(!allowed(
            &headers(Some("https://evil.example"), host),
            &none,
            false
        ));
        assert!(!allowed(
            &headers(Some("http://evil.example:8080"), "evil.example:8080"),
            &none,
            false
        ));
        assert!(!allowed(&headers(Some("null"), host), &none, false));
        assert!(!allowed(
            &headers(Some("http://127.0.0.1:9999"), host),
            &none,
            false
        ));
        // Auth on: the token decides.
        assert!(allowed(
            &headers(Some("https://evil.example"), host),
            &none,
            true
        ));
        // Listed origins, and '*'.
        let listed = Origins::new(&["https://Dash.Example.com/".into(), "null".into()]);
        assert!(allowed(
            &headers(Some("https://dash.example.com"), "bridge.internal"),
            &listed,
            false
        ));
        assert!(allowed(&headers(Some("null"), host), &listed, false));
        assert!(!allowed(
            &headers(Some("https://other.example.com"), host),
            &listed,
            false
        ));
        let any = Origins::new(&["*".into()]);
        assert!(allowed(&headers(Some("https://x.y"), host), &any, false));
    }
}
