//! Least privilege on NATS: the permissions of each kind of user of a namespace, and the
//! nats-server authorization that grants them (`omoi nats-auth` writes it). Each namespace is
//! an account of its own (its JetStream apart from every other), whose users sign in with
//! NKEYs; a user reads replies only on its own inbox prefix (`_INBOX_<public key>`).
//!
//! | user | may |
//! |---|---|
//! | control plane | the whole namespace: its subjects, JetStream API, buckets, service discovery; answer requests |
//! | worker (for named agents) | act as its agents (`<ns>.act.<id>.>`), report as them (`<ns>.result.<id>.>`), pull and ack their dispatch and inbox consumers, read and write the lock bucket, read the registry, hear `task.cancelled` and `task.ready`, dead-letter what it cannot read |
//! | submitter | the workflow endpoints and registry reads; put submissions in the uploads object store; hear workflow, task and coordination events |
//! | observer | read: events, dead letters, stream and consumer info, the KV buckets (watch them) |

use super::Names;
use super::names::{
    BUCKET_AGENTS, BUCKET_LEASES, BUCKET_LOCKS, OBJECT_STORE_UPLOADS, STREAM_DEADLETTER,
    STREAM_DISPATCH, STREAM_EVENTS, STREAM_INBOX, WORKFLOW_VERBS,
};
use crate::domain::AgentId;

/// What a NATS user of a namespace is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    ControlPlane,
    /// A worker (or a single agent) acting as these agent names.
    Worker {
        agents: Vec<String>,
    },
    Submitter,
    Observer,
}

impl Role {
    pub fn describe(&self) -> String {
        match self {
            Self::ControlPlane => "control plane".into(),
            Self::Worker { agents } => format!("worker for {}", agents.join(", ")),
            Self::Submitter => "submitter".into(),
            Self::Observer => "observer (read-only)".into(),
        }
    }
}

/// Subjects a user may publish to and subscribe to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// May answer requests it received (the control plane's services).
    pub allow_responses: bool,
}

/// What `role` may do in the namespace of `names`, for the user whose NKEY is `public_key`.
pub fn permissions(names: &Names, role: &Role, public_key: &str) -> Permissions {
    let ns = names.namespace();
    let inbox = format!("{}.>", super::inbox_prefix(public_key));
    let kv = |key: &str| format!("$KV.{}.>", names.bucket(key));
    let kv_stream = |key: &str| format!("KV_{}", names.bucket(key));
    let uploads = names.bucket(OBJECT_STORE_UPLOADS);
    match role {
        Role::ControlPlane => Permissions {
            publish: vec![
                format!("{ns}.>"),
                "$JS.API.>".into(),
                "$JS.ACK.>".into(),
                "$JS.FC.>".into(),
                kv(BUCKET_AGENTS),
                kv(BUCKET_LEASES),
                kv(BUCKET_LOCKS),
                format!("$O.{uploads}.>"),
                "$SRV.>".into(),
            ],
            subscribe: vec![format!("{ns}.>"), inbox, "$SRV.>".into()],
            allow_responses: true,
        },
        Role::Worker { agents } => {
            let dispatch = names.stream(STREAM_DISPATCH);
            let inbox_stream = names.stream(STREAM_INBOX);
            let locks = kv_stream(BUCKET_LOCKS);
            let mut publish = vec![
                names.registry("search"),
                names.registry("best_fit"),
                kv(BUCKET_LOCKS),
                format!("$JS.API.STREAM.INFO.{locks}"),
                format!("$JS.API.STREAM.MSG.GET.{locks}"),
                format!("$JS.API.DIRECT.GET.{locks}"),
                format!("$JS.API.DIRECT.GET.{locks}.>"),
            ];
            for name in agents {
                let id = AgentId::for_name(ns, name);
                let (d, i) = (names.dispatch_consumer(id), names.inbox_consumer(id));
                publish.extend([
                    names.acts_of(id),
                    names.results_of(id),
                    format!("$JS.API.CONSUMER.INFO.{dispatch}.{d}"),
                    format!("$JS.API.CONSUMER.MSG.NEXT.{dispatch}.{d}"),
                    format!("$JS.ACK.{dispatch}.{d}.>"),
                    format!("$JS.API.CONSUMER.INFO.{inbox_stream}.{i}"),
                    format!("$JS.API.CONSUMER.MSG.NEXT.{inbox_stream}.{i}"),
                    format!("$JS.ACK.{inbox_stream}.{i}.>"),
                    names.deadletter(&names.dispatch(id)),
                    names.deadletter(&names.inbox(id)),
                ]);
            }
            Permissions {
                publish,
                subscribe: vec![
                    inbox,
                    names.event("task.cancelled"),
                    names.event("task.ready"),
                ],
                allow_responses: false,
            }
        }
        Role::Submitter => {
            let mut publish: Vec<String> = WORKFLOW_VERBS
                .iter()
                .map(|v| names.workflow_endpoint(v))
                .collect();
            publish.extend([names.registry("search"), names.registry("best_fit")]);
            // Put a submission too large for one message in the uploads object store (the
            // object's chunks and its metadata; the store's info; a name's current metadata).
            publish.extend([
                format!("$O.{uploads}.>"),
                format!("$JS.API.STREAM.INFO.OBJ_{uploads}"),
                format!("$JS.API.DIRECT.GET.OBJ_{uploads}.>"),
            ]);
            let mut subscribe = vec![inbox];
            subscribe.extend(
                [
                    "workflow.created",
                    "workflow.completed",
                    "workflow.failed",
                    "workflow.cancelled",
                    "task.>",
                    "coordination.>",
                ]
                .iter()
                .map(|e| names.event(e)),
            );
            Permissions {
                publish,
                subscribe,
                allow_responses: false,
            }
        }
        Role::Observer => {
            let readable = [
                names.stream(STREAM_EVENTS),
                names.stream(STREAM_DEADLETTER),
                kv_stream(BUCKET_AGENTS),
                kv_stream(BUCKET_LOCKS),
                kv_stream(BUCKET_LEASES),
            ];
            let mut publish = vec![
                "$JS.API.INFO".to_string(),
                "$JS.API.STREAM.NAMES".into(),
                "$JS.API.STREAM.LIST".into(),
                "$JS.API.STREAM.INFO.*".into(),
                "$JS.API.STREAM.MSG.GET.*".into(),
                "$JS.API.DIRECT.GET.>".into(),
                "$JS.API.CONSUMER.NAMES.*".into(),
                "$JS.API.CONSUMER.LIST.*".into(),
                "$JS.API.CONSUMER.INFO.*.*".into(),
                "$JS.FC.>".into(),
            ];
            // Consumers (what `nats stream view` and `nats kv watch` make) only on streams
            // that are not work queues or inboxes: reading them takes nothing from anyone.
            for s in &readable {
                publish.extend([
                    format!("$JS.API.CONSUMER.CREATE.{s}"),
                    format!("$JS.API.CONSUMER.CREATE.{s}.>"),
                    format!("$JS.API.CONSUMER.MSG.NEXT.{s}.*"),
                ]);
            }
            let mut subscribe = vec![inbox, format!("{ns}.deadletter.>")];
            subscribe.extend(event_subjects(names));
            Permissions {
                publish,
                subscribe,
                allow_responses: false,
            }
        }
    }
}

