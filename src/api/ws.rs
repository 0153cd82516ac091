//! WebSocket streams of live events:
//!
//! * `/api/v1/collaboration/ws?agent_id=…` — messages, handoffs and threads involving the agent;
//! * `/api/v1/ws/events?types=task.%3E&agent_id=&task_id=&workflow_id=` — any events, filtered,
//!   in the events stream's order (a consumer of `<ns>_events`, not core subscriptions).
//!
//! Both need a token (a `viewer` one, or for the collaboration stream an `agent` token of that
//! agent) as `Authorization: Bearer` or the subprotocol `omoi.token.<token>` beside `omoi.v1`,
//! and refuse pages of origins not allowed (api/auth.rs).
//!
//! The first server frame is `{"type": "ready"}`, once the stream is live: every event committed
//! after it is delivered. Each later server frame is an event envelope (docs/protocol.md) as
//! JSON text. A client changes its filters by sending
//! `{"filters": {"types": [...], "agent_id": …, "task_id": …, "workflow_id": …}}`
//! (answered `{"type": "filters", …}`); a malformed frame is answered with
//! `{"type": "error", "message": …}` and the connection stays open. Idle clients are pinged every
//! 20 s. A client that cannot keep up (256 frames queued) is closed with code 1013 and reason
//! `client too slow` instead of being buffered without bound.

use std::time::Duration;

use axum::Router;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::response::Response;
use axum::routing::get;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::auth::{Acting, WS_PROTOCOL, check_origin};
use super::{ApiError, AppState};
use crate::bus::provision::subjects_overlap;
use crate::domain::{AgentId, TaskId, WorkflowId};
use crate::protocol::Envelope;
use crate::service::ServiceError;
use axum::http::HeaderMap;

/// Frames queued for one client before it is dropped as too slow.
pub const OUTBOX: usize = 256;
/// Close code for a client dropped for being too slow ("try again later").
pub const CLOSE_TOO_SLOW: u16 = 1013;
const PING_EVERY: Duration = Duration::from_secs(20);

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/collaboration/ws", get(collaboration_ws))
        .route("/ws/events", get(events_ws))
}

/// What a client receives.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filters {
    /// Event type patterns (`task.completed`, `agent.handoff.*`, `task.>`); empty = all.
    #[serde(default)]
    pub types: Vec<String>,
    #[serde(default)]
    pub agent_id: Option<AgentId>,
    #[serde(default)]
    pub task_id: Option<TaskId>,
    #[serde(default)]
    pub workflow_id: Option<WorkflowId>,
}

const AGENT_FIELDS: &[&str] = &[
    "agent_id",
    "sender_id",
    "recipient_id",
    "recipients",
    "participants",
    "from_agent_id",
    "to_agent_id",
    "decided_by",
];

fn mentions(data: &serde_json::Value, fields: &[&str], id: &str) -> bool {
    fields.iter().any(|f| match data.get(*f) {
        Some(serde_json::Value::String(s)) => s == id,
        Some(serde_json::Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(id)),
        _ => false,
    })
}

impl Filters {
    pub fn matches(&self, env: &Envelope) -> bool {
        let kind = env.event.kind();
        if !self.types.is_empty() && !self.types.iter().any(|p| subjects_overlap(p, kind)) {
            return false;
        }
        let data = serde_json::to_value(&env.event)
            .map(|v| v["data"].clone())
            .unwrap_or_default();
        if let Some(a) = self.agent_id {
            if !mentions(&data, AGENT_FIELDS, &a.to_string()) {
                return false;
            }
        }
        if let Some(t) = self.task_id {
            if !mentions(&data, &["task_id"], &t.to_string()) {
                return false;
            }
        }
        if let Some(w) = self.workflow_id {
            if !mentions(&data, &["workflow_id"], &w.to_string()) {
                return false;
            }
        }
        true
    }

    fn from_query(raw: &Option<String>) -> Result<Self, ApiError> {
        let mut f = Filters::default();
        for (k, v) in url::form_urlencoded::parse(raw.as_deref().unwrap_or_default().as_bytes()) {
            let bad = |field: &str| {
                ServiceError::validation(field.to_string(), format!("`{v}` is not valid"))
            };
            match k.as_ref() {
                "types" | "type" => f
                    .types
                    .extend(v.split(',').filter(|s| !s.is_empty()).map(str::to_string)),
                "agent_id" => f.agent_id = Some(v.parse().map_err(|_| bad("agent_id"))?),
                "task_id" => f.task_id = Some(v.parse().map_err(|_| bad("task_id"))?),
                "workflow_id" => f.workflow_id = Some(v.parse().map_err(|_| bad("workflow_id"))?),
                other => {
                    return Err(ServiceError::validation(other, "unknown query parameter").into());
                }
            }
        }
        Ok(f)
    }
}

async fn collaboration_ws(
    State(state): State<AppState>,
    caller: Acting,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ws = ws.map_err(not_an_upgrade)?;
    check_origin(&headers, &state.auth.allowed_origins)?;
    let mut filters = Filters::from_query(&raw)?;
    let Some(agent) = filters.agent_id else {
        return Err(ServiceError::validation("agent_id", "is required").into());
    };
    state.registry.get(agent).await?;
    if !caller.0.reads_all() {
        caller.as_agent(&state.registry, agent).await?;
    }
    if filters.types.is_empty() {
        filters.types = vec![
            "agent.message.sent".into(),
            "agent.handoff.*".into(),
            "agent.collab.*".into(),
        ];
    }
    upgrade(ws, state, filters)
}

