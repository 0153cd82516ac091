//! The agent registry: registration, liveness (heartbeats and the sweep), and the mirror of
//! every agent record into the `<ns>_agents` KV bucket. PostgreSQL is the record; every change
//! is then mirrored and announced as an event.

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::ServiceError;
use crate::bus::EventBus;
use crate::db::agents::{self, AgentRecord, NewAgent, StatusChange};
use crate::domain::agent::normalize_capabilities;
use crate::domain::event::{
    AgentCapabilityUpdated, AgentDeregistered, AgentRegistered, AgentStatusChanged,
};
use crate::domain::{AgentId, AgentStatus, Event};

/// Most tasks one agent may hold at once.
pub const MAX_CAPACITY: i32 = 1_000;
/// Longest agent name.
pub const MAX_NAME_LEN: usize = 128;

fn default_agent_type() -> String {
    "worker".into()
}
fn default_capacity() -> i32 {
    1
}

/// `POST /api/v1/agents/register` and `<ns>.registry.register`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub name: String,
    #[serde(default = "default_agent_type")]
    pub agent_type: String,
    #[serde(default)]
    pub phase_id: Option<String>,
    pub capabilities: Vec<String>,
    #[serde(default = "default_capacity")]
    pub capacity: i32,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

/// The registry use-cases.
#[derive(Clone)]
pub struct Registry {
    pool: PgPool,
    bus: EventBus,
    mirror: kv::Store,
}

