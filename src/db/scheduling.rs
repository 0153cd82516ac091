//! The scheduler's set-based statements: each moves a whole batch of tasks in one round trip,
//! every row guarded by its expected status (and attempt, where a worker's report is applied).

use std::collections::BTreeMap;

use sqlx::PgPool;

use super::DbError;
use super::tasks::TaskRecord;
use super::workflows::WorkflowRecord;
use crate::domain::{AgentId, TaskId, WorkflowId};

const PRIORITY_RANK: &str =
    "CASE priority WHEN 'CRITICAL' THEN 4 WHEN 'HIGH' THEN 3 WHEN 'MEDIUM' THEN 2 ELSE 1 END";

/// Up to `limit` ready tasks (coordination nodes included) in fair order: round-robin across
/// workflows (each workflow's first task, then each one's second, …), by priority then
/// readiness within a workflow, and by priority then age across workflows within a round.
pub async fn ready_fair(pool: &PgPool, limit: i64) -> Result<Vec<TaskRecord>, DbError> {
    let sql = format!(
        "SELECT s.* FROM (
             SELECT t.*, {PRIORITY_RANK} AS prio,
                    row_number() OVER (PARTITION BY t.workflow_id
                                       ORDER BY {PRIORITY_RANK} DESC, t.ready_at, t.id) AS rn
             FROM tasks t WHERE t.status = 'ready'
         ) s
         ORDER BY s.rn, s.prio DESC, s.ready_at, s.id
         LIMIT $1"
    );
    Ok(sqlx::query_as::<_, TaskRecord>(sqlx::AssertSqlSafe(sql))
        .bind(limit)
        .fetch_all(pool)
        .await?)
}

/// Unfinished tasks held by each agent (the load capacity is checked against).
pub async fn in_flight(pool: &PgPool) -> Result<BTreeMap<AgentId, i32>, DbError> {
    let rows: Vec<(AgentId, i64)> = sqlx::query_as(
        "SELECT agent_id, count(*) FROM tasks
         WHERE status IN ('assigned', 'running') AND agent_id IS NOT NULL GROUP BY agent_id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(a, n)| (a, n as i32)).collect())
}

/// Assigns tasks to agents: `ready → assigned`, attempt + 1. Rows no longer ready are skipped.
/// Stamps the agents' `last_assigned_at` in the same transaction.
pub async fn assign(
    pool: &PgPool,
    pairs: &[(TaskId, AgentId)],
) -> Result<Vec<TaskRecord>, DbError> {
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    let tasks: Vec<TaskId> = pairs.iter().map(|p| p.0).collect();
    let agents: Vec<AgentId> = pairs.iter().map(|p| p.1).collect();
    let mut tx = pool.begin().await?;
    let assigned = sqlx::query_as::<_, TaskRecord>(
        "UPDATE tasks t SET status = 'assigned', attempt = t.attempt + 1, agent_id = u.agent_id,
             error = NULL, started_at = NULL, pinned_agent_id = NULL, updated_at = now()
         FROM UNNEST($1::uuid[], $2::uuid[]) AS u(id, agent_id)
         WHERE t.id = u.id AND t.status = 'ready'
         RETURNING t.*",
    )
    .bind(&tasks)
    .bind(&agents)
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query("UPDATE agents SET last_assigned_at = now() WHERE id = ANY($1)")
        .bind(&agents)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(assigned)
}

/// Outputs of each task's dependencies: task id → (dependency key → output).
pub async fn dependency_outputs(
    pool: &PgPool,
    tasks: &[TaskId],
) -> Result<BTreeMap<TaskId, BTreeMap<String, serde_json::Value>>, DbError> {
    let rows: Vec<(TaskId, String, Option<serde_json::Value>)> = sqlx::query_as(
        "SELECT t.id, d.key, d.output FROM tasks t
         JOIN tasks d ON d.workflow_id = t.workflow_id AND d.key = ANY(t.depends_on)
         WHERE t.id = ANY($1)",
    )
    .bind(tasks)
    .fetch_all(pool)
    .await?;
    let mut out: BTreeMap<TaskId, BTreeMap<String, serde_json::Value>> = BTreeMap::new();
    for (id, key, output) in rows {
        out.entry(id)
            .or_default()
            .insert(key, output.unwrap_or(serde_json::Value::Null));
    }
    Ok(out)
}

