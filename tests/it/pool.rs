//! Plain http upstream connections, as callout keeps them: one connection carries request after
//! request (in origin form, with Host), a connection the upstream closed is not used again, at
//! most `pool_max_idle_per_host` are kept per origin, and one idle for `pool_idle_timeout` is
//! closed; a request that finds none idle takes one going idle before its own dial is made.
//! The upstream is a raw HTTP/1.1 server on loopback that counts connections and
//! records each request head as it came over the wire.
use crate::support::*;
use callout::pb;
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    sync::{mpsc, Barrier},
};

/// What the raw upstream does with each connection.
#[derive(Clone, Copy)]
enum Keep {
    /// Serves requests until the client closes the connection.
    Open,
    /// Closes the connection once it answered one request (no `Connection: close`: the client
    /// learns only from the close itself).
    CloseAfterOne,
}

struct RawUpstream {
    port: u16,
    accepted: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
    /// Told the connection's number when the client closes it.
    closed: mpsc::UnboundedReceiver<usize>,
    _task: AbortOnDrop,
}

impl RawUpstream {
    /// Answers `200 ok` to every request, each answer after `barrier` (when set) lets go.
    async fn start(keep: Keep, barrier: Option<Arc<Barrier>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads: Arc<Mutex<Vec<String>>> = Arc::default();
        let (closed_tx, closed) = mpsc::unbounded_channel();
        let (counter, recorded) = (accepted.clone(), heads.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let number = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let (recorded, barrier, closed_tx) = (recorded.clone(), barrier.clone(), closed_tx.clone());
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    loop {
                        let Some(head) = next_head(&mut tcp, &mut pending).await else {
                            let _ = closed_tx.send(number);
                            return;
                        };
                        recorded.lock().unwrap().push(String::from_utf8_lossy(&head).into_owned());
                        if let Some(barrier) = &barrier {
                            barrier.wait().await;
                        }
                        if tcp.write_all(OK).await.is_err() {
                            return;
                        }
                        if let Keep::CloseAfterOne = keep {
                            return;
                        }
                    }
                });
            }
        });
        Self { port, accepted, heads, closed, _task: AbortOnDrop(task) }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// The raw upstreams' answer to every request.
const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";

/// The next request head on `tcp` (bodiless requests only), `pending` holding what was read past
/// the last one; `None` once the client closes.
async fn next_head(tcp: &mut tokio::net::TcpStream, pending: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(pending.drain(..end + 4).collect());
        }
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
}

fn reused(resp: &pb::ExecuteHttpActionResponse) -> bool {
    resp.attempts.last().and_then(|a| a.timing.as_ref()).is_some_and(|t| t.reused_connection)
}

