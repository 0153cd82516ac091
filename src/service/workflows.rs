//! Workflow use-cases any control plane can serve: submit (validate the whole DAG, then store
//! everything in one transaction), read, list, cancel, retry a failed task.

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::Notify;

use super::ServiceError;
use super::outbox::{Outbox, Staged};
use crate::bus::EventBus;
use crate::db::tasks::{self};
use crate::db::workflows::{self, NewTask};
use crate::db::{DbError, scheduling};
use crate::domain::dag::{DagError, WorkflowSpec, validate};
use crate::domain::{TaskId, TaskStatus, WorkflowId, WorkflowStatus};
use crate::protocol::Event;
use crate::protocol::events::{TaskEvent, WorkflowEvent};
use crate::protocol::workflows::{
    PatternRun, PatternSubmitted, Submitted, TaskRecord, UNSCHEDULABLE_KEPT, Unschedulable,
    WorkflowRecord, WorkflowView,
};

/// At most [`UNSCHEDULABLE_KEPT`] of `all` — the first task of each distinct need before any
/// second one, so that every missing capability and executor is named — and how many are left
/// out.
fn keep_unschedulable(all: Vec<Unschedulable>) -> (Vec<Unschedulable>, usize) {
    if all.len() <= UNSCHEDULABLE_KEPT {
        return (all, 0);
    }
    let total = all.len();
    let mut seen = std::collections::HashSet::new();
    let (mut kept, rest): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|u| seen.insert((u.missing_capabilities.clone(), u.missing_executor.clone())));
    kept.extend(rest);
    kept.truncate(UNSCHEDULABLE_KEPT);
    let omitted = total - kept.len();
    (kept, omitted)
}

/// Unfinished tasks of workflow `id` that no live agent can take.
async fn unschedulable_of(
    db: impl sqlx::PgExecutor<'_>,
    id: WorkflowId,
) -> Result<Vec<Unschedulable>, ServiceError> {
    let rows = workflows::unmet_needs(db, id).await?;
    Ok(rows
        .into_iter()
        .filter(|(_, missing, executor)| !missing.is_empty() || executor.is_some())
        .map(
            |(key, missing_capabilities, missing_executor)| Unschedulable {
                key,
                missing_capabilities,
                missing_executor,
            },
        )
        .collect())
}

#[derive(Clone)]
pub struct Workflows {
    pool: PgPool,
    bus: EventBus,
    /// Events are committed with the change they announce.
    outbox: Outbox,
    /// Wakes the local scheduler (remote ones wake on the `workflow.created` event).
    wake: Arc<Notify>,
}

impl From<DagError> for ServiceError {
    fn from(e: DagError) -> Self {
        ServiceError::validation(e.field(), e.to_string())
    }
}

pub fn task_event(t: &TaskRecord) -> TaskEvent {
    TaskEvent {
        task_id: t.id,
        workflow_id: t.workflow_id,
        key: t.key.clone(),
        status: t.status,
        attempt: t.attempt,
        agent_id: t.agent_id,
        error: t.error.clone(),
        retry_at: t.retry_at,
        lock_wait_ms: t.lock_wait_ms.filter(|_| t.status == TaskStatus::Completed),
    }
}

/// `task.*` events for tasks that just entered their current status.
pub fn task_events<'a>(tasks: impl IntoIterator<Item = &'a TaskRecord>) -> Vec<Event> {
    tasks
        .into_iter()
        .filter_map(|t| Event::for_task_status(t.status, task_event(t)))
        .collect()
}

pub fn workflow_event(w: &WorkflowRecord) -> Event {
    let data = WorkflowEvent {
        workflow_id: w.id,
        name: w.name.clone(),
        status: w.status,
    };
    match w.status {
        WorkflowStatus::Running => Event::WorkflowCreated(data),
        WorkflowStatus::Completed => Event::WorkflowCompleted(data),
        WorkflowStatus::Failed => Event::WorkflowFailed(data),
        WorkflowStatus::Cancelled => Event::WorkflowCancelled(data),
    }
}

impl Workflows {
    pub fn new(pool: PgPool, bus: EventBus, outbox: Outbox, wake: Arc<Notify>) -> Self {
        Self {
            pool,
            bus,
            outbox,
            wake,
        }
    }

    /// Commits `events` with the change in `tx`, then publishes them.
    async fn commit(
        &self,
        tx: sqlx::Transaction<'_, sqlx::Postgres>,
        events: Vec<Event>,
    ) -> Result<(), ServiceError> {
        let events = Staged::events(self.bus.names(), events);
        self.outbox.commit(tx, events).await
    }

