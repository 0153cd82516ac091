//! The control plane's NATS micro services (`nats micro ls` lists them): `omoi-registry`
//! (an agent's `register`, `update` and `heartbeat` on `<ns>.act.<agent_id>.<verb>` —
//! heartbeats answered in batches, so a fleet's heartbeats cost one database statement per
//! batch — and the reads `<ns>.registry.search|best_fit`), `omoi-workflows`
//! (`<ns>.workflow.*`) and `omoi-collaboration` (an agent's `send`, `read`, `thread`,
//! `handoff`, `accept`, `decline`, `cancel` on `<ns>.act.<agent_id>.<verb>`). The acting agent
//! is the one in the subject. Replies follow docs/protocol.md: the result as JSON, or an error
//! body with the service error headers.

use std::time::Duration;

use async_nats::service::{self, ServiceExt};
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::bus::Names;
use crate::bus::names::{
    ACT_ACCEPT, ACT_CANCEL, ACT_CLOSE, ACT_DECLINE, ACT_DEREGISTER, ACT_HANDOFF, ACT_HEARTBEAT,
    ACT_MESSAGES, ACT_READ, ACT_REGISTER, ACT_SEND, ACT_THREAD, ACT_UPDATE,
};
use crate::domain::AgentId;
use crate::domain::dag::WorkflowSpec;
use crate::protocol::ErrorReply;
use crate::protocol::collaboration::{
    CloseThread, CreateThread, HandoffDecision, HandoffRequest, ListMessages, MarkRead, SendMessage,
};
use crate::protocol::registry::{
    AgentUpdate, Deregister, Heartbeat, HeartbeatAck, RegisterRequest, SearchQuery,
};
use crate::protocol::workflows::{MIN_TASK_JSON_BYTES, WorkflowRef};
use crate::runtime::Shutdown;
use crate::service::ServiceError;
use crate::service::collaboration::Collaboration;
use crate::service::registry::Registry;
use crate::service::workflows::Workflows;

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
            headers.insert(service::NATS_SERVICE_ERROR, err.summary().as_str());
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

/// Parses a request body; a malformed one is answered with a `malformed` error by the caller,
/// one with an unsupported `"v"` or holding U+0000 with a `validation` error.
pub fn parse<T: DeserializeOwned>(req: &service::Request) -> Result<T, ServiceError> {
    parse_json(
        &req.message.payload,
        &format!("a request on {}", req.message.subject),
    )
}

/// [`parse`] of a body that arrived some other way (`what` says how, for messages).
pub fn parse_json<T: DeserializeOwned>(payload: &[u8], what: &str) -> Result<T, ServiceError> {
    // Every request is a JSON object (serde would read a struct from an array too).
    if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ServiceError::Malformed(format!("{what} is a JSON object")));
    }
    #[derive(serde::Deserialize)]
    struct Version {
        #[serde(default)]
        v: Option<serde_json::Value>,
    }
    let version = serde_json::from_slice::<Version>(payload)
        .map_err(|e| ServiceError::Malformed(format!("{what}: malformed: {e}")))?;
    if let Some(v) = version.v {
        if v.as_u64() != Some(u64::from(crate::protocol::PROTOCOL_VERSION)) {
            return Err(ServiceError::validation(
                "v",
                format!(
                    "unsupported protocol version {}; this control plane speaks {}",
                    crate::domain::text::bounded(&v.to_string(), 32),
                    crate::protocol::PROTOCOL_VERSION
                ),
            ));
        }
    }
    if let Some(path) = crate::domain::text::find_nul_in_json(payload) {
        return Err(ServiceError::validation(
            path,
            "contains U+0000 (NUL), which cannot be stored",
        ));
    }
    serde_json::from_slice(payload)
        .map_err(|e| ServiceError::Malformed(format!("{what}: malformed: {e}")))
}

