//! Pattern files: reusable, parameterised workflows (YAML or JSON) compiled into the engine's
//! submission format, [`WorkflowSpec`]. A pattern declares typed `parameters` and `steps` (each
//! an engine task spec, optionally with a `simulate` hint); [`Pattern::instantiate`] substitutes
//! `${params.…}`, turns `${steps.KEY.output…}` into `${deps.KEY.output…}` plus a dependency,
//! and validates the result as a DAG. Every error names the file and, when it can be found, the
//! line and column (`file:line:column: message`). `patterns/README.md` documents the format;
//! the shipped patterns are compiled in ([`builtin`]).

mod bind;
mod locate;
mod params;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::domain::coordination::NodeKind;
use crate::domain::dag::{self, DagError, FailurePolicy, TaskSpec, WorkflowSpec};

pub use params::{ParamError, ParamSpec, ParamType, parse_param};

use bind::{BindError, Refs, Scope};
use locate::Locator;

/// The only format version so far.
pub const FORMAT_VERSION: u64 = 1;

/// The keys a `simulate` hint may hold.
pub const HINT_FIELDS: [&str; 4] = ["output", "outputs", "latency_ms", "fail_rate"];

/// What went wrong, for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PatternErrorKind {
    /// The file could not be read.
    Io,
    /// Not valid YAML/JSON, or a field of the wrong type or name.
    Syntax,
    /// A file-level rule is broken (name, version, parameter defaults, step keys).
    Format,
    /// A parameter value is unknown, missing or of the wrong type.
    Parameter,
    /// A `${…}` binding cannot be resolved.
    Binding,
    /// A step is not a valid task spec, or its `simulate` hint is malformed.
    Step,
    /// The compiled workflow is not a valid DAG (cycle, bad reference, invalid node).
    Dag,
    /// No pattern by that name or path.
    NotFound,
}

/// A pattern that cannot be loaded or instantiated. Displays as `file:line:column: message`,
/// or `file: message` when there is no location.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {message}", Loc(*.line, *.column))]
pub struct PatternError {
    pub kind: PatternErrorKind,
    pub file: String,
    /// 1-based.
    pub line: Option<usize>,
    /// 1-based, in characters.
    pub column: Option<usize>,
    pub message: String,
}

struct Loc(Option<usize>, Option<usize>);

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (Some(l), Some(c)) => write!(f, ":{l}:{c}"),
            (Some(l), None) => write!(f, ":{l}"),
            _ => Ok(()),
        }
    }
}

impl PatternError {
    fn new(kind: PatternErrorKind, file: &str, message: impl Into<String>) -> Self {
        Self {
            kind,
            file: file.to_owned(),
            line: None,
            column: None,
            message: message.into(),
        }
    }

    /// Points the error at a byte offset of `text`, when one is known.
    fn at(mut self, text: &str, offset: Option<usize>) -> Self {
        if let Some(o) = offset {
            let (l, c) = locate::position(text, o);
            self.line = Some(l);
            self.column = Some(c);
        }
        self
    }
}

/// A loaded pattern file.
#[derive(Debug, Clone)]
pub struct Pattern {
    name: String,
    description: String,
    failure_policy: FailurePolicy,
    parameters: Vec<ParamSpec>,
    steps: Vec<RawStep>,
    file: String,
    /// The source, to locate errors found after parsing.
    text: String,
}

/// A step as written: its key, its fields, and its loop body's keys.
#[derive(Debug, Clone)]
struct RawStep {
    key: String,
    fields: Map<String, Value>,
    body_keys: Vec<String>,
}

/// The compiled result of a pattern with its parameters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Instantiated {
    /// Named after the pattern, validated (capabilities normalised).
    pub spec: WorkflowSpec,
    /// Simulation hints by task: key = top-level step key (for a split step: applies to its
    /// children), or `"<loop key>/<body key>"` for a loop body step. Value = the step's
    /// `simulate` object as written (after parameter substitution): `output` (any JSON, the
    /// simulated output), `outputs` (a list: the n-th run of the step, e.g. loop iteration n,
    /// returns `outputs[min(n-1, len-1)]`), `latency_ms` (number ≥ 0, overrides the fleet's
    /// latency), `fail_rate` (0 to 1).
    pub hints: BTreeMap<String, Value>,
}

