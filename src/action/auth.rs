//! Credentials and signing as a caller writes them (`AuthInput`, `SigningInput`), the server's
//! named profiles (`AuthProfiles`), and their validated forms (`Auth`, `Signing`) that the
//! attempt stack applies. Pure: no I/O; `{{secret:NAME}}` references are filled before this
//! runs (secret_ref). No value is ever echoed in a violation or a Debug line.
use super::{excerpt::excerpt, InvalidAction};
use base64::Engine as _;
use http::{HeaderName, HeaderValue};
use std::{collections::BTreeMap, fmt, sync::Arc};

/// Statuses after which an OAuth2 token is refreshed and the attempt tried again, unless a
/// profile says otherwise.
pub const DEFAULT_REFRESH_ON_STATUS: [u16; 1] = [401];
/// Longest credential value (a token, a secret, a key), bytes.
const MAX_VALUE_LEN: usize = 16 * 1024;
/// Most scopes and extra token parameters.
const MAX_LIST: usize = 100;

/// Credentials as written. Every string may hold `{{secret:NAME}}` references.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum AuthInput {
    #[default]
    None,
    /// A profile of the server's config, by name.
    Profile(String),
    Basic {
        username: String,
        password: String,
    },
    Bearer(String),
    ApiKey {
        name: String,
        value: String,
        in_query: bool,
    },
    OAuth2(OAuth2Input),
    AwsSigV4(SigV4Input),
}

/// The OAuth2 client credentials grant as written.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct OAuth2Input {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: String,
    pub scopes: Vec<String>,
    pub audience: String,
    pub extra_params: Vec<(String, String)>,
    pub credentials_in_body: bool,
}

/// AWS SigV4 credentials as written.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SigV4Input {
    pub region: String,
    pub service: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
}

/// Request signing as written.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum SigningInput {
    #[default]
    None,
    /// Standard Webhooks: the secret as `whsec_<base64>` (the prefix optional).
    StandardWebhooks { secret: String },
}

impl AuthInput {
    /// The kind, for logs and field paths (never a value).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Profile(_) => "profile",
            Self::Basic { .. } => "basic",
            Self::Bearer(_) => "bearer_token",
            Self::ApiKey { .. } => "api_key",
            Self::OAuth2(_) => "oauth2_client_credentials",
            Self::AwsSigV4(_) => "aws_sigv4",
        }
    }

    /// Every string value, for secret references to be found and filled in place.
    pub(super) fn values_mut(&mut self) -> Vec<(&'static str, &mut String)> {
        match self {
            Self::None | Self::Profile(_) => Vec::new(),
            Self::Basic { username, password } => {
                vec![("basic.username", username), ("basic.password", password)]
            }
            Self::Bearer(token) => vec![("bearer_token", token)],
            Self::ApiKey { name, value, .. } => vec![("api_key.name", name), ("api_key.value", value)],
            Self::OAuth2(o) => {
                let mut values = vec![
                    ("oauth2_client_credentials.token_url", &mut o.token_url),
                    ("oauth2_client_credentials.client_id", &mut o.client_id),
                    ("oauth2_client_credentials.client_secret", &mut o.client_secret),
                    ("oauth2_client_credentials.audience", &mut o.audience),
                ];
                values.extend(o.scopes.iter_mut().map(|s| ("oauth2_client_credentials.scopes", s)));
                values.extend(
                    o.extra_params.iter_mut().map(|(_, v)| ("oauth2_client_credentials.extra_params", v)),
                );
                values
            }
            Self::AwsSigV4(s) => vec![
                ("aws_sigv4.region", &mut s.region),
                ("aws_sigv4.service", &mut s.service),
                ("aws_sigv4.access_key_id", &mut s.access_key_id),
                ("aws_sigv4.secret_access_key", &mut s.secret_access_key),
                ("aws_sigv4.session_token", &mut s.session_token),
            ],
        }
    }
}

impl SigningInput {
    pub(super) fn values_mut(&mut self) -> Vec<(&'static str, &mut String)> {
        match self {
            Self::None => Vec::new(),
            Self::StandardWebhooks { secret } => vec![("standard_webhooks.secret", secret)],
        }
    }
}

/// Only the kind: every value may be a secret.
impl fmt::Debug for AuthInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Profile(name) => write!(f, "AuthInput::Profile({name:?})"),
            other => write!(f, "AuthInput::{}", other.kind()),
        }
    }
}

impl fmt::Debug for SigningInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("SigningInput::None"),
            Self::StandardWebhooks { .. } => f.write_str("SigningInput::StandardWebhooks"),
        }
    }
}

