//! Coordination primitives — first-class nodes of a workflow that the coordinator runs itself
//! (no agent work): **sync** points, **merge**s, dynamic **split**s and bounded **loop**s, plus
//! the **join** strategy any task can use to wait for its dependencies.
//!
//! Everything stays acyclic as executed: a split, when it becomes ready, inserts one child per
//! item and then waits for its children (it becomes their join); a loop inserts one iteration
//! of its body at a time and waits for it, then decides whether to insert the next. Children are
//! ordinary task rows, so each iteration and each item is visible in the workflow and survives a
//! coordinator restart. The functions here are pure; the scheduler stores what they return.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::dag::{ResourceSpec, TaskSpec, map_strings, select, walk};

use super::merge::MergeStrategy;
use super::{Priority, TaskId};

/// Most items one split may fan out to.
pub const MAX_SPLIT_ITEMS: usize = 10_000;
/// Most iterations a loop may declare.
pub const MAX_LOOP_ITERATIONS: u32 = 100;

/// What kind of node a task is. `task` is run by an agent; the others by the coordinator.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    sqlx::Type,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum NodeKind {
    Task,
    Sync,
    Merge,
    Split,
    Loop,
}

impl NodeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Task => "task",
            Self::Sync => "sync",
            Self::Merge => "merge",
            Self::Split => "split",
            Self::Loop => "loop",
        }
    }
}

/// How many of a task's dependencies must complete before it runs: `"all"` (the default),
/// `"any"`, or `{"quorum": k}`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Join {
    #[default]
    All,
    Any,
    Quorum(u32),
}

impl Join {
    /// The number of completed dependencies required, or `None` for all of them.
    pub fn quorum(self) -> Option<u32> {
        match self {
            Self::All => None,
            Self::Any => Some(1),
            Self::Quorum(k) => Some(k),
        }
    }
}

/// What a sync point does when its timeout passes before its join is satisfied.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// The sync point fails (and the workflow's failure policy applies).
    #[default]
    Fail,
    /// The sync point completes with the sources that finished.
    Continue,
}

/// A sync point: waits for its dependencies per its `join`, optionally bounded in time. The
/// clock starts when the first of its sources starts running.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncSpec {
    #[serde(default)]
    pub timeout_seconds: Option<i32>,
    #[serde(default)]
    pub on_timeout: OnTimeout,
}

/// A merge: combines the outputs of its completed dependencies and stores the result as its
/// output (what its dependants receive).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeSpec {
    pub strategy: MergeStrategy,
    /// For `majority`: the field of each output that is voted on (the whole output if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// The task each item of a split becomes. In `input` and `capabilities`, the strings `${item}`,
/// `${item.<field>…}` and `${index}` are replaced per item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChildSpec {
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default = "super::dag::default_executor")]
    pub executor: String,
    #[serde(default = "super::dag::empty_object")]
    pub input: Value,
    #[serde(default)]
    pub resources: Vec<ResourceSpec>,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default = "super::dag::default_max_attempts")]
    pub max_attempts: i32,
    #[serde(default)]
    pub timeout_seconds: Option<i32>,
}

/// A split: one child task per item — a literal list, or (dynamic) the list found at a
/// `${deps.<key>.output…}` reference when the split becomes ready. Children depend on the
/// split's own dependencies; the split then completes when its children satisfy `join`, with
/// output `{"count": n, "outputs": [child outputs in item order]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {
    pub items: Value,
    pub task: ChildSpec,
    #[serde(default)]
    pub join: Join,
}

/// The test a loop applies to an output of its last iteration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// `<body key>` or `<body key>.<field>.<field>…` of the iteration just finished.
    pub output: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_equals: Option<Value>,
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<Value>>,
}

impl Condition {
    /// The body key the condition reads, and the field path inside its output.
    pub fn target(&self) -> (&str, Vec<&str>) {
        let mut parts = self.output.split('.');
        let key = parts.next().unwrap_or_default();
        (key, parts.collect())
    }

    fn tests(&self) -> usize {
        usize::from(self.equals.is_some())
            + usize::from(self.not_equals.is_some())
            + usize::from(self.one_of.is_some())
    }

