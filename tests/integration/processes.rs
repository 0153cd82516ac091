//! Real `omoi` processes: a worker that heartbeats, stops cleanly on SIGTERM, and whose agent
//! goes stale and offline when the process is killed.

use std::process::Stdio;
use std::time::Duration;

use omoi::db::agents;
use omoi::domain::AgentStatus;
use omoi::runtime::Shutdown;
use tokio::process::{Child, Command};

use crate::env::{TestEnv, eventually, free_port};

fn spawn_worker(env: &TestEnv, agent: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_omoi"))
        .args([
            "worker",
            "--agent",
            agent,
            "--capabilities",
            "echo,sleep",
            "--capacity",
            "2",
        ])
        .envs(env.child_env())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn omoi worker")
}

fn signal(child: &Child, sig: &str) {
    let pid = child.id().expect("running child").to_string();
    let status = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

async fn registered(env: &TestEnv, name: &str) -> omoi::protocol::registry::AgentRecord {
    eventually(
        Duration::from_secs(15),
        "agent registered and heartbeating",
        || async {
            agents::get_live_by_name(&env.pool, name)
                .await
                .unwrap()
                .filter(|a| a.status == AgentStatus::Idle)
        },
    )
    .await
}

/// A fresh environment with a control plane running in this process.
async fn with_control_plane() -> (TestEnv, Shutdown) {
    let env = TestEnv::new().await;
    let shutdown = Shutdown::new();
    omoi::coordinator::start(&env.settings(), &shutdown)
        .await
        .unwrap();
    (env, shutdown)
}

#[tokio::test]
async fn a_worker_heartbeats_and_exits_cleanly_on_sigterm() {
    let (env, shutdown) = with_control_plane().await;
    let mut worker = spawn_worker(&env, "w1");
    let agent = registered(&env, "w1").await;
    assert_eq!(agent.capabilities, vec!["echo", "sleep"]);
    let first_beat = agent.last_heartbeat.unwrap();
    eventually(Duration::from_secs(5), "a later heartbeat", || async {
        let a = agents::get(&env.pool, agent.id).await.unwrap();
        (a.last_heartbeat.unwrap() > first_beat).then_some(())
    })
    .await;

    signal(&worker, "-TERM");
    let status = tokio::time::timeout(Duration::from_secs(10), worker.wait())
        .await
        .expect("worker exits within 10 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "clean exit, got {status:?}");
    // It said goodbye: offline at once, not after the silence timeout.
    let a = agents::get(&env.pool, agent.id).await.unwrap();
    assert_eq!(a.status, AgentStatus::Offline);
    shutdown.drain(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_killed_worker_goes_stale_then_offline_and_its_restart_reclaims_the_agent() {
    let (env, shutdown) = with_control_plane().await;
    let mut worker = spawn_worker(&env, "w1");
    let agent = registered(&env, "w1").await;

    signal(&worker, "-KILL");
    let _ = worker.wait().await;
    eventually(Duration::from_secs(5), "offline after SIGKILL", || async {
        let a = agents::get(&env.pool, agent.id).await.unwrap();
        (a.status == AgentStatus::Offline).then_some(())
    })
    .await;

    let mut restarted = spawn_worker(&env, "w1");
    let back = registered(&env, "w1").await;
    assert_eq!(
        back.id, agent.id,
        "a restarted worker gets its agent (and its id) back"
    );
    signal(&restarted, "-TERM");
    let _ = tokio::time::timeout(Duration::from_secs(10), restarted.wait()).await;
    shutdown.drain(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn omoi_dev_starts_a_private_nats_when_none_answers_and_runs_workers() {
    let env = TestEnv::new().await;
    let dead_nats = format!("nats://127.0.0.1:{}", free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_omoi"))
        .args(["dev", "--workers", "2"])
        .envs(env.child_env())
        .env("OMOI_NATS_URL", &dead_nats)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Both dev workers register (through the private server) in this test's database.
    eventually(
        Duration::from_secs(30),
        "dev workers registered",
        || async {
            let live: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM agents WHERE name LIKE 'dev-worker-%' AND status = 'idle'",
            )
            .fetch_one(&env.pool)
            .await
            .unwrap();
            (live == 2).then_some(())
        },
    )
    .await;
    signal(&child, "-INT");
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("omoi dev stops on SIGINT")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("started a private nats-server"), "{stderr}");
    assert!(out.status.success(), "{stderr}");
}

/// `omoi <command>` pointed at a PostgreSQL that does not answer: its failed run's stderr, which
/// names the URL it was given.
async fn without_postgres(command: &str, namespace: &str) -> String {
    let dead_pg = format!("postgres://postgres@127.0.0.1:{}/omoi", free_port());
    let out = Command::new(env!("CARGO_BIN_EXE_omoi"))
        .arg(command)
        .env("OMOI_DATABASE_URL", &dead_pg)
        .env("OMOI_NAMESPACE", namespace)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(stderr.contains(&dead_pg), "{stderr}");
    stderr
}

#[tokio::test]
async fn omoi_dev_without_postgres_names_the_url_it_tried_and_how_to_start_one() {
    let stderr = without_postgres("dev", "tdevnopg").await;
    assert!(
        stderr.contains("pg_ctlcluster") && stderr.contains("docker compose up -d postgres"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_worker_hosts_several_agents_from_an_agents_file() {
    let (env, shutdown) = with_control_plane().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agents.toml");
    std::fs::write(
        &file,
        "[[agents]]\nname = \"coder\"\ncapabilities = [\"rust\", \"shell\"]\ncapacity = 2\n\n\
         [[agents]]\nname = \"reviewer\"\ncapabilities = [\"review\"]\nagent_type = \"reviewer\"\ntags = [\"senior\"]\n",
    )
    .unwrap();
    let mut worker = Command::new(env!("CARGO_BIN_EXE_omoi"))
        .args(["worker", "--agents-file"])
        .arg(&file)
        .envs(env.child_env())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let coder = registered(&env, "coder").await;
    let reviewer = registered(&env, "reviewer").await;
    assert_eq!(
        (coder.capabilities.clone(), coder.capacity),
        (vec!["rust".to_string(), "shell".to_string()], 2)
    );
    assert_eq!(
        (reviewer.agent_type.as_str(), reviewer.tags.clone()),
        ("reviewer", vec!["senior".to_string()])
    );
    signal(&worker, "-TERM");
    let status = tokio::time::timeout(Duration::from_secs(10), worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    shutdown.drain(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn omoi_coordinator_on_a_fresh_server_creates_its_database_and_migrates_it() {
    let env = TestEnv::new().await;
    let fresh = format!(
        "omoi_fresh_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let fresh_url = crate::env::replace_database(&crate::env::admin_database_url(), &fresh);
    let mut coordinator = Command::new(env!("CARGO_BIN_EXE_omoi"))
        .arg("coordinator")
        .envs(env.child_env())
        .env("OMOI_DATABASE_URL", &fresh_url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let migrations = omoi::db::MIGRATOR.iter().count() as i64;
    let url = fresh_url.clone();
    eventually(
        Duration::from_secs(30),
        "the fresh database migrated",
        || {
            let url = url.clone();
            async move {
                let pool = sqlx::PgPool::connect(&url).await.ok()?;
                let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
                    .fetch_one(&pool)
                    .await
                    .ok()?;
                pool.close().await;
                (applied == migrations).then_some(())
            }
        },
    )
    .await;
    assert!(
        coordinator.try_wait().unwrap().is_none(),
        "the coordinator runs on"
    );
    coordinator.kill().await.unwrap();
    let admin = sqlx::PgPool::connect(&crate::env::admin_database_url())
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {fresh} WITH (FORCE)"
    )))
    .execute(&admin)
    .await
    .unwrap();
}

#[tokio::test]
async fn an_error_and_its_causes_are_said_once() {
    let stderr = without_postgres("migrate", "terronce").await;
    // Before: `connect to PostgreSQL at …: pool timed out …: pool timed out …`.
    let line = stderr.lines().find(|l| l.starts_with("omoi: ")).unwrap();
    let parts: Vec<&str> = line.split(": ").collect();
    for (i, part) in parts.iter().enumerate() {
        assert!(!parts[i + 1..].contains(part), "said twice: {line}");
    }
}

#[tokio::test]
async fn a_worker_restarted_under_its_name_runs_its_old_tasks_at_once_at_a_new_attempt() {
    let (env, shutdown) = with_control_plane().await;
    let mut worker = spawn_worker(&env, "w1");
    let agent = registered(&env, "w1").await;
    let client = omoi::client::WorkflowClient::new(env.nats.clone(), env.names.clone());
    let spec: omoi::domain::dag::WorkflowSpec = serde_json::from_value(serde_json::json!({
        "name": "restart", "tasks": [
            {"key": "long", "executor": "sleep", "capabilities": ["sleep"], "input": {"ms": 1500}}]
    }))
    .unwrap();
    let submitted = client.submit(&spec).await.unwrap();
    let task = submitted.tasks["long"];
    eventually(Duration::from_secs(15), "running on w1", || async {
        let t = omoi::db::tasks::get(&env.pool, task).await.unwrap();
        (t.status == omoi::domain::TaskStatus::Running && t.agent_id == Some(agent.id))
            .then_some(())
    })
    .await;
    signal(&worker, "-KILL");
    let _ = worker.wait().await;
    // Restarted at once: it takes the agent over as soon as the agent is stale, before it is
    // offline — when nothing else would take the killed process's task back.
    let mut restarted = spawn_worker(&env, "w1");
    // The task is dispatched again at once, at a new attempt (before: its dispatch came back
    // only after the 30 s ack wait, at the same attempt), and completes.
    let view = client
        .wait(submitted.workflow_id, Duration::from_secs(25))
        .await
        .unwrap();
    let long = view.tasks.iter().find(|t| t.key == "long").unwrap();
    assert_eq!(
        view.workflow.status,
        omoi::domain::WorkflowStatus::Completed
    );
    assert_eq!(long.attempt, 2, "{long:?}");
    signal(&restarted, "-TERM");
    let _ = tokio::time::timeout(Duration::from_secs(10), restarted.wait()).await;
    shutdown.drain(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn omoi_bench_prints_every_figure_and_shows_its_progress() {
    let env = TestEnv::new().await;
    let out = tokio::time::timeout(
        Duration::from_secs(600),
        Command::new(env!("CARGO_BIN_EXE_omoi"))
            .args([
                "bench",
                "--tasks",
                "1500",
                "--chain",
                "10",
                "--split",
                "10",
                "--samples",
                "20",
                "--backlog",
                "0",
                "--workers",
                "2",
                "--capacity",
                "4",
            ])
            .envs(env.child_env())
            .output(),
    )
    .await
    .expect("bench finished")
    .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for figure in [
        "raw pipelined fleet",
        "1500-task wide DAG",
        "10-task chain",
        "10-item dynamic split",
        "fetch-and-assign",
        "scheduler memory",
        "lock acquire",
    ] {
        assert!(stdout.contains(figure), "no `{figure}` in:\n{stdout}");
    }
    // Progress goes to stderr (stdout is the report): at the start and the end of each wait.
    for label in ["1500 tasks", "chain", "split"] {
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with(&format!("bench: {label}: ")))
            .collect();
        assert!(lines.len() >= 2, "{label}: {lines:?}\n{stderr}");
    }
    assert!(
        stderr.contains("bench: 1500 tasks: 1500 of 1500 completed"),
        "{stderr}"
    );
}
