//! Failure is normal: killed workers, killed lock holders, a killed coordinator, bad reports.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use omoi::bus::names::STREAM_DEADLETTER;
use omoi::domain::{TaskStatus, WorkflowStatus};
use serde_json::json;

use crate::cluster::{Cluster, kill9, task};
use crate::env::eventually;

async fn agent_name(c: &Cluster, id: omoi::domain::AgentId) -> String {
    omoi::db::agents::get(&c.env.pool, id).await.unwrap().name
}

async fn wait_running_on(
    c: &Cluster,
    wf: omoi::domain::WorkflowId,
    key: &str,
) -> omoi::protocol::workflows::TaskRecord {
    eventually(Duration::from_secs(15), "task running", || async {
        let v = c.client.get(wf).await.unwrap();
        let t = task(&v, key).clone();
        (t.status == TaskStatus::Running).then_some(t)
    })
    .await
}

#[tokio::test]
async fn a_worker_killed_mid_task_has_its_task_finished_by_another_exactly_once() {
    let mut c = Cluster::start().await;
    c.spawn_worker("doomed", "sleep", 1).await;
    let wf = c
        .submit(json!({"name": "survive", "tasks": [
            {"key": "work", "executor": "sleep", "capabilities": ["sleep"], "input": {"ms": 1500, "output": {"done": true}}}]}))
        .await;
    let running = wait_running_on(&c, wf.workflow_id, "work").await;
    assert_eq!(agent_name(&c, running.agent_id.unwrap()).await, "doomed");
    c.spawn_worker("rescuer", "sleep", 1).await;
    c.signal("doomed", "-KILL");

    let view = c.wait(wf.workflow_id, Duration::from_secs(30)).await;
    assert_eq!(view.workflow.status, WorkflowStatus::Completed);
    let t = task(&view, "work");
    assert_eq!(agent_name(&c, t.agent_id.unwrap()).await, "rescuer");
    assert_eq!(
        t.attempt, 2,
        "the new dispatch raised the attempt (fencing token)"
    );
    assert_eq!(t.output, Some(json!({"done": true})));
    // Exactly one success was recorded.
    let completions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status = 'completed'")
            .fetch_one(&c.env.pool)
            .await
            .unwrap();
    assert_eq!(completions, 1);
    c.stop().await;
}

#[tokio::test]
async fn a_killed_lock_holder_loses_its_lock_at_expiry_and_the_waiter_proceeds() {
    let mut c = Cluster::start().await;
    c.spawn_shell_worker("holder", "shell", 1).await;
    let stamp = "s=$(date +%s%N); sleep 0.1; e=$(date +%s%N); echo \"{\\\"start\\\": $s, \\\"end\\\": $e}\"";
    let first = c
        .submit(json!({"name": "hold", "tasks": [
            {"key": "a", "executor": "shell", "capabilities": ["shell"], "input": {"command": "sleep 30"},
             "resources": [{"name": "repo:x"}]}]}))
        .await;
    wait_running_on(&c, first.workflow_id, "a").await;
    // Let the holder take the lock (it reports `started` before locking).
    eventually(Duration::from_secs(10), "lock held", || async {
        let kv = omoi::bus::provision::open_bucket(&c.env.js, &c.env.names, "locks")
            .await
            .unwrap();
        let m = omoi::bus::kv_lock::LockManager::new(kv, Duration::from_secs(2));
        let held = m.list().await.unwrap();
        (!held.is_empty()).then_some(())
    })
    .await;
    c.spawn_shell_worker("waiter", "shell", 1).await;
    let second = c
        .submit(json!({"name": "wait", "tasks": [
            {"key": "b", "executor": "shell", "capabilities": ["shell"], "input": {"command": stamp},
             "resources": [{"name": "repo:x"}]}]}))
        .await;
    wait_running_on(&c, second.workflow_id, "b").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_at = chrono::Utc::now();
    c.signal("holder", "-KILL");

    let b = c.wait(second.workflow_id, Duration::from_secs(30)).await;
    assert_eq!(
        b.workflow.status,
        WorkflowStatus::Completed,
        "{:?}",
        b.tasks
    );
    let out = task(&b, "b").output.clone().unwrap();
    let started = chrono::DateTime::from_timestamp_nanos(out["start"].as_i64().unwrap());
    assert!(
        started > killed_at,
        "b ran only after the holder died ({started} vs {killed_at})"
    );
    // The killed holder's own task is re-dispatched to the surviving worker.
    let view = crate::env::eventually(Duration::from_secs(30), "a re-dispatched", || async {
        let v = c.client.get(first.workflow_id).await.unwrap();
        (task(&v, "a").attempt >= 2).then_some(v)
    })
    .await;
    assert_eq!(
        agent_name(&c, task(&view, "a").agent_id.unwrap()).await,
        "waiter"
    );
    c.client.cancel(first.workflow_id).await.unwrap();
    c.stop().await;
}

