//! `vars` templating: `{{vars.NAME}}` and `{{vars.a.b}}` in the URL, query values, header values
//! and bodies, each value rendered for where it stands, so no value can change the request's
//! structure: one percent-encoded component in the URL, a typed JSON value (or escaped string
//! content) in a `json` body, plain text in query, form and text values (encoded later), and no
//! CR, LF or other control characters in a header. Rendered after `{{secret:NAME}}` references,
//! so a variable's value is never read as a secret reference. Uses secret_ref's scanner.
use super::{
    secret_ref::{scan, url_component},
    ActionInput, BodyInput, InvalidAction,
};
use serde_json::Value;

const OPEN: &str = "{{vars.";
/// Most variables an action may carry.
pub const MAX_VARS: usize = 1_000;

/// Replaces every `{{vars.…}}` in `input`, reporting unknown variables with their field.
pub(super) fn render(input: &mut ActionInput, bad: &mut InvalidAction) {
    if input.vars.len() > MAX_VARS {
        bad.push("vars", format!("has {} entries; at most {MAX_VARS} are allowed", input.vars.len()));
        return;
    }
    let vars: serde_json::Map<String, Value> = std::mem::take(&mut input.vars).into_iter().collect();
    let vars = Value::Object(vars);
    let mut fill = |text: &mut String, field: &dyn Fn() -> String, how: How| {
        if !text.contains(OPEN) {
            return;
        }
        let rendered = scan(text, OPEN, &mut |name| {
            let value = lookup(&vars, name)?;
            let plain = plain_text(value);
            match how {
                How::Url => Ok(url_component(&plain)),
                How::Plain => Ok(plain),
                How::Header if plain.chars().any(|c| c.is_control() && c != '\t') => {
                    Err(format!("variable {name:?} holds CR, LF or another control character"))
                }
                How::Header => Ok(plain),
            }
        });
        match rendered {
            Ok(rendered) => *text = rendered,
            Err(problem) => bad.push(field(), problem),
        }
    };
    fill(&mut input.url, &|| "url".into(), How::Url);
    for (i, (_, value)) in input.query.iter_mut().enumerate() {
        fill(value, &|| format!("query[{i}].value"), How::Plain);
    }
    for (i, (_, value)) in input.headers.iter_mut().enumerate() {
        fill(value, &|| format!("headers[{i}].value"), How::Header);
    }
    match &mut input.body {
        BodyInput::Json(text) if text.contains(OPEN) => match json_body(text, &vars) {
            Ok(Some(rendered)) => *text = rendered,
            // Not JSON even as a template: the json check names it.
            Ok(None) => {}
            Err(problem) => bad.push("json", problem),
        },
        BodyInput::Text(text) => fill(text, &|| "text".into(), How::Plain),
        BodyInput::Form(fields) => {
            for (i, (_, value)) in fields.iter_mut().enumerate() {
                fill(value, &|| format!("form.fields[{i}].value"), How::Plain);
            }
        }
        BodyInput::Json(_) | BodyInput::None | BodyInput::Raw(_) => {}
    }
}

#[derive(Clone, Copy)]
enum How {
    Url,
    Plain,
    Header,
}

/// The variable at `name` (`a` or `a.b.c`, a number indexing a list).
fn lookup<'v>(vars: &'v Value, name: &str) -> Result<&'v Value, String> {
    let mut at = vars;
    for part in name.split('.') {
        let next = match at {
            Value::Object(map) => map.get(part),
            Value::Array(items) => part.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        at = next.ok_or_else(|| format!("refers to unknown variable {:?}", excerpt(name)))?;
    }
    Ok(at)
}

fn excerpt(name: &str) -> String {
    name.chars().take(64).collect()
}

/// A value as text: a string as itself, anything else as its JSON.
fn plain_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The JSON template with a string that is exactly one placeholder replaced by the variable's
/// value (typed: numbers stay numbers), and placeholders inside longer strings (keys included)
/// by the value's text. `Ok(None)`: the template is not JSON.
fn json_body(template: &str, vars: &Value) -> Result<Option<String>, String> {
    let Ok(mut doc) = serde_json::from_str::<Value>(template) else {
        return Ok(None);
    };
    render_json(&mut doc, vars)?;
    Ok(Some(doc.to_string()))
}

