//! `extract`: named RFC 9535 JSONPaths, parsed at validation and applied to a response's JSON
//! body. Pure: no I/O.
use super::{excerpt::excerpt, InvalidAction};
use serde_json::Value;
use serde_json_path::JsonPath;

/// Most `extract` entries.
pub const MAX_EXTRACTS: usize = 64;
/// Longest JSONPath, bytes.
pub const MAX_EXTRACT_PATH_LEN: usize = 1_024;
/// Longest `extract` name, bytes.
pub const MAX_EXTRACT_NAME_LEN: usize = 128;
/// Deepest nesting of brackets and parentheses in a path: the parser recurses per level, and a
/// validation must not exhaust a thread's stack whatever the caller writes.
const MAX_PATH_NESTING: usize = 16;

/// The parsed paths, by name (in name order).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Extracts(Vec<(String, JsonPath)>);

impl Extracts {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each name and its path, written out again.
    pub fn paths(&self) -> impl Iterator<Item = (&str, String)> {
        self.0.iter().map(|(name, path)| (name.as_str(), path.to_string()))
    }

    /// Every path applied to `body` (`None`: the body is not JSON): the one node selected, a
    /// list when several are, null when none is.
    pub fn apply(&self, body: Option<&Value>) -> Vec<(String, Value)> {
        self.0
            .iter()
            .map(|(name, path)| {
                let value = match body {
                    None => Value::Null,
                    Some(body) => {
                        let nodes = path.query(body).all();
                        match nodes.len() {
                            0 => Value::Null,
                            1 => nodes[0].clone(),
                            _ => Value::Array(nodes.into_iter().cloned().collect()),
                        }
                    }
                };
                (name.clone(), value)
            })
            .collect()
    }
}

/// Parses `extract` (name → path), each problem named `extract[NAME]`.
pub(super) fn parse(mut input: Vec<(String, String)>, bad: &mut InvalidAction) -> Extracts {
    if input.len() > MAX_EXTRACTS {
        bad.push("extract", format!("has {} entries; at most {MAX_EXTRACTS} are allowed", input.len()));
        return Extracts::default();
    }
    input.sort();
    let mut parsed = Vec::with_capacity(input.len());
    for (name, path) in input {
        let field = format!("extract[{}]", excerpt(&name, MAX_EXTRACT_NAME_LEN));
        if name.is_empty() {
            bad.push(field, "the name is empty");
        } else if name.len() > MAX_EXTRACT_NAME_LEN {
            bad.push(field, format!("the name is longer than {MAX_EXTRACT_NAME_LEN} bytes"));
        } else if path.len() > MAX_EXTRACT_PATH_LEN {
            bad.push(field, format!("the path is longer than {MAX_EXTRACT_PATH_LEN} bytes"));
        } else if nesting(&path) > MAX_PATH_NESTING {
            bad.push(field, format!("the path nests brackets deeper than {MAX_PATH_NESTING} levels"));
        } else {
            match JsonPath::parse(&path) {
                Ok(p) => parsed.push((name, p)),
                Err(e) => {
                    bad.push(field, format!("\"{}\" is not an RFC 9535 JSONPath: {e}", excerpt(&path, 64)))
                }
            }
        }
    }
    Extracts(parsed)
}

/// The characters of `text` outside its quoted strings ('…' or "…", backslash escapes inside),
/// each opening quote included: what the bound checks on paths and conditions look at.
pub(super) fn unquoted(text: &str) -> impl Iterator<Item = char> + '_ {
    let mut quote: Option<char> = None;
    let mut escaped = false;
    text.chars().filter(move |&c| match quote {
        Some(q) => {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                _ if c == q => quote = None,
                _ => {}
            }
            false
        }
        None => {
            if c == '\'' || c == '"' {
                quote = Some(c);
            }
            true
        }
    })
}

/// The deepest nesting of `[` and `(` in `text`, quoted strings skipped. Shared with the CEL
/// conditions' bound.
pub(super) fn nesting(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    for c in unquoted(text) {
        match c {
            '[' | '(' | '{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ']' | ')' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn extracts(pairs: &[(&str, &str)]) -> Result<Extracts, InvalidAction> {
        let mut bad = InvalidAction::default();
        let e = parse(pairs.iter().map(|(n, p)| (n.to_string(), p.to_string())).collect(), &mut bad);
        if bad.is_empty() {
            Ok(e)
        } else {
            Err(bad)
        }
    }

    #[test]
    fn one_node_is_the_value_several_a_list_none_null() {
        let e = extracts(&[("id", "$.items[0].id"), ("ids", "$.items[*].id"), ("gone", "$.nope")]).unwrap();
        let body = json!({"items": [{"id": 7, "tags": [["a"]]}, {"id": 8}]});
        assert_eq!(
            e.apply(Some(&body)),
            vec![("gone".into(), Value::Null), ("id".into(), json!(7)), ("ids".into(), json!([7, 8]))]
        );
        assert_eq!(e.apply(None)[1], ("id".into(), Value::Null));
    }

    #[test]
    fn bad_paths_name_the_entry() {
        let bad = extracts(&[("id", "$.items[")]).unwrap_err();
        assert_eq!(bad.violations[0].field, "extract[id]");
        assert!(bad.violations[0].description.contains("RFC 9535"), "{bad}");
        let deep = format!("$[?{}@.a{}]", "(".repeat(40), ")".repeat(40));
        assert_eq!(extracts(&[("d", &deep)]).unwrap_err().violations[0].field, "extract[d]");
        let long = format!("$.{}", "a".repeat(MAX_EXTRACT_PATH_LEN));
        assert!(extracts(&[("l", &long)]).is_err());
        let many: Vec<(String, String)> = (0..=MAX_EXTRACTS).map(|i| (i.to_string(), "$".into())).collect();
        let mut bad = InvalidAction::default();
        parse(many, &mut bad);
        assert_eq!(bad.violations[0].field, "extract");
    }
}
