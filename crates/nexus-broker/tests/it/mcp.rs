//! MCP servers registered by URL: the challenge, the protected-resource
//! metadata, the authorization server's metadata, each checked, against a
//! fake MCP server on loopback (`nexus_testkit::mcp`) that lies in each of
//! the ways the MCP authorization specification says a client must catch.

use nexus_testkit::mcp::{start as start_fake, Lies, DYN_SECRET};
use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{backend_tests, Backend, TestBroker};

async fn an_mcp_server_is_registered_by_its_url(b: Backend) {
    let fake = start_fake().await;
    let t = TestBroker::start_public(&b, |_| {}).await;
    let url = format!("{}/mcp/", fake.base);

    // Found, checked, nothing stored; the challenge's scope wins.
    let (s, plan) = t.post("/providers/mcp/plan", json!({"url": url})).await;
    assert_eq!(s, StatusCode::OK, "{plan}");
    let server = &plan["server"];
    assert_eq!(server["resource"], format!("{}/mcp", fake.base));
    assert_eq!(server["issuer"], format!("{}/as", fake.base));
    assert_eq!(server["token_endpoint"], format!("{}/as/token", fake.base));
    assert_eq!(server["scopes"], json!(["tools:read"]));
    assert_eq!(plan["client"]["method"], "dynamic_registration");

    // No client given: Nexus registers one (RFC 7591) with its redirect
    // URI; the secret it gets is kept like any client secret.
    let (s, made) = t
        .post("/providers/mcp", json!({"url": url, "name": "dynamic"}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{made}");
    let asked = fake.registrations.lock().unwrap()[0].clone();
    assert_eq!(asked["redirect_uris"], json!([made["redirect_uri"]]));
    assert_eq!(asked["application_type"], "web");
    let (_, p) = t
        .get(&format!("/providers/{}", made["id"].as_str().unwrap()))
        .await;
    assert_eq!(p["client_id"], "dyn-client");
    assert_eq!(p["client_secret_set"], true);
    assert_eq!(p["auth_header"], "client_secret_basic");
    assert!(!p.to_string().contains(DYN_SECRET) && !made.to_string().contains(DYN_SECRET));
    // A registration answered with other redirect URIs is not used.
    fake.lies.lock().unwrap().registered_redirects =
        Some(vec!["https://evil.example.com/cb".into()]);
    let (s, e) = t
        .post("/providers/mcp", json!({"url": url, "name": "redirected"}))
        .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{e}");
    assert_eq!(e["error"], "mcp_registration_refused");
    let (_, all) = t.get("/providers").await;
    let names: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["dynamic"], "nothing stored for the redirected one");

    // A server that takes client ID metadata documents: Nexus is known by
    // its own, a public client (no secret), preferred to registration.
    *fake.lies.lock().unwrap() = Lies {
        cimd: true,
        ..Default::default()
    };
    let (_, plan) = t.post("/providers/mcp/plan", json!({"url": url})).await;
    let document_url = format!("{}/auth/client-metadata.json", t.base);
    assert_eq!(plan["client"]["method"], "client_id_metadata_document");
    assert_eq!(plan["client"]["client_id"], document_url);
    let registrations = fake.registrations.lock().unwrap().len();
    let (s, made) = t
        .post("/providers/mcp", json!({"url": url, "name": "documented"}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{made}");
    assert_eq!(
        fake.registrations.lock().unwrap().len(),
        registrations,
        "no registration"
    );
    let (_, p) = t
        .get(&format!("/providers/{}", made["id"].as_str().unwrap()))
        .await;
    assert_eq!(p["client_id"], document_url);
    assert_eq!(p["client_secret_set"], false);
    let document: serde_json::Value = reqwest::get(&document_url)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(document["client_id"], document_url, "its own URL");
    assert_eq!(document["redirect_uris"], json!([made["redirect_uri"]]));
    assert_eq!(document["token_endpoint_auth_method"], "none");

    // Neither a client nor registration: said how to get one.
    *fake.lies.lock().unwrap() = Lies {
        no_registration: true,
        ..Default::default()
    };
    let (s, e) = t
        .post("/providers/mcp", json!({"url": url, "name": "files"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"], "client_id_required");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("{}/as", fake.base)) && message.contains("/auth/callback"),
        "{message}"
    );

    // A secret without its client is a mistake, said before anything is fetched.
    let (s, e) = t
        .post(
            "/providers/mcp",
            json!({"url": url, "name": "x", "client_secret": "s"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert!(
        !e.to_string().contains("\"s\""),
        "the secret is not echoed: {e}"
    );

    // Registered: an OAuth provider whose tokens are bound to the server.
    let (s, made) = t
        .post(
            "/providers/mcp",
            json!({"url": url, "name": "files", "client_id": "nexus-mcp"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{made}");
    let id = made["id"].as_str().unwrap();
    let (_, p) = t.get(&format!("/providers/{id}")).await;
    assert_eq!(p["auth_type"], "oauth2");
    assert_eq!(p["params"]["resource"], format!("{}/mcp", fake.base));
    assert_eq!(p["auth_url"], format!("{}/as/authorize", fake.base));
    assert_eq!(
        p["issuer"],
        format!("{}/as", fake.base),
        "iss is checked against it"
    );
    let (s, spec) = t
        .post(
            "/auth/consent-spec",
            json!({"workspace_id": "ws-mcp", "provider_name": "files",
                "return_url": "http://localhost:3000/done"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{spec}");
    let auth = url::Url::parse(spec["authUrl"].as_str().unwrap()).unwrap();
    let q: std::collections::HashMap<_, _> = auth.query_pairs().into_owned().collect();
    assert_eq!(q["resource"], format!("{}/mcp", fake.base));
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["scope"], "tools:read");
    // RFC 9207: an answer naming another issuer is a mix-up, refused
    // before any code is exchanged.
    let answer = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}/auth/callback", t.base))
        .query(&[
            ("code", "c"),
            ("state", spec["state"].as_str().unwrap()),
            ("iss", "https://evil.example.com/as"),
        ])
        .send()
        .await
        .unwrap();
    let back = answer.headers()["location"].to_str().unwrap().to_string();
    assert!(back.contains("error=iss_mismatch"), "{back}");

    // A server whose challenge names no metadata: the well-known place,
    // and the metadata's scopes.
    fake.lies.lock().unwrap().bare_challenge = true;
    let (s, plan) = t.post("/providers/mcp/plan", json!({"url": url})).await;
    assert_eq!(s, StatusCode::OK, "{plan}");
    assert_eq!(
        plan["server"]["scopes"],
        json!(["tools:read", "tools:write"])
    );

    // The lies a client must catch.
    let lies = [
        (
            Lies {
                resource: Some("https://other.example.com/mcp".into()),
                ..Default::default()
            },
            StatusCode::BAD_GATEWAY,
            "mcp_resource_mismatch",
        ),
        // Metadata at the server's own location claiming the whole origin
        // (tokens good for every service on the host): only the root
        // location may describe a resource above the server.
        (
            Lies {
                resource: Some(fake.base.clone()),
                ..Default::default()
            },
            StatusCode::BAD_GATEWAY,
            "mcp_resource_mismatch",
        ),
        (
            Lies {
                pkce: Some(vec!["plain"]),
                ..Default::default()
            },
            StatusCode::BAD_GATEWAY,
            "mcp_pkce_unsupported",
        ),
        (
            Lies {
                issuer: Some("https://evil.example.com/as".into()),
                ..Default::default()
            },
            StatusCode::BAD_GATEWAY,
            "mcp_issuer_mismatch",
        ),
        (
            Lies {
                authorization_server: Some("http://10.9.8.7/as".into()),
                ..Default::default()
            },
            StatusCode::FORBIDDEN,
            "egress_refused",
        ),
    ];
    for (lie, status, code) in lies {
        *fake.lies.lock().unwrap() = lie;
        let (s, e) = t.post("/providers/mcp/plan", json!({"url": url})).await;
        assert_eq!((s, e["error"].as_str()), (status, Some(code)), "{e}");
        let (s, _) = t
            .post(
                "/providers/mcp",
                json!({"url": url, "name": "liar", "client_id": "c"}),
            )
            .await;
        assert_eq!(s, status, "nothing registered for a lie");
    }
    let (s, e) = t
        .post("/providers/mcp/plan", json!({"url": "not a url"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    let (s, e) = t
        .post("/providers/mcp/plan", json!({"url": url, "extra": 1}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    t.finish().await;
}

backend_tests!(an_mcp_server_is_registered_by_its_url);
