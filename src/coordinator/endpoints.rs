//! The registry as a NATS service (`nats micro ls` lists it as `omoi-registry`): request/reply
//! endpoints under `<ns>.registry.*`, plus heartbeats on `<ns>.agent.heartbeat.<agent_id>`,
//! which are answered in batches so a fleet's heartbeats cost one database statement per batch.

use std::time::Duration;

use async_nats::service::{self, ServiceExt};
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::bus::Names;
use crate::domain::AgentId;
use crate::domain::dag::WorkflowSpec;
use crate::protocol::{ErrorReply, Heartbeat, HeartbeatAck};
use crate::runtime::Shutdown;
use crate::service::ServiceError;
use crate::service::collaboration::{Collaboration, HandoffRequest, SendMessage};
use crate::service::registry::{RegisterRequest, Registry, SearchQuery, UpdateRequest};
use crate::service::workflows::{WorkflowRef, Workflows};

/// Name shown by `nats micro ls`.
pub const SERVICE_NAME: &str = "omoi-registry";
/// Largest heartbeat batch answered with one statement.
const HEARTBEAT_BATCH: usize = 512;
/// Longest a heartbeat waits for its batch to fill.
const HEARTBEAT_LINGER: Duration = Duration::from_millis(20);

/// Largest reply body sent (nats-server's default `max_payload` is 1 MiB; headers need room).
const MAX_REPLY_BYTES: usize = 1_000_000;

/// Replies with `result` as JSON, or with an error body and the NATS service error headers.
pub async fn respond<T: Serialize>(req: &service::Request, result: Result<T, ServiceError>) {
    let result = result.and_then(|value| {
        let body = serde_json::to_vec(&value).map_err(|e| ServiceError::Internal(format!("encode reply: {e}")))?;
        // A reply over the server's payload limit would be dropped and the caller would time out.
        if body.len() > MAX_REPLY_BYTES {
            return Err(ServiceError::TooLarge {
                message: format!(
                    "reply of {} bytes exceeds the {MAX_REPLY_BYTES}-byte NATS limit; ask for less (e.g. include_tasks: false) or use the HTTP API",
                    body.len()
                ),
            });
        }
        Ok(body)
    });
    let outcome = match result {
        Ok(body) => req.respond(Ok(body.into())).await,
        Err(err) => {
            let body = serde_json::to_vec(&ErrorReply { error: err.body() }).unwrap_or_default();
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                service::NATS_SERVICE_ERROR,
                err.to_string().replace(['\r', '\n'], " ").as_str(),
            );
            headers.insert(
                service::NATS_SERVICE_ERROR_CODE,
                err.status().to_string().as_str(),
            );
            req.respond_with_headers(Ok(body.into()), headers).await
        }
    };
    if let Err(e) = outcome {
        tracing::debug!(error = %e, "could not send reply");
    }
}

/// Parses a request body; a malformed one is answered with a `malformed` error by the caller.
pub fn parse<T: DeserializeOwned>(req: &service::Request) -> Result<T, ServiceError> {
    serde_json::from_slice(&req.message.payload).map_err(|e| {
        ServiceError::Malformed(format!("malformed request on {}: {e}", req.message.subject))
    })
}

