//! The action service as the server routes it: Execute is decoded, run and answered here, with
//! tonic's own decoder and encoder, and every other method goes to the generated server.
//!
//! Why not tonic's `Grpc::unary`: its future (and the generated one around the call) keeps the
//! HTTP request, the decoding state and the decoded message reserved for the whole action,
//! ~2.9 KB for every action in flight (issue 17: memory in flight). Here the request is decoded
//! in a future of its own, freed before the action starts; the call then holds the action's
//! own state alone.
use super::{codec::ProtoCodec, reply_hold, service::Reply, HttpActionService};
use crate::pb::{self, http_action_service_server::HttpActionServiceServer};
use bytes::Bytes;
use http::{header::CONTENT_TYPE, HeaderValue};
use std::{
    convert::Infallible,
    future::Future,
    sync::Arc,
    task::{Context, Poll},
};
use tonic::{
    body::Body,
    codec::{Codec, EncodeBody, SingleMessageCompressionOverride, Streaming},
    codegen::{BoxFuture, Service, StdError},
    metadata::MetadataValue,
    server::NamedService,
    Request, Status,
};
use tonic_prost::ProstEncoder;

/// The method this module answers itself.
const EXECUTE: &str = "/callout.v1.HttpActionService/Execute";

/// `callout.v1.HttpActionService` as the router serves it.
#[derive(Clone)]
pub struct ActionRoutes {
    service: Arc<HttpActionService>,
    generated: HttpActionServiceServer<HttpActionService>,
    /// A request message larger than this is refused (`server.max_request_bytes`).
    max_request_bytes: usize,
}

impl ActionRoutes {
    pub fn new(service: HttpActionService, max_request_bytes: usize) -> Self {
        let service = Arc::new(service);
        let generated = HttpActionServiceServer::from_arc(Arc::clone(&service))
            .max_decoding_message_size(max_request_bytes);
        Self { service, generated, max_request_bytes }
    }
}

impl NamedService for ActionRoutes {
    const NAME: &'static str = <HttpActionServiceServer<HttpActionService> as NamedService>::NAME;
}

impl<B> Service<http::Request<B>> for ActionRoutes
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<http::Response<Body>, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != EXECUTE {
            return self.generated.call(request);
        }
        let decoding = Box::pin(decode(request, self.max_request_bytes));
        Box::pin(execute(Arc::clone(&self.service), decoding))
    }
}

/// Execute, from the decoded request (`decoding`, boxed: its state is freed before the action
/// runs) to the HTTP response.
async fn execute(
    service: Arc<HttpActionService>,
    decoding: impl Future<Output = Result<Request<pb::ExecuteHttpActionRequest>, Status>>,
) -> Result<http::Response<Body>, Infallible> {
    // Early returns, so the action's future is reserved once, where it is awaited: a `Result`
    // holding it (or a `match` arm's temporary) would reserve it a second time.
    let request = match decoding.await {
        Ok(request) => request,
        Err(status) => return Ok(status.into_http()),
    };
    let execute = match service.start_execute(request) {
        Ok(execute) => execute,
        Err(refused) => return Ok(refused.into_http()),
    };
    Ok(encode(execute.await))
}

/// The request's one message, as tonic's unary path decodes it: identity encoding only (this
/// server enables no compression), at most `max_bytes`, trailers (rare from a caller) merged
/// into the metadata.
async fn decode<B>(
    request: http::Request<B>,
    max_bytes: usize,
) -> Result<Request<pb::ExecuteHttpActionRequest>, Status>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    if let Some(encoding) = request.headers().get("grpc-encoding").filter(|e| *e != "identity") {
        return Err(compressed(encoding));
    }
    let (mut parts, body) = request.into_parts();
    let decoder =
        ProtoCodec::<pb::ExecuteHttpActionResponse, pb::ExecuteHttpActionRequest>::default().decoder();
    let mut stream = Streaming::new_request(decoder, body, None, Some(max_bytes));
    let message = stream.message().await?.ok_or_else(|| Status::internal("Missing request message."))?;
    if let Some(trailers) = stream.trailers().await? {
        parts.headers.extend(trailers.into_headers());
    }
    Ok(Request::from_http(http::Request::from_parts(parts, message)))
}

/// UNIMPLEMENTED for a compressed request, in tonic's words, naming what this server accepts.
fn compressed(encoding: &HeaderValue) -> Status {
    let name = String::from_utf8_lossy(encoding.as_bytes());
    let mut status =
        Status::unimplemented(format!("Content is compressed with `{name}` which isn't supported"));
    status.metadata_mut().insert("grpc-accept-encoding", MetadataValue::from_static("identity"));
    status
}

/// The reply as tonic's unary path encodes it (no compression), its body's bytes held until it
/// went out; an error as a trailers-only response.
fn encode(reply: Result<Reply, Status>) -> http::Response<Body> {
    let Reply { message, held } = match reply {
        Ok(reply) => reply,
        Err(status) => return status.into_http(),
    };
    let source = tokio_stream::once(Ok(message));
    let override_ = SingleMessageCompressionOverride::default();
    let encoded = EncodeBody::new_server(ProstEncoder::default(), source, None, override_, None);
    let body = match held {
        Some(bytes) => reply_hold::held(encoded, bytes),
        None => Body::new(encoded),
    };
    let mut response = http::Response::new(body);
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::Draining,
        exec::{ExecSettings, Executor},
    };

    #[tokio::test]
    async fn an_execute_call_waiting_for_its_action_reserves_little() {
        fn future_size<F: Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let executor = Executor::new(ExecSettings::default()).unwrap();
        let service = Arc::new(HttpActionService::new(executor, Draining::default(), 1));
        let request = http::Request::new(Body::empty());
        let decoding = Box::pin(decode(request, 1 << 20));
        let call = execute(service, decoding);
        // Every Execute in flight holds this future (boxed) where tonic's unary path held three:
        // 2,240, 648 and 1,400 bytes. 1,432 bytes on x86_64 today, the action's own state most of
        // it; 2,840 when the action's future sat in a `Result` as well as where it is awaited.
        assert!(future_size(&call) <= 1536, "{}", future_size(&call));
    }
}
