//! How an action reaches its upstream: per-action TLS options and proxy, validated. PEM is kept
//! as text once it is known to parse; the client builds its TLS configuration from it. Key
//! material and proxy credentials never appear in `Debug` output or error messages.
use base64::Engine as _;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use std::fmt;

/// Validated per-action TLS options. The default verifies with the server's trust roots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TlsOptions {
    /// Accept any server certificate (handshake signatures are still checked). Logged loudly.
    pub insecure_skip_verify: bool,
    /// Extra trusted CA certificates, PEM, besides the webpki roots and the server's CA file.
    pub ca_pem: Option<String>,
    /// Client certificate and key for mutual TLS.
    pub client_identity: Option<ClientIdentity>,
}

impl TlsOptions {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// A client certificate chain and its private key, both PEM.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ClientIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM CERTIFICATE block".into());
    }
    Ok(certs)
}

/// Checks that `pem` holds CA certificates usable as trust anchors. The description never
/// quotes the PEM.
pub(super) fn check_ca_certificates(pem: &str) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(pem)? {
        roots.add(cert).map_err(|e| format!("holds a certificate that cannot be trusted as a CA: {e}"))?;
    }
    Ok(())
}

/// Checks a client certificate chain and key: both parse, the key is of a supported type and
/// belongs to the certificate. Returns the field at fault and why; key bytes are never quoted.
pub(super) fn check_client_identity(cert_pem: &str, key_pem: &str) -> Result<(), (&'static str, String)> {
    let certs = certificates(cert_pem).map_err(|e| ("tls.client_cert_pem", e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
        let why = match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "holds no PEM private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)"
            }
            _ => "is not a valid PEM private key",
        };
        ("tls.client_key_pem", why.to_owned())
    })?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(certs, key, &provider).map(drop).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            ("tls.client_key_pem", "does not belong to the certificate in tls.client_cert_pem".to_owned())
        }
        _ => ("tls.client_key_pem", "is not a supported private key (RSA, ECDSA or Ed25519)".to_owned()),
    })
}

/// How callout talks to a proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyScheme {
    /// `http://`: CONNECT for https targets, absolute-form requests for http targets.
    Http,
    /// `https://`: as `http://`, over TLS to the proxy.
    Https,
    /// `socks5://`: callout resolves the target and hands the proxy an address.
    Socks5,
    /// `socks5h://`: the proxy resolves the target's name.
    Socks5h,
}

impl ProxyScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
            Self::Socks5 => "socks5",
            Self::Socks5h => "socks5h",
        }
    }

    /// True for the HTTP proxies (`http://`, `https://`), which speak CONNECT and forward
    /// plain-http requests.
    pub fn is_http(self) -> bool {
        matches!(self, Self::Http | Self::Https)
    }
}

/// A proxy: its scheme, where to connect, and the credentials of `user:pass@` when the URL
/// carried them (sent as Proxy-Authorization to an HTTP proxy, as SOCKS5 user/password
/// authentication to a SOCKS proxy). Displays as `scheme://host:port`, credentials left out.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ProxyUrl {
    scheme: ProxyScheme,
    host: String,
    port: u16,
    credentials: Option<(String, String)>,
    authorization: Option<String>,
}

/// Whether an http(s) URL has an authority as written: `//` and then a host. WHATWG parsing
/// (the url crate) reads `http:///x`, `http:/x`, `http:x` and `http:\\x` as host `x`; a
/// caller who wrote no host gets an error, not a request to whatever `x` resolves to. Other
/// strings are left to the parser.
pub(super) fn authority_written(raw: &str) -> bool {
    // The parser drops leading and trailing spaces and control characters; so does this check.
    let raw = raw.trim_matches(|c: char| c <= ' ');
    let Some((scheme, rest)) = raw.split_once(':') else {
        return true;
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return true;
    }
    match rest.strip_prefix("//") {
        Some(authority) => !authority.is_empty() && !authority.starts_with(['/', '\\', '?', '#']),
        None => false,
    }
}

