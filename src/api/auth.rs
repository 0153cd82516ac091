//! Authentication and authorisation of HTTP requests. Every routed request is checked against
//! its route's rule ([`crate::domain::access::ROUTES`]): the bearer token is looked up (401 if
//! missing or unknown), its role must pass the rule (403), and the [`Acting`] caller is handed
//! to the handler, which checks agent-bound actions ("as which agent?") itself.
//!
//! A token arrives as `Authorization: Bearer <token>`, or — for browsers, which cannot set
//! headers on a WebSocket — as the WebSocket subprotocol `omoi.token.<token>` offered beside
//! `omoi.v1` (the server selects `omoi.v1`). Never in a URL. WebSocket upgrades from a page of
//! another origin are refused unless that origin is allowed (`http_allowed_origins`).

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::{HeaderMap, request::Parts};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use crate::config::HttpAuth;
use crate::domain::AgentId;
use crate::domain::access::{Caller, Role, Rule, rule_for};
use crate::service::ServiceError;
use crate::service::registry::Registry;
use crate::service::tokens::Tokens;

/// The WebSocket subprotocol the server speaks (and selects).
pub const WS_PROTOCOL: &str = "omoi.v1";
/// Prefix of the WebSocket subprotocol that carries a token.
pub const WS_TOKEN_PREFIX: &str = "omoi.token.";

/// What authentication needs.
#[derive(Clone)]
pub struct Auth {
    pub mode: HttpAuth,
    pub tokens: Tokens,
    /// Origins allowed to open WebSockets besides the control plane's own.
    pub allowed_origins: Vec<String>,
}

/// The token a request presents, if any.
fn presented(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(axum::http::header::AUTHORIZATION) {
        let v = v.to_str().ok()?;
        let (scheme, token) = v.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|t| !t.is_empty());
    }
    headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| p.strip_prefix(WS_TOKEN_PREFIX))
}

/// The middleware: authenticates, applies the route's rule, and passes the caller on.
pub async fn authorize(State(auth): State<Auth>, mut req: Request, next: Next) -> Response {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| {
            let p = m.as_str();
            p.strip_prefix("/api/v1").unwrap_or(p).to_string()
        })
        .unwrap_or_default();
    let rule = rule_for(req.method().as_str(), &path);
    if rule == Rule::Public {
        return next.run(req).await;
    }
    let caller = match auth.mode {
        HttpAuth::Open => Caller::open(),
        HttpAuth::Token => {
            let Some(token) = presented(req.headers()) else {
                return ApiError(ServiceError::Unauthorized(
                    "this request needs an API token: `Authorization: Bearer <token>`".into(),
                ))
                .into_response();
            };
            match auth.tokens.authenticate(token).await {
                Ok(c) => c,
                Err(e) => return ApiError(e).into_response(),
            }
        }
    };
    if !rule.admits(caller.role) {
        return ApiError(ServiceError::Forbidden(format!(
            "a token with role `{}` may not {} {path}",
            caller.role,
            req.method()
        )))
        .into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// The authenticated caller of a request (set by [`authorize`]).
#[derive(Debug, Clone)]
pub struct Acting(pub Caller);

impl<S: Send + Sync> FromRequestParts<S> for Acting {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .map(Acting)
            .ok_or_else(|| ApiError(ServiceError::Unauthorized("not authenticated".into())))
    }
}

impl Acting {
    /// May act as the agent named `name` (registering it).
    pub fn as_name(&self, name: &str) -> Result<(), ServiceError> {
        if self.0.may_act_as(name) {
            Ok(())
        } else {
            Err(self.refused(name))
        }
    }

    /// May act as agent `id`: an admin, or an agent token naming that agent.
    pub async fn as_agent(&self, registry: &Registry, id: AgentId) -> Result<(), ServiceError> {
        if self.0.role == Role::Admin {
            return Ok(());
        }
        let agent = registry.get(id).await?;
        if self.0.may_act_as(&agent.name) {
            Ok(())
        } else {
            Err(self.refused(&agent.name))
        }
    }

    /// Any of `ids` is one this caller may act as (an agent among a thread's participants).
    pub async fn as_any_of(
        &self,
        registry: &Registry,
        ids: &[AgentId],
    ) -> Result<AgentId, ServiceError> {
        for id in ids {
            if self.as_agent(registry, *id).await.is_ok() {
                return Ok(*id);
            }
        }
        Err(ServiceError::Forbidden(format!(
            "token `{}` acts as none of these agents",
            self.0.name
        )))
    }

    fn refused(&self, name: &str) -> ServiceError {
        ServiceError::Forbidden(format!(
            "token `{}` ({}) may not act as agent `{name}`",
            self.0.name, self.0.role
        ))
    }
}

/// Refuses a WebSocket upgrade from a page of an origin that is neither the control plane's
/// own (the `Host` it was reached at) nor allowed. Clients that send no `Origin` (not browsers)
/// pass.
pub fn check_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), ServiceError> {
    let Some(origin) = headers.get(axum::http::header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin
        .to_str()
        .unwrap_or_default()
        .trim_end_matches('/')
        .to_ascii_lowercase();
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let same_origin = url::Url::parse(&origin).is_ok_and(|u| {
        let authority = match u.port() {
            Some(p) => format!("{}:{p}", u.host_str().unwrap_or_default()),
            None => u.host_str().unwrap_or_default().to_string(),
        };
        authority == host
    });
    if same_origin || allowed.contains(&origin) {
        Ok(())
    } else {
        Err(ServiceError::Forbidden(format!(
            "WebSocket from origin `{}` refused; allow it with http_allowed_origins",
            crate::domain::text::bounded(&origin, 128)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn a_token_comes_from_the_bearer_header_or_the_websocket_subprotocol() {
        assert_eq!(
            presented(&headers(&[("authorization", "Bearer omoi_abc")])),
            Some("omoi_abc")
        );
        assert_eq!(
            presented(&headers(&[(
                "sec-websocket-protocol",
                "omoi.v1, omoi.token.omoi_xyz"
            )])),
            Some("omoi_xyz")
        );
        assert_eq!(presented(&headers(&[("authorization", "Basic abc")])), None);
        assert_eq!(presented(&headers(&[])), None);
    }

    #[test]
    fn websockets_from_foreign_pages_are_refused_unless_allowed() {
        let allowed = vec!["https://dash.example.com".to_string()];
        let ok = |pairs: &[(&'static str, &str)]| check_origin(&headers(pairs), &allowed).is_ok();
        assert!(
            ok(&[("host", "127.0.0.1:8080")]),
            "no origin: not a browser"
        );
        assert!(ok(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080")
        ]));
        assert!(ok(&[
            ("host", "cp:8080"),
            ("origin", "https://dash.example.com")
        ]));
        assert!(!ok(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "https://evil.example")
        ]));
        assert!(!ok(&[("host", "127.0.0.1:8080"), ("origin", "null")]));
    }
}
