//! Simulation report for one finished workflow run: turns the recorded task timings (as read
//! from PostgreSQL) into makespan, critical path, per-agent utilisation, queue and lock waits,
//! retries, an ASCII Gantt timeline and a standalone SVG chart.
//!
//! Pure: no I/O, no async, no clock. The same input always renders the same output — every
//! tie is broken by task key and every map is ordered.
//!
//! Writing into a `String` cannot fail, so `write!` results are discarded with `let _ =`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

/// The `kind` of tasks run by an agent; every other kind is a coordinator node.
pub const TASK_KIND: &str = "task";

/// Above this many tasks the ASCII timeline groups rows by key prefix (before the first `/`).
pub const GROUP_THRESHOLD: usize = 60;

/// Lane name used in the SVG for coordinator nodes (every kind other than `"task"`).
pub const COORDINATOR_LANE: &str = "coordinator";

/// Lane name used in the SVG for agent tasks with no recorded agent.
pub const UNASSIGNED_LANE: &str = "(unassigned)";

/// One task row of a finished workflow, as read from PostgreSQL.
#[derive(Debug, Clone, Serialize)]
pub struct TaskTiming {
    pub key: String,
    /// "task" (run by an agent) or a coordinator node: "sync", "merge", "split", "loop".
    pub kind: String,
    pub depends_on: Vec<String>,
    /// Name of the agent that ran the last attempt (None for coordinator nodes / never run).
    pub agent: Option<String>,
    /// "completed", "failed", "cancelled", … (final status)
    pub status: String,
    /// Dispatches (1 = ran once).
    pub attempts: i32,
    /// Failed attempts.
    pub failures: i32,
    pub created_at: DateTime<Utc>,
    /// When it last became ready (None if never).
    pub ready_at: Option<DateTime<Utc>>,
    /// When its last attempt started running (None if never).
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Time the last attempt waited for resource locks before starting (None if unknown / no locks).
    pub lock_wait_ms: Option<i64>,
}

impl TaskTiming {
    /// Whether an agent ran this task (kind `"task"`), as opposed to a coordinator node.
    pub fn is_agent_task(&self) -> bool {
        self.kind == TASK_KIND
    }

    /// Run time of the last attempt: `finished_at - started_at` in ms for agent tasks that
    /// have both timestamps (never negative); 0 for coordinator nodes and unstarted tasks.
    pub fn duration_ms(&self) -> f64 {
        match (self.is_agent_task(), self.started_at, self.finished_at) {
            (true, Some(s), Some(f)) => ms_between(s, f).max(0.0),
            _ => 0.0,
        }
    }

    /// The instant the task "happens" on the critical path: its start for agent tasks (its
    /// finish if it never started), its finish for coordinator nodes, which take no time.
    fn path_instant(&self) -> Option<DateTime<Utc>> {
        if self.is_agent_task() {
            self.started_at.or(self.finished_at)
        } else {
            self.finished_at.or(self.started_at)
        }
    }

    /// Where the task sits on a chart: `(start, end)`. Coordinator nodes are an instant at
    /// their finish; an agent task that started but never finished runs until `run_end`; an
    /// agent task that finished without starting is an instant at its finish.
    fn span(&self, run_end: DateTime<Utc>) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        if !self.is_agent_task() {
            return self.finished_at.or(self.started_at).map(|i| (i, i));
        }
        match (self.started_at, self.finished_at) {
            (Some(s), Some(f)) => Some((s, f.max(s))),
            (Some(s), None) => Some((s, run_end.max(s))),
            (None, Some(f)) => Some((f, f)),
            (None, None) => None,
        }
    }

    /// Sort key for charts: the earliest recorded instant of the task, missing ones last.
    fn chart_start(&self) -> Option<DateTime<Utc>> {
        if self.is_agent_task() {
            self.started_at.or(self.finished_at).or(self.ready_at)
        } else {
            self.finished_at.or(self.started_at).or(self.ready_at)
        }
    }

    fn failed(&self) -> bool {
        self.status == "failed"
    }
}

/// A registered agent and how many tasks it may run at once.
#[derive(Debug, Clone, Serialize)]
pub struct AgentInfo {
    pub name: String,
    pub capacity: i32,
    /// Time this agent spent in attempts that did not complete (failed, or lost), in ms: the
    /// task rows keep only each task's last attempt, so this comes from the events.
    pub failed_busy_ms: f64,
}

/// One step of the critical path.
#[derive(Debug, Clone, Serialize)]
pub struct CriticalStep {
    pub key: String,
    pub kind: String,
    pub agent: Option<String>,
    pub status: String,
    /// `finished_at - started_at` in ms; 0 for coordinator nodes and unstarted tasks.
    pub duration_ms: f64,
    /// This step's start minus the previous step's finish, in ms (for the first step: minus
    /// the run's start). Coordinator nodes "start" at their finish. 0 when a timestamp is
    /// missing; may be negative if recorded clocks disagree.
    pub wait_ms: f64,
}

/// The critical path of the recorded run.
///
/// Definition: start from the task that finished last (ties: smallest key); repeatedly step to
/// the dependency — among its `depends_on` that exist in the input — that finished last
/// (a dependency that never finished counts as earliest; ties: smallest key; a dependency
/// already on the path is skipped, so cycles terminate); stop at a task with no recorded
/// dependencies. Steps are listed in execution order.
#[derive(Debug, Clone, Serialize)]
pub struct CriticalPath {
    pub steps: Vec<CriticalStep>,
    /// Sum of the steps' `duration_ms`.
    pub total_ms: f64,
    /// Sum of the steps' `wait_ms`: time the path spent waiting rather than running.
    pub wait_ms: f64,
    /// `total_ms / makespan_ms`; 0 when the makespan is 0.
    pub share: f64,
}

/// Utilisation of one agent over the run.
#[derive(Debug, Clone, Serialize)]
pub struct AgentUtilisation {
    pub name: String,
    pub capacity: i32,
    /// False for an agent named by a task but absent from the agent list (capacity taken as 1).
    pub listed: bool,
    /// Tasks whose last attempt this agent ran.
    pub tasks: usize,
    /// Sum over its tasks of `finished_at - started_at` in ms (tasks missing either: 0).
    pub busy_ms: f64,
    /// Time in attempts that did not complete ([`AgentInfo::failed_busy_ms`]).
    pub failed_busy_ms: f64,
    /// `(busy_ms + failed_busy_ms) / (makespan_ms * capacity)`; 0 when the makespan or the
    /// capacity is not positive.
    pub utilisation: f64,
}

/// Distribution of queue waits: `started_at - ready_at` of agent tasks (kind `"task"`) that
/// have both timestamps. Percentiles are nearest-rank (always an observed value); all fields
/// are 0 when `count` is 0.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WaitStats {
    pub count: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// A task that failed at least once or was dispatched more than once.
#[derive(Debug, Clone, Serialize)]
pub struct RetriedTask {
    pub key: String,
    pub attempts: i32,
    pub failures: i32,
    pub status: String,
}

/// Retries over the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RetryStats {
    /// Sum of `failures` (negative values count as 0).
    pub total_failures: i64,
    /// Sum of `attempts - 1` over tasks dispatched at least once: dispatches beyond the first.
    pub extra_attempts: i64,
    /// Tasks with `attempts > 1`.
    pub tasks_retried: usize,
    /// Tasks with `attempts > 1` or `failures > 0`, by key.
    pub tasks: Vec<RetriedTask>,
}

/// One task whose last attempt waited for resource locks.
#[derive(Debug, Clone, Serialize)]
pub struct LockWait {
    pub key: String,
    pub wait_ms: i64,
}

