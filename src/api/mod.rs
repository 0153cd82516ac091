//! The HTTP API under `/api/v1`: one router, one error type (JSON `{"error": {code, message,
//! field?}}`), routes per resource.

pub mod agents;
pub mod collaboration;
pub mod workflows;
pub mod ws;

use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::protocol::ErrorReply;
use crate::service::ServiceError;
use crate::service::registry::Registry;

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    pub workflows: crate::service::workflows::Workflows,
    pub locks: crate::bus::kv_lock::LockManager,
    pub collaboration: crate::service::collaboration::Collaboration,
    /// For the WebSocket streams.
    pub nats: async_nats::Client,
    pub names: crate::bus::Names,
    /// Where named patterns are looked up after the built-in ones.
    pub pattern_dirs: Vec<std::path::PathBuf>,
}

/// The `/api/v1` router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .nest(
            "/api/v1",
            agents::routes()
                .merge(workflows::routes())
                .merge(collaboration::routes())
                .merge(ws::routes()),
        )
        .route("/api/v1/openapi.json", axum::routing::get(openapi))
        // Large workflows (tens of thousands of tasks) are submitted over HTTP.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// The OpenAPI document (`docs/openapi.json`, compiled in).
pub const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");

async fn openapi() -> impl IntoResponse {
    ([("content-type", "application/json")], OPENAPI_JSON)
}

/// Every handler error: a [`ServiceError`] rendered as JSON with its status.
#[derive(Debug)]
pub struct ApiError(pub ServiceError);

impl<E: Into<ServiceError>> From<E> for ApiError {
    fn from(e: E) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            axum::Json(ErrorReply {
                error: self.0.body(),
            }),
        )
            .into_response()
    }
}

impl From<JsonRejection> for ServiceError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::JsonDataError(e) => ServiceError::validation("body", e.body_text()),
            other => ServiceError::Malformed(other.body_text()),
        }
    }
}

impl From<PathRejection> for ServiceError {
    fn from(r: PathRejection) -> Self {
        ServiceError::validation("path", r.body_text())
    }
}

impl From<QueryRejection> for ServiceError {
    fn from(r: QueryRejection) -> Self {
        ServiceError::validation("query", r.body_text())
    }
}

/// `Json` whose rejections are [`ApiError`]s.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `Path` whose rejections are [`ApiError`]s.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// `Query` whose rejections are [`ApiError`]s.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

pub type ApiResult<T> = Result<T, ApiError>;
