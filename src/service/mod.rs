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
use crate::protocol::{ErrorBody, ErrorCode};

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
        self.code().status()
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Validation { .. } => ErrorCode::Validation,
            Self::Malformed(_) => ErrorCode::Malformed,
            Self::Unauthorized(_) => ErrorCode::Unauthorized,
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::UnknownAgent(_) => ErrorCode::UnknownAgent,
            Self::Conflict(_) => ErrorCode::Conflict,
            Self::TooLarge { .. } => ErrorCode::TooLarge,
            Self::Deregistered(_) => ErrorCode::Deregistered,
            Self::Internal(_) => ErrorCode::Internal,
            Self::Unavailable(_) => ErrorCode::Unavailable,
        }
    }

    /// The reply body: message and field bounded, so an error never echoes unbounded input.
    pub fn body(&self) -> ErrorBody {
        let (message, field) = match self {
            Self::Validation { field, message } => (message.clone(), Some(field.clone())),
            other => (other.to_string(), None),
        };
        ErrorBody {
            code: self.code(),
            message: bounded(&message, MAX_ERROR_MESSAGE_CHARS),
            field: field.map(|f| bounded(&f, MAX_ECHO_CHARS)),
        }
    }

    /// One line, bounded: for a header or a log field.
    pub fn summary(&self) -> String {
        bounded(&self.to_string(), MAX_ECHO_CHARS)
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
