//! Workflow submissions and their validation: the DAG is checked whole (duplicate keys,
//! unknown dependencies, cycles with their path, bad references) before anything is stored.
//!
//! Context passing: a string value anywhere in a task's `input` of the exact form
//! `${deps.<key>.output}` or `${deps.<key>.output.<field>.<field>…}` is replaced, when the task is
//! dispatched, by that dependency's output (or the field inside it). `<key>` must be one of the
//! task's `depends_on`.

use std::collections::{BTreeMap, HashMap, HashSet};

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};
use serde::{Deserialize, Serialize};

use super::Priority;
use super::agent::normalize_capabilities;
use super::coordination::{Join, LoopSpec, MergeSpec, NodeKind, SplitSpec, SyncSpec, check_node};

/// Most tasks in one workflow.
pub const MAX_TASKS: usize = 100_000;

/// What to do with the rest of a workflow when a task fails for good.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Fail the workflow: cancel every unfinished task.
    #[default]
    FailFast,
    /// Fail only the failed task's dependants; independent branches go on.
    Continue,
}

impl FailurePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FailFast => "fail_fast",
            Self::Continue => "continue",
        }
    }
}

/// Lock mode of a task's resource.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ResourceMode {
    #[default]
    Exclusive,
    Shared,
}

/// A resource a task locks while it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ResourceSpec {
    pub name: String,
    #[serde(default)]
    pub mode: ResourceMode,
}

pub(crate) fn default_executor() -> String {
    "echo".into()
}
pub(crate) fn default_max_attempts() -> i32 {
    3
}
pub(crate) fn empty_object() -> serde_json::Value {
    serde_json::json!({})
}

/// One task of a submission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub key: String,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default = "default_executor")]
    pub executor: String,
    #[serde(default = "empty_object")]
    pub input: serde_json::Value,
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default)]
    pub resources: Vec<ResourceSpec>,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default = "default_max_attempts")]
    pub max_attempts: i32,
    #[serde(default)]
    pub timeout_seconds: Option<i32>,
    /// How many dependencies must complete first (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<Join>,
    /// Makes this a sync point (run by the coordinator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncSpec>,
    /// Makes this a merge of its dependencies' outputs (run by the coordinator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeSpec>,
    /// Makes this a split: one child task per item (run by the coordinator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<SplitSpec>,
    /// Makes this a bounded loop over a sub-graph (run by the coordinator).
    #[serde(default, rename = "loop", skip_serializing_if = "Option::is_none")]
    pub repeat: Option<LoopSpec>,
}

impl TaskSpec {
    /// A task with this key and every other field at its default.
    pub fn new(key: String) -> Self {
        Self {
            key,
            capabilities: Vec::new(),
            executor: default_executor(),
            input: empty_object(),
            depends_on: Vec::new(),
            resources: Vec::new(),
            priority: Priority::default(),
            max_attempts: default_max_attempts(),
            timeout_seconds: None,
            join: None,
            sync: None,
            merge: None,
            split: None,
            repeat: None,
        }
    }

    /// Whether an agent runs it, or which coordination node it is.
    pub fn kind(&self) -> NodeKind {
        check_node(self).unwrap_or(NodeKind::Task)
    }
}

/// A workflow submission (`POST /api/v1/workflows`, `<ns>.workflow.submit`, `omoi submit`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowSpec {
    /// Protocol version (1); any other is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    pub name: String,
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    pub tasks: Vec<TaskSpec>,
}

/// Why a submission was rejected. Each names what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DagError {
    #[error("workflow has a dependency cycle: {}", .0.join(" → "))]
    Cycle(Vec<String>),
    #[error("task `{task}` depends on unknown task `{dependency}`")]
    UnknownDependency { task: String, dependency: String },
    #[error("task key `{0}` is used more than once")]
    DuplicateKey(String),
    #[error("task `{task}`: {field}: {message}")]
    InvalidTask {
        task: String,
        field: &'static str,
        message: String,
    },
    #[error("{field}: {message}")]
    InvalidWorkflow {
        field: &'static str,
        message: String,
    },
}

impl DagError {
    /// The field a client should fix.
    pub fn field(&self) -> String {
        match self {
            Self::Cycle(_) | Self::UnknownDependency { .. } => "tasks.depends_on".into(),
            Self::DuplicateKey(_) => "tasks.key".into(),
            Self::InvalidTask { field, .. } => format!("tasks.{field}"),
            Self::InvalidWorkflow { field, .. } => (*field).into(),
        }
    }
}

