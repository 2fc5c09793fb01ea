//! HTTPS upstreams: rustls with ALPN (h2 and http/1.1), the TLS handshake timed, a server-level
//! extra CA trusted, an untrusted certificate failing as TLS, and the per-action TLS options:
//! `ca_pem`, `insecure_skip_verify`, client certificates against an mTLS upstream.
use crate::support::*;
use callout::{exec::ExecSettings, pb};
use std::sync::atomic::Ordering;

fn trusting(ca_pem: &str, http2: bool) -> ExecSettings {
    let mut settings = test_settings();
    settings.client.extra_ca_pem = Some(ca_pem.to_owned());
    settings.client.http2 = http2;
    settings
}

#[tokio::test]
async fn https_negotiates_h2_by_alpn_and_times_the_handshake() {
    let pki = pki();
    let (addr, task) = tls_upstream(&pki, &[b"h2", b"http/1.1"]).await;
    let sidecar = Sidecar::start_with(trusting(&pki.ca_pem, true)).await;
    let resp = sidecar.execute(request("GET", &format!("https://{addr}/"))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    let response = resp.response.as_ref().unwrap();
    assert_eq!(response.http_version, "HTTP/2.0");
    assert_eq!(response.body_text.as_deref(), Some("secure"));
    let timing = resp.attempts[0].timing.as_ref().unwrap();
    let tls = timing.tls.as_ref().unwrap();
    assert!(tls.seconds > 0 || tls.nanos > 0, "TLS handshake measured: {timing:?}");

    // The second action rides the pooled h2 connection: no new handshake.
    let again = sidecar.execute(request("GET", &format!("https://{addr}/"))).await;
    let timing = again.attempts[0].timing.as_ref().unwrap();
    assert!(timing.reused_connection, "{timing:?}");
    assert_eq!(timing.tls.as_ref().unwrap().nanos, 0);
    task.abort();
}

#[tokio::test]
async fn https_falls_back_to_http1_when_h2_is_off() {
    let pki = pki();
    let (addr, task) = tls_upstream(&pki, &[b"h2", b"http/1.1"]).await;
    let sidecar = Sidecar::start_with(trusting(&pki.ca_pem, false)).await;
    let resp = sidecar.execute(request("GET", &format!("https://localhost:{}/", addr.port()))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.response.unwrap().http_version, "HTTP/1.1");
    task.abort();
}

#[tokio::test]
async fn untrusted_certificate_fails_as_tls() {
    let pki = pki();
    let (addr, task) = tls_upstream(&pki, &[b"http/1.1"]).await;
    let sidecar = Sidecar::start().await;
    let resp = sidecar.execute(request("GET", &format!("https://{addr}/"))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Failed);
    assert_eq!(error_kind(&resp), pb::ErrorKind::Tls);
    let message = &resp.error.unwrap().message;
    assert!(message.contains("certificate"), "{message}");
    task.abort();
}

fn with_tls(url: &str, tls: pb::TlsOptions) -> pb::ExecuteHttpActionRequest {
    pb::ExecuteHttpActionRequest { tls: Some(Box::new(tls)), ..request("GET", url) }
}

#[tokio::test]
async fn action_ca_pem_trusts_an_upstream_the_server_does_not() {
    let pki = pki();
    let (addr, task) = tls_upstream(&pki, &[b"h2", b"http/1.1"]).await;
    let sidecar = Sidecar::start().await;
    let url = format!("https://{addr}/");
    let tls = pb::TlsOptions { ca_pem: pki.ca_pem.clone(), ..Default::default() };
    let resp = sidecar.execute(with_tls(&url, tls)).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.response.unwrap().body_text.as_deref(), Some("secure"));

    // The trust was the action's alone: the next action without it does not ride its pool.
    let resp = sidecar.execute(request("GET", &url)).await;
    assert_eq!(error_kind(&resp), pb::ErrorKind::Tls, "{resp:?}");
    task.abort();
}