/// Puts tasks whose dispatch could not be published back to ready (still at their attempt).
pub async fn unassign(pool: &PgPool, tasks: &[(TaskId, i32)]) -> Result<Vec<TaskRecord>, DbError> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<TaskId> = tasks.iter().map(|t| t.0).collect();
    let attempts: Vec<i32> = tasks.iter().map(|t| t.1).collect();
    Ok(sqlx::query_as::<_, TaskRecord>(
        "UPDATE tasks t SET status = 'ready', agent_id = NULL, ready_at = now(), updated_at = now()
         FROM UNNEST($1::uuid[], $2::int[]) AS u(id, attempt)
         WHERE t.id = u.id AND t.attempt = u.attempt AND t.status = 'assigned'
         RETURNING t.*",
    )
    .bind(&ids)
    .bind(&attempts)
    .fetch_all(pool)
    .await?)
}

/// What a report's change is fenced by: the task, the attempt it names, and the agent that
/// must hold it (`None`: whoever holds it — the scheduler's own requeues).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub task: TaskId,
    pub attempt: i32,
    pub agent: Option<AgentId>,
}

fn fence_columns(fences: &[Fence]) -> (Vec<TaskId>, Vec<i32>, Vec<Option<AgentId>>) {
    (
        fences.iter().map(|f| f.task).collect(),
        fences.iter().map(|f| f.attempt).collect(),
        fences.iter().map(|f| f.agent).collect(),
    )
}

