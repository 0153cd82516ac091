//! Finds where things are in a pattern file's text, for errors found after parsing (unknown
//! references, bad parameters, invalid steps). The parsed tree carries no positions, so this
//! searches the source: a step is found by its `key: <step>` entry, a field by `name:` (or
//! `"name":` in JSON), a token by its first occurrence inside the step's stretch of text.

/// Step positions in one file's text.
pub(super) struct Locator<'a> {
    text: &'a str,
    /// Top-level steps, in file order: (key, offset of its `key:` entry, body steps).
    steps: Vec<Mark>,
}

struct Mark {
    key: String,
    at: Option<usize>,
    body: Vec<(String, Option<usize>)>,
}

impl<'a> Locator<'a> {
    /// `steps`: each top-level key with the keys of its loop body (empty if none).
    pub(super) fn new(text: &'a str, steps: &[(String, Vec<String>)]) -> Self {
        let section = top_field(text, "steps").unwrap_or(0);
        let mut from = section;
        let mut marks: Vec<Mark> = Vec::with_capacity(steps.len());
        for (key, _) in steps {
            // Steps are usually in order; if one is not found after the previous one (say, its
            // `key` comes after a nested body), search the whole section again.
            let at = find_step(text, key, from, text.len())
                .or_else(|| find_step(text, key, section, text.len()));
            if let Some(at) = at {
                from = at + 1;
            }
            marks.push(Mark {
                key: key.clone(),
                at,
                body: Vec::new(),
            });
        }
        let top: Vec<usize> = marks.iter().filter_map(|m| m.at).collect();
        for (mark, (_, body)) in marks.iter_mut().zip(steps) {
            let Some(start) = mark.at else {
                mark.body = body.iter().map(|k| (k.clone(), None)).collect();
                continue;
            };
            let end = next_after(&top, start).unwrap_or(text.len());
            let mut from = start;
            for key in body {
                let at = find_step(text, key, from, end);
                if let Some(at) = at {
                    from = at + 1;
                }
                mark.body.push((key.clone(), at));
            }
        }
        Self { text, steps: marks }
    }

    /// Offsets of every step entry found, sorted.
    fn all_marks(&self) -> Vec<usize> {
        let mut all: Vec<usize> = self
            .steps
            .iter()
            .flat_map(|m| m.at.into_iter().chain(m.body.iter().filter_map(|b| b.1)))
            .collect();
        all.sort_unstable();
        all
    }

    /// The offset of step `path` (`key`, or `loop/body key`).
    pub(super) fn step(&self, path: &str) -> Option<usize> {
        if let Some(m) = self.steps.iter().find(|m| m.key == path) {
            return m.at;
        }
        let (outer, inner) = path.split_once('/')?;
        let m = self.steps.iter().find(|m| m.key == outer)?;
        m.body.iter().find(|b| b.0 == inner).and_then(|b| b.1)
    }

    /// The stretch of text that belongs to step `path`: from its `key:` entry to the next step
    /// entry (a top-level step's stretch includes its loop body), and the stretch before it
    /// back to the previous entry (fields written before `key:`).
    fn regions(&self, path: &str) -> Option<[(usize, usize); 2]> {
        let start = self.step(path)?;
        let is_top = self.steps.iter().any(|m| m.key == path);
        let top: Vec<usize> = self.steps.iter().filter_map(|m| m.at).collect();
        let all = self.all_marks();
        let ends = if is_top { &top } else { &all };
        let end = next_after(ends, start).unwrap_or(self.text.len());
        let before = all.iter().rev().find(|o| **o < start).copied();
        let before = before.map_or(start, |b| (b + 1).min(start));
        Some([(start, end), (before, start)])
    }

    /// The first occurrence of `token` in step `path`'s text.
    pub(super) fn token_in_step(&self, path: &str, token: &str) -> Option<usize> {
        self.regions(path)?
            .into_iter()
            .find_map(|(s, e)| self.text.get(s..e)?.find(token).map(|o| s + o))
    }

    /// The first `name:` field entry in step `path`'s text.
    pub(super) fn field_in_step(&self, path: &str, name: &str) -> Option<usize> {
        self.regions(path)?
            .into_iter()
            .find_map(|(s, e)| find_field(self.text, name, s, e))
    }

    /// The first occurrence of `token` after field `field` of step `path` (a value inside a
    /// field, like a name in `depends_on`).
    pub(super) fn value_in_step(&self, path: &str, field: &str, token: &str) -> Option<usize> {
        let [(s, e), _] = self.regions(path)?;
        let f = find_field(self.text, field, s, e)?;
        self.text.get(f..e)?.find(token).map(|o| f + o)
    }

    /// The second `key: <key>` entry of the steps section (the duplicate of a repeated key).
    pub(super) fn second_step(&self, key: &str) -> Option<usize> {
        let first = self.steps.iter().find(|m| m.key == key)?.at?;
        find_step(self.text, key, first + 1, self.text.len())
    }

