//! The leader's ready queue, kept in memory: every ready task, grouped by what it needs of an
//! agent (its [`Needs`]: capabilities, executor, a pinned agent), and within each group by
//! workflow. Taking the next task costs O(log n), whatever the backlog, and a group no free
//! agent can serve is never walked.
//!
//! Order (docs/architecture.md): within a group, the workflows take turns — each workflow's
//! best task, then each one's next — and a workflow whose best task has a higher priority goes
//! first; within a workflow, by priority, then readiness. Across groups, the candidate that has
//! waited longest for its turn (then the higher priority) goes first. Coordination nodes are
//! kept apart: the leader runs those itself.

use std::cmp::Reverse;
use std::collections::BTreeSet;

// foldhash rather than SipHash: the maps are keyed by ids omoi made and by needs (hashed with a
// per-process seed), and SipHash was half the cost of planning 10,000 tasks.
use foldhash::HashMap;

use super::coordination::NodeKind;
use super::{AgentId, Priority, TaskId, WorkflowId};

/// What a task needs of the agent that runs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Needs {
    /// Normalised (sorted) capabilities.
    pub capabilities: Vec<String>,
    pub executor: String,
    /// A handed-off task waits for this agent only.
    pub pinned: Option<AgentId>,
}

/// A ready task, as the queue knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyTask {
    pub id: TaskId,
    pub workflow: WorkflowId,
    pub priority: Priority,
    pub kind: NodeKind,
    pub needs: Needs,
}

/// Order within a workflow: priority (highest first), then readiness.
type InWorkflow = (Reverse<Priority>, u64, TaskId);
/// Order of the workflows of a group: their best task's priority, then their turn.
type Turn = (Reverse<Priority>, u64, WorkflowId);

#[derive(Debug, Default)]
struct Group {
    tasks: HashMap<WorkflowId, BTreeSet<InWorkflow>>,
    turns: BTreeSet<Turn>,
    turn_of: HashMap<WorkflowId, Turn>,
    len: usize,
}

impl Group {
    /// Puts `workflow` in the turn order at turn `turn`, keyed by its best task.
    fn rekey_at(&mut self, workflow: WorkflowId, turn: u64) {
        if let Some(old) = self.turn_of.remove(&workflow) {
            self.turns.remove(&old);
        }
        let Some(best) = self.tasks.get(&workflow).and_then(|t| t.first()) else {
            return;
        };
        let key = (best.0, turn, workflow);
        self.turns.insert(key);
        self.turn_of.insert(workflow, key);
    }

