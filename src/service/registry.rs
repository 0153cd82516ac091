//! The agent registry: registration, liveness (heartbeats and the sweep), and the mirror of
//! every agent record into the `<ns>_agents` KV bucket. PostgreSQL is the record; every change
//! is then mirrored and announced as an event.

use async_nats::jetstream::kv;
use sqlx::PgPool;

use super::ServiceError;
use crate::bus::EventBus;
use crate::db::agents::{self, NewAgent, StatusChange};
use crate::domain::agent::{normalize_capabilities, normalize_executors};
use crate::domain::{AgentId, AgentStatus};
use crate::protocol::Event;
use crate::protocol::events::{
    AgentCapabilityUpdated, AgentDeregistered, AgentRegistered, AgentStatusChanged,
};
use crate::protocol::registry::{
    AgentHealth, AgentMatch, AgentRecord, AgentUpdate, RegisterRequest, RegistryStatistics,
    SearchQuery,
};

/// Most tasks one agent may hold at once.
pub const MAX_CAPACITY: i32 = 1_000;
/// Longest agent name.
pub const MAX_NAME_LEN: usize = 128;

/// Most results a search returns when no limit is given.
pub const DEFAULT_SEARCH_LIMIT: usize = 50;

/// The registry use-cases.
#[derive(Clone)]
pub struct Registry {
    pool: PgPool,
    bus: EventBus,
    mirror: kv::Store,
    /// Silence after which an agent counts as stale (scores heartbeat freshness).
    stale_after_ms: i64,
}

/// Checks an agent name: 1–128 characters of `A-Z a-z 0-9 . _ : -`.
pub fn validate_name(name: &str) -> Result<(), ServiceError> {
    validate_identifier("name", name)
}

