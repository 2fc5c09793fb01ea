//! ExecuteBatch: many actions on one stream against loopback upstreams. Replies matched by
//! action_id as they finish, a malformed or duplicate action answered on its own (nothing sent),
//! a full queue answered RATE_LIMITED, the per-stream bound, flow control against a caller that
//! stops reading, cancellation, the drain, the stream's deadline, and an oversized message.
use crate::support::*;
use bytes::Bytes;
use callout::{
    exec::{ExecSettings, Executor},
    pb::{self, http_action_service_client::HttpActionServiceClient},
    server::{serve_with, Listener, ServerOptions},
};
use http::Response;
use http_body_util::BodyExt;
use hyper::body::Frame;
use std::{
    collections::{HashMap, HashSet},
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{transport::Channel, Code};

/// The reply buffer of a batch stream (src/api/batch.rs REPLY_BUFFER).
const REPLY_BUFFER: usize = 16;

/// The real server with `batch_max_in_flight = bound`, stopped (drained) when the returned
/// sender fires; the handle ends when the server has stopped.
struct Server {
    client: HttpActionServiceClient<Channel>,
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(bound: usize) -> Self {
        Self::start_with(bound, test_settings()).await
    }

    async fn start_with(bound: usize, settings: ExecSettings) -> Self {
        let options = ServerOptions { batch_max_in_flight: bound, ..ServerOptions::default() };
        Self::start_with_options(options, settings).await
    }

    async fn start_with_options(options: ServerOptions, settings: ExecSettings) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let executor = Executor::new(settings).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            serve_with(Listener::Tcp(listener), executor, options, shutdown).await.unwrap();
        });
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        Self { client: HttpActionServiceClient::new(channel), addr, stop: Some(stop), task }
    }

    /// Opens a batch fed by the returned sender (the caller's side closes when it is dropped).
    async fn open(
        &self,
    ) -> (mpsc::Sender<pb::ExecuteHttpActionRequest>, tonic::Streaming<pb::ExecuteHttpActionResponse>) {
        let (tx, rx) = mpsc::channel(1024);
        let replies = self.client.clone().execute_batch(ReceiverStream::new(rx)).await.unwrap().into_inner();
        (tx, replies)
    }

    fn drain(&mut self) {
        let _ = self.stop.take().map(|stop| stop.send(()));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn action(id: &str, url: &str) -> pb::ExecuteHttpActionRequest {
    pb::ExecuteHttpActionRequest { action_id: id.into(), ..request("GET", url) }
}

/// Sends `actions`, closes the caller's side and reads every reply until the stream ends.
async fn batch(
    client: &HttpActionServiceClient<Channel>,
    actions: Vec<pb::ExecuteHttpActionRequest>,
) -> Result<Vec<pb::ExecuteHttpActionResponse>, tonic::Status> {
    let mut replies = client.clone().execute_batch(tokio_stream::iter(actions)).await?.into_inner();
    let mut out = Vec::new();
    while let Some(reply) = replies.message().await? {
        out.push(reply);
    }
    Ok(out)
}

fn by_id(replies: Vec<pb::ExecuteHttpActionResponse>) -> HashMap<String, pb::ExecuteHttpActionResponse> {
    let n = replies.len();
    let map: HashMap<_, _> = replies.into_iter().map(|r| (r.action_id.clone(), r)).collect();
    assert_eq!(map.len(), n, "one reply per action_id");
    map
}

/// Answers with the request's path as its body, after `/slow` sleeps 500 ms.
async fn paths_upstream() -> Upstream {
    Upstream::start(|seen| async move {
        if seen.target.starts_with("/slow") {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Response::builder().status(200).body(body(seen.target.clone())).unwrap()
    })
    .await
}

fn body_text(reply: &pb::ExecuteHttpActionResponse) -> String {
    let response = reply.response.as_ref().expect("a response");
    match &response.body_text {
        Some(text) => text.clone(),
        None => String::from_utf8_lossy(&response.body).into_owned(),
    }
}

#[tokio::test]
async fn replies_come_as_actions_finish_matched_by_action_id() {
    let upstream = paths_upstream().await;
    let server = Server::start(64).await;
    let mut actions: Vec<_> = (0..20)
        .map(|i| {
            let path = if i % 2 == 0 { format!("/slow/{i}") } else { format!("/fast/{i}") };
            action(&format!("id-{i}"), &upstream.url(&path))
        })
        .collect();
    // No action_id: one is generated, as Execute does.
    actions.push(request("GET", &upstream.url("/fast/anonymous")));
    let replies = batch(&server.client, actions).await.unwrap();
    assert_eq!(replies.len(), 21);
    assert!(body_text(&replies[0]).starts_with("/fast"), "a fast action answers first: {:?}", replies[0]);
    let last_fast = replies.iter().rposition(|r| body_text(r).starts_with("/fast")).unwrap();
    let first_slow = replies.iter().position(|r| body_text(r).starts_with("/slow")).unwrap();
    assert!(last_fast < first_slow, "replies go out as actions finish, not in request order");
    let replies = by_id(replies);
    for i in 0..20 {
        let reply = &replies[&format!("id-{i}")];
        assert_eq!(reply.outcome(), pb::Outcome::Succeeded, "{reply:?}");
        assert!(body_text(reply).ends_with(&format!("/{i}")), "{reply:?}");
    }
    let anonymous: Vec<_> = replies.keys().filter(|id| !id.starts_with("id-")).collect();
    assert_eq!(anonymous.len(), 1, "{anonymous:?}");
    assert_eq!(anonymous[0].len(), 36, "a generated UUID: {anonymous:?}");
    assert_eq!(upstream.hits(), 21);
}

#[tokio::test]
async fn a_malformed_action_gets_its_own_reply_and_the_stream_goes_on() {
    let upstream = paths_upstream().await;
    let server = Server::start(64).await;
    let malformed = pb::ExecuteHttpActionRequest {
        action_id: "bad".into(),
        method: "BREW".into(),
        url: "not a url".into(),
        ..Default::default()
    };
    let bad_id =
        pb::ExecuteHttpActionRequest { action_id: "x\ny".into(), ..request("GET", &upstream.url("/id")) };
    let actions = vec![
        action("first", &upstream.url("/slow/first")),
        malformed,
        bad_id,
        action("last", &upstream.url("/fast/last")),
    ];
    let replies = by_id(batch(&server.client, actions).await.unwrap());
    assert_eq!(replies.len(), 4, "{replies:?}");
    for id in ["first", "last"] {
        assert_eq!(replies[id].outcome(), pb::Outcome::Succeeded, "{:?}", replies[id]);
    }
    let bad = &replies["bad"];
    assert_eq!(bad.outcome(), pb::Outcome::Failed, "{bad:?}");
    assert_eq!(error_kind(bad), pb::ErrorKind::InvalidRequest, "{bad:?}");
    let message = &bad.error.as_ref().unwrap().message;
    assert!(message.starts_with("invalid action: "), "Execute's INVALID_ARGUMENT text: {message}");
    assert!(message.contains("url") && message.contains("method"), "{message}");
    assert!(bad.attempts.is_empty() && bad.response.is_none(), "{bad:?}");
    // An action_id validation refuses cannot be echoed: its reply has a generated id.
    let generated: Vec<_> =
        replies.iter().filter(|(id, _)| !["first", "last", "bad"].contains(&id.as_str())).collect();
    assert_eq!(generated.len(), 1, "{generated:?}");
    let (_, refused) = generated[0];
    assert_eq!(error_kind(refused), pb::ErrorKind::InvalidRequest);
    assert!(refused.error.as_ref().unwrap().message.contains("action_id"), "{refused:?}");
    let targets: HashSet<String> = upstream.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(
        targets,
        HashSet::from(["/slow/first", "/fast/last"].map(String::from)),
        "nothing sent for either"
    );
}

#[tokio::test]
async fn a_duplicate_of_a_running_action_id_is_refused() {
    let upstream = paths_upstream().await;
    let server = Server::start(64).await;
    let (tx, mut replies) = server.open().await;
    tx.send(action("twice", &upstream.url("/slow/one"))).await.unwrap();
    tx.send(action("twice", &upstream.url("/fast/two"))).await.unwrap();
    let refused = replies.message().await.unwrap().unwrap();
    assert_eq!((refused.action_id.as_str(), error_kind(&refused)), ("twice", pb::ErrorKind::InvalidRequest));
    let message = &refused.error.as_ref().unwrap().message;
    assert!(message.contains("action_id") && message.contains("still running"), "{message}");
    let ran = replies.message().await.unwrap().unwrap();
    assert_eq!((ran.action_id.as_str(), ran.outcome()), ("twice", pb::Outcome::Succeeded));
    // Finished, its id is free again.
    tx.send(action("twice", &upstream.url("/fast/three"))).await.unwrap();
    let again = replies.message().await.unwrap().unwrap();
    assert_eq!((again.outcome(), body_text(&again).as_str()), (pb::Outcome::Succeeded, "/fast/three"));
    drop(tx);
    assert!(replies.message().await.unwrap().is_none(), "the stream ends OK once the caller closed its side");
    let targets: Vec<String> = upstream.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/slow/one", "/fast/three"]);
}

#[tokio::test]
async fn a_full_queue_answers_rate_limited_and_the_stream_goes_on() {
    let upstream = paths_upstream().await;
    let mut settings = test_settings();
    settings.limits.max_in_flight = 1;
    settings.limits.max_queued = 0;
    let server = Server::start_with(64, settings).await;
    let (tx, mut replies) = server.open().await;
    tx.send(action("runs", &upstream.url("/slow/runs"))).await.unwrap();
    while upstream.hits() < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tx.send(action("refused", &upstream.url("/fast/refused"))).await.unwrap();
    let refused = replies.message().await.unwrap().unwrap();
    assert_eq!(refused.action_id, "refused");
    assert_eq!(error_kind(&refused), pb::ErrorKind::RateLimited, "{refused:?}");
    let runs = replies.message().await.unwrap().unwrap();
    assert_eq!((runs.action_id.as_str(), runs.outcome()), ("runs", pb::Outcome::Succeeded));
    tx.send(action("later", &upstream.url("/fast/later"))).await.unwrap();
    let later = replies.message().await.unwrap().unwrap();
    assert_eq!((later.action_id.as_str(), later.outcome()), ("later", pb::Outcome::Succeeded));
    assert_eq!(upstream.hits(), 2, "the refused action sent nothing");
}

/// Counts requests in progress and the most seen at once.
#[derive(Default)]
struct Concurrency {
    now: AtomicUsize,
    most: AtomicUsize,
}

#[tokio::test]
async fn at_most_batch_max_in_flight_actions_run_at_once() {
    let seen = Arc::new(Concurrency::default());
    let counted = seen.clone();
    let upstream = Upstream::start(move |_| {
        let counted = counted.clone();
        async move {
            let now = counted.now.fetch_add(1, Ordering::SeqCst) + 1;
            counted.most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(40)).await;
            counted.now.fetch_sub(1, Ordering::SeqCst);
            text(200, "ok")
        }
    })
    .await;
    let server = Server::start(3).await;
    let actions = (0..30).map(|i| action(&format!("b{i}"), &upstream.url("/"))).collect();
    let replies = by_id(batch(&server.client, actions).await.unwrap());
    assert_eq!(replies.len(), 30);
    assert!(replies.values().all(|r| r.outcome() == pb::Outcome::Succeeded));
    assert_eq!(seen.most.load(Ordering::SeqCst), 3, "the bound is reached and never passed");
}

#[tokio::test]
async fn a_caller_that_stops_reading_stops_callout_reading() {
    const BOUND: usize = 4;
    const BODY: usize = 16 * 1024;
    let upstream =
        Upstream::start(|_| async { Response::builder().status(200).body(body(vec![b'x'; BODY])).unwrap() })
            .await;
    let server = Server::start(BOUND).await;
    // A caller whose HTTP/2 receive window is small: a few replies fill it.
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(64 * 1024)
        .connect()
        .await
        .unwrap();
    let mut client = HttpActionServiceClient::new(channel);
    let n = 200;
    let actions: Vec<_> = (0..n).map(|i| action(&format!("c{i}"), &upstream.url("/"))).collect();
    let mut replies = client.execute_batch(tokio_stream::iter(actions)).await.unwrap().into_inner();

    // Reading nothing: callout runs what fits and then stops reading actions.
    let mut hits = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = upstream.hits();
        if now == hits && now > 0 {
            break;
        }
        hits = now;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stalled = upstream.hits();
    // Running (or finished and waiting to send): BOUND; buffered replies: REPLY_BUFFER; in the
    // caller's 64 KiB window and tonic's encode buffer (32 KiB): a few 16 KiB replies more.
    let most = BOUND + REPLY_BUFFER + 8;
    assert!((BOUND..=most).contains(&stalled), "{stalled} actions sent for a caller that read none");

    // Reading again, every action is answered.
    let mut ids = HashSet::new();
    while let Some(reply) = replies.message().await.unwrap() {
        assert_eq!(reply.outcome(), pb::Outcome::Succeeded, "{reply:?}");
        ids.insert(reply.action_id);
    }
    assert_eq!(ids.len(), n);
    assert_eq!(upstream.hits(), n);
}

/// A body that sends a byte every 10 ms forever and counts its drops (the upstream's server
/// drops it when its client, callout, closes the connection).
struct Trickle {
    tick: Pin<Box<tokio::time::Sleep>>,
    dropped: Arc<AtomicUsize>,
}

impl hyper::body::Body for Trickle {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.tick.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let next = tokio::time::Instant::now() + Duration::from_millis(10);
        self.tick.as_mut().reset(next);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b".")))))
    }
}

