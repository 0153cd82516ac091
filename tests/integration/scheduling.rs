//! DAG scheduling end to end: real coordinator, real `omoi worker` processes.

use std::collections::HashMap;
use std::time::Duration;

use omoi::domain::{TaskStatus, WorkflowStatus};
use serde_json::{Value, json};

use crate::cluster::{Cluster, max_overlap, task};

type Instant = chrono::DateTime<chrono::Utc>;

/// A shell task that sleeps `ms` and reports when it really started and ended (ns since epoch).
fn timed(key: &str, ms: u64, deps: &[&str]) -> Value {
    json!({
        "key": key,
        "executor": "shell",
        "capabilities": ["shell"],
        "input": {"command": format!(
            "s=$(date +%s%N); sleep {}; e=$(date +%s%N); echo \"{{\\\"start\\\": $s, \\\"end\\\": $e}}\"",
            ms as f64 / 1000.0
        )},
        "depends_on": deps,
    })
}

/// The (start, end) a timed task recorded.
fn span(t: &omoi::protocol::workflows::TaskRecord) -> (Instant, Instant) {
    let out = t
        .output
        .as_ref()
        .unwrap_or_else(|| panic!("{} has no output", t.key));
    let at = |f: &str| {
        let ns = out[f]
            .as_i64()
            .unwrap_or_else(|| panic!("{}: {out}", t.key));
        chrono::DateTime::from_timestamp_nanos(ns)
    };
    (at("start"), at("end"))
}

#[tokio::test]
async fn a_cyclic_or_broken_dag_is_rejected_whole_with_its_path() {
    let c = Cluster::start().await;
    let http = c.http();
    let (status, v) = http
        .post(
            "/api/v1/workflows",
            &json!({"name": "loop", "tasks": [
                {"key": "fetch"},
                {"key": "build", "depends_on": ["fetch", "test"]},
                {"key": "test", "depends_on": ["build"]}
            ]}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("build → test → build"),
        "{v}"
    );
    let (status, v) = http
        .post(
            "/api/v1/workflows",
            &json!({"name": "w", "tasks": [{"key": "a", "depends_on": ["ghost"]}]}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("ghost"),
        "{v}"
    );
    let (status, v) = http
        .post(
            "/api/v1/workflows",
            &json!({"name": "w", "tasks": [{"key": "a"}, {"key": "a"}]}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["field"].as_str()),
        (400, Some("tasks.key"))
    );
    let stored: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM workflows) + (SELECT count(*) FROM tasks)",
    )
    .fetch_one(&c.env.pool)
    .await
    .unwrap();
    assert_eq!(stored, 0, "nothing is half-stored");
    c.stop().await;
}

