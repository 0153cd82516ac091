//! The task state machine as written to PostgreSQL: compare-and-set transitions, fencing by
//! attempt, and retries until max_attempts.

use std::time::Duration;

use omoi::db::DbError;
use omoi::db::tasks::{self, TaskChange};
use omoi::db::workflows::{self, NewTask};
use omoi::domain::{AgentId, Priority, RetryPolicy, TaskId, TaskStatus, WorkflowId};

use crate::env::TestEnv;

async fn one_task(env: &TestEnv, status: TaskStatus, max_attempts: i32) -> TaskId {
    let id = TaskId::new();
    workflows::create(
        &mut env.pool.acquire().await.unwrap(),
        WorkflowId::new(),
        "wf",
        "fail_fast",
        &serde_json::json!({}),
        &[NewTask {
            id,
            key: "only".into(),
            executor: "echo".into(),
            capabilities: vec!["echo".into()],
            input: serde_json::json!({"x": 1}),
            depends_on: vec![],
            resources: serde_json::json!([]),
            priority: Priority::High,
            status,
            max_attempts,
            timeout_seconds: Some(30),
            kind: omoi::domain::coordination::NodeKind::Task,
            join_quorum: None,
            coordination: None,
        }],
    )
    .await
    .unwrap();
    id
}

fn dispatch_to(agent: AgentId) -> TaskChange {
    TaskChange {
        agent_id: Some(Some(agent)),
        new_attempt: true,
        ..TaskChange::default()
    }
}

#[tokio::test]
async fn two_concurrent_writers_on_one_transition_exactly_one_wins() {
    let env = TestEnv::new().await;
    for _ in 0..20 {
        let id = one_task(&env, TaskStatus::Ready, 3).await;
        let (a, b) = (AgentId::new(), AgentId::new());
        let (mut ca, mut cb) = (
            env.pool.acquire().await.unwrap(),
            env.pool.acquire().await.unwrap(),
        );
        let (ra, rb) = tokio::join!(
            tasks::transition(
                &mut ca,
                id,
                TaskStatus::Ready,
                TaskStatus::Assigned,
                dispatch_to(a)
            ),
            tasks::transition(
                &mut cb,
                id,
                TaskStatus::Ready,
                TaskStatus::Assigned,
                dispatch_to(b)
            ),
        );
        let winners: Vec<_> = [&ra, &rb].into_iter().filter(|r| r.is_ok()).collect();
        assert_eq!(winners.len(), 1, "{ra:?} / {rb:?}");
        let loser = [ra.as_ref().err(), rb.as_ref().err()]
            .into_iter()
            .flatten()
            .next()
            .unwrap();
        assert!(matches!(loser, DbError::Conflict { .. }), "{loser:?}");
        let stored = tasks::get(&env.pool, id).await.unwrap();
        assert_eq!(stored.status, TaskStatus::Assigned);
        assert_eq!(stored.attempt, 1, "only one dispatch counted");
        let winner = winners[0].as_ref().unwrap();
        assert_eq!(stored.agent_id, winner.agent_id);
    }
}

#[tokio::test]
async fn illegal_transitions_are_refused_and_change_nothing() {
    let env = TestEnv::new().await;
    let id = one_task(&env, TaskStatus::Pending, 3).await;
    let err = tasks::transition(
        &mut env.pool.acquire().await.unwrap(),
        id,
        TaskStatus::Pending,
        TaskStatus::Completed,
        TaskChange::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, DbError::Illegal(_)), "{err}");
    assert_eq!(
        tasks::get(&env.pool, id).await.unwrap().status,
        TaskStatus::Pending
    );
    // A legal transition from a status the task is not in is a conflict, naming what it is in.
    let err = tasks::transition(
        &mut env.pool.acquire().await.unwrap(),
        id,
        TaskStatus::Ready,
        TaskStatus::Assigned,
        TaskChange::default(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("found pending"), "{err}");
}

