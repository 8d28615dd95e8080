//! Applying a connection's strategy to a request (SPEC §5): `oauth2`,
//! `header`, `query_param`, `basic_auth`, `aws_sigv4`, `hmac_payload`. An
//! unknown strategy is an error, never a silent no-op. Every header value
//! carrying a secret is marked sensitive (hidden from `http`'s `Debug`).

use std::time::SystemTime;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::credentials::Credentials;
use crate::error::BridgeError;
use crate::sigv4::{self, AwsKeys, SigV4Options, SigV4Scope};

/// What a strategy needs of a request, for both `http` and `reqwest` requests.
trait Target {
    fn method(&self) -> &Method;
    fn url(&self) -> Result<String, BridgeError>;
    fn headers_mut(&mut self) -> &mut HeaderMap;
    /// The payload, if it is in memory (`Some(&[])` for none).
    fn body(&self) -> Option<&[u8]>;
    fn add_query(&mut self, name: &str, value: &str) -> Result<(), BridgeError>;
}

/// The URI of an `http` request, absolute (SigV4 needs the host).
fn absolute(uri: &http::Uri) -> Result<String, BridgeError> {
    if uri.scheme().is_none() || uri.authority().is_none() {
        return Err(BridgeError::Strategy {
            strategy: "aws_sigv4".into(),
            message: "the request URI must be absolute (scheme and host)".into(),
        });
    }
    Ok(uri.to_string())
}

/// `uri` with `name=value` appended to its query.
fn with_query(uri: &http::Uri, name: &str, value: &str) -> Result<http::Uri, BridgeError> {
    let refused = || BridgeError::Strategy {
        strategy: "query_param".into(),
        message: "the request URI cannot take the parameter".into(),
    };
    let mut parts = uri.clone().into_parts();
    let (path, query) = match &parts.path_and_query {
        Some(pq) => (pq.path().to_string(), pq.query().map(str::to_string)),
        None => ("/".to_string(), None),
    };
    let pair = url::form_urlencoded::Serializer::new(String::new())
        .append_pair(name, value)
        .finish();
    let pq = match query {
        Some(q) if !q.is_empty() => format!("{path}?{q}&{pair}"),
        _ => format!("{path}?{pair}"),
    };
    parts.path_and_query = Some(pq.parse().map_err(|_| refused())?);
    http::Uri::from_parts(parts).map_err(|_| refused())
}

impl<B: AsRef<[u8]>> Target for http::Request<B> {
    fn method(&self) -> &Method {
        http::Request::method(self)
    }
    fn url(&self) -> Result<String, BridgeError> {
        absolute(self.uri())
    }
    fn headers_mut(&mut self) -> &mut HeaderMap {
        http::Request::headers_mut(self)
    }
    fn body(&self) -> Option<&[u8]> {
        Some(http::Request::body(self).as_ref())
    }
    fn add_query(&mut self, name: &str, value: &str) -> Result<(), BridgeError> {
        *self.uri_mut() = with_query(self.uri(), name, value)?;
        Ok(())
    }
}

/// A request whose body is not in memory (a stream: gRPC, a WebSocket
/// upgrade): `aws_sigv4` signs it `UNSIGNED-PAYLOAD`, `hmac_payload` refuses.
impl Target for http::request::Parts {
    fn method(&self) -> &Method {
        &self.method
    }
    fn url(&self) -> Result<String, BridgeError> {
        absolute(&self.uri)
    }
    fn headers_mut(&mut self) -> &mut HeaderMap {
        &mut self.headers
    }
    fn body(&self) -> Option<&[u8]> {
        None
    }
    fn add_query(&mut self, name: &str, value: &str) -> Result<(), BridgeError> {
        self.uri = with_query(&self.uri, name, value)?;
        Ok(())
    }
}

impl Target for reqwest::Request {
    fn method(&self) -> &Method {
        reqwest::Request::method(self)
    }
    fn url(&self) -> Result<String, BridgeError> {
        Ok(reqwest::Request::url(self).to_string())
    }
    fn headers_mut(&mut self) -> &mut HeaderMap {
        reqwest::Request::headers_mut(self)
    }
    fn body(&self) -> Option<&[u8]> {
        match reqwest::Request::body(self) {
            None => Some(&[]),
            Some(b) => b.as_bytes(),
        }
    }
    fn add_query(&mut self, name: &str, value: &str) -> Result<(), BridgeError> {
        self.url_mut().query_pairs_mut().append_pair(name, value);
        Ok(())
    }
}

/// Applies `creds` to an `http` request (absolute URI; body in memory).
pub fn apply_http<B: AsRef<[u8]>>(
    creds: &Credentials,
    req: &mut http::Request<B>,
) -> Result<(), BridgeError> {
    apply(creds, req, SystemTime::now())
}

/// Applies `creds` to the head of a request whose body is streamed (see
/// the `Target` impl for `Parts`).
pub fn apply_parts(
    creds: &Credentials,
    parts: &mut http::request::Parts,
) -> Result<(), BridgeError> {
    apply(creds, parts, SystemTime::now())
}

