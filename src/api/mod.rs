//! The HTTP API under `/api/v1`: one router, one error type (JSON `{"error": {code, message,
//! field?}}`), routes per resource.

pub mod agents;
pub mod auth;
pub mod collaboration;
pub mod tokens;
pub mod workflows;
pub mod ws;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use std::sync::Arc;
use tokio::sync::Semaphore;

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
    pub limits: ApiLimits,
    pub auth: auth::Auth,
}

/// Request-level limits of the API.
#[derive(Clone)]
pub struct ApiLimits {
    /// Largest request body.
    pub max_body_bytes: usize,
    /// KiB of request bodies being read at once (each request takes its length's worth).
    body_budget: Arc<Semaphore>,
    body_budget_kib: u32,
    /// API requests in flight; past it a request is shed with 503.
    in_flight: Arc<Semaphore>,
    /// Open WebSockets (each holds NATS subscriptions); past it an upgrade gets 503.
    pub websockets: Arc<Semaphore>,
}

/// Most WebSockets one control plane serves at once.
pub const MAX_WEBSOCKETS: usize = 512;

impl ApiLimits {
    pub fn new(max_body_bytes: usize, max_in_flight: usize) -> Self {
        let body_budget_kib =
            u32::try_from((4 * max_body_bytes).div_ceil(1024)).unwrap_or(u32::MAX);
        Self {
            max_body_bytes,
            body_budget: Arc::new(Semaphore::new(body_budget_kib as usize)),
            body_budget_kib,
            in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
            websockets: Arc::new(Semaphore::new(MAX_WEBSOCKETS)),
        }
    }

    pub fn from_settings(s: &crate::config::Settings) -> Self {
        Self::new(
            usize::try_from(s.http_max_body_bytes).unwrap_or(usize::MAX),
            s.http_max_in_flight as usize,
        )
    }
}

/// The `/api/v1` router.
pub fn router(state: AppState) -> Router {
    let limits = state.limits.clone();
    let auth = state.auth.clone();
    Router::new()
        .nest(
            "/api/v1",
            agents::routes()
                .merge(workflows::routes())
                .merge(collaboration::routes())
                .merge(tokens::routes())
                .merge(ws::routes()),
        )
        .route("/api/v1/openapi.json", axum::routing::get(openapi))
        // After routing: the rule is the matched route's.
        .route_layer(axum::middleware::from_fn_with_state(auth, auth::authorize))
        // Large workflows (tens of thousands of tasks) are submitted over HTTP.
        .layer(axum::extract::DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(axum::middleware::from_fn(refuse_nul_in_uri))
        .layer(axum::middleware::from_fn_with_state(limits, admit))
        .with_state(state)
}

/// Admission: a request past the in-flight limit is shed (503, `Retry-After: 1`); a body
/// longer than the limit is refused before it is read (413); and bodies wait for room in the
/// body budget, so a burst of large submissions is read a few at a time, not all at once.
async fn admit(
    axum::extract::State(limits): axum::extract::State<ApiLimits>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let Ok(_slot) = limits.in_flight.clone().try_acquire_owned() else {
        metrics::counter!("omoi_http_requests_shed_total").increment(1);
        let mut response = ApiError(ServiceError::Unavailable(
            "too many requests in flight; try again in a moment".into(),
        ))
        .into_response();
        response.headers_mut().insert(
            header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("1"),
        );
        return response;
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
    let length = match declared {
        Some(n) if n > limits.max_body_bytes as u64 => {
            return ApiError(ServiceError::TooLarge {
                message: format!(
                    "request body of {n} bytes exceeds the {}-byte limit",
                    limits.max_body_bytes
                ),
            })
            .into_response();
        }
        Some(n) => n as usize,
        // Length unknown until read: reserve the most it may be.
        None if chunked => limits.max_body_bytes,
        None => 0,
    };
    let kib = u32::try_from(length.div_ceil(1024))
        .unwrap_or(u32::MAX)
        .min(limits.body_budget_kib);
    let _budget = if kib > 0 {
        limits
            .body_budget
            .clone()
            .acquire_many_owned(kib)
            .await
            .ok()
    } else {
        None
    };
    next.run(req).await
}

/// A request whose path or query, percent-decoded, holds U+0000 is refused before any handler
/// sees it: no parameter could be stored or matched with it.
async fn refuse_nul_in_uri(req: Request, next: axum::middleware::Next) -> Response {
    let uri = req.uri();
    let holds_nul = |raw: &str| raw.contains('\0') || percent_decoded(raw).contains(&0);
    if holds_nul(uri.path()) || uri.query().is_some_and(holds_nul) {
        return ApiError(ServiceError::validation(
            "uri",
            "the path or query contains U+0000 (%00)",
        ))
        .into_response();
    }
    next.run(req).await
}

fn percent_decoded(raw: &str) -> Vec<u8> {
    url::form_urlencoded::parse(raw.as_bytes())
        .flat_map(|(k, v)| {
            let mut b = k.into_owned().into_bytes();
            b.extend(v.into_owned().into_bytes());
            b
        })
        .collect()
}

/// The OpenAPI document (`docs/openapi.json`, compiled in).
pub const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");

async fn openapi() -> impl IntoResponse {
    ([("content-type", "application/json")], OPENAPI_JSON)
}

/// What a request whose handler panicked gets: `500 internal` in the API's error format (the
/// connection and the server carry on).
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = crate::runtime::panic_message(panic.as_ref());
    tracing::error!(panic = %what, "request handler panicked");
    ApiError(ServiceError::Internal(
        "the request could not be handled".into(),
    ))
    .into_response()
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
        let mut response = (
            status,
            axum::Json(ErrorReply {
                error: self.0.body(),
            }),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"omoi\""),
            );
        }
        response
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

impl From<BytesRejection> for ServiceError {
    fn from(r: BytesRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ServiceError::TooLarge {
                message: "the request body exceeds the server's limit (http_max_body_bytes)".into(),
            }
        } else {
            ServiceError::Malformed(r.body_text())
        }
    }
}

/// A JSON body as `T`; rejections are [`ApiError`]s. A body holding U+0000 anywhere is refused
/// with the JSON path of it (`validation`): PostgreSQL could not store it.
pub struct Json<T>(pub T);

fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|t| {
            let t = t.trim().to_ascii_lowercase();
            t == "application/json" || (t.starts_with("application/") && t.ends_with("+json"))
        })
        .unwrap_or(false)
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ServiceError::Malformed(
                "expected a JSON body with `Content-Type: application/json`".into(),
            )
            .into());
        }
        let bytes = Bytes::from_request(req, state).await?;
        if let Some(path) = crate::domain::text::find_nul_in_json(&bytes) {
            return Err(ServiceError::validation(
                path,
                "contains U+0000 (NUL), which cannot be stored",
            )
            .into());
        }
        let axum::Json(value) = axum::Json::<T>::from_bytes(&bytes)?;
        Ok(Json(value))
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_panicking_route_answers_internal_in_the_api_format() {
        let app: Router = Router::new()
            .route(
                "/boom",
                axum::routing::get(|| async {
                    if true {
                        panic!("handler bug");
                    }
                    "unreachable"
                }),
            )
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(
                panic_response,
            ));
        let reply = app
            .oneshot(
                axum::http::Request::get("/boom")
                    .body(axum::body::Body::empty())
                    .expect("request"),
            )
            .await
            .expect("a response, not a dropped connection");
        assert_eq!(reply.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(reply.into_body(), 4096)
            .await
            .expect("body");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(v["error"]["code"], "internal");
    }
}
