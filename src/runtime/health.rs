//! `/healthz` (the process is up), `/readyz` (NATS and PostgreSQL answer) and `/metrics`
//! (Prometheus text format).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use sqlx::PgPool;

/// What readiness checks.
#[derive(Clone)]
pub struct HealthState {
    pub nats: async_nats::Client,
    /// `None` for processes without a database (workers).
    pub db: Option<PgPool>,
}

/// `/healthz` and `/readyz`: open (load balancers and orchestrators probe them).
pub fn probes(state: HealthState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// `/metrics` (the control plane puts it behind a `viewer` token).
pub fn metrics_router() -> Router {
    Router::new().route("/metrics", get(metrics))
}

async fn readyz(State(state): State<HealthState>) -> Response {
    let nats_ok = state.nats.connection_state() == async_nats::connection::State::Connected
        && tokio::time::timeout(Duration::from_secs(2), state.nats.flush())
            .await
            .is_ok_and(|r| r.is_ok());
    let db_ok = match &state.db {
        None => None,
        Some(pool) => Some(
            tokio::time::timeout(
                Duration::from_secs(2),
                sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(pool),
            )
            .await
            .is_ok_and(|r| r.is_ok()),
        ),
    };
    let ready = nats_ok && db_ok.unwrap_or(true);
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "nats": if nats_ok { "ok" } else { "unreachable" },
        "postgres": match db_ok { None => "not_used", Some(true) => "ok", Some(false) => "unreachable" },
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn metrics() -> Response {
    match crate::runtime::telemetry::prometheus() {
        Some(handle) => (
            [("content-type", "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder unavailable",
        )
            .into_response(),
    }
}
