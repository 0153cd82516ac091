//! Runs one hosted agent's tasks: pulls its dispatches (`<ns>.dispatch.<agent_id>`, durable
//! consumer `agent-<agent_id>`) only as fast as it has free slots, and for each one takes its
//! resource locks (reporting `started` once the attempt has gone on for 20 ms), runs the
//! executor under the task's timeout while extending the message's ack deadline and the locks'
//! leases, reports the outcome, releases the locks and only then acknowledges the dispatch — so
//! a worker killed at any point leaves the task to be redelivered or reclaimed, never lost.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::message::AckKind;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::executor::{Executors, TaskContext, TaskFailure};
use crate::bus::consume::dead_letter;
use crate::bus::kv_lock::{AcquireAll, HeldLock, LockManager, ResourceRequest};
use crate::bus::names::STREAM_DISPATCH;
use crate::protocol::locks::LockMode;
// The ack deadline the control plane gave the agent's consumer: extended every third of it
// while a task runs.
use crate::bus::provision::DISPATCH_ACK_WAIT;
use crate::bus::{BusError, Names};
use crate::domain::dag::ResourceMode;
use crate::domain::{AgentId, TaskId};
use crate::protocol::{Dispatch, Envelope, Event, Outcome, PROTOCOL_VERSION, TaskReport};

/// Largest report published (nats-server's default `max_payload` is 1 MiB).
const MAX_REPORT_BYTES: usize = 1_000_000;

/// An attempt still going after this long reports `started`; one that ends sooner reports only
/// its end (one message, one write, instead of two).
pub const STARTED_AFTER: Duration = Duration::from_millis(20);

/// The `started` report of an attempt, sent by a timer unless the attempt ends first.
struct StartedReport {
    not_yet: CancellationToken,
    handle: Option<tokio::task::JoinHandle<Result<(), BusError>>>,
    /// When the attempt began (its `started_at`, for an attempt that ends before reporting it).
    began: std::time::Instant,
}

