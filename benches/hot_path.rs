//! Benchmarks of the per-action hot path outside the network: validating an action, building
//! the hyper request, matching success codes, converting an outcome to the proto reply, and
//! turning a received response (head and ~1 KiB JSON body) into that reply, JSON view included.
//!
//! `cargo bench --bench hot_path`; `cargo test --benches` runs each once as a smoke test.
use bytes::Bytes;
use callout::{
    action::{
        ActionInput, AttemptRecord, AttemptTiming, BodyInput, HttpAction, OnFailure, Outcome, ResponseData,
        ResponseHead, StatusSpec,
    },
    api::convert,
    client::{
        redirect::Hop,
        response::{head_of, views},
    },
};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use http_body_util::{BodyExt, Full};
use std::{
    hint::black_box,
    time::{Duration, SystemTime},
};

/// What a workflow engine typically sends: a POST with a few headers, a JSON body and query.
fn realistic_input() -> ActionInput {
    ActionInput {
        action_id: "wf-42/step-7/try-1".into(),
        method: "POST".into(),
        url: "https://api.example.com/v1/orders?source=workflow".into(),
        query: vec![("tenant".into(), "acme corp".into()), ("dry_run".into(), "false".into())],
        headers: vec![
            ("Authorization".into(), "Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc".into()),
            ("Idempotency-Key".into(), "9b2f6c1e-4d1a-4c55-9d0e-1f0b5e8a7c21".into()),
            ("Accept".into(), "application/json".into()),
        ],
        body: BodyInput::Json(
            r#"{"order":{"id":1234,"items":[{"sku":"A-1","qty":2},{"sku":"B-7","qty":1}],"note":"rush"}}"#
                .into(),
        ),
        success_codes: "200-299,304".into(),
        on_failure: OnFailure::Continue,
        error_messages: vec![("404".into(), "no such order".into()), ("5xx".into(), "shop is down".into())],
        ..ActionInput::default()
    }
}

/// A JSON body of about 1 KiB: an order with line items.
fn json_body() -> Bytes {
    let mut items = Vec::new();
    loop {
        let body = serde_json::json!({ "order": 1234, "status": "accepted", "items": items }).to_string();
        if body.len() >= 1024 {
            return Bytes::from(body);
        }
        let i = items.len();
        items.push(serde_json::json!({ "id": i, "sku": format!("SKU-{i:04}"), "qty": i % 3 + 1 }));
    }
}

fn outcome() -> Outcome {
    let body = json_body();
    let body_json = serde_json::from_slice(&body).ok();
    let timing = AttemptTiming {
        dns: Duration::from_micros(120),
        connect: Duration::from_micros(350),
        tls: Duration::from_millis(4),
        first_byte: Some(Duration::from_millis(18)),
        total: Duration::from_millis(19),
        reused_connection: false,
    };
    Outcome {
        action_id: "wf-42/step-7/try-1".into(),
        succeeded: true,
        proceed: true,
        error: None,
        response: Some(ResponseData {
            head: ResponseHead {
                status: 200,
                reason: "OK".into(),
                version: "HTTP/1.1",
                headers: vec![
                    ("content-type".into(), "application/json".into()),
                    ("content-length".into(), body.len().to_string()),
                    ("date".into(), "Wed, 25 Nov 2026 06:00:00 GMT".into()),
                ],
            },
            body_text: Some(String::from_utf8_lossy(&body).into_owned()),
            body,
            body_json,
            truncated: false,
            extracted: Vec::new(),
        }),
        attempts: vec![AttemptRecord {
            number: 1,
            status: Some(200),
            error: None,
            timing,
            remote_addr: Some("93.184.215.14:443".parse().unwrap()),
            backoff: None,
            poll: false,
            page: 0,
        }],
        started_at: SystemTime::now(),
        total: Duration::from_millis(19),
        // The default: the reply carries the JSON view alone.
        reply_body: callout::action::ReplyBody::Auto,
        extracted: Vec::new(),
        condition_retry: false,
        poll_due: None,
        items: Vec::new(),
        pages: Vec::new(),
    }
}