/// Runs a handler's future, turning a panic into an `internal` error: one bad request must
/// never take its endpoint down.
pub async fn guarded<T>(
    work: impl std::future::Future<Output = Result<T, ServiceError>>,
) -> Result<T, ServiceError> {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(work).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let what = crate::runtime::panic_message(panic.as_ref());
            tracing::error!(panic = %what, "request handler panicked; answering internal");
            Err(ServiceError::Internal(
                "the request could not be handled".into(),
            ))
        }
    }
}

fn service_error(name: &str, e: async_nats::Error) -> crate::bus::BusError {
    crate::bus::BusError::Provision {
        what: format!("service {name}"),
        reason: e.to_string(),
    }
}

/// One NATS micro service being set up: its endpoints run until `shutdown` is cancelled, and
/// then the service is stopped (so `nats micro ls` no longer lists it).
struct Endpoints<'a> {
    service: service::Service,
    name: &'static str,
    names: &'a Names,
    shutdown: &'a Shutdown,
}

impl<'a> Endpoints<'a> {
    async fn start(
        nats: &async_nats::Client,
        name: &'static str,
        what: &str,
        names: &'a Names,
        shutdown: &'a Shutdown,
    ) -> Result<Self, crate::bus::BusError> {
        let service = nats
            .service_builder()
            .description(format!("omoi {what} for namespace `{}`", names.namespace()))
            .queue_group(format!("{}-{name}", names.namespace()))
            .start(name, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|e| service_error(name, e))?;
        Ok(Self {
            service,
            name,
            names,
            shutdown,
        })
    }

    /// An endpoint on `subject` whose JSON request `Req` is answered by `handle`.
    async fn json<Req, Resp, F, Fut>(
        &self,
        endpoint: &str,
        subject: String,
        handle: F,
    ) -> Result<(), crate::bus::BusError>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        F: Fn(Req) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Resp, ServiceError>> + Send + 'static,
    {
        self.with_subject(endpoint, subject, move |_, req| handle(req))
            .await
    }

    /// An endpoint on `<ns>.act.*.<verb>` whose handler gets the acting agent — the id in the
    /// subject, which the NATS server's permissions tie to the sender's credentials — and the
    /// request. A subject without a valid agent id is answered with a validation error.
    async fn act<Req, Resp, F, Fut>(
        &self,
        verb: &str,
        handle: F,
    ) -> Result<(), crate::bus::BusError>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        F: Fn(AgentId, Req) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Resp, ServiceError>> + Send + 'static,
    {
        let handle = std::sync::Arc::new(handle);
        let parser = self.names.clone();
        self.with_subject(
            verb,
            self.names.acts(verb),
            move |subject: String, req: Req| {
                let handle = handle.clone();
                let acting = parser.acting_agent(&subject);
                async move {
                    match acting {
                        Some(agent) => handle(agent, req).await,
                        None => Err(ServiceError::validation(
                            "subject",
                            "expected <ns>.act.<agent_id>.<verb> with an agent id",
                        )),
                    }
                }
            },
        )
        .await
    }

    /// An endpoint on `subject` whose handler gets the subject a request came on and the
    /// request.
    async fn with_subject<Req, Resp, F, Fut>(
        &self,
        endpoint: &str,
        subject: String,
        handle: F,
    ) -> Result<(), crate::bus::BusError>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        F: Fn(String, Req) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Resp, ServiceError>> + Send + 'static,
    {
        let endpoint = self
            .service
            .endpoint_builder()
            .name(endpoint)
            .add(subject)
            .await
            .map_err(|e| service_error(self.name, e))?;
        let handle = std::sync::Arc::new(handle);
        self.shutdown
            .spawn(serve(endpoint, self.shutdown.token.clone(), move |req| {
                let handle = handle.clone();
                async move {
                    let result = match parse::<Req>(&req) {
                        Ok(body) => guarded(handle(req.message.subject.to_string(), body)).await,
                        Err(e) => Err(e),
                    };
                    respond(&req, result).await;
                }
            }));
        Ok(())
    }