#[tokio::test]
async fn a_result_for_an_old_attempt_is_fenced_off() {
    let env = TestEnv::new().await;
    let id = one_task(&env, TaskStatus::Ready, 3).await;
    let first = tasks::transition(
        &mut env.pool.acquire().await.unwrap(),
        id,
        TaskStatus::Ready,
        TaskStatus::Assigned,
        dispatch_to(AgentId::new()),
    )
    .await
    .unwrap();
    // The agent is presumed lost: the task goes back to ready and is dispatched again.
    tasks::transition(
        &mut env.pool.acquire().await.unwrap(),
        id,
        TaskStatus::Assigned,
        TaskStatus::Ready,
        TaskChange::default(),
    )
    .await
    .unwrap();
    let second = tasks::transition(
        &mut env.pool.acquire().await.unwrap(),
        id,
        TaskStatus::Ready,
        TaskStatus::Assigned,
        dispatch_to(AgentId::new()),
    )
    .await
    .unwrap();
    assert_eq!((first.attempt, second.attempt), (1, 2));
    let late = TaskChange {
        output: Some(serde_json::json!({"from": "old"})),
        expected_attempt: Some(first.attempt),
        ..TaskChange::default()
    };
    let err = tasks::transition(
        &mut env.pool.acquire().await.unwrap(),
        id,
        TaskStatus::Assigned,
        TaskStatus::Completed,
        late,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }));
    let current = TaskChange {
        output: Some(serde_json::json!({"from": "new"})),
        expected_attempt: Some(second.attempt),
        ..TaskChange::default()
    };
    let done = tasks::transition(
        &mut env.pool.acquire().await.unwrap(),
        id,
        TaskStatus::Assigned,
        TaskStatus::Completed,
        current,
    )
    .await
    .unwrap();
    assert_eq!(done.output, Some(serde_json::json!({"from": "new"})));
    assert!(done.finished_at.is_some());
}

#[tokio::test]
async fn failed_attempts_back_off_then_fail_for_good_at_max_attempts() {
    let env = TestEnv::new().await;
    let id = one_task(&env, TaskStatus::Ready, 3).await;
    let policy = RetryPolicy {
        base_delay: Duration::from_secs(10),
        max_delay: Duration::from_secs(100),
    };
    let mut waits = Vec::new();
    for n in 1..=3 {
        tasks::transition(
            &mut env.pool.acquire().await.unwrap(),
            id,
            TaskStatus::Ready,
            TaskStatus::Assigned,
            dispatch_to(AgentId::new()),
        )
        .await
        .unwrap();
        let running = tasks::transition(
            &mut env.pool.acquire().await.unwrap(),
            id,
            TaskStatus::Assigned,
            TaskStatus::Running,
            TaskChange::default(),
        )
        .await
        .unwrap();
        let after = tasks::record_failure(
            &mut env.pool.acquire().await.unwrap(),
            &running,
            &format!("boom {n}"),
            &policy,
        )
        .await
        .unwrap();
        assert_eq!(after.failures, n);
        assert_eq!(after.error.as_deref(), Some(format!("boom {n}").as_str()));
        if n < 3 {
            assert_eq!(after.status, TaskStatus::RetryWait);
            let wait = (after.retry_at.unwrap() - after.updated_at).num_milliseconds();
            waits.push(wait);
            tasks::transition(
                &mut env.pool.acquire().await.unwrap(),
                id,
                TaskStatus::RetryWait,
                TaskStatus::Ready,
                TaskChange::default(),
            )
            .await
            .unwrap();
        } else {
            assert_eq!(
                after.status,
                TaskStatus::Failed,
                "third failure of three is final"
            );
            assert!(after.retry_at.is_none());
        }
    }
    // First wait in [5s, 10s], second in [10s, 20s] (equal jitter on a doubling step).
    assert!((4_900..=10_100).contains(&waits[0]), "{waits:?}");
    assert!((9_900..=20_100).contains(&waits[1]), "{waits:?}");
}

#[tokio::test]
async fn connections_run_without_jit_unless_the_url_asks_for_it() {
    let env = TestEnv::new().await;
    let jit: String = sqlx::query_scalar("SHOW jit")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(jit, "off");
    let separator = if env.database_url.contains('?') {
        '&'
    } else {
        '?'
    };
    let asked = format!("{}{separator}options=-c%20jit%3Don", env.database_url);
    let pool = omoi::db::connect(&asked, 1).await.unwrap();
    let jit: String = sqlx::query_scalar("SHOW jit")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(jit, "on", "the URL's own options win");
    pool.close().await;
}

/// Sequential scans of `tasks` in the connection's current transaction.
async fn seq_scans(conn: &mut sqlx::PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'tasks'")
        .fetch_one(conn)
        .await
}

