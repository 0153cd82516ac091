//! `/api/v1/agents`: upstream's paths and field names, kept for existing clients.

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::Deserialize;

use super::auth::Acting;
use super::{ApiError, ApiResult, AppState, Json, Path};
use crate::domain::AgentId;
use crate::protocol::registry::{
    AgentHealth, AgentMatch, AgentRecord, AgentUpdate, RegisterRequest, RegistryStatistics,
    SearchQuery,
};
use crate::service::ServiceError;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/agents/register", post(register))
        .route("/agents", get(list))
        .route("/agents/search", get(search))
        .route("/agents/best-fit", get(best_fit))
        .route("/agents/health", get(health_all))
        .route("/agents/statistics", get(statistics))
        .route(
            "/agents/{id}",
            get(get_one).patch(update).delete(deregister),
        )
        .route("/agents/{id}/availability", post(availability))
        .route("/agents/{id}/heartbeat", post(heartbeat))
        .route("/agents/{id}/health", get(health_one))
}

fn agent_id(raw: &str) -> Result<AgentId, ApiError> {
    raw.parse().map_err(|_| {
        ServiceError::NotFound(format!("agent {raw} not found (not an agent id)")).into()
    })
}

#[tracing::instrument(skip_all)]
async fn register(
    State(state): State<AppState>,
    caller: Acting,
    Json(req): Json<RegisterRequest>,
) -> ApiResult<(StatusCode, Json<AgentRecord>)> {
    caller.as_name(&req.name)?;
    let (agent, _) = state.registry.register(req).await?;
    Ok((StatusCode::CREATED, Json(agent)))
}

async fn list(State(state): State<AppState>) -> ApiResult<Json<Vec<AgentRecord>>> {
    Ok(Json(state.registry.list().await?))
}

async fn get_one(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<AgentRecord>> {
    Ok(Json(state.registry.get(agent_id(&id)?).await?))
}

#[tracing::instrument(skip_all, fields(agent.id = %id))]
async fn update(
    State(state): State<AppState>,
    caller: Acting,
    Path(id): Path<String>,
    Json(update): Json<AgentUpdate>,
) -> ApiResult<Json<AgentRecord>> {
    let id = agent_id(&id)?;
    caller.as_agent(&state.registry, id).await?;
    Ok(Json(state.registry.update(id, update).await?))
}

async fn deregister(
    State(state): State<AppState>,
    caller: Acting,
    Path(id): Path<String>,
) -> ApiResult<Json<AgentRecord>> {
    let id = agent_id(&id)?;
    caller.as_agent(&state.registry, id).await?;
    Ok(Json(state.registry.deregister(id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Availability {
    available: bool,
}

async fn availability(
    State(state): State<AppState>,
    caller: Acting,
    Path(id): Path<String>,
    Json(body): Json<Availability>,
) -> ApiResult<Json<AgentRecord>> {
    let id = agent_id(&id)?;
    caller.as_agent(&state.registry, id).await?;
    Ok(Json(
        state.registry.set_availability(id, body.available).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeartbeatBody {
    #[serde(default)]
    load: i32,
}

async fn heartbeat(
    State(state): State<AppState>,
    caller: Acting,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<AgentHealth>> {
    caller.as_agent(&state.registry, agent_id(&id)?).await?;
    // The body is optional: an empty POST is a heartbeat with load 0.
    let load = if body.iter().all(u8::is_ascii_whitespace) {
        0
    } else {
        serde_json::from_slice::<HeartbeatBody>(&body)
            .map_err(|e| ServiceError::Malformed(format!("heartbeat body: {e}")))?
            .load
    };
    let agent = state.registry.heartbeat(agent_id(&id)?, load).await?;
    Ok(Json(AgentHealth::from(&agent)))
}

async fn health_one(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<AgentHealth>> {
    let agent = state.registry.get(agent_id(&id)?).await?;
    Ok(Json(AgentHealth::from(&agent)))
}

async fn health_all(State(state): State<AppState>) -> ApiResult<Json<Vec<AgentHealth>>> {
    Ok(Json(state.registry.health().await?))
}

async fn statistics(State(state): State<AppState>) -> ApiResult<Json<RegistryStatistics>> {
    Ok(Json(state.registry.statistics().await?))
}

/// Parses `capabilities=a&capabilities=b&preferred_tags=…&limit=&phase_id=&agent_type=&partial=`;
/// `capabilities=a,b` is accepted too.
fn search_query(raw: Option<String>) -> Result<SearchQuery, ApiError> {
    let mut q = SearchQuery::default();
    for (key, value) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        let list = || {
            value
                .split(',')
                .map(str::to_string)
                .filter(|s| !s.is_empty())
        };
        match key.as_ref() {
            "capabilities" | "capability" => q.capabilities.extend(list()),
            "preferred_tags" | "tags" => q.preferred_tags.extend(list()),
            "agent_type" => q.agent_type = Some(value.into_owned()),
            "phase_id" => q.phase_id = Some(value.into_owned()),
            "executor" => q.executor = Some(value.into_owned()),
            "partial" => {
                q.partial = value
                    .parse()
                    .map_err(|_| ServiceError::validation("partial", "must be true or false"))?;
            }
            "limit" => {
                q.limit = Some(value.parse().map_err(|_| {
                    ServiceError::validation("limit", "must be a positive integer")
                })?);
            }
            other => {
                return Err(ServiceError::validation(other, "unknown query parameter").into());
            }
        }
    }
    Ok(q)
}

async fn search(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Vec<AgentMatch>>> {
    let q = search_query(raw)?;
    Ok(Json(state.registry.search(&q).await?))
}

async fn best_fit(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<AgentMatch>> {
    let q = search_query(raw)?;
    state.registry.best_fit(&q).await?.map(Json).ok_or_else(|| {
        ServiceError::NotFound("no available agent has every required capability".into()).into()
    })
}
