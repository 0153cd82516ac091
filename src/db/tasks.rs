//! Task rows and their compare-and-set state transitions.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};

use super::DbError;
use crate::domain::{AgentId, TaskId, TaskStatus, WorkflowId};
use crate::protocol::workflows::TaskRecord;

/// What a transition changes besides the status. `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct TaskChange {
    /// Set (or clear) the agent holding the task.
    pub agent_id: Option<Option<AgentId>>,
    /// A new dispatch: raise the attempt (fencing token) by one.
    pub new_attempt: bool,
    /// The attempt failed: raise `failures` by one.
    pub add_failure: bool,
    pub output: Option<serde_json::Value>,
    /// Set (or clear) the error message.
    pub error: Option<Option<String>>,
    /// When a `retry_wait` task becomes ready.
    pub retry_at: Option<DateTime<Utc>>,
    /// Fence: apply only if the task is still at this attempt.
    pub expected_attempt: Option<i32>,
}

pub async fn get(db: impl PgExecutor<'_>, id: TaskId) -> Result<TaskRecord, DbError> {
    sqlx::query_as::<_, TaskRecord>("SELECT * FROM tasks WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await?
        .ok_or_else(|| DbError::NotFound {
            what: "task",
            id: id.to_string(),
        })
}

pub async fn list_for_workflow(
    db: impl PgExecutor<'_>,
    workflow: WorkflowId,
) -> Result<Vec<TaskRecord>, DbError> {
    Ok(sqlx::query_as::<_, TaskRecord>(
        "SELECT * FROM tasks WHERE workflow_id = $1 ORDER BY created_at, key",
    )
    .bind(workflow)
    .fetch_all(db)
    .await?)
}

/// Moves a task `from → to` if, and only if, it is still in `from` (and at the expected
/// attempt, when fenced). Illegal transitions are refused before touching the database; a
/// lost race is a [`DbError::Conflict`] naming the status found.
pub async fn transition(
    db: &mut PgConnection,
    id: TaskId,
    from: TaskStatus,
    to: TaskStatus,
    change: TaskChange,
) -> Result<TaskRecord, DbError> {
    from.transition(to)?;
    let updated = sqlx::query_as::<_, TaskRecord>(
        "UPDATE tasks SET
            status = $3,
            attempt = attempt + CASE WHEN $4 THEN 1 ELSE 0 END,
            failures = failures + CASE WHEN $5 THEN 1 ELSE 0 END,
            agent_id = CASE WHEN $6 THEN $7 ELSE agent_id END,
            output = COALESCE($8, output),
            error = CASE WHEN $9 THEN $10 ELSE error END,
            retry_at = $11,
            ready_at = CASE WHEN $3 = 'ready' THEN now() ELSE ready_at END,
            started_at = CASE WHEN $3 = 'running' THEN now() ELSE started_at END,
            finished_at = CASE WHEN $3 IN ('completed', 'failed', 'cancelled') THEN now() ELSE NULL END,
            updated_at = now()
         WHERE id = $1 AND status = $2 AND ($12::integer IS NULL OR attempt = $12)
         RETURNING *",
    )
    .bind(id)
    .bind(from)
    .bind(to)
    .bind(change.new_attempt)
    .bind(change.add_failure)
    .bind(change.agent_id.is_some())
    .bind(change.agent_id.flatten())
    .bind(change.output)
    .bind(change.error.is_some())
    .bind(change.error.flatten())
    .bind(change.retry_at)
    .bind(change.expected_attempt)
    .fetch_optional(&mut *db)
    .await?;
    match updated {
        Some(task) => Ok(task),
        None => {
            let current = get(&mut *db, id).await?;
            let expected = match change.expected_attempt {
                Some(a) => format!("{from} at attempt {a}"),
                None => from.to_string(),
            };
            Err(DbError::Conflict {
                what: "task",
                id: id.to_string(),
                expected,
                actual: format!("{} at attempt {}", current.status, current.attempt),
            })
        }
    }
}

/// Records the failure of `task`'s current attempt: it goes to `retry_wait` with a jittered
/// backoff, or to `failed` once `max_attempts` failures are reached. The write is fenced by the
/// status and attempt the caller read, so the record's `failures` count is current whenever the
/// write succeeds.
pub async fn record_failure(
    db: &mut PgConnection,
    task: &TaskRecord,
    error: &str,
    policy: &crate::domain::RetryPolicy,
) -> Result<TaskRecord, DbError> {
    let failures = (task.failures + 1).max(1) as u32;
    let decision =
        policy.after_failure(failures, task.max_attempts.max(1) as u32, &mut rand::rng());
    let (to, retry_at) = match decision {
        crate::domain::AfterFailure::RetryAfter(delay) => (
            TaskStatus::RetryWait,
            Some(Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default()),
        ),
        crate::domain::AfterFailure::GiveUp => (TaskStatus::Failed, None),
    };
    transition(
        db,
        task.id,
        task.status,
        to,
        TaskChange {
            add_failure: true,
            error: Some(Some(error.to_string())),
            retry_at,
            agent_id: Some(None),
            expected_attempt: Some(task.attempt),
            ..TaskChange::default()
        },
    )
    .await
}
