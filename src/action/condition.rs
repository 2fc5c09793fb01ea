//! `success_condition` and `retry_condition`: CEL expressions compiled at validation and
//! evaluated over one attempt's response (`status`, `headers`, `body`, `elapsed_ms`). Pure: no
//! I/O. CEL has no loops or recursion, and the expression's length and nesting are bounded
//! here, so an evaluation is bounded by the expression and the (capped) body.
use super::{excerpt::excerpt, extract::nesting, InvalidAction};
use cel::{Context, Program, Value as Cel};
use std::{collections::HashMap, fmt, sync::Arc, time::Duration};

/// Longest condition, bytes.
pub const MAX_CONDITION_LEN: usize = 4_096;
/// Deepest nesting of brackets and parentheses: the parser and the evaluator recurse per
/// level, and no expression may exhaust a thread's stack.
const MAX_CONDITION_NESTING: usize = 32;
/// Longest excerpt of the expression quoted in an error.
const QUOTED: usize = 80;

/// A compiled CEL expression with its source (for messages).
#[derive(Clone)]
pub struct Condition {
    source: Arc<str>,
    program: Arc<Program>,
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.quoted())
    }
}

impl PartialEq for Condition {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// What a condition sees of an attempt's response.
pub struct Facts<'a> {
    pub status: u16,
    /// Names as received (lower-case from hyper); repeated names are joined with ", ".
    pub headers: &'a [(String, String)],
    pub body: FactsBody<'a>,
    pub elapsed: Duration,
}

