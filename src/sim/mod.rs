//! `omoi simulate`: runs a pattern end to end on the real bus and database with simulated
//! agents, then reports how it went. Every agent task of the pattern is rewritten to the `sim`
//! executor (src/worker/executor.rs), whose latency and failures are drawn from the seed, the
//! task key and the attempt — so a run repeats for a seed as far as the fleet's timing allows.

pub mod latency;
pub mod report;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::bus::EventBus;
use crate::bus::events::Subscription;
use crate::db::DbError;
use crate::domain::coordination::NodeKind;
use crate::domain::dag::WorkflowSpec;
use crate::domain::{AgentId, TaskId, WorkflowId};
use crate::protocol::{Envelope, Event};
use latency::Latency;
use report::{AgentInfo, TaskTiming};

/// The simulated fleet and its work.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub agents: usize,
    pub capacity: i32,
    /// Capabilities every simulated agent has.
    pub capabilities: Vec<String>,
    pub latency: Latency,
    /// Chance that an attempt fails.
    pub fail_rate: f64,
    pub seed: u64,
}

/// The `sim` executor input replacing a task's input: the original goes under `input`.
/// `pick` selects among a hint's `outputs`: `("run", "${loop.iteration}")` in a loop body,
/// `("index", "${index}")` for a split child.
fn sim_input(original: &Value, hint: Option<&Value>, fleet: &Fleet, pick: (&str, Value)) -> Value {
    let hint = hint.cloned().unwrap_or(Value::Null);
    let mut input = json!({
        "input": original,
        "seed": fleet.seed,
        "latency": hint.get("latency_ms").cloned().unwrap_or_else(|| Value::String(fleet.latency.to_string())),
        "fail_rate": hint.get("fail_rate").cloned().unwrap_or_else(|| json!(fleet.fail_rate)),
    });
    if let Some(outputs) = hint.get("outputs") {
        input["outputs"] = outputs.clone();
        input[pick.0] = pick.1;
    }
    if let Some(output) = hint.get("output") {
        input["output"] = output.clone();
    }
    input
}

/// Rewrites every agent task of `spec` (top level, split children, loop bodies) to run the
/// `sim` executor with the pattern's simulation hints.
pub fn simulated_spec(
    spec: &WorkflowSpec,
    hints: &BTreeMap<String, Value>,
    fleet: &Fleet,
) -> WorkflowSpec {
    let mut spec = spec.clone();
    for t in &mut spec.tasks {
        match t.kind() {
            NodeKind::Task => {
                t.input = sim_input(&t.input, hints.get(&t.key), fleet, ("run", json!(1)));
                t.executor = "sim".into();
            }
            NodeKind::Split => {
                if let Some(split) = &mut t.split {
                    let pick = ("index", Value::String("${index}".into()));
                    split.task.input = sim_input(&split.task.input, hints.get(&t.key), fleet, pick);
                    split.task.executor = "sim".into();
                }
            }
            NodeKind::Loop => {
                let key = t.key.clone();
                if let Some(lp) = &mut t.repeat {
                    for b in lp.body.iter_mut() {
                        let hint = hints.get(&format!("{key}/{}", b.key));
                        match (b.kind(), &mut b.split) {
                            (NodeKind::Task, _) => {
                                let pick = ("run", Value::String("${loop.iteration}".into()));
                                b.input = sim_input(&b.input, hint, fleet, pick);
                                b.executor = "sim".into();
                            }
                            (NodeKind::Split, Some(split)) => {
                                let pick = ("index", Value::String("${index}".into()));
                                split.task.input = sim_input(&split.task.input, hint, fleet, pick);
                                split.task.executor = "sim".into();
                            }
                            _ => {}
                        }
                    }
                }
            }
            NodeKind::Sync | NodeKind::Merge => {}
        }
    }
    spec
}

/// Capabilities the agent tasks of `spec` ask for, where known before it runs (a split
/// child's `${item…}` capabilities are only known when the split runs).
pub fn required_capabilities(spec: &WorkflowSpec) -> BTreeSet<String> {
    let mut caps = BTreeSet::new();
    for t in &spec.tasks {
        caps.extend(t.capabilities.iter().cloned());
        if let Some(split) = &t.split {
            caps.extend(
                split
                    .task
                    .capabilities
                    .iter()
                    .filter(|c| !c.contains("${"))
                    .cloned(),
            );
        }
        if let Some(lp) = &t.repeat {
            for b in &lp.body {
                caps.extend(b.capabilities.iter().cloned());
            }
        }
    }
    caps
}

