//! Signed AWS requests on the fan-out's hot path, without the SDK's
//! per-request machinery: the SDK's own SigV4 signer (`aws-sigv4`) and its
//! HTTP connector (hyper, rustls, pooled connections), nothing in between.
//!
//! A fan-out sends thousands of identical requests that differ only in the
//! connection id: `@connections` posts, and Lambda `Invoke` calls for the
//! parts. Through a generated SDK client each one also builds a config bag,
//! resolves its endpoint from the rules, runs a dozen interceptors and a
//! retry classifier, and hashes the body again. Here a request is a URL,
//! a few headers and a body whose SHA-256 the caller computed once
//! ([`Body`]); signing it is two HMACs over a short canonical request.
//! Credentials come from the SDK's provider chain and are kept until five
//! minutes before they expire. Retries are the caller's: this module sends
//! one attempt, cut after its timeout.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::http::{
    HttpConnector, HttpConnectorSettings, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::identity::Identity;
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

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// The `x-amzn-errortype` header or the body's `__type`/`message`, for logs.
    pub error: Option<String>,
}

/// Signed requests to one AWS service.
#[derive(Debug, Clone)]
pub struct Signer {
    connector: SharedHttpConnector,
    credentials: SharedCredentialsProvider,
    cached: Arc<tokio::sync::RwLock<Option<Credentials>>>,
    region: String,
    /// The SigV4 signing name (`execute-api`, `lambda`).
    service: &'static str,
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
            region,
            service,
            counted_as,
            timeout,
            calls: calls.clone(),
        })
    }

    pub fn region(&self) -> &str {
        &self.region
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
        let identity: Identity = credentials.into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(self.service)
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| SendError::Invalid(e.to_string()))?
            .into();
        let uri: http::Uri = url
            .parse()
            .map_err(|e| SendError::Invalid(format!("{url}: {e}")))?;
        let host = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .ok_or_else(|| SendError::Invalid(format!("{url}: no host")))?;
        let mut signed_headers: Vec<(&str, &str)> = vec![("host", &host)];
        signed_headers.extend_from_slice(headers);
        let signable = SignableRequest::new(
            method,
            url,
            signed_headers.iter().copied(),
            SignableBody::Precomputed(body.sha256.to_string()),
        )
        .map_err(|e| SendError::Invalid(e.to_string()))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| SendError::Invalid(e.to_string()))?
            .into_parts();
        let mut request = http::Request::builder()
            .method(method)
            .uri(uri)
            .header("content-length", body.bytes.len());
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let mut request = request
            .body(SdkBody::from(body.bytes.clone()))
            .map_err(|e| SendError::Invalid(e.to_string()))?;
        instructions.apply_to_request_http1x(&mut request);
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
    fn a_body_hash_is_its_sha256() {
        let body = Body::new(Bytes::from_static(b""));
        assert_eq!(
            &*body.sha256,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
