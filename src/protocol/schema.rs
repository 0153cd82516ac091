//! JSON Schemas of the wire messages, generated from the types in `protocol/` so that clients
//! in other languages can validate against the contract the code really speaks. They are
//! checked into `docs/schemas/` (one file per message, and `index.json` naming the subject
//! each is sent on); a test fails when they are not current, and
//! `OMOI_WRITE_SCHEMAS=1 cargo test --lib protocol::schema` writes them anew.

use serde::Serialize;

use super::collaboration::{
    CloseThread, CreateThread, Handoff, HandoffDecision, HandoffRequest, InboxItem, ListMessages,
    MarkRead, Message, MessagePage, SendMessage, Thread,
};
use super::errors::ErrorReply;
use super::events::Envelope;
use super::locks::LockState;
use super::registry::{
    AgentMatch, AgentRecord, AgentUpdate, Deregister, Heartbeat, HeartbeatAck, RegisterRequest,
    SearchQuery,
};
use super::tasks::{Dispatch, TaskReport};
use super::workflows::{
    PatternRun, PatternSubmitted, SubmitUpload, Submitted, WorkflowRef, WorkflowSpec, WorkflowView,
};

/// Where a message travels, as `docs/schemas/index.json` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Route {
    /// The subject (or bucket key) with `<ns>`, `<agent_id>`, `<task_id>` placeholders.
    pub subject: &'static str,
    /// `request` (request/reply, a reply or an error reply), `stream` (published to a JetStream
    /// stream), `kv` (a bucket's value).
    pub kind: &'static str,
    /// The schema of the message sent (file `<name>.json`).
    pub message: &'static str,
    /// The schema of a successful reply, for requests (failures: `ErrorReply`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<&'static str>,
}

const fn request(subject: &'static str, message: &'static str, reply: &'static str) -> Route {
    Route {
        subject,
        kind: "request",
        message,
        reply: Some(reply),
    }
}

const fn carried(subject: &'static str, kind: &'static str, message: &'static str) -> Route {
    Route {
        subject,
        kind,
        message,
        reply: None,
    }
}

/// Every subject omoi reads or writes, with its message (docs/protocol.md tells the rules).
pub const ROUTES: &[Route] = &[
    request(
        "<ns>.act.<agent_id>.register",
        "RegisterRequest",
        "AgentRecord",
    ),
    request("<ns>.act.<agent_id>.update", "AgentUpdate", "AgentRecord"),
    request("<ns>.act.<agent_id>.heartbeat", "Heartbeat", "HeartbeatAck"),
    request(
        "<ns>.act.<agent_id>.deregister",
        "Deregister",
        "AgentRecord",
    ),
    request("<ns>.registry.search", "SearchQuery", "AgentMatchList"),
    request("<ns>.registry.best_fit", "SearchQuery", "AgentMatch"),
    request("<ns>.act.<agent_id>.send", "SendMessage", "Message"),
    request("<ns>.act.<agent_id>.read", "MarkRead", "Message"),
    request("<ns>.act.<agent_id>.thread", "CreateThread", "Thread"),
    request(
        "<ns>.act.<agent_id>.messages",
        "ListMessages",
        "MessagePage",
    ),
    request("<ns>.act.<agent_id>.close", "CloseThread", "Thread"),
    request("<ns>.act.<agent_id>.handoff", "HandoffRequest", "Handoff"),
    request("<ns>.act.<agent_id>.accept", "HandoffDecision", "Handoff"),
    request("<ns>.act.<agent_id>.decline", "HandoffDecision", "Handoff"),
    request("<ns>.act.<agent_id>.cancel", "HandoffDecision", "Handoff"),
    request("<ns>.workflow.submit", "WorkflowSpec", "Submitted"),
    request("<ns>.workflow.submit_upload", "SubmitUpload", "Submitted"),
    request("<ns>.workflow.run", "PatternRun", "PatternSubmitted"),
    request("<ns>.workflow.get", "WorkflowRef", "WorkflowView"),
    request("<ns>.workflow.cancel", "WorkflowRef", "WorkflowView"),
    carried("<ns>.dispatch.<agent_id>", "stream", "Dispatch"),
    carried("<ns>.result.<agent_id>.<task_id>", "stream", "TaskReport"),
    carried("<ns>.agent.inbox.<agent_id>", "stream", "InboxItem"),
    carried("<ns>.<event type>", "stream", "Envelope"),
    carried("<ns>_locks: <escaped resource name>", "kv", "LockState"),
    carried("<ns>_agents: <agent_id>", "kv", "AgentRecord"),
];

