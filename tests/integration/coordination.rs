//! Coordination primitives end to end — sync points, joins, merges, splits and loops run by the
//! real coordinator over real `omoi worker` processes, NATS and PostgreSQL.

use std::time::Duration;

use omoi::bus::events::Subscription;
use omoi::domain::{TaskStatus, WorkflowStatus};
use omoi::protocol::workflows::{TaskRecord, WorkflowView};
use omoi::protocol::{Envelope, Event};
use serde_json::{Value, json};

use crate::cluster::{Cluster, task};

/// A `sleep` task returning `output` after `ms`.
fn sleeper(key: &str, ms: u64, output: Value) -> Value {
    json!({"key": key, "executor": "sleep", "input": {"ms": ms, "output": output}})
}

/// Every `coordination.*` event published so far in this namespace.
async fn coordination_events(c: &Cluster) -> Vec<Envelope> {
    let mut sub = c
        .env
        .bus
        .subscribe(Subscription {
            filter: Some("coordination.>".into()),
            ..Subscription::default()
        })
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(700), sub.next()).await {
        out.push(d.value.clone());
        d.ack().await.unwrap();
    }
    out
}

/// Waits until at least `n` tasks of the workflow have keys `LIKE pattern` (and, if given, one
/// of `statuses`).
async fn wait_for_tasks(
    c: &Cluster,
    workflow: omoi::domain::WorkflowId,
    pattern: &str,
    statuses: &[&str],
    n: i64,
    what: &str,
) {
    let statuses: Vec<String> = statuses.iter().map(|s| s.to_string()).collect();
    crate::env::eventually(Duration::from_secs(30), what, || {
        let (pool, statuses) = (c.env.pool.clone(), statuses.clone());
        async move {
            let found: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM tasks WHERE workflow_id = $1 AND key LIKE $2
                   AND (cardinality($3::text[]) = 0 OR status = ANY($3))",
            )
            .bind(workflow)
            .bind(pattern)
            .bind(&statuses)
            .fetch_one(&pool)
            .await
            .unwrap();
            (found >= n).then_some(())
        }
    })
    .await;
}

/// Tasks of the view whose key starts with `prefix` (what a split or loop inserted).
fn inserted<'a>(view: &'a WorkflowView, prefix: &str) -> Vec<&'a TaskRecord> {
    view.tasks
        .iter()
        .filter(|t| t.key.starts_with(prefix))
        .collect()
}

fn count(events: &[Envelope], kind: &str, key: &str) -> usize {
    events
        .iter()
        .filter(|e| e.event.kind() == kind && node_key(&e.event) == Some(key))
        .count()
}

fn node_key(e: &Event) -> Option<&str> {
    match e {
        Event::SyncCreated(n)
        | Event::SyncReady(n)
        | Event::SplitCreated(n)
        | Event::MergeCompleted(n)
        | Event::LoopIteration(n)
        | Event::LoopCompleted(n) => Some(n.key.as_str()),
        _ => None,
    }
}

