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
    c.args(["providers"])
        .args(args)
        .args(["--state-dir", "state", "--broker-url", broker])
        .env("NEXUS_LOG", "warn");
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
