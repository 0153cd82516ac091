//! Best-fit ranking of agents for a set of required capabilities: a pure function over agent
//! snapshots, shared by the registry's search and the scheduler's dispatch.
//!
//! Score (documented in docs/registry.md), each term in [0, 1]:
//!
//! ```text
//! score = 1.00 · coverage        matched required capabilities / required (1 if none required)
//!       + 0.30 · free capacity   (capacity − load) / capacity
//!       + 0.20 · health          healthy 1, degraded status 0.5, anything else 0
//!       + 0.10 · freshness       1 − heartbeat age / stale window (clamped)
//!       + 0.10 · preferred tags  preferred tags present / preferred tags (0 if none asked)
//! ```
//! Ties (equal score) go to the lower load, then the agent assigned least recently (never
//! assigned first), then name, then id — deterministic, and spreading repeated dispatches.

use std::cmp::Ordering;

use chrono::{DateTime, Utc};

use super::{AgentId, AgentStatus, HealthStatus};

pub const W_COVERAGE: f64 = 1.0;
pub const W_FREE_CAPACITY: f64 = 0.3;
pub const W_HEALTH: f64 = 0.2;
pub const W_FRESHNESS: f64 = 0.1;
pub const W_TAGS: f64 = 0.1;

/// What ranking needs to know about one agent.
#[derive(Debug, Clone)]
pub struct AgentSnapshot<'a> {
    pub id: AgentId,
    pub name: &'a str,
    pub agent_type: &'a str,
    pub phase_id: Option<&'a str>,
    /// Normalised (sorted, de-duplicated).
    pub capabilities: &'a [String],
    pub tags: &'a [String],
    /// Executors it runs (`*` = any).
    pub executors: &'a [String],
    pub capacity: i32,
    pub load: i32,
    pub status: AgentStatus,
    pub health: HealthStatus,
    pub last_heartbeat: Option<DateTime<Utc>>,
    pub last_assigned_at: Option<DateTime<Utc>>,
}

/// What is searched for.
#[derive(Debug, Clone, Default)]
pub struct Requirements {
    /// Normalised required capabilities.
    pub capabilities: Vec<String>,
    /// Normalised tags that raise the score when present.
    pub preferred_tags: Vec<String>,
    pub agent_type: Option<String>,
    pub phase_id: Option<String>,
    /// Also return agents that have only some of the capabilities (ranked by coverage).
    pub partial: bool,
    /// Only agents that run this executor.
    pub executor: Option<String>,
}

/// One ranked candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    /// Index into the slice passed to [`rank`].
    pub index: usize,
    pub score: f64,
    pub matched: Vec<String>,
}

impl AgentSnapshot<'_> {
    pub fn free_capacity(&self) -> i32 {
        (self.capacity - self.load).max(0)
    }

    /// May be given work at all: a live, dispatchable, healthy-enough agent with a free slot.
    pub fn is_available(&self) -> bool {
        self.status.is_dispatchable()
            && matches!(self.health, HealthStatus::Healthy)
            && self.free_capacity() > 0
    }
}

fn covered(required: &[String], have: &[String]) -> Vec<String> {
    required
        .iter()
        .filter(|c| have.binary_search(c).is_ok())
        .cloned()
        .collect()
}

/// Scores one agent, or `None` if it is not a candidate for `req`; with the capabilities it
/// matched.
pub fn score(
    agent: &AgentSnapshot<'_>,
    req: &Requirements,
    now: DateTime<Utc>,
    stale_after_ms: i64,
) -> Option<(f64, Vec<String>)> {
    let s = score_only(agent, req, now, stale_after_ms)?;
    Some((s, covered(&req.capabilities, agent.capabilities)))
}

