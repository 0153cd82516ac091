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

/// `<ns>.workflow.submit_upload`: submit the workflow (the JSON of a `workflow.submit` request)
/// that was put in the object store `<ns>_uploads` under `object` — for a submission too large
/// for one NATS message. The control plane deletes the object once read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitUpload {
    #[serde(default = "v1")]
    pub v: u32,
    pub object: String,
}

/// Sent by a worker on `<ns>.act.<agent_id>.heartbeat` for each hosted agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    pub agent_id: AgentId,
    pub status: crate::domain::AgentStatus,
}

/// `<ns>.act.<agent_id>.read`: the acting agent has read a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarkRead {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    pub message_id: uuid::Uuid,
}

/// `<ns>.act.<agent_id>.accept|decline|cancel`: the acting agent decides on (or, as its
/// requester, withdraws) a handoff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoffDecision {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    pub handoff_id: uuid::Uuid,
    /// Why (a decline), kept as the handoff's `decision_reason`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
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

/// A task handed to an agent: published by the scheduler on `<ns>.dispatch.<agent_id>`
/// (stream `<ns>_dispatch`, one durable consumer `agent-<agent_id>` per agent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dispatch {
    #[serde(default = "v1")]
    pub v: u32,
    pub task_id: crate::domain::TaskId,
    pub workflow_id: crate::domain::WorkflowId,
    pub key: String,
    /// Fencing token: reports must carry it; a report for an older attempt is ignored.
    pub attempt: i32,
    pub agent_id: AgentId,
    pub executor: String,
    /// The task's input with `${deps.…}` references resolved.
    pub input: serde_json::Value,
    /// Outputs of the task's dependencies, by key.
    #[serde(default)]
    pub dependencies: std::collections::BTreeMap<String, serde_json::Value>,
    /// `dependencies` were left out: with them the dispatch would exceed the message limit
    /// (the `input`, with its `${deps…}` references resolved, is still whole).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dependencies_omitted: bool,
    #[serde(default)]
    pub resources: Vec<crate::domain::dag::ResourceSpec>,
    #[serde(default)]
    pub timeout_seconds: Option<i32>,
}

/// What an agent reports about one attempt, on `<ns>.result.<agent_id>.<task_id>` (stream
/// `<ns>_results`); `agent_id` must be the subject's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskReport {
    #[serde(default = "v1")]
    pub v: u32,
    pub task_id: crate::domain::TaskId,
    pub attempt: i32,
    pub agent_id: AgentId,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// The outcome of an attempt, tagged by `"outcome"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The agent began running it, `running_ms` ago (optional: an agent that reports a start
    /// late says how long the attempt has been running; `started_at` goes back that far, never
    /// before the assignment).
    Started {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        running_ms: Option<u64>,
    },
    Completed {
        #[serde(default)]
        output: serde_json::Value,
        /// How long the attempt waited for its resource locks before running.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lock_wait_ms: Option<u64>,
    },
    /// The attempt failed; the scheduler retries with backoff until `max_attempts`.
    Failed {
        error: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
    },
    /// A resource lock stayed busy: dispatch again later (not a failure).
    Blocked { reason: String },
    /// The agent gave the task back unfinished (e.g. shutting down): dispatch again.
    Released { reason: String },
}

impl Outcome {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Started { .. } => "started",
            Self::Completed { .. } => "completed",
            Self::Failed { .. } => "failed",
            Self::Blocked { .. } => "blocked",
            Self::Released { .. } => "released",
        }
    }
}

/// Checks a version field of an inbound message: only [`PROTOCOL_VERSION`] is understood.
pub fn check_version(what: &str, v: u32) -> Result<(), String> {
    if v == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(format!(
            "unsupported protocol version {v} in a {what} (this build speaks {PROTOCOL_VERSION})"
        ))
    }
}

impl TaskReport {
    /// Makes the report storable in PostgreSQL, which cannot hold U+0000: in free text (an
    /// error, a reason) it becomes U+FFFD; a completed attempt whose output holds one is turned
    /// into a failed attempt saying where. Returns that reason when the output was refused.
    pub fn make_storable(&mut self) -> Option<String> {
        use crate::domain::text::{find_nul, scrub_nul};
        match &mut self.outcome {
            Outcome::Started { .. } => None,
            Outcome::Failed { error, .. } => {
                *error = scrub_nul(error);
                None
            }
            Outcome::Blocked { reason } | Outcome::Released { reason } => {
                *reason = scrub_nul(reason);
                None
            }
            Outcome::Completed { output, .. } => {
                let path = find_nul(output)?;
                let reason = format!(
                    "output holds U+0000 (NUL) at {path}, which cannot be stored; the attempt fails"
                );
                self.outcome = Outcome::Failed {
                    error: reason.clone(),
                    exit_code: None,
                };
                Some(reason)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(outcome: Outcome) -> TaskReport {
        TaskReport {
            v: PROTOCOL_VERSION,
            task_id: crate::domain::TaskId::new(),
            attempt: 1,
            agent_id: AgentId::new(),
            outcome,
        }
    }

    #[test]
    fn a_nul_in_an_output_fails_the_attempt_and_in_free_text_is_replaced() {
        let mut r = report(Outcome::Completed {
            output: serde_json::json!({"stdout": "a\u{0}b"}),
            lock_wait_ms: None,
        });
        let reason = r.make_storable().expect("refused");
        assert!(reason.contains("$.stdout"), "{reason}");
        assert!(matches!(r.outcome, Outcome::Failed { .. }));
        let mut r = report(Outcome::Failed {
            error: "bad\u{0}".into(),
            exit_code: Some(1),
        });
        assert_eq!(r.make_storable(), None);
        assert!(matches!(r.outcome, Outcome::Failed { ref error, .. } if error == "bad\u{FFFD}"));
        let mut fine = report(Outcome::Completed {
            output: serde_json::json!({"ok": true}),
            lock_wait_ms: Some(3),
        });
        assert_eq!(fine.make_storable(), None);
        assert!(check_version("report", 1).is_ok());
        assert!(check_version("report", 2).is_err());
    }
}