    /// Validates and stores a workflow; tasks without dependencies start ready.
    #[tracing::instrument(skip_all, fields(workflow.name = %spec.name, tasks = spec.tasks.len()))]
    pub async fn submit(&self, spec: WorkflowSpec) -> Result<Submitted, ServiceError> {
        let valid = validate(spec)?;
        let id = WorkflowId::new();
        let new_tasks: Vec<NewTask> = valid
            .spec
            .tasks
            .iter()
            .map(|t| NewTask::from_spec(TaskId::new(), t))
            .collect();
        let mut tx = self.pool.begin().await.map_err(DbError::from)?;
        let workflow = workflows::create(
            &mut tx,
            id,
            &valid.spec.name,
            valid.spec.failure_policy.as_str(),
            &valid.spec,
            &new_tasks,
        )
        .await?;
        // The ready events come from what was just inserted: no need to read it back.
        let mut events = vec![workflow_event(&workflow)];
        events.extend(
            new_tasks
                .iter()
                .filter(|t| t.status == TaskStatus::Ready)
                .map(|t| {
                    Event::TaskReady(crate::protocol::events::TaskEvent {
                        task_id: t.id,
                        workflow_id: id,
                        key: t.key.clone(),
                        status: TaskStatus::Ready,
                        attempt: 0,
                        agent_id: None,
                        error: None,
                        retry_at: None,
                        lock_wait_ms: None,
                    })
                }),
        );
        events.extend(crate::service::scheduler::sync_created(id, &new_tasks));
        // Read before the commit: a reply that fails after it would tell the client the
        // submission failed when it stands (and a retry would submit it twice).
        let unschedulable = unschedulable_of(&mut *tx, id).await?;
        self.commit(tx, events).await?;
        self.wake.notify_one();
        if !unschedulable.is_empty() {
            tracing::warn!(workflow.id = %id, count = unschedulable.len(), "tasks need capabilities no agent has");
        }
        tracing::info!(workflow.id = %id, "workflow submitted");
        let (unschedulable, unschedulable_omitted) = keep_unschedulable(unschedulable);
        Ok(Submitted {
            workflow_id: id,
            tasks: new_tasks.into_iter().map(|t| (t.key, t.id)).collect(),
            unschedulable,
            unschedulable_omitted,
            tasks_omitted: false,
        })
    }

    /// Unfinished tasks needing a capability that no live agent has, or an executor that no
    /// live agent offers (coordination nodes run on the coordinator: only capabilities count).
    async fn unschedulable(&self, id: WorkflowId) -> Result<Vec<Unschedulable>, ServiceError> {
        unschedulable_of(&self.pool, id).await
    }

    pub async fn get(&self, id: WorkflowId) -> Result<WorkflowView, ServiceError> {
        self.view(id, true).await
    }

    /// The workflow, its task counts by status, and (if `with_tasks`) every task.
    pub async fn view(
        &self,
        id: WorkflowId,
        with_tasks: bool,
    ) -> Result<WorkflowView, ServiceError> {
        self.view_listing_at_most(id, with_tasks, usize::MAX).await
    }

    /// [`Workflows::view`], answered `too_large` — before the tasks are read — when `with_tasks`
    /// asks for more than `max_tasks` of them (more than a reply can hold).
    pub async fn view_listing_at_most(
        &self,
        id: WorkflowId,
        with_tasks: bool,
        max_tasks: usize,
    ) -> Result<WorkflowView, ServiceError> {
        let workflow = workflows::get(&self.pool, id).await?;
        let counted = workflows::task_counts(&self.pool, id).await?;
        let total: usize = counted.iter().map(|(_, n)| *n as usize).sum();
        if with_tasks && total > max_tasks {
            return Err(ServiceError::TooLarge {
                message: format!(
                    "the workflow's {total} tasks are more than a reply can list ({max_tasks}); ask without include_tasks, or use the HTTP API"
                ),
            });
        }
        let counts = counted
            .into_iter()
            .map(|(st, n)| (st.to_string(), n as usize))
            .collect();
        let tasks = if with_tasks {
            tasks::list_for_workflow(&self.pool, id).await?
        } else {
            vec![]
        };
        let unschedulable = if workflow.status.is_terminal() {
            vec![]
        } else {
            self.unschedulable(id).await?
        };
        let (unschedulable, unschedulable_omitted) = keep_unschedulable(unschedulable);
        Ok(WorkflowView {
            workflow,
            tasks,
            counts,
            unschedulable,
            unschedulable_omitted,
            tasks_omitted: false,
        })
    }

    pub async fn list(&self, limit: i64) -> Result<Vec<WorkflowRecord>, ServiceError> {
        Ok(workflows::list(&self.pool, limit.clamp(1, 1_000)).await?)
    }

    pub async fn task(&self, id: TaskId) -> Result<TaskRecord, ServiceError> {
        Ok(tasks::get(&self.pool, id).await?)
    }

