//! Which proxy a connection goes through. The server's proxies come from `--proxy` or, read
//! once at start, HTTPS_PROXY / HTTP_PROXY / NO_PROXY; an action's own `proxy.url` replaces
//! them for that action. hyper-util's `Matcher` decides per target (its scheme, and NO_PROXY's
//! names, domain suffixes, addresses and CIDR ranges); the handshakes with the proxy are
//! hyper-util's too (see `connect`). Proxy credentials travel only to the proxy; messages show
//! it as `scheme://host:port`.
use super::host;
use crate::action::ProxyUrl;
use http::Uri;
use hyper_util::client::proxy::matcher::Matcher;
use std::{fmt, sync::Arc};

/// Hosts that bypass the proxy (NO_PROXY): a comma list of host names, domain suffixes
/// (`example.com`, `.example.com` and `*.example.com` all match `example.com` and
/// `api.example.com`), IP addresses, CIDR ranges (`10.0.0.0/8`, `fd00::/8`), or `*` for all.
/// Ports in entries are ignored. Kept normalised, as hyper-util's matcher reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct NoProxy {
    all: bool,
    entries: Vec<String>,
}

impl NoProxy {
    pub fn parse(list: &str) -> Self {
        let mut no_proxy = Self::default();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry == "*" {
                no_proxy.all = true;
                continue;
            }
            let host = match entry.strip_prefix('[') {
                // [::1]:8080 or [::1]
                Some(rest) => rest.split(']').next().unwrap_or_default(),
                // host:port (a bare IPv6 address or range has more than one colon: kept whole)
                None if entry.matches(':').count() == 1 => entry.split(':').next().unwrap_or_default(),
                None => entry,
            };
            let host = host::normalize(host.trim_start_matches("*.").trim_start_matches('.'));
            if !host.is_empty() {
                no_proxy.entries.push(host);
            }
        }
        no_proxy
    }
}

/// The proxies of one client: per target scheme, with NO_PROXY exceptions.
#[derive(Clone, Default)]
pub struct Proxies {
    http: Option<ProxyUrl>,
    https: Option<ProxyUrl>,
    no_proxy: NoProxy,
    /// The proxy came from an action, not the operator: its own address must pass the egress
    /// policy like any destination (else a caller could point it at a metadata service).
    chosen_by_caller: bool,
    /// Built from the fields above; `None` when there is no proxy at all.
    matcher: Option<Arc<Matcher>>,
}

impl Proxies {
    /// The operator's proxies: `http` for http targets, `https` for https targets, both
    /// skipped for hosts in `no_proxy`.
    pub fn new(http: Option<ProxyUrl>, https: Option<ProxyUrl>, no_proxy: NoProxy) -> Self {
        Self::build(http, https, no_proxy, false)
    }

    /// One proxy for every target, no exceptions: an action's own `proxy.url`.
    pub fn only(proxy: ProxyUrl) -> Self {
        Self::build(Some(proxy.clone()), Some(proxy), NoProxy::default(), true)
    }

    /// These proxies with `proxy` for every target (`--proxy`); NO_PROXY still applies.
    pub fn with_proxy(self, proxy: ProxyUrl) -> Self {
        Self::build(Some(proxy.clone()), Some(proxy), self.no_proxy, self.chosen_by_caller)
    }

    fn build(
        http: Option<ProxyUrl>,
        https: Option<ProxyUrl>,
        no_proxy: NoProxy,
        chosen_by_caller: bool,
    ) -> Self {
        let matcher = (http.is_some() || https.is_some()).then(|| {
            // The matcher only decides whether a target is proxied; which proxy it is comes
            // from the validated URLs here, so the matcher is given them without credentials.
            let shown = |p: &Option<ProxyUrl>| p.as_ref().map(ToString::to_string).unwrap_or_default();
            Arc::new(
                Matcher::builder()
                    .http(shown(&http))
                    .https(shown(&https))
                    .no(no_proxy.entries.join(","))
                    .build(),
            )
        });
        Self { http, https, no_proxy, chosen_by_caller, matcher }
    }

