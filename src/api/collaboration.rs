//! `/api/v1/collaboration`: upstream's paths. Where upstream took `agent_id` and `reason` as
//! query parameters, both those and a JSON body are accepted.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::Deserialize;
use uuid::Uuid;

use super::auth::Acting;
use super::{ApiError, ApiResult, AppState, Json, Path};
use crate::domain::{AgentId, TaskId};
use crate::protocol::collaboration::{
    CreateThread, Handoff, HandoffRequest, Message, MessagePage, SendMessage, Thread,
};
use crate::service::ServiceError;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/collaboration/threads",
            post(create_thread).get(list_threads),
        )
        .route("/collaboration/threads/{id}/close", post(close_thread))
        .route("/collaboration/threads/{id}/messages", get(list_messages))
        .route("/collaboration/messages", post(send_message))
        .route("/collaboration/messages/{id}/read", post(mark_read))
        .route("/collaboration/handoff/request", post(request_handoff))
        .route("/collaboration/handoff/{id}/accept", post(accept))
        .route("/collaboration/handoff/{id}/decline", post(decline))
        .route("/collaboration/handoff/{id}/cancel", post(cancel))
        .route("/collaboration/handoffs/{id}", get(get_handoff))
}

fn uuid(what: &str, raw: &str) -> Result<Uuid, ApiError> {
    raw.parse()
        .map_err(|_| ServiceError::NotFound(format!("{what} {raw} not found (not an id)")).into())
}

