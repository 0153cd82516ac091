//! Errors on the wire: a failed request's reply body `{"error": {"code", "message", "field"?}}`
//! (also the body of an HTTP error), with one enum of the stable codes every client branches on.

use serde::{Deserialize, Serialize};

/// The stable, machine-readable error codes. Each maps to an HTTP-like status, which a NATS
/// reply also carries in its `Nats-Service-Error-Code` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A field's value is refused (`field` names it). 400.
    Validation,
    /// Not JSON, not an object, or fields the message does not define. 400.
    Malformed,
    /// No valid credentials (HTTP only). 401.
    Unauthorized,
    /// The credentials or the subject's agent may not do this. 403.
    Forbidden,
    /// No such workflow, task, thread, handoff, pattern or agent. 404.
    NotFound,
    /// A heartbeat or act for an agent that is not registered: register again. 404.
    UnknownAgent,
    /// The state changed under the request (a live name, a decided handoff …). 409.
    Conflict,
    /// An operator deregistered the agent: stop hosting it. 410.
    Deregistered,
    /// The request or its reply is larger than allowed. 413.
    TooLarge,
    /// A bug or an unexpected failure on the server. 500.
    Internal,
    /// Overloaded, or NATS or PostgreSQL unavailable: the same request may succeed later. 503.
    Unavailable,
    /// A code this build does not know (sent by a newer server).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The HTTP status (also `Nats-Service-Error-Code`).
    pub fn status(self) -> u16 {
        match self {
            Self::Validation | Self::Malformed => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound | Self::UnknownAgent => 404,
            Self::Conflict => 409,
            Self::Deregistered => 410,
            Self::TooLarge => 413,
            Self::Internal | Self::Unknown => 500,
            Self::Unavailable => 503,
        }
    }

    /// The code as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validation => "validation",
            Self::Malformed => "malformed",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::UnknownAgent => "unknown_agent",
            Self::Conflict => "conflict",
            Self::Deregistered => "deregistered",
            Self::TooLarge => "too_large",
            Self::Internal => "internal",
            Self::Unavailable => "unavailable",
            Self::Unknown => "unknown",
        }
    }

    /// Whether the same request may succeed later.
    pub fn is_transient(self) -> bool {
        self == Self::Unavailable
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure, as carried in a reply body and in HTTP error responses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// The offending field, for validation errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{} ({field}): {}", self.code, self.message),
            None => write!(f, "{}: {}", self.code, self.message),
        }
    }
}

impl std::error::Error for ErrorBody {}

/// `{"error": ErrorBody}`: the reply to a request that failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    pub error: ErrorBody,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_an_unknown_one_is_kept_apart() {
        for code in [
            ErrorCode::Validation,
            ErrorCode::Malformed,
            ErrorCode::Unauthorized,
            ErrorCode::Forbidden,
            ErrorCode::NotFound,
            ErrorCode::UnknownAgent,
            ErrorCode::Conflict,
            ErrorCode::Deregistered,
            ErrorCode::TooLarge,
            ErrorCode::Internal,
            ErrorCode::Unavailable,
        ] {
            let wire = serde_json::to_value(code).expect("serialises");
            assert_eq!(wire, serde_json::json!(code.as_str()));
            assert_eq!(
                serde_json::from_value::<ErrorCode>(wire).expect("parses"),
                code
            );
        }
        let newer: ErrorBody =
            serde_json::from_str(r#"{"code": "rate_limited", "message": "slow down"}"#)
                .expect("an unknown code still parses");
        assert_eq!(newer.code, ErrorCode::Unknown);
        assert_eq!(newer.code.status(), 500);
    }
}
