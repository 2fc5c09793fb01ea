//! The domain: an HTTP action as a caller writes it (`ActionInput`), validated into an
//! `HttpAction` that the executor runs, and the `Outcome` it produces. No proto types here.
pub mod auth;
pub mod condition;
mod excerpt;
pub mod extract;
mod follow_up;
mod outcome;
pub mod paginate;
pub mod poll;
pub mod redact;
mod retry;
pub mod secret_ref;
mod status;
mod tenant;
mod trace;
mod transport;
mod validate;
pub mod vars;

pub use auth::{
    Auth, AuthInput, AuthProfile, AuthProfiles, OAuth2Credential, OAuth2Input, SigV4Credential, SigV4Input,
    Signing, SigningInput,
};
pub use excerpt::excerpt;
pub use follow_up::{drop_credentials, resolve_location, LocationError};
pub use outcome::{
    ActionError, AttemptRecord, AttemptTiming, ErrorKind, Outcome, PageRecord, PollDue, ResponseData,
    ResponseHead,
};
pub use paginate::{NextInput, NextPage, Paginate, PaginateInput, PaginationEnd};
pub use retry::{parse_retry_after, retryable_kind, AttemptEnd, RetryDecision, RetryPolicy};
pub use status::{StatusSpec, StatusSpecError};
pub use tenant::{tenant_name_problem, MAX_TENANT_LEN};
pub use trace::TraceContext;
pub use transport::{ClientIdentity, ProxyScheme, ProxyUrl, TlsOptions};
pub use validate::{
    is_sensitive as is_sensitive_header, is_valid_action_id, FieldViolation, InvalidAction,
    MAX_ERROR_MESSAGES, MAX_FORM_FIELDS, MAX_HEADERS, MAX_HEADER_BYTES, MAX_QUERY_PARAMS,
    MAX_RETRY_ON_ERRORS, MAX_STATUS_SPEC_LEN,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method};
use std::{collections::HashMap, time::Duration};

/// Default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default timeout of one attempt (headers and body).
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default body cap for `Execute`: the reply must fit gRPC clients' default 4 MiB limit.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 2 * 1024 * 1024;
/// Default number of redirects followed.
pub const DEFAULT_MAX_REDIRECTS: u32 = 10;

/// An action as the caller wrote it, before validation. Empty strings and zeros mean "default".
#[derive(Debug, Clone, Default)]
pub struct ActionInput {
    pub action_id: String,
    pub method: String,
    pub url: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: BodyInput,
    pub content_type: String,
    pub timeouts: TimeoutsInput,
    pub success_codes: String,
    pub on_failure: OnFailure,
    pub error_messages: Vec<(String, String)>,
    pub retry: RetryInput,
    pub redirects: RedirectsInput,
    pub tls: TlsInput,
    pub proxy_url: String,
    pub max_response_bytes: u64,
    /// Credentials (a profile's name, or written inline).
    pub auth: AuthInput,
    pub signing: SigningInput,
    /// The caller's trace (from the gRPC edge's metadata), continued by every attempt.
    pub trace: Option<TraceContext>,
    /// The tenant the action belongs to; empty for none.
    pub tenant: String,
    /// Which body fields the reply carries.
    pub reply_body: ReplyBody,
    /// Name → RFC 9535 JSONPath, applied to the response's JSON body.
    pub extract: Vec<(String, String)>,
    /// CEL; must also be true for success.
    pub success_condition: String,
    /// CEL; true retries the attempt.
    pub retry_condition: String,
    /// Values for `{{vars.NAME}}` placeholders.
    pub vars: Vec<(String, serde_json::Value)>,
    /// Following a 202's Location until the job is done.
    pub async_poll: poll::AsyncPollInput,
    /// Walk a paginated collection; `None`: one request.
    pub paginate: Option<PaginateInput>,
}

impl ActionInput {
    /// Whether validating this input may block a thread: a `{{secret:NAME}}` reference may
    /// read a file, TLS PEM is parsed (keys checked against certificates), a CEL condition is
    /// compiled (a generated ANTLR parser, whose prediction can take milliseconds on an
    /// adversarial expression), `vars` re-render a JSON body (a parse and a write of up to the
    /// request's size). Everything else is microseconds of CPU, cheaper than a hop to the
    /// blocking pool.
    pub fn blocks_to_validate(&self) -> bool {
        let tls = &self.tls;
        !self.success_condition.is_empty()
            || (!self.vars.is_empty() && matches!(self.body, BodyInput::Json(_)))
            || !self.retry_condition.is_empty()
            || !tls.ca_pem.is_empty()
            || !tls.client_cert_pem.is_empty()
            || !tls.client_key_pem.is_empty()
            || secret_ref::has_references(self)
    }
}