/// Applies `creds` to a `reqwest` request. `aws_sigv4` needs an in-memory
/// body (a stream is signed `UNSIGNED-PAYLOAD`), `hmac_payload` requires one.
pub fn apply_reqwest(creds: &Credentials, req: &mut reqwest::Request) -> Result<(), BridgeError> {
    apply(creds, req, SystemTime::now())
}

/// The header an `oauth2`, `header` or `basic_auth` strategy sets (kept
/// in the credentials: every request sets the same one), or why not.
fn simple_header(creds: &Credentials) -> Result<(HeaderName, HeaderValue), String> {
    let s = &creds.strategy;
    let config = |name: &str| config_field(s, name);
    let secret = |name: &str| secret_of(creds, name);
    let value = match s.kind.as_str() {
        "oauth2" => format!("Bearer {}", secret("access_token")?),
        "header" => format!(
            "{}{}",
            s.field("value_prefix").unwrap_or(""),
            secret(config("credential_field")?)?
        ),
        _ => {
            let user = secret(config("username_field")?)?;
            let pass = secret(config("password_field")?)?;
            let encoded =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            format!("Basic {encoded}")
        }
    };
    let name = match s.kind.as_str() {
        "header" => header_name(config("header_name")?)?,
        _ => http::header::AUTHORIZATION,
    };
    Ok((name, sensitive_value(&value)?))
}

// What a strategy needs, or why it cannot be had (the message of a
// `BridgeError::Strategy`).

fn config_field<'a>(s: &'a crate::Strategy, name: &str) -> Result<&'a str, String> {
    s.field(name)
        .ok_or_else(|| format!("config field '{name}' is missing"))
}

fn secret_of<'a>(creds: &'a Credentials, name: &str) -> Result<&'a str, String> {
    creds
        .secret(name)
        .map(|v| v.expose())
        .ok_or_else(|| format!("the credentials have no '{name}'"))
}

fn sensitive_value(value: &str) -> Result<HeaderValue, String> {
    let mut v = HeaderValue::from_str(value)
        .map_err(|_| "the credential is not a valid header value".to_string())?;
    v.set_sensitive(true);
    Ok(v)
}

fn header_name(n: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("'{n}' is not a header name"))
}

fn apply(creds: &Credentials, req: &mut impl Target, now: SystemTime) -> Result<(), BridgeError> {
    let s = &creds.strategy;
    let kind = s.kind.as_str();
    let fail = |message: String| BridgeError::Strategy {
        strategy: kind.to_string(),
        message,
    };
    let config = |name: &str| config_field(s, name).map_err(fail);
    let secret = |name: &str| secret_of(creds, name).map_err(fail);
    let header = |value: &str| sensitive_value(value).map_err(fail);
    let name = |n: &str| header_name(n).map_err(fail);
    match kind {
        "oauth2" | "header" | "basic_auth" => {
            let (n, v) = creds
                .prepared
                .0
                .get_or_init(|| simple_header(creds))
                .as_ref()
                .map_err(|m| fail(m.clone()))?;
            req.headers_mut().insert(n.clone(), v.clone());
        }
        "query_param" => {
            let value = secret(config("credential_field")?)?;
            req.add_query(config("param_name")?, value)?;
        }
        "aws_sigv4" => {
            let scope = SigV4Scope {
                region: config("region")?.to_string(),
                service: config("service")?.to_string(),
            };
            let keys = AwsKeys {
                access_key: secret("access_key")?,
                secret_key: secret("secret_key")?,
                session_token: creds.secret("session_token").map(|t| t.expose()),
            };
            let url = req.url()?;
            let method = req.method().clone();
            let body = req.body().map(<[u8]>::to_vec);
            let options = SigV4Options::for_service(&scope.service);
            sigv4::sign_headers(
                &method,
                &url,
                req.headers_mut(),
                body.as_deref(),
                keys,
                &scope,
                options,
                now,
            )?;
        }
        "hmac_payload" => {
            let key = secret(config("credential_field")?)?;
            let body = req
                .body()
                .ok_or_else(|| fail("a streamed body cannot be signed; buffer it".into()))?;
            let mac = match config("algorithm")? {
                "sha256" => hmac_of::<Hmac<sha2::Sha256>>(key.as_bytes(), body),
                "sha512" => hmac_of::<Hmac<sha2::Sha512>>(key.as_bytes(), body),
                other => return Err(fail(format!("unknown algorithm '{other}'"))),
            };
            let encoded = match config("encoding")? {
                "hex" => mac.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                "base64" => base64::engine::general_purpose::STANDARD.encode(&mac),
                other => return Err(fail(format!("unknown encoding '{other}'"))),
            };
            let v = header(&encoded)?;
            req.headers_mut().insert(name(config("header_name")?)?, v);
        }
        other => return Err(BridgeError::UnknownStrategy(other.to_string())),
    }
    Ok(())
}

