//! `callout serve` runs the gRPC sidecar; `callout exec` runs one action by hand through the
//! same executor and prints its outcome as JSON.
#![forbid(unsafe_code)]
use callout::{
    action::{
        ActionInput, BodyInput, HttpAction, OnFailure, ProxyUrl, RedirectsInput, RetryInput, TimeoutsInput,
    },
    client::Proxies,
    exec::{ExecSettings, Executor},
};
use clap::{Parser, Subcommand, ValueEnum};
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "callout",
    version,
    about = "A gRPC sidecar that executes HTTP actions for workflow engines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC sidecar (HttpActionService, health, reflection).
    Serve(ServeArgs),
    /// Run one action and print its outcome as JSON. Exit 0 when it succeeded, 1 when it
    /// failed, 2 when it is invalid.
    Exec(Box<ExecArgs>),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Total time of an action that sets none (still bounded by each call's gRPC deadline).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    default_total_timeout: Duration,
    /// Body cap of ExecuteStream, in bytes.
    #[arg(long, default_value_t = 1 << 30)]
    stream_max_response_bytes: u64,
    /// How long idle pooled upstream connections are kept.
    #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
    pool_idle_timeout: Duration,
    /// Idle pooled connections kept per upstream host.
    #[arg(long, default_value_t = 64)]
    pool_max_idle_per_host: usize,
    /// Do not offer HTTP/2 to https upstreams.
    #[arg(long)]
    no_http2: bool,
    /// PEM file of extra CA certificates trusted for upstreams, besides the webpki roots.
    #[arg(long, value_name = "PATH")]
    ca_file: Option<PathBuf>,
    /// http:// proxy for actions that set none (CONNECT for https targets). Without it,
    /// HTTPS_PROXY and HTTP_PROXY apply; NO_PROXY applies either way.
    #[arg(long, value_name = "URL")]
    proxy: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum FailureMode {
    Abort,
    Continue,
}

#[derive(clap::Args)]
struct ExecArgs {
    /// GET, POST, PUT, PATCH, DELETE, HEAD or OPTIONS.
    method: String,
    /// Absolute http or https URL.
    url: String,
    /// A header, "Name: value"; repeatable.
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// A query parameter, "name=value", appended to the URL's query; repeatable.
    #[arg(short = 'q', long = "query", value_name = "NAME=VALUE")]
    query: Vec<String>,
    /// JSON body (must parse); Content-Type application/json unless set.
    #[arg(long, group = "body")]
    json: Option<String>,
    /// Form field "name=value", urlencoded; repeatable.
    #[arg(long = "form", value_name = "NAME=VALUE", group = "body")]
    form: Vec<String>,
    /// Text body, sent as-is.
    #[arg(short = 'd', long = "data", group = "body")]
    data: Option<String>,
    /// Raw body read from a file.
    #[arg(long = "data-file", group = "body")]
    data_file: Option<PathBuf>,
    /// Content-Type for the body (an explicit -H Content-Type wins).
    #[arg(long)]
    content_type: Option<String>,
    /// Statuses that count as success, e.g. "201" or "200-299,304".
    #[arg(long, default_value = "2xx")]
    expect: String,
    /// Message for a failing status or class, "404=not found"; repeatable.
    #[arg(long = "error-message", value_name = "STATUS=MESSAGE")]
    error_messages: Vec<String>,
    /// Connect timeout.
    #[arg(long, value_parser = humantime::parse_duration)]
    connect_timeout: Option<Duration>,
    /// Timeout of one attempt.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Timeout of all attempts and backoff.
    #[arg(long, value_parser = humantime::parse_duration)]
    total_timeout: Option<Duration>,
    /// Attempts in all (1 disables retries).
    #[arg(long)]
    attempts: Option<u32>,
    /// Do not follow redirects.
    #[arg(long)]
    no_follow: bool,
    /// What the engine should do on failure (reported as "proceed").
    #[arg(long, value_enum, default_value = "abort")]
    on_failure: FailureMode,
    /// Body cap in bytes.
    #[arg(long)]
    max_response_bytes: Option<u64>,
    /// http:// proxy for this action (otherwise HTTPS_PROXY / HTTP_PROXY / NO_PROXY apply).
    #[arg(long, value_name = "URL")]
    proxy: Option<String>,
}

fn init_logs(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(args).await,
        Command::Exec(args) => exec(*args).await,
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    init_logs("info");
    let mut settings = ExecSettings {
        default_total_timeout: args.default_total_timeout,
        stream_max_response_bytes: args.stream_max_response_bytes,
        ..ExecSettings::default()
    };
    settings.client.pool_idle_timeout = args.pool_idle_timeout;
    settings.client.pool_max_idle_per_host = args.pool_max_idle_per_host;
    settings.client.http2 = !args.no_http2;
    if let Some(path) = &args.ca_file {
        match std::fs::read_to_string(path) {
            Ok(pem) => settings.client.extra_ca_pem = Some(pem),
            Err(e) => {
                tracing::error!("cannot read --ca-file {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    settings.client.proxies = match server_proxies(args.proxy.as_deref()) {
        Ok(proxies) => proxies,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let executor = match Executor::new(settings) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(listen = %local, "callout serving");
    match callout::server::serve(listener, executor, shutdown_signal()).await {
        Ok(()) => {
            tracing::info!("callout stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// The server's proxies: the environment's, read once here, with `--proxy` (when given)
/// replacing HTTP(S)_PROXY. Errors name the flag or variable, never the URL (it may hold a
/// password).
fn server_proxies(flag: Option<&str>) -> Result<Proxies, String> {
    let mut proxies = Proxies::from_env()?;
    if let Some(raw) = flag {
        let proxy = ProxyUrl::parse(raw).map_err(|e| format!("--proxy {e}"))?;
        proxies.http = Some(proxy.clone());
        proxies.https = Some(proxy);
    }
    Ok(proxies)
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}

fn split_pair(raw: &str, sep: char, what: &str) -> Result<(String, String), String> {
    raw.split_once(sep)
        .map(|(k, v)| (k.trim().to_owned(), v.trim_start().to_owned()))
        .ok_or_else(|| format!("{what} {raw:?} must look like NAME{sep}VALUE"))
}

fn exec_input(args: ExecArgs) -> Result<ActionInput, String> {
    let headers = args.headers.iter().map(|h| split_pair(h, ':', "header")).collect::<Result<_, _>>()?;
    let query = args.query.iter().map(|q| split_pair(q, '=', "query")).collect::<Result<_, _>>()?;
    let error_messages =
        args.error_messages.iter().map(|m| split_pair(m, '=', "error message")).collect::<Result<_, _>>()?;
    let body = if let Some(json) = args.json {
        BodyInput::Json(json)
    } else if !args.form.is_empty() {
        BodyInput::Form(args.form.iter().map(|f| split_pair(f, '=', "form field")).collect::<Result<_, _>>()?)
    } else if let Some(text) = args.data {
        BodyInput::Text(text)
    } else if let Some(path) = args.data_file {
        BodyInput::Raw(std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?.into())
    } else {
        BodyInput::None
    };
    Ok(ActionInput {
        method: args.method,
        url: args.url,
        query,
        headers,
        body,
        content_type: args.content_type.unwrap_or_default(),
        timeouts: TimeoutsInput {
            connect: args.connect_timeout,
            attempt: args.timeout,
            total: args.total_timeout,
        },
        success_codes: args.expect,
        on_failure: match args.on_failure {
            FailureMode::Abort => OnFailure::Abort,
            FailureMode::Continue => OnFailure::Continue,
        },
        error_messages,
        retry: RetryInput { max_attempts: args.attempts.unwrap_or(0), ..RetryInput::default() },
        redirects: RedirectsInput { follow: Some(!args.no_follow), max_hops: 0 },
        max_response_bytes: args.max_response_bytes.unwrap_or(0),
        proxy_url: args.proxy.unwrap_or_default(),
        ..ActionInput::default()
    })
}

async fn exec(args: ExecArgs) -> ExitCode {
    init_logs("warn");
    let action = match exec_input(args)
        .map_err(|e| e.to_string())
        .and_then(|input| HttpAction::from_input(input).map_err(|e| e.to_string()))
    {
        Ok(action) => action,
        Err(e) => {
            eprintln!("callout: {e}");
            return ExitCode::from(2);
        }
    };
    let mut settings = ExecSettings::default();
    settings.client.proxies = match Proxies::from_env() {
        Ok(proxies) => proxies,
        Err(e) => {
            eprintln!("callout: {e}");
            return ExitCode::from(2);
        }
    };
    let executor = match Executor::new(settings) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("callout: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = executor.execute(&action, None).await;
    let json = callout::report::outcome_json(&outcome);
    println!("{}", serde_json::to_string_pretty(&json).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")));
    if outcome.succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