#[tokio::test]
async fn a_sync_point_waits_for_all_or_for_k_of_n_and_fires_once() {
    let mut c = Cluster::start().await;
    c.spawn_worker("w1", "general", 4).await;
    let view = c
        .run(
            json!({"name": "sync", "tasks": [
                sleeper("a", 50, json!({"v": "a"})),
                sleeper("b", 100, json!({"v": "b"})),
                sleeper("slow", 2_500, json!({"v": "slow"})),
                {"key": "all", "depends_on": ["a", "b", "slow"], "sync": {}},
                {"key": "two", "depends_on": ["a", "b", "slow"], "join": {"quorum": 2}, "sync": {}},
                {"key": "after_two", "depends_on": ["two"], "input": {"seen": "${deps.two.output.completed}"}}
            ]}),
            Duration::from_secs(30),
        )
        .await;
    let two = task(&view, "two");
    let slow = task(&view, "slow");
    let all = task(&view, "all");
    // The 2-of-3 sync point fired without the slow source; the full one waited for it.
    assert!(two.finished_at.unwrap() < slow.finished_at.unwrap());
    assert!(all.finished_at.unwrap() >= slow.finished_at.unwrap());
    let out = two.output.as_ref().unwrap();
    assert_eq!(out["completed"], json!(["a", "b"]), "{out}");
    assert_eq!(out["missing"], json!(["slow"]));
    assert_eq!(out["outputs"]["b"], json!({"v": "b"}));
    assert_eq!(
        task(&view, "after_two").output.as_ref().unwrap()["input"]["seen"],
        json!(["a", "b"])
    );
    assert_eq!(
        all.output.as_ref().unwrap()["completed"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let events = coordination_events(&c).await;
    for key in ["all", "two"] {
        assert_eq!(count(&events, "coordination.sync.created", key), 1, "{key}");
        assert_eq!(count(&events, "coordination.sync.ready", key), 1, "{key}");
    }
    c.stop().await;
}

#[tokio::test]
async fn a_sync_timeout_fires_and_continues_or_fails_per_its_policy() {
    let mut c = Cluster::start().await;
    c.spawn_worker("w1", "general", 4).await;
    let started = std::time::Instant::now();
    let view = c
        .run(
            json!({"name": "timeout-continue", "tasks": [
                sleeper("fast", 50, json!(1)),
                sleeper("stuck", 3_000, json!(2)),
                {"key": "gate", "depends_on": ["fast", "stuck"],
                 "sync": {"timeout_seconds": 1, "on_timeout": "continue"}},
                {"key": "next", "depends_on": ["gate"]}
            ]}),
            Duration::from_secs(30),
        )
        .await;
    let gate = task(&view, "gate");
    let out = gate.output.as_ref().unwrap();
    assert_eq!(out["timed_out"], json!(true), "{out}");
    assert_eq!(out["completed"], json!(["fast"]));
    assert_eq!(out["missing"], json!(["stuck"]));
    assert!(gate.finished_at.unwrap() < task(&view, "stuck").finished_at.unwrap());
    let events = coordination_events(&c).await;
    let ready: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::SyncReady(n) if n.key == "gate" => Some(n.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(ready.len(), 1);
    assert!(ready[0].timed_out);

    // A sync point over a split that misses the deadline gets what the split has so far.
    let view = c
        .run(
            json!({"name": "timeout-split", "tasks": [
                sleeper("plan", 10, json!({"ms": [50, 60, 4_000]})),
                {"key": "map", "depends_on": ["plan"], "split": {
                    "items": "${deps.plan.output.ms}",
                    "task": {"executor": "sleep", "input": {"ms": "${item}", "output": {"slept": "${item}"}}}}},
                {"key": "mapped", "depends_on": ["map"],
                 "sync": {"timeout_seconds": 2, "on_timeout": "continue"}},
                {"key": "reduce", "depends_on": ["mapped"],
                 "input": {"got": "${deps.mapped.output.outputs.map.outputs}"}}
            ]}),
            Duration::from_secs(30),
        )
        .await;
    let mapped = task(&view, "mapped").output.clone().unwrap();
    assert_eq!(mapped["timed_out"], json!(true), "{mapped}");
    assert_eq!(mapped["outputs"]["map"]["partial"], json!(true));
    assert_eq!(mapped["outputs"]["map"]["completed"], json!(2));
    assert_eq!(
        task(&view, "reduce").output.as_ref().unwrap()["input"]["got"],
        json!([{"slept": 50}, {"slept": 60}, null])
    );
    assert!(task(&view, "reduce").finished_at.unwrap() < task(&view, "map/2").finished_at.unwrap());

    let submitted = c
        .submit(json!({"name": "timeout-fail", "tasks": [
            sleeper("stuck", 20_000, json!(2)),
            {"key": "gate", "depends_on": ["stuck"], "sync": {"timeout_seconds": 1}},
        ]}))
        .await;
    let view = c.wait(submitted.workflow_id, Duration::from_secs(15)).await;
    assert_eq!(view.workflow.status, WorkflowStatus::Failed);
    let gate = task(&view, "gate");
    assert_eq!(gate.status, TaskStatus::Failed);
    assert!(
        gate.error
            .as_deref()
            .unwrap()
            .contains("timed out after 1 s")
    );
    assert_eq!(task(&view, "stuck").status, TaskStatus::Cancelled);
    assert!(started.elapsed() < Duration::from_secs(20));
    c.stop().await;
}

#[tokio::test]
async fn merges_combine_intersect_and_vote_and_wait_for_their_sources() {
    let mut c = Cluster::start().await;
    c.spawn_worker("w1", "general", 8).await;
    let view = c
        .run(
            json!({"name": "merges", "tasks": [
                sleeper("x", 30, json!(["a", "b", "c"])),
                sleeper("y", 60, json!(["b", "c", "d"])),
                sleeper("slow", 1_500, json!(["c", "b"])),
                {"key": "both", "depends_on": ["x", "y"], "merge": {"strategy": "combine"}},
                {"key": "common", "depends_on": ["x", "y", "slow"], "merge": {"strategy": "intersection"}},
                // Votes arrive approve, reject, approve: after two there is no majority yet.
                sleeper("v1", 30, json!({"verdict": "approve"})),
                sleeper("v2", 300, json!({"verdict": "reject"})),
                sleeper("v3", 1_200, json!({"verdict": "approve"})),
                {"key": "vote", "depends_on": ["v1", "v2", "v3"], "join": {"quorum": 2},
                 "merge": {"strategy": "majority", "field": "verdict"}},
                {"key": "use", "depends_on": ["vote", "common"],
                 "input": {"decision": "${deps.vote.output}", "common": "${deps.common.output}"}}
            ]}),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(
        task(&view, "both").output,
        Some(json!({"x": ["a", "b", "c"], "y": ["b", "c", "d"]}))
    );
    // Not merged until every source completed.
    let common = task(&view, "common");
    assert!(common.finished_at.unwrap() >= task(&view, "slow").finished_at.unwrap());
    assert_eq!(common.output, Some(json!(["b", "c"])));
    let vote = task(&view, "vote");
    assert_eq!(vote.output, Some(json!("approve")));
    assert!(vote.finished_at.unwrap() >= task(&view, "v3").finished_at.unwrap());
    assert_eq!(
        task(&view, "use").output.as_ref().unwrap()["input"],
        json!({"decision": "approve", "common": ["b", "c"]})
    );
    let events = coordination_events(&c).await;
    let merged: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::MergeCompleted(n) if n.key == "vote" => Some(n.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(merged.len(), 1);
    assert_eq!(merged[0].result, Some(json!("approve")));
    assert_eq!(merged[0].strategy.as_deref(), Some("majority"));
    assert_eq!(merged[0].tasks, vec!["v1", "v2", "v3"]);
    c.stop().await;
}

#[tokio::test]
async fn a_quorum_join_tolerates_a_failed_source_even_under_fail_fast() {
    let mut c = Cluster::start().await;
    c.spawn_worker("w1", "general", 4).await;
    let view = c
        .run(
            json!({"name": "tolerant", "tasks": [
                sleeper("a", 30, json!(1)),
                {"key": "broken", "executor": "sleep", "max_attempts": 1, "input": {"ms": 10, "fail": true}},
                sleeper("c", 1_500, json!(3)),
                {"key": "join", "depends_on": ["a", "broken", "c"], "join": {"quorum": 2},
                 "input": {"got": "${deps.c.output}"}},
                // `any`: runs on the first source, long before `c`.
                {"key": "first", "depends_on": ["a", "c"], "join": "any"}
            ]}),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(task(&view, "broken").status, TaskStatus::Failed);
    assert_eq!(task(&view, "join").status, TaskStatus::Completed);
    assert!(task(&view, "join").started_at.unwrap() >= task(&view, "c").finished_at.unwrap());
    assert!(task(&view, "first").started_at.unwrap() < task(&view, "c").finished_at.unwrap());

    // Two failures leave the quorum out of reach: the join fails and so does the workflow.
    let submitted = c
        .submit(json!({"name": "intolerant", "failure_policy": "continue", "tasks": [
            {"key": "f1", "executor": "sleep", "max_attempts": 1, "input": {"ms": 10, "fail": true}},
            {"key": "f2", "executor": "sleep", "max_attempts": 1, "input": {"ms": 10, "fail": true}},
            sleeper("ok", 10, json!(1)),
            {"key": "join", "depends_on": ["f1", "f2", "ok"], "join": {"quorum": 2}},
            {"key": "after", "depends_on": ["join"]}
        ]}))
        .await;
    let view = c.wait(submitted.workflow_id, Duration::from_secs(30)).await;
    assert_eq!(view.workflow.status, WorkflowStatus::Failed);
    assert_eq!(task(&view, "join").status, TaskStatus::Failed);
    assert_eq!(task(&view, "after").status, TaskStatus::Failed);
    c.stop().await;
}

#[tokio::test]
async fn a_dynamic_split_over_a_100_item_output_makes_100_tasks_and_joins_them() {
    let mut c = Cluster::start().await;
    c.spawn_worker("w1", "general,rust", 16).await;
    let items: Vec<Value> = (0..100).map(|i| json!({"n": i, "lang": "rust"})).collect();
    let view = c
        .run(
            json!({"name": "split", "tasks": [
                sleeper("plan", 10, json!({"modules": items})),
                {"key": "impl", "depends_on": ["plan"], "split": {
                    "items": "${deps.plan.output.modules}",
                    "task": {"executor": "echo", "capabilities": ["${item.lang}"],
                             "input": {"n": "${item.n}", "index": "${index}"}}}},
                {"key": "sum", "depends_on": ["impl"], "input": {"count": "${deps.impl.output.count}"}}
            ]}),
            Duration::from_secs(60),
        )
        .await;
    let children = inserted(&view, "impl/");
    assert_eq!(children.len(), 100);
    for t in &children {
        assert_eq!(t.depends_on, vec!["plan"], "{}", t.key);
        assert_eq!(t.capabilities, vec!["rust"]);
        assert_eq!(t.status, TaskStatus::Completed);
    }
    let split = task(&view, "impl");
    let out = split.output.as_ref().unwrap();
    assert_eq!(out["count"], 100);
    for i in [0usize, 42, 99] {
        assert_eq!(out["outputs"][i]["input"], json!({"n": i, "index": i}));
    }
    assert_eq!(
        task(&view, "sum").output.as_ref().unwrap()["input"]["count"],
        100
    );
    let events = coordination_events(&c).await;
    assert_eq!(count(&events, "coordination.split.created", "impl"), 1);
    c.stop().await;
}

#[tokio::test]
async fn invalid_splits_and_joins_are_rejected_or_fail_with_their_reason() {
    let mut c = Cluster::start().await;
    c.spawn_worker("w1", "general", 4).await;
    let http = c.http();
    for (spec, field) in [
        // A split reading a task it does not depend on.
        (
            json!({"key": "s", "split": {"items": "${deps.plan.output}", "task": {}}}),
            "tasks.split.items",
        ),
        // A join on sources that do not exist.
        (
            json!({"key": "j", "depends_on": ["ghost"], "sync": {}}),
            "tasks.depends_on",
        ),
        // A quorum above the number of sources.
        (
            json!({"key": "j", "depends_on": ["plan"], "join": {"quorum": 2}}),
            "tasks.join",
        ),
        // An unknown primitive.
        (
            json!({"key": "j", "depends_on": ["plan"], "pattern": "fork"}),
            "",
        ),
    ] {
        let (status, v) = http
            .post(
                "/api/v1/workflows",
                &json!({"name": "bad", "tasks": [{"key": "plan"}, spec]}),
            )
            .await;
        assert_eq!(status, 400, "{v}");
        if !field.is_empty() {
            assert_eq!(v["error"]["field"], field, "{v}");
        } else {
            assert!(
                v["error"]["message"].as_str().unwrap().contains("pattern"),
                "{v}"
            );
        }
    }
    // Joins cannot close a cycle: a join is a dependency like any other.
    let (status, v) = http
        .post(
            "/api/v1/workflows",
            &json!({"name": "cyclic", "tasks": [
                {"key": "a"},
                {"key": "j", "depends_on": ["a", "m"], "join": "any"},
                {"key": "m", "depends_on": ["j"], "merge": {"strategy": "first"}}
            ]}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("j → m → j"),
        "{v}"
    );
    // Items that turn out not to be a list fail the split, naming why.
    let submitted = c
        .submit(json!({"name": "not-a-list", "tasks": [
            sleeper("plan", 10, json!({"modules": {"a": 1}})),
            {"key": "s", "depends_on": ["plan"], "split": {"items": "${deps.plan.output.modules}", "task": {}}}
        ]}))
        .await;
    let view = c.wait(submitted.workflow_id, Duration::from_secs(20)).await;
    assert_eq!(view.workflow.status, WorkflowStatus::Failed);
    let s = task(&view, "s");
    assert!(
        s.error.as_deref().unwrap().contains("must be a list"),
        "{:?}",
        s.error
    );
    c.stop().await;
}

/// A review loop whose reviewer asks for changes `changes` times, then approves.
fn review_loop(changes: usize, max_iterations: u32) -> Value {
    let mut verdicts: Vec<Value> = (0..changes)
        .map(|i| json!({"verdict": "changes_requested", "comments": format!("round {} notes", i + 1)}))
        .collect();
    verdicts.push(json!({"verdict": "approved"}));
    json!({"name": "review", "tasks": [
        {"key": "plan", "executor": "sim", "input": {"output": {"spec": "add a cache"}}},
        {"key": "cycle", "depends_on": ["plan"], "loop": {
            "max_iterations": max_iterations,
            "while": {"output": "review.verdict", "equals": "changes_requested"},
            "body": [
                {"key": "implement", "depends_on": ["plan"], "executor": "sim",
                 "input": {"latency": 20, "input": {"feedback": "${prev.review.output.comments}",
                                                    "round": "${loop.iteration}", "spec": "${deps.plan.output.spec}"}}},
                {"key": "review", "depends_on": ["implement"], "executor": "sim",
                 "input": {"latency": 20, "outputs": verdicts, "run": "${loop.iteration}"}}
            ]}},
        {"key": "ship", "depends_on": ["cycle"], "input": {"final": "${deps.cycle.output.outputs.implement}"}}
    ]})
}

#[tokio::test]
async fn a_review_loop_runs_as_many_iterations_as_the_verdicts_demand_and_stops_at_its_bound() {
    let mut c = Cluster::start().await;
    c.spawn_worker("w1", "general", 4).await;
    // Two rounds of changes, approved in the third.
    let view = c.run(review_loop(2, 5), Duration::from_secs(60)).await;
    let keys: Vec<&str> = inserted(&view, "cycle/")
        .iter()
        .map(|t| t.key.as_str())
        .collect();
    assert_eq!(keys.len(), 6, "{keys:?}");
    assert!(!keys.contains(&"cycle/4/implement"));
    let cycle = task(&view, "cycle").output.clone().unwrap();
    assert_eq!(cycle["iterations"], 3);
    assert_eq!(cycle["stopped"], "condition");
    // Iteration 2 got iteration 1's feedback; iteration 1 none.
    let second = task(&view, "cycle/2/implement");
    assert_eq!(
        second.input["input"]["feedback"],
        "${deps.cycle/1/review.output.comments}"
    );
    assert!(second.depends_on.contains(&"cycle/1/review".to_string()));
    assert_eq!(
        task(&view, "cycle/1/implement").input["input"]["feedback"],
        Value::Null
    );
    assert_eq!(
        task(&view, "ship").output.as_ref().unwrap()["input"]["final"]["input"]["round"],
        3
    );
    let events = coordination_events(&c).await;
    assert_eq!(count(&events, "coordination.loop.iteration", "cycle"), 3);
    assert_eq!(count(&events, "coordination.loop.completed", "cycle"), 1);

    // Never satisfied: stops at the bound, and says so.
    let view = c.run(review_loop(10, 2), Duration::from_secs(60)).await;
    let cycle = task(&view, "cycle").output.clone().unwrap();
    assert_eq!(cycle["iterations"], 2);
    assert_eq!(cycle["stopped"], "max_iterations");
    assert_eq!(inserted(&view, "cycle/").len(), 4);
    c.stop().await;
}

#[tokio::test]
async fn a_coordinator_restart_mid_pattern_resumes_and_finishes() {
    let mut c = Cluster::without_control_plane().await;
    let mut coordinator = c.spawn_coordinator();
    c.spawn_worker("w1", "general", 4).await;
    let mut spec = review_loop(2, 5);
    // Slow iterations, so the restart lands inside the loop.
    for t in spec["tasks"][1]["loop"]["body"].as_array_mut().unwrap() {
        t["input"]["latency"] = json!(700);
    }
    let submitted = c.submit(spec).await;
    let id = submitted.workflow_id;
    wait_for_tasks(&c, id, "cycle/2/%", &[], 1, "loop in iteration 2").await;
    coordinator.kill().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let _coordinator = c.spawn_coordinator();
    let view = c.wait(id, Duration::from_secs(60)).await;
    assert_eq!(
        view.workflow.status,
        WorkflowStatus::Completed,
        "{:#?}",
        view.tasks
    );
    let cycle = task(&view, "cycle").output.clone().unwrap();
    assert_eq!(cycle["iterations"], 3);
    // Each iteration's tasks exist exactly once (keys are unique per workflow) and ran once.
    assert_eq!(inserted(&view, "cycle/").len(), 6);
    c.stop().await;
}

#[tokio::test]
async fn a_worker_killed_mid_split_loses_no_child_and_the_split_still_joins() {
    let mut c = Cluster::start().await;
    c.spawn_worker("doomed", "general", 4).await;
    let items: Vec<u64> = (0..12).collect();
    let submitted = c
        .submit(json!({"name": "split-survives", "tasks": [
            sleeper("plan", 10, json!({"items": items})),
            {"key": "fan", "depends_on": ["plan"], "split": {
                "items": "${deps.plan.output.items}",
                "task": {"executor": "sleep", "input": {"ms": 800, "output": {"n": "${item}"}}}}}
        ]}))
        .await;
    let id = submitted.workflow_id;
    wait_for_tasks(&c, id, "fan/%", &["running"], 2, "children running").await;
    c.spawn_worker("rescuer", "general", 4).await;
    c.signal("doomed", "-KILL");
    let view = c.wait(id, Duration::from_secs(60)).await;
    assert_eq!(
        view.workflow.status,
        WorkflowStatus::Completed,
        "{:#?}",
        view.tasks
    );
    let out = task(&view, "fan").output.clone().unwrap();
    assert_eq!(out["count"], 12);
    for (i, o) in out["outputs"].as_array().unwrap().iter().enumerate() {
        assert_eq!(o, &json!({"n": i}), "child {i}");
    }
    // Children the dead worker held were dispatched again (fenced by a higher attempt).
    assert!(
        view.tasks
            .iter()
            .any(|t| t.key.starts_with("fan/") && t.attempt >= 2),
        "{:#?}",
        view.tasks
    );
    c.stop().await;
}

#[tokio::test]
async fn a_loop_body_can_fan_out_with_a_split_each_iteration() {
    let mut c = Cluster::start().await;
    c.spawn_worker("w1", "general", 8).await;
    let view = c
        .run(
            json!({"name": "rounds", "tasks": [
                {"key": "rounds", "loop": {
                    "max_iterations": 3,
                    "while": {"output": "check.verdict", "equals": "again"},
                    "body": [
                        {"key": "plan", "executor": "sim", "input": {"output": {"modules": ["a", "b", "c"]}}},
                        {"key": "fan", "depends_on": ["plan"], "split": {
                            "items": "${deps.plan.output.modules}",
                            "task": {"executor": "sleep", "input": {"ms": 20, "output": {"m": "${item}"}}}}},
                        {"key": "check", "depends_on": ["fan"], "executor": "sim",
                         "input": {"outputs": [{"verdict": "again"}, {"verdict": "done"}], "run": "${loop.iteration}",
                                   "input": {"got": "${deps.fan.output.outputs}"}}}
                    ]}}
            ]}),
            Duration::from_secs(60),
        )
        .await;
    let out = task(&view, "rounds").output.clone().unwrap();
    assert_eq!(out["iterations"], 2, "{out}");
    for i in 1..=2 {
        for n in 0..3 {
            let child = task(&view, &format!("rounds/{i}/fan/{n}"));
            assert_eq!(child.status, TaskStatus::Completed);
        }
        assert_eq!(
            task(&view, &format!("rounds/{i}/fan"))
                .output
                .as_ref()
                .unwrap()["outputs"],
            json!([{"m": "a"}, {"m": "b"}, {"m": "c"}])
        );
    }
    assert!(view.tasks.iter().all(|t| !t.key.starts_with("rounds/3/")));
    c.stop().await;
}

#[tokio::test]
async fn a_task_after_a_split_too_large_to_forward_gets_its_input_without_the_outputs() {
    let mut c = Cluster::start().await;
    c.spawn_worker("w1", "general", 8).await;
    // 40 children × ~30 KB of output: 1.2 MB, more than one NATS message.
    let blob = "x".repeat(30_000);
    let items: Vec<u64> = (0..40).collect();
    let view = c
        .run(
            json!({"name": "bulky", "tasks": [
                sleeper("plan", 10, json!({"items": items})),
                {"key": "fan", "depends_on": ["plan"], "split": {
                    "items": "${deps.plan.output.items}",
                    "task": {"executor": "sleep", "input": {"ms": 5, "output": {"n": "${item}", "blob": blob}}}}},
                {"key": "after", "depends_on": ["fan"], "input": {"count": "${deps.fan.output.count}"},
                 "executor": "echo", "capabilities": []}
            ]}),
            Duration::from_secs(60),
        )
        .await;
    // The view is too large for a reply: read the rows.
    let row = |id: omoi::domain::WorkflowId, key: &'static str| {
        let pool = c.env.pool.clone();
        async move {
            sqlx::query_as::<_, omoi::protocol::workflows::TaskRecord>(
                "SELECT * FROM tasks WHERE workflow_id = $1 AND key = $2",
            )
            .bind(id)
            .bind(key)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let after = row(view.workflow.id, "after").await;
    assert_eq!(
        after.output.as_ref().unwrap()["input"],
        json!({"count": 40})
    );
    // A task that asks for all of it in its input cannot be sent, and says why.
    let submitted = c
        .submit(json!({"name": "too-bulky", "tasks": [
            sleeper("plan", 10, json!({"items": (0..40).collect::<Vec<u64>>()})),
            {"key": "fan", "depends_on": ["plan"], "split": {
                "items": "${deps.plan.output.items}",
                "task": {"executor": "sleep", "input": {"ms": 5, "output": {"blob": "x".repeat(30_000)}}}}},
            {"key": "all", "depends_on": ["fan"], "input": {"everything": "${deps.fan.output.outputs}"}}
        ]}))
        .await;
    let view = c.wait(submitted.workflow_id, Duration::from_secs(60)).await;
    assert_eq!(view.workflow.status, WorkflowStatus::Failed);
    let all = row(view.workflow.id, "all").await;
    assert_eq!(all.status, TaskStatus::Failed);
    assert!(
        all.error.as_deref().unwrap().contains("exceeds"),
        "{:?}",
        all.error
    );
    c.stop().await;
}