/// Whether process `pid` is running (a zombie, ended but not yet reaped, is not).
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn a_killed_workers_shell_task_dies_with_it_so_the_next_lock_holder_never_overlaps() {
    let mut c = Cluster::start().await;
    c.spawn_shell_worker("doomed", "shell", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // Every attempt records its shell's pid, its fencing tokens (environment and stdin), and
    // any earlier attempt's process still running while it holds the lock. The first attempt
    // then sleeps in a child process, as long-running work does.
    let script = format!(
        "echo $$ > {d}/pid.$OMOI_ATTEMPT; echo \"$OMOI_LOCK_TOKENS\" > {d}/env.$OMOI_ATTEMPT; \
         cat > {d}/stdin.$OMOI_ATTEMPT; \
         for f in {d}/pid.* {d}/sleep.*; do [ -e \"$f\" ] || continue; p=$(cat $f); [ \"$p\" = $$ ] && continue; \
           if [ -e /proc/$p ] && ! grep -q '^State:.*Z' /proc/$p/status; then echo $p >> {d}/overlap; fi; done; \
         if [ \"$OMOI_ATTEMPT\" = 1 ]; then sleep 60 & echo $! > {d}/sleep.1; wait; fi; echo '{{\"done\": true}}'"
    );
    let wf = c
        .submit(json!({"name": "fenced", "tasks": [
            {"key": "long", "executor": "shell", "capabilities": ["shell"], "input": {"command": script},
             "resources": [{"name": "repo:x"}]}]}))
        .await;
    let sleep_pid = dir.path().join("sleep.1");
    let first = eventually(
        Duration::from_secs(20),
        "first attempt sleeping",
        || async {
            let shell = std::fs::read_to_string(dir.path().join("pid.1")).ok()?;
            let sleep = std::fs::read_to_string(&sleep_pid).ok()?;
            Some([shell.trim().to_string(), sleep.trim().to_string()])
        },
    )
    .await;
    assert!(first.iter().all(|p| alive(p)), "{first:?}");
    let mut doomed = c.workers.remove("doomed").unwrap();
    kill9(&mut doomed).await;
    // The task's processes die with their worker, long before its lock lease lapses.
    eventually(
        Duration::from_secs(10),
        "the task's processes gone",
        || async { first.iter().all(|p| !alive(p)).then_some(()) },
    )
    .await;

    c.spawn_shell_worker("rescuer", "shell", 1).await;
    let view = c.wait(wf.workflow_id, Duration::from_secs(60)).await;
    assert_eq!(
        view.workflow.status,
        WorkflowStatus::Completed,
        "{:?}",
        view.tasks
    );
    let long = task(&view, "long");
    assert!(long.attempt >= 2, "{long:?}");
    let attempt = long.attempt;
    assert!(
        !dir.path().join("overlap").exists(),
        "a process of an earlier attempt was running while attempt {attempt} held the lock: {:?}",
        std::fs::read_to_string(dir.path().join("overlap"))
    );
    // The fencing tokens reach the program, in its environment and on its stdin, and the new
    // holder's is higher.
    let read_json = |name: String| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(name)).unwrap()).unwrap()
    };
    let (env1, env_last) = (
        read_json("env.1".into()),
        read_json(format!("env.{attempt}")),
    );
    let stdin_last = read_json(format!("stdin.{attempt}"));
    assert_eq!(stdin_last["lock_tokens"], env_last, "{stdin_last}");
    let (t1, t_last) = (env1["repo:x"].as_u64(), env_last["repo:x"].as_u64());
    assert!(
        matches!((t1, t_last), (Some(a), Some(b)) if b > a),
        "{env1} then {env_last}"
    );
    c.stop().await;
}