fn query_pairs(raw: &Option<String>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(raw.as_deref().unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn parse_param<T: std::str::FromStr>(field: &str, value: &str) -> Result<T, ApiError> {
    value
        .parse()
        .map_err(|_| ServiceError::validation(field, format!("`{value}` is not valid")).into())
}

#[derive(Deserialize, Default)]
struct Actor {
    agent_id: Option<AgentId>,
    reason: Option<String>,
    status: Option<String>,
}

/// The acting agent (and an optional reason/status) from the query string or a JSON body.
fn actor(raw: &Option<String>, body: &Bytes) -> Result<Actor, ApiError> {
    let mut actor: Actor = if body.iter().all(u8::is_ascii_whitespace) {
        Actor::default()
    } else {
        if let Some(path) = crate::domain::text::find_nul_in_json(body) {
            return Err(ServiceError::validation(path, "contains U+0000 (NUL)").into());
        }
        serde_json::from_slice(body).map_err(|e| ServiceError::Malformed(format!("body: {e}")))?
    };
    for (k, v) in query_pairs(raw) {
        match k.as_str() {
            "agent_id" => actor.agent_id = Some(parse_param("agent_id", &v)?),
            "reason" => actor.reason = Some(v),
            "status" => actor.status = Some(v),
            _ => {}
        }
    }
    Ok(actor)
}

/// The caller takes part in the thread (an admin may act on any).
async fn participant(s: &AppState, caller: &Acting, thread: Uuid) -> Result<(), ApiError> {
    if caller.0.role == crate::domain::access::Role::Admin {
        return Ok(());
    }
    let t = s.collaboration.get_thread(thread).await?;
    caller.as_any_of(&s.registry, &t.participants).await?;
    Ok(())
}

fn required(actor: &Actor) -> Result<AgentId, ApiError> {
    actor
        .agent_id
        .ok_or_else(|| ServiceError::validation("agent_id", "is required (query or body)").into())
}

/// The agent the request acts as (`agent_id`), which the caller must be allowed to act as.
async fn acting(s: &AppState, caller: &Acting, actor: &Actor) -> Result<AgentId, ApiError> {
    let agent = required(actor)?;
    caller.as_agent(&s.registry, agent).await?;
    Ok(agent)
}

async fn create_thread(
    State(s): State<AppState>,
    caller: Acting,
    Json(req): Json<CreateThread>,
) -> ApiResult<(StatusCode, Json<Thread>)> {
    // An agent opens threads it takes part in.
    caller.as_any_of(&s.registry, &req.participants).await?;
    Ok((
        StatusCode::CREATED,
        Json(s.collaboration.create_thread(req).await?),
    ))
}

async fn list_threads(
    State(s): State<AppState>,
    caller: Acting,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Vec<Thread>>> {
    let (mut agent, mut task, mut status, mut limit) = (None, None, None, 100);
    for (k, v) in query_pairs(&raw) {
        match k.as_str() {
            "agent_id" => agent = Some(parse_param::<AgentId>("agent_id", &v)?),
            // Upstream called the task a ticket.
            "task_id" | "ticket_id" => task = Some(parse_param::<TaskId>("task_id", &v)?),
            "status" => status = Some(v),
            "limit" => limit = parse_param("limit", &v)?,
            other => return Err(ServiceError::validation(other, "unknown query parameter").into()),
        }
    }
    if !caller.0.reads_all() {
        // An agent token sees the threads of the agents it acts as.
        let Some(a) = agent else {
            return Err(ServiceError::validation(
                "agent_id",
                "an agent token lists its own threads: give agent_id",
            )
            .into());
        };
        caller.as_agent(&s.registry, a).await?;
    }
    Ok(Json(
        s.collaboration
            .list_threads(agent, task, status, limit)
            .await?,
    ))
}

async fn close_thread(
    State(s): State<AppState>,
    caller: Acting,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> ApiResult<Json<Thread>> {
    let a = actor(&raw, &body)?;
    let id = uuid("thread", &id)?;
    participant(&s, &caller, id).await?;
    Ok(Json(s.collaboration.close_thread(id, a.status).await?))
}

async fn list_messages(
    State(s): State<AppState>,
    caller: Acting,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<MessagePage>> {
    let (mut before, mut unread_for, mut limit) = (None, None, 50);
    for (k, v) in query_pairs(&raw) {
        match k.as_str() {
            "before" | "cursor" => before = Some(parse_param::<Uuid>("before", &v)?),
            "unread_for" => unread_for = Some(parse_param::<AgentId>("unread_for", &v)?),
            "limit" => limit = parse_param("limit", &v)?,
            other => return Err(ServiceError::validation(other, "unknown query parameter").into()),
        }
    }
    let id = uuid("thread", &id)?;
    if !caller.0.reads_all() {
        participant(&s, &caller, id).await?;
    }
    Ok(Json(
        s.collaboration
            .list_messages(id, before, unread_for, limit)
            .await?,
    ))
}

async fn send_message(
    State(s): State<AppState>,
    caller: Acting,
    Json(req): Json<SendMessage>,
) -> ApiResult<(StatusCode, Json<Message>)> {
    caller.as_agent(&s.registry, req.sender_id).await?;
    Ok((
        StatusCode::CREATED,
        Json(s.collaboration.send_message(req).await?),
    ))
}

async fn mark_read(
    State(s): State<AppState>,
    caller: Acting,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> ApiResult<Json<Message>> {
    let a = actor(&raw, &body)?;
    let agent = acting(&s, &caller, &a).await?;
    Ok(Json(
        s.collaboration
            .mark_read(uuid("message", &id)?, agent)
            .await?,
    ))
}

async fn request_handoff(
    State(s): State<AppState>,
    caller: Acting,
    Json(req): Json<HandoffRequest>,
) -> ApiResult<(StatusCode, Json<Handoff>)> {
    caller.as_agent(&s.registry, req.from_agent_id).await?;
    Ok((
        StatusCode::CREATED,
        Json(s.collaboration.request_handoff(req).await?),
    ))
}

async fn accept(
    State(s): State<AppState>,
    caller: Acting,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> ApiResult<Json<Handoff>> {
    let a = actor(&raw, &body)?;
    let agent = acting(&s, &caller, &a).await?;
    Ok(Json(
        s.collaboration.accept(uuid("handoff", &id)?, agent).await?,
    ))
}

async fn decline(
    State(s): State<AppState>,
    caller: Acting,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> ApiResult<Json<Handoff>> {
    let a = actor(&raw, &body)?;
    let agent = acting(&s, &caller, &a).await?;
    Ok(Json(
        s.collaboration
            .decline(uuid("handoff", &id)?, agent, a.reason)
            .await?,
    ))
}

async fn cancel(
    State(s): State<AppState>,
    caller: Acting,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> ApiResult<Json<Handoff>> {
    let a = actor(&raw, &body)?;
    let agent = acting(&s, &caller, &a).await?;
    Ok(Json(
        s.collaboration.cancel(uuid("handoff", &id)?, agent).await?,
    ))
}

async fn get_handoff(
    State(s): State<AppState>,
    caller: Acting,
    Path(id): Path<String>,
) -> ApiResult<Json<Handoff>> {
    let h = s.collaboration.get_handoff(uuid("handoff", &id)?).await?;
    // An agent token reads handoffs it is part of, and open ones (offered to whoever fits).
    if !caller.0.reads_all() && h.to_agent_id.is_some() {
        let involved: Vec<AgentId> = [Some(h.from_agent_id), h.to_agent_id, h.decided_by]
            .into_iter()
            .flatten()
            .collect();
        caller.as_any_of(&s.registry, &involved).await?;
    }
    Ok(Json(h))
}
