//! The scheduler's set-based statements: each moves a whole batch of tasks in one round trip,
//! every row guarded by its expected status (and attempt, where a worker's report is applied).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sqlx::PgConnection;

use super::DbError;
use super::workflows::WORKFLOW_COLUMNS;
use crate::domain::{AgentId, TaskId, WorkflowId};
use crate::protocol::workflows::{TaskRecord, WorkflowRecord};

/// What the scheduler keeps in memory of a task: enough to queue it, and to know who holds it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TaskState {
    pub id: TaskId,
    pub workflow_id: WorkflowId,
    pub status: crate::domain::TaskStatus,
    pub priority: crate::domain::Priority,
    pub kind: crate::domain::coordination::NodeKind,
    pub capabilities: Vec<String>,
    pub executor: String,
    pub pinned_agent_id: Option<AgentId>,
    pub agent_id: Option<AgentId>,
}

impl From<&TaskRecord> for TaskState {
    fn from(t: &TaskRecord) -> Self {
        Self {
            id: t.id,
            workflow_id: t.workflow_id,
            status: t.status,
            priority: t.priority,
            kind: t.kind,
            capabilities: t.capabilities.clone(),
            executor: t.executor.clone(),
            pinned_agent_id: t.pinned_agent_id,
            agent_id: t.agent_id,
        }
    }
}

const STATE_COLUMNS: &str = "id, workflow_id, status, priority, kind, capabilities, executor, \
     pinned_agent_id, agent_id";

/// Those of `ids` that are coordination nodes ready to run, oldest first.
pub async fn ready_nodes(
    db: &mut PgConnection,
    ids: &[TaskId],
) -> Result<Vec<TaskRecord>, DbError> {
    Ok(sqlx::query_as::<_, TaskRecord>(
        "SELECT * FROM tasks WHERE id = ANY($1) AND status = 'ready' AND kind <> 'task'
         ORDER BY ready_at, id",
    )
    .bind(ids)
    .fetch_all(&mut *db)
    .await?)
}

/// Every task that is ready or held by an agent: what a new leader starts from.
pub async fn active_states(db: &mut PgConnection) -> Result<Vec<TaskState>, DbError> {
    Ok(sqlx::query_as::<_, TaskState>(sqlx::AssertSqlSafe(format!(
        "SELECT {STATE_COLUMNS} FROM tasks
         WHERE finished_at IS NULL AND status IN ('ready', 'assigned', 'running')"
    )))
    .fetch_all(&mut *db)
    .await?)
}

/// The states of these tasks (in any status).
pub async fn states_of(db: &mut PgConnection, ids: &[TaskId]) -> Result<Vec<TaskState>, DbError> {
    Ok(sqlx::query_as::<_, TaskState>(sqlx::AssertSqlSafe(format!(
        "SELECT {STATE_COLUMNS} FROM tasks WHERE id = ANY($1)"
    )))
    .bind(ids)
    .fetch_all(&mut *db)
    .await?)
}

/// The ready tasks of these workflows (just submitted).
pub async fn ready_states_of_workflows(
    db: &mut PgConnection,
    workflows: &[WorkflowId],
) -> Result<Vec<TaskState>, DbError> {
    Ok(sqlx::query_as::<_, TaskState>(sqlx::AssertSqlSafe(format!(
        "SELECT {STATE_COLUMNS} FROM tasks WHERE workflow_id = ANY($1) AND status = 'ready'"
    )))
    .bind(workflows)
    .fetch_all(&mut *db)
    .await?)
}

/// How many tasks are ready, and how many held by an agent: what a leader's memory must match.
/// Planned at each run, like [`promote_due_retries`]: a plan kept from when the table was small
/// would read every task ever run, not the unfinished ones.
pub async fn count_active(db: &mut PgConnection) -> Result<(i64, i64), DbError> {
    Ok(sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'ready'),
                count(*) FILTER (WHERE status IN ('assigned', 'running'))
         FROM tasks WHERE finished_at IS NULL AND status IN ('ready', 'assigned', 'running')",
    )
    .persistent(false)
    .fetch_one(&mut *db)
    .await?)
}

