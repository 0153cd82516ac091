//! API token rows: hashes only (SHA-256 of the token), created, listed, revoked, looked up.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use super::DbError;

/// A token as stored (never the token itself).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct TokenRecord {
    pub id: Uuid,
    pub name: String,
    pub role: String,
    pub agents: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, name, role, agents, created_at, expires_at, revoked_at, last_used_at";

/// Stores a new token; a live token of the same name is a `Duplicate`.
pub async fn insert(
    pool: &PgPool,
    name: &str,
    role: &str,
    agents: &[String],
    hash: &[u8],
    expires_at: Option<DateTime<Utc>>,
) -> Result<TokenRecord, DbError> {
    sqlx::query_as::<_, TokenRecord>(sqlx::AssertSqlSafe(format!(
        "INSERT INTO api_tokens (id, name, role, agents, token_hash, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {COLUMNS}"
    )))
    .bind(Uuid::now_v7())
    .bind(name)
    .bind(role)
    .bind(agents)
    .bind(hash)
    .bind(expires_at)
    .fetch_one(pool)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(d) if d.code().as_deref() == Some("23505") => DbError::Duplicate(
            format!("a token named `{name}` exists (or that token does)"),
        ),
        _ => e.into(),
    })
}

/// Makes the live token `name` an admin token with `hash` (creating it, or replacing its hash
/// when the configured secret changed): how a bootstrap token from configuration is kept.
/// Returns false, changing nothing, when a token with this hash was revoked: a revoked secret
/// never comes back.
pub async fn upsert_admin(pool: &PgPool, name: &str, hash: &[u8]) -> Result<bool, DbError> {
    let revoked: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NOT NULL)",
    )
    .bind(hash)
    .fetch_one(pool)
    .await?;
    if revoked {
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO api_tokens (id, name, role, token_hash) VALUES ($1, $2, 'admin', $3)
         ON CONFLICT (name) WHERE revoked_at IS NULL
         DO UPDATE SET token_hash = EXCLUDED.token_hash, role = 'admin', agents = '{}',
                       expires_at = NULL",
    )
    .bind(Uuid::now_v7())
    .bind(name)
    .bind(hash)
    .execute(pool)
    .await?;
    Ok(true)
}

/// The live (not revoked, not expired) token with this hash.
pub async fn find_live(pool: &PgPool, hash: &[u8]) -> Result<Option<TokenRecord>, DbError> {
    Ok(
        sqlx::query_as::<_, TokenRecord>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL
           AND (expires_at IS NULL OR expires_at > now())"
        )))
        .bind(hash)
        .fetch_optional(pool)
        .await?,
    )
}

/// Notes a use, at most once a minute per token.
pub async fn touch(pool: &PgPool, id: Uuid) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE api_tokens SET last_used_at = now()
         WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Every token, newest first (revoked ones too, for the record).
pub async fn list(pool: &PgPool) -> Result<Vec<TokenRecord>, DbError> {
    Ok(
        sqlx::query_as::<_, TokenRecord>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM api_tokens ORDER BY created_at DESC"
        )))
        .fetch_all(pool)
        .await?,
    )
}

/// Revokes the live token with this id or name; `None` if there is none.
pub async fn revoke(pool: &PgPool, id_or_name: &str) -> Result<Option<TokenRecord>, DbError> {
    let id = id_or_name.parse::<Uuid>().ok();
    Ok(
        sqlx::query_as::<_, TokenRecord>(sqlx::AssertSqlSafe(format!(
            "UPDATE api_tokens SET revoked_at = now()
         WHERE revoked_at IS NULL AND (id = $1 OR ($1 IS NULL AND name = $2))
         RETURNING {COLUMNS}"
        )))
        .bind(id)
        .bind(id_or_name)
        .fetch_optional(pool)
        .await?,
    )
}

/// How many tokens could authenticate now.
pub async fn count_live(pool: &PgPool) -> Result<i64, DbError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM api_tokens WHERE revoked_at IS NULL
           AND (expires_at IS NULL OR expires_at > now())",
    )
    .fetch_one(pool)
    .await?)
}