/// The body as a condition sees it.
pub enum FactsBody<'a> {
    Json(&'a serde_json::Value),
    Text(&'a str),
    Bytes(&'a [u8]),
}

/// The variables of one evaluation, built once for both conditions.
pub struct Variables(Context<'static, 'static>);

impl Facts<'_> {
    /// The CEL variables, or why they could not be built.
    pub fn variables(&self) -> Result<Variables, String> {
        let mut context = Context::default();
        context.add_variable_from_value("status", i64::from(self.status));
        let mut headers: HashMap<String, String> = HashMap::new();
        for (name, value) in self.headers {
            headers
                .entry(name.to_ascii_lowercase())
                .and_modify(|joined| {
                    joined.push_str(", ");
                    joined.push_str(value);
                })
                .or_insert_with(|| value.clone());
        }
        context.add_variable_from_value("headers", headers);
        let body = match self.body {
            FactsBody::Json(json) => cel::to_value(json).map_err(|e| e.to_string())?,
            FactsBody::Text(text) => Cel::String(Arc::new(text.to_owned())),
            FactsBody::Bytes(bytes) => Cel::Bytes(Arc::new(bytes.to_vec())),
        };
        context.add_variable_from_value("body", body);
        context.add_variable_from_value("elapsed_ms", self.elapsed.as_millis().min(i64::MAX as u128) as i64);
        Ok(Variables(context))
    }
}

impl Condition {
    /// Compiles `source` for `field`; a problem is added to `bad` (with the position, for a
    /// syntax error). Empty means no condition.
    pub(super) fn compile(field: &str, source: &str, bad: &mut InvalidAction) -> Option<Self> {
        if source.trim().is_empty() {
            return None;
        }
        if source.len() > MAX_CONDITION_LEN {
            bad.push(field, format!("is longer than {MAX_CONDITION_LEN} bytes"));
            return None;
        }
        if nesting(source) > MAX_CONDITION_NESTING {
            bad.push(field, format!("nests brackets deeper than {MAX_CONDITION_NESTING} levels"));
            return None;
        }
        // The parser is generated code: a panic in it is a bad expression, not a lost call.
        let compiled = std::panic::catch_unwind(|| Program::compile(source).map_err(|e| parse_error(&e)));
        match compiled {
            Ok(Ok(program)) => Some(Self { source: source.into(), program: Arc::new(program) }),
            Ok(Err(e)) => {
                bad.push(field, format!("is not valid CEL: {e}"));
                None
            }
            Err(_) => {
                bad.push(field, "is not valid CEL");
                None
            }
        }
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The expression, as quoted in messages (an excerpt).
    pub fn quoted(&self) -> String {
        let short = excerpt(&self.source, QUOTED);
        if short.len() < self.source.len() {
            format!("\"{short}…\"")
        } else {
            format!("\"{short}\"")
        }
    }

    /// True or false; an error when it fails or gives something other than a bool.
    pub fn evaluate(&self, variables: &Variables) -> Result<bool, String> {
        match self.program.execute(&variables.0) {
            Ok(Cel::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("gave {} instead of a bool", type_name(&other))),
            Err(e) => Err(excerpt(&e.to_string(), 200).into_owned()),
        }
    }
}

/// The first syntax error, with its position (line:column), without the source echoed back.
fn parse_error(e: &cel::ParseErrors) -> String {
    match e.errors.first() {
        Some(first) => {
            let more = e.errors.len() - 1;
            let tail = if more > 0 { format!(" (and {more} more)") } else { String::new() };
            format!("line {}, column {}: {}{tail}", first.pos.0, first.pos.1, excerpt(&first.msg, 200))
        }
        None => "does not parse".into(),
    }
}

fn type_name(v: &Cel) -> &'static str {
    match v {
        Cel::List(_) => "a list",
        Cel::Map(_) => "a map",
        Cel::Function(..) => "a function",
        Cel::Int(_) => "an int",
        Cel::UInt(_) => "a uint",
        Cel::Float(_) => "a double",
        Cel::String(_) => "a string",
        Cel::Bytes(_) => "bytes",
        Cel::Bool(_) => "a bool",
        Cel::Null => "null",
        #[allow(unreachable_patterns)]
        _ => "a value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compile(source: &str) -> Result<Condition, InvalidAction> {
        let mut bad = InvalidAction::default();
        match Condition::compile("success_condition", source, &mut bad) {
            Some(c) if bad.is_empty() => Ok(c),
            _ => Err(bad),
        }
    }

    fn facts<'a>(body: &'a serde_json::Value, headers: &'a [(String, String)]) -> Facts<'a> {
        Facts { status: 200, headers, body: FactsBody::Json(body), elapsed: Duration::from_millis(12) }
    }

    #[test]
    fn sees_status_headers_body_and_elapsed() {
        let body = json!({"state": "done", "id": 7, "items": [{"n": 1}, {"n": 2}]});
        let headers = vec![("x-a".to_string(), "1".to_string()), ("x-a".into(), "2".into())];
        let vars = facts(&body, &headers).variables().unwrap();
        for source in [
            r#"status == 200 && body.state == "done""#,
            "body.id == 7 && body.items[1].n == 2",
            r#"headers["x-a"] == "1, 2""#,
            "elapsed_ms == 12",
            "body.items.exists(i, i.n == 2)",
        ] {
            assert_eq!(compile(source).unwrap().evaluate(&vars), Ok(true), "{source}");
        }
        assert_eq!(compile(r#"body.state == "pending""#).unwrap().evaluate(&vars), Ok(false));
        assert!(compile("body.nope == 1").unwrap().evaluate(&vars).is_err());
        assert!(compile("status").unwrap().evaluate(&vars).unwrap_err().contains("an int"));
        let text = Facts { body: FactsBody::Text("ok"), ..facts(&body, &headers) };
        assert_eq!(compile(r#"body == "ok""#).unwrap().evaluate(&text.variables().unwrap()), Ok(true));
    }

    #[test]
    fn compile_errors_give_the_position() {
        let bad = compile("status == ").unwrap_err();
        assert_eq!(bad.violations[0].field, "success_condition");
        assert!(bad.violations[0].description.contains("line 1, column"), "{bad}");
        assert!(compile(&"a".repeat(MAX_CONDITION_LEN + 1)).is_err());
        assert!(compile(&format!("{}1{}", "(".repeat(40), ")".repeat(40))).is_err());
        let mut bad = InvalidAction::default();
        assert!(Condition::compile("retry_condition", "  ", &mut bad).is_none() && bad.is_empty());
    }
}
