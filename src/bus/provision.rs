//! Creates or updates every stream and KV bucket defined in `nats/jetstream.yaml`, idempotently.
//!
//! KV buckets are created as their backing `KV_<bucket>` stream and then opened with
//! `get_key_value`: async-nats' `create_key_value` cannot parse nats-server 2.9's account info,
//! and the stream config below is exactly what a KV bucket is on every server version.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use serde::Deserialize;

use super::{BusError, Names};

/// The definitions file, compiled in so a binary needs nothing beside it.
pub const DEFINITIONS_YAML: &str = include_str!("../../nats/jetstream.yaml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definitions {
    pub streams: BTreeMap<String, StreamDef>,
    pub buckets: BTreeMap<String, BucketDef>,
    pub object_stores: BTreeMap<String, ObjectStoreDef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Retention {
    Limits,
    Workqueue,
    Interest,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamDef {
    pub description: String,
    pub subjects: Vec<String>,
    pub retention: Retention,
    #[serde(default)]
    pub max_age_secs: u64,
    #[serde(default)]
    pub duplicate_window_secs: u64,
    /// Keep at most this many messages per subject (0 = unlimited).
    #[serde(default)]
    pub max_msgs_per_subject: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketDef {
    pub description: String,
    pub history: i64,
    #[serde(default)]
    pub max_age_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectStoreDef {
    pub description: String,
    /// Objects older than this are dropped (0 = kept).
    #[serde(default)]
    pub max_age_secs: u64,
}

impl Definitions {
    /// Parses the compiled-in definitions.
    pub fn builtin() -> Result<Self, BusError> {
        serde_norway::from_str(DEFINITIONS_YAML).map_err(|e| BusError::Provision {
            what: "nats/jetstream.yaml".into(),
            reason: e.to_string(),
        })
    }

    /// The stream config for `key`, with `{ns}` rendered.
    pub fn stream_config(&self, names: &Names, key: &str) -> Option<stream::Config> {
        let def = self.streams.get(key)?;
        Some(stream::Config {
            name: names.stream(key),
            description: Some(def.description.clone()),
            subjects: def.subjects.iter().map(|s| render(s, names)).collect(),
            retention: match def.retention {
                Retention::Limits => stream::RetentionPolicy::Limits,
                Retention::Workqueue => stream::RetentionPolicy::WorkQueue,
                Retention::Interest => stream::RetentionPolicy::Interest,
            },
            max_age: Duration::from_secs(def.max_age_secs),
            duplicate_window: Duration::from_secs(def.duplicate_window_secs),
            max_messages_per_subject: if def.max_msgs_per_subject > 0 {
                def.max_msgs_per_subject
            } else {
                -1
            },
            storage: stream::StorageType::File,
            num_replicas: 1,
            ..Default::default()
        })
    }

    /// The backing stream config of the KV bucket `key`.
    pub fn bucket_stream_config(&self, names: &Names, key: &str) -> Option<stream::Config> {
        let def = self.buckets.get(key)?;
        let bucket = names.bucket(key);
        Some(stream::Config {
            name: format!("KV_{bucket}"),
            description: Some(def.description.clone()),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: def.history.max(1),
            max_age: Duration::from_secs(def.max_age_secs),
            storage: stream::StorageType::File,
            num_replicas: 1,
            allow_rollup: true,
            deny_delete: true,
            deny_purge: false,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        })
    }

    /// The backing stream config of the object store `key`: what async-nats'
    /// `create_object_store` makes, created here for the same reason as the buckets'.
    pub fn object_store_stream_config(&self, names: &Names, key: &str) -> Option<stream::Config> {
        let def = self.object_stores.get(key)?;
        let store = names.bucket(key);
        Some(stream::Config {
            name: format!("OBJ_{store}"),
            description: Some(def.description.clone()),
            subjects: vec![format!("$O.{store}.C.>"), format!("$O.{store}.M.>")],
            max_age: Duration::from_secs(def.max_age_secs),
            storage: stream::StorageType::File,
            num_replicas: 1,
            discard: stream::DiscardPolicy::New,
            allow_rollup: true,
            allow_direct: true,
            ..Default::default()
        })
    }

    /// The config of every stream of the namespace: its streams, then the buckets' and the
    /// object stores' backing streams.
    pub fn stream_configs(&self, names: &Names) -> Vec<stream::Config> {
        let streams = self
            .streams
            .keys()
            .filter_map(|k| self.stream_config(names, k));
        let buckets = self
            .buckets
            .keys()
            .filter_map(|k| self.bucket_stream_config(names, k));
        let stores = self
            .object_stores
            .keys()
            .filter_map(|k| self.object_store_stream_config(names, k));
        streams.chain(buckets).chain(stores).collect()
    }

    /// The name of every stream of the namespace, in [`Definitions::stream_configs`]' order.
    pub fn stream_names(&self, names: &Names) -> Vec<String> {
        self.stream_configs(names)
            .into_iter()
            .map(|c| c.name)
            .collect()
    }
}

fn render(template: &str, names: &Names) -> String {
    template.replace("{ns}", names.namespace())
}

/// Creates or updates every stream and bucket of the namespace with `replicas` replicas
/// (`nats_replicas`; 0 keeps each one's count, and a new one gets 1). Safe to run any number of
/// times, from any number of processes at once.
#[tracing::instrument(skip_all, fields(namespace = names.namespace()))]
pub async fn ensure_all(
    js: &jetstream::Context,
    names: &Names,
    replicas: usize,
) -> Result<(), BusError> {
    for config in Definitions::builtin()?.stream_configs(names) {
        ensure_stream(js, config, replicas).await?;
    }
    tracing::debug!("jetstream streams and buckets ensured");
    Ok(())
}

async fn ensure_stream(
    js: &jetstream::Context,
    mut config: stream::Config,
    replicas: usize,
) -> Result<(), BusError> {
    let name = config.name.clone();
    // Two processes starting together may both miss the stream and race to create it;
    // the loser's create fails with "already in use", and a second update then succeeds.
    // A cluster electing a stream's leader answers errors for a few seconds: retried too.
    let mut last = String::new();
    for round in 0..10 {
        if round > 0 {
            tokio::time::sleep(Duration::from_millis(50 * (1 << round.min(5)))).await;
        }
        config.num_replicas = match replicas {
            0 => match current_replicas(js, &name).await {
                Ok(current) => current.unwrap_or(1),
                Err(e) => {
                    last = e;
                    continue;
                }
            },
            n => n,
        };
        match js.create_or_update_stream(config.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(BusError::Provision {
        what: format!("stream {name}"),
        reason: last,
    })
}

/// The replicas of stream `name`, or `None` if it does not exist: a control plane restarted
/// without `nats_replicas` must not shrink what `omoi migrate --replicas 3` grew.
async fn current_replicas(js: &jetstream::Context, name: &str) -> Result<Option<usize>, String> {
    use async_nats::jetstream::context::GetStreamErrorKind;
    match js.get_stream(name).await {
        Ok(stream) => Ok(Some(stream.cached_info().config.num_replicas.max(1))),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(j)
                if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(e.to_string()),
        },
    }
}

/// Opens the object store `key` (after [`ensure_all`]).
pub async fn open_object_store(
    js: &jetstream::Context,
    names: &Names,
    key: &str,
) -> Result<jetstream::object_store::ObjectStore, BusError> {
    let store = names.bucket(key);
    js.get_object_store(&store)
        .await
        .map_err(|e| BusError::Provision {
            what: format!("object store {store}"),
            reason: e.to_string(),
        })
}

/// Opens the KV bucket `key` (after [`ensure_all`]).
pub async fn open_bucket(
    js: &jetstream::Context,
    names: &Names,
    key: &str,
) -> Result<jetstream::kv::Store, BusError> {
    let bucket = names.bucket(key);
    js.get_key_value(bucket.clone())
        .await
        .map_err(|e| BusError::Kv {
            bucket,
            reason: e.to_string(),
        })
}

/// Ack deadline of an agent's dispatch consumer; its worker extends it while a task runs.
pub const DISPATCH_ACK_WAIT: Duration = Duration::from_secs(30);
/// Ack deadline of an agent's inbox consumer.
pub const INBOX_ACK_WAIT: Duration = Duration::from_secs(30);

/// The durable consumer `agent-<agent_id>` of `<ns>_dispatch`: the agent's tasks, explicit
/// acks, at most twice its capacity unacknowledged.
pub fn dispatch_consumer(
    names: &Names,
    agent: crate::domain::AgentId,
    agent_name: &str,
    capacity: i32,
) -> consumer::pull::Config {
    let name = names.dispatch_consumer(agent);
    consumer::pull::Config {
        durable_name: Some(name),
        description: Some(format!("omoi dispatches for agent {agent_name}")),
        filter_subject: names.dispatch(agent),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: DISPATCH_ACK_WAIT,
        max_ack_pending: i64::from(capacity.max(1)) * 2,
        ..Default::default()
    }
}

/// The durable consumer `inbox-<agent_id>` of `<ns>_inbox`: the agent's messages and handoff
/// offers in order, one unacknowledged at a time.
pub fn inbox_consumer(
    names: &Names,
    agent: crate::domain::AgentId,
    agent_name: &str,
) -> consumer::pull::Config {
    let name = names.inbox_consumer(agent);
    consumer::pull::Config {
        durable_name: Some(name),
        description: Some(format!("omoi inbox of agent {agent_name}")),
        filter_subject: names.inbox(agent),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: INBOX_ACK_WAIT,
        max_ack_pending: 1,
        ..Default::default()
    }
}

/// Creates (or updates, e.g. for a new capacity) an agent's dispatch and inbox consumers: the
/// control plane does this at registration, so an agent only binds to them.
pub async fn ensure_agent_consumers(
    js: &jetstream::Context,
    names: &Names,
    agent: crate::domain::AgentId,
    agent_name: &str,
    capacity: i32,
) -> Result<(), BusError> {
    for (stream, config) in [
        (
            names.stream(super::names::STREAM_DISPATCH),
            dispatch_consumer(names, agent, agent_name, capacity),
        ),
        (
            names.stream(super::names::STREAM_INBOX),
            inbox_consumer(names, agent, agent_name),
        ),
    ] {
        let err = |e: String| BusError::Consumer {
            stream: stream.clone(),
            reason: e,
        };
        js.get_stream_no_info(&stream)
            .await
            .map_err(|e| err(e.to_string()))?
            .create_consumer(config)
            .await
            .map_err(|e| err(e.to_string()))?;
    }
    Ok(())
}

/// Drops the dispatches waiting for (or delivered to and not yet acknowledged by) an agent whose
/// tasks were taken back: a process that comes back as that agent must not run them. Best
/// effort: a dispatch left behind is fenced off by its attempt when its report comes.
pub async fn purge_dispatches(
    js: &jetstream::Context,
    names: &Names,
    agent: crate::domain::AgentId,
) {
    if let Ok(stream) = js
        .get_stream_no_info(names.stream(super::names::STREAM_DISPATCH))
        .await
    {
        if let Err(e) = stream.purge().filter(names.dispatch(agent)).await {
            tracing::warn!(agent.id = %agent, error = %e, "could not purge an agent's dispatches");
        }
    }
}

/// Deletes an agent's dispatch and inbox consumers (it was deregistered); missing ones are fine.
pub async fn delete_agent_consumers(
    js: &jetstream::Context,
    names: &Names,
    agent: crate::domain::AgentId,
) {
    for (stream, consumer) in [
        (
            names.stream(super::names::STREAM_DISPATCH),
            names.dispatch_consumer(agent),
        ),
        (
            names.stream(super::names::STREAM_INBOX),
            names.inbox_consumer(agent),
        ),
    ] {
        if let Ok(s) = js.get_stream_no_info(&stream).await {
            let _ = s.delete_consumer(&consumer).await;
        }
    }
}

/// Deletes every stream and bucket of the namespace (tests and `omoi` teardown tooling).
pub async fn delete_all(js: &jetstream::Context, names: &Names) -> Result<(), BusError> {
    let defs = Definitions::builtin()?;
    for name in defs.stream_names(names) {
        if let Err(e) = js.delete_stream(&name).await {
            use async_nats::jetstream::context::DeleteStreamErrorKind;
            if !matches!(e.kind(), DeleteStreamErrorKind::JetStream(ref je) if je.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND)
            {
                return Err(BusError::Provision {
                    what: format!("delete stream {name}"),
                    reason: e.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Whether two subject patterns (with `*` and `>` wildcards) can match a common subject.
pub fn subjects_overlap(a: &str, b: &str) -> bool {
    let (mut a, mut b) = (a.split('.'), b.split('.'));
    loop {
        match (a.next(), b.next()) {
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(x), Some(y)) => {
                if x != y && x != "*" && y != "*" {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Event;

    #[test]
    fn every_event_type_lands_in_exactly_one_stream_and_no_request_subject_does() {
        let names = Names::new("ns1").unwrap();
        let defs = Definitions::builtin().unwrap();
        let streams: Vec<stream::Config> = defs
            .streams
            .keys()
            .filter_map(|k| defs.stream_config(&names, k))
            .collect();
        for kind in Event::TYPES {
            let subject = names.event(kind);
            let holders: Vec<_> = streams
                .iter()
                .filter(|s| s.subjects.iter().any(|p| subjects_overlap(p, &subject)))
                .map(|s| s.name.clone())
                .collect();
            assert_eq!(
                holders,
                vec![names.stream(super::super::names::STREAM_EVENTS)],
                "{subject}"
            );
        }
        for request in names.request_subjects() {
            for s in &streams {
                for p in &s.subjects {
                    assert!(
                        !subjects_overlap(p, &request),
                        "{} captures request subject {request}",
                        s.name
                    );
                }
            }
        }
        assert!(streams.iter().any(|s| {
            s.subjects
                .iter()
                .any(|p| subjects_overlap(p, &names.deadletter("ns1.task.completed")))
        }));
    }

    #[test]
    fn subject_overlap_understands_wildcards() {
        assert!(subjects_overlap("a.>", "a.b.c"));
        assert!(subjects_overlap("a.*.c", "a.b.c"));
        assert!(!subjects_overlap("a.*.c", "a.b.d"));
        assert!(!subjects_overlap("a.b", "a.b.c"));
        assert!(subjects_overlap("a.b.>", "a.*.c"));
        assert!(!subjects_overlap("a.registered", "a.heartbeat.>"));
    }

    #[test]
    fn definitions_name_the_documented_streams_and_buckets() {
        let defs = Definitions::builtin().unwrap();
        for key in [
            super::super::names::STREAM_EVENTS,
            super::super::names::STREAM_DEADLETTER,
        ] {
            assert!(defs.streams.contains_key(key), "{key}");
        }
        for key in [
            super::super::names::BUCKET_AGENTS,
            super::super::names::BUCKET_LEASES,
        ] {
            assert!(defs.buckets.contains_key(key), "{key}");
        }
        for def in defs.streams.values() {
            assert!(!def.description.is_empty());
        }
    }
}
