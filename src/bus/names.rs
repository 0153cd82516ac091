//! Every subject, stream and KV bucket name omoi uses, built from the namespace. These names
//! are a public contract (docs/protocol.md): users publish to the subjects and inspect the
//! streams and buckets with the `nats` CLI.
//!
//! Where identity matters the acting agent is in the subject, so a NATS server's permissions —
//! not a JSON field — decide who may act as whom (docs/security.md): everything an agent does
//! goes to `<ns>.act.<agent_id>.<verb>` or `<ns>.result.<agent_id>.<task_id>`.
//!
//! | what | name |
//! |---|---|
//! | event of type `T` (e.g. `task.completed`) | `<ns>.T` |
//! | an agent acting (request/reply): register, heartbeat, update, deregister, send, read, thread, messages, close, handoff, accept, decline, cancel | `<ns>.act.<agent_id>.<verb>` |
//! | registry reads (request/reply) | `<ns>.registry.search`, `<ns>.registry.best_fit` |
//! | dead letter of a message first sent on `<ns>.S` | `<ns>.deadletter.S` |
//! | task for an agent | `<ns>.dispatch.<agent_id>` |
//! | an agent's report on a task | `<ns>.result.<agent_id>.<task_id>` |
//! | workflow endpoints (request/reply) | `<ns>.workflow.submit`, `.run`, `.get`, `.cancel` |
//! | an agent's inbox | `<ns>.agent.inbox.<agent_id>` |
//! | streams | `<ns>_events`, `<ns>_dispatch`, `<ns>_results`, `<ns>_inbox`, `<ns>_deadletter` |
//! | KV buckets | `<ns>_agents`, `<ns>_locks`, `<ns>_leases` |
//! | object store | `<ns>_uploads` (submissions too large for one message) |

use crate::domain::AgentId;

/// Stream keys; the stream is named `<ns>_<key>` and defined in `nats/jetstream.yaml`.
pub const STREAM_EVENTS: &str = "events";
pub const STREAM_DEADLETTER: &str = "deadletter";
pub const STREAM_DISPATCH: &str = "dispatch";
pub const STREAM_RESULTS: &str = "results";
pub const STREAM_INBOX: &str = "inbox";
/// Durable consumer of `<ns>_results` used by the scheduler leader.
pub const CONSUMER_SCHEDULER: &str = "scheduler";
/// Bucket keys; the bucket is named `<ns>_<key>`.
pub const BUCKET_AGENTS: &str = "agents";
pub const BUCKET_LEASES: &str = "leases";
pub const BUCKET_LOCKS: &str = "locks";
/// Object store keys; the store is named `<ns>_<key>` (stream `OBJ_<ns>_<key>`).
pub const OBJECT_STORE_UPLOADS: &str = "uploads";

/// What an agent does on `<ns>.act.<agent_id>.<verb>`.
pub const ACT_REGISTER: &str = "register";
pub const ACT_HEARTBEAT: &str = "heartbeat";
pub const ACT_UPDATE: &str = "update";
pub const ACT_DEREGISTER: &str = "deregister";
pub const ACT_SEND: &str = "send";
pub const ACT_READ: &str = "read";
pub const ACT_THREAD: &str = "thread";
pub const ACT_MESSAGES: &str = "messages";
pub const ACT_CLOSE: &str = "close";
pub const ACT_HANDOFF: &str = "handoff";
pub const ACT_ACCEPT: &str = "accept";
pub const ACT_DECLINE: &str = "decline";
pub const ACT_CANCEL: &str = "cancel";
/// Every verb of `<ns>.act.<agent_id>.<verb>`.
pub const ACT_VERBS: &[&str] = &[
    ACT_REGISTER,
    ACT_HEARTBEAT,
    ACT_UPDATE,
    ACT_DEREGISTER,
    ACT_SEND,
    ACT_READ,
    ACT_THREAD,
    ACT_MESSAGES,
    ACT_CLOSE,
    ACT_HANDOFF,
    ACT_ACCEPT,
    ACT_DECLINE,
    ACT_CANCEL,
];
/// The workflow endpoints `<ns>.workflow.<verb>`.
pub const WORKFLOW_VERBS: &[&str] = &["submit", "submit_upload", "run", "get", "cancel"];

/// Header naming why a message was dead-lettered.
pub const HEADER_DEADLETTER_REASON: &str = "Omoi-Deadletter-Reason";
/// Header naming the subject a dead-lettered message was first published on.
pub const HEADER_ORIGINAL_SUBJECT: &str = "Omoi-Original-Subject";

/// Name builder for one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    ns: String,
}

