//! Pattern files end to end: the shipped patterns validate and run in simulations, `omoi run`
//! follows a pattern to its end, and the from-pattern API submits one or says what is wrong.

use std::time::Duration;

use tokio::io::AsyncBufReadExt;

use omoi::domain::{TaskStatus, WorkflowStatus};
use serde_json::json;

use crate::cluster::{Cluster, task};
use crate::env::{TestEnv, admin_database_url};

async fn omoi(env: &TestEnv, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_omoi"))
        .args(args)
        .envs(env.child_env())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run omoi")
}

async fn scratch_databases() -> Vec<String> {
    let admin = sqlx::PgPool::connect(&admin_database_url()).await.unwrap();
    let names =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'omoi_sim%'")
            .fetch_all(&admin)
            .await
            .unwrap();
    admin.close().await;
    names
}

#[tokio::test]
async fn every_shipped_pattern_validates_and_runs_in_a_simulation() {
    let env = TestEnv::new().await;
    let names: Vec<String> = omoi::pattern::builtin()
        .iter()
        .map(|(file, _)| file.trim_end_matches(".yaml").to_string())
        .collect();
    assert!(names.len() >= 4, "{names:?}");
    let mut args = vec!["patterns", "validate"];
    args.extend(names.iter().map(String::as_str));
    let out = omoi(&env, &args).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = scratch_databases().await;
    for name in &names {
        let out = omoi(
            &env,
            &[
                "simulate",
                name,
                "--agents",
                "3",
                "--latency",
                "fixed:15",
                "--seed",
                "7",
                "--fail-rate",
                "0.1",
            ],
        )
        .await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}\n{stdout}");
        assert!(stderr.contains("completed in"), "{name}: {stderr}");
        for section in [
            "Makespan:",
            "Critical path:",
            "utilisation",
            "Queue wait",
            "Retries:",
            "Lock waits:",
            "Timeline",
        ] {
            assert!(
                stdout.contains(section),
                "{name} report lacks {section}:\n{stdout}"
            );
        }
    }
    // The scratch namespaces' databases are gone again.
    let after = scratch_databases().await;
    assert!(
        after.iter().all(|d| before.contains(d)),
        "left behind: {after:?}"
    );
}

#[tokio::test]
async fn a_simulation_report_follows_the_pattern_and_its_seed() {
    let env = TestEnv::new().await;
    let svg = tempfile::NamedTempFile::new().unwrap();
    let run = |seed: &'static str| {
        let svg = svg.path().to_str().unwrap().to_string();
        let env = &env;
        async move {
            let out = omoi(
                env,
                &[
                    "simulate",
                    "review_feedback_loop",
                    "--agents",
                    "2",
                    "--json",
                    "--seed",
                    seed,
                    "--latency",
                    "uniform:5..40",
                    "--fail-rate",
                    "0.25",
                    "--svg",
                    &svg,
                ],
            )
            .await;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
        }
    };
    let report = run("11").await;
    // The review verdicts of the pattern's hints demand three rounds.
    let keys: Vec<&str> = report["critical_path"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys.first(), Some(&"plan"), "{keys:?}");
    assert!(keys.contains(&"cycle/3/review"), "{keys:?}");
    assert_eq!(keys.last(), Some(&"finalize"));
    assert_eq!(report["tasks"].as_array().unwrap().len(), 9);
    let svg_text = std::fs::read_to_string(svg.path()).unwrap();
    assert!(svg_text.starts_with("<svg") && svg_text.matches("<rect").count() >= 8);
    // Same seed, same draws: the same attempts of the same tasks fail (run times repeat too,
    // but measured ones carry scheduling jitter).
    let retried = |r: &serde_json::Value| r["retries"]["tasks"].clone();
    assert!(
        !retried(&report).as_array().unwrap().is_empty(),
        "seed 11 draws some failures: {}",
        report["retries"]
    );
    let again = run("11").await;
    assert_eq!(retried(&report), retried(&again));
    let other = run("12").await;
    assert_ne!(
        retried(&report),
        retried(&other),
        "another seed, other draws"
    );
}

