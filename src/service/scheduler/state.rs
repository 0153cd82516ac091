//! The leader's memory of scheduling, built from PostgreSQL when it takes the lease and kept in
//! step with every row its own statements return and every change others announce: the ready
//! queue (domain/ready.rs), which agent holds which task (so each agent's in-flight count is
//! known without a query), each running workflow's dependency graph, and the live agents. A
//! dispatch round reads nothing it does not dispatch. If memory and the database ever disagree
//! (a lost announcement, a failed transaction), the leader builds it again from the database.

// foldhash rather than SipHash: the maps are keyed by ids omoi made and by needs (hashed with a
// per-process seed), and SipHash was half the cost of planning 10,000 tasks.
use foldhash::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgConnection;

use crate::db::DbError;
use crate::db::scheduling::{self, AssignedTask, TaskState};
use crate::domain::matching::{AgentSnapshot, Picker, Requirements};
use crate::domain::ready::{Needs, ReadyQueue, ReadyTask};
use crate::domain::{AgentId, TaskId, TaskStatus, WorkflowId};
use crate::protocol::registry::AgentRecord;
use crate::protocol::workflows::TaskRecord;

/// One workflow's graph: task ids by key and the keys that depend on each key.
#[derive(Debug, Default)]
pub struct Dependants {
    index: HashMap<String, usize>,
    by_id: HashMap<TaskId, usize>,
    ids: Vec<TaskId>,
    /// Whether each task's join is a quorum (it can be ready with dependencies unfinished).
    quorum: Vec<bool>,
    graph: petgraph::graphmap::DiGraphMap<usize, ()>,
}