impl ProxyUrl {
    /// Parses an `http://`, `https://`, `socks5://` or `socks5h://` URL with optional
    /// `user:pass@` and port (default 80, 443 and 1080). The error never echoes the URL: it may
    /// hold a password.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if !authority_written(raw) {
            return Err("has no host: write it after \"//\", as in http://HOST:PORT".into());
        }
        let url = url::Url::parse(raw.trim()).map_err(|e| format!("is not an absolute URL: {e}"))?;
        let scheme = match url.scheme() {
            "http" => ProxyScheme::Http,
            "https" => ProxyScheme::Https,
            "socks5" => ProxyScheme::Socks5,
            "socks5h" => ProxyScheme::Socks5h,
            other => {
                // A scheme is as long as the caller likes: quoted as an excerpt.
                let other = super::excerpt::excerpt(other, 32);
                return Err(format!(
                    "scheme {other:?} is not supported; use an http://, https://, socks5:// or socks5h:// proxy URL"
                ));
            }
        };
        let host = match url.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            // socks URLs are not "special" to the URL standard, so their names keep their case.
            Some(url::Host::Domain(name)) => name.to_ascii_lowercase(),
            Some(host) => host.to_string(),
            None => return Err("has no host".into()),
        };
        if host.is_empty() {
            return Err("has no host".into());
        }
        let port = url.port_or_known_default().unwrap_or(1080);
        let credentials = (!url.username().is_empty() || url.password().is_some()).then(|| {
            let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
            (decode(url.username()), url.password().map(decode).unwrap_or_default())
        });
        if scheme == ProxyScheme::Socks5 || scheme == ProxyScheme::Socks5h {
            // SOCKS5 user/password authentication carries each in one length byte (RFC 1929).
            if credentials.as_ref().is_some_and(|(user, pass)| user.len() > 255 || pass.len() > 255) {
                return Err("has a SOCKS5 user name or password longer than 255 bytes".into());
            }
        }
        let authorization = credentials.as_ref().map(|(user, pass)| {
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")))
        });
        Ok(Self { scheme, host, port, credentials, authorization })
    }

    pub fn scheme(&self) -> ProxyScheme {
        self.scheme
    }

    /// Host name or IP (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `Basic ...` when the URL carried credentials: the Proxy-Authorization of HTTP proxies.
    pub fn authorization(&self) -> Option<&str> {
        self.authorization.as_deref()
    }

    /// User and password when the URL carried them, decoded: SOCKS5 authentication.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials.as_ref().map(|(user, pass)| (user.as_str(), pass.as_str()))
    }

    /// The URL as it may be shown: `scheme://<redacted>@host:port` when it carried credentials.
    pub fn redacted(&self) -> String {
        match self.credentials {
            Some(_) => self.to_string().replacen("://", "://<redacted>@", 1),
            None => self.to_string(),
        }
    }
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = self.scheme.as_str();
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = if self.credentials.is_some() { " (with credentials)" } else { "" };
        write!(f, "ProxyUrl({self}{auth})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_url_keeps_credentials_out_of_sight() {
        let p = ProxyUrl::parse("http://us%20er:s3cret@proxy.test:3128/").unwrap();
        assert_eq!((p.host(), p.port()), ("proxy.test", 3128));
        assert_eq!(p.authorization(), Some("Basic dXMgZXI6czNjcmV0"));
        assert_eq!(p.to_string(), "http://proxy.test:3128");
        assert!(!format!("{p:?}").contains("s3cret"));
        assert_eq!(ProxyUrl::parse("http://[::1]").unwrap().to_string(), "http://[::1]:80");
    }

    #[test]
    fn proxy_url_schemes_and_default_ports() {
        for (raw, shown, scheme) in [
            ("https://p.test", "https://p.test:443", ProxyScheme::Https),
            ("socks5://p.test", "socks5://p.test:1080", ProxyScheme::Socks5),
            ("SOCKS5H://[::1]:9050", "socks5h://[::1]:9050", ProxyScheme::Socks5h),
        ] {
            let p = ProxyUrl::parse(raw).unwrap();
            assert_eq!((p.to_string().as_str(), p.scheme()), (shown, scheme), "{raw}");
        }
        let p = ProxyUrl::parse("socks5://us%40er:s3cret@p.test:1080").unwrap();
        assert_eq!(p.credentials(), Some(("us@er", "s3cret")));
        assert_eq!(p.redacted(), "socks5://<redacted>@p.test:1080");
        assert!(!format!("{p:?}").contains("s3cret"));
    }

    #[test]
    fn proxy_url_other_schemes_are_refused_without_echoing_the_password() {
        let long = format!("socks5://u:{}@p.test", "x".repeat(256));
        for bad in ["ftp://u:s3cret@p.test", "socks4://u:s3cret@p.test:1080", "p.test:3128", "", &long] {
            let err = ProxyUrl::parse(bad).unwrap_err();
            assert!(!err.contains("s3cret") && !err.contains("xxxx"), "{err}");
        }
    }

    #[test]
    fn pem_checks_name_the_problem() {
        assert!(check_ca_certificates("no pem here").is_err());
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        assert!(check_ca_certificates(cert).is_err());
        assert_eq!(check_client_identity(cert, cert).unwrap_err().0, "tls.client_key_pem");
        assert_eq!(check_client_identity("", "").unwrap_err().0, "tls.client_cert_pem");
        let debug = format!("{:?}", ClientIdentity { cert_pem: "c".into(), key_pem: "SECRET".into() });
        assert!(!debug.contains("SECRET"), "{debug}");
    }
}