    /// Every endpoint is added: stop the service when shutting down.
    fn stop_on_shutdown(self) {
        let token = self.shutdown.token.clone();
        let service = self.service;
        self.shutdown.spawn(async move {
            token.cancelled().await;
            let _ = service.stop().await;
        });
    }
}

/// `Err(Forbidden)` unless the body names the acting agent where it names one.
fn same_agent(field: &str, acting: AgentId, named: AgentId) -> Result<(), ServiceError> {
    if acting == named {
        Ok(())
    } else {
        Err(ServiceError::Forbidden(format!(
            "{field} {named} differs from the acting agent {acting} of the subject"
        )))
    }
}

/// Starts `omoi-registry`: an agent's `register`, `update` and `heartbeat` on
/// `<ns>.act.<agent_id>.<verb>`, and the reads `<ns>.registry.search|best_fit`.
pub async fn start(
    nats: async_nats::Client,
    names: Names,
    registry: Registry,
    shutdown: &Shutdown,
) -> Result<(), crate::bus::BusError> {
    let service = Endpoints::start(&nats, SERVICE_NAME, "agent registry", &names, shutdown).await?;
    let reg = registry.clone();
    service
        .act(ACT_REGISTER, move |agent, body: RegisterRequest| {
            let reg = reg.clone();
            async move {
                reg.check_identity(agent, &body.name)?;
                reg.register(body).await.map(|(agent, _)| agent)
            }
        })
        .await?;
    let reg = registry.clone();
    service
        .act(ACT_UPDATE, move |agent, update: AgentUpdate| {
            let reg = reg.clone();
            async move { reg.update_by_agent(agent, update).await }
        })
        .await?;
    let reg = registry.clone();
    service
        .act(ACT_DEREGISTER, move |agent, _: Deregister| {
            let reg = reg.clone();
            async move { reg.deregister(agent).await }
        })
        .await?;
    let reg = registry.clone();
    service
        .json("search", names.registry("search"), move |q: SearchQuery| {
            let reg = reg.clone();
            async move { reg.search(&q).await }
        })
        .await?;
    let reg = registry.clone();
    service
        .json(
            "best_fit",
            names.registry("best_fit"),
            move |q: SearchQuery| {
                let reg = reg.clone();
                async move {
                    reg.best_fit(&q).await?.ok_or_else(|| {
                        ServiceError::NotFound(
                            "no available agent has every required capability".into(),
                        )
                    })
                }
            },
        )
        .await?;
    let heartbeat = service
        .service
        .endpoint_builder()
        .name(ACT_HEARTBEAT)
        .add(names.acts(ACT_HEARTBEAT))
        .await
        .map_err(|e| service_error(SERVICE_NAME, e))?;
    shutdown.spawn(serve_heartbeats(
        heartbeat,
        registry,
        names.clone(),
        shutdown.token.clone(),
    ));
    service.stop_on_shutdown();
    Ok(())
}

/// Name shown by `nats micro ls` for the workflow endpoints.
pub const WORKFLOW_SERVICE_NAME: &str = "omoi-workflows";

