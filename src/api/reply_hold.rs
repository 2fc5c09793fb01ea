//! Keeps an Execute reply's buffered body, and the memory budget it holds, until the reply has
//! been handed to the connection. tonic encodes a reply into its own buffer as soon as the
//! stream may send, and drops the message then; a caller reading slowly would leave those
//! encoded copies piling up outside the budget while new bodies take it.
//!
//! hyper (1.12) polls a response body's next frame as soon as the last one had any room in the
//! stream's window, and hands the whole frame to h2, which buffers what the window does not take.
//! So the encoded reply goes out here in frames of `FRAME` bytes: the next is polled only once the
//! caller's window took the last, and the trailers (the body's end, which drops the hold) only
//! once all but the last frame went out.
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::{
    pin::Pin,
    task::{ready, Context, Poll},
};

/// The size of the frames the reply is handed over in: HTTP/2's default largest frame.
const FRAME: usize = 16 * 1024;

/// `inner`, in frames of at most `FRAME` bytes, holding `bytes` until it is done and dropped.
pub fn held<B>(inner: B, bytes: Bytes) -> tonic::body::Body
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    tonic::body::Body::new(HeldBody { inner, rest: Bytes::new(), _hold: bytes })
}

pin_project! {
    /// A response body and the bytes it keeps alive.
    struct HeldBody<B> {
        #[pin]
        inner: B,
        // What is left of the inner body's last data frame.
        rest: Bytes,
        _hold: Bytes,
    }
}

impl<B: Body<Data = Bytes>> Body for HeldBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let me = self.project();
        if me.rest.is_empty() {
            match ready!(me.inner.poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => *me.rest = data,
                    Err(other) => return Poll::Ready(Some(Ok(other))),
                },
                end => return Poll::Ready(end),
            }
        }
        let len = me.rest.len().min(FRAME);
        Poll::Ready(Some(Ok(Frame::data(me.rest.split_to(len)))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_reply_goes_out_in_frames_and_ends_as_it_was() {
        let data = Bytes::from(vec![7u8; 2 * FRAME + 5]);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let inner = http_body_util::StreamBody::new(tokio_stream::iter([
            Ok::<_, std::convert::Infallible>(Frame::data(data.clone())),
            Ok(Frame::trailers(trailers.clone())),
        ]));
        let mut body = HeldBody { inner, rest: Bytes::new(), _hold: Bytes::new() };
        let mut sizes = Vec::new();
        let mut seen = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame.unwrap().into_data() {
                Ok(chunk) => {
                    sizes.push(chunk.len());
                    seen.extend_from_slice(&chunk);
                }
                Err(frame) => assert_eq!(frame.into_trailers().unwrap(), trailers),
            }
        }
        assert_eq!(sizes, [FRAME, FRAME, 5]);
        assert_eq!(seen, data);
    }
}
