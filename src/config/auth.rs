//! `[auth.profiles.NAME]`: named credentials from the server's config, turned into the
//! domain's `AuthProfiles` (checked at start, naming the profile and key of each problem).
use crate::action::{AuthInput, AuthProfile, AuthProfiles, OAuth2Input, SigV4Input};
use crate::settings::SettingError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Named credentials actions use by `auth.profile`, so engines carry no secret.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `[auth.profiles.NAME]`: one credential each. Values may hold `{{secret:NAME}}`
    /// references, read at each use. Checked while read. Default none.
    #[serde(deserialize_with = "checked_profiles")]
    pub profiles: BTreeMap<String, AuthProfileConfig>,
}

/// One profile, by its `kind`; the keys are those of the action's `auth` of that kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthProfileConfig {
    Basic {
        username: String,
        password: String,
    },
    BearerToken {
        token: String,
    },
    ApiKey {
        name: String,
        value: String,
        /// `header` (default) or `query`.
        #[serde(default, rename = "in")]
        location: ApiKeyIn,
    },
    Oauth2ClientCredentials {
        token_url: String,
        client_id: String,
        client_secret: String,
        #[serde(default)]
        scopes: Vec<String>,
        #[serde(default)]
        audience: String,
        #[serde(default)]
        extra_params: BTreeMap<String, String>,
        #[serde(default)]
        credentials_in_body: bool,
        /// Statuses after which the token is refreshed and the attempt retried once.
        /// Default [401].
        #[serde(default)]
        refresh_on_status: Vec<u16>,
    },
    AwsSigv4 {
        region: String,
        service: String,
        access_key_id: String,
        secret_access_key: String,
        #[serde(default)]
        session_token: String,
    },
}

/// Where an API key goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiKeyIn {
    #[default]
    Header,
    Query,
}

/// The profiles, each checked as the domain will use it, so a bad one fails at start with
/// its key and source.
fn checked_profiles<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, AuthProfileConfig>, D::Error> {
    let profiles = BTreeMap::<String, AuthProfileConfig>::deserialize(d)?;
    to_domain(&profiles).map_err(serde::de::Error::custom)?;
    Ok(profiles)
}

fn to_domain(profiles: &BTreeMap<String, AuthProfileConfig>) -> Result<AuthProfiles, String> {
    let domain = profiles.iter().map(|(name, p)| (name.clone(), p.to_domain())).collect();
    AuthProfiles::new(domain).map_err(|bad| {
        let what: Vec<String> =
            bad.violations.iter().map(|v| format!("{} {}", v.field, v.description)).collect();
        what.join("; ")
    })
}

impl AuthConfig {
    /// The profiles as the domain checks and uses them.
    pub fn profiles(&self) -> Result<AuthProfiles, SettingError> {
        to_domain(&self.profiles).map_err(|e| SettingError::new("auth.profiles", e))
    }
}

impl AuthProfileConfig {
    /// Its secret values as `<redacted>`, for printing; `{{secret:NAME}}` references (names,
    /// not values) are shown.
    pub(super) fn redact(&mut self) {
        let secrets: Vec<&mut String> = match self {
            Self::Basic { password, .. } => vec![password],
            Self::BearerToken { token } => vec![token],
            Self::ApiKey { value, .. } => vec![value],
            Self::Oauth2ClientCredentials { client_secret, .. } => vec![client_secret],
            Self::AwsSigv4 { secret_access_key, session_token, .. } => vec![secret_access_key, session_token],
        };
        for value in secrets {
            let reference =
                value.starts_with("{{secret:") && value.ends_with("}}") && value.matches("{{").count() == 1;
            if !value.is_empty() && !reference {
                *value = "<redacted>".into();
            }
        }
    }

    fn to_domain(&self) -> AuthProfile {
        let (auth, refresh_on_status) = match self.clone() {
            Self::Basic { username, password } => (AuthInput::Basic { username, password }, Vec::new()),
            Self::BearerToken { token } => (AuthInput::Bearer(token), Vec::new()),
            Self::ApiKey { name, value, location } => {
                (AuthInput::ApiKey { name, value, in_query: location == ApiKeyIn::Query }, Vec::new())
            }
            Self::Oauth2ClientCredentials {
                token_url,
                client_id,
                client_secret,
                scopes,
                audience,
                extra_params,
                credentials_in_body,
                refresh_on_status,
            } => (
                AuthInput::OAuth2(OAuth2Input {
                    token_url,
                    client_id,
                    client_secret,
                    scopes,
                    audience,
                    extra_params: extra_params.into_iter().collect(),
                    credentials_in_body,
                }),
                refresh_on_status,
            ),
            Self::AwsSigv4 { region, service, access_key_id, secret_access_key, session_token } => (
                AuthInput::AwsSigV4(SigV4Input {
                    region,
                    service,
                    access_key_id,
                    secret_access_key,
                    session_token,
                }),
                Vec::new(),
            ),
        };
        AuthProfile { auth, refresh_on_status }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use figment::{
        providers::{Format, Serialized, Toml},
        Figment,
    };

    #[test]
    fn auth_profiles_load_by_kind_are_checked_and_print_redacted() {
        let load = |toml: &str| {
            Config::extract(&Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(toml)))
        };
        let config = load(
            r#"
            [auth.profiles.idp]
            kind = "oauth2_client_credentials"
            token_url = "https://idp.test/token"
            client_id = "c"
            client_secret = "literal-s3cret"
            scopes = ["a", "b"]
            extra_params = { resource = "r" }
            [auth.profiles.key]
            kind = "api_key"
            name = "X-Key"
            value = "{{secret:key}}"
            in = "query"
            "#,
        )
        .unwrap();
        let profiles = config.auth.profiles().unwrap();
        assert!(matches!(profiles.get("key").unwrap().auth, AuthInput::ApiKey { in_query: true, .. }));
        let shown = config.to_redacted_toml();
        assert!(!shown.contains("literal-s3cret") && shown.contains("{{secret:key}}"), "{shown}");
        let bad = load("[auth.profiles.x]\nkind = \"bearer_token\"\ntoken = \"\"\n").unwrap_err();
        assert!(bad.to_string().contains("auth.profiles.x.bearer_token is required"), "{bad}");
        let unknown = load("[auth.profiles.x]\nkind = \"kerberos\"\n").unwrap_err();
        assert!(unknown.to_string().contains("kerberos"), "{unknown}");
    }
}