/// What an assignment returns of a task: what its dispatch, its `task.assigned` event and the
/// scheduler's memory need, not the whole row (returning and decoding every column of 10,000
/// rows took about a third of a large dispatch round).
#[derive(Debug, Clone, PartialEq)]
pub struct AssignedTask {
    pub id: TaskId,
    pub workflow_id: WorkflowId,
    pub key: String,
    pub executor: String,
    pub input: serde_json::Value,
    pub depends_on: Vec<String>,
    pub resources: serde_json::Value,
    pub attempt: i32,
    pub timeout_seconds: Option<i32>,
    pub agent_id: Option<AgentId>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// The columns of [`AssignedTask`], in its fields' order (the assignment names them too).
const ASSIGNED_COLUMNS: &str = "id, workflow_id, key, executor, input, depends_on, resources, \
     attempt, timeout_seconds, agent_id, updated_at";

/// Read by position: a round decodes 10,000 of these, and finding each column by name was a
/// measurable part of it.
impl sqlx::FromRow<'_, sqlx::postgres::PgRow> for AssignedTask {
    fn from_row(row: &sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        Ok(Self {
            id: row.try_get(0)?,
            workflow_id: row.try_get(1)?,
            key: row.try_get(2)?,
            executor: row.try_get(3)?,
            input: row.try_get(4)?,
            depends_on: row.try_get(5)?,
            resources: row.try_get(6)?,
            attempt: row.try_get(7)?,
            timeout_seconds: row.try_get(8)?,
            agent_id: row.try_get(9)?,
            updated_at: row.try_get(10)?,
        })
    }
}

/// An assigned task and its dependencies' outputs (key → output).
#[derive(Debug, Clone)]
pub struct Assigned {
    pub task: AssignedTask,
    pub dependency_outputs: BTreeMap<String, serde_json::Value>,
}

/// Outputs already at hand (of tasks completed in the same transaction), by workflow and key.
pub type KnownOutputs<'a> = HashMap<(WorkflowId, &'a str), &'a serde_json::Value>;

/// Readies a connection for the scheduler's steps. Each statement keeps the plan made at its
/// first run (`plan_cache_mode = force_generic_plan`: planning a chain's step anew each time
/// was ~0.6 ms of its hop), and that plan reads rows through an index wherever one serves
/// (`enable_seqscan = off`), so a plan made while `tasks` was small is not a scan of it once it
/// has grown. Such a connection must not go back to the pool.
pub async fn make_hot(db: &mut PgConnection) -> Result<(), DbError> {
    sqlx::raw_sql("SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off")
        .execute(db)
        .await?;
    Ok(())
}

/// Assigns tasks to agents — `ready → assigned`, attempt + 1, stamping the agents'
/// `last_assigned_at` — in one statement, and reads their dependencies' outputs (those not in
/// `known`). Rows no longer ready are skipped. The tasks are found by id on a connection readied
/// by [`make_hot`] (the scheduler's, and the bench's fetch-and-assign): on another, given a
/// large round's ids as constants beside a table of finished tasks, PostgreSQL may hash a scan
/// of the whole table instead.
pub async fn assign(
    db: &mut PgConnection,
    pairs: &[(TaskId, AgentId)],
    known: &KnownOutputs<'_>,
) -> Result<Vec<Assigned>, DbError> {
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    let tasks: Vec<TaskId> = pairs.iter().map(|p| p.0).collect();
    let agents: Vec<AgentId> = pairs.iter().map(|p| p.1).collect();
    let stamped: Vec<AgentId> = agents
        .iter()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // Each task is found by its id. No index reads the status (a transition writes no index
    // entry), and the status is tested in a form none could serve: with the statistics of a
    // table that just took a large workflow (no task `ready` yet, as far as they know),
    // PostgreSQL once read every ready task through a status index for each assignment — a
    // cost growing with the backlog.
    // The agents' stamp rides along as a CTE (run though nothing reads it); the assignment is
    // the statement itself, so its rows are returned as they are written, not gathered first.
    let assigned = sqlx::query_as::<_, AssignedTask>(
        "WITH stamped AS (
             UPDATE agents SET last_assigned_at = now() WHERE id = ANY($3)
         )
         UPDATE tasks t SET status = 'assigned', attempt = t.attempt + 1, agent_id = u.agent_id,
             error = NULL, started_at = NULL, pinned_agent_id = NULL, updated_at = now()
         FROM UNNEST($1::uuid[], $2::uuid[]) AS u(id, agent_id)
         WHERE t.id = u.id AND (t.status = 'ready') IS TRUE
         RETURNING t.id, t.workflow_id, t.key, t.executor, t.input, t.depends_on, t.resources,
             t.attempt, t.timeout_seconds, t.agent_id, t.updated_at",
    )
    .bind(&tasks)
    .bind(&agents)
    .bind(&stamped)
    .fetch_all(&mut *db)
    .await?;
    with_dependency_outputs(db, assigned, known).await
}

