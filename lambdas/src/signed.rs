//! Signed AWS requests on the fan-out's hot path, without the SDK's
//! per-request machinery: SigV4 over the SDK's HTTP connector (hyper,
//! rustls, pooled connections), nothing in between.
//!
//! A fan-out sends thousands of requests that differ only in the connection
//! id: `@connections` posts, and Lambda `Invoke` calls for the parts. Through
//! a generated SDK client each one also builds a config bag, resolves its
//! endpoint from the rules, runs a dozen interceptors (the user agent alone
//! cost more than the HTTP exchange) and a retry classifier, hashes the body
//! again and derives the signing key again. Here a request is a URL, a few
//! headers and a body whose SHA-256 the caller computed once ([`Body`]).
//! Signing it is one SHA-256 of a short canonical request and one HMAC with
//! a signing key derived once per day (the SDK's own signer crate,
//! `aws-sigv4`, derives the key and computes the HMAC; this module writes
//! the canonical request for its few request shapes, and a test holds it to
//! what `aws-sigv4` signs for the same request). Credentials come from the
//! SDK's provider chain and are kept until five minutes before they expire.
//! Retries are the caller's: this module sends one attempt, cut after its
//! timeout. Measured with `benches/post_profile.rs`: see the README.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::http::{
    HttpConnector, HttpConnectorSettings, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_types::body::SdkBody;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::calls::Calls;

/// Refresh credentials this long before they expire.
const REFRESH_BEFORE: Duration = Duration::from_secs(300);

/// Why a request got no HTTP answer (or could not be made).
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    /// No answer within the attempt timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed or dropped.
    #[error("{0}")]
    Dispatch(String),
    /// The request could not be built or signed (a bug or bad settings).
    #[error("{0}")]
    Invalid(String),
}

/// A body and its SHA-256, computed once however often it is sent.
#[derive(Debug, Clone)]
pub struct Body {
    bytes: Bytes,
    sha256: Arc<str>,
}

impl Body {
    pub fn new(bytes: Bytes) -> Body {
        let sha256 = hex(&Sha256::digest(&bytes)[..]);
        Body {
            bytes,
            sha256: sha256.into(),
        }
    }

    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// Percent-encodes one path segment: everything but RFC 3986's unreserved
/// characters (as the SDK encodes a path label).
pub fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len() + 8);
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// SigV4's canonical URI of a path as sent: each segment percent-encoded
/// again (every service but S3 signs the doubly encoded path).
fn canonical_path(path: &str) -> String {
    if path.is_empty() {
        return "/".to_string();
    }
    path.split('/')
        .map(encode_segment)
        .collect::<Vec<_>>()
        .join("/")
}

