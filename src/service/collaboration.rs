//! Collaboration between agents: threads, messages delivered durably to each recipient's
//! inbox (`<ns>.agent.inbox.<agent_id>`, stream `<ns>_inbox`), and handoffs — a persisted state
//! machine `requested → accepted | declined | expired | cancelled` whose every transition is a
//! compare-and-set, and whose acceptance really moves the task to the acceptor.

use std::sync::Arc;

use async_nats::jetstream::message::PublishMessage;
use chrono::Utc;
use sqlx::PgPool;
use tokio::sync::Notify;
use uuid::Uuid;

use super::ServiceError;
use super::registry::normalize;
use super::workflows::task_events;
use crate::bus::EventBus;
use crate::db::DbError;
use crate::db::collaboration as collab;
use crate::domain::{AgentId, AgentStatus, TaskId};
use crate::protocol::Event;
use crate::protocol::collaboration::{
    CreateThread, Handoff, HandoffRequest, InboxItem, Message, MessagePage, SendMessage, Thread,
};
use crate::protocol::events::{CollabEnded, CollabStarted, HandoffEvent, MessageSent};
use crate::protocol::registry::AgentRecord;
use crate::protocol::workflows::TaskRecord;

/// How many best-fit agents an open handoff is offered to.
pub const OPEN_HANDOFF_OFFERS: usize = 5;

/// Longest a handoff may wait for a decision.
pub const MAX_HANDOFF_TTL_SECONDS: u64 = 30 * 86_400;

/// Largest message content accepted.
pub const MAX_CONTENT_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub struct Collaboration {
    pool: PgPool,
    bus: EventBus,
    default_ttl: std::time::Duration,
    wake: Arc<Notify>,
    /// Heartbeat freshness window, for ranking whom to offer an open handoff.
    stale_after_ms: i64,
}

/// Longest free text (a title, a reason) and largest JSON (metadata, context) accepted.
pub const MAX_TEXT_CHARS: usize = 4_000;
pub const MAX_JSON_BYTES: usize = 64 * 1024;

fn check_text(field: &str, text: &str) -> Result<(), ServiceError> {
    let n = text.chars().count();
    if n > MAX_TEXT_CHARS {
        return Err(ServiceError::validation(
            field,
            format!("is {n} characters; at most {MAX_TEXT_CHARS}"),
        ));
    }
    Ok(())
}

fn check_json(field: &str, value: Option<&serde_json::Value>) -> Result<(), ServiceError> {
    let Some(value) = value else { return Ok(()) };
    let size = serde_json::to_vec(value)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > MAX_JSON_BYTES {
        return Err(ServiceError::TooLarge {
            message: format!("{field} is {size} bytes; at most {MAX_JSON_BYTES}"),
        });
    }
    Ok(())
}

/// A message type: 1 to 64 of `a-z 0-9 _ . : -`.
fn check_message_type(t: &str) -> Result<(), ServiceError> {
    let ok = !t.is_empty()
        && t.len() <= 64
        && t.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.:-".contains(c));
    if !ok {
        return Err(ServiceError::validation(
            "message_type",
            "must be 1 to 64 of a-z 0-9 _ . : -",
        ));
    }
    Ok(())
}

fn db(e: sqlx::Error) -> ServiceError {
    ServiceError::from(DbError::from(e))
}

impl Handoff {
    fn event(&self) -> HandoffEvent {
        HandoffEvent {
            handoff_id: self.id,
            task_id: self.task_id,
            from_agent_id: self.from_agent_id,
            to_agent_id: self.to_agent_id,
            capabilities: self.capabilities.clone(),
            status: self.status.clone(),
            decided_by: self.decided_by,
            reason: self
                .decision_reason
                .clone()
                .unwrap_or_else(|| self.reason.clone()),
        }
    }

