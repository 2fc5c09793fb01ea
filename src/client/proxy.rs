//! Which proxy a connection goes through, and the CONNECT tunnel for https targets. The
//! server's proxies come from `--proxy` or, read once at start, HTTPS_PROXY / HTTP_PROXY /
//! NO_PROXY; an action's own `proxy.url` replaces them for that action. Proxy credentials only
//! ever travel in Proxy-Authorization; messages show the proxy as `http://host:port`.
use super::host;
use crate::action::ProxyUrl;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Hosts that bypass the proxy (NO_PROXY): a comma list of host names, domain suffixes
/// (`example.com` and `.example.com` both match `example.com` and `api.example.com`), IP
/// addresses, or `*` for all. Ports in entries are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct NoProxy {
    all: bool,
    hosts: Vec<String>,
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
                // host:port (a bare IPv6 address has more than one colon and is kept whole)
                None if entry.matches(':').count() == 1 => entry.split(':').next().unwrap_or_default(),
                None => entry,
            };
            let host = host::normalize(host.trim_start_matches("*.").trim_start_matches('.'));
            if !host.is_empty() {
                no_proxy.hosts.push(host);
            }
        }
        no_proxy
    }

    /// True when `host` is listed itself or lies under a listed domain (at a dot boundary, so
    /// `example.com` does not match `badexample.com`).
    pub fn matches(&self, host: &str) -> bool {
        if self.all {
            return true;
        }
        let host = host::normalize(host);
        self.hosts.iter().any(|entry| host::is_within(&host, entry))
    }
}

/// The proxies of one client: per target scheme, with NO_PROXY exceptions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Proxies {
    pub http: Option<ProxyUrl>,
    pub https: Option<ProxyUrl>,
    pub no_proxy: NoProxy,
    /// The proxy came from an action, not the operator: its own address must pass the egress
    /// policy like any destination (else a caller could point it at a metadata service).
    pub chosen_by_caller: bool,
}

impl Proxies {
    /// One proxy for every target, no exceptions: an action's own `proxy.url`.
    pub fn only(proxy: ProxyUrl) -> Self {
        Self {
            http: Some(proxy.clone()),
            https: Some(proxy),
            no_proxy: NoProxy::default(),
            chosen_by_caller: true,
        }
    }

    /// The proxy for a target, or `None` to connect directly.
    pub fn for_target(&self, https: bool, host: &str) -> Option<&ProxyUrl> {
        let proxy = if https { self.https.as_ref() } else { self.http.as_ref() };
        proxy.filter(|_| !self.no_proxy.matches(host))
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
        Ok(Self {
            http: proxy("HTTP_PROXY")?,
            https: proxy("HTTPS_PROXY")?,
            no_proxy: read("NO_PROXY").map(|(_, v)| NoProxy::parse(&v)).unwrap_or_default(),
            chosen_by_caller: false,
        })
    }

    /// The process environment, read once at start.
    pub fn from_env() -> Result<Self, String> {
        Self::from_env_vars(|name| std::env::var(name).ok())
    }
}

/// Why a CONNECT tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("proxy {proxy} answered CONNECT with {status}{hint}")]
    Refused { proxy: String, status: u16, hint: &'static str },
    #[error("proxy {proxy} sent an invalid answer to CONNECT")]
    Invalid { proxy: String },
    #[error("proxy {proxy} closed the connection during CONNECT")]
    Closed { proxy: String },
    #[error("CONNECT through proxy {proxy} failed: {source}")]
    Io { proxy: String, source: std::io::Error },
}

/// The largest CONNECT answer head read; proxies answer with a few short lines.
const MAX_HEAD: usize = 16 * 1024;

/// Asks `proxy` over `io` for a tunnel to `host:port` and reads its answer. On success the
/// stream carries the target's bytes from here on.
pub async fn tunnel<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    proxy: &ProxyUrl,
    host: &str,
    port: u16,
) -> Result<(), TunnelError> {
    let name = proxy.to_string();
    let authority = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(auth) = proxy.authorization() {
        head.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    head.push_str("\r\n");
    let io_err = |source| TunnelError::Io { proxy: name.clone(), source };
    io.write_all(head.as_bytes()).await.map_err(io_err)?;
    io.flush().await.map_err(io_err)?;

    // Read byte-wise up to the blank line, so no byte of the tunnel is consumed here.
    let mut buf = Vec::with_capacity(256);
    while !buf.ends_with(b"\r\n\r\n") {
        if buf.len() >= MAX_HEAD {
            return Err(TunnelError::Invalid { proxy: name });
        }
        let byte = io.read_u8().await.map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => TunnelError::Closed { proxy: name.clone() },
            _ => io_err(e),
        })?;
        buf.push(byte);
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let status = match response.parse(&buf) {
        Ok(httparse::Status::Complete(_)) => response.code.unwrap_or_default(),
        _ => return Err(TunnelError::Invalid { proxy: name }),
    };
    if (200..300).contains(&status) {
        return Ok(());
    }
    let hint = match status {
        407 => " (proxy authentication required)",
        _ => "",
    };
    Err(TunnelError::Refused { proxy: name, status, hint })
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

    #[test]
    fn no_proxy_matches_hosts_and_suffixes_at_dot_boundaries() {
        let np = NoProxy::parse(" localhost, .internal.test,example.com:8080, 10.0.0.1, [::1]:80 ,");
        for host in [
            "localhost",
            "a.internal.test",
            "internal.test",
            "example.com",
            "API.Example.com",
            "10.0.0.1",
            "[::1]",
            "::1",
        ] {
            assert!(np.matches(host), "{host}");
        }
        for host in ["badexample.com", "example.com.evil", "10.0.0.10", "internal.test.evil", "other"] {
            assert!(!np.matches(host), "{host}");
        }
        assert!(NoProxy::parse("*").matches("anything.test"));
        assert!(!NoProxy::parse("").matches("anything.test"));
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
        assert_eq!(p.http.unwrap().host(), "upper");
        assert_eq!(Proxies::from_env_vars(vars(&[])).unwrap(), Proxies::default());
    }

    #[test]
    fn bad_env_proxy_names_the_variable_not_the_password() {
        let err = Proxies::from_env_vars(vars(&[("HTTPS_PROXY", "socks5://u:s3cret@p:1080")])).unwrap_err();
        assert!(err.contains("HTTPS_PROXY") && !err.contains("s3cret"), "{err}");
    }
}
