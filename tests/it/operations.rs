//! Operations, against the real `callout serve` binary: Prometheus metrics after real actions,
//! the SIGTERM drain (health NOT_SERVING, new calls UNAVAILABLE, in-flight actions finish or are
//! cut off with a CANCELLED reply at the drain timeout, exit 0), and configuration layering
//! (file < environment < flags) with bad keys named.
use crate::support::*;
use callout::pb::{self, http_action_service_client::HttpActionServiceClient};
use std::{
    process::{Command, Output},
    time::{Duration, Instant},
};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

#[tokio::test]
async fn metrics_count_real_actions_by_outcome_status_class_and_host() {
    let ok = Upstream::fixed(200, "ok").await;
    let down = Upstream::fixed(503, "down").await;
    let serve = ServeProcess::spawn(&[], &[]).await;
    let mut client = HttpActionServiceClient::new(serve.channel().await);
    for _ in 0..2 {
        client.execute(request("GET", &ok.url("/"))).await.unwrap();
    }
    let mut failing = request("GET", &down.url("/"));
    failing.retry = Some(Box::new(fast_retry(2)));
    client.execute(failing).await.unwrap();

    let text = http_get(serve.metrics.as_deref().expect("metrics on"), "/metrics").await;
    let ok_host = format!("host=\"{}\"", ok.addr);
    let down_host = format!("host=\"{}\"", down.addr);
    let get = |name: &str, labels: &[&str]| {
        sample(&text, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} in\n{text}"))
    };
    assert_eq!(
        get("callout_actions_total", &["outcome=\"succeeded\"", "error_kind=\"none\"", &ok_host]),
        2.0
    );
    assert_eq!(
        get("callout_actions_total", &["outcome=\"failed\"", "error_kind=\"unexpected_status\"", &down_host]),
        1.0
    );
    assert_eq!(get("callout_upstream_responses_total", &["class=\"2xx\"", &ok_host]), 2.0);
    assert_eq!(get("callout_upstream_responses_total", &["class=\"5xx\"", &down_host]), 2.0);
    assert_eq!(get("callout_attempts_total", &[&down_host]), 2.0);
    assert_eq!(get("callout_retries_total", &[&down_host]), 1.0);
    assert_eq!(get("callout_action_duration_seconds_count", &[&ok_host]), 2.0);
    assert_eq!(get("callout_first_byte_seconds_count", &[&down_host]), 2.0);
    assert_eq!(get("callout_actions_in_flight", &[]), 0.0);
    assert_eq!(get("callout_upstream_connections_opened_total", &[]), 2.0, "one per upstream: pooled");
    assert!(text.contains("# HELP callout_actions_total"), "described");
    assert!(!text.contains("/x") && !text.contains("http://"), "no URLs in labels");
}

/// Every series the README's Operations section names is scraped before any action ran (at
/// zero), with the build info, the process series and buckets that reach 30 days.
#[tokio::test]
async fn every_documented_series_is_there_from_the_start() {
    let readme = include_str!("../../README.md");
    let section = readme.split("- **Metrics**").nth(1).expect("the README's Metrics item");
    let section = section.split("\n- **").next().unwrap_or(section);
    let mut documented: Vec<&str> = section
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("callout_"))
        .collect();
    documented.sort_unstable();
    documented.dedup();
    assert!(documented.len() >= 10, "{documented:?}");

    let serve = ServeProcess::spawn(&[], &[]).await;
    let text = http_get(serve.metrics.as_deref().expect("metrics on"), "/metrics").await;
    let present = |name: &str| {
        text.lines().any(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']) || rest.starts_with("_count"))
        })
    };
    let missing: Vec<&&str> = documented.iter().filter(|name| !present(name)).collect();
    assert!(missing.is_empty(), "documented but not scraped at start: {missing:?}\n{text}");
    for (name, labels) in [
        ("callout_actions_refused_total", &["reason=\"queue_full\""][..]),
        ("callout_actions_refused_total", &["reason=\"draining\""]),
        ("callout_body_budget_refused_total", &["reason=\"too_large\""]),
        ("callout_actions_total", &["host=\"other\""]),
    ] {
        assert_eq!(sample(&text, name, labels), Some(0.0), "{name} {labels:?} at zero:\n{text}");
    }
    let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
    assert_eq!(sample(&text, "callout_build_info", &[&version]), Some(1.0), "{text}");
    for name in ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"] {
        assert!(sample(&text, name, &[]).is_some_and(|v| v >= 0.0), "{name}:\n{text}");
    }
    assert!(sample(&text, "process_resident_memory_bytes", &[]).unwrap_or(0.0) > 0.0);
    // A whole action may take as long as its total timeout, up to 30 days.
    let month = "le=\"2592000\"";
    assert!(sample(&text, "callout_action_duration_seconds_bucket", &[month]).is_some(), "{text}");
}

