//! Threads, messages and handoffs, and the task moves a handoff makes. A handoff's decision is
//! a compare-and-set from `requested`; a task moves only from the state the statement names.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::DbError;
use crate::domain::{AgentId, TaskId, WorkflowId};
use crate::protocol::collaboration::{Handoff, Message, Thread};
use crate::protocol::registry::AgentRecord;
use crate::protocol::workflows::TaskRecord;

/// A thread to store.
pub struct NewThread<'a> {
    pub thread_type: &'a str,
    /// Sorted, without duplicates.
    pub participants: &'a [AgentId],
    pub task_id: Option<TaskId>,
    pub workflow_id: Option<WorkflowId>,
    pub title: Option<&'a str>,
    pub metadata: &'a serde_json::Value,
}

pub async fn insert_thread(
    db: impl PgExecutor<'_>,
    new: &NewThread<'_>,
) -> Result<Thread, DbError> {
    Ok(sqlx::query_as::<_, Thread>(
        "INSERT INTO threads (id, thread_type, participants, task_id, workflow_id, title, metadata)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *",
    )
    .bind(Uuid::now_v7())
    .bind(new.thread_type)
    .bind(new.participants)
    .bind(new.task_id)
    .bind(new.workflow_id)
    .bind(new.title)
    .bind(new.metadata)
    .fetch_one(db)
    .await?)
}

pub async fn get_thread(db: impl PgExecutor<'_>, id: Uuid) -> Result<Thread, DbError> {
    sqlx::query_as::<_, Thread>("SELECT * FROM threads WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await?
        .ok_or_else(|| DbError::NotFound {
            what: "thread",
            id: id.to_string(),
        })
}

/// Threads by participant, task and status (any combination), newest first; `limit` is
/// clamped to 1..=1,000.
pub async fn list_threads(
    db: impl PgExecutor<'_>,
    agent: Option<AgentId>,
    task: Option<TaskId>,
    status: Option<&str>,
    limit: i64,
) -> Result<Vec<Thread>, DbError> {
    Ok(sqlx::query_as::<_, Thread>(
        "SELECT * FROM threads
         WHERE ($1::uuid IS NULL OR $1 = ANY(participants))
           AND ($2::uuid IS NULL OR task_id = $2)
           AND ($3::text IS NULL OR status = $3)
         ORDER BY created_at DESC LIMIT $4",
    )
    .bind(agent)
    .bind(task)
    .bind(status)
    .bind(limit.clamp(1, 1_000))
    .fetch_all(db)
    .await?)
}

/// `active → status`; `None` if the thread is not active (or does not exist).
pub async fn close_thread(
    db: impl PgExecutor<'_>,
    id: Uuid,
    status: &str,
) -> Result<Option<Thread>, DbError> {
    Ok(sqlx::query_as::<_, Thread>(
        "UPDATE threads SET status = $2, closed_at = now(), updated_at = now()
         WHERE id = $1 AND status = 'active' RETURNING *",
    )
    .bind(id)
    .bind(status)
    .fetch_optional(db)
    .await?)
}

/// A message to store.
pub struct NewMessage<'a> {
    pub thread_id: Uuid,
    pub sender_id: AgentId,
    pub recipient_id: Option<AgentId>,
    pub message_type: &'a str,
    pub content: &'a str,
    pub metadata: &'a serde_json::Value,
}

pub async fn insert_message(
    db: impl PgExecutor<'_>,
    new: &NewMessage<'_>,
) -> Result<Message, DbError> {
    Ok(sqlx::query_as::<_, Message>(
        "INSERT INTO messages (id, thread_id, sender_id, recipient_id, message_type, content, metadata)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *",
    )
    .bind(Uuid::now_v7())
    .bind(new.thread_id)
    .bind(new.sender_id)
    .bind(new.recipient_id)
    .bind(new.message_type)
    .bind(new.content)
    .bind(new.metadata)
    .fetch_one(db)
    .await?)
}

