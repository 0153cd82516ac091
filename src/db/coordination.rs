//! Statements of the coordination nodes (sync, merge, split, loop) that the scheduler runs
//! itself. Each is guarded by the node's status (and expansion count), so a node is run, or
//! expanded, once even if two leaders overlap for a moment.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::DbError;
use super::workflows::{NewTask, insert_tasks};
use crate::domain::coordination::NodeKind;
use crate::domain::{TaskId, TaskStatus, WorkflowId};
use crate::protocol::workflows::TaskRecord;

/// One dependency of a node as it stands.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Source {
    pub key: String,
    pub status: TaskStatus,
    pub output: Option<serde_json::Value>,
    pub finished_at: Option<DateTime<Utc>>,
    pub kind: NodeKind,
    pub expansion: i32,
    /// For an expanded split: its children.
    pub depends_on: Vec<String>,
}

/// The node's dependencies in completion order (unfinished last, by key).
pub async fn sources(db: &mut PgConnection, node: &TaskRecord) -> Result<Vec<Source>, DbError> {
    Ok(sqlx::query_as::<_, Source>(
        "SELECT key, status, output, finished_at, kind, expansion, depends_on FROM tasks
         WHERE workflow_id = $1 AND key = ANY($2)
         ORDER BY finished_at NULLS LAST, key",
    )
    .bind(node.workflow_id)
    .bind(&node.depends_on)
    .fetch_all(&mut *db)
    .await?)
}

/// Outputs of the completed tasks among `keys`.
pub async fn completed_outputs(
    db: &mut PgConnection,
    workflow: WorkflowId,
    keys: &[String],
) -> Result<std::collections::HashMap<String, serde_json::Value>, DbError> {
    let rows: Vec<(String, Option<serde_json::Value>)> = sqlx::query_as(
        "SELECT key, output FROM tasks
         WHERE workflow_id = $1 AND key = ANY($2) AND status = 'completed'",
    )
    .bind(workflow)
    .bind(keys)
    .fetch_all(&mut *db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(k, o)| (k, o.unwrap_or(serde_json::Value::Null)))
        .collect())
}

/// `ready → completed` with the node's result.
pub async fn complete(
    db: &mut PgConnection,
    id: TaskId,
    output: &serde_json::Value,
) -> Result<Option<TaskRecord>, DbError> {
    Ok(sqlx::query_as::<_, TaskRecord>(
        "UPDATE tasks SET status = 'completed', output = $2, attempt = attempt + 1, error = NULL,
             started_at = COALESCE(started_at, now()), finished_at = now(), updated_at = now()
         WHERE id = $1 AND status = 'ready'
         RETURNING *",
    )
    .bind(id)
    .bind(output)
    .fetch_optional(&mut *db)
    .await?)
}

/// `ready|pending → failed`: the node cannot produce a result (bad split items, no majority,
/// a sync point's timeout).
pub async fn fail(
    db: &mut PgConnection,
    id: TaskId,
    error: &str,
) -> Result<Option<TaskRecord>, DbError> {
    Ok(sqlx::query_as::<_, TaskRecord>(
        "UPDATE tasks SET status = 'failed', error = $2, failures = failures + 1,
             finished_at = now(), updated_at = now()
         WHERE id = $1 AND status IN ('ready', 'pending')
         RETURNING *",
    )
    .bind(id)
    .bind(error)
    .fetch_optional(&mut *db)
    .await?)
}

/// `ready → pending` waiting for `quorum` completed dependencies (a vote without a majority yet).
pub async fn wait_for_more(
    db: &mut PgConnection,
    id: TaskId,
    quorum: i32,
) -> Result<Option<TaskRecord>, DbError> {
    Ok(sqlx::query_as::<_, TaskRecord>(
        "UPDATE tasks SET status = 'pending', join_quorum = $2, ready_at = NULL, updated_at = now()
         WHERE id = $1 AND status = 'ready'
         RETURNING *",
    )
    .bind(id)
    .bind(quorum)
    .fetch_optional(&mut *db)
    .await?)
}

/// Inserts what a split or loop expands to and makes the node wait for it (in the caller's
/// transaction): the node's dependencies become `depends_on` (with `join_quorum`), it goes back to pending and
/// its expansion count rises; its first expansion is when it started. `None` if the node was no longer ready at that expansion.
pub async fn expand(
    db: &mut PgConnection,
    node: &TaskRecord,
    inserted: &[NewTask],
    depends_on: &[String],
    join_quorum: Option<i32>,
) -> Result<Option<TaskRecord>, DbError> {
    let rewired = sqlx::query_as::<_, TaskRecord>(
        "UPDATE tasks SET depends_on = $2, join_quorum = $3, status = 'pending', ready_at = NULL,
             expansion = expansion + 1, started_at = COALESCE(started_at, now()), updated_at = now()
         WHERE id = $1 AND status = 'ready' AND expansion = $4
         RETURNING *",
    )
    .bind(node.id)
    .bind(depends_on)
    .bind(join_quorum)
    .bind(node.expansion)
    .fetch_optional(&mut *db)
    .await?;
    let Some(rewired) = rewired else {
        return Ok(None);
    };
    insert_tasks(&mut *db, node.workflow_id, inserted).await?;
    Ok(Some(rewired))
}

/// Pending sync points whose timeout has passed, counted from the first source's start.
/// Planned at each run, like `scheduling::promote_due_retries` (a maintenance statement without
/// parameters would keep the plan made when `tasks` was small).
pub async fn expired_syncs(db: &mut PgConnection) -> Result<Vec<TaskRecord>, DbError> {
    Ok(sqlx::query_as::<_, TaskRecord>(
        "SELECT t.* FROM tasks t
         WHERE t.kind <> 'task' AND t.finished_at IS NULL AND t.kind = 'sync'
           AND t.status = 'pending'
           AND t.coordination->>'timeout_seconds' IS NOT NULL
           AND (SELECT min(d.started_at) FROM tasks d
                WHERE d.workflow_id = t.workflow_id AND d.key = ANY(t.depends_on))
               + make_interval(secs => (t.coordination->>'timeout_seconds')::float8) < now()",
    )
    .persistent(false)
    .fetch_all(&mut *db)
    .await?)
}

/// A timed-out sync point that continues: `pending → ready`, marked as released by its timeout.
pub async fn release_sync(
    db: &mut PgConnection,
    id: TaskId,
) -> Result<Option<TaskRecord>, DbError> {
    Ok(sqlx::query_as::<_, TaskRecord>(
        "UPDATE tasks SET status = 'ready', timed_out = true, ready_at = now(), updated_at = now()
         WHERE id = $1 AND status = 'pending'
         RETURNING *",
    )
    .bind(id)
    .fetch_optional(&mut *db)
    .await?)
}
