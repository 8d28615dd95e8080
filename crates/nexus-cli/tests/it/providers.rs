//! `nexus providers plan|apply` against a real broker (`nexus up`), with the
//! reference implementation's own manifest as it is: plan, apply, a plan
//! with no changes, an edited manifest with a rotated secret, a saved plan
//! refused after a hand edit, unset variables, malformed YAML, a profile
//! the broker refuses, and --prune. The broker has no network: the
//! manifest's Google issuer is never fetched.

use std::path::Path;

use serde_json::Value;

use crate::{env_file, env_value, http, nexus, stop, up};

/// The reference's `nexus-cli/nexus-providers.yaml`, verbatim.
const REFERENCE_MANIFEST: &str = r#"providers:
  - name: google-workspace
    auth_type: oauth2
    client_id: "${GOOGLE_CLIENT_ID}"
    client_secret: "${GOOGLE_CLIENT_SECRET}"
    issuer: "https://accounts.google.com"
    enable_discovery: true
    scopes:
      - openid
      - email
      - profile
      - offline_access

  - name: github
    auth_type: oauth2
    client_id: "${GITHUB_CLIENT_ID}"
    client_secret: "${GITHUB_CLIENT_SECRET}"
    auth_url: "https://github.com/login/oauth/authorize"
    token_url: "https://github.com/login/oauth/access_token"
    api_base_url: "https://api.github.com"
    enable_discovery: false
    scopes:
      - read:user
      - user:email
"#;

const CANARY: &str = "canary-github-secret-5b1f0c";

struct Run {
    code: i32,
    out: String,
}

async fn providers(dir: &Path, broker: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut c = nexus(dir);
    c.args(["providers"]).args(args).env("NEXUS_LOG", "warn");
    // The catalogue is in the binary: it takes no broker.
    if args.first() != Some(&"catalogue") {
        c.args(["--state-dir", "state", "--broker-url", broker]);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains(CANARY), "a secret in the output:\n{text}");
    Run {
        code: out.status.code().unwrap_or(-1),
        out: text,
    }
}