#[tokio::test]
async fn a_dispatch_delivered_again_after_its_attempt_finished_is_acknowledged_not_run_again() {
    let mut c = Cluster::start().await;
    c.spawn_shell_worker("w", "shell", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.log");
    let command = format!("echo \"$OMOI_ATTEMPT\" >> {}; echo '{{}}'", log.display());
    let view = c
        .run(
            json!({"name": "once", "tasks": [{"key": "once", "executor": "shell",
                   "capabilities": ["shell"], "input": {"command": command}}]}),
            Duration::from_secs(30),
        )
        .await;
    let t = task(&view, "once").clone();
    let agent = t.agent_id.unwrap();
    // The same dispatch again, as JetStream delivers one whose acknowledgement was lost.
    let dispatch = omoi::protocol::Dispatch {
        v: omoi::protocol::PROTOCOL_VERSION,
        task_id: t.id,
        workflow_id: view.workflow.id,
        key: t.key.clone(),
        attempt: t.attempt,
        agent_id: agent,
        executor: "shell".into(),
        input: json!({"command": command}),
        dependencies: Default::default(),
        dependencies_omitted: false,
        resources: vec![],
        timeout_seconds: None,
    };
    let ack = c
        .env
        .js
        .publish(
            c.env.names.dispatch(agent),
            serde_json::to_vec(&dispatch).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let stream = c.env.names.stream("dispatch");
    let consumer = c.env.names.dispatch_consumer(agent);
    eventually(
        Duration::from_secs(20),
        "the dispatch acknowledged",
        || async {
            let mut info = c
                .env
                .js
                .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                    &consumer, &stream,
                )
                .await
                .ok()?;
            let info = info.info().await.ok()?;
            (info.ack_floor.stream_sequence >= ack.sequence).then_some(())
        },
    )
    .await;
    let runs = std::fs::read_to_string(&log).unwrap();
    assert_eq!(runs.lines().count(), 1, "ran again: {runs:?}");
    c.stop().await;
}

#[tokio::test]
async fn a_coordinator_killed_mid_workflow_is_replaced_and_nothing_is_lost_or_run_twice() {
    let mut c = Cluster::without_control_plane().await;
    let mut coordinator = c.spawn_coordinator();
    c.spawn_shell_worker("w1", "shell", 3).await;
    c.spawn_shell_worker("w2", "shell", 3).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.log");
    // Each run appends "<key> <attempt>" once it has succeeded.
    let step = |key: &str, deps: Vec<String>| {
        json!({"key": key, "executor": "shell", "capabilities": ["shell"], "depends_on": deps,
               "input": {"command": format!("sleep 0.1; echo \"$OMOI_TASK_KEY $OMOI_ATTEMPT\" >> {}; echo '{{}}'", log.display())}})
    };
    let mut tasks = Vec::new();
    for i in 0..15 {
        let deps = if i == 0 {
            vec![]
        } else {
            vec![format!("c{}", i - 1)]
        };
        tasks.push(step(&format!("c{i}"), deps));
    }
    for i in 0..10 {
        tasks.push(step(&format!("p{i}"), vec![]));
    }
    let wf = c.submit(json!({"name": "restart", "tasks": tasks})).await;
    eventually(Duration::from_secs(30), "some progress", || async {
        let v = c.client.get(wf.workflow_id).await.unwrap();
        (v.counts.get("completed").copied().unwrap_or(0) >= 6).then_some(())
    })
    .await;
    kill9(&mut coordinator).await;
    let _replacement = c.spawn_coordinator();

    let view = c.wait(wf.workflow_id, Duration::from_secs(60)).await;
    assert_eq!(
        view.workflow.status,
        WorkflowStatus::Completed,
        "{:?}",
        view.counts
    );
    assert!(view.tasks.iter().all(|t| t.status == TaskStatus::Completed));
    let runs = std::fs::read_to_string(&log).unwrap();
    let mut per_key: HashMap<&str, usize> = HashMap::new();
    for line in runs.lines() {
        *per_key
            .entry(line.split_whitespace().next().unwrap())
            .or_default() += 1;
    }
    assert_eq!(per_key.len(), 25, "every task ran");
    for (key, n) in per_key {
        assert_eq!(n, 1, "{key} ran to success {n} times");
    }
    c.stop().await;
}

#[tokio::test]
async fn a_malformed_report_is_dead_lettered_and_the_scheduler_keeps_going() {
    let mut c = Cluster::start().await;
    c.spawn_worker("w", "echo", 2).await;
    let subject = format!(
        "{}.result.{}.{}",
        c.env.names.namespace(),
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4()
    );
    c.env
        .js
        .publish(subject.clone(), "{\"task_id\": 42".into())
        .await
        .unwrap()
        .await
        .unwrap();
    c.run(
        json!({"name": "after", "tasks": [{"key": "a"}, {"key": "b", "depends_on": ["a"]}]}),
        Duration::from_secs(20),
    )
    .await;
    let dl = c
        .env
        .js
        .get_stream(c.env.names.stream(STREAM_DEADLETTER))
        .await
        .unwrap();
    let consumer = dl
        .create_consumer(async_nats::jetstream::consumer::pull::Config::default())
        .await
        .unwrap();
    let mut msgs = consumer
        .fetch()
        .max_messages(5)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    let m = msgs.next().await.expect("a dead letter").unwrap();
    assert_eq!(m.subject.as_str(), c.env.names.deadletter(&subject));
    assert_eq!(&m.payload[..], b"{\"task_id\": 42");
    c.stop().await;
}

#[tokio::test]
async fn a_worker_stopped_mid_task_hands_it_back_and_another_finishes_it() {
    let mut c = Cluster::start().await;
    // Grace is 3 s (TestEnv): a 20 s task is handed back, not waited for.
    c.spawn_worker("leaving", "sleep", 1).await;
    let wf = c
        .submit(json!({"name": "handback", "tasks": [
            {"key": "long", "executor": "sleep", "capabilities": ["sleep"], "input": {"ms": 20000}},
            {"key": "after", "depends_on": ["long"]}]}))
        .await;
    let first = wait_running_on(&c, wf.workflow_id, "long").await;
    c.spawn_worker("staying", "sleep,echo", 1).await;
    let stopped = std::time::Instant::now();
    c.stop_worker("leaving").await;
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "stopped within the grace period"
    );
    let again = eventually(Duration::from_secs(10), "running elsewhere", || async {
        let v = c.client.get(wf.workflow_id).await.unwrap();
        let t = task(&v, "long").clone();
        (t.status == TaskStatus::Running && t.attempt > first.attempt).then_some(t)
    })
    .await;
    assert_eq!(agent_name(&c, again.agent_id.unwrap()).await, "staying");
    c.client.cancel(wf.workflow_id).await.unwrap();
    c.stop().await;
}