/// [`score`] without the matched list (allocates nothing: a [`Picker`] calls it each time it
/// keys an agent).
pub fn score_only(
    agent: &AgentSnapshot<'_>,
    req: &Requirements,
    now: DateTime<Utc>,
    stale_after_ms: i64,
) -> Option<f64> {
    if !agent.is_available() {
        return None;
    }
    if req
        .agent_type
        .as_deref()
        .is_some_and(|t| t != agent.agent_type)
    {
        return None;
    }
    if req.phase_id.is_some() && req.phase_id.as_deref() != agent.phase_id {
        return None;
    }
    if req
        .executor
        .as_deref()
        .is_some_and(|e| !super::agent::offers(agent.executors, e))
    {
        return None;
    }
    let matched = req
        .capabilities
        .iter()
        .filter(|c| agent.capabilities.binary_search(c).is_ok())
        .count();
    let coverage = if req.capabilities.is_empty() {
        1.0
    } else {
        matched as f64 / req.capabilities.len() as f64
    };
    // A partial match counts only when asked for, and only if it covers something.
    let partial_ok = req.partial && matched > 0;
    if coverage < 1.0 && !partial_ok {
        return None;
    }
    let free = f64::from(agent.free_capacity()) / f64::from(agent.capacity.max(1));
    let health = match (agent.health, agent.status) {
        (HealthStatus::Healthy, AgentStatus::Degraded) => 0.5,
        (HealthStatus::Healthy, _) => 1.0,
        _ => 0.0,
    };
    let freshness = match agent.last_heartbeat {
        Some(t) if stale_after_ms > 0 => {
            let age = (now - t).num_milliseconds().max(0) as f64;
            (1.0 - age / stale_after_ms as f64).clamp(0.0, 1.0)
        }
        _ => 0.0,
    };
    let tags = if req.preferred_tags.is_empty() {
        0.0
    } else {
        req.preferred_tags
            .iter()
            .filter(|t| agent.tags.binary_search(t).is_ok())
            .count() as f64
            / req.preferred_tags.len() as f64
    };
    let score = W_COVERAGE * coverage
        + W_FREE_CAPACITY * free
        + W_HEALTH * health
        + W_FRESHNESS * freshness
        + W_TAGS * tags;
    Some(score)
}

/// Ranks candidates best first. Cost: one pass plus a sort of the candidates.
pub fn rank(
    agents: &[AgentSnapshot<'_>],
    req: &Requirements,
    now: DateTime<Utc>,
    stale_after_ms: i64,
) -> Vec<Ranked> {
    let mut ranked: Vec<Ranked> = agents
        .iter()
        .enumerate()
        .filter_map(|(index, a)| {
            score(a, req, now, stale_after_ms).map(|(score, matched)| Ranked {
                index,
                score,
                matched,
            })
        })
        .collect();
    ranked.sort_by(|x, y| order(&agents[x.index], x.score, &agents[y.index], y.score));
    ranked
}

/// Ranking order: higher score first; ties to the lower load, the one assigned least recently
/// (never first), then name, then id.
fn order(a: &AgentSnapshot<'_>, a_score: f64, b: &AgentSnapshot<'_>, b_score: f64) -> Ordering {
    b_score
        .partial_cmp(&a_score)
        .unwrap_or(Ordering::Equal)
        .then(a.load.cmp(&b.load))
        .then(a.last_assigned_at.cmp(&b.last_assigned_at))
        .then(a.name.cmp(b.name))
        .then(a.id.cmp(&b.id))
}

/// The first of [`rank`], among the agents at `candidates` only, without sorting them all: what
/// a [`Picker`] must agree with (the scheduler picks through one).
#[cfg(test)]
pub fn best(
    agents: &[AgentSnapshot<'_>],
    candidates: impl IntoIterator<Item = usize>,
    req: &Requirements,
    now: DateTime<Utc>,
    stale_after_ms: i64,
) -> Option<usize> {
    let mut winner: Option<(usize, f64)> = None;
    for i in candidates {
        let Some(a) = agents.get(i) else { continue };
        let Some(s) = score_only(a, req, now, stale_after_ms) else {
            continue;
        };
        let better = match winner {
            None => true,
            Some((w, ws)) => order(a, s, &agents[w], ws) == Ordering::Less,
        };
        if better {
            winner = Some((i, s));
        }
    }
    winner.map(|(i, _)| i)
}

/// Picks the best agent for one kind of task again and again while the agents' loads change
/// (a dispatch round): the candidates in a heap, keyed by [`rank`]'s order. Taking a task only
/// makes an agent's key worse (less free capacity, assigned later), so an entry gone stale
/// since it was pushed is never better than it shows: it is re-keyed when it surfaces. Each
/// pick costs O(log n) instead of a pass over every candidate.
pub struct Picker<'a> {
    heap: std::collections::BinaryHeap<Candidate<'a>>,
    req: Requirements,
    /// The plan's clock and freshness window (fixed while it runs).
    now: DateTime<Utc>,
    stale_after_ms: i64,
}

/// An agent's key in a [`Picker`] (greater: better), and the version of the agent it was
/// computed at.
#[derive(Debug, Clone)]
struct Candidate<'a> {
    score: f64,
    load: i32,
    last_assigned_at: Option<DateTime<Utc>>,
    name: &'a str,
    id: AgentId,
    index: usize,
    version: u32,
}

