//! Use-cases over the database and the bus: the registry, workflows, the scheduler and
//! collaboration. Nothing here knows about HTTP.

pub mod collaboration;
pub mod outbox;
pub mod registry;
pub mod scheduler;
pub mod tokens;
pub mod workflows;

use crate::bus::BusError;
use crate::db::DbError;
use crate::domain::text::{MAX_ECHO_CHARS, bounded};
use crate::protocol::ErrorBody;

/// A use-case failure, mapped to HTTP statuses and NATS service error codes in one place.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{field}: {message}")]
    Validation { field: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    UnknownAgent(String),
    #[error("{0}")]
    Malformed(String),
    #[error("{message}")]
    TooLarge { message: String },
    /// No valid credentials (HTTP 401).
    #[error("{0}")]
    Unauthorized(String),
    /// The agent was deregistered: it may not act any more (register it again to come back).
    #[error("{0}")]
    Deregistered(String),
    /// Overloaded or a dependency is down: try again later (HTTP 503).
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Longest error message sent in a reply; longer ones (which echo client input) are cut.
pub const MAX_ERROR_MESSAGE_CHARS: usize = 2_000;

impl ServiceError {
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation {
            field: field.into(),
            message: message.into(),
        }
    }

    /// HTTP-like status code (also used as `Nats-Service-Error-Code`).
    pub fn status(&self) -> u16 {
        match self {
            Self::Validation { .. } | Self::Malformed(_) => 400,
            Self::Unauthorized(_) => 401,
            Self::Forbidden(_) => 403,
            Self::NotFound(_) | Self::UnknownAgent(_) => 404,
            Self::Conflict(_) => 409,
            Self::Deregistered(_) => 410,
            Self::TooLarge { .. } => 413,
            Self::Internal(_) => 500,
            Self::Unavailable(_) => 503,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Validation { .. } => "validation",
            Self::Malformed(_) => "malformed",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::UnknownAgent(_) => "unknown_agent",
            Self::Conflict(_) => "conflict",
            Self::TooLarge { .. } => "too_large",
            Self::Deregistered(_) => "deregistered",
            Self::Internal(_) => "internal",
            Self::Unavailable(_) => "unavailable",
        }
    }

    /// The reply body: message and field bounded, so an error never echoes unbounded input.
    pub fn body(&self) -> ErrorBody {
        let (message, field) = match self {
            Self::Validation { field, message } => (message.clone(), Some(field.clone())),
            other => (other.to_string(), None),
        };
        ErrorBody {
            code: self.code().to_string(),
            message: bounded(&message, MAX_ERROR_MESSAGE_CHARS),
            field: field.map(|f| bounded(&f, MAX_ECHO_CHARS)),
        }
    }

    /// One line, bounded: for a header or a log field.
    pub fn summary(&self) -> String {
        bounded(&self.to_string(), MAX_ECHO_CHARS)
    }

    /// Rebuilds an error from a reply body (client side).
    pub fn from_body(body: ErrorBody) -> Self {
        match body.code.as_str() {
            "validation" => Self::Validation {
                field: body.field.unwrap_or_default(),
                message: body.message,
            },
            "malformed" => Self::Malformed(body.message),
            "forbidden" => Self::Forbidden(body.message),
            "not_found" => Self::NotFound(body.message),
            "unknown_agent" => Self::UnknownAgent(body.message),
            "conflict" => Self::Conflict(body.message),
            "too_large" => Self::TooLarge {
                message: body.message,
            },
            "unauthorized" => Self::Unauthorized(body.message),
            "deregistered" => Self::Deregistered(body.message),
            "unavailable" => Self::Unavailable(body.message),
            _ => Self::Internal(body.message),
        }
    }
}

impl From<DbError> for ServiceError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::NotFound { what, id } => Self::NotFound(format!("{what} {id} not found")),
            DbError::Conflict { .. } | DbError::Duplicate(_) | DbError::Illegal(_) => {
                Self::Conflict(e.to_string())
            }
            DbError::Sqlx(sqlx::Error::PoolTimedOut) => {
                tracing::warn!("database pool exhausted; answering unavailable");
                Self::Unavailable(
                    "the control plane is overloaded (no database connection free); try again"
                        .into(),
                )
            }
            other if other.is_transient() => {
                tracing::warn!(error = %other, "database unavailable");
                Self::Unavailable(format!("database unavailable: {other}"))
            }
            other => {
                tracing::error!(error = %other, "database error");
                Self::Internal(other.to_string())
            }
        }
    }
}

impl From<BusError> for ServiceError {
    fn from(e: BusError) -> Self {
        match e {
            BusError::Encode { .. } => {
                tracing::error!(error = %e, "bus error");
                Self::Internal(e.to_string())
            }
            // Publishing, requests, consumers, KV: NATS is down or slow; a retry may work.
            other => {
                tracing::warn!(error = %other, "bus unavailable");
                Self::Unavailable(format!("NATS unavailable: {other}"))
            }
        }
    }
}

impl ServiceError {
    /// Whether the same request may succeed later (503): the database or NATS was unavailable.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}
