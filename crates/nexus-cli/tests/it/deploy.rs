//! The deployment files under deploy/, checked by deploy/check.py.

use std::process::Stdio;

use tokio::process::Command;

/// The deployment files (deploy/): Kubernetes manifests against the API
/// schemas, compose.yaml against the Compose specification, and every
/// variable they set against the settings of the part that reads it.
#[tokio::test]
async fn deployment_files_are_valid_and_use_real_settings() {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let out = Command::new("python3")
        .arg(format!("{root}/deploy/check.py"))
        .args(["--nexus", super::BIN])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            assert!(!ci, "CI=true but python3 cannot run: {e}");
            eprintln!("skipped: deployment files check (python3: {e})");
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