    fn status_event(&self) -> Event {
        let e = self.event();
        match self.status.as_str() {
            "accepted" => Event::HandoffAccepted(e),
            "declined" => Event::HandoffDeclined(e),
            "expired" => Event::HandoffExpired(e),
            "cancelled" => Event::HandoffCancelled(e),
            _ => Event::HandoffRequested(e),
        }
    }
}

impl Collaboration {
    pub fn new(
        pool: PgPool,
        bus: EventBus,
        default_ttl: std::time::Duration,
        wake: Arc<Notify>,
        stale_after_ms: i64,
    ) -> Self {
        Self {
            pool,
            bus,
            default_ttl,
            wake,
            stale_after_ms,
        }
    }

    async fn live_agent(&self, id: AgentId, role: &str) -> Result<AgentRecord, ServiceError> {
        crate::db::agents::get(&self.pool, id)
            .await
            .ok()
            .filter(|a| a.status != AgentStatus::Terminated)
            .ok_or_else(|| ServiceError::NotFound(format!("{role} agent {id} not found")))
    }

    pub async fn create_thread(&self, req: CreateThread) -> Result<Thread, ServiceError> {
        check_text("title", req.title.as_deref().unwrap_or_default())?;
        check_json("metadata", req.metadata.as_ref())?;
        if req.participants.len() > 100 {
            return Err(ServiceError::validation(
                "participants",
                "at most 100 agents take part in a thread",
            ));
        }
        let mut participants = req.participants.clone();
        participants.sort();
        participants.dedup();
        if participants.is_empty() {
            return Err(ServiceError::validation(
                "participants",
                "must name at least one agent",
            ));
        }
        for p in &participants {
            self.live_agent(*p, "participant").await?;
        }
        if let Some(t) = req.task_id {
            crate::db::tasks::get(&self.pool, t).await?;
        }
        let metadata = req
            .metadata
            .clone()
            .unwrap_or_else(|| serde_json::json!({}));
        let thread = collab::insert_thread(
            &self.pool,
            &collab::NewThread {
                thread_type: req.thread_type.as_str(),
                participants: &participants,
                task_id: req.task_id,
                workflow_id: req.workflow_id,
                title: req.title.as_deref(),
                metadata: &metadata,
            },
        )
        .await?;
        self.bus
            .publish(Event::CollabStarted(CollabStarted {
                thread_id: thread.id,
                thread_type: thread.thread_type.clone(),
                participants: thread.participants.clone(),
                task_id: thread.task_id,
                workflow_id: thread.workflow_id,
            }))
            .await?;
        Ok(thread)
    }

    /// Thread `id`, if `agent` takes part in it (`forbidden` otherwise): only participants
    /// read or close a thread over NATS.
    pub async fn participant(&self, id: Uuid, agent: AgentId) -> Result<Thread, ServiceError> {
        let thread = self.get_thread(id).await?;
        if thread.participants.contains(&agent) {
            Ok(thread)
        } else {
            Err(ServiceError::Forbidden(format!(
                "agent {agent} does not take part in thread {id}"
            )))
        }
    }

    pub async fn get_thread(&self, id: Uuid) -> Result<Thread, ServiceError> {
        Ok(collab::get_thread(&self.pool, id).await?)
    }

    /// Threads by participant, task and status (any combination), newest first.
    pub async fn list_threads(
        &self,
        agent: Option<AgentId>,
        task: Option<TaskId>,
        status: Option<String>,
        limit: i64,
    ) -> Result<Vec<Thread>, ServiceError> {
        Ok(collab::list_threads(&self.pool, agent, task, status.as_deref(), limit).await?)
    }