/// Checks `value` of `field` by the agent names' grammar: 1–128 of `A-Z a-z 0-9 . _ : -`.
fn validate_identifier(field: &str, value: &str) -> Result<(), ServiceError> {
    if value.is_empty() || value.len() > MAX_NAME_LEN {
        return Err(ServiceError::validation(
            field,
            format!("must be 1 to {MAX_NAME_LEN} characters"),
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._:-".contains(*c)))
    {
        return Err(ServiceError::validation(
            field,
            format!("`{value}` contains `{c}`; allowed are A-Z, a-z, 0-9 and . _ : -"),
        ));
    }
    Ok(())
}

fn in_range(
    field: &str,
    value: i32,
    range: std::ops::RangeInclusive<i32>,
) -> Result<(), ServiceError> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(ServiceError::validation(
            field,
            format!(
                "must be between {} and {}, got {value}",
                range.start(),
                range.end()
            ),
        ))
    }
}

/// An agent's capacity: 1 to [`MAX_CAPACITY`] tasks.
pub fn validate_capacity(capacity: i32) -> Result<(), ServiceError> {
    in_range("capacity", capacity, 1..=MAX_CAPACITY)
}

/// A heartbeat's load: 0 to [`MAX_CAPACITY`] tasks.
pub fn validate_load(load: i32) -> Result<(), ServiceError> {
    in_range("load", load, 0..=MAX_CAPACITY)
}

pub fn normalize(field: &str, tokens: &[String]) -> Result<Vec<String>, ServiceError> {
    normalize_capabilities(tokens).map_err(|e| ServiceError::validation(field, e.to_string()))
}

/// Sorted difference `a \ b` of two sorted sets.
fn minus(a: &[String], b: &[String]) -> Vec<String> {
    a.iter().filter(|x| !b.contains(x)).cloned().collect()
}

impl Registry {
    pub fn new(pool: PgPool, bus: EventBus, mirror: kv::Store, stale_after_ms: i64) -> Self {
        Self {
            pool,
            bus,
            mirror,
            stale_after_ms,
        }
    }

    /// Registers an agent. A name held by a live agent is a conflict; a name held by a stale or
    /// offline agent is taken over — same id, new capabilities — which is how a restarted
    /// worker gets its agents (and their inboxes) back. Returns the record and whether it is new.
    #[tracing::instrument(skip_all, fields(agent.name = %req.name))]
    pub async fn register(
        &self,
        req: RegisterRequest,
    ) -> Result<(AgentRecord, bool), ServiceError> {
        if let Some(v) = req.v {
            crate::protocol::check_version("registration", v)
                .map_err(|e| ServiceError::validation("v", e))?;
        }
        validate_name(&req.name)?;
        validate_capacity(req.capacity)?;
        let capabilities = normalize("capabilities", &req.capabilities)?;
        let executors = normalize_executors(&req.executors)
            .map_err(|e| ServiceError::validation("executors", e.to_string()))?;
        let tags = normalize("tags", &req.tags)?;
        if req.agent_type.trim().is_empty() {
            return Err(ServiceError::validation("agent_type", "must not be empty"));
        }
        if let Some(instance) = &req.instance {
            validate_identifier("instance", instance)?;
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

        let id = AgentId::for_name(self.bus.names().namespace(), &req.name);
        let new = NewAgent {
            id,
            name: req.name.clone(),
            agent_type: req.agent_type.clone(),
            phase_id: req.phase_id.clone(),
            capabilities: capabilities.clone(),
            capacity: req.capacity,
            tags,
            metadata,
            executors,
            instance: req.instance.clone(),
        };
        let mut tx = self.pool.begin().await.map_err(crate::db::DbError::from)?;
        let mut retired = None;
        let mut reclaimed = Vec::new();
        let live = agents::lock_live_by_name(&mut tx, &req.name).await?;
        // The same process registering its live agent again (its first reply was lost): answered
        // with the agent as it stands, its consumers and mirror made sure of; nothing changes,
        // nothing is announced.
        let repeated = match (&live, &req.instance) {
            (Some(old), Some(instance))
                if old.id == id
                    && !matches!(old.status, AgentStatus::Stale | AgentStatus::Offline) =>
            {
                agents::instance_of(&mut *tx, id).await?.as_ref() == Some(instance)
            }
            _ => false,
        };
        let (agent, previous) = match live {
            Some(old) if repeated => (old, None),
            Some(old) if !matches!(old.status, AgentStatus::Stale | AgentStatus::Offline) => {
                return Err(ServiceError::Conflict(format!(
                    "an agent named `{}` is already registered and {} (id {}); while it is \
                     live only the instance that registered it registers it again",
                    old.name, old.status, old.id
                )));
            }
            // A silent agent's name is taken over: same id, new fields — by a new process, so
            // what the silent one held goes back to ready at once (not after its dispatches'
            // redelivery, at the same attempt, into the new process), and its dispatches left
            // pending are dropped before the new process can pull them.
            Some(old) if old.id == id => {
                let agent = agents::reregister(&mut tx, &new).await?;
                reclaimed = crate::db::scheduling::reclaim_from_agent(&mut tx, id).await?;
                if !reclaimed.is_empty() {
                    crate::bus::provision::purge_dispatches(
                        self.bus.jetstream(),
                        self.bus.names(),
                        id,
                    )
                    .await;
                }
                (agent, Some(old))
            }
            // Registered before ids came from names: retired, and registered anew.
            Some(old) => {
                agents::terminate(&mut *tx, old.id).await?;
                retired = Some(old);
                (self.insert_or_revive(&mut tx, &new).await?, None)
            }
            None => (self.insert_or_revive(&mut tx, &new).await?, None),
        };
        tx.commit().await.map_err(crate::db::DbError::from)?;
        if let Some(old) = retired {
            self.clean_up_after(&old).await?;
        }
        // The agent binds to these; they exist before it hears it is registered.
        crate::bus::provision::ensure_agent_consumers(
            self.bus.jetstream(),
            self.bus.names(),
            agent.id,
            &agent.name,
            agent.capacity,
        )
        .await?;

        self.mirror(&agent).await?;
        if repeated {
            tracing::info!(agent.id = %agent.id, "registration repeated by the same instance; answered with the agent");
            return Ok((agent, false));
        }
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
        if !reclaimed.is_empty() {
            tracing::warn!(agent.id = %agent.id, tasks = reclaimed.len(), "a new process took the agent over; what the old one held is dispatched again");
        }
        events.extend(super::workflows::task_events(&reclaimed));
        self.bus.publish_all(events).await?;
        tracing::info!(agent.id = %agent.id, reactivated = previous.is_some(), "agent registered");
        Ok((agent, previous.is_none()))
    }

    /// A new agent, or a deregistered one (same name, so same id) registered again.
    async fn insert_or_revive(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        new: &NewAgent,
    ) -> Result<AgentRecord, ServiceError> {
        Ok(match agents::lock_any(tx, new.id).await? {
            Some(_) => agents::reregister(tx, new).await?,
            None => agents::insert(&mut **tx, new).await?,
        })
    }

    /// `Err(Forbidden)` unless `acting` — the agent in a request's subject — is the agent named
    /// `name` (`AgentId::for_name`): a registration on NATS is made as the agent it registers.
    pub fn check_identity(&self, acting: AgentId, name: &str) -> Result<(), ServiceError> {
        let expected = AgentId::for_name(self.bus.names().namespace(), name);
        if acting == expected {
            Ok(())
        } else {
            Err(ServiceError::Forbidden(format!(
                "agent `{}` has id {expected}; it registers on its own subject, not as {acting}",
                crate::domain::text::bounded(name, 128)
            )))
        }
    }

    pub async fn get(&self, id: AgentId) -> Result<AgentRecord, ServiceError> {
        Ok(agents::get(&self.pool, id).await?)
    }

    pub async fn list(&self) -> Result<Vec<AgentRecord>, ServiceError> {
        Ok(agents::list_live(&self.pool).await?)
    }

    /// Applies a partial update. Capability changes publish `agent.capability.updated` only
    /// when the normalised set really changes; status changes follow the transition table.
    #[tracing::instrument(skip_all, fields(agent.id = %id))]
    /// An operator's partial update (HTTP): any legal status change.
    pub async fn update(
        &self,
        id: AgentId,
        update: AgentUpdate,
    ) -> Result<AgentRecord, ServiceError> {
        self.update_by(id, update, false).await
    }

    /// The agent's own update (`<ns>.act.<agent_id>.update`): it may take itself out of
    /// rotation (`maintenance`) and back (`idle`), but no other status — and a quarantined
    /// agent cannot lift its own quarantine; an operator does that.
    pub async fn update_by_agent(
        &self,
        id: AgentId,
        update: AgentUpdate,
    ) -> Result<AgentRecord, ServiceError> {
        self.update_by(id, update, true).await
    }

    async fn update_by(
        &self,
        id: AgentId,
        update: AgentUpdate,
        by_agent: bool,
    ) -> Result<AgentRecord, ServiceError> {
        if by_agent
            && update
                .status
                .is_some_and(|s| !matches!(s, AgentStatus::Idle | AgentStatus::Maintenance))
        {
            return Err(ServiceError::Forbidden(
                "an agent may set its own status only to `idle` or `maintenance`".into(),
            ));
        }
        let capabilities = update
            .capabilities
            .as_ref()
            .map(|c| normalize("capabilities", c))
            .transpose()?;
        let tags = update
            .tags
            .as_ref()
            .map(|t| normalize("tags", t))
            .transpose()?;
        let executors = update
            .executors
            .as_ref()
            .map(|e| normalize_executors(e))
            .transpose()
            .map_err(|e| ServiceError::validation("executors", e.to_string()))?;
        if let Some(c) = update.capacity {
            validate_capacity(c)?;
        }
        if update.metadata.as_ref().is_some_and(|m| !m.is_object()) {
            return Err(ServiceError::validation(
                "metadata",
                "must be a JSON object",
            ));
        }
        let mut tx = self.pool.begin().await.map_err(crate::db::DbError::from)?;
        let old = agents::lock_live(&mut tx, id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("agent {id} not found")))?;
        if by_agent && update.status.is_some() && old.status == AgentStatus::Quarantined {
            return Err(ServiceError::Forbidden(format!(
                "agent {id} is quarantined; only an operator releases it"
            )));
        }
        if let Some(to) = update.status {
            if !old.status.can_become(to) {
                return Err(ServiceError::Conflict(format!(
                    "agent {id} cannot go from {} to {to}",
                    old.status
                )));
            }
        }
        let agent = agents::update(
            &mut tx,
            id,
            &agents::AgentChanges {
                capabilities,
                capacity: update.capacity,
                status: update.status,
                tags,
                metadata: update.metadata.clone(),
                executors,
            },
        )
        .await?;
        tx.commit().await.map_err(crate::db::DbError::from)?;
        if old.capacity != agent.capacity {
            // Its dispatch consumer lets twice the capacity be unacknowledged.
            crate::bus::provision::ensure_agent_consumers(
                self.bus.jetstream(),
                self.bus.names(),
                agent.id,
                &agent.name,
                agent.capacity,
            )
            .await?;
        }
        self.mirror(&agent).await?;
        let mut events = Vec::new();
        if old.capabilities != agent.capabilities {
            events.push(Event::AgentCapabilityUpdated(AgentCapabilityUpdated {
                agent_id: id,
                capabilities: agent.capabilities.clone(),
                added: minus(&agent.capabilities, &old.capabilities),
                removed: minus(&old.capabilities, &agent.capabilities),
            }));
        }
        if old.status != agent.status {
            events.push(Event::AgentStatusChanged(AgentStatusChanged {
                agent_id: id,
                from: old.status,
                to: agent.status,
                reason: "updated".into(),
            }));
        }
        if !events.is_empty() {
            self.bus.publish_all(events).await?;
        }
        Ok(agent)
    }

    /// Takes an agent out of rotation (`maintenance`) or puts it back (`idle`).
    pub async fn set_availability(
        &self,
        id: AgentId,
        available: bool,
    ) -> Result<AgentRecord, ServiceError> {
        let agent = self.get(id).await?;
        let target = match (available, agent.status) {
            (_, AgentStatus::Terminated) => {
                return Err(ServiceError::NotFound(format!("agent {id} not found")));
            }
            (true, AgentStatus::Maintenance | AgentStatus::Quarantined) => AgentStatus::Idle,
            (true, AgentStatus::Idle | AgentStatus::Running | AgentStatus::Degraded) => {
                return Ok(agent);
            }
            (true, st) => {
                return Err(ServiceError::Conflict(format!(
                    "agent {id} is {st}; it becomes available when it heartbeats again"
                )));
            }
            (false, AgentStatus::Maintenance) => return Ok(agent),
            (false, _) => AgentStatus::Maintenance,
        };
        self.update(
            id,
            AgentUpdate {
                status: Some(target),
                ..AgentUpdate::default()
            },
        )
        .await
    }

    /// One heartbeat (the HTTP path); workers send theirs over NATS in batches.
    pub async fn heartbeat(&self, id: AgentId, load: i32) -> Result<AgentRecord, ServiceError> {
        validate_load(load)?;
        let mut results = self.record_heartbeats(&[(id, load)]).await?;
        results.pop().unwrap_or_else(|| {
            Err(ServiceError::UnknownAgent(format!(
                "agent {id} is not registered"
            )))
        })
    }

    /// Ranks live agents for `query` (see [`crate::domain::matching`]).
    pub async fn search(&self, query: &SearchQuery) -> Result<Vec<AgentMatch>, ServiceError> {
        let req = crate::domain::matching::Requirements {
            capabilities: normalize("capabilities", &query.capabilities)?,
            preferred_tags: normalize("preferred_tags", &query.preferred_tags)?,
            agent_type: query.agent_type.clone(),
            phase_id: query.phase_id.clone(),
            partial: query.partial,
            executor: query.executor.clone(),
        };
        let limit = query.limit.unwrap_or(DEFAULT_SEARCH_LIMIT);
        if limit == 0 || limit > 1_000 {
            return Err(ServiceError::validation(
                "limit",
                "must be between 1 and 1000",
            ));
        }
        // "Has every capability" is served by the GIN index; partial searches scan live agents.
        let candidates = if req.partial || req.capabilities.is_empty() {
            agents::list_live(&self.pool).await?
        } else {
            agents::live_with_capabilities(&self.pool, &req.capabilities).await?
        };
        let snapshots: Vec<_> = candidates.iter().map(snapshot).collect();
        let ranked = crate::domain::matching::rank(
            &snapshots,
            &req,
            chrono::Utc::now(),
            self.stale_after_ms,
        );
        Ok(ranked
            .into_iter()
            .take(limit)
            .map(|r| AgentMatch {
                agent: candidates[r.index].clone(),
                match_score: (r.score * 1000.0).round() / 1000.0,
                matched_capabilities: r.matched,
            })
            .collect())
    }

    /// The single best candidate for `query` (never a partial match), if any.
    pub async fn best_fit(&self, query: &SearchQuery) -> Result<Option<AgentMatch>, ServiceError> {
        let query = SearchQuery {
            partial: false,
            limit: Some(1),
            ..query.clone()
        };
        Ok(self.search(&query).await?.into_iter().next())
    }

    /// Health of every live agent.
    pub async fn health(&self) -> Result<Vec<AgentHealth>, ServiceError> {
        Ok(self.list().await?.iter().map(AgentHealth::from).collect())
    }

    /// Counts over the live fleet.
    pub async fn statistics(&self) -> Result<RegistryStatistics, ServiceError> {
        let agents = self.list().await?;
        let mut stats = RegistryStatistics {
            total_agents: agents.len(),
            by_status: Default::default(),
            by_health: Default::default(),
            by_type: Default::default(),
            capabilities: Default::default(),
            total_capacity: 0,
            total_load: 0,
            utilisation: 0.0,
        };
        let (mut live_capacity, mut live_load) = (0i64, 0i64);
        for a in &agents {
            *stats.by_status.entry(a.status.to_string()).or_default() += 1;
            *stats
                .by_health
                .entry(a.health_status.to_string())
                .or_default() += 1;
            *stats.by_type.entry(a.agent_type.clone()).or_default() += 1;
            for c in &a.capabilities {
                *stats.capabilities.entry(c.clone()).or_default() += 1;
            }
            stats.total_capacity += i64::from(a.capacity);
            stats.total_load += i64::from(a.current_load);
            if a.status.is_dispatchable() {
                live_capacity += i64::from(a.capacity);
                live_load += i64::from(a.current_load);
            }
        }
        if live_capacity > 0 {
            stats.utilisation = live_load as f64 / live_capacity as f64;
        }
        Ok(stats)
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
        let missing: Vec<AgentId> = beats
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !changes.iter().any(|c| c.agent.id == *id))
            .collect();
        let deregistered = if missing.is_empty() {
            Vec::new()
        } else {
            agents::terminated_among(&self.pool, &missing).await?
        };
        Ok(beats
            .iter()
            .map(|(id, _)| {
                if let Some(c) = changes.iter().find(|c| c.agent.id == *id) {
                    return Ok(c.agent.clone());
                }
                Err(if deregistered.contains(id) {
                    ServiceError::Deregistered(format!(
                        "agent {id} was deregistered; a worker stops hosting it"
                    ))
                } else {
                    ServiceError::UnknownAgent(format!(
                        "agent {id} is not registered; register it again"
                    ))
                })
            })
            .collect())
    }

    /// A worker is stopping its agent: mark it offline now.
    pub async fn leave(&self, id: AgentId) -> Result<AgentRecord, ServiceError> {
        let change = agents::leave(&self.pool, id)
            .await?
            .ok_or_else(|| ServiceError::UnknownAgent(format!("agent {id} is not registered")))?;
        self.publish_changes(std::slice::from_ref(&change), "worker stopped")
            .await?;
        self.mirror(&change.agent).await?;
        Ok(change.agent)
    }

    /// Deregisters an agent: it is terminated (kept for history), its name freed, its mirror
    /// entry and its dispatch and inbox consumers deleted.
    pub async fn deregister(&self, id: AgentId) -> Result<AgentRecord, ServiceError> {
        let agent = agents::terminate(&self.pool, id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("agent {id} not found")))?;
        self.clean_up_after(&agent).await?;
        Ok(agent)
    }

    /// What a terminated agent leaves: its mirror entry and consumers go, and it is announced.
    async fn clean_up_after(&self, agent: &AgentRecord) -> Result<(), ServiceError> {
        self.mirror
            .delete(agent.id.to_string())
            .await
            .map_err(|e| ServiceError::Internal(format!("mirror delete: {e}")))?;
        // Its durable consumers would otherwise stay on the server for good.
        crate::bus::provision::delete_agent_consumers(
            self.bus.jetstream(),
            self.bus.names(),
            agent.id,
        )
        .await;
        self.bus
            .publish(Event::AgentDeregistered(AgentDeregistered {
                agent_id: agent.id,
                name: agent.name.clone(),
            }))
            .await?;
        Ok(())
    }

    /// Marks agents that missed heartbeats stale, then offline — only as long as the control
    /// planes could have heard them: `heard_for_ms` is how long that has been (since this one
    /// took the lease, or the database came back), and an agent is not judged on a silence
    /// longer than that. Announces each change.
    pub async fn sweep(
        &self,
        stale_after_ms: i64,
        offline_after_ms: i64,
        heard_for_ms: i64,
    ) -> Result<Vec<StatusChange>, ServiceError> {
        if heard_for_ms < stale_after_ms {
            return Ok(Vec::new());
        }
        let judge_offline = heard_for_ms >= offline_after_ms;
        let changes =
            agents::sweep_silent(&self.pool, stale_after_ms, offline_after_ms, judge_offline)
                .await?;
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

/// The ranking view of a record.
pub fn snapshot(a: &AgentRecord) -> crate::domain::matching::AgentSnapshot<'_> {
    crate::domain::matching::AgentSnapshot {
        id: a.id,
        name: &a.name,
        agent_type: &a.agent_type,
        phase_id: a.phase_id.as_deref(),
        capabilities: &a.capabilities,
        tags: &a.tags,
        executors: &a.executors,
        capacity: a.capacity,
        load: a.current_load,
        status: a.status,
        health: a.health_status,
        last_heartbeat: a.last_heartbeat,
        last_assigned_at: a.last_assigned_at,
    }
}
