//! Whole actions through the gRPC edge, as throughput: an in-process callout server on
//! 127.0.0.1:0, the generated tonic client, and a loopback hyper upstream answering 1 KiB of
//! JSON, all on one tokio runtime (two workers). Each iteration is a burst of `conc` actions at
//! once (`Throughput::Elements(conc)`), so criterion reports actions per second beside the time
//! of a burst. Execute, ExecuteStream and ExecuteBatch (one stream of `conc` actions).
//!
//! `cargo bench --bench end_to_end`; `cargo test --benches` runs each once as a smoke test.
use bytes::Bytes;
use callout::{
    exec::{ExecSettings, Executor},
    pb::{self, http_action_service_client::HttpActionServiceClient},
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http_body_util::Full;
use tonic::transport::Channel;

/// The upstream's answer: a JSON document of exactly 1 KiB (as the load generator's
/// `/bytes/1024`), so callout also builds the reply's JSON and text views.
fn document() -> Bytes {
    let prefix = "{\"data\":\"";
    Bytes::from(format!("{prefix}{}\"}}", "x".repeat(1024 - prefix.len() - 2)))
}

/// A loopback HTTP/1.1 upstream on the current runtime; returns its URL.
async fn upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("loopback bind");
    let addr = listener.local_addr().expect("bound");
    let body = document();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_| {
                    let body = body.clone();
                    async move {
                        let mut resp = http::Response::new(Full::new(body));
                        resp.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    format!("http://{addr}/bytes/1024")
}

/// The callout server on a loopback port (metrics recorded as by default) and a client of it.
async fn sidecar() -> HttpActionServiceClient<Channel> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("loopback bind");
    let addr = listener.local_addr().expect("bound");
    let mut settings = ExecSettings::default();
    settings.egress.allow_private_networks = true;
    let executor = Executor::new(settings).expect("an executor");
    tokio::spawn(async move {
        let _ = callout::server::serve(listener, executor, std::future::pending()).await;
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("a URI")
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("the server accepts");
    HttpActionServiceClient::new(channel)
}

fn request(url: &str) -> pb::ExecuteHttpActionRequest {
    pb::ExecuteHttpActionRequest {
        method: "GET".into(),
        url: url.into(),
        retry: Some(Box::new(pb::RetryPolicy { max_attempts: 1, ..Default::default() })),
        ..Default::default()
    }
}

async fn execute(client: &HttpActionServiceClient<Channel>, req: pb::ExecuteHttpActionRequest) {
    let reply = client.clone().execute(req).await.expect("Execute answers").into_inner();
    assert_eq!(reply.outcome(), pb::Outcome::Succeeded, "{:?}", reply.error);
}

async fn execute_stream(client: &HttpActionServiceClient<Channel>, req: pb::ExecuteHttpActionRequest) {
    let mut events = client.clone().execute_stream(req).await.expect("ExecuteStream answers").into_inner();
    let mut outcome = None;
    while let Some(event) = events.message().await.expect("a stream event") {
        if let Some(pb::action_event::Event::Completed(done)) = event.event {
            outcome = done.result.map(|r| r.outcome());
        }
    }
    assert_eq!(outcome, Some(pb::Outcome::Succeeded));
}

/// One ExecuteBatch stream carrying `conc` actions; every reply read.
async fn execute_batch(client: &HttpActionServiceClient<Channel>, url: &str, conc: usize) {
    let actions: Vec<_> = (0..conc).map(|_| request(url)).collect();
    let mut replies = client
        .clone()
        .execute_batch(tokio_stream::iter(actions))
        .await
        .expect("ExecuteBatch answers")
        .into_inner();
    let mut succeeded = 0;
    while let Some(reply) = replies.message().await.expect("the batch stream goes on") {
        assert_eq!(reply.outcome(), pb::Outcome::Succeeded);
        succeeded += 1;
    }
    assert_eq!(succeeded, conc);
}

/// Runs `conc` copies of `call` at once on the runtime and waits for all of them.
async fn burst<F, Fut>(conc: usize, call: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..conc {
        calls.spawn(call());
    }
    while let Some(done) = calls.join_next().await {
        done.expect("a call did not panic");
    }
}

fn end_to_end(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let (client, url) = runtime.block_on(async { (sidecar().await, upstream().await) });
    let mut group = c.benchmark_group("end_to_end");
    for conc in [1usize, 64] {
        group.throughput(Throughput::Elements(conc as u64));
        group.bench_with_input(BenchmarkId::new("execute", conc), &conc, |b, &conc| {
            b.iter(|| {
                runtime.block_on(burst(conc, || {
                    let (client, req) = (client.clone(), request(&url));
                    async move { execute(&client, req).await }
                }))
            })
        });
        group.bench_with_input(BenchmarkId::new("execute_stream", conc), &conc, |b, &conc| {
            b.iter(|| {
                runtime.block_on(burst(conc, || {
                    let (client, req) = (client.clone(), request(&url));
                    async move { execute_stream(&client, req).await }
                }))
            })
        });
        // One call carrying `conc` actions: its actions/s reads beside Execute's.
        group.bench_with_input(BenchmarkId::new("execute_batch", conc), &conc, |b, &conc| {
            b.iter(|| runtime.block_on(execute_batch(&client, &url, conc)))
        });
    }
    group.finish();
}

criterion_group!(benches, end_to_end);
criterion_main!(benches);
