//! The gRPC edge under hostile input: caller-sized collections capped with INVALID_ARGUMENT
//! (never a panic), violation lists that fit clients' metadata limits, deep JSON bodies whose
//! replies still decode, undecodable and oversized requests, URLs with no written host.
use crate::support::*;
use bytes::{Buf, BufMut, Bytes};
use callout::{
    exec::Executor,
    pb::{self, execute_http_action_request::Body, http_action_service_client::HttpActionServiceClient},
    server::{serve_with, Listener, ServerOptions},
};
use http::Response;
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
    Code,
};
use tonic_types::StatusExt;

/// Executes `req`, expecting INVALID_ARGUMENT with nothing sent to `upstream`.
async fn refused(upstream: &Upstream, sidecar: &Sidecar, req: pb::ExecuteHttpActionRequest) -> tonic::Status {
    let status = match sidecar.try_execute(req).await {
        Ok(resp) => panic!("accepted: {resp:?}"),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(upstream.hits(), 0, "sent although invalid");
    status
}

fn headers(n: usize, value: &str) -> Vec<pb::KeyValue> {
    (0..n).map(|i| kv(&format!("x-h-{i}"), value)).collect()
}

#[tokio::test]
async fn too_many_headers_are_invalid_argument_not_a_panic() {
    let upstream = Upstream::fixed(200, "must not be reached").await;
    let sidecar = Sidecar::start().await;
    // 24,576 distinct names is where http's HeaderMap panicked taking its capacity.
    for n in [1_001, 24_576, 30_000] {
        let req =
            pb::ExecuteHttpActionRequest { headers: headers(n, "v"), ..request("GET", &upstream.url("/")) };
        let status = refused(&upstream, &sidecar, req).await;
        assert_eq!(violated_fields(&status), ["headers"], "{n}");
        assert!(status.message().contains("at most 1000"), "{status:?}");
    }
    // Few headers, but more than 64 KiB of them.
    let req = pb::ExecuteHttpActionRequest {
        headers: headers(10, &"v".repeat(8_000)),
        ..request("GET", &upstream.url("/"))
    };
    let status = refused(&upstream, &sidecar, req).await;
    assert_eq!(violated_fields(&status), ["headers"]);
    assert!(status.message().contains("65536"), "{status:?}");
    // The server is still there, and 1,000 headers are an action (the upstream may refuse them).
    let req =
        pb::ExecuteHttpActionRequest { headers: headers(1_000, "v"), ..request("GET", &upstream.url("/")) };
    sidecar.execute(req).await;
}

#[tokio::test]
async fn other_caller_sized_lists_are_capped() {
    let upstream = Upstream::fixed(200, "must not be reached").await;
    let sidecar = Sidecar::start().await;
    let url = upstream.url("/");
    let query = pb::ExecuteHttpActionRequest {
        query: (0..1_001).map(|i| kv(&format!("q{i}"), "1")).collect(),
        ..request("GET", &url)
    };
    let form = pb::ExecuteHttpActionRequest {
        body: Some(Body::Form(pb::FormBody {
            fields: (0..10_001).map(|i| kv(&format!("f{i}"), "1")).collect(),
        })),
        ..request("POST", &url)
    };
    let messages = pb::ExecuteHttpActionRequest {
        error_messages: (0..1_001).map(|i| (format!("{i}"), "m".to_string())).collect(),
        ..request("GET", &url)
    };
    let errors = pb::ExecuteHttpActionRequest {
        retry: Some(Box::new(pb::RetryPolicy {
            max_attempts: 1,
            retry_on_errors: vec![pb::ErrorKind::Timeout as i32; 65],
            ..Default::default()
        })),
        ..request("GET", &url)
    };
    let retry_on_status = pb::ExecuteHttpActionRequest {
        retry: Some(Box::new(pb::RetryPolicy {
            max_attempts: 1,
            retry_on_status: "503,".repeat(300),
            ..Default::default()
        })),
        ..request("GET", &url)
    };
    for (req, field) in [
        (query, "query"),
        (form, "form.fields"),
        (messages, "error_messages"),
        (errors, "retry.retry_on_errors"),
        (retry_on_status, "retry.retry_on_status"),
    ] {
        let status = refused(&upstream, &sidecar, req).await;
        assert_eq!(violated_fields(&status), [field], "{status:?}");
    }
}

/// The status as sent: grpc-message percent-encoded, grpc-status-details-bin in base64.
fn wire_size(status: &tonic::Status) -> usize {
    let message: usize = status
        .message()
        .bytes()
        .map(|b| if (0x21..0x7f).contains(&b) && !b"\"#%<>?`{}".contains(&b) { 1 } else { 3 })
        .sum();
    message + status.details().len().div_ceil(3) * 4
}

#[tokio::test]
async fn big_violation_lists_fit_the_metadata_limit() {
    let upstream = Upstream::fixed(200, "must not be reached").await;
    let sidecar = Sidecar::start().await;
    let req = pb::ExecuteHttpActionRequest {
        headers: (0..300).map(|i| kv(&format!("bad name {i} {}", "é".repeat(50)), "v")).collect(),
        ..request("GET", &upstream.url("/"))
    };
    let status = refused(&upstream, &sidecar, req).await;
    let fields = violated_fields(&status);
    assert!(!fields.is_empty() && fields.len() <= 20, "{fields:?}");
    assert_eq!(fields[0], "headers[0].name");
    assert!(status.message().ends_with(&format!("and {} more", 300 - fields.len())), "{}", status.message());
    assert!(wire_size(&status) < 8 * 1024, "{} bytes", wire_size(&status));

    let req = pb::ExecuteHttpActionRequest {
        success_codes: "9".repeat(20_000),
        ..request("GET", &upstream.url("/"))
    };
    let status = refused(&upstream, &sidecar, req).await;
    assert_eq!(violated_fields(&status), ["success_codes"]);
    assert!(wire_size(&status) < 1024, "{status:?}");
    // Under the length cap, the bad item is quoted as an excerpt.
    let req = pb::ExecuteHttpActionRequest {
        success_codes: "ü".repeat(500),
        ..request("GET", &upstream.url("/"))
    };
    let status = refused(&upstream, &sidecar, req).await;
    assert_eq!(violated_fields(&status), ["success_codes"]);
    assert!(wire_size(&status) < 2048, "{} bytes: {status:?}", wire_size(&status));
    // A long unknown error_messages key is cut in the field path.
    let req = pb::ExecuteHttpActionRequest {
        error_messages: [("x".repeat(50_000), "m".to_string())].into(),
        ..request("GET", &upstream.url("/"))
    };
    let status = refused(&upstream, &sidecar, req).await;
    assert!(wire_size(&status) < 1024, "{} bytes", wire_size(&status));
}

/// JSON of `depth` nested arrays (`objects`: nested objects) around a number.
fn nested_json(depth: usize, objects: bool) -> String {
    if objects {
        format!("{}1{}", r#"{"k":"#.repeat(depth), "}".repeat(depth))
    } else {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    }
}

/// An upstream that answers with the request's body as JSON.
async fn raw_json_upstream() -> Upstream {
    Upstream::start(|seen| async move {
        Response::builder().header("content-type", "application/json").body(body(seen.body)).unwrap()
    })
    .await
}

#[tokio::test]
async fn deep_json_replies_still_decode() {
    let upstream = raw_json_upstream().await;
    let sidecar = Sidecar::start().await;
    for (depth, objects) in [
        (32, true),
        (32, false),
        (33, true),
        (40, false),
        (50, true),
        (50, false),
        (127, false),
        (128, false),
        (10_000, false),
    ] {
        let json = nested_json(depth, objects);
        let req = pb::ExecuteHttpActionRequest {
            body: Some(Body::Text(json.clone())),
            // Both views, to see which one a deep document keeps.
            reply_body: pb::ReplyBody::All as i32,
            ..request("POST", &upstream.url("/"))
        };
        // The tonic client decodes with prost's recursion limit of 100, as Python does.
        let reply = sidecar.try_execute(req.clone()).await.unwrap_or_else(|s| panic!("depth {depth}: {s:?}"));
        let response = reply.response.expect("response");
        assert_eq!(response.body_text.as_deref(), Some(json.as_str()), "depth {depth}");
        assert_eq!(response.body_json.is_some(), depth <= 32, "depth {depth}");
        let events = sidecar.stream(req).await.unwrap_or_else(|s| panic!("stream, depth {depth}: {s:?}"));
        let Some(pb::action_event::Event::Completed(done)) = events.last() else { panic!("{events:?}") };
        let response = done.result.as_ref().and_then(|r| r.response.as_ref()).expect("response");
        // The stream sends the body as chunks, with no JSON view: the reply decodes.
        assert_eq!(response.body_text, None, "stream, depth {depth}");
    }
}

/// Sends bytes as they are, as a gRPC message: what a buggy or hostile client may write.
#[derive(Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

async fn send_raw(channel: Channel, message: &[u8]) -> Result<Bytes, tonic::Status> {
    send_messages(channel, vec![Bytes::copy_from_slice(message)], &[]).await
}

#[tokio::test]
async fn invalid_utf8_is_invalid_argument_naming_the_field() {
    let upstream = Upstream::fixed(200, "must not be reached").await;
    let sidecar = Sidecar::start().await;
    let url = upstream.url("/");
    // method "GET" (field 2) and url (field 3), then the broken field.
    let method = [0x12, 3, b'G', b'E', b'T'];
    let mut prefix = method.to_vec();
    prefix.extend_from_slice(&[0x1a, url.len() as u8]);
    prefix.extend_from_slice(url.as_bytes());
    for (message, field) in [
        ([&method[..], &[0x1a, 2, b'h', 0xff]].concat(), "url"),
        ([&prefix[..], &[0x2a, 6, 0x0a, 1, b'x', 0x12, 1, 0xff]].concat(), "headers.value"),
        // prost names the oneof, not its member.
        ([&prefix[..], &[0x42, 2, 0xc3, 0x28]].concat(), "body"),
        // A KeyValue cut short: not a string problem, still the caller's.
        ([&prefix[..], &[0x2a, 5, 0x0a, 1]].concat(), ""),
    ] {
        let status = send_raw(sidecar.channel().await, &message).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        if field.is_empty() {
            continue;
        }
        let violations = status.get_details_bad_request().expect("BadRequest").field_violations;
        assert_eq!(violations[0].field, field, "{status:?}");
        assert!(violations[0].description.contains("UTF-8"), "{status:?}");
    }
    assert_eq!(upstream.hits(), 0);
    // The same bytes with valid UTF-8 are an action: the raw path itself works.
    let message = [&prefix[..], &[0x42, 2, b'h', b'i']].concat();
    send_raw(sidecar.channel().await, &message).await.unwrap();
    assert_eq!(upstream.hits(), 1);
}

/// Sends `messages` as they are on one Execute call, with `metadata`: a unary call carries
/// exactly one message, but a client can write none or several.
async fn send_messages(
    channel: Channel,
    messages: Vec<Bytes>,
    metadata: &[(&'static str, &'static str)],
) -> Result<Bytes, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/callout.v1.HttpActionService/Execute");
    let mut request = tonic::Request::new(tokio_stream::iter(messages));
    for (name, value) in metadata {
        request.metadata_mut().insert(*name, tonic::metadata::MetadataValue::from_static(value));
    }
    grpc.client_streaming(request, path, RawCodec).await.map(|r| r.into_inner())
}

#[tokio::test]
async fn execute_reads_one_uncompressed_message_as_tonic_does() {
    use prost::Message;
    let upstream = Upstream::fixed(200, "ok").await;
    let sidecar = Sidecar::start().await;
    let action = Bytes::from(request("GET", &upstream.url("/")).encode_to_vec());

    let status = send_messages(sidecar.channel().await, vec![], &[]).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert_eq!(status.message(), "Missing request message.");

    // No compression is enabled: refused before the message is read, naming what is accepted.
    let gzip = [("grpc-encoding", "gzip")];
    let status = send_messages(sidecar.channel().await, vec![action.clone()], &gzip).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert_eq!(status.message(), "Content is compressed with `gzip` which isn't supported");
    assert_eq!(status.metadata().get("grpc-accept-encoding").map(|v| v.to_str().unwrap()), Some("identity"));
    assert_eq!(upstream.hits(), 0);

    // `identity` is no compression; a second message is ignored, as tonic's unary path does.
    let identity = [("grpc-encoding", "identity")];
    for (messages, metadata) in
        [(vec![action.clone()], &identity[..]), (vec![action.clone(), action.clone()], &[])]
    {
        let reply = send_messages(sidecar.channel().await, messages, metadata).await.unwrap();
        let reply = pb::ExecuteHttpActionResponse::decode(reply).unwrap();
        assert_eq!(reply.outcome(), pb::Outcome::Succeeded, "{reply:?}");
    }
    assert_eq!(upstream.hits(), 2);
}

/// The real server with `options`, and a client to it.
async fn server_with(options: ServerOptions) -> (HttpActionServiceClient<Channel>, AbortOnDrop) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let executor = Executor::new(test_settings()).unwrap();
    let task = tokio::spawn(async move {
        serve_with(Listener::Tcp(listener), executor, options, std::future::pending()).await.unwrap();
    });
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    (HttpActionServiceClient::new(channel), AbortOnDrop(task))
}

