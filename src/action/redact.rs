//! The secret values an action was filled with (`{{secret:NAME}}`), kept so that what is shown
//! of the action (Render) can say where each one stands without showing it: every occurrence,
//! in each form validation may have written it (as is, percent-encoded, form-urlencoded, inside
//! a JSON string), becomes `[REDACTED:secret NAME]`.
use std::{borrow::Cow, fmt, sync::Arc};

/// `(name, value)` of every secret filled in, in no particular order; empty values dropped.
#[derive(Clone, Default)]
pub struct SecretValues(Arc<[(String, String)]>);

/// Never the values.
impl fmt::Debug for SecretValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter().map(|(name, _)| name)).finish()
    }
}

impl SecretValues {
    pub(super) fn new(mut filled: Vec<(String, String)>) -> Self {
        filled.retain(|(_, value)| !value.is_empty());
        filled.sort();
        filled.dedup();
        Self(filled.into())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The names of the secrets filled in.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(name, _)| name.as_str())
    }

    /// `text` with every secret value replaced by its marker.
    pub fn redact_str<'a>(&self, text: &'a str) -> Cow<'a, str> {
        match self.redact_bytes(text.as_bytes()) {
            Cow::Borrowed(_) => Cow::Borrowed(text),
            // Whole UTF-8 sequences were replaced by ASCII: still UTF-8.
            Cow::Owned(bytes) => Cow::Owned(String::from_utf8_lossy(&bytes).into_owned()),
        }
    }

    /// `bytes` with every secret value replaced by its marker.
    pub fn redact_bytes<'a>(&self, bytes: &'a [u8]) -> Cow<'a, [u8]> {
        if self.0.is_empty() {
            return Cow::Borrowed(bytes);
        }
        // Longest form first, so a secret that contains another is replaced whole.
        let mut forms: Vec<(Vec<u8>, &str)> = Vec::new();
        for (name, value) in self.0.iter() {
            for form in forms_of(value) {
                if !forms.iter().any(|(f, _)| *f == form) {
                    forms.push((form, name));
                }
            }
        }
        forms.sort_by_key(|(form, _)| std::cmp::Reverse(form.len()));
        let mut out: Option<Vec<u8>> = None;
        let mut i = 0;
        let mut last = 0;
        while i < bytes.len() {
            match forms.iter().find(|(form, _)| bytes[i..].starts_with(form)) {
                Some((form, name)) => {
                    let out = out.get_or_insert_with(|| Vec::with_capacity(bytes.len()));
                    out.extend_from_slice(&bytes[last..i]);
                    out.extend_from_slice(marker(name).as_bytes());
                    i += form.len();
                    last = i;
                }
                None => i += 1,
            }
        }
        match out {
            None => Cow::Borrowed(bytes),
            Some(mut out) => {
                out.extend_from_slice(&bytes[last..]);
                Cow::Owned(out)
            }
        }
    }
}

/// What stands for secret `name`.
pub fn marker(name: &str) -> String {
    format!("[REDACTED:secret {name}]")
}

/// Every form validation may have written `value` in: as is (headers, text bodies), as one
/// percent-encoded URL component (URL, query), form-urlencoded (form bodies), inside a JSON
/// string (JSON bodies).
fn forms_of(value: &str) -> Vec<Vec<u8>> {
    let mut forms = vec![
        value.as_bytes().to_vec(),
        super::secret_ref::url_component(value).into_bytes(),
        form_urlencoded::byte_serialize(value.as_bytes()).collect::<String>().into_bytes(),
    ];
    let quoted = serde_json::Value::String(value.to_owned()).to_string();
    forms.push(quoted.as_bytes()[1..quoted.len() - 1].to_vec());
    forms.retain(|f| !f.is_empty());
    forms.sort();
    forms.dedup();
    forms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_of_a_secret_is_replaced_and_nothing_else() {
        let values = SecretValues::new(vec![
            ("tok".into(), "a b/\"c\"".into()),
            ("short".into(), "a b".into()),
            ("empty".into(), String::new()),
        ]);
        assert_eq!(values.names().collect::<Vec<_>>(), ["short", "tok"]);
        let text = r#"raw a b/"c" url a%20b%2F%22c%22 form a+b%2F%22c%22 json a b/\"c\" plain"#;
        assert_eq!(
            values.redact_str(text),
            "raw [REDACTED:secret tok] url [REDACTED:secret tok] form [REDACTED:secret tok] \
             json [REDACTED:secret tok] plain"
        );
        assert!(matches!(values.redact_str("nothing here"), Cow::Borrowed(_)));
        assert_eq!(values.redact_str("x a b y"), "x [REDACTED:secret short] y");
        assert!(matches!(SecretValues::default().redact_bytes(b"a b"), Cow::Borrowed(_)));
        assert_eq!(format!("{values:?}"), r#"["short", "tok"]"#);
    }
}
