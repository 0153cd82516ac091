//! The control plane process (`omoi coordinator`): owns PostgreSQL, serves the HTTP API and the
//! registry and workflow services, and — on the one instance holding the `scheduler` lease —
//! runs the background loops: the liveness sweep and the scheduler.

pub mod endpoints;

use std::net::SocketAddr;

use async_nats::jetstream;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::bus::lease::Lease;
use std::sync::Arc;

use tokio::sync::Notify;

use crate::bus::kv_lock::LockManager;
use crate::bus::names::{BUCKET_AGENTS, BUCKET_LEASES, BUCKET_LOCKS};
use crate::bus::{BusError, EventBus, Names, provision};
use crate::config::Settings;
use crate::db::DbError;
use crate::runtime::Shutdown;
use crate::runtime::health::{self, HealthState};
use crate::service::collaboration::Collaboration;
use crate::service::outbox::Outbox;
use crate::service::registry::Registry;
use crate::service::scheduler::{Scheduler, SchedulerConfig};
use crate::service::workflows::Workflows;

/// Key of the scheduler lease in the `<ns>_leases` bucket.
pub const SCHEDULER_LEASE_KEY: &str = "scheduler";

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("{0}")]
    Config(String),
    #[error("bind HTTP on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// A started coordinator.
pub struct Running {
    /// Where the HTTP API listens (useful with port 0).
    pub http_addr: SocketAddr,
    /// True while this instance holds the scheduler lease.
    pub leader: watch::Receiver<bool>,
    pub instance_id: String,
}

/// Applies migrations and provisions JetStream: what `omoi migrate` does, and every process
/// does at start.
pub async fn migrate(
    settings: &Settings,
) -> Result<(PgPool, async_nats::Client), CoordinatorError> {
    prepare(settings, "omoi-migrate").await
}

/// Connects, applies migrations and provisions JetStream; `client_name` names the NATS
/// connection (shown by `nats server report connections`).
async fn prepare(
    settings: &Settings,
    client_name: &str,
) -> Result<(PgPool, async_nats::Client), CoordinatorError> {
    let names = Names::new(&settings.namespace).map_err(CoordinatorError::Config)?;
    let url = &settings.database_url;
    let pool = match crate::db::connect(url, settings.db_max_connections).await {
        // A fresh server: the database is created (as `omoi migrate` and `omoi dev` do), if
        // this user may.
        Err(e) if e.is_missing_database() => {
            let masked = crate::config::mask_url_password(url);
            crate::db::ensure_database(url).await.map_err(|cause| {
                CoordinatorError::Config(format!(
                    "database {masked} does not exist and could not be created ({cause}): \
                     create it, or run `omoi migrate` as a user that may"
                ))
            })?;
            tracing::info!(database = %masked, "created the database");
            crate::db::connect(url, settings.db_max_connections).await?
        }
        other => other?,
    };
    crate::db::migrate(&pool).await?;
    let nats =
        crate::bus::connect(crate::bus::NatsAccess::from_settings(settings), client_name).await?;
    provision::ensure_all(
        &jetstream::new(nats.clone()),
        &names,
        settings.nats_replicas as usize,
    )
    .await?;
    Ok((pool, nats))
}