impl Dependants {
    /// From each task's id, key, dependencies and whether its join is a quorum.
    pub fn build(tasks: impl IntoIterator<Item = (TaskId, String, Vec<String>, bool)>) -> Self {
        let mut d = Dependants::default();
        let tasks: Vec<_> = tasks.into_iter().collect();
        for (i, (id, key, _, quorum)) in tasks.iter().enumerate() {
            d.ids.push(*id);
            d.index.insert(key.clone(), i);
            d.by_id.insert(*id, i);
            d.quorum.push(*quorum);
            d.graph.add_node(i);
        }
        for (i, (_, _, deps, _)) in tasks.iter().enumerate() {
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
    pub fn knows(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// Whether `task` (joining all its dependencies) still waits on one that `active` says is
    /// unfinished; `false` for a quorum join or a task the graph does not know.
    pub fn waits_on(&self, task: TaskId, active: impl Fn(TaskId) -> bool) -> bool {
        let Some(&node) = self.by_id.get(&task) else {
            return false;
        };
        if self.quorum[node] {
            return false;
        }
        self.graph
            .neighbors_directed(node, petgraph::Direction::Incoming)
            .any(|d| active(self.ids[d]))
    }

    /// Ids of the tasks that depend directly on `key`.
    pub fn of(&self, key: &str) -> Vec<TaskId> {
        self.dependants_of(self.index.get(key))
    }

    /// Ids of the tasks that depend directly on the task `id`.
    pub fn of_id(&self, id: TaskId) -> Vec<TaskId> {
        self.dependants_of(self.by_id.get(&id))
    }

    fn dependants_of(&self, node: Option<&usize>) -> Vec<TaskId> {
        node.map(|&n| self.graph.neighbors(n).map(|d| self.ids[d]).collect())
            .unwrap_or_default()
    }
}

/// Tasks this leader changed itself, whose announcements come back to it and need no reading;
/// forgotten in bulk past this many.
const RECENT_MAX: usize = 200_000;
/// How long the list of live agents is trusted without a change being announced.
const AGENTS_FRESH: Duration = Duration::from_secs(1);

/// The leader's memory.
#[derive(Default)]
pub struct State {
    pub queue: ReadyQueue,
    /// Holder of each assigned or running task.
    holders: HashMap<TaskId, AgentId>,
    /// The workflow of each task memory learned is held (a report names only its task).
    held_in: HashMap<TaskId, WorkflowId>,
    in_flight: HashMap<AgentId, i32>,
    graphs: HashMap<WorkflowId, Arc<Dependants>>,
    /// How many of each workflow's tasks memory holds as ready or held.
    active_in: HashMap<WorkflowId, u32>,
    recent: HashSet<TaskId>,
    agents: Vec<AgentRecord>,
    agents_read: Option<Instant>,
}

impl From<&TaskState> for ReadyTask {
    fn from(t: &TaskState) -> Self {
        Self {
            id: t.id,
            workflow: t.workflow_id,
            priority: t.priority,
            kind: t.kind,
            needs: Needs {
                capabilities: t.capabilities.clone(),
                executor: t.executor.clone(),
                pinned: t.pinned_agent_id,
            },
        }
    }
}

impl State {
    /// Everything ready or held, from the database.
    pub async fn load(conn: &mut PgConnection) -> Result<Self, DbError> {
        let mut state = State::default();
        for t in scheduling::active_states(conn).await? {
            state.observe(&t);
        }
        state.recent.clear();
        Ok(state)
    }

    /// Takes in a task's current state: queued if ready (and not yet queued), out of the
    /// queue otherwise; its holder (and that agent's count) follow its status.
    pub fn observe(&mut self, t: &TaskState) {
        let ready = (t.status == TaskStatus::Ready).then(|| ReadyTask::from(t));
        let holder = t.agent_id.filter(|_| t.status.occupies_agent());
        self.apply(t.id, t.workflow_id, ready, holder);
    }

    /// [`State::observe`] for tasks an assignment returned: each is held by its agent now.
    pub fn observe_assigned<'a>(&mut self, tasks: impl IntoIterator<Item = &'a AssignedTask>) {
        for t in tasks {
            self.apply(t.id, t.workflow_id, None, t.agent_id);
        }
    }

    /// A task's new place: in the queue if `ready`, out of it otherwise; held by `holder`.
    fn apply(
        &mut self,
        id: TaskId,
        workflow: WorkflowId,
        ready: Option<ReadyTask>,
        holder: Option<AgentId>,
    ) {
        if self.recent.len() >= RECENT_MAX {
            self.recent.clear();
        }
        self.recent.insert(id);
        let was_active = self.is_active(id);
        match ready {
            Some(r) => self.queue.insert(r),
            None => self.queue.remove(id),
        }
        if holder.is_some() {
            self.held_in.insert(id, workflow);
        } else {
            self.held_in.remove(&id);
        }
        match (self.holders.get(&id).copied(), holder) {
            (Some(old), Some(new)) if old == new => {}
            (old, new) => {
                if let Some(old) = old {
                    self.holders.remove(&id);
                    if let Some(n) = self.in_flight.get_mut(&old) {
                        *n -= 1;
                        if *n <= 0 {
                            self.in_flight.remove(&old);
                        }
                    }
                }
                if let Some(new) = new {
                    self.holders.insert(id, new);
                    *self.in_flight.entry(new).or_default() += 1;
                }
            }
        }
        match (was_active, self.is_active(id)) {
            (false, true) => *self.active_in.entry(workflow).or_default() += 1,
            (true, false) => {
                if let Some(n) = self.active_in.get_mut(&workflow) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.active_in.remove(&workflow);
                    }
                }
            }
            _ => {}
        }
    }

    /// Whether memory holds a task of `workflow` as ready or held: it is not finished.
    pub fn has_active(&self, workflow: WorkflowId) -> bool {
        self.active_in.contains_key(&workflow)
    }

