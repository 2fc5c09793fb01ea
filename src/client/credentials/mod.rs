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

use super::attempt::{AttemptContext, Next, Reply, Step, StepLayer};
use crate::action::{Auth, ErrorKind};
use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request};
use oauth2::{Found, TokenCache};
use tower::ServiceExt as _;

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

impl Step for Credentials {
    async fn around<S: Next<B>, B: Send + 'static>(self, mut request: Request<Bytes>, next: S) -> Reply<B> {
        // Taken out: the hops below have no use for it.
        let auth = request.extensions_mut().remove::<Auth>().unwrap_or_default();
        match auth {
            Auth::None => {}
            Auth::Header { name, value } => set(&mut request, name, value)?,
            Auth::Query { pair } => add_query(&mut request, &pair)?,
            Auth::AwsSigV4(credential) => {
                sigv4::sign(&mut request, &credential, std::time::SystemTime::now())?
            }
            Auth::OAuth2(credential) => {
                let deadline = tokio::time::Instant::from_std(AttemptContext::of(&request)?.deadline);
                let label = credential.profile.as_deref().unwrap_or(INLINE);
                let (token, found) = match self.tokens.get(&credential, deadline).await {
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
                let mut value = HeaderValue::from_str(&format!("Bearer {}", token.value)).map_err(|_| {
                    CredentialsError::new(ErrorKind::Auth, "the access token does not fit a header")
                })?;
                value.set_sensitive(true);
                set(&mut request, header::AUTHORIZATION, value)?;
                let mut response = next.oneshot(request).await.map_err(Into::into)?;
                if credential.refresh_on_status.contains(&response.status().as_u16()) {
                    self.tokens.reject(&credential, &token);
                    response.extensions_mut().insert(CredentialsRejected);
                }
                return Ok(response);
            }
        }
        next.oneshot(request).await.map_err(Into::into)
    }
}

/// The metrics label of credentials written inline (profiles are labelled by name).
pub const INLINE: &str = "inline";

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
    use crate::action::OAuth2Credential;
    use crate::client::attempt::tests::request;
    use oauth2::{FetchToken, Issued, TokenSettings};
    use std::{
        future::Future,
        pin::Pin,
        sync::{
            atomic::{AtomicU64, Ordering},
            Arc,
        },
        time::Duration,
    };
    use tower::{Layer as _, Service as _};

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

    fn with(auth: Auth, url: &str) -> Request<Bytes> {
        let mut request = request(url, Duration::from_secs(30));
        request.extensions_mut().insert(auth);
        request
    }

    #[tokio::test(start_paused = true)]
    async fn static_credentials_are_set_on_the_request() {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Bytes>, http::Response<()>>();
        let mut service = layer(&Issuer::default()).layer(mock);
        let mut value = HeaderValue::from_static("k");
        value.set_sensitive(true);
        let call = tokio::spawn(
            service.call(with(Auth::Header { name: "x-key".parse().unwrap(), value }, "http://h/p")),
        );
        let (sent, reply) = handle.next_request().await.unwrap();
        assert_eq!(sent.headers()["x-key"], "k");
        assert!(sent.headers()["x-key"].is_sensitive(), "so a cross-origin redirect drops it");
        assert!(sent.extensions().get::<Auth>().is_none());
        reply.send_response(http::Response::new(()));
        call.await.unwrap().unwrap();
        let call =
            tokio::spawn(service.call(with(Auth::Query { pair: "key=a%26b".into() }, "http://h/p?x=1")));
        let (sent, reply) = handle.next_request().await.unwrap();
        assert_eq!(sent.uri(), "http://h/p?x=1&key=a%26b");
        reply.send_response(http::Response::new(()));
        call.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_token_is_dropped_and_the_response_marked() {
        let issuer = Issuer::default();
        let (mock, mut handle) = tower_test::mock::pair::<Request<Bytes>, http::Response<()>>();
        let mut service = layer(&issuer).layer(mock);
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
            let call = tokio::spawn(service.call(with(Auth::OAuth2(credential.clone()), "http://h/")));
            let (sent, reply) = handle.next_request().await.unwrap();
            statuses.push(sent.headers()[header::AUTHORIZATION].to_str().unwrap().to_owned());
            assert!(sent.headers()[header::AUTHORIZATION].is_sensitive());
            let mut response = http::Response::new(());
            *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
            reply.send_response(response);
            let response = call.await.unwrap().unwrap();
            assert_eq!(response.extensions().get::<CredentialsRejected>().is_some(), status == 401);
        }
        assert_eq!(statuses, ["Bearer t1", "Bearer t1", "Bearer t2"], "cached, rejected, replaced");
        assert_eq!(issuer.0.load(Ordering::SeqCst), 2);
    }
}
