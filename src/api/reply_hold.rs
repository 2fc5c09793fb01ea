//! Keeps an Execute reply's buffered body, and the memory budget it holds, until the reply has
//! been handed to the connection. tonic encodes a reply into its own buffer as soon as the
//! stream may send, and drops the message then; a caller reading slowly would leave those
//! encoded copies piling up outside the budget while new bodies take it.
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use std::{
    pin::Pin,
    task::{Context, Poll},
};

/// A handle on a reply's body bytes, put in the response's extensions by the service and moved
/// into the response body by `hold_until_sent`.
#[derive(Clone)]
pub struct HeldUntilSent(pub Bytes);

/// The server layer's function (`tower::util::MapResponseLayer`): a response carrying a
/// `HeldUntilSent` gets a body that holds it until the body is done and dropped. hyper polls
/// the body's last frame (the gRPC trailers) only once the data before it found room in the
/// connection's send window, so the hold ends about when the reply went out.
pub fn hold_until_sent(mut response: http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> {
    match response.extensions_mut().remove::<HeldUntilSent>() {
        Some(hold) => response.map(|inner| tonic::body::Body::new(HeldBody { inner, _hold: hold.0 })),
        None => response,
    }
}

/// A response body and the bytes it keeps alive.
struct HeldBody {
    inner: tonic::body::Body,
    _hold: Bytes,
}

impl Body for HeldBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