/// The request body as written.
#[derive(Debug, Clone, Default)]
pub enum BodyInput {
    #[default]
    None,
    /// JSON text; must parse. Default Content-Type `application/json`.
    Json(String),
    /// Form fields, urlencoded. Default Content-Type `application/x-www-form-urlencoded`.
    Form(Vec<(String, String)>),
    /// Text sent as-is, no Content-Type added.
    Text(String),
    /// Bytes sent as-is, no Content-Type added.
    Raw(Bytes),
}

/// Timeouts as written; `None` takes the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct TimeoutsInput {
    pub connect: Option<Duration>,
    pub attempt: Option<Duration>,
    pub total: Option<Duration>,
}

/// Retry policy as written; zeros and `None` take the defaults.
#[derive(Debug, Clone, Default)]
pub struct RetryInput {
    pub max_attempts: u32,
    pub initial_backoff: Option<Duration>,
    pub max_backoff: Option<Duration>,
    pub multiplier: f64,
    pub jitter: Option<bool>,
    pub retry_on_status: String,
    pub retry_on_errors: Vec<ErrorKind>,
    pub honor_retry_after: Option<bool>,
    pub retry_non_idempotent: bool,
    /// A `max_attempts` of 0 means no bound but the total time (durable actions), instead of
    /// the default count.
    pub unbounded_by_default: bool,
}

/// Redirect policy as written.
#[derive(Debug, Clone, Copy, Default)]
pub struct RedirectsInput {
    pub follow: Option<bool>,
    pub max_hops: u32,
}

/// Per-action TLS options as written.
#[derive(Debug, Clone, Default)]
pub struct TlsInput {
    pub insecure_skip_verify: bool,
    pub ca_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

/// Which of the response's body fields (bytes, JSON, text) a reply carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReplyBody {
    /// One: the JSON view when there is one, else the text view, else the bytes.
    #[default]
    Auto,
    /// Every view that applies, and the bytes.
    All,
    /// The bytes only.
    Raw,
    /// None (and no body chunks on a stream).
    None,
}

impl ReplyBody {
    /// Whether the reply may carry the JSON or text view (so they are worth computing).
    pub fn wants_views(self) -> bool {
        matches!(self, Self::Auto | Self::All)
    }
}

/// What the engine should do when the action fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnFailure {
    #[default]
    Abort,
    Continue,
}

/// A validated action: everything the executor needs, nothing left to check. Built only by
/// validation (`from_input…`), so every one was checked; read through its accessors.
#[derive(Clone)]
pub struct HttpAction {
    id: String,
    method: Method,
    /// The full URL, query appended, credentials and fragment removed.
    url: url::Url,
    headers: HeaderMap,
    body: Bytes,
    timeouts: Timeouts,
    success: StatusSpec,
    on_failure: OnFailure,
    retry: RetryPolicy,
    redirects: RedirectPolicy,
    /// `None`: the caller did not set one (the executor applies its default for the call kind).
    max_response_bytes: Option<u64>,
    /// The caller's trace, continued by every outbound attempt.
    trace: Option<TraceContext>,
    /// The tenant the action belongs to (a valid tenant name).
    tenant: Option<String>,
    /// Which body fields the reply carries.
    reply_body: ReplyBody,
    /// The `extract` paths, parsed.
    extract: extract::Extracts,
    /// Request signing, recomputed on every attempt (`signing()`).
    signing: Signing,
    /// The parts most actions leave at their defaults; `None` when every one is.
    uncommon: Option<Box<Uncommon>>,
    /// Whether the executor polls a 202's Location itself (false: it reports the poll due, for
    /// the durable runner to store and run as an attempt of its own).
    polls_inline: bool,
    /// The poll of a 202's Location (`poll_of`), not the action's own request.
    is_poll: bool,
    /// The `{{secret:NAME}}` values filled in, for showing the action redacted (Render).
    secret_values: redact::SecretValues,
}

/// The parts of an action that most actions leave at their defaults, boxed apart: every action
/// in flight holds its `HttpAction` for the whole wait, and these are ~530 of its bytes.
#[derive(Clone, Default)]
struct Uncommon {
    error_messages: ErrorMessages,
    /// Per-action TLS options; the default uses the server's.
    tls: TlsOptions,
    /// Per-action proxy; `None` uses the server's proxy settings.
    proxy: Option<ProxyUrl>,
    /// Credentials applied to every attempt (`auth()`).
    auth: Auth,
    success_condition: Option<condition::Condition>,
    retry_condition: Option<condition::Condition>,
    /// `async_poll`, when enabled.
    async_poll: Option<poll::AsyncPoll>,
    /// Pagination (`paginate()`); `None`: one request.
    paginate: Option<Paginate>,
}

/// The `Uncommon` of an action that sets none of it.
static NOTHING_UNCOMMON: std::sync::LazyLock<Uncommon> = std::sync::LazyLock::new(Uncommon::default);