/// The subjects events are published on (those of the `<ns>_events` stream).
fn event_subjects(names: &Names) -> Vec<String> {
    super::provision::Definitions::builtin()
        .ok()
        .and_then(|d| d.stream_config(names, STREAM_EVENTS))
        .map(|c| c.subjects)
        .unwrap_or_default()
}

/// One user of the generated authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub role: Role,
    /// Its NKEY's public key (`U…`).
    pub public_key: String,
}

fn quoted(list: &[String]) -> String {
    list.iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The nats-server configuration block granting `users` their permissions: one account for the
/// namespace, with JetStream. Include it from the server's configuration.
pub fn render(names: &Names, users: &[User]) -> String {
    let ns = names.namespace();
    let mut out = format!(
        "# NATS authorization for omoi namespace `{ns}`, written by `omoi nats-auth`.\n\
         # Include it in nats-server.conf (`include ./auth.conf`); regenerate rather than edit.\n\
         # Users sign in with the NKEY seeds written beside this file; no secret is in here.\n\
         accounts {{\n  \"{ns}\": {{\n    jetstream: enabled\n    users: [\n"
    );
    for u in users {
        let p = permissions(names, &u.role, &u.public_key);
        out.push_str(&format!(
            "      # {}: {}\n      {{\n        nkey: {}\n        permissions: {{\n          publish: {{ allow: [{}] }}\n          subscribe: {{ allow: [{}] }}\n",
            u.name,
            u.role.describe(),
            u.public_key,
            quoted(&p.publish),
            quoted(&p.subscribe),
        ));
        if p.allow_responses {
            out.push_str("          allow_responses: true\n");
        }
        out.push_str("        }\n      }\n");
    }
    out.push_str("    ]\n  }\n}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_may_act_only_as_its_agents() {
        let names = Names::new("fleet").unwrap();
        let p = permissions(
            &names,
            &Role::Worker {
                agents: vec!["alpha".into()],
            },
            "UKEY",
        );
        let alpha = AgentId::for_name("fleet", "alpha");
        let beta = AgentId::for_name("fleet", "beta");
        assert!(p.publish.contains(&format!("fleet.act.{alpha}.>")));
        assert!(p.publish.contains(&format!("fleet.result.{alpha}.>")));
        assert!(!p.publish.iter().any(|s| s.contains(&beta.to_string())));
        assert!(!p.publish.iter().any(|s| s.starts_with("fleet.dispatch")));
        assert!(
            !p.publish
                .iter()
                .any(|s| s.contains("leases") || s.contains("fleet.task"))
        );
        assert!(p.subscribe.contains(&"_INBOX_UKEY.>".to_string()));
        assert!(!p.allow_responses);
    }

    #[test]
    fn the_rendered_block_names_every_user_and_no_secret() {
        let names = Names::new("fleet").unwrap();
        let users = vec![
            User {
                name: "control-plane".into(),
                role: Role::ControlPlane,
                public_key: "UCP".into(),
            },
            User {
                name: "observer".into(),
                role: Role::Observer,
                public_key: "UOBS".into(),
            },
        ];
        let conf = render(&names, &users);
        assert!(conf.contains("nkey: UCP") && conf.contains("nkey: UOBS"));
        assert!(conf.contains("allow_responses: true"));
        assert!(conf.contains("\"$JS.API.>\""));
        assert!(conf.contains("jetstream: enabled"));
    }
}