/// Starts `omoi-workflows`: `<ns>.workflow.submit`, `.submit_upload` (a submission put in the
/// `<ns>_uploads` object store, at most `max_upload_bytes`), `.run` (a pattern), `.get`,
/// `.cancel`.
pub async fn start_workflows(
    nats: async_nats::Client,
    names: Names,
    workflows: Workflows,
    pattern_dirs: Vec<std::path::PathBuf>,
    max_upload_bytes: u64,
    shutdown: &Shutdown,
) -> Result<(), crate::bus::BusError> {
    let uploads = crate::bus::provision::open_object_store(
        &async_nats::jetstream::new(nats.clone()),
        &names,
        crate::bus::names::OBJECT_STORE_UPLOADS,
    )
    .await?;
    let service =
        Endpoints::start(&nats, WORKFLOW_SERVICE_NAME, "workflows", &names, shutdown).await?;
    let wf = workflows.clone();
    service
        .json(
            "submit",
            names.workflow_endpoint("submit"),
            move |spec: WorkflowSpec| {
                let wf = wf.clone();
                async move { Ok(wf.submit(spec).await?.fit(MAX_REPLY_BYTES)) }
            },
        )
        .await?;
    let wf = workflows.clone();
    service
        .json(
            "submit_upload",
            names.workflow_endpoint("submit_upload"),
            move |upload: crate::protocol::workflows::SubmitUpload| {
                let (wf, uploads) = (wf.clone(), uploads.clone());
                async move {
                    let body = take_upload(&uploads, &upload.object, max_upload_bytes).await?;
                    let what = format!("the upload `{}`", upload.object);
                    let spec: WorkflowSpec = parse_json(&body, &what)?;
                    Ok(wf.submit(spec).await?.fit(MAX_REPLY_BYTES))
                }
            },
        )
        .await?;
    let wf = workflows.clone();
    let dirs = std::sync::Arc::new(pattern_dirs);
    service
        .json(
            "run",
            names.workflow_endpoint("run"),
            move |run: crate::protocol::workflows::PatternRun| {
                let (wf, dirs) = (wf.clone(), dirs.clone());
                async move { wf.submit_pattern(run, &dirs).await }
            },
        )
        .await?;
    let wf = workflows.clone();
    service
        .json(
            "get",
            names.workflow_endpoint("get"),
            move |r: WorkflowRef| {
                let wf = wf.clone();
                // Too many tasks for one message whatever they hold: refused before they are
                // read (a 100,000-task workflow took a second to read and encode, for a reply
                // then refused for its size).
                async move {
                    wf.view_listing_at_most(
                        r.workflow_id,
                        r.include_tasks,
                        MAX_REPLY_BYTES / MIN_TASK_JSON_BYTES,
                    )
                    .await
                }
            },
        )
        .await?;
    service
        .json(
            "cancel",
            names.workflow_endpoint("cancel"),
            move |r: WorkflowRef| {
                let wf = workflows.clone();
                // The cancel is done: its reply must not turn into an error for its size.
                async move { Ok(wf.cancel(r.workflow_id).await?.fit(MAX_REPLY_BYTES)) }
            },
        )
        .await?;
    service.stop_on_shutdown();
    Ok(())
}

/// Reads the object `name` of the uploads store — at most `limit` bytes — and deletes it: an
/// upload is submitted once.
async fn take_upload(
    store: &async_nats::jetstream::object_store::ObjectStore,
    name: &str,
    limit: u64,
) -> Result<Vec<u8>, ServiceError> {
    use async_nats::jetstream::object_store::InfoErrorKind;
    use tokio::io::AsyncReadExt;
    let unavailable = |e: &dyn std::fmt::Display| {
        ServiceError::Unavailable(format!("the uploads object store: {e}"))
    };
    let info = match store.info(name).await {
        Ok(info) => info,
        Err(e) if e.kind() == InfoErrorKind::NotFound => {
            return Err(ServiceError::NotFound(format!(
                "no upload `{}`: put the workflow in the uploads object store first (an upload \
                 is deleted once submitted, and after an hour)",
                crate::domain::text::bounded(name, 200)
            )));
        }
        Err(e) if e.kind() == InfoErrorKind::InvalidName => {
            return Err(ServiceError::validation("object", e.to_string()));
        }
        Err(e) => return Err(unavailable(&e)),
    };
    let too_large = |size: u64| ServiceError::TooLarge {
        message: format!(
            "the upload is {size} bytes; a submission may be at most {limit} bytes \
             (http_max_body_bytes)"
        ),
    };
    if info.size as u64 > limit {
        let _ = store.delete(name).await;
        return Err(too_large(info.size as u64));
    }
    let mut object = store.get(name).await.map_err(|e| unavailable(&e))?;
    let mut body = Vec::with_capacity(info.size);
    let read = (&mut object)
        .take(limit + 1)
        .read_to_end(&mut body)
        .await
        .map_err(|e| match e.kind() {
            // The chunks do not add up to the digest the object's meta names: forged or torn.
            std::io::ErrorKind::InvalidData => ServiceError::validation(
                "object",
                format!("the upload does not match its SHA-256 digest ({e}); put it again"),
            ),
            _ => unavailable(&e),
        });
    // Deleted whatever happens next; the store's max age drops it anyway.
    if let Err(e) = store.delete(name).await {
        tracing::debug!(error = %e, object = name, "could not delete an upload; it expires");
    }
    read?;
    if body.len() as u64 > limit {
        return Err(too_large(body.len() as u64));
    }
    Ok(body)
}