/// A catalogue entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub name: String,
    pub description: String,
    /// `builtin` or the file's path.
    pub source: String,
    pub parameters: Vec<ParamSpec>,
}

/// The file as deserialized.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPattern {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    version: Option<u64>,
    #[serde(default)]
    failure_policy: FailurePolicy,
    #[serde(default)]
    parameters: params::OrderedParams,
    steps: Vec<Value>,
}

/// Loads a pattern from its text; `file` names it in errors, and a `.json` ending selects the
/// JSON parser (anything else is read as YAML).
pub fn load_str(file: &str, text: &str) -> Result<Pattern, PatternError> {
    let raw = parse(file, text)?;
    let fail = |kind, message: String, offset: Option<usize>| {
        PatternError::new(kind, file, message).at(text, offset)
    };
    let format = PatternErrorKind::Format;
    let valid_name = !raw.name.is_empty()
        && raw
            .name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !valid_name {
        return Err(fail(
            format,
            format!("name `{}`: expected 1 or more of a-z 0-9 _ -", raw.name),
            locate::top_field(text, "name"),
        ));
    }
    if let Some(v) = raw.version
        && v != FORMAT_VERSION
    {
        return Err(fail(
            format,
            format!("version {v} is not supported: expected {FORMAT_VERSION}"),
            locate::top_field(text, "version"),
        ));
    }
    let mut parameters = Vec::with_capacity(raw.parameters.0.len());
    for (name, p) in raw.parameters.0 {
        let at = || locate::param(text, &name);
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            return Err(fail(
                format,
                format!("parameter name `{name}`: expected 1 or more of A-Z a-z 0-9 _ -"),
                at(),
            ));
        }
        let default = match p.default {
            Some(d) => Some(p.kind.check(&d).ok_or_else(|| {
                fail(
                    format,
                    format!(
                        "parameter `{name}`: default must be {} {}, got {}",
                        article(p.kind),
                        p.kind,
                        params::kind_of(&d)
                    ),
                    at(),
                )
            })?),
            None => None,
        };
        parameters.push(ParamSpec {
            name,
            kind: p.kind,
            description: p.description,
            default,
        });
    }
    let steps = raw_steps(file, text, raw.steps)?;
    Ok(Pattern {
        name: raw.name,
        description: raw.description,
        failure_policy: raw.failure_policy,
        parameters,
        steps,
        file: file.to_owned(),
        text: text.to_owned(),
    })
}

fn article(kind: ParamType) -> &'static str {
    match kind {
        ParamType::Integer | ParamType::Object => "an",
        _ => "a",
    }
}

fn parse(file: &str, text: &str) -> Result<RawPattern, PatternError> {
    let syntax = |message: String, line: usize, column: usize| {
        // Both parsers append the location to the message; it is in the prefix already.
        let suffix = format!(" at line {line} column {column}");
        let message = match message.find(&suffix) {
            Some(i) => format!("{}{}", &message[..i], &message[i + suffix.len()..]),
            None => message,
        };
        let mut e = PatternError::new(PatternErrorKind::Syntax, file, message);
        if line > 0 {
            e.line = Some(line);
            e.column = (column > 0).then_some(column);
        }
        e
    };
    if file.ends_with(".json") {
        serde_json::from_str(text).map_err(|e| syntax(e.to_string(), e.line(), e.column()))
    } else {
        serde_norway::from_str(text).map_err(|e| {
            let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            syntax(e.to_string(), line, column)
        })
    }
}