impl Names {
    /// Names for `namespace`, which must follow [`crate::config::validate_namespace`].
    pub fn new(namespace: &str) -> Result<Self, String> {
        crate::config::validate_namespace(namespace)?;
        Ok(Self {
            ns: namespace.to_string(),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// `<ns>_<key>`: the stream for a key of `nats/jetstream.yaml`.
    pub fn stream(&self, key: &str) -> String {
        format!("{}_{key}", self.ns)
    }

    /// `<ns>_<key>`: the KV bucket for a key of `nats/jetstream.yaml`.
    pub fn bucket(&self, key: &str) -> String {
        format!("{}_{key}", self.ns)
    }

    /// `<ns>.<type>` for an event type such as `task.completed`.
    pub fn event(&self, kind: &str) -> String {
        format!("{}.{kind}", self.ns)
    }

    /// `<ns>.act.<agent_id>.<verb>`: `agent` acting (see [`ACT_VERBS`]).
    pub fn act(&self, agent: AgentId, verb: &str) -> String {
        format!("{}.act.{agent}.{verb}", self.ns)
    }

    /// `<ns>.act.*.<verb>`: every agent's `verb` (what the control plane serves).
    pub fn acts(&self, verb: &str) -> String {
        format!("{}.act.*.{verb}", self.ns)
    }

    /// `<ns>.act.<agent_id>.>`: everything `agent` may do (a permission).
    pub fn acts_of(&self, agent: AgentId) -> String {
        format!("{}.act.{agent}.>", self.ns)
    }

    /// The acting agent of `<ns>.act.<agent_id>.<verb>`.
    pub fn acting_agent(&self, subject: &str) -> Option<AgentId> {
        let rest = subject.strip_prefix(&format!("{}.act.", self.ns))?;
        rest.split('.').next()?.parse().ok()
    }

    /// `<ns>.registry.<verb>`: the registry's reads (`search`, `best_fit`).
    pub fn registry(&self, verb: &str) -> String {
        format!("{}.registry.{verb}", self.ns)
    }

    /// `<ns>.dispatch.<agent_id>`: tasks for one agent.
    pub fn dispatch(&self, agent: AgentId) -> String {
        format!("{}.dispatch.{agent}", self.ns)
    }

    /// `agent-<agent_id>`: the durable consumer of an agent's dispatches.
    pub fn dispatch_consumer(&self, agent: AgentId) -> String {
        format!("agent-{agent}")
    }

    /// `<ns>.result.<agent_id>.<task_id>`: `agent`'s report on a task.
    pub fn result(&self, agent: AgentId, task: crate::domain::TaskId) -> String {
        format!("{}.result.{agent}.{task}", self.ns)
    }

    /// `<ns>.result.<agent_id>.>`: every report `agent` may send (a permission).
    pub fn results_of(&self, agent: AgentId) -> String {
        format!("{}.result.{agent}.>", self.ns)
    }

    /// The reporting agent of `<ns>.result.<agent_id>.<task_id>`.
    pub fn result_agent(&self, subject: &str) -> Option<AgentId> {
        let rest = subject.strip_prefix(&format!("{}.result.", self.ns))?;
        rest.split('.').next()?.parse().ok()
    }

    /// `<ns>.workflow.<verb>`: workflow request/reply endpoints (`submit`, `get`, `cancel`).
    pub fn workflow_endpoint(&self, verb: &str) -> String {
        format!("{}.workflow.{verb}", self.ns)
    }

    /// `<ns>.agent.inbox.<agent_id>`: messages for one agent, kept until it reads them.
    pub fn inbox(&self, agent: AgentId) -> String {
        format!("{}.agent.inbox.{agent}", self.ns)
    }

    /// `inbox-<agent_id>`: the durable consumer of an agent's inbox.
    pub fn inbox_consumer(&self, agent: AgentId) -> String {
        format!("inbox-{agent}")
    }

    /// `<ns>.deadletter.<rest>` for a message first sent on `<ns>.<rest>` (or on any other
    /// subject, kept whole).
    pub fn deadletter(&self, original: &str) -> String {
        let prefix = format!("{}.", self.ns);
        let rest = original.strip_prefix(&prefix).unwrap_or(original);
        format!("{}.deadletter.{rest}", self.ns)
    }

    /// Every request/reply subject: none of these may be captured by a stream.
    pub fn request_subjects(&self) -> Vec<String> {
        let mut subjects = vec![
            format!("{}.act.>", self.ns),
            format!("{}.registry.>", self.ns),
        ];
        subjects.extend(WORKFLOW_VERBS.iter().map(|v| self.workflow_endpoint(v)));
        subjects
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_layout() {
        let n = Names::new("fleet-a").unwrap();
        assert_eq!(n.stream(STREAM_EVENTS), "fleet-a_events");
        assert_eq!(n.bucket(BUCKET_AGENTS), "fleet-a_agents");
        assert_eq!(
            n.event("agent.capability.updated"),
            "fleet-a.agent.capability.updated"
        );
        assert_eq!(
            n.deadletter("fleet-a.task.completed"),
            "fleet-a.deadletter.task.completed"
        );
        let a = AgentId::new();
        assert_eq!(
            n.act(a, ACT_HEARTBEAT),
            format!("fleet-a.act.{a}.heartbeat")
        );
        assert_eq!(n.acting_agent(&n.act(a, ACT_ACCEPT)), Some(a));
        assert_eq!(n.acting_agent("fleet-a.act.nope.accept"), None);
        let t = crate::domain::TaskId::new();
        assert_eq!(n.result(a, t), format!("fleet-a.result.{a}.{t}"));
        assert_eq!(n.result_agent(&n.result(a, t)), Some(a));
        assert!(Names::new("bad.ns").is_err());
    }
}