#[tokio::test]
async fn chains_diamonds_fan_out_and_fan_in_respect_every_dependency_and_pass_outputs() {
    let mut c = Cluster::start().await;
    c.spawn_shell_worker("w1", "shell,echo", 4).await;
    c.spawn_shell_worker("w2", "shell,echo", 4).await;
    let mut tasks = vec![timed("root", 50, &[])];
    // chain
    tasks.push(timed("c1", 30, &["root"]));
    tasks.push(timed("c2", 30, &["c1"]));
    tasks.push(timed("c3", 30, &["c2"]));
    // diamond
    tasks.push(timed("left", 80, &["root"]));
    tasks.push(timed("right", 40, &["root"]));
    tasks.push(timed("diamond", 20, &["left", "right"]));
    // wide fan-out then fan-in
    let fan: Vec<String> = (0..12).map(|i| format!("f{i}")).collect();
    for f in &fan {
        tasks.push(timed(f, 60, &["root"]));
    }
    let fan_refs: Vec<&str> = fan.iter().map(String::as_str).collect();
    tasks.push(timed("fan-in", 10, &fan_refs));
    // context passing
    tasks.push(json!({"key": "report", "capabilities": ["echo"], "depends_on": ["diamond", "c3"],
                      "input": {"diamond_end": "${deps.diamond.output.end}", "chain": "${deps.c3.output}", "echo_dependencies": true}}));
    let view = c
        .run(
            json!({"name": "shapes", "tasks": tasks}),
            Duration::from_secs(60),
        )
        .await;

    let by_key: HashMap<&str, &omoi::protocol::workflows::TaskRecord> =
        view.tasks.iter().map(|t| (t.key.as_str(), t)).collect();
    for t in &view.tasks {
        assert_eq!(t.status, TaskStatus::Completed);
        if t.executor != "shell" {
            continue;
        }
        let (start, _) = span(t);
        for d in &t.depends_on {
            let (_, dep_end) = span(by_key[d.as_str()]);
            assert!(
                start >= dep_end,
                "{} started {start} before {d} ended {dep_end}",
                t.key
            );
        }
    }
    // The fan-out really ran in parallel (8 slots over two workers).
    let fan_spans: Vec<_> = fan.iter().map(|f| span(by_key[f.as_str()])).collect();
    assert!(
        max_overlap(&fan_spans) >= 4,
        "fan-out ran with too little parallelism"
    );
    // Outputs passed along edges, resolved into the input and given whole.
    let report = task(&view, "report").output.clone().unwrap();
    assert_eq!(
        report["input"]["diamond_end"],
        task(&view, "diamond").output.as_ref().unwrap()["end"]
    );
    assert_eq!(
        report["input"]["chain"],
        *task(&view, "c3").output.as_ref().unwrap()
    );
    assert_eq!(
        report["dependencies"]["c3"],
        *task(&view, "c3").output.as_ref().unwrap()
    );
    c.stop().await;
}

#[tokio::test]
async fn tasks_go_only_to_capable_agents_and_missing_capabilities_are_reported() {
    let mut c = Cluster::start().await;
    c.spawn_worker("py", "python,echo", 2).await;
    c.spawn_worker("rs", "rust,echo", 2).await;
    let agents: HashMap<String, String> =
        sqlx::query_as::<_, (String, String)>("SELECT id::text, name FROM agents")
            .fetch_all(&c.env.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let submitted = c
        .submit(json!({"name": "caps", "failure_policy": "continue", "tasks": [
            {"key": "p1", "capabilities": ["python"]}, {"key": "p2", "capabilities": ["python"]},
            {"key": "r1", "capabilities": ["rust"]}, {"key": "r2", "capabilities": ["rust", "echo"]},
            {"key": "g1", "capabilities": ["go"]}
        ]}))
        .await;
    assert_eq!(submitted.unschedulable.len(), 1);
    assert_eq!(submitted.unschedulable[0].key, "g1");
    assert_eq!(submitted.unschedulable[0].missing_capabilities, vec!["go"]);
    let view = crate::env::eventually(Duration::from_secs(20), "capable tasks done", || async {
        let v = c.client.get(submitted.workflow_id).await.unwrap();
        (v.counts.get("completed") == Some(&4)).then_some(v)
    })
    .await;
    for t in &view.tasks {
        let Some(agent) = t.agent_id else { continue };
        let name = &agents[&agent.to_string()];
        let expected = if t.key.starts_with('p') { "py" } else { "rs" };
        assert_eq!(name, expected, "{} ran on {name}", t.key);
    }
    let g1 = task(&view, "g1");
    assert_eq!(g1.status, TaskStatus::Ready, "the go task waits");
    assert_eq!(view.unschedulable.len(), 1);
    // An agent that has the capability registers: the waiting task runs at once.
    c.spawn_worker("go", "go", 1).await;
    let done = c.wait(submitted.workflow_id, Duration::from_secs(20)).await;
    assert_eq!(done.workflow.status, WorkflowStatus::Completed);
    c.stop().await;
}

#[tokio::test]
async fn an_agent_never_runs_more_tasks_than_its_capacity() {
    let mut c = Cluster::start().await;
    c.spawn_shell_worker("small", "shell", 2).await;
    c.spawn_shell_worker("big", "shell", 3).await;
    let tasks: Vec<Value> = (0..24).map(|i| timed(&format!("t{i}"), 120, &[])).collect();
    let view = c
        .run(
            json!({"name": "load", "tasks": tasks}),
            Duration::from_secs(60),
        )
        .await;
    let mut per_agent: HashMap<_, Vec<_>> = HashMap::new();
    for t in &view.tasks {
        per_agent
            .entry(t.agent_id.unwrap())
            .or_default()
            .push(span(t));
    }
    let names: HashMap<omoi::domain::AgentId, (String, i32)> =
        sqlx::query_as::<_, (omoi::domain::AgentId, String, i32)>(
            "SELECT id, name, capacity FROM agents",
        )
        .fetch_all(&c.env.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, n, cap)| (id, (n, cap)))
        .collect();
    assert_eq!(per_agent.len(), 2, "both agents took work");
    for (agent, spans) in &per_agent {
        let (name, capacity) = &names[agent];
        let peak = max_overlap(spans);
        assert!(
            peak <= *capacity as usize,
            "{name} ran {peak} at once, capacity {capacity}"
        );
        assert!(
            peak >= 2,
            "{name} never ran tasks in parallel (peak {peak})"
        );
    }
    c.stop().await;
}

