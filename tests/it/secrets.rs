//! Secret references: `{{secret:NAME}}` filled from a secrets directory or the environment,
//! unknown secrets refused with their field, and secret values kept out of logs and replies.
use crate::support::*;
use callout::{exec::ExecSettings, pb, secrets::SecretSettings};
use std::{path::PathBuf, process::Command, time::Duration};

const TOKEN: &str = "tok-5ecret-c0ffee";

/// A fresh secrets directory holding `files`.
/// A throwaway secrets directory holding `files` (name, value).
pub(crate) fn secrets_dir(test: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("callout-it-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, value) in files {
        std::fs::write(dir.join(name), value).unwrap();
    }
    dir
}

pub(crate) fn with_secrets(dir: &std::path::Path) -> ExecSettings {
    ExecSettings {
        secrets: SecretSettings { dir: Some(dir.to_owned()), env_prefix: None },
        ..test_settings()
    }
}

#[tokio::test]
async fn references_are_filled_from_files_in_each_place() {
    let dir = secrets_dir("fill", &[("api-token", &format!("{TOKEN}\n")), ("tenant", "acme corp")]);
    let upstream = Upstream::fixed(200, "ok").await;
    let sidecar = Sidecar::start_with(with_secrets(&dir)).await;
    let mut req = request("POST", &upstream.url("/t/{{secret:tenant}}"));
    req.headers = vec![kv("Authorization", "Bearer {{secret:api-token}}")];
    req.query = vec![kv("tenant", "{{secret:tenant}}")];
    req.body = Some(pb::execute_http_action_request::Body::Json(r#"{"key":"{{secret:api-token}}"}"#.into()));
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");

    let seen = &upstream.seen()[0];
    assert_eq!(seen.target, "/t/acme%20corp?tenant=acme%20corp");
    assert_eq!(seen.header("authorization"), Some(format!("Bearer {TOKEN}")));
    assert_eq!(seen.body, format!(r#"{{"key":"{TOKEN}"}}"#));
    assert!(!format!("{resp:?}").contains(TOKEN), "the reply does not echo the secret");

    // A rotated file is read by the next action.
    std::fs::write(dir.join("api-token"), "rotated").unwrap();
    let mut req = request("GET", &upstream.url("/"));
    req.headers = vec![kv("Authorization", "Bearer {{secret:api-token}}")];
    sidecar.execute(req).await;
    assert_eq!(upstream.seen()[1].header("authorization").as_deref(), Some("Bearer rotated"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn an_unknown_secret_is_invalid_argument_naming_field_and_secret_and_nothing_is_sent() {
    let dir = secrets_dir("unknown", &[]);
    let upstream = Upstream::fixed(200, "ok").await;
    let sidecar = Sidecar::start_with(with_secrets(&dir)).await;
    let mut req = request("GET", &upstream.url("/"));
    req.headers = vec![kv("X-Ok", "1"), kv("X-Api-Key", "{{secret:NOPE}}")];
    let status = sidecar.try_execute(req).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["headers[1].value"]);
    assert!(status.message().contains("unknown secret \"NOPE\""), "{}", status.message());
    assert_eq!(upstream.hits(), 0);

    // Without a secrets directory every reference is unknown.
    let plain = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/"));
    req.body = Some(pb::execute_http_action_request::Body::Text("{{secret:api-token}}".into()));
    assert_eq!(violated_fields(&plain.try_execute(req).await.unwrap_err()), ["text"]);
    assert_eq!(upstream.hits(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn exec_reads_secrets_from_the_environment_and_logs_none() {
    let upstream = Upstream::fixed(500, "down").await;
    let url = upstream.url("/");
    let run = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_callout"))
            .args([
                "exec",
                "--allow-private-networks",
                "GET",
                &url,
                "-H",
                "X-Api-Key: {{secret:API_KEY}}",
                "-H",
            ])
            .arg(format!("Authorization: Bearer {TOKEN}"))
            .args(["--secrets-env-prefix", "CALLOUT_IT_SECRET_", "--attempts", "1"])
            .env("CALLOUT_IT_SECRET_API_KEY", TOKEN)
            .env("RUST_LOG", "trace")
            .output()
            .unwrap()
    });
    let out = tokio::time::timeout(Duration::from_secs(60), run).await.unwrap().unwrap();
    assert_eq!(out.status.code(), Some(1), "the 500 fails the action");
    assert_eq!(upstream.seen()[0].header("x-api-key").as_deref(), Some(TOKEN));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stderr.is_empty(), "trace logs were written");
    assert!(!stderr.contains(TOKEN) && !stdout.contains(TOKEN), "secret in output:\n{stderr}\n{stdout}");
}

/// The real `callout serve` binary with trace logs: a secret from a file and a literal
/// Authorization header reach the upstream but never the logs.
#[tokio::test]
async fn serve_logs_no_secret_values() {
    let dir = secrets_dir("serve-logs", &[("api-token", TOKEN)]);
    let upstream = Upstream::fixed(503, "down").await;
    let serve =
        ServeProcess::spawn(&["--secrets-dir", dir.to_str().unwrap()], &[("RUST_LOG", "trace")]).await;
    let mut client = pb::http_action_service_client::HttpActionServiceClient::new(serve.channel().await);
    let mut req = request("POST", &upstream.url("/x"));
    req.headers =
        vec![kv("X-Api-Key", "{{secret:api-token}}"), kv("Authorization", &format!("Bearer {TOKEN}"))];
    req.retry = Some(Box::new(fast_retry(2)));
    let resp = client.execute(req).await.unwrap().into_inner();
    assert_eq!(resp.attempts.len(), 2, "503 retried: more to log");
    assert_eq!(upstream.seen()[0].header("x-api-key").as_deref(), Some(TOKEN));

    tokio::time::sleep(Duration::from_millis(100)).await;
    let logs = serve.logs();
    assert!(logs.contains("action finished"), "logs were captured:\n{logs}");
    assert!(!logs.contains(TOKEN), "secret in the logs:\n{logs}");
    std::fs::remove_dir_all(&dir).unwrap();
}