/// A validated workflow: tasks with normalised capabilities, in topological order.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidWorkflow {
    pub spec: WorkflowSpec,
    /// Indices into `spec.tasks`, dependencies before dependants.
    pub topo_order: Vec<usize>,
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 128
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-:/".contains(c))
}

/// Validates a submission; returns it normalised, or the first problem found.
pub fn validate(mut spec: WorkflowSpec) -> Result<ValidWorkflow, DagError> {
    if spec.name.trim().is_empty() || spec.name.len() > 200 {
        return Err(DagError::InvalidWorkflow {
            field: "name",
            message: "must be 1 to 200 characters".into(),
        });
    }
    if spec.tasks.is_empty() || spec.tasks.len() > MAX_TASKS {
        return Err(DagError::InvalidWorkflow {
            field: "tasks",
            message: format!("must hold 1 to {MAX_TASKS} tasks, got {}", spec.tasks.len()),
        });
    }
    let mut index: HashMap<String, usize> = HashMap::with_capacity(spec.tasks.len());
    for (i, t) in spec.tasks.iter_mut().enumerate() {
        let bad = |field, message: String| DagError::InvalidTask {
            task: t.key.clone(),
            field,
            message,
        };
        if !valid_key(&t.key) {
            return Err(bad(
                "key",
                "must be 1 to 128 of A-Z a-z 0-9 . _ - : /".into(),
            ));
        }
        if index.insert(t.key.clone(), i).is_some() {
            return Err(DagError::DuplicateKey(t.key.clone()));
        }
        t.capabilities = normalize_capabilities(&t.capabilities)
            .map_err(|e| bad("capabilities", e.to_string()))?;
        if !(1..=100).contains(&t.max_attempts) {
            return Err(bad(
                "max_attempts",
                format!("must be 1 to 100, got {}", t.max_attempts),
            ));
        }
        if t.timeout_seconds
            .is_some_and(|s| !(1..=86_400 * 7).contains(&s))
        {
            return Err(bad("timeout_seconds", "must be 1 to 604800".into()));
        }
        // Agents' executor names are normalised like capabilities; a task's must be too, or a
        // task naming `LLM` would wait for ever for agents offering `llm`.
        t.executor = normalize_capabilities(&[t.executor.as_str()])
            .map_err(|e| bad("executor", e.to_string()))?
            .pop()
            .unwrap_or_default();
        let mut seen = HashSet::new();
        for r in &t.resources {
            if r.name.is_empty()
                || r.name.len() > 200
                || r.name.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(bad("resources", format!("bad resource name `{}`", r.name)));
            }
            if !seen.insert(r.name.clone()) {
                return Err(bad(
                    "resources",
                    format!("resource `{}` listed twice", r.name),
                ));
            }
        }
        let mut deps = HashSet::new();
        for d in &t.depends_on {
            if !deps.insert(d) {
                return Err(bad("depends_on", format!("`{d}` listed twice")));
            }
        }
        check_node(t).map_err(|(field, message)| bad(field, message))?;
    }
    // Splits and loops key what they insert `<key>/…`: no submitted key may take that space.
    for t in &spec.tasks {
        if t.split.is_none() && t.repeat.is_none() {
            continue;
        }
        let prefix = format!("{}/", t.key);
        if let Some(clash) = spec.tasks.iter().find(|o| o.key.starts_with(&prefix)) {
            return Err(DagError::InvalidTask {
                task: clash.key.clone(),
                field: "key",
                message: format!(
                    "keys under `{prefix}` are reserved for what `{}` inserts",
                    t.key
                ),
            });
        }
    }
    let mut graph: DiGraph<usize, ()> = DiGraph::with_capacity(spec.tasks.len(), spec.tasks.len());
    let nodes: Vec<NodeIndex> = (0..spec.tasks.len()).map(|i| graph.add_node(i)).collect();
    for (i, t) in spec.tasks.iter().enumerate() {
        for d in &t.depends_on {
            let Some(&j) = index.get(d) else {
                return Err(DagError::UnknownDependency {
                    task: t.key.clone(),
                    dependency: d.clone(),
                });
            };
            graph.add_edge(nodes[j], nodes[i], ());
        }
        for key in references(&t.input) {
            if !t.depends_on.contains(&key) {
                return Err(DagError::InvalidTask {
                    task: t.key.clone(),
                    field: "input",
                    message: format!(
                        "references `${{deps.{key}…}}` but does not depend on `{key}`"
                    ),
                });
            }
        }
    }
    let topo_order = match petgraph::algo::toposort(&graph, None) {
        Ok(order) => order.into_iter().map(|n| graph[n]).collect(),
        Err(_) => return Err(DagError::Cycle(find_cycle(&graph, &spec.tasks))),
    };
    Ok(ValidWorkflow { spec, topo_order })
}

