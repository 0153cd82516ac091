//! Pattern bindings: `${params.NAME}` is replaced by the parameter's value, and
//! `${steps.KEY.output…}` becomes the engine's `${deps.KEY.output…}` while KEY is recorded as a
//! dependency. The engine's own bindings pass through untouched; anything else is an error.

use std::collections::BTreeMap;

use serde_json::Value;

/// The forms a `${…}` may take, for error messages.
pub(super) const ACCEPTED: &str = "`${params.<name>}`, `${steps.<key>.output[.<field>…]}`, \
     or the engine's `${deps.<key>.output[.<field>…]}`, `${item}`, `${item.<field>…}`, \
     `${index}`, `${loop.iteration}`, `${prev.<body key>.output[.<field>…]}` \
     (write `$${` for a literal `${`)";

/// Which step keys a `${steps.KEY…}` may name where the binding is.
#[derive(Clone, Copy)]
pub(super) enum Scope<'a> {
    /// A top-level step: any step of the file.
    Top { steps: &'a [String] },
    /// A loop body step: a body step (bound body-locally) or a top-level step.
    Body {
        steps: &'a [String],
        body: &'a [String],
    },
    /// A `simulate` hint: fixed before the run, so no step outputs.
    Hint,
}

/// Step keys referenced by a step, in first-use order.
#[derive(Debug, Default)]
pub(super) struct Refs {
    /// Keys at the step's own level (top-level steps, or body steps inside a body).
    pub local: Vec<String>,
    /// Top-level keys referenced from inside a loop body.
    pub outer: Vec<String>,
}

fn push_unique(v: &mut Vec<String>, key: &str) {
    if !v.iter().any(|k| k == key) {
        v.push(key.to_owned());
    }
}

/// A binding that cannot be resolved: what is wrong, and the text to point at.
#[derive(Debug)]
pub(super) struct BindError {
    pub message: String,
    /// The start of the offending binding as written (e.g. `${steps.ghost`).
    pub token: Option<String>,
}

impl BindError {
    fn new(message: String, token: impl Into<String>) -> Self {
        Self {
            message,
            token: Some(token.into()),
        }
    }
}

/// Binds every string in `value` (mapping keys are left alone).
pub(super) fn bind(
    value: &Value,
    params: &BTreeMap<String, Value>,
    scope: Scope<'_>,
    refs: &mut Refs,
) -> Result<Value, BindError> {
    Ok(match value {
        Value::String(s) => bind_str(s, params, scope, refs)?,
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| bind(v, params, scope, refs))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| Ok((k.clone(), bind(v, params, scope, refs)?)))
                .collect::<Result<_, BindError>>()?,
        ),
        other => other.clone(),
    })
}

enum Piece<'s> {
    Text(&'s str),
    /// The inside of a `${…}`.
    Binding(&'s str),
}

/// Splits a string into text and bindings; `$${` is a literal `${`.
fn pieces(s: &str) -> Result<Vec<Piece<'_>>, BindError> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(at) = rest.find("${") {
        if rest[..at].ends_with('$') {
            out.push(Piece::Text(&rest[..at - 1]));
            out.push(Piece::Text("${"));
            rest = &rest[at + 2..];
            continue;
        }
        out.push(Piece::Text(&rest[..at]));
        let inner = &rest[at + 2..];
        let Some(close) = inner.find('}') else {
            return Err(BindError::new(
                format!("unterminated `${{` in `{s}`: expected {ACCEPTED}"),
                &rest[at..],
            ));
        };
        out.push(Piece::Binding(&inner[..close]));
        rest = &inner[close + 1..];
    }
    out.push(Piece::Text(rest));
    out.retain(|p| !matches!(p, Piece::Text("")));
    Ok(out)
}

enum Form<'s> {
    Param(&'s str),
    /// `${steps.KEY.output<tail>}`, tail empty or `.field…`.
    Step {
        key: &'s str,
        tail: &'s str,
    },
    Engine,
}

