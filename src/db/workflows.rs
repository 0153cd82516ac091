//! Workflow rows; a workflow and all its tasks are inserted in one transaction.

use sqlx::{PgConnection, PgExecutor};

use super::DbError;
use crate::domain::coordination::NodeKind;
use crate::domain::dag::TaskSpec;
use crate::domain::{Priority, TaskId, TaskStatus, WorkflowId};
use crate::protocol::workflows::{TaskRecord, WorkflowRecord};

/// The columns of a [`WorkflowRecord`]: all but the submission (`spec`), which can be
/// megabytes and is never sent (every task is in a reply anyway).
pub(crate) const WORKFLOW_COLUMNS: &str =
    "id, name, status, failure_policy, error, created_at, updated_at, finished_at";

/// A task to insert with its workflow.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub id: TaskId,
    pub key: String,
    pub executor: String,
    pub capabilities: Vec<String>,
    pub input: serde_json::Value,
    pub depends_on: Vec<String>,
    pub resources: serde_json::Value,
    pub priority: Priority,
    pub status: TaskStatus,
    pub max_attempts: i32,
    pub timeout_seconds: Option<i32>,
    pub kind: NodeKind,
    pub join_quorum: Option<i32>,
    /// The coordination node's spec, for kinds other than `task`.
    pub coordination: Option<serde_json::Value>,
}

impl NewTask {
    /// The row for a validated task spec; it starts ready when it has no dependencies.
    pub fn from_spec(id: TaskId, t: &TaskSpec) -> Self {
        let kind = t.kind();
        let coordination = match kind {
            NodeKind::Task => None,
            NodeKind::Sync => serde_json::to_value(&t.sync).ok(),
            NodeKind::Merge => serde_json::to_value(&t.merge).ok(),
            NodeKind::Split => serde_json::to_value(&t.split).ok(),
            NodeKind::Loop => serde_json::to_value(&t.repeat).ok(),
        };
        Self {
            id,
            key: t.key.clone(),
            executor: if kind == NodeKind::Task {
                t.executor.clone()
            } else {
                format!("omoi.{}", kind.as_str())
            },
            capabilities: t.capabilities.clone(),
            input: t.input.clone(),
            depends_on: t.depends_on.clone(),
            resources: serde_json::to_value(&t.resources).unwrap_or_default(),
            priority: t.priority,
            status: if t.depends_on.is_empty() {
                TaskStatus::Ready
            } else {
                TaskStatus::Pending
            },
            max_attempts: t.max_attempts,
            timeout_seconds: t.timeout_seconds,
            kind,
            join_quorum: t.join.and_then(|j| j.quorum()).map(|k| k as i32),
            coordination,
        }
    }
}

/// Inserts a workflow and its tasks (in the caller's transaction: all of it is stored, or
/// none). The spec is serialized straight into the statement's buffer (a 100,000-task spec as
/// a `serde_json::Value` tree would take more memory than the tasks themselves).
pub async fn create<S: serde::Serialize + Sync>(
    db: &mut PgConnection,
    id: WorkflowId,
    name: &str,
    failure_policy: &str,
    spec: &S,
    tasks: &[NewTask],
) -> Result<WorkflowRecord, DbError> {
    let workflow = sqlx::query_as::<_, WorkflowRecord>(sqlx::AssertSqlSafe(format!(
        "INSERT INTO workflows (id, name, failure_policy, spec) VALUES ($1, $2, $3, $4)
         RETURNING {WORKFLOW_COLUMNS}"
    )))
    .bind(id)
    .bind(name)
    .bind(failure_policy)
    .bind(sqlx::types::Json(spec))
    .fetch_one(&mut *db)
    .await?;
    insert_tasks(&mut *db, id, tasks).await?;
    Ok(workflow)
}