#[tokio::test]
async fn a_small_workflow_is_not_starved_behind_a_thousand_task_one() {
    let mut c = Cluster::start().await;
    c.spawn_worker("w1", "sleep", 4).await;
    c.spawn_worker("w2", "sleep", 4).await;
    let big: Vec<Value> = (0..1_000)
        .map(|i| json!({"key": format!("b{i}"), "executor": "sleep", "capabilities": ["sleep"], "input": {"ms": 10}}))
        .collect();
    let big = c.submit(json!({"name": "big", "tasks": big})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let small: Vec<Value> = (0..3)
        .map(|i| json!({"key": format!("s{i}"), "executor": "sleep", "capabilities": ["sleep"], "input": {"ms": 10}}))
        .collect();
    let small = c.submit(json!({"name": "small", "tasks": small})).await;
    let small_done = c.wait(small.workflow_id, Duration::from_secs(30)).await;
    assert_eq!(small_done.workflow.status, WorkflowStatus::Completed);
    // A 10 ms task ends before its worker reports `started` (20 ms): its completion says how
    // long it ran, and its start is dated back by that much.
    for t in &small_done.tasks {
        let (started, finished) = (t.started_at.unwrap(), t.finished_at.unwrap());
        assert!(
            (finished - started).num_milliseconds() >= 10,
            "{}: started {started}, finished {finished}",
            t.key
        );
    }
    let big_now = c.client.get(big.workflow_id).await.unwrap();
    let big_left = 1_000 - big_now.counts.get("completed").copied().unwrap_or(0);
    assert!(
        big_left > 300,
        "the small workflow finished only after the big one was nearly done ({big_left} left)"
    );
    let big_done = c.wait(big.workflow_id, Duration::from_secs(120)).await;
    assert_eq!(big_done.workflow.status, WorkflowStatus::Completed);
    c.stop().await;
}

#[tokio::test]
async fn failed_attempts_retry_then_fail_fast_or_continue_per_policy() {
    let mut c = Cluster::start().await;
    c.spawn_worker("w", "sleep,echo", 4).await;
    let failing = json!({"key": "bad", "executor": "sleep", "capabilities": ["sleep"],
                         "input": {"ms": 10, "fail": true}, "max_attempts": 3});
    // fail_fast: the workflow fails and every unfinished task is cancelled.
    let ff = c
        .submit(json!({"name": "ff", "tasks": [failing.clone(),
            {"key": "after", "depends_on": ["bad"]},
            {"key": "slow", "executor": "sleep", "capabilities": ["sleep"], "input": {"ms": 20000}}]}))
        .await;
    let view = c.wait(ff.workflow_id, Duration::from_secs(30)).await;
    assert_eq!(view.workflow.status, WorkflowStatus::Failed);
    let bad = task(&view, "bad");
    assert_eq!(
        (bad.status, bad.failures, bad.attempt),
        (TaskStatus::Failed, 3, 3)
    );
    assert!(bad.error.as_deref().unwrap().contains("failed as asked"));
    assert_eq!(task(&view, "after").status, TaskStatus::Cancelled);
    assert_eq!(task(&view, "slow").status, TaskStatus::Cancelled);

    // continue: only the failed task's dependants fail; the independent branch completes.
    let cont = c
        .submit(
            json!({"name": "cont", "failure_policy": "continue", "tasks": [failing,
            {"key": "child", "depends_on": ["bad"]},
            {"key": "grandchild", "depends_on": ["child"]},
            {"key": "independent"}]}),
        )
        .await;
    let view = c.wait(cont.workflow_id, Duration::from_secs(30)).await;
    assert_eq!(view.workflow.status, WorkflowStatus::Failed);
    assert_eq!(task(&view, "child").status, TaskStatus::Failed);
    assert_eq!(task(&view, "grandchild").status, TaskStatus::Failed);
    assert_eq!(task(&view, "independent").status, TaskStatus::Completed);
    assert!(
        task(&view, "child")
            .error
            .as_deref()
            .unwrap()
            .contains("dependency bad failed")
    );
    c.stop().await;
}

#[tokio::test]
async fn cancelling_a_workflow_stops_its_running_task_and_frees_the_agent() {
    let mut c = Cluster::start().await;
    c.spawn_worker("w", "sleep", 1).await;
    let long = c
        .submit(json!({"name": "long", "tasks": [
            {"key": "forever", "executor": "sleep", "capabilities": ["sleep"], "input": {"ms": 60000}}]}))
        .await;
    crate::env::eventually(Duration::from_secs(10), "running", || async {
        let v = c.client.get(long.workflow_id).await.unwrap();
        (task(&v, "forever").status == TaskStatus::Running).then_some(())
    })
    .await;
    let view = c.client.cancel(long.workflow_id).await.unwrap();
    assert_eq!(view.workflow.status, WorkflowStatus::Cancelled);
    // The single slot is free again quickly: a new task runs well before 60 s.
    let started = std::time::Instant::now();
    c.run(json!({"name": "next", "tasks": [{"key": "n", "executor": "sleep", "capabilities": ["sleep"], "input": {"ms": 10}}]}), Duration::from_secs(15))
        .await;
    assert!(started.elapsed() < Duration::from_secs(15));
    c.stop().await;
}

#[tokio::test]
async fn tasks_on_one_exclusive_resource_never_overlap_and_shared_readers_do() {
    let mut c = Cluster::start().await;
    c.spawn_shell_worker("w1", "shell", 3).await;
    c.spawn_shell_worker("w2", "shell", 3).await;
    let with = |key: String, resource: &str, mode: &str, ms: u64| {
        let mut t = timed(&key, ms, &[]);
        t["resources"] = json!([{"name": resource, "mode": mode}]);
        t
    };
    let mut tasks: Vec<Value> = (0..6)
        .map(|i| with(format!("x{i}"), "repo:api", "exclusive", 100))
        .collect();
    tasks.extend((0..4).map(|i| with(format!("r{i}"), "docs", "shared", 400)));
    // Crossing resource sets in both orders: canonical lock order means no deadlock.
    for i in 0..4 {
        let mut t = timed(&format!("cross{i}"), 30, &[]);
        t["resources"] = if i % 2 == 0 {
            json!([{"name": "lock:a"}, {"name": "lock:b"}])
        } else {
            json!([{"name": "lock:b"}, {"name": "lock:a"}])
        };
        tasks.push(t);
    }
    let view = c
        .run(
            json!({"name": "locks", "tasks": tasks}),
            Duration::from_secs(90),
        )
        .await;
    let spans = |prefix: &str| -> Vec<_> {
        view.tasks
            .iter()
            .filter(|t| t.key.starts_with(prefix))
            .map(span)
            .collect()
    };
    assert_eq!(max_overlap(&spans("x")), 1, "exclusive holders overlapped");
    assert!(
        max_overlap(&spans("r")) >= 2,
        "shared readers never overlapped"
    );
    assert_eq!(max_overlap(&spans("cross")), 1);
    // Every lock was released.
    let kv = omoi::bus::provision::open_bucket(&c.env.js, &c.env.names, "locks")
        .await
        .unwrap();
    let left = omoi::bus::kv_lock::LockManager::new(kv, Duration::from_secs(2))
        .list()
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    c.stop().await;
}

#[tokio::test]
async fn the_http_executor_posts_the_input_and_returns_the_reply() {
    let mut c = Cluster::start().await;
    c.spawn_worker_with(
        "w",
        "http",
        1,
        &[
            ("OMOI_WORKER_EXECUTORS", "http"),
            ("OMOI_HTTP_EXECUTOR_ALLOW", "127.0.0.1"),
        ],
    )
    .await;
    // A tiny endpoint that answers with what it got.
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(|axum::Json(body): axum::Json<Value>| async move {
            axum::Json(json!({"got": body["input"]["n"]}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let view = c
        .run(
            json!({"name": "hook", "tasks": [{"key": "call", "executor": "http", "capabilities": ["http"],
                   "input": {"url": format!("http://{addr}/hook"), "n": 42}}]}),
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(task(&view, "call").output, Some(json!({"got": 42})));
    c.stop().await;
}

#[tokio::test]
async fn lock_waits_reach_the_control_planes_metrics_and_the_completed_events() {
    let mut c = Cluster::start().await;
    c.spawn_worker("w1", "x", 2).await;
    // Two tasks on one exclusive resource, run by a worker process: one waits for the other.
    let locked = |key: &str| {
        json!({"key": key, "executor": "sleep", "capabilities": ["x"], "input": {"ms": 300},
               "resources": [{"name": "repo:one", "mode": "exclusive"}]})
    };
    let view = c
        .run(
            json!({"name": "waits", "tasks": [locked("a"), locked("b"),
                {"key": "free", "executor": "sleep", "capabilities": ["x"], "input": {"ms": 1}}]}),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(view.workflow.status, WorkflowStatus::Completed);
    let mut events = c
        .env
        .bus
        .subscribe(omoi::bus::events::Subscription {
            filter: Some("task.completed".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut waits = HashMap::new();
    while waits.len() < 3 {
        let d = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("the task.completed events")
            .unwrap()
            .unwrap();
        let t = d.value.event.task().unwrap().clone();
        if t.workflow_id == view.workflow.id {
            waits.insert(t.key, t.lock_wait_ms);
        }
    }
    assert!(waits["a"].is_some() && waits["b"].is_some(), "{waits:?}");
    assert_eq!(waits["free"], None, "no resources, no wait to report");
    // Where an operator looks: the control plane's /metrics, from the workers' reports, as a
    // Prometheus histogram.
    let (status, metrics) = c.http().get_text("/metrics").await;
    assert_eq!(status, 200);
    let count: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("omoi_task_lock_wait_seconds_count "))
        .expect("omoi_task_lock_wait_seconds on the control plane")
        .trim()
        .parse()
        .unwrap();
    assert!(count >= 2.0, "{count}");
    assert!(
        metrics.contains("omoi_task_lock_wait_seconds_bucket{le="),
        "buckets, not a summary"
    );
    c.stop().await;
}