    /// Whether the condition holds for `value` (the selected field of the output).
    pub fn holds(&self, value: &Value) -> bool {
        if let Some(v) = &self.equals {
            return value == v;
        }
        if let Some(v) = &self.not_equals {
            return value != v;
        }
        if let Some(vs) = &self.one_of {
            return vs.contains(value);
        }
        false
    }
}

/// A loop: runs `body` (a small DAG with its own keys), then again while `while` holds on the
/// last iteration's outputs, at most `max_iterations` times. Iteration `i`'s tasks are keyed
/// `<loop>/<i>/<body key>`. In the body, `${loop.iteration}` is the iteration (from 1) and
/// `${prev.<body key>.output…}` the previous iteration's output (`null` in the first).
/// Output: `{"iterations": n, "stopped": "condition" | "max_iterations", "outputs": {…}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoopSpec {
    pub body: Vec<TaskSpec>,
    #[serde(rename = "while")]
    pub condition: Condition,
    pub max_iterations: u32,
}

/// Why a node's spec is invalid: (field, message).
type Invalid = (&'static str, String);

/// Checks a task's coordination fields; returns its kind.
pub fn check_node(task: &TaskSpec) -> Result<NodeKind, Invalid> {
    let kinds = [
        task.sync.is_some().then_some(NodeKind::Sync),
        task.merge.is_some().then_some(NodeKind::Merge),
        task.split.is_some().then_some(NodeKind::Split),
        task.repeat.is_some().then_some(NodeKind::Loop),
    ];
    let mut present = kinds.into_iter().flatten();
    let kind = present.next().unwrap_or(NodeKind::Task);
    if let Some(other) = present.next() {
        return Err((
            "kind",
            format!(
                "a task is at most one of sync, merge, split, loop; this one is {} and {}",
                kind.as_str(),
                other.as_str()
            ),
        ));
    }
    let deps = task.depends_on.len() as u32;
    if let Some(k) = task.join.and_then(Join::quorum) {
        if deps == 0 {
            return Err(("join", "a join needs dependencies to wait for".into()));
        }
        if k == 0 || k > deps {
            return Err((
                "join",
                format!("quorum must be 1 to {deps} (its dependency count), got {k}"),
            ));
        }
    }
    if kind != NodeKind::Task {
        if !task.capabilities.is_empty() || !task.resources.is_empty() {
            return Err((
                "capabilities",
                format!(
                    "a {} node is run by the coordinator: it takes no capabilities or resources",
                    kind.as_str()
                ),
            ));
        }
        if task.timeout_seconds.is_some() {
            return Err((
                "timeout_seconds",
                "a coordinator node has no run time to bound (a sync point's timeout is sync.timeout_seconds)".into(),
            ));
        }
    }
    match kind {
        NodeKind::Task => {}
        NodeKind::Sync | NodeKind::Merge if deps == 0 => {
            return Err((
                "depends_on",
                format!("a {} node needs sources in depends_on", kind.as_str()),
            ));
        }
        NodeKind::Sync => {
            let sync = task.sync.as_ref().map(|s| s.timeout_seconds);
            if sync
                .flatten()
                .is_some_and(|s| !(1..=86_400 * 7).contains(&s))
            {
                return Err(("sync.timeout_seconds", "must be 1 to 604800".into()));
            }
        }
        NodeKind::Merge => {
            if let Some(m) = &task.merge
                && m.field.is_some()
                && m.strategy != MergeStrategy::Majority
            {
                return Err(("merge.field", "only a majority merge takes a field".into()));
            }
        }
        NodeKind::Split => check_split(task)?,
        NodeKind::Loop => check_loop(task)?,
    }
    Ok(kind)
}

fn check_split(task: &TaskSpec) -> Result<(), Invalid> {
    let Some(split) = &task.split else {
        return Ok(());
    };
    match &split.items {
        Value::Array(items) => {
            if items.is_empty() || items.len() > MAX_SPLIT_ITEMS {
                return Err((
                    "split.items",
                    format!(
                        "must hold 1 to {MAX_SPLIT_ITEMS} items, got {}",
                        items.len()
                    ),
                ));
            }
            if let Some(k) = split.join.quorum()
                && (k == 0 || k as usize > items.len())
            {
                return Err((
                    "split.join",
                    format!(
                        "quorum must be 1 to {} (its item count), got {k}",
                        items.len()
                    ),
                ));
            }
        }
        Value::String(s) => match super::dag::reference_key(s) {
            Some(key) if task.depends_on.iter().any(|d| d == key) => {}
            Some(key) => {
                return Err((
                    "split.items",
                    format!("reads `{key}`'s output but the split does not depend on `{key}`"),
                ));
            }
            None => {
                return Err((
                    "split.items",
                    format!("must be a list or a `${{deps.<key>.output…}}` reference, got `{s}`"),
                ));
            }
        },
        other => {
            return Err((
                "split.items",
                format!("must be a list or a `${{deps.<key>.output…}}` reference, got {other}"),
            ));
        }
    }
    if split.join.quorum() == Some(0) {
        return Err(("split.join", "quorum must be at least 1".into()));
    }
    let child = &split.task;
    if !(1..=100).contains(&child.max_attempts) {
        return Err(("split.task.max_attempts", "must be 1 to 100".into()));
    }
    if child.executor.trim().is_empty() {
        return Err(("split.task.executor", "must not be empty".into()));
    }
    for key in super::dag::references(&child.input) {
        if !task.depends_on.contains(&key) {
            return Err((
                "split.task.input",
                format!("references `${{deps.{key}…}}` but the split does not depend on `{key}`"),
            ));
        }
    }
    let fixed: Vec<String> = child
        .capabilities
        .iter()
        .filter(|c| !c.contains("${"))
        .cloned()
        .collect();
    super::agent::normalize_capabilities(&fixed)
        .map_err(|e| ("split.task.capabilities", e.to_string()))?;
    Ok(())
}

fn check_loop(task: &TaskSpec) -> Result<(), Invalid> {
    let Some(lp) = &task.repeat else {
        return Ok(());
    };
    if !(1..=MAX_LOOP_ITERATIONS).contains(&lp.max_iterations) {
        return Err((
            "loop.max_iterations",
            format!(
                "must be 1 to {MAX_LOOP_ITERATIONS}, got {}",
                lp.max_iterations
            ),
        ));
    }
    if lp.body.is_empty() {
        return Err(("loop.body", "must hold at least one task".into()));
    }
    let body_keys: Vec<&str> = lp.body.iter().map(|t| t.key.as_str()).collect();
    for t in &lp.body {
        if t.repeat.is_some() {
            return Err((
                "loop.body",
                format!("`{}`: a loop inside a loop body is not supported", t.key),
            ));
        }
        for d in &t.depends_on {
            if !body_keys.contains(&d.as_str()) && !task.depends_on.contains(d) {
                return Err((
                    "loop.body.depends_on",
                    format!(
                        "`{}` depends on `{d}`, which is neither a body task nor a dependency of the loop",
                        t.key
                    ),
                ));
            }
        }
        let mut prev = prev_references(&t.input);
        if let Some(s) = &t.split {
            prev.extend(prev_references(&s.items));
            prev.extend(prev_references(&s.task.input));
        }
        for key in prev {
            if !body_keys.contains(&key.as_str()) {
                return Err((
                    "loop.body.input",
                    format!(
                        "`{}` references `${{prev.{key}…}}` but `{key}` is not a body task",
                        t.key
                    ),
                ));
            }
        }
    }
    // The body is a workflow of its own: the same checks (keys, cycles, references) apply.
    let outer: Vec<TaskSpec> = task
        .depends_on
        .iter()
        .map(|d| TaskSpec::new(d.clone()))
        .collect();
    let mut body = lp.body.clone();
    for t in &mut body {
        t.input = strip_loop_bindings(&t.input);
    }
    body.extend(outer);
    super::dag::validate(super::dag::WorkflowSpec {
        v: None,
        name: "loop body".into(),
        failure_policy: Default::default(),
        tasks: body,
    })
    .map_err(|e| ("loop.body", e.to_string()))?;
    if lp.condition.tests() != 1 {
        return Err((
            "loop.while",
            "needs exactly one of equals, not_equals, in".into(),
        ));
    }
    let (key, _) = lp.condition.target();
    if !body_keys.contains(&key) {
        return Err((
            "loop.while.output",
            format!("`{key}` is not a task of the loop body"),
        ));
    }
    Ok(())
}

/// `${prev.…}` and `${loop.iteration}` replaced by `null`, so a body can be checked as a DAG.
fn strip_loop_bindings(v: &Value) -> Value {
    map_strings(v, &mut |s| {
        (s.starts_with("${prev.") || s == "${loop.iteration}").then_some(Value::Null)
    })
}

/// Body keys read through `${prev.<key>.output…}`.
fn prev_references(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(v, &mut |s| {
        if let Some(key) = s
            .strip_prefix("${prev.")
            .and_then(|r| r.split_once(".output"))
            .map(|(k, _)| k)
        {
            out.push(key.to_string());
        }
    });
    out.sort();
    out.dedup();
    out
}

/// A task a split or loop inserts.
#[derive(Debug, Clone, PartialEq)]
pub struct Insert {
    pub id: TaskId,
    pub spec: TaskSpec,
}

/// The key of a split's `index`-th child.
pub fn child_key(split: &str, index: usize) -> String {
    format!("{split}/{index}")
}

/// The children of a split for its resolved `items`: one task per item, depending on the split's
/// own dependencies. Errors name why the items cannot be split.
pub fn expand_split(
    split_key: &str,
    depends_on: &[String],
    spec: &SplitSpec,
    items: &Value,
) -> Result<Vec<TaskSpec>, String> {
    let Value::Array(items) = items else {
        return Err(format!(
            "split items must be a list, the reference resolved to {}",
            kind_of(items)
        ));
    };
    if items.is_empty() {
        return Err("split items resolved to an empty list: nothing to fan out".into());
    }
    if items.len() > MAX_SPLIT_ITEMS {
        return Err(format!(
            "split items resolved to {} items; at most {MAX_SPLIT_ITEMS}",
            items.len()
        ));
    }
    let mut children = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let mut bind = |s: &str| item_binding(s, item, index);
        let input = map_strings(&spec.task.input, &mut bind);
        let mut capabilities = Vec::new();
        for c in &spec.task.capabilities {
            match item_binding(c, item, index) {
                None => capabilities.push(c.clone()),
                Some(Value::String(s)) => capabilities.push(s),
                Some(Value::Array(a)) => {
                    for v in a {
                        match v {
                            Value::String(s) => capabilities.push(s),
                            other => {
                                return Err(format!(
                                    "item {index}: capability `{c}` resolved to {other}, not a string"
                                ));
                            }
                        }
                    }
                }
                Some(Value::Null) => {}
                Some(other) => {
                    return Err(format!(
                        "item {index}: capability `{c}` resolved to {other}, not a string"
                    ));
                }
            }
        }
        let capabilities = super::agent::normalize_capabilities(&capabilities)
            .map_err(|e| format!("item {index}: {e}"))?;
        children.push(TaskSpec {
            key: child_key(split_key, index),
            capabilities,
            executor: spec.task.executor.clone(),
            input,
            depends_on: depends_on.to_vec(),
            resources: spec.task.resources.clone(),
            priority: spec.task.priority,
            max_attempts: spec.task.max_attempts,
            timeout_seconds: spec.task.timeout_seconds,
            ..TaskSpec::new(String::new())
        });
    }
    Ok(children)
}

