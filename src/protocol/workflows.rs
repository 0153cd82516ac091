//! Workflows on the wire: a submission (the [`WorkflowSpec`] of docs/api.md), its reply,
//! reading and cancelling a workflow, running a pattern, and the workflow and task records
//! replies carry.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{fits, is_zero, v1};
use crate::domain::coordination::NodeKind;
pub use crate::domain::dag::{ResourceSpec, TaskSpec, WorkflowSpec};
use crate::domain::{AgentId, Priority, TaskId, TaskStatus, WorkflowId, WorkflowStatus};

/// A workflow, as replies carry it (`db/` reads rows into it by column name; the submission it
/// was made from stays in the database).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, schemars::JsonSchema)]
pub struct WorkflowRecord {
    pub id: WorkflowId,
    pub name: String,
    pub status: WorkflowStatus,
    pub failure_policy: String,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A task, as replies carry it (`db/` reads rows into it by column name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, schemars::JsonSchema)]
pub struct TaskRecord {
    pub id: TaskId,
    pub workflow_id: WorkflowId,
    pub key: String,
    pub executor: String,
    pub capabilities: Vec<String>,
    pub input: serde_json::Value,
    pub output: Option<serde_json::Value>,
    pub depends_on: Vec<String>,
    pub resources: serde_json::Value,
    pub priority: Priority,
    pub status: TaskStatus,
    pub attempt: i32,
    pub failures: i32,
    pub max_attempts: i32,
    pub timeout_seconds: Option<i32>,
    pub agent_id: Option<AgentId>,
    pub error: Option<String>,
    pub retry_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub ready_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Set by an accepted handoff: the next dispatch goes to this agent only.
    pub pinned_agent_id: Option<AgentId>,
    /// `task` (run by an agent) or the coordination node it is.
    pub kind: NodeKind,
    /// Completed dependencies it waits for; `None`: all.
    pub join_quorum: Option<i32>,
    /// A coordination node's spec.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordination: Option<serde_json::Value>,
    /// Expansions done (a split's children, a loop's iterations).
    pub expansion: i32,
    /// A sync point released by its timeout.
    pub timed_out: bool,
    /// How long the completed attempt waited for its resource locks.
    pub lock_wait_ms: Option<i64>,
}

/// Reply to a submission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Submitted {
    pub workflow_id: WorkflowId,
    /// Task ids by key.
    pub tasks: BTreeMap<String, TaskId>,
    /// Tasks needing a capability no registered agent has: accepted, but they wait. At most
    /// [`UNSCHEDULABLE_KEPT`], every distinct need among them.
    pub unschedulable: Vec<Unschedulable>,
    /// How many more unschedulable tasks there are than `unschedulable` lists.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unschedulable_omitted: usize,
    /// Set (over NATS only) when the reply would not fit in one message: `tasks` is then empty;
    /// read the tasks with `workflow.get` or over HTTP.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tasks_omitted: bool,
}

/// Most unschedulable tasks a reply lists (a 100,000-task workflow no agent can take would
/// otherwise list them all).
pub const UNSCHEDULABLE_KEPT: usize = 100;

impl Submitted {
    /// This reply made to fit in `limit` bytes of JSON: the task ids are left out, saying so,
    /// when the whole would not fit.
    pub fn fit(mut self, limit: usize) -> Self {
        if !fits(&self, limit) {
            self.tasks.clear();
            self.tasks_omitted = true;
        }
        self
    }
}

/// A task no live agent can take: capabilities none has, or an executor none offers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Unschedulable {
    pub key: String,
    pub missing_capabilities: Vec<String>,
    /// Its executor, when no live agent offers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_executor: Option<String>,
}

impl Unschedulable {
    /// What is missing, for people: `capabilities [a, b]`, `executor `shell``, or both.
    pub fn missing(&self) -> String {
        let mut parts = Vec::new();
        if !self.missing_capabilities.is_empty() {
            parts.push(format!(
                "capabilities [{}]",
                self.missing_capabilities.join(", ")
            ));
        }
        if let Some(e) = &self.missing_executor {
            parts.push(format!("executor `{e}`"));
        }
        parts.join(" and ")
    }
}

/// A workflow with every task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WorkflowView {
    #[serde(flatten)]
    pub workflow: WorkflowRecord,
    pub tasks: Vec<TaskRecord>,
    pub counts: BTreeMap<String, usize>,
    /// At most [`UNSCHEDULABLE_KEPT`] unfinished tasks no live agent can take.
    pub unschedulable: Vec<Unschedulable>,
    /// How many more there are than `unschedulable` lists.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unschedulable_omitted: usize,
    /// Set (over NATS only) when a reply that must not fail — a cancel's — would not fit in one
    /// message: `tasks` is then empty.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tasks_omitted: bool,
}

/// The fewest bytes of JSON a task takes in a view (every field is named; two ids and two
/// timestamps at least; 596 measured for the barest): a view of more than
/// `limit / MIN_TASK_JSON_BYTES` tasks cannot fit in `limit` bytes, whatever they hold.
pub const MIN_TASK_JSON_BYTES: usize = 400;

impl WorkflowView {
    /// This view made to fit in `limit` bytes of JSON: the tasks are left out, saying so, when
    /// the whole would not fit.
    pub fn fit(mut self, limit: usize) -> Self {
        if !fits(&self, limit) {
            self.tasks.clear();
            self.tasks_omitted = true;
        }
        self
    }
}

fn yes() -> bool {
    true
}

/// `<ns>.workflow.get` / `.cancel` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    pub workflow_id: WorkflowId,
    /// Include every task (default). Without them the reply stays small for huge workflows.
    #[serde(default = "yes")]
    pub include_tasks: bool,
}

/// Runs a pattern (`POST /api/v1/workflows/from-pattern`, `<ns>.workflow.run`): a pattern by
/// name — built in or in `patterns_dir`, never a path a client chooses — or a file's text as
/// `source`, with parameters.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PatternRun {
    /// Protocol version (1); any other is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    #[serde(default)]
    pub pattern: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
}

/// What running a pattern submitted: the workflow, and the pattern's name.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PatternSubmitted {
    #[serde(flatten)]
    pub submitted: Submitted,
    pub pattern: String,
}

/// `<ns>.workflow.submit_upload`: submit the workflow (the JSON of a `workflow.submit` request)
/// that was put in the object store `<ns>_uploads` under `object` — for a submission too large
/// for one NATS message. The control plane deletes the object once read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitUpload {
    #[serde(default = "v1")]
    pub v: u32,
    pub object: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_task_takes_fewer_bytes_in_a_view_than_the_minimum_counted_on() {
        let at = Utc::now();
        let bare = TaskRecord {
            id: TaskId::new(),
            workflow_id: WorkflowId::new(),
            key: String::new(),
            executor: String::new(),
            capabilities: vec![],
            input: serde_json::Value::Null,
            output: None,
            depends_on: vec![],
            resources: serde_json::Value::Null,
            priority: Priority::Low,
            status: TaskStatus::Ready,
            attempt: 0,
            failures: 0,
            max_attempts: 1,
            timeout_seconds: None,
            agent_id: None,
            error: None,
            retry_at: None,
            created_at: at,
            updated_at: at,
            ready_at: None,
            started_at: None,
            finished_at: None,
            pinned_agent_id: None,
            kind: NodeKind::Task,
            join_quorum: None,
            coordination: None,
            expansion: 0,
            timed_out: false,
            lock_wait_ms: None,
        };
        let bytes = serde_json::to_vec(&bare).unwrap().len();
        assert!(bytes >= MIN_TASK_JSON_BYTES, "{bytes} bytes");
    }
}
