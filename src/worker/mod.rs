//! The worker process (`omoi worker`): stateless and NATS-only. It hosts one or more agents,
//! registers them with the control plane, and heartbeats for each while it runs. Start more
//! workers to scale out.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::bus::{BusError, Names};
use crate::client::{AgentRegistryClient, ClientError};
use crate::config::Settings;
use crate::db::agents::AgentRecord;
use crate::domain::{AgentId, RetryPolicy};
use crate::protocol::{Heartbeat, PROTOCOL_VERSION};
use crate::runtime::Shutdown;
use crate::service::ServiceError;
use crate::service::registry::RegisterRequest;

/// One agent a worker hosts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentSpec {
    pub name: String,
    pub capabilities: Vec<String>,
    #[serde(default = "one")]
    pub capacity: i32,
    #[serde(default = "worker_type")]
    pub agent_type: String,
    #[serde(default)]
    pub tags: Vec<String>,
}

fn one() -> i32 {
    1
}
fn worker_type() -> String {
    "worker".into()
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("{0}")]
    Config(String),
    #[error("agent `{name}` was refused: {source}")]
    Refused {
        name: String,
        #[source]
        source: ServiceError,
    },
}

/// Runs a worker hosting `agents` until `shutdown` is cancelled; then marks its agents offline
/// and returns.
pub async fn run(
    settings: &Settings,
    agents: Vec<AgentSpec>,
    shutdown: Shutdown,
) -> Result<(), WorkerError> {
    if agents.is_empty() {
        return Err(WorkerError::Config(
            "a worker needs at least one agent".into(),
        ));
    }
    let names = Names::new(&settings.namespace).map_err(WorkerError::Config)?;
    let nats = crate::bus::connect(&settings.nats_url, "omoi-worker").await?;
    let registry = AgentRegistryClient::new(nats.clone(), names.clone());

    let mut hosted = Vec::new();
    for spec in agents {
        let Some(record) = register_until_accepted(&registry, &spec, &shutdown).await? else {
            return Ok(()); // cancelled while registering
        };
        tracing::info!(agent.id = %record.id, agent.name = %record.name, "agent registered");
        let (tx, rx) = watch::channel(record.id);
        shutdown.spawn(heartbeat_loop(
            registry.clone(),
            spec,
            tx,
            settings.heartbeat_interval(),
            shutdown.clone(),
        ));
        hosted.push(rx);
    }

    shutdown.token.cancelled().await;
    tracing::info!("worker stopping");
    shutdown.tracker.close();
    let _ = tokio::time::timeout(settings.shutdown_grace(), shutdown.tracker.wait()).await;
    // Say goodbye so the agents go offline now instead of after the timeout.
    for rx in hosted {
        let id = *rx.borrow();
        let leaving = Heartbeat {
            v: PROTOCOL_VERSION,
            agent_id: id,
            load: 0,
            leaving: true,
        };
        let goodbye = tokio::time::timeout(Duration::from_secs(1), registry.heartbeat(&leaving));
        if let Ok(Err(e)) = goodbye.await {
            tracing::debug!(agent.id = %id, error = %e, "could not announce leaving");
        }
    }
    let _ = nats.flush().await;
    tracing::info!("worker stopped");
    Ok(())
}

/// Registers `spec`, retrying with backoff while no control plane answers or the name is still
/// held by this agent's previous (not yet stale) incarnation. `None` if cancelled.
async fn register_until_accepted(
    registry: &AgentRegistryClient,
    spec: &AgentSpec,
    shutdown: &Shutdown,
) -> Result<Option<AgentRecord>, WorkerError> {
    let request = RegisterRequest {
        name: spec.name.clone(),
        agent_type: spec.agent_type.clone(),
        phase_id: None,
        capabilities: spec.capabilities.clone(),
        capacity: spec.capacity,
        tags: spec.tags.clone(),
        metadata: None,
    };
    let backoff = RetryPolicy {
        base_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(5),
    };
    let mut failures = 0;
    loop {
        match registry.register(&request).await {
            Ok(record) => return Ok(Some(record)),
            Err(ClientError::Service(ServiceError::Conflict(msg))) => {
                tracing::info!(agent.name = %spec.name, reason = %msg, "name still held; retrying");
            }
            Err(ClientError::Service(e)) => {
                return Err(WorkerError::Refused {
                    name: spec.name.clone(),
                    source: e,
                });
            }
            Err(e) => {
                tracing::warn!(agent.name = %spec.name, error = %e, "registration failed; retrying")
            }
        }
        failures += 1;
        let delay = backoff.delay(failures, &mut rand::rng());
        tokio::select! {
            () = shutdown.token.cancelled() => return Ok(None),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Heartbeats for one agent every `interval`; re-registers if the control plane forgot it.
async fn heartbeat_loop(
    registry: AgentRegistryClient,
    spec: AgentSpec,
    id: watch::Sender<AgentId>,
    interval: Duration,
    shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.token.cancelled() => break,
            _ = tick.tick() => {}
        }
        let agent_id = *id.borrow();
        let hb = Heartbeat {
            v: PROTOCOL_VERSION,
            agent_id,
            load: 0,
            leaving: false,
        };
        match registry.heartbeat(&hb).await {
            Ok(_) => metrics::counter!("omoi_worker_heartbeats_total").increment(1),
            Err(ClientError::Service(ServiceError::UnknownAgent(_))) => {
                tracing::warn!(agent.id = %agent_id, "control plane does not know this agent; re-registering");
                match register_until_accepted(&registry, &spec, &shutdown).await {
                    Ok(Some(record)) => {
                        id.send_replace(record.id);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "re-registration refused");
                        break;
                    }
                }
            }
            Err(e) => tracing::debug!(agent.id = %agent_id, error = %e, "heartbeat not answered"),
        }
    }
}
