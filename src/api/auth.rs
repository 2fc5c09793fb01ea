//! Listener protection: an optional static bearer token that every action call must carry as
//! `authorization: Bearer <token>` metadata. Health and reflection stay open for probes and
//! grpcurl; an unauthenticated action call runs nothing.
use std::sync::Arc;
use tonic::{service::Interceptor, Request, Status};

/// Checks the bearer token of each call; lets everything through when no token is set.
#[derive(Clone, Default)]
pub struct BearerAuth {
    token: Option<Arc<[u8]>>,
}

impl BearerAuth {
    /// `token` of `None` (or empty) turns the check off.
    pub fn new(token: Option<&str>) -> Self {
        Self { token: token.filter(|t| !t.is_empty()).map(|t| Arc::from(t.as_bytes())) }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.token else {
            return Ok(request);
        };
        let Some(value) = request.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "this server requires a bearer token: send metadata \"authorization: Bearer <token>\"",
            ));
        };
        let presented = value.as_bytes();
        let token = presented
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
            .map(|_| presented[7..].trim_ascii());
        match token {
            Some(token) if constant_time_eq(token, expected) => Ok(request),
            // Never echo what was presented: it may be a real credential for something else.
            _ => Err(Status::unauthenticated("the bearer token is not valid")),
        }
    }
}

/// Compares without stopping at the first difference, so timing does not leak the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(auth: &mut BearerAuth, header: Option<&str>) -> Result<(), tonic::Code> {
        let mut request = Request::new(());
        if let Some(h) = header {
            request.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        auth.call(request).map(|_| ()).map_err(|s| s.code())
    }

    #[test]
    fn checks_the_bearer_token() {
        let mut auth = BearerAuth::new(Some("s3cret"));
        assert_eq!(call(&mut auth, Some("Bearer s3cret")), Ok(()));
        assert_eq!(call(&mut auth, Some("bearer s3cret")), Ok(()));
        assert_eq!(call(&mut auth, Some("Bearer s3cre")), Err(tonic::Code::Unauthenticated));
        assert_eq!(call(&mut auth, Some("Basic s3cret")), Err(tonic::Code::Unauthenticated));
        assert_eq!(call(&mut auth, Some("Bearer")), Err(tonic::Code::Unauthenticated));
        assert_eq!(call(&mut auth, None), Err(tonic::Code::Unauthenticated));
        assert_eq!(call(&mut BearerAuth::new(None), None), Ok(()));
        assert_eq!(call(&mut BearerAuth::new(Some("")), None), Ok(()));
    }
}
