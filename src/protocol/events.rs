//! The event catalogue: every event omoi publishes, with its wire type name.
//!
//! On the wire an event is an [`Envelope`]:
//! `{"v":1,"id":"<uuid>","time":"<RFC 3339>","type":"task.completed","data":{…}}`.
//! The subject is `<namespace>.<type>`; `id` is also the `Nats-Msg-Id` header, so JetStream drops
//! a re-published copy. Field names in `data` are a public contract (docs/protocol.md).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{AgentId, AgentStatus, TaskId, TaskStatus, WorkflowId, WorkflowStatus};

/// Version of the envelope and event schemas.
pub const EVENT_SCHEMA_VERSION: u32 = 1;

/// One event as published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Envelope {
    pub v: u32,
    pub id: Uuid,
    pub time: DateTime<Utc>,
    #[serde(flatten)]
    pub event: Event,
}

impl Envelope {
    /// Wraps `event` with a fresh id and the current time.
    pub fn new(event: Event) -> Self {
        Self {
            v: EVENT_SCHEMA_VERSION,
            id: Uuid::now_v7(),
            time: Utc::now(),
            event,
        }
    }
}

/// Every event type. The serde name is the wire `type` and the subject suffix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", content = "data")]
pub enum Event {
    #[serde(rename = "agent.registered")]
    AgentRegistered(AgentRegistered),
    #[serde(rename = "agent.capability.updated")]
    AgentCapabilityUpdated(AgentCapabilityUpdated),
    #[serde(rename = "agent.status.changed")]
    AgentStatusChanged(AgentStatusChanged),
    #[serde(rename = "agent.deregistered")]
    AgentDeregistered(AgentDeregistered),
    #[serde(rename = "task.ready")]
    TaskReady(TaskEvent),
    #[serde(rename = "task.assigned")]
    TaskAssigned(TaskEvent),
    #[serde(rename = "task.started")]
    TaskStarted(TaskEvent),
    #[serde(rename = "task.completed")]
    TaskCompleted(TaskEvent),
    #[serde(rename = "task.retrying")]
    TaskRetrying(TaskEvent),
    #[serde(rename = "task.failed")]
    TaskFailed(TaskEvent),
    #[serde(rename = "task.cancelled")]
    TaskCancelled(TaskEvent),
    #[serde(rename = "workflow.created")]
    WorkflowCreated(WorkflowEvent),
    #[serde(rename = "workflow.completed")]
    WorkflowCompleted(WorkflowEvent),
    #[serde(rename = "workflow.failed")]
    WorkflowFailed(WorkflowEvent),
    #[serde(rename = "workflow.cancelled")]
    WorkflowCancelled(WorkflowEvent),
    #[serde(rename = "agent.collab.started")]
    CollabStarted(CollabStarted),
    #[serde(rename = "agent.collab.ended")]
    CollabEnded(CollabEnded),
    #[serde(rename = "agent.message.sent")]
    MessageSent(MessageSent),
    #[serde(rename = "agent.handoff.requested")]
    HandoffRequested(HandoffEvent),
    #[serde(rename = "agent.handoff.accepted")]
    HandoffAccepted(HandoffEvent),
    #[serde(rename = "agent.handoff.declined")]
    HandoffDeclined(HandoffEvent),
    #[serde(rename = "agent.handoff.expired")]
    HandoffExpired(HandoffEvent),
    #[serde(rename = "agent.handoff.cancelled")]
    HandoffCancelled(HandoffEvent),
    #[serde(rename = "coordination.sync.created")]
    SyncCreated(CoordinationEvent),
    #[serde(rename = "coordination.sync.ready")]
    SyncReady(CoordinationEvent),
    #[serde(rename = "coordination.split.created")]
    SplitCreated(CoordinationEvent),
    #[serde(rename = "coordination.merge.completed")]
    MergeCompleted(CoordinationEvent),
    #[serde(rename = "coordination.loop.iteration")]
    LoopIteration(CoordinationEvent),
    #[serde(rename = "coordination.loop.completed")]
    LoopCompleted(CoordinationEvent),
}

