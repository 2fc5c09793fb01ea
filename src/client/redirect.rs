//! Following redirects: where the next hop goes, with which method, body and headers.
//! 301/302 turn POST into GET and 303 turns anything but HEAD into GET (as browsers do);
//! 307/308 keep method and body. Credentials never cross to another origin: every header
//! marked sensitive (secret-filled, API keys, `--sensitive-header`) is dropped with them.
//!
//! The `Redirect` layer is hand-written rather than tower-http's `FollowRedirect`: that one
//! keeps every header but Authorization/Cookie/Proxy-Authorization across origins (ours drops
//! every sensitive-marked one too), knows no loop detection by visited URL, and its error for
//! too many hops carries no context. Each hop goes down to the client as its own request, so the
//! egress-checking connector dials every one. It loops around the rest of the attempt, so it
//! is a service of its own rather than a `Step`, with a named future.
use super::{
    attempt::{AttemptContext, AttemptRequest, Reply},
    error::SendFailure,
};
use crate::action::ErrorKind;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};
use tower::{BoxError, Layer, Service};
use url::Url;

const USER_AGENT: &str = concat!("callout/", env!("CARGO_PKG_VERSION"));

/// One request of a redirect chain.
#[derive(Debug, Clone)]
pub struct Hop {
    pub method: Method,
    pub url: Url,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why a redirect chain stopped with an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedirectError {
    #[error("more than {0} redirects")]
    TooMany(u32),
    #[error("redirect loop: {0} was already visited")]
    Loop(String),
    #[error("redirect Location is not a valid URL: {0}")]
    BadLocation(String),
    #[error("redirect to scheme {0:?} is not allowed; only http and https")]
    BadScheme(String),
}

/// The hop after `current`, when its response is a redirect to follow; `None` when the
/// response is final (not a redirect, or no Location). `visited` holds the URLs so far.
pub fn next_hop(
    current: &Hop,
    status: StatusCode,
    location: Option<&header::HeaderValue>,
    visited: &[Url],
    max_hops: u32,
) -> Result<Option<Hop>, RedirectError> {
    let change_to_get = match status.as_u16() {
        301 | 302 => current.method == Method::POST,
        303 => current.method != Method::HEAD,
        307 | 308 => false,
        _ => return Ok(None),
    };
    let Some(location) = location else {
        return Ok(None);
    };
    let location =
        location.to_str().map_err(|_| RedirectError::BadLocation("it is not visible ASCII".into()))?;
    let mut url = current.url.join(location).map_err(|e| RedirectError::BadLocation(e.to_string()))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(RedirectError::BadScheme(url.scheme().to_owned()));
    }
    // Fragments are not sent; a Location without one keeps no fragment either.
    url.set_fragment(None);
    if visited.len() as u32 > max_hops {
        return Err(RedirectError::TooMany(max_hops));
    }
    if visited.contains(&url) {
        return Err(RedirectError::Loop(format!("{}{}", url.origin().ascii_serialization(), url.path())));
    }
    let mut next = Hop {
        method: current.method.clone(),
        url,
        headers: current.headers.clone(),
        body: current.body.clone(),
    };
    if change_to_get {
        next.method = Method::GET;
        next.body = Bytes::new();
        next.headers.remove(header::CONTENT_TYPE);
        next.headers.remove(header::CONTENT_ENCODING);
    }
    if next.url.origin() != current.url.origin() {
        crate::action::drop_credentials(&mut next.headers);
    }
    Ok(Some(next))
}

impl Hop {
    /// The request for this hop: its headers plus a default User-Agent.
    pub fn request(&self) -> Result<Request<Bytes>, SendFailure> {
        self.clone().into_request()
    }

    /// The request for this hop, its headers moved (no copy).
    pub fn into_request(self) -> Result<Request<Bytes>, SendFailure> {
        let uri: http::Uri = self.url.as_str().parse().map_err(|_| {
            SendFailure::new(ErrorKind::InvalidRequest, "URL cannot be sent as an HTTP request target", false)
        })?;
        let mut request = Request::new(self.body);
        *request.method_mut() = self.method;
        *request.uri_mut() = uri;
        *request.headers_mut() = self.headers;
        // `try_`: a map at http's size limit is an error here, never a panic (validation caps
        // the count far below it).
        let full =
            |_| SendFailure::new(ErrorKind::InvalidRequest, "too many headers to add User-Agent", false);
        if !request.headers().contains_key(header::USER_AGENT) {
            request
                .headers_mut()
                .try_insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT))
                .map_err(full)?;
        }
        Ok(request)
    }
}

/// The URL that answered an attempt whose redirects were followed (in the final response's
/// extensions): a relative Location in that response resolves against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnsweredBy(pub Url);

/// Follows redirects by the attempt's policy: each hop is sent through the rest of the stack,
/// and the final response (not a redirect, or redirects not followed) is returned.
#[derive(Debug, Clone, Copy, Default)]
pub struct Redirect<S> {
    inner: S,
}