fn hmac_of<M: Mac + hmac::digest::KeyInit>(key: &[u8], body: &[u8]) -> Vec<u8> {
    // HMAC takes keys of any length.
    let mut mac = <M as hmac::digest::KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::Strategy;
    use crate::secret::Secret;
    use serde_json::json;
    use std::collections::HashMap;

    fn creds(kind: &str, config: serde_json::Value, secrets: &[(&str, &str)]) -> Credentials {
        Credentials::new(
            Strategy {
                kind: kind.into(),
                config: config.as_object().cloned().unwrap_or_default(),
            },
            secrets
                .iter()
                .map(|(k, v)| (k.to_string(), Secret::new(*v)))
                .collect::<HashMap<_, _>>(),
        )
    }

    fn req(uri: &str, body: &str) -> http::Request<Vec<u8>> {
        http::Request::builder()
            .method("POST")
            .uri(uri)
            .body(body.as_bytes().to_vec())
            .unwrap()
    }

    #[test]
    fn oauth2_header_query_and_basic() {
        let mut r = req("https://api.example.com/v1/x?a=1", "");
        apply_http(
            &creds("oauth2", json!({}), &[("access_token", "at-1")]),
            &mut r,
        )
        .unwrap();
        assert_eq!(r.headers()["authorization"], "Bearer at-1");
        assert!(r.headers()["authorization"].is_sensitive());

        let c = creds(
            "header",
            json!({"header_name": "X-Api-Key", "credential_field": "api_key", "value_prefix": "Token "}),
            &[("api_key", "k-1")],
        );
        apply_http(&c, &mut r).unwrap();
        assert_eq!(r.headers()["x-api-key"], "Token k-1");

        let c = creds(
            "query_param",
            json!({"param_name": "key", "credential_field": "api_key"}),
            &[("api_key", "k 1&x")],
        );
        apply_http(&c, &mut r).unwrap();
        assert_eq!(r.uri().query(), Some("a=1&key=k+1%26x"));
        let mut bare = req("https://api.example.com", "");
        apply_http(&c, &mut bare).unwrap();
        assert_eq!(
            bare.uri().to_string(),
            "https://api.example.com/?key=k+1%26x"
        );

        let c = creds(
            "basic_auth",
            json!({"username_field": "u", "password_field": "p"}),
            &[("u", "Aladdin"), ("p", "open sesame")],
        );
        apply_http(&c, &mut r).unwrap();
        // RFC 7617's example.
        assert_eq!(
            r.headers()["authorization"],
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
    }

    #[test]
    fn hmac_payload_matches_rfc_4231() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let body = "what do ya want for nothing?";
        let c = |alg: &str, enc: &str| {
            creds(
                "hmac_payload",
                json!({"header_name": "X-Signature", "algorithm": alg, "credential_field": "k", "encoding": enc}),
                &[("k", "Jefe")],
            )
        };
        let mut r = req("https://api.example.com/hook", body);
        apply_http(&c("sha256", "hex"), &mut r).unwrap();
        assert_eq!(
            r.headers()["x-signature"],
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        apply_http(&c("sha512", "hex"), &mut r).unwrap();
        assert_eq!(
            r.headers()["x-signature"],
            "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea2505549758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737"
        );
        apply_http(&c("sha256", "base64"), &mut r).unwrap();
        assert_eq!(
            r.headers()["x-signature"],
            "W9zBRr9gdU5qBCQmCJV1x1oAPwidJzmDnexYuWTsOEM="
        );
    }

    #[test]
    fn unknown_strategies_and_missing_pieces_are_errors() {
        let mut r = req("https://api.example.com/", "");
        assert_eq!(
            apply_http(&creds("mtls", json!({}), &[]), &mut r),
            Err(BridgeError::UnknownStrategy("mtls".into()))
        );
        let e = apply_http(&creds("oauth2", json!({}), &[]), &mut r).unwrap_err();
        assert!(matches!(e, BridgeError::Strategy { .. }), "{e}");
        let e = apply_http(
            &creds("header", json!({"header_name": "X"}), &[("api_key", "k")]),
            &mut r,
        )
        .unwrap_err();
        assert!(e.to_string().contains("credential_field"), "{e}");
        assert!(r.headers().is_empty(), "nothing applied on failure");
    }

    #[test]
    fn reqwest_requests_take_strategies_too() {
        let mut r = reqwest::Request::new(
            Method::GET,
            "https://api.example.com/x?a=1".parse().unwrap(),
        );
        let c = creds(
            "query_param",
            json!({"param_name": "key", "credential_field": "api_key"}),
            &[("api_key", "k1")],
        );
        apply_reqwest(&c, &mut r).unwrap();
        assert_eq!(r.url().query(), Some("a=1&key=k1"));
        let c = creds(
            "aws_sigv4",
            json!({"region": "us-east-1", "service": "execute-api"}),
            &[
                ("access_key", "AKIDEXAMPLE"),
                ("secret_key", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
                ("session_token", "tok"),
            ],
        );
        apply_reqwest(&c, &mut r).unwrap();
        let auth = r.headers()["authorization"].to_str().unwrap();
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"),
            "{auth}"
        );
        assert!(auth.contains("x-amz-security-token"), "{auth}");
        assert!(r.headers()["authorization"].is_sensitive());
    }
}