    /// True when the proxy is an action's own, to be egress-checked like any destination.
    pub fn chosen_by_caller(&self) -> bool {
        self.chosen_by_caller
    }

    /// True when some proxy is spoken to over TLS (`https://`).
    pub fn uses_tls(&self) -> bool {
        [&self.http, &self.https]
            .into_iter()
            .flatten()
            .any(|p| p.scheme() == crate::action::ProxyScheme::Https)
    }

    /// The proxy set for targets of this scheme, whether or not NO_PROXY exempts a host.
    pub fn configured_for(&self, https: bool) -> Option<&ProxyUrl> {
        if https {
            self.https.as_ref()
        } else {
            self.http.as_ref()
        }
    }

    /// The proxy for a target, or `None` to connect directly.
    pub fn for_target(&self, https: bool, host: &str) -> Option<&ProxyUrl> {
        let proxy = if https { self.https.as_ref() } else { self.http.as_ref() }?;
        if self.no_proxy.all {
            return None;
        }
        let matcher = self.matcher.as_ref()?;
        let host = host::normalize(host);
        let authority = if host.contains(':') { format!("[{host}]") } else { host };
        let target = Uri::builder()
            .scheme(if https { "https" } else { "http" })
            .authority(authority)
            .path_and_query("/")
            .build();
        match target {
            Ok(target) => matcher.intercept(&target).map(|_| proxy),
            // A host the matcher cannot read is proxied: NO_PROXY never opens by accident.
            Err(_) => Some(proxy),
        }
    }

    /// The Proxy-Authorization of a plain-http request to `host`: the credentials of the HTTP
    /// proxy it is forwarded through, when that proxy's URL carried them.
    pub fn forward_authorization(&self, host: &str) -> Option<&str> {
        let proxy = self.http.as_ref().filter(|p| p.scheme().is_http() && p.authorization().is_some())?;
        self.for_target(false, host).filter(|p| *p == proxy).and_then(ProxyUrl::authorization)
    }

    /// Reads HTTPS_PROXY, HTTP_PROXY and NO_PROXY (upper case first, then lower case) through
    /// `var`. A value without a scheme is taken as `http://`. The error names the variable and
    /// never echoes its value (it may hold a password).
    pub fn from_env_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let read = |name: &str| {
            var(name)
                .or_else(|| var(&name.to_ascii_lowercase()))
                .filter(|v| !v.trim().is_empty())
                .map(|v| (name.to_owned(), v))
        };
        let proxy = |name: &str| -> Result<Option<ProxyUrl>, String> {
            let Some((name, value)) = read(name) else { return Ok(None) };
            let value = if value.contains("://") { value } else { format!("http://{}", value.trim()) };
            ProxyUrl::parse(&value).map(Some).map_err(|e| format!("environment variable {name} {e}"))
        };
        Ok(Self::new(
            proxy("HTTP_PROXY")?,
            proxy("HTTPS_PROXY")?,
            read("NO_PROXY").map(|(_, v)| NoProxy::parse(&v)).unwrap_or_default(),
        ))
    }

    /// The process environment, read once at start.
    pub fn from_env() -> Result<Self, String> {
        Self::from_env_vars(|name| std::env::var(name).ok())
    }
}

impl PartialEq for Proxies {
    fn eq(&self, other: &Self) -> bool {
        // The matcher is made from the other fields.
        (&self.http, &self.https, &self.no_proxy, self.chosen_by_caller)
            == (&other.http, &other.https, &other.no_proxy, other.chosen_by_caller)
    }
}

impl Eq for Proxies {}

