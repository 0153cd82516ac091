//! API tokens: issued once (`omoi_` and 40 random letters and digits, about 238 bits), stored as
//! their SHA-256 (a token is high-entropy, so a fast hash is enough and no salt is needed),
//! looked up by that hash on each request with a short cache, revoked by id or name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use rand::Rng;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use super::ServiceError;
use crate::db::tokens::{self, TokenRecord};
use crate::domain::access::{Caller, Role};

/// How long a looked-up token (or an unknown one) is remembered: a revocation takes effect on
/// every control plane within this time (at once on the one that revoked it).
pub const CACHE_TTL: Duration = Duration::from_secs(5);
/// Entries remembered before the cache is emptied (bounds memory under a token spray).
const CACHE_MAX: usize = 10_000;
/// Prefix of issued tokens (secret scanners can spot them).
pub const TOKEN_PREFIX: &str = "omoi_";
/// Shortest secret accepted as a bootstrap token from configuration.
pub const MIN_BOOTSTRAP_CHARS: usize = 24;
/// Name of the admin token kept from `bootstrap_admin_token`.
pub const BOOTSTRAP_NAME: &str = "bootstrap";

/// A token just created: the only time the token itself is known.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Issued {
    pub token: String,
    #[serde(flatten)]
    pub record: TokenRecord,
}

/// `POST /api/v1/tokens`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub name: String,
    pub role: Role,
    /// For `agent` tokens: the agent names it may act as.
    #[serde(default)]
    pub agents: Vec<String>,
    /// Seconds until it expires (none: it does not).
    #[serde(default)]
    pub expires_in_seconds: Option<u64>,
}

#[derive(Clone)]
enum Cached {
    Known(Caller, Instant),
    Unknown(Instant),
}

/// The token use-cases.
#[derive(Clone)]
pub struct Tokens {
    pool: PgPool,
    cache: Arc<Mutex<HashMap<[u8; 32], Cached>>>,
}

/// SHA-256 of a token.
pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A new random token.
pub fn generate() -> String {
    let secret: String = rand::rng()
        .sample_iter(&rand::distr::Alphanumeric)
        .take(40)
        .map(char::from)
        .collect();
    format!("{TOKEN_PREFIX}{secret}")
}

fn validate_token_name(name: &str) -> Result<(), ServiceError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ServiceError::validation(
            "name",
            "must be 1 to 64 of A-Z a-z 0-9 . _ : -",
        ))
    }
}

impl Tokens {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            cache: Default::default(),
        }
    }

    /// Creates a token; its value is in the reply, and nowhere else ever after.
    pub async fn create(&self, req: CreateToken) -> Result<Issued, ServiceError> {
        validate_token_name(&req.name)?;
        let mut agents = req.agents.clone();
        agents.sort();
        agents.dedup();
        match req.role {
            Role::Agent if agents.is_empty() => {
                return Err(ServiceError::validation(
                    "agents",
                    "an agent token names the agents it acts as",
                ));
            }
            Role::Agent => {
                if agents.len() > 1_000 {
                    return Err(ServiceError::validation("agents", "at most 1000 agents"));
                }
                for a in &agents {
                    super::registry::validate_name(a)
                        .map_err(|e| ServiceError::validation("agents", e.to_string()))?;
                }
            }
            _ if !agents.is_empty() => {
                return Err(ServiceError::validation(
                    "agents",
                    "only an agent token names agents",
                ));
            }
            _ => {}
        }
        let expires_at = match req.expires_in_seconds {
            None => None,
            Some(s) if (1..=10 * 365 * 86_400).contains(&s) => {
                Some(Utc::now() + chrono::Duration::seconds(s as i64))
            }
            Some(_) => {
                return Err(ServiceError::validation(
                    "expires_in_seconds",
                    "must be 1 second to 10 years",
                ));
            }
        };
        let token = generate();
        let record = tokens::insert(
            &self.pool,
            &req.name,
            req.role.as_str(),
            &agents,
            &hash(&token),
            expires_at,
        )
        .await?;
        tracing::info!(token.name = %record.name, role = %record.role, "API token created");
        Ok(Issued { token, record })
    }

    /// Keeps the admin token named [`BOOTSTRAP_NAME`] equal to `secret` (from configuration);
    /// a secret that was revoked stays revoked (logged), whatever the configuration says.
    pub async fn bootstrap(&self, secret: &str) -> Result<(), ServiceError> {
        if secret.chars().count() < MIN_BOOTSTRAP_CHARS {
            return Err(ServiceError::validation(
                "bootstrap_admin_token",
                format!("must be at least {MIN_BOOTSTRAP_CHARS} characters"),
            ));
        }
        if !tokens::upsert_admin(&self.pool, BOOTSTRAP_NAME, &hash(secret)).await? {
            tracing::error!(
                "the bootstrap_admin_token of the configuration was revoked and stays so; set a new secret"
            );
        }
        Ok(())
    }

    /// Whether any token could authenticate now.
    pub async fn any_live(&self) -> Result<bool, ServiceError> {
        Ok(tokens::count_live(&self.pool).await? > 0)
    }

    pub async fn list(&self) -> Result<Vec<TokenRecord>, ServiceError> {
        Ok(tokens::list(&self.pool).await?)
    }

    /// Revokes by id or name; forgets every cached lookup here.
    pub async fn revoke(&self, id_or_name: &str) -> Result<TokenRecord, ServiceError> {
        let revoked = tokens::revoke(&self.pool, id_or_name)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("no live token `{id_or_name}`")))?;
        if let Ok(mut c) = self.cache.lock() {
            c.clear();
        }
        tracing::info!(token.name = %revoked.name, "API token revoked");
        Ok(revoked)
    }

    /// The caller a presented token stands for, or `Unauthorized`.
    pub async fn authenticate(&self, token: &str) -> Result<Caller, ServiceError> {
        let key = hash(token);
        let cached = self.cache.lock().ok().and_then(|c| c.get(&key).cloned());
        match cached {
            Some(Cached::Known(caller, at)) if at.elapsed() < CACHE_TTL => return Ok(caller),
            Some(Cached::Unknown(at)) if at.elapsed() < CACHE_TTL => return Err(unauthorized()),
            _ => {}
        }
        let found = tokens::find_live(&self.pool, &key).await?;
        let entry = match &found {
            Some(record) => {
                let caller = Caller {
                    token_id: Some(record.id),
                    name: record.name.clone(),
                    role: record.role.parse().map_err(ServiceError::Internal)?,
                    agents: record.agents.clone(),
                };
                if let Err(e) = tokens::touch(&self.pool, record.id).await {
                    tracing::debug!(error = %e, "could not note a token's use");
                }
                Cached::Known(caller, Instant::now())
            }
            None => Cached::Unknown(Instant::now()),
        };
        if let Ok(mut c) = self.cache.lock() {
            if c.len() >= CACHE_MAX {
                c.clear();
            }
            c.insert(key, entry.clone());
        }
        match entry {
            Cached::Known(caller, _) => Ok(caller),
            Cached::Unknown(_) => Err(unauthorized()),
        }
    }
}

fn unauthorized() -> ServiceError {
    ServiceError::Unauthorized("a valid API token is required (Authorization: Bearer …)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_prefixed_and_hash_stably() {
        let (a, b) = (generate(), generate());
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 40);
        assert_ne!(a, b);
        assert_eq!(hash(&a), hash(&a));
        assert_ne!(hash(&a), hash(&b));
        assert!(validate_token_name("ci-deploy").is_ok());
        assert!(validate_token_name("has space").is_err());
    }
}