/// The assigned tasks: dispatched, maybe not yet delivered (a new leader publishes them again).
pub async fn assigned_tasks(db: &mut PgConnection) -> Result<Vec<Assigned>, DbError> {
    let assigned = sqlx::query_as::<_, AssignedTask>(sqlx::AssertSqlSafe(format!(
        "SELECT {ASSIGNED_COLUMNS} FROM tasks WHERE finished_at IS NULL AND status = 'assigned'"
    )))
    .fetch_all(&mut *db)
    .await?;
    with_dependency_outputs(db, assigned, &KnownOutputs::new()).await
}

/// Each task with its dependencies' outputs, every distinct dependency read once (the children
/// of a split share their source, whose output — the items — may be large), and none read that
/// `known` has (the hop of a chain reads nothing).
async fn with_dependency_outputs(
    db: &mut PgConnection,
    tasks: Vec<AssignedTask>,
    known: &KnownOutputs<'_>,
) -> Result<Vec<Assigned>, DbError> {
    let wanted: BTreeSet<(WorkflowId, &str)> = tasks
        .iter()
        .flat_map(|t| t.depends_on.iter().map(|k| (t.workflow_id, k.as_str())))
        .filter(|at| !known.contains_key(at))
        .collect();
    let mut outputs: HashMap<(WorkflowId, String), serde_json::Value> = HashMap::new();
    if !wanted.is_empty() {
        let workflows: Vec<WorkflowId> = wanted.iter().map(|(w, _)| *w).collect();
        let keys: Vec<&str> = wanted.iter().map(|(_, k)| *k).collect();
        let rows: Vec<(WorkflowId, String, Option<serde_json::Value>)> = sqlx::query_as(
            "SELECT d.workflow_id, d.key, d.output
             FROM UNNEST($1::uuid[], $2::text[]) AS u(workflow_id, key)
             JOIN tasks d ON d.workflow_id = u.workflow_id AND d.key = u.key",
        )
        .bind(&workflows)
        .bind(&keys)
        .fetch_all(&mut *db)
        .await?;
        for (w, k, output) in rows {
            outputs.insert((w, k), output.unwrap_or(serde_json::Value::Null));
        }
    }
    Ok(tasks
        .into_iter()
        .map(|task| {
            let dependency_outputs = task
                .depends_on
                .iter()
                .filter_map(|k| {
                    let v = known
                        .get(&(task.workflow_id, k.as_str()))
                        .copied()
                        .or_else(|| outputs.get(&(task.workflow_id, k.clone())))?;
                    Some((k.clone(), v.clone()))
                })
                .collect();
            Assigned {
                task,
                dependency_outputs,
            }
        })
        .collect())
}

