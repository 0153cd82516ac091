//! `/api/v1/workflows`, `/api/v1/tasks` and `/api/v1/locks`.

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use serde_json::{Value, json};

use super::{ApiError, ApiResult, AppState, Json, Path};
use crate::domain::dag::WorkflowSpec;
use crate::protocol::workflows::{
    PatternRun, PatternSubmitted, Submitted, TaskRecord, WorkflowRecord, WorkflowView,
};
use crate::service::ServiceError;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/workflows", post(submit).get(list))
        .route("/workflows/from-pattern", post(from_pattern))
        .route("/patterns", get(patterns))
        .route("/workflows/{id}", get(get_one))
        .route("/workflows/{id}/cancel", post(cancel))
        .route("/tasks/{id}", get(task))
        .route("/tasks/{id}/retry", post(retry))
        .route("/locks", get(locks))
        .route("/locks/{name}", delete(force_release))
}

fn parse_id<T: std::str::FromStr>(what: &str, raw: &str) -> Result<T, ApiError> {
    raw.parse()
        .map_err(|_| ServiceError::NotFound(format!("{what} {raw} not found (not an id)")).into())
}

#[tracing::instrument(skip_all)]
async fn submit(
    State(state): State<AppState>,
    Json(spec): Json<WorkflowSpec>,
) -> ApiResult<(StatusCode, Json<Submitted>)> {
    Ok((
        StatusCode::CREATED,
        Json(state.workflows.submit(spec).await?),
    ))
}

/// `POST /workflows/from-pattern`: `{"pattern": "<name>", "params": {…}}`, or the file itself
/// as `{"source": "<YAML or JSON text>", "params": {…}}`.
#[tracing::instrument(skip_all)]
async fn from_pattern(
    State(state): State<AppState>,
    Json(run): Json<PatternRun>,
) -> ApiResult<(StatusCode, Json<PatternSubmitted>)> {
    Ok((
        StatusCode::CREATED,
        Json(
            state
                .workflows
                .submit_pattern(run, &state.pattern_dirs)
                .await?,
        ),
    ))
}

/// `GET /patterns`: the patterns a name can refer to.
async fn patterns(State(state): State<AppState>) -> Json<Vec<crate::pattern::Summary>> {
    Json(crate::pattern::list(&state.pattern_dirs))
}

async fn list(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Vec<WorkflowRecord>>> {
    let mut limit = 100;
    for (k, v) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        if k == "limit" {
            limit = v
                .parse()
                .map_err(|_| ServiceError::validation("limit", "must be a positive integer"))?;
        }
    }
    Ok(Json(state.workflows.list(limit).await?))
}

async fn get_one(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<WorkflowView>> {
    Ok(Json(state.workflows.get(parse_id("workflow", &id)?).await?))
}

async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<WorkflowView>> {
    Ok(Json(
        state.workflows.cancel(parse_id("workflow", &id)?).await?,
    ))
}

async fn task(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<TaskRecord>> {
    Ok(Json(state.workflows.task(parse_id("task", &id)?).await?))
}

async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<TaskRecord>> {
    Ok(Json(
        state.workflows.retry_task(parse_id("task", &id)?).await?,
    ))
}

async fn locks(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let all = state.locks.list().await?;
    Ok(Json(json!(
        all.into_iter()
            .map(|(name, lock)| json!({"name": name, "lock": lock}))
            .collect::<Vec<_>>()
    )))
}

async fn force_release(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    crate::bus::kv_lock::validate_resource_name(&name)
        .map_err(|reason| ServiceError::validation("name", reason))?;
    let released = state.locks.force_release(&name).await?;
    if !released {
        return Err(ServiceError::NotFound(format!("lock `{name}` is not held")).into());
    }
    tracing::warn!(lock = %name, "lock force-released by an operator");
    Ok(Json(json!({"name": name, "released": true})))
}