/// Starts every component on `shutdown`'s tracker and returns once they are up.
pub async fn start(settings: &Settings, shutdown: &Shutdown) -> Result<Running, CoordinatorError> {
    let names = Names::new(&settings.namespace).map_err(CoordinatorError::Config)?;
    // Metrics recorded before the recorder is installed are lost: install it now, not at the
    // first scrape (a control plane embedded in another program has no CLI to do it).
    let _ = crate::runtime::telemetry::prometheus();
    let instance_id = format!("coordinator-{}", uuid::Uuid::now_v7().simple());
    let (pool, nats) = prepare(settings, &instance_id).await?;
    check_auth(settings, &pool).await?;
    let js = jetstream::new(nats.clone());

    let bus = EventBus::new(js.clone(), names.clone());
    let mirror = provision::open_bucket(&js, &names, BUCKET_AGENTS).await?;
    let registry = Registry::new(
        pool.clone(),
        bus.clone(),
        mirror,
        settings.agent_stale_after_ms as i64,
    );
    endpoints::start(nats.clone(), names.clone(), registry.clone(), shutdown).await?;
    let wake = Arc::new(Notify::new());
    let outbox = Outbox::start(js.clone(), pool.clone(), shutdown);
    let workflows = Workflows::new(pool.clone(), bus.clone(), outbox.clone(), wake.clone());
    endpoints::start_workflows(
        nats.clone(),
        names.clone(),
        workflows.clone(),
        settings.pattern_dirs(),
        settings.http_max_body_bytes,
        shutdown,
    )
    .await?;
    let collaboration = Collaboration::new(
        pool.clone(),
        bus.clone(),
        std::time::Duration::from_millis(settings.handoff_ttl_ms),
        wake.clone(),
        settings.agent_stale_after_ms as i64,
    );
    endpoints::start_collaboration(nats.clone(), names.clone(), collaboration.clone(), shutdown)
        .await?;
    let locks_kv = provision::open_bucket(&js, &names, BUCKET_LOCKS).await?;
    let locks = LockManager::new(
        locks_kv,
        std::time::Duration::from_millis(settings.lock_lease_ms),
    );

    // Leader election: background loops run only while this instance holds the lease.
    let (leader_tx, leader_rx) = watch::channel(false);
    let leases = provision::open_bucket(&js, &names, BUCKET_LEASES).await?;
    let lease = Lease::new(
        leases,
        SCHEDULER_LEASE_KEY,
        &instance_id,
        settings.leader_lease(),
    );
    shutdown.spawn(lease.run(leader_tx, shutdown.token.clone()));
    shutdown.spawn(sweep_loop(
        registry.clone(),
        collaboration.clone(),
        settings.clone(),
        leader_rx.clone(),
        shutdown.clone(),
    ));
    let scheduler = Scheduler::new(
        pool.clone(),
        bus.clone(),
        outbox,
        SchedulerConfig {
            retry: settings.retry_policy(),
            stale_after_ms: settings.agent_stale_after_ms as i64,
            start_timeout_ms: settings.task_start_timeout_ms as i64,
            tick: std::time::Duration::from_millis(250),
        },
        wake,
    );
    shutdown.spawn(scheduler.run(leader_rx.clone(), shutdown.token.clone()));

    let listener = tokio::net::TcpListener::bind(&settings.http_addr)
        .await
        .map_err(|source| CoordinatorError::Bind {
            addr: settings.http_addr.clone(),
            source,
        })?;
    let http_addr = listener
        .local_addr()
        .map_err(|source| CoordinatorError::Bind {
            addr: settings.http_addr.clone(),
            source,
        })?;
    let auth = crate::api::auth::Auth {
        mode: settings.http_auth,
        tokens: crate::service::tokens::Tokens::new(pool.clone()),
        allowed_origins: settings.allowed_origins(),
    };
    // Readiness has a connection of its own: a busy pool must not make the process look dead.
    let health_pool = crate::db::connect(&settings.database_url, 1).await?;
    let metrics = health::metrics_router().layer(axum::middleware::from_fn_with_state(
        auth.clone(),
        crate::api::auth::authorize,
    ));
    let app = health::probes(HealthState {
        nats: nats.clone(),
        db: Some(health_pool),
    })
    .merge(metrics)
    .merge(crate::api::router(crate::api::AppState {
        registry: registry.clone(),
        workflows,
        locks,
        collaboration: collaboration.clone(),
        nats: nats.clone(),
        names: names.clone(),
        pattern_dirs: settings.pattern_dirs(),
        limits: crate::api::ApiLimits::from_settings(settings),
        auth,
    }))
    .layer(tower_http::timeout::TimeoutLayer::with_status_code(
        axum::http::StatusCode::REQUEST_TIMEOUT,
        std::time::Duration::from_millis(settings.http_request_timeout_ms),
    ))
    .layer(tower_http::catch_panic::CatchPanicLayer::custom(
        crate::api::panic_response,
    ));
    let limits = crate::runtime::http::ConnectionLimits {
        max_connections: settings.http_max_connections as usize,
        header_timeout: std::time::Duration::from_millis(settings.http_header_timeout_ms),
    };
    shutdown.spawn(crate::runtime::http::serve(
        listener,
        app,
        limits,
        shutdown.token.clone(),
    ));
    tracing::info!(%http_addr, namespace = names.namespace(), instance = %instance_id, "coordinator started");
    Ok(Running {
        http_addr,
        leader: leader_rx,
        instance_id,
    })
}