    /// A top-level field (`name:`, `steps:`, …).
    pub(super) fn top_field(&self, name: &str) -> Option<usize> {
        top_field(self.text, name)
    }
}

/// Parameter `name`'s entry under `parameters:`.
pub(super) fn param(text: &str, name: &str) -> Option<usize> {
    let from = top_field(text, "parameters")?;
    find_field(text, name, from, text.len())
}

/// 1-based (line, column) of a byte offset; the column counts characters.
pub(super) fn position(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

fn next_after(sorted: &[usize], at: usize) -> Option<usize> {
    sorted.iter().copied().find(|o| *o > at)
}

/// A top-level field: at the start of a line in YAML, or `"name":` anywhere in JSON.
pub(super) fn top_field(text: &str, name: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(at) = find_field(text, name, from, text.len()) {
        let quoted = text[at..].starts_with('"');
        if quoted || at == 0 || text[..at].ends_with('\n') {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// The first `name:` (or `"name":`, `'name':`) mapping entry in `text[from..to]`; the offset
/// of the name (or its opening quote).
pub(super) fn find_field(text: &str, name: &str, from: usize, to: usize) -> Option<usize> {
    let hay = text.get(from..to.min(text.len()))?;
    for (i, _) in hay.match_indices(name) {
        let at = from + i;
        let after = at + name.len();
        let (start, end) = match quote_before(text, at) {
            Some(q) if text[after..].starts_with(q) => (at - 1, after + 1),
            Some(_) => continue,
            None => (at, after),
        };
        // A quoted match found by searching from inside its quotes was reported already.
        if start < from {
            continue;
        }
        let boundary = text[..start]
            .chars()
            .next_back()
            .is_none_or(|c| c.is_whitespace() || "{,[-".contains(c));
        let rest = text[end..].trim_start_matches([' ', '\t']);
        if boundary && rest.starts_with(':') {
            return Some(start);
        }
    }
    None
}

/// The offset of the `key` field whose value is `key`, in `text[from..to]`.
pub(super) fn find_step(text: &str, key: &str, from: usize, to: usize) -> Option<usize> {
    let mut at = from;
    while let Some(field) = find_field(text, "key", at, to) {
        at = field + 1;
        let colon = text[field..].find(':').map(|c| field + c + 1)?;
        let value = text[colon..].trim_start_matches([' ', '\t']);
        let (value, close) = match value.chars().next() {
            Some(q @ ('"' | '\'')) => (&value[1..], Some(q)),
            _ => (value, None),
        };
        let Some(rest) = value.strip_prefix(key) else {
            continue;
        };
        let ends = match close {
            Some(q) => rest.starts_with(q),
            None => rest
                .chars()
                .next()
                .is_none_or(|c| c.is_whitespace() || ",}]#".contains(c)),
        };
        if ends {
            return Some(field);
        }
    }
    None
}

fn quote_before(text: &str, at: usize) -> Option<char> {
    text[..at]
        .chars()
        .next_back()
        .filter(|c| *c == '"' || *c == '\'')
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "name: x\nsteps:\n  - key: plan\n    input: {a: 1}\n  - key: cycle\n    loop:\n      body:\n        - key: implement\n          input: {x: \"${steps.ghost.output}\"}\n  - key: \"last\"\n";

    #[test]
    fn steps_fields_and_tokens_are_found_in_their_step() {
        let loc = Locator::new(
            YAML,
            &[
                ("plan".into(), vec![]),
                ("cycle".into(), vec!["implement".into()]),
                ("last".into(), vec![]),
            ],
        );
        assert_eq!(position(YAML, loc.step("plan").unwrap()), (3, 5));
        assert_eq!(
            position(YAML, loc.step("cycle/implement").unwrap()),
            (8, 11)
        );
        assert_eq!(position(YAML, loc.step("last").unwrap()), (10, 5));
        let ghost = loc
            .token_in_step("cycle/implement", "${steps.ghost")
            .unwrap();
        assert_eq!(position(YAML, ghost), (9, 23));
        assert_eq!(
            position(YAML, loc.field_in_step("plan", "input").unwrap()),
            (4, 5)
        );
        assert_eq!(position(YAML, loc.top_field("steps").unwrap()), (2, 1));
        assert!(loc.token_in_step("plan", "${steps.ghost").is_none());
    }

    #[test]
    fn json_fields_are_found_with_their_quotes() {
        let json = r#"{"name": "x", "steps": [{"key": "a"}, {"input": 1, "key": "b"}]}"#;
        assert_eq!(top_field(json, "steps"), Some(14));
        assert_eq!(find_step(json, "b", 0, json.len()), Some(51));
        assert_eq!(find_step(json, "c", 0, json.len()), None);
        // A longer key that starts with the one looked for is not it.
        assert_eq!(find_step("key: ab\nkey: a\n", "a", 0, 15), Some(8));
    }
}