#[tokio::test]
async fn insecure_skip_verify_accepts_an_unknown_ca_for_that_action_only() {
    let pki = pki();
    let (addr, task) = tls_upstream(&pki, &[b"h2", b"http/1.1"]).await;
    let sidecar = Sidecar::start().await;
    let url = format!("https://{addr}/");
    let tls = pb::TlsOptions { insecure_skip_verify: true, ..Default::default() };
    let resp = sidecar.execute(with_tls(&url, tls)).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.response.unwrap().body_text.as_deref(), Some("secure"));

    let resp = sidecar.execute(request("GET", &url)).await;
    assert_eq!(error_kind(&resp), pb::ErrorKind::Tls, "verification is back on: {resp:?}");
    task.abort();
}

#[tokio::test]
async fn mtls_upstream_needs_the_client_certificate() {
    let pki = pki();
    let (addr, task, _) = tls_upstream_with(&pki, &[b"http/1.1"], true).await;
    let sidecar = Sidecar::start().await;
    let url = format!("https://{addr}/");

    let without = pb::TlsOptions { ca_pem: pki.ca_pem.clone(), ..Default::default() };
    let resp = sidecar.execute(with_tls(&url, without)).await;
    assert_eq!(resp.outcome(), pb::Outcome::Failed);
    assert_eq!(error_kind(&resp), pb::ErrorKind::Tls, "{resp:?}");
    let message = resp.error.unwrap().message;
    assert!(message.to_lowercase().contains("certificate"), "{message}");

    let with = pb::TlsOptions {
        ca_pem: pki.ca_pem.clone(),
        client_cert_pem: pki.client_cert_pem.clone(),
        client_key_pem: pki.client_key_pem.clone(),
        ..Default::default()
    };
    let resp = sidecar.execute(with_tls(&url, with)).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.response.unwrap().body_text.as_deref(), Some("secure"));
    task.abort();
}

#[tokio::test]
async fn bad_client_pem_is_invalid_and_nothing_connects() {
    let other = pki();
    let pki = pki();
    let (addr, task, accepted) = tls_upstream_with(&pki, &[b"http/1.1"], true).await;
    let sidecar = Sidecar::start().await;
    let url = format!("https://{addr}/");
    let cases = [
        ("not a key".to_owned(), "tls.client_key_pem"),
        // A real key, but not the certificate's.
        (other.client_key_pem.clone(), "tls.client_key_pem"),
    ];
    for (key, field) in cases {
        let tls = pb::TlsOptions {
            ca_pem: pki.ca_pem.clone(),
            client_cert_pem: pki.client_cert_pem.clone(),
            client_key_pem: key.clone(),
            ..Default::default()
        };
        let status = sidecar.try_execute(with_tls(&url, tls)).await.unwrap_err();
        assert_eq!(violated_fields(&status), [field]);
        assert!(!status.message().contains("PRIVATE KEY-----"), "{status:?}");
    }
    let tls = pb::TlsOptions { client_cert_pem: pki.client_cert_pem.clone(), ..Default::default() };
    let status = sidecar.try_execute(with_tls(&url, tls)).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["tls.client_key_pem"]);
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "nothing may connect for an invalid action");
    task.abort();
}

#[tokio::test]
async fn a_cold_burst_to_an_h2_origin_makes_one_connection() {
    let pki = pki();
    let (addr, task, accepted) = tls_upstream_with(&pki, &[b"h2", b"http/1.1"], false).await;
    let sidecar = Sidecar::start_with(trusting(&pki.ca_pem, true)).await;
    let url = format!("https://{addr}/");
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (client, req) = (sidecar.client.clone(), request("GET", &url));
        burst.spawn(async move { client.clone().execute(req).await.unwrap().into_inner() });
    }
    let mut handshakes_reported = 0;
    while let Some(resp) = burst.join_next().await {
        let resp = resp.unwrap();
        assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
        assert_eq!(resp.response.as_ref().unwrap().http_version, "HTTP/2.0");
        let timing = resp.attempts[0].timing.as_ref().unwrap();
        if !timing.reused_connection {
            handshakes_reported += 1;
        }
    }
    // One dial, waited on by the rest: one connection, its set-up reported by one action.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(handshakes_reported, 1);
    task.abort();
}