impl StartedReport {
    /// Stops the timer if it has not fired, or waits until `started` is stored if it has (so
    /// it reaches the scheduler before what follows). Idempotent.
    async fn settle(&mut self) -> Result<(), BusError> {
        self.not_yet.cancel();
        match self.handle.take() {
            Some(handle) => handle.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Drop for StartedReport {
    fn drop(&mut self) {
        self.not_yet.cancel();
    }
}

/// The attempts an agent finished lately (reported and acknowledged), so that a redelivery of
/// one of their dispatches — its ack lost, say in a NATS failover — is acknowledged again rather
/// than run a second time. An attempt is dispatched once: a new dispatch raises it.
#[derive(Debug, Default)]
pub struct Finished {
    order: std::collections::VecDeque<(TaskId, i32)>,
    set: std::collections::HashSet<(TaskId, i32)>,
}

impl Finished {
    /// Attempts remembered; older ones are forgotten (their redeliveries, long after, are
    /// fenced by the scheduler anyway).
    pub const KEPT: usize = 4_096;

    pub fn contains(&self, task: TaskId, attempt: i32) -> bool {
        self.set.contains(&(task, attempt))
    }

    pub fn insert(&mut self, task: TaskId, attempt: i32) {
        if !self.set.insert((task, attempt)) {
            return;
        }
        self.order.push_back((task, attempt));
        if self.order.len() > Self::KEPT {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

/// How long a worker keeps sending a report that is not stored before it gives the dispatch
/// back for redelivery (well within the dispatch's 30 s ack wait).
const REPORT_RETRY_FOR: Duration = Duration::from_secs(15);

/// One agent's runner.
#[derive(Clone)]
pub struct AgentRunner {
    pub js: jetstream::Context,
    pub names: Names,
    pub agent_id: AgentId,
    pub agent_name: String,
    pub capacity: usize,
    /// Shared by all agents of the worker (its concurrency limit).
    pub worker_slots: Arc<Semaphore>,
    pub executors: Executors,
    pub locks: LockManager,
    pub lock_wait: Duration,
    /// Longest a task without `timeout_seconds` runs.
    pub default_timeout: Duration,
    /// Tasks running now (reported as load in heartbeats).
    pub load: Arc<AtomicI32>,
    /// Attempt and cancellation handle of each running task.
    pub running: Arc<Mutex<HashMap<TaskId, (i32, CancellationToken)>>>,
    /// Attempts this agent finished lately.
    pub finished: Arc<Mutex<Finished>>,
}

enum Ending {
    Finished(Outcome),
    /// Taken away (cancelled, or back to ready for another attempt): nothing to report.
    Cancelled,
    /// The executor asked to hand the task to another agent.
    HandOff(super::executor::HandoffAsk),
}

impl AgentRunner {
    /// Pulls and runs tasks until `stop_taking`; tasks still running when `hard_stop` fires are
    /// handed back (`released`).
    pub async fn run(
        self,
        stop_taking: CancellationToken,
        hard_stop: CancellationToken,
    ) -> Result<(), BusError> {
        let stream_name = self.names.stream(STREAM_DISPATCH);
        let consumer_name = self.names.dispatch_consumer(self.agent_id);
        let consumer = crate::bus::consume::bind(&self.js, &stream_name, &consumer_name).await?;
        let cancel_listener = tokio::spawn(
            self.clone()
                .listen_for_cancellations(stop_taking.clone(), hard_stop.clone()),
        );
        let agent_slots = Arc::new(Semaphore::new(self.capacity));
        let tracker = TaskTracker::new();
        loop {
            // Take a slot of this agent and one of the worker before pulling anything.
            let slot = tokio::select! {
                () = stop_taking.cancelled() => break,
                s = agent_slots.clone().acquire_owned() => s,
            };
            let Ok(mut slot) = slot else { break };
            let worker_slot = tokio::select! {
                () = stop_taking.cancelled() => break,
                s = self.worker_slots.clone().acquire_owned() => s,
            };
            let Ok(mut worker_slot) = worker_slot else {
                break;
            };
            // Pull as many as there are free slots (at least the one just taken).
            let extra = agent_slots
                .available_permits()
                .min(self.worker_slots.available_permits());
            if extra > 0 {
                if let Ok(more) = agent_slots.clone().try_acquire_many_owned(extra as u32) {
                    slot.merge(more);
                }
                if let Ok(more) = self
                    .worker_slots
                    .clone()
                    .try_acquire_many_owned(extra as u32)
                {
                    worker_slot.merge(more);
                }
            }
            let want = slot.num_permits().min(worker_slot.num_permits());
            let fetched = tokio::select! {
                () = stop_taking.cancelled() => break,
                b = consumer.fetch().max_messages(want).expires(Duration::from_secs(1)).messages() => b,
            };
            let mut batch = match fetched {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(agent = %self.agent_name, error = %e, "fetch failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            // A pull ends by its expiry; a consumer deleted meanwhile (the agent deregistered)
            // may never say so, hence the deadline.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            loop {
                let next = tokio::select! {
                    () = stop_taking.cancelled() => break,
                    n = tokio::time::timeout_at(deadline, batch.next()) => match n {
                        Ok(Some(n)) => n,
                        Ok(None) | Err(_) => break,
                    },
                };
                let msg = match next {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::debug!(error = %e, "fetch ended");
                        break;
                    }
                };
                // Each task carries one slot of each kind; they are returned when it ends.
                let (Some(task_slot), Some(task_worker_slot)) =
                    (slot.split(1), worker_slot.split(1))
                else {
                    let _ = msg.ack_with(AckKind::Nak(None)).await;
                    continue;
                };
                let runner = self.clone();
                let hard = hard_stop.clone();
                tracker.spawn(async move {
                    runner.handle(msg, hard).await;
                    drop((task_slot, task_worker_slot));
                });
            }
        }
        tracker.close();
        tracker.wait().await;
        cancel_listener.abort();
        Ok(())
    }

    /// Stops running tasks that were taken away: cancelled (`task.cancelled`), or put back to
    /// ready at or after this attempt (`task.ready` — handed off, or reclaimed from an agent
    /// presumed lost). A `task.ready` of an earlier attempt is stale and ignored.
    async fn listen_for_cancellations(self, stop: CancellationToken, hard: CancellationToken) {
        let nats = self.js.client();
        let mut subs = Vec::new();
        for kind in ["task.cancelled", "task.ready"] {
            match nats.subscribe(self.names.event(kind)).await {
                Ok(s) => subs.push(s),
                Err(e) => tracing::warn!(error = %e, "cannot watch for cancellations"),
            }
        }
        let mut events = futures::stream::select_all(subs);
        loop {
            let msg = tokio::select! {
                () = hard.cancelled() => break,
                () = stop.cancelled(), if self.load.load(Ordering::SeqCst) == 0 => break,
                m = events.next() => match m { Some(m) => m, None => break },
            };
            let Ok(env) = serde_json::from_slice::<Envelope>(&msg.payload) else {
                continue;
            };
            let (t, why, ready) = match env.event {
                Event::TaskCancelled(t) => (t, "cancelled by its workflow", false),
                Event::TaskReady(t) => (t, "taken back by the scheduler", true),
                _ => continue,
            };
            let running = self
                .running
                .lock()
                .ok()
                .and_then(|r| r.get(&t.task_id).cloned());
            if let Some((attempt, token)) = running {
                let stale = ready && t.attempt < attempt;
                if !stale {
                    tracing::info!(task.id = %t.task_id, attempt, reason = why, "stopping task");
                    token.cancel();
                }
            }
        }
    }

    /// Requests a handoff of the running task and releases it to wait for the decision.
    async fn ask_handoff(
        &self,
        d: &Dispatch,
        ask: super::executor::HandoffAsk,
    ) -> Result<crate::protocol::collaboration::Handoff, crate::client::ClientError> {
        let request = crate::protocol::collaboration::HandoffRequest {
            v: None,
            task_id: d.task_id,
            from_agent_id: self.agent_id,
            to_agent_id: ask.to_agent_id,
            capabilities: ask.capabilities,
            reason: ask.reason,
            context: ask.context,
            on_decline: "reschedule".into(),
            ttl_seconds: None,
            thread_id: None,
            release: true,
            attempt: Some(d.attempt),
        };
        crate::client::request(
            &self.js.client(),
            self.names
                .act(self.agent_id, crate::bus::names::ACT_HANDOFF),
            &request,
            Duration::from_secs(10),
        )
        .await
    }

    async fn report(
        &self,
        task_id: TaskId,
        attempt: i32,
        outcome: Outcome,
    ) -> Result<(), BusError> {
        let mut report = TaskReport {
            v: PROTOCOL_VERSION,
            task_id,
            attempt,
            agent_id: self.agent_id,
            outcome,
        };
        if let Some(reason) = report.make_storable() {
            tracing::warn!(task.id = %task_id, %reason, "output cannot be stored; reporting a failure");
        }
        let subject = self.names.result(self.agent_id, task_id);
        let encode = |r: &TaskReport| {
            serde_json::to_vec(r).map_err(|source| BusError::Encode {
                what: "report",
                source,
            })
        };
        let mut payload = encode(&report)?;
        if payload.len() > MAX_REPORT_BYTES {
            // An output that cannot travel fails the attempt instead of wedging the dispatch.
            let failed = TaskReport {
                outcome: Outcome::Failed {
                    error: format!(
                        "report of {} bytes exceeds the {MAX_REPORT_BYTES}-byte limit",
                        payload.len()
                    ),
                    exit_code: None,
                },
                ..report.clone()
            };
            payload = encode(&failed)?;
        }
        let payload = bytes::Bytes::from(payload);
        let id = format!("report:{task_id}:{attempt}:{}", report.outcome.name());
        // The message id makes a retry idempotent (the results stream drops a duplicate within
        // its window): a report whose store or acknowledgement was lost — a NATS server
        // restarting, a stream electing its leader — is sent again rather than the task run
        // again for want of it.
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            let sent = async {
                let msg = async_nats::jetstream::message::PublishMessage::build()
                    .payload(payload.clone())
                    .message_id(id.clone());
                let ack = self
                    .js
                    .send_publish(subject.clone(), msg)
                    .await
                    .map_err(|e| e.to_string())?;
                ack.await.map(|_| ()).map_err(|e| e.to_string())
            }
            .await;
            match sent {
                Ok(()) => return Ok(()),
                Err(reason) if started.elapsed() + pause > REPORT_RETRY_FOR => {
                    return Err(BusError::Publish { subject, reason });
                }
                Err(reason) => {
                    tracing::debug!(task.id = %task_id, %reason, "report not stored; sending it again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    #[tracing::instrument(skip_all, fields(agent = %self.agent_name))]
    async fn handle(&self, msg: jetstream::Message, hard_stop: CancellationToken) {
        let parsed = serde_json::from_slice::<Dispatch>(&msg.payload)
            .map_err(|e| format!("malformed dispatch: {e}"))
            .and_then(|d| {
                crate::protocol::check_version("dispatch", d.v)?;
                // Only what the scheduler addressed to this agent, on this agent's subject.
                if d.agent_id != self.agent_id
                    || *msg.subject != *self.names.dispatch(self.agent_id)
                {
                    return Err(format!(
                        "dispatch for agent {} on {} reached agent {}",
                        d.agent_id, msg.subject, self.agent_id
                    ));
                }
                Ok(d)
            });
        let dispatch: Dispatch = match parsed {
            Ok(d) => d,
            Err(reason) => {
                let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
                tracing::warn!(subject = %msg.subject, %reason, "dead-lettering dispatch");
                match dead_letter(
                    &self.js,
                    &self.names,
                    &msg.subject,
                    seq,
                    &msg.payload,
                    &reason,
                )
                .await
                {
                    Ok(()) => {
                        let _ = msg.ack_with(AckKind::Term).await;
                    }
                    Err(_) => {
                        let _ = msg
                            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                    }
                }
                return;
            }
        };
        let task_id = dispatch.task_id;
        let attempt = dispatch.attempt;
        let span =
            tracing::info_span!("task", task.id = %task_id, task.key = %dispatch.key, attempt);
        // Cancelled by a `task.cancelled` event; `hard_stop` is the worker stopping.
        let token = CancellationToken::new();
        if self
            .finished
            .lock()
            .is_ok_and(|f| f.contains(task_id, attempt))
        {
            // Already run and reported here; only the acknowledgement was lost.
            tracing::info!(task.id = %task_id, attempt, "redelivered dispatch of a finished attempt acknowledged, not run again");
            let _ = msg.ack().await;
            return;
        }
        {
            let Ok(mut running) = self.running.lock() else {
                return;
            };
            if running.contains_key(&task_id) {
                // A redelivery of what is already running here: the running copy will ack it.
                return;
            }
            running.insert(task_id, (attempt, token.clone()));
        }
        self.load.fetch_add(1, Ordering::SeqCst);
        let outcome = self
            .execute(&msg, dispatch, token, hard_stop)
            .instrument(span)
            .await;
        if let Ok(mut running) = self.running.lock() {
            running.remove(&task_id);
        }
        self.load.fetch_sub(1, Ordering::SeqCst);
        match outcome {
            Ok(()) => {
                if let Ok(mut finished) = self.finished.lock() {
                    finished.insert(task_id, attempt);
                }
                let _ = msg.ack().await;
            }
            Err(e) => {
                // The report could not be stored: let JetStream redeliver the dispatch.
                tracing::warn!(task.id = %task_id, error = %e, "could not report; dispatch will be redelivered");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }

    async fn execute(
        &self,
        msg: &jetstream::Message,
        d: Dispatch,
        cancelled: CancellationToken,
        hard_stop: CancellationToken,
    ) -> Result<(), BusError> {
        let (task_id, attempt) = (d.task_id, d.attempt);
        let mut started = self.report_started_soon(task_id, attempt);
        let owner = format!("{task_id}:{attempt}");
        let requests: Vec<ResourceRequest> = d
            .resources
            .iter()
            .map(|r| ResourceRequest {
                name: r.name.clone(),
                mode: match r.mode {
                    ResourceMode::Exclusive => LockMode::Exclusive,
                    ResourceMode::Shared => LockMode::Shared,
                },
            })
            .collect();
        let agent = self.agent_id.to_string();
        let lock_started = std::time::Instant::now();
        let held: Vec<HeldLock> = if requests.is_empty() {
            vec![]
        } else {
            match self
                .locks
                .acquire_all(&requests, &owner, Some(&agent), self.lock_wait)
                .await
            {
                Ok(AcquireAll::Acquired(held)) => held,
                Ok(AcquireAll::Blocked { resource, waited }) => {
                    let reason = format!("lock `{resource}` busy after {} ms", waited.as_millis());
                    tracing::info!(task.id = %task_id, %reason, "handing task back as blocked");
                    return self
                        .report_end(&mut started, task_id, attempt, Outcome::Blocked { reason })
                        .await;
                }
                Err(e) => {
                    let reason = format!("lock store error: {e}");
                    return self
                        .report_end(&mut started, task_id, attempt, Outcome::Blocked { reason })
                        .await;
                }
            }
        };
        let ctx = TaskContext {
            task_id,
            key: d.key.clone(),
            attempt,
            agent_name: self.agent_name.clone(),
            input: d.input.clone(),
            dependencies: d.dependencies.clone(),
            lock_tokens: held
                .iter()
                .map(|h| (h.name.clone(), h.revision))
                .collect::<BTreeMap<_, _>>(),
        };
        let lock_wait_ms =
            (!requests.is_empty()).then(|| lock_started.elapsed().as_millis() as u64);
        let mut ending = self
            .run_executor(msg, &d, ctx, &held, cancelled, hard_stop)
            .await;
        if let Ending::Finished(Outcome::Completed {
            lock_wait_ms: waited,
            running_ms,
            ..
        }) = &mut ending
        {
            *waited = lock_wait_ms;
            *running_ms = Some(started.began.elapsed().as_millis() as u64);
        }
        let result = match ending {
            Ending::Finished(outcome) => {
                self.report_end(&mut started, task_id, attempt, outcome)
                    .await
            }
            // Fenced off when the cancel or take-back was real (the task is no longer at this
            // attempt in a running state); puts the task back if the event was not.
            Ending::Cancelled => {
                let reason = "stopped: the task was cancelled or taken back".to_string();
                self.report_end(&mut started, task_id, attempt, Outcome::Released { reason })
                    .await
            }
            Ending::HandOff(ask) => self.hand_off(&mut started, &d, ask).await,
        };
        if !held.is_empty() {
            if let Err(e) = self.locks.release_all(&held, &owner).await {
                tracing::warn!(task.id = %task_id, error = %e, "could not release locks; they will expire");
            }
        }
        result
    }

    /// Asks for a handoff of the attempt; the task then waits for its decision (nothing more
    /// to report), or fails if the request did.
    async fn hand_off(
        &self,
        started: &mut StartedReport,
        d: &Dispatch,
        ask: super::executor::HandoffAsk,
    ) -> Result<(), BusError> {
        let (task_id, attempt) = (d.task_id, d.attempt);
        // Its `started` first: a handoff moves the attempt on, and that report would be late.
        started.settle().await?;
        match self.ask_handoff(d, ask).await {
            // The task now waits for the handoff's decision; nothing more to report.
            Ok(handoff) => {
                tracing::info!(task.id = %task_id, handoff.id = %handoff.id, "task handed off");
                Ok(())
            }
            Err(e) => {
                let error = format!("asked for a handoff, which failed: {e}");
                let failed = Outcome::Failed {
                    error,
                    exit_code: None,
                };
                self.report_end(started, task_id, attempt, failed).await
            }
        }
    }

    /// Reports `started` once the attempt has gone on for [`STARTED_AFTER`]: a task that ends
    /// sooner reports once (the scheduler moves it from `assigned` to its end directly).
    fn report_started_soon(&self, task_id: TaskId, attempt: i32) -> StartedReport {
        let not_yet = CancellationToken::new();
        let runner = self.clone();
        let cancelled = not_yet.clone();
        let began = std::time::Instant::now();
        let handle = tokio::spawn(async move {
            tokio::select! {
                () = cancelled.cancelled() => Ok(()),
                () = tokio::time::sleep(STARTED_AFTER) => {
                    let running_ms = Some(began.elapsed().as_millis() as u64);
                    runner.report(task_id, attempt, Outcome::Started { running_ms }).await
                }
            }
        });
        StartedReport {
            not_yet,
            handle: Some(handle),
            began,
        }
    }

    /// The attempt's end report, after its `started` if that went.
    async fn report_end(
        &self,
        started: &mut StartedReport,
        task_id: TaskId,
        attempt: i32,
        outcome: Outcome,
    ) -> Result<(), BusError> {
        started.settle().await?;
        self.report(task_id, attempt, outcome).await
    }

    async fn run_executor(
        &self,
        msg: &jetstream::Message,
        d: &Dispatch,
        ctx: TaskContext,
        held: &[HeldLock],
        cancelled: CancellationToken,
        hard_stop: CancellationToken,
    ) -> Ending {
        let owner = format!("{}:{}", d.task_id, d.attempt);
        let Some(executor) = self.executors.get(&d.executor) else {
            return Ending::Finished(Outcome::Failed {
                error: format!("agent {} has no executor `{}`", self.agent_name, d.executor),
                exit_code: None,
            });
        };
        let timeout = d
            .timeout_seconds
            .map(|s| Duration::from_secs(s.max(1) as u64))
            .unwrap_or(self.default_timeout);
        let work = tokio::time::timeout(timeout, executor.run(ctx));
        tokio::pin!(work);
        let keepalive_period = (DISPATCH_ACK_WAIT / 3).min(self.locks.lease() / 3);
        let mut keepalive = tokio::time::interval_at(
            tokio::time::Instant::now() + keepalive_period,
            keepalive_period,
        );
        loop {
            tokio::select! {
                result = &mut work => {
                    return Ending::Finished(match result {
                        Ok(Ok(output)) => Outcome::Completed {
                            output,
                            lock_wait_ms: None,
                            running_ms: None,
                        },
                        Ok(Err(TaskFailure { handoff: Some(ask), .. })) => return Ending::HandOff(ask),
                        Ok(Err(TaskFailure { message, exit_code, .. })) => Outcome::Failed { error: message, exit_code },
                        Err(_) => Outcome::Failed { error: format!("timed out after {} s", timeout.as_secs()), exit_code: None },
                    });
                }
                () = cancelled.cancelled() => return Ending::Cancelled,
                () = hard_stop.cancelled() => {
                    return Ending::Finished(Outcome::Released { reason: "worker shutting down".into() });
                }
                _ = keepalive.tick() => {
                    let _ = msg.ack_with(AckKind::Progress).await;
                    if !held.is_empty() {
                        if let Err(e) = self.locks.renew(held, &owner).await {
                            tracing::warn!(task.id = %d.task_id, error = %e, "lock lost; abandoning the attempt");
                            return Ending::Finished(Outcome::Failed { error: format!("lock lost: {e}"), exit_code: None });
                        }
                    }
                }
            }
        }
    }
}