/// Every event of the namespace of type `kind` now in its stream.
async fn events_of(c: &Cluster, kind: &str) -> Vec<omoi::protocol::Envelope> {
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    let stream = c
        .env
        .js
        .get_stream(c.env.names.stream(omoi::bus::names::STREAM_EVENTS))
        .await
        .unwrap();
    let mut consumer = stream
        .create_consumer(pull::Config {
            filter_subject: c.env.names.event(kind),
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let total = consumer.info().await.unwrap().num_pending as usize;
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        let mut batch = consumer
            .fetch()
            .max_messages(total - out.len())
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .unwrap();
        while let Some(m) = batch.next().await {
            out.push(serde_json::from_slice(&m.unwrap().payload).unwrap());
        }
    }
    out
}

#[tokio::test]
async fn a_leader_killed_again_and_again_announces_every_transition_once() {
    let mut c = Cluster::without_control_plane().await;
    let mut coordinator = c.spawn_coordinator();
    c.spawn_worker("w1", "sleep", 3).await;
    c.spawn_worker("w2", "sleep", 3).await;
    let sleep = |key: String, deps: Vec<String>| {
        json!({"key": key, "executor": "sleep", "capabilities": ["sleep"], "depends_on": deps,
               "input": {"ms": 60, "output": {}}})
    };
    let mut tasks: Vec<_> = (0..120).map(|i| sleep(format!("w{i}"), vec![])).collect();
    for i in 0..20 {
        let deps = if i == 0 {
            vec![]
        } else {
            vec![format!("c{}", i - 1)]
        };
        tasks.push(sleep(format!("c{i}"), deps));
    }
    let n = tasks.len();
    let wf = c.submit(json!({"name": "kills", "tasks": tasks})).await;
    // Read from the database: between a kill and its replacement nobody answers requests.
    let completed = || async {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM tasks WHERE workflow_id = $1 AND status = 'completed'",
        )
        .bind(wf.workflow_id)
        .fetch_one(&c.env.pool)
        .await
        .unwrap();
        done as usize
    };
    // Killed whenever it has made progress since it took over, four times.
    for _ in 0..4 {
        let before = completed().await;
        eventually(
            Duration::from_secs(60),
            "progress under this leader",
            || async { (completed().await >= before + 15).then_some(()) },
        )
        .await;
        if completed().await >= n {
            break;
        }
        kill9(&mut coordinator).await;
        coordinator = c.spawn_coordinator();
    }
    let view = c.wait(wf.workflow_id, Duration::from_secs(90)).await;
    assert_eq!(
        view.workflow.status,
        WorkflowStatus::Completed,
        "{:?}",
        view.counts
    );
    // Once the outbox has drained, the stream holds every announcement, each once.
    eventually(Duration::from_secs(30), "outbox drained", || async {
        let left = omoi::db::outbox::pending_messages(&c.env.pool)
            .await
            .unwrap();
        (left == 0).then_some(())
    })
    .await;
    let mut per_task: HashMap<omoi::domain::TaskId, usize> = HashMap::new();
    for e in events_of(&c, "task.completed").await {
        let t = e.event.task().expect("a task event").task_id;
        *per_task.entry(t).or_default() += 1;
    }
    assert_eq!(per_task.len(), n, "a task.completed event for every task");
    for t in &view.tasks {
        assert_eq!(
            per_task.get(&t.id),
            Some(&1),
            "task {} announced once",
            t.key
        );
    }
    let ids: std::collections::HashSet<_> = events_of(&c, "task.completed")
        .await
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids.len(), n);
    assert_eq!(events_of(&c, "workflow.completed").await.len(), 1);
    c.stop().await;
}

