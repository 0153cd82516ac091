//! Rust clients of omoi's NATS request/reply APIs. Any NATS client in any language can do
//! the same: the subjects and payloads are in docs/protocol.md.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::bus::Names;
use crate::bus::names::{ACT_DEREGISTER, ACT_HEARTBEAT, ACT_REGISTER, ACT_UPDATE};
use crate::domain::AgentId;
use crate::protocol::registry::{
    AgentMatch, AgentRecord, AgentUpdate, Deregister, Heartbeat, HeartbeatAck, RegisterRequest,
    SearchQuery,
};
use crate::protocol::{ErrorBody, ErrorCode, ErrorReply};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// omoi answered with an error (branch on its `code`).
    #[error(transparent)]
    Remote(#[from] ErrorBody),
    /// Nobody serves this subject (no control plane running).
    #[error("no omoi control plane answers on {0}")]
    NoResponders(String),
    #[error("request on {subject} failed: {reason}")]
    Transport { subject: String, reason: String },
    #[error("unreadable reply on {subject}: {reason}")]
    BadReply { subject: String, reason: String },
}

impl ClientError {
    /// The error code omoi answered with, if it answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Remote(body) => Some(body.code),
            _ => None,
        }
    }

    /// Whether the same request may succeed later: no control plane answered, the request
    /// was lost, or one answered `unavailable` (its database or NATS away, or overloaded).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::NoResponders(_) | Self::Transport { .. } => true,
            Self::Remote(body) => body.code.is_transient(),
            Self::BadReply { .. } => false,
        }
    }
}

/// Sends a JSON request and decodes the reply (or its error body).
pub async fn request<Req: Serialize, Resp: DeserializeOwned>(
    nats: &async_nats::Client,
    subject: String,
    body: &Req,
    timeout: Duration,
) -> Result<Resp, ClientError> {
    let payload = serde_json::to_vec(body).map_err(|e| ClientError::Transport {
        subject: subject.clone(),
        reason: e.to_string(),
    })?;
    request_raw(nats, subject, payload.into(), timeout).await
}

/// Sends raw bytes as a request and decodes the reply.
pub async fn request_raw<Resp: DeserializeOwned>(
    nats: &async_nats::Client,
    subject: String,
    payload: Bytes,
    timeout: Duration,
) -> Result<Resp, ClientError> {
    let reply = tokio::time::timeout(timeout, nats.request(subject.clone(), payload))
        .await
        .map_err(|_| ClientError::Transport {
            subject: subject.clone(),
            reason: format!("no reply within {timeout:?}"),
        })?
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => {
                ClientError::NoResponders(subject.clone())
            }
            _ => ClientError::Transport {
                subject: subject.clone(),
                reason: e.to_string(),
            },
        })?;
    let is_error = reply.headers.as_ref().is_some_and(|h| {
        h.get(async_nats::service::NATS_SERVICE_ERROR_CODE)
            .is_some()
    });
    if is_error {
        let body: ErrorReply =
            serde_json::from_slice(&reply.payload).map_err(|e| ClientError::BadReply {
                subject: subject.clone(),
                reason: e.to_string(),
            })?;
        return Err(ClientError::Remote(body.error));
    }
    serde_json::from_slice(&reply.payload).map_err(|e| ClientError::BadReply {
        subject,
        reason: e.to_string(),
    })
}

/// Client of the agent registry service: an agent's `register`, `update` and `heartbeat` on
/// `<ns>.act.<agent_id>.<verb>`, and the reads `<ns>.registry.search|best_fit`.
#[derive(Clone)]
pub struct AgentRegistryClient {
    nats: async_nats::Client,
    names: Names,
    timeout: Duration,
}

impl AgentRegistryClient {
    pub fn new(nats: async_nats::Client, names: Names) -> Self {
        Self {
            nats,
            names,
            timeout: Duration::from_secs(5),
        }
    }

    /// Registers, as the agent the request names (on that agent's own subject).
    pub async fn register(&self, req: &RegisterRequest) -> Result<AgentRecord, ClientError> {
        let agent = AgentId::for_name(self.names.namespace(), &req.name);
        request(
            &self.nats,
            self.names.act(agent, ACT_REGISTER),
            req,
            self.timeout,
        )
        .await
    }

    /// Changes agent `agent_id`, acting as it.
    pub async fn update(
        &self,
        agent_id: AgentId,
        update: AgentUpdate,
    ) -> Result<AgentRecord, ClientError> {
        request(
            &self.nats,
            self.names.act(agent_id, ACT_UPDATE),
            &update,
            self.timeout,
        )
        .await
    }

