//! Every subject, stream and KV bucket name omoi uses, built from the namespace. These names
//! are a public contract (docs/protocol.md): users publish to the subjects and inspect the
//! streams and buckets with the `nats` CLI.
//!
//! | what | name |
//! |---|---|
//! | event of type `T` (e.g. `task.completed`) | `<ns>.T` |
//! | agent heartbeat (request/reply) | `<ns>.agent.heartbeat.<agent_id>` |
//! | registry service endpoints | `<ns>.registry.<endpoint>` |
//! | dead letter of a message first sent on `<ns>.S` | `<ns>.deadletter.S` |
//! | task for an agent | `<ns>.dispatch.<agent_id>` |
//! | a worker's report on a task | `<ns>.result.<task_id>` |
//! | workflow endpoints (request/reply) | `<ns>.workflow.submit`, `.run`, `.get`, `.cancel` |
//! | an agent's inbox | `<ns>.agent.inbox.<agent_id>` |
//! | collaboration endpoints (request/reply) | `<ns>.collab.send`, `<ns>.collab.handoff` |
//! | streams | `<ns>_events`, `<ns>_dispatch`, `<ns>_results`, `<ns>_inbox`, `<ns>_deadletter` |
//! | KV buckets | `<ns>_agents`, `<ns>_locks`, `<ns>_leases` |

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

    /// `<ns>.agent.heartbeat.<agent_id>`.
    pub fn heartbeat(&self, agent: AgentId) -> String {
        format!("{}.agent.heartbeat.{agent}", self.ns)
    }

    /// `<ns>.agent.heartbeat.*`: every agent's heartbeat.
    pub fn heartbeats(&self) -> String {
        format!("{}.agent.heartbeat.*", self.ns)
    }

    /// `<ns>.dispatch.<agent_id>`: tasks for one agent.
    pub fn dispatch(&self, agent: AgentId) -> String {
        format!("{}.dispatch.{agent}", self.ns)
    }

    /// `agent-<agent_id>`: the durable consumer of an agent's dispatches.
    pub fn dispatch_consumer(&self, agent: AgentId) -> String {
        format!("agent-{agent}")
    }

    /// `<ns>.result.<task_id>`: a worker's report on a task.
    pub fn result(&self, task: crate::domain::TaskId) -> String {
        format!("{}.result.{task}", self.ns)
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

    /// `<ns>.collab.<verb>`: collaboration request/reply endpoints (`send`).
    pub fn collab_endpoint(&self, verb: &str) -> String {
        format!("{}.collab.{verb}", self.ns)
    }

    /// `<ns>.registry`: prefix of the registry service's endpoints.
    pub fn registry_prefix(&self) -> String {
        format!("{}.registry", self.ns)
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
        vec![
            format!("{}.agent.heartbeat.>", self.ns),
            format!("{}.registry.>", self.ns),
            format!("{}.workflow.submit", self.ns),
            format!("{}.workflow.run", self.ns),
            format!("{}.workflow.get", self.ns),
            format!("{}.workflow.cancel", self.ns),
            format!("{}.collab.>", self.ns),
        ]
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
        assert_eq!(n.heartbeat(a), format!("fleet-a.agent.heartbeat.{a}"));
        assert!(Names::new("bad.ns").is_err());
    }
}