fn classify(inner: &str) -> Result<Form<'_>, BindError> {
    let token = format!("${{{inner}");
    if let Some(name) = inner.strip_prefix("params.") {
        if name.is_empty() {
            return Err(BindError::new(
                "`${params.}` names no parameter: expected `${params.<name>}`".into(),
                token,
            ));
        }
        return Ok(Form::Param(name));
    }
    if let Some(rest) = inner.strip_prefix("steps.") {
        let at = rest.match_indices(".output").map(|(i, _)| i).find(|i| {
            let after = &rest[i + ".output".len()..];
            after.is_empty() || after.starts_with('.')
        });
        return match at {
            Some(i) if i > 0 => Ok(Form::Step {
                key: &rest[..i],
                tail: &rest[i + ".output".len()..],
            }),
            _ => {
                let key = rest.split('.').next().unwrap_or(rest);
                Err(BindError::new(
                    format!(
                        "`${{{inner}}}` does not read a step's output: expected \
                         `${{steps.{key}.output}}` or `${{steps.{key}.output.<field>…}}`"
                    ),
                    token,
                ))
            }
        };
    }
    let engine = inner.starts_with("deps.")
        || inner == "item"
        || inner.starts_with("item.")
        || inner == "index"
        || inner == "loop.iteration"
        || inner.starts_with("prev.");
    if engine {
        return Ok(Form::Engine);
    }
    Err(BindError::new(
        format!("unknown binding `${{{inner}}}`: expected {ACCEPTED}"),
        token,
    ))
}

fn param<'p>(name: &str, params: &'p BTreeMap<String, Value>) -> Result<&'p Value, BindError> {
    params.get(name).ok_or_else(|| {
        let known: Vec<&str> = params.keys().map(String::as_str).collect();
        BindError::new(
            format!(
                "unknown parameter `{name}` in `${{params.{name}}}`: expected one of the declared parameters ({})",
                list_or_none(&known)
            ),
            format!("${{params.{name}"),
        )
    })
}

/// Records a step reference; the binding the engine gets.
fn step_ref(key: &str, tail: &str, scope: Scope<'_>, refs: &mut Refs) -> Result<Value, BindError> {
    let token = format!("${{steps.{key}");
    let unknown = |known: String| {
        BindError::new(
            format!("`${{steps.{key}.output{tail}}}` names unknown step `{key}`: expected {known}"),
            token.clone(),
        )
    };
    match scope {
        Scope::Top { steps } => {
            if !steps.iter().any(|s| s == key) {
                return Err(unknown(format!("one of the steps ({})", names(steps))));
            }
            push_unique(&mut refs.local, key);
        }
        Scope::Body { steps, body } => {
            // A body key shadows a top-level key of the same name, as in the engine.
            if body.iter().any(|s| s == key) {
                push_unique(&mut refs.local, key);
            } else if steps.iter().any(|s| s == key) {
                push_unique(&mut refs.outer, key);
            } else {
                return Err(unknown(format!(
                    "a body step ({}) or a step of the file ({})",
                    names(body),
                    names(steps)
                )));
            }
        }
        Scope::Hint => {
            return Err(BindError::new(
                "`simulate` cannot read step outputs: a hint is fixed before the run (use `${params.…}` or literal values)".into(),
                token,
            ));
        }
    }
    Ok(Value::String(format!("${{deps.{key}.output{tail}}}")))
}

fn names(keys: &[String]) -> String {
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    list_or_none(&keys)
}

fn list_or_none(keys: &[&str]) -> String {
    if keys.is_empty() {
        "none".into()
    } else {
        keys.join(", ")
    }
}