/// `assigned → running` for reports of the current attempt by its holder.
pub async fn mark_started(pool: &PgPool, reports: &[Fence]) -> Result<Vec<TaskRecord>, DbError> {
    if reports.is_empty() {
        return Ok(Vec::new());
    }
    let (ids, attempts, agents) = fence_columns(reports);
    Ok(sqlx::query_as::<_, TaskRecord>(
        "UPDATE tasks t SET status = 'running', started_at = now(), updated_at = now()
         FROM UNNEST($1::uuid[], $2::int[], $3::uuid[]) AS u(id, attempt, agent_id)
         WHERE t.id = u.id AND t.attempt = u.attempt AND t.status = 'assigned'
           AND (u.agent_id IS NULL OR t.agent_id = u.agent_id)
         RETURNING t.*",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&agents)
    .fetch_all(pool)
    .await?)
}

/// `assigned|running → completed` with outputs (and the lock wait, if reported), for reports of
/// the current attempt by its holder only.
pub async fn mark_completed(
    pool: &PgPool,
    reports: &[(Fence, serde_json::Value, Option<u64>)],
) -> Result<Vec<TaskRecord>, DbError> {
    if reports.is_empty() {
        return Ok(Vec::new());
    }
    let fences: Vec<Fence> = reports.iter().map(|r| r.0).collect();
    let (ids, attempts, agents) = fence_columns(&fences);
    let outputs: Vec<&serde_json::Value> = reports.iter().map(|r| &r.1).collect();
    let waits: Vec<Option<i64>> = reports
        .iter()
        .map(|r| r.2.map(|w| i64::try_from(w).unwrap_or(i64::MAX)))
        .collect();
    Ok(sqlx::query_as::<_, TaskRecord>(
        "UPDATE tasks t SET status = 'completed', output = u.output, error = NULL,
             lock_wait_ms = u.lock_wait_ms,
             started_at = COALESCE(t.started_at, now()), finished_at = now(), updated_at = now()
         FROM UNNEST($1::uuid[], $2::int[], $3::uuid[], $4::jsonb[], $5::bigint[])
              AS u(id, attempt, agent_id, output, lock_wait_ms)
         WHERE t.id = u.id AND t.attempt = u.attempt AND t.status IN ('assigned', 'running')
           AND (u.agent_id IS NULL OR t.agent_id = u.agent_id)
         RETURNING t.*",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&agents)
    .bind(&outputs)
    .bind(&waits)
    .fetch_all(pool)
    .await?)
}

/// `assigned|running → retry_wait` (blocked: due again after `delay_ms`) or `→ ready`
/// (released), for the current attempt (by its holder, where the fence names one); neither
/// counts as a failure.
pub async fn requeue(
    pool: &PgPool,
    reports: &[Fence],
    delay_ms: i64,
    reason: &str,
) -> Result<Vec<TaskRecord>, DbError> {
    if reports.is_empty() {
        return Ok(Vec::new());
    }
    let (ids, attempts, agents) = fence_columns(reports);
    Ok(sqlx::query_as::<_, TaskRecord>(
        "UPDATE tasks t SET
             status = CASE WHEN $4 > 0 THEN 'retry_wait' ELSE 'ready' END,
             retry_at = CASE WHEN $4 > 0 THEN now() + make_interval(secs => $4::float8 / 1000) END,
             ready_at = CASE WHEN $4 > 0 THEN t.ready_at ELSE now() END,
             agent_id = NULL, error = $5, updated_at = now()
         FROM UNNEST($1::uuid[], $2::int[], $3::uuid[]) AS u(id, attempt, agent_id)
         WHERE t.id = u.id AND t.attempt = u.attempt AND t.status IN ('assigned', 'running')
           AND (u.agent_id IS NULL OR t.agent_id = u.agent_id)
         RETURNING t.*",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&agents)
    .bind(delay_ms)
    .bind(reason)
    .fetch_all(pool)
    .await?)
}

/// `pending → ready`, for the rows chosen by a `WHERE` placed between the two halves.
const PROMOTE: &str = "UPDATE tasks t SET status = 'ready', ready_at = now(), updated_at = now()";
/// …only pending tasks whose join is satisfied: every dependency completed, or (a quorum join)
/// at least `join_quorum` of them. The common case stops at the first unfinished dependency.
const UNBLOCKED: &str = "AND t.status = 'pending'
    AND CASE WHEN t.join_quorum IS NULL THEN
            NOT EXISTS (SELECT 1 FROM tasks d
                        WHERE d.workflow_id = t.workflow_id AND d.key = ANY(t.depends_on)
                          AND d.status <> 'completed')
        ELSE (SELECT count(*) FROM tasks d
              WHERE d.workflow_id = t.workflow_id AND d.key = ANY(t.depends_on)
                AND d.status = 'completed') >= t.join_quorum
        END
    RETURNING t.*";

/// Pending tasks of `workflows` whose every dependency has completed become ready.
pub async fn promote_unblocked(
    pool: &PgPool,
    workflows: &[WorkflowId],
) -> Result<Vec<TaskRecord>, DbError> {
    if workflows.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_as::<_, TaskRecord>(sqlx::AssertSqlSafe(format!(
        "{PROMOTE} WHERE t.workflow_id = ANY($1) {UNBLOCKED}"
    )))
    .bind(workflows)
    .fetch_all(pool)
    .await?)
}

/// The fast path of [`promote_unblocked`]: only the given pending tasks (the dependants of what
/// just completed, from the scheduler's in-memory graph) are checked.
pub async fn promote_candidates(
    pool: &PgPool,
    tasks: &[TaskId],
) -> Result<Vec<TaskRecord>, DbError> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_as::<_, TaskRecord>(sqlx::AssertSqlSafe(format!(
        "{PROMOTE} WHERE t.id = ANY($1) {UNBLOCKED}"
    )))
    .bind(tasks)
    .fetch_all(pool)
    .await?)
}

