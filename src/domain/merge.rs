//! Merge strategies for combining the outputs of several tasks (the coordination patterns'
//! `merge` primitive): pure functions over `(source key, output)` pairs in completion order.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// How outputs are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MergeStrategy {
    /// `{"<source>": output, …}`.
    Combine,
    /// Arrays: every distinct element, first-seen order. Objects: every key; a key with two
    /// different values is a conflict.
    Union,
    /// Arrays: the elements every output has. Objects: the keys every output has with the same value.
    Intersection,
    /// The value (or the `field` of each output) that more than half the sources agree on.
    Majority,
    /// The first output to arrive.
    First,
}

impl MergeStrategy {
    /// The wire name (`combine`, `union`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Combine => "combine",
            Self::Union => "union",
            Self::Intersection => "intersection",
            Self::Majority => "majority",
            Self::First => "first",
        }
    }
}

/// Why outputs could not be merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    #[error("nothing to merge")]
    Empty,
    #[error("{strategy:?} needs every output to be {expected}; `{source_key}` is not")]
    Shape {
        strategy: MergeStrategy,
        expected: &'static str,
        source_key: String,
    },
    #[error("union conflict on `{key}`: the outputs disagree")]
    Conflict { key: String },
    #[error("no majority: the best value has {votes} of {total} votes")]
    NoMajority { votes: usize, total: usize },
}

/// Merges `outputs` (in completion order) with `strategy`; `field` selects what a majority votes on.
pub fn merge(
    strategy: MergeStrategy,
    outputs: &[(String, Value)],
    field: Option<&str>,
) -> Result<Value, MergeError> {
    let Some((_, first)) = outputs.first() else {
        return Err(MergeError::Empty);
    };
    match strategy {
        MergeStrategy::Combine => Ok(Value::Object(
            outputs
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )),
        MergeStrategy::First => Ok(first.clone()),
        MergeStrategy::Union | MergeStrategy::Intersection => set_merge(strategy, outputs, first),
        MergeStrategy::Majority => {
            let pick = |v: &Value| match field {
                Some(f) => v.get(f).cloned().unwrap_or(Value::Null),
                None => v.clone(),
            };
            let mut tally: Vec<(Value, usize)> = Vec::new();
            for (_, v) in outputs {
                let choice = pick(v);
                match tally.iter_mut().find(|(c, _)| *c == choice) {
                    Some((_, n)) => *n += 1,
                    None => tally.push((choice, 1)),
                }
            }
            let (best, votes) = tally
                .into_iter()
                .max_by_key(|(_, n)| *n)
                .unwrap_or((Value::Null, 0));
            if votes * 2 > outputs.len() {
                Ok(best)
            } else {
                Err(MergeError::NoMajority {
                    votes,
                    total: outputs.len(),
                })
            }
        }
    }
}