impl fmt::Debug for Proxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxies")
            .field("http", &self.http)
            .field("https", &self.https)
            .field("no_proxy", &self.no_proxy)
            .field("chosen_by_caller", &self.chosen_by_caller)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The environment as a map, for `from_env_vars`.
    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> =
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        move |name| map.get(name).cloned()
    }

    /// A proxy for both schemes with `no_proxy` as the exceptions.
    fn skipping(no_proxy: &str) -> Proxies {
        let p = ProxyUrl::parse("http://proxy.test:3128").unwrap();
        Proxies::new(Some(p.clone()), Some(p), NoProxy::parse(no_proxy))
    }

    #[test]
    fn no_proxy_matches_hosts_and_suffixes_at_dot_boundaries() {
        let np = skipping(" localhost, .internal.test,example.com:8080, 10.0.0.1, [::1]:80 ,*.wild.test");
        let matches =
            |host: &str| np.for_target(false, host).is_none() && np.for_target(true, host).is_none();
        for host in [
            "localhost",
            "a.internal.test",
            "internal.test",
            "example.com",
            "API.Example.com",
            "example.com.",
            "10.0.0.1",
            "[::1]",
            "::1",
            "wild.test",
            "a.wild.test",
        ] {
            assert!(matches(host), "{host}");
        }
        for host in ["badexample.com", "example.com.evil", "10.0.0.10", "internal.test.evil", "other"] {
            assert!(!matches(host), "{host}");
        }
        let all = skipping("*");
        assert!(
            all.for_target(true, "anything.test").is_none() && all.for_target(true, "10.1.1.1").is_none()
        );
        assert!(skipping("").for_target(true, "anything.test").is_some());
    }

    #[test]
    fn no_proxy_matches_cidr_ranges() {
        let np = skipping("127.0.0.0/8, fd00::/8");
        for host in ["127.0.0.1", "127.9.9.9", "fd00::1", "[fd12::7]"] {
            assert!(np.for_target(false, host).is_none(), "{host}");
        }
        for host in ["128.0.0.1", "fe80::1", "localhost"] {
            assert!(np.for_target(false, host).is_some(), "{host}");
        }
    }

    #[test]
    fn proxies_pick_by_scheme_and_skip_no_proxy() {
        let p = Proxies::from_env_vars(vars(&[
            ("HTTPS_PROXY", "http://u:pw@secure.proxy:3128"),
            ("http_proxy", "plain.proxy:8080"),
            ("no_proxy", "skip.test"),
        ]))
        .unwrap();
        assert_eq!(
            p.for_target(true, "api.test").map(|p| p.to_string()).as_deref(),
            Some("http://secure.proxy:3128")
        );
        assert!(p.for_target(true, "api.test").unwrap().authorization().is_some());
        assert_eq!(
            p.for_target(false, "api.test").map(|p| p.to_string()).as_deref(),
            Some("http://plain.proxy:8080")
        );
        assert!(p.for_target(true, "a.skip.test").is_none());
        // Upper case wins over lower case.
        let p = Proxies::from_env_vars(vars(&[
            ("HTTP_PROXY", "http://upper:1"),
            ("http_proxy", "http://lower:2"),
        ]))
        .unwrap();
        assert_eq!(p.for_target(false, "h").unwrap().host(), "upper");
        assert_eq!(Proxies::from_env_vars(vars(&[])).unwrap(), Proxies::default());
        let p = Proxies::from_env_vars(vars(&[
            ("ALL_PROXY", "socks5h://p:1080"),
            ("HTTPS_PROXY", "socks5h://s:1"),
        ]))
        .unwrap();
        assert_eq!(p.for_target(true, "h").unwrap().to_string(), "socks5h://s:1");
        assert!(p.for_target(false, "h").is_none(), "ALL_PROXY is not read");
    }

    #[test]
    fn forwarded_credentials_only_for_http_proxies_that_apply() {
        let p = Proxies::from_env_vars(vars(&[("HTTP_PROXY", "http://u:pw@p:1"), ("NO_PROXY", "skip.test")]))
            .unwrap();
        assert_eq!(p.forward_authorization("api.test"), Some("Basic dTpwdw=="));
        assert_eq!(p.forward_authorization("skip.test"), None);
        let socks = Proxies::only(ProxyUrl::parse("socks5://u:pw@p:1").unwrap());
        assert_eq!(socks.forward_authorization("api.test"), None);
    }

    #[test]
    fn bad_env_proxy_names_the_variable_not_the_password() {
        let err = Proxies::from_env_vars(vars(&[("HTTPS_PROXY", "ftp://u:s3cret@p:1080")])).unwrap_err();
        assert!(err.contains("HTTPS_PROXY") && !err.contains("s3cret"), "{err}");
    }
}
