//! Collaboration on the wire: threads, messages, handoffs and their decisions, and what lands
//! in an agent's durable inbox.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::events::{HandoffEvent, MessageSent};
use crate::domain::{AgentId, TaskId, WorkflowId};

/// What a thread is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ThreadType {
    Handoff,
    Review,
    Consultation,
    Discussion,
    Notification,
}

impl ThreadType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Handoff => "handoff",
            Self::Review => "review",
            Self::Consultation => "consultation",
            Self::Discussion => "discussion",
            Self::Notification => "notification",
        }
    }
}

/// A conversation among agents (the reply to `<ns>.act.<agent_id>.thread`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, schemars::JsonSchema)]
pub struct Thread {
    pub id: Uuid,
    pub thread_type: String,
    pub participants: Vec<AgentId>,
    pub task_id: Option<TaskId>,
    pub workflow_id: Option<WorkflowId>,
    pub title: Option<String>,
    pub status: String,
    pub metadata: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub closed_at: Option<DateTime<Utc>>,
}

/// A stored message (the reply to `<ns>.act.<agent_id>.send` and `.read`); `read_by` lists
/// the agents that marked it read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, schemars::JsonSchema)]
pub struct Message {
    pub id: Uuid,
    pub thread_id: Uuid,
    pub sender_id: AgentId,
    pub recipient_id: Option<AgentId>,
    pub message_type: String,
    pub content: String,
    pub metadata: serde_json::Value,
    pub read_by: Vec<AgentId>,
    pub created_at: DateTime<Utc>,
}

/// A handoff and its state: `requested`, then `accepted`, `declined`, `expired` or
/// `cancelled` (the reply to `<ns>.act.<agent_id>.handoff|accept|decline|cancel`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, schemars::JsonSchema)]
pub struct Handoff {
    pub id: Uuid,
    pub task_id: TaskId,
    pub thread_id: Option<Uuid>,
    pub from_agent_id: AgentId,
    pub to_agent_id: Option<AgentId>,
    pub capabilities: Vec<String>,
    pub reason: String,
    pub context: serde_json::Value,
    pub on_decline: String,
    pub status: String,
    pub decided_by: Option<AgentId>,
    pub decision_reason: Option<String>,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
}

/// `POST /api/v1/collaboration/threads` and `<ns>.act.<agent_id>.thread` (the acting agent
/// among `participants`).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateThread {
    /// Protocol version (1); any other is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    pub thread_type: ThreadType,
    pub participants: Vec<AgentId>,
    #[serde(default)]
    pub task_id: Option<TaskId>,
    #[serde(default)]
    pub workflow_id: Option<WorkflowId>,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

/// `POST /api/v1/collaboration/messages` and `<ns>.act.<agent_id>.send` (`sender_id` the acting
/// agent). A message goes in a thread: open one first (`thread`).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SendMessage {
    /// Protocol version (1); any other is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    pub thread_id: Uuid,
    pub sender_id: AgentId,
    #[serde(default)]
    pub recipient_id: Option<AgentId>,
    #[serde(default = "text")]
    pub message_type: String,
    pub content: String,
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

fn text() -> String {
    "text".into()
}

fn reschedule() -> String {
    "reschedule".into()
}

/// `POST /api/v1/collaboration/handoff/request` and `<ns>.act.<agent_id>.handoff`
/// (`from_agent_id` the acting agent).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HandoffRequest {
    /// Protocol version (1); any other is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    pub task_id: TaskId,
    pub from_agent_id: AgentId,
    /// A named target; or leave it out and give `capabilities` for an open handoff.
    #[serde(default)]
    pub to_agent_id: Option<AgentId>,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub reason: String,
    /// Passed into the task's input (as `input.handoff.context`) when accepted.
    #[serde(default)]
    pub context: Option<serde_json::Value>,
    /// On decline or expiry: `reschedule` (next best fit) or `requester` (leave it be).
    #[serde(default = "reschedule")]
    pub on_decline: String,
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    #[serde(default)]
    pub thread_id: Option<Uuid>,
    /// The requester gives the task up now (it must hold the task, at `attempt` when given): the
    /// task waits for the decision instead of running anywhere.
    #[serde(default)]
    pub release: bool,
    #[serde(default)]
    pub attempt: Option<i32>,
}

