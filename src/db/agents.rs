//! Agent rows: registration, partial updates, batched heartbeats and the liveness sweep.
//! Time comes from the database clock (`now()`) on both the heartbeat and the sweep side, so
//! process clocks never disagree about who is stale.

use sqlx::{PgExecutor, PgPool};

use super::DbError;
use crate::domain::{AgentId, AgentStatus};
use crate::protocol::registry::AgentRecord;

/// An agent whose status changed, with the status it had before.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusChange {
    pub agent: AgentRecord,
    pub from: AgentStatus,
}

#[derive(sqlx::FromRow)]
struct ChangedRow {
    #[sqlx(flatten)]
    agent: AgentRecord,
    prev_status: AgentStatus,
}

impl From<ChangedRow> for StatusChange {
    fn from(r: ChangedRow) -> Self {
        Self {
            agent: r.agent,
            from: r.prev_status,
        }
    }
}

/// A new registration (already validated and normalised).
#[derive(Debug, Clone)]
pub struct NewAgent {
    pub id: AgentId,
    pub name: String,
    pub agent_type: String,
    pub phase_id: Option<String>,
    pub capabilities: Vec<String>,
    pub capacity: i32,
    pub tags: Vec<String>,
    pub metadata: serde_json::Value,
    pub executors: Vec<String>,
    /// The registering process, as it names itself.
    pub instance: Option<String>,
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23505"))
}

/// Inserts a new agent, healthy and idle, its registration counting as a first heartbeat.
pub async fn insert(db: impl PgExecutor<'_>, new: &NewAgent) -> Result<AgentRecord, DbError> {
    sqlx::query_as::<_, AgentRecord>(
        "INSERT INTO agents (id, name, agent_type, phase_id, capabilities, capacity, tags,
                             metadata, executors, instance, status, health_status, last_heartbeat)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'idle', 'healthy', now())
         RETURNING *",
    )
    .bind(new.id)
    .bind(&new.name)
    .bind(&new.agent_type)
    .bind(&new.phase_id)
    .bind(&new.capabilities)
    .bind(new.capacity)
    .bind(&new.tags)
    .bind(&new.metadata)
    .bind(&new.executors)
    .bind(&new.instance)
    .fetch_one(db)
    .await
    .map_err(|e| {
        if is_unique_violation(&e) {
            DbError::Duplicate(format!(
                "an agent named `{}` is already registered",
                new.name
            ))
        } else {
            e.into()
        }
    })
}