impl Ord for Candidate<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.load.cmp(&self.load))
            .then(other.last_assigned_at.cmp(&self.last_assigned_at))
            .then(other.name.cmp(self.name))
            .then(other.id.cmp(&self.id))
    }
}

impl PartialOrd for Candidate<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate<'_> {}

impl<'a> Picker<'a> {
    /// The agents at `candidates` that can take work meeting `req` now.
    pub fn new(
        agents: &[AgentSnapshot<'a>],
        candidates: impl IntoIterator<Item = usize>,
        versions: &[u32],
        req: Requirements,
        now: DateTime<Utc>,
        stale_after_ms: i64,
    ) -> Self {
        let mut picker = Self {
            heap: std::collections::BinaryHeap::new(),
            req,
            now,
            stale_after_ms,
        };
        for i in candidates {
            picker.enter(agents, i, versions);
        }
        picker
    }

    /// (Re-)enters agent `i` at its current key, if it can take work: after it was given a
    /// task (the caller changed its load and bumped its version), or when its entry surfaced
    /// stale.
    pub fn enter(&mut self, agents: &[AgentSnapshot<'a>], i: usize, versions: &[u32]) {
        let Some(a) = agents.get(i) else { return };
        let Some(score) = score_only(a, &self.req, self.now, self.stale_after_ms) else {
            return;
        };
        self.heap.push(Candidate {
            score,
            load: a.load,
            last_assigned_at: a.last_assigned_at,
            name: a.name,
            id: a.id,
            index: i,
            version: versions.get(i).copied().unwrap_or(0),
        });
    }

    /// The best agent now, or `None`. The caller then changes that agent (its load), bumps
    /// its version in `versions`, and enters it again ([`Picker::enter`]).
    pub fn best(&mut self, agents: &[AgentSnapshot<'a>], versions: &[u32]) -> Option<usize> {
        while let Some(top) = self.heap.pop() {
            if versions.get(top.index).copied().unwrap_or(0) == top.version {
                return Some(top.index);
            }
            self.enter(agents, top.index, versions);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    struct Owned {
        id: AgentId,
        name: String,
        caps: Vec<String>,
        tags: Vec<String>,
        executors: Vec<String>,
        capacity: i32,
        load: i32,
        status: AgentStatus,
        health: HealthStatus,
        last_assigned_at: Option<DateTime<Utc>>,
    }

    impl Owned {
        fn new(name: &str, c: &[&str], capacity: i32, load: i32, status: AgentStatus) -> Self {
            Self {
                id: AgentId::new(),
                name: name.into(),
                caps: caps(c),
                tags: vec![],
                executors: vec!["echo".into()],
                capacity,
                load,
                status,
                health: HealthStatus::Healthy,
                last_assigned_at: None,
            }
        }
        fn snap(&self, now: DateTime<Utc>) -> AgentSnapshot<'_> {
            AgentSnapshot {
                id: self.id,
                name: &self.name,
                agent_type: "worker",
                phase_id: None,
                capabilities: &self.caps,
                tags: &self.tags,
                executors: &self.executors,
                capacity: self.capacity,
                load: self.load,
                status: self.status,
                health: self.health,
                last_heartbeat: Some(now),
                last_assigned_at: self.last_assigned_at,
            }
        }
    }

    fn names(agents: &[Owned], req: &Requirements) -> Vec<String> {
        let now = Utc::now();
        let snaps: Vec<_> = agents.iter().map(|a| a.snap(now)).collect();
        rank(&snaps, req, now, 3_000)
            .into_iter()
            .map(|r| agents[r.index].name.clone())
            .collect()
    }

    #[test]
    fn upstream_scenario_full_match_beats_partial_and_partial_only_on_request() {
        let agents = vec![
            Owned::new("partial", &["analysis"], 1, 1, AgentStatus::Running),
            Owned::new(
                "full",
                &["analysis", "fastapi", "python"],
                3,
                0,
                AgentStatus::Idle,
            ),
        ];
        let mut req = Requirements {
            capabilities: caps(&["analysis", "python"]),
            ..Requirements::default()
        };
        assert_eq!(names(&agents, &req), vec!["full"]);
        // The partial agent is also at full capacity: still excluded. Give it a free slot.
        let mut agents = agents;
        agents[0].capacity = 2;
        req.partial = true;
        assert_eq!(names(&agents, &req), vec!["full", "partial"]);
    }

    #[test]
    fn a_picker_chooses_as_a_full_pass_would_while_loads_change() {
        // Agents of different capacities and loads, one of another capability and one offline.
        let mut agents: Vec<Owned> = (0..12)
            .map(|i| {
                Owned::new(
                    &format!("a{i}"),
                    &["x"],
                    1 + (i % 5),
                    i % 3,
                    AgentStatus::Idle,
                )
            })
            .collect();
        agents.push(Owned::new("other", &["y"], 9, 0, AgentStatus::Idle));
        agents.push(Owned::new("gone", &["x"], 9, 0, AgentStatus::Offline));
        let now = Utc::now();
        let mut snaps: Vec<_> = agents.iter().map(|a| a.snap(now)).collect();
        let req = Requirements {
            capabilities: caps(&["x"]),
            ..Requirements::default()
        };
        let mut versions = vec![0u32; snaps.len()];
        let mut picker = Picker::new(&snaps, 0..snaps.len(), &versions, req.clone(), now, 3_000);
        let mut picks = 0;
        loop {
            let expected = best(&snaps, 0..snaps.len(), &req, now, 3_000);
            let got = picker.best(&snaps, &versions);
            assert_eq!(got, expected, "pick {picks}");
            let Some(i) = got else { break };
            snaps[i].load += 1;
            snaps[i].last_assigned_at = Some(now + chrono::Duration::microseconds(picks));
            versions[i] += 1;
            picker.enter(&snaps, i, &versions);
            picks += 1;
        }
        let room: i32 = agents[..12]
            .iter()
            .map(|a| (a.capacity - a.load).max(0))
            .sum();
        assert_eq!(
            picks,
            i64::from(room),
            "every free slot of a fitting agent, and no more"
        );
    }

    #[test]
    fn best_is_the_first_of_the_ranking() {
        let mut agents = [
            Owned::new("busy", &["x"], 4, 3, AgentStatus::Running),
            Owned::new("free", &["x"], 4, 0, AgentStatus::Idle),
            Owned::new("other", &["y"], 4, 0, AgentStatus::Idle),
        ];
        agents[2].executors = vec!["echo".into()];
        let now = Utc::now();
        let snaps: Vec<_> = agents.iter().map(|a| a.snap(now)).collect();
        let req = Requirements {
            capabilities: caps(&["x"]),
            ..Requirements::default()
        };
        let ranked = rank(&snaps, &req, now, 3_000);
        assert_eq!(
            best(&snaps, 0..snaps.len(), &req, now, 3_000),
            Some(ranked[0].index)
        );
        assert_eq!(agents[ranked[0].index].name, "free");
        assert_eq!(best(&snaps, [0], &req, now, 3_000), Some(0));
        assert_eq!(best(&snaps, [2], &req, now, 3_000), None);
    }

    #[test]
    fn only_agents_offering_the_executor_are_candidates() {
        let mut agents = vec![
            Owned::new("echo-only", &["x"], 2, 0, AgentStatus::Idle),
            Owned::new("shell", &["x"], 2, 0, AgentStatus::Idle),
            Owned::new("anything", &["x"], 2, 0, AgentStatus::Idle),
        ];
        agents[1].executors = vec!["echo".into(), "shell".into()];
        agents[2].executors = vec!["*".into()];
        let req = Requirements {
            executor: Some("shell".into()),
            ..Requirements::default()
        };
        let mut got = names(&agents, &req);
        got.sort();
        assert_eq!(got, vec!["anything", "shell"]);
    }

    #[test]
    fn unavailable_agents_are_never_candidates() {
        let mut agents = vec![
            Owned::new("full-capacity", &["x"], 2, 2, AgentStatus::Running),
            Owned::new("stale", &["x"], 2, 0, AgentStatus::Stale),
            Owned::new("maintenance", &["x"], 2, 0, AgentStatus::Maintenance),
            Owned::new("quarantined", &["x"], 2, 0, AgentStatus::Quarantined),
            Owned::new("offline", &["x"], 2, 0, AgentStatus::Offline),
            Owned::new("ok", &["x"], 2, 1, AgentStatus::Running),
        ];
        agents[1].health = HealthStatus::Stale;
        let req = Requirements {
            capabilities: caps(&["x"]),
            partial: true,
            ..Requirements::default()
        };
        assert_eq!(names(&agents, &req), vec!["ok"]);
    }

    #[test]
    fn free_capacity_not_raw_capacity_wins_and_ties_spread_work() {
        let agents = vec![
            Owned::new("big-busy", &["x"], 10, 9, AgentStatus::Running),
            Owned::new("small-free", &["x"], 2, 0, AgentStatus::Idle),
        ];
        let req = Requirements {
            capabilities: caps(&["x"]),
            ..Requirements::default()
        };
        assert_eq!(names(&agents, &req)[0], "small-free");

        let now = Utc::now();
        let mut twins = vec![
            Owned::new("b", &["x"], 1, 0, AgentStatus::Idle),
            Owned::new("a", &["x"], 1, 0, AgentStatus::Idle),
        ];
        twins[1].last_assigned_at = Some(now);
        assert_eq!(names(&twins, &req)[0], "b", "least recently assigned first");
        twins[0].last_assigned_at = Some(now + chrono::Duration::seconds(1));
        assert_eq!(names(&twins, &req)[0], "a");
    }

    #[test]
    fn preferred_tags_raise_the_score() {
        let mut agents = vec![
            Owned::new("plain", &["x"], 1, 0, AgentStatus::Idle),
            Owned::new("gpu", &["x"], 1, 0, AgentStatus::Idle),
        ];
        agents[1].tags = caps(&["gpu"]);
        let req = Requirements {
            capabilities: caps(&["x"]),
            preferred_tags: caps(&["gpu"]),
            ..Requirements::default()
        };
        assert_eq!(names(&agents, &req)[0], "gpu");
    }
}