impl<S, B> Service<AttemptRequest> for Redirect<S>
where
    S: Service<AttemptRequest, Response = Response<B>, Error: Into<BoxError>> + Clone,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = RedirectFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: AttemptRequest) -> Self::Future {
        let context = &request.context;
        // Following needs the hop as sent (for the next one) and the rest of the stack again.
        let follow = context.redirects.follow.then(|| {
            Box::new(Follow {
                hop: Hop {
                    method: request.http.method().clone(),
                    url: context.url.clone(),
                    headers: request.http.headers().clone(),
                    body: request.http.body().clone(),
                },
                visited: Vec::new(),
                context: context.clone(),
                inner: self.inner.clone(),
                pending: None,
            })
        });
        RedirectFuture { call: self.inner.call(request), follow }
    }
}

/// What following needs between hops.
struct Follow<S> {
    hop: Hop,
    /// The URLs so far; empty until the first redirect.
    visited: Vec<Url>,
    context: Arc<AttemptContext>,
    inner: S,
    /// The next hop, waiting for the rest of the stack to be ready. Boxed: most attempts never
    /// have one, and this state lives through the whole wait for the response.
    pending: Option<Box<AttemptRequest>>,
}

pin_project! {
    /// The response future of `Redirect`: the current hop's send, and what following needs.
    pub struct RedirectFuture<S: Service<AttemptRequest>> {
        #[pin]
        call: S::Future,
        // None when redirects are not followed: the first response is final. Boxed: the hop
        // is large, and every future above holds this one.
        follow: Option<Box<Follow<S>>>,
    }
}

