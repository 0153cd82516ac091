//! The worker process (`omoi worker`): stateless and NATS-only. It hosts one or more agents,
//! registers them with the control plane, heartbeats for each, and runs their tasks
//! ([`runner`]) with the [`executor`]s it offers. Start more workers to scale out.
//!
//! Stopping (SIGINT/SIGTERM): stop taking work; let running tasks finish within
//! `shutdown_grace_ms`; hand back (report `released`) what is still running then, releasing its
//! locks; keep heartbeating until all that is done; then mark the agents offline and exit.

pub mod executor;
pub mod guard;
pub mod inbox;
pub mod policy;
pub mod runner;

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use serde::{Deserialize, Serialize};

use crate::bus::{BusError, Names};
use crate::client::{AgentRegistryClient, ClientError};
use crate::config::Settings;
use crate::domain::{AgentId, RetryPolicy};
use crate::protocol::registry::{AgentRecord, Heartbeat, RegisterRequest};
use crate::protocol::{ErrorBody, ErrorCode, PROTOCOL_VERSION};
use crate::runtime::Shutdown;

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
        source: ErrorBody,
    },
}

/// Runs a worker hosting `agents` until `shutdown` is cancelled; then drains, marks its agents
/// offline and returns.
pub async fn run(
    settings: &Settings,
    agents: Vec<AgentSpec>,
    shutdown: Shutdown,
) -> Result<(), WorkerError> {
    let executors = executor::Executors::from_settings(settings).map_err(WorkerError::Config)?;
    run_with(settings, agents, executors, shutdown).await
}

/// [`run`] with a custom set of executors.
pub async fn run_with(
    settings: &Settings,
    agents: Vec<AgentSpec>,
    executors: executor::Executors,
    shutdown: Shutdown,
) -> Result<(), WorkerError> {
    if agents.is_empty() {
        return Err(WorkerError::Config(
            "a worker needs at least one agent".into(),
        ));
    }
    let names = Names::new(&settings.namespace).map_err(WorkerError::Config)?;
    let nats = crate::bus::connect(
        crate::bus::NatsAccess::from_settings(settings),
        "omoi-worker",
    )
    .await?;
    let js = async_nats::jetstream::new(nats.clone());
    // Streams, buckets and this worker's consumers are the control plane's to make: a worker
    // only binds to them (and may hold no right to change them).
    let Some(locks_kv) = wait_for_locks(&js, &names, &shutdown.token).await else {
        return Ok(()); // stopped before a control plane provisioned the namespace
    };
    let locks = crate::bus::kv_lock::LockManager::new(
        locks_kv,
        Duration::from_millis(settings.lock_lease_ms),
    );
    let registry = AgentRegistryClient::new(nats.clone(), names.clone());
    let total_capacity: usize = agents.iter().map(|a| a.capacity.max(1) as usize).sum();
    let limit = match settings.worker_max_concurrency {
        0 => total_capacity,
        n => n as usize,
    };
    let worker_slots = Arc::new(tokio::sync::Semaphore::new(limit));

    let stop_taking = shutdown.token.clone();
    let hard_stop = CancellationToken::new();
    let stop_heartbeats = CancellationToken::new();
    let runners = TaskTracker::new();
    let heartbeats = TaskTracker::new();
    let mut hosted = Vec::new();
    let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Every hosted agent offers the worker's executors: tasks of others never come here.
    let offered = executors.names();
    tracing::info!(executors = %offered.join(","), "executors offered");
    for spec in agents {
        let Some(record) =
            register_until_accepted(&registry, &spec, &offered, &shutdown.token).await?
        else {
            break; // stopped while registering
        };
        tracing::info!(agent.id = %record.id, agent.name = %record.name, "agent registered");
        let load = Arc::new(AtomicI32::new(0));
        // This agent's own stops, so a deregistration ends it alone.
        let (agent_stop, agent_hard, agent_inbox) = (
            stop_taking.child_token(),
            hard_stop.child_token(),
            stop_heartbeats.child_token(),
        );
        live.fetch_add(1, Ordering::SeqCst);
        let dropped = Dropped {
            tokens: vec![agent_stop.clone(), agent_hard.clone(), agent_inbox.clone()],
            live: live.clone(),
            worker: shutdown.token.clone(),
        };
        heartbeats.spawn(heartbeat_loop(
            registry.clone(),
            spec.clone(),
            offered.clone(),
            record.id,
            load.clone(),
            settings.heartbeat_interval(),
            stop_heartbeats.clone(),
            dropped,
        ));
        let runner = runner::AgentRunner {
            js: js.clone(),
            names: names.clone(),
            agent_id: record.id,
            agent_name: record.name.clone(),
            capacity: spec.capacity.max(1) as usize,
            worker_slots: worker_slots.clone(),
            executors: executors.clone(),
            locks: locks.clone(),
            lock_wait: Duration::from_millis(settings.lock_wait_ms),
            default_timeout: Duration::from_millis(settings.executor_timeout_ms),
            load,
            running: Default::default(),
            finished: Default::default(),
        };
        let inbox_dir = (!settings.worker_inbox_dir.is_empty())
            .then(|| std::path::PathBuf::from(&settings.worker_inbox_dir));
        heartbeats.spawn({
            let (js, names, name) = (js.clone(), names.clone(), record.name.clone());
            let stop = agent_inbox;
            let id = record.id;
            async move {
                if let Err(e) = inbox::run(js, names, id, name, inbox_dir, stop).await {
                    tracing::error!(error = %e, "inbox consumer failed");
                }
            }
        });
        runners.spawn(async move {
            if let Err(e) = runner.run(agent_stop, agent_hard).await {
                tracing::error!(error = %e, "agent runner failed");
            }
        });
        hosted.push(record.id);
    }

    stop_taking.cancelled().await;
    tracing::info!("worker stopping: no new tasks; waiting for running ones");
    runners.close();
    if tokio::time::timeout(settings.shutdown_grace(), runners.wait())
        .await
        .is_err()
    {
        tracing::warn!("grace period over: handing back the tasks still running");
        hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), runners.wait()).await;
    }
    stop_heartbeats.cancel();
    heartbeats.close();
    heartbeats.wait().await;
    // Say goodbye so the agents go offline now instead of after the timeout.
    for id in hosted {
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

/// Opens the lock bucket, waiting (with backoff) until a control plane has provisioned the
/// namespace. `None` if cancelled meanwhile.
async fn wait_for_locks(
    js: &async_nats::jetstream::Context,
    names: &Names,
    stop: &CancellationToken,
) -> Option<async_nats::jetstream::kv::Store> {
    let backoff = RetryPolicy {
        base_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(5),
    };
    let mut failures = 0;
    loop {
        match crate::bus::provision::open_bucket(js, names, crate::bus::names::BUCKET_LOCKS).await {
            Ok(kv) => return Some(kv),
            Err(e) if failures == 0 => {
                tracing::warn!(error = %e, "lock bucket not there yet (has a control plane run `omoi migrate`?); waiting");
            }
            Err(_) => {}
        }
        failures += 1;
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(backoff.delay(failures, &mut rand::rng())) => {}
        }
    }
}