/// A plain request to a WebSocket endpoint: answered in the API's error format.
fn not_an_upgrade(r: WebSocketUpgradeRejection) -> ApiError {
    ServiceError::Malformed(format!(
        "this endpoint is a WebSocket: send an Upgrade request ({})",
        r.body_text()
    ))
    .into()
}

/// Upgrades within the WebSocket limit; the slot is held as long as the socket is open.
fn upgrade(ws: WebSocketUpgrade, state: AppState, filters: Filters) -> Result<Response, ApiError> {
    let slot = state
        .limits
        .websockets
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            ServiceError::Unavailable("too many WebSockets open; try again later".into())
        })?;
    Ok(ws
        .protocols([WS_PROTOCOL])
        .on_upgrade(move |socket| async move {
            serve(socket, state, filters).await;
            drop(slot);
        }))
}

async fn events_ws(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ws = ws.map_err(not_an_upgrade)?;
    check_origin(&headers, &state.auth.allowed_origins)?;
    let filters = Filters::from_query(&raw)?;
    upgrade(ws, state, filters)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFrame {
    filters: Filters,
}

fn text(v: serde_json::Value) -> WsMessage {
    WsMessage::Text(Utf8Bytes::from(v.to_string()))
}

async fn serve(socket: WebSocket, state: AppState, mut filters: Filters) {
    let (mut sink, mut incoming) = socket.split();
    let (tx, mut rx) = mpsc::channel::<WsMessage>(OUTBOX);
    // Jumps the queue: a too-slow client is closed now, not after its backlog.
    let (close_tx, mut close_rx) = tokio::sync::oneshot::channel::<CloseFrame>();
    let writer = tokio::spawn(async move {
        loop {
            let frame = tokio::select! {
                biased;
                close = &mut close_rx => {
                    if let Ok(close) = close {
                        let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(WsMessage::Close(Some(close)))).await;
                    }
                    break;
                }
                frame = rx.recv() => match frame { Some(f) => f, None => break },
            };
            let closing = matches!(frame, WsMessage::Close(_));
            let sent = tokio::select! {
                biased;
                close = &mut close_rx => {
                    if let Ok(close) = close {
                        let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(WsMessage::Close(Some(close)))).await;
                    }
                    break;
                }
                r = sink.send(frame) => r,
            };
            if sent.is_err() || closing {
                break;
            }
        }
    });
    let js = async_nats::jetstream::new(state.nats.clone());
    let mut events = match crate::bus::events::tail(&js, &state.names).await {
        Ok(events) => events,
        Err(e) => {
            tracing::warn!(error = %e, "websocket: cannot read the events");
            let _ = close_tx.send(CloseFrame {
                code: 1011,
                reason: Utf8Bytes::from_static("events unavailable; try again"),
            });
            let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
            return;
        }
    };
    // From here on every event committed is delivered: say so, so a client knows when what it
    // does next will be seen.
    let _ = tx.try_send(text(serde_json::json!({"type": "ready"})));
    let mut close_tx = Some(close_tx);
    let mut too_slow = || {
        if let Some(c) = close_tx.take() {
            let _ = c.send(too_slow_frame());
        }
    };
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            msg = events.next() => {
                let msg = match msg {
                    Some(Ok(msg)) => msg,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "websocket: events consumer hiccup");
                        continue;
                    }
                    None => break,
                };
                let Ok(env) = serde_json::from_slice::<Envelope>(&msg.payload) else { continue };
                if !filters.matches(&env) {
                    continue;
                }
                let frame = WsMessage::Text(Utf8Bytes::from(String::from_utf8_lossy(&msg.payload).into_owned()));
                if tx.try_send(frame).is_err() {
                    tracing::warn!("websocket client too slow; closing with 1013");
                    too_slow();
                    break;
                }
            }
            frame = incoming.next() => {
                let reply = match frame {
                    Some(Ok(WsMessage::Text(t))) => match serde_json::from_str::<ClientFrame>(&t) {
                        Ok(f) => {
                            filters = f.filters;
                            text(serde_json::json!({"type": "filters", "filters": filters}))
                        }
                        Err(e) => text(serde_json::json!({"type": "error", "message": format!("bad frame: {e}")})),
                    },
                    Some(Ok(WsMessage::Binary(_))) => text(serde_json::json!({"type": "error", "message": "binary frames are not understood; send JSON text"})),
                    Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue, // ping/pong
                };
                if tx.try_send(reply).is_err() {
                    too_slow();
                    break;
                }
            }
            _ = ping.tick() => {
                if tx.try_send(WsMessage::Ping(Default::default())).is_err() {
                    too_slow();
                    break;
                }
            }
        }
    }
    // An orderly end (unless the writer is already closing a too-slow client).
    let _ = tx.try_send(WsMessage::Close(Some(CloseFrame {
        code: 1000,
        reason: Utf8Bytes::from_static("bye"),
    })));
    drop(tx);
    if tokio::time::timeout(Duration::from_secs(2), writer)
        .await
        .is_err()
    {
        tracing::debug!("websocket writer did not finish; dropping the connection");
    }
}

/// The close frame a too-slow client gets.
pub fn too_slow_frame() -> CloseFrame {
    CloseFrame {
        code: CLOSE_TOO_SLOW,
        reason: Utf8Bytes::from_static("client too slow"),
    }
}