    /// Closes a thread: `resolved` (default) or `abandoned`.
    pub async fn close_thread(
        &self,
        id: Uuid,
        status: Option<String>,
    ) -> Result<Thread, ServiceError> {
        let status = status.unwrap_or_else(|| "resolved".into());
        if !matches!(status.as_str(), "resolved" | "abandoned") {
            return Err(ServiceError::validation(
                "status",
                "must be resolved or abandoned",
            ));
        }
        let thread = collab::close_thread(&self.pool, id, &status).await?;
        let Some(thread) = thread else {
            let current = self.get_thread(id).await?;
            return Err(ServiceError::Conflict(format!(
                "thread {id} is already {}",
                current.status
            )));
        };
        self.bus
            .publish(Event::CollabEnded(CollabEnded {
                thread_id: id,
                status: thread.status.clone(),
                participants: thread.participants.clone(),
            }))
            .await?;
        Ok(thread)
    }

    /// Stores a message, then delivers it to each recipient's inbox and announces it.
    pub async fn send_message(&self, req: SendMessage) -> Result<Message, ServiceError> {
        check_message_type(&req.message_type)?;
        check_json("metadata", req.metadata.as_ref())?;
        if req.content.len() > MAX_CONTENT_BYTES {
            return Err(ServiceError::TooLarge {
                message: format!(
                    "content is {} bytes; the limit is {MAX_CONTENT_BYTES}",
                    req.content.len()
                ),
            });
        }
        let thread = self.get_thread(req.thread_id).await?;
        if thread.status != "active" {
            return Err(ServiceError::Conflict(format!(
                "thread {} is {}",
                thread.id, thread.status
            )));
        }
        if !thread.participants.contains(&req.sender_id) {
            return Err(ServiceError::Forbidden(format!(
                "agent {} is not a participant of thread {}",
                req.sender_id, thread.id
            )));
        }
        if let Some(r) = req.recipient_id {
            if !thread.participants.contains(&r) {
                return Err(ServiceError::Forbidden(format!(
                    "recipient {r} is not a participant of thread {}",
                    thread.id
                )));
            }
        }
        let metadata = req
            .metadata
            .clone()
            .unwrap_or_else(|| serde_json::json!({}));
        let message = collab::insert_message(
            &self.pool,
            &collab::NewMessage {
                thread_id: thread.id,
                sender_id: req.sender_id,
                recipient_id: req.recipient_id,
                message_type: &req.message_type,
                content: &req.content,
                metadata: &metadata,
            },
        )
        .await?;
        let recipients: Vec<AgentId> = match req.recipient_id {
            Some(r) => vec![r],
            None => thread
                .participants
                .iter()
                .copied()
                .filter(|p| *p != req.sender_id)
                .collect(),
        };
        let sent = MessageSent {
            message_id: message.id,
            thread_id: thread.id,
            sender_id: message.sender_id,
            recipient_id: message.recipient_id,
            recipients: recipients.clone(),
            message_type: message.message_type.clone(),
            content: message.content.clone(),
            metadata: message.metadata.clone(),
            created_at: message.created_at,
        };
        for r in &recipients {
            self.deliver(
                *r,
                &format!("msg:{}:{r}", message.id),
                &InboxItem::Message(sent.clone()),
            )
            .await?;
        }
        self.bus.publish(Event::MessageSent(sent)).await?;
        Ok(message)
    }

    /// Publishes to `<ns>.agent.inbox.<agent>` (stored until the agent's worker reads it).
    async fn deliver(
        &self,
        agent: AgentId,
        msg_id: &str,
        item: &InboxItem,
    ) -> Result<(), ServiceError> {
        let names = self.bus.names();
        let payload =
            serde_json::to_vec(item).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let subject = names.inbox(agent);
        let ack = self
            .bus
            .jetstream()
            .send_publish(
                subject,
                PublishMessage::build()
                    .payload(payload.into())
                    .message_id(msg_id),
            )
            .await
            .map_err(|e| ServiceError::Internal(format!("inbox of {agent}: {e}")))?;
        ack.await
            .map_err(|e| ServiceError::Internal(format!("inbox of {agent}: {e}")))?;
        Ok(())
    }