/// Lock waits over the run (the last attempt of each task).
#[derive(Debug, Clone, Default, Serialize)]
pub struct LockWaitStats {
    /// Tasks with a recorded `lock_wait_ms` (including 0).
    pub recorded: usize,
    /// Sum of recorded positive waits, in ms.
    pub total_ms: i64,
    /// Longest recorded wait, in ms (0 if none).
    pub max_ms: i64,
    /// Tasks that waited (`lock_wait_ms > 0`), longest first, ties by key.
    pub waited: Vec<LockWait>,
}

/// The simulation report of one finished workflow run. Build it with [`build`].
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub pattern: String,
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    /// `finished - started` in ms, clamped at 0.
    pub makespan_ms: f64,
    /// Count of tasks per final status.
    pub status_counts: BTreeMap<String, usize>,
    pub critical_path: CriticalPath,
    /// One entry per agent (listed or named by a task), by name.
    pub agents: Vec<AgentUtilisation>,
    pub queue_wait: WaitStats,
    pub retries: RetryStats,
    pub lock_waits: LockWaitStats,
    /// The input rows, by key, kept so the charts can be rendered from the report alone.
    pub tasks: Vec<TaskTiming>,
}

/// Builds the report of one run that started at `started` and finished at `finished`.
///
/// Keys are assumed unique; if one repeats, dependency lookups use the first row with that
/// key (in key order, then input order).
pub fn build(
    pattern: &str,
    started: DateTime<Utc>,
    finished: DateTime<Utc>,
    tasks: &[TaskTiming],
    agents: &[AgentInfo],
) -> Report {
    let makespan_ms = ms_between(started, finished).max(0.0);
    let mut sorted = tasks.to_vec();
    // Stable sort: duplicate keys keep their input order, so "first" is well defined.
    sorted.sort_by(|a, b| a.key.cmp(&b.key));

    let mut status_counts = BTreeMap::new();
    for t in &sorted {
        *status_counts.entry(t.status.clone()).or_insert(0) += 1;
    }

    Report {
        pattern: pattern.to_owned(),
        started,
        finished,
        makespan_ms,
        status_counts,
        critical_path: critical_path(&sorted, started, makespan_ms),
        agents: utilisation(&sorted, agents, makespan_ms),
        queue_wait: queue_waits(&sorted),
        retries: retries(&sorted),
        lock_waits: lock_waits(&sorted),
        tasks: sorted,
    }
}

fn critical_path(sorted: &[TaskTiming], started: DateTime<Utc>, makespan_ms: f64) -> CriticalPath {
    let mut by_key: BTreeMap<&str, &TaskTiming> = BTreeMap::new();
    for t in sorted {
        by_key.entry(t.key.as_str()).or_insert(t);
    }

    let mut chain: Vec<&TaskTiming> = Vec::new();
    let mut on_path: BTreeSet<&str> = BTreeSet::new();
    let mut current = sorted
        .iter()
        .filter(|t| t.finished_at.is_some())
        .fold(None, later_finisher);
    while let Some(t) = current {
        on_path.insert(t.key.as_str());
        chain.push(t);
        current = t
            .depends_on
            .iter()
            .filter_map(|d| by_key.get(d.as_str()).copied())
            .filter(|d| !on_path.contains(d.key.as_str()))
            .fold(None, later_finisher);
    }
    chain.reverse();

    let mut steps = Vec::with_capacity(chain.len());
    let mut prev_finish = Some(started);
    for t in chain {
        let wait_ms = match (prev_finish, t.path_instant()) {
            (Some(p), Some(s)) => ms_between(p, s),
            _ => 0.0,
        };
        steps.push(CriticalStep {
            key: t.key.clone(),
            kind: t.kind.clone(),
            agent: t.agent.clone(),
            status: t.status.clone(),
            duration_ms: t.duration_ms(),
            wait_ms,
        });
        prev_finish = t.finished_at;
    }
    let total_ms = steps.iter().map(|s| s.duration_ms).sum();
    let wait_ms = steps.iter().map(|s| s.wait_ms).sum();
    CriticalPath {
        steps,
        total_ms,
        wait_ms,
        share: ratio(total_ms, makespan_ms),
    }
}

/// Fold step keeping the task that finished last; ties go to the smaller key, and a missing
/// finish (None) sorts before any instant.
fn later_finisher<'a>(best: Option<&'a TaskTiming>, t: &'a TaskTiming) -> Option<&'a TaskTiming> {
    match best {
        Some(b) if (b.finished_at, Reverse(&b.key)) >= (t.finished_at, Reverse(&t.key)) => Some(b),
        _ => Some(t),
    }
}

fn utilisation(
    sorted: &[TaskTiming],
    agents: &[AgentInfo],
    makespan_ms: f64,
) -> Vec<AgentUtilisation> {
    let mut by_name: BTreeMap<String, AgentUtilisation> = BTreeMap::new();
    for a in agents {
        // A repeated name keeps its first capacity: the list is a registry snapshot.
        by_name
            .entry(a.name.clone())
            .or_insert_with(|| AgentUtilisation {
                name: a.name.clone(),
                capacity: a.capacity,
                listed: true,
                tasks: 0,
                busy_ms: 0.0,
                failed_busy_ms: a.failed_busy_ms.max(0.0),
                utilisation: 0.0,
            });
    }
    for t in sorted {
        let Some(name) = &t.agent else { continue };
        let entry = by_name
            .entry(name.clone())
            .or_insert_with(|| AgentUtilisation {
                name: name.clone(),
                capacity: 1,
                listed: false,
                tasks: 0,
                busy_ms: 0.0,
                failed_busy_ms: 0.0,
                utilisation: 0.0,
            });
        entry.tasks += 1;
        if let (Some(s), Some(f)) = (t.started_at, t.finished_at) {
            entry.busy_ms += ms_between(s, f).max(0.0);
        }
    }
    by_name
        .into_values()
        .map(|mut a| {
            a.utilisation = ratio(
                a.busy_ms + a.failed_busy_ms,
                makespan_ms * f64::from(a.capacity.max(0)),
            );
            a
        })
        .collect()
}

fn queue_waits(sorted: &[TaskTiming]) -> WaitStats {
    let mut waits: Vec<f64> = sorted
        .iter()
        .filter(|t| t.is_agent_task())
        .filter_map(|t| Some(ms_between(t.ready_at?, t.started_at?)))
        .collect();
    if waits.is_empty() {
        return WaitStats::default();
    }
    waits.sort_by(f64::total_cmp);
    let count = waits.len();
    WaitStats {
        count,
        p50_ms: nearest_rank(&waits, 50.0),
        p95_ms: nearest_rank(&waits, 95.0),
        max_ms: waits[count - 1],
        mean_ms: waits.iter().sum::<f64>() / count as f64,
    }
}

/// Nearest-rank percentile of a sorted, non-empty slice: the value at rank `ceil(p/100 · n)`.
fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

fn retries(sorted: &[TaskTiming]) -> RetryStats {
    let mut stats = RetryStats::default();
    for t in sorted {
        stats.total_failures += i64::from(t.failures.max(0));
        stats.extra_attempts += i64::from((t.attempts - 1).max(0));
        if t.attempts > 1 {
            stats.tasks_retried += 1;
        }
        if t.attempts > 1 || t.failures > 0 {
            stats.tasks.push(RetriedTask {
                key: t.key.clone(),
                attempts: t.attempts,
                failures: t.failures,
                status: t.status.clone(),
            });
        }
    }
    stats
}

fn lock_waits(sorted: &[TaskTiming]) -> LockWaitStats {
    let mut stats = LockWaitStats::default();
    for t in sorted {
        let Some(w) = t.lock_wait_ms else { continue };
        stats.recorded += 1;
        if w > 0 {
            stats.total_ms = stats.total_ms.saturating_add(w);
            stats.max_ms = stats.max_ms.max(w);
            stats.waited.push(LockWait {
                key: t.key.clone(),
                wait_ms: w,
            });
        }
    }
    stats
        .waited
        .sort_by(|a, b| b.wait_ms.cmp(&a.wait_ms).then_with(|| a.key.cmp(&b.key)));
    stats
}