/// SigV4's canonical query string: parameters sorted (this module's
/// requests have none, or already encoded ones).
fn canonical_query(query: &str) -> String {
    let mut params: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    params.sort();
    params
        .iter()
        .map(|p| match p.split_once('=') {
            Some(_) => p.to_string(),
            None => format!("{p}="),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// (`YYYYMMDD`, `YYYYMMDDTHHMMSSZ`) of `at`, in UTC.
fn amz_dates(at: SystemTime) -> (String, String) {
    let secs = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let day = format!("{y:04}{m:02}{d:02}");
    let time = format!(
        "{day}T{:02}{:02}{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    );
    (day, time)
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// The `x-amzn-errortype` header or the body's `__type`/`message`, for logs.
    pub error: Option<String>,
}

/// SigV4 for one region and service, with the signing key of the day.
#[derive(Debug)]
pub struct SigV4 {
    region: String,
    /// The SigV4 signing name (`execute-api`, `lambda`).
    service: &'static str,
    /// The signing key of (access key id, UTC day): it changes once a day.
    key: std::sync::Mutex<Option<(String, String, Vec<u8>)>>,
}

impl SigV4 {
    pub fn new(region: &str, service: &'static str) -> SigV4 {
        SigV4 {
            region: region.to_string(),
            service,
            key: std::sync::Mutex::new(None),
        }
    }

    /// The headers that sign a request (SigV4, signature in the
    /// `authorization` header): `x-amz-date`, `x-amz-security-token` (with
    /// temporary credentials) and `authorization`. `headers` are signed too.
    #[allow(clippy::too_many_arguments)]
    pub fn headers(
        &self,
        credentials: &Credentials,
        now: SystemTime,
        method: &str,
        uri: &http::Uri,
        host: &str,
        headers: &[(&str, &str)],
        body: &Body,
    ) -> Vec<(&'static str, String)> {
        let (day, amz_date) = amz_dates(now);
        let token = credentials.session_token();
        // Every signed header, lowercase and sorted.
        let mut signed: Vec<(String, &str)> = vec![
            ("host".to_string(), host),
            ("x-amz-date".to_string(), amz_date.as_str()),
        ];
        if let Some(token) = token {
            signed.push(("x-amz-security-token".to_string(), token));
        }
        for (k, v) in headers {
            signed.push((k.to_ascii_lowercase(), v.trim()));
        }
        signed.sort();
        let names: Vec<&str> = signed.iter().map(|(k, _)| k.as_str()).collect();
        let names = names.join(";");
        let mut canonical = String::with_capacity(512);
        canonical.push_str(method);
        canonical.push('\n');
        canonical.push_str(&canonical_path(uri.path()));
        canonical.push('\n');
        canonical.push_str(&canonical_query(uri.query().unwrap_or("")));
        canonical.push('\n');
        for (k, v) in &signed {
            canonical.push_str(k);
            canonical.push(':');
            canonical.push_str(v);
            canonical.push('\n');
        }
        canonical.push('\n');
        canonical.push_str(&names);
        canonical.push('\n');
        canonical.push_str(&body.sha256);
        let scope = format!("{day}/{}/{}/aws4_request", self.region, self.service);
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
            hex(&Sha256::digest(canonical.as_bytes())[..])
        );
        let signature = {
            let mut cached = self.key.lock().unwrap_or_else(|e| e.into_inner());
            let akid = credentials.access_key_id();
            let fresh = matches!(cached.as_ref(), Some((a, d, _)) if a == akid && d == &day);
            if !fresh {
                let key = v4::generate_signing_key(
                    credentials.secret_access_key(),
                    now,
                    &self.region,
                    self.service,
                );
                *cached = Some((akid.to_string(), day.clone(), key.as_ref().to_vec()));
            }
            let key = &cached.as_ref().expect("set above").2;
            v4::calculate_signature(key, string_to_sign.as_bytes())
        };
        let mut out = vec![("x-amz-date", amz_date.clone())];
        if let Some(token) = token {
            out.push(("x-amz-security-token", token.to_string()));
        }
        out.push((
            "authorization",
            format!(
                "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={names}, Signature={signature}",
                credentials.access_key_id()
            ),
        ));
        out
    }
}

/// Signed requests to one AWS service.
#[derive(Debug, Clone)]
pub struct Signer {
    connector: SharedHttpConnector,
    credentials: SharedCredentialsProvider,
    cached: Arc<tokio::sync::RwLock<Option<Credentials>>>,
    sigv4: Arc<SigV4>,
    /// The SDK's name for the service, for [`Calls`].
    counted_as: &'static str,
    timeout: Duration,
    calls: Calls,
}

impl Signer {
    /// A signer for `service` in the SDK configuration's region, with its
    /// credentials, sending through the SDK's default HTTPS connector; each
    /// request counted in `calls` under the SDK's name for the service
    /// (`counted_as`) and the operation [`Self::send`] names.
    pub fn new(
        sdk: &aws_config::SdkConfig,
        service: &'static str,
        counted_as: &'static str,
        timeout: Duration,
        calls: &Calls,
    ) -> Result<Signer, SendError> {
        let settings = HttpConnectorSettings::builder()
            .connect_timeout(Duration::from_secs(3))
            .read_timeout(timeout)
            .build();
        let connector = aws_smithy_http_client::default_connector(
            &settings,
            Some(
                aws_smithy_async::rt::sleep::default_async_sleep().ok_or_else(|| {
                    SendError::Invalid("no async sleep (tokio) for the HTTP client".into())
                })?,
            ),
        )
        .ok_or_else(|| SendError::Invalid("no default HTTPS connector".into()))?;
        let credentials = sdk
            .credentials_provider()
            .ok_or_else(|| SendError::Invalid("no AWS credentials provider".into()))?;
        let region = sdk
            .region()
            .map(|r| r.to_string())
            .ok_or_else(|| SendError::Invalid("no AWS region (AWS_REGION)".into()))?;
        Ok(Signer {
            connector,
            credentials,
            cached: Arc::default(),
            sigv4: Arc::new(SigV4::new(&region, service)),
            counted_as,
            timeout,
            calls: calls.clone(),
        })
    }

    pub fn region(&self) -> &str {
        &self.sigv4.region
    }

    async fn credentials(&self) -> Result<Credentials, SendError> {
        let fresh = |c: &Credentials| {
            c.expiry()
                .is_none_or(|at| at > SystemTime::now() + REFRESH_BEFORE)
        };
        if let Some(c) = self.cached.read().await.as_ref().filter(|c| fresh(c)) {
            return Ok(c.clone());
        }
        let mut cached = self.cached.write().await;
        if let Some(c) = cached.as_ref().filter(|c| fresh(c)) {
            return Ok(c.clone());
        }
        let c = self
            .credentials
            .provide_credentials()
            .await
            .map_err(|e| SendError::Invalid(format!("no AWS credentials: {e}")))?;
        *cached = Some(c.clone());
        Ok(c)
    }

    /// Sends one signed `method` request to `url` (already percent-encoded)
    /// with `headers` and `body`: its status, or why there is none.
    /// `operation` is the API operation's name, for [`Calls`].
    pub async fn send(
        &self,
        operation: &str,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &Body,
    ) -> Result<Answer, SendError> {
        let credentials = self.credentials().await?;
        let uri: http::Uri = url
            .parse()
            .map_err(|e| SendError::Invalid(format!("{url}: {e}")))?;
        let host = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .ok_or_else(|| SendError::Invalid(format!("{url}: no host")))?;
        let now = SystemTime::now();
        let signed = self
            .sigv4
            .headers(&credentials, now, method, &uri, &host, headers, body);
        let mut request = http::Request::builder()
            .method(method)
            .uri(uri)
            .header("content-length", body.bytes.len());
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        for (k, v) in &signed {
            request = request.header(*k, v.as_str());
        }
        let request = request
            .body(SdkBody::from(body.bytes.clone()))
            .map_err(|e| SendError::Invalid(e.to_string()))?;
        let request =
            HttpRequest::try_from(request).map_err(|e| SendError::Invalid(e.to_string()))?;
        self.calls
            .record_request(self.counted_as, operation, &request);
        let call = self.connector.call(request);
        let response = match tokio::time::timeout(self.timeout, call).await {
            Err(_) => return Err(SendError::Timeout(self.timeout)),
            Ok(Err(e)) => return Err(SendError::Dispatch(e.to_string())),
            Ok(Ok(r)) => r,
        };
        let status = response.status().as_u16();
        let error_type = response
            .headers()
            .get("x-amzn-errortype")
            .map(|t| t.split(':').next().unwrap_or(t).to_string());
        // Read to the end, so the connection goes back to the pool.
        let body = aws_smithy_types::byte_stream::ByteStream::new(response.into_body())
            .collect()
            .await
            .map(|b| b.into_bytes())
            .unwrap_or_default();
        let error = match status {
            200..=299 => None,
            _ => Some(match error_type {
                Some(t) => t,
                None => format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                ),
            }),
        };
        Ok(Answer { status, error })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded_as_the_sdk_encodes_labels() {
        assert_eq!(encode_segment("L0SM9cOFvHcCIhw="), "L0SM9cOFvHcCIhw%3D");
        assert_eq!(encode_segment("a/b c+d~_.-"), "a%2Fb%20c%2Bd~_.-");
        assert_eq!(encode_segment("é"), "%C3%A9");
    }

    #[test]
    fn dates_are_utc_calendar_dates() {
        let at = |secs: u64| amz_dates(std::time::UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), ("19700101".into(), "19700101T000000Z".into()));
        assert_eq!(
            at(1_440_938_160),
            ("20150830".into(), "20150830T123600Z".into())
        );
        assert_eq!(
            at(951_825_599),
            ("20000229".into(), "20000229T115959Z".into())
        );
        assert_eq!(
            at(4_102_444_799),
            ("20991231".into(), "20991231T235959Z".into())
        );
    }

    /// The same request signed here and by `aws-sigv4`'s general signer (the
    /// one the SDK clients use): the same headers, to the byte.
    #[test]
    fn signatures_are_the_sdk_signers() {
        use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
        use aws_smithy_runtime_api::client::identity::Identity;
        let with_token = Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            Some("IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJH".into()),
            None,
            "test",
        );
        let without = Credentials::new("AKID2", "secret2", None, None, "test");
        let post = Body::new(Bytes::from_static(
            br#"{"type":"message","channel":"a/b","data":1}"#,
        ));
        let empty = Body::new(Bytes::new());
        // (method, url, extra signed headers, body, credentials, service)
        type Case<'a> = (
            &'a str,
            &'a str,
            Vec<(&'a str, &'a str)>,
            &'a Body,
            &'a Credentials,
            &'static str,
        );
        let cases: Vec<Case> = vec![
            (
                "POST",
                "https://abc123.execute-api.eu-west-1.amazonaws.com/prod/@connections/L0SM9cOFvHcCIhw%3D",
                vec![],
                &post,
                &with_token,
                "execute-api",
            ),
            (
                "DELETE",
                "https://abc123.execute-api.eu-west-1.amazonaws.com/prod/@connections/a%2Fb%20c",
                vec![],
                &empty,
                &without,
                "execute-api",
            ),
            (
                "POST",
                "https://lambda.eu-west-1.amazonaws.com/2015-03-31/functions/stack-FanoutFunction-AbC/invocations",
                vec![("content-type", "application/json"), ("x-amz-invocation-type", "Event")],
                &post,
                &with_token,
                "lambda",
            ),
            (
                "GET",
                "http://127.0.0.1:8080/retainedMessage?nextToken=a%2Fb&maxResults=200",
                vec![],
                &empty,
                &with_token,
                "iotdata",
            ),
        ];
        for day in [0u64, 1, 400] {
            let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + day * 86_400);
            for (method, url, headers, body, creds, service) in &cases {
                let uri: http::Uri = url.parse().unwrap();
                let host = uri.authority().unwrap().as_str().to_string();
                let ours = SigV4::new("eu-west-1", service)
                    .headers(creds, now, method, &uri, &host, headers, body);
                let identity: Identity = (*creds).clone().into();
                let params = aws_sigv4::sign::v4::SigningParams::builder()
                    .identity(&identity)
                    .region("eu-west-1")
                    .name(service)
                    .time(now)
                    .settings(SigningSettings::default())
                    .build()
                    .unwrap()
                    .into();
                let mut all: Vec<(&str, &str)> = vec![("host", &host)];
                all.extend(headers.iter().copied());
                let signable = SignableRequest::new(
                    method,
                    *url,
                    all.into_iter(),
                    SignableBody::Precomputed(body.sha256.to_string()),
                )
                .unwrap();
                let (instructions, _) = sign(signable, &params).unwrap().into_parts();
                let mut theirs: Vec<(String, String)> = instructions
                    .headers()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                theirs.sort();
                let mut ours: Vec<(String, String)> =
                    ours.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                ours.sort();
                assert_eq!(ours, theirs, "{method} {url}");
            }
        }
    }

    #[test]
    fn a_body_hash_is_its_sha256() {
        let body = Body::new(Bytes::from_static(b""));
        assert_eq!(
            &*body.sha256,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
