//! Running tasks: the dispatch the scheduler publishes on `<ns>.dispatch.<agent_id>` and the
//! reports an agent publishes on `<ns>.result.<agent_id>.<task_id>` (docs/protocol.md, "Running
//! tasks").

use serde::{Deserialize, Serialize};

use super::v1;
use crate::domain::AgentId;

/// A task handed to an agent: published by the scheduler on `<ns>.dispatch.<agent_id>`
/// (stream `<ns>_dispatch`, one durable consumer `agent-<agent_id>` per agent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
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
        /// How long the attempt ran, for one that did not report `started`: its `started_at`
        /// is then set this far back from the completion (never before its assignment).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        running_ms: Option<u64>,
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
    use crate::protocol::PROTOCOL_VERSION;

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
            running_ms: None,
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
            running_ms: Some(1),
        });
        assert_eq!(fine.make_storable(), None);
        assert!(super::super::check_version("report", 1).is_ok());
        assert!(super::super::check_version("report", 2).is_err());
    }
}
