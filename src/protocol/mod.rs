//! The wire contract: every message that crosses a process boundary — requests and replies
//! on NATS, dispatches and reports, events, inbox items, the lock bucket's values, errors.
//! The worker and the clients speak through these types and `bus/`, never through `service/`
//! or `db/` (as wasmCloud's `wadm-types` holds its API apart from the server).
//!
//! All messages are JSON. Requests carry `"v": 1` (optional, defaults to 1; any other version is
//! refused). A reply is the result object itself, or on failure `{"error": {"code", "message",
//! "field"?}}` ([`errors::ErrorReply`]) with the NATS service headers `Nats-Service-Error` and
//! `Nats-Service-Error-Code` (an HTTP-like status). [`schema`] describes each message as a JSON
//! Schema (checked into `docs/schemas/`). Subjects are named in `bus::names`; docs/protocol.md
//! tells the whole contract in prose.

pub mod collaboration;
pub mod errors;
pub mod events;
pub mod locks;
pub mod registry;
pub mod schema;
pub mod tasks;
pub mod workflows;

pub use errors::{ErrorBody, ErrorCode, ErrorReply};
pub use events::{Envelope, Event};
pub use tasks::{Dispatch, Outcome, TaskReport};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

pub(crate) fn v1() -> u32 {
    PROTOCOL_VERSION
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

/// Whether `reply` is at most `limit` bytes of JSON.
pub(crate) fn fits(reply: &impl serde::Serialize, limit: usize) -> bool {
    serde_json::to_vec(reply).is_ok_and(|b| b.len() <= limit)
}

pub(crate) fn is_zero(n: &usize) -> bool {
    *n == 0
}