impl Drop for Trickle {
    fn drop(&mut self) {
        self.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn the_caller_going_away_cancels_its_running_actions() {
    let dropped = Arc::new(AtomicUsize::new(0));
    let counted = dropped.clone();
    let upstream = Upstream::start(move |_| {
        let trickle =
            Trickle { tick: Box::pin(tokio::time::sleep(Duration::ZERO)), dropped: counted.clone() };
        async move { Response::builder().status(200).body(trickle.boxed()).unwrap() }
    })
    .await;
    let server = Server::start(64).await;
    let (tx, replies) = server.open().await;
    for i in 0..3 {
        tx.send(action(&format!("d{i}"), &upstream.url("/trickle"))).await.unwrap();
    }
    while upstream.hits() < 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop((tx, replies));
    let deadline = Instant::now() + Duration::from_secs(3);
    while dropped.load(Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "the upstream requests are still open after the caller left");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The server goes on serving.
    let next = paths_upstream().await;
    let replies = batch(&server.client, vec![action("after", &next.url("/fast"))]).await.unwrap();
    assert_eq!(replies[0].outcome(), pb::Outcome::Succeeded);
}

#[tokio::test]
async fn the_drain_ends_a_batch_unavailable_after_its_running_actions_replied() {
    let upstream = paths_upstream().await;
    let mut server = Server::start(64).await;
    let (tx, mut replies) = server.open().await;
    for i in 0..3 {
        tx.send(action(&format!("e{i}"), &upstream.url(&format!("/slow/{i}")))).await.unwrap();
    }
    while upstream.hits() < 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.drain();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Sent during the drain: not run.
    tx.send(action("late", &upstream.url("/fast/late"))).await.unwrap();
    let refused =
        server.client.clone().execute_batch(tokio_stream::iter(Vec::new())).await.map(|_| ()).unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "a new batch is refused while draining: {refused:?}");

    let mut ids = HashSet::new();
    let end = loop {
        match replies.message().await {
            Ok(Some(reply)) => {
                assert_eq!(reply.outcome(), pb::Outcome::Succeeded, "running actions finish: {reply:?}");
                ids.insert(reply.action_id);
            }
            Ok(None) => panic!("the stream must say why it ended"),
            Err(status) => break status,
        }
    };
    assert_eq!(ids, HashSet::from(["e0", "e1", "e2"].map(String::from)));
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    assert_eq!(upstream.hits(), 3, "the action sent during the drain was not run");
    // The batch does not hold the drain: the server stops as soon as its replies went out.
    tokio::time::timeout(Duration::from_secs(5), &mut server.task)
        .await
        .expect("the server stopped")
        .unwrap();
}

#[tokio::test]
async fn the_streams_deadline_bounds_every_action() {
    let upstream = Upstream::start(|_| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        text(200, "too late")
    })
    .await;
    let server = Server::start(64).await;
    let (tx, rx) = mpsc::channel(8);
    let mut call = tonic::Request::new(ReceiverStream::new(rx));
    call.set_timeout(Duration::from_millis(400));
    let started = Instant::now();
    let mut replies = server.client.clone().execute_batch(call).await.unwrap().into_inner();
    tx.send(action("slow", &upstream.url("/"))).await.unwrap();
    let reply = replies.message().await.unwrap().unwrap();
    assert_eq!(reply.action_id, "slow");
    assert_eq!(error_kind(&reply), pb::ErrorKind::Timeout, "{reply:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}

#[tokio::test]
async fn an_oversized_message_ends_the_stream_invalid_argument_after_the_replies() {
    let upstream = paths_upstream().await;
    let options = ServerOptions { max_request_bytes: 64 * 1024, ..ServerOptions::default() };
    let server = Server::start_with_options(options, test_settings()).await;
    let (tx, mut replies) = server.open().await;
    tx.send(action("small", &upstream.url("/slow/small"))).await.unwrap();
    while upstream.hits() < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let big = pb::ExecuteHttpActionRequest {
        body: Some(pb::execute_http_action_request::Body::Text("a".repeat(100 * 1024))),
        ..action("big", &upstream.url("/fast/big"))
    };
    tx.send(big).await.unwrap();
    // The running action still answers; then the stream ends naming the setting.
    let small = replies.message().await.unwrap().expect("the running action's reply");
    assert_eq!((small.action_id.as_str(), small.outcome()), ("small", pb::Outcome::Succeeded));
    let status = replies.message().await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("server.max_request_bytes"), "{status:?}");
    assert_eq!(upstream.hits(), 1, "nothing sent for the oversized action");
}
