//! OAuth2 client credentials: the token cache and the token request.
//!
//! One cache entry per credential (a SHA-256 over token URL, client id and secret, scopes,
//! audience and extra parameters: no secret kept as a key, and a caller cannot reach a token
//! cached for a secret it does not know). Single flight: whoever finds no fresh token takes
//! the entry's fetch lock and asks the token endpoint; everyone else waits on that lock (within
//! their own deadline) and then finds the new token, or the error of the fetch they waited for.
//! A token is refreshed ahead of its expiry (`expires_in` less a skew). A token the upstream
//! rejected is dropped only if it is still the current one (`reject` compares its generation),
//! so any number of actions rejected with the same token cause one new fetch: no refresh storm.
use super::CredentialsError;
use crate::action::{ErrorKind, OAuth2Credential, RedirectPolicy, DEFAULT_CONNECT_TIMEOUT};
use crate::client::{
    attempt::{AttemptContext, AttemptRequest, StartSignal},
    error::SendFailure,
    host::Destination,
    http_client::HttpClient,
};
use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderValue, Request};
use http_body_util::BodyExt as _;
use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::time::Instant;

/// How tokens are fetched and kept.
#[derive(Debug, Clone)]
pub struct TokenSettings {
    /// Bounds one token request (within the action's deadline). Default 10 s.
    pub timeout: Duration,
    /// Token requests per fetch: a connection failure, 429 or 5xx is tried again. Default 3.
    pub attempts: u32,
    /// A token is replaced this long before it expires (at most half its lifetime). Default 30 s.
    pub skew: Duration,
    /// The lifetime of a token whose response has no `expires_in`. Default 5 min.
    pub default_lifetime: Duration,
    /// Credentials cached at most; the least recently used goes first. Default 1,024.
    pub max_entries: usize,
}

impl Default for TokenSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            attempts: 3,
            skew: Duration::from_secs(30),
            default_lifetime: Duration::from_secs(300),
            max_entries: 1024,
        }
    }
}

/// An access token and when to replace it. Its Debug shows no token.
#[derive(Clone)]
pub struct Token {
    pub value: Arc<str>,
    /// Which fetch of its entry issued it (what `reject` compares).
    pub generation: u64,
    refresh_at: Instant,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token").field("generation", &self.generation).finish_non_exhaustive()
    }
}

/// What a token endpoint answered.
#[derive(Clone)]
pub struct Issued {
    pub access_token: String,
    pub expires_in: Option<Duration>,
}

/// Where tokens come from: the HTTP token endpoint; the unit tests count and script one.
pub trait FetchToken: Send + Sync + 'static {
    fn fetch(
        &self,
        credential: &OAuth2Credential,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = Result<Issued, CredentialsError>> + Send + 'static>>;
}

/// The token cache. Cheap to clone (shared).
#[derive(Clone)]
pub struct TokenCache {
    inner: Arc<Inner>,
}

struct Inner {
    entries: Mutex<HashMap<[u8; 32], Arc<Entry>>>,
    fetcher: Box<dyn FetchToken>,
    settings: TokenSettings,
}

#[derive(Default)]
struct Entry {
    /// Held by the one request fetching a token: the single flight.
    fetch: tokio::sync::Mutex<()>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    token: Option<Token>,
    /// Fetches finished, successful or not.
    fetches: u64,
    /// The last fetch's error, with its number, for those who waited for it.
    failed: Option<(u64, CredentialsError)>,
    last_used: Option<Instant>,
}

/// How `get` found its token, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    Cached,
    Fetched,
}

impl TokenCache {
    pub fn new(fetcher: impl FetchToken, settings: TokenSettings) -> Self {
        Self { inner: Arc::new(Inner { entries: Mutex::default(), fetcher: Box::new(fetcher), settings }) }
    }