impl Event {
    /// Every wire type, in catalogue order (used to build stream subjects and the docs).
    pub const TYPES: &'static [&'static str] = &[
        "agent.registered",
        "agent.capability.updated",
        "agent.status.changed",
        "agent.deregistered",
        "task.ready",
        "task.assigned",
        "task.started",
        "task.completed",
        "task.retrying",
        "task.failed",
        "task.cancelled",
        "workflow.created",
        "workflow.completed",
        "workflow.failed",
        "workflow.cancelled",
        "agent.collab.started",
        "agent.collab.ended",
        "agent.message.sent",
        "agent.handoff.requested",
        "agent.handoff.accepted",
        "agent.handoff.declined",
        "agent.handoff.expired",
        "agent.handoff.cancelled",
        "coordination.sync.created",
        "coordination.sync.ready",
        "coordination.split.created",
        "coordination.merge.completed",
        "coordination.loop.iteration",
        "coordination.loop.completed",
    ];

    /// The task of a `task.*` event.
    pub fn task(&self) -> Option<&TaskEvent> {
        match self {
            Event::TaskReady(t)
            | Event::TaskAssigned(t)
            | Event::TaskStarted(t)
            | Event::TaskCompleted(t)
            | Event::TaskRetrying(t)
            | Event::TaskFailed(t)
            | Event::TaskCancelled(t) => Some(t),
            _ => None,
        }
    }

    /// The workflow of a `workflow.*` event.
    pub fn workflow(&self) -> Option<&WorkflowEvent> {
        match self {
            Event::WorkflowCreated(w)
            | Event::WorkflowCompleted(w)
            | Event::WorkflowFailed(w)
            | Event::WorkflowCancelled(w) => Some(w),
            _ => None,
        }
    }

    /// The wire type, e.g. `task.completed`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::AgentRegistered(_) => "agent.registered",
            Self::AgentCapabilityUpdated(_) => "agent.capability.updated",
            Self::AgentStatusChanged(_) => "agent.status.changed",
            Self::AgentDeregistered(_) => "agent.deregistered",
            Self::TaskReady(_) => "task.ready",
            Self::TaskAssigned(_) => "task.assigned",
            Self::TaskStarted(_) => "task.started",
            Self::TaskCompleted(_) => "task.completed",
            Self::TaskRetrying(_) => "task.retrying",
            Self::TaskFailed(_) => "task.failed",
            Self::TaskCancelled(_) => "task.cancelled",
            Self::WorkflowCreated(_) => "workflow.created",
            Self::WorkflowCompleted(_) => "workflow.completed",
            Self::WorkflowFailed(_) => "workflow.failed",
            Self::WorkflowCancelled(_) => "workflow.cancelled",
            Self::CollabStarted(_) => "agent.collab.started",
            Self::CollabEnded(_) => "agent.collab.ended",
            Self::MessageSent(_) => "agent.message.sent",
            Self::HandoffRequested(_) => "agent.handoff.requested",
            Self::HandoffAccepted(_) => "agent.handoff.accepted",
            Self::HandoffDeclined(_) => "agent.handoff.declined",
            Self::HandoffExpired(_) => "agent.handoff.expired",
            Self::HandoffCancelled(_) => "agent.handoff.cancelled",
            Self::SyncCreated(_) => "coordination.sync.created",
            Self::SyncReady(_) => "coordination.sync.ready",
            Self::SplitCreated(_) => "coordination.split.created",
            Self::MergeCompleted(_) => "coordination.merge.completed",
            Self::LoopIteration(_) => "coordination.loop.iteration",
            Self::LoopCompleted(_) => "coordination.loop.completed",
        }
    }

    /// The task event for a task entering `status`, if that status has one.
    pub fn for_task_status(status: TaskStatus, data: TaskEvent) -> Option<Event> {
        Some(match status {
            TaskStatus::Ready => Self::TaskReady(data),
            TaskStatus::Assigned => Self::TaskAssigned(data),
            TaskStatus::Running => Self::TaskStarted(data),
            TaskStatus::Completed => Self::TaskCompleted(data),
            TaskStatus::RetryWait => Self::TaskRetrying(data),
            TaskStatus::Failed => Self::TaskFailed(data),
            TaskStatus::Cancelled => Self::TaskCancelled(data),
            TaskStatus::Pending => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AgentRegistered {
    pub agent_id: AgentId,
    pub name: String,
    pub agent_type: String,
    pub capabilities: Vec<String>,
    pub capacity: i32,
}

/// Published on register and whenever the normalised capability set really changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AgentCapabilityUpdated {
    pub agent_id: AgentId,
    pub capabilities: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AgentStatusChanged {
    pub agent_id: AgentId,
    pub from: AgentStatus,
    pub to: AgentStatus,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AgentDeregistered {
    pub agent_id: AgentId,
    pub name: String,
}

/// Data of every `task.*` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TaskEvent {
    pub task_id: TaskId,
    pub workflow_id: WorkflowId,
    pub key: String,
    pub status: TaskStatus,
    /// The attempt (fencing token) the event belongs to; 0 before the first dispatch.
    pub attempt: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<AgentId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For `task.retrying`: when the next attempt becomes ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<DateTime<Utc>>,
    /// For `task.completed`: how long the attempt waited for its resource locks, as its agent
    /// reported (the spec's `lock.wait_time`, per task).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_wait_ms: Option<i64>,
}

/// A collaboration thread was opened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CollabStarted {
    pub thread_id: Uuid,
    pub thread_type: String,
    pub participants: Vec<AgentId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<WorkflowId>,
}

/// A collaboration thread was closed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CollabEnded {
    pub thread_id: Uuid,
    pub status: String,
    pub participants: Vec<AgentId>,
}

/// A message between agents (also delivered to each recipient's inbox).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MessageSent {
    pub message_id: Uuid,
    pub thread_id: Uuid,
    pub sender_id: AgentId,
    /// `None`: to every participant but the sender.
    #[serde(default)]
    pub recipient_id: Option<AgentId>,
    pub recipients: Vec<AgentId>,
    pub message_type: String,
    pub content: String,
    #[serde(default)]
    pub metadata: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// Data of every `agent.handoff.*` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HandoffEvent {
    pub handoff_id: Uuid,
    pub task_id: TaskId,
    pub from_agent_id: AgentId,
    #[serde(default)]
    pub to_agent_id: Option<AgentId>,
    #[serde(default)]
    pub capabilities: Vec<String>,
    pub status: String,
    #[serde(default)]
    pub decided_by: Option<AgentId>,
    #[serde(default)]
    pub reason: String,
}