/// Name shown by `nats micro ls` for the collaboration endpoints.
pub const COLLAB_SERVICE_NAME: &str = "omoi-collaboration";

/// Starts `omoi-collaboration`: what an agent does with others, each on
/// `<ns>.act.<agent_id>.<verb>` — `send` a message, `read` (mark read), open a `thread`, list
/// its `messages`, `close` it, request a `handoff`, `accept`, `decline` or `cancel` one.
pub async fn start_collaboration(
    nats: async_nats::Client,
    names: Names,
    collaboration: Collaboration,
    shutdown: &Shutdown,
) -> Result<(), crate::bus::BusError> {
    let service = Endpoints::start(
        &nats,
        COLLAB_SERVICE_NAME,
        "collaboration",
        &names,
        shutdown,
    )
    .await?;
    let c = collaboration.clone();
    service
        .act(ACT_SEND, move |agent, m: SendMessage| {
            let c = c.clone();
            async move {
                same_agent("sender_id", agent, m.sender_id)?;
                c.send_message(m).await
            }
        })
        .await?;
    let c = collaboration.clone();
    service
        .act(ACT_READ, move |agent, r: MarkRead| {
            let c = c.clone();
            async move { c.mark_read(r.message_id, agent).await }
        })
        .await?;
    let c = collaboration.clone();
    service
        .act(ACT_THREAD, move |agent, t: CreateThread| {
            let c = c.clone();
            async move {
                if !t.participants.contains(&agent) {
                    return Err(ServiceError::Forbidden(format!(
                        "agent {agent} opens only threads it takes part in"
                    )));
                }
                c.create_thread(t).await
            }
        })
        .await?;
    let c = collaboration.clone();
    service
        .act(ACT_MESSAGES, move |agent, q: ListMessages| {
            let c = c.clone();
            async move {
                c.participant(q.thread_id, agent).await?;
                let unread_for = q.unread.then_some(agent);
                let page = c
                    .list_messages(q.thread_id, q.before, unread_for, q.limit.unwrap_or(50))
                    .await?;
                Ok(page.fit(MAX_REPLY_BYTES))
            }
        })
        .await?;
    let c = collaboration.clone();
    service
        .act(ACT_CLOSE, move |agent, t: CloseThread| {
            let c = c.clone();
            async move {
                c.participant(t.thread_id, agent).await?;
                c.close_thread(t.thread_id, t.status).await
            }
        })
        .await?;
    let c = collaboration.clone();
    service
        .act(ACT_HANDOFF, move |agent, h: HandoffRequest| {
            let c = c.clone();
            async move {
                same_agent("from_agent_id", agent, h.from_agent_id)?;
                c.request_handoff(h).await
            }
        })
        .await?;
    for verb in [ACT_ACCEPT, ACT_DECLINE, ACT_CANCEL] {
        let c = collaboration.clone();
        service
            .act(verb, move |agent, d: HandoffDecision| {
                let c = c.clone();
                async move {
                    match verb {
                        ACT_ACCEPT => c.accept(d.handoff_id, agent).await,
                        ACT_DECLINE => c.decline(d.handoff_id, agent, d.reason).await,
                        _ => c.cancel(d.handoff_id, agent).await,
                    }
                }
            })
            .await?;
    }
    service.stop_on_shutdown();
    Ok(())
}