fn validate(c: &mut Criterion) {
    let input = realistic_input();
    HttpAction::from_input(input.clone()).expect("the benchmark's action is valid");
    c.bench_function("validate_action", |b| {
        b.iter_batched(
            || input.clone(),
            |input| HttpAction::from_input(black_box(input)),
            BatchSize::SmallInput,
        )
    });
}

fn request(c: &mut Criterion) {
    let action = HttpAction::from_input(realistic_input()).unwrap();
    let hop = Hop {
        method: action.method().clone(),
        url: action.url().clone(),
        headers: action.headers().clone(),
        body: action.body().clone(),
    };
    hop.request().expect("the benchmark's request builds");
    c.bench_function("build_request", |b| b.iter(|| black_box(&hop).request()));
}

fn success_codes(c: &mut Criterion) {
    let spec = StatusSpec::parse("200-299,304").unwrap();
    let statuses: [u16; 6] = [200, 201, 204, 304, 404, 503];
    let mut group = c.benchmark_group("success_codes");
    group.throughput(Throughput::Elements(statuses.len() as u64));
    group.bench_function("contains", |b| {
        b.iter(|| statuses.iter().filter(|&&s| black_box(&spec).contains(black_box(s))).count())
    });
    group.finish();
}

fn reply(c: &mut Criterion) {
    let outcome = outcome();
    assert!(convert::outcome(outcome.clone()).response.unwrap().body_json.is_some());
    let mut group = c.benchmark_group("convert");
    group.throughput(Throughput::Bytes(outcome.response.as_ref().unwrap().body.len() as u64));
    group.bench_function("outcome_1k_json", |b| {
        b.iter_batched(|| outcome.clone(), |o| convert::outcome(black_box(o)), BatchSize::SmallInput)
    });
    group.finish();
}

/// A received response as hyper hands it over: the head, and the body in one frame.
fn received(body: &Bytes) -> http::Response<Full<Bytes>> {
    http::Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .header("date", "Wed, 25 Nov 2026 06:00:00 GMT")
        .body(Full::new(body.clone()))
        .unwrap()
}

/// What the executor does with a response it received, up to the proto reply: the head as
/// the domain sees it, the body read to its end, its JSON and text views, the outcome, and
/// the conversion. (The executor reads through `CappedBody`, which needs hyper's `Incoming`;
/// here the body is a ready buffer, so this measures the CPU work, not the socket.)
fn response_to_reply(
    body: &Bytes,
    template: &Outcome,
    rt: &tokio::runtime::Runtime,
) -> callout::pb::ExecuteHttpActionResponse {
    let response = received(body);
    let head = head_of(&response);
    let body = rt.block_on(response.into_body().collect()).unwrap().to_bytes();
    let (body_json, body_text) = views(&head, &body);
    let mut outcome = template.clone();
    outcome.response =
        Some(ResponseData { head, body, body_json, body_text, truncated: false, extracted: Vec::new() });
    convert::outcome(outcome)
}

fn read_and_convert(c: &mut Criterion) {
    let body = json_body();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    // Everything but the response, made once (the response is what is measured).
    let template = Outcome { response: None, ..outcome() };
    let reply = response_to_reply(&body, &template, &rt);
    assert!(reply.response.as_ref().unwrap().body_json.is_some(), "the body parses as JSON");
    let mut group = c.benchmark_group("response");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("views_1k_json", |b| {
        let head = head_of(&received(&body));
        b.iter(|| views(black_box(&head), black_box(&body)))
    });
    group.bench_function("to_reply_1k_json", |b| {
        b.iter(|| response_to_reply(black_box(&body), &template, &rt))
    });
    group.finish();
}

criterion_group!(hot_path, validate, request, success_codes, reply, read_and_convert);
criterion_main!(hot_path);