impl Report {
    /// Human-readable report: header (pattern, status counts), makespan, critical path (keys
    /// with durations, total), per-agent utilisation table (busy time / (makespan * capacity),
    /// task count), queue wait stats (p50/p95/max of started_at - ready_at over agent tasks),
    /// retries (total failures, tasks retried, listed), lock waits (total, max, tasks that
    /// waited), then the ASCII timeline.
    pub fn render_text(&self, width: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "Simulation report - pattern: {}", self.pattern);
        let _ = writeln!(
            out,
            "Run: {} -> {}",
            self.started.to_rfc3339_opts(SecondsFormat::Millis, true),
            self.finished.to_rfc3339_opts(SecondsFormat::Millis, true)
        );
        let counts: Vec<String> = self
            .status_counts
            .iter()
            .map(|(status, n)| format!("{status} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "Tasks: {}{}",
            self.tasks.len(),
            if counts.is_empty() {
                String::new()
            } else {
                format!(" ({})", counts.join(", "))
            }
        );
        let _ = writeln!(out, "Makespan: {}", fmt_ms(self.makespan_ms));

        self.render_critical_path(&mut out);
        self.render_agents(&mut out);

        out.push('\n');
        let q = &self.queue_wait;
        if q.count == 0 {
            let _ = writeln!(
                out,
                "Queue wait: no agent task has both ready and start times"
            );
        } else {
            let _ = writeln!(
                out,
                "Queue wait ({} tasks, ready -> started): p50 {}  p95 {}  max {}  mean {}",
                q.count,
                fmt_ms(q.p50_ms),
                fmt_ms(q.p95_ms),
                fmt_ms(q.max_ms),
                fmt_ms(q.mean_ms)
            );
        }

        let r = &self.retries;
        let _ = writeln!(
            out,
            "Retries: failures {}, extra dispatches {}, tasks retried {}",
            r.total_failures, r.extra_attempts, r.tasks_retried
        );
        for t in &r.tasks {
            let _ = writeln!(
                out,
                "  {}: {} attempts, {} failures, final {}",
                t.key, t.attempts, t.failures, t.status
            );
        }

        let l = &self.lock_waits;
        let _ = writeln!(
            out,
            "Lock waits: total {}, max {}, tasks waited {} of {} with a record",
            fmt_ms(l.total_ms as f64),
            fmt_ms(l.max_ms as f64),
            l.waited.len(),
            l.recorded
        );
        for w in &l.waited {
            let _ = writeln!(out, "  {}: {}", w.key, fmt_ms(w.wait_ms as f64));
        }

        out.push('\n');
        out.push_str("Timeline ('.' queued, '#' running, 'x' failed, '|' coordinator node):\n");
        out.push_str(&self.timeline_ascii(width));
        out
    }

    fn render_critical_path(&self, out: &mut String) {
        let cp = &self.critical_path;
        out.push('\n');
        if cp.steps.is_empty() {
            let _ = writeln!(out, "Critical path: none (no task finished)");
            return;
        }
        let _ = writeln!(
            out,
            "Critical path: {} steps, {} running = {} of makespan, {} waiting",
            cp.steps.len(),
            fmt_ms(cp.total_ms),
            fmt_pct(cp.share),
            fmt_ms(cp.wait_ms)
        );
        let key_w = cp
            .steps
            .iter()
            .map(|s| s.key.chars().count())
            .max()
            .unwrap_or(0);
        for s in &cp.steps {
            let who = match &s.agent {
                Some(a) => a.clone(),
                None if s.kind != TASK_KIND => format!("({})", s.kind),
                None => String::new(),
            };
            let _ = writeln!(
                out,
                "  {:<key_w$}  ran {:>8}  waited {:>8}  {}",
                s.key,
                fmt_ms(s.duration_ms),
                fmt_ms(s.wait_ms),
                who
            );
        }
    }

    fn render_agents(&self, out: &mut String) {
        out.push('\n');
        if self.agents.is_empty() {
            let _ = writeln!(out, "Agent utilisation: no agents");
            return;
        }
        let _ = writeln!(
            out,
            "Agent utilisation ((busy + failed attempts) / (makespan * capacity)):"
        );
        let name_w = self
            .agents
            .iter()
            .map(|a| a.name.chars().count() + usize::from(!a.listed))
            .max()
            .unwrap_or(0)
            .max("agent".len());
        let _ = writeln!(
            out,
            "  {:<name_w$}  {:>4}  {:>5}  {:>9}  {:>9}  {:>6}",
            "agent", "cap", "tasks", "busy", "failed", "util"
        );
        for a in &self.agents {
            // '*' marks agents named by tasks but missing from the agent list.
            let name = if a.listed {
                a.name.clone()
            } else {
                format!("{}*", a.name)
            };
            let _ = writeln!(
                out,
                "  {:<name_w$}  {:>4}  {:>5}  {:>9}  {:>9}  {:>6}",
                name,
                a.capacity,
                a.tasks,
                fmt_ms(a.busy_ms),
                fmt_ms(a.failed_busy_ms),
                fmt_pct(a.utilisation)
            );
        }
        if self.agents.iter().any(|a| !a.listed) {
            let _ = writeln!(out, "  * not in the agent list; capacity taken as 1");
        }
    }

    /// ASCII Gantt: one row per task (sorted by start), label column then a bar scaled so the
    /// makespan fills `width` columns; '.' for waiting-in-queue (ready→started), '#' for
    /// running (started→finished), 'x' for a failed final status; coordinator nodes shown as
    /// '|' at their finish instant. Includes a time axis line (0 … makespan). If more than 60
    /// tasks, rows are grouped by key prefix before the first '/' (e.g. "impl/0".."impl/99"
    /// become one row "impl/* (100)" spanning min start..max finish, failed members' runs
    /// drawn as 'x') so the output stays readable. A task that started but never finished runs
    /// to the end of the run. `width` below 10 is raised to 10.
    pub fn timeline_ascii(&self, width: usize) -> String {
        let width = width.max(10);
        let scale = Scale {
            origin: self.started,
            makespan_ms: self.makespan_ms,
            width,
        };
        let rows = self.timeline_rows();
        let label_w = rows
            .iter()
            .map(|r| r.label.chars().count())
            .max()
            .unwrap_or(0)
            .clamp(4, MAX_LABEL);

        let mut out = String::new();
        for row in &rows {
            let cells = row.draw(&scale, self.finished);
            let bar: String = cells.into_iter().collect();
            let _ = writeln!(
                out,
                "{:<label_w$} |{}| {}",
                truncate(&row.label, label_w),
                bar,
                row.suffix(self.finished)
            );
        }

        // Axis: '+' under both bar borders and at the middle, labelled with elapsed time.
        let mut axis = vec!['-'; width];
        axis[width / 2] = '+';
        let _ = writeln!(
            out,
            "{:<label_w$} +{}+",
            "",
            axis.into_iter().collect::<String>()
        );
        let mut labels = vec![' '; width + 2];
        place(&mut labels, 0, "0");
        let end = fmt_ms(self.makespan_ms);
        let end_at = (width + 2).saturating_sub(end.chars().count());
        place(&mut labels, end_at, &end);
        let mid = fmt_ms(self.makespan_ms / 2.0);
        let mid_at = (width / 2 + 1).saturating_sub(mid.chars().count() / 2);
        place(&mut labels, mid_at, &mid);
        let _ = writeln!(
            out,
            "{:<label_w$} {}",
            "",
            labels.into_iter().collect::<String>().trim_end()
        );
        out
    }