#[tokio::test]
async fn omoi_run_submits_a_pattern_and_follows_it_to_the_end() {
    let mut c = Cluster::start().await;
    c.spawn_worker("w1", "code,review", 2).await;
    let out = omoi(
        &c.env,
        &[
            "run",
            "review_feedback_loop",
            "--param",
            "task=Add a cache",
            "--param",
            "max_rounds=2",
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{stdout}");
    assert!(stdout.contains("completed in"), "{stdout}");
    assert!(
        stderr.contains("cycle"),
        "progress per step group: {stderr}"
    );
    // With echo agents the review has no verdict: one round, stopped by the condition.
    let list: Vec<serde_json::Value> = {
        let http = c.http();
        let (status, v) = http.get("/api/v1/workflows").await;
        assert_eq!(status, 200);
        serde_json::from_value(v).unwrap()
    };
    let id = list[0]["id"].as_str().unwrap().parse().unwrap();
    let view = c.wait(id, Duration::from_secs(5)).await;
    assert_eq!(view.workflow.name, "review_feedback_loop");
    assert_eq!(
        task(&view, "cycle").output.as_ref().unwrap()["iterations"],
        1
    );
    assert_eq!(
        task(&view, "cycle/1/implement").input["task"],
        json!("Add a cache")
    );
    // A bad parameter is refused before anything is submitted.
    let out = omoi(
        &c.env,
        &["run", "review_feedback_loop", "--param", "max_rounds=many"],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("max_rounds"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.stop().await;
}

#[tokio::test]
async fn the_from_pattern_api_submits_by_name_or_source_and_locates_errors() {
    let mut c = Cluster::start().await;
    c.spawn_worker("w1", "review", 3).await;
    let http = c.http();
    let (status, v) = http
        .post(
            "/api/v1/workflows/from-pattern",
            &json!({"pattern": "majority_vote", "params": {"question": "Ship it?"}}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["pattern"], "majority_vote");
    let id = v["workflow_id"].as_str().unwrap().parse().unwrap();
    let view = c.wait(id, Duration::from_secs(30)).await;
    // Echo evaluators give no verdict: the majority is `null`, agreed by all.
    assert_eq!(
        view.workflow.status,
        WorkflowStatus::Completed,
        "{:#?}",
        view.tasks
    );
    assert_eq!(task(&view, "decide").status, TaskStatus::Completed);

    let source =
        "name: inline\nsteps:\n  - key: a\n  - key: b\n    input: {x: \"${steps.ghost.output}\"}\n";
    let (status, v) = http
        .post("/api/v1/workflows/from-pattern", &json!({"source": source}))
        .await;
    assert_eq!(status, 400, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("source:5:"), "{message}");
    assert!(message.contains("ghost"), "{message}");

    let (status, v) = http
        .post(
            "/api/v1/workflows/from-pattern",
            &json!({"pattern": "no_such_pattern"}),
        )
        .await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = http
        .post(
            "/api/v1/workflows/from-pattern",
            &json!({"pattern": "../../etc/passwd"}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = http
        .post(
            "/api/v1/workflows/from-pattern",
            &json!({"pattern": "majority_vote", "params": {"nope": 1}}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["field"], "params");
    // The same over NATS, for clients without HTTP.
    let reply: serde_json::Value = omoi::client::request(
        &c.env.nats,
        c.env.names.workflow_endpoint("run"),
        &json!({"pattern": "majority_vote", "params": {"question": "Over NATS?"}}),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(reply["pattern"], "majority_vote");
    let id = reply["workflow_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        c.wait(id, Duration::from_secs(30)).await.workflow.status,
        WorkflowStatus::Completed
    );
    let err = omoi::client::request::<_, serde_json::Value>(
        &c.env.nats,
        c.env.names.workflow_endpoint("run"),
        &json!({"source": "name: x\nsteps: []\n"}),
        Duration::from_secs(10),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("at least one step"), "{err}");
    let (status, v) = http.get("/api/v1/patterns").await;
    assert_eq!(status, 200);
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "map_reduce"),
        "{v}"
    );
    c.stop().await;
}

#[tokio::test]
async fn an_invalid_pattern_file_fails_validation_with_its_line_and_column() {
    let env = TestEnv::new().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.yaml");
    std::fs::write(
        &path,
        "name: broken\nsteps:\n  - key: a\n    depends_on: [b]\n  - key: b\n    depends_on: [a]\n",
    )
    .unwrap();
    let out = omoi(&env, &["patterns", "validate", path.to_str().unwrap()]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("broken.yaml:"), "{stderr}");
    assert!(stderr.contains("cycle"), "{stderr}");
    std::fs::write(&path, "name: broken\nsteps:\n  - key: a\n    retries: 3\n").unwrap();
    let out = omoi(&env, &["patterns", "validate", path.to_str().unwrap()]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("broken.yaml:4:"), "{stderr}");
    assert!(stderr.contains("retries"), "{stderr}");
}

#[tokio::test]
async fn a_run_no_live_agent_can_take_says_what_to_start_at_once_and_waits_only_if_asked() {
    let mut c = Cluster::start().await;
    c.spawn_worker("w1", "echo", 2).await;
    // The pattern's first steps ask for `code`: nobody has it.
    let out = omoi(
        &c.env,
        &["run", "review_feedback_loop", "--param", "task=t"],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("no live agent has capabilities [code] for step"),
        "{stderr}"
    );
    assert!(
        stderr.contains("omoi worker --agent helper --capabilities code\n"),
        "{stderr}"
    );
    // It names the parameters this pattern has, not one it lacks.
    assert!(
        stderr.contains("--param implementer_capabilities=… --param reviewer_capabilities=…"),
        "{stderr}"
    );
    assert!(!stderr.contains("--param capabilities="), "{stderr}");
    let list: Vec<serde_json::Value> = {
        let (status, v) = c.http().get("/api/v1/workflows").await;
        assert_eq!(status, 200);
        serde_json::from_value(v).unwrap()
    };
    assert_eq!(list[0]["status"], "cancelled", "{list:?}");

    // Asked to wait, it does, and runs once an agent with them starts.
    let mut run = c.spawn_omoi(&[
        "run",
        "majority_vote",
        "--param",
        "question=q",
        "--wait-for-agents",
    ]);
    let mut lines = tokio::io::BufReader::new(run.stderr.take().unwrap()).lines();
    let mut said = String::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            said.push_str(&line);
            said.push('\n');
            if line.contains("waiting for them (--wait-for-agents)") {
                break;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the run says it waits: {said}"));
    // The rest (progress) is drained, so the run never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    assert!(said.contains("--param capabilities=…"), "{said}");
    c.spawn_worker("w2", "review", 3).await;
    let status = tokio::time::timeout(Duration::from_secs(60), run.wait())
        .await
        .expect("the run ends once an agent can take its steps")
        .unwrap();
    assert!(status.success());
    c.stop().await;
}