/// What a leader killed right after committing an assignment leaves: a one-task workflow whose
/// task (`spec`) is assigned to `agent`, with no dispatch published.
async fn assigned_without_dispatch(
    c: &Cluster,
    agent: omoi::domain::AgentId,
    spec: serde_json::Value,
) -> omoi::domain::TaskId {
    let task = omoi::domain::TaskId::new();
    let spec: omoi::domain::dag::TaskSpec = serde_json::from_value(spec).unwrap();
    let mut tx = c.env.pool.begin().await.unwrap();
    omoi::db::workflows::create(
        &mut tx,
        omoi::domain::WorkflowId::new(),
        "stranded",
        "fail_fast",
        &json!({}),
        &[omoi::db::workflows::NewTask::from_spec(task, &spec)],
    )
    .await
    .unwrap();
    let assigned = omoi::db::scheduling::assign(&mut tx, &[(task, agent)], &Default::default())
        .await
        .unwrap();
    assert_eq!(assigned.len(), 1);
    tx.commit().await.unwrap();
    task
}

#[tokio::test]
async fn a_new_leader_publishes_the_dispatches_of_tasks_left_assigned() {
    // Long start timeout and liveness: only the new leader's republication can start the task
    // at its first attempt.
    let patient = [
        ("OMOI_TASK_START_TIMEOUT_MS", "600000"),
        ("OMOI_AGENT_STALE_AFTER_MS", "300000"),
        ("OMOI_AGENT_OFFLINE_AFTER_MS", "600000"),
    ];
    let mut c = Cluster::without_control_plane().await;
    let mut first = c.spawn_coordinator_with(&patient);
    c.spawn_worker("w1", "sleep", 1).await;
    let agent: omoi::domain::AgentId =
        sqlx::query_scalar("SELECT id FROM agents WHERE name = 'w1'")
            .fetch_one(&c.env.pool)
            .await
            .unwrap();
    kill9(&mut first).await;
    // What a leader killed between committing an assignment and publishing its dispatch
    // leaves: a task assigned to w1, and no dispatch.
    let task = assigned_without_dispatch(
        &c,
        agent,
        json!({"key": "stranded", "executor": "sleep", "capabilities": ["sleep"],
               "input": {"ms": 10, "output": {"ran": true}}}),
    )
    .await;

    let _second = c.spawn_coordinator_with(&patient);
    let done = eventually(Duration::from_secs(60), "the stranded task ran", || async {
        let t = omoi::db::tasks::get(&c.env.pool, task).await.unwrap();
        (t.status == TaskStatus::Completed).then_some(t)
    })
    .await;
    assert_eq!(
        done.attempt, 1,
        "run from the republished dispatch, not a new attempt"
    );
    assert_eq!(done.agent_id, Some(agent));
    assert_eq!(done.output, Some(json!({"ran": true})));
    c.stop().await;
}

