//! Host patterns of server config (`api.example.com`, `*.example.com:443`, `*`), matched
//! against an action's destination `host:port`.
use super::host;
use std::{fmt, str::FromStr};

/// Which hosts a pattern names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPart {
    /// `*`: every host.
    Any,
    /// `*.example.com`: any host below `example.com` (not `example.com` itself).
    Below(String),
    /// `api.example.com`: that host only.
    Exact(String),
}

/// A host pattern with an optional port: `*.example.com`, `api.example.com:8443`, `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    host: HostPart,
    port: Option<u16>,
    text: String,
}

/// Why a host pattern does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("host pattern {pattern:?}: {reason}")]
pub struct HostPatternError {
    pattern: String,
    reason: &'static str,
}

impl FromStr for HostPattern {
    type Err = HostPatternError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let err = |reason| HostPatternError { pattern: raw.to_owned(), reason };
        let text = raw.trim().to_ascii_lowercase();
        // A bracketed IPv6 literal carries colons of its own; the port follows the bracket.
        let (host, port) = match text.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') && (!host.contains(':') || host.ends_with(']')) => {
                (host, Some(port.parse::<u16>().map_err(|_| err("the port is not a number 0-65535"))?))
            }
            _ => (text.as_str(), None),
        };
        let host = if host == "*" {
            HostPart::Any
        } else if let Some(domain) = host.strip_prefix("*.") {
            // A trailing dot names the same host (`example.com.`).
            let domain = domain.trim_end_matches('.');
            if domain.is_empty() || domain.contains('*') {
                return Err(err("a wildcard stands only as the first label, as in *.example.com"));
            }
            HostPart::Below(domain.to_owned())
        } else if host.trim_end_matches('.').is_empty() {
            return Err(err("the host is empty"));
        } else if host.contains('*') {
            return Err(err("a wildcard stands only as the first label, as in *.example.com"));
        } else {
            HostPart::Exact(host::normalize(host))
        };
        Ok(Self { host, port, text })
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl HostPattern {
    /// Whether `host` (lower case, no brackets, no trailing dot) on `port` matches.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        match &self.host {
            HostPart::Any => true,
            HostPart::Exact(name) => name == host,
            HostPart::Below(domain) => host::is_below(host, domain),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> HostPattern {
        s.parse().unwrap()
    }

    #[test]
    fn exact_wildcard_and_any() {
        assert!(p("api.example.com").matches("api.example.com", 443));
        assert!(!p("api.example.com").matches("x.api.example.com", 443));
        assert!(p("*.example.com").matches("a.b.example.com", 80));
        assert!(!p("*.example.com").matches("example.com", 80));
        assert!(!p("*.example.com").matches("badexample.com", 80));
        assert!(p("*").matches("anything", 1));
        assert!(p("API.Example.com.").matches("api.example.com", 1));
    }

    #[test]
    fn ports_and_ipv6() {
        assert!(p("127.0.0.1:8080").matches("127.0.0.1", 8080));
        assert!(!p("127.0.0.1:8080").matches("127.0.0.1", 8081));
        assert!(p("[::1]:443").matches("::1", 443));
        assert!(p("[::1]").matches("::1", 80));
        assert!(p("*:9000").matches("h", 9000));
    }

    #[test]
    fn rejects_bad_patterns() {
        for bad in ["", ".", "a.*.com", "*.", "host:port", "host:70000", "**.a"] {
            assert!(bad.parse::<HostPattern>().is_err(), "{bad}");
        }
    }
}