#[tokio::test]
async fn the_reference_manifest_plans_applies_and_converges() {
    let tmp = tempfile::tempdir().unwrap();
    // Warnings only: stderr is read at the end, and a full pipe would stall
    // the server.
    let (child, broker) = up(tmp.path(), &[("NEXUS_LOG", "warn")]).await;
    let file = tmp.path().join("nexus-providers.yaml");
    std::fs::write(&file, REFERENCE_MANIFEST).unwrap();
    let mut vars = vec![
        ("GOOGLE_CLIENT_ID", "google-client.apps.example"),
        ("GOOGLE_CLIENT_SECRET", "google-secret-value"),
        ("GITHUB_CLIENT_ID", "Iv1.github-client"),
        ("GITHUB_CLIENT_SECRET", CANARY),
    ];
    let plan = |args: &'static [&'static str], vars: Vec<(&'static str, &'static str)>| {
        let (dir, broker) = (tmp.path().to_path_buf(), broker.clone());
        async move { providers(&dir, &broker, args, &vars).await }
    };

    // Every unset variable is named at once; nothing is asked of the broker.
    let r = plan(&["plan"], vars[..1].to_vec()).await;
    assert_eq!(r.code, 1, "{}", r.out);
    for v in [
        "GOOGLE_CLIENT_SECRET",
        "GITHUB_CLIENT_ID",
        "GITHUB_CLIENT_SECRET",
    ] {
        assert!(r.out.contains(v), "{v}: {}", r.out);
    }
    assert!(r.out.contains("3 unset"), "{}", r.out);

    let r = plan(&["plan", "--detailed-exitcode"], vars.clone()).await;
    assert_eq!(r.code, 2, "{}", r.out);
    assert!(r.out.contains("+ create google-workspace"), "{}", r.out);
    assert!(r.out.contains("+ create github"), "{}", r.out);
    assert!(r.out.contains("client_secret: (set)"), "{}", r.out);
    assert!(
        r.out
            .contains(r#"token_url: "https://github.com/login/oauth/access_token""#),
        "{}",
        r.out
    );
    assert!(r
        .out
        .contains("Plan: 2 to create, 0 to update, 0 to delete"));
    // A plan stores nothing.
    let r2 = plan(&["plan", "--detailed-exitcode"], vars.clone()).await;
    assert_eq!(r2.code, 2, "{}", r2.out);

    let r = plan(&["apply"], vars.clone()).await;
    assert_eq!(r.code, 0, "{}", r.out);
    assert!(
        r.out.contains("created google-workspace") && r.out.contains("created github"),
        "{}",
        r.out
    );
    let r = plan(&["plan", "--detailed-exitcode"], vars.clone()).await;
    assert_eq!(r.code, 0, "a second plan has nothing to do: {}", r.out);
    assert!(r.out.contains("No changes"), "{}", r.out);

    // The manifest edited: a scope dropped, GitHub's secret rotated.
    std::fs::write(
        &file,
        REFERENCE_MANIFEST.replace("      - user:email\n", ""),
    )
    .unwrap();
    vars[3] = (
        "GITHUB_CLIENT_SECRET",
        "canary-github-secret-5b1f0c-rotated",
    );
    let r = plan(&["plan", "--detailed-exitcode"], vars.clone()).await;
    assert_eq!(r.code, 2, "{}", r.out);
    assert!(r.out.contains("~ update github"), "{}", r.out);
    assert!(
        r.out
            .contains(r#"scopes: ["read:user","user:email"] -> ["read:user"]"#),
        "{}",
        r.out
    );
    assert!(
        r.out.contains("client_secret: (set) -> (changed)"),
        "{}",
        r.out
    );
    assert!(r.out.contains("= unchanged google-workspace"), "{}", r.out);

    // Apply sends each update with If-Match set to the version its plan
    // read (the broker's refusal of a stale one is tested in its own suite).
    let env = env_file(tmp.path());
    let api_key = env_value(&env, "API_KEY");
    let h = http();
    let read = |url: String| {
        let (h, key) = (h.clone(), api_key.clone());
        async move {
            let r = h.get(url).header("x-api-key", key).send().await.unwrap();
            r.json::<Value>().await.unwrap()
        }
    };
    let list: Value = read(format!("{broker}/providers")).await;
    let github = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "github")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // A saved plan, then someone edits GitHub by hand: applying that plan
    // reports the change and changes nothing.
    let r = plan(&["plan", "--out", "saved-plan.json"], vars.clone()).await;
    assert_eq!(r.code, 0, "{}", r.out);
    let edited = h
        .patch(format!("{broker}/providers/{github}"))
        .header("x-api-key", &api_key)
        .json(&serde_json::json!({"profile": {"description": "edited by hand"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(edited.status().as_u16(), 200);
    let r = plan(&["apply", "--plan", "saved-plan.json"], vars.clone()).await;
    assert_eq!(r.code, 1, "{}", r.out);
    assert!(r.out.contains("changed since the plan"), "{}", r.out);
    assert!(
        r.out.contains("github: planned update at version"),
        "{}",
        r.out
    );
    let view: Value = read(format!("{broker}/providers/{github}")).await;
    assert_eq!(view["description"], "edited by hand", "not overwritten");
    assert_eq!(
        view["scopes"],
        serde_json::json!(["read:user", "user:email"]),
        "nothing applied"
    );

    // A fresh plan takes the hand edit into account; apply makes it so.
    let r = plan(&["apply"], vars.clone()).await;
    assert_eq!(r.code, 0, "{}", r.out);
    assert!(r.out.contains("updated github"), "{}", r.out);
    assert!(
        r.out.contains(r#"description: "edited by hand" -> null"#),
        "{}",
        r.out
    );
    let view: Value = read(format!("{broker}/providers/{github}")).await;
    assert_eq!(view["scopes"], serde_json::json!(["read:user"]));
    let r = plan(&["plan", "--detailed-exitcode"], vars.clone()).await;
    assert_eq!(r.code, 0, "{}", r.out);

    // A provider the manifest does not list: an orphan, deleted by --prune.
    let created = h
        .post(format!("{broker}/providers"))
        .header("x-api-key", &api_key)
        .json(&serde_json::json!({"profile": {
            "name": "hand-made", "auth_type": "oauth2", "client_id": "c",
            "auth_url": "https://idp.example/authorize", "token_url": "https://idp.example/token"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);
    let r = plan(&["plan", "--detailed-exitcode"], vars.clone()).await;
    assert_eq!(r.code, 0, "an orphan alone is not a change: {}", r.out);
    assert!(r.out.contains("! orphan hand-made"), "{}", r.out);
    let r = plan(&["plan", "--prune", "--detailed-exitcode"], vars.clone()).await;
    assert_eq!(r.code, 2, "{}", r.out);
    assert!(r.out.contains("- delete hand-made"), "{}", r.out);
    let r = plan(&["apply", "--prune"], vars.clone()).await;
    assert_eq!(r.code, 0, "{}", r.out);
    assert!(r.out.contains("deleted hand-made"), "{}", r.out);
    let r = plan(&["plan", "--prune", "--detailed-exitcode"], vars.clone()).await;
    assert_eq!(r.code, 0, "{}", r.out);

    // Malformed YAML: the file, line and column.
    std::fs::write(
        &file,
        "providers:\n  - name: github\n   auth_type: oauth2\n",
    )
    .unwrap();
    let r = plan(&["plan"], vars.clone()).await;
    assert_eq!(r.code, 1, "{}", r.out);
    assert!(r.out.contains("nexus-providers.yaml:3:"), "{}", r.out);
    // A profile the broker refuses: named, nothing changed.
    std::fs::write(
        &file,
        "providers:\n  - name: broken\n    auth_type: oauth2\n    client_id: c\n    auth_url: \"javascript:alert(1)\"\n    token_url: https://a.example/t\n",
    )
    .unwrap();
    let r = plan(&["apply", "--prune"], vars.clone()).await;
    assert_eq!(r.code, 1, "{}", r.out);
    assert!(r.out.contains("broken:"), "{}", r.out);
    let list: Value = read(format!("{broker}/providers")).await;
    assert_eq!(
        list.as_array().unwrap().len(),
        2,
        "a refused manifest changes nothing: {list}"
    );
    let logs = stop(child, "-TERM").await;
    assert!(!logs.contains(CANARY), "the secret in the broker's logs");
}

/// The catalogue built into the binary, `providers add`, and a manifest
/// that starts from templates and manages webhook endpoints.
#[tokio::test]
async fn templates_and_webhooks_from_the_cli_and_a_manifest() {
    use base64::Engine as _;
    let tmp = tempfile::tempdir().unwrap();
    let (child, broker) = up(tmp.path(), &[("NEXUS_LOG", "warn")]).await;
    let run = |args: Vec<&'static str>, vars: Vec<(&'static str, String)>| {
        let (dir, broker) = (tmp.path().to_path_buf(), broker.clone());
        async move {
            let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
            providers(&dir, &broker, &args, &vars).await
        }
    };

    // The catalogue: at least 40 templates, each citing its documentation.
    let r = run(vec!["catalogue", "--output", "json"], vec![]).await;
    assert_eq!(r.code, 0, "{}", r.out);
    let all: Vec<Value> = serde_json::from_str(&r.out).unwrap();
    assert!(all.len() >= 40, "{} templates", all.len());
    for t in &all {
        assert!(
            t["docs"][0].as_str().unwrap().starts_with("https://"),
            "{t}"
        );
    }
    let r = run(vec!["catalogue", "microsoft"], vec![]).await;
    assert!(
        r.out.contains("microsoft-entra") && r.out.contains("tenant"),
        "{}",
        r.out
    );
    let r = run(vec!["catalogue", "salesforce", "--full"], vec![]).await;
    assert!(
        r.out.contains("quirks:") && r.out.contains("https://"),
        "{}",
        r.out
    );

    // `add`: the client secret from a variable, never a flag or the output.
    let secret = vec![("G_SECRET", CANARY.to_string())];
    let r = run(
        vec![
            "add",
            "google",
            "--client-id",
            "g-client",
            "--client-secret-env",
            "G_SECRET",
        ],
        secret.clone(),
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.out);
    assert!(
        r.out.contains("Registered google from the google template"),
        "{}",
        r.out
    );
    assert!(
        r.out.contains("Redirect URI to register with Google"),
        "{}",
        r.out
    );
    assert!(
        r.out.contains("access_type=offline"),
        "the quirks: {}",
        r.out
    );
    for (args, want) in [
        (
            vec!["add", "shopify", "--client-id", "c"],
            "needs a value for shop",
        ),
        (
            vec!["add", "openai", "--client-id", "c"],
            "static-credential provider",
        ),
        (vec!["add", "google"], "--client-id is required"),
        (vec!["add", "nope"], "no template 'nope'"),
        (
            vec![
                "add",
                "shopify",
                "--client-id",
                "c",
                "--set",
                "shop=evil.example/x",
            ],
            "placeholder 'shop' must be",
        ),
        (
            vec![
                "add",
                "google",
                "--client-id",
                "c",
                "--client-secret-env",
                "UNSET_VAR_1",
            ],
            "UNSET_VAR_1: the variable is not set",
        ),
    ] {
        let r = run(args.clone(), vec![]).await;
        assert_eq!(r.code, 1, "{args:?}: {}", r.out);
        assert!(r.out.contains(want), "{args:?}: {}", r.out);
    }
    let r = run(
        vec![
            "add",
            "shopify",
            "--set",
            "shop=my-store",
            "--client-id",
            "c",
            "--dry-run",
        ],
        vec![],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.out);
    assert!(
        r.out.contains("https://my-store.myshopify.com/"),
        "{}",
        r.out
    );

    // A manifest from templates: google is what `add` registered already.
    let hook_secret = |fill: u8| {
        format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode([fill; 32])
        )
    };
    let file = tmp.path().join("nexus-providers.yaml");
    let hook = "http://127.0.0.1:9/nexus-hooks";
    std::fs::write(
        &file,
        format!(
            "providers:\n  - template: google\n    client_id: g-client\n    client_secret: \"${{G_SECRET}}\"\n  \
             - template: shopify\n    name: shop-main\n    placeholders: {{shop: my-store}}\n    client_id: s-client\n    \
             scopes: [read_products]\n\
             webhooks:\n  - url: {hook}\n    events: [connection.revoked, connection.attention_required]\n    secret: \"${{HOOK_SECRET}}\"\n"
        ),
    )
    .unwrap();
    let mut vars = secret.clone();
    vars.push(("HOOK_SECRET", hook_secret(7)));
    let r = run(vec!["plan", "--detailed-exitcode"], vars.clone()).await;
    assert_eq!(r.code, 2, "{}", r.out);
    assert!(
        r.out.contains("= unchanged google"),
        "add and the template agree: {}",
        r.out
    );
    assert!(r.out.contains("+ create shop-main"), "{}", r.out);
    assert!(
        r.out.contains(&format!("+ create webhook {hook}")),
        "{}",
        r.out
    );
    assert!(r.out.contains("secret: (set)"), "{}", r.out);
    let r = run(vec!["apply"], vars.clone()).await;
    assert_eq!(r.code, 0, "{}", r.out);
    assert!(
        !r.out.contains("signing secret"),
        "a given secret is not printed: {}",
        r.out
    );
    let r = run(vec!["plan", "--detailed-exitcode"], vars.clone()).await;
    assert_eq!(r.code, 0, "converged: {}", r.out);

    // The receiver's secret rotated in the environment: an update in place.
    vars[1].1 = hook_secret(9);
    let r = run(vec!["plan", "--detailed-exitcode"], vars.clone()).await;
    assert_eq!(r.code, 2, "{}", r.out);
    assert!(
        r.out.contains(&format!("~ update webhook {hook}")),
        "{}",
        r.out
    );
    assert!(r.out.contains("secret: (set) -> (changed)"), "{}", r.out);
    let r = run(vec!["apply"], vars.clone()).await;
    assert_eq!(r.code, 0, "{}", r.out);
    assert!(
        r.out.contains(&format!("updated webhook {hook}")),
        "{}",
        r.out
    );
    let r = run(vec!["plan", "--detailed-exitcode"], vars.clone()).await;
    assert_eq!(r.code, 0, "{}", r.out);
    for fill in [7u8, 9] {
        let raw = &hook_secret(fill)[6..];
        assert!(!r.out.contains(raw), "a webhook secret in the output");
    }

    // `webhooks: []` with --prune deletes the endpoint; no key leaves it be.
    let text = std::fs::read_to_string(&file).unwrap();
    let providers_only = text.split("webhooks:").next().unwrap().to_string();
    std::fs::write(&file, &providers_only).unwrap();
    let r = run(vec!["plan", "--prune", "--detailed-exitcode"], vars.clone()).await;
    assert_eq!(r.code, 0, "webhooks not managed without the key: {}", r.out);
    std::fs::write(&file, format!("{providers_only}webhooks: []\n")).unwrap();
    let r = run(vec!["apply", "--prune"], vars.clone()).await;
    assert_eq!(r.code, 0, "{}", r.out);
    assert!(
        r.out.contains(&format!("deleted webhook {hook}")),
        "{}",
        r.out
    );

    let logs = stop(child, "-TERM").await;
    assert!(!logs.contains(CANARY), "the secret in the broker's logs");
    assert!(!logs.contains(&hook_secret(9)[6..]));
}
