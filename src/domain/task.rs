//! The task state machine and task priorities.
//!
//! ```text
//! pending ──▶ ready ──▶ assigned ──▶ running ──▶ completed
//!    │          ▲  │        │  │        │ │
//!    │          │  │        │  └────────┼─┼──▶ retry_wait ──▶ ready   (attempt failed, retries left)
//!    │          │  │        └──────────▶┼─┴──▶ failed                (attempts exhausted)
//!    │          └──┼────────────────────┘      (handed back / agent lost: ready again, new attempt)
//!    └─────────────┴────────────────────────▶ cancelled
//! ```
//! `failed → ready` is an operator's retry. `completed` and `cancelled` are final.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a task is in its life.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    sqlx::Type,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum TaskStatus {
    /// Waiting for its dependencies.
    Pending,
    /// Dependencies met; waiting for an agent with free capacity.
    Ready,
    /// Dispatched to an agent; not yet started.
    Assigned,
    /// An agent is running it.
    Running,
    /// An attempt failed; waits out its backoff, then becomes ready again.
    RetryWait,
    Completed,
    /// Failed for good (attempts exhausted, or a dependency failed).
    Failed,
    Cancelled,
}

/// A transition the state machine does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal task transition {from} → {to}")]
pub struct IllegalTransition {
    pub from: TaskStatus,
    pub to: TaskStatus,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 8] = [
        Self::Pending,
        Self::Ready,
        Self::Assigned,
        Self::Running,
        Self::RetryWait,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
    ];

    /// The states reachable from `self` in one step.
    pub fn successors(self) -> &'static [TaskStatus] {
        use TaskStatus::*;
        match self {
            Pending => &[Ready, Failed, Cancelled],
            Ready => &[Assigned, Cancelled],
            Assigned => &[Running, Completed, Ready, RetryWait, Failed, Cancelled],
            Running => &[Completed, Ready, RetryWait, Failed, Cancelled],
            RetryWait => &[Ready, Cancelled],
            Failed => &[Ready],
            Completed | Cancelled => &[],
        }
    }

    pub fn can_become(self, to: TaskStatus) -> bool {
        self.successors().contains(&to)
    }

    /// `Ok(to)` if `self → to` is legal.
    pub fn transition(self, to: TaskStatus) -> Result<TaskStatus, IllegalTransition> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(IllegalTransition { from: self, to })
        }
    }

    /// No further transition will happen on its own (failed can still be retried by hand).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// Holds a slot of an agent's capacity.
    pub fn occupies_agent(self) -> bool {
        matches!(self, Self::Assigned | Self::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Ready => "ready",
            Self::Assigned => "assigned",
            Self::Running => "running",
            Self::RetryWait => "retry_wait",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status string that is not one of [`TaskStatus::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown task status `{0}`")]
pub struct UnknownStatus(pub String);

impl FromStr for TaskStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

/// Task priority, upstream's four levels. Orders within a workflow's fair share.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    Default,
    sqlx::Type,
    schemars::JsonSchema,
)]
#[serde(rename_all = "UPPERCASE")]
#[sqlx(type_name = "text", rename_all = "UPPERCASE")]
pub enum Priority {
    Low,
    #[default]
    Medium,
    High,
    Critical,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "LOW",
            Self::Medium => "MEDIUM",
            Self::High => "HIGH",
            Self::Critical => "CRITICAL",
        }
    }
}

impl FromStr for Priority {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "LOW" => Ok(Self::Low),
            "MEDIUM" => Ok(Self::Medium),
            "HIGH" => Ok(Self::High),
            "CRITICAL" => Ok(Self::Critical),
            _ => Err(UnknownStatus(s.to_string())),
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::TaskStatus::*;
    use super::*;

    /// The whole table, written out once more by hand: every pair not listed must be illegal.
    const LEGAL: &[(TaskStatus, TaskStatus)] = &[
        (Pending, Ready),
        (Pending, Failed),
        (Pending, Cancelled),
        (Ready, Assigned),
        (Ready, Cancelled),
        (Assigned, Running),
        (Assigned, Completed),
        (Assigned, Ready),
        (Assigned, RetryWait),
        (Assigned, Failed),
        (Assigned, Cancelled),
        (Running, Completed),
        (Running, Ready),
        (Running, RetryWait),
        (Running, Failed),
        (Running, Cancelled),
        (RetryWait, Ready),
        (RetryWait, Cancelled),
        (Failed, Ready),
    ];

    #[test]
    fn every_pair_is_legal_exactly_when_the_table_says_so() {
        for from in TaskStatus::ALL {
            for to in TaskStatus::ALL {
                let expected = LEGAL.contains(&(from, to));
                assert_eq!(from.transition(to).is_ok(), expected, "{from} → {to}");
                if !expected {
                    assert_eq!(from.transition(to), Err(IllegalTransition { from, to }));
                }
            }
        }
    }

    #[test]
    fn final_states_have_no_way_out() {
        assert!(Completed.successors().is_empty());
        assert!(Cancelled.successors().is_empty());
        assert!(Completed.is_terminal() && Failed.is_terminal() && Cancelled.is_terminal());
    }

    #[test]
    fn status_strings_round_trip() {
        for st in TaskStatus::ALL {
            assert_eq!(st.as_str().parse::<TaskStatus>().unwrap(), st);
            assert_eq!(serde_json::to_value(st).unwrap(), st.as_str());
        }
        assert!("done".parse::<TaskStatus>().is_err());
    }

    #[test]
    fn priorities_order_and_spell_like_upstream() {
        assert!(Priority::Critical > Priority::High);
        assert!(Priority::High > Priority::Medium && Priority::Medium > Priority::Low);
        assert_eq!(serde_json::to_value(Priority::High).unwrap(), "HIGH");
        assert_eq!("critical".parse::<Priority>().unwrap(), Priority::Critical);
    }
}