fn item_binding(s: &str, item: &Value, index: usize) -> Option<Value> {
    if s == "${index}" {
        return Some(Value::from(index));
    }
    let inner = s.strip_prefix("${item")?.strip_suffix('}')?;
    if inner.is_empty() {
        return Some(item.clone());
    }
    let path: Vec<&str> = inner.strip_prefix('.')?.split('.').collect();
    Some(select(item, &path).clone())
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The key of body task `key` in iteration `iteration` of loop `loop_key`.
pub fn iteration_key(loop_key: &str, iteration: u32, key: &str) -> String {
    format!("{loop_key}/{iteration}/{key}")
}

/// The tasks of iteration `iteration` (from 1) of a loop. Body keys are prefixed; a body task
/// without body dependencies also waits for the loop's own dependencies and, after the first
/// iteration, for every task of the previous iteration it reads through `${prev.…}`.
pub fn expand_iteration(loop_key: &str, spec: &LoopSpec, iteration: u32) -> Vec<TaskSpec> {
    let body: HashMap<&str, ()> = spec.body.iter().map(|t| (t.key.as_str(), ())).collect();
    let local = |k: &str| iteration_key(loop_key, iteration, k);
    let mut out = Vec::with_capacity(spec.body.len());
    for t in &spec.body {
        let mut depends_on: Vec<String> = t
            .depends_on
            .iter()
            .map(|d| {
                if body.contains_key(d.as_str()) {
                    local(d)
                } else {
                    d.clone()
                }
            })
            .collect();
        // Bindings of this iteration, in every value that can hold them.
        let mut bind = |v: &Value| {
            map_strings(v, &mut |s| {
                if s == "${loop.iteration}" {
                    return Some(Value::from(iteration));
                }
                if let Some(rest) = s.strip_prefix("${prev.") {
                    let (key, tail) = rest.split_once(".output")?;
                    if iteration == 1 {
                        return Some(Value::Null);
                    }
                    let prev = iteration_key(loop_key, iteration - 1, key);
                    if !depends_on.contains(&prev) {
                        depends_on.push(prev.clone());
                    }
                    return Some(Value::String(format!("${{deps.{prev}.output{tail}")));
                }
                let rest = s.strip_prefix("${deps.")?;
                let (key, tail) = rest.split_once(".output")?;
                body.contains_key(key)
                    .then(|| Value::String(format!("${{deps.{}.output{tail}", local(key))))
            })
        };
        let input = bind(&t.input);
        // A split in the body: its items and its children's input bind the same way.
        let split = t.split.as_ref().map(|s| SplitSpec {
            items: bind(&s.items),
            task: ChildSpec {
                input: bind(&s.task.input),
                ..s.task.clone()
            },
            join: s.join,
        });
        out.push(TaskSpec {
            key: local(&t.key),
            depends_on,
            input,
            split,
            ..t.clone()
        });
    }
    out
}

/// What a loop does after an iteration: run another, or finish with its output.
#[derive(Debug, Clone, PartialEq)]
pub enum LoopStep {
    Next(u32),
    Done(Value),
}

/// Decides after `iteration` given the iteration's outputs by body key.
pub fn after_iteration(
    spec: &LoopSpec,
    iteration: u32,
    outputs: &BTreeMap<String, Value>,
) -> LoopStep {
    let (key, path) = spec.condition.target();
    let value = outputs
        .get(key)
        .map(|o| select(o, &path))
        .unwrap_or(&Value::Null);
    let again = spec.condition.holds(value);
    if again && iteration < spec.max_iterations {
        return LoopStep::Next(iteration + 1);
    }
    LoopStep::Done(serde_json::json!({
        "iterations": iteration,
        "stopped": if again { "max_iterations" } else { "condition" },
        "outputs": outputs,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn task(v: Value) -> TaskSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn join_reads_all_any_and_quorum() {
        let j: Join = serde_json::from_value(json!("any")).unwrap();
        assert_eq!(j.quorum(), Some(1));
        let j: Join = serde_json::from_value(json!({"quorum": 2})).unwrap();
        assert_eq!(j.quorum(), Some(2));
        assert_eq!(Join::default().quorum(), None);
        let bad = task(json!({"key": "j", "depends_on": ["a", "b"], "join": {"quorum": 3}}));
        assert_eq!(check_node(&bad).unwrap_err().0, "join");
        let none = task(json!({"key": "j", "join": "any"}));
        assert_eq!(check_node(&none).unwrap_err().0, "join");
    }

    #[test]
    fn a_node_is_one_kind_and_coordinator_nodes_take_no_agent_fields() {
        let two = task(
            json!({"key": "x", "depends_on": ["a"], "sync": {}, "merge": {"strategy": "combine"}}),
        );
        assert_eq!(check_node(&two).unwrap_err().0, "kind");
        let caps =
            task(json!({"key": "x", "depends_on": ["a"], "sync": {}, "capabilities": ["rust"]}));
        assert_eq!(check_node(&caps).unwrap_err().0, "capabilities");
        let no_sources = task(json!({"key": "x", "merge": {"strategy": "combine"}}));
        assert_eq!(check_node(&no_sources).unwrap_err().0, "depends_on");
        let ok = task(
            json!({"key": "x", "depends_on": ["a"], "sync": {"timeout_seconds": 5, "on_timeout": "continue"}}),
        );
        assert_eq!(check_node(&ok).unwrap(), NodeKind::Sync);
    }

    #[test]
    fn a_split_source_must_be_a_dependency_or_a_list() {
        let unknown = task(json!({"key": "s", "depends_on": ["plan"],
            "split": {"items": "${deps.other.output.modules}", "task": {}}}));
        assert_eq!(check_node(&unknown).unwrap_err().0, "split.items");
        let literal = task(json!({"key": "s", "split": {"items": "modules", "task": {}}}));
        assert_eq!(check_node(&literal).unwrap_err().0, "split.items");
        let ok = task(json!({"key": "s", "depends_on": ["plan"],
            "split": {"items": "${deps.plan.output.modules}", "task": {"input": {"m": "${item}"}}}}));
        assert_eq!(check_node(&ok).unwrap(), NodeKind::Split);
    }

    #[test]
    fn split_children_bind_item_and_index_and_depend_on_the_source() {
        let spec: SplitSpec = serde_json::from_value(json!({
            "items": "${deps.plan.output.modules}",
            "task": {"capabilities": ["${item.lang}", "code"], "input": {"name": "${item.name}", "n": "${index}", "all": "${item}"}}
        }))
        .unwrap();
        let items = json!([{"name": "a", "lang": "rust"}, {"name": "b", "lang": "go"}]);
        let kids = expand_split("impl", &["plan".into()], &spec, &items).unwrap();
        assert_eq!(kids.len(), 2);
        assert_eq!(kids[1].key, "impl/1");
        assert_eq!(kids[1].depends_on, vec!["plan"]);
        // Normalised: sorted and deduplicated.
        assert_eq!(kids[1].capabilities, vec!["code", "go"]);
        assert_eq!(
            kids[1].input,
            json!({"name": "b", "n": 1, "all": {"name": "b", "lang": "go"}})
        );
        assert!(
            expand_split("impl", &[], &spec, &json!({"a": 1}))
                .unwrap_err()
                .contains("an object")
        );
        assert!(expand_split("impl", &[], &spec, &json!([])).is_err());
    }

    fn review_loop() -> LoopSpec {
        serde_json::from_value(json!({
            "max_iterations": 3,
            "while": {"output": "review.verdict", "equals": "changes_requested"},
            "body": [
                {"key": "implement", "depends_on": ["plan"],
                 "input": {"feedback": "${prev.review.output.comments}", "round": "${loop.iteration}", "plan": "${deps.plan.output}"}},
                {"key": "review", "depends_on": ["implement"], "input": {"code": "${deps.implement.output}"}}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn loop_iterations_are_keyed_and_chained_through_prev() {
        let lp = review_loop();
        let first = expand_iteration("cycle", &lp, 1);
        assert_eq!(first[0].key, "cycle/1/implement");
        assert_eq!(first[0].depends_on, vec!["plan"]);
        assert_eq!(
            first[0].input,
            json!({"feedback": null, "round": 1, "plan": "${deps.plan.output}"})
        );
        assert_eq!(first[1].depends_on, vec!["cycle/1/implement"]);
        assert_eq!(
            first[1].input,
            json!({"code": "${deps.cycle/1/implement.output}"})
        );
        let second = expand_iteration("cycle", &lp, 2);
        assert_eq!(second[0].depends_on, vec!["plan", "cycle/1/review"]);
        assert_eq!(
            second[0].input["feedback"],
            json!("${deps.cycle/1/review.output.comments}")
        );
        assert_eq!(second[0].input["round"], json!(2));
        // The expanded tasks are a valid DAG beside the loop's sources.
        let mut all = vec![TaskSpec::new("plan".into())];
        all.extend(first);
        all.extend(second);
        crate::domain::dag::validate(crate::domain::dag::WorkflowSpec {
            v: None,
            name: "w".into(),
            failure_policy: Default::default(),
            tasks: all,
        })
        .unwrap();
    }

    #[test]
    fn a_split_in_a_loop_body_binds_the_iteration_in_its_items_and_children() {
        let lp: LoopSpec = serde_json::from_value(json!({
            "max_iterations": 2,
            "while": {"output": "review.verdict", "equals": "again"},
            "body": [
                {"key": "plan"},
                {"key": "fan", "depends_on": ["plan"], "split": {
                    "items": "${deps.plan.output.modules}",
                    "task": {"input": {"m": "${item}", "notes": "${prev.review.output.notes}", "plan": "${deps.plan.output}"}}}},
                {"key": "review", "depends_on": ["fan"]}
            ]
        }))
        .unwrap();
        let t = task(json!({"key": "cycle", "loop": serde_json::to_value(&lp).unwrap()}));
        assert_eq!(check_node(&t).unwrap(), NodeKind::Loop);
        let second = expand_iteration("cycle", &lp, 2);
        let fan = second.iter().find(|t| t.key == "cycle/2/fan").unwrap();
        let split = fan.split.as_ref().unwrap();
        assert_eq!(split.items, json!("${deps.cycle/2/plan.output.modules}"));
        assert_eq!(
            split.task.input["notes"],
            json!("${deps.cycle/1/review.output.notes}")
        );
        assert_eq!(
            split.task.input["plan"],
            json!("${deps.cycle/2/plan.output}")
        );
        assert!(
            fan.depends_on.contains(&"cycle/1/review".to_string()),
            "{:?}",
            fan.depends_on
        );
        // The split's children then depend on what the split depends on, bindings resolved.
        let kids = expand_split(&fan.key, &fan.depends_on, split, &json!(["a"])).unwrap();
        assert_eq!(kids[0].key, "cycle/2/fan/0");
        let mut ghost = lp.clone();
        ghost.body[1].split.as_mut().unwrap().task.input = json!({"n": "${prev.ghost.output}"});
        let t = task(json!({"key": "cycle", "loop": serde_json::to_value(&ghost).unwrap()}));
        assert_eq!(check_node(&t).unwrap_err().0, "loop.body.input");
        let nested = task(json!({"key": "cycle", "loop": {"max_iterations": 1,
            "while": {"output": "x", "equals": 1},
            "body": [{"key": "x", "loop": serde_json::to_value(&lp).unwrap()}]}}));
        assert_eq!(check_node(&nested).unwrap_err().0, "loop.body");
    }

    #[test]
    fn a_loop_runs_while_its_condition_holds_up_to_its_bound() {
        let lp = review_loop();
        let outputs = |v: &str| BTreeMap::from([("review".to_string(), json!({"verdict": v}))]);
        assert_eq!(
            after_iteration(&lp, 1, &outputs("changes_requested")),
            LoopStep::Next(2)
        );
        match after_iteration(&lp, 2, &outputs("approved")) {
            LoopStep::Done(v) => {
                assert_eq!(v["iterations"], 2);
                assert_eq!(v["stopped"], "condition");
            }
            other => panic!("{other:?}"),
        }
        match after_iteration(&lp, 3, &outputs("changes_requested")) {
            LoopStep::Done(v) => assert_eq!(v["stopped"], "max_iterations"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn loop_bodies_are_checked_like_workflows() {
        let mut t = task(
            json!({"key": "cycle", "depends_on": ["plan"], "loop": serde_json::to_value(review_loop()).unwrap()}),
        );
        assert_eq!(check_node(&t).unwrap(), NodeKind::Loop);
        t.repeat.as_mut().unwrap().condition.output = "ghost.verdict".into();
        assert_eq!(check_node(&t).unwrap_err().0, "loop.while.output");
        let mut t = task(
            json!({"key": "cycle", "depends_on": ["plan"], "loop": serde_json::to_value(review_loop()).unwrap()}),
        );
        t.repeat.as_mut().unwrap().body[0].depends_on = vec!["plan".into(), "review".into()];
        let err = check_node(&t).unwrap_err();
        assert!(err.1.contains("cycle"), "{err:?}");
        let mut t = task(
            json!({"key": "cycle", "depends_on": [], "loop": serde_json::to_value(review_loop()).unwrap()}),
        );
        t.depends_on.clear();
        assert_eq!(check_node(&t).unwrap_err().0, "loop.body.depends_on");
    }
}