/// A finished run as the report needs it.
pub struct Recorded {
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    pub status: String,
    pub tasks: Vec<TaskTiming>,
    pub agents: Vec<AgentInfo>,
}

#[derive(sqlx::FromRow)]
struct Row {
    key: String,
    kind: String,
    depends_on: Vec<String>,
    agent: Option<String>,
    status: String,
    attempt: i32,
    failures: i32,
    created_at: DateTime<Utc>,
    ready_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    lock_wait_ms: Option<i64>,
}

/// Time each agent spent in attempts that did not complete, from the `task.*` events: an
/// attempt runs from its `task.started` to the next event of the same task and attempt
/// (`task.retrying`, `task.failed`, or `task.ready` when its agent was lost).
pub fn failed_attempt_busy(events: &[Envelope]) -> BTreeMap<AgentId, f64> {
    let mut started: HashMap<(TaskId, i32), (AgentId, DateTime<Utc>)> = HashMap::new();
    let mut busy: BTreeMap<AgentId, f64> = BTreeMap::new();
    for env in events {
        let (e, ended) = match &env.event {
            Event::TaskStarted(e) => {
                if let Some(agent) = e.agent_id {
                    started.insert((e.task_id, e.attempt), (agent, env.time));
                }
                continue;
            }
            Event::TaskRetrying(e) | Event::TaskFailed(e) | Event::TaskReady(e) => (e, true),
            Event::TaskCompleted(e) | Event::TaskCancelled(e) => (e, false),
            _ => continue,
        };
        if let Some((agent, at)) = started.remove(&(e.task_id, e.attempt))
            && ended
        {
            let ms = (env.time - at).num_microseconds().unwrap_or(0) as f64 / 1000.0;
            *busy.entry(agent).or_default() += ms.max(0.0);
        }
    }
    busy
}

/// Every `task.*` event of the namespace so far, in order.
pub async fn task_events(bus: &EventBus) -> Result<Vec<Envelope>, crate::bus::BusError> {
    let mut sub = bus
        .subscribe(Subscription {
            filter: Some("task.>".into()),
            ..Subscription::default()
        })
        .await?;
    let mut out = Vec::new();
    // The stream is read to its end: nothing is being published any more.
    while let Ok(Some(Ok(d))) =
        tokio::time::timeout(std::time::Duration::from_millis(500), sub.next()).await
    {
        out.push(d.value.clone());
        let _ = d.ack().await;
    }
    Ok(out)
}

