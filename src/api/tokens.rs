//! `/api/v1/tokens` (admin only): create (the reply holds the token, shown this once), list,
//! revoke.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get};

use super::{ApiResult, AppState, Json, Path};
use crate::db::tokens::TokenRecord;
use crate::service::tokens::{CreateToken, Issued};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/tokens", get(list).post(create))
        .route("/tokens/{id}", delete(revoke))
}

async fn create(
    State(state): State<AppState>,
    Json(req): Json<CreateToken>,
) -> ApiResult<(StatusCode, Json<Issued>)> {
    Ok((
        StatusCode::CREATED,
        Json(state.auth.tokens.create(req).await?),
    ))
}

async fn list(State(state): State<AppState>) -> ApiResult<Json<Vec<TokenRecord>>> {
    Ok(Json(state.auth.tokens.list().await?))
}

/// `DELETE /tokens/{id}`: by id or name.
async fn revoke(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<TokenRecord>> {
    Ok(Json(state.auth.tokens.revoke(&id).await?))
}