/// A cycle's task keys in dependency order, the first repeated at the end (`a → b → a`).
fn find_cycle(graph: &DiGraph<usize, ()>, tasks: &[TaskSpec]) -> Vec<String> {
    for scc in tarjan_scc(graph) {
        let self_loop = scc.len() == 1 && graph.contains_edge(scc[0], scc[0]);
        if scc.len() < 2 && !self_loop {
            continue;
        }
        let members: HashSet<NodeIndex> = scc.iter().copied().collect();
        // Walk edges inside the component from its smallest key until a node repeats.
        let start = *scc
            .iter()
            .min_by_key(|n| &tasks[graph[**n]].key)
            .unwrap_or(&scc[0]);
        let mut path = vec![start];
        let mut seen: HashMap<NodeIndex, usize> = HashMap::from([(start, 0)]);
        let mut node = start;
        while let Some(next) = graph
            .neighbors(node)
            .filter(|n| members.contains(n))
            .min_by_key(|n| &tasks[graph[*n]].key)
        {
            if let Some(&at) = seen.get(&next) {
                let mut cycle: Vec<String> = path[at..]
                    .iter()
                    .map(|n| tasks[graph[*n]].key.clone())
                    .collect();
                cycle.push(tasks[graph[next]].key.clone());
                return cycle;
            }
            seen.insert(next, path.len());
            path.push(next);
            node = next;
        }
    }
    Vec::new()
}

/// Dependency keys referenced by `${deps.<key>…}` strings inside `value`.
pub fn references(value: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(value, &mut |s| {
        if let Some((key, _)) = parse_reference(s) {
            out.push(key.to_string());
        }
    });
    out.sort();
    out.dedup();
    out
}

pub(crate) fn walk(value: &serde_json::Value, f: &mut impl FnMut(&str)) {
    match value {
        serde_json::Value::String(s) => f(s),
        serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, f)),
        serde_json::Value::Object(map) => map.values().for_each(|v| walk(v, f)),
        _ => {}
    }
}

/// The dependency key a `${deps.KEY.output…}` string reads, if it is one.
pub fn reference_key(s: &str) -> Option<&str> {
    parse_reference(s).map(|(k, _)| k)
}

/// `${deps.KEY.output[.a.b]}` → (KEY, [a, b]).
fn parse_reference(s: &str) -> Option<(&str, Vec<&str>)> {
    let inner = s.strip_prefix("${deps.")?.strip_suffix('}')?;
    let (key, rest) = inner.split_once(".output")?;
    let path = match rest {
        "" => vec![],
        r => r.strip_prefix('.')?.split('.').collect(),
    };
    Some((key, path))
}

/// Replaces every `${deps.…}` reference in `input` with the referenced output (or `null` when
/// the output lacks the field).
pub fn resolve_input(
    input: &serde_json::Value,
    outputs: &BTreeMap<String, serde_json::Value>,
) -> serde_json::Value {
    map_strings(input, &mut |s| {
        let (key, path) = parse_reference(s)?;
        let output = outputs.get(key).unwrap_or(&serde_json::Value::Null);
        Some(select(output, &path).clone())
    })
}

