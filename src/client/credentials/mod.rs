//! Credentials as a layer of the attempt: the action's `Auth` (in the request's extensions)
//! applied to each attempt after every wait, so a token or signature is as fresh as the send.
//! Basic, Bearer and API-key headers are set marked sensitive (the redirect layer below drops
//! sensitive headers across origins); an API key in the query is added to the first hop only
//! (a redirect's Location replaces the query); OAuth2 tokens come from the shared token cache
//! (`oauth2`), and a response whose status the credential names (401 by default) drops the
//! token it was sent with and is marked `CredentialsRejected`, for the action's retry policy
//! to try once more with a new token; AWS SigV4 (`sigv4`) signs the request as it stands.
pub mod oauth2;
pub mod sigv4;

use super::attempt::{AttemptRequest, Before, Reply, Step, StepLayer};
use crate::action::{Auth, ErrorKind, OAuth2Credential};
use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request};
use oauth2::{Found, Token, TokenCache};
use std::sync::Arc;
use tower::BoxError;

/// Why an attempt's credentials could not be applied. Nothing was sent to the upstream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CredentialsError {
    /// `AUTH` for a failed token fetch, `DENIED_BY_POLICY` when the egress policy refused the
    /// token endpoint, `INVALID_REQUEST` for a request that cannot carry the credential.
    pub kind: ErrorKind,
    /// Names the token endpoint's origin, status and OAuth2 error code; never a secret.
    pub message: String,
    /// The action's own deadline cut the fetch short (says nothing about the endpoint).
    pub(crate) deadline: bool,
}

impl CredentialsError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), deadline: false }
    }
}

/// Marks a response whose status made its OAuth2 token stale: the token was dropped from the
/// cache, and one more attempt (with a new token) may mend it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CredentialsRejected;

/// Applies the attempt's credentials. Holds the token cache shared by every action.
#[derive(Clone)]
pub struct Credentials {
    tokens: TokenCache,
}

impl Credentials {
    pub fn new(tokens: TokenCache) -> Self {
        Self { tokens }
    }

    pub fn tokens(&self) -> &TokenCache {
        &self.tokens
    }
}

/// Credentials as a layer of the attempt stack.
pub type CredentialsLayer = StepLayer<Credentials>;

/// The OAuth2 token an attempt was sent with, and where to drop it if the upstream rejects it.
pub struct SentToken {
    tokens: TokenCache,
    credential: Arc<OAuth2Credential>,
    token: Token,
}

impl Step for Credentials {
    /// Boxed (one pointer in the future): only OAuth2 attempts have one.
    type Held = Option<Box<SentToken>>;

    fn before(&self, request: &mut AttemptRequest) -> Before<Self::Held> {
        // The context stays with this layer: the hops below never see the credential.
        let applied = match &request.context.auth {
            // No auth (the common path): nothing to do, nothing allocated.
            Auth::None => return Before::Go(None),
            auth @ (Auth::Header { .. } | Auth::Query { .. } | Auth::AwsSigV4(_)) => {
                apply_now(auth, &mut request.http, std::time::SystemTime::now())
            }
            Auth::OAuth2(credential) => {
                // A wait, within the action's deadline: a cached token comes at once, a fetch is
                // shared with every action that wants the same token. `waited` sets it.
                let (tokens, credential) = (self.tokens.clone(), credential.clone());
                let deadline = tokio::time::Instant::from_std(request.context.deadline);
                return Before::Wait(Box::pin(async move {
                    let label = credential.profile.as_deref().unwrap_or(INLINE);
                    let (token, found) = match tokens.get(&credential, deadline).await {
                        Ok(got) => got,
                        Err(e) => {
                            crate::metrics::oauth2_token_failed(label);
                            return Err(e.into());
                        }
                    };
                    match found {
                        Found::Cached => crate::metrics::oauth2_token_cache_hit(label),
                        Found::Fetched => crate::metrics::oauth2_token_fetched(label),
                    }
                    Ok(Some(Box::new(SentToken { tokens, credential, token })))
                }));
            }
        };
        match applied {
            Ok(()) => Before::Go(None),
            Err(e) => Before::Refuse(e.into()),
        }
    }

    fn waited(held: &mut Self::Held, request: &mut AttemptRequest) -> Result<(), BoxError> {
        let Some(sent) = held else { return Ok(()) };
        let mut value = HeaderValue::from_str(&format!("Bearer {}", sent.token.value))
            .map_err(|_| CredentialsError::new(ErrorKind::Auth, "the access token does not fit a header"))?;
        value.set_sensitive(true);
        set(&mut request.http, header::AUTHORIZATION, value)?;
        Ok(())
    }

    fn after<B>(held: Self::Held, reply: Reply<B>) -> Reply<B> {
        let Some(sent) = held else { return reply };
        let mut response = reply?;
        if sent.credential.refresh_on_status.contains(&response.status().as_u16()) {
            // Stale: dropped, and the response marked for the action's one retry with a new one.
            sent.tokens.reject(&sent.credential, &sent.token);
            response.extensions_mut().insert(CredentialsRejected);
        }
        Ok(response)
    }
}

pub use crate::metrics::INLINE_PROFILE as INLINE;