/// Starts the service; its endpoints run until `shutdown` is cancelled.
pub async fn start(
    nats: async_nats::Client,
    names: Names,
    registry: Registry,
    shutdown: &Shutdown,
) -> Result<(), crate::bus::BusError> {
    let err = |e: async_nats::Error| crate::bus::BusError::Provision {
        what: format!("service {SERVICE_NAME}"),
        reason: e.to_string(),
    };
    let service = nats
        .service_builder()
        .description(format!(
            "omoi agent registry for namespace `{}`",
            names.namespace()
        ))
        .queue_group(format!("{}-registry", names.namespace()))
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(err)?;
    let group = service.group(names.registry_prefix());
    let register = group.endpoint("register").await.map_err(err)?;
    let update = group.endpoint("update").await.map_err(err)?;
    let search = group.endpoint("search").await.map_err(err)?;
    let best_fit = group.endpoint("best_fit").await.map_err(err)?;
    let heartbeat = service
        .endpoint_builder()
        .name("heartbeat")
        .add(names.heartbeats())
        .await
        .map_err(err)?;

    let token = shutdown.token.clone();
    let reg = registry.clone();
    shutdown.spawn(serve(register, token.clone(), move |req| {
        let reg = reg.clone();
        async move {
            let result = match parse::<RegisterRequest>(&req) {
                Ok(body) => reg.register(body).await.map(|(agent, _)| agent),
                Err(e) => Err(e),
            };
            respond(&req, result).await;
        }
    }));
    let reg = registry.clone();
    shutdown.spawn(serve(update, token.clone(), move |req| {
        let reg = reg.clone();
        async move {
            let result = match parse::<UpdateRequest>(&req) {
                Ok(body) => reg.update(body.agent_id, body.update).await,
                Err(e) => Err(e),
            };
            respond(&req, result).await;
        }
    }));
    let reg = registry.clone();
    shutdown.spawn(serve(search, token.clone(), move |req| {
        let reg = reg.clone();
        async move {
            let result = match parse::<SearchQuery>(&req) {
                Ok(q) => reg.search(&q).await,
                Err(e) => Err(e),
            };
            respond(&req, result).await;
        }
    }));
    let reg = registry.clone();
    shutdown.spawn(serve(best_fit, token.clone(), move |req| {
        let reg = reg.clone();
        async move {
            let result = match parse::<SearchQuery>(&req) {
                Ok(q) => reg.best_fit(&q).await.and_then(|m| {
                    m.ok_or_else(|| {
                        ServiceError::NotFound(
                            "no available agent has every required capability".into(),
                        )
                    })
                }),
                Err(e) => Err(e),
            };
            respond(&req, result).await;
        }
    }));
    shutdown.spawn(serve_heartbeats(heartbeat, registry, token.clone()));
    shutdown.spawn(async move {
        token.cancelled().await;
        let _ = service.stop().await;
    });
    Ok(())
}

/// Name shown by `nats micro ls` for the workflow endpoints.
pub const WORKFLOW_SERVICE_NAME: &str = "omoi-workflows";

/// Starts `omoi-workflows`: `<ns>.workflow.submit`, `<ns>.workflow.get`, `<ns>.workflow.cancel`.
pub async fn start_workflows(
    nats: async_nats::Client,
    names: Names,
    workflows: Workflows,
    shutdown: &Shutdown,
) -> Result<(), crate::bus::BusError> {
    let err = |e: async_nats::Error| crate::bus::BusError::Provision {
        what: format!("service {WORKFLOW_SERVICE_NAME}"),
        reason: e.to_string(),
    };
    let service = nats
        .service_builder()
        .description(format!(
            "omoi workflows for namespace `{}`",
            names.namespace()
        ))
        .queue_group(format!("{}-workflows", names.namespace()))
        .start(WORKFLOW_SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(err)?;
    let token = shutdown.token.clone();
    for verb in ["submit", "get", "cancel"] {
        let endpoint = service
            .endpoint_builder()
            .name(verb)
            .add(names.workflow_endpoint(verb))
            .await
            .map_err(err)?;
        let wf = workflows.clone();
        shutdown.spawn(serve(endpoint, token.clone(), move |req| {
            let wf = wf.clone();
            async move {
                match verb {
                    "submit" => {
                        let result = match parse::<WorkflowSpec>(&req) {
                            Ok(spec) => wf.submit(spec).await,
                            Err(e) => Err(e),
                        };
                        respond(&req, result).await;
                    }
                    "get" => {
                        let result = match parse::<WorkflowRef>(&req) {
                            Ok(r) => wf.view(r.workflow_id, r.include_tasks).await,
                            Err(e) => Err(e),
                        };
                        respond(&req, result).await;
                    }
                    _ => {
                        let result = match parse::<WorkflowRef>(&req) {
                            Ok(r) => wf.cancel(r.workflow_id).await,
                            Err(e) => Err(e),
                        };
                        respond(&req, result).await;
                    }
                }
            }
        }));
    }
    shutdown.spawn(async move {
        token.cancelled().await;
        let _ = service.stop().await;
    });
    Ok(())
}

/// Name shown by `nats micro ls` for the collaboration endpoints.
pub const COLLAB_SERVICE_NAME: &str = "omoi-collaboration";

/// Starts `omoi-collaboration`: `<ns>.collab.send` (send a message without the HTTP API) and
/// `<ns>.collab.handoff` (request a handoff, e.g. from a worker whose executor asked for one).
pub async fn start_collaboration(
    nats: async_nats::Client,
    names: Names,
    collaboration: Collaboration,
    shutdown: &Shutdown,
) -> Result<(), crate::bus::BusError> {
    let err = |e: async_nats::Error| crate::bus::BusError::Provision {
        what: format!("service {COLLAB_SERVICE_NAME}"),
        reason: e.to_string(),
    };
    let service = nats
        .service_builder()
        .description(format!(
            "omoi collaboration for namespace `{}`",
            names.namespace()
        ))
        .queue_group(format!("{}-collaboration", names.namespace()))
        .start(COLLAB_SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(err)?;
    let send = service
        .endpoint_builder()
        .name("send")
        .add(names.collab_endpoint("send"))
        .await
        .map_err(err)?;
    let handoff = service
        .endpoint_builder()
        .name("handoff")
        .add(names.collab_endpoint("handoff"))
        .await
        .map_err(err)?;
    let token = shutdown.token.clone();
    let c = collaboration.clone();
    shutdown.spawn(serve(handoff, token.clone(), move |req| {
        let c = c.clone();
        async move {
            let result = match parse::<HandoffRequest>(&req) {
                Ok(h) => c.request_handoff(h).await,
                Err(e) => Err(e),
            };
            respond(&req, result).await;
        }
    }));
    shutdown.spawn(serve(send, token.clone(), move |req| {
        let c = collaboration.clone();
        async move {
            let result = match parse::<SendMessage>(&req) {
                Ok(m) => c.send_message(m).await,
                Err(e) => Err(e),
            };
            respond(&req, result).await;
        }
    }));
    shutdown.spawn(async move {
        token.cancelled().await;
        let _ = service.stop().await;
    });
    Ok(())
}

/// Runs `handle` for each request, one at a time, until cancelled.
async fn serve<F, Fut>(
    mut endpoint: service::endpoint::Endpoint,
    cancel: tokio_util::sync::CancellationToken,
    handle: F,
) where
    F: Fn(service::Request) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            req = endpoint.next() => match req {
                Some(req) => handle(req).await,
                None => break,
            },
        }
    }
}