/// A dispatch JetStream will not store puts its task back to wait (`task.retrying`, not a
/// failure, not left assigned until the start timeout) instead of being sent again at every
/// step; once the stream takes dispatches again, the task runs, once.
#[tokio::test]
async fn a_task_whose_dispatch_jetstream_will_not_store_waits_and_runs_once_it_does() {
    let mut c = Cluster::start_with(|s| {
        crate::cluster::patient(s);
        s.task_start_timeout_ms = 600_000;
    })
    .await;
    let stream_name = c.env.names.stream(omoi::bus::names::STREAM_DISPATCH);
    let stream = c.env.js.get_stream(&stream_name).await.unwrap();
    let config = stream.cached_info().config.clone();
    let refusing = async_nats::jetstream::stream::Config {
        max_message_size: 16,
        ..config.clone()
    };
    c.env.js.update_stream(&refusing).await.unwrap();
    c.spawn_worker("w", "echo", 1).await;
    let wf = c
        .submit(json!({"name": "refused", "tasks": [{"key": "a", "input": {"n": 1}}]}))
        .await;
    let put_back = eventually(Duration::from_secs(30), "the task put back", || async {
        events_of(&c, "task.retrying").await.into_iter().find(|e| {
            e.event
                .task()
                .is_some_and(|t| t.error.as_deref() == Some("dispatch not stored by JetStream"))
        })
    })
    .await;
    let t = put_back.event.task().unwrap();
    assert!(t.retry_at.is_some(), "due again later: {t:?}");
    assert_eq!(t.agent_id, None);
    c.env.js.update_stream(&config).await.unwrap();
    let done = c.wait(wf.workflow_id, Duration::from_secs(30)).await;
    assert_eq!(done.workflow.status, WorkflowStatus::Completed);
    assert_eq!(
        task(&done, "a").output,
        Some(json!({"agent": "w", "input": {"n": 1}}))
    );
    assert_eq!(events_of(&c, "task.completed").await.len(), 1);
    assert_eq!(events_of(&c, "task.failed").await.len(), 0);
    c.stop().await;
}