/// Checks the shape every step needs before binding: a mapping with a unique string `key`,
/// and the same for a loop's body.
fn raw_steps(file: &str, text: &str, steps: Vec<Value>) -> Result<Vec<RawStep>, PatternError> {
    let fail = |message: String, offset: Option<usize>| {
        PatternError::new(PatternErrorKind::Format, file, message).at(text, offset)
    };
    let steps_at = locate::top_field(text, "steps");
    if steps.is_empty() {
        return Err(fail("steps: expected at least one step".into(), steps_at));
    }
    let mut out: Vec<RawStep> = Vec::with_capacity(steps.len());
    for (i, step) in steps.into_iter().enumerate() {
        let fields = keyed(step).map_err(|what| {
            fail(
                format!(
                    "step #{}: expected a mapping with a string `key`, {what}",
                    i + 1
                ),
                steps_at,
            )
        })?;
        let key = key_of(&fields);
        if let Some(prev) = out.iter().find(|s| s.key == key) {
            let at = locate::find_step(text, &prev.key, 0, text.len())
                .and_then(|first| locate::find_step(text, &key, first + 1, text.len()));
            return Err(fail(
                format!("step key `{key}` is used more than once: expected unique keys"),
                at,
            ));
        }
        let mut body_keys = Vec::new();
        if let Some(Value::Array(body)) = fields.get("loop").and_then(|l| l.get("body")) {
            let loop_at = locate::find_step(text, &key, 0, text.len());
            for (j, b) in body.iter().enumerate() {
                let b = keyed(b.clone()).map_err(|what| {
                    fail(
                        format!(
                            "step `{key}`: loop.body #{}: expected a mapping with a string `key`, {what}",
                            j + 1
                        ),
                        loop_at,
                    )
                })?;
                let bkey = key_of(&b);
                if body_keys.contains(&bkey) {
                    return Err(fail(
                        format!("step `{key}`: body key `{bkey}` is used more than once"),
                        loop_at,
                    ));
                }
                body_keys.push(bkey);
            }
        }
        out.push(RawStep {
            key,
            fields,
            body_keys,
        });
    }
    Ok(out)
}

/// A step mapping with a literal string `key` (keys name steps before anything is bound).
fn keyed(step: Value) -> Result<Map<String, Value>, String> {
    let Value::Object(fields) = step else {
        return Err(format!("got {}", params::kind_of(&step)));
    };
    match fields.get("key") {
        Some(Value::String(k)) if k.contains("${") => {
            Err(format!("got `{k}`: a key must be literal, not bound"))
        }
        Some(Value::String(_)) => Ok(fields),
        Some(other) => Err(format!("got a key that is {}", params::kind_of(other))),
        None => Err("got no `key`".into()),
    }
}

fn key_of(fields: &Map<String, Value>) -> String {
    fields
        .get("key")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// Reads and loads a pattern file.
pub fn load_path(path: &Path) -> Result<Pattern, PatternError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| PatternError::new(PatternErrorKind::Io, &file, format!("cannot read: {e}")))?;
    load_str(&file, &text)
}

/// The shipped patterns: (file name, text).
pub fn builtin() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "review_feedback_loop.yaml",
            include_str!("../../patterns/review_feedback_loop.yaml"),
        ),
        (
            "parallel_implementation.yaml",
            include_str!("../../patterns/parallel_implementation.yaml"),
        ),
        (
            "majority_vote.yaml",
            include_str!("../../patterns/majority_vote.yaml"),
        ),
        (
            "map_reduce.yaml",
            include_str!("../../patterns/map_reduce.yaml"),
        ),
    ]
}

const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

fn stem(file: &str) -> &str {
    Path::new(file)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(file)
}

/// Finds a pattern: `name_or_path` as a file if it exists, else a builtin of that name, else
/// `<dir>/<name>.yaml|.yml|.json` in the first of `extra_dirs` that has it.
pub fn find(name_or_path: &str, extra_dirs: &[PathBuf]) -> Result<Pattern, PatternError> {
    let path = Path::new(name_or_path);
    if path.is_file() {
        return load_path(path);
    }
    find_named(name_or_path, extra_dirs)
}

