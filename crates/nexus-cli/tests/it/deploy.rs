//! The deployment files under deploy/, checked by deploy/check.py.

/// The deployment files (deploy/): Kubernetes manifests against the API
/// schemas, compose.yaml against the Compose specification, and every
/// variable they set against the settings of the part that reads it.
#[tokio::test]
async fn deployment_files_are_valid_and_use_real_settings() {
    let Some(out) = super::python(
        "deploy/check.py",
        &["--nexus", super::BIN],
        "deployment files check",
    )
    .await
    else {
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