/// A named profile of the server's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthProfile {
    pub auth: AuthInput,
    /// Statuses after which an OAuth2 token is refreshed and the attempt retried once.
    pub refresh_on_status: Vec<u16>,
}

/// The server's profiles by name (`[auth.profiles.NAME]`).
#[derive(Debug, Clone, Default)]
pub struct AuthProfiles(BTreeMap<String, AuthProfile>);

/// No profiles: what validation knows by default.
pub static NO_PROFILES: AuthProfiles = AuthProfiles(BTreeMap::new());

impl AuthProfiles {
    /// Checks every profile as an action would use it (secret references accepted unread, as
    /// they are filled per action), naming the profile and field of each problem.
    pub fn new(profiles: BTreeMap<String, AuthProfile>) -> Result<Self, InvalidAction> {
        let mut bad = InvalidAction::default();
        for (name, profile) in &profiles {
            if matches!(profile.auth, AuthInput::None | AuthInput::Profile(_)) {
                bad.push(format!("auth.profiles.{name}.kind"), "must name a kind of credential");
                continue;
            }
            let mut auth = profile.auth.clone();
            for (_, value) in auth.values_mut() {
                if value.contains("{{secret:") {
                    *value = "placeholder".into();
                }
            }
            let mut found = InvalidAction::default();
            validate(auth, None, &profile.refresh_on_status, &mut found);
            for v in found.violations {
                let field = v.field.split_once('.').map_or(v.field.as_str(), |(_, rest)| rest);
                bad.push(format!("auth.profiles.{name}.{field}"), v.description);
            }
            for status in &profile.refresh_on_status {
                if !(400..=599).contains(status) {
                    bad.push(
                        format!("auth.profiles.{name}.refresh_on_status"),
                        "must hold 4xx or 5xx statuses",
                    );
                }
            }
        }
        if bad.is_empty() {
            Ok(Self(profiles))
        } else {
            Err(bad)
        }
    }

    pub fn get(&self, name: &str) -> Option<&AuthProfile> {
        self.0.get(name)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Validated credentials, ready to apply to an attempt.
#[derive(Clone, Default)]
pub enum Auth {
    #[default]
    None,
    /// A header (Basic, Bearer, an API key), its value marked sensitive.
    Header {
        name: HeaderName,
        value: HeaderValue,
    },
    /// A query parameter (an API key): name and value percent-encoded already.
    Query {
        pair: String,
    },
    OAuth2(Arc<OAuth2Credential>),
    AwsSigV4(Arc<SigV4Credential>),
}

/// A validated OAuth2 client credentials grant.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct OAuth2Credential {
    pub token_url: url::Url,
    pub client_id: String,
    pub client_secret: String,
    pub scopes: Vec<String>,
    pub audience: String,
    pub extra_params: Vec<(String, String)>,
    pub credentials_in_body: bool,
    /// Statuses after which the token is refreshed and the attempt retried once.
    pub refresh_on_status: Vec<u16>,
    /// The profile it came from (the metrics label), `None` when written inline.
    pub profile: Option<String>,
}

/// Validated AWS SigV4 credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct SigV4Credential {
    pub region: String,
    pub service: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

/// Validated request signing.
#[derive(Clone, Default)]
pub enum Signing {
    #[default]
    None,
    /// Standard Webhooks with the decoded secret key.
    StandardWebhooks { key: Arc<[u8]> },
}

impl Auth {
    pub fn is_none(&self) -> bool {
        matches!(self, Self::None)
    }

    /// The kind, for logs (never a value).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Header { .. } => "header",
            Self::Query { .. } => "query",
            Self::OAuth2(_) => "oauth2_client_credentials",
            Self::AwsSigV4(_) => "aws_sigv4",
        }
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Auth::{}", self.kind())
    }
}

impl Signing {
    /// The kind, for Render and logs (never the key).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::StandardWebhooks { .. } => "standard_webhooks",
        }
    }
}

impl fmt::Debug for Signing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("Signing::None"),
            Self::StandardWebhooks { .. } => f.write_str("Signing::StandardWebhooks"),
        }
    }
}

impl fmt::Debug for OAuth2Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2Credential")
            .field("token_origin", &self.token_url.origin().ascii_serialization())
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for SigV4Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigV4Credential")
            .field("region", &self.region)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