/// A pattern by name only — a builtin, or `<dir>/<name>.{yaml,yml,json}` of `extra_dirs` —
/// never a path: what a remote caller's name may resolve to (the API and `<ns>.workflow.run`).
pub fn find_named(name_or_path: &str, extra_dirs: &[PathBuf]) -> Result<Pattern, PatternError> {
    if let Some((file, text)) = builtin().into_iter().find(|(f, _)| stem(f) == name_or_path) {
        return load_str(file, text);
    }
    for dir in extra_dirs {
        for ext in EXTENSIONS {
            let candidate = dir.join(format!("{name_or_path}.{ext}"));
            if candidate.is_file() {
                return load_path(&candidate);
            }
        }
    }
    let mut names: Vec<String> = list(extra_dirs).into_iter().map(|s| s.name).collect();
    names.dedup();
    let dirs: Vec<String> = extra_dirs.iter().map(|d| d.display().to_string()).collect();
    let searched = if dirs.is_empty() {
        String::new()
    } else {
        format!(", nor in {}", dirs.join(", "))
    };
    Err(PatternError::new(
        PatternErrorKind::NotFound,
        name_or_path,
        format!(
            "no such pattern: not a file, not a builtin{searched}; available: {}",
            names.join(", ")
        ),
    ))
}

/// The builtins, then every loadable `*.yaml|*.yml|*.json` of `extra_dirs` (sorted by file
/// name; JSON Schemas `*.schema.json` and files that fail to load are skipped — `find` or
/// `Pattern::validate` reports why).
pub fn list(extra_dirs: &[PathBuf]) -> Vec<Summary> {
    let summary = |p: Pattern, source: String| Summary {
        name: p.name,
        description: p.description,
        source,
        parameters: p.parameters,
    };
    let mut out: Vec<Summary> = builtin()
        .into_iter()
        .filter_map(|(f, t)| load_str(f, t).ok())
        .map(|p| summary(p, "builtin".into()))
        .collect();
    for dir in extra_dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                let ext = p.extension().and_then(|e| e.to_str()).unwrap_or_default();
                p.is_file() && EXTENSIONS.contains(&ext) && !name.ends_with(".schema.json")
            })
            .collect();
        files.sort();
        for f in files {
            if let Ok(p) = load_path(&f) {
                out.push(summary(p, f.display().to_string()));
            }
        }
    }
    out
}

impl Pattern {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    /// Declared parameters, in file order.
    pub fn parameters(&self) -> &[ParamSpec] {
        &self.parameters
    }

    pub fn parameter(&self, name: &str) -> Option<&ParamSpec> {
        self.parameters.iter().find(|p| p.name == name)
    }

    /// The file name (or path) the pattern was loaded from.
    pub fn file(&self) -> &str {
        &self.file
    }

    pub fn failure_policy(&self) -> FailurePolicy {
        self.failure_policy
    }

    /// Step keys in file order.
    pub fn step_keys(&self) -> Vec<&str> {
        self.steps.iter().map(|s| s.key.as_str()).collect()
    }