/// Applies the credentials that need no wait (header, query, AWS SigV4 at `now`) to `request`;
/// OAuth2 (a token from the cache, after a wait) and none leave it as it is. The attempt and
/// Render both apply credentials through this.
pub fn apply_now(
    auth: &Auth,
    request: &mut Request<Bytes>,
    now: std::time::SystemTime,
) -> Result<(), CredentialsError> {
    match auth {
        Auth::Header { name, value } => set(request, name.clone(), value.clone()),
        Auth::Query { pair } => add_query(request, pair),
        Auth::AwsSigV4(credential) => sigv4::sign(request, credential, now),
        Auth::None | Auth::OAuth2(_) => Ok(()),
    }
}

fn set(request: &mut Request<Bytes>, name: HeaderName, value: HeaderValue) -> Result<(), CredentialsError> {
    // `try_`: a map at http's size limit is an error here, never a panic.
    request.headers_mut().try_insert(name, value).map(drop).map_err(|_| {
        CredentialsError::new(ErrorKind::InvalidRequest, "too many headers to add the credential")
    })
}

fn add_query(request: &mut Request<Bytes>, pair: &str) -> Result<(), CredentialsError> {
    let uri = request.uri();
    let path = uri.path();
    let target = match uri.query() {
        Some(query) if !query.is_empty() => format!("{path}?{query}&{pair}"),
        _ => format!("{path}?{pair}"),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(target.parse().map_err(|_| {
        CredentialsError::new(ErrorKind::InvalidRequest, "the API key cannot be added to the URL")
    })?);
    *request.uri_mut() = http::Uri::from_parts(parts).map_err(|_| {
        CredentialsError::new(ErrorKind::InvalidRequest, "the API key cannot be added to the URL")
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::attempt::tests::{request, Harness};
    use oauth2::{FetchToken, Issued, TokenSettings};
    use std::{
        future::Future,
        pin::Pin,
        sync::atomic::{AtomicU64, Ordering},
        time::Duration,
    };

    #[derive(Clone, Default)]
    struct Issuer(Arc<AtomicU64>);

    impl FetchToken for Issuer {
        fn fetch(
            &self,
            _: &OAuth2Credential,
            _: tokio::time::Instant,
        ) -> Pin<Box<dyn Future<Output = Result<Issued, CredentialsError>> + Send + 'static>> {
            let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(async move { Ok(Issued { access_token: format!("t{n}"), expires_in: None }) })
        }
    }

    fn layer(issuer: &Issuer) -> CredentialsLayer {
        StepLayer(Credentials::new(TokenCache::new(issuer.clone(), TokenSettings::default())))
    }

    fn with(auth: Auth, url: &str) -> AttemptRequest {
        let mut request = request(url, Duration::from_secs(30));
        if let Some(context) = Arc::get_mut(&mut request.context) {
            context.auth = auth;
        }
        request
    }

    #[tokio::test(start_paused = true)]
    async fn static_credentials_are_set_on_the_request() {
        let mut harness = Harness::new(layer(&Issuer::default()));
        let mut value = HeaderValue::from_static("k");
        value.set_sensitive(true);
        let call =
            harness.send(with(Auth::Header { name: "x-key".parse().unwrap(), value }, "http://h/p")).await;
        let sent = harness.answer(200).await.http;
        assert_eq!(sent.headers()["x-key"], "k");
        assert!(sent.headers()["x-key"].is_sensitive(), "so a cross-origin redirect drops it");
        call.await.unwrap().unwrap();
        let call = harness.send(with(Auth::Query { pair: "key=a%26b".into() }, "http://h/p?x=1")).await;
        assert_eq!(harness.answer(200).await.http.uri(), "http://h/p?x=1&key=a%26b");
        call.await.unwrap().unwrap();
        // No auth: the request goes on as it is.
        let call = harness.start("http://h/p", Duration::from_secs(30)).await;
        let sent = harness.answer(200).await.http;
        assert!(sent.headers().is_empty() && sent.uri() == "http://h/p");
        call.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_token_is_dropped_and_the_response_marked() {
        let issuer = Issuer::default();
        let mut harness = Harness::new(layer(&issuer));
        let credential = Arc::new(OAuth2Credential {
            token_url: url::Url::parse("http://idp.test/token").unwrap(),
            client_id: "c".into(),
            client_secret: "s".into(),
            scopes: Vec::new(),
            audience: String::new(),
            extra_params: Vec::new(),
            credentials_in_body: false,
            refresh_on_status: vec![401],
            profile: None,
        });
        let mut statuses = vec![];
        for status in [200, 401, 200] {
            let call = harness.send(with(Auth::OAuth2(credential.clone()), "http://h/")).await;
            let sent = harness.answer(status).await.http;
            statuses.push(sent.headers()[header::AUTHORIZATION].to_str().unwrap().to_owned());
            assert!(sent.headers()[header::AUTHORIZATION].is_sensitive());
            let response = call.await.unwrap().unwrap();
            assert_eq!(response.extensions().get::<CredentialsRejected>().is_some(), status == 401);
        }
        assert_eq!(statuses, ["Bearer t1", "Bearer t1", "Bearer t2"], "cached, rejected, replaced");
        assert_eq!(issuer.0.load(Ordering::SeqCst), 2);
    }
}