    /// A fresh token for `credential`, fetched once however many ask at the same time. Waits
    /// no longer than `deadline`.
    pub async fn get(
        &self,
        credential: &OAuth2Credential,
        deadline: Instant,
    ) -> Result<(Token, Found), CredentialsError> {
        let entry = self.entry(credential);
        let seen = {
            let mut state = lock(&entry.state);
            state.last_used = Some(Instant::now());
            if let Some(token) = state.fresh() {
                return Ok((token, Found::Cached));
            }
            state.fetches
        };
        let late = || CredentialsError::new(ErrorKind::Auth, "no OAuth2 token before the total deadline");
        let _flight = tokio::time::timeout_at(deadline, entry.fetch.lock()).await.map_err(|_| late())?;
        {
            let state = lock(&entry.state);
            if let Some(token) = state.fresh() {
                return Ok((token, Found::Cached));
            }
            // The fetch this request waited for failed: its error is this request's too (the
            // endpoint is not asked again by every waiter).
            if let Some((number, error)) = &state.failed {
                if *number > seen {
                    return Err(error.clone());
                }
            }
        }
        let fetched = self.inner.fetcher.fetch(credential, deadline).await;
        let mut state = lock(&entry.state);
        state.fetches += 1;
        let generation = state.fetches;
        match fetched {
            Ok(issued) => {
                // Capped: the endpoint's number must not overflow the clock.
                let lifetime =
                    issued.expires_in.unwrap_or(self.inner.settings.default_lifetime).min(MAX_TOKEN_LIFETIME);
                let skew = self.inner.settings.skew.min(lifetime / 2);
                let token = Token {
                    value: issued.access_token.into(),
                    generation,
                    refresh_at: Instant::now() + lifetime - skew,
                };
                state.token = Some(token.clone());
                state.failed = None;
                Ok((token, Found::Fetched))
            }
            Err(error) => {
                // A fetch cut short by this request's own deadline says nothing about the
                // endpoint: the next waiter, with more time, tries again.
                if !error.deadline {
                    state.failed = Some((generation, error.clone()));
                }
                Err(error)
            }
        }
    }

    /// The upstream rejected `token`: it is dropped if it is still the current one, so the next
    /// `get` fetches a new one; a token fetched since is left alone.
    pub fn reject(&self, credential: &OAuth2Credential, token: &Token) {
        let entry = self.entry(credential);
        let mut state = lock(&entry.state);
        if state.token.as_ref().is_some_and(|current| current.generation == token.generation) {
            state.token = None;
        }
    }

    /// Credentials cached now.
    pub fn len(&self) -> usize {
        lock(&self.inner.entries).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn entry(&self, credential: &OAuth2Credential) -> Arc<Entry> {
        let key = key(credential);
        let mut entries = lock(&self.inner.entries);
        if let Some(entry) = entries.get(&key) {
            return entry.clone();
        }
        if entries.len() >= self.inner.settings.max_entries {
            let oldest = entries
                .iter()
                .filter(|(_, e)| Arc::strong_count(e) == 1)
                .min_by_key(|(_, e)| lock(&e.state).last_used)
                .map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                entries.remove(&oldest);
            }
        }
        entries.entry(key).or_default().clone()
    }
}