/// Checks an agent name: 1–128 characters of `A-Z a-z 0-9 . _ : -`.
pub fn validate_name(name: &str) -> Result<(), ServiceError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(ServiceError::validation(
            "name",
            format!("must be 1 to {MAX_NAME_LEN} characters"),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._:-".contains(*c)))
    {
        return Err(ServiceError::validation(
            "name",
            format!("`{name}` contains `{c}`; allowed are A-Z, a-z, 0-9 and . _ : -"),
        ));
    }
    Ok(())
}

pub fn validate_capacity(capacity: i32) -> Result<(), ServiceError> {
    if !(1..=MAX_CAPACITY).contains(&capacity) {
        return Err(ServiceError::validation(
            "capacity",
            format!("must be between 1 and {MAX_CAPACITY}, got {capacity}"),
        ));
    }
    Ok(())
}

pub fn normalize(field: &str, tokens: &[String]) -> Result<Vec<String>, ServiceError> {
    normalize_capabilities(tokens).map_err(|e| ServiceError::validation(field, e.to_string()))
}

/// Sorted difference `a \ b` of two sorted sets.
fn minus(a: &[String], b: &[String]) -> Vec<String> {
    a.iter().filter(|x| !b.contains(x)).cloned().collect()
}

impl Registry {
    pub fn new(pool: PgPool, bus: EventBus, mirror: kv::Store) -> Self {
        Self { pool, bus, mirror }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Registers an agent. A name held by a live agent is a conflict; a name held by a stale or
    /// offline agent is taken over — same id, new capabilities — which is how a restarted
    /// worker gets its agents (and their inboxes) back. Returns the record and whether it is new.
    #[tracing::instrument(skip_all, fields(agent.name = %req.name))]
    pub async fn register(
        &self,
        req: RegisterRequest,
    ) -> Result<(AgentRecord, bool), ServiceError> {
        validate_name(&req.name)?;
        validate_capacity(req.capacity)?;
        let capabilities = normalize("capabilities", &req.capabilities)?;
        let tags = normalize("tags", &req.tags)?;
        if req.agent_type.trim().is_empty() {
            return Err(ServiceError::validation("agent_type", "must not be empty"));
        }
        let metadata = req
            .metadata
            .clone()
            .unwrap_or_else(|| serde_json::json!({}));
        if !metadata.is_object() {
            return Err(ServiceError::validation(
                "metadata",
                "must be a JSON object",
            ));
        }

        let mut tx = self.pool.begin().await.map_err(crate::db::DbError::from)?;
        let existing = sqlx::query_as::<_, AgentRecord>(
            "SELECT * FROM agents WHERE name = $1 AND status <> 'terminated' FOR UPDATE",
        )
        .bind(&req.name)
        .fetch_optional(&mut *tx)
        .await
        .map_err(crate::db::DbError::from)?;

        let (agent, previous) = match existing {
            None => {
                let agent = agents::insert(
                    &mut *tx,
                    &NewAgent {
                        id: AgentId::new(),
                        name: req.name.clone(),
                        agent_type: req.agent_type.clone(),
                        phase_id: req.phase_id.clone(),
                        capabilities: capabilities.clone(),
                        capacity: req.capacity,
                        tags,
                        metadata,
                    },
                )
                .await?;
                (agent, None)
            }
            Some(old) if matches!(old.status, AgentStatus::Stale | AgentStatus::Offline) => {
                let agent = sqlx::query_as::<_, AgentRecord>(
                    "UPDATE agents SET agent_type = $2, phase_id = $3, capabilities = $4,
                         capacity = $5, tags = $6, metadata = $7, status = 'idle',
                         health_status = 'healthy', current_load = 0, last_heartbeat = now(),
                         updated_at = now()
                     WHERE id = $1 RETURNING *",
                )
                .bind(old.id)
                .bind(&req.agent_type)
                .bind(&req.phase_id)
                .bind(&capabilities)
                .bind(req.capacity)
                .bind(&tags)
                .bind(&metadata)
                .fetch_one(&mut *tx)
                .await
                .map_err(crate::db::DbError::from)?;
                (agent, Some(old))
            }
            Some(old) => {
                return Err(ServiceError::Conflict(format!(
                    "an agent named `{}` is already registered and {} (id {})",
                    old.name, old.status, old.id
                )));
            }
        };
        tx.commit().await.map_err(crate::db::DbError::from)?;

        self.mirror(&agent).await?;
        let mut events = Vec::new();
        match &previous {
            None => {
                events.push(Event::AgentRegistered(AgentRegistered {
                    agent_id: agent.id,
                    name: agent.name.clone(),
                    agent_type: agent.agent_type.clone(),
                    capabilities: agent.capabilities.clone(),
                    capacity: agent.capacity,
                }));
                events.push(Event::AgentCapabilityUpdated(AgentCapabilityUpdated {
                    agent_id: agent.id,
                    capabilities: agent.capabilities.clone(),
                    added: agent.capabilities.clone(),
                    removed: vec![],
                }));
            }
            Some(old) => {
                if old.capabilities != agent.capabilities {
                    events.push(Event::AgentCapabilityUpdated(AgentCapabilityUpdated {
                        agent_id: agent.id,
                        capabilities: agent.capabilities.clone(),
                        added: minus(&agent.capabilities, &old.capabilities),
                        removed: minus(&old.capabilities, &agent.capabilities),
                    }));
                }
                events.push(Event::AgentStatusChanged(AgentStatusChanged {
                    agent_id: agent.id,
                    from: old.status,
                    to: agent.status,
                    reason: "re-registered".into(),
                }));
            }
        }
        self.bus.publish_all(events).await?;
        tracing::info!(agent.id = %agent.id, reactivated = previous.is_some(), "agent registered");
        Ok((agent, previous.is_none()))
    }

    pub async fn get(&self, id: AgentId) -> Result<AgentRecord, ServiceError> {
        Ok(agents::get(&self.pool, id).await?)
    }

    pub async fn list(&self) -> Result<Vec<AgentRecord>, ServiceError> {
        Ok(agents::list_live(&self.pool).await?)
    }

    /// Records a batch of heartbeats (one statement). For each input, in order: the agent's
    /// record, or `UnknownAgent` if it is not registered (it must register again).
    pub async fn record_heartbeats(
        &self,
        beats: &[(AgentId, i32)],
    ) -> Result<Vec<Result<AgentRecord, ServiceError>>, ServiceError> {
        let changes = agents::record_heartbeats(&self.pool, beats).await?;
        self.publish_changes(&changes, "heartbeat resumed").await?;
        // Every heartbeat changes last_heartbeat: mirror them all, concurrently.
        futures::future::try_join_all(changes.iter().map(|c| self.mirror(&c.agent))).await?;
        Ok(beats
            .iter()
            .map(|(id, _)| {
                changes
                    .iter()
                    .find(|c| c.agent.id == *id)
                    .map(|c| c.agent.clone())
                    .ok_or_else(|| {
                        ServiceError::UnknownAgent(format!(
                            "agent {id} is not registered; register it again"
                        ))
                    })
            })
            .collect())
    }

    /// A worker is stopping its agent: mark it offline now.
    pub async fn leave(&self, id: AgentId) -> Result<AgentRecord, ServiceError> {
        let row = sqlx::query_as::<_, (AgentStatus,)>(
            "SELECT status FROM agents WHERE id = $1 AND status <> 'terminated'",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(crate::db::DbError::from)?;
        let Some((from,)) = row else {
            return Err(ServiceError::UnknownAgent(format!(
                "agent {id} is not registered"
            )));
        };
        let agent = sqlx::query_as::<_, AgentRecord>(
            "UPDATE agents SET status = 'offline', health_status = 'unknown', current_load = 0,
                 updated_at = now()
             WHERE id = $1 AND status <> 'terminated' RETURNING *",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await
        .map_err(crate::db::DbError::from)?;
        self.publish_changes(
            &[StatusChange {
                agent: agent.clone(),
                from,
            }],
            "worker stopped",
        )
        .await?;
        self.mirror(&agent).await?;
        Ok(agent)
    }

    /// Deregisters an agent: it is terminated (kept for history), its name freed and its
    /// mirror entry deleted.
    pub async fn deregister(&self, id: AgentId) -> Result<AgentRecord, ServiceError> {
        let agent = sqlx::query_as::<_, AgentRecord>(
            "UPDATE agents SET status = 'terminated', health_status = 'unknown', updated_at = now()
             WHERE id = $1 AND status <> 'terminated' RETURNING *",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(crate::db::DbError::from)?
        .ok_or_else(|| ServiceError::NotFound(format!("agent {id} not found")))?;
        self.mirror
            .delete(id.to_string())
            .await
            .map_err(|e| ServiceError::Internal(format!("mirror delete: {e}")))?;
        self.bus
            .publish(Event::AgentDeregistered(AgentDeregistered {
                agent_id: id,
                name: agent.name.clone(),
            }))
            .await?;
        Ok(agent)
    }

    /// Marks agents that missed heartbeats stale, then offline; announces each change.
    pub async fn sweep(
        &self,
        stale_after_ms: i64,
        offline_after_ms: i64,
    ) -> Result<Vec<StatusChange>, ServiceError> {
        let changes = agents::sweep_silent(&self.pool, stale_after_ms, offline_after_ms).await?;
        if !changes.is_empty() {
            for c in &changes {
                tracing::warn!(agent.id = %c.agent.id, agent.name = %c.agent.name,
                    from = %c.from, to = %c.agent.status, "agent missed heartbeats");
                self.mirror(&c.agent).await?;
            }
            self.publish_changes(&changes, "missed heartbeats").await?;
        }
        Ok(changes)
    }

    async fn publish_changes(
        &self,
        changes: &[StatusChange],
        reason: &str,
    ) -> Result<(), ServiceError> {
        let events: Vec<Event> = changes
            .iter()
            .filter(|c| c.from != c.agent.status)
            .map(|c| {
                Event::AgentStatusChanged(AgentStatusChanged {
                    agent_id: c.agent.id,
                    from: c.from,
                    to: c.agent.status,
                    reason: reason.to_string(),
                })
            })
            .collect();
        if !events.is_empty() {
            self.bus.publish_all(events).await?;
        }
        Ok(())
    }

    /// Writes the record into the `<ns>_agents` bucket under its id.
    async fn mirror(&self, agent: &AgentRecord) -> Result<(), ServiceError> {
        let value = serde_json::to_vec(agent).map_err(|e| ServiceError::Internal(e.to_string()))?;
        self.mirror
            .put(agent.id.to_string(), value.into())
            .await
            .map_err(|e| ServiceError::Internal(format!("mirror agent {}: {e}", agent.id)))?;
        Ok(())
    }
}
