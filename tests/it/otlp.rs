//! OTLP span export (builds with `--features otlp`): the real binary exports its action and
//! attempt spans to a collector on loopback, joined to the caller's trace, and the upstream's
//! `traceparent` names callout's exported attempt span as its parent.
#![cfg(feature = "otlp")]
use crate::support::*;
use bytes::Bytes;
use callout::pb::http_action_service_client::HttpActionServiceClient;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// A fake OTLP/gRPC collector: answers every Export with an empty OK reply and keeps the
/// request bodies (protobuf, searched for raw bytes rather than decoded).
async fn collector() -> (String, Arc<Mutex<Vec<Bytes>>>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bodies: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let kept = bodies.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let kept = kept.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let kept = kept.clone();
                    async move {
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        kept.lock().unwrap().push(body);
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        let frames = vec![
                            Ok::<_, Infallible>(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))),
                            Ok(Frame::trailers(trailers)),
                        ];
                        let body = StreamBody::new(futures_stream(frames));
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(body)
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), bodies, task)
}

fn futures_stream<T>(items: Vec<T>) -> tokio_stream::Iter<std::vec::IntoIter<T>> {
    tokio_stream::iter(items)
}

#[tokio::test]
async fn spans_are_exported_joined_to_the_callers_trace_on_one_worker() {
    exports_spans_and_stops("1").await;
}

#[tokio::test]
async fn spans_are_exported_joined_to_the_callers_trace_on_two_workers() {
    exports_spans_and_stops("2").await;
}

/// On either scheduler (one worker is the current-thread one), spans reach the collector and
/// the flush at exit finishes.
async fn exports_spans_and_stops(workers: &str) {
    let (endpoint, bodies, _collector) = collector().await;
    let upstream = Upstream::fixed(200, "ok").await;
    let mut serve = ServeProcess::spawn(
        &["--worker-threads", workers],
        &[("CALLOUT_TRACING__OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .await;
    let mut client = HttpActionServiceClient::new(serve.channel().await);
    let mut call = tonic::Request::new(request("GET", &upstream.url("/")));
    call.metadata_mut().insert("traceparent", format!("00-{TRACE_ID}-00f067aa0ba902b7-01").parse().unwrap());
    client.execute(call).await.unwrap();

    let sent = upstream.seen()[0].header("traceparent").expect("traceparent sent upstream");
    let attempt_span = hex(sent.split('-').nth(2).unwrap());
    let (trace_id, parent) = (hex(TRACE_ID), hex("00f067aa0ba902b7"));
    let started = Instant::now();
    let exported = loop {
        let all: Vec<u8> = bodies.lock().unwrap().iter().flat_map(|b| b.to_vec()).collect();
        let has = |needle: &[u8]| all.windows(needle.len()).any(|w| w == needle);
        if has(&trace_id) && has(b"action") && has(b"attempt") && has(&attempt_span) && has(&parent) {
            break true;
        }
        if started.elapsed() > Duration::from_secs(15) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        exported,
        "the collector received the action and attempt spans of trace {TRACE_ID}:\n{}",
        serve.logs()
    );
    serve.terminate();
    let status = serve.exit_status(Duration::from_secs(15)).await;
    assert!(status.is_some_and(|s| s.success()), "callout exits after flushing spans:\n{}", serve.logs());
}