impl Uncommon {
    /// `self` boxed, or `None` when every part is its default.
    fn boxed(self) -> Option<Box<Self>> {
        let default = self.error_messages == ErrorMessages::default()
            && self.tls.is_default()
            && self.proxy.is_none()
            && matches!(self.auth, Auth::None)
            && self.success_condition.is_none()
            && self.retry_condition.is_none()
            && self.async_poll.is_none()
            && self.paginate.is_none();
        (!default).then(|| Box::new(self))
    }
}

/// What validation needs from the server: its secrets, the header names it keeps out of logs,
/// and its named credentials. The default knows no secrets, only the built-in sensitive
/// headers, and no profiles.
#[derive(Clone, Copy)]
pub struct ValidationContext<'a> {
    pub secrets: &'a dyn secret_ref::SecretSource,
    /// Headers whose values are marked sensitive besides the built-in ones.
    pub sensitive_headers: &'a [HeaderName],
    /// `[auth.profiles.NAME]`, for actions naming a profile in `auth.profile`.
    pub auth_profiles: &'a AuthProfiles,
}

impl Default for ValidationContext<'_> {
    fn default() -> Self {
        Self { secrets: &secret_ref::NoSecrets, sensitive_headers: &[], auth_profiles: &auth::NO_PROFILES }
    }
}

/// Validated timeouts. `total` is `None` when the caller left it to the server and deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub attempt: Duration,
    pub total: Option<Duration>,
}

/// Validated redirect policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedirectPolicy {
    pub follow: bool,
    pub max_hops: u32,
}

/// Messages to report per status or class of status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorMessages {
    by_status: HashMap<u16, String>,
    by_class: HashMap<u16, String>,
}

impl ErrorMessages {
    /// The message for `status`: an exact entry wins over its class.
    pub fn lookup(&self, status: u16) -> Option<&str> {
        self.by_status.get(&status).or_else(|| self.by_class.get(&(status / 100))).map(String::as_str)
    }
}

/// Safe to log: the URL shows as its destination (its path and query may hold a secret), the
/// body as its size, and sensitive header values as `Sensitive`.
impl std::fmt::Debug for HttpAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpAction")
            .field("id", &self.id)
            .field("method", &self.method)
            .field("destination", &self.destination())
            .field("headers", &self.headers)
            .field("body_bytes", &self.body.len())
            .field("timeouts", &self.timeouts)
            .field("success", &self.success.as_str())
            .field("on_failure", &self.on_failure)
            .field("retry", &self.retry)
            .field("redirects", &self.redirects)
            .field("tls", self.tls())
            .field("proxy", &self.proxy())
            .field("max_response_bytes", &self.max_response_bytes)
            .field("auth", self.auth())
            .field("signing", &self.signing)
            .field("tenant", &self.tenant)
            .field("reply_body", &self.reply_body)
            .field("success_condition", &self.success_condition())
            .field("retry_condition", &self.retry_condition())
            .field("async_poll", &self.async_poll())
            .field("paginate", &self.paginate().map(|p| p.max_pages()))
            .finish_non_exhaustive()
    }
}

impl HttpAction {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The full URL, query appended, credentials and fragment removed.
    pub fn url(&self) -> &url::Url {
        &self.url
    }

    /// The headers to send, sensitive values marked.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    pub fn body(&self) -> &Bytes {
        &self.body
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// The statuses that count as success.
    pub fn success(&self) -> &StatusSpec {
        &self.success
    }

    pub fn on_failure(&self) -> OnFailure {
        self.on_failure
    }

    pub fn error_messages(&self) -> &ErrorMessages {
        &self.uncommon().error_messages
    }

    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    pub fn redirects(&self) -> RedirectPolicy {
        self.redirects
    }

    /// Per-action TLS options; the default uses the server's.
    pub fn tls(&self) -> &TlsOptions {
        &self.uncommon().tls
    }

    /// Per-action proxy; `None` uses the server's proxy settings.
    pub fn proxy(&self) -> Option<&ProxyUrl> {
        self.uncommon().proxy.as_ref()
    }

    /// `None`: the caller did not set one (the executor applies its default for the call kind).
    pub fn max_response_bytes(&self) -> Option<u64> {
        self.max_response_bytes
    }

    /// The caller's trace, continued by every outbound attempt.
    pub fn trace(&self) -> Option<&TraceContext> {
        self.trace.as_ref()
    }

    /// Which body fields the reply carries.
    pub fn reply_body(&self) -> ReplyBody {
        self.reply_body
    }

    /// The `extract` paths, parsed.
    pub fn extract(&self) -> &extract::Extracts {
        &self.extract
    }

