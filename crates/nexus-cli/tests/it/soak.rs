//! The soak's short profile (tests/soak/run.py --profile ci): three brokers
//! and two gateways as separate processes of this binary on one PostgreSQL
//! database, the real OpenID provider with refresh-token rotation and reuse
//! detection, token fetches through the gateways, and about two minutes of
//! faults (SIGKILL and graceful restarts, database and Redis outages,
//! provider errors and timeouts). The script checks the invariants and
//! exits 1 with the evidence on any violation; the long run is by hand
//! (tests/soak/README.md).

#[tokio::test]
async fn replicas_under_faults_lose_nothing() {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let Ok(database_url) = std::env::var("NEXUS_TEST_DATABASE_URL") else {
        assert!(!ci, "CI=true but NEXUS_TEST_DATABASE_URL is not set");
        eprintln!("skipped: soak (needs PostgreSQL: set NEXUS_TEST_DATABASE_URL)");
        return;
    };
    // The script says what is missing and, outside CI, skips (exit 0).
    let args = [
        "--profile",
        "ci",
        "--nexus",
        super::BIN,
        "--database-url",
        &database_url,
    ];
    let Some(out) = super::python("tests/soak/run.py", &args, "soak").await else {
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The invariant table, for whoever reads the test output.
    eprintln!("{stdout}");
    assert!(out.status.success(), "the soak failed:\n{stdout}\n{stderr}");
}