/// Data of every `coordination.*` event: the node, and what it did.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CoordinationEvent {
    pub workflow_id: WorkflowId,
    pub task_id: TaskId,
    pub key: String,
    /// sync.created: its sources; sync.ready: the sources that completed; merge.completed: the
    /// outputs merged, in completion order; split.created and loop.iteration: the tasks inserted.
    #[serde(default)]
    pub tasks: Vec<String>,
    /// sync: completed sources required (`None`: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<i32>,
    /// sync.created: its timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i32>,
    /// sync.ready: released by its timeout rather than its join.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    /// merge.completed: the strategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// merge.completed: the merged value; loop.completed: the loop's output — when under
    /// 64 KiB (otherwise absent: read the node's `output`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// loop.*: the iteration inserted, or the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iteration: Option<u32>,
}

/// Data of every `workflow.*` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WorkflowEvent {
    pub workflow_id: WorkflowId,
    pub name: String,
    pub status: WorkflowStatus,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_wire_shape_is_flat() {
        let env = Envelope::new(Event::AgentDeregistered(AgentDeregistered {
            agent_id: AgentId::new(),
            name: "a1".into(),
        }));
        let v = serde_json::to_value(&env).unwrap();
        assert_eq!(v["v"], 1);
        assert_eq!(v["type"], "agent.deregistered");
        assert_eq!(v["data"]["name"], "a1");
        let back: Envelope = serde_json::from_value(v).unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn kind_matches_the_serde_name_for_every_variant() {
        let task = TaskEvent {
            task_id: TaskId::new(),
            workflow_id: WorkflowId::new(),
            key: "k".into(),
            status: TaskStatus::Ready,
            attempt: 0,
            agent_id: None,
            error: None,
            retry_at: None,
            lock_wait_ms: None,
        };
        let wf = WorkflowEvent {
            workflow_id: WorkflowId::new(),
            name: "w".into(),
            status: WorkflowStatus::Running,
        };
        let agent = AgentId::new();
        let all = vec![
            Event::AgentRegistered(AgentRegistered {
                agent_id: agent,
                name: "n".into(),
                agent_type: "worker".into(),
                capabilities: vec![],
                capacity: 1,
            }),
            Event::AgentCapabilityUpdated(AgentCapabilityUpdated {
                agent_id: agent,
                capabilities: vec![],
                added: vec![],
                removed: vec![],
            }),
            Event::AgentStatusChanged(AgentStatusChanged {
                agent_id: agent,
                from: AgentStatus::Idle,
                to: AgentStatus::Stale,
                reason: "r".into(),
            }),
            Event::AgentDeregistered(AgentDeregistered {
                agent_id: agent,
                name: "n".into(),
            }),
            Event::TaskReady(task.clone()),
            Event::TaskAssigned(task.clone()),
            Event::TaskStarted(task.clone()),
            Event::TaskCompleted(task.clone()),
            Event::TaskRetrying(task.clone()),
            Event::TaskFailed(task.clone()),
            Event::TaskCancelled(task),
            Event::WorkflowCreated(wf.clone()),
            Event::WorkflowCompleted(wf.clone()),
            Event::WorkflowFailed(wf.clone()),
            Event::WorkflowCancelled(wf),
        ];
        let mut all = all;
        let thread = Uuid::now_v7();
        let handoff = HandoffEvent {
            handoff_id: Uuid::now_v7(),
            task_id: TaskId::new(),
            from_agent_id: agent,
            to_agent_id: None,
            capabilities: vec!["x".into()],
            status: "requested".into(),
            decided_by: None,
            reason: String::new(),
        };
        all.extend([
            Event::CollabStarted(CollabStarted {
                thread_id: thread,
                thread_type: "review".into(),
                participants: vec![agent],
                task_id: None,
                workflow_id: None,
            }),
            Event::CollabEnded(CollabEnded {
                thread_id: thread,
                status: "resolved".into(),
                participants: vec![agent],
            }),
            Event::MessageSent(MessageSent {
                message_id: Uuid::now_v7(),
                thread_id: thread,
                sender_id: agent,
                recipient_id: None,
                recipients: vec![],
                message_type: "text".into(),
                content: "hi".into(),
                metadata: serde_json::json!({}),
                created_at: Utc::now(),
            }),
            Event::HandoffRequested(handoff.clone()),
            Event::HandoffAccepted(handoff.clone()),
            Event::HandoffDeclined(handoff.clone()),
            Event::HandoffExpired(handoff.clone()),
            Event::HandoffCancelled(handoff),
        ]);
        let node = CoordinationEvent::default();
        all.extend([
            Event::SyncCreated(node.clone()),
            Event::SyncReady(node.clone()),
            Event::SplitCreated(node.clone()),
            Event::MergeCompleted(node.clone()),
            Event::LoopIteration(node.clone()),
            Event::LoopCompleted(node),
        ]);
        assert_eq!(all.len(), Event::TYPES.len());
        for (ev, ty) in all.iter().zip(Event::TYPES) {
            assert_eq!(ev.kind(), *ty);
            assert_eq!(serde_json::to_value(ev).unwrap()["type"], *ty);
        }
    }
}