/// Reads the recorded timings of a workflow and the agents of its database; `failed_busy` is
/// each agent's time in attempts that did not complete ([`failed_attempt_busy`]).
pub async fn recorded(
    pool: &PgPool,
    workflow: WorkflowId,
    failed_busy: &BTreeMap<AgentId, f64>,
) -> Result<Recorded, DbError> {
    let w = crate::db::workflows::get(pool, workflow).await?;
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT t.key, t.kind, t.depends_on, a.name AS agent, t.status, t.attempt, t.failures,
                t.created_at, t.ready_at, t.started_at, t.finished_at, t.lock_wait_ms
         FROM tasks t LEFT JOIN agents a ON a.id = t.agent_id
         WHERE t.workflow_id = $1 ORDER BY t.key",
    )
    .bind(workflow)
    .fetch_all(pool)
    .await?;
    let agents: Vec<(AgentId, String, i32)> =
        sqlx::query_as("SELECT id, name, capacity FROM agents ORDER BY name")
            .fetch_all(pool)
            .await?;
    Ok(Recorded {
        started: w.created_at,
        finished: w.finished_at.unwrap_or_else(Utc::now),
        status: w.status.to_string(),
        tasks: rows
            .into_iter()
            .map(|r| TaskTiming {
                key: r.key,
                kind: r.kind,
                depends_on: r.depends_on,
                agent: r.agent,
                status: r.status,
                attempts: r.attempt,
                failures: r.failures,
                created_at: r.created_at,
                ready_at: r.ready_at,
                started_at: r.started_at,
                finished_at: r.finished_at,
                lock_wait_ms: r.lock_wait_ms,
            })
            .collect(),
        agents: agents
            .into_iter()
            .map(|(id, name, capacity)| AgentInfo {
                name,
                capacity,
                failed_busy_ms: failed_busy.get(&id).copied().unwrap_or(0.0),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_attempts_count_from_their_start_to_their_end_for_the_agent_that_ran_them() {
        use crate::domain::TaskStatus;
        use crate::protocol::events::TaskEvent;
        let (task, a1, a2) = (TaskId::new(), AgentId::new(), AgentId::new());
        let t0 = Utc::now();
        let at = |ms: i64, event: Event| Envelope {
            v: 1,
            id: uuid::Uuid::now_v7(),
            time: t0 + chrono::Duration::milliseconds(ms),
            event,
        };
        let ev = |attempt: i32, agent: Option<AgentId>, status: TaskStatus| TaskEvent {
            task_id: task,
            workflow_id: WorkflowId::new(),
            key: "k".into(),
            status,
            attempt,
            agent_id: agent,
            error: None,
            retry_at: None,
            lock_wait_ms: None,
        };
        let events = vec![
            at(0, Event::TaskStarted(ev(1, Some(a1), TaskStatus::Running))),
            at(120, Event::TaskRetrying(ev(1, None, TaskStatus::RetryWait))),
            at(
                500,
                Event::TaskStarted(ev(2, Some(a2), TaskStatus::Running)),
            ),
            at(530, Event::TaskReady(ev(2, None, TaskStatus::Ready))),
            at(
                900,
                Event::TaskStarted(ev(3, Some(a1), TaskStatus::Running)),
            ),
            at(
                1000,
                Event::TaskCompleted(ev(3, Some(a1), TaskStatus::Completed)),
            ),
        ];
        let busy = failed_attempt_busy(&events);
        // a1: the failed first attempt only (its completed third is in the task row).
        assert!((busy[&a1] - 120.0).abs() < 0.01, "{busy:?}");
        assert!((busy[&a2] - 30.0).abs() < 0.01, "{busy:?}");
    }

    fn fleet() -> Fleet {
        Fleet {
            agents: 2,
            capacity: 1,
            capabilities: vec![],
            latency: Latency::Fixed(5.0),
            fail_rate: 0.25,
            seed: 9,
        }
    }

    #[test]
    fn agent_tasks_run_the_sim_executor_with_their_hints_and_nodes_are_left_alone() {
        let spec: WorkflowSpec = serde_json::from_value(json!({"name": "p", "tasks": [
            {"key": "plan", "capabilities": ["plan"], "input": {"x": 1}},
            {"key": "impl", "depends_on": ["plan"], "split": {"items": "${deps.plan.output.m}",
                "task": {"capabilities": ["code"], "input": {"m": "${item}"}}}},
            {"key": "cycle", "depends_on": ["impl"], "loop": {"max_iterations": 2,
                "while": {"output": "review.v", "equals": "no"},
                "body": [{"key": "review", "depends_on": ["impl"], "capabilities": ["review"]}]}},
            {"key": "all", "depends_on": ["cycle"], "sync": {}}
        ]}))
        .unwrap();
        let hints = BTreeMap::from([
            (
                "plan".to_string(),
                json!({"output": {"m": [1, 2]}, "latency_ms": 1}),
            ),
            (
                "cycle/review".to_string(),
                json!({"outputs": [{"v": "no"}, {"v": "yes"}]}),
            ),
        ]);
        let sim = simulated_spec(&spec, &hints, &fleet());
        let plan = &sim.tasks[0];
        assert_eq!(plan.executor, "sim");
        assert_eq!(plan.input["input"], json!({"x": 1}));
        assert_eq!(plan.input["output"], json!({"m": [1, 2]}));
        assert_eq!(plan.input["latency"], json!(1));
        assert_eq!(plan.input["fail_rate"], json!(0.25));
        let child = &sim.tasks[1].split.as_ref().unwrap().task;
        assert_eq!(child.executor, "sim");
        assert_eq!(child.input["input"], json!({"m": "${item}"}));
        assert_eq!(child.input["latency"], json!("fixed:5"));
        let review = &sim.tasks[2].repeat.as_ref().unwrap().body[0];
        assert_eq!(review.input["run"], json!("${loop.iteration}"));
        assert_eq!(review.input["outputs"][1], json!({"v": "yes"}));
        assert_eq!(sim.tasks[3], spec.tasks[3]);
        crate::domain::dag::validate(sim.clone()).unwrap();
        assert_eq!(
            required_capabilities(&sim).into_iter().collect::<Vec<_>>(),
            vec!["code", "plan", "review"]
        );
    }
}