/// Unreserved characters (RFC 3986) stay in a query component; everything else is encoded.
const QUERY_COMPONENT: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// The profile an action names, in its place; an unknown one is a violation of `auth.profile`.
/// Returns the profile's name and refresh statuses.
pub(super) fn use_profile(
    input: &mut AuthInput,
    profiles: &AuthProfiles,
    bad: &mut InvalidAction,
) -> Option<(String, Vec<u16>)> {
    let AuthInput::Profile(name) = input else {
        return None;
    };
    let name = std::mem::take(name);
    match profiles.get(&name) {
        Some(profile) => {
            *input = profile.auth.clone();
            Some((name, profile.refresh_on_status.clone()))
        }
        None => {
            bad.push(
                "auth.profile",
                format!("names no profile of the server's config ({:?})", excerpt(&name, 64)),
            );
            *input = AuthInput::None;
            None
        }
    }
}

/// Validates `input` (secrets filled). `profile` is the profile it came from, if any.
pub(super) fn validate(
    input: AuthInput,
    profile: Option<String>,
    refresh_on_status: &[u16],
    bad: &mut InvalidAction,
) -> Auth {
    let sensitive =
        |name: HeaderName, value: String, field: &str, bad: &mut InvalidAction| match HeaderValue::from_str(
            &value,
        ) {
            Ok(mut value) => {
                value.set_sensitive(true);
                Auth::Header { name, value }
            }
            Err(_) => {
                bad.push(field, "contains CR, LF or other bytes not allowed in a header");
                Auth::None
            }
        };
    match input {
        AuthInput::None | AuthInput::Profile(_) => Auth::None,
        AuthInput::Basic { username, password } => {
            if username.contains(':') {
                bad.push("auth.basic.username", "must not contain ':' (RFC 7617)");
            }
            long("auth.basic.username", &username, bad);
            long("auth.basic.password", &password, bad);
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
            sensitive(http::header::AUTHORIZATION, format!("Basic {token}"), "auth.basic", bad)
        }
        AuthInput::Bearer(token) => {
            if required("auth.bearer_token", &token, bad) {
                long("auth.bearer_token", &token, bad);
                sensitive(http::header::AUTHORIZATION, format!("Bearer {token}"), "auth.bearer_token", bad)
            } else {
                Auth::None
            }
        }
        AuthInput::ApiKey { name, value, in_query } => {
            let ok = required("auth.api_key.name", &name, bad) & required("auth.api_key.value", &value, bad);
            long("auth.api_key.value", &value, bad);
            if !ok {
                return Auth::None;
            }
            if in_query {
                let mut pair: String =
                    percent_encoding::utf8_percent_encode(&name, QUERY_COMPONENT).collect();
                pair.push('=');
                pair.extend(percent_encoding::utf8_percent_encode(&value, QUERY_COMPONENT));
                return Auth::Query { pair };
            }
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(header) => sensitive(header, value, "auth.api_key.value", bad),
                Err(_) => {
                    bad.push("auth.api_key.name", "is not a valid HTTP header name");
                    Auth::None
                }
            }
        }
        AuthInput::OAuth2(o) => oauth2(o, profile, refresh_on_status, bad),
        AuthInput::AwsSigV4(s) => sigv4(s, bad),
    }
}

fn oauth2(
    o: OAuth2Input,
    profile: Option<String>,
    refresh_on_status: &[u16],
    bad: &mut InvalidAction,
) -> Auth {
    const F: &str = "auth.oauth2_client_credentials";
    let mut ok = required(&format!("{F}.client_id"), &o.client_id, bad);
    ok &= required(&format!("{F}.client_secret"), &o.client_secret, bad);
    long(&format!("{F}.client_secret"), &o.client_secret, bad);
    long(&format!("{F}.client_id"), &o.client_id, bad);
    let token_url = match url::Url::parse(o.token_url.trim()) {
        _ if o.token_url.trim().is_empty() => {
            bad.push(format!("{F}.token_url"), "is required (an absolute http or https URL)");
            None
        }
        Ok(url) if (url.scheme() == "http" || url.scheme() == "https") && url.host_str().is_some() => {
            if !url.username().is_empty() || url.password().is_some() {
                bad.push(
                    format!("{F}.token_url"),
                    "must not carry credentials; use client_id and client_secret",
                );
                None
            } else {
                Some(url)
            }
        }
        Ok(_) => {
            bad.push(format!("{F}.token_url"), "must be an absolute http or https URL");
            None
        }
        Err(e) => {
            bad.push(format!("{F}.token_url"), format!("is not an absolute URL: {e}"));
            None
        }
    };
    if o.scopes.len() > MAX_LIST {
        bad.push(
            format!("{F}.scopes"),
            format!("has {} entries; at most {MAX_LIST} are allowed", o.scopes.len()),
        );
    }
    for (i, scope) in o.scopes.iter().enumerate() {
        // RFC 6749 3.3: scope tokens are printable ASCII without space, '"' or '\'.
        if scope.is_empty()
            || !scope.bytes().all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
        {
            bad.push(
                format!("{F}.scopes[{i}]"),
                "must be a non-empty scope token (printable ASCII, no space)",
            );
        }
    }
    if o.extra_params.len() > MAX_LIST {
        bad.push(format!("{F}.extra_params"), format!("has more than {MAX_LIST} entries"));
    }
    const OWN: [&str; 6] = ["grant_type", "client_id", "client_secret", "scope", "audience", ""];
    for (i, (name, _)) in o.extra_params.iter().enumerate() {
        if OWN.contains(&name.as_str()) {
            bad.push(format!("{F}.extra_params[{i}].name"), "is empty or a parameter callout sets itself");
        }
    }
    match token_url {
        Some(token_url) if ok => Auth::OAuth2(Arc::new(OAuth2Credential {
            token_url,
            client_id: o.client_id,
            client_secret: o.client_secret,
            scopes: o.scopes,
            audience: o.audience,
            extra_params: o.extra_params,
            credentials_in_body: o.credentials_in_body,
            refresh_on_status: if refresh_on_status.is_empty() {
                DEFAULT_REFRESH_ON_STATUS.to_vec()
            } else {
                refresh_on_status.to_vec()
            },
            profile,
        })),
        _ => Auth::None,
    }
}

