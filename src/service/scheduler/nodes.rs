//! The coordination nodes the scheduler runs itself (src/domain/coordination.rs): a ready sync
//! point completes with what its sources produced, a merge stores its merged result, a split
//! inserts its children and later gathers them, a loop inserts one iteration at a time. Every
//! step is one guarded statement (or transaction), so a coordinator restart resumes where the
//! stored state is.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use tracing::Instrument;

use sqlx::PgConnection;

use super::state::State;
use super::{Changes, Scheduler, db};
use crate::db::coordination::{self as nodes, Source};
use crate::db::workflows::NewTask;
use crate::db::{DbError, scheduling};
use crate::domain::coordination::{
    LoopSpec, LoopStep, MergeSpec, NodeKind, SplitSpec, SyncSpec, after_iteration,
    expand_iteration, expand_split, iteration_key,
};
use crate::domain::dag::resolve_input;
use crate::domain::merge::{MergeError, MergeStrategy, merge};
use crate::domain::{TaskId, TaskStatus, WorkflowId};
use crate::protocol::Event;
use crate::protocol::events::CoordinationEvent;
use crate::protocol::workflows::TaskRecord;
use crate::service::ServiceError;
use crate::service::outbox::Staged;

/// What running one node did.
enum Ran {
    Completed(TaskRecord, Option<Event>),
    Failed(TaskRecord),
    /// Tasks were inserted; the node now waits for them.
    Expanded {
        /// The node, now waiting for what it inserted.
        rewired: TaskRecord,
        inserted: Vec<TaskId>,
        event: Event,
        created: Vec<Event>,
    },
    /// Waits for more sources (a vote without a majority yet).
    Waiting(TaskRecord),
    /// Someone else moved the node first.
    Skipped,
}

fn node_event(t: &TaskRecord) -> CoordinationEvent {
    CoordinationEvent {
        workflow_id: t.workflow_id,
        task_id: t.id,
        key: t.key.clone(),
        ..CoordinationEvent::default()
    }
}

/// `sync.created` for the sync points among new rows.
pub fn sync_created(workflow: WorkflowId, tasks: &[NewTask]) -> Vec<Event> {
    tasks
        .iter()
        .filter(|t| t.kind == NodeKind::Sync)
        .map(|t| {
            let spec: SyncSpec = t
                .coordination
                .clone()
                .and_then(|v| serde_json::from_value(v).ok())
                .unwrap_or_default();
            Event::SyncCreated(CoordinationEvent {
                workflow_id: workflow,
                task_id: t.id,
                key: t.key.clone(),
                tasks: t.depends_on.clone(),
                quorum: t.join_quorum,
                timeout_seconds: spec.timeout_seconds,
                ..CoordinationEvent::default()
            })
        })
        .collect()
}

/// Largest result carried in a `coordination.*` event; a larger one is read from the task.
const MAX_EVENT_RESULT_BYTES: usize = 64 * 1024;

/// `v` if it is small enough to travel in an event.
fn small(v: &Value) -> Option<Value> {
    let size = serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX);
    (size <= MAX_EVENT_RESULT_BYTES).then(|| v.clone())
}

fn spec_of<T: serde::de::DeserializeOwned>(t: &TaskRecord) -> Result<T, String> {
    serde_json::from_value(t.coordination.clone().unwrap_or(Value::Null))
        .map_err(|e| format!("stored {} spec cannot be read: {e}", t.kind.as_str()))
}

fn finished(s: &Source) -> bool {
    s.status == TaskStatus::Completed
}