/// `<ns>.act.<agent_id>.messages`: a page of a thread's messages, newest first, for one of its
/// participants. Reply: [`MessagePage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListMessages {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    pub thread_id: Uuid,
    /// Messages older than this one (a page's `next_cursor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Uuid>,
    /// Only those the acting agent has not marked read.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unread: bool,
    /// At most this many (1–500, default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
}

/// `<ns>.act.<agent_id>.close`: a participant closes a thread. Reply: the [`Thread`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CloseThread {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    pub thread_id: Uuid,
    /// `resolved` (default) or `abandoned`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// One page of messages, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MessagePage {
    pub messages: Vec<Message>,
    /// Pass as `before` for the next (older) page; `None` at the end.
    pub next_cursor: Option<Uuid>,
}

impl MessagePage {
    /// This page made to fit in `limit` bytes of JSON: its oldest messages are left for the
    /// next page (`next_cursor` then points past the last one kept).
    pub fn fit(mut self, limit: usize) -> Self {
        if super::fits(&self, limit) {
            return self;
        }
        // Each message measured once (a page may hold 500 of 64 KiB): keep the newest whose
        // sizes, with room for the envelope and the cursor, add up to the limit; at least one.
        const ENVELOPE: usize = 128;
        let mut used = ENVELOPE;
        let keep = self
            .messages
            .iter()
            .take_while(|m| {
                used += serde_json::to_vec(m).map_or(usize::MAX / 2, |b| b.len() + 1);
                used <= limit
            })
            .count()
            .max(1);
        self.messages.truncate(keep);
        self.next_cursor = self.messages.last().map(|m| m.id);
        self
    }
}

/// What lands in an agent's inbox (`<ns>.agent.inbox.<agent_id>`), tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InboxItem {
    Message(MessageSent),
    HandoffOffer(HandoffEvent),
}

/// `<ns>.act.<agent_id>.read`: the acting agent has read a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MarkRead {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    pub message_id: uuid::Uuid,
}

/// `<ns>.act.<agent_id>.accept|decline|cancel`: the acting agent decides on (or, as its
/// requester, withdraws) a handoff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HandoffDecision {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    pub handoff_id: uuid::Uuid,
    /// Why (a decline), kept as the handoff's `decision_reason`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(content: &str) -> Message {
        Message {
            id: Uuid::now_v7(),
            thread_id: Uuid::nil(),
            sender_id: AgentId::new(),
            recipient_id: None,
            message_type: "text".into(),
            content: content.into(),
            metadata: serde_json::json!({}),
            read_by: vec![],
            created_at: Utc::now(),
        }
    }

    #[test]
    fn a_page_too_large_for_a_reply_leaves_its_oldest_messages_for_the_next() {
        let big = "x".repeat(40_000);
        let messages: Vec<Message> = (0..10).map(|_| message(&big)).collect();
        let ids: Vec<Uuid> = messages.iter().map(|m| m.id).collect();
        let page = MessagePage {
            messages,
            next_cursor: None,
        }
        .fit(100_000);
        assert_eq!(page.messages.len(), 2, "two of 40 KB fit in 100 KB");
        assert_eq!(
            page.next_cursor,
            Some(ids[1]),
            "the next page starts after the last kept"
        );
        assert!(serde_json::to_vec(&page).unwrap().len() <= 100_000);
        let small = MessagePage {
            messages: vec![message("hi")],
            next_cursor: None,
        }
        .fit(100_000);
        assert_eq!((small.messages.len(), small.next_cursor), (1, None));
    }
}
