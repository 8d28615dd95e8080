//! The token-endpoint client: requests with the provider's client
//! authentication, strict parsing of answers (RFC 6749 §5.1, §5.2), and the
//! classes of refusal that decide what happens to a connection. Used by the
//! handshake (code exchange), the refresh engine and revocation (RFC 7009).

use reqwest::StatusCode;
use serde_json::Value;

use crate::registry::profile::AuthHeader;
use crate::registry::Provider;
use nexus_core::Secret;

/// A failure after the handshake was consumed: recorded, then reported to the return URL.
#[derive(Debug)]
pub struct Failure {
    /// Error code recorded on the connection.
    pub code: &'static str,
    /// What happened, in words (never a secret).
    pub description: String,
}

/// Longest description kept (characters).
pub const MAX_DESCRIPTION: usize = 300;

/// A failure with a code and a description. The description may hold a
/// provider's or a browser's words: control characters are escaped and its
/// length bounded here, before anything logs, stores or returns it.
pub fn fail(code: &'static str, description: impl Into<String>) -> Failure {
    let description = description.into();
    Failure {
        code,
        description: nexus_core::text::printable(&description, MAX_DESCRIPTION).into_owned(),
    }
}

/// Token endpoint answer, parsed strictly.
pub struct TokenSet {
    /// The access token.
    pub access_token: Secret<String>,
    /// `Bearer`, usually.
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: Option<i64>,
    /// The refresh token, when one was issued (or rotated).
    pub refresh_token: Option<Secret<String>>,
    /// The id_token (OpenID Connect).
    pub id_token: Option<Secret<String>>,
    /// Scopes granted, space-separated, when the provider says.
    pub scope: Option<String>,
}

/// How a token endpoint refused a refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The grant is gone (revoked, expired, rotated away): a person must re-consent.
    GrantGone,
    /// The provider refused our client: an integration fault, not the user's.
    ClientRejected,
    /// Anything else: try again later.
    Other,
}

/// Error codes by which providers say "this refresh token is dead".
const GRANT_GONE: &[&str] = &[
    "invalid_grant",
    "invalid_refresh_token",
    "bad_refresh_token",
    "token_revoked",
    "refresh_token_expired",
];

/// The class of a token endpoint's `error` code.
pub fn classify(error: &str) -> Refusal {
    if GRANT_GONE.contains(&error) {
        Refusal::GrantGone
    } else if error == "invalid_client" || error == "unauthorized_client" {
        Refusal::ClientRejected
    } else {
        Refusal::Other
    }
}

/// How a client authenticates at a token endpoint.
#[derive(Debug, Clone, Copy)]
pub struct ClientAuth<'a> {
    /// Its client id.
    pub client_id: &'a str,
    /// Its secret (none: a public client, which sends its id alone).
    pub secret: Option<&'a Secret<String>>,
    /// `client_secret_basic` rather than `client_secret_post`.
    pub basic: bool,
}

impl<'a> ClientAuth<'a> {
    /// A provider's client, with its secret unsealed.
    pub fn of(provider: &'a Provider, secret: Option<&'a Secret<String>>) -> Self {
        Self {
            client_id: provider.profile.client_id.as_deref().unwrap_or_default(),
            secret,
            basic: provider.profile.auth_header == Some(AuthHeader::ClientSecretBasic),
        }
    }
}

/// A POST to a token endpoint with the client's authentication
/// (client_secret_post, client_secret_basic, or a public client's id alone).
pub fn token_request<'a>(
    http: &reqwest::Client,
    token_url: &str,
    client: ClientAuth<'a>,
    mut form: Vec<(&'a str, &'a str)>,
) -> reqwest::RequestBuilder {
    let client_id = client.client_id;
    let mut req = http.post(token_url).header("accept", "application/json");
    match (client.basic, client.secret) {
        (true, Some(secret)) => {
            // RFC 6749 §2.3.1: form-urlencode both parts before Basic encoding.
            let enc =
                |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            req = req.basic_auth(enc(client_id), Some(enc(secret.expose())));
        }
        (_, Some(secret)) => {
            form.push(("client_id", client_id));
            form.push(("client_secret", secret.expose()));
        }
        (_, None) => form.push(("client_id", client_id)),
    }
    req.form(&form)
}