    /// Deregisters agent `agent_id`, acting as it: it leaves the fleet (its name may register
    /// again later). The reply is its record, `terminated`.
    pub async fn deregister(&self, agent_id: AgentId) -> Result<AgentRecord, ClientError> {
        request(
            &self.nats,
            self.names.act(agent_id, ACT_DEREGISTER),
            &Deregister::default(),
            self.timeout,
        )
        .await
    }

    pub async fn search(&self, query: &SearchQuery) -> Result<Vec<AgentMatch>, ClientError> {
        request(
            &self.nats,
            self.names.registry("search"),
            query,
            self.timeout,
        )
        .await
    }

    /// The best available agent; an error with code `not_found` when none fits.
    pub async fn best_fit(&self, query: &SearchQuery) -> Result<AgentMatch, ClientError> {
        request(
            &self.nats,
            self.names.registry("best_fit"),
            query,
            self.timeout,
        )
        .await
    }

    pub async fn heartbeat(&self, hb: &Heartbeat) -> Result<HeartbeatAck, ClientError> {
        request(
            &self.nats,
            self.names.act(hb.agent_id, ACT_HEARTBEAT),
            hb,
            self.timeout,
        )
        .await
    }
}

/// Room left for headers below the server's `max_payload` in an inline submission.
const HEADER_ROOM: usize = 64 * 1024;
/// Longest wait for the reply to an uploaded submission.
const UPLOAD_SUBMIT_TIMEOUT: Duration = Duration::from_secs(120);

/// Largest submission sent inline: the server's `max_payload` (1 MiB by default) less room for
/// headers.
fn inline_limit(nats: &async_nats::Client) -> usize {
    match nats.server_info().max_payload {
        0 => 1024 * 1024 - HEADER_ROOM,
        max => max.saturating_sub(HEADER_ROOM),
    }
}

/// Client of the workflow service (`<ns>.workflow.submit|submit_upload|run|get|cancel`).
#[derive(Clone)]
pub struct WorkflowClient {
    nats: async_nats::Client,
    names: Names,
    timeout: Duration,
}

impl WorkflowClient {
    pub fn new(nats: async_nats::Client, names: Names) -> Self {
        Self {
            nats,
            names,
            timeout: Duration::from_secs(30),
        }
    }

    /// Submits a workflow: in one `workflow.submit` request when it fits in a message, else
    /// through the uploads object store and `workflow.submit_upload` (docs/protocol.md).
    pub async fn submit(
        &self,
        spec: &crate::domain::dag::WorkflowSpec,
    ) -> Result<crate::protocol::workflows::Submitted, ClientError> {
        let subject = self.names.workflow_endpoint("submit");
        let body = serde_json::to_vec(spec).map_err(|e| ClientError::Transport {
            subject: subject.clone(),
            reason: e.to_string(),
        })?;
        if body.len() <= inline_limit(&self.nats) {
            return request_raw(&self.nats, subject, body.into(), self.timeout).await;
        }
        self.submit_upload(body).await
    }

    /// Puts a submission in the uploads object store and asks for it to be submitted.
    async fn submit_upload(
        &self,
        body: Vec<u8>,
    ) -> Result<crate::protocol::workflows::Submitted, ClientError> {
        let store = self.names.bucket(crate::bus::names::OBJECT_STORE_UPLOADS);
        let failed = |reason: String| ClientError::Transport {
            subject: format!("object store {store}"),
            reason,
        };
        let uploads = async_nats::jetstream::new(self.nats.clone())
            .get_object_store(&store)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let object = format!("submit-{}", uuid::Uuid::new_v4());
        uploads
            .put(object.as_str(), &mut body.as_slice())
            .await
            .map_err(|e| failed(e.to_string()))?;
        let ask = crate::protocol::workflows::SubmitUpload {
            v: crate::protocol::PROTOCOL_VERSION,
            object,
        };
        // A large workflow takes the control plane longer to validate and store.
        let timeout = self.timeout.max(UPLOAD_SUBMIT_TIMEOUT);
        request(
            &self.nats,
            self.names.workflow_endpoint("submit_upload"),
            &ask,
            timeout,
        )
        .await
    }

    pub async fn get(
        &self,
        workflow_id: crate::domain::WorkflowId,
    ) -> Result<crate::protocol::workflows::WorkflowView, ClientError> {
        self.view(workflow_id, true).await
    }