/// Inserts tasks of a workflow in one statement: a wide DAG costs one round trip, not one per task.
pub async fn insert_tasks(
    db: impl PgExecutor<'_>,
    id: WorkflowId,
    tasks: &[NewTask],
) -> Result<(), DbError> {
    let ids: Vec<TaskId> = tasks.iter().map(|t| t.id).collect();
    let keys: Vec<&str> = tasks.iter().map(|t| t.key.as_str()).collect();
    let executors: Vec<&str> = tasks.iter().map(|t| t.executor.as_str()).collect();
    let caps: Vec<serde_json::Value> = tasks
        .iter()
        .map(|t| serde_json::json!(t.capabilities))
        .collect();
    let inputs: Vec<&serde_json::Value> = tasks.iter().map(|t| &t.input).collect();
    let deps: Vec<serde_json::Value> = tasks
        .iter()
        .map(|t| serde_json::json!(t.depends_on))
        .collect();
    let resources: Vec<&serde_json::Value> = tasks.iter().map(|t| &t.resources).collect();
    let priorities: Vec<&str> = tasks.iter().map(|t| t.priority.as_str()).collect();
    let statuses: Vec<&str> = tasks.iter().map(|t| t.status.as_str()).collect();
    let max_attempts: Vec<i32> = tasks.iter().map(|t| t.max_attempts).collect();
    let timeouts: Vec<Option<i32>> = tasks.iter().map(|t| t.timeout_seconds).collect();
    let kinds: Vec<&str> = tasks.iter().map(|t| t.kind.as_str()).collect();
    let quorums: Vec<Option<i32>> = tasks.iter().map(|t| t.join_quorum).collect();
    let nodes: Vec<Option<&serde_json::Value>> =
        tasks.iter().map(|t| t.coordination.as_ref()).collect();
    sqlx::query(
        "INSERT INTO tasks (id, workflow_id, key, executor, capabilities, input, depends_on,
                            resources, priority, status, max_attempts, timeout_seconds, ready_at,
                            kind, join_quorum, coordination)
         SELECT t.id, $1, t.key, t.executor,
                ARRAY(SELECT jsonb_array_elements_text(t.caps)), t.input,
                ARRAY(SELECT jsonb_array_elements_text(t.deps)), t.resources, t.priority,
                t.status, t.max_attempts, t.timeout_seconds,
                CASE WHEN t.status = 'ready' THEN now() END,
                t.kind, t.join_quorum, t.node
         FROM UNNEST($2::uuid[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[], $7::jsonb[],
                     $8::jsonb[], $9::text[], $10::text[], $11::int[], $12::int[], $13::text[],
                     $14::int[], $15::jsonb[])
              AS t(id, key, executor, caps, input, deps, resources, priority, status,
                   max_attempts, timeout_seconds, kind, join_quorum, node)",
    )
    .bind(id)
    .bind(&ids)
    .bind(&keys)
    .bind(&executors)
    .bind(&caps)
    .bind(&inputs)
    .bind(&deps)
    .bind(&resources)
    .bind(&priorities)
    .bind(&statuses)
    .bind(&max_attempts)
    .bind(&timeouts)
    .bind(&kinds)
    .bind(&quorums)
    .bind(&nodes)
    .execute(db)
    .await?;
    Ok(())
}

