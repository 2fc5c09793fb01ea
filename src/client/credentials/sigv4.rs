//! AWS Signature Version 4 over the request as it will be sent: method, URL (query encoded
//! already), every header set so far (Content-Type, the action's own, webhook signatures), and
//! the SHA-256 of the body (never `UNSIGNED-PAYLOAD`). The canonical request and signature are
//! the `aws-sigv4` crate's (AWS's own implementation); this module only feeds it the request
//! and applies its headers, marked sensitive where they carry a credential.
use super::CredentialsError;
use crate::action::{ErrorKind, SigV4Credential};
use aws_sigv4::{
    http_request::{
        sign as sign_request, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest,
        SigningSettings, UriPathNormalizationMode,
    },
    sign::v4,
};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request};
use std::time::SystemTime;

/// How a service wants its canonical request: S3 hashes the payload into a header and takes
/// paths as written (single encoding, no normalisation), as AWS's SDKs sign for it.
pub fn settings_for(service: &str) -> SigningSettings {
    let mut settings = SigningSettings::default();
    if service == "s3" {
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    }
    settings
}

/// Signs `request` at `now` with the service's settings.
pub fn sign(
    request: &mut Request<Bytes>,
    credential: &SigV4Credential,
    now: SystemTime,
) -> Result<(), CredentialsError> {
    sign_with(request, credential, now, settings_for(&credential.service))
}

/// Signs `request` at `now`: adds X-Amz-Date, Authorization and (with temporary credentials)
/// X-Amz-Security-Token.
pub fn sign_with(
    request: &mut Request<Bytes>,
    credential: &SigV4Credential,
    now: SystemTime,
    settings: SigningSettings,
) -> Result<(), CredentialsError> {
    let invalid =
        |what: String| CredentialsError::new(ErrorKind::InvalidRequest, format!("aws_sigv4: {what}"));
    let identity = aws_credential_types::Credentials::new(
        credential.access_key_id.clone(),
        credential.secret_access_key.clone(),
        credential.session_token.clone(),
        None,
        "callout",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&credential.region)
        .name(&credential.service)
        .time(now)
        .settings(settings)
        .build()
        .map_err(|e| invalid(format!("signing parameters: {e}")))?
        .into();
    let mut headers = Vec::with_capacity(request.headers().len());
    for (name, value) in request.headers() {
        let value = value
            .to_str()
            .map_err(|_| invalid(format!("header {name} is not visible ASCII and cannot be signed")))?;
        headers.push((name.as_str(), value));
    }
    let uri = request.uri().to_string();
    let signable = SignableRequest::new(
        request.method().as_str(),
        uri,
        headers.into_iter(),
        SignableBody::Bytes(request.body()),
    )
    .map_err(|e| invalid(format!("the request cannot be signed: {e}")))?;
    let (instructions, _signature) =
        sign_request(signable, &params).map_err(|e| invalid(format!("signing failed: {e}")))?.into_parts();
    let (new_headers, new_query) = instructions.into_parts();
    if !new_query.is_empty() {
        return Err(invalid("the signature was to go in the query, which callout never asks for".into()));
    }
    for header in new_headers {
        let name = HeaderName::from_static(header.name());
        let mut value = HeaderValue::from_str(header.value())
            .map_err(|_| invalid(format!("{name} does not fit a header")))?;
        // Authorization and the session token are credentials: kept out of logs and HPACK
        // tables, and dropped by a cross-origin redirect.
        value.set_sensitive(
            header.sensitive() || name == http::header::AUTHORIZATION || name == "x-amz-security-token",
        );
        request
            .headers_mut()
            .try_insert(name, value)
            .map_err(|_| invalid("too many headers to add the signature".into()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credential(token: Option<&str>) -> SigV4Credential {
        SigV4Credential {
            region: "us-east-1".into(),
            service: "service".into(),
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: token.map(str::to_owned),
        }
    }

    /// 2015-08-30T12:36:00Z, the time of AWS's test suite.
    fn suite_time() -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_440_938_160)
    }

    #[test]
    fn the_session_token_and_authorization_are_sensitive() {
        let mut request = Request::new(Bytes::new());
        *request.uri_mut() = "https://example.amazonaws.com/".parse().unwrap();
        sign(&mut request, &credential(Some("tok")), suite_time()).unwrap();
        assert!(request.headers()["authorization"].is_sensitive());
        assert!(request.headers()["x-amz-security-token"].is_sensitive());
        assert_eq!(request.headers()["x-amz-date"], "20150830T123600Z");
    }

    #[test]
    fn s3_hashes_the_payload_into_a_header() {
        let mut request = Request::new(Bytes::from_static(b"hello"));
        *request.method_mut() = http::Method::PUT;
        *request.uri_mut() = "https://bucket.s3.amazonaws.com/a%20b".parse().unwrap();
        let mut c = credential(None);
        c.service = "s3".into();
        sign(&mut request, &c, suite_time()).unwrap();
        // SHA-256 of "hello": the payload is signed, never UNSIGNED-PAYLOAD.
        assert_eq!(
            request.headers()["x-amz-content-sha256"],
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
    }
}