#[tokio::test]
async fn plain_http_actions_share_one_connection_in_origin_form_with_host() {
    let upstream = RawUpstream::start(Keep::Open, None).await;
    let sidecar = Sidecar::start().await;
    let mut reuses = Vec::new();
    for path in ["/a?x=1", "/b", "/c/d"] {
        let resp = sidecar.execute(request("GET", &upstream.url(path))).await;
        assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
        assert_eq!(resp.response.as_ref().unwrap().body_text.as_deref(), Some("ok"));
        reuses.push(reused(&resp));
    }
    assert_eq!(upstream.accepted(), 1, "one connection carried all three");
    assert_eq!(reuses, [false, true, true]);
    let heads = upstream.heads.lock().unwrap().clone();
    let host = format!("host: 127.0.0.1:{}\r\n", upstream.port);
    for (head, target) in heads.iter().zip(["/a?x=1", "/b", "/c/d"]) {
        assert!(head.starts_with(&format!("GET {target} HTTP/1.1\r\n")), "origin form: {head:?}");
        assert_eq!(head.to_ascii_lowercase().matches(&host).count(), 1, "one Host: {head:?}");
    }
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_kept_is_not_used_again() {
    let mut upstream = RawUpstream::start(Keep::CloseAfterOne, None).await;
    let sidecar = Sidecar::start().await;
    // One try each (`request`'s retry policy): a request lost on the closed connection would
    // fail the action, not retry.
    let req = request("GET", &upstream.url("/one"));
    let first = sidecar.execute(req.clone()).await;
    assert_eq!(first.outcome(), pb::Outcome::Succeeded, "{first:?}");
    // The upstream has closed it; callout's end reads the close before the next action.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = sidecar.execute(req).await;
    assert_eq!(second.outcome(), pb::Outcome::Succeeded, "{second:?}");
    assert!(!reused(&second), "a new connection: {second:?}");
    assert_eq!(upstream.accepted(), 2);
    assert!(upstream.closed.try_recv().is_err(), "the upstream, not callout, closed the first");
}

#[tokio::test]
async fn at_most_pool_max_idle_per_host_connections_are_kept() {
    let barrier = Arc::new(Barrier::new(3));
    let upstream = RawUpstream::start(Keep::Open, Some(barrier)).await;
    let mut settings = test_settings();
    settings.client.pool_max_idle_per_host = 1;
    let sidecar = Sidecar::start_with(settings).await;
    let three_at_once = || async {
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..3 {
            let (mut client, req) = (sidecar.client.clone(), request("GET", &upstream.url("/held")));
            calls.spawn(async move { client.execute(req).await.unwrap().into_inner() });
        }
        // The upstream answers once all three are in, so each needs a connection of its own.
        let mut reused_ones = 0;
        while let Some(resp) = calls.join_next().await {
            let resp = resp.unwrap();
            assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
            reused_ones += usize::from(reused(&resp));
        }
        reused_ones
    };
    assert_eq!(three_at_once().await, 0);
    assert_eq!(upstream.accepted(), 3);
    // One of the three was kept; the other two were closed once their bodies were read.
    assert_eq!(three_at_once().await, 1);
    assert_eq!(upstream.accepted(), 5);
}

#[tokio::test]
async fn a_connection_idle_for_the_idle_timeout_is_closed() {
    let mut upstream = RawUpstream::start(Keep::Open, None).await;
    let mut settings = test_settings();
    settings.client.pool_idle_timeout = Duration::from_secs(1);
    let sidecar = Sidecar::start_with(settings).await;
    let resp = sidecar.execute(request("GET", &upstream.url("/once"))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    // The pool's sweep (every second here) closes it: the upstream reads the close.
    let closed = tokio::time::timeout(Duration::from_secs(10), upstream.closed.recv()).await;
    assert_eq!(closed.expect("closed within 10 s of going idle"), Some(1));
}

/// A request that finds every connection busy dials, and takes whichever comes first: its own
/// new connection or one another request is done with. Here its dial cannot finish: the upstream
/// listens with a backlog of zero and accepts one connection only, and a connection the test
/// opens holds the accept queue's one place, so new connections' SYNs are dropped. The second
/// action is sent while the first holds the one connection; when the first's answer comes, the
/// second goes on that connection, inside its connect timeout. (Waiting on its own dial alone,
/// it failed as TIMEOUT after the 2 s.)
#[tokio::test]
async fn a_request_takes_a_connection_going_idle_before_its_own_dial_is_made() {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (first_in_tx, first_in) = tokio::sync::oneshot::channel::<()>();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let served = Arc::new(AtomicUsize::new(0));
    let counted = served.clone();
    let _upstream = AbortOnDrop(tokio::spawn(async move {
        // One connection is accepted, and no other.
        let (mut tcp, _) = listener.accept().await.unwrap();
        let _listener = listener;
        let (mut first_in_tx, mut released) = (Some(first_in_tx), Some(released));
        let mut pending = Vec::new();
        while next_head(&mut tcp, &mut pending).await.is_some() {
            // The first answer waits for the test's word.
            if let (Some(first_in_tx), Some(released)) = (first_in_tx.take(), released.take()) {
                let _ = first_in_tx.send(());
                let _ = released.await;
            }
            counted.fetch_add(1, Ordering::SeqCst);
            if tcp.write_all(OK).await.is_err() {
                return;
            }
        }
    }));
    let sidecar = Sidecar::start().await;
    let url = format!("http://127.0.0.1:{port}/");
    let mut first_client = sidecar.client.clone();
    let first_req = request("GET", &url);
    let first = tokio::spawn(async move { first_client.execute(first_req).await.unwrap().into_inner() });
    first_in.await.unwrap();
    // The accept queue's one place, taken: from now on a new connection is never made.
    let _queued = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut second_req = request("GET", &url);
    second_req.timeouts =
        Some(Box::new(pb::Timeouts { connect: Some(dur(Duration::from_secs(2))), ..Default::default() }));
    let mut second_client = sidecar.client.clone();
    let second = tokio::spawn(async move { second_client.execute(second_req).await.unwrap().into_inner() });
    // The second is dialling (its SYN dropped) when the first's answer frees the connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    release.send(()).unwrap();
    let first = first.await.unwrap();
    assert_eq!(first.outcome(), pb::Outcome::Succeeded, "{first:?}");
    let second = second.await.unwrap();
    assert_eq!(second.outcome(), pb::Outcome::Succeeded, "{second:?}");
    assert!(reused(&second), "on the first's connection: {second:?}");
    assert_eq!(served.load(Ordering::SeqCst), 2);
}
