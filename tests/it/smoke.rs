//! The shortest path through everything: a GET through the sidecar to a loopback upstream.
use crate::support::*;
use callout::pb;

#[tokio::test]
async fn get_through_the_sidecar() {
    let upstream = Upstream::fixed(200, "hello").await;
    let sidecar = Sidecar::start().await;
    let resp = sidecar.execute(request("GET", &upstream.url("/hi"))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert!(resp.proceed);
    let r = resp.response.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body_text.as_deref(), Some("hello"));
    assert_eq!(r.body_text.as_deref(), Some("hello"));
    assert_eq!(upstream.seen()[0].target, "/hi");
}
