//! Request/reply messages on NATS — the part of the wire contract that is not an event.
//! All are JSON; requests carry `"v": 1` (optional, defaults to 1). A reply is the result
//! object itself, or on failure `{"error": {"code", "message", "field"?}}` with the NATS
//! service headers `Nats-Service-Error` and `Nats-Service-Error-Code` (an HTTP-like status).

use serde::{Deserialize, Serialize};

use crate::domain::AgentId;

pub const PROTOCOL_VERSION: u32 = 1;

fn v1() -> u32 {
    PROTOCOL_VERSION
}

/// Sent by a worker on `<ns>.agent.heartbeat.<agent_id>` for each hosted agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    pub agent_id: AgentId,
    pub status: crate::domain::AgentStatus,
}

/// A failure, as carried in a reply body and in HTTP error responses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable machine-readable code: `validation`, `not_found`, `conflict`, `unknown_agent`,
    /// `malformed`, `too_large`, `forbidden`, `internal`, `unavailable`.
    pub code: String,
    pub message: String,
    /// The offending field, for validation errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// `{"error": ErrorBody}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: ErrorBody,
}
