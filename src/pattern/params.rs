//! Pattern parameters: their declared types, type checks of supplied values, and parsing of
//! `--param name=value` strings from the command line.

use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// The type of a parameter's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamType {
    String,
    /// A whole number (`3`, or `3.0`, which is stored as `3`).
    Integer,
    Number,
    Boolean,
    /// A JSON array.
    List,
    /// A JSON object.
    Object,
}

impl ParamType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Integer => "integer",
            Self::Number => "number",
            Self::Boolean => "boolean",
            Self::List => "list",
            Self::Object => "object",
        }
    }

    /// `value` as this type (an integral float becomes an integer), or `None` if it is not one.
    pub fn check(self, value: &Value) -> Option<Value> {
        let ok = match self {
            Self::String => value.is_string(),
            Self::Number => value.is_number(),
            Self::Boolean => value.is_boolean(),
            Self::List => value.is_array(),
            Self::Object => value.is_object(),
            Self::Integer => {
                if value.is_i64() || value.is_u64() {
                    true
                } else {
                    let f = value.as_f64()?;
                    // Only integral floats inside i64's exact range convert without loss.
                    let exact = f.fract() == 0.0 && f.abs() < 9.0e15;
                    return exact.then(|| Value::from(f as i64));
                }
            }
        };
        ok.then(|| value.clone())
    }
}

impl fmt::Display for ParamType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One declared parameter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ParamType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The value used when none is given; `None` makes the parameter required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
}

impl ParamSpec {
    pub fn required(&self) -> bool {
        self.default.is_none()
    }
}

/// A `--param` value that does not parse as its parameter's type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parameter `{name}` ({kind}): {message}")]
pub struct ParamError {
    pub name: String,
    pub kind: ParamType,
    pub message: String,
}

/// Parses a command-line value for `param`: strings as they are; integers, numbers and
/// booleans (`true`/`false`) parsed; a list as a JSON array when it starts with `[`, otherwise
/// as comma-separated strings (trimmed; an empty value is an empty list); an object as JSON.
pub fn parse_param(raw: &str, param: &ParamSpec) -> Result<Value, ParamError> {
    let fail = |message: String| ParamError {
        name: param.name.clone(),
        kind: param.kind,
        message,
    };
    let t = raw.trim();
    match param.kind {
        ParamType::String => Ok(Value::String(raw.to_owned())),
        ParamType::Integer => t
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| fail(format!("expected a whole number, got `{raw}`"))),
        ParamType::Number => {
            if let Ok(i) = t.parse::<i64>() {
                return Ok(Value::from(i));
            }
            t.parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .ok_or_else(|| fail(format!("expected a number, got `{raw}`")))
        }
        ParamType::Boolean => match t.to_ascii_lowercase().as_str() {
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            _ => Err(fail(format!("expected `true` or `false`, got `{raw}`"))),
        },
        ParamType::List if t.starts_with('[') => match serde_json::from_str(t) {
            Ok(v @ Value::Array(_)) => Ok(v),
            Ok(_) => Err(fail("expected a JSON array".into())),
            Err(e) => Err(fail(format!("expected a JSON array: {e}"))),
        },
        ParamType::List if t.is_empty() => Ok(Value::Array(Vec::new())),
        ParamType::List => Ok(Value::Array(
            t.split(',')
                .map(|s| Value::String(s.trim().to_owned()))
                .collect(),
        )),
        ParamType::Object => match serde_json::from_str(t) {
            Ok(v @ Value::Object(_)) => Ok(v),
            Ok(_) => Err(fail("expected a JSON object (`{…}`)".into())),
            Err(e) => Err(fail(format!("expected a JSON object: {e}"))),
        },
    }
}

/// What a value is, for messages ("a string", "a list", …).
pub(super) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a fractional number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A parameter as written in a file (its name is the mapping key).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawParam {
    #[serde(rename = "type")]
    pub kind: ParamType,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub default: Option<Value>,
}

/// The `parameters` mapping in file order (a map type would sort or lose it).
#[derive(Debug, Default)]
pub(super) struct OrderedParams(pub Vec<(String, RawParam)>);

impl<'de> Deserialize<'de> for OrderedParams {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedParams;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping of parameter name to {type, description?, default?}")
            }
            fn visit_unit<E: de::Error>(self) -> Result<OrderedParams, E> {
                Ok(OrderedParams::default())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedParams, A::Error> {
                let mut out: Vec<(String, RawParam)> = Vec::new();
                while let Some((name, p)) = map.next_entry::<String, RawParam>()? {
                    if out.iter().any(|(n, _)| *n == name) {
                        return Err(de::Error::custom(format!(
                            "parameter `{name}` is declared twice"
                        )));
                    }
                    out.push((name, p));
                }
                Ok(OrderedParams(out))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(kind: ParamType) -> ParamSpec {
        ParamSpec {
            name: "p".into(),
            kind,
            description: None,
            default: None,
        }
    }

    #[test]
    fn command_line_values_parse_by_type() {
        assert_eq!(
            parse_param(" a, b ", &p(ParamType::String)).unwrap(),
            json!(" a, b ")
        );
        assert_eq!(parse_param("3", &p(ParamType::Integer)).unwrap(), json!(3));
        assert!(parse_param("3.5", &p(ParamType::Integer)).is_err());
        assert_eq!(parse_param("2", &p(ParamType::Number)).unwrap(), json!(2));
        assert_eq!(
            parse_param("0.25", &p(ParamType::Number)).unwrap(),
            json!(0.25)
        );
        assert!(parse_param("NaN", &p(ParamType::Number)).is_err());
        assert_eq!(
            parse_param("TRUE", &p(ParamType::Boolean)).unwrap(),
            json!(true)
        );
        assert!(parse_param("yes", &p(ParamType::Boolean)).is_err());
        assert_eq!(
            parse_param("auth, billing", &p(ParamType::List)).unwrap(),
            json!(["auth", "billing"])
        );
        assert_eq!(
            parse_param("[1, {\"a\": 2}]", &p(ParamType::List)).unwrap(),
            json!([1, {"a": 2}])
        );
        assert_eq!(parse_param("", &p(ParamType::List)).unwrap(), json!([]));
        assert!(parse_param("[1,", &p(ParamType::List)).is_err());
        assert_eq!(
            parse_param("{\"k\": 1}", &p(ParamType::Object)).unwrap(),
            json!({"k": 1})
        );
        let err = parse_param("[1]", &p(ParamType::Object)).unwrap_err();
        assert!(
            err.to_string().starts_with("parameter `p` (object): "),
            "{err}"
        );
    }

    #[test]
    fn integers_accept_integral_floats_only() {
        assert_eq!(ParamType::Integer.check(&json!(3.0)), Some(json!(3)));
        assert_eq!(ParamType::Integer.check(&json!(3.5)), None);
        assert_eq!(ParamType::Integer.check(&json!("3")), None);
        assert_eq!(ParamType::Number.check(&json!(3.5)), Some(json!(3.5)));
        assert_eq!(ParamType::List.check(&json!({})), None);
    }
}