#[tokio::test]
async fn an_origin_that_chooses_http1_keeps_the_connection_dialled_for_it() {
    let pki = pki();
    let (addr, task, accepted) = tls_upstream_with(&pki, &[b"http/1.1"], false).await;
    let sidecar = Sidecar::start_with(trusting(&pki.ca_pem, true)).await;
    let url = format!("https://{addr}/");
    let first = sidecar.execute(request("GET", &url)).await;
    assert_eq!(first.outcome(), pb::Outcome::Succeeded, "{first:?}");
    assert_eq!(first.response.as_ref().unwrap().http_version, "HTTP/1.1");
    let timing = first.attempts[0].timing.as_ref().unwrap();
    assert!(!timing.reused_connection, "{timing:?}");
    assert!(timing.tls.as_ref().is_some_and(|t| t.seconds > 0 || t.nanos > 0), "{timing:?}");

    // The connection that found out it speaks HTTP/1.1 carried the first action, and is pooled.
    let second = sidecar.execute(request("GET", &url)).await;
    assert_eq!(second.outcome(), pb::Outcome::Succeeded, "{second:?}");
    assert!(second.attempts[0].timing.as_ref().unwrap().reused_connection);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    task.abort();
}

#[tokio::test]
async fn an_h2_connection_the_upstream_closes_is_dialled_again() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let pki = pki();
    let acceptor = tls_acceptor(&pki, &[b"h2"], false);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
    // Each connection serves one request, then says GOAWAY and closes.
    let task = tokio::spawn(async move {
        let mut n = 0;
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            n += 1;
            let (acceptor, closed_tx) = (acceptor.clone(), closed_tx.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let served = std::sync::Arc::new(tokio::sync::Notify::new());
                let notify = served.clone();
                let service = hyper::service::service_fn(move |_req| {
                    notify.notify_one();
                    async move { Ok::<_, std::io::Error>(hyper::Response::new(body(format!("connection {n}")))) }
                });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = served.notified() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
                let _ = closed_tx.send(n);
            });
        }
    });
    let sidecar = Sidecar::start_with(trusting(&pki.ca_pem, true)).await;
    let url = format!("https://{addr}/");
    for n in 1..=3 {
        let resp = sidecar.execute(request("GET", &url)).await;
        assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "action {n}: {resp:?}");
        let response = resp.response.unwrap();
        assert_eq!(response.http_version, "HTTP/2.0");
        assert_eq!(response.body_text.as_deref(), Some(format!("connection {n}").as_str()));
        assert!(!resp.attempts[0].timing.unwrap().reused_connection, "action {n} dialled anew");
        // The upstream has closed; the sidecar sees the connection end before the next action.
        assert_eq!(closed.recv().await, Some(n));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    task.abort();
}

#[tokio::test]
async fn a_request_waiting_on_another_ones_dial_keeps_its_own_connect_timeout() {
    use std::time::Duration;
    // Accepts TCP and never answers the ClientHello: a dial that hangs until its timeout.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
            let _ = accepted_tx.send(held.len());
        }
    });
    let sidecar = Sidecar::start().await;
    let url = format!("https://{addr}/");
    let with_connect_timeout = |connect: Duration| {
        let mut req = request("GET", &url);
        req.timeouts = Some(Box::new(pb::Timeouts {
            connect: Some(dur(connect)),
            attempt: Some(dur(Duration::from_secs(30))),
            total: None,
        }));
        req
    };
    let (client, slow) = (sidecar.client.clone(), with_connect_timeout(Duration::from_secs(20)));
    let dialler = tokio::spawn(async move { client.clone().execute(slow).await });
    assert_eq!(accepted.recv().await, Some(1), "the first request dials");

    // The second finds the origin being dialled and waits on that dial, but only as long as
    // its own connect timeout: it ends as TIMEOUT while the first one's dial still hangs.
    let waiter = sidecar.execute(with_connect_timeout(Duration::from_millis(200))).await;
    assert_eq!(waiter.outcome(), pb::Outcome::Failed, "{waiter:?}");
    assert_eq!(error_kind(&waiter), pb::ErrorKind::Timeout, "{waiter:?}");
    let message = &waiter.error.as_ref().unwrap().message;
    assert!(message.contains("connect timeout of 200ms"), "{message}");
    assert!(!dialler.is_finished(), "the first request's dial goes on");
    assert!(accepted.try_recv().is_err(), "the waiter made no dial of its own");
    dialler.abort();
    task.abort();
}
