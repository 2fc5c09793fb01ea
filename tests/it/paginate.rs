//! `paginate`: collections walked by Link header, body cursor and JSONPath next URL, through
//! Execute, ExecuteStream, durable actions and `callout exec`; the loop guard, max_pages, the
//! items' cap, retries and the egress policy on every page, and bad settings.
use crate::{
    durable::{self, durable_client, submit, until_final, Kind, Server, TestStore, LEASE_ENV},
    support::*,
};
use callout::{durable::DurableSettings, pb};
use http::Response;
use pb::action_event::Event;
use serde_json::{json, Value};
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, OnceLock,
    },
    time::Duration,
};

/// Items 1 to 7, three to a page: pages 1, 2 and 3.
const ITEMS: u64 = 7;
const PER_PAGE: u64 = 3;
const LAST_PAGE: u64 = 3;

fn items_of(page: u64) -> Vec<Value> {
    let first = (page - 1) * PER_PAGE + 1;
    (first..=(first + PER_PAGE - 1).min(ITEMS))
        .map(|id| json!({ "id": id, "name": format!("item {id}") }))
        .collect()
}

fn query_param(target: &str, name: &str) -> Option<String> {
    let query = target.split_once('?')?.1;
    url::form_urlencoded::parse(query.as_bytes()).find(|(n, _)| n == name).map(|(_, v)| v.into_owned())
}

fn with_link(mut response: Response<UpBody>, link: &str) -> Response<UpBody> {
    response.headers_mut().insert("link", link.parse().unwrap());
    response
}

/// The collection, served several ways (`base` is the upstream's own `http://addr`):
/// - `/link?page=N`: `{"data": [...]}`, Link next relative on page 1, absolute on page 2;
/// - `/cursor[?cursor=c2|c3]`: `{"items": [...], "meta": {"next_cursor": "c2"|"c3"|null}}`;
/// - `/next/N`: `{"results": [...], "next": "/next/N+1"|null}`;
/// - `/loop/1` and `/loop/2`: Link next to each other;
/// - `/endless?page=N`: always a next page;
/// - `/flaky?page=N`: as /link, but page 2 answers 503 the first time;
/// - `/hang?page=N`: as /link, but page 2 never answers until `release` is set.
struct Collection {
    upstream: Upstream,
    release: Arc<AtomicBool>,
}