/// Tasks whose dispatch could not be sent or stored wait `delay_ms` before their next
/// assignment (`assigned → retry_wait`, still at their attempt, with `reason`), so a stream
/// that refuses dispatches is not sent them again at every step.
pub async fn unassign(
    db: &mut PgConnection,
    tasks: &[(TaskId, i32)],
    delay_ms: i64,
    reason: &str,
) -> Result<Vec<TaskRecord>, DbError> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<TaskId> = tasks.iter().map(|t| t.0).collect();
    let attempts: Vec<i32> = tasks.iter().map(|t| t.1).collect();
    Ok(sqlx::query_as::<_, TaskRecord>(
        "UPDATE tasks t SET status = 'retry_wait', agent_id = NULL, error = $4,
             retry_at = now() + make_interval(secs => $3::float8 / 1000), updated_at = now()
         FROM UNNEST($1::uuid[], $2::int[]) AS u(id, attempt)
         WHERE t.id = u.id AND t.attempt = u.attempt AND t.status = 'assigned'
         RETURNING t.*",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(delay_ms)
    .bind(reason)
    .fetch_all(&mut *db)
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

/// `assigned → running` for reports of the current attempt by its holder, each with how long
/// the attempt had been running when it was reported (`started_at` goes back that far, never
/// before the assignment).
pub async fn mark_started(
    db: &mut PgConnection,
    reports: &[(Fence, Option<u64>)],
) -> Result<Vec<TaskRecord>, DbError> {
    if reports.is_empty() {
        return Ok(Vec::new());
    }
    let fences: Vec<Fence> = reports.iter().map(|r| r.0).collect();
    let (ids, attempts, agents) = fence_columns(&fences);
    let running: Vec<i64> = reports
        .iter()
        .map(|r| r.1.unwrap_or(0).min(86_400_000) as i64)
        .collect();
    Ok(sqlx::query_as::<_, TaskRecord>(
        "UPDATE tasks t SET status = 'running', updated_at = now(),
             started_at = GREATEST(t.updated_at,
                                   now() - make_interval(secs => u.running_ms::float8 / 1000))
         FROM UNNEST($1::uuid[], $2::int[], $3::uuid[], $4::bigint[])
              AS u(id, attempt, agent_id, running_ms)
         WHERE t.id = u.id AND t.attempt = u.attempt AND t.status = 'assigned'
           AND (u.agent_id IS NULL OR t.agent_id = u.agent_id)
         RETURNING t.*",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&agents)
    .bind(&running)
    .fetch_all(&mut *db)
    .await?)
}

/// A completion as reported: the attempt it ends, its output, and how long it waited for locks
/// and ran (when its agent said).
#[derive(Debug, Clone)]
pub struct Completion {
    pub fence: Fence,
    pub output: serde_json::Value,
    pub lock_wait_ms: Option<u64>,
    pub running_ms: Option<u64>,
}

/// `assigned|running → completed` with outputs (and the lock wait, if reported), for reports of
/// the current attempt by its holder only. A task whose `started` was not written started
/// `running_ms` before now (never before its assignment; now, when not reported).
pub async fn mark_completed(
    db: &mut PgConnection,
    reports: &[Completion],
) -> Result<Vec<TaskRecord>, DbError> {
    if reports.is_empty() {
        return Ok(Vec::new());
    }
    Ok(completion_query(COMPLETE, reports)
        .fetch_all(&mut *db)
        .await?)
}

/// [`mark_completed`], and in the same statement `pending → ready` for those of `candidates`
/// (dependants of the completing tasks) whose join is now satisfied, the tasks completing
/// counted as completed: one round trip instead of two. Returns what completed and what was
/// promoted.
pub async fn complete_and_promote(
    db: &mut PgConnection,
    reports: &[Completion],
    candidates: &[TaskId],
) -> Result<(Vec<TaskRecord>, Vec<TaskRecord>), DbError> {
    if candidates.is_empty() {
        return Ok((mark_completed(db, reports).await?, Vec::new()));
    }
    let rows = completion_query(
        sqlx::AssertSqlSafe(format!(
            "WITH done AS ({COMPLETE}),
             promoted AS ({PROMOTE} WHERE t.id = ANY($7) {})
             SELECT * FROM done UNION ALL SELECT * FROM promoted",
            unblocked(Some("done"))
        )),
        reports,
    )
    .bind(candidates)
    .fetch_all(&mut *db)
    .await?;
    // The two sets by status: a completed row is never pending, a promoted one never running.
    Ok(rows
        .into_iter()
        .partition(|t| t.status == crate::domain::TaskStatus::Completed))
}

/// `assigned|running → completed` for the reports bound as `$1`–`$6`.
const COMPLETE: &str = "UPDATE tasks t SET status = 'completed', output = u.output, error = NULL,
         lock_wait_ms = u.lock_wait_ms,
         started_at = COALESCE(t.started_at, GREATEST(t.updated_at,
                          now() - make_interval(secs => u.running_ms::float8 / 1000))),
         finished_at = now(), updated_at = now()
     FROM UNNEST($1::uuid[], $2::int[], $3::uuid[], $4::jsonb[], $5::bigint[], $6::bigint[])
          AS u(id, attempt, agent_id, output, lock_wait_ms, running_ms)
     WHERE t.id = u.id AND t.attempt = u.attempt AND t.status IN ('assigned', 'running')
       AND (u.agent_id IS NULL OR t.agent_id = u.agent_id)
     RETURNING t.*";

/// `sql` (whose `$1`–`$6` are [`COMPLETE`]'s) with the reports bound.
fn completion_query<'q>(
    sql: impl sqlx::SqlSafeStr,
    reports: &'q [Completion],
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, TaskRecord, sqlx::postgres::PgArguments> {
    let fences: Vec<Fence> = reports.iter().map(|r| r.fence).collect();
    let (ids, attempts, agents) = fence_columns(&fences);
    let outputs: Vec<&serde_json::Value> = reports.iter().map(|r| &r.output).collect();
    let millis = |ms: Option<u64>| ms.map(|w| i64::try_from(w).unwrap_or(i64::MAX));
    let waits: Vec<Option<i64>> = reports.iter().map(|r| millis(r.lock_wait_ms)).collect();
    let running: Vec<i64> = reports
        .iter()
        .map(|r| r.running_ms.unwrap_or(0).min(86_400_000) as i64)
        .collect();
    sqlx::query_as::<_, TaskRecord>(sql)
        .bind(ids)
        .bind(attempts)
        .bind(agents)
        .bind(outputs)
        .bind(waits)
        .bind(running)
}

/// `assigned|running → retry_wait` (blocked: due again after `delay_ms`) or `→ ready`
/// (released), for the current attempt (by its holder, where the fence names one); neither
/// counts as a failure.
pub async fn requeue(
    db: &mut PgConnection,
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
    .fetch_all(&mut *db)
    .await?)
}

/// `pending → ready`, for the rows chosen by a `WHERE` placed between the two halves.
const PROMOTE: &str = "UPDATE tasks t SET status = 'ready', ready_at = now(), updated_at = now()";
/// …only pending tasks whose join is satisfied: every dependency completed, or (a quorum join)
/// at least `join_quorum` of them. The common case stops at the first unfinished dependency.
/// Each dependency is looked up by its own (workflow, key) in a scalar subquery: written as a
/// join, PostgreSQL (with the statistics of a table that just grew) scans every task of the
/// workflow for each candidate — seconds for the children of a large split. With
/// `also_completed`, a dependency in that CTE (tasks completing in the same statement, which its
/// snapshot does not show completed) counts as completed.
fn unblocked(also_completed: Option<&str>) -> String {
    const STATUS: &str = "(SELECT d.status FROM tasks d
                           WHERE d.workflow_id = t.workflow_id AND d.key = k.key)";
    let (unfinished, finished) = match also_completed {
        None => (
            format!("{STATUS} IS DISTINCT FROM 'completed'"),
            format!("{STATUS} = 'completed'"),
        ),
        Some(cte) => {
            let completing = format!(
                "EXISTS (SELECT 1 FROM {cte} c WHERE c.workflow_id = t.workflow_id AND c.key = k.key)"
            );
            (
                format!("{STATUS} IS DISTINCT FROM 'completed' AND NOT {completing}"),
                format!("({STATUS} = 'completed' OR {completing})"),
            )
        }
    };
    format!(
        "AND t.status = 'pending'
         AND CASE WHEN t.join_quorum IS NULL THEN
                 NOT EXISTS (SELECT 1 FROM unnest(t.depends_on) AS k(key) WHERE {unfinished})
             ELSE (SELECT count(*) FROM unnest(t.depends_on) AS k(key) WHERE {finished})
                  >= t.join_quorum
             END
         RETURNING t.*"
    )
}

/// Pending tasks of `workflows` whose every dependency has completed become ready.
pub async fn promote_unblocked(
    db: &mut PgConnection,
    workflows: &[WorkflowId],
) -> Result<Vec<TaskRecord>, DbError> {
    if workflows.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_as::<_, TaskRecord>(sqlx::AssertSqlSafe(format!(
        "{PROMOTE} WHERE t.workflow_id = ANY($1) {}",
        unblocked(None)
    )))
    .bind(workflows)
    .fetch_all(&mut *db)
    .await?)
}