/// Every message's schema, by name (the file stem under `docs/schemas/`).
pub fn schemas() -> Vec<(&'static str, schemars::Schema)> {
    macro_rules! each {
        ($($name:literal => $ty:ty),* $(,)?) => {
            vec![$(($name, schemars::schema_for!($ty))),*]
        };
    }
    each![
        "AgentMatch" => AgentMatch,
        "AgentMatchList" => Vec<AgentMatch>,
        "AgentRecord" => AgentRecord,
        "AgentUpdate" => AgentUpdate,
        "CloseThread" => CloseThread,
        "CreateThread" => CreateThread,
        "Deregister" => Deregister,
        "Dispatch" => Dispatch,
        "Envelope" => Envelope,
        "ErrorReply" => ErrorReply,
        "Handoff" => Handoff,
        "HandoffDecision" => HandoffDecision,
        "HandoffRequest" => HandoffRequest,
        "Heartbeat" => Heartbeat,
        "HeartbeatAck" => HeartbeatAck,
        "InboxItem" => InboxItem,
        "ListMessages" => ListMessages,
        "LockState" => LockState,
        "MarkRead" => MarkRead,
        "Message" => Message,
        "MessagePage" => MessagePage,
        "PatternRun" => PatternRun,
        "PatternSubmitted" => PatternSubmitted,
        "RegisterRequest" => RegisterRequest,
        "SearchQuery" => SearchQuery,
        "SendMessage" => SendMessage,
        "SubmitUpload" => SubmitUpload,
        "Submitted" => Submitted,
        "TaskReport" => TaskReport,
        "Thread" => Thread,
        "WorkflowRef" => WorkflowRef,
        "WorkflowSpec" => WorkflowSpec,
        "WorkflowView" => WorkflowView,
    ]
}

/// Pretty JSON with a final newline, as the files are written.
fn pretty<T: Serialize + ?Sized>(value: &T) -> String {
    let mut s = serde_json::to_string_pretty(value).unwrap_or_default();
    s.push('\n');
    s
}

/// The files of `docs/schemas/`, by file name: each schema, and `index.json`.
pub fn files() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = schemas()
        .into_iter()
        .map(|(name, schema)| (format!("{name}.json"), pretty(&schema)))
        .collect();
    out.push(("index.json".into(), pretty(ROUTES)));
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::PathBuf;

    use super::*;

    fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/schemas")
    }

    #[test]
    fn every_route_names_a_schema() {
        let names: BTreeSet<_> = schemas().into_iter().map(|(n, _)| n).collect();
        for r in ROUTES {
            assert!(
                names.contains(r.message),
                "{}: no schema {}",
                r.subject,
                r.message
            );
            if let Some(reply) = r.reply {
                assert!(names.contains(reply), "{}: no schema {reply}", r.subject);
            }
        }
    }

    #[test]
    fn checked_in_schemas_are_current() {
        let dir = dir();
        let files = files();
        if std::env::var_os("OMOI_WRITE_SCHEMAS").is_some() {
            std::fs::create_dir_all(&dir).expect("create docs/schemas");
            for entry in std::fs::read_dir(&dir)
                .expect("read docs/schemas")
                .flatten()
            {
                std::fs::remove_file(entry.path()).expect("remove an old schema");
            }
            for (name, text) in &files {
                std::fs::write(dir.join(name), text).expect("write a schema");
            }
        }
        let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
            .expect("docs/schemas exists (OMOI_WRITE_SCHEMAS=1 writes it)")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let generated: BTreeSet<String> = files.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(
            on_disk, generated,
            "docs/schemas holds other files than the protocol defines; run \
             OMOI_WRITE_SCHEMAS=1 cargo test --lib protocol::schema"
        );
        for (name, text) in files {
            let current = std::fs::read_to_string(dir.join(&name)).expect("read a schema");
            assert!(
                current == text,
                "docs/schemas/{name} is not current; run OMOI_WRITE_SCHEMAS=1 cargo test --lib \
                 protocol::schema"
            );
        }
    }

    #[test]
    fn schemas_accept_what_the_types_write_and_refuse_unknown_fields() {
        let schemas: std::collections::BTreeMap<_, _> = schemas().into_iter().collect();
        let register = serde_json::to_value(&schemas["RegisterRequest"]).expect("json");
        assert_eq!(register["additionalProperties"], serde_json::json!(false));
        let required = register["required"].as_array().expect("required");
        assert!(required.contains(&serde_json::json!("name")), "{register}");
        let report = serde_json::to_value(&schemas["TaskReport"]).expect("json");
        let text = report.to_string();
        for outcome in ["started", "completed", "failed", "blocked", "released"] {
            assert!(
                text.contains(&format!("\"{outcome}\"")),
                "{outcome} in {text}"
            );
        }
    }
}