impl Scheduler {
    /// Runs the ready coordination nodes once each, each in a transaction of its own (with
    /// what it completes, promotes, fails or finishes, and its events). One node's error does
    /// not hold back the others: it is logged and the node, still ready, runs on a later step.
    pub(super) async fn run_nodes(&self, state: &mut State) {
        let ids = state.ready_nodes();
        if ids.is_empty() {
            return;
        }
        let rows = match self.pool.acquire().await {
            Ok(mut conn) => scheduling::ready_nodes(&mut conn, &ids).await,
            Err(e) => Err(DbError::from(e)),
        };
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the ready coordination nodes; will retry");
                return;
            }
        };
        // Those no longer ready were moved by someone else.
        let still: BTreeSet<TaskId> = rows.iter().map(|r| r.id).collect();
        for id in ids.iter().filter(|id| !still.contains(id)) {
            state.queue.remove(*id);
        }
        for node in &rows {
            let span = tracing::debug_span!("node", task.id = %node.id, kind = node.kind.as_str());
            if let Err(e) = self.run_node_tx(state, node).instrument(span).await {
                // Rolled back: the node is ready still, and rows the graph may have taken in
                // are gone.
                state.forget_graph(node.workflow_id);
                state.observe(&crate::db::scheduling::TaskState::from(node));
                tracing::warn!(task.id = %node.id, key = %node.key, error = %e, "coordination node not run; will retry");
                if e.is_transient() {
                    return;
                }
            }
        }
    }

    async fn run_node_tx(&self, state: &mut State, node: &TaskRecord) -> Result<(), ServiceError> {
        let mut tx = self.pool.begin().await.map_err(DbError::from)?;
        let mut changes = Changes::default();
        match self.run_node(&mut tx, node).await? {
            Ran::Completed(t, event) => {
                changes.tasks(vec![t.clone()]);
                changes.events.extend(event);
                self.settle(&mut tx, state, &[t], &[], &Default::default(), &mut changes)
                    .await?;
            }
            Ran::Failed(t) => {
                tracing::warn!(task.id = %t.id, key = %t.key, error = ?t.error, "coordination node failed");
                changes.tasks(vec![t.clone()]);
                self.settle(&mut tx, state, &[], &[t], &Default::default(), &mut changes)
                    .await?;
            }
            Ran::Expanded {
                rewired,
                inserted,
                event,
                created,
            } => {
                state.forget_graph(node.workflow_id);
                changes.rows.push(rewired);
                changes.events.push(event);
                changes.events.extend(created);
                // What was inserted may be ready at once (its dependencies completed before
                // it existed).
                let promoted = scheduling::promote_candidates(&mut tx, &inserted)
                    .await
                    .map_err(db)?;
                changes.tasks(promoted);
            }
            // A waiting vote may already have its next ballot.
            Ran::Waiting(t) => {
                let promoted = scheduling::promote_candidates(&mut tx, &[t.id])
                    .await
                    .map_err(db)?;
                changes.rows.push(t);
                changes.tasks(promoted);
            }
            Ran::Skipped => {
                let now = scheduling::states_of(&mut tx, &[node.id])
                    .await
                    .map_err(db)?;
                match now.first() {
                    Some(t) => state.observe(t),
                    None => state.queue.remove(node.id),
                }
            }
        }
        let events = Staged::events(&self.names, std::mem::take(&mut changes.events));
        self.outbox.commit(tx, events).await?;
        state.observe_rows(&changes.rows);
        Ok(())
    }

    async fn run_node(
        &self,
        conn: &mut PgConnection,
        node: &TaskRecord,
    ) -> Result<Ran, ServiceError> {
        let sources = nodes::sources(&mut *conn, node).await.map_err(db)?;
        let result = match node.kind {
            NodeKind::Task => return Ok(Ran::Skipped),
            NodeKind::Sync => {
                let partial = Self::partial_splits(&mut *conn, node, &sources).await?;
                Ok(Self::run_sync(node, &sources, partial))
            }
            NodeKind::Merge => Self::run_merge(node, &sources),
            NodeKind::Split => Self::run_split(node, &sources),
            NodeKind::Loop => Self::run_loop(node, &sources),
        };
        match result {
            Ok(Step::Complete(output, event)) => Ok(
                match nodes::complete(&mut *conn, node.id, &output)
                    .await
                    .map_err(db)?
                {
                    Some(t) => Ran::Completed(t, event),
                    None => Ran::Skipped,
                },
            ),
            Ok(Step::Expand {
                rows,
                depends_on,
                quorum,
                event,
            }) => {
                let Some(rewired) = nodes::expand(&mut *conn, node, &rows, &depends_on, quorum)
                    .await
                    .map_err(db)?
                else {
                    return Ok(Ran::Skipped);
                };
                tracing::info!(task.id = %node.id, key = %node.key, inserted = rows.len(), "coordination node expanded");
                Ok(Ran::Expanded {
                    rewired,
                    inserted: rows.iter().map(|r| r.id).collect(),
                    event,
                    created: sync_created(node.workflow_id, &rows),
                })
            }
            Ok(Step::Wait(quorum)) => Ok(
                match nodes::wait_for_more(&mut *conn, node.id, quorum)
                    .await
                    .map_err(db)?
                {
                    Some(t) => Ran::Waiting(t),
                    None => Ran::Skipped,
                },
            ),
            Err(reason) => Ok(
                match nodes::fail(&mut *conn, node.id, &reason)
                    .await
                    .map_err(db)?
                {
                    Some(t) => Ran::Failed(t),
                    None => Ran::Skipped,
                },
            ),
        }
    }

    /// For a sync point released by its timeout: what the unfinished splits among its sources
    /// have so far — `{count, outputs: [child output or null], completed, partial: true}`.
    async fn partial_splits(
        conn: &mut PgConnection,
        node: &TaskRecord,
        sources: &[Source],
    ) -> Result<BTreeMap<String, Value>, ServiceError> {
        let mut partial = BTreeMap::new();
        if !node.timed_out {
            return Ok(partial);
        }
        for s in sources
            .iter()
            .filter(|s| !finished(s) && s.kind == NodeKind::Split && s.expansion > 0)
        {
            let done = nodes::completed_outputs(&mut *conn, node.workflow_id, &s.depends_on)
                .await
                .map_err(db)?;
            let outputs: Vec<Value> = s
                .depends_on
                .iter()
                .map(|k| done.get(k).cloned().unwrap_or(Value::Null))
                .collect();
            partial.insert(
                s.key.clone(),
                json!({"count": outputs.len(), "outputs": outputs, "completed": done.len(), "partial": true}),
            );
        }
        Ok(partial)
    }

    fn run_sync(node: &TaskRecord, sources: &[Source], partial: BTreeMap<String, Value>) -> Step {
        let completed: Vec<&Source> = sources.iter().filter(|s| finished(s)).collect();
        let missing: Vec<&str> = sources
            .iter()
            .filter(|s| !finished(s))
            .map(|s| s.key.as_str())
            .collect();
        let mut outputs: BTreeMap<String, Value> = partial;
        outputs.extend(
            completed
                .iter()
                .map(|s| (s.key.clone(), s.output.clone().unwrap_or(Value::Null))),
        );
        let keys: Vec<String> = completed.iter().map(|s| s.key.clone()).collect();
        let output = json!({
            "completed": keys,
            "missing": missing,
            "timed_out": node.timed_out,
            "outputs": outputs,
        });
        let event = Event::SyncReady(CoordinationEvent {
            tasks: keys,
            quorum: node.join_quorum,
            timed_out: node.timed_out,
            ..node_event(node)
        });
        Step::Complete(output, Some(event))
    }

    fn run_merge(node: &TaskRecord, sources: &[Source]) -> Result<Step, String> {
        let spec: MergeSpec = spec_of(node)?;
        let outputs: Vec<(String, Value)> = sources
            .iter()
            .filter(|s| finished(s))
            .map(|s| (s.key.clone(), s.output.clone().unwrap_or(Value::Null)))
            .collect();
        match merge(spec.strategy, &outputs, spec.field.as_deref()) {
            Ok(result) => {
                let event = Event::MergeCompleted(CoordinationEvent {
                    tasks: outputs.iter().map(|(k, _)| k.clone()).collect(),
                    strategy: Some(spec.strategy.as_str().to_string()),
                    result: small(&result),
                    ..node_event(node)
                });
                Ok(Step::Complete(result, Some(event)))
            }
            // A vote with no majority yet waits for the next ballot, while one can still come.
            Err(MergeError::NoMajority { .. })
                if spec.strategy == MergeStrategy::Majority
                    && sources.iter().any(|s| !s.status.is_terminal()) =>
            {
                Ok(Step::Wait(outputs.len() as i32 + 1))
            }
            Err(e) => Err(format!("merge failed: {e}")),
        }
    }

    fn run_split(node: &TaskRecord, sources: &[Source]) -> Result<Step, String> {
        let spec: SplitSpec = spec_of(node)?;
        if node.expansion > 0 {
            // The children satisfied the join: gather their outputs in item order.
            let by_key: BTreeMap<&str, &Source> =
                sources.iter().map(|s| (s.key.as_str(), s)).collect();
            let count = node.depends_on.len();
            let outputs: Vec<Value> = node
                .depends_on
                .iter()
                .map(|k| {
                    by_key
                        .get(k.as_str())
                        .filter(|s| finished(s))
                        .and_then(|s| s.output.clone())
                        .unwrap_or(Value::Null)
                })
                .collect();
            return Ok(Step::Complete(
                json!({"count": count, "outputs": outputs}),
                None,
            ));
        }
        let deps: BTreeMap<String, Value> = sources
            .iter()
            .map(|s| (s.key.clone(), s.output.clone().unwrap_or(Value::Null)))
            .collect();
        let items = resolve_input(&spec.items, &deps);
        let children = expand_split(&node.key, &node.depends_on, &spec, &items)?;
        let rows: Vec<NewTask> = children
            .iter()
            .map(|c| NewTask::from_spec(TaskId::new(), c))
            .collect();
        let keys: Vec<String> = children.iter().map(|c| c.key.clone()).collect();
        let quorum = spec.join.quorum().map(|k| k as i32);
        if quorum.is_some_and(|k| k as usize > keys.len()) {
            return Err(format!(
                "join quorum {} exceeds the {} items split",
                quorum.unwrap_or_default(),
                keys.len()
            ));
        }
        let event = Event::SplitCreated(CoordinationEvent {
            tasks: keys.clone(),
            quorum,
            ..node_event(node)
        });
        Ok(Step::Expand {
            rows,
            depends_on: keys,
            quorum,
            event,
        })
    }

    fn run_loop(node: &TaskRecord, sources: &[Source]) -> Result<Step, String> {
        let spec: LoopSpec = spec_of(node)?;
        let next = if node.expansion == 0 {
            1
        } else {
            let iteration = node.expansion as u32;
            let prefix = format!("{}/{iteration}/", node.key);
            let outputs: BTreeMap<String, Value> = sources
                .iter()
                .filter_map(|s| {
                    let key = s.key.strip_prefix(&prefix)?;
                    Some((key.to_string(), s.output.clone().unwrap_or(Value::Null)))
                })
                .collect();
            match after_iteration(&spec, iteration, &outputs) {
                LoopStep::Next(n) => n,
                LoopStep::Done(output) => {
                    let event = Event::LoopCompleted(CoordinationEvent {
                        iteration: Some(iteration),
                        result: small(&output),
                        ..node_event(node)
                    });
                    return Ok(Step::Complete(output, Some(event)));
                }
            }
        };
        let tasks = expand_iteration(&node.key, &spec, next);
        let rows: Vec<NewTask> = tasks
            .iter()
            .map(|t| NewTask::from_spec(TaskId::new(), t))
            .collect();
        let keys: Vec<String> = spec
            .body
            .iter()
            .map(|t| iteration_key(&node.key, next, &t.key))
            .collect();
        let event = Event::LoopIteration(CoordinationEvent {
            tasks: keys.clone(),
            iteration: Some(next),
            ..node_event(node)
        });
        Ok(Step::Expand {
            rows,
            depends_on: keys,
            quorum: None,
            event,
        })
    }

    /// A pending sync point whose timeout passed: released with what finished, or failed.
    pub(super) async fn expire_syncs(
        &self,
        conn: &mut PgConnection,
    ) -> Result<(Vec<TaskRecord>, Vec<TaskRecord>), ServiceError> {
        let mut released = Vec::new();
        let mut failed = Vec::new();
        for t in nodes::expired_syncs(&mut *conn).await.map_err(db)? {
            let spec: SyncSpec = spec_of(&t).unwrap_or_default();
            let seconds = spec.timeout_seconds.unwrap_or_default();
            tracing::warn!(task.id = %t.id, key = %t.key, seconds, "sync point timed out");
            let moved = match spec.on_timeout {
                crate::domain::coordination::OnTimeout::Continue => {
                    nodes::release_sync(&mut *conn, t.id).await.map(|r| {
                        if let Some(r) = r {
                            released.push(r)
                        }
                    })
                }
                crate::domain::coordination::OnTimeout::Fail => nodes::fail(
                    &mut *conn,
                    t.id,
                    &format!("sync point timed out after {seconds} s"),
                )
                .await
                .map(|r| {
                    if let Some(r) = r {
                        failed.push(r)
                    }
                }),
            };
            match moved {
                Ok(()) | Err(DbError::Conflict { .. }) => {}
                Err(e) => return Err(db(e)),
            }
        }
        Ok((released, failed))
    }
}

/// What a node's logic decided, before it is stored.
enum Step {
    /// Store the result; publish the event besides `task.completed`.
    Complete(Value, Option<Event>),
    /// Insert `rows` and wait for `depends_on` (with `quorum`).
    Expand {
        rows: Vec<NewTask>,
        depends_on: Vec<String>,
        quorum: Option<i32>,
        event: Event,
    },
    /// Wait for this many completed sources.
    Wait(i32),
}