/// The fast path of [`promote_unblocked`]: only the given pending tasks (the dependants of what
/// just completed, from the scheduler's in-memory graph) are checked.
pub async fn promote_candidates(
    db: &mut PgConnection,
    tasks: &[TaskId],
) -> Result<Vec<TaskRecord>, DbError> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_as::<_, TaskRecord>(sqlx::AssertSqlSafe(format!(
        "{PROMOTE} WHERE t.id = ANY($1) {}",
        unblocked(None)
    )))
    .bind(tasks)
    .fetch_all(&mut *db)
    .await?)
}

/// Ids of the running workflows.
pub async fn running_workflows(db: &mut PgConnection) -> Result<Vec<WorkflowId>, DbError> {
    Ok(
        sqlx::query_scalar("SELECT id FROM workflows WHERE status = 'running'")
            .fetch_all(&mut *db)
            .await?,
    )
}

/// Dependency edges of workflows: (workflow, task id, key, depends_on, whether its join is a
/// quorum).
pub async fn graph_edges(
    db: &mut PgConnection,
    workflows: &[WorkflowId],
) -> Result<Vec<(WorkflowId, TaskId, String, Vec<String>, bool)>, DbError> {
    Ok(sqlx::query_as(
        "SELECT workflow_id, id, key, depends_on, join_quorum IS NOT NULL FROM tasks
         WHERE workflow_id = ANY($1)",
    )
    .bind(workflows)
    .fetch_all(&mut *db)
    .await?)
}