impl<S, B> Future for RedirectFuture<S>
where
    S: Service<AttemptRequest, Response = Response<B>, Error: Into<BoxError>>,
{
    type Output = Reply<B>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reply<B>> {
        let mut this = self.project();
        loop {
            if let Some(follow) = this.follow.as_mut() {
                if let Some(request) = follow.pending.take() {
                    match follow.inner.poll_ready(cx) {
                        Poll::Pending => {
                            follow.pending = Some(request);
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                        Poll::Ready(Ok(())) => this.call.set(follow.inner.call(*request)),
                    }
                }
            }
            let response = ready!(this.call.as_mut().poll(cx)).map_err(Into::into)?;
            let Some(follow) = this.follow.as_mut() else {
                return Poll::Ready(Ok(response));
            };
            match follow.next(&response) {
                Ok(Some(request)) => follow.pending = Some(request),
                Ok(None) if follow.visited.is_empty() => return Poll::Ready(Ok(response)),
                Ok(None) => {
                    let mut response = response;
                    response.extensions_mut().insert(AnsweredBy(follow.hop.url.clone()));
                    return Poll::Ready(Ok(response));
                }
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

impl<S> Follow<S> {
    /// The request of the hop after `response`, when it is a redirect to follow.
    fn next<B>(&mut self, response: &Response<B>) -> Result<Option<Box<AttemptRequest>>, SendFailure> {
        let status = response.status();
        if !status.is_redirection() {
            return Ok(None);
        }
        if self.visited.is_empty() {
            self.visited.push(self.hop.url.clone());
        }
        let location = response.headers().get(header::LOCATION);
        let next = next_hop(&self.hop, status, location, &self.visited, self.context.redirects.max_hops)
            .map_err(|e| SendFailure::new(ErrorKind::Protocol, e.to_string(), true))?;
        let Some(next) = next else {
            return Ok(None);
        };
        tracing::debug!(status = status.as_u16(), to = %next.url.origin().ascii_serialization(), "following redirect");
        self.visited.push(next.url.clone());
        self.hop = next;
        let request =
            AttemptRequest { http: self.hop.request()?, context: self.context.clone(), checked: None };
        Ok(Some(Box::new(request)))
    }
}

/// Redirects as a layer of the attempt stack.
#[derive(Debug, Clone, Copy, Default)]
pub struct RedirectLayer;

impl<S> Layer<S> for RedirectLayer {
    type Service = Redirect<S>;
    fn layer(&self, inner: S) -> Redirect<S> {
        Redirect { inner }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use tower::ServiceExt as _;

    fn hop(method: Method, url: &str) -> Hop {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Hop { method, url: Url::parse(url).unwrap(), headers, body: Bytes::from_static(b"{}") }
    }

    fn follow(h: &Hop, status: u16, to: &'static str) -> Result<Option<Hop>, RedirectError> {
        next_hop(
            h,
            StatusCode::from_u16(status).unwrap(),
            Some(&HeaderValue::from_static(to)),
            std::slice::from_ref(&h.url),
            10,
        )
    }

    #[test]
    fn post_becomes_get_on_301_302_303() {
        for status in [301, 302, 303] {
            let next = follow(&hop(Method::POST, "http://a.test/x"), status, "/y").unwrap().unwrap();
            assert_eq!(next.method, Method::GET);
            assert!(next.body.is_empty());
            assert!(!next.headers.contains_key(header::CONTENT_TYPE));
            assert_eq!(next.url.as_str(), "http://a.test/y");
            assert!(next.headers.contains_key(header::AUTHORIZATION), "same origin keeps credentials");
        }
        let put = follow(&hop(Method::PUT, "http://a.test/x"), 302, "/y").unwrap().unwrap();
        assert_eq!(put.method, Method::PUT);
        let head = follow(&hop(Method::HEAD, "http://a.test/x"), 303, "/y").unwrap().unwrap();
        assert_eq!(head.method, Method::HEAD);
    }

    #[test]
    fn temporary_and_permanent_keep_method_and_body() {
        for status in [307, 308] {
            let next = follow(&hop(Method::POST, "http://a.test/x"), status, "/y").unwrap().unwrap();
            assert_eq!(next.method, Method::POST);
            assert_eq!(next.body, "{}");
        }
    }

    #[test]
    fn credentials_do_not_cross_origins() {
        let next =
            follow(&hop(Method::GET, "http://a.test/x"), 302, "http://a.test:8080/y").unwrap().unwrap();
        assert!(!next.headers.contains_key(header::AUTHORIZATION));
    }

    #[test]
    fn sensitive_headers_do_not_cross_origins() {
        let mut h = hop(Method::GET, "http://a.test/x");
        let mut token = HeaderValue::from_static("t0k");
        token.set_sensitive(true);
        h.headers.insert("x-token", token);
        h.headers.insert("x-plain", HeaderValue::from_static("p"));
        let same = follow(&h, 302, "/y").unwrap().unwrap();
        assert!(same.headers.contains_key("x-token"), "same origin keeps it");
        let other = follow(&h, 302, "http://b.test/y").unwrap().unwrap();
        assert!(!other.headers.contains_key("x-token"));
        assert!(other.headers.contains_key("x-plain"));
    }

    #[test]
    fn loops_limits_and_bad_locations() {
        let h = hop(Method::GET, "http://a.test/x");
        assert!(matches!(follow(&h, 302, "/x"), Err(RedirectError::Loop(_))));
        assert!(matches!(follow(&h, 302, "ftp://a.test/"), Err(RedirectError::BadScheme(_))));
        let visited: Vec<Url> = (0..11).map(|i| Url::parse(&format!("http://a.test/{i}")).unwrap()).collect();
        let r = next_hop(&h, StatusCode::FOUND, Some(&HeaderValue::from_static("/z")), &visited, 10);
        assert_eq!(r.unwrap_err(), RedirectError::TooMany(10));
        assert!(follow(&h, 200, "/y").unwrap().is_none());
        assert!(next_hop(&h, StatusCode::FOUND, None, &[], 10).unwrap().is_none());
    }

    #[test]
    fn following_reserves_little_until_a_redirect_comes() {
        // Every attempt that follows redirects (the default) keeps this state through its wait
        // for the response: the hop as sent and a clone of the client (a few pointers), the next
        // hop's request boxed only once a redirect comes. 312 bytes on x86_64 today; 1,000
        // with the client and the pending request inline.
        let size = std::mem::size_of::<Follow<crate::client::HttpClient>>();
        assert!(size <= 384, "{size}");
    }

    #[tokio::test]
    async fn the_layer_sends_each_hop_and_returns_the_final_response() {
        let (mock, mut handle) = tower_test::mock::pair::<AttemptRequest, Response<()>>();
        let mut service = RedirectLayer.layer(mock);
        let mut first =
            crate::client::attempt::tests::request("http://a.test/x", std::time::Duration::from_secs(5));
        first.http.headers_mut().insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        Arc::get_mut(&mut first.context).unwrap().redirects.follow = true;
        let context = first.context.clone();
        let call = tokio::spawn(service.ready().await.unwrap().call(first));
        let (sent, reply) = handle.next_request().await.unwrap();
        assert!(sent.http.headers().contains_key(header::AUTHORIZATION));
        reply.send_response(
            Response::builder().status(302).header("location", "http://b.test/y").body(()).unwrap(),
        );
        let (sent, reply) = handle.next_request().await.unwrap();
        assert_eq!(sent.http.uri(), "http://b.test/y");
        assert!(!sent.http.headers().contains_key(header::AUTHORIZATION), "not across origins");
        assert!(Arc::ptr_eq(&sent.context, &context), "every hop keeps the context");
        reply.send_response(
            Response::builder().status(302).header("location", "http://a.test/x").body(()).unwrap(),
        );
        let err = call.await.unwrap().unwrap_err();
        assert!(
            err.downcast_ref::<SendFailure>().is_some_and(|f| f.message.contains("redirect loop")),
            "{err}"
        );
    }
}