/// Parses a token endpoint answer strictly (RFC 6749 §5.1, §5.2).
pub fn parse_token_response(status: StatusCode, body: &[u8]) -> Result<TokenSet, Failure> {
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) else {
        return Err(fail(
            "token_exchange_failed",
            format!(
                "token endpoint answered HTTP {} with a body that is not a JSON object",
                status.as_u16()
            ),
        ));
    };
    if let Some(err) = obj.get("error") {
        let code = err.as_str().unwrap_or("error");
        let code =
            if code.len() <= 64 && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                code
            } else {
                "error"
            };
        return Err(fail(
            "token_exchange_failed",
            format!("token endpoint refused the code: {code}"),
        ));
    }
    if !status.is_success() {
        return Err(fail(
            "token_exchange_failed",
            format!("token endpoint answered HTTP {}", status.as_u16()),
        ));
    }
    let str_field = |k: &str| -> Result<Option<String>, Failure> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(_) => Err(fail(
                "token_exchange_failed",
                format!("token response field {k} is not a non-empty string"),
            )),
        }
    };
    let access_token = str_field("access_token")?.ok_or_else(|| {
        fail(
            "token_exchange_failed",
            "token response has no access_token",
        )
    })?;
    // RFC 6749 requires token_type, but some providers leave it out of
    // answers whose tokens are bearer tokens all the same (Shopify's
    // `{"access_token", "scope"}`): absent means Bearer. A present one
    // must still be a string.
    let token_type = str_field("token_type")?.unwrap_or_else(|| "Bearer".to_string());
    let expires_in = match obj.get("expires_in") {
        None | Some(Value::Null) => None,
        // Some providers send a numeric string; accept it, refuse anything else.
        Some(v) => Some(
            v.as_i64()
                .or_else(|| v.as_f64().map(|f| f as i64))
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .filter(|n| *n >= 0)
                .ok_or_else(|| {
                    fail(
                        "token_exchange_failed",
                        "token response expires_in is not a non-negative number",
                    )
                })?,
        ),
    };
    Ok(TokenSet {
        access_token: Secret::new(access_token),
        token_type,
        expires_in,
        refresh_token: str_field("refresh_token")?.map(Secret::new),
        id_token: str_field("id_token")?.map(Secret::new),
        scope: str_field("scope")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_classified() {
        assert_eq!(classify("invalid_grant"), Refusal::GrantGone);
        assert_eq!(classify("unauthorized_client"), Refusal::ClientRejected);
        assert_eq!(classify("temporarily_unavailable"), Refusal::Other);
    }

    #[test]
    fn token_responses_are_parsed_strictly_but_bearer_is_the_default_type() {
        let ok = br#"{"access_token":"at","token_type":"Bearer","expires_in":"3600","refresh_token":"rt","scope":"a b"}"#;
        let t = parse_token_response(StatusCode::OK, ok).ok().unwrap();
        assert_eq!(t.expires_in, Some(3600));
        assert_eq!(t.scope.as_deref(), Some("a b"));
        let shopify = br#"{"access_token":"at","scope":"read_products,write_orders"}"#;
        let t = parse_token_response(StatusCode::OK, shopify).ok().unwrap();
        assert_eq!(t.token_type, "Bearer", "absent token_type means Bearer");
        for (status, body) in [
            (
                StatusCode::OK,
                &br#"{"access_token":"a","token_type":7}"#[..],
            ),
            (StatusCode::OK, &b"<html>hi</html>"[..]),
            (StatusCode::OK, br#"{"token_type":"Bearer"}"#),
            (
                StatusCode::OK,
                br#"{"access_token":"","token_type":"Bearer"}"#,
            ),
            (
                StatusCode::OK,
                br#"{"access_token":5,"token_type":"Bearer"}"#,
            ),
            (
                StatusCode::OK,
                br#"{"access_token":"a","token_type":"Bearer","expires_in":-1}"#,
            ),
            (StatusCode::OK, br#"{"error":"invalid_grant"}"#),
            (
                StatusCode::BAD_REQUEST,
                br#"{"error":"invalid_grant","error_description":"expired"}"#,
            ),
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                br#"{"access_token":"a","token_type":"b"}"#,
            ),
            (StatusCode::OK, b"[]"),
        ] {
            assert!(
                parse_token_response(status, body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let e = parse_token_response(StatusCode::BAD_REQUEST, br#"{"error":"invalid_grant"}"#)
            .err()
            .unwrap();
        assert!(e.description.contains("invalid_grant"));
    }
}