/// With token authentication, keeps the bootstrap token of the configuration and refuses to
/// start when no token could authenticate (nobody could use the API); running open is said
/// loudly.
async fn check_auth(settings: &Settings, pool: &PgPool) -> Result<(), CoordinatorError> {
    let tokens = crate::service::tokens::Tokens::new(pool.clone());
    let failed = |e: crate::service::ServiceError| CoordinatorError::Config(e.to_string());
    match settings.http_auth {
        crate::config::HttpAuth::Open => {
            tracing::warn!(
                "http_auth = open: the HTTP API, WebSockets and /metrics take no token; anyone who reaches {} acts as admin",
                settings.http_addr
            );
        }
        crate::config::HttpAuth::Token => {
            if !settings.bootstrap_admin_token.is_empty() {
                tokens
                    .bootstrap(&settings.bootstrap_admin_token)
                    .await
                    .map_err(failed)?;
            }
            if !tokens.any_live().await.map_err(failed)? {
                return Err(CoordinatorError::Config(
                    "no API token exists, so nobody could use the HTTP API: create one with \
                     `omoi token create --name admin --role admin`, or set \
                     OMOI_BOOTSTRAP_ADMIN_TOKEN (a secret of 24+ characters), or run without \
                     authentication with OMOI_HTTP_AUTH=open (trusted networks only)"
                        .into(),
                ));
            }
        }
    }
    Ok(())
}

/// Runs a coordinator until `shutdown` is cancelled, then drains within the grace period.
pub async fn run(settings: &Settings, shutdown: Shutdown) -> Result<(), CoordinatorError> {
    if settings.nats_nkey_file.is_empty() && settings.nats_creds_file.is_empty() {
        tracing::warn!(
            "connecting to NATS without credentials: unless the server restricts clients otherwise, anyone who reaches it can act as any agent and forge state (docs/security.md: omoi nats-auth)"
        );
    }
    start(settings, &shutdown).await?;
    shutdown.token.cancelled().await;
    if !shutdown.drain(settings.shutdown_grace()).await {
        tracing::warn!("some tasks did not stop within the grace period");
    }
    tracing::info!("coordinator stopped");
    Ok(())
}

/// Leader-only: marks silent agents stale, then offline, a few times per heartbeat interval.
async fn sweep_loop(
    registry: Registry,
    collaboration: Collaboration,
    settings: Settings,
    mut leader: watch::Receiver<bool>,
    shutdown: Shutdown,
) {
    let period = (settings.heartbeat_interval() / 2).max(std::time::Duration::from_millis(50));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Since when heartbeats could have been heard: no agent is lost for a silence while no
    // control plane led (heartbeats went unanswered) or the database was away (unrecorded).
    let mut hearing_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            () = shutdown.token.cancelled() => break,
            _ = tick.tick() => {}
            _ = leader.changed() => continue,
        }
        if !*leader.borrow() {
            hearing_since = None;
            continue;
        }
        let since = *hearing_since.get_or_insert_with(tokio::time::Instant::now);
        if let Err(e) = registry
            .sweep(
                settings.agent_stale_after_ms as i64,
                settings.agent_offline_after_ms as i64,
                since.elapsed().as_millis() as i64,
            )
            .await
        {
            tracing::warn!(error = %e, "liveness sweep failed; will retry");
            hearing_since = Some(tokio::time::Instant::now());
        }
        if let Err(e) = collaboration.expire_due().await {
            tracing::warn!(error = %e, "handoff expiry failed; will retry");
        }
    }
}