#[tokio::test]
async fn sigterm_drains_in_flight_actions_refuses_new_ones_and_exits_0() {
    let slow = Upstream::start(|_| async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        text(200, "slow but fine")
    })
    .await;
    let mut serve = ServeProcess::spawn(&["--drain-timeout", "10s"], &[]).await;
    let channel = serve.channel().await;
    let in_flight = {
        let mut client = HttpActionServiceClient::new(channel.clone());
        let req = request("GET", &slow.url("/"));
        tokio::spawn(async move { client.execute(req).await })
    };
    while slow.hits() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    serve.terminate();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let refused =
        HttpActionServiceClient::new(channel.clone()).execute(request("GET", &slow.url("/new"))).await;
    let refused = refused.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    let details = tonic_types::StatusExt::get_error_details(&refused);
    assert_eq!(details.retry_info().and_then(|r| r.retry_delay), Some(Duration::from_secs(1)), "{details:?}");
    assert_eq!(
        details.error_info().map(|i| (i.reason.as_str(), i.domain.as_str())),
        Some(("DRAINING", "callout"))
    );
    let health =
        HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(health.into_inner().status(), ServingStatus::NotServing, "readiness reflects the drain");

    let finished = in_flight.await.unwrap().expect("the in-flight action finishes").into_inner();
    assert_eq!(finished.outcome(), pb::Outcome::Succeeded);
    let status = serve.exit_status(Duration::from_secs(10)).await.expect("exits after the drain");
    assert!(status.success(), "{status:?}\n{}", serve.logs());
    assert_eq!(slow.hits(), 1, "the refused call sent nothing");
    assert!(serve.logs().contains("drained"), "{}", serve.logs());
}