fn render_json(doc: &mut Value, vars: &Value) -> Result<(), String> {
    match doc {
        Value::String(s) if s.contains(OPEN) => {
            let whole = s.strip_prefix(OPEN).and_then(|r| r.strip_suffix("}}")).filter(|n| !n.contains("}}"));
            *doc = match whole {
                Some(name) => lookup(vars, name.trim())?.clone(),
                None => Value::String(scan(s, OPEN, &mut |name| Ok(plain_text(lookup(vars, name)?)))?),
            };
        }
        Value::Array(items) => items.iter_mut().try_for_each(|item| render_json(item, vars))?,
        Value::Object(map) => {
            let entries = std::mem::take(map);
            for (key, mut value) in entries {
                render_json(&mut value, vars)?;
                let key = if key.contains(OPEN) {
                    scan(&key, OPEN, &mut |name| Ok(plain_text(lookup(vars, name)?)))?
                } else {
                    key
                };
                map.insert(key, value);
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn input(vars: Value) -> ActionInput {
        let Value::Object(map) = vars else { panic!() };
        ActionInput { vars: map.into_iter().collect(), ..ActionInput::default() }
    }

    fn rendered(mut input: ActionInput) -> Result<ActionInput, InvalidAction> {
        let mut bad = InvalidAction::default();
        render(&mut input, &mut bad);
        if bad.is_empty() {
            Ok(input)
        } else {
            Err(bad)
        }
    }

    #[test]
    fn each_place_gets_its_rendering() {
        let mut i = input(json!({"id": 7, "who": "a b/c?d", "order": {"items": [{"sku": "x"}]}}));
        i.url = "https://h.test/orders/{{vars.who}}/{{vars.id}}".into();
        i.query = vec![("q".into(), "{{vars.who}}".into())];
        i.headers = vec![("X-Id".into(), "id-{{vars.id}}".into())];
        i.body = BodyInput::Json(
            r#"{"id":"{{vars.id}}","note":"for {{vars.who}}","sku":"{{vars.order.items.0.sku}}"}"#.into(),
        );
        let r = rendered(i).unwrap();
        assert_eq!(r.url, "https://h.test/orders/a%20b%2Fc%3Fd/7");
        assert_eq!(r.query[0].1, "a b/c?d");
        assert_eq!(r.headers[0].1, "id-7");
        let BodyInput::Json(body) = r.body else { panic!() };
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap(),
            json!({"id": 7, "note": "for a b/c?d", "sku": "x"})
        );
    }

    #[test]
    fn unknown_variables_and_header_breaks_are_refused_naming_field_and_variable() {
        let mut i = input(json!({"nl": "a\r\nX-Evil: 1"}));
        i.headers = vec![("X".into(), "{{vars.nl}}".into())];
        i.query = vec![("q".into(), "{{vars.missing.deep}}".into())];
        let bad = rendered(i).unwrap_err();
        let found: Vec<_> =
            bad.violations.iter().map(|v| (v.field.as_str(), v.description.as_str())).collect();
        assert_eq!(found[0], ("query[0].value", "refers to unknown variable \"missing.deep\""));
        assert_eq!(found[1].0, "headers[0].value");
        assert!(found[1].1.contains("\"nl\""), "{found:?}");
    }

    fn any_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(|n| json!(n)),
            ".*".prop_map(Value::String),
            "[\"{}\\[\\]:,&=?#/\r\n ]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z\"{}]{0,4}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn no_value_changes_the_json_structure(v in any_value()) {
            let mut i = input(json!({"v": v.clone()}));
            i.body = BodyInput::Json(r#"{"a":"{{vars.v}}","b":["x {{vars.v}} y"]}"#.into());
            let BodyInput::Json(body) = rendered(i).unwrap().body else { panic!() };
            let doc: Value = serde_json::from_str(&body).unwrap();
            let object = doc.as_object().unwrap();
            prop_assert_eq!(object.len(), 2);
            prop_assert_eq!(&doc["a"], &v);
            prop_assert_eq!(doc["b"].as_array().map(Vec::len), Some(1));
            prop_assert!(doc["b"][0].is_string());
        }

        #[test]
        fn no_value_adds_a_query_pair_or_a_path_segment(v in any_value()) {
            let mut i = input(json!({"v": v.clone()}));
            i.url = "https://h.test/a/{{vars.v}}?k={{vars.v}}".into();
            let url = url::Url::parse(&rendered(i).unwrap().url).unwrap();
            prop_assert_eq!(url.host_str(), Some("h.test"));
            prop_assert_eq!(url.path_segments().map(|s| s.count()), Some(2));
            let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
            prop_assert_eq!(pairs.len(), 1);
            prop_assert_eq!(&pairs[0].1, &plain_text(&v));
            prop_assert!(url.fragment().is_none());
        }

        #[test]
        fn no_value_adds_a_header(v in any_value()) {
            let mut i = input(json!({"v": v.clone()}));
            i.headers = vec![("X-A".into(), "{{vars.v}}".into())];
            match rendered(i) {
                Ok(r) => {
                    prop_assert_eq!(r.headers.len(), 1);
                    prop_assert!(!r.headers[0].1.contains(['\r', '\n']));
                }
                Err(bad) => prop_assert_eq!(bad.violations[0].field.as_str(), "headers[0].value"),
            }
        }
    }
}
