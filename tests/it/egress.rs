//! The egress policy: loopback and private ranges denied by default and opened by the dev
//! setting, names resolving to denied addresses, IP spellings, redirect hops, ports and a
//! caller's proxy, all refused before any connection.
use crate::support::*;
use callout::{client::egress::EgressSettings, exec::ExecSettings, pb};
use std::net::IpAddr;

/// The default policy (no dev mode), with `resolve` fixing host addresses.
fn policy(egress: EgressSettings, resolve: &[(&str, &str)]) -> ExecSettings {
    let mut settings = ExecSettings { egress, ..ExecSettings::default() };
    settings.client.resolve =
        resolve.iter().map(|(host, ip)| (host.to_string(), vec![ip.parse::<IpAddr>().unwrap()])).collect();
    settings
}

fn denial(resp: &pb::ExecuteHttpActionResponse) -> String {
    assert_eq!(error_kind(resp), pb::ErrorKind::DeniedByPolicy, "{resp:?}");
    assert!(resp.response.is_none(), "nothing was received");
    assert_eq!(resp.attempts.len(), 1, "a denial is final: no retry");
    resp.error.as_ref().unwrap().message.clone()
}

#[tokio::test]
async fn loopback_is_denied_by_default_and_opened_by_the_dev_setting() {
    let upstream = Upstream::fixed(200, "ok").await;
    let strict = Sidecar::start_with(ExecSettings::default()).await;
    let mut req = request("GET", &upstream.url("/"));
    req.retry = Some(Box::new(fast_retry(3)));
    let message = denial(&strict.execute(req.clone()).await);
    assert!(message.contains("loopback range 127.0.0.0/8"), "{message}");
    assert!(message.contains("allow private networks"), "the message says how to open it: {message}");
    assert_eq!(upstream.hits(), 0);

    let dev = Sidecar::start_with(test_settings()).await;
    assert_eq!(dev.execute(req).await.outcome(), pb::Outcome::Succeeded);
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn names_resolving_to_loopback_or_metadata_are_denied() {
    let upstream = Upstream::fixed(200, "ok").await;
    let port = upstream.addr.port();
    let sidecar = Sidecar::start_with(policy(
        EgressSettings::default(),
        &[("rebind.test", "127.0.0.1"), ("meta.test", "169.254.169.254")],
    ))
    .await;
    let message = denial(&sidecar.execute(request("GET", &format!("http://rebind.test:{port}/"))).await);
    assert!(message.contains("rebind.test") && message.contains("127.0.0.1"), "{message}");
    // The metadata address is refused before any connection, so no packet leaves loopback.
    let message = denial(&sidecar.execute(request("GET", "http://meta.test/latest/meta-data")).await);
    assert!(message.contains("cloud metadata"), "{message}");
    let message = denial(&sidecar.execute(request("GET", "http://metadata.google.internal/")).await);
    assert!(message.contains("cloud metadata host"), "{message}");
    assert_eq!(upstream.hits(), 0);

    // Even in dev mode, metadata stays closed.
    let dev = policy(
        EgressSettings { allow_private_networks: true, ..Default::default() },
        &[("meta.test", "169.254.169.254")],
    );
    let dev = Sidecar::start_with(dev).await;
    assert!(denial(&dev.execute(request("GET", "http://meta.test/")).await).contains("cloud metadata"));
}

#[tokio::test]
async fn other_spellings_of_loopback_are_denied() {
    let upstream = Upstream::fixed(200, "ok").await;
    let port = upstream.addr.port();
    let sidecar = Sidecar::start_with(ExecSettings::default()).await;
    for url in [
        format!("http://2130706433:{port}/"),
        format!("http://0x7f.0.0.1:{port}/"),
        format!("http://0177.0.0.1:{port}/"),
        format!("http://127.1:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        format!("http://localhost.:{port}/"),
        format!("http://LOCALHOST:{port}/"),
    ] {
        let message = denial(&sidecar.execute(request("GET", &url)).await);
        assert!(message.contains("loopback"), "{url}: {message}");
    }
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn a_redirect_to_a_denied_address_is_stopped_before_connecting() {
    let denied_target =
        Upstream::start_on("127.0.0.2:0", |_| async { text(200, "should not be reached") }).await;
    let location = denied_target.url("/inside");
    let upstream = Upstream::start(move |_| {
        let location = location.clone();
        async move {
            http::Response::builder().status(302).header("location", location).body(body("moved")).unwrap()
        }
    })
    .await;
    let settings = policy(
        EgressSettings {
            allow_private_networks: true,
            deny: vec!["127.0.0.2/32".parse().unwrap()],
            ..Default::default()
        },
        &[],
    );
    let sidecar = Sidecar::start_with(settings).await;
    let message = denial(&sidecar.execute(request("GET", &upstream.url("/start"))).await);
    assert!(message.contains("deny rule 127.0.0.2/32"), "{message}");
    assert_eq!(upstream.hits(), 1);
    assert_eq!(denied_target.hits(), 0);
}

#[tokio::test]
async fn only_allowed_ports_are_dialled() {
    let upstream = Upstream::fixed(200, "ok").await;
    let settings = policy(
        EgressSettings { allow_private_networks: true, allowed_ports: vec![443], ..Default::default() },
        &[],
    );
    let sidecar = Sidecar::start_with(settings).await;
    let message = denial(&sidecar.execute(request("GET", &upstream.url("/"))).await);
    assert!(
        message.contains(&format!("port {} is not in the allowed ports", upstream.addr.port())),
        "{message}"
    );
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn a_callers_proxy_must_pass_the_policy_too() {
    let proxy = Upstream::fixed(200, "proxied").await;
    let sidecar = Sidecar::start_with(policy(EgressSettings::default(), &[("shop.test", "127.0.0.1")])).await;
    let mut req = request("GET", "http://shop.test/orders");
    req.proxy = Some(Box::new(pb::ProxyOptions { url: format!("http://{}", proxy.addr) }));
    let message = denial(&sidecar.execute(req).await);
    assert!(message.contains("loopback"), "{message}");
    assert_eq!(proxy.hits(), 0);
}
