//! Resource locks on the wire: the value stored under each key of the `<ns>_locks` bucket
//! (docs/protocol.md, "Resource locks"). The rules that read and write it are `bus::kv_lock`.

use serde::{Deserialize, Serialize};

/// How a resource is locked.
#[derive(
    Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum LockMode {
    /// One holder at a time (the default).
    #[default]
    Exclusive,
    /// Any number of shared holders at a time, but no exclusive one.
    Shared,
}

/// One holder of a lock.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug, schemars::JsonSchema)]
pub struct Holder {
    /// Who holds it: a stable id of the task run (or process) that must release it.
    pub owner: String,
    /// The agent working for the owner, when there is one (for operators).
    #[serde(default)]
    pub agent_id: Option<String>,
    /// When the lock was granted, wall-clock milliseconds since the epoch.
    pub acquired_at_ms: i64,
    /// When the hold lapses unless renewed, wall-clock milliseconds since the epoch.
    pub expires_at_ms: i64,
}

/// One contender queued for a busy lock.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug, schemars::JsonSchema)]
pub struct Waiter {
    /// Who waits (the owner it will hold the lock as).
    pub owner: String,
    /// The mode it waits for.
    pub mode: LockMode,
    /// When it joined the queue: the queue is ordered by this.
    pub since_ms: i64,
    /// When the entry lapses unless the waiter polls again.
    pub expires_at_ms: i64,
}

/// The value stored under a lock key.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug, Default, schemars::JsonSchema)]
pub struct LockState {
    /// The mode of the current holders; `None` when nobody holds the lock.
    #[serde(default)]
    pub mode: Option<LockMode>,
    /// Current holders (expired ones are ignored until the next write prunes them).
    #[serde(default)]
    pub holders: Vec<Holder>,
    /// Queued contenders, first come first served.
    #[serde(default)]
    pub waiters: Vec<Waiter>,
}