fn with_text(url: &str, len: usize) -> pb::ExecuteHttpActionRequest {
    pb::ExecuteHttpActionRequest { body: Some(Body::Text("a".repeat(len))), ..request("POST", url) }
}

#[tokio::test]
async fn an_oversized_request_is_invalid_argument() {
    let upstream = Upstream::fixed(200, "ok").await;
    let url = upstream.url("/");
    let options = ServerOptions { max_request_bytes: 64 * 1024, ..ServerOptions::default() };
    let (client, _server) = server_with(options).await;
    for stream in [false, true] {
        let req = with_text(&url, 100 * 1024);
        let status = if stream {
            client.clone().execute_stream(req).await.map(|_| ()).unwrap_err()
        } else {
            client.clone().execute(req).await.map(|_| ()).unwrap_err()
        };
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("server.max_request_bytes"), "{status:?}");
    }
    assert_eq!(upstream.hits(), 0);
    client.clone().execute(with_text(&url, 60 * 1024)).await.unwrap();
    assert_eq!(upstream.hits(), 1);

    // The default is gRPC's usual 4 MiB.
    let sidecar = Sidecar::start().await;
    let status = sidecar.try_execute(with_text(&url, 5 << 20)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    sidecar.execute(with_text(&url, 3 << 20)).await;
}