#[tokio::test]
async fn the_drain_timeout_bounds_shutdown() {
    let stuck = Upstream::start(|_| async {
        tokio::time::sleep(Duration::from_secs(20)).await;
        text(200, "too late")
    })
    .await;
    let mut serve = ServeProcess::spawn(&["--drain-timeout", "300ms"], &[]).await;
    let mut client = HttpActionServiceClient::new(serve.channel().await);
    let _call = tokio::spawn(async move { client.execute(request("GET", &stuck.url("/"))).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    serve.terminate();
    let status = serve.exit_status(Duration::from_secs(8)).await.expect("exits despite the stuck action");
    assert!(status.success());
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert!(serve.logs().contains("drain timeout passed"), "{}", serve.logs());
}

/// When the drain timeout runs out, every action still running gets a real reply, not a
/// transport error: outcome FAILED, error CANCELLED, and a message saying whether the request
/// may have been sent (the upstream did receive the running ones; the queued one it never saw).
/// The stream ends with `completed`. Invalid calls during the drain are refused UNAVAILABLE
/// before validation. The process exits by the drain timeout.
#[tokio::test]
async fn actions_cut_off_by_the_drain_timeout_get_a_cancelled_reply() {
    let stuck = Upstream::start(|_| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        text(200, "too late")
    })
    .await;
    let mut serve = ServeProcess::spawn(&["--drain-timeout", "2s", "--max-in-flight", "2"], &[]).await;
    let channel = serve.channel().await;
    let unary = {
        let mut client = HttpActionServiceClient::new(channel.clone());
        let mut req = request("POST", &stuck.url("/unary"));
        req.body = Some(pb::execute_http_action_request::Body::Json(r#"{"order":1}"#.into()));
        tokio::spawn(async move { client.execute(req).await })
    };
    let streamed = {
        let mut client = HttpActionServiceClient::new(channel.clone());
        let req = request("GET", &stuck.url("/stream"));
        tokio::spawn(async move {
            let mut stream = client.execute_stream(req).await?.into_inner();
            let mut events = Vec::new();
            while let Some(event) = stream.message().await? {
                events.push(event.event.expect("event set"));
            }
            Ok::<_, tonic::Status>(events)
        })
    };
    while stuck.hits() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Both running slots are taken: this one waits in the queue and sends nothing.
    let queued = {
        let mut client = HttpActionServiceClient::new(channel.clone());
        let req = request("GET", &stuck.url("/queued"));
        tokio::spawn(async move { client.execute(req).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    serve.terminate();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = HttpActionServiceClient::new(channel.clone()).execute(request("GET", "not a url")).await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::Unavailable, "refused before validation");

    let unary = unary.await.unwrap().expect("a reply, not a transport error").into_inner();
    assert_eq!(unary.outcome(), pb::Outcome::Failed, "{unary:?}");
    assert_eq!(error_kind(&unary), pb::ErrorKind::Cancelled, "{unary:?}");
    let message = &unary.error.as_ref().unwrap().message;
    assert!(message.contains("shut down during attempt 1"), "{message}");
    assert!(message.contains("may have been sent"), "{message}");
    assert_eq!(unary.attempts.len(), 1, "the cut-off attempt is listed: {unary:?}");
    let cut = unary.attempts[0].error.as_ref().expect("the attempt's error");
    assert_eq!(cut.kind(), pb::ErrorKind::Cancelled);

    let events = streamed.await.unwrap().expect("the stream ends cleanly");
    let Some(pb::action_event::Event::Completed(done)) = events.last() else {
        panic!("the stream ends with completed: {events:?}");
    };
    let result = done.result.as_ref().expect("completed carries the result");
    assert_eq!(result.outcome(), pb::Outcome::Failed, "{result:?}");
    assert_eq!(error_kind(result), pb::ErrorKind::Cancelled, "{result:?}");
    let message = &result.error.as_ref().unwrap().message;
    assert!(message.contains("during attempt 1") && message.contains("may have been sent"), "{message}");
    assert!(
        events.iter().any(|e| matches!(e, pb::action_event::Event::AttemptFailed(f) if !f.will_retry)),
        "the cut-off attempt is reported: {events:?}"
    );

    let queued = queued.await.unwrap().expect("a reply, not a transport error").into_inner();
    assert_eq!(error_kind(&queued), pb::ErrorKind::Cancelled, "{queued:?}");
    let message = &queued.error.as_ref().unwrap().message;
    assert!(message.contains("before any request was sent"), "{message}");
    assert!(queued.attempts.is_empty(), "{queued:?}");

    let status = serve.exit_status(Duration::from_secs(15)).await.expect("exits by the drain timeout");
    assert!(status.success(), "{status:?}\n{}", serve.logs());
    let targets: Vec<String> = stuck.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(
        targets.len(),
        2,
        "the running two were sent, the queued one and the refused one not: {targets:?}"
    );
    assert!(targets.contains(&"/unary".to_owned()) && targets.contains(&"/stream".to_owned()), "{targets:?}");
    assert!(serve.logs().contains("cutting off"), "{}", serve.logs());
}

fn callout(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_callout"));
    command.args(args).env_remove("RUST_LOG");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

fn config_file(test: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("callout-{test}-{}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn config_layers_file_then_environment_then_flags() {
    let path = config_file(
        "layers",
        "[limits]\nmax_in_flight = 10\nmax_queued = 20\nbreaker_failures = 3\n[client]\nproxy = \"http://u:s3cret@proxy.test:3128\"\n",
    );
    let out = callout(
        &["config", "print", "--config", path.to_str().unwrap(), "--breaker-failures", "5"],
        &[
            ("CALLOUT_LIMITS__MAX_QUEUED", "30"),
            ("CALLOUT_LIMITS__BREAKER_FAILURES", "4"),
            // A secrets prefix of the same family is not mistaken for a config key.
            ("CALLOUT_SECRET_TOKEN", "x"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: toml::Value = toml::from_str(&stdout).unwrap();
    let limits = &printed["limits"];
    assert_eq!(limits["max_in_flight"].as_integer(), Some(10), "from the file");
    assert_eq!(limits["max_queued"].as_integer(), Some(30), "the environment overrides the file");
    assert_eq!(limits["breaker_failures"].as_integer(), Some(5), "a flag overrides both");
    assert_eq!(limits["max_in_flight_per_host"].as_integer(), Some(64), "defaults fill the rest");
    assert!(!stdout.contains("s3cret") && stdout.contains("<redacted>@proxy.test"), "{stdout}");
    std::fs::remove_file(path).unwrap();
}

#[test]
fn bad_configuration_fails_at_start_naming_the_key() {
    let path = config_file("bad-key", "[limits]\nmax_in_flihgt = 10\n");
    let out = callout(&["serve", "--config", path.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("max_in_flihgt"), "{stderr}");
    std::fs::remove_file(path).unwrap();

    let out = callout(&["serve"], &[("CALLOUT_LIMITS__MAX_IN_FLIGHT", "many")]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_ascii_lowercase();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("limits.max_in_flight") && stderr.contains("environment"), "{stderr}");

    let out = callout(&["serve", "--config", "/nonexistent/callout.toml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/callout.toml"));
}

#[test]
fn a_bad_value_names_its_key_and_where_it_came_from() {
    // From the file: the key and the file's path.
    let path = config_file("bad-value", "[limits]\nmax_in_flight = 0\n");
    let out = callout(&["serve", "--config", path.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("limits.max_in_flight: must be at least 1"), "{stderr}");
    // figment may show the path relative to the working directory: look for the file's name.
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    assert!(stderr.contains("TOML file ") && stderr.contains(&name), "{stderr}");
    std::fs::remove_file(path).unwrap();

    // From the environment: the key and the variable.
    let out = callout(&["serve"], &[("CALLOUT_SERVER__WORKER_THREADS", "5000")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("server.worker_threads: must be at most 1024"), "{stderr}");
    assert!(stderr.contains("environment variable CALLOUT_SERVER__WORKER_THREADS"), "{stderr}");

    // From a flag: the key and that a flag set it, also for keys that only go together.
    for (flags, key) in [
        (&["--max-request-bytes", "100"][..], "server.max_request_bytes: must be from 4096"),
        (&["--tls-key", "/nonexistent/key.pem"][..], "server.tls_key: "),
        (&["--sensitive-header", "a b"][..], "server.sensitive_headers: \"a b\" is not a header name"),
        (&["--store", "mysql://db"][..], "store.url: "),
    ] {
        let out = callout(&[&["config", "print"][..], flags].concat(), &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains(key) && stderr.contains("(from command-line flags)"), "{flags:?}: {stderr}");
    }

    // A file a key names that cannot be read stops the server, naming the key and its source.
    let out = callout(
        &["serve", "--listen", "127.0.0.1:0", "--no-metrics", "--store", "off"],
        &[("CALLOUT_CLIENT__CA_FILE", "/nonexistent/ca.pem")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("client.ca_file: cannot read /nonexistent/ca.pem")
            && stderr.contains("environment variable CALLOUT_CLIENT__CA_FILE"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_callers_trace_continues_to_the_upstream() {
    let upstream = Upstream::fixed(200, "ok").await;
    let sidecar = Sidecar::start().await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let traced = |req: pb::ExecuteHttpActionRequest| {
        let mut request = tonic::Request::new(req);
        request.metadata_mut().insert("traceparent", parent.parse().unwrap());
        request.metadata_mut().insert("tracestate", "congo=t61rcWkgMzE".parse().unwrap());
        request
    };
    let mut retried = request("GET", &upstream.url("/a"));
    retried.retry = Some(Box::new(fast_retry(1)));
    sidecar.client.clone().execute(traced(retried)).await.unwrap();
    let seen = &upstream.seen()[0];
    let sent = seen.header("traceparent").expect("traceparent sent upstream");
    assert!(sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{sent}");
    assert!(sent.ends_with("-01") && !sent.contains("00f067aa0ba902b7"), "a new span id: {sent}");
    assert_eq!(seen.header("tracestate").as_deref(), Some("congo=t61rcWkgMzE"));

    // The action's own traceparent header wins; without caller context none is invented.
    let mut own = request("GET", &upstream.url("/b"));
    own.headers = vec![kv("traceparent", "00-11111111111111111111111111111111-2222222222222222-00")];
    sidecar.client.clone().execute(traced(own)).await.unwrap();
    assert_eq!(
        upstream.seen()[1].header("traceparent").as_deref(),
        Some("00-11111111111111111111111111111111-2222222222222222-00")
    );
    sidecar.execute(request("GET", &upstream.url("/c"))).await;
    assert_eq!(upstream.seen()[2].header("traceparent"), None);
}

#[tokio::test]
async fn json_logs_carry_one_line_per_action_with_its_fields() {
    let upstream = Upstream::fixed(201, "made").await;
    let serve = ServeProcess::spawn(&["--log-format", "json", "--log-actions", "all"], &[]).await;
    let mut client = HttpActionServiceClient::new(serve.channel().await);
    let mut req = request("POST", &upstream.url("/orders"));
    req.action_id = "wf-7/step-2".into();
    req.tenant = "acme".into();
    let mut req = tonic::Request::new(req);
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    req.metadata_mut().insert("traceparent", parent.parse().unwrap());
    client.execute(req).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let logs = serve.logs();
    let line = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "action finished")
        .unwrap_or_else(|| panic!("a JSON line per action:\n{logs}"));
    assert_eq!(line["action_id"], "wf-7/step-2");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["status"], 201);
    assert_eq!(line["outcome"], "SUCCEEDED");
    assert_eq!(line["destination"], upstream.addr.to_string());
    assert!(line["duration_ms"].is_u64(), "whole milliseconds: {line}");
    assert_eq!(line["tenant"], "acme");
    assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736", "the caller's trace: {line}");
    // At info the action's span is not made (nothing but this line would log in it, and the
    // line has its fields): the fields once, with no span object or list beside them.
    assert!(line.get("span").is_none() && line.get("spans").is_none(), "{line}");
}

/// By default only failed actions are logged: a line per success is an access log, asked for
/// with `log.actions = "all"`; `off` logs none.
#[tokio::test]
async fn by_default_only_failed_actions_are_logged() {
    let ok = Upstream::fixed(200, "fine").await;
    let down = Upstream::fixed(500, "down").await;
    let finished = |logs: &str| -> Vec<serde_json::Value> {
        logs.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["message"] == "action finished")
            .collect()
    };
    for (args, want_ok, want_failed) in
        [(&["--log-format", "json"][..], 0, 1), (&["--log-format", "json", "--log-actions", "off"][..], 0, 0)]
    {
        let serve = ServeProcess::spawn(args, &[]).await;
        let mut client = HttpActionServiceClient::new(serve.channel().await);
        let mut good = request("GET", &ok.url("/fine"));
        good.action_id = "fine-1".into();
        let mut bad = request("GET", &down.url("/down"));
        bad.action_id = "down-1".into();
        bad.retry = Some(Box::new(fast_retry(1)));
        client.execute(good).await.unwrap();
        client.execute(bad).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let logs = serve.logs();
        let lines = finished(&logs);
        let count = |id: &str| lines.iter().filter(|l| l["action_id"] == id).count();
        assert_eq!(count("fine-1"), want_ok, "{args:?}: succeeded action lines:\n{logs}");
        assert_eq!(count("down-1"), want_failed, "{args:?}: failed action lines:\n{logs}");
        if want_failed == 1 {
            let line = lines.iter().find(|l| l["action_id"] == "down-1").unwrap();
            assert_eq!(line["outcome"], "FAILED");
            assert_eq!(line["status"], 500);
        }
    }
}

/// The names of the process's threads (`/proc/PID/task/*/comm`).
fn thread_names(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect()
}

/// Connections dealt to `core` as of `text`.
fn dealt(text: &str, core: usize) -> Option<f64> {
    sample(text, "callout_caller_connections_total", &[&format!("core=\"{core}\"")])
}

/// `server.worker_threads` and `server.runtime` lay out the runtimes. One worker is the
/// single-thread scheduler. N per-core (the default layout) are N current-thread runtimes, the
/// others on threads `callout-core-1` onwards, with callers' connections dealt out to them in
/// turn (so six connections are two a core), every call on each answered, and each core with an
/// upstream pool of its own. N work-stealing is one scheduler of N `callout-worker` threads
/// serving every connection from one pool.
#[tokio::test]
async fn worker_threads_and_runtime_lay_out_the_runtimes() {
    let upstream = Upstream::fixed(200, "ok").await;
    let layouts: [(&[&str], usize, usize, &str); 3] = [
        (&["--worker-threads", "1"], 1, 1, "PerCore"),
        (&["--worker-threads", "3"], 3, 3, "PerCore"),
        (&["--worker-threads", "3", "--runtime", "work-stealing"], 3, 1, "WorkStealing"),
    ];
    for (args, workers, cores, layout) in layouts {
        let serve = ServeProcess::spawn(args, &[]).await;
        let metrics = serve.metrics.clone().expect("metrics on");
        let before = http_get(&metrics, "/metrics").await;
        for _ in 0..6 {
            let mut client = HttpActionServiceClient::new(serve.channel().await);
            let reply = client.execute(request("GET", &upstream.url("/"))).await.unwrap().into_inner();
            assert_eq!(reply.outcome(), pb::Outcome::Succeeded, "{args:?}: {reply:?}");
        }
        let after = http_get(&metrics, "/metrics").await;
        for core in 0..cores {
            let got = dealt(&after, core).unwrap_or_else(|| panic!("{args:?}: core {core} in\n{after}"));
            let was = dealt(&before, core).unwrap_or(0.0);
            assert_eq!(got - was, (6 / cores) as f64, "{args:?}: connections dealt to core {core}\n{after}");
        }
        assert_eq!(dealt(&after, cores), None, "{args:?}: no core {cores}\n{after}");
        // Each core has its own upstream pool: one connection opened per core, then reused.
        let opened =
            |text: &str| sample(text, "callout_upstream_connections_opened_total", &[]).unwrap_or(0.0);
        assert_eq!(opened(&after) - opened(&before), cores as f64, "{args:?}: upstream connections\n{after}");

        // Core 0 is the main thread; each core's blocking threads carry its name too.
        let threads = thread_names(serve.pid());
        let mut core_threads: Vec<&str> = threads
            .iter()
            .map(String::as_str)
            .filter(|t| t.starts_with("callout-core-") && *t != "callout-core-0")
            .collect();
        core_threads.sort_unstable();
        core_threads.dedup();
        let want: Vec<String> = (1..cores).map(|core| format!("callout-core-{core}")).collect();
        assert_eq!(core_threads, want, "{args:?}: {threads:?}");
        let stealing = threads.iter().filter(|t| *t == "callout-worker").count();
        match layout {
            "WorkStealing" => assert!(stealing >= workers, "{args:?}: {threads:?}"),
            _ => assert_eq!(stealing, 0, "{args:?}: {threads:?}"),
        }
        let logs = serve.logs();
        let start = logs.lines().find(|l| l.contains("callout serving")).unwrap();
        assert!(start.contains(&format!("workers={workers}")), "{start}");
        assert!(start.contains(&format!("runtime={layout}")), "{start}");
    }
}

/// Per-core runtimes share one set of limits: with one running slot and no queue, an action on
/// another core's connection is refused while the first runs, as on one runtime.
#[tokio::test]
async fn per_core_runtimes_share_the_limits() {
    let slow = Upstream::start(|_| async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        text(200, "slow")
    })
    .await;
    let serve =
        ServeProcess::spawn(&["--worker-threads", "2", "--max-in-flight", "1", "--max-queued", "0"], &[])
            .await;
    let metrics = serve.metrics.clone().expect("metrics on");
    let (first, second) = (serve.channel().await, serve.channel().await);
    let running = {
        let mut client = HttpActionServiceClient::new(first);
        let req = request("GET", &slow.url("/first"));
        tokio::spawn(async move { client.execute(req).await })
    };
    while slow.hits() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = HttpActionServiceClient::new(second).execute(request("GET", &slow.url("/second"))).await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::ResourceExhausted, "the one slot is taken");
    let ran = running.await.unwrap().unwrap().into_inner();
    assert_eq!(ran.outcome(), pb::Outcome::Succeeded);
    assert_eq!(slow.hits(), 1, "the refused action sent nothing");
    let text = http_get(&metrics, "/metrics").await;
    assert!(
        dealt(&text, 0).unwrap() >= 1.0 && dealt(&text, 1).unwrap() >= 1.0,
        "both cores took one\n{text}"
    );
}

/// SIGTERM drains every core: an action running on each core's connection finishes, one still
/// running at the drain timeout is answered CANCELLED from its core, and the process exits 0.
#[tokio::test]
async fn the_drain_covers_every_core() {
    let upstream = Upstream::start(|req| async move {
        let wait = if req.target == "/stuck" { 60_000 } else { 1_200 };
        tokio::time::sleep(Duration::from_millis(wait)).await;
        text(200, "late")
    })
    .await;
    let mut serve = ServeProcess::spawn(&["--worker-threads", "2", "--drain-timeout", "3s"], &[]).await;
    let mut calls = Vec::new();
    for path in ["/slow", "/slow", "/stuck", "/stuck"] {
        let mut client = HttpActionServiceClient::new(serve.channel().await);
        let req = request("GET", &upstream.url(path));
        calls.push(tokio::spawn(async move { client.execute(req).await }));
    }
    while upstream.hits() < 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let text = http_get(serve.metrics.as_deref().expect("metrics on"), "/metrics").await;
    assert!(dealt(&text, 0).unwrap() >= 2.0 && dealt(&text, 1).unwrap() >= 2.0, "two a core\n{text}");
    serve.terminate();
    let mut outcomes = Vec::new();
    for call in calls {
        let reply = call.await.unwrap().expect("a reply, not a transport error").into_inner();
        outcomes.push((reply.outcome(), reply.error.map(|e| e.kind())));
    }
    let (ok, cut) = (pb::Outcome::Succeeded, pb::Outcome::Failed);
    assert_eq!(
        outcomes,
        [
            (ok, None),
            (ok, None),
            (cut, Some(pb::ErrorKind::Cancelled)),
            (cut, Some(pb::ErrorKind::Cancelled))
        ]
    );
    let status = serve.exit_status(Duration::from_secs(10)).await.expect("exits after the drain");
    assert!(status.success(), "{status:?}\n{}", serve.logs());
}

/// Host labels are bounded: past `metrics.max_hosts` destinations, the rest share `other`. The
/// in-flight and open-connection gauges follow a running action.
#[tokio::test]
async fn metrics_bound_host_labels_and_gauges_follow_running_actions() {
    let first = Upstream::fixed(200, "first").await;
    let second = Upstream::fixed(200, "second").await;
    let slow = Upstream::start(|_| async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        text(200, "slow")
    })
    .await;
    let serve = ServeProcess::spawn(&[], &[("CALLOUT_METRICS__MAX_HOSTS", "1")]).await;
    let metrics = serve.metrics.clone().expect("metrics on");
    let mut client = HttpActionServiceClient::new(serve.channel().await);
    client.execute(request("GET", &first.url("/"))).await.unwrap();
    client.execute(request("GET", &second.url("/"))).await.unwrap();
    let running = {
        let mut client = client.clone();
        let req = request("GET", &slow.url("/"));
        tokio::spawn(async move { client.execute(req).await })
    };
    while slow.hits() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let during = http_get(&metrics, "/metrics").await;
    running.await.unwrap().unwrap();
    let after = http_get(&metrics, "/metrics").await;

    let get = |text: &str, name: &str, labels: &[&str]| {
        sample(text, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} in\n{text}"))
    };
    let own = format!("host=\"{}\"", first.addr);
    let ok = ["outcome=\"succeeded\"", "error_kind=\"none\""];
    assert_eq!(get(&after, "callout_actions_total", &[ok[0], ok[1], &own]), 1.0);
    assert_eq!(get(&after, "callout_actions_total", &[ok[0], ok[1], "host=\"other\""]), 2.0);
    assert!(!after.contains(&second.addr.to_string()) && !after.contains(&slow.addr.to_string()), "{after}");
    assert_eq!(get(&during, "callout_actions_in_flight", &[]), 1.0);
    assert_eq!(get(&during, "callout_upstream_connections", &[]), 3.0, "three upstreams, pooled");
    assert_eq!(get(&after, "callout_actions_in_flight", &[]), 0.0);
    assert_eq!(get(&after, "callout_actions_queued", &[]), 0.0);
    assert_eq!(
        sample(&after, "callout_rate_limit_wait_seconds_count", &[]),
        Some(0.0),
        "no limit, no wait:\n{after}"
    );
}