fn bind_str(
    s: &str,
    params: &BTreeMap<String, Value>,
    scope: Scope<'_>,
    refs: &mut Refs,
) -> Result<Value, BindError> {
    if !s.contains("${") {
        return Ok(Value::String(s.to_owned()));
    }
    let pieces = pieces(s)?;
    // A string that is exactly one binding takes the bound value's type.
    if let [Piece::Binding(inner)] = pieces.as_slice() {
        return match classify(inner)? {
            Form::Param(name) => Ok(param(name, params)?.clone()),
            Form::Step { key, tail } => step_ref(key, tail, scope, refs),
            Form::Engine => Ok(Value::String(s.to_owned())),
        };
    }
    let mut out = String::with_capacity(s.len());
    for piece in pieces {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Binding(inner) => match classify(inner)? {
                Form::Param(name) => match param(name, params)? {
                    Value::String(v) => out.push_str(v),
                    other => out.push_str(&other.to_string()),
                },
                Form::Step { key, .. } => {
                    // The engine substitutes outputs only for whole strings: inside text the
                    // binding would reach the agent as a literal.
                    return Err(BindError::new(
                        format!(
                            "`${{{inner}}}` must be the whole string value, not part of `{s}`: \
                             the engine passes a step's output only as a whole value"
                        ),
                        format!("${{steps.{key}"),
                    ));
                }
                Form::Engine => {
                    out.push_str("${");
                    out.push_str(inner);
                    out.push('}');
                }
            },
        }
    }
    Ok(Value::String(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params() -> BTreeMap<String, Value> {
        BTreeMap::from([
            ("n".to_string(), json!(3)),
            ("mods".to_string(), json!(["a", "b"])),
            ("task".to_string(), json!("Add a cache")),
        ])
    }

    fn run(v: Value, scope: Scope<'_>) -> Result<(Value, Refs), BindError> {
        let mut refs = Refs::default();
        bind(&v, &params(), scope, &mut refs).map(|v| (v, refs))
    }

    #[test]
    fn whole_bindings_keep_their_type_and_text_is_interpolated() {
        let steps = ["plan".to_string()];
        let (v, refs) = run(
            json!({
                "n": "${params.n}", "mods": "${params.mods}",
                "say": "Do ${params.task} in ${params.n} steps over ${params.mods}",
                "plan": "${steps.plan.output.modules}",
                "item": "${item.name}", "lit": "cost: $${HOME}", "mixed": "round ${loop.iteration}"
            }),
            Scope::Top { steps: &steps },
        )
        .unwrap();
        assert_eq!(
            v,
            json!({
                "n": 3, "mods": ["a", "b"],
                "say": "Do Add a cache in 3 steps over [\"a\",\"b\"]",
                "plan": "${deps.plan.output.modules}",
                "item": "${item.name}", "lit": "cost: ${HOME}", "mixed": "round ${loop.iteration}"
            })
        );
        assert_eq!(refs.local, vec!["plan"]);
    }

    #[test]
    fn body_steps_bind_body_keys_locally_and_top_keys_as_outer() {
        let steps = ["plan".to_string(), "cycle".to_string()];
        let body = ["implement".to_string(), "review".to_string()];
        let (_, refs) = run(
            json!(["${steps.implement.output}", "${steps.plan.output}"]),
            Scope::Body {
                steps: &steps,
                body: &body,
            },
        )
        .unwrap();
        assert_eq!(refs.local, vec!["implement"]);
        assert_eq!(refs.outer, vec!["plan"]);
    }

    #[test]
    fn bad_bindings_say_what_is_expected() {
        let steps = ["plan".to_string()];
        let top = Scope::Top { steps: &steps };
        let err = run(json!("${steps.ghost.output}"), top).unwrap_err();
        assert!(
            err.message.contains("unknown step `ghost`"),
            "{}",
            err.message
        );
        assert_eq!(err.token.as_deref(), Some("${steps.ghost"));
        let err = run(json!("${steps.plan}"), top).unwrap_err();
        assert!(
            err.message.contains("`${steps.plan.output}`"),
            "{}",
            err.message
        );
        let err = run(json!("${foo}"), top).unwrap_err();
        assert!(
            err.message.contains("unknown binding `${foo}`"),
            "{}",
            err.message
        );
        let err = run(json!("${params.nope}"), top).unwrap_err();
        assert!(err.message.contains("mods, n, task"), "{}", err.message);
        let err = run(json!("see ${steps.plan.output}"), top).unwrap_err();
        assert!(err.message.contains("whole string"), "{}", err.message);
        let err = run(json!("${params.n"), top).unwrap_err();
        assert!(err.message.contains("unterminated"), "{}", err.message);
        let err = run(json!({"output": "${steps.plan.output}"}), Scope::Hint).unwrap_err();
        assert!(err.message.contains("simulate"), "{}", err.message);
    }
}