    /// Messages of a thread, newest first; `before` is the cursor; `unread_for` keeps only what
    /// that agent has not read (and did not send).
    pub async fn list_messages(
        &self,
        thread: Uuid,
        before: Option<Uuid>,
        unread_for: Option<AgentId>,
        limit: i64,
    ) -> Result<MessagePage, ServiceError> {
        self.get_thread(thread).await?;
        let limit = limit.clamp(1, 500);
        let messages = collab::list_messages(&self.pool, thread, before, unread_for, limit).await?;
        let next_cursor = (messages.len() as i64 == limit)
            .then(|| messages.last().map(|m| m.id))
            .flatten();
        Ok(MessagePage {
            messages,
            next_cursor,
        })
    }

    /// Records that `agent` read the message.
    pub async fn mark_read(&self, message: Uuid, agent: AgentId) -> Result<Message, ServiceError> {
        let m = collab::get_message(&self.pool, message).await?;
        let thread = self.get_thread(m.thread_id).await?;
        if !thread.participants.contains(&agent) {
            return Err(ServiceError::Forbidden(format!(
                "agent {agent} is not a participant"
            )));
        }
        Ok(collab::mark_read(&self.pool, message, agent).await?)
    }

    pub async fn get_handoff(&self, id: Uuid) -> Result<Handoff, ServiceError> {
        Ok(collab::get_handoff(&self.pool, id).await?)
    }

    /// Records a handoff request and offers it: to the named target, or (open handoff) to the
    /// best-fit live agents that have every capability.
    pub async fn request_handoff(&self, req: HandoffRequest) -> Result<Handoff, ServiceError> {
        check_text("reason", &req.reason)?;
        check_json("context", req.context.as_ref())?;
        let task = crate::db::tasks::get(&self.pool, req.task_id).await?;
        if task.status.is_terminal() {
            return Err(ServiceError::Conflict(format!(
                "task {} is {}",
                task.id, task.status
            )));
        }
        self.live_agent(req.from_agent_id, "requesting").await?;
        let capabilities = normalize("capabilities", &req.capabilities)?;
        match req.to_agent_id {
            Some(to) => {
                self.live_agent(to, "target").await?;
                if to == req.from_agent_id {
                    return Err(ServiceError::validation(
                        "to_agent_id",
                        "cannot hand off to oneself",
                    ));
                }
            }
            None if capabilities.is_empty() => {
                return Err(ServiceError::validation(
                    "to_agent_id",
                    "name a target agent or the capabilities an open handoff needs",
                ));
            }
            None => {}
        }
        if !matches!(req.on_decline.as_str(), "reschedule" | "requester") {
            return Err(ServiceError::validation(
                "on_decline",
                "must be reschedule or requester",
            ));
        }
        if let Some(ttl) = req.ttl_seconds {
            if !(1..=MAX_HANDOFF_TTL_SECONDS).contains(&ttl) {
                return Err(ServiceError::validation(
                    "ttl_seconds",
                    format!("must be 1 to {MAX_HANDOFF_TTL_SECONDS} (30 days), got {ttl}"),
                ));
            }
        }
        let ttl = req
            .ttl_seconds
            .map(std::time::Duration::from_secs)
            .unwrap_or(self.default_ttl);
        let expires_at = chrono::Duration::from_std(ttl)
            .ok()
            .and_then(|d| Utc::now().checked_add_signed(d))
            .ok_or_else(|| ServiceError::validation("ttl_seconds", "is too far in the future"))?;
        let mut tx = self.pool.begin().await.map_err(db)?;
        let mut released = None;
        if req.release {
            // Parked in retry_wait until the decision; expiry makes it ready again on its own.
            released = collab::park_for_handoff(
                &mut *tx,
                req.task_id,
                req.from_agent_id,
                req.attempt,
                expires_at,
            )
            .await?;
            if released.is_none() {
                return Err(ServiceError::Conflict(format!(
                    "task {} is not held by agent {} at that attempt",
                    req.task_id, req.from_agent_id
                )));
            }
        }
        let context = req.context.clone().unwrap_or_else(|| serde_json::json!({}));
        let handoff = collab::insert_handoff(
            &mut *tx,
            &collab::NewHandoff {
                task_id: req.task_id,
                thread_id: req.thread_id,
                from_agent_id: req.from_agent_id,
                to_agent_id: req.to_agent_id,
                capabilities: &capabilities,
                reason: &req.reason,
                context: &context,
                on_decline: &req.on_decline,
                expires_at,
                parked_attempt: released.as_ref().map(|t| t.attempt),
            },
        )
        .await?;
        tx.commit().await.map_err(db)?;
        let offer = InboxItem::HandoffOffer(handoff.event());
        let offered: Vec<AgentId> = match handoff.to_agent_id {
            Some(to) => vec![to],
            None => {
                // The registry's best-fit ranking picks whom to offer it to.
                let eligible = self.eligible(&handoff).await?;
                let snapshots: Vec<_> = eligible.iter().map(super::registry::snapshot).collect();
                let req = crate::domain::matching::Requirements {
                    capabilities: handoff.capabilities.clone(),
                    ..Default::default()
                };
                crate::domain::matching::rank(&snapshots, &req, Utc::now(), self.stale_after_ms)
                    .into_iter()
                    .take(OPEN_HANDOFF_OFFERS)
                    .map(|r| eligible[r.index].id)
                    .collect()
            }
        };
        for agent in offered {
            self.deliver(agent, &format!("handoff:{}:{agent}", handoff.id), &offer)
                .await?;
        }
        let mut events = vec![handoff.status_event()];
        events.extend(task_events(released.iter()));
        self.bus.publish_all(events).await?;
        Ok(handoff)
    }