/// Ids of the running workflows.
pub async fn running_workflows(pool: &PgPool) -> Result<Vec<WorkflowId>, DbError> {
    Ok(
        sqlx::query_scalar("SELECT id FROM workflows WHERE status = 'running'")
            .fetch_all(pool)
            .await?,
    )
}

/// Dependency edges of workflows: (workflow, task id, key, depends_on).
pub async fn graph_edges(
    pool: &PgPool,
    workflows: &[WorkflowId],
) -> Result<Vec<(WorkflowId, TaskId, String, Vec<String>)>, DbError> {
    Ok(sqlx::query_as(
        "SELECT workflow_id, id, key, depends_on FROM tasks WHERE workflow_id = ANY($1)",
    )
    .bind(workflows)
    .fetch_all(pool)
    .await?)
}

/// `retry_wait → ready` for tasks whose backoff has passed.
pub async fn promote_due_retries(pool: &PgPool) -> Result<Vec<TaskRecord>, DbError> {
    Ok(sqlx::query_as::<_, TaskRecord>(
        "UPDATE tasks SET status = 'ready', retry_at = NULL, ready_at = now(), updated_at = now()
         WHERE status = 'retry_wait' AND retry_at <= now()
         RETURNING *",
    )
    .fetch_all(pool)
    .await?)
}

/// Tasks held by agents that are offline, terminated or quarantined go back to ready; their
/// next dispatch raises the attempt, fencing off the lost holder.
pub async fn reclaim_from_lost_agents(
    pool: &PgPool,
) -> Result<Vec<(TaskRecord, AgentId)>, DbError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        task: TaskRecord,
        lost_agent: AgentId,
    }
    let rows = sqlx::query_as::<_, Row>(
        "WITH lost AS (
             SELECT t.id, t.agent_id FROM tasks t JOIN agents a ON a.id = t.agent_id
             WHERE t.status IN ('assigned', 'running')
               AND a.status IN ('offline', 'terminated', 'quarantined')
             FOR UPDATE OF t
         )
         UPDATE tasks t SET status = 'ready', agent_id = NULL, ready_at = now(), updated_at = now(),
             error = 'agent lost'
         FROM lost WHERE t.id = lost.id
         RETURNING t.*, lost.agent_id AS lost_agent",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| (r.task, r.lost_agent)).collect())
}

/// Running tasks past their timeout, and assigned tasks never started within
/// `start_timeout_ms` (their dispatch was lost or never picked up).
pub async fn overdue(
    pool: &PgPool,
    start_timeout_ms: i64,
) -> Result<(Vec<TaskRecord>, Vec<TaskRecord>), DbError> {
    let timed_out = sqlx::query_as::<_, TaskRecord>(
        "SELECT * FROM tasks WHERE status = 'running' AND timeout_seconds IS NOT NULL
           AND started_at + make_interval(secs => timeout_seconds) < now()",
    )
    .fetch_all(pool)
    .await?;
    let never_started = sqlx::query_as::<_, TaskRecord>(
        "SELECT * FROM tasks WHERE status = 'assigned'
           AND updated_at < now() - make_interval(secs => $1::float8 / 1000)",
    )
    .bind(start_timeout_ms)
    .fetch_all(pool)
    .await?;
    Ok((timed_out, never_started))
}

/// Fail-fast: every unfinished task of the workflow is cancelled.
pub async fn cancel_unfinished(
    pool: &PgPool,
    workflow: WorkflowId,
    reason: &str,
) -> Result<Vec<TaskRecord>, DbError> {
    Ok(sqlx::query_as::<_, TaskRecord>(
        "UPDATE tasks SET status = 'cancelled', error = $2, finished_at = now(), updated_at = now()
         WHERE workflow_id = $1 AND status IN ('pending', 'ready', 'assigned', 'running', 'retry_wait')
         RETURNING *",
    )
    .bind(workflow)
    .bind(reason)
    .fetch_all(pool)
    .await?)
}