    /// Rows of the ASCII timeline: one per task, or grouped by key prefix above
    /// [`GROUP_THRESHOLD`] tasks; sorted by start, ties by label.
    fn timeline_rows(&self) -> Vec<Row<'_>> {
        let mut rows: Vec<Row<'_>> = if self.tasks.len() > GROUP_THRESHOLD {
            let mut groups: BTreeMap<&str, Vec<&TaskTiming>> = BTreeMap::new();
            for t in &self.tasks {
                // Keys without '/' form their own group, i.e. stay a single row.
                let prefix = t.key.split_once('/').map_or(t.key.as_str(), |(p, _)| p);
                groups.entry(prefix).or_default().push(t);
            }
            groups
                .into_iter()
                .map(|(prefix, members)| {
                    let label = match members.as_slice() {
                        [only] => only.key.clone(),
                        _ => format!("{prefix}/* ({})", members.len()),
                    };
                    Row { label, members }
                })
                .collect()
        } else {
            self.tasks
                .iter()
                .map(|t| Row {
                    label: t.key.clone(),
                    members: vec![t],
                })
                .collect()
        };
        rows.sort_by(|a, b| {
            let (sa, sb) = (a.start(), b.start());
            // Rows with no recorded instant go last.
            sa.is_none()
                .cmp(&sb.is_none())
                .then(sa.cmp(&sb))
                .then_with(|| a.label.cmp(&b.label))
        });
        rows
    }

    /// A standalone SVG Gantt chart: one lane per agent (plus a lane "coordinator" for
    /// non-"task" kinds, and "(unassigned)" for agent tasks with no agent), a rect per task
    /// (x = start, width = duration, at least 2 px; colour by status: completed green, failed
    /// red, cancelled grey, other blue), a `<title>` tooltip per rect with key, agent and
    /// timings; axis ticks with ms labels; critical-path tasks outlined in black; queue waits
    /// as dashed lines. Overlapping tasks of one agent stack in sub-rows. Tasks with neither a
    /// start nor a finish cannot be placed and get no rect. Text is escaped for XML. The only
    /// `<rect>` elements are the tasks.
    pub fn svg(&self) -> String {
        const LABEL_W: f64 = 170.0;
        const CHART_W: f64 = 960.0;
        const RIGHT: f64 = 30.0;
        const TOP: f64 = 56.0;
        const ROW_H: f64 = 16.0;
        const ROW_GAP: f64 = 4.0;
        const LANE_PAD: f64 = 6.0;

        let x_of = |t: DateTime<Utc>| -> f64 {
            let pos = if self.makespan_ms > 0.0 {
                (ms_between(self.started, t) / self.makespan_ms).clamp(0.0, 1.0)
            } else {
                0.0
            };
            LABEL_W + pos * CHART_W
        };
        let critical: BTreeSet<&str> = self
            .critical_path
            .steps
            .iter()
            .map(|s| s.key.as_str())
            .collect();
        let lanes = self.svg_lanes();

        let lanes_h: f64 = lanes
            .iter()
            .map(|l| l.rows.len().max(1) as f64 * (ROW_H + ROW_GAP) + 2.0 * LANE_PAD)
            .sum();
        let width = LABEL_W + CHART_W + RIGHT;
        let height = TOP + lanes_h + 40.0;

        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"#,
            w = num(width),
            h = num(height)
        );
        let _ = writeln!(
            out,
            r#"<text x="8" y="18" font-size="14" font-weight="bold">{} - makespan {} - critical path {} ({})</text>"#,
            xml_escape(&self.pattern),
            xml_escape(&fmt_ms(self.makespan_ms)),
            xml_escape(&fmt_ms(self.critical_path.total_ms)),
            xml_escape(&fmt_pct(self.critical_path.share))
        );

        // Time axis: ticks at a 1-2-5 step, labelled in ms.
        let step = tick_step(self.makespan_ms);
        let decimals = tick_decimals(step);
        let axis_y = TOP - 8.0;
        let bottom = TOP + lanes_h;
        let _ = writeln!(
            out,
            r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#444"/>"##,
            num(LABEL_W),
            num(axis_y),
            num(LABEL_W + CHART_W),
            num(axis_y)
        );
        let ticks = if self.makespan_ms > 0.0 {
            (self.makespan_ms / step).floor() as usize
        } else {
            0
        };
        for i in 0..=ticks {
            let ms = i as f64 * step;
            let x = LABEL_W + ratio(ms, self.makespan_ms) * CHART_W;
            let _ = writeln!(
                out,
                r##"<line x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle" fill="#444">{:.decimals$}ms</text>"##,
                num(axis_y),
                num(bottom),
                num(axis_y - 6.0),
                ms,
                x = num(x)
            );
        }

        // Queue waits go into their own layer, painted first, so a dashed line never crosses
        // an earlier bar of the same sub-row.
        let mut waits = String::new();
        let mut bars = String::new();
        let mut y = TOP;
        for lane in &lanes {
            let lane_h = lane.rows.len().max(1) as f64 * (ROW_H + ROW_GAP) + 2.0 * LANE_PAD;
            let _ = writeln!(
                bars,
                r##"<text x="8" y="{}" fill="#222">{}</text>"##,
                num(y + LANE_PAD + ROW_H * 0.75),
                xml_escape(&lane.title)
            );
            for (r, row) in lane.rows.iter().enumerate() {
                let ry = y + LANE_PAD + r as f64 * (ROW_H + ROW_GAP);
                for item in row {
                    let t = item.task;
                    if let (Some(ready), Some(start)) = (t.ready_at, t.started_at) {
                        if ready < start {
                            let _ = writeln!(
                                waits,
                                r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#999" stroke-dasharray="2,2"/>"##,
                                num(x_of(ready)),
                                num(ry + ROW_H / 2.0),
                                num(x_of(start)),
                                num(ry + ROW_H / 2.0)
                            );
                        }
                    }
                    let x0 = x_of(item.start);
                    let w = (x_of(item.end) - x0).max(2.0);
                    // Instants (coordinator nodes) are centred on their moment.
                    let x = if item.start == item.end { x0 - 1.0 } else { x0 };
                    let stroke = if critical.contains(t.key.as_str()) {
                        r##" stroke="#000" stroke-width="2""##
                    } else {
                        ""
                    };
                    let _ = writeln!(
                        bars,
                        r#"<rect x="{}" y="{}" width="{}" height="{}" rx="2" fill="{}"{stroke}><title>{}</title></rect>"#,
                        num(x),
                        num(ry),
                        num(w),
                        num(ROW_H),
                        status_colour(&t.status),
                        xml_escape(&self.tooltip(t))
                    );
                    // Label the bar when the key fits inside it (~6.5 px per character);
                    // instants get their key beside them.
                    let label_px = t.key.chars().count() as f64 * 6.5 + 6.0;
                    if item.start == item.end {
                        let _ = writeln!(
                            bars,
                            r##"<text x="{}" y="{}" fill="#222" font-size="10" pointer-events="none">{}</text>"##,
                            num(x + w + 3.0),
                            num(ry + ROW_H * 0.75),
                            xml_escape(&t.key)
                        );
                    } else if w >= label_px {
                        let _ = writeln!(
                            bars,
                            r##"<text x="{}" y="{}" fill="#fff" pointer-events="none">{}</text>"##,
                            num(x + 3.0),
                            num(ry + ROW_H * 0.75),
                            xml_escape(&t.key)
                        );
                    }
                }
            }
            y += lane_h;
            let _ = writeln!(
                bars,
                r##"<line x1="0" y1="{}" x2="{}" y2="{}" stroke="#eee"/>"##,
                num(y),
                num(width),
                num(y)
            );
        }
        out.push_str(&waits);
        out.push_str(&bars);

        // Legend: circles, so that every <rect> is a task.
        let ly = bottom + 24.0;
        let legend = [
            ("completed", status_colour("completed")),
            ("failed", status_colour("failed")),
            ("cancelled", status_colour("cancelled")),
            ("other", status_colour("")),
        ];
        for (i, (name, colour)) in legend.iter().enumerate() {
            let lx = LABEL_W + i as f64 * 110.0;
            let _ = writeln!(
                out,
                r##"<circle cx="{}" cy="{}" r="5" fill="{colour}"/><text x="{}" y="{}" fill="#222">{name}</text>"##,
                num(lx),
                num(ly - 4.0),
                num(lx + 9.0),
                num(ly)
            );
        }
        let _ = writeln!(
            out,
            r##"<text x="{}" y="{}" fill="#222">black outline: critical path; dashed: queued</text>"##,
            num(LABEL_W + 4.0 * 110.0),
            num(ly)
        );
        out.push_str("</svg>\n");
        out
    }

    /// Lanes of the SVG: listed agents by name, then "(unassigned)", then "coordinator";
    /// each lane's tasks packed greedily into sub-rows so overlapping bars stay visible.
    fn svg_lanes(&self) -> Vec<Lane<'_>> {
        let mut by_lane: BTreeMap<(u8, String), Vec<Placed<'_>>> = BTreeMap::new();
        for a in &self.agents {
            by_lane.entry((0, a.name.clone())).or_default();
        }
        for t in &self.tasks {
            let Some((start, end)) = t.span(self.finished) else {
                continue;
            };
            let lane = if !t.is_agent_task() {
                (2, COORDINATOR_LANE.to_owned())
            } else if let Some(a) = &t.agent {
                (0, a.clone())
            } else {
                (1, UNASSIGNED_LANE.to_owned())
            };
            by_lane.entry(lane).or_default().push(Placed {
                task: t,
                start,
                end,
            });
        }
        by_lane
            .into_iter()
            .map(|((_, title), mut items)| {
                items.sort_by(|a, b| {
                    a.start
                        .cmp(&b.start)
                        .then_with(|| a.task.key.cmp(&b.task.key))
                });
                let mut rows: Vec<Vec<Placed<'_>>> = Vec::new();
                for item in items {
                    let free = rows.iter_mut().find(|row| {
                        row.last().is_none_or(|last| {
                            // Instants share a row only if they are at different moments.
                            last.end < item.start
                                || (last.end == item.start && last.start < last.end)
                        })
                    });
                    match free {
                        Some(row) => row.push(item),
                        None => rows.push(vec![item]),
                    }
                }
                let title = match self.agents.iter().find(|a| a.name == title) {
                    Some(a) => format!("{} (x{}, {})", a.name, a.capacity, fmt_pct(a.utilisation)),
                    None => title,
                };
                Lane { title, rows }
            })
            .collect()
    }

    fn tooltip(&self, t: &TaskTiming) -> String {
        let at = |i: Option<DateTime<Utc>>| match i {
            Some(i) => format!("+{}", fmt_ms(ms_between(self.started, i))),
            None => "-".to_owned(),
        };
        let mut tip = format!(
            "{} [{}] {}\nagent: {}\nready {}, started {}, finished {}\nran {}",
            t.key,
            t.kind,
            t.status,
            t.agent.as_deref().unwrap_or("-"),
            at(t.ready_at),
            at(t.started_at),
            at(t.finished_at),
            fmt_ms(t.duration_ms())
        );
        if let (Some(r), Some(s)) = (t.ready_at, t.started_at) {
            let _ = write!(tip, ", queued {}", fmt_ms(ms_between(r, s)));
        }
        if let Some(w) = t.lock_wait_ms {
            let _ = write!(tip, ", lock wait {}", fmt_ms(w as f64));
        }
        if t.attempts > 1 || t.failures > 0 {
            let _ = write!(tip, "\nattempts {}, failures {}", t.attempts, t.failures);
        }
        tip
    }
}

