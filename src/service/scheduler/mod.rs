//! The scheduler — run only by the control plane holding the `scheduler` lease, as one loop that
//! owns the leader's memory (state.rs: the ready queue, who holds what, the graphs).
//!
//! Each **step** of the loop is one transaction: the workers' reports that have arrived
//! (`<ns>_results`: started/completed/failed/blocked/released) are applied, set-based and
//! fenced by attempt and holder; the dependants that became ready are promoted; failure
//! policies apply; finished workflows are closed; on the maintenance tick, due retries, lost
//! agents, timeouts and dispatches never started are handled; then ready tasks are taken from
//! memory in fair order and assigned to best-fit agents with free capacity — and the events of
//! all of it go into the outbox — in the same commit. After the commit the dispatches are
//! sent on `<ns>.dispatch.<agent_id>` and the events by the outbox; a task of the term's
//! ([`finish_steps`]) waits until JetStream stored the dispatches and then acks the reports,
//! while the loop goes on to the next step.
//! So a task's life on the hot path is two commits (its assignment, and its completion with the
//! promotions and the next assignments), each shared with everything else in flight, and a
//! dispatch round costs what it dispatches, not what waits.
//!
//! Taking the lease: the outbox's leftovers are published, memory is built from PostgreSQL,
//! and the dispatches of tasks left `assigned` are published again (their message ids make
//! that idempotent). Others' changes (submissions, cancels, retries, handoffs on any control
//! plane) reach the leader as events and are read back; every few seconds memory is checked
//! against the database and rebuilt if they disagree.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, consumer};
use futures::{FutureExt, StreamExt};
use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, PgPool, Postgres};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

mod nodes;
pub mod state;

pub use nodes::sync_created;
use state::{Dependants, State};

use super::ServiceError;
use super::outbox::{Outbox, Staged};
use super::workflows::{task_events, workflow_event};
use crate::bus::names::{CONSUMER_SCHEDULER, STREAM_RESULTS};
use crate::bus::{Delivery, EventBus, Names, TypedConsumer};
use crate::db::scheduling::{self, Assigned, Fence};
use crate::db::tasks::{self};
use crate::db::{DbError, agents};
use crate::domain::dag::{ResourceSpec, resolve_input};
use crate::domain::{AgentId, RetryPolicy, TaskId, TaskStatus, WorkflowId};
use crate::protocol::events::TaskEvent;
use crate::protocol::workflows::TaskRecord;
use crate::protocol::{Dispatch, Envelope, Event, Outcome, PROTOCOL_VERSION, TaskReport};

/// Most tasks assigned by one step.
const DISPATCH_BATCH: usize = 2_000;
/// Reports applied per step.
const REPORT_BATCH: usize = 1_000;
/// How often the leader checks its memory against the database and repairs state an
/// interrupted step may have left.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);
/// How long a lock-blocked task waits before it is dispatched again.
const BLOCKED_REQUEUE_MS: i64 = 1_000;
/// Outbox rows older than this are published by the leader's relay (their publisher died).
const RELAY_AFTER_MS: i64 = 10_000;
/// Dispatches published again on taking the lease are those of tasks assigned within this
/// time: inside JetStream's de-duplication window, so a copy still pending is dropped.
const REPUBLISH_WITHIN_MS: i64 = 100_000;
/// How long a task whose dispatch JetStream did not store waits before it is assigned again.
const UNSTORED_REQUEUE_MS: i64 = 1_000;
/// Steps whose dispatches' acks (and then reports) may wait to be finished while the loop goes
/// on; one more waits for room.
const FINISHING_STEPS: usize = 4;

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
    outbox: Outbox,
    js: jetstream::Context,
    names: Names,
    config: SchedulerConfig,
    /// Wakes the loop (a local submission, or a step that left work for the next one).
    wake: Arc<Notify>,
    /// The connection steps run on, kept between them (one taken from the pool costs a round
    /// trip: the pool pings it first), with its own planner settings
    /// ([`scheduling::make_hot`]); closed, never returned to the pool, after a failed step (it
    /// may be broken) and when leadership ends.
    hot: Arc<tokio::sync::Mutex<Option<PoolConnection<Postgres>>>>,
}

/// Closes the steps' connection, if any, rather than return its settings to the pool.
fn drop_hot(hot: &mut Option<PoolConnection<Postgres>>) {
    if let Some(conn) = hot.take() {
        drop(conn.detach());
    }
}

fn db(e: DbError) -> ServiceError {
    ServiceError::from(e)
}

/// What others changed, announced by their events: read back and taken into memory.
#[derive(Debug, Default)]
struct Intake {
    tasks: BTreeSet<TaskId>,
    workflows: BTreeSet<WorkflowId>,
    agents: bool,
}

impl Intake {
    fn add(&mut self, env: &Envelope) {
        match &env.event {
            Event::WorkflowCreated(w) => {
                self.workflows.insert(w.workflow_id);
            }
            Event::AgentRegistered(_) | Event::AgentStatusChanged(_) => self.agents = true,
            Event::AgentCapabilityUpdated(_) | Event::AgentDeregistered(_) => self.agents = true,
            e => {
                if let Some(t) = e.task() {
                    self.tasks.insert(t.task_id);
                }
            }
        }
    }
}