/// Requests of one endpoint handled at once; more wait (in NATS) for a free slot, so a burst
/// cannot take every database connection.
const ENDPOINT_CONCURRENCY: usize = 16;

/// Runs `handle` for each request, up to [`ENDPOINT_CONCURRENCY`] at once, until cancelled;
/// then lets those in flight finish.
async fn serve<F, Fut>(
    mut endpoint: service::endpoint::Endpoint,
    cancel: tokio_util::sync::CancellationToken,
    handle: F,
) where
    F: Fn(service::Request) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(ENDPOINT_CONCURRENCY));
    let in_flight = tokio_util::task::TaskTracker::new();
    loop {
        let permit = tokio::select! {
            () = cancel.cancelled() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        tokio::select! {
            () = cancel.cancelled() => break,
            req = endpoint.next() => match req {
                Some(req) => {
                    let work = handle(req);
                    in_flight.spawn(async move {
                        work.await;
                        drop(permit);
                    });
                }
                None => break,
            },
        }
    }
    in_flight.close();
    in_flight.wait().await;
}

async fn serve_heartbeats(
    mut endpoint: service::endpoint::Endpoint,
    registry: Registry,
    names: Names,
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
        use futures::FutureExt;
        if std::panic::AssertUnwindSafe(handle_heartbeats(&registry, &names, batch))
            .catch_unwind()
            .await
            .is_err()
        {
            // Unanswered heartbeats are sent again at the next interval.
            tracing::error!("heartbeat batch panicked; its heartbeats go unanswered");
        }
    }
}

/// Parses a heartbeat; the agent of its subject must be the agent id it carries.
fn parse_heartbeat(names: &Names, req: &service::Request) -> Result<Heartbeat, ServiceError> {
    let hb: Heartbeat = parse(req)?;
    if names.acting_agent(&req.message.subject) != Some(hb.agent_id) {
        return Err(ServiceError::validation(
            "agent_id",
            format!(
                "heartbeat for {} sent on {}",
                hb.agent_id, req.message.subject
            ),
        ));
    }
    crate::service::registry::validate_load(hb.load)?;
    Ok(hb)
}

async fn handle_heartbeats(registry: &Registry, names: &Names, batch: Vec<service::Request>) {
    let mut beats = Vec::with_capacity(batch.len());
    let mut pending = Vec::with_capacity(batch.len());
    // Leaves are applied after the batch's ordinary beats: an agent that heartbeats and then
    // says it is leaving, without waiting in between, must end offline, not idle again.
    let mut leaving = Vec::new();
    for req in batch {
        match parse_heartbeat(names, &req) {
            Ok(hb) if hb.leaving => leaving.push((hb.agent_id, req)),
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
    if !beats.is_empty() {
        record_beats(registry, &beats, &pending).await;
    }
    for (agent, req) in leaving {
        let result = registry.leave(agent).await.map(|a| HeartbeatAck {
            agent_id: a.id,
            status: a.status,
        });
        respond(&req, result).await;
    }
}

/// Records a batch's ordinary heartbeats in one statement and answers each.
async fn record_beats(registry: &Registry, beats: &[(AgentId, i32)], pending: &[service::Request]) {
    match registry.record_heartbeats(beats).await {
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
            for req in pending {
                respond::<()>(req, Err(ServiceError::Internal(msg.clone()))).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_handler_is_answered_internal_and_the_next_request_is_served() {
        let boom = guarded::<()>(async { panic!("handler bug") }).await;
        assert!(matches!(boom, Err(ServiceError::Internal(_))), "{boom:?}");
        let fine = guarded(async { Ok::<_, ServiceError>(7) }).await;
        assert_eq!(fine.ok(), Some(7));
    }
}
