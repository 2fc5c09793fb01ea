//! Keeps an Execute reply's buffered body, and the memory budget it holds, until the reply has
//! been handed to the connection. tonic encodes a reply into its own buffer as soon as the
//! stream may send, and drops the message then; a caller reading slowly would leave those
//! encoded copies piling up outside the budget while new bodies take it.
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::{
    pin::Pin,
    task::{Context, Poll},
};

/// `inner`, holding `bytes` until it is done and dropped. hyper polls the body's last frame (the
/// gRPC trailers) only once the data before it found room in the connection's send window, so
/// the hold ends about when the reply went out.
pub fn held<B>(inner: B, bytes: Bytes) -> tonic::body::Body
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    tonic::body::Body::new(HeldBody { inner, _hold: bytes })
}

pin_project! {
    /// A response body and the bytes it keeps alive.
    struct HeldBody<B> {
        #[pin]
        inner: B,
        _hold: Bytes,
    }
}

impl<B: Body> Body for HeldBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