pub async fn get(db: impl PgExecutor<'_>, id: AgentId) -> Result<AgentRecord, DbError> {
    sqlx::query_as::<_, AgentRecord>("SELECT * FROM agents WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await?
        .ok_or_else(|| DbError::NotFound {
            what: "agent",
            id: id.to_string(),
        })
}

/// The live (not deregistered) agent with this name.
pub async fn get_live_by_name(
    db: impl PgExecutor<'_>,
    name: &str,
) -> Result<Option<AgentRecord>, DbError> {
    Ok(sqlx::query_as::<_, AgentRecord>(
        "SELECT * FROM agents WHERE name = $1 AND status <> 'terminated'",
    )
    .bind(name)
    .fetch_optional(db)
    .await?)
}

/// Every agent not deregistered, by name.
pub async fn list_live(db: impl PgExecutor<'_>) -> Result<Vec<AgentRecord>, DbError> {
    Ok(sqlx::query_as::<_, AgentRecord>(
        "SELECT * FROM agents WHERE status <> 'terminated' ORDER BY name",
    )
    .fetch_all(db)
    .await?)
}

/// The agents the scheduler may give work to: live, dispatchable and healthy.
pub async fn dispatchable(db: impl PgExecutor<'_>) -> Result<Vec<AgentRecord>, DbError> {
    Ok(sqlx::query_as::<_, AgentRecord>(
        "SELECT * FROM agents WHERE status IN ('idle', 'running', 'degraded')
           AND health_status = 'healthy'",
    )
    .fetch_all(db)
    .await?)
}

/// Records a batch of heartbeats in one statement. Returns the agents that were found (with
/// their status before): an id missing from the result is unknown or deregistered. A stale or
/// offline agent comes back to idle/running; maintenance, degraded and quarantined keep their
/// status.
pub async fn record_heartbeats(
    pool: &PgPool,
    beats: &[(AgentId, i32)],
) -> Result<Vec<StatusChange>, DbError> {
    let ids: Vec<AgentId> = beats.iter().map(|b| b.0).collect();
    let loads: Vec<i32> = beats.iter().map(|b| b.1.max(0)).collect();
    let rows = sqlx::query_as::<_, ChangedRow>(
        "WITH hb AS (
             SELECT DISTINCT ON (id) id, load FROM UNNEST($1::uuid[], $2::int[]) AS h(id, load)
         ), prev AS (
             SELECT a.id, a.status FROM agents a JOIN hb USING (id)
             WHERE a.status <> 'terminated' FOR UPDATE OF a
         )
         UPDATE agents a SET
             last_heartbeat = now(),
             current_load = hb.load,
             health_status = 'healthy',
             status = CASE
                 WHEN prev.status IN ('idle', 'running', 'stale', 'offline')
                     THEN CASE WHEN hb.load > 0 THEN 'running' ELSE 'idle' END
                 ELSE prev.status END,
             updated_at = now()
         FROM hb, prev
         WHERE a.id = hb.id AND a.id = prev.id
         RETURNING a.*, prev.status AS prev_status",
    )
    .bind(&ids)
    .bind(&loads)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// Which of `ids` belong to deregistered (terminated) agents.
pub async fn terminated_among(pool: &PgPool, ids: &[AgentId]) -> Result<Vec<AgentId>, DbError> {
    Ok(
        sqlx::query_scalar("SELECT id FROM agents WHERE id = ANY($1) AND status = 'terminated'")
            .bind(ids)
            .fetch_all(pool)
            .await?,
    )
}

/// Marks agents that missed heartbeats: silent longer than `stale_after_ms` → stale, longer
/// than `offline_after_ms` → offline (only if `judge_offline`). Returns only agents whose status
/// changed.
pub async fn sweep_silent(
    pool: &PgPool,
    stale_after_ms: i64,
    offline_after_ms: i64,
    judge_offline: bool,
) -> Result<Vec<StatusChange>, DbError> {
    let rows = sqlx::query_as::<_, ChangedRow>(
        "WITH silent AS (
             SELECT id, status,
                    $3 AND last_heartbeat < now() - make_interval(secs => $2::float8 / 1000)
                        AS gone
             FROM agents
             WHERE status IN ('idle', 'running', 'degraded', 'maintenance', 'stale')
               AND last_heartbeat < now() - make_interval(secs => $1::float8 / 1000)
             FOR UPDATE
         )
         UPDATE agents a SET
             status = CASE WHEN silent.gone THEN 'offline' ELSE 'stale' END,
             health_status = CASE WHEN silent.gone THEN 'unresponsive' ELSE 'stale' END,
             updated_at = now()
         FROM silent
         WHERE a.id = silent.id AND (silent.gone OR silent.status <> 'stale')
         RETURNING a.*, silent.status AS prev_status",
    )
    .bind(stale_after_ms)
    .bind(offline_after_ms)
    .bind(judge_offline)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// The live agent named `name`, its row locked for the rest of the transaction.
pub async fn lock_live_by_name(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    name: &str,
) -> Result<Option<AgentRecord>, DbError> {
    Ok(sqlx::query_as::<_, AgentRecord>(
        "SELECT * FROM agents WHERE name = $1 AND status <> 'terminated' FOR UPDATE",
    )
    .bind(name)
    .fetch_optional(&mut **tx)
    .await?)
}

/// Agent `id` in any status (a deregistered one too), its row locked.
pub async fn lock_any(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    id: AgentId,
) -> Result<Option<AgentRecord>, DbError> {
    Ok(
        sqlx::query_as::<_, AgentRecord>("SELECT * FROM agents WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?,
    )
}

/// The live agent `id`, its row locked.
pub async fn lock_live(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    id: AgentId,
) -> Result<Option<AgentRecord>, DbError> {
    Ok(sqlx::query_as::<_, AgentRecord>(
        "SELECT * FROM agents WHERE id = $1 AND status <> 'terminated' FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut **tx)
    .await?)
}

/// Registers agent `new.id` again over its existing row (stale, offline or deregistered):
/// the new fields, idle, healthy, its registration a first heartbeat.
pub async fn reregister(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    new: &NewAgent,
) -> Result<AgentRecord, DbError> {
    Ok(sqlx::query_as::<_, AgentRecord>(
        "UPDATE agents SET name = $2, agent_type = $3, phase_id = $4, capabilities = $5,
             capacity = $6, tags = $7, metadata = $8, executors = $9, instance = $10,
             status = 'idle', health_status = 'healthy', current_load = 0,
             last_heartbeat = now(), updated_at = now()
         WHERE id = $1 RETURNING *",
    )
    .bind(new.id)
    .bind(&new.name)
    .bind(&new.agent_type)
    .bind(&new.phase_id)
    .bind(&new.capabilities)
    .bind(new.capacity)
    .bind(&new.tags)
    .bind(&new.metadata)
    .bind(&new.executors)
    .bind(&new.instance)
    .fetch_one(&mut **tx)
    .await?)
}

/// The process that registered agent `id`, as it named itself (`None`: none named).
pub async fn instance_of(db: impl PgExecutor<'_>, id: AgentId) -> Result<Option<String>, DbError> {
    Ok(
        sqlx::query_scalar::<_, Option<String>>("SELECT instance FROM agents WHERE id = $1")
            .bind(id)
            .fetch_optional(db)
            .await?
            .flatten(),
    )
}

/// The fields a partial update may change (`None`: unchanged).
#[derive(Debug, Clone, Default)]
pub struct AgentChanges {
    pub capabilities: Option<Vec<String>>,
    pub capacity: Option<i32>,
    pub status: Option<AgentStatus>,
    pub tags: Option<Vec<String>>,
    pub metadata: Option<serde_json::Value>,
    pub executors: Option<Vec<String>>,
}

/// Applies `changes` to agent `id`.
pub async fn update(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    id: AgentId,
    changes: &AgentChanges,
) -> Result<AgentRecord, DbError> {
    Ok(sqlx::query_as::<_, AgentRecord>(
        "UPDATE agents SET capabilities = COALESCE($2, capabilities),
             capacity = COALESCE($3, capacity), status = COALESCE($4, status),
             tags = COALESCE($5, tags), metadata = COALESCE($6, metadata),
             executors = COALESCE($7, executors), updated_at = now()
         WHERE id = $1 RETURNING *",
    )
    .bind(id)
    .bind(&changes.capabilities)
    .bind(changes.capacity)
    .bind(changes.status)
    .bind(&changes.tags)
    .bind(&changes.metadata)
    .bind(&changes.executors)
    .fetch_one(&mut **tx)
    .await?)
}

/// Dispatchable agents having every one of `capabilities` (served by the GIN index).
pub async fn live_with_capabilities(
    pool: &PgPool,
    capabilities: &[String],
) -> Result<Vec<AgentRecord>, DbError> {
    Ok(sqlx::query_as::<_, AgentRecord>(
        "SELECT * FROM agents WHERE capabilities @> $1
           AND status IN ('idle', 'running', 'degraded')",
    )
    .bind(capabilities)
    .fetch_all(pool)
    .await?)
}

/// A worker stopping its agent: offline now. Returns the change, or `None` if the agent is not
/// registered.
pub async fn leave(pool: &PgPool, id: AgentId) -> Result<Option<StatusChange>, DbError> {
    Ok(sqlx::query_as::<_, ChangedRow>(
        "WITH prev AS (SELECT id, status FROM agents WHERE id = $1 AND status <> 'terminated'
                       FOR UPDATE)
         UPDATE agents a SET status = 'offline', health_status = 'unknown', current_load = 0,
             updated_at = now()
         FROM prev WHERE a.id = prev.id
         RETURNING a.*, prev.status AS prev_status",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?
    .map(Into::into))
}

/// Deregisters: `terminated` (kept for history, its name free). `None` if it was not live.
pub async fn terminate(
    db: impl PgExecutor<'_>,
    id: AgentId,
) -> Result<Option<AgentRecord>, DbError> {
    Ok(sqlx::query_as::<_, AgentRecord>(
        "UPDATE agents SET status = 'terminated', health_status = 'unknown', updated_at = now()
         WHERE id = $1 AND status <> 'terminated' RETURNING *",
    )
    .bind(id)
    .fetch_optional(db)
    .await?)
}