#[tokio::test]
async fn the_max_request_bytes_flag_sets_the_limit() {
    let upstream = Upstream::fixed(200, "ok").await;
    let serve = ServeProcess::spawn(&["--max-request-bytes", "8192"], &[]).await;
    let mut client = HttpActionServiceClient::new(serve.channel().await);
    let status = client.execute(with_text(&upstream.url("/"), 10_000)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    client.execute(with_text(&upstream.url("/"), 4_000)).await.unwrap();
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn a_url_with_no_written_host_is_refused() {
    let upstream = Upstream::fixed(200, "must not be reached").await;
    let sidecar = Sidecar::start().await;
    // WHATWG parsing reads each of these as host 127.0.0.1 and the upstream's port.
    let host = upstream.addr.to_string();
    for url in [
        format!("http:///{host}/x"),
        format!("https:///{host}/x"),
        format!("HTTP:///{host}/x"),
        format!("  http:///{host}/x"),
        format!("http:/{host}/x"),
        format!("http:{host}/x"),
        format!("http:\\\\{host}/x"),
        format!("http:/\\{host}/x"),
        format!("http:/\t/{host}/x"),
    ] {
        let status = refused(&upstream, &sidecar, request("GET", &url)).await;
        assert_eq!(violated_fields(&status), ["url"], "{url}");
    }
    // An action's proxy the same: the upstream would have seen the request in absolute form.
    for proxy in [format!("http:///{host}"), format!("http:/{host}"), format!("http:{host}")] {
        let req = pb::ExecuteHttpActionRequest {
            proxy: Some(Box::new(pb::ProxyOptions { url: proxy.clone() })),
            ..request("GET", "http://example.invalid/")
        };
        let status = refused(&upstream, &sidecar, req).await;
        assert_eq!(violated_fields(&status), ["proxy.url"], "{proxy}");
    }
    // Written properly, the same host is reached.
    sidecar.execute(request("GET", &format!("http://{host}/x"))).await;
    assert_eq!(upstream.hits(), 1);
}

/// Data segments this end of a TCP connection has received (Linux `TCP_INFO`).
fn data_segments_in(fd: std::os::fd::RawFd) -> u32 {
    // SAFETY: `tcp_info` is plain data, and getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let done = unsafe {
        libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &raw mut len)
    };
    assert_eq!(done, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_data_segs_in
}

/// Replies on a busy connection share writes: h2 flushes after every DATA frame of 256 bytes or
/// more, which was one write (and one segment on the caller's socket) per reply.
#[tokio::test]
async fn replies_on_a_busy_connection_share_the_callers_segments() {
    use std::{os::fd::AsRawFd, sync::Arc, time::Duration};
    use tokio::sync::Barrier;
    const CALLERS: usize = 32;
    const EACH: usize = 10;
    let serve = ServeProcess::spawn(&["--worker-threads", "1"], &[]).await;
    // Replies share writes when they are ready together. How often they are depends on how the
    // two processes are scheduled (on one core, callout often takes each upstream answer as it
    // comes and writes its reply alone), so each round of 32 is made ready together: once all 32
    // requests are at the upstream, callout is stopped (SIGSTOP) while the upstream answers them
    // all, and let go 50 ms later to find 32 answers at once.
    let pid = libc::pid_t::try_from(serve.pid()).unwrap();
    let (arrived, answering) = (Arc::new(Barrier::new(CALLERS)), Arc::new(Barrier::new(CALLERS)));
    let upstream = Upstream::start(move |seen| {
        let (arrived, answering) = (arrived.clone(), answering.clone());
        async move {
            if seen.target == "/busy" {
                if arrived.wait().await.is_leader() {
                    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP");
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0, "SIGCONT");
                    });
                }
                answering.wait().await;
            }
            json(200, serde_json::json!({ "filler": "x".repeat(1024) }))
        }
    })
    .await;
    let tcp = tokio::net::TcpStream::connect(&serve.grpc).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let fd = tcp.as_raw_fd();
    let (sender, connection) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    let calls = |path: &str, n: usize| {
        let action = request("GET", &upstream.url(path));
        let (mut sender, grpc) = (sender.clone(), serve.grpc.clone());
        async move {
            for _ in 0..n {
                let reply = sender.send_request(raw_execute(&grpc, &action)).await.unwrap();
                assert_eq!(reply.status(), 200);
                let body = http_body_util::BodyExt::collect(reply.into_body()).await.unwrap().to_bytes();
                assert!(body.len() > 1024, "{} bytes", body.len());
            }
        }
    };
    // A lone call first: the connection's settings are exchanged before counting.
    calls("/warm", 1).await;
    let before = data_segments_in(fd);
    let callers: Vec<_> = (0..CALLERS).map(|_| tokio::spawn(calls("/busy", EACH))).collect();
    for caller in callers {
        caller.await.unwrap();
    }
    let segments = data_segments_in(fd) - before;
    let replies = (CALLERS * EACH) as u32;
    assert!(segments < replies / 2, "{replies} replies came in {segments} segments");
}