/// `retry_wait → ready` for tasks whose backoff has passed.
///
/// Planned at each run (not prepared once): a statement without parameters keeps the plan of its
/// first run, and the leader's first maintenance tick may come while `tasks` is nearly empty —
/// its plan then read the whole table at every tick (35-50 ms at every 250 ms tick, measured,
/// once a 100,000-task workflow had been submitted), where the index of waiting retries reads
/// only them.
pub async fn promote_due_retries(db: &mut PgConnection) -> Result<Vec<TaskRecord>, DbError> {
    Ok(sqlx::query_as::<_, TaskRecord>(
        "UPDATE tasks SET status = 'ready', retry_at = NULL, ready_at = now(), updated_at = now()
         WHERE status = 'retry_wait' AND retry_at <= now()
         RETURNING *",
    )
    .persistent(false)
    .fetch_all(&mut *db)
    .await?)
}

/// Those of `held` (the tasks the leader's memory says agents hold) whose agent is offline,
/// terminated or quarantined go back to ready; their next dispatch raises the attempt, fencing
/// off the lost holder.
pub async fn reclaim_from_lost_agents(
    db: &mut PgConnection,
    held: &[TaskId],
) -> Result<Vec<(TaskRecord, AgentId)>, DbError> {
    if held.is_empty() {
        return Ok(Vec::new());
    }
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        task: TaskRecord,
        lost_agent: AgentId,
    }
    let rows = sqlx::query_as::<_, Row>(
        "WITH lost AS (
             SELECT t.id, t.agent_id FROM tasks t JOIN agents a ON a.id = t.agent_id
             WHERE t.id = ANY($1) AND t.status IN ('assigned', 'running')
               AND a.status IN ('offline', 'terminated', 'quarantined')
             FOR UPDATE OF t
         )
         UPDATE tasks t SET status = 'ready', agent_id = NULL, ready_at = now(), updated_at = now(),
             error = 'agent lost'
         FROM lost WHERE t.id = lost.id
         RETURNING t.*, lost.agent_id AS lost_agent",
    )
    .bind(held)
    .fetch_all(&mut *db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.task, r.lost_agent)).collect())
}