/// Longest label shown in the ASCII timeline; longer ones are cut with '~'.
const MAX_LABEL: usize = 32;

/// Maps instants to columns of the ASCII timeline.
struct Scale {
    origin: DateTime<Utc>,
    makespan_ms: f64,
    width: usize,
}

impl Scale {
    /// Fractional column of an instant; everything sits at 0 when the makespan is 0.
    fn pos(&self, t: DateTime<Utc>) -> f64 {
        if self.makespan_ms > 0.0 {
            ms_between(self.origin, t) / self.makespan_ms * self.width as f64
        } else {
            0.0
        }
    }

    fn clamp(&self, col: f64) -> usize {
        let last = self.width.saturating_sub(1) as f64;
        col.clamp(0.0, last) as usize
    }

    /// The cell containing instant `t`.
    fn cell(&self, t: DateTime<Utc>) -> usize {
        self.clamp(self.pos(t).floor())
    }

    /// Cells covered by `[from, to]`: from the cell of `from` through the last cell `to`
    /// reaches into; always at least one cell.
    fn cells(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> std::ops::RangeInclusive<usize> {
        let a = self.cell(from);
        let b = self.clamp(self.pos(to).ceil() - 1.0).max(a);
        a..=b
    }
}

/// One row of the ASCII timeline: a task, or a group of tasks sharing a key prefix.
struct Row<'a> {
    label: String,
    members: Vec<&'a TaskTiming>,
}

impl Row<'_> {
    fn start(&self) -> Option<DateTime<Utc>> {
        self.members.iter().filter_map(|t| t.chart_start()).min()
    }

    /// Draws the row: queue dots from the earliest ready to the earliest start, '#' from the
    /// earliest start to the latest end, failed members' runs as 'x', coordinator nodes as '|'.
    /// For a single task this is exactly that task's ready/run bar.
    fn draw(&self, scale: &Scale, run_end: DateTime<Utc>) -> Vec<char> {
        let mut cells = vec![' '; scale.width];
        let agent_tasks = || self.members.iter().filter(|t| t.is_agent_task());
        let ready = agent_tasks().filter_map(|t| t.ready_at).min();
        let start = agent_tasks().filter_map(|t| t.started_at).min();
        let end = agent_tasks()
            .filter_map(|t| t.span(run_end).map(|(_, e)| e))
            .max();

        match (start, end) {
            (Some(s), Some(e)) => {
                if let Some(r) = ready {
                    fill(&mut cells, scale.cell(r)..scale.cell(s), '.');
                }
                fill(&mut cells, scale.cells(s, e), '#');
            }
            // Never started: show how long it sat in the queue before it ended.
            (None, Some(e)) => {
                if let Some(r) = ready.filter(|r| *r < e) {
                    fill(&mut cells, scale.cell(r)..scale.cell(e), '.');
                }
            }
            _ => {}
        }
        for t in agent_tasks().filter(|t| t.failed()) {
            match (t.started_at, t.span(run_end)) {
                (Some(_), Some((s, e))) => fill(&mut cells, scale.cells(s, e), 'x'),
                (None, Some((_, e))) => {
                    let c = scale.cell(e);
                    fill(&mut cells, c..=c, 'x');
                }
                _ => {}
            }
        }
        for t in self.members.iter().filter(|t| !t.is_agent_task()) {
            if let Some((i, _)) = t.span(run_end) {
                let c = scale.cell(i);
                fill(&mut cells, c..=c, '|');
            }
        }
        cells
    }

    /// Text after the bar: duration, agent and anything unusual.
    fn suffix(&self, run_end: DateTime<Utc>) -> String {
        match self.members.as_slice() {
            [t] => {
                let mut parts = Vec::new();
                if t.is_agent_task() {
                    if t.started_at.is_some() {
                        parts.push(fmt_ms(t.duration_ms()));
                    }
                    if let Some(a) = &t.agent {
                        parts.push(a.clone());
                    }
                } else {
                    parts.push(format!("({})", t.kind));
                }
                if t.status != "completed" {
                    parts.push(t.status.clone());
                }
                if t.attempts > 1 {
                    parts.push(format!("{} attempts", t.attempts));
                }
                parts.join("  ")
            }
            members => {
                let spans: Vec<_> = members.iter().filter_map(|t| t.span(run_end)).collect();
                let mut parts = Vec::new();
                if let (Some(s), Some(e)) = (
                    spans.iter().map(|(s, _)| *s).min(),
                    spans.iter().map(|(_, e)| *e).max(),
                ) {
                    parts.push(format!("span {}", fmt_ms(ms_between(s, e))));
                }
                let failed = members.iter().filter(|t| t.failed()).count();
                if failed > 0 {
                    parts.push(format!("{failed} failed"));
                }
                parts.join("  ")
            }
        }
    }
}