/// A workflow of `n` independent tasks (keys `<prefix><i>`, all ready), stored in its own
/// transaction; its rows as inserted.
async fn stored_workflow(env: &TestEnv, n: usize, prefix: &str) -> Vec<NewTask> {
    let spec = omoi::protocol::workflows::TaskSpec::new(String::new());
    let rows: Vec<NewTask> = (0..n)
        .map(|i| {
            let mut row = NewTask::from_spec(TaskId::new(), &spec);
            row.key = format!("{prefix}{i}");
            row
        })
        .collect();
    let mut tx = env.pool.begin().await.unwrap();
    workflows::create(
        &mut tx,
        WorkflowId::new(),
        "stored",
        "fail_fast",
        &serde_json::json!({}),
        &rows,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    rows
}

/// Completions of the first attempt of `rows`, by `agent`.
fn first_attempts_done(rows: &[NewTask], agent: AgentId) -> Vec<omoi::db::scheduling::Completion> {
    rows.iter()
        .map(|r| omoi::db::scheduling::Completion {
            fence: omoi::db::scheduling::Fence {
                task: r.id,
                attempt: 1,
                agent: Some(agent),
            },
            output: serde_json::json!({}),
            lock_wait_ms: None,
            running_ms: None,
        })
        .collect()
}

/// The maintenance tick's search for due retries reads the index of waiting retries, not the
/// table — even on a connection that first ran it while `tasks` was empty (a statement without
/// parameters, prepared once, would keep that first plan: a scan of the whole table, at every
/// tick, however large the table grew).
#[tokio::test]
async fn due_retries_are_found_by_their_index_however_small_the_table_was_at_first() {
    let env = TestEnv::new().await;
    let mut conn = env.pool.acquire().await.unwrap();
    assert!(
        omoi::db::scheduling::promote_due_retries(&mut conn)
            .await
            .unwrap()
            .is_empty()
    );
    stored_workflow(&env, 20_000, "t").await;
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    let before = seq_scans(&mut conn).await.unwrap();
    omoi::db::scheduling::promote_due_retries(&mut conn)
        .await
        .unwrap();
    let after = seq_scans(&mut conn).await.unwrap();
    sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
    assert_eq!(after, before, "the tasks table was scanned");
}

/// On the steps' connection, a large assignment round finds its tasks by id: it reads no row
/// it does not assign, even when the round is a sizable part of the table (given the ids as
/// constants, PostgreSQL would rather hash a scan of the whole table).
#[tokio::test]
async fn a_large_assignment_round_reads_only_the_tasks_it_assigns() {
    let env = TestEnv::new().await;
    let rows = stored_workflow(&env, 20_000, "t").await;
    let mut conn = env.pool.acquire().await.unwrap();
    sqlx::query("ANALYZE tasks")
        .execute(&mut *conn)
        .await
        .unwrap();
    omoi::db::scheduling::make_hot(&mut conn).await.unwrap();
    let agent = AgentId::new();
    let pairs: Vec<(TaskId, AgentId)> = rows.iter().take(5_000).map(|r| (r.id, agent)).collect();
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    let before = seq_scans(&mut conn).await.unwrap();
    let assigned = omoi::db::scheduling::assign(&mut conn, &pairs, &Default::default())
        .await
        .unwrap();
    let after = seq_scans(&mut conn).await.unwrap();
    sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
    drop(conn.detach());
    assert_eq!(assigned.len(), 5_000);
    assert_eq!(after, before, "the tasks table was scanned");
}

/// On `conn`: assigns and completes `small` tasks, `per_round` at a time (the statements'
/// plans made while `tasks` is small), then stores 20,000 more and, in one transaction, assigns
/// and completes ten of them. Returns how many sequential scans of `tasks` that transaction made.
async fn scans_once_grown(
    env: &TestEnv,
    conn: &mut sqlx::PgConnection,
    small: usize,
    per_round: usize,
) -> i64 {
    use omoi::db::scheduling;
    let agent = AgentId::new();
    let pairs = |rows: &[NewTask]| -> Vec<(TaskId, AgentId)> {
        rows.iter().map(|r| (r.id, agent)).collect()
    };
    for round in stored_workflow(env, small, "s").await.chunks(per_round) {
        scheduling::assign(&mut *conn, &pairs(round), &Default::default())
            .await
            .unwrap();
        let done = scheduling::mark_completed(&mut *conn, &first_attempts_done(round, agent))
            .await
            .unwrap();
        assert_eq!(done.len(), round.len());
    }
    let large = stored_workflow(env, 20_000, "l").await;
    let few = &large[..10];
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    let before = seq_scans(&mut *conn).await.unwrap();
    let assigned = scheduling::assign(&mut *conn, &pairs(few), &Default::default())
        .await
        .unwrap();
    let done = scheduling::mark_completed(&mut *conn, &first_attempts_done(few, agent))
        .await
        .unwrap();
    let after = seq_scans(&mut *conn).await.unwrap();
    sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
    assert_eq!((assigned.len(), done.len()), (10, 10));
    after - before
}

/// A completion on a connection that has completed tasks many times while `tasks` was small
/// still finds its tasks by id once the table has grown, before any statistics: PostgreSQL
/// would otherwise keep the generic plan it made on the small table (a scan of all of it).
#[tokio::test]
async fn completions_find_their_tasks_by_id_after_the_table_grew() {
    let env = TestEnv::new().await;
    let mut conn = env.pool.acquire().await.unwrap();
    let scans = scans_once_grown(&env, &mut conn, 20, 2).await;
    assert_eq!(scans, 0, "the tasks table was scanned");
}

/// The scheduler's steps keep each statement's first plan (no planning at every step), and on
/// their connection that plan is found by index even when made while `tasks` was small: once
/// the table has grown, a completion still reads only the tasks it completes.
#[tokio::test]
async fn the_steps_connection_keeps_plans_that_find_tasks_by_id_as_the_table_grows() {
    let env = TestEnv::new().await;
    let mut conn = env.pool.acquire().await.unwrap();
    omoi::db::scheduling::make_hot(&mut conn).await.unwrap();
    let scans = scans_once_grown(&env, &mut conn, 4, 1).await;
    drop(conn.detach());
    assert_eq!(scans, 0, "the tasks table was scanned");
}

/// A completion promotes, in its own statement, the candidates it unblocks: those whose every
/// dependency is completed or completing with it, and a quorum join once enough are — not one
/// still waiting on another task, and nothing for a report of an attempt no longer current.
#[tokio::test]
async fn a_completion_promotes_in_the_same_statement_the_dependants_it_unblocks() {
    use omoi::db::scheduling::{self, Completion, Fence};
    let env = TestEnv::new().await;
    let task = |key: &str, deps: &[&str], quorum: Option<i32>| {
        let mut spec = omoi::protocol::workflows::TaskSpec::new(String::new());
        spec.depends_on = deps.iter().map(|d| d.to_string()).collect();
        let mut row = NewTask::from_spec(TaskId::new(), &spec);
        row.key = key.into();
        row.join_quorum = quorum;
        row
    };
    let rows = vec![
        task("a", &[], None),
        task("b", &[], None),
        task("after_a", &["a"], None),
        task("after_both", &["a", "b"], None),
        task("any_one", &["a", "b"], Some(1)),
    ];
    let id = |key: &str| rows.iter().find(|r| r.key == key).unwrap().id;
    let mut conn = env.pool.acquire().await.unwrap();
    workflows::create(
        &mut conn,
        WorkflowId::new(),
        "joins",
        "fail_fast",
        &serde_json::json!({}),
        &rows,
    )
    .await
    .unwrap();
    let agent = AgentId::new();
    let assigned = scheduling::assign(
        &mut conn,
        &[(id("a"), agent), (id("b"), agent)],
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(assigned.len(), 2);
    let completion = |key: &str, attempt: i32| Completion {
        fence: Fence {
            task: id(key),
            attempt,
            agent: Some(agent),
        },
        output: serde_json::json!({"from": key}),
        lock_wait_ms: None,
        running_ms: Some(1),
    };
    let candidates = [id("after_a"), id("after_both"), id("any_one")];
    let keys = |rows: &[omoi::protocol::workflows::TaskRecord]| {
        let mut k: Vec<String> = rows.iter().map(|r| r.key.clone()).collect();
        k.sort();
        k
    };

    let (done, promoted) =
        scheduling::complete_and_promote(&mut conn, &[completion("a", 1)], &candidates)
            .await
            .unwrap();
    assert_eq!(keys(&done), ["a"]);
    assert!(done.iter().all(|t| t.status == TaskStatus::Completed));
    assert_eq!(
        keys(&promoted),
        ["after_a", "any_one"],
        "after_both still waits on b"
    );
    assert!(promoted.iter().all(|t| t.status == TaskStatus::Ready));

    let (done, promoted) =
        scheduling::complete_and_promote(&mut conn, &[completion("b", 2)], &[id("after_both")])
            .await
            .unwrap();
    assert!(
        done.is_empty() && promoted.is_empty(),
        "a report of another attempt completes and promotes nothing"
    );
    let (done, promoted) =
        scheduling::complete_and_promote(&mut conn, &[completion("b", 1)], &[id("after_both")])
            .await
            .unwrap();
    assert_eq!(
        (keys(&done), keys(&promoted)),
        (vec!["b".to_string()], vec!["after_both".to_string()])
    );
}
