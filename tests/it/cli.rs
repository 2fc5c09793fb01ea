//! `callout exec`, the real binary: exit codes (0 proceed, 1 stop, 2 invalid), the proto3 JSON
//! it prints (grpcurl's form of the same reply), and what reaches a loopback upstream.
use crate::support::*;
use serde_json::Value;
use std::{
    process::{Command, Output},
    time::Duration,
};

/// Runs `callout exec ARGS...` off the runtime's threads (the upstream keeps serving) and
/// returns its output.
async fn exec(args: &[&str]) -> Output {
    // Test upstreams are on loopback, which the egress policy denies by default.
    callout_exec(&["--allow-private-networks"], args).await
}

/// `callout exec FIRST... ARGS...`, off the runtime's threads, with no log filter and no proxy
/// from the test's own environment (upstreams are on loopback).
pub(crate) async fn callout_exec(first: &[&str], args: &[&str]) -> Output {
    let args: Vec<String> = first.iter().chain(args).map(|a| a.to_string()).collect();
    let run = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_callout"))
            .arg("exec")
            .args(&args)
            .env_remove("RUST_LOG")
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .output()
            .expect("callout runs")
    });
    tokio::time::timeout(Duration::from_secs(60), run).await.expect("callout exec finishes").unwrap()
}