/// An agent is not lost for a silence no control plane could hear: with the only control
/// plane killed for longer than the agents' offline time, its replacement gives its agents the
/// offline time, from when it took the lease, to be heard again — the task running through the
/// outage finishes at its first attempt, and no agent is announced offline. (The worker is
/// stopped until the new leader has judged it stale, so it cannot be heard earlier.)
#[tokio::test]
async fn agents_are_not_lost_for_a_silence_while_no_control_plane_listened() {
    let liveness = [
        ("OMOI_AGENT_STALE_AFTER_MS", "1000"),
        ("OMOI_AGENT_OFFLINE_AFTER_MS", "3000"),
    ];
    let mut c = Cluster::without_control_plane().await;
    let mut first = c.spawn_coordinator_with(&liveness);
    c.spawn_worker("w1", "sleep", 1).await;
    let wf = c
        .submit(json!({"name": "outage", "tasks": [
            {"key": "long", "executor": "sleep", "capabilities": ["sleep"], "input": {"ms": 8000}}]}))
        .await;
    let running = wait_running_on(&c, wf.workflow_id, "long").await;
    c.signal("w1", "-STOP");
    kill9(&mut first).await;
    let status = || async {
        sqlx::query_as::<_, (String, bool)>(
            "SELECT status, last_heartbeat < now() - interval '3500 milliseconds' FROM agents
             WHERE name = 'w1'",
        )
        .fetch_one(&c.env.pool)
        .await
        .unwrap()
    };
    // Silent, as far as the database knows, for longer than the offline time.
    eventually(
        Duration::from_secs(30),
        "the agent silent past it",
        || async { status().await.1.then_some(()) },
    )
    .await;
    let _second = c.spawn_coordinator_with(&liveness);
    eventually(
        Duration::from_secs(30),
        "the new leader judging it",
        || async {
            let (s, _) = status().await;
            (s == "stale" || s == "offline").then_some(())
        },
    )
    .await;
    c.signal("w1", "-CONT");
    let done = c.wait(wf.workflow_id, Duration::from_secs(60)).await;
    assert_eq!(done.workflow.status, WorkflowStatus::Completed);
    assert_eq!(
        task(&done, "long").attempt,
        running.attempt,
        "finished by the attempt that ran through the outage"
    );
    let offline: Vec<_> = events_of(&c, "agent.status.changed")
        .await
        .into_iter()
        .filter(|e| {
            matches!(&e.event, omoi::protocol::Event::AgentStatusChanged(s)
                if s.to == omoi::domain::AgentStatus::Offline)
        })
        .collect();
    assert!(
        offline.is_empty(),
        "an agent was announced offline: {offline:?}"
    );
    c.stop().await;
}

