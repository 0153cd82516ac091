//! Text that can be stored: PostgreSQL's `text` and `jsonb` cannot hold U+0000, so a NUL
//! anywhere in a string (or an object key) of an input is refused at the edge with the JSON
//! path where it sits, instead of failing a database statement later — and every batch that
//! statement belonged to. Also: bounding text that is echoed back in errors and logs.

use serde_json::Value;

/// The JSON path (`$.input.items[3].name`) of the first string or key holding U+0000.
pub fn find_nul(value: &Value) -> Option<String> {
    fn walk(value: &Value, path: &mut String) -> bool {
        match value {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().enumerate().any(|(i, v)| {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                let found = walk(v, path);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            Value::Object(map) => map.iter().any(|(k, v)| {
                let len = path.len();
                path.push('.');
                path.push_str(&k.replace('\0', "\\u0000"));
                let found = k.contains('\0') || walk(v, path);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            _ => false,
        }
    }
    let mut path = String::from("$");
    walk(value, &mut path).then_some(path)
}

/// Whether raw JSON bytes may hold a NUL: a JSON text can carry one only as the escape
/// `\u0000` (a raw NUL byte inside a string is invalid JSON). False means certainly not, so
/// the precise walk of [`find_nul`] runs only when this says maybe.
pub fn may_hold_nul(json: &[u8]) -> bool {
    json.windows(6).any(|w| w == b"\\u0000")
}

/// The path of a NUL in a raw JSON document, if it holds one (an unparsable document: `None`,
/// its parser reports it).
pub fn find_nul_in_json(json: &[u8]) -> Option<String> {
    if !may_hold_nul(json) {
        return None;
    }
    serde_json::from_slice::<Value>(json)
        .ok()
        .and_then(|v| find_nul(&v))
}

/// Checks a plain string for U+0000; `Err` says where.
pub fn check_storable(field: &str, s: &str) -> Result<(), String> {
    if s.contains('\0') {
        return Err(format!(
            "{field} contains U+0000 (NUL), which cannot be stored"
        ));
    }
    Ok(())
}

/// Replaces U+0000 with U+FFFD: for free text that is only informative (an error message, a
/// reason) and better kept altered than lost.
pub fn scrub_nul(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.to_string()
    }
}

/// Longest text echoed back in an error message or a log field.
pub const MAX_ECHO_CHARS: usize = 512;

/// `s` cut to at most `max` characters (with `…` and the original length when cut), control
/// characters shown as spaces: safe to echo in an error reply, a header or a log line.
pub fn bounded(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let total = s.chars().count();
    if total > max {
        out.push_str(&format!("… ({total} characters)"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_nul_is_found_with_its_path_in_strings_keys_and_arrays() {
        assert_eq!(
            find_nul(&json!({"a": "ok", "b": [1, "x\u{0}y"]})),
            Some("$.b[1]".into())
        );
        assert_eq!(
            find_nul(&json!({"outer": {"k\u{0}": 1}})),
            Some("$.outer.k\\u0000".into())
        );
        assert_eq!(find_nul(&json!({"a": ["fine", {"b": "fine"}]})), None);
        assert_eq!(find_nul(&json!("\u{0}")), Some("$".into()));
    }

    #[test]
    fn the_raw_scan_is_exact_about_escaped_backslashes() {
        assert_eq!(find_nul_in_json(br#"{"a": "x\u0000"}"#), Some("$.a".into()));
        // `\\u0000` is a backslash followed by the text u0000: storable.
        assert_eq!(find_nul_in_json(br#"{"a": "x\\u0000"}"#), None);
        assert!(!may_hold_nul(br#"{"a": 1}"#));
    }

    #[test]
    fn bounded_text_is_cut_and_says_how_long_it_was() {
        let long = "a".repeat(1000);
        let cut = bounded(&long, 10);
        assert!(cut.starts_with("aaaaaaaaaa…"), "{cut}");
        assert!(cut.contains("1000"));
        assert_eq!(bounded("a\nb", 10), "a b");
        assert_eq!(scrub_nul("a\u{0}b"), "a\u{FFFD}b");
        assert!(check_storable("name", "a\u{0}").is_err());
    }
}