/// Applies `f` to every string in `v`; a string `f` maps to `Some` is replaced whole.
pub(crate) fn map_strings(
    v: &serde_json::Value,
    f: &mut impl FnMut(&str) -> Option<serde_json::Value>,
) -> serde_json::Value {
    match v {
        serde_json::Value::String(s) => f(s).unwrap_or_else(|| v.clone()),
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.iter().map(|x| map_strings(x, f)).collect())
        }
        serde_json::Value::Object(m) => serde_json::Value::Object(
            m.iter()
                .map(|(k, x)| (k.clone(), map_strings(x, f)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Follows a field path into a value (`null` where it does not lead anywhere; a numeric field
/// indexes a list).
pub fn select<'a>(mut v: &'a serde_json::Value, path: &[&str]) -> &'a serde_json::Value {
    for field in path {
        v = match v {
            serde_json::Value::Object(m) => m.get(*field).unwrap_or(&serde_json::Value::Null),
            serde_json::Value::Array(a) => field
                .parse::<usize>()
                .ok()
                .and_then(|i| a.get(i))
                .unwrap_or(&serde_json::Value::Null),
            _ => &serde_json::Value::Null,
        };
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(tasks: serde_json::Value) -> WorkflowSpec {
        serde_json::from_value(json!({"name": "w", "tasks": tasks})).unwrap()
    }

    #[test]
    fn a_cycle_is_rejected_with_its_keys_in_order() {
        let err = validate(spec(json!([
            {"key": "a", "depends_on": ["c"]},
            {"key": "b", "depends_on": ["a"]},
            {"key": "c", "depends_on": ["b"]},
            {"key": "d"}
        ])))
        .unwrap_err();
        // a depends on c: edges c → a → b → c.
        assert_eq!(
            err,
            DagError::Cycle(vec!["a".into(), "b".into(), "c".into(), "a".into()])
        );
        assert!(err.to_string().contains("a → b → c → a"));
        let self_loop = validate(spec(json!([{"key": "a", "depends_on": ["a"]}]))).unwrap_err();
        assert_eq!(self_loop, DagError::Cycle(vec!["a".into(), "a".into()]));
    }

    #[test]
    fn unknown_dependencies_and_duplicate_keys_are_named() {
        let err = validate(spec(json!([{"key": "a", "depends_on": ["ghost"]}]))).unwrap_err();
        assert_eq!(
            err,
            DagError::UnknownDependency {
                task: "a".into(),
                dependency: "ghost".into()
            }
        );
        let err = validate(spec(json!([{"key": "a"}, {"key": "a"}]))).unwrap_err();
        assert_eq!(err, DagError::DuplicateKey("a".into()));
    }

    #[test]
    fn a_diamond_orders_dependencies_first() {
        let v = validate(spec(json!([
            {"key": "join", "depends_on": ["left", "right"]},
            {"key": "left", "depends_on": ["root"]},
            {"key": "right", "depends_on": ["root"]},
            {"key": "root", "capabilities": ["Rust "]}
        ])))
        .unwrap();
        let keys: Vec<&str> = v
            .topo_order
            .iter()
            .map(|i| v.spec.tasks[*i].key.as_str())
            .collect();
        let pos = |k| keys.iter().position(|x| *x == k).unwrap();
        assert!(
            pos("root") < pos("left") && pos("left") < pos("join") && pos("right") < pos("join")
        );
        assert_eq!(v.spec.tasks[3].capabilities, vec!["rust"]);
        let v = validate(spec(json!([{"key": "a", "executor": " LLM"}]))).unwrap();
        assert_eq!(
            v.spec.tasks[0].executor, "llm",
            "named as agents' executors are"
        );
    }

    #[test]
    fn references_must_name_a_dependency_and_resolve_into_outputs() {
        let err = validate(spec(json!([
            {"key": "a"},
            {"key": "b", "input": {"x": "${deps.a.output.path}"}}
        ])))
        .unwrap_err();
        assert!(
            matches!(err, DagError::InvalidTask { field: "input", .. }),
            "{err}"
        );
        let outputs = BTreeMap::from([("a".to_string(), json!({"path": "/tmp/x", "n": [1, 2]}))]);
        let resolved = resolve_input(
            &json!({"x": "${deps.a.output.path}", "all": "${deps.a.output}", "second": "${deps.a.output.n.1}", "lit": "plain"}),
            &outputs,
        );
        assert_eq!(
            resolved,
            json!({"x": "/tmp/x", "all": {"path": "/tmp/x", "n": [1, 2]}, "second": 2, "lit": "plain"})
        );
    }

    #[test]
    fn bad_task_fields_are_rejected_with_the_field() {
        for (task, field) in [
            (json!({"key": "a", "max_attempts": 0}), "max_attempts"),
            (
                json!({"key": "a", "capabilities": ["bad token"]}),
                "capabilities",
            ),
            (json!({"key": "a b"}), "key"),
            (
                json!({"key": "a", "resources": [{"name": "r"}, {"name": "r"}]}),
                "resources",
            ),
            (json!({"key": "a", "timeout_seconds": 0}), "timeout_seconds"),
            (json!({"key": "a", "executor": ""}), "executor"),
            (json!({"key": "a", "executor": "two words"}), "executor"),
        ] {
            let err = validate(spec(json!([task]))).unwrap_err();
            assert_eq!(err.field(), format!("tasks.{field}"), "{err}");
        }
    }
}