fn sigv4(s: SigV4Input, bad: &mut InvalidAction) -> Auth {
    const F: &str = "auth.aws_sigv4";
    let token = |field: &str, value: &str, bad: &mut InvalidAction| {
        let ok = required(&format!("{F}.{field}"), value, bad);
        if ok && !value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            bad.push(format!("{F}.{field}"), "must be letters, digits, '-' and '_'");
            return false;
        }
        ok
    };
    let mut ok = token("region", &s.region, bad);
    ok &= token("service", &s.service, bad);
    ok &= token("access_key_id", &s.access_key_id, bad);
    ok &= required(&format!("{F}.secret_access_key"), &s.secret_access_key, bad);
    long(&format!("{F}.secret_access_key"), &s.secret_access_key, bad);
    long(&format!("{F}.session_token"), &s.session_token, bad);
    if HeaderValue::from_str(&s.session_token).is_err() {
        bad.push(format!("{F}.session_token"), "contains bytes not allowed in a header");
        ok = false;
    }
    if !ok {
        return Auth::None;
    }
    Auth::AwsSigV4(Arc::new(SigV4Credential {
        region: s.region,
        service: s.service,
        access_key_id: s.access_key_id,
        secret_access_key: s.secret_access_key,
        session_token: (!s.session_token.is_empty()).then_some(s.session_token),
    }))
}

/// Validates signing (secrets filled).
pub(super) fn signing(input: SigningInput, bad: &mut InvalidAction) -> Signing {
    match input {
        SigningInput::None => Signing::None,
        SigningInput::StandardWebhooks { secret } => {
            const F: &str = "signing.standard_webhooks.secret";
            if !required(F, &secret, bad) {
                return Signing::None;
            }
            let encoded = secret.strip_prefix("whsec_").unwrap_or(&secret);
            match base64::engine::general_purpose::STANDARD.decode(encoded) {
                Ok(key) if !key.is_empty() => Signing::StandardWebhooks { key: key.into() },
                _ => {
                    bad.push(F, "must be \"whsec_\" followed by base64 (the value is not shown)");
                    Signing::None
                }
            }
        }
    }
}

fn required(field: &str, value: &str, bad: &mut InvalidAction) -> bool {
    if value.is_empty() {
        bad.push(field, "is required");
        return false;
    }
    true
}

