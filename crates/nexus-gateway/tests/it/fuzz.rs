//! Property-based fuzzing (proptest) of what the gateway reads from agents
//! before it knows who they are: the agent-key headers.

use axum::http::{HeaderMap, HeaderValue};
use nexus_gateway::auth::{key_of, presented_key};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn agent_key_headers(auth in proptest::collection::vec(any::<u8>(), 0..120),
                         x_key in proptest::collection::vec(any::<u8>(), 0..120),
                         key in "[A-Za-z0-9_-]{43}") {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(&auth) {
            h.insert("authorization", v);
        }
        if let Ok(v) = HeaderValue::from_bytes(&x_key) {
            h.insert("x-api-key", v);
        }
        let _ = key_of(&h);
        let s = String::from_utf8_lossy(&auth).into_owned();
        let _ = presented_key(Some(&s), || None);
        // A well-formed bearer key is found whatever the case of the scheme
        // and the spaces around it; another scheme presents none.
        let full = format!("nxa_{key}");
        let bearer = format!("  bEaReR  {full} ");
        prop_assert_eq!(presented_key(Some(&bearer), || None), Some(full.as_str()));
        let basic = format!("Basic {full}");
        prop_assert_eq!(presented_key(Some(&basic), || Some("other")), None);
        prop_assert_eq!(presented_key(None, || Some(full.as_str())), Some(full.as_str()));
    }
}
