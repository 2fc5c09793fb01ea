//! Host names as every rule compares them: one normaliser (egress, NO_PROXY, `--resolve`,
//! destination keys, host patterns) and one label-boundary suffix matcher, so no two places
//! can disagree on whether `API.Example.com.` is `api.example.com`; and `Destination`, the
//! `host:port` every limit, breaker and metric keys an action by.
use url::Url;

/// A host as the rules see it: lower case, IPv6 without brackets, no trailing dots.
pub fn normalize(host: &str) -> String {
    // `]` and `.` trimmed together, so normalising twice gives the same name (`a.]..` once
    // left `a.` behind, and a second pass then changed it).
    host.trim().trim_start_matches('[').trim_end_matches([']', '.']).to_ascii_lowercase()
}

/// True when normalised `host` lies strictly below `domain` (`a.example.com` below
/// `example.com`), at a label boundary so `badexample.com` is not below `example.com`.
pub fn is_below(host: &str, domain: &str) -> bool {
    host.len() > domain.len() + 1
        && host.ends_with(domain)
        && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
}

/// True when normalised `host` is `domain` itself or lies below it.
pub fn is_within(host: &str, domain: &str) -> bool {
    host == domain || is_below(host, domain)
}

/// Where an action goes, as the limits key it: `host:port`, host lower-case without brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub key: String,
    host: String,
    port: u16,
}

impl Destination {
    pub fn of(url: &Url) -> Self {
        let host = normalize(url.host_str().unwrap_or_default());
        let port = url.port_or_known_default().unwrap_or(0);
        let key = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        Self { key, host, port }
    }

    /// The host, lower-case, without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_key_host_and_port() {
        let d = |u: &str| Destination::of(&Url::parse(u).unwrap()).key;
        assert_eq!(d("https://API.example.com/x"), "api.example.com:443");
        assert_eq!(d("http://example.com.:8080/"), "example.com:8080");
        assert_eq!(d("http://[::1]/"), "[::1]:80");
    }

    #[test]
    fn normalize_lowercases_and_strips_brackets_and_trailing_dots() {
        assert_eq!(normalize("API.Example.com."), "api.example.com");
        assert_eq!(normalize("[::1]"), "::1");
        assert_eq!(normalize("[FE80::1]"), "fe80::1");
        assert_eq!(normalize("::1"), "::1");
        assert_eq!(normalize(" h.test "), "h.test");
        assert_eq!(normalize("127.0.0.1"), "127.0.0.1");
        assert_eq!(normalize("h.test.."), "h.test");
        assert_eq!(normalize(""), "");
    }

    #[test]
    fn suffixes_match_at_label_boundaries_only() {
        assert!(is_below("a.example.com", "example.com"));
        assert!(is_below("a.b.example.com", "example.com"));
        assert!(!is_below("example.com", "example.com"));
        assert!(!is_below("badexample.com", "example.com"));
        assert!(!is_below(".example.com", "example.com"));
        assert!(!is_below("example.com.evil", "example.com"));
        assert!(is_within("example.com", "example.com"));
        assert!(is_within("x.localhost", "localhost"));
        assert!(!is_within("localhost.evil", "localhost"));
    }
}
