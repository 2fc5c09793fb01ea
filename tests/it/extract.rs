//! `extract`: RFC 9535 JSONPaths applied to a real upstream's JSON body (nested arrays), the
//! reply's `extracted`, on Execute and ExecuteStream; bad paths are INVALID_ARGUMENT naming
//! `extract[NAME]` with nothing sent.
use crate::support::{json, request, text, violated_fields, Sidecar, Upstream};
use callout::pb::{self, action_event::Event};
use prost_types::value::Kind;
use std::collections::HashMap;

fn extracting(url: &str, paths: &[(&str, &str)]) -> pb::ExecuteHttpActionRequest {
    pb::ExecuteHttpActionRequest {
        extract: paths.iter().map(|(n, p)| (n.to_string(), p.to_string())).collect(),
        ..request("GET", url)
    }
}

fn plain(v: &prost_types::Value) -> serde_json::Value {
    match v.kind.as_ref() {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::json!(n),
        Some(Kind::StringValue(s)) => serde_json::json!(s),
        Some(Kind::BoolValue(b)) => serde_json::json!(b),
        Some(Kind::ListValue(l)) => l.values.iter().map(plain).collect(),
        Some(Kind::StructValue(s)) => s.fields.iter().map(|(k, v)| (k.clone(), plain(v))).collect(),
    }
}

fn plain_map(m: &HashMap<String, prost_types::Value>) -> serde_json::Value {
    m.iter().map(|(k, v)| (k.clone(), plain(v))).collect()
}

async fn orders() -> Upstream {
    Upstream::start(|_| async {
        json(
            200,
            serde_json::json!({"items": [{"id": 7, "tags": [["a", "b"], ["c"]]}, {"id": 8, "tags": []}], "next": null}),
        )
    })
    .await
}

const PATHS: [(&str, &str); 5] = [
    ("first", "$.items[0].id"),
    ("ids", "$.items[*].id"),
    ("deep", "$.items[0].tags[1][0]"),
    ("missing", "$.nope"),
    ("big", "$.items[?@.id > 7]"),
];

#[tokio::test]
async fn one_node_a_list_or_null() {
    let upstream = orders().await;
    let sidecar = Sidecar::start().await;
    let reply = sidecar.execute(extracting(&upstream.url("/"), &PATHS)).await;
    assert_eq!(reply.outcome(), pb::Outcome::Succeeded, "{reply:?}");
    assert_eq!(
        plain_map(&reply.extracted),
        serde_json::json!({
            "first": 7.0, "ids": [7.0, 8.0], "deep": "c", "missing": null, "big": {"id": 8.0, "tags": []}
        })
    );
}

#[tokio::test]
async fn a_stream_extracts_the_same_and_still_sends_the_body() {
    let upstream = orders().await;
    let sidecar = Sidecar::start().await;
    let events = sidecar.stream(extracting(&upstream.url("/"), &PATHS)).await.unwrap();
    let body: Vec<u8> = events
        .iter()
        .filter_map(|e| match e {
            Event::BodyChunk(c) => Some(c.data.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(serde_json::from_slice::<serde_json::Value>(&body).is_ok(), "{events:?}");
    let Some(Event::Completed(done)) = events.last() else { panic!("{events:?}") };
    let result = done.result.as_ref().unwrap();
    assert_eq!(plain_map(&result.extracted)["ids"], serde_json::json!([7.0, 8.0]));
    assert!(result.response.as_ref().unwrap().body_json.is_none(), "the body came as chunks");
}

#[tokio::test]
async fn a_body_that_is_not_json_extracts_null() {
    let upstream = Upstream::start(|_| async { text(200, "not json") }).await;
    let sidecar = Sidecar::start().await;
    let reply = sidecar.execute(extracting(&upstream.url("/"), &[("id", "$.id")])).await;
    assert_eq!(plain_map(&reply.extracted), serde_json::json!({"id": null}));
}

#[tokio::test]
async fn bad_paths_are_invalid_naming_the_entry_and_nothing_is_sent() {
    let upstream = orders().await;
    let sidecar = Sidecar::start().await;
    let req = extracting(&upstream.url("/"), &[("ok", "$.a"), ("broken", "$.items[")]);
    let status = sidecar.try_execute(req).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["extract[broken]"]);
    let long = format!("$.{}", "a".repeat(2000));
    let status = sidecar.try_execute(extracting(&upstream.url("/"), &[("long", &long)])).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["extract[long]"]);
    let many: Vec<(String, String)> = (0..65).map(|i| (format!("n{i}"), "$".to_string())).collect();
    let req = pb::ExecuteHttpActionRequest {
        extract: many.into_iter().collect(),
        ..request("GET", &upstream.url("/"))
    };
    assert_eq!(violated_fields(&sidecar.try_execute(req).await.unwrap_err()), ["extract"]);
    assert_eq!(upstream.hits(), 0);
}