    /// Live agents (other than the requester) that may accept an open handoff, best fit first.
    async fn eligible(&self, h: &Handoff) -> Result<Vec<AgentRecord>, ServiceError> {
        Ok(collab::handoff_candidates(&self.pool, &h.capabilities, h.from_agent_id).await?)
    }

    async fn check_eligible(&self, h: &Handoff, agent: AgentId) -> Result<(), ServiceError> {
        let ok = match h.to_agent_id {
            Some(to) => to == agent,
            None => self.eligible(h).await?.iter().any(|a| a.id == agent),
        };
        if ok {
            Ok(())
        } else {
            Err(ServiceError::Forbidden(format!(
                "agent {agent} is not eligible for handoff {}",
                h.id
            )))
        }
    }

    /// Decides a requested handoff with a compare-and-set; a second decision is a conflict.
    async fn decide(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        id: Uuid,
        status: &str,
        by: Option<AgentId>,
        reason: Option<&str>,
    ) -> Result<Handoff, ServiceError> {
        let decided = collab::decide_handoff(&mut **tx, id, status, by, reason).await?;
        match decided {
            Some(h) => Ok(h),
            None => {
                let current = self.get_handoff(id).await?;
                Err(ServiceError::Conflict(format!(
                    "handoff {id} is already {}",
                    current.status
                )))
            }
        }
    }

    /// Accepts: the task moves to the acceptor as a new attempt (the old holder's is fenced
    /// off and its worker stops it), with the handoff's context in `input.handoff`.
    pub async fn accept(&self, id: Uuid, agent: AgentId) -> Result<Handoff, ServiceError> {
        let h = self.get_handoff(id).await?;
        if h.status != "requested" {
            return Err(ServiceError::Conflict(format!(
                "handoff {id} is already {}",
                h.status
            )));
        }
        if h.expires_at < Utc::now() {
            self.expire_due().await?;
            return Err(ServiceError::Conflict(format!("handoff {id} has expired")));
        }
        self.check_eligible(&h, agent).await?;
        let mut tx = self.pool.begin().await.map_err(db)?;
        let accepted = self
            .decide(&mut tx, id, "accepted", Some(agent), None)
            .await?;
        let handoff_input = serde_json::json!({
            "handoff": {"id": id, "from_agent_id": h.from_agent_id, "reason": h.reason, "context": h.context}
        });
        let moved = collab::move_to_acceptor(&mut *tx, h.task_id, agent, &handoff_input).await?;
        let Some(task) = moved else {
            return Err(ServiceError::Conflict(format!(
                "task {} has already finished",
                h.task_id
            )));
        };
        tx.commit().await.map_err(db)?;
        tracing::info!(handoff.id = %id, task.id = %task.id, to = %agent, "handoff accepted; task moves");
        let mut events = vec![accepted.status_event()];
        events.extend(task_events([&task]));
        self.bus.publish_all(events).await?;
        self.wake.notify_one();
        Ok(accepted)
    }

