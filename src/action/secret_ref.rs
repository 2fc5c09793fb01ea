//! Secret references: an action may write `{{secret:NAME}}` in its URL, a query value, a header
//! value, its body or its credentials (`auth`, `signing`), and callout puts the secret's value
//! there before validation, so the workflow engine never carries the token. Values are never echoed in errors.
use super::{ActionInput, BodyInput, InvalidAction};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

const OPEN: &str = "{{secret:";
const CLOSE: &str = "}}";
const MAX_NAME_LEN: usize = 253;
/// In a URL a value is percent-encoded as a whole component, so it cannot add a path, a query
/// or a host of its own.
const URL_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Where secret values come from (a secrets directory, the environment, a test map).
pub trait SecretSource: Send + Sync {
    /// The value of secret `name`, or `None` when there is no such secret.
    fn secret(&self, name: &str) -> Option<String>;
}

/// No secrets at all: every reference is unknown.
pub struct NoSecrets;

impl SecretSource for NoSecrets {
    fn secret(&self, _: &str) -> Option<String> {
        None
    }
}

/// Whether `name` may name a secret: letters, digits, `_`, `-` and `.`, not starting with `.`
/// (so it is always a plain file name, never a path).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// How a value is written where the reference stood.
#[derive(Clone, Copy)]
enum Escape {
    /// As is (header values, query values and form fields are encoded later).
    None,
    /// Inside a JSON string literal.
    JsonString,
    /// Percent-encoded as one URL component.
    Url,
}

/// What filling the references did: the header indices whose values held a secret (to be kept
/// out of logs and HPACK tables), and each secret filled in, `(name, value)` (for redaction).
#[derive(Default)]
pub struct Filled {
    pub headers: Vec<usize>,
    pub values: Vec<(String, String)>,
}

/// Replaces every reference in `input` by its secret's value, reporting unknown secrets and
/// malformed references with their field.
pub fn resolve(input: &mut ActionInput, source: &dyn SecretSource, bad: &mut InvalidAction) -> Filled {
    let mut values = Vec::new();
    let mut fill = |text: &mut String, field: &dyn Fn() -> String, escape: Escape| -> bool {
        if !text.contains(OPEN) {
            return false;
        }
        match expand(text, source, escape, &mut values) {
            Ok(expanded) => {
                *text = expanded;
                true
            }
            Err(problem) => {
                bad.push(field(), problem);
                false
            }
        }
    };
    fill(&mut input.url, &|| "url".into(), Escape::Url);
    for (i, (_, value)) in input.query.iter_mut().enumerate() {
        fill(value, &|| format!("query[{i}].value"), Escape::None);
    }
    let mut secret_headers = Vec::new();
    for (i, (_, value)) in input.headers.iter_mut().enumerate() {
        if fill(value, &|| format!("headers[{i}].value"), Escape::None) {
            secret_headers.push(i);
        }
    }
    match &mut input.body {
        BodyInput::Json(text) => {
            fill(text, &|| "json".into(), Escape::JsonString);
        }
        BodyInput::Text(text) => {
            fill(text, &|| "text".into(), Escape::None);
        }
        BodyInput::Form(fields) => {
            for (i, (_, value)) in fields.iter_mut().enumerate() {
                fill(value, &|| format!("form.fields[{i}].value"), Escape::None);
            }
        }
        BodyInput::None | BodyInput::Raw(_) => {}
    }
    for (field, value) in input.auth.values_mut() {
        fill(value, &|| format!("auth.{field}"), Escape::None);
    }
    for (field, value) in input.signing.values_mut() {
        fill(value, &|| format!("signing.{field}"), Escape::None);
    }
    Filled { headers: secret_headers, values }
}

/// Whether `input` holds a `{{secret:` reference anywhere `resolve` looks.
pub fn has_references(input: &ActionInput) -> bool {
    let has = |text: &str| text.contains(OPEN);
    has(&input.url)
        || input.query.iter().any(|(_, v)| has(v))
        || input.headers.iter().any(|(_, v)| has(v))
        || match &input.body {
            BodyInput::Json(text) | BodyInput::Text(text) => has(text),
            BodyInput::Form(fields) => fields.iter().any(|(_, v)| has(v)),
            BodyInput::None | BodyInput::Raw(_) => false,
        }
        // A profile's values may hold references too.
        || matches!(input.auth, super::AuthInput::Profile(_))
        || input.auth.clone().values_mut().iter().any(|(_, v)| has(v))
        || input.signing.clone().values_mut().iter().any(|(_, v)| has(v))
}