/// The outcome JSON printed on stdout.
fn printed(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test]
async fn expected_status_succeeds_with_exit_0() {
    let upstream = Upstream::start(|_| async { json(201, serde_json::json!({ "id": 1 })) }).await;
    let url = upstream.url("/orders");
    let out = exec(&["POST", &url, "-H", "X-Token: t", "--json", r#"{"id":1}"#, "--expect", "201"]).await;
    let printed = printed(&out);

    assert_eq!(out.status.code(), Some(0), "{printed:#}");
    // The proto3 JSON of the reply, as grpcurl prints it.
    assert_eq!(printed["outcome"], "OUTCOME_SUCCEEDED");
    assert_eq!(printed["proceed"], true);
    assert!(printed["error"].is_null());
    assert_eq!(printed["response"]["status"], 201);
    assert_eq!(printed["response"]["bodyJson"], serde_json::json!({ "id": 1 }));
    assert_eq!(printed["attempts"].as_array().map(Vec::len), Some(1));
    assert!(printed["timing"]["total"].as_str().is_some_and(|t| t.ends_with('s')), "{printed:#}");

    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].target, "/orders");
    assert_eq!(seen[0].body, r#"{"id":1}"#);
    assert_eq!(seen[0].header("content-type").as_deref(), Some("application/json"));
    assert_eq!(seen[0].header("x-token").as_deref(), Some("t"));
}

/// The exit status follows `proceed`, as in both example clients: a failure the workflow goes on
/// past (`--on-failure continue`) exits 0.
#[tokio::test]
async fn a_failure_under_on_failure_continue_exits_0() {
    let upstream = Upstream::fixed(500, "down").await;
    let url = upstream.url("/orders");
    let out = exec(&["GET", &url, "--attempts", "1", "--on-failure", "continue"]).await;
    let printed = printed(&out);
    assert_eq!(out.status.code(), Some(0), "{printed:#}");
    assert_eq!(printed["outcome"], "OUTCOME_FAILED");
    assert_eq!(printed["proceed"], true);
}

#[tokio::test]
async fn other_status_fails_with_exit_1() {
    let upstream = Upstream::fixed(200, "ok").await;
    let url = upstream.url("/orders");
    let out = exec(&["POST", &url, "-H", "X-Token: t", "--json", r#"{"id":1}"#, "--expect", "201"]).await;
    let printed = printed(&out);

    assert_eq!(out.status.code(), Some(1), "{printed:#}");
    assert_eq!(printed["outcome"], "OUTCOME_FAILED");
    // proto3 JSON leaves a field at its default out, as grpcurl does without -emit-defaults.
    assert!(printed.get("proceed").is_none(), "{printed:#}");
    assert_eq!(printed["error"]["kind"], "ERROR_KIND_UNEXPECTED_STATUS");
    assert_eq!(printed["response"]["status"], 200);
    assert_eq!(printed["response"]["bodyText"], "ok");
    // 200 is not a retryable status: one request.
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn invalid_call_exits_2_naming_the_fields() {
    let out = exec(&["FETCH", "ftp://x"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);

    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("method"), "stderr: {stderr}");
    assert!(stderr.contains("url"), "stderr: {stderr}");
    assert!(out.stdout.is_empty(), "stdout: {}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test]
async fn invalid_call_sends_nothing() {
    let upstream = Upstream::fixed(200, "ok").await;
    let url = upstream.url("/orders");
    let out = exec(&["FETCH", &url, "--json", "{not json"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);

    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("method"), "stderr: {stderr}");
    assert!(stderr.contains("json"), "stderr: {stderr}");
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn form_fields_are_sent_urlencoded() {
    let upstream = Upstream::fixed(200, "ok").await;
    let url = upstream.url("/form");
    let out = exec(&["POST", &url, "--form", "a=1", "--form", "b=x y"]).await;

    assert_eq!(out.status.code(), Some(0), "{:#}", printed(&out));
    let seen = upstream.seen();
    assert_eq!(seen[0].body, "a=1&b=x+y");
    assert_eq!(seen[0].header("content-type").as_deref(), Some("application/x-www-form-urlencoded"));
}

#[tokio::test]
async fn query_values_are_percent_encoded() {
    let upstream = Upstream::fixed(200, "ok").await;
    let url = upstream.url("/search");
    let out = exec(&["GET", &url, "-q", "k=a b"]).await;

    assert_eq!(out.status.code(), Some(0), "{:#}", printed(&out));
    assert_eq!(upstream.seen()[0].target, "/search?k=a%20b");
}

/// curl's habits: -X METHOD with the URL alone, POST by default when a body is given, GET
/// otherwise; durations as plain seconds; -o FILE instead of stdout.
#[tokio::test]
async fn curl_style_method_seconds_and_output_file() {
    let upstream = Upstream::fixed(200, "ok").await;
    let url = upstream.url("/x");
    let out = exec(&["-X", "PUT", &url, "--timeout", "2.5", "--connect-timeout", "500ms"]).await;
    assert_eq!(out.status.code(), Some(0), "{:#}", printed(&out));
    let out = exec(&[&url, "--json", "{}"]).await;
    assert_eq!(out.status.code(), Some(0), "{:#}", printed(&out));
    let out = exec(&[&url]).await;
    assert_eq!(out.status.code(), Some(0), "{:#}", printed(&out));
    let methods: Vec<String> = upstream.seen().iter().map(|r| r.method.clone()).collect();
    assert_eq!(methods, ["PUT", "POST", "GET"]);

    let dir = std::env::temp_dir().join(format!("callout-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("outcome.json");
    let out = exec(&[&url, "-o", file.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty(), "-o: nothing on stdout");
    let written: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(written["outcome"], "OUTCOME_SUCCEEDED");
    let _ = std::fs::remove_dir_all(&dir);

    // Both a METHOD argument and -X, or a duration in no known form: exit 2, nothing sent.
    let before = upstream.seen().len();
    for args in [&["-X", "PUT", "GET", &url][..], &[&url, "--timeout", "soon"]] {
        let out = exec(args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(upstream.seen().len(), before);
}

/// -k turns certificate checks off, and says so loudly on stderr.
#[tokio::test]
async fn insecure_warns_on_stderr() {
    let upstream = Upstream::fixed(200, "ok").await;
    let out = exec(&["-k", &upstream.url("/")]).await;
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--insecure") && stderr.contains("not verified"), "{stderr}");
}

#[tokio::test]
async fn include_prints_the_response_as_curl_i_does() {
    let upstream = Upstream::start(|_| async {
        let mut reply = json(404, serde_json::json!({ "missing": "order" }));
        reply.headers_mut().insert("x-request-id", http::HeaderValue::from_static("r-7"));
        reply
    })
    .await;
    let out = exec(&["-i", &upstream.url("/orders/9")]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);

    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let (head, body) = stdout.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no blank line:\n{stdout}"));
    let mut lines = head.split("\r\n");
    assert_eq!(lines.next(), Some("HTTP/1.1 404 Not Found"), "{stdout}");
    assert!(lines.any(|l| l.eq_ignore_ascii_case("x-request-id: r-7")), "{stdout}");
    assert_eq!(serde_json::from_str::<Value>(body).ok(), Some(serde_json::json!({ "missing": "order" })));
    assert!(stderr.contains("UNEXPECTED_STATUS"), "the failure is on stderr: {stderr}");
    assert!(!stdout.contains("OUTCOME_"), "no outcome JSON with -i: {stdout}");
}

#[tokio::test]
async fn workflow_flags_extract_check_and_shape_the_reply() {
    let upstream = Upstream::start(|_| async { json(200, serde_json::json!({"items": [{"id": 7}]})) }).await;
    let url = upstream.url("/items");
    let out = exec(&[
        &url,
        "--extract",
        "id=$.items[0].id",
        "--success-condition",
        "body.items.size() == 1",
        "--reply-body",
        "raw",
    ])
    .await;
    let printed = printed(&out);
    assert_eq!(out.status.code(), Some(0), "{printed:#}");
    assert_eq!(printed["extracted"]["id"], 7);
    assert!(
        printed["response"]["bodyJson"].is_null() && printed["response"]["body"].is_string(),
        "{printed:#}"
    );

    let out = exec(&[&url, "--success-condition", "body.items.size() == 2"]).await;
    let failed = super::cli::printed(&out);
    assert_eq!(out.status.code(), Some(1), "{failed:#}");
    assert_eq!(failed["error"]["kind"], "ERROR_KIND_CONDITION_FAILED");

    let hits = upstream.hits();
    let out = exec(&[&url, "--retry-condition", "body.items[0"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("retry_condition") && stderr.contains("line 1, column"), "stderr: {stderr}");
    assert_eq!(upstream.hits(), hits, "nothing sent");
}

/// `--var` gives a string, `--var-json` a typed value; each is rendered for where it stands.
#[tokio::test]
async fn vars_flags_render_strings_and_typed_values() {
    let upstream = Upstream::fixed(200, "ok").await;
    let url = upstream.url("/orders/{{vars.ref}}");
    let out = exec(&[
        "POST",
        &url,
        "--json",
        r#"{"n":"{{vars.n}}","who":"{{vars.ref}}","tags":"{{vars.tags}}"}"#,
        "--var",
        "ref=a/b c",
        "--var-json",
        "n=7",
        "--var-json",
        r#"tags=["x",{"y":true}]"#,
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "{:#}", printed(&out));
    let seen = upstream.seen();
    assert_eq!(seen[0].target, "/orders/a%2Fb%20c");
    let body: Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(body, serde_json::json!({"n": 7, "who": "a/b c", "tags": ["x", {"y": true}]}));

    // An unknown variable and a --var-json that is not JSON: exit 2, nothing sent.
    let out = exec(&["GET", &upstream.url("/o/{{vars.nope}}")]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("url") && stderr.contains("nope"), "stderr: {stderr}");
    let out = exec(&["GET", &upstream.url("/o"), "--var-json", "x={bad"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("--var-json x"), "stderr: {stderr}");
    assert_eq!(upstream.hits(), 1, "nothing sent for the invalid calls");
}