    /// Cancels every unfinished task (workers running them are told by `task.cancelled`).
    pub async fn cancel(&self, id: WorkflowId) -> Result<WorkflowView, ServiceError> {
        let workflow = workflows::get(&self.pool, id).await?;
        if workflow.status.is_terminal() {
            return Err(ServiceError::Conflict(format!(
                "workflow {id} is already {}",
                workflow.status
            )));
        }
        let mut tx = self.pool.begin().await.map_err(DbError::from)?;
        let cancelled = scheduling::cancel_unfinished(&mut tx, id, "workflow cancelled").await?;
        let finished = scheduling::finish_workflows(&mut tx, &[id]).await?;
        let mut events = task_events(&cancelled);
        events.extend(finished.iter().map(workflow_event));
        self.commit(tx, events).await?;
        self.wake.notify_one();
        self.get(id).await
    }

    /// An operator's retry of a failed task: it becomes ready with its failures reset; the
    /// dependants that failed because of it are pending again, and the workflow runs again.
    pub async fn retry_task(&self, id: TaskId) -> Result<TaskRecord, ServiceError> {
        let task = tasks::get(&self.pool, id).await?;
        if task.status != TaskStatus::Failed {
            return Err(ServiceError::Conflict(format!(
                "task {id} is {}, only failed tasks can be retried",
                task.status
            )));
        }
        let mut tx = self.pool.begin().await.map_err(DbError::from)?;
        let retried = workflows::retry_failed_task(&mut tx, &task)
            .await?
            .ok_or_else(|| ServiceError::Conflict(format!("task {id} changed concurrently")))?;
        self.commit(tx, task_events([&retried])).await?;
        self.wake.notify_one();
        Ok(retried)
    }
}

fn pattern_error(e: crate::pattern::PatternError) -> ServiceError {
    match e.kind {
        crate::pattern::PatternErrorKind::NotFound => ServiceError::NotFound(e.to_string()),
        crate::pattern::PatternErrorKind::Parameter => {
            ServiceError::validation("params", e.to_string())
        }
        _ => ServiceError::validation("pattern", e.to_string()),
    }
}

impl Workflows {
    /// Compiles the pattern with its parameters and submits the workflow.
    pub async fn submit_pattern(
        &self,
        run: PatternRun,
        pattern_dirs: &[std::path::PathBuf],
    ) -> Result<PatternSubmitted, ServiceError> {
        let pattern = match (&run.pattern, &run.source) {
            (Some(name), None) => {
                if name.is_empty()
                    || name.len() > 128
                    || !name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    return Err(ServiceError::validation(
                        "pattern",
                        "a pattern name: 1 to 128 letters, digits, _ and -; send a file's text as `source`",
                    ));
                }
                crate::pattern::find_named(name, pattern_dirs).map_err(pattern_error)?
            }
            (None, Some(text)) => {
                crate::pattern::load_str("source", text).map_err(pattern_error)?
            }
            _ => {
                return Err(ServiceError::validation(
                    "pattern",
                    "give exactly one of `pattern` (a name) or `source` (a pattern file's text)",
                ));
            }
        };
        let instantiated = pattern.instantiate(&run.params).map_err(pattern_error)?;
        let submitted = self.submit(instantiated.spec).await?;
        Ok(PatternSubmitted {
            submitted,
            pattern: pattern.name().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needing(key: usize, capability: &str) -> Unschedulable {
        Unschedulable {
            key: format!("t{key}"),
            missing_capabilities: vec![capability.to_string()],
            missing_executor: None,
        }
    }

    #[test]
    fn a_long_unschedulable_list_keeps_every_distinct_need_and_counts_the_rest() {
        let few: Vec<_> = (0..3).map(|i| needing(i, "a")).collect();
        assert_eq!(keep_unschedulable(few.clone()), (few, 0));
        // 500 tasks needing `a`, then one needing `b` and one needing executor `shell`.
        let mut all: Vec<_> = (0..500).map(|i| needing(i, "a")).collect();
        all.push(needing(500, "b"));
        all.push(Unschedulable {
            key: "t501".into(),
            missing_capabilities: vec![],
            missing_executor: Some("shell".into()),
        });
        let (kept, omitted) = keep_unschedulable(all);
        assert_eq!(kept.len(), UNSCHEDULABLE_KEPT);
        assert_eq!(omitted, 502 - UNSCHEDULABLE_KEPT);
        let keys: Vec<&str> = kept.iter().take(3).map(|u| u.key.as_str()).collect();
        assert_eq!(keys, ["t0", "t500", "t501"]);
    }

    #[test]
    fn a_reply_too_large_for_a_message_leaves_its_task_ids_out_and_says_so() {
        let submitted = Submitted {
            workflow_id: WorkflowId::new(),
            tasks: (0..100).map(|i| (format!("t{i}"), TaskId::new())).collect(),
            unschedulable: vec![],
            unschedulable_omitted: 0,
            tasks_omitted: false,
        };
        let whole = submitted.clone().fit(1_000_000);
        assert_eq!((whole.tasks.len(), whole.tasks_omitted), (100, false));
        let cut = submitted.fit(1_000);
        assert!(cut.tasks.is_empty() && cut.tasks_omitted);
        assert!(serde_json::to_vec(&cut).unwrap().len() <= 1_000);
    }
}
