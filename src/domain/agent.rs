//! Agents: status and health, and the capability token grammar.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What an agent is doing, as the registry sees it.
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
pub enum AgentStatus {
    /// Live, nothing assigned.
    Idle,
    /// Live, at least one task assigned.
    Running,
    /// Live but reporting trouble; dispatched to only when nothing better fits.
    Degraded,
    /// Taken out of rotation by an operator (availability off).
    Maintenance,
    /// Missed heartbeats; not dispatched to, its tasks kept for a while.
    Stale,
    /// Silent for too long; its tasks are re-dispatched.
    Offline,
    /// Deregistered; its name is free again.
    Terminated,
    /// Fenced off by an operator after misbehaving.
    Quarantined,
}

impl AgentStatus {
    pub const ALL: [AgentStatus; 8] = [
        Self::Idle,
        Self::Running,
        Self::Degraded,
        Self::Maintenance,
        Self::Stale,
        Self::Offline,
        Self::Terminated,
        Self::Quarantined,
    ];

    /// The transition table. Live statuses move freely among themselves; coming back from
    /// stale/offline happens through a heartbeat or a re-registration.
    pub fn successors(self) -> &'static [AgentStatus] {
        use AgentStatus::*;
        match self {
            Idle => &[
                Running,
                Degraded,
                Maintenance,
                Stale,
                Offline,
                Terminated,
                Quarantined,
            ],
            Running => &[
                Idle,
                Degraded,
                Maintenance,
                Stale,
                Offline,
                Terminated,
                Quarantined,
            ],
            Degraded => &[
                Idle,
                Running,
                Maintenance,
                Stale,
                Offline,
                Terminated,
                Quarantined,
            ],
            Maintenance => &[Idle, Stale, Offline, Terminated, Quarantined],
            Stale => &[
                Idle,
                Running,
                Degraded,
                Maintenance,
                Offline,
                Terminated,
                Quarantined,
            ],
            Offline => &[Idle, Running, Maintenance, Terminated, Quarantined],
            Quarantined => &[Idle, Maintenance, Terminated],
            Terminated => &[],
        }
    }

    pub fn can_become(self, to: AgentStatus) -> bool {
        self == to || self.successors().contains(&to)
    }

    /// May be given new work.
    pub fn is_dispatchable(self) -> bool {
        matches!(self, Self::Idle | Self::Running | Self::Degraded)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Running => "running",
            Self::Degraded => "degraded",
            Self::Maintenance => "maintenance",
            Self::Stale => "stale",
            Self::Offline => "offline",
            Self::Terminated => "terminated",
            Self::Quarantined => "quarantined",
        }
    }
}

impl fmt::Display for AgentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AgentStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown agent status `{s}`"))
    }
}

/// How healthy an agent looks from its heartbeats.
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
pub enum HealthStatus {
    Healthy,
    Stale,
    Unresponsive,
    Unknown,
}

impl HealthStatus {
    pub const ALL: [HealthStatus; 4] = [
        Self::Healthy,
        Self::Stale,
        Self::Unresponsive,
        Self::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Stale => "stale",
            Self::Unresponsive => "unresponsive",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HealthStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown health status `{s}`"))
    }
}

/// Longest capability token.
pub const MAX_CAPABILITY_LEN: usize = 64;
/// Most capabilities one agent (or task) may list.
pub const MAX_CAPABILITIES: usize = 64;

/// A capability token that breaks the grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("capability `{token}`: {reason}")]
pub struct BadCapability {
    pub token: String,
    pub reason: &'static str,
}

/// Normalises capability tokens: trimmed, lower-cased, de-duplicated and sorted.
///
/// Grammar (after trimming and lower-casing): `[a-z0-9][a-z0-9._:+/-]{0,63}` — e.g. `python`,
/// `code-review`, `lang:rust`, `gpt-4.1`. Whitespace inside a token, and empty tokens, are errors.
pub fn normalize_capabilities<S: AsRef<str>>(tokens: &[S]) -> Result<Vec<String>, BadCapability> {
    let mut set = BTreeSet::new();
    for raw in tokens {
        let token = raw.as_ref().trim().to_lowercase();
        let bad = |reason| BadCapability {
            token: raw.as_ref().to_string(),
            reason,
        };
        if token.is_empty() {
            return Err(bad("is empty"));
        }
        if token.len() > MAX_CAPABILITY_LEN {
            return Err(bad("is longer than 64 characters"));
        }
        let mut chars = token.chars();
        if !chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return Err(bad("must start with a letter or digit"));
        }
        if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._:+/-".contains(c)) {
            return Err(bad("may contain only a-z, 0-9 and . _ : + / -"));
        }
        set.insert(token);
    }
    if set.len() > MAX_CAPABILITIES {
        return Err(BadCapability {
            token: format!("({} tokens)", set.len()),
            reason: "more than 64 capabilities",
        });
    }
    Ok(set.into_iter().collect())
}

/// An agent that runs whatever executor it is given: the default of a registration that
/// names no `executors` (agents written in any language handle their own executor names).
pub const ANY_EXECUTOR: &str = "*";

/// Normalises the executors an agent offers: tokens of the capability grammar, or `*` alone
/// for any; none named means `*`.
pub fn normalize_executors<S: AsRef<str>>(names: &[S]) -> Result<Vec<String>, BadCapability> {
    if names.is_empty() || names.iter().any(|n| n.as_ref().trim() == ANY_EXECUTOR) {
        return Ok(vec![ANY_EXECUTOR.to_string()]);
    }
    normalize_capabilities(names)
}

/// Whether an agent offering `executors` runs tasks of `executor`.
pub fn offers(executors: &[String], executor: &str) -> bool {
    executors.iter().any(|e| e == ANY_EXECUTOR || e == executor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executors_default_to_any_and_match_by_name() {
        assert_eq!(normalize_executors::<&str>(&[]).unwrap(), vec!["*"]);
        assert_eq!(
            normalize_executors(&["Shell", "echo"]).unwrap(),
            vec!["echo", "shell"]
        );
        assert_eq!(normalize_executors(&["echo", "*"]).unwrap(), vec!["*"]);
        assert!(normalize_executors(&["bad name"]).is_err());
        let worker = vec!["echo".to_string(), "sleep".to_string()];
        assert!(offers(&worker, "echo"));
        assert!(!offers(&worker, "shell"));
        assert!(offers(&["*".to_string()], "shell"));
    }

    #[test]
    fn capabilities_are_trimmed_lowercased_deduplicated_and_sorted() {
        let caps =
            normalize_capabilities(&[" Python", "analysis", "python ", "LANG:Rust"]).unwrap();
        assert_eq!(caps, vec!["analysis", "lang:rust", "python"]);
    }

    #[test]
    fn malformed_capabilities_are_rejected_with_the_token() {
        for bad in [
            "",
            "   ",
            "two words",
            "-leading",
            "emoji🙂",
            &"x".repeat(65),
        ] {
            let err = normalize_capabilities(&[bad]).unwrap_err();
            assert_eq!(err.token, bad);
        }
    }

    #[test]
    fn agent_transitions_follow_the_table() {
        use AgentStatus::*;
        assert!(Stale.can_become(Idle));
        assert!(Idle.can_become(Stale));
        assert!(!Terminated.can_become(Idle));
        assert!(!Offline.can_become(Stale));
        assert!(!Quarantined.can_become(Running));
        for st in AgentStatus::ALL {
            assert!(st.can_become(st), "{st} → {st} is a no-op");
            assert_eq!(st.as_str().parse::<AgentStatus>().unwrap(), st);
        }
    }
}