fn long(field: &str, value: &str, bad: &mut InvalidAction) {
    if value.len() > MAX_VALUE_LEN {
        bad.push(field, format!("is longer than {MAX_VALUE_LEN} bytes"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: AuthInput) -> (Auth, InvalidAction) {
        let mut bad = InvalidAction::default();
        let auth = validate(input, None, &[], &mut bad);
        (auth, bad)
    }

    fn fields(bad: &InvalidAction) -> Vec<&str> {
        bad.violations.iter().map(|v| v.field.as_str()).collect()
    }

    #[test]
    fn header_kinds_become_sensitive_headers() {
        let (auth, bad) =
            check(AuthInput::Basic { username: "Aladdin".into(), password: "open sesame".into() });
        assert!(bad.is_empty());
        let Auth::Header { name, value } = auth else { panic!("{auth:?}") };
        assert_eq!(name, http::header::AUTHORIZATION);
        assert_eq!(value, "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==", "RFC 7617's example");
        assert!(value.is_sensitive());
        let (auth, _) = check(AuthInput::Bearer("t0k".into()));
        assert!(matches!(auth, Auth::Header { value, .. } if value == "Bearer t0k" && value.is_sensitive()));
        let (auth, _) = check(AuthInput::ApiKey { name: "X-Key".into(), value: "k".into(), in_query: false });
        assert!(matches!(auth, Auth::Header { name, .. } if name == "x-key"));
        let (auth, _) =
            check(AuthInput::ApiKey { name: "api key".into(), value: "a&b".into(), in_query: true });
        assert!(matches!(auth, Auth::Query { pair } if pair == "api%20key=a%26b"));
    }

    #[test]
    fn malformed_credentials_name_their_field_and_never_their_value() {
        let (_, bad) = check(AuthInput::Basic { username: "a:b".into(), password: "pw".into() });
        assert_eq!(fields(&bad), ["auth.basic.username"]);
        let (_, bad) = check(AuthInput::Bearer(String::new()));
        assert_eq!(fields(&bad), ["auth.bearer_token"]);
        let (_, bad) = check(AuthInput::Bearer("a\nb".into()));
        assert_eq!(fields(&bad), ["auth.bearer_token"]);
        let (_, bad) =
            check(AuthInput::ApiKey { name: "bad name".into(), value: "v".into(), in_query: false });
        assert_eq!(fields(&bad), ["auth.api_key.name"]);
        let (_, bad) = check(AuthInput::OAuth2(OAuth2Input {
            token_url: "ftp://idp.test/token".into(),
            client_id: String::new(),
            client_secret: "hunter2".into(),
            scopes: vec!["a b".into()],
            extra_params: vec![("grant_type".into(), "x".into())],
            ..OAuth2Input::default()
        }));
        assert_eq!(
            fields(&bad),
            [
                "auth.oauth2_client_credentials.client_id",
                "auth.oauth2_client_credentials.token_url",
                "auth.oauth2_client_credentials.scopes[0]",
                "auth.oauth2_client_credentials.extra_params[0].name"
            ]
        );
        let (_, bad) = check(AuthInput::AwsSigV4(SigV4Input {
            region: "eu west".into(),
            service: "s3".into(),
            access_key_id: "AKID".into(),
            ..SigV4Input::default()
        }));
        assert_eq!(fields(&bad), ["auth.aws_sigv4.region", "auth.aws_sigv4.secret_access_key"]);
        assert!(!bad.to_string().contains("hunter2"));
    }

    #[test]
    fn webhook_secrets_are_whsec_base64() {
        let mut bad = InvalidAction::default();
        let ok = signing(
            SigningInput::StandardWebhooks { secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into() },
            &mut bad,
        );
        assert!(matches!(ok, Signing::StandardWebhooks { key } if key.len() == 24));
        signing(SigningInput::StandardWebhooks { secret: "whsec_not base64!".into() }, &mut bad);
        assert_eq!(fields(&bad), ["signing.standard_webhooks.secret"]);
        assert!(!bad.to_string().contains("not base64"));
    }

    #[test]
    fn profiles_are_checked_at_start_and_looked_up_by_name() {
        let oauth = AuthInput::OAuth2(OAuth2Input {
            token_url: "https://idp.test/token".into(),
            client_id: "c".into(),
            client_secret: "{{secret:idp}}".into(),
            ..OAuth2Input::default()
        });
        let good = AuthProfile { auth: oauth, refresh_on_status: vec![401, 403] };
        let broken = AuthProfile { auth: AuthInput::Bearer(String::new()), refresh_on_status: vec![200] };
        let err =
            AuthProfiles::new(BTreeMap::from([("b".to_owned(), broken), ("g".to_owned(), good.clone())]))
                .unwrap_err();
        assert_eq!(fields(&err), ["auth.profiles.b.bearer_token", "auth.profiles.b.refresh_on_status"]);
        let profiles = AuthProfiles::new(BTreeMap::from([("g".to_owned(), good)])).unwrap();
        let mut bad = InvalidAction::default();
        let mut input = AuthInput::Profile("g".into());
        let (name, statuses) = use_profile(&mut input, &profiles, &mut bad).unwrap();
        assert_eq!((name.as_str(), statuses), ("g", vec![401, 403]));
        assert!(matches!(input, AuthInput::OAuth2(_)));
        let mut input = AuthInput::Profile("nope".into());
        assert!(use_profile(&mut input, &profiles, &mut bad).is_none());
        assert_eq!(fields(&bad), ["auth.profile"]);
    }
}