async fn collection() -> Collection {
    let own: Arc<OnceLock<String>> = Arc::default();
    let base = own.clone();
    let flaky = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(AtomicBool::new(false));
    let released = release.clone();
    let upstream = Upstream::start(move |seen: Seen| {
        let base = base.get().cloned().unwrap_or_default();
        let flaky = flaky.clone();
        let released = released.clone();
        async move {
            let t = seen.target.as_str();
            let path = t.split('?').next().unwrap_or_default();
            let page: u64 = query_param(t, "page").and_then(|p| p.parse().ok()).unwrap_or(1);
            let data = || json(200, json!({ "data": items_of(page) }));
            let linked = |response| match page {
                1 => with_link(response, &format!(r#"<{path}?page=2>; rel="next""#)),
                2 => with_link(
                    response,
                    &format!(r#"<{base}{path}?page=3>; rel="next", <{path}>; rel="first""#),
                ),
                _ => with_link(response, &format!(r#"<{path}>; rel="first""#)),
            };
            match path {
                "/link" => linked(data()),
                "/flaky" => {
                    if page == 2 && flaky.fetch_add(1, Ordering::SeqCst) == 0 {
                        return text(503, "busy");
                    }
                    linked(data())
                }
                "/hang" => {
                    while page == 2 && !released.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    linked(data())
                }
                "/cursor" => {
                    let (page, next) = match query_param(t, "cursor").as_deref() {
                        None => (1, json!("c2")),
                        Some("c2") => (2, json!("c3")),
                        Some("c3") => (3, Value::Null),
                        Some(_) => return text(400, "bad cursor"),
                    };
                    json(200, json!({ "items": items_of(page), "meta": { "next_cursor": next } }))
                }
                _ if path.starts_with("/next/") => {
                    let page: u64 = path["/next/".len()..].parse().unwrap();
                    let next =
                        if page < LAST_PAGE { json!(format!("/next/{}", page + 1)) } else { Value::Null };
                    json(200, json!({ "results": items_of(page), "next": next }))
                }
                "/loop/1" => with_link(json(200, json!({ "data": [1] })), r#"</loop/2>; rel="next""#),
                "/loop/2" => with_link(json(200, json!({ "data": [2] })), r#"</loop/1>; rel="next""#),
                "/endless" => with_link(
                    json(200, json!({ "data": [page] })),
                    &format!(r#"</endless?page={}>; rel="next""#, page + 1),
                ),
                _ => text(404, "no such collection"),
            }
        }
    })
    .await;
    own.set(format!("http://{}", upstream.addr)).unwrap();
    Collection { upstream, release }
}

fn paginated(url: &str, paginate: pb::Paginate) -> pb::ExecuteHttpActionRequest {
    pb::ExecuteHttpActionRequest { paginate: Some(Box::new(paginate)), ..request("GET", url) }
}

fn by_link(items_path: &str) -> pb::Paginate {
    pb::Paginate { items_path: items_path.into(), ..Default::default() }
}

fn plain(values: &[prost_types::Value]) -> Vec<Value> {
    values.iter().cloned().map(callout::api::convert::plain_json).collect()
}

fn ids(values: &[prost_types::Value]) -> Vec<u64> {
    plain(values).iter().filter_map(|v| v["id"].as_u64()).collect()
}

fn all_ids() -> Vec<u64> {
    (1..=ITEMS).collect()
}

fn ends(reply: &pb::ExecuteHttpActionResponse) -> Vec<pb::PaginationEnd> {
    reply.pages.iter().map(|p| p.end()).collect()
}

#[tokio::test]
async fn a_link_header_collection_is_walked_through_relative_and_absolute_links() {
    let c = collection().await;
    let sidecar = Sidecar::start().await;
    let reply = sidecar.execute(paginated(&c.upstream.url("/link"), by_link("$.data[*]"))).await;
    assert_eq!(reply.outcome(), pb::Outcome::Succeeded, "{reply:?}");
    assert_eq!(ids(&reply.items), all_ids(), "the pages' items, concatenated in order");
    let targets: Vec<String> = c.upstream.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/link", "/link?page=2", "/link?page=3"]);
    let pages: Vec<(u32, u32, u32, u32)> =
        reply.pages.iter().map(|p| (p.number, p.status, p.items, p.attempts)).collect();
    assert_eq!(pages, [(1, 200, 3, 1), (2, 200, 3, 1), (3, 200, 1, 1)]);
    use pb::PaginationEnd::*;
    assert_eq!(ends(&reply), [Unspecified, Unspecified, LastPage]);
    assert_eq!(reply.pages[1].url, c.upstream.url("/link"), "no query in a page's URL");
    assert!(reply.pages.iter().all(|p| p.total.is_some()));
    assert_eq!(reply.attempts.iter().map(|a| a.page).collect::<Vec<_>>(), [1, 2, 3]);
    // The response is the last page's.
    let last = plain_json(reply.response.unwrap().body_json.unwrap());
    assert_eq!(last["data"][0]["id"], 7);
}

fn plain_json(v: prost_types::Value) -> Value {
    callout::api::convert::plain_json(v)
}

#[tokio::test]
async fn items_path_selecting_one_array_takes_its_elements() {
    let c = collection().await;
    let sidecar = Sidecar::start().await;
    let reply = sidecar.execute(paginated(&c.upstream.url("/link"), by_link("$.data"))).await;
    assert_eq!(ids(&reply.items), all_ids());
    let reply = sidecar.execute(paginated(&c.upstream.url("/link"), by_link("$.data[*].name"))).await;
    assert_eq!(plain(&reply.items)[6], json!("item 7"));
    assert_eq!(reply.items.len(), 7);
}

#[tokio::test]
async fn a_body_cursor_is_written_into_its_query_parameter() {
    let c = collection().await;
    let sidecar = Sidecar::start().await;
    let paginate = pb::Paginate {
        next: Some(pb::paginate::Next::Cursor(pb::PaginationCursor {
            path: "$.meta.next_cursor".into(),
            param: "cursor".into(),
        })),
        items_path: "$.items[*]".into(),
        ..Default::default()
    };
    let reply = sidecar.execute(paginated(&c.upstream.url("/cursor?limit=3"), paginate)).await;
    assert_eq!(reply.outcome(), pb::Outcome::Succeeded, "{reply:?}");
    assert_eq!(ids(&reply.items), all_ids());
    let targets: Vec<String> = c.upstream.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/cursor?limit=3", "/cursor?limit=3&cursor=c2", "/cursor?limit=3&cursor=c3"]);
    assert_eq!(reply.pages.last().unwrap().end(), pb::PaginationEnd::LastPage);
}

#[tokio::test]
async fn a_jsonpath_next_url_is_followed() {
    let c = collection().await;
    let sidecar = Sidecar::start().await;
    let paginate = pb::Paginate {
        next: Some(pb::paginate::Next::NextUrlPath("$.next".into())),
        items_path: "$.results".into(),
        ..Default::default()
    };
    let reply = sidecar.execute(paginated(&c.upstream.url("/next/1"), paginate)).await;
    assert_eq!(ids(&reply.items), all_ids(), "{reply:?}");
    assert_eq!(c.upstream.hits(), 3);
}

#[tokio::test]
async fn a_page_linking_back_ends_the_walk_without_requesting_it_again() {
    let c = collection().await;
    let sidecar = Sidecar::start().await;
    let reply = sidecar.execute(paginated(&c.upstream.url("/loop/1"), by_link("$.data"))).await;
    assert_eq!(reply.outcome(), pb::Outcome::Succeeded, "{reply:?}");
    assert_eq!(plain(&reply.items), [json!(1), json!(2)]);
    assert_eq!(ends(&reply), [pb::PaginationEnd::Unspecified, pb::PaginationEnd::Loop]);
    assert_eq!(c.upstream.hits(), 2, "page 1 is not requested a second time");
}

#[tokio::test]
async fn max_pages_ends_the_walk_with_the_pages_so_far() {
    let c = collection().await;
    let sidecar = Sidecar::start().await;
    let paginate = pb::Paginate { max_pages: Some(4), ..by_link("$.data") };
    let reply = sidecar.execute(paginated(&c.upstream.url("/endless"), paginate)).await;
    assert_eq!(reply.outcome(), pb::Outcome::Succeeded, "{reply:?}");
    assert_eq!(plain(&reply.items), [json!(1), json!(2), json!(3), json!(4)]);
    assert_eq!(reply.pages.last().unwrap().end(), pb::PaginationEnd::MaxPages);
    assert_eq!(c.upstream.hits(), 4);
    // Unset: 10 pages.
    let reply = sidecar.execute(paginated(&c.upstream.url("/endless"), by_link("$.data"))).await;
    assert_eq!(reply.pages.len(), 10);
}

#[tokio::test]
async fn items_past_max_response_bytes_are_dropped_and_the_walk_stops() {
    let c = collection().await;
    let sidecar = Sidecar::start().await;
    // Each item ({"id":1,"name":"item 1"}) is 39 bytes in the reply, each page's body under
    // 100 bytes: five items fit in 200.
    let request = pb::ExecuteHttpActionRequest {
        max_response_bytes: 200,
        ..paginated(&c.upstream.url("/link"), by_link("$.data"))
    };
    let reply = sidecar.execute(request).await;
    assert_eq!(reply.outcome(), pb::Outcome::Succeeded, "{reply:?}");
    assert_eq!(ids(&reply.items), [1, 2, 3, 4, 5]);
    assert_eq!(ends(&reply), [pb::PaginationEnd::Unspecified, pb::PaginationEnd::ItemsCapped]);
    assert_eq!(reply.pages[1].items, 2);
    assert_eq!(c.upstream.hits(), 2, "no page is fetched past the cap");
}

#[tokio::test]
async fn a_failing_page_is_retried_by_the_retry_policy() {
    let c = collection().await;
    let sidecar = Sidecar::start().await;
    let request = pb::ExecuteHttpActionRequest {
        retry: Some(Box::new(fast_retry(3))),
        ..paginated(&c.upstream.url("/flaky"), by_link("$.data"))
    };
    let reply = sidecar.execute(request).await;
    assert_eq!(reply.outcome(), pb::Outcome::Succeeded, "{reply:?}");
    assert_eq!(ids(&reply.items), all_ids(), "the retried page's items once");
    let attempts: Vec<(u32, u32, u32)> =
        reply.attempts.iter().map(|a| (a.page, a.number, a.status)).collect();
    assert_eq!(attempts, [(1, 1, 200), (2, 1, 503), (2, 2, 200), (3, 1, 200)]);
    assert_eq!(reply.pages[1].attempts, 2);
}

#[tokio::test]
async fn a_page_that_fails_fails_the_action_keeping_the_pages_before_it() {
    let c = collection().await;
    let sidecar = Sidecar::start().await;
    let reply = sidecar.execute(paginated(&c.upstream.url("/flaky"), by_link("$.data"))).await;
    assert_eq!(reply.outcome(), pb::Outcome::Failed);
    assert_eq!(error_kind(&reply), pb::ErrorKind::UnexpectedStatus);
    assert_eq!(ids(&reply.items), [1, 2, 3]);
    let pages: Vec<(u32, u32)> = reply.pages.iter().map(|p| (p.number, p.status)).collect();
    assert_eq!(pages, [(1, 200), (2, 503)]);
}

#[tokio::test]
async fn a_next_page_on_a_denied_address_is_refused_and_nothing_is_sent_there() {
    let denied = Upstream::start_on("127.0.0.2:0", |_| async { json(200, json!([9])) }).await;
    let next = denied.url("/page2");
    let upstream = Upstream::start(move |_| {
        let link = format!(r#"<{next}>; rel="next""#);
        async move { with_link(json(200, json!([1])), &link) }
    })
    .await;
    let mut settings = test_settings();
    settings.egress.deny = vec!["127.0.0.2/32".parse().unwrap()];
    let sidecar = Sidecar::start_with(settings).await;
    let reply = sidecar.execute(paginated(&upstream.url("/page1"), by_link(""))).await;
    assert_eq!(reply.outcome(), pb::Outcome::Failed);
    assert_eq!(error_kind(&reply), pb::ErrorKind::DeniedByPolicy, "{reply:?}");
    assert_eq!(plain(&reply.items), [json!(1)]);
    assert_eq!(upstream.hits(), 1);
    assert_eq!(denied.hits(), 0);
}

#[tokio::test]
async fn a_next_page_on_another_origin_goes_without_credentials() {
    let other = Upstream::start(|_| async { json(200, json!([2])) }).await;
    let next = other.url("/page2");
    let upstream = Upstream::start(move |_| {
        let link = format!(r#"<{next}>; rel="next""#);
        async move { with_link(json(200, json!([1])), &link) }
    })
    .await;
    let sidecar = Sidecar::start().await;
    let mut request = paginated(&upstream.url("/page1"), by_link(""));
    request.headers = vec![kv("authorization", "Bearer sekrit"), kv("x-request-tag", "a")];
    let reply = sidecar.execute(request).await;
    assert_eq!(plain(&reply.items), [json!(1), json!(2)], "{reply:?}");
    assert_eq!(upstream.seen()[0].header("authorization").as_deref(), Some("Bearer sekrit"));
    let seen = &other.seen()[0];
    assert_eq!(seen.header("authorization"), None, "credentials stay with their origin");
    assert_eq!(seen.header("x-request-tag").as_deref(), Some("a"));
}

#[tokio::test]
async fn bad_paginate_settings_name_their_field_and_nothing_is_sent() {
    let c = collection().await;
    let sidecar = Sidecar::start().await;
    let url = c.upstream.url("/link");
    let cases = [
        (pb::Paginate { max_pages: Some(0), ..Default::default() }, "paginate.max_pages"),
        (pb::Paginate { max_pages: Some(1001), ..Default::default() }, "paginate.max_pages"),
        (pb::Paginate { items_path: "$.data[".into(), ..Default::default() }, "paginate.items_path"),
        (
            pb::Paginate { next: Some(pb::paginate::Next::NextUrlPath("next".into())), ..Default::default() },
            "paginate.next_url_path",
        ),
        (
            pb::Paginate {
                next: Some(pb::paginate::Next::Cursor(pb::PaginationCursor {
                    path: "$.c".into(),
                    param: "".into(),
                })),
                ..Default::default()
            },
            "paginate.cursor.param",
        ),
    ];
    for (paginate, field) in cases {
        let status = sidecar.try_execute(paginated(&url, paginate)).await.unwrap_err();
        assert_eq!(violated_fields(&status), [field], "{status:?}");
    }
    assert_eq!(c.upstream.hits(), 0);
}

#[tokio::test]
async fn execute_stream_emits_each_page_as_it_arrives() {
    let c = collection().await;
    let sidecar = Sidecar::start().await;
    let events = sidecar.stream(paginated(&c.upstream.url("/link"), by_link("$.data"))).await.unwrap();
    let mut pages = Vec::new();
    let mut started = Vec::new();
    let mut chunks_before_page = HashMap::new();
    let mut current = 0;
    for event in &events {
        match event {
            Event::AttemptStarted(s) => {
                started.push(s.page);
                current = s.page;
            }
            Event::BodyChunk(_) => *chunks_before_page.entry(current).or_insert(0) += 1,
            Event::PageCompleted(p) => {
                let page = p.page.as_ref().unwrap();
                assert_eq!(page.number, current, "a page's events come before its PageCompleted");
                pages.push((page.number, ids(&p.items)));
            }
            _ => {}
        }
    }
    assert_eq!(started, [1, 2, 3]);
    assert_eq!(pages, [(1, vec![1, 2, 3]), (2, vec![4, 5, 6]), (3, vec![7])]);
    assert!((1..=3).all(|p| chunks_before_page.get(&p).is_some_and(|&n| n > 0)), "{chunks_before_page:?}");
    let Some(Event::Completed(done)) = events.last() else { panic!("ends with Completed: {events:?}") };
    let result = done.result.as_ref().unwrap();
    assert_eq!(result.outcome(), pb::Outcome::Succeeded);
    assert!(result.items.is_empty(), "the items came as PageCompleted events");
    assert_eq!(result.pages.len(), 3);
}

#[tokio::test]
async fn callout_exec_walks_a_collection_and_prints_the_items() {
    let c = collection().await;
    let url = c.upstream.url("/cursor");
    let upstream_url = url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_callout"))
            .args(["exec", "--allow-private-networks", &upstream_url])
            .args(["--paginate-cursor", "$.meta.next_cursor=cursor", "--items-path", "$.items"])
            .env_remove("RUST_LOG")
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<u64> =
        printed["items"].as_array().unwrap().iter().filter_map(|i| i["id"].as_u64()).collect();
    assert_eq!(ids, all_ids());
    assert_eq!(printed["pages"].as_array().map(Vec::len), Some(3));
    assert_eq!(printed["pages"][2]["end"], "PAGINATION_END_LAST_PAGE");
    assert_eq!(printed["attempts"][1]["page"], 2);
    assert_eq!(c.upstream.hits(), 3);

    let bad = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_callout"))
            .args(["exec", "--allow-private-networks", &url, "--max-pages", "0"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("paginate.max_pages"));
}

/// A durable paginated action: the record's result carries the items and pages.
async fn a_durable_action_walks_the_collection(kind: Kind) {
    let c = collection().await;
    let server = Server::start(kind, DurableSettings::default()).await;
    let action = pb::ExecuteHttpActionRequest {
        paginate: Some(Box::new(by_link("$.data"))),
        ..durable::action("pages-1", "GET", &c.upstream.url("/flaky"))
    };
    submit(&server.client, action).await;
    let record = until_final(&server.client, "pages-1").await;
    assert_eq!(record.state(), pb::ActionState::Succeeded, "{record:?}");
    let result = record.result.unwrap();
    assert_eq!(ids(&result.items), all_ids());
    assert_eq!(result.pages.len(), 3);
    // Page 2's 503 failed the first durable attempt, which the second repeated from page 1.
    assert_eq!(record.attempts.len(), 2, "{:?}", record.attempts);
    assert_eq!(c.upstream.hits(), 5);
}

/// kill -9 while page 2 is in flight: the restarted server runs the action again from page 1
/// (GET: safe to repeat), and the result holds every item once.
async fn a_kill_during_a_page_walks_again_from_page_one(kind: Kind) {
    let c = collection().await;
    let store = TestStore::new(kind);
    let url = store.url();
    let args = ["--store", url.as_str()];
    let mut first = ServeProcess::spawn(&args, &[LEASE_ENV]).await;
    let client = durable_client(&first).await;
    let action = pb::ExecuteHttpActionRequest {
        paginate: Some(Box::new(by_link("$.data"))),
        ..durable::action("pages-2", "GET", &c.upstream.url("/hang"))
    };
    submit(&client, action).await;
    while c.upstream.hits() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.kill();
    let _ = first.exit_status(Duration::from_secs(10)).await;
    c.release.store(true, Ordering::SeqCst);

    let second = ServeProcess::spawn(&args, &[LEASE_ENV]).await;
    let record = until_final(&durable_client(&second).await, "pages-2").await;
    assert_eq!(record.state(), pb::ActionState::Succeeded, "{record:?}");
    let result = record.result.unwrap();
    assert_eq!(ids(&result.items), all_ids(), "every item once");
    assert_eq!(result.pages.len(), 3);
    let targets: Vec<String> = c.upstream.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/hang", "/hang?page=2", "/hang", "/hang?page=2", "/hang?page=3"]);
}

mod sqlite {
    use super::*;
    #[tokio::test]
    async fn a_durable_action_walks_the_collection() {
        super::a_durable_action_walks_the_collection(Kind::Sqlite).await
    }
    #[tokio::test]
    async fn a_kill_during_a_page_walks_again_from_page_one() {
        super::a_kill_during_a_page_walks_again_from_page_one(Kind::Sqlite).await
    }
}

mod postgres {
    use super::*;
    #[tokio::test]
    async fn a_durable_action_walks_the_collection() {
        super::a_durable_action_walks_the_collection(Kind::Postgres).await
    }
    #[tokio::test]
    async fn a_kill_during_a_page_walks_again_from_page_one() {
        super::a_kill_during_a_page_walks_again_from_page_one(Kind::Postgres).await
    }
}