    /// Parses `name=value` assignments (as given to `--param`) with each parameter's type.
    pub fn parse_assignments<'a>(
        &self,
        assignments: impl IntoIterator<Item = &'a str>,
    ) -> Result<BTreeMap<String, Value>, PatternError> {
        let mut out = BTreeMap::new();
        for a in assignments {
            let fail = |m: String| PatternError::new(PatternErrorKind::Parameter, &self.file, m);
            let Some((name, raw)) = a.split_once('=') else {
                return Err(fail(format!("`{a}`: expected `name=value`")));
            };
            let name = name.trim();
            let spec = self
                .parameter(name)
                .ok_or_else(|| fail(self.unknown_param(name)))?;
            let value = parse_param(raw, spec).map_err(|e| fail(e.to_string()))?;
            out.insert(name.to_owned(), value);
        }
        Ok(out)
    }

    fn unknown_param(&self, name: &str) -> String {
        let names: Vec<&str> = self.parameters.iter().map(|p| p.name.as_str()).collect();
        format!(
            "unknown parameter `{name}`: `{}` takes {}",
            self.name,
            if names.is_empty() {
                "no parameters".into()
            } else {
                names.join(", ")
            }
        )
    }

    /// Defaults, with `given` on top, each checked against its declared type.
    fn resolve_params(
        &self,
        given: &BTreeMap<String, Value>,
    ) -> Result<BTreeMap<String, Value>, PatternError> {
        let fail = |m: String, name: Option<&str>| {
            PatternError::new(PatternErrorKind::Parameter, &self.file, m)
                .at(&self.text, name.and_then(|n| locate::param(&self.text, n)))
        };
        if let Some(name) = given.keys().find(|n| self.parameter(n).is_none()) {
            return Err(fail(self.unknown_param(name), None));
        }
        let mut out = BTreeMap::new();
        for p in &self.parameters {
            let Some(value) = given.get(&p.name).or(p.default.as_ref()) else {
                return Err(fail(
                    format!(
                        "missing required parameter `{}`: expected {} {}{} (pass `--param {}=…`)",
                        p.name,
                        article(p.kind),
                        p.kind,
                        p.description
                            .as_deref()
                            .map(|d| format!(" — {d}"))
                            .unwrap_or_default(),
                        p.name
                    ),
                    Some(&p.name),
                ));
            };
            let value = p.kind.check(value).ok_or_else(|| {
                fail(
                    format!(
                        "parameter `{}`: expected {} {}, got {} ({value})",
                        p.name,
                        article(p.kind),
                        p.kind,
                        params::kind_of(value)
                    ),
                    Some(&p.name),
                )
            })?;
            out.insert(p.name.clone(), value);
        }
        Ok(out)
    }

    /// Instantiates with the defaults, filling parameters without one with a placeholder of
    /// their type (`"<name>"`, `1`, `false`, `["<name>"]`, `{}`): checks everything a file
    /// can get wrong without real values (`omoi patterns validate`).
    pub fn validate(&self) -> Result<Instantiated, PatternError> {
        let placeholders = self
            .parameters
            .iter()
            .filter(|p| p.required())
            .map(|p| {
                let v = match p.kind {
                    ParamType::String => Value::String(format!("<{}>", p.name)),
                    ParamType::Integer | ParamType::Number => Value::from(1),
                    ParamType::Boolean => Value::Bool(false),
                    ParamType::List => Value::Array(vec![Value::String(format!("<{}>", p.name))]),
                    ParamType::Object => Value::Object(Map::new()),
                };
                (p.name.clone(), v)
            })
            .collect();
        self.instantiate(&placeholders)
    }

    /// Compiles the pattern with `params` (by name; unset ones take their default) into a
    /// validated workflow named after the pattern, plus its simulation hints.
    pub fn instantiate(
        &self,
        params: &BTreeMap<String, Value>,
    ) -> Result<Instantiated, PatternError> {
        let values = self.resolve_params(params)?;
        let tree: Vec<(String, Vec<String>)> = self
            .steps
            .iter()
            .map(|s| (s.key.clone(), s.body_keys.clone()))
            .collect();
        let loc = Locator::new(&self.text, &tree);
        let top: Vec<String> = self.steps.iter().map(|s| s.key.clone()).collect();
        let mut tasks = Vec::with_capacity(self.steps.len());
        let mut hints = BTreeMap::new();
        for step in &self.steps {
            let mut fields = step.fields.clone();
            let simulate = fields.remove("simulate");
            let body = take_body(&mut fields);
            let mut refs = Refs::default();
            let mut bound = bind::bind(
                &Value::Object(fields),
                &values,
                Scope::Top { steps: &top },
                &mut refs,
            )
            .map_err(|e| self.bind_error(&loc, &step.key, e))?;
            if let Some(body) = body {
                let compiled =
                    self.compile_body(&loc, &top, step, body, &values, &mut refs, &mut hints)?;
                if let Some(lp) = bound.get_mut("loop").and_then(Value::as_object_mut) {
                    lp.insert("body".into(), Value::Array(compiled));
                }
            }
            add_depends(&mut bound, refs.local.iter());
            let task = self.task(&loc, &step.key, bound)?;
            if let Some(sim) = simulate {
                hints.insert(
                    step.key.clone(),
                    self.hint(&loc, &step.key, &task, &sim, &values)?,
                );
            }
            tasks.push(task);
        }
        let spec = WorkflowSpec {
            v: None,
            name: self.name.clone(),
            failure_policy: self.failure_policy,
            tasks,
        };
        let valid = dag::validate(spec).map_err(|e| self.dag_error(&loc, e))?;
        Ok(Instantiated {
            spec: valid.spec,
            hints,
        })
    }

    /// Binds a loop's body steps (body keys bound within the iteration); a top-level step a
    /// body step reads is added to `loop_refs`, since the loop must wait for it too (the
    /// engine requires a body's outside dependencies to be the loop's).
    #[expect(clippy::too_many_arguments, reason = "one private call site")]
    fn compile_body(
        &self,
        loc: &Locator<'_>,
        top: &[String],
        step: &RawStep,
        body: Vec<Value>,
        values: &BTreeMap<String, Value>,
        loop_refs: &mut Refs,
        hints: &mut BTreeMap<String, Value>,
    ) -> Result<Vec<Value>, PatternError> {
        let mut compiled = Vec::with_capacity(body.len());
        for (b, key) in body.into_iter().zip(&step.body_keys) {
            let path = format!("{}/{key}", step.key);
            let Value::Object(mut fields) = b else {
                continue; // raw_steps checked every body entry is a mapping
            };
            let simulate = fields.remove("simulate");
            let mut refs = Refs::default();
            let scope = Scope::Body {
                steps: top,
                body: &step.body_keys,
            };
            let mut bound = bind::bind(&Value::Object(fields), values, scope, &mut refs)
                .map_err(|e| self.bind_error(loc, &path, e))?;
            add_depends(&mut bound, refs.local.iter().chain(&refs.outer));
            for o in &refs.outer {
                if !loop_refs.local.contains(o) {
                    loop_refs.local.push(o.clone());
                }
            }
            // Deserialized on its own so an error names the body step, not just the loop.
            let task = self.task(loc, &path, bound.clone())?;
            if let Some(sim) = simulate {
                hints.insert(path.clone(), self.hint(loc, &path, &task, &sim, values)?);
            }
            compiled.push(bound);
        }
        Ok(compiled)
    }

    fn error(
        &self,
        kind: PatternErrorKind,
        message: String,
        offset: Option<usize>,
    ) -> PatternError {
        PatternError::new(kind, &self.file, message).at(&self.text, offset)
    }

    fn bind_error(&self, loc: &Locator<'_>, path: &str, e: BindError) -> PatternError {
        let at = e
            .token
            .as_deref()
            .and_then(|t| loc.token_in_step(path, t))
            .or_else(|| loc.step(path));
        self.error(
            PatternErrorKind::Binding,
            format!("step `{path}`: {}", e.message),
            at,
        )
    }

    /// Deserializes a bound step; errors are located at the step, or at the field serde names.
    fn task(&self, loc: &Locator<'_>, path: &str, step: Value) -> Result<TaskSpec, PatternError> {
        serde_json::from_value(step).map_err(|e| {
            let message = e.to_string();
            let named = |prefix: &str| {
                let rest = &message[message.find(prefix)? + prefix.len()..];
                rest.find('`').map(|end| rest[..end].to_owned())
            };
            let at = if let Some(field) = named("unknown field `") {
                loc.field_in_step(path, &field)
            } else if let Some(variant) = named("unknown variant `") {
                loc.token_in_step(path, &variant)
            } else {
                None
            };
            self.error(
                PatternErrorKind::Step,
                format!("step `{path}`: {message}"),
                at.or_else(|| loc.step(path)),
            )
        })
    }

    /// Binds and checks a `simulate` hint.
    fn hint(
        &self,
        loc: &Locator<'_>,
        path: &str,
        task: &TaskSpec,
        sim: &Value,
        values: &BTreeMap<String, Value>,
    ) -> Result<Value, PatternError> {
        let at = || {
            loc.field_in_step(path, "simulate")
                .or_else(|| loc.step(path))
        };
        let fail = |m: String| {
            self.error(
                PatternErrorKind::Step,
                format!("step `{path}`: simulate: {m}"),
                at(),
            )
        };
        let kind = task.kind();
        if !matches!(kind, NodeKind::Task | NodeKind::Split) {
            return Err(fail(format!(
                "a {} node is run by the coordinator: only agent tasks and splits take simulation hints",
                kind.as_str()
            )));
        }
        let hint = bind::bind(sim, values, Scope::Hint, &mut Refs::default())
            .map_err(|e| self.bind_error(loc, path, e))?;
        check_hint(&hint).map_err(fail)?;
        Ok(hint)
    }

    fn dag_error(&self, loc: &Locator<'_>, e: DagError) -> PatternError {
        let at = match &e {
            DagError::Cycle(path) => path.first().and_then(|k| loc.step(k)),
            DagError::UnknownDependency { task, dependency } => loc
                .value_in_step(task, "depends_on", dependency)
                .or_else(|| loc.step(task)),
            DagError::DuplicateKey(key) => loc.second_step(key).or_else(|| loc.step(key)),
            DagError::InvalidTask { task, field, .. } => {
                let last = field.rsplit('.').next().unwrap_or(field);
                loc.field_in_step(task, last).or_else(|| loc.step(task))
            }
            DagError::InvalidWorkflow { field, .. } => match *field {
                "tasks" => loc.top_field("steps"),
                other => loc.top_field(other),
            },
        };
        self.error(PatternErrorKind::Dag, e.to_string(), at)
    }
}