async fn serve_heartbeats(
    mut endpoint: service::endpoint::Endpoint,
    registry: Registry,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        let first = tokio::select! {
            () = cancel.cancelled() => break,
            req = endpoint.next() => match req { Some(r) => r, None => break },
        };
        let mut batch = vec![first];
        let linger = tokio::time::sleep(HEARTBEAT_LINGER);
        tokio::pin!(linger);
        while batch.len() < HEARTBEAT_BATCH {
            tokio::select! {
                () = &mut linger => break,
                req = endpoint.next() => match req { Some(r) => batch.push(r), None => break },
            }
        }
        handle_heartbeats(&registry, batch).await;
    }
}

/// Parses a heartbeat; its subject's last token must be the agent id it carries.
fn parse_heartbeat(req: &service::Request) -> Result<Heartbeat, ServiceError> {
    let hb: Heartbeat = parse(req)?;
    let subject_id = req.message.subject.rsplit('.').next().unwrap_or_default();
    if subject_id.parse::<AgentId>().ok() != Some(hb.agent_id) {
        return Err(ServiceError::validation(
            "agent_id",
            format!(
                "heartbeat for {} sent on {}",
                hb.agent_id, req.message.subject
            ),
        ));
    }
    Ok(hb)
}

async fn handle_heartbeats(registry: &Registry, batch: Vec<service::Request>) {
    let mut beats = Vec::with_capacity(batch.len());
    let mut pending = Vec::with_capacity(batch.len());
    for req in batch {
        match parse_heartbeat(&req) {
            Ok(hb) if hb.leaving => {
                let result = registry.leave(hb.agent_id).await.map(|a| HeartbeatAck {
                    agent_id: a.id,
                    status: a.status,
                });
                respond(&req, result).await;
            }
            Ok(hb) => {
                beats.push((hb.agent_id, hb.load));
                pending.push(req);
            }
            Err(e) => {
                tracing::warn!(subject = %req.message.subject, error = %e, "bad heartbeat");
                respond::<()>(&req, Err(e)).await;
            }
        }
    }
    if beats.is_empty() {
        return;
    }
    match registry.record_heartbeats(&beats).await {
        Ok(results) => {
            for (req, result) in pending.iter().zip(results) {
                let ack = result.map(|a| HeartbeatAck {
                    agent_id: a.id,
                    status: a.status,
                });
                respond(req, ack).await;
            }
        }
        Err(e) => {
            let msg = e.to_string();
            for req in &pending {
                respond::<()>(req, Err(ServiceError::Internal(msg.clone()))).await;
            }
        }
    }
}