    /// The workflow with its task counts, and its tasks only if `include_tasks`.
    pub async fn view(
        &self,
        workflow_id: crate::domain::WorkflowId,
        include_tasks: bool,
    ) -> Result<crate::protocol::workflows::WorkflowView, ClientError> {
        let body = crate::protocol::workflows::WorkflowRef {
            v: None,
            workflow_id,
            include_tasks,
        };
        request(
            &self.nats,
            self.names.workflow_endpoint("get"),
            &body,
            self.timeout,
        )
        .await
    }

    pub async fn cancel(
        &self,
        workflow_id: crate::domain::WorkflowId,
    ) -> Result<crate::protocol::workflows::WorkflowView, ClientError> {
        let body = crate::protocol::workflows::WorkflowRef {
            v: None,
            workflow_id,
            include_tasks: true,
        };
        request(
            &self.nats,
            self.names.workflow_endpoint("cancel"),
            &body,
            self.timeout,
        )
        .await
    }

    /// Waits until the workflow finishes or `timeout` passes, then returns the final view with
    /// its tasks when they fit in a reply. It hears the workflow's end from its event and asks
    /// for its state (without task lists) once a second besides — a view costs the control
    /// plane a pass over the workflow's tasks, so it is not asked for more often.
    pub async fn wait(
        &self,
        workflow_id: crate::domain::WorkflowId,
        timeout: Duration,
    ) -> Result<crate::protocol::workflows::WorkflowView, ClientError> {
        self.wait_with(workflow_id, timeout, |_| {}).await
    }

    /// [`WorkflowClient::wait`], showing `progress` each state it reads before the end.
    pub async fn wait_with(
        &self,
        workflow_id: crate::domain::WorkflowId,
        timeout: Duration,
        mut progress: impl FnMut(&crate::protocol::workflows::WorkflowView),
    ) -> Result<crate::protocol::workflows::WorkflowView, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut ends = self.workflow_ends().await;
        loop {
            // A control plane restarting (none answers for a moment), or one whose database or
            // NATS is away for a while, is not the end: what it survives, waiting does.
            let waiting_on =
                |e: &ClientError| e.is_transient() && tokio::time::Instant::now() < deadline;
            let asked = tokio::time::Instant::now();
            let answer = self.view(workflow_id, false).await;
            // A view costs the database what it took (a fifth of a second for 100,000 tasks):
            // polls take at most a tenth of the time, whoever waits and however large.
            let pause = WAIT_POLL.max(asked.elapsed() * WAIT_POLL_COST);
            match answer {
                Ok(view)
                    if view.workflow.status.is_terminal()
                        || tokio::time::Instant::now() >= deadline =>
                {
                    match self.get(workflow_id).await {
                        Ok(whole) => return Ok(whole),
                        Err(ClientError::Remote(e)) if e.code == ErrorCode::TooLarge => {
                            return Ok(view);
                        }
                        Err(e) if waiting_on(&e) => {
                            tracing::debug!(error = %e, "the control plane is unavailable; waiting on");
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(view) => progress(&view),
                Err(e) if waiting_on(&e) => {
                    tracing::debug!(error = %e, "the control plane is unavailable; waiting on");
                }
                Err(e) => return Err(e),
            }
            let next_poll = (tokio::time::Instant::now() + pause).min(deadline);
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(next_poll) => break,
                    env = ends.next() => match env {
                        Some(msg) => {
                            let ended = serde_json::from_slice::<crate::protocol::Envelope>(&msg.payload)
                                .is_ok_and(|e| e.event.workflow().is_some_and(|w| w.workflow_id == workflow_id));
                            if ended {
                                break;
                            }
                        }
                        // Not subscribed (or the connection closed): the polls remain.
                        None => {
                            tokio::time::sleep_until(next_poll).await;
                            break;
                        }
                    },
                }
            }
        }
    }

    /// The events announcing that a workflow ended (any workflow); empty if they cannot be
    /// subscribed to.
    async fn workflow_ends(&self) -> futures::stream::BoxStream<'static, async_nats::Message> {
        let mut subs = Vec::new();
        for kind in [
            "workflow.completed",
            "workflow.failed",
            "workflow.cancelled",
        ] {
            if let Ok(sub) = self.nats.subscribe(self.names.event(kind)).await {
                subs.push(sub);
            }
        }
        futures::stream::select_all(subs).boxed()
    }
}

/// How often [`WorkflowClient::wait`] asks for a workflow's state besides hearing its end…
const WAIT_POLL: Duration = Duration::from_secs(1);
/// …at the most: it waits at least this many times as long as the last answer took.
const WAIT_POLL_COST: u32 = 10;
