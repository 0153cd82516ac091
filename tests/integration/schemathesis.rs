//! A bounded Schemathesis run over the OpenAPI document against a real control plane: no
//! request is answered with a server error, every status, content type and response body is
//! the one the document describes, and every operation refuses a request without a token.

use std::time::Duration;

use crate::cluster::Cluster;

fn schemathesis() -> std::path::PathBuf {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| std::path::Path::new(d).join("schemathesis"))
        .find(|p| p.is_file())
        .expect("schemathesis is not on PATH: `pip install schemathesis` (.ci/run does)")
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_response_outside_the_document() {
    let c = Cluster::start().await;
    let addr = c.http_addr.unwrap();
    let work = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new(schemathesis())
        .current_dir(work.path())
        .args(["run", &format!("http://{addr}/api/v1/openapi.json")])
        .args(["-H", &format!("Authorization: Bearer {}", c.env.admin_token)])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,ignored_auth",
            "--max-examples",
            "25",
            "--workers",
            "2",
            "--seed",
            "7",
            "--no-color",
            // Revoking tokens would revoke the one the run uses.
            "--exclude-path",
            "/api/v1/tokens/{id}",
        ])
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("schemathesis finished within 10 minutes")
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("passed"), "{report}");
    c.stop().await;
}
