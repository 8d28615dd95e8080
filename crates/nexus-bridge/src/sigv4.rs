//! AWS Signature Version 4 with the `aws-sigv4` crate: header signing,
//! session tokens, payload hashing.

use std::time::SystemTime;

use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SessionTokenMode, SignableBody,
    SignableRequest, SigningSettings, UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::error::BridgeError;

/// Where and how to sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigV4Scope {
    /// `us-east-1`, ...
    pub region: String,
    /// `execute-api`, `s3`, `dynamodb`, ...
    pub service: String,
}

/// The signer's knobs. [`SigV4Options::for_service`] picks what AWS expects
/// of each service; the others exist for services with their own rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SigV4Options {
    /// Percent-encode the path once (S3) instead of twice (every other service).
    pub single_encode_path: bool,
    /// Normalise `.`/`..` segments of the path (not for S3).
    pub normalize_path: bool,
    /// Put the session token in the signed headers (almost every service)
    /// rather than adding it after signing.
    pub sign_session_token: bool,
    /// Send `x-amz-content-sha256` with the payload's hash (S3 requires it).
    pub content_sha256_header: bool,
}

impl SigV4Options {
    /// What `service` expects: S3 signs its paths encoded once, unnormalised,
    /// with the payload hash in a header; every other service takes the defaults.
    pub fn for_service(service: &str) -> Self {
        let s3 = service == "s3";
        Self {
            single_encode_path: s3,
            normalize_path: !s3,
            sign_session_token: true,
            content_sha256_header: s3,
        }
    }
}

/// The AWS credentials of a connection (borrowed from its usage secrets).
#[derive(Clone, Copy)]
pub struct AwsKeys<'a> {
    /// Access key id.
    pub access_key: &'a str,
    /// Secret access key.
    pub secret_key: &'a str,
    /// Session token of temporary credentials.
    pub session_token: Option<&'a str>,
}

impl std::fmt::Debug for AwsKeys<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsKeys")
            .field("access_key", &self.access_key)
            .field("secret_key", &"[redacted]")
            .field("session_token", &self.session_token.map(|_| "[redacted]"))
            .finish()
    }
}

/// Headers never signed (besides `aws-sigv4`'s own: authorization,
/// user-agent, x-amzn-trace-id, transfer-encoding).
const UNSIGNED_HEADERS: &[&str] = &[
    "connection",
    "expect",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

fn failed(message: impl Into<String>) -> BridgeError {
    BridgeError::Strategy {
        strategy: "aws_sigv4".into(),
        message: message.into(),
    }
}

/// Signs a request at `time`, adding `authorization`, `x-amz-date` (and
/// `x-amz-security-token`, `x-amz-content-sha256` when they apply) to
/// `headers`. `url` is absolute; `body` is the payload (`None`: streamed,
/// signed as `UNSIGNED-PAYLOAD`, which only some services accept).
#[allow(clippy::too_many_arguments)]
pub fn sign_headers(
    method: &Method,
    url: &str,
    headers: &mut HeaderMap,
    body: Option<&[u8]>,
    keys: AwsKeys<'_>,
    scope: &SigV4Scope,
    options: SigV4Options,
    time: SystemTime,
) -> Result<(), BridgeError> {
    let identity = aws_credential_types::Credentials::new(
        keys.access_key,
        keys.secret_key,
        keys.session_token.map(str::to_string),
        None,
        "nexus-bridge",
    )
    .into();
    let mut settings = SigningSettings::default();
    // Hop-by-hop and proxy-rewritten headers change on the way: signing them
    // would break the signature (botocore leaves the same ones out).
    if let Some(excluded) = settings.excluded_headers.as_mut() {
        excluded.extend(
            UNSIGNED_HEADERS
                .iter()
                .map(|h| std::borrow::Cow::Borrowed(*h)),
        );
    }
    if options.single_encode_path {
        settings.percent_encoding_mode = PercentEncodingMode::Single;
    }
    if !options.normalize_path {
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    }
    if !options.sign_session_token {
        settings.session_token_mode = SessionTokenMode::Exclude;
    }
    if options.content_sha256_header {
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    }
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&scope.region)
        .name(&scope.service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| failed(e.to_string()))?
        .into();
    let mut pairs = Vec::with_capacity(headers.len());
    for (name, value) in headers.iter() {
        let value = value
            .to_str()
            .map_err(|_| failed(format!("header {name} is not text and cannot be signed")))?;
        pairs.push((name.as_str(), value));
    }
    let body = match body {
        Some(b) => SignableBody::Bytes(b),
        None => SignableBody::UnsignedPayload,
    };
    let signable = SignableRequest::new(method.as_str(), url, pairs.into_iter(), body)
        .map_err(|e| failed(e.to_string()))?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| failed(e.to_string()))?
        .into_parts();
    for (name, value) in instructions.headers() {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| failed(e.to_string()))?;
        let mut value = HeaderValue::from_str(value).map_err(|e| failed(e.to_string()))?;
        if name == http::header::AUTHORIZATION || name == "x-amz-security-token" {
            value.set_sensitive(true);
        }
        headers.insert(name, value);
    }
    Ok(())
}
