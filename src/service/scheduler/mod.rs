//! The scheduler — run only by the control plane holding the `scheduler` lease. Two loops:
//!
//! * **reports**: drains `<ns>_results` (workers' `started/completed/failed/blocked/released`
//!   reports), applies each batch with set-based, attempt-fenced statements, promotes the
//!   dependants that became ready, applies failure policies and finishes workflows;
//! * **dispatch**: woken by new work or freed capacity (never a polling sleep on that path; a
//!   250 ms tick only serves retries, timeouts, sync deadlines and lost agents), it runs the
//!   ready coordination nodes itself (nodes.rs), then assigns ready tasks in fair order to
//!   best-fit agents with free capacity — one transaction per batch — and publishes the batch
//!   to `<ns>.dispatch.<agent_id>`.
//!
//! Fairness: ready tasks are taken round-robin across workflows (every workflow's first ready
//! task, then every workflow's second, …); within a workflow by priority, then readiness time.

use std::collections::{BTreeSet, HashMap};
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use sqlx::PgPool;
use std::sync::Mutex;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

mod nodes;

pub use nodes::sync_created;

use super::ServiceError;
use super::workflows::{task_events, workflow_event};
use crate::bus::names::{CONSUMER_SCHEDULER, STREAM_DISPATCH, STREAM_RESULTS};
use crate::bus::{EventBus, Names, TypedConsumer};
use crate::db::agents::AgentRecord;
use crate::db::tasks::{self, TaskRecord};
use crate::db::{DbError, scheduling};
use crate::domain::dag::{ResourceSpec, resolve_input};
use crate::domain::matching::{Requirements, rank};
use crate::domain::{AgentId, RetryPolicy, TaskStatus, WorkflowId};
use crate::protocol::{Dispatch, Outcome, PROTOCOL_VERSION, TaskReport};
use crate::service::registry::snapshot;

/// Ready tasks considered per dispatch round.
const DISPATCH_BATCH: i64 = 2_000;
/// Reports applied per batch.
const REPORT_BATCH: usize = 1_000;
/// How often the leader repairs state an interrupted step may have left.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);
/// How long a lock-blocked task waits before it is dispatched again.
const BLOCKED_REQUEUE_MS: i64 = 1_000;

/// Tunables of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub retry: RetryPolicy,
    /// Heartbeat freshness window used in ranking.
    pub stale_after_ms: i64,
    /// An assigned task not started within this time is dispatched again.
    pub start_timeout_ms: i64,
    /// Period of the maintenance tick (retries due, timeouts, lost agents).
    pub tick: Duration,
}

#[derive(Clone)]
pub struct Scheduler {
    pool: PgPool,
    bus: EventBus,
    js: jetstream::Context,
    names: Names,
    config: SchedulerConfig,
    wake: Arc<Notify>,
    /// Each running workflow's dependency graph (key → dependants), built from PostgreSQL
    /// when first needed after this instance became leader; dropped when the workflow ends.
    graphs: Arc<Mutex<HashMap<WorkflowId, Arc<Dependants>>>>,
}

/// One workflow's graph: task ids by key and the keys that depend on each key.
#[derive(Debug, Default)]
pub struct Dependants {
    /// Node of each key.
    index: HashMap<String, usize>,
    /// Task id of each node.
    ids: Vec<crate::domain::TaskId>,
    /// Edges dependency → dependant.
    graph: petgraph::graphmap::DiGraphMap<usize, ()>,
}

impl Dependants {
    fn build(
        tasks: impl IntoIterator<Item = (crate::domain::TaskId, String, Vec<String>)>,
    ) -> Self {
        let mut d = Dependants::default();
        let tasks: Vec<_> = tasks.into_iter().collect();
        for (i, (id, key, _)) in tasks.iter().enumerate() {
            d.ids.push(*id);
            d.index.insert(key.clone(), i);
            d.graph.add_node(i);
        }
        for (i, (_, _, deps)) in tasks.iter().enumerate() {
            for dep in deps {
                if let Some(&j) = d.index.get(dep) {
                    d.graph.add_edge(j, i, ());
                }
            }
        }
        d
    }