pub async fn get_message(db: impl PgExecutor<'_>, id: Uuid) -> Result<Message, DbError> {
    sqlx::query_as::<_, Message>("SELECT * FROM messages WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await?
        .ok_or_else(|| DbError::NotFound {
            what: "message",
            id: id.to_string(),
        })
}

/// Messages of a thread, newest first, before the cursor `before`; `unread_for` keeps only
/// what that agent has not read, did not send, and may read (to everyone or to it).
pub async fn list_messages(
    db: impl PgExecutor<'_>,
    thread: Uuid,
    before: Option<Uuid>,
    unread_for: Option<AgentId>,
    limit: i64,
) -> Result<Vec<Message>, DbError> {
    Ok(sqlx::query_as::<_, Message>(
        "SELECT * FROM messages
         WHERE thread_id = $1 AND ($2::uuid IS NULL OR id < $2)
           AND ($3::uuid IS NULL OR (sender_id <> $3 AND NOT ($3 = ANY(read_by))
                                     AND (recipient_id IS NULL OR recipient_id = $3)))
         ORDER BY id DESC LIMIT $4",
    )
    .bind(thread)
    .bind(before)
    .bind(unread_for)
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// Adds `agent` to the message's readers (once).
pub async fn mark_read(
    db: impl PgExecutor<'_>,
    message: Uuid,
    agent: AgentId,
) -> Result<Message, DbError> {
    sqlx::query_as::<_, Message>(
        "UPDATE messages SET read_by = CASE WHEN $2 = ANY(read_by) THEN read_by
                                           ELSE array_append(read_by, $2) END
         WHERE id = $1 RETURNING *",
    )
    .bind(message)
    .bind(agent)
    .fetch_optional(db)
    .await?
    .ok_or_else(|| DbError::NotFound {
        what: "message",
        id: message.to_string(),
    })
}

pub async fn get_handoff(db: impl PgExecutor<'_>, id: Uuid) -> Result<Handoff, DbError> {
    sqlx::query_as::<_, Handoff>("SELECT * FROM handoffs WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await?
        .ok_or_else(|| DbError::NotFound {
            what: "handoff",
            id: id.to_string(),
        })
}

/// A handoff to store (`requested`).
pub struct NewHandoff<'a> {
    pub task_id: TaskId,
    pub thread_id: Option<Uuid>,
    pub from_agent_id: AgentId,
    pub to_agent_id: Option<AgentId>,
    pub capabilities: &'a [String],
    pub reason: &'a str,
    pub context: &'a serde_json::Value,
    pub on_decline: &'a str,
    pub expires_at: DateTime<Utc>,
    /// The attempt of the task the requester released to wait for the decision.
    pub parked_attempt: Option<i32>,
}

pub async fn insert_handoff(
    db: impl PgExecutor<'_>,
    new: &NewHandoff<'_>,
) -> Result<Handoff, DbError> {
    Ok(sqlx::query_as::<_, Handoff>(
        "INSERT INTO handoffs (id, task_id, thread_id, from_agent_id, to_agent_id, capabilities,
                               reason, context, on_decline, expires_at, parked_attempt)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING *",
    )
    .bind(Uuid::now_v7())
    .bind(new.task_id)
    .bind(new.thread_id)
    .bind(new.from_agent_id)
    .bind(new.to_agent_id)
    .bind(new.capabilities)
    .bind(new.reason)
    .bind(new.context)
    .bind(new.on_decline)
    .bind(new.expires_at)
    .bind(new.parked_attempt)
    .fetch_one(db)
    .await?)
}

/// The task `from` holds (at `attempt`, if given) parks in `retry_wait` until `until` while its
/// handoff waits for a decision (expiry makes it ready again on its own). `None` if `from` does
/// not hold it.
pub async fn park_for_handoff(
    db: impl PgExecutor<'_>,
    task: TaskId,
    from: AgentId,
    attempt: Option<i32>,
    until: DateTime<Utc>,
) -> Result<Option<TaskRecord>, DbError> {
    Ok(sqlx::query_as::<_, TaskRecord>(
        "UPDATE tasks SET status = 'retry_wait', retry_at = $4, agent_id = NULL,
             error = 'waiting for a handoff', updated_at = now()
         WHERE id = $1 AND agent_id = $2 AND status IN ('assigned', 'running')
           AND ($3::integer IS NULL OR attempt = $3)
         RETURNING *",
    )
    .bind(task)
    .bind(from)
    .bind(attempt)
    .bind(until)
    .fetch_optional(db)
    .await?)
}

/// Live agents other than `except` having every one of `capabilities`, least loaded first.
pub async fn handoff_candidates(
    db: impl PgExecutor<'_>,
    capabilities: &[String],
    except: AgentId,
) -> Result<Vec<AgentRecord>, DbError> {
    Ok(sqlx::query_as::<_, AgentRecord>(
        "SELECT * FROM agents WHERE capabilities @> $1 AND id <> $2
           AND status IN ('idle', 'running', 'degraded') ORDER BY current_load, name",
    )
    .bind(capabilities)
    .bind(except)
    .fetch_all(db)
    .await?)
}

/// `requested → status`, recording who decided and why; `None` if it was decided already.
pub async fn decide_handoff(
    db: impl PgExecutor<'_>,
    id: Uuid,
    status: &str,
    by: Option<AgentId>,
    reason: Option<&str>,
) -> Result<Option<Handoff>, DbError> {
    Ok(sqlx::query_as::<_, Handoff>(
        "UPDATE handoffs SET status = $2, decided_by = $3, decision_reason = $4, decided_at = now()
         WHERE id = $1 AND status = 'requested' RETURNING *",
    )
    .bind(id)
    .bind(status)
    .bind(by)
    .bind(reason)
    .fetch_optional(db)
    .await?)
}

/// An accepted handoff's task goes to `agent`: ready again (if held or parked), pinned to the
/// acceptor, with `handoff_input` merged into an object input. `None` if it already finished.
pub async fn move_to_acceptor(
    db: impl PgExecutor<'_>,
    task: TaskId,
    agent: AgentId,
    handoff_input: &serde_json::Value,
) -> Result<Option<TaskRecord>, DbError> {
    Ok(sqlx::query_as::<_, TaskRecord>(
        "UPDATE tasks SET
             status = CASE WHEN status IN ('assigned', 'running', 'retry_wait') THEN 'ready' ELSE status END,
             agent_id = CASE WHEN status IN ('assigned', 'running') THEN NULL ELSE agent_id END,
             ready_at = CASE WHEN status IN ('assigned', 'running', 'retry_wait') THEN now() ELSE ready_at END,
             retry_at = NULL, pinned_agent_id = $2,
             input = CASE WHEN jsonb_typeof(input) = 'object' THEN input || $3 ELSE input END,
             updated_at = now()
         WHERE id = $1 AND status NOT IN ('completed', 'failed', 'cancelled') RETURNING *",
    )
    .bind(task)
    .bind(agent)
    .bind(handoff_input)
    .fetch_optional(db)
    .await?)
}

/// Requested handoffs past their time.
pub async fn due_handoffs(db: impl PgExecutor<'_>) -> Result<Vec<Uuid>, DbError> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM handoffs WHERE status = 'requested' AND expires_at < now()",
    )
    .fetch_all(db)
    .await?)
}

/// A declined or expired handoff's task goes back to ready for the next best fit, if its
/// requester still holds it, or it still waits, at the attempt it was released at, for this
/// decision.
pub async fn reschedule_handed_off(
    db: impl PgExecutor<'_>,
    handoff: Uuid,
) -> Result<Option<TaskRecord>, DbError> {
    Ok(sqlx::query_as::<_, TaskRecord>(
        "UPDATE tasks t SET status = 'ready', agent_id = NULL, retry_at = NULL, ready_at = now(),
             updated_at = now()
         FROM handoffs h
         WHERE h.id = $1 AND t.id = h.task_id
           AND ((t.status IN ('assigned', 'running') AND t.agent_id = h.from_agent_id)
                OR (t.status = 'retry_wait' AND t.attempt = h.parked_attempt))
         RETURNING t.*",
    )
    .bind(handoff)
    .fetch_optional(db)
    .await?)
}