    /// [`State::observe`] for rows a statement returned.
    pub fn observe_rows<'a>(&mut self, rows: impl IntoIterator<Item = &'a TaskRecord>) {
        for r in rows {
            self.observe(&TaskState::from(r));
        }
    }

    /// Whether this leader changed `task` lately (its announcement needs no reading).
    pub fn changed_lately(&self, task: TaskId) -> bool {
        self.recent.contains(&task)
    }

    /// Whether memory holds `task` as ready or held by an agent (unfinished for certain).
    pub fn is_active(&self, task: TaskId) -> bool {
        self.queue.contains(task) || self.holders.contains_key(&task)
    }

    /// The tasks agents hold, as far as memory knows.
    pub fn held(&self) -> Vec<TaskId> {
        self.holders.keys().copied().collect()
    }

    /// Tasks held by `agent` now.
    pub fn load_of(&self, agent: AgentId) -> i32 {
        self.in_flight.get(&agent).copied().unwrap_or(0)
    }

    /// How many tasks memory holds as ready, and as held by agents.
    pub fn counts(&self) -> (usize, usize) {
        (self.queue.len(), self.holders.len())
    }

    /// The loaded graph of the workflow of `task`, a task memory holds as held, if that graph
    /// knows it.
    pub fn graph_of_held(&self, task: TaskId) -> Option<Arc<Dependants>> {
        let workflow = self.held_in.get(&task)?;
        self.graphs
            .get(workflow)
            .filter(|g| g.by_id.contains_key(&task))
            .cloned()
    }

    /// A workflow's graph, if loaded.
    pub fn graph(&self, workflow: WorkflowId) -> Option<Arc<Dependants>> {
        self.graphs.get(&workflow).cloned()
    }

    pub fn set_graph(&mut self, workflow: WorkflowId, graph: Arc<Dependants>) {
        self.graphs.insert(workflow, graph);
    }

    /// A workflow finished (or grew tasks the graph lacks): its graph goes.
    pub fn forget_graph(&mut self, workflow: WorkflowId) {
        self.graphs.remove(&workflow);
    }

    /// The live agents must be read again (one was registered or changed status).
    pub fn agents_changed(&mut self) {
        self.agents_read = None;
    }

    pub fn agents_stale(&self) -> bool {
        self.agents_read.is_none_or(|t| t.elapsed() >= AGENTS_FRESH)
    }

    pub fn set_agents(&mut self, agents: Vec<AgentRecord>) {
        self.agents = agents;
        self.agents_read = Some(Instant::now());
    }

    /// Plans up to `max` ready tasks onto the best-fit live agents with free capacity (never
    /// more than an agent's capacity, counting what it holds), in the queue's fair order. The
    /// planned tasks leave the queue and count as held by their agent.
    pub fn plan(&mut self, max: usize, stale_after_ms: i64) -> Vec<(TaskId, AgentId)> {
        if self.queue.is_empty() || self.agents.is_empty() {
            return Vec::new();
        }
        let now = chrono::Utc::now();
        let mut snapshots: Vec<AgentSnapshot<'_>> = self
            .agents
            .iter()
            .map(crate::service::registry::snapshot)
            .collect();
        for s in &mut snapshots {
            s.load = self.in_flight.get(&s.id).copied().unwrap_or(0);
        }
        let mut free: i32 = snapshots.iter().map(|s| s.free_capacity()).sum();
        if free == 0 {
            return Vec::new();
        }
        // Who could take each kind of task, worked out once per kind, in a heap by rank;
        // an agent's version changes with each task it is given (its key in every heap).
        let mut pickers: HashMap<Needs, Picker<'_>> = HashMap::default();
        let mut versions = vec![0u32; snapshots.len()];
        let mut assigned = 0usize;
        let planned = self.queue.plan(max, |needs| {
            if free == 0 {
                return None;
            }
            let offers =
                |s: &AgentSnapshot<'_>| crate::domain::agent::offers(s.executors, &needs.executor);
            let chosen = match needs.pinned {
                // A handed-off task waits for its agent only, whatever that agent offers besides.
                Some(pin) => snapshots
                    .iter()
                    .position(|s| s.id == pin && s.is_available() && offers(s))?,
                None => {
                    let picker = pickers.entry(needs.clone()).or_insert_with(|| {
                        let fits = snapshots
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| offers(s))
                            .filter(|(_, s)| {
                                needs
                                    .capabilities
                                    .iter()
                                    .all(|c| s.capabilities.binary_search(c).is_ok())
                            })
                            .map(|(i, _)| i);
                        let req = Requirements {
                            capabilities: needs.capabilities.clone(),
                            executor: Some(needs.executor.clone()),
                            ..Requirements::default()
                        };
                        Picker::new(&snapshots, fits, &versions, req, now, stale_after_ms)
                    });
                    picker.best(&snapshots, &versions)?
                }
            };
            let s = &mut snapshots[chosen];
            s.load += 1;
            // Spreads equal candidates: the next tie goes to another agent.
            s.last_assigned_at = Some(now + chrono::Duration::microseconds(assigned as i64));
            versions[chosen] += 1;
            // Back in at its new key (other kinds' heaps see its version changed).
            if let Some(picker) = pickers.get_mut(needs) {
                picker.enter(&snapshots, chosen, &versions);
            }
            assigned += 1;
            free -= 1;
            Some(snapshots[chosen].id)
        });
        // Held from now on: counted against the agent's capacity until memory learns otherwise
        // (the assignment's rows, or — for a task the assignment no longer found ready — its
        // state read back).
        for (task, agent) in &planned {
            self.holders.insert(*task, *agent);
            *self.in_flight.entry(*agent).or_default() += 1;
        }
        planned
    }

    /// The ready coordination nodes (the leader runs them itself).
    pub fn ready_nodes(&self) -> Vec<TaskId> {
        self.queue.nodes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::coordination::NodeKind;

    fn state_of(status: TaskStatus, agent: Option<AgentId>) -> TaskState {
        TaskState {
            id: TaskId::new(),
            workflow_id: WorkflowId::new(),
            status,
            priority: crate::domain::Priority::Medium,
            kind: NodeKind::Task,
            capabilities: vec![],
            executor: "echo".into(),
            pinned_agent_id: None,
            agent_id: agent,
        }
    }

    #[test]
    fn holders_and_in_flight_follow_each_tasks_status() {
        let mut s = State::default();
        let a = AgentId::new();
        let mut t = state_of(TaskStatus::Ready, None);
        s.observe(&t);
        assert_eq!(s.counts(), (1, 0));
        t.status = TaskStatus::Assigned;
        t.agent_id = Some(a);
        s.observe(&t);
        assert_eq!((s.counts(), s.load_of(a)), ((0, 1), 1));
        t.status = TaskStatus::Running;
        s.observe(&t);
        assert_eq!(s.load_of(a), 1, "the same holder counts once");
        assert!(s.has_active(t.workflow_id));
        t.status = TaskStatus::Completed;
        s.observe(&t);
        assert_eq!((s.counts(), s.load_of(a)), ((0, 0), 0));
        assert!(!s.has_active(t.workflow_id));
        assert!(s.changed_lately(t.id));
    }

    #[test]
    fn the_in_memory_graph_names_the_direct_dependants() {
        let (root, left, right, join) =
            (TaskId::new(), TaskId::new(), TaskId::new(), TaskId::new());
        let g = Dependants::build([
            (
                join,
                "join".to_string(),
                vec!["left".to_string(), "right".to_string()],
                false,
            ),
            (root, "root".to_string(), vec![], false),
            (left, "left".to_string(), vec!["root".to_string()], false),
            (right, "right".to_string(), vec!["root".to_string()], false),
        ]);
        let mut of_root = g.of("root");
        of_root.sort();
        let mut expected = vec![left, right];
        expected.sort();
        assert_eq!(of_root, expected);
        assert_eq!(g.of("left"), vec![join]);
        assert!(g.of("join").is_empty());
        assert!(g.of("ghost").is_empty());
        // The join waits while either branch is unfinished, not once both are done.
        assert!(g.waits_on(join, |t| t == left));
        assert!(!g.waits_on(join, |t| t == root));
        assert!(
            !g.waits_on(TaskId::new(), |_| true),
            "unknown: checked in the database"
        );
        assert_eq!(g.of_id(left), vec![join]);
        assert!(g.of_id(TaskId::new()).is_empty());
    }

    #[test]
    fn a_held_task_finds_its_workflows_graph_while_it_is_held() {
        let mut s = State::default();
        let mut t = state_of(TaskStatus::Ready, None);
        let g = Arc::new(Dependants::build([(t.id, "t".to_string(), vec![], false)]));
        s.observe(&t);
        s.set_graph(t.workflow_id, g);
        assert!(s.graph_of_held(t.id).is_none(), "ready, not held");
        t.status = TaskStatus::Running;
        t.agent_id = Some(AgentId::new());
        s.observe(&t);
        assert!(s.graph_of_held(t.id).is_some());
        let stranger = state_of(TaskStatus::Running, t.agent_id);
        s.observe(&stranger);
        assert!(
            s.graph_of_held(stranger.id).is_none(),
            "its workflow's graph is not loaded"
        );
        t.status = TaskStatus::Completed;
        s.observe(&t);
        assert!(s.graph_of_held(t.id).is_none());
    }
}
