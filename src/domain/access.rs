//! Who may do what: the roles of API tokens, the caller a request acts for, and the rule each
//! HTTP route applies. Pure: the API layer looks the caller up and asks these questions.
//!
//! | role | may |
//! |---|---|
//! | `admin` | everything, including tokens and acting as any agent |
//! | `operator` | read and watch everything; submit, cancel and retry workflows; force-release locks |
//! | `agent` | act only as the agents it names (register them, heartbeat, update, collaborate); read the registry and its own collaboration |
//! | `viewer` | read and watch everything (`/metrics` too) |

use serde::{Deserialize, Serialize};

/// The role of an API token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    Operator,
    Agent,
    Viewer,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Operator, Role::Agent, Role::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Operator => "operator",
            Self::Agent => "agent",
            Self::Viewer => "viewer",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role `{s}`; roles are admin, operator, agent, viewer"))
    }
}

/// What a route needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Anyone, without a token (the OpenAPI document).
    Public,
    /// Any token: the registry's reads, and an agent's own collaboration (the handler narrows
    /// what an `agent` token sees).
    AnyRole,
    /// `viewer`, `operator` or `admin`: reading and watching everything.
    Read,
    /// `operator` or `admin`: workflows and locks.
    Operate,
    /// `agent` (as one of its agents — the handler checks which) or `admin`.
    ActAsAgent,
    /// `admin` only.
    Admin,
}

impl Rule {
    /// Whether `role` passes this rule at the route (an `agent` may still be refused by the
    /// handler for acting as an agent it does not name).
    pub fn admits(self, role: Role) -> bool {
        match self {
            Self::Public | Self::AnyRole => true,
            Self::Read => matches!(role, Role::Admin | Role::Operator | Role::Viewer),
            Self::Operate => matches!(role, Role::Admin | Role::Operator),
            Self::ActAsAgent => matches!(role, Role::Admin | Role::Agent),
            Self::Admin => role == Role::Admin,
        }
    }
}

/// The rule of each HTTP route: `(method, path under /api/v1 as routed)`. A route missing here
/// is refused to everyone but `admin` (see [`rule_for`]), and a test checks every route of the
/// router is listed.
pub const ROUTES: &[(&str, &str, Rule)] = &[
    ("GET", "/openapi.json", Rule::Public),
    ("POST", "/agents/register", Rule::ActAsAgent),
    ("GET", "/agents", Rule::AnyRole),
    ("GET", "/agents/search", Rule::AnyRole),
    ("GET", "/agents/best-fit", Rule::AnyRole),
    ("GET", "/agents/health", Rule::AnyRole),
    ("GET", "/agents/statistics", Rule::AnyRole),
    ("GET", "/agents/{id}", Rule::AnyRole),
    ("PATCH", "/agents/{id}", Rule::ActAsAgent),
    ("DELETE", "/agents/{id}", Rule::ActAsAgent),
    ("POST", "/agents/{id}/availability", Rule::ActAsAgent),
    ("POST", "/agents/{id}/heartbeat", Rule::ActAsAgent),
    ("GET", "/agents/{id}/health", Rule::AnyRole),
    ("POST", "/workflows", Rule::Operate),
    ("GET", "/workflows", Rule::Read),
    ("POST", "/workflows/from-pattern", Rule::Operate),
    ("GET", "/patterns", Rule::Read),
    ("GET", "/workflows/{id}", Rule::Read),
    ("POST", "/workflows/{id}/cancel", Rule::Operate),
    ("GET", "/tasks/{id}", Rule::Read),
    ("POST", "/tasks/{id}/retry", Rule::Operate),
    ("GET", "/locks", Rule::Read),
    ("DELETE", "/locks/{name}", Rule::Operate),
    ("POST", "/collaboration/threads", Rule::ActAsAgent),
    ("GET", "/collaboration/threads", Rule::AnyRole),
    (
        "POST",
        "/collaboration/threads/{id}/close",
        Rule::ActAsAgent,
    ),
    ("GET", "/collaboration/threads/{id}/messages", Rule::AnyRole),
    ("POST", "/collaboration/messages", Rule::ActAsAgent),
    (
        "POST",
        "/collaboration/messages/{id}/read",
        Rule::ActAsAgent,
    ),
    ("POST", "/collaboration/handoff/request", Rule::ActAsAgent),
    (
        "POST",
        "/collaboration/handoff/{id}/accept",
        Rule::ActAsAgent,
    ),
    (
        "POST",
        "/collaboration/handoff/{id}/decline",
        Rule::ActAsAgent,
    ),
    (
        "POST",
        "/collaboration/handoff/{id}/cancel",
        Rule::ActAsAgent,
    ),
    ("GET", "/collaboration/handoffs/{id}", Rule::AnyRole),
    ("GET", "/collaboration/ws", Rule::AnyRole),
    ("GET", "/ws/events", Rule::Read),
    ("GET", "/tokens", Rule::Admin),
    ("POST", "/tokens", Rule::Admin),
    ("DELETE", "/tokens/{id}", Rule::Admin),
    // Outside /api/v1: Prometheus metrics (`/healthz` and `/readyz` take no token).
    ("GET", "/metrics", Rule::Read),
];

