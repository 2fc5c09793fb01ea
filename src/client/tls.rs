//! The TLS client configuration: webpki roots plus the server's extra CA certificates, ALPN
//! offering h2 and http/1.1 (h2 only when enabled).
use rustls::{
    pki_types::{pem::PemObject, CertificateDer},
    ClientConfig, RootCertStore,
};
use std::sync::Arc;

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("extra CA PEM: {0}")]
    CaPem(String),
    #[error("extra CA PEM holds no certificate")]
    NoCertificate,
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A client configuration trusting the webpki roots and every certificate in `extra_ca_pem`.
pub fn client_config(extra_ca_pem: Option<&str>, http2: bool) -> Result<ClientConfig, TlsConfigError> {
    let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(pem) = extra_ca_pem {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| TlsConfigError::CaPem(e.to_string()))?;
            roots.add(cert).map_err(|e| TlsConfigError::CaPem(e.to_string()))?;
            added += 1;
        }
        if added == 0 {
            return Err(TlsConfigError::NoCertificate);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols =
        if http2 { vec![b"h2".to_vec(), b"http/1.1".to_vec()] } else { vec![b"http/1.1".to_vec()] };
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_pem_without_certificates() {
        assert!(matches!(client_config(Some("nothing here"), true), Err(TlsConfigError::NoCertificate)));
        assert!(client_config(None, false).is_ok_and(|c| c.alpn_protocols == [b"http/1.1".to_vec()]));
    }
}