/// A task placed on the SVG time axis.
struct Placed<'a> {
    task: &'a TaskTiming,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
}

/// One SVG lane: an agent (or the coordinator) with its tasks packed into sub-rows.
struct Lane<'a> {
    title: String,
    rows: Vec<Vec<Placed<'a>>>,
}

/// `b - a` in milliseconds, with microsecond precision while it fits.
fn ms_between(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    let d = b.signed_duration_since(a);
    match d.num_microseconds() {
        Some(us) => us as f64 / 1000.0,
        None => d.num_milliseconds() as f64,
    }
}

/// `num / den`, or 0 when that would not be a finite number.
fn ratio(num: f64, den: f64) -> f64 {
    if den > 0.0 && num.is_finite() && den.is_finite() {
        num / den
    } else {
        0.0
    }
}

/// Milliseconds for people: "0ms", "4.5ms", "850ms", "12.35s", "3m05.2s".
pub fn fmt_ms(ms: f64) -> String {
    if !ms.is_finite() {
        return "0ms".to_owned();
    }
    let abs = ms.abs();
    // Whole milliseconds print without a decimal: "0ms", not "0.0ms".
    if abs < 10.0 && (ms - ms.round()).abs() >= 0.05 {
        format!("{ms:.1}ms")
    } else if abs < 1000.0 {
        format!("{ms:.0}ms")
    } else if abs < 60_000.0 {
        format!("{:.2}s", ms / 1000.0)
    } else {
        let sign = if ms < 0.0 { "-" } else { "" };
        let total_s = abs / 1000.0;
        let minutes = (total_s / 60.0).floor();
        format!("{sign}{minutes:.0}m{:04.1}s", total_s - minutes * 60.0)
    }
}

fn fmt_pct(fraction: f64) -> String {
    if fraction.is_finite() {
        format!("{:.1}%", fraction * 100.0)
    } else {
        "0.0%".to_owned()
    }
}

/// SVG coordinate with two decimals, without trailing zeros.
fn num(v: f64) -> String {
    if !v.is_finite() {
        return "0".to_owned();
    }
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_owned()
    } else {
        s.to_owned()
    }
}

/// A 1-2-5 tick step giving about eight ticks over the makespan (1 ms if it is 0).
fn tick_step(makespan_ms: f64) -> f64 {
    let raw = makespan_ms / 8.0;
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Decimals needed to print multiples of `step` without losing precision (sub-ms steps only).
fn tick_decimals(step: f64) -> usize {
    if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()).clamp(0.0, 6.0) as usize
    }
}

fn status_colour(status: &str) -> &'static str {
    match status {
        "completed" => "#2e9d4f",
        "failed" => "#d64541",
        "cancelled" => "#9e9e9e",
        _ => "#4a7fd6",
    }
}

/// Escapes text for XML content and attribute values.
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters other than tab/newline are not allowed in XML 1.0.
            c if c.is_control() && c != '\n' && c != '\t' => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

/// Sets the cells in `range` to `ch`; an empty or out-of-bounds range changes nothing.
fn fill<R>(cells: &mut [char], range: R, ch: char)
where
    R: std::slice::SliceIndex<[char], Output = [char]>,
{
    if let Some(part) = cells.get_mut(range) {
        part.fill(ch);
    }
}

/// Cuts `s` to `max` characters, marking the cut with '~'.
fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('~');
        t
    }
}