/// Removes a loop's body from a step, to bind it in its own scope.
fn take_body(fields: &mut Map<String, Value>) -> Option<Vec<Value>> {
    let lp = fields.get_mut("loop")?.as_object_mut()?;
    if !lp.get("body").is_some_and(Value::is_array) {
        return None;
    }
    match lp.remove("body") {
        Some(Value::Array(body)) => Some(body),
        _ => None,
    }
}

/// Appends `keys` to a step's `depends_on` (created if absent) unless listed already. A
/// `depends_on` that is not a list is left for deserialization to reject.
fn add_depends<'a>(step: &mut Value, keys: impl Iterator<Item = &'a String>) {
    let Some(obj) = step.as_object_mut() else {
        return;
    };
    let deps = obj
        .entry("depends_on")
        .or_insert_with(|| Value::Array(Vec::new()));
    let Some(deps) = deps.as_array_mut() else {
        return;
    };
    for k in keys {
        if !deps.iter().any(|d| d.as_str() == Some(k.as_str())) {
            deps.push(Value::String(k.clone()));
        }
    }
}

/// A `simulate` hint's shape: an object of [`HINT_FIELDS`] only.
fn check_hint(hint: &Value) -> Result<(), String> {
    let Value::Object(m) = hint else {
        return Err(format!(
            "expected a mapping of {}, got {}",
            HINT_FIELDS.join(", "),
            params::kind_of(hint)
        ));
    };
    if let Some(k) = m.keys().find(|k| !HINT_FIELDS.contains(&k.as_str())) {
        return Err(format!(
            "unknown field `{k}`: expected {}",
            HINT_FIELDS.join(", ")
        ));
    }
    if m.contains_key("output") && m.contains_key("outputs") {
        return Err("give either `output` or `outputs`, not both".into());
    }
    if let Some(o) = m.get("outputs")
        && o.as_array().is_none_or(|a| a.is_empty())
    {
        return Err(format!(
            "outputs: expected a non-empty list (the n-th run returns outputs[min(n-1, len-1)]), got {}",
            params::kind_of(o)
        ));
    }
    if let Some(l) = m.get("latency_ms")
        && !l.as_f64().is_some_and(|l| l >= 0.0)
    {
        return Err(format!("latency_ms: expected a number ≥ 0, got {l}"));
    }
    if let Some(r) = m.get("fail_rate")
        && !r.as_f64().is_some_and(|r| (0.0..=1.0).contains(&r))
    {
        return Err(format!("fail_rate: expected a number from 0 to 1, got {r}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