fn set_merge(
    strategy: MergeStrategy,
    outputs: &[(String, Value)],
    first: &Value,
) -> Result<Value, MergeError> {
    let union = strategy == MergeStrategy::Union;
    match first {
        Value::Array(_) => {
            let mut arrays = Vec::with_capacity(outputs.len());
            for (k, v) in outputs {
                match v {
                    Value::Array(a) => arrays.push(a),
                    _ => {
                        return Err(MergeError::Shape {
                            strategy,
                            expected: "an array",
                            source_key: k.clone(),
                        });
                    }
                }
            }
            let mut out: Vec<Value> = Vec::new();
            if union {
                for a in &arrays {
                    for item in a.iter() {
                        if !out.contains(item) {
                            out.push(item.clone());
                        }
                    }
                }
            } else {
                for item in arrays[0].iter() {
                    if !out.contains(item) && arrays.iter().all(|a| a.contains(item)) {
                        out.push(item.clone());
                    }
                }
            }
            Ok(Value::Array(out))
        }
        Value::Object(_) => {
            let mut objects = Vec::with_capacity(outputs.len());
            for (k, v) in outputs {
                match v {
                    Value::Object(o) => objects.push(o),
                    _ => {
                        return Err(MergeError::Shape {
                            strategy,
                            expected: "an object",
                            source_key: k.clone(),
                        });
                    }
                }
            }
            let mut out = Map::new();
            if union {
                for o in &objects {
                    for (key, value) in o.iter() {
                        match out.get(key) {
                            Some(existing) if existing != value => {
                                return Err(MergeError::Conflict { key: key.clone() });
                            }
                            _ => {
                                out.insert(key.clone(), value.clone());
                            }
                        }
                    }
                }
            } else {
                for (key, value) in objects[0].iter() {
                    if objects.iter().all(|o| o.get(key) == Some(value)) {
                        out.insert(key.clone(), value.clone());
                    }
                }
            }
            Ok(Value::Object(out))
        }
        _ => Err(MergeError::Shape {
            strategy,
            expected: "an array or an object",
            source_key: outputs[0].0.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategy_names_are_the_wire_names() {
        use MergeStrategy::*;
        for s in [Combine, Union, Intersection, Majority, First] {
            assert_eq!(serde_json::to_value(s).unwrap(), json!(s.as_str()));
        }
    }

    fn outs(v: &[(&str, Value)]) -> Vec<(String, Value)> {
        v.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn combine_keeps_every_output_by_source() {
        let o = outs(&[("a", json!(1)), ("b", json!({"x": 2}))]);
        assert_eq!(
            merge(MergeStrategy::Combine, &o, None).unwrap(),
            json!({"a": 1, "b": {"x": 2}})
        );
    }

    #[test]
    fn union_and_intersection_of_arrays_and_objects() {
        let arrays = outs(&[("a", json!([1, 2, 3])), ("b", json!([3, 4, 1]))]);
        assert_eq!(
            merge(MergeStrategy::Union, &arrays, None).unwrap(),
            json!([1, 2, 3, 4])
        );
        assert_eq!(
            merge(MergeStrategy::Intersection, &arrays, None).unwrap(),
            json!([1, 3])
        );
        let objects = outs(&[
            ("a", json!({"x": 1, "y": 2})),
            ("b", json!({"y": 2, "z": 3})),
        ]);
        assert_eq!(
            merge(MergeStrategy::Union, &objects, None).unwrap(),
            json!({"x": 1, "y": 2, "z": 3})
        );
        assert_eq!(
            merge(MergeStrategy::Intersection, &objects, None).unwrap(),
            json!({"y": 2})
        );
        let clash = outs(&[("a", json!({"y": 1})), ("b", json!({"y": 2}))]);
        assert_eq!(
            merge(MergeStrategy::Union, &clash, None),
            Err(MergeError::Conflict { key: "y".into() })
        );
        let mixed = outs(&[("a", json!([1])), ("b", json!({"y": 2}))]);
        assert!(matches!(
            merge(MergeStrategy::Union, &mixed, None),
            Err(MergeError::Shape { .. })
        ));
    }

    #[test]
    fn majority_needs_more_than_half_and_can_vote_on_a_field() {
        let votes = outs(&[
            ("e1", json!({"verdict": "approve", "by": 1})),
            ("e2", json!({"verdict": "reject", "by": 2})),
            ("e3", json!({"verdict": "approve", "by": 3})),
        ]);
        assert_eq!(
            merge(MergeStrategy::Majority, &votes, Some("verdict")).unwrap(),
            json!("approve")
        );
        let split = outs(&[("e1", json!("a")), ("e2", json!("b"))]);
        assert_eq!(
            merge(MergeStrategy::Majority, &split, None),
            Err(MergeError::NoMajority { votes: 1, total: 2 })
        );
    }

    #[test]
    fn first_and_empty() {
        let o = outs(&[("late", json!(2)), ("later", json!(3))]);
        assert_eq!(merge(MergeStrategy::First, &o, None).unwrap(), json!(2));
        assert_eq!(
            merge(MergeStrategy::First, &[], None),
            Err(MergeError::Empty)
        );
    }
}