/// Registers `spec`, retrying with backoff while no control plane answers or the name is still
/// held by this agent's previous (not yet stale) incarnation. `None` if cancelled.
async fn register_until_accepted(
    registry: &AgentRegistryClient,
    spec: &AgentSpec,
    executors: &[String],
    stop: &CancellationToken,
) -> Result<Option<AgentRecord>, WorkerError> {
    let request = RegisterRequest {
        v: None,
        executors: executors.to_vec(),
        name: spec.name.clone(),
        agent_type: spec.agent_type.clone(),
        phase_id: None,
        capabilities: spec.capabilities.clone(),
        capacity: spec.capacity,
        tags: spec.tags.clone(),
        metadata: None,
        // One per process and agent: a retry after a lost reply is answered, not refused.
        instance: Some(format!("omoi-worker-{}", uuid::Uuid::new_v4().simple())),
    };
    let backoff = RetryPolicy {
        base_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(5),
    };
    let mut failures = 0;
    loop {
        match registry.register(&request).await {
            Ok(record) => return Ok(Some(record)),
            Err(ClientError::Remote(e)) if e.code == ErrorCode::Conflict => {
                tracing::info!(agent.name = %spec.name, reason = %e.message, "name still held; retrying");
            }
            Err(ClientError::Remote(e)) if e.code.is_transient() => {
                tracing::warn!(agent.name = %spec.name, reason = %e.message, "control plane unavailable; retrying");
            }
            Err(ClientError::Remote(e)) => {
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
            () = stop.cancelled() => return Ok(None),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// What ends when a hosted agent is deregistered: its runner and inbox, and the worker when it
/// hosts nothing else.
struct Dropped {
    tokens: Vec<CancellationToken>,
    live: Arc<std::sync::atomic::AtomicUsize>,
    worker: CancellationToken,
}

impl Dropped {
    fn now(self, name: &str) {
        tracing::warn!(agent.name = %name, "agent was deregistered; no longer hosting it");
        for t in &self.tokens {
            t.cancel();
        }
        if self.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            tracing::error!("every agent of this worker was deregistered; stopping the worker");
            self.worker.cancel();
        }
    }
}

/// Heartbeats for one agent every `interval`; re-registers if the control plane forgot it;
/// stops hosting it if it was deregistered.
#[expect(
    clippy::too_many_arguments,
    reason = "one agent's whole heartbeat context"
)]
async fn heartbeat_loop(
    registry: AgentRegistryClient,
    spec: AgentSpec,
    executors: Vec<String>,
    agent_id: AgentId,
    load: Arc<AtomicI32>,
    interval: Duration,
    stop: CancellationToken,
    dropped: Dropped,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let hb = Heartbeat {
            v: PROTOCOL_VERSION,
            agent_id,
            load: load.load(Ordering::SeqCst),
            leaving: false,
        };
        match registry.heartbeat(&hb).await {
            Ok(_) => metrics::counter!("omoi_worker_heartbeats_total").increment(1),
            Err(ClientError::Remote(e)) if e.code == ErrorCode::Deregistered => {
                dropped.now(&spec.name);
                break;
            }
            Err(ClientError::Remote(e)) if e.code == ErrorCode::UnknownAgent => {
                // Its id comes from its name: registered again, it is the same agent, and the
                // control plane makes its consumers anew.
                tracing::warn!(agent.id = %agent_id, "control plane does not know this agent; re-registering");
                match register_until_accepted(&registry, &spec, &executors, &stop).await {
                    Ok(Some(_)) => {}
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
