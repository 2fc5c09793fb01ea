//! `reply_body`: which body fields Execute's reply carries (AUTO, ALL, RAW, NONE), and NONE's
//! effect on ExecuteStream's chunks, against a loopback upstream and the real gRPC server.
use crate::support::{body, json, request, text, Sidecar, Upstream};
use callout::pb::{self, action_event::Event};

fn with_mode(url: &str, mode: pb::ReplyBody) -> pb::ExecuteHttpActionRequest {
    pb::ExecuteHttpActionRequest { reply_body: mode as i32, ..request("GET", url) }
}

#[tokio::test]
async fn auto_gives_one_field_json_then_text_then_bytes() {
    let upstream = Upstream::start(|req| async move {
        match req.target.as_str() {
            "/json" => json(200, serde_json::json!({"a": [1, {"b": 2}]})),
            "/text" => text(200, "plain"),
            _ => http::Response::builder()
                .header("content-type", "application/octet-stream")
                .body(body(vec![0u8, 1, 2]))
                .unwrap(),
        }
    })
    .await;
    let sidecar = Sidecar::start().await;
    let r = sidecar.execute(request("GET", &upstream.url("/json"))).await.response.unwrap();
    assert!(r.body_json.is_some() && r.body_text.is_none() && r.body.is_empty(), "{r:?}");
    let r = sidecar.execute(request("GET", &upstream.url("/text"))).await.response.unwrap();
    assert_eq!(
        (r.body_json.is_none(), r.body_text.as_deref(), r.body.is_empty()),
        (true, Some("plain"), true)
    );
    let r = sidecar.execute(request("GET", &upstream.url("/bin"))).await.response.unwrap();
    assert_eq!((r.body_json.is_none(), r.body_text.is_none(), &r.body[..]), (true, true, &[0u8, 1, 2][..]));
}

#[tokio::test]
async fn all_raw_and_none_give_what_they_say() {
    let upstream = Upstream::start(|_| async { json(200, serde_json::json!({"id": 7})) }).await;
    let sidecar = Sidecar::start().await;
    let url = upstream.url("/");
    let r = sidecar.execute(with_mode(&url, pb::ReplyBody::All)).await.response.unwrap();
    assert!(r.body_json.is_some(), "{r:?}");
    assert_eq!((r.body_text.as_deref(), &r.body[..]), (Some(r#"{"id":7}"#), &br#"{"id":7}"#[..]));
    let r = sidecar.execute(with_mode(&url, pb::ReplyBody::Raw)).await.response.unwrap();
    assert_eq!(
        (r.body_json.is_none(), r.body_text.is_none(), &r.body[..]),
        (true, true, &br#"{"id":7}"#[..])
    );
    let reply = sidecar.execute(with_mode(&url, pb::ReplyBody::None)).await;
    assert_eq!(reply.outcome(), pb::Outcome::Succeeded, "{reply:?}");
    let r = reply.response.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body_json.is_none() && r.body_text.is_none() && r.body.is_empty(), "{r:?}");
}

#[tokio::test]
async fn none_sends_no_body_chunks_on_a_stream_and_auto_still_does() {
    let upstream = Upstream::start(|_| async { text(200, "streamed words") }).await;
    let sidecar = Sidecar::start().await;
    let url = upstream.url("/");
    let chunks = |events: &[Event]| events.iter().filter(|e| matches!(e, Event::BodyChunk(_))).count();
    let events = sidecar.stream(with_mode(&url, pb::ReplyBody::None)).await.unwrap();
    assert_eq!(chunks(&events), 0, "{events:?}");
    let Some(Event::Completed(done)) = events.last() else { panic!("{events:?}") };
    assert_eq!(done.result.as_ref().unwrap().outcome(), pb::Outcome::Succeeded);
    let events = sidecar.stream(request("GET", &url)).await.unwrap();
    assert_eq!(chunks(&events), 1, "{events:?}");
}

#[tokio::test]
async fn an_unknown_mode_is_invalid_and_nothing_is_sent() {
    let upstream = Upstream::fixed(200, "ok").await;
    let sidecar = Sidecar::start().await;
    let req = pb::ExecuteHttpActionRequest { reply_body: 99, ..request("GET", &upstream.url("/")) };
    let status = sidecar.try_execute(req).await.unwrap_err();
    assert_eq!(crate::support::violated_fields(&status), ["reply_body"]);
    assert_eq!(upstream.hits(), 0);
}
