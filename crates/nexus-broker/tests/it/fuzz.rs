//! Property-based fuzzing (proptest) of the parsers that face the internet:
//! whatever arrives, they answer with a value or an error, never a panic,
//! and what they accept is what was meant. Inputs are arbitrary bytes and
//! strings, plus near-misses made from valid inputs.

use nexus_broker::handshake::capture::{fields, typed_from_form};
use nexus_broker::oauth::state_token;
use nexus_broker::tokens::scope::{insufficient_scopes, validate, ScopeReport, ScopeSettings};
use nexus_core::wire::ChangeLine;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        proptest::collection::vec(any::<u8>(), 0..300)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// OAuth `state` from a browser's query string.
    #[test]
    fn state_tokens(junk in text(), id in "[a-z0-9]{1,40}", flip in any::<usize>(), exp in 0i64..4_000_000_000) {
        let _ = state_token::verify(KEY, &junk, 1_000);
        let good = state_token::sign(KEY, &id, exp);
        prop_assert_eq!(state_token::verify(KEY, &good, exp - 1), Ok(id.clone()));
        // Any one changed character is refused.
        let mut bytes = good.clone().into_bytes();
        let at = flip % bytes.len();
        bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
        if let Ok(changed) = String::from_utf8(bytes) {
            if changed != good {
                prop_assert!(state_token::verify(KEY, &changed, exp - 1).is_err());
            }
        }
    }

    /// `WWW-Authenticate` headers that agents copy from providers.
    #[test]
    fn www_authenticate(junk in text(), scopes in proptest::collection::vec("[a-z.:/]{1,12}", 1..5)) {
        let _ = insufficient_scopes(&junk);
        let header = format!("Bearer realm=\"api\", error=\"insufficient_scope\", scope=\"{}\"", scopes.join(" "));
        prop_assert_eq!(insufficient_scopes(&header), Some(scopes));
    }

    /// Scope-report bodies, as JSON text and as structured JSON.
    #[test]
    fn scope_reports(junk in text(), status in any::<i64>(), scopes in proptest::collection::vec(text(), 0..4), extra in text()) {
        let _ = serde_json::from_str::<ScopeReport>(&junk);
        let body = json!({"status": status, "scopes": scopes, "error": extra, "url": extra});
        if let Ok(r) = serde_json::from_value::<ScopeReport>(body) {
            let _ = validate(r, &ScopeSettings::default(), 0);
        }
    }

    /// Capture form bodies against a credential schema.
    #[test]
    fn capture_forms(body in proptest::collection::vec(any::<u8>(), 0..400), n in any::<i64>()) {
        let schema = json!({"type": "object", "required": ["api_key"], "properties": {
            "api_key": {"type": "string", "writeOnly": true},
            "port": {"type": "integer"}, "ratio": {"type": "number"},
            "on": {"type": "boolean"}, "region": {"type": "string", "enum": ["eu", "us"]}}});
        let f = fields(&schema);
        let mut raw = Map::new();
        for (k, v) in url::form_urlencoded::parse(&body).into_owned() {
            raw.insert(k, Value::String(v));
        }
        let _ = typed_from_form(&f, &raw);
        let mut raw = Map::new();
        raw.insert("port".into(), Value::String(n.to_string()));
        let typed = typed_from_form(&f, &raw);
        prop_assert_eq!(&typed["port"], &json!(n));
    }

    /// Lines of the change stream a gateway reads.
    #[test]
    fn change_lines(junk in proptest::collection::vec(any::<u8>(), 0..200), id in text()) {
        let _ = ChangeLine::parse(&junk);
        let line = ChangeLine::Connection(id);
        let text = line.encode();
        prop_assert_eq!(ChangeLine::parse(&text[..text.len() - 1]), Some(line));
    }

    /// Text from outside on its way to logs and the database.
    #[test]
    fn printable_text(junk in text(), max in 0usize..400) {
        let out = nexus_core::text::printable(&junk, max);
        prop_assert!(out.chars().count() <= max);
        prop_assert!(!out.chars().any(char::is_control));
    }

    /// URLs from provider profiles and discovery documents.
    #[test]
    fn egress_urls(junk in text(), plaintext in any::<bool>()) {
        let _ = nexus_core::egress::Egress::default().check_url("url", &junk, plaintext);
    }
}
