//! `/api/v1/workflows`, `/api/v1/tasks` and `/api/v1/locks`.

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use serde_json::{Value, json};

use super::{ApiError, ApiResult, AppState, Json, Path};
use crate::db::tasks::TaskRecord;
use crate::db::workflows::WorkflowRecord;
use crate::domain::dag::WorkflowSpec;
use crate::service::ServiceError;
use crate::service::workflows::{Submitted, WorkflowView};

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
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FromPattern {
    #[serde(default)]
    pattern: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    params: std::collections::BTreeMap<String, Value>,
}

fn pattern_error(e: crate::pattern::PatternError) -> ApiError {
    match e.kind {
        crate::pattern::PatternErrorKind::NotFound => ServiceError::NotFound(e.to_string()).into(),
        crate::pattern::PatternErrorKind::Parameter => {
            ServiceError::validation("params", e.to_string()).into()
        }
        _ => ServiceError::validation("pattern", e.to_string()).into(),
    }
}

#[tracing::instrument(skip_all)]
async fn from_pattern(
    State(state): State<AppState>,
    Json(req): Json<FromPattern>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let pattern = match (&req.pattern, &req.source) {
        (Some(name), None) => {
            // A name only: a client must not make the server read a path of its choosing.
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(ServiceError::validation(
                    "pattern",
                    "a pattern name (letters, digits, _ and -); send a file's text as `source`",
                )
                .into());
            }
            crate::pattern::find(name, &state.pattern_dirs).map_err(pattern_error)?
        }
        (None, Some(text)) => crate::pattern::load_str("source", text).map_err(pattern_error)?,
        _ => {
            return Err(ServiceError::validation(
                "pattern",
                "give exactly one of `pattern` (a name) or `source` (a pattern file's text)",
            )
            .into());
        }
    };
    let instantiated = pattern.instantiate(&req.params).map_err(pattern_error)?;
    let submitted = state.workflows.submit(instantiated.spec).await?;
    let mut reply = json!(submitted);
    reply["pattern"] = json!(pattern.name());
    Ok((StatusCode::CREATED, Json(reply)))
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
    let released = state.locks.force_release(&name).await?;
    if !released {
        return Err(ServiceError::NotFound(format!("lock `{name}` is not held")).into());
    }
    tracing::warn!(lock = %name, "lock force-released by an operator");
    Ok(Json(json!({"name": name, "released": true})))
}
