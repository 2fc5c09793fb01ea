//! The TLS client configuration: webpki roots plus the server's and the action's extra CA
//! certificates, an optional client certificate (mutual TLS), ALPN offering h2 and http/1.1 (h2
//! only when enabled), and the explicit opt-out from certificate verification.
use crate::action::TlsOptions;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::sync::Arc;

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("extra CA PEM: {0}")]
    CaPem(String),
    #[error("extra CA PEM holds no certificate")]
    NoCertificate,
    #[error("client certificate: {0}")]
    ClientIdentity(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn add_pem(roots: &mut RootCertStore, pem: &str) -> Result<(), TlsConfigError> {
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| TlsConfigError::CaPem(e.to_string()))?;
        roots.add(cert).map_err(|e| TlsConfigError::CaPem(e.to_string()))?;
        added += 1;
    }
    if added == 0 {
        return Err(TlsConfigError::NoCertificate);
    }
    Ok(())
}

/// A client configuration trusting the webpki roots, every certificate in `server_ca_pem` (the
/// server's `--ca-file`) and the action's `ca_pem`, presenting the action's client certificate.
pub fn client_config(
    server_ca_pem: Option<&str>,
    http2: bool,
    action: &TlsOptions,
) -> Result<ClientConfig, TlsConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder =
        ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = if action.insecure_skip_verify {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
    } else {
        let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        for pem in [server_ca_pem, action.ca_pem.as_deref()].into_iter().flatten() {
            add_pem(&mut roots, pem)?;
        }
        builder.with_root_certificates(roots)
    };
    let mut config = match &action.client_identity {
        None => builder.with_no_client_auth(),
        Some(identity) => {
            let certs = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TlsConfigError::ClientIdentity(format!("certificate PEM: {e}")))?;
            // The key's parse error is not passed on: it could quote key material.
            let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
                .map_err(|_| TlsConfigError::ClientIdentity("the private key PEM does not parse".into()))?;
            builder.with_client_auth_cert(certs, key)?
        }
    };
    config.alpn_protocols =
        if http2 { vec![b"h2".to_vec(), b"http/1.1".to_vec()] } else { vec![b"http/1.1".to_vec()] };
    Ok(config)
}

/// `insecure_skip_verify`: any certificate chain and name is accepted, but the handshake
/// signatures are still verified with the provider's algorithms, so the peer must at least
/// hold the key of the certificate it shows.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

/// What the handshake-signature checks take and return (named so each fits one line).
type Signed = DigitallySignedStruct;
type Verified = Result<HandshakeSignatureValid, rustls::Error>;

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, msg: &[u8], cert: &CertificateDer<'_>, dss: &Signed) -> Verified {
        verify_tls12_signature(msg, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, msg: &[u8], cert: &CertificateDer<'_>, dss: &Signed) -> Verified {
        verify_tls13_signature(msg, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_pem_without_certificates() {
        let none = TlsOptions::default();
        assert!(matches!(
            client_config(Some("nothing here"), true, &none),
            Err(TlsConfigError::NoCertificate)
        ));
        assert!(client_config(None, false, &none).is_ok_and(|c| c.alpn_protocols == [b"http/1.1".to_vec()]));
        let action = TlsOptions { ca_pem: Some("nothing".into()), ..TlsOptions::default() };
        assert!(matches!(client_config(None, true, &action), Err(TlsConfigError::NoCertificate)));
    }
}