/// The tasks `agent` holds go back to ready (their next dispatch raises the attempt, fencing off
/// the holder): its process was replaced by a new one under the same name.
pub async fn reclaim_from_agent(
    db: &mut PgConnection,
    agent: AgentId,
) -> Result<Vec<TaskRecord>, DbError> {
    Ok(sqlx::query_as::<_, TaskRecord>(
        "UPDATE tasks SET status = 'ready', agent_id = NULL, ready_at = now(), updated_at = now(),
             error = 'its agent was registered again by a new process'
         WHERE finished_at IS NULL AND agent_id = $1 AND status IN ('assigned', 'running')
         RETURNING *",
    )
    .bind(agent)
    .fetch_all(&mut *db)
    .await?)
}

/// Of `held` (the tasks the leader's memory says agents hold): those running past their
/// timeout, and those assigned but never started within `start_timeout_ms` (their dispatch was
/// lost or never picked up).
pub async fn overdue(
    db: &mut PgConnection,
    held: &[TaskId],
    start_timeout_ms: i64,
) -> Result<(Vec<TaskRecord>, Vec<TaskRecord>), DbError> {
    if held.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let overdue = sqlx::query_as::<_, TaskRecord>(
        "SELECT * FROM tasks WHERE id = ANY($1)
           AND ((status = 'running' AND timeout_seconds IS NOT NULL
                 AND started_at + make_interval(secs => timeout_seconds) < now())
             OR (status = 'assigned'
                 AND updated_at < now() - make_interval(secs => $2::float8 / 1000)))",
    )
    .bind(held)
    .bind(start_timeout_ms)
    .fetch_all(&mut *db)
    .await?;
    Ok(overdue
        .into_iter()
        .partition(|t| t.status == crate::domain::TaskStatus::Running))
}

/// Fail-fast: every unfinished task of the workflow is cancelled.
pub async fn cancel_unfinished(
    db: &mut PgConnection,
    workflow: WorkflowId,
    reason: &str,
) -> Result<Vec<TaskRecord>, DbError> {
    Ok(sqlx::query_as::<_, TaskRecord>(
        "UPDATE tasks SET status = 'cancelled', error = $2, retry_at = NULL, finished_at = now(),
             updated_at = now()
         WHERE workflow_id = $1 AND finished_at IS NULL
           AND status IN ('pending', 'ready', 'assigned', 'running', 'retry_wait')
         RETURNING *",
    )
    .bind(workflow)
    .bind(reason)
    .fetch_all(&mut *db)
    .await?)
}

/// …pending direct dependants of `keys` whose join can no longer be satisfied: fewer
/// dependencies than required are left that have not failed or been cancelled.
const UNSATISFIABLE: &str = "t.workflow_id = $1 AND t.status = 'pending' AND t.depends_on && $2
    AND cardinality(t.depends_on)
        - (SELECT count(*) FROM unnest(t.depends_on) AS k(key)
           WHERE (SELECT d.status FROM tasks d
                  WHERE d.workflow_id = t.workflow_id AND d.key = k.key) IN ('failed', 'cancelled'))
        < COALESCE(t.join_quorum, cardinality(t.depends_on))";

/// Whether a failure of `key` leaves a dependant unable to run — or there is no dependant to
/// absorb it. A quorum join that can still be met tolerates the failure.
pub async fn failure_is_fatal(
    db: &mut PgConnection,
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
    .fetch_one(&mut *db)
    .await?;
    Ok(dependants == 0 || stuck > 0)
}

/// Continue policy: pending tasks that can no longer run because `failed_key` failed fail too,
/// transitively; a quorum join that can still be met keeps waiting.
pub async fn fail_dependants(
    db: &mut PgConnection,
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
        .fetch_all(&mut *db)
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
    db: &mut PgConnection,
    ids: &[WorkflowId],
) -> Result<Vec<WorkflowRecord>, DbError> {
    Ok(sqlx::query_as::<_, WorkflowRecord>(sqlx::AssertSqlSafe(format!(
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
                           AND t.status IN ('pending', 'ready', 'assigned', 'running', 'retry_wait'))
         RETURNING {WORKFLOW_COLUMNS}"
    )))
    .bind(ids)
    .fetch_all(&mut *db)
    .await?)
}