    /// Declines; the task goes back to the scheduler (`reschedule`) or stays with the requester.
    pub async fn decline(
        &self,
        id: Uuid,
        agent: AgentId,
        reason: Option<String>,
    ) -> Result<Handoff, ServiceError> {
        check_text("reason", reason.as_deref().unwrap_or_default())?;
        let h = self.get_handoff(id).await?;
        if h.status != "requested" {
            return Err(ServiceError::Conflict(format!(
                "handoff {id} is already {}",
                h.status
            )));
        }
        self.check_eligible(&h, agent).await?;
        let mut tx = self.pool.begin().await.map_err(db)?;
        let declined = self
            .decide(&mut tx, id, "declined", Some(agent), reason.as_deref())
            .await?;
        let task = self.return_to_scheduler(&mut tx, &declined).await?;
        tx.commit().await.map_err(db)?;
        let mut events = vec![declined.status_event()];
        events.extend(task_events(task.iter()));
        self.bus.publish_all(events).await?;
        self.wake.notify_one();
        Ok(declined)
    }

    /// The requester withdraws its request.
    pub async fn cancel(&self, id: Uuid, agent: AgentId) -> Result<Handoff, ServiceError> {
        let h = self.get_handoff(id).await?;
        if h.from_agent_id != agent {
            return Err(ServiceError::Forbidden(
                "only the requester can cancel a handoff".into(),
            ));
        }
        let mut tx = self.pool.begin().await.map_err(db)?;
        let cancelled = self
            .decide(&mut tx, id, "cancelled", Some(agent), None)
            .await?;
        tx.commit().await.map_err(db)?;
        self.bus.publish(cancelled.status_event()).await?;
        Ok(cancelled)
    }

    /// Expires requested handoffs past their time (run by the leader); each then behaves as a
    /// decline.
    pub async fn expire_due(&self) -> Result<Vec<Handoff>, ServiceError> {
        let due = collab::due_handoffs(&self.pool).await?;
        let mut expired = Vec::new();
        for id in due {
            let mut tx = self.pool.begin().await.map_err(db)?;
            let h = match self
                .decide(&mut tx, id, "expired", None, Some("expired"))
                .await
            {
                Ok(h) => h,
                Err(ServiceError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            };
            let task = self.return_to_scheduler(&mut tx, &h).await?;
            tx.commit().await.map_err(db)?;
            let mut events = vec![h.status_event()];
            events.extend(task_events(task.iter()));
            self.bus.publish_all(events).await?;
            expired.push(h);
        }
        if !expired.is_empty() {
            self.wake.notify_one();
        }
        Ok(expired)
    }

    /// `reschedule`: a task still held by the requester goes back to ready for the next best
    /// fit; `requester`: it stays where it is.
    async fn return_to_scheduler(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        h: &Handoff,
    ) -> Result<Option<TaskRecord>, ServiceError> {
        if h.on_decline != "reschedule" {
            return Ok(None);
        }
        // Held by the requester, or parked by it while waiting for this decision.
        Ok(collab::reschedule_handed_off(&mut **tx, h.id).await?)
    }
}