    /// Whether the graph has a task keyed `key` (one a split or loop inserted after the graph
    /// was built does not).
    fn knows(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// Ids of the tasks that depend directly on `key`.
    fn of(&self, key: &str) -> Vec<crate::domain::TaskId> {
        let Some(&node) = self.index.get(key) else {
            return Vec::new();
        };
        self.graph.neighbors(node).map(|n| self.ids[n]).collect()
    }
}

fn db(e: DbError) -> ServiceError {
    ServiceError::from(e)
}

impl Scheduler {
    pub fn new(pool: PgPool, bus: EventBus, config: SchedulerConfig, wake: Arc<Notify>) -> Self {
        let js = bus.jetstream().clone();
        let names = bus.names().clone();
        Self {
            pool,
            bus,
            js,
            names,
            config,
            wake,
            graphs: Default::default(),
        }
    }

    /// The dependants index of a workflow, loaded once per leadership.
    async fn dependants(&self, workflow: WorkflowId) -> Result<Arc<Dependants>, ServiceError> {
        if let Some(g) = self
            .graphs
            .lock()
            .ok()
            .and_then(|g| g.get(&workflow).cloned())
        {
            return Ok(g);
        }
        let edges = scheduling::graph_edges(&self.pool, &[workflow])
            .await
            .map_err(db)?;
        let graph = Arc::new(Dependants::build(
            edges.into_iter().map(|(_, id, key, deps)| (id, key, deps)),
        ));
        if let Ok(mut g) = self.graphs.lock() {
            g.insert(workflow, graph.clone());
        }
        Ok(graph)
    }

    /// Repairs what a crash between two statements could leave behind: pending tasks whose
    /// dependencies all completed, and running workflows with nothing left to run. Run when
    /// leadership is gained and every few seconds after.
    async fn reconcile(&self) -> Result<(), ServiceError> {
        let running = scheduling::running_workflows(&self.pool)
            .await
            .map_err(db)?;
        if running.is_empty() {
            return Ok(());
        }
        let promoted = scheduling::promote_unblocked(&self.pool, &running)
            .await
            .map_err(db)?;
        let finished = scheduling::finish_workflows(&self.pool, &running)
            .await
            .map_err(db)?;
        if !promoted.is_empty() || !finished.is_empty() {
            tracing::warn!(
                promoted = promoted.len(),
                finished = finished.len(),
                "reconciled state left by an interrupted step"
            );
            let mut events = task_events(&promoted);
            events.extend(finished.iter().map(workflow_event));
            self.bus.publish_all(events).await?;
        }
        Ok(())
    }

    /// Runs both loops while `leader` is true, until `cancel`.
    pub async fn run(self, leader: watch::Receiver<bool>, cancel: CancellationToken) {
        let reports = tokio::spawn(self.clone().reports_loop(leader.clone(), cancel.clone()));
        let wakeups = tokio::spawn(self.clone().remote_wakeups(cancel.clone()));
        self.dispatch_loop(leader, cancel).await;
        let _ = reports.await;
        let _ = wakeups.await;
    }