/// What one step did to the database, to be taken into memory and announced.
#[derive(Default)]
struct Changes {
    rows: Vec<TaskRecord>,
    events: Vec<Event>,
    /// Agents found lost: their pending dispatches are purged after the commit.
    lost: BTreeSet<AgentId>,
}

impl Changes {
    fn tasks(&mut self, rows: Vec<TaskRecord>) -> &[TaskRecord] {
        self.events.extend(task_events(&rows));
        let from = self.rows.len();
        self.rows.extend(rows);
        &self.rows[from..]
    }
}

impl Scheduler {
    pub fn new(
        pool: PgPool,
        bus: EventBus,
        outbox: Outbox,
        config: SchedulerConfig,
        wake: Arc<Notify>,
    ) -> Self {
        let js = bus.jetstream().clone();
        let names = bus.names().clone();
        Self {
            pool,
            outbox,
            js,
            names,
            config,
            wake,
            hot: Arc::default(),
        }
    }

    /// Runs a term whenever `leader` is true, until `cancel`.
    pub async fn run(self, mut leader: watch::Receiver<bool>, cancel: CancellationToken) {
        loop {
            while !*leader.borrow() {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    r = leader.changed() => if r.is_err() { return },
                }
            }
            self.term(leader.clone(), cancel.clone()).await;
            if cancel.is_cancelled() {
                return;
            }
        }
    }

    /// One leadership term: take over, then step until the lease is lost or `cancel`.
    async fn term(&self, mut leader: watch::Receiver<bool>, cancel: CancellationToken) {
        let still_leading = |l: &watch::Receiver<bool>| *l.borrow() && !cancel.is_cancelled();
        let mut state = loop {
            match self.take_over().await {
                Ok(state) => break state,
                Err(e) => {
                    tracing::warn!(error = %e, "taking over the scheduler failed; retrying");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        _ = leader.changed() => if !still_leading(&leader) { return },
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        };
        let mut reports = loop {
            match self.open_reports().await {
                Ok(r) => break r,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot consume reports; retrying");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        _ = leader.changed() => if !still_leading(&leader) { return },
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        };
        let (intake_tx, mut intake_rx) = mpsc::unbounded_channel();
        let listener = tokio::spawn(listen(self.js.client(), self.names.clone(), intake_tx));
        let (finish, finishing) = mpsc::channel(FINISHING_STEPS);
        let (not_stored_tx, mut not_stored) = mpsc::unbounded_channel();
        let finisher = tokio::spawn(finish_steps(finishing, not_stored_tx));
        let mut tick = tokio::time::interval(self.config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reconcile = tokio::time::Instant::now();
        let mut intake = Intake::default();
        // Nothing is judged overdue until the reports sent while no leader listened have been
        // read: not for a start timeout from the term's start (again after a failed step).
        let judge_after = Duration::from_millis(self.config.start_timeout_ms.max(0) as u64);
        let mut judge_from = tokio::time::Instant::now() + judge_after;
        while still_leading(&leader) {
            let mut batch: Vec<Delivery<TaskReport>> = Vec::new();
            let mut maintain = false;
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = leader.changed() => continue,
                next = reports.next() => match next {
                    Some(Ok(d)) => batch.push(d),
                    Some(Err(e)) => tracing::warn!(error = %e, "report consumer error"),
                    None => break,
                },
                env = intake_rx.recv() => match env {
                    Some(env) => intake.add(&env),
                    None => break,
                },
                _ = tick.tick() => maintain = true,
                () = self.wake.notified() => {}
                Some(failed) = not_stored.recv() => {
                    if let Err(e) = self.put_back(&mut state, failed, Vec::new()).await {
                        tracing::warn!(error = %e, "putting back tasks whose dispatches were not stored failed; they are sent again on the start timeout");
                    }
                }
            }
            // Whatever else has arrived joins this step; nothing waits for more. Polled once: a
            // zero timeout would wait for the timer's next millisecond tick each time nothing is
            // there (1.1 ms of a chain's 3.5 ms hop, measured).
            while batch.len() < REPORT_BATCH {
                match reports.next().now_or_never() {
                    Some(Some(Ok(d))) => batch.push(d),
                    _ => break,
                }
            }
            while let Ok(env) = intake_rx.try_recv() {
                intake.add(&env);
            }
            if let Err(e) = self.take_in(&mut state, std::mem::take(&mut intake)).await {
                tracing::warn!(error = %e, "reading others' changes failed; memory will be rebuilt");
                state = self.rebuild().await.unwrap_or_default();
            }
            self.run_nodes(&mut state).await;
            let duties = Duties {
                maintain,
                judge_overdue: maintain && tokio::time::Instant::now() >= judge_from,
                dispatch: true,
            };
            match self.step(&mut state, batch, duties, &finish).await {
                Ok(more) => {
                    if more {
                        self.wake.notify_one();
                    }
                }
                Err((e, batch)) => {
                    tracing::warn!(error = %e, reports = batch.len(), "scheduler step failed; memory is rebuilt");
                    judge_from = tokio::time::Instant::now() + judge_after;
                    state = self.rebuild().await.unwrap_or_default();
                    self.after_failed_step(&mut state, batch, &e).await;
                }
            }
            if last_reconcile.elapsed() >= RECONCILE_EVERY {
                last_reconcile = tokio::time::Instant::now();
                if let Err(e) = self.reconcile(&mut state).await {
                    tracing::warn!(error = %e, "reconciliation failed; will retry");
                }
            }
        }
        listener.abort();
        // The steps committed are finished: their reports acked once their dispatches are stored.
        drop(finish);
        let _ = finisher.await;
        // A control plane that is not leading holds no connection for steps.
        drop_hot(&mut *self.hot.lock().await);
    }

    /// Taking the lease: what the outbox holds is published, memory is built, and the
    /// dispatches of tasks left assigned are published again.
    async fn take_over(&self) -> Result<State, ServiceError> {
        let relayed = self.outbox.relay(0).await?;
        if relayed > 0 {
            tracing::info!(
                relayed,
                "published what the outbox held from before this term"
            );
        }
        let mut state = self.rebuild().await?;
        let mut conn = self.pool.acquire().await.map_err(DbError::from)?;
        let assigned: Vec<Assigned> = scheduling::assigned_tasks(&mut conn)
            .await
            .map_err(db)?
            .into_iter()
            .filter(|a| {
                (chrono::Utc::now() - a.task.updated_at).num_milliseconds() < REPUBLISH_WITHIN_MS
            })
            .collect();
        drop(conn);
        if !assigned.is_empty() {
            tracing::info!(
                count = assigned.len(),
                "publishing the dispatches of assigned tasks again"
            );
            self.publish_dispatches(&mut state, assigned).await?;
        }
        self.wake.notify_one();
        Ok(state)
    }

    /// Memory built from the database.
    async fn rebuild(&self) -> Result<State, ServiceError> {
        let mut conn = self.pool.acquire().await.map_err(DbError::from)?;
        let mut state = State::load(&mut conn).await.map_err(db)?;
        state.set_agents(agents::dispatchable(&mut *conn).await.map_err(db)?);
        Ok(state)
    }

    /// Takes in what others changed: each announced task read back (unless this leader just
    /// changed it), each new workflow's ready tasks, the live agents when they changed.
    async fn take_in(&self, state: &mut State, intake: Intake) -> Result<(), ServiceError> {
        if intake.agents {
            state.agents_changed();
        }
        let tasks: Vec<TaskId> = intake
            .tasks
            .into_iter()
            .filter(|t| !state.changed_lately(*t))
            .collect();
        let workflows: Vec<WorkflowId> = intake.workflows.into_iter().collect();
        if tasks.is_empty() && workflows.is_empty() && !state.agents_stale() {
            return Ok(());
        }
        let mut conn = self.pool.acquire().await.map_err(DbError::from)?;
        for t in scheduling::states_of(&mut conn, &tasks)
            .await
            .map_err(db)?
            .iter()
            .chain(
                scheduling::ready_states_of_workflows(&mut conn, &workflows)
                    .await
                    .map_err(db)?
                    .iter(),
            )
        {
            state.observe(t);
        }
        if state.agents_stale() {
            state.set_agents(agents::dispatchable(&mut *conn).await.map_err(db)?);
        }
        Ok(())
    }

    /// One step: the reports, maintenance (on its tick) and a dispatch round, in one
    /// transaction; after the commit the dispatches are sent, and the wait for JetStream to
    /// store them, then the reports' acks, go to `finish` (the loop does not wait for them).
    /// Returns whether more can be dispatched at once. On failure, the reports come back
    /// (nothing of the step was stored) with the error.
    async fn step(
        &self,
        state: &mut State,
        mut batch: Vec<Delivery<TaskReport>>,
        duties: Duties,
        finish: &mpsc::Sender<Finishing>,
    ) -> Result<bool, (ServiceError, Vec<Delivery<TaskReport>>)> {
        if batch.is_empty() && !duties.maintain && state.queue.is_empty() {
            return Ok(false);
        }
        // An output PostgreSQL cannot store fails its attempt; the report as sent is kept.
        for d in &mut batch {
            if let Some(reason) = d.value.make_storable() {
                tracing::warn!(task.id = %d.value.task_id, %reason, "report output refused");
                if let Err(e) = crate::bus::consume::dead_letter(
                    &self.js,
                    &self.names,
                    &d.subject,
                    d.stream_sequence,
                    &d.payload,
                    &reason,
                )
                .await
                {
                    tracing::warn!(error = %e, "could not dead-letter the refused report");
                }
            }
        }
        let values: Vec<TaskReport> = batch.iter().map(|d| d.value.clone()).collect();
        let started = std::time::Instant::now();
        let result = self.step_tx(state, &values, duties).await;
        let committed = started.elapsed();
        metrics::histogram!("omoi_scheduler_step_seconds").record(committed.as_secs_f64());
        let (changes, assigned) = match result {
            Ok(done) => done,
            Err(e) => return Err((e, batch)),
        };
        let dispatched = assigned.len();
        if !changes.lost.is_empty() {
            // What earlier steps sent is stored before the purge: none of it reaches a lost
            // agent after.
            let (stored, all_stored) = oneshot::channel();
            let barrier = Finishing {
                acks: Vec::new(),
                reports: Vec::new(),
                then: Some(stored),
            };
            if finish.send(barrier).await.is_ok() {
                let _ = all_stored.await;
            }
        }
        for agent in &changes.lost {
            // A lost agent that comes back must not run what was taken from it.
            crate::bus::provision::purge_dispatches(&self.js, &self.names, *agent).await;
        }
        let more = assigned.len() >= DISPATCH_BATCH;
        let sent = self.send_dispatches(assigned).await;
        if !sent.failed.is_empty() || !sent.undeliverable.is_empty() {
            if let Err(e) = self.put_back(state, sent.failed, sent.undeliverable).await {
                tracing::warn!(error = %e, "putting back tasks whose dispatches were not sent failed; they are sent again on the start timeout");
            }
        }
        let reports = batch.len();
        if !sent.acks.is_empty() || !batch.is_empty() {
            let finishing = Finishing {
                acks: sent.acks,
                reports: batch,
                then: None,
            };
            if let Err(mpsc::error::SendError(f)) = finish.send(finishing).await {
                // No finisher (the term is ending): finished here.
                finish_step(f).await;
            }
        }
        tracing::debug!(
            reports,
            dispatched,
            maintain = duties.maintain,
            commit_us = committed.as_micros() as u64,
            total_us = started.elapsed().as_micros() as u64,
            "scheduler step"
        );
        Ok(more)
    }

    /// The step's transaction. Memory follows what the statements return (and is rebuilt by
    /// the caller if the transaction fails).
    async fn step_tx(
        &self,
        state: &mut State,
        reports: &[TaskReport],
        duties: Duties,
    ) -> Result<(Changes, Vec<Assigned>), ServiceError> {
        let mut hot = self.hot.lock().await;
        let conn = match hot.as_mut() {
            Some(conn) => conn,
            None => {
                let mut conn = self.pool.acquire().await.map_err(DbError::from)?;
                if let Err(e) = scheduling::make_hot(&mut conn).await {
                    drop(conn.detach());
                    return Err(db(e));
                }
                hot.insert(conn)
            }
        };
        let result = self.step_tx_on(conn, state, reports, duties).await;
        if result.is_err() {
            drop_hot(&mut hot);
        }
        result
    }

    /// [`Scheduler::step_tx`] on `conn`.
    async fn step_tx_on(
        &self,
        conn: &mut PgConnection,
        state: &mut State,
        reports: &[TaskReport],
        duties: Duties,
    ) -> Result<(Changes, Vec<Assigned>), ServiceError> {
        let mut tx = conn.begin().await.map_err(DbError::from)?;
        let mut changes = Changes::default();
        let (done, failed, promoted_with) = self
            .apply_reports(&mut tx, state, reports, &mut changes)
            .await?;
        let (mut done, mut failed) = (done, failed);
        if duties.maintain {
            let held = state.held();
            let (d, f) = self
                .maintain(&mut tx, &held, duties.judge_overdue, &mut changes)
                .await?;
            done.extend(d);
            failed.extend(f);
        }
        self.settle(&mut tx, state, &done, &failed, &promoted_with, &mut changes)
            .await?;
        state.observe_rows(&changes.rows);
        let mut assigned = Vec::new();
        if duties.dispatch {
            let planned = state.plan(DISPATCH_BATCH, self.config.stale_after_ms);
            if !planned.is_empty() {
                // The dependants of what just completed need its output: at hand already.
                let known: scheduling::KnownOutputs = done
                    .iter()
                    .filter_map(|t| Some(((t.workflow_id, t.key.as_str()), t.output.as_ref()?)))
                    .collect();
                assigned = scheduling::assign(&mut tx, &planned, &known)
                    .await
                    .map_err(db)?;
                state.observe_assigned(assigned.iter().map(|a| &a.task));
                if assigned.len() < planned.len() {
                    // Some were no longer ready (memory was behind): read them back.
                    let got: BTreeSet<TaskId> = assigned.iter().map(|a| a.task.id).collect();
                    let missed: Vec<TaskId> = planned
                        .iter()
                        .map(|(t, _)| *t)
                        .filter(|t| !got.contains(t))
                        .collect();
                    for t in scheduling::states_of(&mut tx, &missed).await.map_err(db)? {
                        state.observe(&t);
                    }
                }
                changes.events.extend(
                    assigned
                        .iter()
                        .map(|a| Event::TaskAssigned(assigned_event(&a.task))),
                );
                metrics::histogram!("omoi_scheduler_dispatch_batch").record(assigned.len() as f64);
            }
        }
        metrics::gauge!("omoi_scheduler_ready_tasks").set(state.queue.len() as f64);
        let events = Staged::events(&self.names, std::mem::take(&mut changes.events));
        self.outbox.commit(tx, events).await?;
        Ok((changes, assigned))
    }

    /// A step that failed: its reports are redelivered if the database or NATS was away; if
    /// the database refused them, they are applied one at a time and each one it refuses is
    /// dead-lettered with the reason, never holding back the others.
    async fn after_failed_step(
        &self,
        state: &mut State,
        batch: Vec<Delivery<TaskReport>>,
        e: &ServiceError,
    ) {
        if e.is_transient() || batch.is_empty() {
            for d in batch {
                let _ = d.nak(Some(Duration::from_millis(500))).await;
            }
            return;
        }
        for d in batch {
            match self
                .step_tx(state, std::slice::from_ref(&d.value), Duties::default())
                .await
            {
                Ok(_) => {
                    let _ = d.ack().await;
                }
                Err(e) if e.is_transient() => {
                    *state = self.rebuild().await.unwrap_or_default();
                    let _ = d.nak(Some(Duration::from_millis(500))).await;
                }
                Err(e) => {
                    *state = self.rebuild().await.unwrap_or_default();
                    let reason = format!("report refused: {}", e.summary());
                    let _ = d.dead_letter(&reason).await;
                }
            }
        }
        self.wake.notify_one();
    }

    /// Applies a batch of reports, each fenced by its attempt and its holder. Reports for an
    /// attempt that is no longer current (a worker presumed dead, a task handed to someone
    /// else) or from another agent are ignored and counted. Returns the completed and the
    /// failed tasks.
    async fn apply_reports(
        &self,
        conn: &mut PgConnection,
        state: &mut State,
        reports: &[TaskReport],
        changes: &mut Changes,
    ) -> Result<(Vec<TaskRecord>, Vec<TaskRecord>, BTreeSet<TaskId>), ServiceError> {
        if reports.is_empty() {
            return Ok((Vec::new(), Vec::new(), BTreeSet::new()));
        }
        let (mut started, mut completed, mut blocked, mut released, mut failures) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in reports {
            let fence = Fence {
                task: r.task_id,
                attempt: r.attempt,
                agent: Some(r.agent_id),
            };
            match &r.outcome {
                Outcome::Started { running_ms } => started.push((fence, *running_ms)),
                Outcome::Completed {
                    output,
                    lock_wait_ms,
                    running_ms,
                } => completed.push(scheduling::Completion {
                    fence,
                    output: output.clone(),
                    lock_wait_ms: *lock_wait_ms,
                    running_ms: *running_ms,
                }),
                Outcome::Blocked { .. } => blocked.push(fence),
                Outcome::Released { .. } => released.push(fence),
                Outcome::Failed { error, exit_code } => {
                    let error = match exit_code {
                        Some(code) => format!("{error} (exit code {code})"),
                        None => error.clone(),
                    };
                    failures.push((fence, error));
                }
            }
        }
        // A start reported in the same batch as the attempt's end needs no write of its own:
        // the end moves the task from `assigned` directly (a short task costs one write).
        let ended: BTreeSet<(TaskId, i32)> = completed
            .iter()
            .map(|c| &c.fence)
            .chain(blocked.iter())
            .chain(released.iter())
            .chain(failures.iter().map(|(f, _)| f))
            .map(|f| (f.task, f.attempt))
            .collect();
        let before = started.len();
        started.retain(|(f, _)| !ended.contains(&(f.task, f.attempt)));
        let mut applied = before - started.len();
        let s = scheduling::mark_started(&mut *conn, &started)
            .await
            .map_err(db)?;
        applied += changes.tasks(s).len();
        // The dependants of what completes, where memory has the graph, are promoted by the
        // completion's own statement (a hop of a chain saves a round trip); `settle` sees to
        // the others. Not one that memory knows still waits on another unfinished task.
        let completing: BTreeSet<TaskId> = completed.iter().map(|c| c.fence.task).collect();
        let mut promoted_with = BTreeSet::new();
        let mut candidates = BTreeSet::new();
        for &task in &completing {
            let Some(graph) = state.graph_of_held(task) else {
                continue;
            };
            promoted_with.insert(task);
            candidates.extend(graph.of_id(task).into_iter().filter(|c| {
                !graph.waits_on(*c, |d| state.is_active(d) && !completing.contains(&d))
            }));
        }
        let candidates: Vec<TaskId> = candidates.into_iter().collect();
        let (done, promoted) =
            scheduling::complete_and_promote(&mut *conn, &completed, &candidates)
                .await
                .map_err(db)?;
        applied += done.len();
        // The fleet's lock waits, where an operator looks (workers serve no /metrics).
        for waited in done.iter().filter_map(|t| t.lock_wait_ms) {
            metrics::histogram!("omoi_task_lock_wait_seconds").record(waited as f64 / 1000.0);
        }
        changes.tasks(done.clone());
        state.observe_rows(changes.tasks(promoted));
        let b = scheduling::requeue(
            &mut *conn,
            &blocked,
            BLOCKED_REQUEUE_MS,
            "resource lock busy",
        )
        .await
        .map_err(db)?;
        applied += changes.tasks(b).len();
        let rel = scheduling::requeue(&mut *conn, &released, 0, "released by its agent")
            .await
            .map_err(db)?;
        applied += changes.tasks(rel).len();
        let mut failed = Vec::new();
        for (fence, error) in failures {
            let current = match tasks::get(&mut *conn, fence.task).await {
                Ok(t) => t,
                Err(DbError::NotFound { .. }) => continue,
                Err(e) => return Err(db(e)),
            };
            if current.attempt != fence.attempt
                || !current.status.occupies_agent()
                || current.agent_id != fence.agent
            {
                continue;
            }
            match tasks::record_failure(&mut *conn, &current, &error, &self.config.retry).await {
                Ok(after) => {
                    applied += 1;
                    failed.push(after.clone());
                    changes.tasks(vec![after]);
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
        Ok((done, failed, promoted_with))
    }

    /// Retries that are due, tasks of lost agents, timeouts and dispatches never started (if
    /// `judge_overdue`), and sync points past their time. The tasks agents hold are looked for
    /// among `held` (what memory says they hold, repaired by the reconciliation). Returns what
    /// completed and what failed.
    async fn maintain(
        &self,
        conn: &mut PgConnection,
        held: &[TaskId],
        judge_overdue: bool,
        changes: &mut Changes,
    ) -> Result<(Vec<TaskRecord>, Vec<TaskRecord>), ServiceError> {
        let due = scheduling::promote_due_retries(&mut *conn)
            .await
            .map_err(db)?;
        changes.tasks(due);
        let reclaimed = scheduling::reclaim_from_lost_agents(&mut *conn, held)
            .await
            .map_err(db)?;
        for (task, agent) in &reclaimed {
            tracing::warn!(task.id = %task.id, agent.id = %agent, attempt = task.attempt, "agent lost; task will be dispatched again");
            changes.lost.insert(*agent);
        }
        changes.tasks(reclaimed.into_iter().map(|(t, _)| t).collect());
        let (timed_out, never_started) = if judge_overdue {
            scheduling::overdue(&mut *conn, held, self.config.start_timeout_ms)
                .await
                .map_err(db)?
        } else {
            (Vec::new(), Vec::new())
        };
        let mut failed = Vec::new();
        for t in timed_out {
            let error = format!(
                "timed out after {} s",
                t.timeout_seconds.unwrap_or_default()
            );
            match tasks::record_failure(&mut *conn, &t, &error, &self.config.retry).await {
                Ok(after) => {
                    tracing::warn!(task.id = %t.id, attempt = t.attempt, "task timed out");
                    failed.push(after.clone());
                    changes.tasks(vec![after]);
                }
                Err(DbError::Conflict { .. }) => {}
                Err(e) => return Err(db(e)),
            }
        }
        let (released, expired) = self.expire_syncs(&mut *conn).await?;
        changes.tasks(released);
        failed.extend(changes.tasks(expired).to_vec());
        let stuck: Vec<Fence> = never_started
            .iter()
            .map(|t| Fence {
                task: t.id,
                attempt: t.attempt,
                agent: None,
            })
            .collect();
        if !stuck.is_empty() {
            let requeued =
                scheduling::requeue(&mut *conn, &stuck, 0, "dispatch not started in time")
                    .await
                    .map_err(db)?;
            changes.tasks(requeued);
        }
        Ok((Vec::new(), failed))
    }

    /// The dependants graph of a workflow, loaded once per term (again when a split or loop
    /// inserted a task it lacks).
    async fn dependants(
        &self,
        conn: &mut PgConnection,
        state: &mut State,
        workflow: WorkflowId,
        key: &str,
    ) -> Result<Arc<Dependants>, ServiceError> {
        if let Some(g) = state.graph(workflow).filter(|g| g.knows(key)) {
            return Ok(g);
        }
        let edges = scheduling::graph_edges(&mut *conn, &[workflow])
            .await
            .map_err(db)?;
        let graph = Arc::new(Dependants::build(
            edges
                .into_iter()
                .map(|(_, id, key, deps, quorum)| (id, key, deps, quorum)),
        ));
        state.set_graph(workflow, graph.clone());
        Ok(graph)
    }

    /// After completions and failures: promote the dependants that became ready (but those of
    /// `promoted_with`, whose completion promoted them already), apply failure policies, and
    /// finish the workflows that have nothing left to run.
    async fn settle(
        &self,
        conn: &mut PgConnection,
        state: &mut State,
        done: &[TaskRecord],
        failed: &[TaskRecord],
        promoted_with: &BTreeSet<TaskId>,
        changes: &mut Changes,
    ) -> Result<(), ServiceError> {
        state.observe_rows(done.iter().chain(failed));
        let mut touched: BTreeSet<WorkflowId> = done.iter().map(|t| t.workflow_id).collect();
        // Only the direct dependants of what completed can have become ready — and not one
        // that memory knows still waits on a task ready or running (a join over a wide split
        // is not checked again at each child's completion).
        let mut candidates = BTreeSet::new();
        for t in done.iter().filter(|t| !promoted_with.contains(&t.id)) {
            let graph = self
                .dependants(&mut *conn, state, t.workflow_id, &t.key)
                .await?;
            candidates.extend(
                graph
                    .of(&t.key)
                    .into_iter()
                    .filter(|c| !graph.waits_on(*c, |d| state.is_active(d))),
            );
        }
        let candidates: Vec<TaskId> = candidates.into_iter().collect();
        let promoted = scheduling::promote_candidates(&mut *conn, &candidates)
            .await
            .map_err(db)?;
        state.observe_rows(changes.tasks(promoted));
        let mut policies: HashMap<WorkflowId, String> = HashMap::new();
        for t in failed.iter().filter(|t| t.status == TaskStatus::Failed) {
            touched.insert(t.workflow_id);
            if let std::collections::hash_map::Entry::Vacant(slot) = policies.entry(t.workflow_id) {
                let policy = crate::db::workflows::failure_policy(&mut *conn, t.workflow_id)
                    .await
                    .map_err(db)?;
                slot.insert(policy);
            }
            let affected = if policies.get(&t.workflow_id).map(String::as_str) == Some("continue") {
                scheduling::fail_dependants(&mut *conn, t.workflow_id, &t.key)
                    .await
                    .map_err(db)?
            } else if !scheduling::failure_is_fatal(&mut *conn, t.workflow_id, &t.key)
                .await
                .map_err(db)?
            {
                // A quorum join that can still be met absorbs the failure.
                tracing::info!(task.id = %t.id, key = %t.key, "failure tolerated by a quorum join");
                Vec::new()
            } else {
                scheduling::cancel_unfinished(
                    &mut *conn,
                    t.workflow_id,
                    &format!("workflow failed: task {} failed", t.key),
                )
                .await
                .map_err(db)?
            };
            state.observe_rows(changes.tasks(affected));
        }
        // A workflow with a task memory knows is ready or held is not finished (a stale memory
        // only delays the check to a later step or the reconciliation).
        touched.retain(|w| !state.has_active(*w));
        if !touched.is_empty() {
            let ids: Vec<WorkflowId> = touched.into_iter().collect();
            let finished = scheduling::finish_workflows(&mut *conn, &ids)
                .await
                .map_err(db)?;
            for w in &finished {
                tracing::info!(workflow.id = %w.id, status = %w.status, "workflow finished");
                state.forget_graph(w.id);
            }
            changes.events.extend(finished.iter().map(workflow_event));
        }
        Ok(())
    }

    /// Publishes the dispatches of `assigned` and waits until JetStream stored them; a task
    /// whose dispatch was not stored waits a moment, and one no worker could read fails.
    async fn publish_dispatches(
        &self,
        state: &mut State,
        assigned: Vec<Assigned>,
    ) -> Result<(), ServiceError> {
        let Sent {
            acks,
            mut failed,
            undeliverable,
        } = self.send_dispatches(assigned).await;
        failed.extend(unstored(acks).await);
        self.put_back(state, failed, undeliverable).await
    }

    /// Sends the dispatches of `assigned` (waiting for JetStream to store them only every
    /// [`crate::bus::events::PUBLISH_CHUNK`]: each pending ack holds an in-flight permit of
    /// the context).
    async fn send_dispatches(&self, assigned: Vec<Assigned>) -> Sent {
        let mut sent = Sent::default();
        for a in assigned {
            let t = &a.task;
            let Some(agent_id) = t.agent_id else { continue };
            let dependencies = a.dependency_outputs;
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
            let mut payload = match serde_json::to_vec(&dispatch) {
                Ok(p) => p,
                Err(e) => {
                    sent.undeliverable
                        .push((a.task, format!("dispatch cannot be encoded: {e}")));
                    continue;
                }
            };
            if payload.len() > MAX_DISPATCH_BYTES && !dispatch.dependencies.is_empty() {
                // The whole outputs (say, of a wide split) do not fit: send the input, which
                // carries what the task asked for by reference, without them.
                dispatch.dependencies.clear();
                dispatch.dependencies_omitted = true;
                if let Ok(p) = serde_json::to_vec(&dispatch) {
                    payload = p;
                }
                tracing::info!(task.id = %t.id, "dependency outputs left out of a dispatch too large for them");
            }
            if let Err(reason) = check_dispatch(&payload) {
                sent.undeliverable.push((a.task, reason));
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
                Ok(ack) => sent.acks.push((t.id, t.attempt, ack)),
                Err(e) => {
                    tracing::warn!(task.id = %t.id, error = %e, "dispatch publish failed");
                    sent.failed.push((t.id, t.attempt));
                }
            }
            if sent.acks.len() >= crate::bus::events::PUBLISH_CHUNK {
                let chunk = std::mem::take(&mut sent.acks);
                sent.failed.extend(unstored(chunk).await);
            }
        }
        sent
    }

    /// Tasks whose dispatches were not sent or stored wait a moment before they are assigned
    /// again; those no worker could read fail.
    async fn put_back(
        &self,
        state: &mut State,
        failed: Vec<(TaskId, i32)>,
        undeliverable: Vec<(scheduling::AssignedTask, String)>,
    ) -> Result<(), ServiceError> {
        if failed.is_empty() && undeliverable.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await.map_err(DbError::from)?;
        let mut changes = Changes::default();
        let back = scheduling::unassign(
            &mut tx,
            &failed,
            UNSTORED_REQUEUE_MS,
            "dispatch not stored by JetStream",
        )
        .await
        .map_err(db)?;
        changes.tasks(back);
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
                &mut tx,
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
        changes.tasks(gave_up.clone());
        self.settle(
            &mut tx,
            state,
            &[],
            &gave_up,
            &BTreeSet::new(),
            &mut changes,
        )
        .await?;
        self.outbox
            .commit(tx, Staged::events(&self.names, changes.events))
            .await?;
        state.observe_rows(&changes.rows);
        Ok(())
    }

    /// Repairs what a crash between steps could leave behind (pending tasks whose dependencies
    /// all completed, running workflows with nothing left to run), publishes outbox rows their
    /// publisher did not, and rebuilds memory if it no longer matches the database.
    async fn reconcile(&self, state: &mut State) -> Result<(), ServiceError> {
        if let Err(e) = self.outbox.relay(RELAY_AFTER_MS).await {
            tracing::warn!(error = %e, "outbox relay failed; will retry");
        }
        let mut tx = self.pool.begin().await.map_err(DbError::from)?;
        let running = scheduling::running_workflows(&mut tx).await.map_err(db)?;
        let mut changes = Changes::default();
        if !running.is_empty() {
            let promoted = scheduling::promote_unblocked(&mut tx, &running)
                .await
                .map_err(db)?;
            changes.tasks(promoted);
            let finished = scheduling::finish_workflows(&mut tx, &running)
                .await
                .map_err(db)?;
            if !changes.rows.is_empty() || !finished.is_empty() {
                tracing::warn!(
                    promoted = changes.rows.len(),
                    finished = finished.len(),
                    "reconciled state left by an interrupted step"
                );
            }
            for w in &finished {
                state.forget_graph(w.id);
            }
            changes.events.extend(finished.iter().map(workflow_event));
        }
        let (ready, held) = scheduling::count_active(&mut tx).await.map_err(db)?;
        self.outbox
            .commit(tx, Staged::events(&self.names, changes.events))
            .await?;
        state.observe_rows(&changes.rows);
        let (queued, holding) = state.counts();
        if (queued as i64, holding as i64) != (ready, held) {
            tracing::warn!(
                ready,
                queued,
                held,
                holding,
                "scheduler memory differs from the database; rebuilding it"
            );
            *state = self.rebuild().await?;
        }
        Ok(())
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
}

/// What a step does besides applying its reports.
#[derive(Debug, Clone, Copy, Default)]
struct Duties {
    /// The maintenance tick's work.
    maintain: bool,
    /// With it, judging tasks overdue (not while reports sent before the term may be unread).
    judge_overdue: bool,
    /// A dispatch round.
    dispatch: bool,
}

/// A dispatch sent (its task and attempt) and JetStream's answer to come.
type PendingAck = (TaskId, i32, PublishAckFuture);

/// Dispatches sent: those JetStream is to ack, those not sent, those no worker could read.
#[derive(Default)]
struct Sent {
    acks: Vec<PendingAck>,
    failed: Vec<(TaskId, i32)>,
    undeliverable: Vec<(scheduling::AssignedTask, String)>,
}

/// What a committed step leaves to finish: its dispatches' acks to wait for, then its reports
/// to ack; then, if asked, word that it (and every step before it) is finished.
struct Finishing {
    acks: Vec<PendingAck>,
    reports: Vec<Delivery<TaskReport>>,
    then: Option<oneshot::Sender<()>>,
}

/// The dispatches (of `acks`) JetStream did not store.
async fn unstored(acks: Vec<PendingAck>) -> Vec<(TaskId, i32)> {
    let mut failed = Vec::new();
    for (id, attempt, ack) in acks {
        if let Err(e) = ack.await {
            tracing::warn!(task.id = %id, error = %e, "dispatch not stored");
            failed.push((id, attempt));
        }
    }
    failed
}

/// Finishes a step: waits until its dispatches are stored, then acks its reports. Returns the
/// dispatches not stored.
async fn finish_step(f: Finishing) -> Vec<(TaskId, i32)> {
    let failed = unstored(f.acks).await;
    for d in f.reports {
        let _ = d.ack().await;
    }
    if let Some(then) = f.then {
        let _ = then.send(());
    }
    failed
}

/// Finishes the term's steps in the order they committed, while the loop goes on to the next;
/// the dispatches not stored go back to the loop (on `not_stored`), which puts their tasks back.
async fn finish_steps(
    mut steps: mpsc::Receiver<Finishing>,
    not_stored: mpsc::UnboundedSender<Vec<(TaskId, i32)>>,
) {
    while let Some(f) = steps.recv().await {
        let failed = finish_step(f).await;
        if !failed.is_empty() {
            let _ = not_stored.send(failed);
        }
    }
}

/// Hears what others change: new workflows, task transitions, agents. Malformed events (and
/// those that are not events) are ignored: the leader reads the state itself.
async fn listen(nats: async_nats::Client, names: Names, intake: mpsc::UnboundedSender<Envelope>) {
    let mut subs = Vec::new();
    for s in [
        "workflow.created",
        "task.>",
        "agent.registered",
        "agent.status.changed",
        "agent.capability.updated",
        "agent.deregistered",
    ] {
        match nats.subscribe(names.event(s)).await {
            Ok(sub) => subs.push(sub),
            Err(e) => tracing::warn!(error = %e, "cannot subscribe to the scheduler's intake"),
        }
    }
    let mut all = futures::stream::select_all(subs);
    while let Some(msg) = all.next().await {
        if let Ok(env) = serde_json::from_slice::<Envelope>(&msg.payload) {
            if intake.send(env).is_err() {
                return;
            }
        }
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

/// The `task.assigned` event of a task an assignment returned.
fn assigned_event(t: &scheduling::AssignedTask) -> TaskEvent {
    TaskEvent {
        task_id: t.id,
        workflow_id: t.workflow_id,
        key: t.key.clone(),
        status: TaskStatus::Assigned,
        attempt: t.attempt,
        agent_id: t.agent_id,
        error: None,
        retry_at: None,
        lock_wait_ms: None,
    }
}
