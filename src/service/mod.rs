//! Use-cases over the database and the bus: the registry now; the scheduler, collaboration
//! and patterns later. Nothing here knows about HTTP.

pub mod collaboration;
pub mod registry;
pub mod scheduler;
pub mod workflows;

use crate::bus::BusError;
use crate::db::DbError;
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
    #[error("internal error: {0}")]
    Internal(String),
}

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
            Self::Forbidden(_) => 403,
            Self::NotFound(_) | Self::UnknownAgent(_) => 404,
            Self::Conflict(_) => 409,
            Self::TooLarge { .. } => 413,
            Self::Internal(_) => 500,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Validation { .. } => "validation",
            Self::Malformed(_) => "malformed",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::UnknownAgent(_) => "unknown_agent",
            Self::Conflict(_) => "conflict",
            Self::TooLarge { .. } => "too_large",
            Self::Internal(_) => "internal",
        }
    }

    pub fn body(&self) -> ErrorBody {
        let (message, field) = match self {
            Self::Validation { field, message } => (message.clone(), Some(field.clone())),
            other => (other.to_string(), None),
        };
        ErrorBody {
            code: self.code().to_string(),
            message,
            field,
        }
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
            other => {
                tracing::error!(error = %other, "database error");
                Self::Internal(other.to_string())
            }
        }
    }
}

impl From<BusError> for ServiceError {
    fn from(e: BusError) -> Self {
        tracing::error!(error = %e, "bus error");
        Self::Internal(e.to_string())
    }
}