impl State {
    fn fresh(&self) -> Option<Token> {
        self.token.as_ref().filter(|t| Instant::now() < t.refresh_at).cloned()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Poisoned only if a thread panicked mid-update; the map and state stay usable.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The cache key: a digest of everything that makes the credential, lengths included so no
/// two credentials run together.
fn key(c: &OAuth2Credential) -> [u8; 32] {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut field = |bytes: &[u8]| {
        digest.update(&(bytes.len() as u64).to_be_bytes());
        digest.update(bytes);
    };
    field(c.token_url.as_str().as_bytes());
    field(c.client_id.as_bytes());
    field(c.client_secret.as_bytes());
    field(c.audience.as_bytes());
    field(&[u8::from(c.credentials_in_body)]);
    for scope in &c.scopes {
        field(scope.as_bytes());
    }
    field(b"|");
    for (name, value) in &c.extra_params {
        field(name.as_bytes());
        field(value.as_bytes());
    }
    let mut out = [0; 32];
    out.copy_from_slice(digest.finish().as_ref());
    out
}

/// Longest a token is kept, whatever its `expires_in` says.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Largest token response read.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;
/// First wait between token requests; doubles.
const TOKEN_BACKOFF: Duration = Duration::from_millis(100);

/// The token endpoint over HTTP, through the server's client: its egress policy, proxies and
/// trust roots apply as to any destination.
pub struct HttpTokenFetcher {
    client: HttpClient,
    settings: TokenSettings,
}

impl HttpTokenFetcher {
    pub fn new(client: HttpClient, settings: TokenSettings) -> Self {
        Self { client, settings }
    }
}

impl FetchToken for HttpTokenFetcher {
    fn fetch(
        &self,
        credential: &OAuth2Credential,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = Result<Issued, CredentialsError>> + Send + 'static>> {
        let (client, settings, credential) = (self.client.clone(), self.settings.clone(), credential.clone());
        Box::pin(async move { fetch(&client, &settings, &credential, deadline).await })
    }
}

/// One failed token request: whether another may mend it.
struct TryFailed {
    error: CredentialsError,
    retry: bool,
}

async fn fetch(
    client: &HttpClient,
    settings: &TokenSettings,
    credential: &OAuth2Credential,
    deadline: Instant,
) -> Result<Issued, CredentialsError> {
    let mut backoff = TOKEN_BACKOFF;
    let mut tries = 0;
    loop {
        tries += 1;
        let until = deadline.min(Instant::now() + settings.timeout);
        let tried = tokio::time::timeout_at(until, request_token(client, credential, until)).await;
        let failed = match tried {
            Ok(Ok(issued)) => return Ok(issued),
            Ok(Err(failed)) => failed,
            Err(_) if until == deadline => {
                let mut error = CredentialsError::new(
                    ErrorKind::Auth,
                    format!("the token request to {} ran out of the total deadline", origin(credential)),
                );
                error.deadline = true;
                return Err(error);
            }
            Err(_) => TryFailed {
                error: CredentialsError::new(
                    ErrorKind::Auth,
                    format!(
                        "the token request to {} timed out after {}",
                        origin(credential),
                        crate::fmt::fmt_duration(settings.timeout)
                    ),
                ),
                retry: true,
            },
        };
        if !failed.retry || tries >= settings.attempts || Instant::now() + backoff >= deadline {
            return Err(failed.error);
        }
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    }
}

fn origin(credential: &OAuth2Credential) -> String {
    credential.token_url.origin().ascii_serialization()
}

/// The form and headers of the client credentials grant (RFC 6749 4.4.2). The client
/// authenticates with HTTP Basic by default (2.3.1: id and secret form-urlencoded first), or in
/// the body when asked.
pub fn token_request(credential: &OAuth2Credential) -> Result<Request<Bytes>, CredentialsError> {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("grant_type", "client_credentials");
    if !credential.scopes.is_empty() {
        form.append_pair("scope", &credential.scopes.join(" "));
    }
    if !credential.audience.is_empty() {
        form.append_pair("audience", &credential.audience);
    }
    for (name, value) in &credential.extra_params {
        form.append_pair(name, value);
    }
    let mut request = Request::new(Bytes::new());
    if credential.credentials_in_body {
        form.append_pair("client_id", &credential.client_id);
        form.append_pair("client_secret", &credential.client_secret);
    } else {
        let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let pair = format!("{}:{}", encode(&credential.client_id), encode(&credential.client_secret));
        let basic = base64::engine::general_purpose::STANDARD.encode(pair);
        let mut value = HeaderValue::from_str(&format!("Basic {basic}")).map_err(|_| {
            CredentialsError::new(ErrorKind::InvalidRequest, "the client credentials do not fit a header")
        })?;
        value.set_sensitive(true);
        request.headers_mut().insert(header::AUTHORIZATION, value);
    }
    *request.body_mut() = Bytes::from(form.finish());
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = credential.token_url.as_str().parse().map_err(|_| {
        CredentialsError::new(
            ErrorKind::InvalidRequest,
            "the token URL cannot be sent as an HTTP request target",
        )
    })?;
    let headers = request.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-www-form-urlencoded"));
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    headers
        .insert(header::USER_AGENT, HeaderValue::from_static(concat!("callout/", env!("CARGO_PKG_VERSION"))));
    Ok(request)
}

/// The token request as the client sends it: one hop, no redirects, no credentials of an
/// action, within `until`.
fn token_attempt(http: Request<Bytes>, credential: &OAuth2Credential, until: Instant) -> AttemptRequest {
    let url = credential.token_url.clone();
    let context = AttemptContext {
        destination: Destination::of(&url),
        deadline: until.into_std(),
        total: until.saturating_duration_since(Instant::now()),
        attempt_timeout: until.saturating_duration_since(Instant::now()),
        connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        redirects: RedirectPolicy { follow: false, max_hops: 0 },
        url,
        cool_down_on_429: false,
        start: StartSignal::default(),
        tenant: None,
        auth: crate::action::Auth::None,
        signing: None,
    };
    AttemptRequest { http, context: std::sync::Arc::new(context), checked: None }
}

async fn request_token(
    client: &HttpClient,
    credential: &OAuth2Credential,
    until: Instant,
) -> Result<Issued, TryFailed> {
    let final_error = |error| TryFailed { error, retry: false };
    let request = token_attempt(token_request(credential).map_err(final_error)?, credential, until);
    let response =
        tower::ServiceExt::oneshot(client.clone(), request).await.map_err(|e| sent_failed(credential, e))?;
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), MAX_TOKEN_RESPONSE)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|_| TryFailed {
            error: CredentialsError::new(
                ErrorKind::Auth,
                format!("the token response of {} could not be read (or passed 64 KiB)", origin(credential)),
            ),
            retry: true,
        })?;
    if !status.is_success() {
        // Only the status and the OAuth2 error code (RFC 6749 5.2) are told: a body may echo
        // what was sent.
        let code = error_code(&body).map(|c| format!(" (error {c:?})")).unwrap_or_default();
        return Err(TryFailed {
            error: CredentialsError::new(
                ErrorKind::Auth,
                format!("the token endpoint {} answered {}{code}", origin(credential), status.as_u16()),
            ),
            retry: status.is_server_error() || status.as_u16() == 429,
        });
    }
    parse_token(&body).ok_or_else(|| {
        final_error(CredentialsError::new(
            ErrorKind::Auth,
            format!("the token endpoint {} answered no access_token (RFC 6749 5.1)", origin(credential)),
        ))
    })
}