/// A new leader reads the reports sent while no leader listened before it judges a task
/// overdue: a task assigned long before (longer than the start timeout) whose worker reported
/// it done during the outage completes at that attempt — it is not taken back as a dispatch
/// never started and run again.
#[tokio::test]
async fn a_new_leader_reads_the_reports_of_the_outage_before_judging_tasks_overdue() {
    let c = Cluster::without_control_plane().await;
    let agent = omoi::domain::AgentId::new();
    omoi::db::agents::insert(
        &c.env.pool,
        &omoi::db::agents::NewAgent {
            id: agent,
            name: "away".into(),
            agent_type: "test".into(),
            phase_id: None,
            capabilities: vec!["sleep".into()],
            capacity: 1,
            tags: vec![],
            metadata: json!({}),
            executors: vec!["sleep".into()],
            instance: None,
        },
    )
    .await
    .unwrap();
    // What a leader killed during a task leaves: the task assigned (longer ago than the start
    // timeout), and its worker's report of its completion waiting in the results stream.
    let task = assigned_without_dispatch(
        &c,
        agent,
        json!({"key": "done_meanwhile", "executor": "sleep", "capabilities": ["sleep"]}),
    )
    .await;
    sqlx::query("UPDATE tasks SET updated_at = now() - interval '10 seconds' WHERE id = $1")
        .bind(task)
        .execute(&c.env.pool)
        .await
        .unwrap();
    let report = omoi::protocol::tasks::TaskReport {
        v: omoi::protocol::PROTOCOL_VERSION,
        task_id: task,
        attempt: 1,
        agent_id: agent,
        outcome: omoi::protocol::tasks::Outcome::Completed {
            output: json!({"done": true}),
            lock_wait_ms: None,
            running_ms: Some(5),
        },
    };
    c.env
        .js
        .publish(
            c.env.names.result(agent, task),
            serde_json::to_vec(&report).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    let _leader = c.spawn_coordinator_with(&[("OMOI_TASK_START_TIMEOUT_MS", "3000")]);
    let done = eventually(Duration::from_secs(60), "the task completed", || async {
        let t = omoi::db::tasks::get(&c.env.pool, task).await.unwrap();
        (t.status == TaskStatus::Completed).then_some(t)
    })
    .await;
    assert_eq!(done.attempt, 1, "completed by the report of the outage");
    assert_eq!(done.output, Some(json!({"done": true})));
    c.stop().await;
}

/// A TCP proxy in front of PostgreSQL that can go down: cut every connection through it and
/// refuse new ones (as a database restarting does), then come back.
struct PgProxy {
    addr: std::net::SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl PgProxy {
    async fn start(upstream: String) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let accepting = up.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !accepting.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is refused
                }
                let upstream = upstream.clone();
                let mut cuts = cuts.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    // Only a cut after this connection was made ends it.
                    cuts.borrow_and_update();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Self {
            addr,
            up,
            cut,
            task,
        }
    }

    fn down(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    fn up(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn submit_wait_rides_out_a_database_outage_of_the_control_plane() {
    let mut c = Cluster::without_control_plane().await;
    let url: url::Url = c.env.database_url.parse().unwrap();
    let upstream = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
    let proxy = PgProxy::start(upstream).await;
    let mut through = url.clone();
    through.set_port(Some(proxy.addr.port())).unwrap();
    let _coordinator = c.spawn_coordinator_with(&[("OMOI_DATABASE_URL", through.as_str())]);
    c.spawn_worker("w1", "x", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("slow.json");
    std::fs::write(
        &file,
        json!({"name": "outage", "tasks": [
            {"key": "slow", "executor": "sleep", "capabilities": ["x"], "input": {"ms": 2000}},
            {"key": "after", "depends_on": ["slow"], "capabilities": ["x"]}]})
        .to_string(),
    )
    .unwrap();
    let cli = c.spawn_omoi(&[
        "submit",
        file.to_str().unwrap(),
        "--wait",
        "--timeout",
        "120",
    ]);
    eventually(
        Duration::from_secs(30),
        "the workflow submitted",
        || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM workflows")
                .fetch_one(&c.env.pool)
                .await
                .unwrap();
            (n == 1).then_some(())
        },
    )
    .await;
    // The database goes away for longer than a state request waits for a connection (5 s):
    // the control plane answers `unavailable` meanwhile.
    proxy.down();
    tokio::time::sleep(Duration::from_secs(8)).await;
    proxy.up();
    let out = tokio::time::timeout(Duration::from_secs(90), cli.wait_with_output())
        .await
        .expect("the wait ends")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("\"completed\""), "{stdout}");
    // It showed how far the workflow had got while it waited.
    assert!(
        stderr.contains("progress: ") && stderr.contains("(of 2)"),
        "{stderr}"
    );
}