    /// CEL that must also be true for success.
    pub fn success_condition(&self) -> Option<&condition::Condition> {
        self.uncommon().success_condition.as_ref()
    }

    /// CEL whose truth retries the attempt.
    pub fn retry_condition(&self) -> Option<&condition::Condition> {
        self.uncommon().retry_condition.as_ref()
    }

    /// `async_poll`, when enabled.
    pub fn async_poll(&self) -> Option<&poll::AsyncPoll> {
        self.uncommon().async_poll.as_ref()
    }

    /// Whether the executor polls a 202's Location itself (else it reports the poll due).
    pub fn polls_inline(&self) -> bool {
        self.polls_inline
    }

    /// Whether an attempt's body must be read whole and looked into (conditions, extract,
    /// pagination's next page and items).
    pub fn evaluates_body(&self) -> bool {
        !self.extract.is_empty()
            || self.success_condition().is_some()
            || self.retry_condition().is_some()
            || self.paginate().is_some()
    }

    /// Validates `input`, collecting every problem with the field it concerns.
    /// `{{secret:NAME}}` references are unknown secrets here; see `from_input_with`.
    pub fn from_input(input: ActionInput) -> Result<Self, InvalidAction> {
        validate::validate(input, &ValidationContext::default())
    }

    /// Validates `input` after replacing its `{{secret:NAME}}` references from `secrets`.
    pub fn from_input_with_secrets(
        input: ActionInput,
        secrets: &dyn secret_ref::SecretSource,
    ) -> Result<Self, InvalidAction> {
        validate::validate(input, &ValidationContext { secrets, ..ValidationContext::default() })
    }

    /// Validates `input` against what the server knows (`context`): its `auth.profile` looked
    /// up in the profiles, its `{{secret:NAME}}` references (its own and its profile's)
    /// replaced from the secrets.
    pub fn from_input_with(
        input: ActionInput,
        context: &ValidationContext<'_>,
    ) -> Result<Self, InvalidAction> {
        validate::validate(input, context)
    }

    /// The action as a single attempt within `remaining` (or its attempt timeout, if shorter):
    /// the durable runner schedules each attempt itself.
    pub fn one_attempt(&self, remaining: Duration) -> Self {
        let mut one = self.clone();
        one.retry.max_attempts = 1;
        // A paginated action's try is every page once: each page gets an attempt's time.
        let pages = self.paginate().map_or(1, Paginate::max_pages);
        one.timeouts.total = Some(one.timeouts.attempt.saturating_mul(pages).min(remaining));
        // A poll due is the runner's next step, stored, not a wait in this process.
        one.polls_inline = false;
        one
    }

    /// The tenant the action belongs to, if any: its quotas, its share of the queue, its
    /// metrics label.
    pub fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    /// The credentials applied to every attempt.
    pub fn auth(&self) -> &Auth {
        &self.uncommon().auth
    }

    /// The request signing, recomputed on every attempt.
    pub fn signing(&self) -> &Signing {
        &self.signing
    }

    /// The `{{secret:NAME}}` values the action was filled with, to redact what is shown of it.
    pub fn secret_values(&self) -> &redact::SecretValues {
        &self.secret_values
    }

    fn uncommon(&self) -> &Uncommon {
        self.uncommon.as_deref().unwrap_or(&NOTHING_UNCOMMON)
    }

    /// The host and port the action goes to, for logs (never credentials or the path).
    pub fn destination(&self) -> String {
        match (self.url.host_str(), self.url.port_or_known_default()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get() -> ActionInput {
        ActionInput { method: "GET".into(), url: "http://h.test/".into(), ..Default::default() }
    }

    #[test]
    fn an_action_keeps_what_it_leaves_at_its_defaults_out_of_line() {
        // Every action in flight holds its `HttpAction` for the whole wait: 680 bytes on x86_64
        // today, 1,200 with the uncommon parts inline.
        let size = std::mem::size_of::<HttpAction>();
        assert!(size <= 704, "{size}");
        let plain = HttpAction::from_input(get()).unwrap();
        assert!(plain.uncommon.is_none(), "nothing uncommon set, nothing boxed");
        assert!(plain.tls().is_default() && plain.proxy().is_none() && matches!(plain.auth(), Auth::None));
        assert!(plain.paginate().is_none() && plain.async_poll().is_none() && !plain.evaluates_body());

        let mut input = get();
        input.tls.insecure_skip_verify = true;
        let insecure = HttpAction::from_input(input).unwrap();
        assert!(insecure.uncommon.is_some() && insecure.tls().insecure_skip_verify);
        let mut input = get();
        input.error_messages = vec![("404".into(), "missing".into())];
        let messages = HttpAction::from_input(input).unwrap();
        assert_eq!(messages.error_messages().lookup(404), Some("missing"));
        assert!(messages.tls().is_default());
    }
}