/// `text` with each `OPEN…}}` placeholder replaced by what `replace` makes of the name between
/// (trimmed), in one pass (a replacement is never scanned again), or the first problem. The one
/// scanner of `{{secret:NAME}}` and `{{vars.NAME}}`.
pub(super) fn scan(
    text: &str,
    open: &str,
    replace: &mut dyn FnMut(&str) -> Result<String, String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(open) {
        out.push_str(&rest[..start]);
        let after = &rest[start + open.len()..];
        let end =
            after.find(CLOSE).ok_or_else(|| format!("has a {open} reference without its closing }}}}"))?;
        out.push_str(&replace(after[..end].trim())?);
        rest = &after[end + CLOSE.len()..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `text` with each `{{secret:NAME}}` replaced, or what is wrong (naming the secret, never a
/// value).
fn expand(
    text: &str,
    source: &dyn SecretSource,
    escape: Escape,
    filled: &mut Vec<(String, String)>,
) -> Result<String, String> {
    scan(text, OPEN, &mut |name| {
        if !is_valid_name(name) {
            return Err(format!(
                "secret name {:?} is not valid: use letters, digits, '_', '-' and '.'",
                truncate(name)
            ));
        }
        let value = source.secret(name).ok_or_else(|| format!("refers to unknown secret {name:?}"))?;
        let written = match escape {
            Escape::None => value.clone(),
            Escape::Url => url_component(&value),
            Escape::JsonString => json_string_content(value.clone()),
        };
        filled.push((name.to_owned(), value));
        Ok(written)
    })
}

/// `value` percent-encoded as one URL component.
pub(super) fn url_component(value: &str) -> String {
    utf8_percent_encode(value, URL_COMPONENT).collect()
}

/// `value` escaped for the inside of a JSON string literal.
fn json_string_content(value: String) -> String {
    let quoted = serde_json::Value::String(value).to_string();
    quoted[1..quoted.len() - 1].to_owned()
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Map(HashMap<&'static str, &'static str>);
    impl SecretSource for Map {
        fn secret(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| v.to_string())
        }
    }

    fn source() -> Map {
        Map(HashMap::from([("TOKEN", "s3cr\"t/?&"), ("user.name", "bob")]))
    }

    #[test]
    fn only_inputs_with_references_or_pem_block_to_validate() {
        let plain = ActionInput {
            url: "https://h.test/x".into(),
            headers: vec![("X".into(), "{{vars.x}}".into())],
            body: BodyInput::Json(r#"{"a":1}"#.into()),
            ..ActionInput::default()
        };
        assert!(!has_references(&plain));
        assert!(!plain.blocks_to_validate(), "a plain action is validated in place");
        let header = ActionInput { headers: vec![("X".into(), "{{secret:T}}".into())], ..plain.clone() };
        assert!(header.blocks_to_validate());
        let form =
            ActionInput { body: BodyInput::Form(vec![("f".into(), "{{secret:T}}".into())]), ..plain.clone() };
        assert!(form.blocks_to_validate());
        let mut pem = plain.clone();
        pem.tls.ca_pem = "-----BEGIN CERTIFICATE-----".into();
        assert!(pem.blocks_to_validate());
    }

    #[test]
    fn expands_each_place_with_its_escaping() {
        let mut input = ActionInput {
            url: "https://h.test/{{secret:user.name}}/x?k={{secret:TOKEN}}".into(),
            query: vec![("q".into(), "{{ secret:TOKEN }}".into()), ("plain".into(), "{{x}}".into())],
            headers: vec![
                ("X".into(), "v".into()),
                ("Authorization".into(), "Bearer {{secret:TOKEN}}".into()),
            ],
            body: BodyInput::Json(r#"{"t":"{{secret:TOKEN}}"}"#.into()),
            ..ActionInput::default()
        };
        let mut bad = InvalidAction::default();
        let filled = resolve(&mut input, &source(), &mut bad);
        assert!(bad.is_empty(), "{bad}");
        assert_eq!(input.url, "https://h.test/bob/x?k=s3cr%22t%2F%3F%26");
        assert_eq!(input.query[0].1, "{{ secret:TOKEN }}", "only the exact form is a reference");
        assert_eq!(input.query[1].1, "{{x}}");
        assert_eq!(input.headers[1].1, "Bearer s3cr\"t/?&");
        assert_eq!(filled.headers, [1]);
        let mut values = filled.values.clone();
        values.sort();
        values.dedup();
        assert_eq!(
            values,
            [("TOKEN".to_owned(), "s3cr\"t/?&".to_owned()), ("user.name".into(), "bob".into())]
        );
        let BodyInput::Json(json) = &input.body else { panic!() };
        let parsed: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(parsed["t"], "s3cr\"t/?&");
    }

    #[test]
    fn unknown_and_malformed_references_name_the_field_and_the_secret() {
        let mut input = ActionInput {
            headers: vec![("A".into(), "{{secret:MISSING}}".into())],
            query: vec![("q".into(), "{{secret:../etc/passwd}}".into())],
            body: BodyInput::Text("x {{secret:TOKEN".into()),
            ..ActionInput::default()
        };
        let mut bad = InvalidAction::default();
        resolve(&mut input, &source(), &mut bad);
        let found: Vec<_> =
            bad.violations.iter().map(|v| (v.field.as_str(), v.description.as_str())).collect();
        assert_eq!(found[0].0, "query[0].value");
        assert!(found[0].1.contains("not valid"));
        assert_eq!(found[1], ("headers[0].value", "refers to unknown secret \"MISSING\""));
        assert_eq!(found[2].0, "text");
        assert!(!bad.to_string().contains("s3cr"));
    }

    #[test]
    fn names_are_plain_file_names() {
        assert!(is_valid_name("api-key_2.prod"));
        for bad in ["", ".hidden", "a/b", "..", "a b", "ключ"] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }
}
