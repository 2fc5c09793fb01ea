//! Follow-up requests of an action: the same action sent as a GET to another URL (a 202's
//! Location polled by `async_poll`; a next page). Everything else stays (limits, retry policy,
//! TLS, proxy, headers, conditions, extract), so a follow-up passes every check an attempt does;
//! across origins its credentials stay behind, as on a redirect.
use super::{Auth, HttpAction, Signing};
use http::{header, Method};
use url::Url;

/// Why a Location cannot be followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocationError {
    #[error("the Location is not a valid URL: {0}")]
    Invalid(String),
    #[error("the Location's scheme {0:?} is not allowed; only http and https")]
    Scheme(String),
}

/// `location` resolved against `answered` (the URL that gave it): a relative one joins it, the
/// fragment and any user:password are dropped.
pub fn resolve_location(answered: &Url, location: &str) -> Result<Url, LocationError> {
    let mut url = answered.join(location).map_err(|e| LocationError::Invalid(e.to_string()))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(LocationError::Scheme(url.scheme().to_owned()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(LocationError::Invalid("it has no host".into()));
    }
    url.set_fragment(None);
    let _ = url.set_username("");
    let _ = url.set_password(None);
    Ok(url)
}

/// Headers that carry credentials whatever validation marked.
const CREDENTIAL_HEADERS: [header::HeaderName; 3] =
    [header::AUTHORIZATION, header::COOKIE, header::PROXY_AUTHORIZATION];

/// Removes what may not go to another origin: Authorization, Cookie, Proxy-Authorization and
/// every value validation marked sensitive (one filled from `{{secret:…}}`, an API-key header,
/// a configured sensitive header). Redirects, polls and next pages all drop them here.
pub fn drop_credentials(headers: &mut http::HeaderMap) {
    for name in &CREDENTIAL_HEADERS {
        headers.remove(name);
    }
    let sensitive: Vec<header::HeaderName> =
        headers.iter().filter(|(_, v)| v.is_sensitive()).map(|(n, _)| n.clone()).collect();
    for name in sensitive {
        headers.remove(name);
    }
}

impl HttpAction {
    /// The action's follow-up: a GET of `url`, no body and no Content-Type, the same headers
    /// and policies. When `url` has another origin than the action's, its credentials, signing
    /// and every sensitive header (secret-filled, API keys, configured sensitive ones) are left
    /// out, as a redirect leaves them.
    pub fn follow_up(&self, url: Url) -> HttpAction {
        let mut next = self.clone();
        next.method = Method::GET;
        next.body = bytes::Bytes::new();
        next.headers.remove(header::CONTENT_TYPE);
        next.headers.remove(header::CONTENT_ENCODING);
        // A GET may always be repeated.
        next.retry.may_repeat = true;
        if url.origin() != self.url.origin() {
            drop_credentials(&mut next.headers);
            if let Some(uncommon) = next.uncommon.as_mut() {
                uncommon.auth = Auth::None;
            }
            next.signing = Signing::None;
        }
        next.url = url;
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::{ActionInput, BodyInput};

    fn post() -> HttpAction {
        HttpAction::from_input(ActionInput {
            method: "POST".into(),
            url: "http://api.test/jobs?x=1".into(),
            headers: vec![("authorization".into(), "Bearer t".into()), ("x-trace".into(), "1".into())],
            body: BodyInput::Json("{}".into()),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn relative_locations_resolve_against_the_answering_url() {
        let answered = Url::parse("http://api.test/jobs/").unwrap();
        assert_eq!(resolve_location(&answered, "7").unwrap().as_str(), "http://api.test/jobs/7");
        assert_eq!(resolve_location(&answered, "/q/7#f").unwrap().as_str(), "http://api.test/q/7");
        let absolute = resolve_location(&answered, "https://u:p@other.test/s").unwrap();
        assert_eq!(absolute.as_str(), "https://other.test/s");
        assert!(matches!(resolve_location(&answered, "ftp://x/"), Err(LocationError::Scheme(_))));
    }

    #[test]
    fn a_follow_up_is_a_get_without_body_keeping_same_origin_credentials() {
        let action = post();
        let same = action.follow_up(Url::parse("http://api.test/jobs/7").unwrap());
        assert_eq!(same.method(), &Method::GET);
        assert!(same.body().is_empty() && !same.headers().contains_key(header::CONTENT_TYPE));
        assert!(same.headers().contains_key(header::AUTHORIZATION));
        assert!(same.retry().may_repeat);
        let other = action.follow_up(Url::parse("http://other.test/jobs/7").unwrap());
        assert!(!other.headers().contains_key(header::AUTHORIZATION), "never across origins");
        assert!(other.headers().contains_key("x-trace"));
        assert_eq!(other.url().as_str(), "http://other.test/jobs/7");
    }
}
