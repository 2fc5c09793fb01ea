//! Serde forms and checks shared by the settings sections (each declared beside the code that
//! runs on it, gathered by `config::Config`). It imports nothing of the crate, so any module may
//! use it. A check made while deserializing fails with figment's key and source attached.
use http::HeaderName;
use serde::{de::Error as _, Deserialize, Deserializer, Serializer};
use std::fmt;

/// A setting that cannot be used though its type was right (a file that cannot be read, two
/// keys that go together); `key` is the full key, e.g. `server.tls_key`, so the configuration
/// can say where the value came from, or empty for what no key set (a proxy variable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingError {
    pub key: &'static str,
    pub message: String,
}

impl SettingError {
    pub fn new(key: &'static str, message: impl Into<String>) -> Self {
        Self { key, message: message.into() }
    }
}

impl fmt::Display for SettingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.key {
            "" => f.write_str(&self.message),
            key => write!(f, "{key}: {}", self.message),
        }
    }
}

impl std::error::Error for SettingError {}

/// A count that must be at least 1 (a cap of 0 would refuse everything).
pub fn at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    match usize::deserialize(d)? {
        0 => Err(D::Error::custom("must be at least 1")),
        n => Ok(n),
    }
}

fn header_name(name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| format!("{name:?} is not a header name"))
}

/// Header names written as strings.
pub mod header_names {
    use super::*;

    pub fn serialize<S: Serializer>(names: &[HeaderName], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(names.iter().map(HeaderName::as_str))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<HeaderName>, D::Error> {
        Vec::<String>::deserialize(d)?.iter().map(|n| header_name(n).map_err(D::Error::custom)).collect()
    }
}

/// A header name written as a string; the empty string is none.
pub mod optional_header {
    use super::*;

    pub fn serialize<S: Serializer>(name: &Option<HeaderName>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(name.as_ref().map_or("", HeaderName::as_str))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<HeaderName>, D::Error> {
        let name = String::deserialize(d)?;
        if name.trim().is_empty() {
            return Ok(None);
        }
        header_name(&name).map(Some).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, serde::Serialize)]
    struct Headers {
        #[serde(with = "header_names")]
        names: Vec<HeaderName>,
        #[serde(with = "optional_header")]
        one: Option<HeaderName>,
        #[serde(deserialize_with = "at_least_one")]
        count: usize,
    }

    fn parse(text: &str) -> Result<Headers, String> {
        use figment::providers::{Format, Toml};
        figment::Figment::from(Toml::string(text)).extract().map_err(|e| e.to_string())
    }

    #[test]
    fn header_names_round_trip_and_bad_ones_are_refused() {
        let parsed = parse("names = [\"X-Token\"]\none = \"\"\ncount = 2").unwrap();
        assert_eq!(parsed.names, vec![HeaderName::from_static("x-token")]);
        assert_eq!(parsed.one, None);
        assert_eq!(toml::to_string(&parsed).unwrap(), "names = [\"x-token\"]\none = \"\"\ncount = 2\n");
        let err = parse("names = [\"a b\"]\none = \"\"\ncount = 2").unwrap_err();
        assert!(err.contains("\"a b\" is not a header name"), "{err}");
        let err = parse("names = []\none = \"\"\ncount = 0").unwrap_err();
        assert!(err.contains("at least 1"), "{err}");
    }
}