pub async fn get(db: impl PgExecutor<'_>, id: WorkflowId) -> Result<WorkflowRecord, DbError> {
    sqlx::query_as::<_, WorkflowRecord>(sqlx::AssertSqlSafe(format!(
        "SELECT {WORKFLOW_COLUMNS} FROM workflows WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(db)
    .await?
    .ok_or_else(|| DbError::NotFound {
        what: "workflow",
        id: id.to_string(),
    })
}

/// A workflow's failure policy (`fail_fast` or `continue`).
pub async fn failure_policy(db: impl PgExecutor<'_>, id: WorkflowId) -> Result<String, DbError> {
    Ok(get(db, id).await?.failure_policy)
}

/// The newest workflows, up to `limit`.
pub async fn list(db: impl PgExecutor<'_>, limit: i64) -> Result<Vec<WorkflowRecord>, DbError> {
    Ok(
        sqlx::query_as::<_, WorkflowRecord>(sqlx::AssertSqlSafe(format!(
            "SELECT {WORKFLOW_COLUMNS} FROM workflows ORDER BY created_at DESC LIMIT $1"
        )))
        .bind(limit)
        .fetch_all(db)
        .await?,
    )
}

/// A workflow's task counts by status.
pub async fn task_counts(
    db: impl PgExecutor<'_>,
    id: WorkflowId,
) -> Result<Vec<(TaskStatus, i64)>, DbError> {
    Ok(
        sqlx::query_as("SELECT status, count(*) FROM tasks WHERE workflow_id = $1 GROUP BY status")
            .bind(id)
            .fetch_all(db)
            .await?,
    )
}

/// Each unfinished task of a workflow that needs capabilities no live agent has or (for a task
/// that runs on a worker) an executor no live agent offers, by key, with what is missing. The
/// agents are searched once per distinct need, not per task (a workflow's tasks mostly share a
/// few), and the tasks are read again for their keys only where a need is unmet: the view of a
/// large workflow that the fleet can serve reads its unfinished tasks once, for their needs.
pub async fn unmet_needs(
    db: impl PgExecutor<'_>,
    id: WorkflowId,
) -> Result<Vec<(String, Vec<String>, Option<String>)>, DbError> {
    Ok(sqlx::query_as(
        "WITH needs AS (
             SELECT DISTINCT capabilities, executor, kind = 'task' AS on_worker FROM tasks
             WHERE workflow_id = $1 AND finished_at IS NULL
         ), unmet AS (
             SELECT * FROM (
                 SELECT n.capabilities, n.executor, n.on_worker,
                     ARRAY(SELECT c FROM unnest(n.capabilities) AS c
                           WHERE NOT EXISTS (SELECT 1 FROM agents a
                                             WHERE a.status <> 'terminated'
                                               AND c = ANY(a.capabilities))) AS missing,
                     CASE WHEN n.on_worker AND NOT EXISTS (
                              SELECT 1 FROM agents a WHERE a.status <> 'terminated'
                                AND (n.executor = ANY(a.executors) OR '*' = ANY(a.executors)))
                          THEN n.executor END AS missing_executor
                 FROM needs n
             ) m
             WHERE cardinality(m.missing) > 0 OR m.missing_executor IS NOT NULL
         )
         SELECT o.key, u.missing, u.missing_executor
         FROM unmet u
         JOIN LATERAL (
             SELECT key FROM tasks o
             WHERE o.workflow_id = $1 AND o.finished_at IS NULL
               AND o.capabilities = u.capabilities AND o.executor = u.executor
               AND (o.kind = 'task') = u.on_worker
         ) o ON true
         ORDER BY o.key",
    )
    .bind(id)
    .fetch_all(db)
    .await?)
}

/// An operator's retry of a failed task (in the caller's transaction): it becomes ready with
/// its failures reset, the dependants that failed because of it wait for it again (pending has
/// no event), and its workflow runs again. `None` if the task is no longer failed.
pub async fn retry_failed_task(
    db: &mut PgConnection,
    task: &TaskRecord,
) -> Result<Option<TaskRecord>, DbError> {
    let Some(retried) = sqlx::query_as::<_, TaskRecord>(
        "UPDATE tasks SET status = 'ready', failures = 0, error = NULL, retry_at = NULL,
             finished_at = NULL, ready_at = now(), updated_at = now()
         WHERE id = $1 AND status = 'failed' RETURNING *",
    )
    .bind(task.id)
    .fetch_optional(&mut *db)
    .await?
    else {
        return Ok(None);
    };
    sqlx::query(
        "UPDATE tasks SET status = 'pending', error = NULL, finished_at = NULL, updated_at = now()
         WHERE workflow_id = $1 AND status = 'failed' AND error LIKE 'dependency % failed'",
    )
    .bind(task.workflow_id)
    .execute(&mut *db)
    .await?;
    sqlx::query(
        "UPDATE workflows SET status = 'running', finished_at = NULL, updated_at = now() WHERE id = $1",
    )
    .bind(task.workflow_id)
    .execute(&mut *db)
    .await?;
    Ok(Some(retried))
}