/// The rule for a routed request (`path` as matched, under `/api/v1`); unlisted: admin only.
pub fn rule_for(method: &str, path: &str) -> Rule {
    ROUTES
        .iter()
        .find(|(m, p, _)| *m == method && *p == path)
        .map(|(_, _, r)| *r)
        .unwrap_or(Rule::Admin)
}

/// Who a request acts for: the token's name, role and (for `agent`) the agent names it may
/// act as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub token_id: Option<uuid::Uuid>,
    pub name: String,
    pub role: Role,
    /// Agent names an `agent` token acts as.
    pub agents: Vec<String>,
}

impl Caller {
    /// The caller of a control plane running open (no authentication): an admin.
    pub fn open() -> Self {
        Self {
            token_id: None,
            name: "open".into(),
            role: Role::Admin,
            agents: vec![],
        }
    }

    /// Whether the caller may act as the agent named `name`.
    pub fn may_act_as(&self, name: &str) -> bool {
        match self.role {
            Role::Admin => true,
            Role::Agent => self.agents.iter().any(|a| a == name),
            Role::Operator | Role::Viewer => false,
        }
    }

    /// Whether the caller reads everything (not narrowed to its own agents).
    pub fn reads_all(&self) -> bool {
        self.role != Role::Agent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_least_privilege() {
        let writes = rule_for("POST", "/workflows");
        assert!(writes.admits(Role::Operator) && writes.admits(Role::Admin));
        assert!(!writes.admits(Role::Viewer) && !writes.admits(Role::Agent));
        let watch = rule_for("GET", "/ws/events");
        assert!(watch.admits(Role::Viewer) && !watch.admits(Role::Agent));
        let act = rule_for("POST", "/collaboration/handoff/{id}/accept");
        assert!(act.admits(Role::Agent) && !act.admits(Role::Operator));
        assert_eq!(rule_for("GET", "/not/listed"), Rule::Admin);
        assert_eq!(rule_for("POST", "/tokens"), Rule::Admin);
        assert!(!Rule::Admin.admits(Role::Operator));
    }

    #[test]
    fn an_agent_token_acts_only_as_its_agents() {
        let c = Caller {
            token_id: None,
            name: "w".into(),
            role: Role::Agent,
            agents: vec!["a".into(), "b".into()],
        };
        assert!(c.may_act_as("a") && c.may_act_as("b") && !c.may_act_as("c"));
        assert!(!c.reads_all());
        assert!(Caller::open().may_act_as("anyone"));
        assert_eq!("viewer".parse::<Role>().unwrap(), Role::Viewer);
        assert!("root".parse::<Role>().is_err());
    }
}