/// …pending direct dependants of `keys` whose join can no longer be satisfied: fewer
/// dependencies than required are left that have not failed or been cancelled.
const UNSATISFIABLE: &str = "t.workflow_id = $1 AND t.status = 'pending' AND t.depends_on && $2
    AND cardinality(t.depends_on)
        - (SELECT count(*) FROM tasks d
           WHERE d.workflow_id = t.workflow_id AND d.key = ANY(t.depends_on)
             AND d.status IN ('failed', 'cancelled'))
        < COALESCE(t.join_quorum, cardinality(t.depends_on))";

/// Whether a failure of `key` leaves a dependant unable to run — or there is no dependant to
/// absorb it. A quorum join that can still be met tolerates the failure.
pub async fn failure_is_fatal(
    pool: &PgPool,
    workflow: WorkflowId,
    key: &str,
) -> Result<bool, DbError> {
    let keys = vec![key.to_string()];
    let (dependants, stuck): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT (SELECT count(*) FROM tasks t WHERE t.workflow_id = $1 AND t.depends_on && $2),
                (SELECT count(*) FROM tasks t WHERE {UNSATISFIABLE})"
    )))
    .bind(workflow)
    .bind(&keys)
    .fetch_one(pool)
    .await?;
    Ok(dependants == 0 || stuck > 0)
}

/// Continue policy: pending tasks that can no longer run because `failed_key` failed fail too,
/// transitively; a quorum join that can still be met keeps waiting.
pub async fn fail_dependants(
    pool: &PgPool,
    workflow: WorkflowId,
    failed_key: &str,
) -> Result<Vec<TaskRecord>, DbError> {
    let mut failed = Vec::new();
    let mut frontier = vec![failed_key.to_string()];
    while !frontier.is_empty() {
        let newly = sqlx::query_as::<_, TaskRecord>(sqlx::AssertSqlSafe(format!(
            "UPDATE tasks t SET status = 'failed', finished_at = now(), updated_at = now(),
                 error = 'dependency ' || $3 || ' failed'
             WHERE {UNSATISFIABLE}
             RETURNING t.*"
        )))
        .bind(workflow)
        .bind(&frontier)
        .bind(failed_key)
        .fetch_all(pool)
        .await?;
        frontier = newly.iter().map(|t| t.key.clone()).collect();
        failed.extend(newly);
    }
    Ok(failed)
}

/// Workflows among `ids` whose tasks are all finished get their final status: failed if any task
/// failed that no dependant absorbed (a quorum join that completed without it), else cancelled
/// if any was cancelled, else completed.
pub async fn finish_workflows(
    pool: &PgPool,
    ids: &[WorkflowId],
) -> Result<Vec<WorkflowRecord>, DbError> {
    Ok(sqlx::query_as::<_, WorkflowRecord>(
        "UPDATE workflows w SET
             status = CASE
                 WHEN EXISTS (SELECT 1 FROM tasks t WHERE t.workflow_id = w.id AND t.status = 'failed'
                     AND NOT (EXISTS (SELECT 1 FROM tasks c WHERE c.workflow_id = w.id AND t.key = ANY(c.depends_on))
                              AND NOT EXISTS (SELECT 1 FROM tasks c WHERE c.workflow_id = w.id
                                              AND t.key = ANY(c.depends_on) AND c.status <> 'completed')))
                     THEN 'failed'
                 WHEN EXISTS (SELECT 1 FROM tasks t WHERE t.workflow_id = w.id AND t.status = 'cancelled') THEN 'cancelled'
                 ELSE 'completed' END,
             finished_at = now(), updated_at = now()
         WHERE w.id = ANY($1) AND w.status = 'running'
           AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.workflow_id = w.id
                           AND t.status NOT IN ('completed', 'failed', 'cancelled'))
         RETURNING w.*",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?)
}