    /// Re-keys `workflow` by its best task, keeping its turn number; a workflow not in the turn
    /// order (none yet, or served in the current plan) is left as it is.
    fn rekey(&mut self, workflow: WorkflowId) {
        if let Some(turn) = self.turn_of.get(&workflow).map(|t| t.1) {
            self.rekey_at(workflow, turn);
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    workflow: WorkflowId,
    /// `None`: a coordination node.
    group: Option<usize>,
    priority: Priority,
    seq: u64,
}

/// Every ready task of the running workflows.
#[derive(Debug, Default)]
pub struct ReadyQueue {
    needs: Vec<Needs>,
    group_of: HashMap<Needs, usize>,
    groups: Vec<Group>,
    entries: HashMap<TaskId, Entry>,
    nodes: BTreeSet<(u64, TaskId)>,
    next_seq: u64,
    next_turn: u64,
}

impl ReadyQueue {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, id: TaskId) -> bool {
        self.entries.contains_key(&id)
    }

    /// Adds a ready task (again: no change).
    pub fn insert(&mut self, task: ReadyTask) {
        if self.entries.contains_key(&task.id) {
            return;
        }
        self.next_seq += 1;
        let seq = self.next_seq;
        if task.kind != NodeKind::Task {
            self.nodes.insert((seq, task.id));
            self.entries.insert(
                task.id,
                Entry {
                    workflow: task.workflow,
                    group: None,
                    priority: task.priority,
                    seq,
                },
            );
            return;
        }
        let g = match self.group_of.get(&task.needs) {
            Some(g) => *g,
            None => {
                self.needs.push(task.needs.clone());
                self.groups.push(Group::default());
                let g = self.groups.len() - 1;
                self.group_of.insert(task.needs.clone(), g);
                g
            }
        };
        self.entries.insert(
            task.id,
            Entry {
                workflow: task.workflow,
                group: Some(g),
                priority: task.priority,
                seq,
            },
        );
        self.next_turn += 1;
        let turn = self.next_turn;
        let group = &mut self.groups[g];
        group.tasks.entry(task.workflow).or_default().insert((
            Reverse(task.priority),
            seq,
            task.id,
        ));
        group.len += 1;
        if group.turn_of.contains_key(&task.workflow) {
            group.rekey(task.workflow);
        } else {
            group.rekey_at(task.workflow, turn);
        }
    }

    /// Drops a task (no longer ready); unknown ids are ignored.
    pub fn remove(&mut self, id: TaskId) {
        let Some(entry) = self.entries.remove(&id) else {
            return;
        };
        let Some(g) = entry.group else {
            self.nodes.remove(&(entry.seq, id));
            return;
        };
        let group = &mut self.groups[g];
        if let Some(set) = group.tasks.get_mut(&entry.workflow) {
            set.remove(&(Reverse(entry.priority), entry.seq, id));
            group.len -= 1;
            if set.is_empty() {
                group.tasks.remove(&entry.workflow);
            }
        }
        group.rekey(entry.workflow);
    }

    /// The ready coordination nodes, oldest first (they stay until removed).
    pub fn nodes(&self) -> Vec<TaskId> {
        self.nodes.iter().map(|(_, id)| *id).collect()
    }

    /// Plans up to `max` tasks onto agents, in the queue's order: round-robin, every
    /// workflow's best task before any workflow's second. `pick` is asked for an agent for a
    /// group's needs (and counts the assignment itself); once it finds none, that group is not
    /// asked again in this plan. Planned tasks leave the queue.
    pub fn plan(
        &mut self,
        max: usize,
        mut pick: impl FnMut(&Needs) -> Option<AgentId>,
    ) -> Vec<(TaskId, AgentId)> {
        let n = self.groups.len();
        let mut planned = Vec::new();
        let mut full = vec![false; n];
        let mut round = vec![0u32; n];
        // Workflows served in a group's current round wait here for its next one.
        let mut served: Vec<Vec<WorkflowId>> = vec![Vec::new(); n];
        while planned.len() < max {
            for g in 0..n {
                if !full[g] && self.groups[g].turns.is_empty() && !served[g].is_empty() {
                    round[g] += 1;
                    for workflow in std::mem::take(&mut served[g]) {
                        self.next_turn += 1;
                        self.groups[g].rekey_at(workflow, self.next_turn);
                    }
                }
            }
            let next = self
                .groups
                .iter()
                .enumerate()
                .filter(|(g, _)| !full[*g])
                .filter_map(|(g, group)| group.turns.first().map(|t| (round[g], t.0, t.1, g)))
                .min();
            let Some((_, _, _, g)) = next else { break };
            let Some(agent) = pick(&self.needs[g]) else {
                full[g] = true;
                continue;
            };
            let group = &self.groups[g];
            let Some(&(_, _, workflow)) = group.turns.first() else {
                break;
            };
            let Some(&(_, _, task)) = group.tasks.get(&workflow).and_then(|t| t.first()) else {
                break;
            };
            self.remove(task);
            let group = &mut self.groups[g];
            if let Some(key) = group.turn_of.remove(&workflow) {
                group.turns.remove(&key);
                served[g].push(workflow);
            }
            planned.push((task, agent));
        }
        // Served workflows go behind the others for the next plan.
        for (g, workflows) in served.into_iter().enumerate() {
            for workflow in workflows {
                self.next_turn += 1;
                self.groups[g].rekey_at(workflow, self.next_turn);
            }
        }
        planned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needs(caps: &[&str]) -> Needs {
        Needs {
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
            executor: "echo".into(),
            pinned: None,
        }
    }

    fn task(workflow: WorkflowId, priority: Priority, caps: &[&str]) -> ReadyTask {
        ReadyTask {
            id: TaskId::new(),
            workflow,
            priority,
            kind: NodeKind::Task,
            needs: needs(caps),
        }
    }

    #[test]
    fn workflows_take_turns_and_priority_goes_first() {
        let (big, small) = (WorkflowId::new(), WorkflowId::new());
        let mut q = ReadyQueue::default();
        let big_tasks: Vec<ReadyTask> = (0..5).map(|_| task(big, Priority::Medium, &[])).collect();
        for t in &big_tasks {
            q.insert(t.clone());
        }
        let s1 = task(small, Priority::Medium, &[]);
        let urgent = task(small, Priority::Critical, &[]);
        q.insert(s1.clone());
        q.insert(urgent.clone());
        let agent = AgentId::new();
        let order: Vec<TaskId> = q
            .plan(4, |_| Some(agent))
            .into_iter()
            .map(|p| p.0)
            .collect();
        // The small workflow's critical task first, then the workflows alternate.
        assert_eq!(
            order,
            vec![urgent.id, big_tasks[0].id, s1.id, big_tasks[1].id]
        );
        assert_eq!(q.len(), 3);
    }

    #[test]
    fn a_group_no_agent_can_serve_is_skipped_without_blocking_others() {
        let wf = WorkflowId::new();
        let mut q = ReadyQueue::default();
        let gpu: Vec<ReadyTask> = (0..100)
            .map(|_| task(wf, Priority::High, &["gpu"]))
            .collect();
        for t in &gpu {
            q.insert(t.clone());
        }
        let cpu = task(wf, Priority::Low, &["cpu"]);
        q.insert(cpu.clone());
        let agent = AgentId::new();
        let mut asked_gpu = 0;
        let planned = q.plan(10, |n| {
            if n.capabilities == ["gpu"] {
                asked_gpu += 1;
                None
            } else {
                Some(agent)
            }
        });
        assert_eq!(planned, vec![(cpu.id, agent)]);
        assert_eq!(asked_gpu, 1, "a full group is asked once per plan");
        assert_eq!(q.len(), 100);
    }

    #[test]
    fn removal_and_nodes_are_exact() {
        let wf = WorkflowId::new();
        let mut q = ReadyQueue::default();
        let a = task(wf, Priority::Medium, &[]);
        let b = task(wf, Priority::Medium, &[]);
        let node = ReadyTask {
            kind: NodeKind::Sync,
            ..task(wf, Priority::Medium, &[])
        };
        q.insert(a.clone());
        q.insert(a.clone());
        q.insert(b.clone());
        q.insert(node.clone());
        assert_eq!(q.len(), 3);
        assert_eq!(q.nodes(), vec![node.id]);
        q.remove(a.id);
        let agent = AgentId::new();
        assert_eq!(q.plan(10, |_| Some(agent)), vec![(b.id, agent)]);
        assert_eq!(q.len(), 1, "the node is not planned onto agents");
        q.remove(node.id);
        assert!(q.is_empty() && q.nodes().is_empty());
    }
}
