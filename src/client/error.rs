//! Classifies a failed send into an error kind, once, by walking the cause chain; and says
//! whether the request may have reached the upstream (which decides if a POST may retry).
use super::connect::ConnectError;
use crate::action::ErrorKind;
use std::error::Error as StdError;

/// A send that produced no response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SendFailure {
    pub kind: ErrorKind,
    pub message: String,
    /// False when the request surely never left (no connection was made).
    pub sent: bool,
}

impl SendFailure {
    pub fn new(kind: ErrorKind, message: impl Into<String>, sent: bool) -> Self {
        Self { kind, message: message.into(), sent }
    }
}

/// Why the pooled client produced no response: hyper-util's pool failed, a request on one of
/// callout's own connections (`h1_pool`, `h2_pool`) failed, or a dial for one was already judged.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Pool(#[from] hyper_util::client::legacy::Error),
    #[error(transparent)]
    Conn(hyper::Error),
    #[error("{0}")]
    Judged(SendFailure),
}

pub(crate) fn classify(err: &SendError) -> SendFailure {
    match err {
        SendError::Pool(err) => {
            if let Some(connect) = find::<ConnectError>(err) {
                return SendFailure::new(connect.kind, connect.message.clone(), false);
            }
            if err.is_connect() {
                return SendFailure::new(ErrorKind::Connect, chain(err), false);
            }
            after_connect(err)
        }
        SendError::Conn(err) => after_connect(err),
        SendError::Judged(failure) => failure.clone(),
    }
}

/// An HTTP/2 handshake on a connection just made that failed: nothing was sent.
pub(crate) fn handshake_failure(err: &hyper::Error) -> SendFailure {
    match find_tls_error(err) {
        Some(tls) => {
            SendFailure::new(ErrorKind::Tls, format!("TLS failed after the handshake: {tls}"), false)
        }
        None => {
            SendFailure::new(ErrorKind::Connect, format!("HTTP/2 handshake failed: {}", chain(err)), false)
        }
    }
}

/// A failure once a connection was there: the request may have reached the upstream.
fn after_connect(err: &(dyn StdError + 'static)) -> SendFailure {
    if let Some(hyper_err) = find::<hyper::Error>(err) {
        if hyper_err.is_parse() || hyper_err.is_parse_status() || hyper_err.is_user() {
            return SendFailure::new(
                ErrorKind::Protocol,
                format!("invalid HTTP response: {}", chain(err)),
                true,
            );
        }
        if hyper_err.is_timeout() {
            return SendFailure::new(ErrorKind::Timeout, chain(err), true);
        }
    }
    // TLS 1.3 finishes the client's handshake before the server judges its certificate, so a
    // server refusing a client certificate (or the lack of one) shows up as an alert on the
    // first read, not in the connector.
    if let Some(tls) = find_tls_error(err) {
        return SendFailure::new(ErrorKind::Tls, format!("TLS failed after the handshake: {tls}"), true);
    }
    // Closed or reset before a response head: the connection broke, the request may have
    // arrived. CONNECT so idempotent requests retry; `sent` keeps POSTs from repeating.
    SendFailure::new(ErrorKind::Connect, format!("connection failed before a response: {}", chain(err)), true)
}

fn find<'a, E: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a E> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

/// A rustls error in the cause chain; tokio-rustls wraps it in an io::Error, whose `source()`
/// skips the wrapped error itself, so it is looked up with `get_ref`.
fn find_tls_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        if let Some(found) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

/// The messages of an error and its causes, joined, repeats skipped.
pub(crate) fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let msg = e.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = e.source();
    }
    out
}