fn sent_failed(credential: &OAuth2Credential, e: SendFailure) -> TryFailed {
    // A token endpoint the egress policy refuses is the policy's refusal, as for any URL.
    let kind = if e.kind == ErrorKind::DeniedByPolicy { ErrorKind::DeniedByPolicy } else { ErrorKind::Auth };
    TryFailed {
        error: CredentialsError::new(
            kind,
            format!("the token request to {} failed: {}: {}", origin(credential), e.kind, e.message),
        ),
        retry: matches!(e.kind, ErrorKind::Connect | ErrorKind::Timeout | ErrorKind::Dns),
    }
}

/// The access token and its lifetime from a successful token response.
pub fn parse_token(body: &[u8]) -> Option<Issued> {
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    let access_token = json.get("access_token")?.as_str()?.to_owned();
    // Bearer tokens are b64token (RFC 6750 2.1): anything else cannot go in a header.
    if access_token.is_empty() || HeaderValue::from_str(&access_token).is_err() {
        return None;
    }
    let expires_in = match json.get("expires_in") {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        // Some servers send it as a string.
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        _ => None,
    };
    Some(Issued { access_token, expires_in: expires_in.map(Duration::from_secs) })
}

/// The `error` code of an error response, when it is one (a short token of visible ASCII).
fn error_code(body: &[u8]) -> Option<String> {
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    let code = json.get("error")?.as_str()?;
    (code.len() <= 64
        && !code.is_empty()
        && code.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\'))
    .then(|| code.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A token endpoint that takes a second per token, counts them, and fails on demand.
    #[derive(Clone, Default)]
    struct Counting {
        issued: Arc<AtomicU64>,
        fail: Arc<std::sync::atomic::AtomicBool>,
    }

    impl FetchToken for Counting {
        fn fetch(
            &self,
            _: &OAuth2Credential,
            _: Instant,
        ) -> Pin<Box<dyn Future<Output = Result<Issued, CredentialsError>> + Send + 'static>> {
            let this = self.clone();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if this.fail.load(Ordering::SeqCst) {
                    return Err(CredentialsError::new(ErrorKind::Auth, "the token endpoint answered 500"));
                }
                let n = this.issued.fetch_add(1, Ordering::SeqCst) + 1;
                Ok(Issued { access_token: format!("token-{n}"), expires_in: Some(Duration::from_secs(120)) })
            })
        }
    }

    fn credential(secret: &str) -> OAuth2Credential {
        OAuth2Credential {
            token_url: url::Url::parse("https://idp.test/token").unwrap(),
            client_id: "client".into(),
            client_secret: secret.into(),
            scopes: vec!["read".into()],
            audience: String::new(),
            extra_params: Vec::new(),
            credentials_in_body: false,
            refresh_on_status: vec![401],
            profile: None,
        }
    }

    fn in_a_minute() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[tokio::test(start_paused = true)]
    async fn many_at_once_fetch_once_and_refresh_before_expiry() {
        let endpoint = Counting::default();
        let cache = TokenCache::new(endpoint.clone(), TokenSettings::default());
        let c = credential("s");
        let waiters: Vec<_> = (0..50)
            .map(|_| {
                let (cache, c) = (cache.clone(), c.clone());
                tokio::spawn(async move { cache.get(&c, in_a_minute()).await.map(|(t, f)| (t.value, f)) })
            })
            .collect();
        let mut fetched = 0;
        for waiter in waiters {
            let (token, found) = waiter.await.unwrap().unwrap();
            assert_eq!(&*token, "token-1");
            fetched += usize::from(found == Found::Fetched);
        }
        assert_eq!((endpoint.issued.load(Ordering::SeqCst), fetched), (1, 1), "one request for 50");
        // 120 s lifetime, 30 s skew: fresh for 90 s after it came (at 1 s).
        tokio::time::advance(Duration::from_secs(88)).await;
        assert_eq!(&*cache.get(&c, in_a_minute()).await.unwrap().0.value, "token-1");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(&*cache.get(&c, in_a_minute()).await.unwrap().0.value, "token-2");
        // Another secret is another credential: never the token of this one.
        assert_eq!(&*cache.get(&credential("other"), in_a_minute()).await.unwrap().0.value, "token-3");
        assert_eq!(cache.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_absurd_expires_in_is_capped_at_a_day() {
        struct Forever;
        impl FetchToken for Forever {
            fn fetch(
                &self,
                _: &OAuth2Credential,
                _: Instant,
            ) -> Pin<Box<dyn Future<Output = Result<Issued, CredentialsError>> + Send + 'static>>
            {
                Box::pin(async {
                    Ok(Issued { access_token: "t".into(), expires_in: Some(Duration::from_secs(u64::MAX)) })
                })
            }
        }
        let cache = TokenCache::new(Forever, TokenSettings::default());
        let (token, _) = cache.get(&credential("s"), in_a_minute()).await.unwrap();
        assert!(token.refresh_at <= Instant::now() + MAX_TOKEN_LIFETIME);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_token_is_replaced_once_however_many_saw_it_rejected() {
        let endpoint = Counting::default();
        let cache = TokenCache::new(endpoint.clone(), TokenSettings::default());
        let c = credential("s");
        let (stale, _) = cache.get(&c, in_a_minute()).await.unwrap();
        for _ in 0..10 {
            cache.reject(&c, &stale);
        }
        let waiters: Vec<_> = (0..10)
            .map(|_| {
                let (cache, c, stale) = (cache.clone(), c.clone(), stale.clone());
                tokio::spawn(async move {
                    let token = cache.get(&c, in_a_minute()).await.unwrap().0;
                    // Late rejections of the old token leave the new one alone.
                    cache.reject(&c, &stale);
                    token.value
                })
            })
            .collect();
        for waiter in waiters {
            assert_eq!(&*waiter.await.unwrap(), "token-2");
        }
        assert_eq!(endpoint.issued.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_share_the_failure_they_waited_for_and_give_up_at_their_deadline() {
        let endpoint = Counting::default();
        endpoint.fail.store(true, Ordering::SeqCst);
        let cache = TokenCache::new(endpoint.clone(), TokenSettings::default());
        let c = credential("s");
        let waiters: Vec<_> = (0..5)
            .map(|_| {
                let (cache, c) = (cache.clone(), c.clone());
                tokio::spawn(async move { cache.get(&c, in_a_minute()).await.err().map(|e| e.kind) })
            })
            .collect();
        let started = Instant::now();
        for waiter in waiters {
            assert_eq!(waiter.await.unwrap(), Some(ErrorKind::Auth));
        }
        assert_eq!(started.elapsed(), Duration::from_secs(1), "one failed fetch answered everyone");
        // A waiter whose deadline comes before the fetch ends gives up then.
        let (cache2, c2) = (cache.clone(), c.clone());
        let slow = tokio::spawn(async move { cache2.get(&c2, in_a_minute()).await });
        tokio::task::yield_now().await;
        let short = cache.get(&c, Instant::now() + Duration::from_millis(300)).await;
        assert!(short.unwrap_err().message.contains("deadline"));
        assert!(slow.await.unwrap().is_err());
    }

    #[test]
    fn the_grant_is_form_encoded_with_basic_client_authentication() {
        let mut c = credential("p@ss:word");
        c.scopes = vec!["read".into(), "write".into()];
        c.audience = "https://api.test".into();
        c.extra_params = vec![("resource".into(), "r 1".into())];
        let request = token_request(&c).unwrap();
        assert_eq!(request.method(), http::Method::POST);
        assert_eq!(
            request.body(),
            "grant_type=client_credentials&scope=read+write&audience=https%3A%2F%2Fapi.test&resource=r+1"
        );
        let basic = base64::engine::general_purpose::STANDARD.encode("client:p%40ss%3Aword");
        assert_eq!(request.headers()[header::AUTHORIZATION], format!("Basic {basic}").as_str());
        assert!(request.headers()[header::AUTHORIZATION].is_sensitive());
        c.credentials_in_body = true;
        let request = token_request(&c).unwrap();
        assert!(request.headers().get(header::AUTHORIZATION).is_none());
        assert!(request.body().ends_with(b"&client_id=client&client_secret=p%40ss%3Aword"));
    }

    #[test]
    fn token_responses_parse_and_error_codes_are_all_that_is_told() {
        let issued =
            parse_token(br#"{"access_token":"abc","token_type":"Bearer","expires_in":"60"}"#).unwrap();
        assert_eq!((issued.access_token.as_str(), issued.expires_in), ("abc", Some(Duration::from_secs(60))));
        assert!(parse_token(br#"{"access_token":"a\nb"}"#).is_none());
        assert!(parse_token(b"not json").is_none());
        assert_eq!(
            error_code(br#"{"error":"invalid_client","error_description":"secret x"}"#).unwrap(),
            "invalid_client"
        );
        assert!(error_code(br#"{"error":"has space and \"quotes\""}"#).is_none());
    }
}