    /// Other control planes accept submissions and registrations too: their events wake us.
    async fn remote_wakeups(self, cancel: CancellationToken) {
        let nats = self.js.client();
        let subjects = [
            "workflow.created",
            "agent.registered",
            "agent.status.changed",
            "task.ready",
        ];
        let mut subs = Vec::new();
        for s in subjects {
            match nats.subscribe(self.names.event(s)).await {
                Ok(sub) => subs.push(sub),
                Err(e) => tracing::warn!(error = %e, "cannot subscribe to wake-up events"),
            }
        }
        let mut all = futures::stream::select_all(subs);
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                msg = all.next() => match msg {
                    Some(_) => self.wake.notify_one(),
                    None => break,
                },
            }
        }
    }

    async fn dispatch_loop(self, mut leader: watch::Receiver<bool>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reconcile: Option<tokio::time::Instant> = None;
        loop {
            let maintenance = tokio::select! {
                () = cancel.cancelled() => break,
                _ = leader.changed() => {
                    // A new term: graphs are rebuilt from PostgreSQL, state reconciled at once.
                    if let Ok(mut g) = self.graphs.lock() {
                        g.clear();
                    }
                    last_reconcile = None;
                    true
                }
                _ = tick.tick() => true,
                () = self.wake.notified() => false,
            };
            if !*leader.borrow() {
                continue;
            }
            if last_reconcile.is_none_or(|t| t.elapsed() >= RECONCILE_EVERY) {
                match self.reconcile().await {
                    Ok(()) => last_reconcile = Some(tokio::time::Instant::now()),
                    Err(e) => tracing::warn!(error = %e, "reconciliation failed; will retry"),
                }
            }
            if maintenance {
                if let Err(e) = self.maintain().await {
                    tracing::warn!(error = %e, "scheduler maintenance failed; will retry");
                }
            }
            loop {
                match self.dispatch_once().await {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "dispatch failed; will retry");
                        break;
                    }
                }
            }
        }
    }

    /// Retries that are due, tasks of lost agents, timeouts and dispatches never started.
    async fn maintain(&self) -> Result<(), ServiceError> {
        let mut events = Vec::new();
        let due = scheduling::promote_due_retries(&self.pool)
            .await
            .map_err(db)?;
        events.extend(task_events(&due));

        let reclaimed = scheduling::reclaim_from_lost_agents(&self.pool)
            .await
            .map_err(db)?;
        let lost: BTreeSet<AgentId> = reclaimed.iter().map(|(_, a)| *a).collect();
        for agent in &lost {
            // A lost agent that comes back must not run what was taken from it.
            if let Ok(stream) = self.js.get_stream(self.names.stream(STREAM_DISPATCH)).await {
                let _ = stream.purge().filter(self.names.dispatch(*agent)).await;
            }
        }
        for (task, agent) in &reclaimed {
            tracing::warn!(task.id = %task.id, agent.id = %agent, attempt = task.attempt, "agent lost; task will be dispatched again");
        }
        events.extend(task_events(reclaimed.iter().map(|(t, _)| t)));

        let (timed_out, never_started) =
            scheduling::overdue(&self.pool, self.config.start_timeout_ms)
                .await
                .map_err(db)?;
        let mut failed = Vec::new();
        for t in timed_out {
            let error = format!(
                "timed out after {} s",
                t.timeout_seconds.unwrap_or_default()
            );
            match tasks::record_failure(&self.pool, &t, &error, &self.config.retry).await {
                Ok(after) => {
                    tracing::warn!(task.id = %t.id, attempt = t.attempt, "task timed out");
                    events.extend(task_events([&after]));
                    failed.push(after);
                }
                Err(DbError::Conflict { .. }) => {}
                Err(e) => return Err(db(e)),
            }
        }
        let (released, expired) = self.expire_syncs().await?;
        if !released.is_empty() {
            // Released sync points are ready nodes: the dispatch loop runs them next.
            self.wake.notify_one();
        }
        events.extend(task_events(&released));
        events.extend(task_events(&expired));
        failed.extend(expired);
        let stuck: Vec<_> = never_started
            .iter()
            .map(|t| scheduling::Fence {
                task: t.id,
                attempt: t.attempt,
                agent: None,
            })
            .collect();
        if !stuck.is_empty() {
            let requeued =
                scheduling::requeue(&self.pool, &stuck, 0, "dispatch not started in time")
                    .await
                    .map_err(db)?;
            events.extend(task_events(&requeued));
        }
        events.extend(self.settle(&[], &failed).await?);
        if !events.is_empty() {
            self.bus.publish_all(events).await?;
        }
        Ok(())
    }

    /// One dispatch round; returns how many tasks were dispatched.
    #[tracing::instrument(skip_all, level = "debug")]
    pub async fn dispatch_once(&self) -> Result<usize, ServiceError> {
        let ready = scheduling::ready_fair(&self.pool, DISPATCH_BATCH)
            .await
            .map_err(db)?;
        metrics::gauge!("omoi_scheduler_ready_tasks").set(ready.len() as f64);
        // Coordination nodes come in the same read (no extra query per round): the leader runs
        // them itself; what they complete or insert is dispatched in the next round.
        let (nodes, ready): (Vec<TaskRecord>, Vec<TaskRecord>) = ready
            .into_iter()
            .partition(|t| t.kind != crate::domain::coordination::NodeKind::Task);
        if !nodes.is_empty() {
            return self.run_nodes(&nodes).await;
        }
        if ready.is_empty() {
            return Ok(0);
        }
        let agents: Vec<AgentRecord> = sqlx::query_as(
            "SELECT * FROM agents WHERE status IN ('idle', 'running', 'degraded')
               AND health_status = 'healthy'",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db(e.into()))?;
        if agents.is_empty() {
            return Ok(0);
        }
        let in_flight = scheduling::in_flight(&self.pool).await.map_err(db)?;
        let mut snapshots: Vec<_> = agents.iter().map(snapshot).collect();
        for s in &mut snapshots {
            // Capacity is checked against what the scheduler itself has handed out.
            s.load = in_flight.get(&s.id).copied().unwrap_or(0);
        }
        let now = chrono::Utc::now();
        let mut pairs = Vec::new();
        let mut free_total: i32 = snapshots.iter().map(|s| s.free_capacity()).sum();
        for task in &ready {
            if free_total == 0 {
                break;
            }
            let req = Requirements {
                capabilities: task.capabilities.clone(),
                executor: Some(task.executor.clone()),
                ..Requirements::default()
            };
            // A task handed off to an agent waits for that agent only.
            let choice = match task.pinned_agent_id {
                Some(pin) => snapshots.iter().position(|s| {
                    s.id == pin
                        && s.is_available()
                        && crate::domain::agent::offers(s.executors, &task.executor)
                }),
                None => rank(&snapshots, &req, now, self.config.stale_after_ms)
                    .first()
                    .map(|r| r.index),
            };
            if let Some(index) = choice {
                let chosen = &mut snapshots[index];
                chosen.load += 1;
                chosen.last_assigned_at =
                    Some(now + chrono::Duration::microseconds(pairs.len() as i64));
                free_total -= 1;
                pairs.push((task.id, chosen.id));
            }
        }
        if pairs.is_empty() {
            return Ok(0);
        }
        let assigned = scheduling::assign(&self.pool, &pairs).await.map_err(db)?;
        metrics::histogram!("omoi_scheduler_dispatch_batch").record(assigned.len() as f64);
        tracing::debug!(
            batch = assigned.len(),
            backlog = ready.len(),
            "scheduler.ready_tasks"
        );
        self.publish_dispatches(&assigned).await?;
        self.bus.publish_all(task_events(&assigned)).await?;
        Ok(assigned.len())
    }

    async fn publish_dispatches(&self, assigned: &[TaskRecord]) -> Result<(), ServiceError> {
        let ids: Vec<_> = assigned.iter().map(|t| t.id).collect();
        let outputs = scheduling::dependency_outputs(&self.pool, &ids)
            .await
            .map_err(db)?;
        let mut acks = Vec::with_capacity(assigned.len());
        let mut failed = Vec::new();
        let mut undeliverable = Vec::new();
        for t in assigned {
            let Some(agent_id) = t.agent_id else { continue };
            let dependencies = outputs.get(&t.id).cloned().unwrap_or_default();
            let mut dispatch = Dispatch {
                v: PROTOCOL_VERSION,
                task_id: t.id,
                workflow_id: t.workflow_id,
                key: t.key.clone(),
                attempt: t.attempt,
                agent_id,
                executor: t.executor.clone(),
                input: resolve_input(&t.input, &dependencies),
                dependencies,
                dependencies_omitted: false,
                resources: serde_json::from_value::<Vec<ResourceSpec>>(t.resources.clone())
                    .unwrap_or_default(),
                timeout_seconds: t.timeout_seconds,
            };
            let encode = |d: &Dispatch| {
                serde_json::to_vec(d).map_err(|e| ServiceError::Internal(e.to_string()))
            };
            let mut payload = encode(&dispatch)?;
            if payload.len() > MAX_DISPATCH_BYTES && !dispatch.dependencies.is_empty() {
                // The whole outputs (say, of a wide split) do not fit: send the input, which
                // carries what the task asked for by reference, without them.
                dispatch.dependencies.clear();
                dispatch.dependencies_omitted = true;
                payload = encode(&dispatch)?;
                tracing::info!(task.id = %t.id, "dependency outputs left out of a dispatch too large for them");
            }
            if let Err(reason) = check_dispatch(&payload) {
                undeliverable.push((t, reason));
                continue;
            }
            let msg = PublishMessage::build()
                .payload(payload.into())
                .message_id(format!("dispatch:{}:{}", t.id, t.attempt));
            match self
                .js
                .send_publish(self.names.dispatch(agent_id), msg)
                .await
            {
                Ok(ack) => acks.push((t.id, t.attempt, ack.into_future())),
                Err(e) => {
                    tracing::warn!(task.id = %t.id, error = %e, "dispatch publish failed");
                    failed.push((t.id, t.attempt));
                }
            }
            // Await acks per chunk: each pending ack holds an in-flight permit of the context.
            if acks.len() >= crate::bus::events::PUBLISH_CHUNK {
                for (id, attempt, ack) in acks.drain(..) {
                    if let Err(e) = ack.await {
                        tracing::warn!(task.id = %id, error = %e, "dispatch not stored");
                        failed.push((id, attempt));
                    }
                }
            }
        }
        for (id, attempt, ack) in acks {
            if let Err(e) = ack.await {
                tracing::warn!(task.id = %id, error = %e, "dispatch not stored");
                failed.push((id, attempt));
            }
        }
        if !failed.is_empty() {
            let back = scheduling::unassign(&self.pool, &failed)
                .await
                .map_err(db)?;
            self.bus.publish_all(task_events(&back)).await?;
        }
        // A dispatch no worker could read fails its task for good (retrying cannot help).
        let mut gave_up = Vec::new();
        for (t, reason) in undeliverable {
            tracing::warn!(task.id = %t.id, %reason, "task cannot be dispatched");
            let change = tasks::TaskChange {
                error: Some(Some(reason)),
                expected_attempt: Some(t.attempt),
                ..tasks::TaskChange::default()
            };
            match tasks::transition(
                &self.pool,
                t.id,
                TaskStatus::Assigned,
                TaskStatus::Failed,
                change,
            )
            .await
            {
                Ok(after) => gave_up.push(after),
                Err(DbError::Conflict { .. }) => {}
                Err(e) => return Err(db(e)),
            }
        }
        if !gave_up.is_empty() {
            let mut events = task_events(&gave_up);
            events.extend(self.settle(&[], &gave_up).await?);
            self.bus.publish_all(events).await?;
        }
        Ok(())
    }

    async fn reports_loop(self, mut leader: watch::Receiver<bool>, cancel: CancellationToken) {
        loop {
            // Wait to lead.
            while !*leader.borrow() {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    r = leader.changed() => if r.is_err() { return },
                }
            }
            let mut reports = match self.open_reports().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot consume reports; retrying");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            while *leader.borrow() {
                let first = tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = leader.changed() => break,
                    d = reports.next() => d,
                };
                let Some(first) = first else { break };
                let mut batch = Vec::new();
                match first {
                    Ok(d) => batch.push(d),
                    Err(e) => {
                        tracing::warn!(error = %e, "report consumer error");
                        continue;
                    }
                }
                while batch.len() < REPORT_BATCH {
                    // Whatever has already arrived joins the batch; nothing waits for more.
                    match tokio::time::timeout(Duration::ZERO, reports.next()).await {
                        Ok(Some(Ok(d))) => batch.push(d),
                        _ => break,
                    }
                }
                self.apply_batch(batch).await;
            }
        }
    }

    /// Applies a batch of deliveries in one go; if that fails for a reason other than the
    /// database or NATS being unavailable, applies them one by one, so one report the database
    /// refuses is dead-lettered with the reason and never holds back the others.
    async fn apply_batch(&self, mut batch: Vec<crate::bus::Delivery<TaskReport>>) {
        // An output PostgreSQL cannot store fails its attempt; the report as sent is kept.
        for d in &mut batch {
            if let Some(reason) = d.value.make_storable() {
                tracing::warn!(task.id = %d.value.task_id, %reason, "report output refused");
                let kept = crate::bus::consume::dead_letter(
                    self.bus.jetstream(),
                    &self.names,
                    &d.subject,
                    d.stream_sequence,
                    &d.payload,
                    &reason,
                )
                .await;
                if let Err(e) = kept {
                    tracing::warn!(error = %e, "could not dead-letter the refused report");
                }
            }
        }
        let values: Vec<TaskReport> = batch.iter().map(|d| d.value.clone()).collect();
        match self.apply_reports(&values).await {
            Ok(()) => {
                for d in batch {
                    let _ = d.ack().await;
                }
                self.wake.notify_one();
                return;
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, count = batch.len(), "could not apply reports; they will be redelivered");
                for d in batch {
                    let _ = d.nak(Some(Duration::from_millis(500))).await;
                }
                return;
            }
            Err(e) if batch.len() == 1 => {
                let reason = format!("report refused: {}", e.summary());
                for d in batch {
                    let _ = d.dead_letter(&reason).await;
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, count = batch.len(), "a report batch was refused; applying its reports one by one");
            }
        }
        for d in batch {
            match self.apply_reports(std::slice::from_ref(&d.value)).await {
                Ok(()) => {
                    let _ = d.ack().await;
                }
                Err(e) if e.is_transient() => {
                    let _ = d.nak(Some(Duration::from_millis(500))).await;
                }
                Err(e) => {
                    let reason = format!("report refused: {}", e.summary());
                    let _ = d.dead_letter(&reason).await;
                }
            }
        }
        self.wake.notify_one();
    }

    async fn open_reports(&self) -> Result<TypedConsumer<TaskReport>, ServiceError> {
        let stream_name = self.names.stream(STREAM_RESULTS);
        let err = |e: String| ServiceError::Internal(format!("{stream_name}: {e}"));
        let stream = self
            .js
            .get_stream(&stream_name)
            .await
            .map_err(|e| err(e.to_string()))?;
        let consumer = stream
            .get_or_create_consumer(
                CONSUMER_SCHEDULER,
                consumer::pull::Config {
                    durable_name: Some(CONSUMER_SCHEDULER.into()),
                    description: Some("omoi scheduler: applies workers' task reports".into()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    // Short, so a new leader gets a dead leader's unacknowledged reports soon.
                    ack_wait: Duration::from_secs(5),
                    max_ack_pending: 20_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| err(e.to_string()))?;
        let messages = consumer.messages().await.map_err(|e| err(e.to_string()))?;
        Ok(
            TypedConsumer::new(messages, self.js.clone(), self.names.clone())
                .with_check(check_report),
        )
    }

    /// Applies a batch of reports. Reports for an attempt that is no longer current (a worker
    /// presumed dead, a task handed to someone else) are ignored and logged.
    pub async fn apply_reports(&self, reports: &[TaskReport]) -> Result<(), ServiceError> {
        let mut started = Vec::new();
        let mut completed = Vec::new();
        let mut blocked = Vec::new();
        let mut released = Vec::new();
        let mut failures = Vec::new();
        // Every statement applies a report only to the attempt it names, held by the agent
        // that sent it.
        for r in reports {
            let fence = scheduling::Fence {
                task: r.task_id,
                attempt: r.attempt,
                agent: Some(r.agent_id),
            };
            match &r.outcome {
                Outcome::Started => started.push(fence),
                Outcome::Completed {
                    output,
                    lock_wait_ms,
                } => completed.push((fence, output.clone(), *lock_wait_ms)),
                Outcome::Blocked { .. } => blocked.push(fence),
                Outcome::Released { .. } => released.push(fence),
                Outcome::Failed { error, exit_code } => {
                    let error = match exit_code {
                        Some(code) => format!("{error} (exit code {code})"),
                        None => error.clone(),
                    };
                    failures.push((r.task_id, r.attempt, r.agent_id, error));
                }
            }
        }
        let mut events = Vec::new();
        let mut applied = 0usize;
        let s = scheduling::mark_started(&self.pool, &started)
            .await
            .map_err(db)?;
        applied += s.len();
        events.extend(task_events(&s));
        let done = scheduling::mark_completed(&self.pool, &completed)
            .await
            .map_err(db)?;
        applied += done.len();
        events.extend(task_events(&done));
        let b = scheduling::requeue(
            &self.pool,
            &blocked,
            BLOCKED_REQUEUE_MS,
            "resource lock busy",
        )
        .await
        .map_err(db)?;
        applied += b.len();
        events.extend(task_events(&b));
        let rel = scheduling::requeue(&self.pool, &released, 0, "released by its agent")
            .await
            .map_err(db)?;
        applied += rel.len();
        events.extend(task_events(&rel));
        let mut failed = Vec::new();
        for (id, attempt, agent, error) in failures {
            let current = match tasks::get(&self.pool, id).await {
                Ok(t) => t,
                Err(DbError::NotFound { .. }) => continue,
                Err(e) => return Err(db(e)),
            };
            if current.attempt != attempt
                || !current.status.occupies_agent()
                || current.agent_id != Some(agent)
            {
                continue;
            }
            match tasks::record_failure(&self.pool, &current, &error, &self.config.retry).await {
                Ok(after) => {
                    applied += 1;
                    events.extend(task_events([&after]));
                    failed.push(after);
                }
                Err(DbError::Conflict { .. }) => {}
                Err(e) => return Err(db(e)),
            }
        }
        let ignored = reports.len() - applied;
        if ignored > 0 {
            // Late or duplicate reports: fenced off by attempt (or already applied).
            metrics::counter!("omoi_scheduler_reports_ignored_total").increment(ignored as u64);
            tracing::info!(
                ignored,
                "reports for attempts that are no longer current were ignored"
            );
        }
        events.extend(self.settle(&done, &failed).await?);
        if !events.is_empty() {
            self.bus.publish_all(events).await?;
        }
        Ok(())
    }

    /// After completions and failures: promote unblocked dependants, apply failure policies,
    /// and finish workflows that have nothing left to run. Returns the events to publish.
    async fn settle(
        &self,
        done: &[TaskRecord],
        failed: &[TaskRecord],
    ) -> Result<Vec<crate::domain::Event>, ServiceError> {
        let mut events = Vec::new();
        let mut touched: BTreeSet<WorkflowId> = done.iter().map(|t| t.workflow_id).collect();
        // Only the direct dependants of what completed can have become ready.
        let mut candidates = Vec::new();
        for t in done {
            let mut graph = self.dependants(t.workflow_id).await?;
            if !graph.knows(&t.key) {
                // Inserted by a split or loop after this graph was loaded: load it again.
                if let Ok(mut g) = self.graphs.lock() {
                    g.remove(&t.workflow_id);
                }
                graph = self.dependants(t.workflow_id).await?;
            }
            candidates.extend(graph.of(&t.key));
        }
        let promoted = scheduling::promote_candidates(&self.pool, &candidates)
            .await
            .map_err(db)?;
        events.extend(task_events(&promoted));
        let mut policies: HashMap<WorkflowId, String> = HashMap::new();
        for t in failed.iter().filter(|t| t.status == TaskStatus::Failed) {
            touched.insert(t.workflow_id);
            if let std::collections::hash_map::Entry::Vacant(slot) = policies.entry(t.workflow_id) {
                let policy: String =
                    sqlx::query_scalar("SELECT failure_policy FROM workflows WHERE id = $1")
                        .bind(t.workflow_id)
                        .fetch_one(&self.pool)
                        .await
                        .map_err(|e| db(e.into()))?;
                slot.insert(policy);
            }
            let affected = if policies.get(&t.workflow_id).map(String::as_str) == Some("continue") {
                scheduling::fail_dependants(&self.pool, t.workflow_id, &t.key)
                    .await
                    .map_err(db)?
            } else if !scheduling::failure_is_fatal(&self.pool, t.workflow_id, &t.key)
                .await
                .map_err(db)?
            {
                // A quorum join that can still be met absorbs the failure.
                tracing::info!(task.id = %t.id, key = %t.key, "failure tolerated by a quorum join");
                Vec::new()
            } else {
                scheduling::cancel_unfinished(
                    &self.pool,
                    t.workflow_id,
                    &format!("workflow failed: task {} failed", t.key),
                )
                .await
                .map_err(db)?
            };
            events.extend(task_events(&affected));
        }
        if !touched.is_empty() {
            let ids: Vec<WorkflowId> = touched.into_iter().collect();
            let finished = scheduling::finish_workflows(&self.pool, &ids)
                .await
                .map_err(db)?;
            for w in &finished {
                tracing::info!(workflow.id = %w.id, status = %w.status, "workflow finished");
                if let Ok(mut g) = self.graphs.lock() {
                    g.remove(&w.id);
                }
            }
            events.extend(finished.iter().map(workflow_event));
        }
        Ok(events)
    }
}

/// A report must be of this protocol version, and sent on `<ns>.result.<agent_id>.<task_id>`
/// for its own agent and task: the subject is what the NATS server's permissions tie to the
/// sender, so a report naming another agent than its subject's is a forgery.
fn check_report(subject: &str, r: &TaskReport) -> Result<(), String> {
    crate::protocol::check_version("report", r.v)?;
    let mut tokens = subject.rsplit('.');
    let (task, agent) = (tokens.next(), tokens.next());
    if agent != Some(r.agent_id.to_string().as_str())
        || task != Some(r.task_id.to_string().as_str())
    {
        return Err(format!(
            "a report by agent {} on task {} sent on {subject}: the subject must be <ns>.result.<agent_id>.<task_id> of the report",
            r.agent_id, r.task_id
        ));
    }
    Ok(())
}

/// Largest dispatch published (nats-server's default `max_payload` is 1 MiB).
pub const MAX_DISPATCH_BYTES: usize = 1_000_000;

/// A dispatch must fit in a NATS message and parse back (serde_json refuses nesting deeper than
/// 128 levels, which resolved outputs can reach).
fn check_dispatch(payload: &[u8]) -> Result<(), String> {
    if payload.len() > MAX_DISPATCH_BYTES {
        return Err(format!(
            "dispatch of {} bytes exceeds the {MAX_DISPATCH_BYTES}-byte limit (input plus dependency outputs)",
            payload.len()
        ));
    }
    serde_json::from_slice::<Dispatch>(payload)
        .map(|_| ())
        .map_err(|e| format!("dispatch cannot be read back: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::TaskId;

    #[test]
    fn the_in_memory_graph_names_the_direct_dependants() {
        let (root, left, right, join) =
            (TaskId::new(), TaskId::new(), TaskId::new(), TaskId::new());
        let g = Dependants::build([
            (
                join,
                "join".to_string(),
                vec!["left".to_string(), "right".to_string()],
            ),
            (root, "root".to_string(), vec![]),
            (left, "left".to_string(), vec!["root".to_string()]),
            (right, "right".to_string(), vec!["root".to_string()]),
        ]);
        let mut of_root = g.of("root");
        of_root.sort();
        let mut expected = vec![left, right];
        expected.sort();
        assert_eq!(of_root, expected);
        assert_eq!(g.of("left"), vec![join]);
        assert!(g.of("join").is_empty());
        assert!(g.of("ghost").is_empty());
    }
}