/// Writes `text` into `buf` at `at` unless it would overlap existing text (one blank kept
/// on each side) or run past the end.
fn place(buf: &mut [char], at: usize, text: &str) {
    let chars: Vec<char> = text.chars().collect();
    let end = at + chars.len();
    if end > buf.len() {
        return;
    }
    let guard = at.saturating_sub(1)..(end + 1).min(buf.len());
    if buf[guard].iter().any(|c| *c != ' ') {
        return;
    }
    buf[at..end].copy_from_slice(&chars);
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2025-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn at(ms: i64) -> DateTime<Utc> {
        t0() + TimeDelta::milliseconds(ms)
    }

    /// An agent task that was ready, started and finished at the given ms offsets.
    fn task(
        key: &str,
        deps: &[&str],
        agent: &str,
        ready: i64,
        start: i64,
        finish: i64,
    ) -> TaskTiming {
        TaskTiming {
            key: key.to_owned(),
            kind: TASK_KIND.to_owned(),
            depends_on: deps.iter().map(|d| (*d).to_owned()).collect(),
            agent: Some(agent.to_owned()),
            status: "completed".to_owned(),
            attempts: 1,
            failures: 0,
            created_at: t0(),
            ready_at: Some(at(ready)),
            started_at: Some(at(start)),
            finished_at: Some(at(finish)),
            lock_wait_ms: None,
        }
    }

    fn coordinator(key: &str, kind: &str, deps: &[&str], finish: i64) -> TaskTiming {
        TaskTiming {
            key: key.to_owned(),
            kind: kind.to_owned(),
            depends_on: deps.iter().map(|d| (*d).to_owned()).collect(),
            agent: None,
            status: "completed".to_owned(),
            attempts: 0,
            failures: 0,
            created_at: t0(),
            ready_at: Some(at(finish)),
            started_at: None,
            finished_at: Some(at(finish)),
            lock_wait_ms: None,
        }
    }

    fn agents() -> Vec<AgentInfo> {
        vec![
            AgentInfo {
                name: "agent-1".into(),
                capacity: 2,
                failed_busy_ms: 0.0,
            },
            AgentInfo {
                name: "agent-2".into(),
                capacity: 1,
                failed_busy_ms: 0.0,
            },
            AgentInfo {
                name: "agent-3".into(),
                capacity: 1,
                failed_busy_ms: 0.0,
            },
        ]
    }

    /// a → (b, c) → d; c is the slow branch and needed three attempts.
    ///
    /// | task | agent   | ready | start | finish | queue | ran |
    /// |------|---------|-------|-------|--------|-------|-----|
    /// | a    | agent-1 |     0 |    10 |    110 |    10 | 100 |
    /// | b    | agent-1 |   110 |   130 |    330 |    20 | 200 |
    /// | c    | agent-2 |   110 |   150 |    650 |    40 | 500 |
    /// | d    | agent-1 |   650 |   700 |    900 |    50 | 200 |
    fn diamond() -> Vec<TaskTiming> {
        let a = task("a", &[], "agent-1", 0, 10, 110);
        let b = task("b", &["a"], "agent-1", 110, 130, 330);
        let mut c = task("c", &["a"], "agent-2", 110, 150, 650);
        c.attempts = 3;
        c.failures = 2;
        c.lock_wait_ms = Some(25);
        let mut d = task("d", &["b", "c"], "agent-1", 650, 700, 900);
        d.lock_wait_ms = Some(0);
        // Input deliberately not in key order.
        vec![d, b, a, c]
    }

    fn diamond_report() -> Report {
        build("diamond", t0(), at(1000), &diamond(), &agents())
    }

    fn assert_close(actual: f64, expected: f64) {
        assert!((actual - expected).abs() < 1e-9, "{actual} != {expected}");
    }

    fn no_nan(s: &str) {
        assert!(!s.contains("NaN"), "NaN in output:\n{s}");
        assert!(!s.contains("inf"), "inf in output:\n{s}");
    }

    #[test]
    fn makespan_is_finished_minus_started() {
        assert_close(diamond_report().makespan_ms, 1000.0);
    }

    #[test]
    fn critical_path_follows_the_slower_branch_in_execution_order() {
        let cp = diamond_report().critical_path;
        let keys: Vec<&str> = cp.steps.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, ["a", "c", "d"]);
        let durations: Vec<f64> = cp.steps.iter().map(|s| s.duration_ms).collect();
        assert_eq!(durations, [100.0, 500.0, 200.0]);
        // a waits from the run start; c from a's finish (110 → 150); d from c's (650 → 700).
        let waits: Vec<f64> = cp.steps.iter().map(|s| s.wait_ms).collect();
        assert_eq!(waits, [10.0, 40.0, 50.0]);
        assert_close(cp.total_ms, 800.0);
        assert_close(cp.wait_ms, 100.0);
        assert_close(cp.share, 0.8);
    }

    #[test]
    fn critical_path_ties_go_to_the_smaller_key() {
        let tasks = vec![
            task("a", &[], "agent-1", 0, 0, 100),
            task("y", &["a"], "agent-1", 100, 100, 300),
            task("x", &["a"], "agent-2", 100, 100, 300),
            coordinator("join", "sync", &["y", "x"], 300),
            task("z", &[], "agent-3", 0, 0, 300),
        ];
        let cp = build("tie", t0(), at(300), &tasks, &agents()).critical_path;
        // join, x, y and z all finish at 300: "join" < "x" < "y" < "z".
        let keys: Vec<&str> = cp.steps.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, ["a", "x", "join"]);
        assert_eq!(cp.steps[2].duration_ms, 0.0);
        assert_eq!(cp.steps[2].wait_ms, 0.0);
        assert_close(cp.total_ms, 300.0);
    }

    #[test]
    fn critical_path_ignores_unknown_dependencies_and_survives_cycles() {
        let tasks = vec![
            task("p", &["q", "ghost"], "agent-1", 0, 0, 100),
            task("q", &["p"], "agent-1", 0, 100, 200),
        ];
        let cp = build("cycle", t0(), at(200), &tasks, &[]).critical_path;
        let keys: Vec<&str> = cp.steps.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, ["p", "q"]);
    }

    #[test]
    fn utilisation_is_busy_time_over_makespan_times_capacity() {
        let agents = diamond_report().agents;
        let names: Vec<&str> = agents.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["agent-1", "agent-2", "agent-3"]);
        // agent-1: a + b + d = 100 + 200 + 200 = 500 ms over 1000 ms × 2 slots.
        assert_close(agents[0].busy_ms, 500.0);
        assert_eq!(agents[0].tasks, 3);
        assert_close(agents[0].utilisation, 0.25);
        // agent-2: c = 500 ms over 1000 ms × 1 slot.
        assert_close(agents[1].busy_ms, 500.0);
        assert_eq!(agents[1].tasks, 1);
        assert_close(agents[1].utilisation, 0.5);
        // agent-3 ran nothing but is still listed.
        assert_eq!(agents[2].tasks, 0);
        assert_eq!(agents[2].utilisation, 0.0);
        // Time in failed attempts counts too: 300 ms more for agent-3 over 1000 ms × 1 slot.
        let mut list = super::tests::agents();
        list[2].failed_busy_ms = 300.0;
        let r = build("x", t0(), at(1000), &diamond(), &list);
        assert_close(r.agents[2].failed_busy_ms, 300.0);
        assert_close(r.agents[2].utilisation, 0.3);
        assert!(r.render_text(80).contains("failed"));
    }

    #[test]
    fn agents_named_only_by_tasks_are_reported_with_capacity_one() {
        let r = build("x", t0(), at(1000), &diamond(), &[]);
        let a1 = r.agents.iter().find(|a| a.name == "agent-1").unwrap();
        assert!(!a1.listed);
        assert_eq!(a1.capacity, 1);
        assert_close(a1.utilisation, 0.5);
        assert!(r.render_text(40).contains("agent-1*"));
    }

    #[test]
    fn queue_wait_percentiles_are_nearest_rank() {
        let q = diamond_report().queue_wait;
        // Waits 10, 20, 40, 50: p50 = rank 2, p95 = rank 4.
        assert_eq!(q.count, 4);
        assert_close(q.p50_ms, 20.0);
        assert_close(q.p95_ms, 50.0);
        assert_close(q.max_ms, 50.0);
        assert_close(q.mean_ms, 30.0);
    }

    #[test]
    fn queue_wait_skips_coordinator_nodes_and_missing_timestamps() {
        let mut never = task("never", &[], "agent-1", 0, 0, 0);
        never.started_at = None;
        let tasks = vec![
            task("a", &[], "agent-1", 0, 30, 40),
            coordinator("join", "sync", &["a"], 40),
            never,
        ];
        let q = build("q", t0(), at(40), &tasks, &[]).queue_wait;
        assert_eq!(q.count, 1);
        assert_close(q.p50_ms, 30.0);
    }

    #[test]
    fn retries_and_lock_waits_are_counted() {
        let r = diamond_report();
        assert_eq!(r.retries.total_failures, 2);
        assert_eq!(r.retries.extra_attempts, 2);
        assert_eq!(r.retries.tasks_retried, 1);
        assert_eq!(r.retries.tasks.len(), 1);
        assert_eq!(r.retries.tasks[0].key, "c");
        assert_eq!(r.lock_waits.recorded, 2);
        assert_eq!(r.lock_waits.total_ms, 25);
        assert_eq!(r.lock_waits.max_ms, 25);
        assert_eq!(r.lock_waits.waited.len(), 1);
        assert_eq!(r.lock_waits.waited[0].key, "c");
        assert_eq!(r.status_counts.get("completed"), Some(&4));
    }

    #[test]
    fn text_report_has_every_section() {
        let text = diamond_report().render_text(10);
        for needle in [
            "pattern: diamond",
            "completed 4",
            "Makespan: 1.00s",
            "Critical path: 3 steps, 800ms running = 80.0% of makespan",
            "agent-1",
            "25.0%",
            "50.0%",
            "p50 20ms  p95 50ms  max 50ms",
            "Retries: failures 2, extra dispatches 2, tasks retried 1",
            "c: 3 attempts, 2 failures",
            "Lock waits: total 25ms, max 25ms, tasks waited 1 of 2",
            "Timeline",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        no_nan(&text);
    }

    #[test]
    fn timeline_draws_queue_run_and_axis_at_scale() {
        let tl = diamond_report().timeline_ascii(10);
        let lines: Vec<&str> = tl.lines().collect();
        // Four task rows sorted by start, then the axis and its labels.
        assert_eq!(lines.len(), 6, "{tl}");
        let labels: Vec<&str> = lines[..4]
            .iter()
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        assert_eq!(labels, ["a", "b", "c", "d"]);
        // 100 ms per column. a ran 10..110 → cells 0-1; d queued 650..700 (cell 6), ran 700..900.
        assert!(
            lines[0].starts_with("a    |##        | 100ms  agent-1"),
            "{tl}"
        );
        assert!(lines[1].starts_with("b    | ###      |"), "{tl}");
        assert!(
            lines[2].starts_with("c    | ######   | 500ms  agent-2  3 attempts"),
            "{tl}"
        );
        assert!(lines[3].starts_with("d    |      .## |"), "{tl}");
        assert_eq!(lines[4], "     +-----+----+");
        assert!(lines[5].trim_start().starts_with('0'), "{tl}");
        assert!(lines[5].ends_with("1.00s"), "{tl}");
    }

    #[test]
    fn timeline_marks_failures_and_coordinator_nodes() {
        let mut f = task("f", &[], "agent-1", 0, 0, 500);
        f.status = "failed".into();
        let tasks = vec![f, coordinator("join", "sync", &["f"], 500)];
        let tl = build("m", t0(), at(1000), &tasks, &[]).timeline_ascii(10);
        assert!(tl.contains("|xxxxx     | 500ms  agent-1  failed"), "{tl}");
        assert!(tl.contains("|     |    | (sync)"), "{tl}");
    }

    #[test]
    fn more_than_sixty_tasks_collapse_into_prefix_groups() {
        let mut tasks = vec![task("plan", &[], "agent-1", 0, 0, 100)];
        for i in 0..100 {
            let mut t = task(
                &format!("impl/{i}"),
                &["plan"],
                "agent-2",
                100,
                100 + i,
                200 + i * 5,
            );
            if i == 0 {
                t.status = "failed".into();
            }
            tasks.push(t);
        }
        let deps: Vec<String> = (0..100).map(|i| format!("impl/{i}")).collect();
        let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
        tasks.push(coordinator("join", "sync", &deps, 700));
        tasks.push(task("review/only", &["join"], "agent-1", 700, 700, 1000));

        let r = build("fan", t0(), at(1000), &tasks, &agents());
        let tl = r.timeline_ascii(20);
        let rows: Vec<&str> = tl.lines().filter(|l| l.contains('|')).collect();
        // plan, impl/* (100), join, review/only, plus the axis line.
        assert_eq!(tl.lines().count(), 6, "{tl}");
        assert!(rows[0].starts_with("plan "), "{tl}");
        assert!(rows[1].starts_with("impl/* (100) |"), "{tl}");
        assert!(rows[1].contains("1 failed"), "{tl}");
        // The group spans 100..695 ms: cells 2..13 at 50 ms per cell; impl/0 (100..200) failed.
        assert!(rows[1].contains("|  xx##########      |"), "{tl}");
        assert!(rows[2].starts_with("join "), "{tl}");
        // A group of one keeps its own key.
        assert!(rows[3].starts_with("review/only "), "{tl}");
        // The critical path goes through the last impl to finish.
        let keys: Vec<&str> = r
            .critical_path
            .steps
            .iter()
            .map(|s| s.key.as_str())
            .collect();
        assert_eq!(keys, ["plan", "impl/99", "join", "review/only"]);
    }

    #[test]
    fn svg_has_one_rect_per_task_and_escapes_text() {
        let mut tasks = diamond();
        tasks.push(coordinator("<b&c>", "merge", &["d"], 950));
        let r = build("dia\"mond", t0(), at(1000), &tasks, &agents());
        let svg = r.svg();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<rect").count(), tasks.len());
        assert_eq!(svg.matches("</rect>").count(), tasks.len());
        assert_eq!(
            svg.matches("<title>").count(),
            svg.matches("</title>").count()
        );
        assert!(svg.contains("&lt;b&amp;c&gt;"));
        assert!(!svg.contains("<b&c>"));
        assert!(svg.contains("dia&quot;mond"));
        // Lanes for each agent plus the coordinator.
        for lane in ["agent-1", "agent-2", "agent-3", COORDINATOR_LANE] {
            assert!(svg.contains(lane), "missing lane {lane}");
        }
        // Critical path now ends at the merge node: a, c, d, <b&c> are outlined.
        assert_eq!(svg.matches(r##"stroke="#000""##).count(), 4);
        assert!(svg.contains(r##"fill="#2e9d4f""##));
        assert!(svg.contains(">0ms</text>"));
        assert!(svg.contains(">1000ms</text>"));
        no_nan(&svg);
    }

    #[test]
    fn svg_colours_by_status() {
        let mut tasks = diamond();
        tasks[0].status = "failed".into();
        tasks[1].status = "cancelled".into();
        let svg = build("c", t0(), at(1000), &tasks, &agents()).svg();
        assert!(svg.contains(r#"<rect x="#));
        assert!(
            svg.contains(r##"fill="#d64541"><title>"##)
                || svg.contains(r##"fill="#d64541" stroke"##)
        );
        assert!(
            svg.contains(r##"fill="#9e9e9e"><title>"##)
                || svg.contains(r##"fill="#9e9e9e" stroke"##)
        );
    }

    #[test]
    fn empty_input_does_not_panic() {
        let r = build("empty", t0(), t0(), &[], &[]);
        assert_eq!(r.makespan_ms, 0.0);
        assert!(r.critical_path.steps.is_empty());
        assert_eq!(r.critical_path.share, 0.0);
        assert_eq!(r.queue_wait.count, 0);
        let text = r.render_text(0);
        assert!(text.contains("Critical path: none"));
        no_nan(&text);
        let svg = r.svg();
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<rect").count(), 0);
        no_nan(&svg);
    }

    #[test]
    fn zero_makespan_and_missing_timestamps_do_not_divide_by_zero() {
        let mut unstarted = task("u", &[], "agent-1", 0, 0, 0);
        unstarted.ready_at = None;
        unstarted.started_at = None;
        unstarted.finished_at = None;
        unstarted.status = "cancelled".into();
        let mut running = task("r", &["u"], "agent-2", 0, 0, 0);
        running.finished_at = None;
        let tasks = vec![task("a", &[], "agent-1", 0, 0, 0), unstarted, running];
        let r = build("zero", t0(), t0(), &tasks, &agents());
        assert_eq!(r.critical_path.share, 0.0);
        assert!(r.agents.iter().all(|a| a.utilisation == 0.0));
        let text = r.render_text(3);
        no_nan(&text);
        let svg = r.svg();
        no_nan(&svg);
        // The task with no timestamps cannot be placed.
        assert_eq!(svg.matches("<rect").count(), 2);
        let json = serde_json::to_string(&r).unwrap();
        // serde_json writes a NaN as null: no computed number may be null.
        for field in [
            "share",
            "utilisation",
            "p50_ms",
            "mean_ms",
            "duration_ms",
            "wait_ms",
        ] {
            assert!(!json.contains(&format!("\"{field}\":null")), "{json}");
        }
    }

    #[test]
    fn finished_before_started_clamps_makespan() {
        let r = build("neg", at(100), t0(), &diamond(), &agents());
        assert_eq!(r.makespan_ms, 0.0);
        no_nan(&r.render_text(20));
        no_nan(&r.svg());
    }

    #[test]
    fn output_is_deterministic_regardless_of_input_order() {
        let mut reversed = diamond();
        reversed.reverse();
        let mut agents_rev = agents();
        agents_rev.reverse();
        let a = build("d", t0(), at(1000), &diamond(), &agents());
        let b = build("d", t0(), at(1000), &reversed, &agents_rev);
        assert_eq!(a.render_text(40), b.render_text(40));
        assert_eq!(a.svg(), b.svg());
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
    }

    #[test]
    fn durations_format_for_people() {
        assert_eq!(fmt_ms(4.5), "4.5ms");
        assert_eq!(fmt_ms(0.0), "0ms");
        assert_eq!(fmt_ms(5.0), "5ms");
        assert_eq!(fmt_ms(850.0), "850ms");
        assert_eq!(fmt_ms(12_346.0), "12.35s");
        assert_eq!(fmt_ms(185_200.0), "3m05.2s");
        assert_eq!(fmt_ms(f64::NAN), "0ms");
    }

    #[test]
    fn tick_steps_are_one_two_five() {
        assert_eq!(tick_step(1000.0), 200.0);
        assert_eq!(tick_step(80.0), 10.0);
        assert_eq!(tick_step(0.0), 1.0);
        assert_eq!(tick_decimals(0.5), 1);
    }
}
