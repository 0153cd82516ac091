//! Typed ids, so a task id can never be passed where an agent id is expected.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type, schemars::JsonSchema)]
        #[serde(transparent)]
        #[sqlx(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new time-ordered (v7) id: index-friendly and sortable by creation.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

id_type!(
    /// Identifies a task across attempts.
    TaskId
);
id_type!(
    /// Identifies a workflow (a DAG of tasks).
    WorkflowId
);
id_type!(
    /// Identifies a registered agent: derived from its namespace and name
    /// ([`AgentId::for_name`]), so credentials can be made for an agent before it first runs.
    AgentId
);

/// The UUID namespace of agent ids: `uuid5(NAMESPACE_URL, "urn:omoi:agent")`.
pub const AGENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0xd7a75749_d525_55b6_af74_48ecdea8f6e7);

impl AgentId {
    /// The id of the agent named `name` in `namespace`:
    /// `uuid5(AGENT_ID_NAMESPACE, "<namespace>/<name>")` — the same in every language, so the
    /// subjects an agent may use (which carry its id) are known from its name alone.
    pub fn for_name(namespace: &str, name: &str) -> Self {
        Self(Uuid::new_v5(
            &AGENT_ID_NAMESPACE,
            format!("{namespace}/{name}").as_bytes(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids_derive_from_namespace_and_name() {
        assert_eq!(
            AGENT_ID_NAMESPACE,
            Uuid::new_v5(&Uuid::NAMESPACE_URL, b"urn:omoi:agent")
        );
        let a = AgentId::for_name("omoi", "worker-1");
        assert_eq!(a, AgentId::for_name("omoi", "worker-1"));
        assert_ne!(a, AgentId::for_name("other", "worker-1"));
        assert_ne!(a, AgentId::for_name("omoi", "worker-2"));
        // The value other languages compute: uuid.uuid5(ns, "omoi/worker-1") in Python.
        assert_eq!(a.to_string(), "52944496-d2fb-5894-be71-2d400c728d69");
    }
}
