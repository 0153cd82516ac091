//! The agent registry on the wire: registering, updating and deregistering an agent, its
//! heartbeats, searches, and the agent record every reply carries (and the `<ns>_agents`
//! bucket mirrors).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::v1;
use crate::domain::{AgentId, AgentStatus, HealthStatus};

/// The agent record: every registry reply, the value of the `<ns>_agents` bucket, the API's
/// agent. `db/` reads rows into it by column name, so a column added to `agents` reaches the wire
/// only when it is added here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, schemars::JsonSchema)]
pub struct AgentRecord {
    pub id: AgentId,
    pub name: String,
    pub agent_type: String,
    pub phase_id: Option<String>,
    pub capabilities: Vec<String>,
    pub capacity: i32,
    pub current_load: i32,
    pub status: AgentStatus,
    pub health_status: HealthStatus,
    pub last_heartbeat: Option<DateTime<Utc>>,
    pub last_assigned_at: Option<DateTime<Utc>>,
    pub tags: Vec<String>,
    pub metadata: serde_json::Value,
    /// Executors it runs; `*` = any.
    pub executors: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl AgentRecord {
    /// Whether the agent runs tasks of `executor`.
    pub fn offers(&self, executor: &str) -> bool {
        crate::domain::agent::offers(&self.executors, executor)
    }
}

fn default_agent_type() -> String {
    "worker".into()
}
fn default_capacity() -> i32 {
    1
}

/// `POST /api/v1/agents/register` and `<ns>.act.<agent_id>.register`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// Protocol version (1); any other is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
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
    /// The executors the agent runs (a task goes only to an agent offering its executor);
    /// none named: any (`*`).
    #[serde(default)]
    pub executors: Vec<String>,
    /// The registering process, as it names itself (1 to 128 of `A-Z a-z 0-9 . _ : -`, as a
    /// name; a random UUID per process will do): the same instance registering again while its agent is live
    /// is answered with the agent as it stands — a registration whose reply was lost can be
    /// sent again — where any other meets `conflict`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

/// `PATCH /api/v1/agents/{id}` and `<ns>.act.<agent_id>.update`: only the fields present change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentUpdate {
    /// Protocol version (1); any other is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AgentStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executors: Option<Vec<String>>,
}

/// A search: `GET /api/v1/agents/search` and `<ns>.registry.search`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchQuery {
    /// Protocol version (1); any other is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub preferred_tags: Vec<String>,
    #[serde(default)]
    pub agent_type: Option<String>,
    #[serde(default)]
    pub phase_id: Option<String>,
    #[serde(default)]
    pub partial: bool,
    #[serde(default)]
    pub limit: Option<usize>,
    /// Only agents that run this executor.
    #[serde(default)]
    pub executor: Option<String>,
}

/// One search result, in upstream's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AgentMatch {
    pub agent: AgentRecord,
    pub match_score: f64,
    pub matched_capabilities: Vec<String>,
}

/// `GET /api/v1/agents/{id}/health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AgentHealth {
    pub agent_id: AgentId,
    pub name: String,
    pub status: AgentStatus,
    pub health_status: crate::domain::HealthStatus,
    pub last_heartbeat: Option<chrono::DateTime<chrono::Utc>>,
    pub seconds_since_heartbeat: Option<f64>,
    pub current_load: i32,
    pub capacity: i32,
}

impl From<&AgentRecord> for AgentHealth {
    fn from(a: &AgentRecord) -> Self {
        Self {
            agent_id: a.id,
            name: a.name.clone(),
            status: a.status,
            health_status: a.health_status,
            last_heartbeat: a.last_heartbeat,
            seconds_since_heartbeat: a
                .last_heartbeat
                .map(|t| (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0),
            current_load: a.current_load,
            capacity: a.capacity,
        }
    }
}

/// `GET /api/v1/agents/statistics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RegistryStatistics {
    pub total_agents: usize,
    pub by_status: std::collections::BTreeMap<String, usize>,
    pub by_health: std::collections::BTreeMap<String, usize>,
    pub by_type: std::collections::BTreeMap<String, usize>,
    pub capabilities: std::collections::BTreeMap<String, usize>,
    pub total_capacity: i64,
    pub total_load: i64,
    /// Load over capacity of agents that can take work.
    pub utilisation: f64,
}

/// Sent by a worker on `<ns>.act.<agent_id>.heartbeat` for each hosted agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    #[serde(default = "v1")]
    pub v: u32,
    pub agent_id: AgentId,
    /// Tasks the agent holds right now.
    #[serde(default)]
    pub load: i32,
    /// The worker is stopping: mark the agent offline now rather than after the timeout.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
}

/// Reply to a heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HeartbeatAck {
    pub agent_id: AgentId,
    pub status: crate::domain::AgentStatus,
}

/// `<ns>.act.<agent_id>.deregister`: the acting agent leaves the fleet for good (its name may
/// register again later). Reply: the agent record, `terminated`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Deregister {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
}
