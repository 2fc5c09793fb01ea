//! Throughput and latency of callout against a direct HTTP client, in one run, on loopback.
//!
//! ```sh
//! cargo build --release --examples --bins
//! target/release/examples/loadgen            # closed loop + open loop tables (~2 min)
//! target/release/examples/loadgen --scale    # 10,000 in flight (HTTP/1.1, then h2), 1 GiB stream, cold start
//! target/release/examples/loadgen --durable  # durable Submit acks/s and latency vs unary Execute
//! target/release/examples/loadgen --batch    # ExecuteBatch vs unary Execute vs direct, interleaved
//! target/release/examples/loadgen --durable  # Submit (SQLite, PostgreSQL) and Redis-checked limits vs unary Execute
//! target/release/examples/loadgen --nginx    # h2load → callout → nginx vs h2load → nginx reverse proxy → nginx
//! ulimit -n 20000; target/release/examples/loadgen --burst h2 [--sidecar-wrap heaptrack]  # 10,000 in flight only
//! ulimit -n 20000; target/release/examples/loadgen --burst h1  # the same over HTTP/1.1, then from bare clients
//! target/release/examples/loadgen --count 2000 --conc 64 --sidecar-wrap 'valgrind --tool=callgrind'
//! ```
//!
//! Every process is separate, so CPU is counted apart: this load generator, the upstream
//! (`examples/bench_upstream`, spawned) and the sidecar (`target/release/callout serve`, spawned
//! once on TCP and once on a Unix socket, metrics on as deployed). Modes:
//! - A: a direct in-process hyper-util client to the upstream (the ceiling);
//! - B: callout over gRPC on TCP loopback (tonic client, retries off);
//! - C: callout over gRPC on a Unix socket.
//!
//! Options: `--duration SECS` per cell (3), `--warmup SECS` (0.5), `--callout PATH`,
//! `--upstream PATH`, `--quick` (1 s cells, concurrency 1 and 64 only), `--conc 1,64` (the
//! concurrencies), `--modes BC` (which of A, B, C run; e.g. `--modes B` as a load to profile),
//! `--sidecar-arg ARG` (repeatable: passed to `callout serve`, e.g. `--worker-threads`, `1`),
//! `--open-rates 1000,5000` (open-loop rates after the one at half of saturation).
//! `--count N` runs exactly N GET 1 KiB actions over B at each `--conc` (64 by default there)
//! against one sidecar, instead of the timed tables: a fixed amount of work, for counting
//! instructions where wall-clock time is noise. `--sidecar-wrap 'CMD ARGS'` starts that sidecar
//! under a command (e.g. valgrind); it is stopped with SIGTERM and waited for, so such a
//! wrapper writes its report.
//! `--batch` runs GET 1 KiB closed loops at each `--conc` (64 by default there) on one sidecar,
//! `--rounds N` (3) times in turn: wrk straight to the upstream (when installed), A direct, B
//! unary Execute, and ExecuteBatch with the same number of actions outstanding (one stream per
//! 64, each keeping 64 in flight); it prints each round and the medians of batch/B actions per
//! sidecar CPU-second and of batch/wrk and batch/A throughput.
//! `--nginx` (needs nginx, h2load and wrk): an origin nginx serving the 1 KiB JSON document,
//! then, over the same h2load client (4 connections × 16 streams, h2c), callout's `Execute`
//! (h2load POSTs a pre-encoded gRPC frame of the action with `content-type: application/grpc`
//! and `te: trailers`) against nginx as an h2c reverse proxy to the same origin, and wrk
//! straight to the origin; CPU per request of each proxy process (nginx: master and workers)
//! from /proc, `--reps` interleaved rounds (3), `--count` requests a cell (40,000). The origin's
//! stub_status counter checks that every request that succeeded reached it.
//! Every spawned process is killed when loadgen exits, also on error or panic.
use bytes::Bytes;
use callout::pb::{
    self, durable_action_service_client::DurableActionServiceClient,
    execute_http_action_request::Body as ActionBody, http_action_service_client::HttpActionServiceClient,
};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
};
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

type Error = Box<dyn std::error::Error + Send + Sync>;

// ---------------------------------------------------------------- processes

/// A spawned process, killed (and reaped) when dropped: on success, error and panic alike.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("[loadgen] stopped {} (pid {})", self.name, self.child.id());
    }
}

/// CPU time of several processes together; None when one cannot be read.
fn cpu_sum(pids: &[Option<u32>]) -> Option<Duration> {
    pids.iter().map(|p| p.and_then(cpu_time)).sum()
}

/// CPU time (utime + stime) of a process, from /proc/PID/stat.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_secs_f64((utime + stime) as f64 / clock_ticks() as f64))
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// A `Vm*` line of /proc/PID/status, in KiB.
fn vm_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].trim_start_matches(':').split_whitespace().next()?.parse().ok()
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("?".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

struct Paths {
    callout: PathBuf,
    upstream: PathBuf,
}

fn default_paths() -> Paths {
    // target/release/examples/loadgen -> target/release/{callout, examples/bench_upstream}
    let exe = std::env::current_exe().unwrap_or_default();
    let examples = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let release = examples.parent().map(Path::to_path_buf).unwrap_or_default();
    Paths { callout: release.join("callout"), upstream: examples.join("bench_upstream") }
}

/// Starts the upstream with `extra` arguments; returns it and its base URL, `http://IP:PORT`
/// (or `https://` with `--tls-dir`), read from its first line.
fn spawn_upstream(path: &Path, extra: &[&str]) -> Result<(Proc, String), Error> {
    let mut child = Command::new(path)
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            format!("starting {}: {e} (build with `cargo build --release --examples`)", path.display())
        })?;
    let stdout = child.stdout.take().ok_or("upstream stdout")?;
    let proc = Proc { name: "bench_upstream", child };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .filter(|url| url.starts_with("http://") || url.starts_with("https://"))
        .ok_or_else(|| format!("upstream said {line:?}"))?;
    Ok((proc, base.to_owned()))
}

fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Where a sidecar listens.
#[derive(Clone)]
enum Listen {
    Tcp(String),
    Unix(PathBuf),
}

impl Listen {
    fn arg(&self) -> String {
        match self {
            Listen::Tcp(addr) => addr.clone(),
            Listen::Unix(path) => format!("unix:{}", path.display()),
        }
    }
}

fn spawn_sidecar(path: &Path, listen: &Listen, extra: &[&str]) -> Result<Proc, Error> {
    spawn_sidecar_wrapped(&[], path, listen, extra)
}

/// The sidecar started under `wrap` (a command and its arguments, e.g. valgrind), when not empty.
fn spawn_sidecar_wrapped(
    wrap: &[String],
    path: &Path,
    listen: &Listen,
    extra: &[&str],
) -> Result<Proc, Error> {
    // No durable store unless asked for: it would be created in the working directory.
    let store: &[&str] = if extra.contains(&"--store") { &[] } else { &["--store", "off"] };
    let mut command = match wrap.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(path);
            command
        }
        None => Command::new(path),
    };
    let child = command
        .args([
            "serve",
            "--allow-private-networks",
            "--metrics-listen",
            "127.0.0.1:0",
            "--listen",
            &listen.arg(),
        ])
        .args(store)
        .args(extra)
        // The per-action log line is part of the cost (default level info); it goes nowhere.
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e} (build with `cargo build --release`)", path.display()))?;
    Ok(Proc { name: "callout", child })
}

async fn channel(listen: &Listen) -> Result<Channel, Error> {
    Ok(match listen {
        Listen::Tcp(addr) => {
            Endpoint::from_shared(format!("http://{addr}"))?.tcp_nodelay(true).connect().await?
        }
        Listen::Unix(path) => {
            let path = path.clone();
            // The URI is required but unused: the connector dials the socket.
            Endpoint::from_static("http://callout.invalid")
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move { UnixStream::connect(path).await.map(TokioIo::new) }
                }))
                .await?
        }
    })
}

/// Polls grpc.health.v1 Check until SERVING (bounded by `limit`); returns the time taken.
async fn wait_serving(listen: &Listen, since: Instant, limit: Duration) -> Result<Duration, Error> {
    while since.elapsed() < limit {
        if let Ok(ch) = channel(listen).await {
            let check = HealthClient::new(ch).check(HealthCheckRequest { service: String::new() }).await;
            if check.is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving) {
                return Ok(since.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Err(format!("sidecar on {} not SERVING within {limit:?}", listen.arg()).into())
}

// ---------------------------------------------------------------- targets

#[derive(Clone, Copy, PartialEq)]
enum Workload {
    Get1k,
    Post16k,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Get1k => "GET 1 KiB",
            Workload::Post16k => "POST 16 KiB",
        }
    }
}

const POST_BYTES: usize = 16 * 1024;

/// One way of running an action.
#[derive(Clone)]
enum Target {
    Direct {
        client: Box<Client<HttpConnector, Full<Bytes>>>,
        url: String,
        post: Bytes,
    },
    Sidecar {
        clients: Vec<HttpActionServiceClient<Channel>>,
        url: String,
        post: Bytes,
    },
    /// Durable Submit: an ack means the action is committed to the sidecar's store.
    Submit {
        clients: Vec<DurableActionServiceClient<Channel>>,
        url: String,
        post: Bytes,
        next: Arc<AtomicU64>,
    },
}

fn upstream_url(base: &str, workload: Workload, hold_ms: Option<u64>) -> String {
    let n = match workload {
        Workload::Get1k => 1024,
        Workload::Post16k => POST_BYTES,
    };
    match hold_ms {
        Some(ms) => format!("{base}/bytes/{n}?hold_ms={ms}"),
        None => format!("{base}/bytes/{n}"),
    }
}

fn action(workload: Workload, url: &str, post: &Bytes) -> pb::ExecuteHttpActionRequest {
    let (method, body) = match workload {
        Workload::Get1k => ("GET", None),
        Workload::Post16k => ("POST", Some(ActionBody::Raw(post.clone()))),
    };
    pb::ExecuteHttpActionRequest {
        method: method.into(),
        url: url.into(),
        body,
        retry: Some(Box::new(pb::RetryPolicy { max_attempts: 1, ..Default::default() })),
        ..Default::default()
    }
}

impl Target {
    async fn call(&self, worker: usize, workload: Workload) -> Result<(), Error> {
        match self {
            Target::Direct { client, url, post } => {
                let mut req = http::Request::builder().uri(url.as_str());
                let body = match workload {
                    Workload::Get1k => Full::new(Bytes::new()),
                    Workload::Post16k => {
                        req = req.method("POST").header("content-type", "application/octet-stream");
                        Full::new(post.clone())
                    }
                };
                let resp = client.request(req.body(body)?).await?;
                let ok = resp.status().is_success();
                let body = resp.into_body().collect().await?.to_bytes();
                if !ok || body.is_empty() {
                    return Err("direct: bad response".into());
                }
                Ok(())
            }
            Target::Sidecar { clients, url, post } => {
                let mut client = clients[worker % clients.len()].clone();
                let reply = client.execute(action(workload, url, post)).await?.into_inner();
                if reply.outcome() != pb::Outcome::Succeeded {
                    return Err(format!("sidecar: {:?}", reply.error).into());
                }
                Ok(())
            }
            Target::Submit { clients, url, post, next } => {
                let mut client = clients[worker % clients.len()].clone();
                let mut action = action(workload, url, post);
                action.action_id = format!("load-{}", next.fetch_add(1, Ordering::Relaxed));
                let reply = client
                    .submit(pb::SubmitActionRequest { action: Some(action), not_before: None })
                    .await?
                    .into_inner();
                if !reply.created {
                    return Err("submit: not created".into());
                }
                Ok(())
            }
        }
    }
}

fn direct_client() -> Client<HttpConnector, Full<Bytes>> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(http)
}

/// `n` channels to a sidecar: HTTP/2 streams per connection are capped (200 by hyper's
/// default), and one connection is one task on each side.
async fn sidecar_clients(listen: &Listen, n: usize) -> Result<Vec<HttpActionServiceClient<Channel>>, Error> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(HttpActionServiceClient::new(channel(listen).await?));
    }
    Ok(clients)
}

fn channels_for(concurrency: usize) -> usize {
    concurrency.div_ceil(64).max(1)
}

// ---------------------------------------------------------------- measuring

#[derive(Default, Clone)]
struct Cell {
    actions_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    cpu_us_per_action: Option<f64>,
    /// CPU of every process on the path (loadgen, upstream, sidecar if any) per action: with
    /// all three on the same cores, B/A can be no better than A's total over B's.
    total_cpu_us_per_action: Option<f64>,
    rss_kib: Option<u64>,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64
}

/// Closed loop: `concurrency` workers each send the next action when the last one ends.
/// Completions within the measured window (after `warmup`) count.
async fn closed_loop(
    target: &Target,
    workload: Workload,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    sidecar: Option<u32>,
    upstream: u32,
) -> Cell {
    let start = Instant::now() + warmup;
    let end = start + duration;
    let errors = Arc::new(AtomicU64::new(0));
    let others = [Some(upstream), Some(std::process::id())];
    let cpu_before = Arc::new(Mutex::new((None, None)));
    let meter = {
        let cpu_before = cpu_before.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            *cpu_before.lock().unwrap_or_else(|e| e.into_inner()) =
                (sidecar.and_then(cpu_time), cpu_sum(&others));
        })
    };
    let mut workers = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        let target = target.clone();
        let errors = errors.clone();
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let ok = target.call(w, workload).await.is_ok();
                let done = Instant::now();
                if done >= start && done < end {
                    if ok {
                        lat.push((done - t).as_micros() as u64);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if !ok {
                    // Do not spin on a broken target.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            lat
        }));
    }
    let _ = meter.await;
    tokio::time::sleep_until(end.into()).await;
    let cpu_after = sidecar.and_then(cpu_time);
    let others_after = cpu_sum(&others);
    let mut lat = Vec::new();
    for w in workers {
        lat.extend(w.await.unwrap_or_default());
    }
    lat.sort_unstable();
    let n = lat.len() as f64;
    let (cpu_before, others_before) = *cpu_before.lock().unwrap_or_else(|e| e.into_inner());
    let per_action = |before: Option<Duration>, after: Option<Duration>| match (before, after) {
        (Some(b), Some(a)) if n > 0.0 => Some((a.saturating_sub(b)).as_secs_f64() * 1e6 / n),
        _ => None,
    };
    let cpu = per_action(cpu_before, cpu_after);
    let others = per_action(others_before, others_after);
    let total = match (sidecar, cpu, others) {
        (None, _, Some(o)) => Some(o),
        (Some(_), Some(c), Some(o)) => Some(c + o),
        _ => None,
    };
    Cell {
        actions_per_s: n / duration.as_secs_f64(),
        p50_us: percentile(&lat, 0.50),
        p99_us: percentile(&lat, 0.99),
        errors: errors.load(Ordering::Relaxed),
        cpu_us_per_action: cpu,
        total_cpu_us_per_action: total,
        rss_kib: sidecar.and_then(|p| vm_kib(p, "VmRSS")),
    }
}

/// Open loop: actions are scheduled at a fixed `rate`; latency counts from the scheduled send
/// time, so a slow response delays nothing and hides nothing (no coordinated omission).
async fn open_loop(target: &Target, workload: Workload, rate: f64, duration: Duration) -> (Cell, u64) {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let count = (duration.as_secs_f64() * rate) as u64;
    let lat = Arc::new(Mutex::new(Vec::with_capacity(count as usize)));
    let errors = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let handle = tokio::runtime::Handle::current();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<u64>();
    let target = target.clone();
    let (lat2, errors2, in_flight2) = (lat.clone(), errors.clone(), in_flight.clone());
    // A plain thread schedules, so the runtime's 1 ms timer does not bunch the sends.
    std::thread::spawn(move || {
        let t0 = Instant::now() + Duration::from_millis(50);
        let mut skipped = 0;
        for i in 0..count {
            let scheduled = t0 + interval.mul_f64(i as f64);
            let now = Instant::now();
            if scheduled > now {
                std::thread::sleep(scheduled - now);
            }
            // Bounded: past 4096 outstanding the target is not keeping up; count, don't pile.
            if in_flight2.load(Ordering::Relaxed) >= 4096 {
                skipped += 1;
                continue;
            }
            in_flight2.fetch_add(1, Ordering::Relaxed);
            let (target, lat, errors, in_flight) =
                (target.clone(), lat2.clone(), errors2.clone(), in_flight2.clone());
            handle.spawn(async move {
                let ok = target.call(i as usize, workload).await.is_ok();
                let took = scheduled.elapsed().as_micros() as u64;
                if ok {
                    lat.lock().unwrap_or_else(|e| e.into_inner()).push(took);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                in_flight.fetch_sub(1, Ordering::Relaxed);
            });
        }
        let _ = done_tx.send(skipped);
    });
    let skipped = done_rx.await.unwrap_or(0);
    let drain_until = Instant::now() + Duration::from_secs(10);
    while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut lat = std::mem::take(&mut *lat.lock().unwrap_or_else(|e| e.into_inner()));
    lat.sort_unstable();
    let cell = Cell {
        actions_per_s: lat.len() as f64 / duration.as_secs_f64(),
        p50_us: percentile(&lat, 0.50),
        p99_us: percentile(&lat, 0.99),
        errors: errors.load(Ordering::Relaxed),
        cpu_us_per_action: None,
        total_cpu_us_per_action: None,
        rss_kib: None,
    };
    (cell, skipped)
}

// ---------------------------------------------------------------- runs

struct Options {
    duration: Duration,
    warmup: Duration,
    quick: bool,
    scale: bool,
    durable: bool,
    batch: bool,
    rounds: usize,
    /// h2load through callout against nginx as a reverse proxy (`--nginx`).
    nginx: bool,
    /// Only the 10,000-in-flight burst, over h1 or h2 (`--burst`).
    burst: Option<String>,
    /// Interleaved rounds of the `--nginx` cells (`--reps`, 3).
    reps: usize,
    conc: Vec<usize>,
    modes: String,
    sidecar_args: Vec<String>,
    /// Open-loop rates run after the one at half of saturation.
    open_rates: Vec<f64>,
    paths: Paths,
    /// Exactly this many actions per B cell instead of the timed tables (`--count`).
    count: Option<u64>,
    /// The command the counted run's sidecar runs under (`--sidecar-wrap`).
    sidecar_wrap: Vec<String>,
}

fn options() -> Result<Options, Error> {
    let mut o = Options {
        duration: Duration::from_secs(3),
        warmup: Duration::from_millis(500),
        quick: false,
        scale: false,
        durable: false,
        batch: false,
        rounds: 3,
        nginx: false,
        burst: None,
        reps: 3,
        conc: vec![1, 16, 64, 256],
        modes: "ABC".into(),
        sidecar_args: Vec::new(),
        open_rates: Vec::new(),
        paths: default_paths(),
        count: None,
        sidecar_wrap: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--duration" => o.duration = Duration::from_secs_f64(value()?.parse()?),
            "--warmup" => o.warmup = Duration::from_secs_f64(value()?.parse()?),
            "--callout" => o.paths.callout = value()?.into(),
            "--upstream" => o.paths.upstream = value()?.into(),
            "--quick" => {
                o.quick = true;
                o.conc = vec![1, 64];
            }
            "--conc" => {
                o.conc = value()?.split(',').map(|c| c.parse::<usize>()).collect::<Result<_, _>>()?;
                if o.conc.iter().any(|&c| c == 0 || c > 4096) {
                    return Err("--conc takes 1..=4096".into());
                }
            }
            "--modes" => o.modes = value()?.to_ascii_uppercase(),
            "--sidecar-arg" => o.sidecar_args.push(value()?),
            "--open-rates" => {
                o.open_rates = value()?.split(',').map(|r| r.parse::<f64>()).collect::<Result<_, _>>()?;
                if o.open_rates.iter().any(|&r| !(1.0..=200_000.0).contains(&r)) {
                    return Err("--open-rates takes 1..=200000 actions/s".into());
                }
            }
            "--count" => {
                let n: u64 = value()?.parse()?;
                if !(1..=10_000_000).contains(&n) {
                    return Err("--count takes 1..=10000000 actions".into());
                }
                o.count = Some(n);
            }
            "--sidecar-wrap" => o.sidecar_wrap = value()?.split_whitespace().map(str::to_owned).collect(),
            "--scale" => o.scale = true,
            "--durable" => o.durable = true,
            "--batch" => o.batch = true,
            "--rounds" => {
                o.rounds = value()?.parse()?;
                if !(1..=100).contains(&o.rounds) {
                    return Err("--rounds takes 1..=100".into());
                }
            }
            "--nginx" => o.nginx = true,
            "--burst" => o.burst = Some(value()?),
            "--reps" => {
                o.reps = value()?.parse()?;
                if !(1..=20).contains(&o.reps) {
                    return Err("--reps takes 1..=20".into());
                }
            }
            "--help" | "-h" => {
                println!("usage: loadgen [--scale] [--durable] [--batch [--rounds N]] [--nginx [--reps N] [--count REQUESTS]] [--burst h1|h2 [--sidecar-wrap 'CMD ARGS']] [--quick] [--conc 1,16,64,256] [--modes ABC] [--sidecar-arg ARG] [--open-rates R,R] [--duration S] [--warmup S] [--callout PATH] [--upstream PATH] [--count N [--sidecar-wrap 'CMD ARGS']]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    if o.quick {
        o.duration = Duration::from_secs(1);
    }
    o.duration = o.duration.min(Duration::from_secs(30));
    Ok(o)
}

fn socket_path() -> PathBuf {
    std::env::temp_dir().join(format!("callout-loadgen-{}.sock", std::process::id()))
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

async fn throughput(o: &Options) -> Result<(), Error> {
    let (upstream, up) = spawn_upstream(&o.paths.upstream, &[])?;
    let upstream_pid = upstream.pid();
    let tcp = Listen::Tcp(format!("127.0.0.1:{}", free_port()?));
    let sock = socket_path();
    let unix = Listen::Unix(sock.clone());
    let t = Instant::now();
    let extra: Vec<&str> = o.sidecar_args.iter().map(String::as_str).collect();
    let side_b = spawn_sidecar(&o.paths.callout, &tcp, &extra)?;
    let ready_b = wait_serving(&tcp, t, Duration::from_secs(10)).await?;
    let t = Instant::now();
    let side_c = spawn_sidecar(&o.paths.callout, &unix, &extra)?;
    let ready_c = wait_serving(&unix, t, Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    println!(
        "upstream {up}; sidecar B tcp {} (SERVING after {ready_b:?}), C {} (after {ready_c:?})",
        tcp.arg(),
        unix.arg()
    );
    println!(
        "idle sidecar RSS: B {} MiB, C {} MiB",
        mib(vm_kib(side_b.pid(), "VmRSS")),
        mib(vm_kib(side_c.pid(), "VmRSS"))
    );
    println!(
        "cells: {:?} measured after {:?} warm-up; clock ticks {} per s\n",
        o.duration,
        o.warmup,
        clock_ticks()
    );

    let post = Bytes::from(vec![b'p'; POST_BYTES]);
    let direct = direct_client();
    let concurrencies = &o.conc;
    let run = |m: char| o.modes.contains(m);
    let mut saturation_b64 = None;
    println!(
        "| workload | conc | A direct act/s | A p50/p99 us | B tcp act/s | B p50/p99 us | B/A | B cpu us/act | C uds act/s | C p50/p99 us | C/A | C cpu us/act | all cpu us/act A/B/C | RSS B/C MiB | errors A/B/C |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for workload in [Workload::Get1k, Workload::Post16k] {
        let url = upstream_url(&up, workload, None);
        for &c in concurrencies.iter() {
            let a = Target::Direct { client: Box::new(direct.clone()), url: url.clone(), post: post.clone() };
            let b = Target::Sidecar {
                clients: sidecar_clients(&tcp, channels_for(c)).await?,
                url: url.clone(),
                post: post.clone(),
            };
            let cc = Target::Sidecar {
                clients: sidecar_clients(&unix, channels_for(c)).await?,
                url: url.clone(),
                post: post.clone(),
            };
            let skip =
                Cell { actions_per_s: f64::NAN, p50_us: f64::NAN, p99_us: f64::NAN, ..Cell::default() };
            let ra = if run('A') {
                closed_loop(&a, workload, c, o.warmup, o.duration, None, upstream_pid).await
            } else {
                skip.clone()
            };
            let rb = if run('B') {
                closed_loop(&b, workload, c, o.warmup, o.duration, Some(side_b.pid()), upstream_pid).await
            } else {
                skip.clone()
            };
            let rc = if run('C') {
                closed_loop(&cc, workload, c, o.warmup, o.duration, Some(side_c.pid()), upstream_pid).await
            } else {
                skip.clone()
            };
            if workload == Workload::Get1k && c == 64 {
                saturation_b64 = Some(rb.actions_per_s);
            }
            println!(
                "| {} | {c} | {:.0} | {:.0}/{:.0} | {:.0} | {:.0}/{:.0} | {:.2} | {} | {:.0} | {:.0}/{:.0} | {:.2} | {} | {}/{}/{} | {}/{} | {}/{}/{} |",
                workload.name(),
                ra.actions_per_s,
                ra.p50_us,
                ra.p99_us,
                rb.actions_per_s,
                rb.p50_us,
                rb.p99_us,
                rb.actions_per_s / ra.actions_per_s,
                fmt_opt(rb.cpu_us_per_action),
                rc.actions_per_s,
                rc.p50_us,
                rc.p99_us,
                rc.actions_per_s / ra.actions_per_s,
                fmt_opt(rc.cpu_us_per_action),
                fmt_opt(ra.total_cpu_us_per_action),
                fmt_opt(rb.total_cpu_us_per_action),
                fmt_opt(rc.total_cpu_us_per_action),
                mib(rb.rss_kib),
                mib(rc.rss_kib),
                ra.errors,
                rb.errors,
                rc.errors,
            );
        }
    }

    // Open loop at half of B's saturation (concurrency 64, GET 1 KiB).
    if !(run('A') && run('B') && saturation_b64.is_some()) {
        drop((side_b, side_c));
        let _ = std::fs::remove_file(&sock);
        return Ok(());
    }
    let half = (saturation_b64.unwrap_or(1000.0) / 2.0).max(10.0);
    let open = o.duration.max(Duration::from_secs(2)) + Duration::from_secs(1);
    println!("\nopen loop, GET 1 KiB, {open:?} per mode: first at {half:.0} actions/s (half of B's saturation at concurrency 64), then any --open-rates; latency from the scheduled send time, total CPU per action of every process on the path");
    println!("| rate/s | mode | done act/s | p50 us | p99 us | added p50 us | added p99 us | all cpu us/act | errors | skipped |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let url = upstream_url(&up, Workload::Get1k, None);
    let a = Target::Direct { client: Box::new(direct.clone()), url: url.clone(), post: post.clone() };
    let b =
        Target::Sidecar { clients: sidecar_clients(&tcp, 2).await?, url: url.clone(), post: post.clone() };
    let cc = Target::Sidecar { clients: sidecar_clients(&unix, 2).await?, url, post };
    for rate in std::iter::once(half).chain(o.open_rates.iter().copied()) {
        let cpu = |sidecar: Option<u32>| {
            let pids = [Some(upstream_pid), Some(std::process::id()), sidecar];
            cpu_sum(&pids[..if sidecar.is_some() { 3 } else { 2 }])
        };
        let before = cpu(None);
        let (ra, sa) = open_loop(&a, Workload::Get1k, rate, open).await;
        let per = |before: Option<Duration>, after: Option<Duration>, done: f64| {
            fmt_opt(before.zip(after).map(|(b, a)| a.saturating_sub(b).as_secs_f64() * 1e6 / done))
        };
        let done = ra.actions_per_s * open.as_secs_f64();
        println!(
            "| {rate:.0} | A direct | {:.0} | {:.0} | {:.0} | - | - | {} | {} | {sa} |",
            ra.actions_per_s,
            ra.p50_us,
            ra.p99_us,
            per(before, cpu(None), done),
            ra.errors
        );
        for (name, target, pid) in [("B tcp", &b, side_b.pid()), ("C uds", &cc, side_c.pid())] {
            let before = cpu(Some(pid));
            let (r, s) = open_loop(target, Workload::Get1k, rate, open).await;
            let done = r.actions_per_s * open.as_secs_f64();
            println!(
                "| {rate:.0} | {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {s} |",
                r.actions_per_s,
                r.p50_us,
                r.p99_us,
                r.p50_us - ra.p50_us,
                r.p99_us - ra.p99_us,
                per(before, cpu(Some(pid)), done),
                r.errors
            );
        }
    }
    println!(
        "\nsidecar peak RSS (VmHWM): B {} MiB, C {} MiB; sidecar CPU total: B {:?}, C {:?}",
        mib(vm_kib(side_b.pid(), "VmHWM")),
        mib(vm_kib(side_c.pid(), "VmHWM")),
        cpu_time(side_b.pid()).unwrap_or_default(),
        cpu_time(side_c.pid()).unwrap_or_default(),
    );
    drop((side_b, side_c));
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

/// (min, max, every sample) of RSS in KiB.
type RssSamples = (u64, u64, Vec<u64>);

/// Samples a process's RSS every 100 ms until stopped (at most 10 minutes).
/// Durable Submit against unary Execute on one sidecar (TCP), GET 1 KiB, closed loop at each
/// `--conc` (1 and 64 by default here), for a SQLite store and a throwaway PostgreSQL one:
/// Submit's ack waits for the store's commit (group commit), and the submitted actions run in
/// the background meanwhile. Then unary Execute with local rate limits against the same limits
/// checked in a throwaway redis-server (`--redis-url`). `--reps` interleaved rounds.
async fn durable(o: &Options) -> Result<(), Error> {
    let (upstream, up) = spawn_upstream(&o.paths.upstream, &[])?;
    let upstream_pid = upstream.pid();
    let store = std::env::temp_dir().join(format!("callout-loadgen-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    let sqlite_url = format!("sqlite:{}", store.join("actions.db").display());
    let postgres = Postgres::start()?;
    let redis = start_redis()?;
    let own: Vec<&str> = o.sidecar_args.iter().map(String::as_str).collect();
    // Limits no action here waits for, the same on both limit sidecars: only where they are
    // checked differs.
    let limits = ["--global-rate-limit", "1000000/s", "--rate-limit", "127.0.0.1=1000000/s"];
    let mut stores: Vec<(&str, Listen, Proc)> = Vec::new();
    let mut fleet: Vec<(&str, Listen, Proc)> = Vec::new();
    let pg_url = postgres.as_ref().map(Postgres::url);
    let redis_url = redis.as_ref().map(|(_, url)| url.clone());
    let mut start = |label: &'static str, extra: Vec<&str>, into_fleet: bool| -> Result<(), Error> {
        let listen = Listen::Tcp(format!("127.0.0.1:{}", free_port()?));
        let args: Vec<&str> = own.iter().copied().chain(extra).collect();
        let proc = spawn_sidecar(&o.paths.callout, &listen, &args)?;
        if into_fleet {
            fleet.push((label, listen, proc))
        } else {
            stores.push((label, listen, proc))
        }
        Ok(())
    };
    start("SQLite", vec!["--store", &sqlite_url, "--durable-max-pending", "100000000"], false)?;
    match &pg_url {
        Some(url) => start("PostgreSQL", vec!["--store", url, "--durable-max-pending", "100000000"], false)?,
        None => println!("no PostgreSQL binaries under /usr/lib/postgresql: its rows are skipped"),
    }
    start("local limits", limits.to_vec(), true)?;
    match &redis_url {
        Some(url) => start("fleet limits (Redis)", [&limits[..], &["--redis-url", url]].concat(), true)?,
        None => println!("no redis-server on the PATH: the fleet row is skipped"),
    }
    for (_, listen, _) in stores.iter().chain(&fleet) {
        wait_serving(listen, Instant::now(), Duration::from_secs(30)).await?;
    }
    let redis_pid = redis.as_ref().map(|(p, _)| p.pid());
    println!(
        "upstream {up}; SQLite store {}; PostgreSQL {}; Redis {}",
        store.display(),
        pg_url.as_deref().unwrap_or("-"),
        redis_url.as_deref().unwrap_or("-")
    );
    println!(
        "cells: {:?} measured after {:?} warm-up; {} interleaved rounds\n",
        o.duration, o.warmup, o.reps
    );
    let url = upstream_url(&up, Workload::Get1k, None);
    let post = Bytes::new();
    let conc: Vec<usize> = if o.conc == [1, 16, 64, 256] { vec![1, 64] } else { o.conc.clone() };
    let next = Arc::new(AtomicU64::new(0));
    let mut durable_rows = Vec::new();
    let mut fleet_rows = Vec::new();
    for round in 1..=o.reps {
        for &c in &conc {
            for (label, listen, side) in &stores {
                let execute = Target::Sidecar {
                    clients: sidecar_clients(listen, channels_for(c)).await?,
                    url: url.clone(),
                    post: post.clone(),
                };
                let mut submitters = Vec::new();
                for _ in 0..channels_for(c) {
                    submitters.push(DurableActionServiceClient::new(channel(listen).await?));
                }
                let submit = Target::Submit {
                    clients: submitters,
                    url: url.clone(),
                    post: post.clone(),
                    next: next.clone(),
                };
                let pid = Some(side.pid());
                let e =
                    closed_loop(&execute, Workload::Get1k, c, o.warmup, o.duration, pid, upstream_pid).await;
                let s =
                    closed_loop(&submit, Workload::Get1k, c, o.warmup, o.duration, pid, upstream_pid).await;
                durable_rows.push(format!(
                    "| {round} | {c} | {label} | {:.0} | {:.0}/{:.0} | {:.0} | {:.0}/{:.0} | {:.2} | {} | {}/{} |",
                    e.actions_per_s,
                    e.p50_us,
                    e.p99_us,
                    s.actions_per_s,
                    s.p50_us,
                    s.p99_us,
                    s.actions_per_s / e.actions_per_s,
                    fmt_opt(s.cpu_us_per_action),
                    e.errors,
                    s.errors
                ));
                // The submitted actions run in the background: let them finish before the next cell.
                settle(side.pid(), Duration::from_secs(20)).await;
            }
            let mut cells = Vec::new();
            for (_, listen, side) in &fleet {
                let execute = Target::Sidecar {
                    clients: sidecar_clients(listen, channels_for(c)).await?,
                    url: url.clone(),
                    post: post.clone(),
                };
                let redis_before = redis_pid.and_then(cpu_time);
                let cell = closed_loop(
                    &execute,
                    Workload::Get1k,
                    c,
                    o.warmup,
                    o.duration,
                    Some(side.pid()),
                    upstream_pid,
                )
                .await;
                let redis_cpu = redis_before.zip(redis_pid.and_then(cpu_time)).map(|(b, a)| {
                    // Over the warm-up too: an upper bound per action.
                    a.saturating_sub(b).as_secs_f64() * 1e6
                        / (cell.actions_per_s * (o.duration + o.warmup).as_secs_f64())
                });
                cells.push((cell, redis_cpu));
            }
            if let [(l, _), (f, redis_cpu)] = &cells[..] {
                fleet_rows.push(format!(
                    "| {round} | {c} | {:.0} | {:.0}/{:.0} | {:.0} | {:.0}/{:.0} | {:.0} / {:.0} | {:.2} | {} / {} | {} | {}/{} |",
                    l.actions_per_s,
                    l.p50_us,
                    l.p99_us,
                    f.actions_per_s,
                    f.p50_us,
                    f.p99_us,
                    f.p50_us - l.p50_us,
                    f.p99_us - l.p99_us,
                    f.actions_per_s / l.actions_per_s,
                    fmt_opt(l.cpu_us_per_action),
                    fmt_opt(f.cpu_us_per_action),
                    fmt_opt(*redis_cpu),
                    l.errors,
                    f.errors
                ));
            }
        }
    }
    println!(
        "Durable Submit beside unary Execute on the same sidecar (Submit's ack: the action committed)\n"
    );
    println!("| round | conc | store | Execute act/s | Execute p50/p99 us | Submit acks/s | Submit p50/p99 us | Submit/Execute | Submit cpu us/ack | errors E/S |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    durable_rows.iter().for_each(|r| println!("{r}"));
    println!(
        "\nUnary Execute with local limits against the same limits checked in Redis (fleet.redis_url)\n"
    );
    println!("| round | conc | local act/s | local p50/p99 us | fleet act/s | fleet p50/p99 us | added p50 / p99 us | fleet/local | sidecar cpu us/act local / fleet | redis cpu us/act | errors L/F |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    fleet_rows.iter().for_each(|r| println!("{r}"));
    drop((stores, fleet, redis, postgres));
    let _ = std::fs::remove_dir_all(&store);
    Ok(())
}

/// Actions each batch stream keeps outstanding: the sidecar's default batch_max_in_flight.
const BATCH_WINDOW: usize = 64;

/// Closed loop over ExecuteBatch: `concurrency` actions outstanding, on one stream per
/// BATCH_WINDOW (each on its own connection, as B's channels). A stream's sender sends the next
/// action when a reply frees a place; the action_id carries the send time (ns since `t0`), so
/// the reader measures each action's latency. Completions within the window count.
async fn batch_loop(
    listen: &Listen,
    url: &str,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    sidecar: u32,
    upstream: u32,
) -> Result<Cell, Error> {
    let streams = concurrency.div_ceil(BATCH_WINDOW).max(1);
    let t0 = Instant::now();
    let start = t0 + warmup;
    let end = start + duration;
    let others = [Some(upstream), Some(std::process::id())];
    let cpu_before = Arc::new(Mutex::new((None, None)));
    let meter = {
        let cpu_before = cpu_before.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            *cpu_before.lock().unwrap_or_else(|e| e.into_inner()) = (cpu_time(sidecar), cpu_sum(&others));
        })
    };
    let errors = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::with_capacity(streams);
    for s in 0..streams {
        let window = concurrency / streams + usize::from(s < concurrency % streams);
        let mut client = HttpActionServiceClient::new(channel(listen).await?);
        let places = Arc::new(tokio::sync::Semaphore::new(window));
        let (tx, rx) = tokio::sync::mpsc::channel(window.max(1));
        let template = action(Workload::Get1k, url, &Bytes::new());
        let sender_places = places.clone();
        tokio::spawn(async move {
            while Instant::now() < end {
                let Ok(place) = sender_places.acquire().await else { break };
                place.forget();
                let mut next = template.clone();
                next.action_id = t0.elapsed().as_nanos().to_string();
                if tx.send(next).await.is_err() {
                    break;
                }
            }
        });
        let mut replies =
            client.execute_batch(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        let errors = errors.clone();
        readers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            while let Ok(Some(reply)) = replies.message().await {
                places.add_permits(1);
                let done = Instant::now();
                if done < start || done >= end {
                    continue;
                }
                let sent = reply.action_id.parse::<u64>().map(Duration::from_nanos).unwrap_or_default();
                if reply.outcome() == pb::Outcome::Succeeded {
                    lat.push((done - t0).saturating_sub(sent).as_micros() as u64);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            lat
        }));
    }
    let _ = meter.await;
    tokio::time::sleep_until(end.into()).await;
    let cpu_after = cpu_time(sidecar);
    let others_after = cpu_sum(&others);
    let mut lat = Vec::new();
    for r in readers {
        lat.extend(r.await.unwrap_or_default());
    }
    lat.sort_unstable();
    let n = lat.len() as f64;
    let (cpu_before, others_before) = *cpu_before.lock().unwrap_or_else(|e| e.into_inner());
    let per_action = |before: Option<Duration>, after: Option<Duration>| match (before, after) {
        (Some(b), Some(a)) if n > 0.0 => Some((a.saturating_sub(b)).as_secs_f64() * 1e6 / n),
        _ => None,
    };
    let cpu = per_action(cpu_before, cpu_after);
    let others = per_action(others_before, others_after);
    Ok(Cell {
        actions_per_s: n / duration.as_secs_f64(),
        p50_us: percentile(&lat, 0.50),
        p99_us: percentile(&lat, 0.99),
        errors: errors.load(Ordering::Relaxed),
        cpu_us_per_action: cpu,
        total_cpu_us_per_action: cpu.zip(others).map(|(c, o)| c + o),
        rss_kib: vm_kib(sidecar, "VmRSS"),
    })
}

/// wrk straight to the upstream (`wrk -t T -c conc -d secs URL`, T = min(2, conc)): requests
/// per second from its `Requests/sec:` line, or None when wrk is not installed or says nothing.
fn wrk_direct(url: &str, concurrency: usize, duration: Duration) -> Option<f64> {
    let output = Command::new("wrk")
        .args(["-t", &concurrency.min(2).to_string(), "-c", &concurrency.to_string()])
        .args(["-d", &format!("{}s", duration.as_secs().max(1)), url])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().find(|l| l.trim_start().starts_with("Requests/sec:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// ExecuteBatch against unary Execute (B) and the direct client (A), GET 1 KiB, closed loop at
/// each `--conc` (64 by default here) on one TCP sidecar, `--rounds` times in turn so drift on a
/// shared machine hits all three alike.
async fn batches(o: &Options) -> Result<(), Error> {
    let (upstream, up) = spawn_upstream(&o.paths.upstream, &[])?;
    let upstream_pid = upstream.pid();
    let tcp = Listen::Tcp(format!("127.0.0.1:{}", free_port()?));
    let extra: Vec<&str> = o.sidecar_args.iter().map(String::as_str).collect();
    let t = Instant::now();
    let sidecar = spawn_sidecar(&o.paths.callout, &tcp, &extra)?;
    let ready = wait_serving(&tcp, t, Duration::from_secs(10)).await?;
    println!("upstream {up}; sidecar {} (SERVING after {ready:?})", tcp.arg());
    println!("cells: {:?} measured after {:?} warm-up, {} rounds\n", o.duration, o.warmup, o.rounds);
    println!("| conc | round | wrk direct req/s | A direct act/s | B unary act/s | B cpu us/act | batch act/s | batch p50/p99 us | batch cpu us/act | batch/B act per cpu-s | batch/wrk | batch/A | errors A/B/batch |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let url = upstream_url(&up, Workload::Get1k, None);
    let conc: Vec<usize> = if o.conc == [1, 16, 64, 256] { vec![64] } else { o.conc.clone() };
    let pid = sidecar.pid();
    for c in conc {
        let direct =
            Target::Direct { client: Box::new(direct_client()), url: url.clone(), post: Bytes::new() };
        let unary = Target::Sidecar {
            clients: sidecar_clients(&tcp, channels_for(c)).await?,
            url: url.clone(),
            post: Bytes::new(),
        };
        let (mut per_cpu, mut of_direct, mut of_wrk) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=o.rounds {
            let wrk = wrk_direct(&url, c, o.duration);
            let a = closed_loop(&direct, Workload::Get1k, c, o.warmup, o.duration, None, upstream_pid).await;
            let b =
                closed_loop(&unary, Workload::Get1k, c, o.warmup, o.duration, Some(pid), upstream_pid).await;
            let x = batch_loop(&tcp, &url, c, o.warmup, o.duration, pid, upstream_pid).await?;
            // Actions per sidecar CPU-second is 1 / (CPU per action).
            let cpu_ratio = b.cpu_us_per_action.zip(x.cpu_us_per_action).map(|(b, x)| b / x);
            let direct_ratio = x.actions_per_s / a.actions_per_s;
            let wrk_ratio = wrk.map(|w| x.actions_per_s / w);
            per_cpu.push(cpu_ratio.unwrap_or(f64::NAN));
            of_direct.push(direct_ratio);
            of_wrk.push(wrk_ratio.unwrap_or(f64::NAN));
            println!(
                "| {c} | {round} | {} | {:.0} | {:.0} | {} | {:.0} | {:.0}/{:.0} | {} | {} | {} | {:.2} | {}/{}/{} |",
                wrk.map_or("-".into(), |w| format!("{w:.0}")),
                a.actions_per_s,
                b.actions_per_s,
                fmt_opt(b.cpu_us_per_action),
                x.actions_per_s,
                x.p50_us,
                x.p99_us,
                fmt_opt(x.cpu_us_per_action),
                cpu_ratio.map_or("-".into(), |r| format!("{r:.2}")),
                wrk_ratio.map_or("-".into(), |r| format!("{r:.2}")),
                direct_ratio,
                a.errors,
                b.errors,
                x.errors
            );
        }
        let spread = |v: &[f64]| {
            let finite: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
            let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!("{lo:.2}..{hi:.2}")
        };
        println!(
            "\nconc {c}: median batch/B actions per sidecar CPU-second {:.2} (rounds {}); median batch/wrk throughput {:.2} (rounds {}); median batch/A {:.2} (rounds {})",
            median(per_cpu.clone()),
            spread(&per_cpu),
            median(of_wrk.clone()),
            spread(&of_wrk),
            median(of_direct.clone()),
            spread(&of_direct)
        );
    }
    Ok(())
}

/// Waits until the sidecar is idle (under 10 ms of CPU in 200 ms), at most `limit`.
async fn settle(pid: u32, limit: Duration) {
    let t = Instant::now();
    let mut last = cpu_time(pid);
    while t.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = cpu_time(pid);
        if last.zip(now).is_some_and(|(b, a)| a.saturating_sub(b) < Duration::from_millis(10)) {
            return;
        }
        last = now;
    }
}

/// Exactly `count` GET 1 KiB actions over B (TCP) at each `--conc`, against one sidecar started
/// under `--sidecar-wrap` when given; the sidecar is then stopped with SIGTERM and waited for,
/// so a wrapper such as valgrind writes its report. Startup and shutdown are in the wrapper's
/// totals: two runs of different counts, subtracted, give the cost per action.
async fn counted(o: &Options, count: u64) -> Result<(), Error> {
    let (_upstream, up) = spawn_upstream(&o.paths.upstream, &[])?;
    let tcp = Listen::Tcp(format!("127.0.0.1:{}", free_port()?));
    let extra: Vec<&str> = o.sidecar_args.iter().map(String::as_str).collect();
    let t = Instant::now();
    let mut sidecar = spawn_sidecar_wrapped(&o.sidecar_wrap, &o.paths.callout, &tcp, &extra)?;
    // Under valgrind a start takes seconds.
    let ready = wait_serving(&tcp, t, Duration::from_secs(120)).await?;
    println!("upstream {up}; sidecar {} (SERVING after {ready:?}), {count} actions a cell", tcp.arg());
    println!("| workload | conc | actions | errors | seconds | sidecar cpu us/act |");
    println!("|---|---|---|---|---|---|");
    let url = upstream_url(&up, Workload::Get1k, None);
    let conc: Vec<usize> = if o.conc == [1, 16, 64, 256] { vec![64] } else { o.conc.clone() };
    for c in conc {
        let target = Target::Sidecar {
            clients: sidecar_clients(&tcp, channels_for(c)).await?,
            url: url.clone(),
            post: Bytes::new(),
        };
        let tickets = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let cpu_before = cpu_time(sidecar.pid());
        let t = Instant::now();
        let mut workers = Vec::with_capacity(c);
        for w in 0..c {
            let (target, tickets, errors) = (target.clone(), tickets.clone(), errors.clone());
            workers.push(tokio::spawn(async move {
                // Bounded by the count: each ticket is one action, errors included.
                while tickets.fetch_add(1, Ordering::Relaxed) < count {
                    if target.call(w, Workload::Get1k).await.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for w in workers {
            w.await?;
        }
        let took = t.elapsed();
        let cpu = cpu_before.zip(cpu_time(sidecar.pid())).map(|(b, a)| a.saturating_sub(b));
        println!(
            "| {} | {c} | {count} | {} | {:.2} | {} |",
            Workload::Get1k.name(),
            errors.load(Ordering::Relaxed),
            took.as_secs_f64(),
            fmt_opt(cpu.map(|d| d.as_secs_f64() * 1e6 / count as f64)),
        );
    }
    stop_gracefully(&mut sidecar, Duration::from_secs(120))
}

/// The processes whose parent is `parent`.
fn children(parent: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let ppid = stat.rfind(')').and_then(|i| stat[i + 2..].split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(parent) {
            pids.push(pid);
        }
    }
    pids
}

/// Sends SIGTERM to `proc` and waits (at most `limit`) for it to exit. A wrapper that runs the
/// sidecar as its child (heaptrack's script) has the child signalled instead, so the wrapper
/// lives to write its report.
fn stop_gracefully(proc: &mut Proc, limit: Duration) -> Result<(), Error> {
    let kids = children(proc.pid());
    let targets = if kids.is_empty() { vec![proc.pid()] } else { kids };
    let mut kill = Command::new("kill");
    kill.arg("-TERM");
    kill.args(targets.iter().map(u32::to_string));
    let status = kill.status()?;
    if !status.success() {
        return Err(format!("kill -TERM {} failed", proc.pid()).into());
    }
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some(status) = proc.child.try_wait()? {
            eprintln!("[loadgen] {} (pid {}) exited: {status}", proc.name, proc.pid());
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{} did not exit within {limit:?} of SIGTERM", proc.name).into())
}

fn rss_sampler(pid: u32) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<RssSamples>) {
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let (mut lo, mut hi, mut all) = (u64::MAX, 0, Vec::new());
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        for _ in 0..6000 {
            tokio::select! {
                _ = &mut stop_rx => break,
                _ = tick.tick() => {
                    if let Some(k) = vm_kib(pid, "VmRSS") {
                        lo = lo.min(k);
                        hi = hi.max(k);
                        all.push(k);
                    }
                }
            }
        }
        (lo, hi, all)
    });
    (stop_tx, task)
}

async fn scale(o: &Options) -> Result<(), Error> {
    const STREAM_BYTES: u64 = 1 << 30;
    println!(
        "open files limit (soft): {}",
        std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|l| l.lines().find(|l| l.starts_with("Max open files")).map(|l| l
                .split_whitespace()
                .nth(3)
                .unwrap_or("?")
                .to_owned()))
            .unwrap_or_default()
    );
    let (upstream, up) = spawn_upstream(&o.paths.upstream, &[])?;
    let tcp = Listen::Tcp(format!("127.0.0.1:{}", free_port()?));
    let t = Instant::now();
    let burst_args: Vec<&str> =
        ["--max-in-flight", "10000", "--max-in-flight-per-host", "10000", "--max-queued", "1000"]
            .into_iter()
            .chain(o.sidecar_args.iter().map(String::as_str))
            .collect();
    let side = spawn_sidecar(&o.paths.callout, &tcp, &burst_args)?;
    wait_serving(&tcp, t, Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!("| measure | value |\n|---|---|");
    println!("| idle RSS | {} MiB |", mib(vm_kib(side.pid(), "VmRSS")));

    // 1 GiB streamed through ExecuteStream; the client only counts bytes.
    let mut client = sidecar_clients(&tcp, 1).await?.remove(0);
    let req = pb::ExecuteHttpActionRequest {
        method: "GET".into(),
        url: format!("{up}/stream/{STREAM_BYTES}"),
        retry: Some(Box::new(pb::RetryPolicy { max_attempts: 1, ..Default::default() })),
        timeouts: Some(Box::new(pb::Timeouts {
            attempt: Some(prost_types::Duration { seconds: 300, nanos: 0 }),
            ..Default::default()
        })),
        ..Default::default()
    };
    // First, on the fresh sidecar: the stream must not grow its memory.
    let before = vm_kib(side.pid(), "VmRSS");
    let (stop, sampler) = rss_sampler(side.pid());
    let t = Instant::now();
    let mut stream = client.execute_stream(req).await?.into_inner();
    let (mut bytes, mut outcome) = (0u64, None);
    while let Some(event) = stream.message().await? {
        match event.event {
            Some(pb::action_event::Event::BodyChunk(c)) => bytes += c.data.len() as u64,
            Some(pb::action_event::Event::Completed(c)) => outcome = c.result.map(|r| r.outcome()),
            _ => {}
        }
    }
    let took = t.elapsed();
    let _ = stop.send(());
    let (lo, hi, all) = sampler.await?;
    let mid = all.get(all.len() / 2).copied();
    println!(
        "| 1 GiB ExecuteStream | {bytes} bytes, {outcome:?}, {took:.2?} ({:.0} MiB/s) |",
        bytes as f64 / (1 << 20) as f64 / took.as_secs_f64()
    );
    println!(
        "| RSS during the stream: before / min / median / max | {} / {} / {} / {} MiB ({} samples) |",
        mib(before),
        mib(Some(lo)),
        mib(mid),
        mib(Some(hi)),
        all.len()
    );

    // 10,000 actions in flight at once; the upstream holds each response 5 s.
    let url = upstream_url(&up, Workload::Get1k, Some(HOLD_MS));
    let clients = in_flight_burst(&tcp, side.pid(), &url, "HTTP/1.1").await?;
    drop(clients);
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!("| RSS 1 s after | {} MiB |", mib(vm_kib(side.pid(), "VmRSS")));
    // For scale: a bare hyper server holding the same 10,000 connections and sleeping requests.
    println!(
        "| upstream (bench_upstream) VmHWM, for comparison | {} MiB |",
        mib(vm_kib(upstream.pid(), "VmHWM"))
    );
    drop(side);

    // The same burst to an HTTPS upstream that speaks h2 (by ALPN): the 10,000 share one
    // connection instead of needing one each.
    let tls_dir = std::env::temp_dir().join(format!("callout-loadgen-tls-{}", std::process::id()));
    let tls_dir_arg = tls_dir.to_string_lossy().into_owned();
    let (upstream_h2, up_h2) = spawn_upstream(&o.paths.upstream, &["--tls-dir", &tls_dir_arg])?;
    let ca = tls_dir.join("ca.pem").to_string_lossy().into_owned();
    let tcp = Listen::Tcp(format!("127.0.0.1:{}", free_port()?));
    let t = Instant::now();
    let side = spawn_sidecar(&o.paths.callout, &tcp, &[&burst_args[..], &["--ca-file", &ca]].concat())?;
    wait_serving(&tcp, t, Duration::from_secs(10)).await?;
    let url = upstream_url(&up_h2, Workload::Get1k, Some(HOLD_MS));
    let clients = in_flight_burst(&tcp, side.pid(), &url, "h2 over TLS").await?;
    drop(clients);
    println!(
        "| upstream (h2 over TLS) VmHWM, for comparison | {} MiB |",
        mib(vm_kib(upstream_h2.pid(), "VmHWM"))
    );
    drop((side, upstream_h2));
    let _ = std::fs::remove_dir_all(&tls_dir);

    // Cold start: spawn, poll health until SERVING.
    let mut starts = Vec::new();
    for _ in 0..5 {
        let listen = Listen::Tcp(format!("127.0.0.1:{}", free_port()?));
        let t = Instant::now();
        let proc = spawn_sidecar(&o.paths.callout, &listen, &[])?;
        let took = wait_serving(&listen, t, Duration::from_secs(10)).await?;
        starts.push(took.as_secs_f64() * 1000.0);
        drop(proc);
    }
    println!(
        "| cold start to SERVING, 5 runs | {} ms |",
        starts.iter().map(|ms| format!("{ms:.1}")).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// The scale run's burst: this many actions at once, over channels of this many streams each,
/// to an upstream that holds every response this long.
const IN_FLIGHT: usize = 10_000;
const PER_CHANNEL: usize = 100;
const HOLD_MS: u64 = 5_000;

/// `IN_FLIGHT` Execute calls at once to `url` (held by the upstream) through the sidecar on
/// `listen`; prints how many succeeded and the sidecar's peak RSS. Returns the channels, so
/// the caller decides when they close.
async fn in_flight_burst(
    listen: &Listen,
    pid: u32,
    url: &str,
    label: &str,
) -> Result<Vec<HttpActionServiceClient<Channel>>, Error> {
    let clients = sidecar_clients(listen, IN_FLIGHT / PER_CHANNEL).await?;
    let (stop, sampler) = rss_sampler(pid);
    let t = Instant::now();
    let mut calls = Vec::with_capacity(IN_FLIGHT);
    for i in 0..IN_FLIGHT {
        let mut client = clients[i % clients.len()].clone();
        let url = url.to_owned();
        calls.push(tokio::spawn(async move {
            let req = action(Workload::Get1k, &url, &Bytes::new());
            let mut req = tonic::Request::new(req);
            req.set_timeout(Duration::from_secs(60));
            match client.execute(req).await {
                Ok(r) if r.get_ref().outcome() == pb::Outcome::Succeeded => Ok(()),
                Ok(r) => Err(format!("{:?}", r.into_inner().error)),
                Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
            }
        }));
    }
    let (mut ok, mut first_err) = (0, None);
    for c in calls {
        match c.await {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(e) => first_err = first_err.or(Some(e.to_string())),
        }
    }
    let took = t.elapsed();
    let _ = stop.send(());
    let (_, hi, _) = sampler.await?;
    println!("| {IN_FLIGHT} in flight, {label} (hold {HOLD_MS} ms): succeeded | {ok} in {took:.2?} |");
    if let Some(e) = first_err {
        println!("| first error | {e} |");
    }
    println!(
        "| {IN_FLIGHT} in flight, {label}: peak RSS sampled / VmHWM | {} / {} MiB |",
        mib(Some(hi)),
        mib(vm_kib(pid, "VmHWM"))
    );
    Ok(clients)
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, how, url] = &args[..] {
        if flag == BARE_BURST_FLAG {
            return bare_client_burst(how == "pool", url);
        }
    }
    tokio::runtime::Runtime::new()?.block_on(run())
}

async fn run() -> Result<(), Error> {
    let o = options()?;
    let ld = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "loadgen: nproc {}, loadavg {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        ld.trim()
    );
    if o.scale {
        scale(&o).await
    } else if o.durable {
        durable(&o).await
    } else if o.batch {
        batches(&o).await
    } else if o.nginx {
        nginx_mode(&o).await
    } else if let Some(over) = &o.burst {
        burst_only(&o, over).await
    } else if let Some(count) = o.count {
        counted(&o, count).await
    } else {
        throughput(&o).await
    }
}

// ---------------------------------------------------------------- nginx (issue 17, target 1)

/// An nginx master process (and its workers) on a generated config, stopped when dropped:
/// SIGTERM to the master, which stops its workers (a SIGKILL would orphan them).
struct Nginx {
    proc: Proc,
    port: u16,
}

impl Nginx {
    /// Starts `nginx -p dir -c dir/NAME.conf` with `workers` worker processes, a server on a
    /// free loopback port whose `listen` line ends in `listen_suffix` (" http2" for h2c) and
    /// whose body is `server`, plus `http` (extra directives in the http block).
    fn start(
        dir: &Path,
        name: &str,
        workers: &str,
        listen_suffix: &str,
        http: &str,
        server: &str,
    ) -> Result<Self, Error> {
        let port = free_port()?;
        let d = dir.display();
        // No access log on either nginx: it would be the one cost nginx pays per request that
        // callout does not (callout records metrics, writes no line per success).
        let conf = format!(
            "daemon off;\nmaster_process on;\nworker_processes {workers};\npid {d}/{name}.pid;\n\
             error_log {d}/{name}.error.log warn;\nevents {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 300s;\n\
             client_body_temp_path {d}/{name}.body;\n  proxy_temp_path {d}/{name}.proxy;\n\
             fastcgi_temp_path {d}/{name}.fastcgi;\n  uwsgi_temp_path {d}/{name}.uwsgi;\n\
             scgi_temp_path {d}/{name}.scgi;\n{http}\n  server {{\n    listen 127.0.0.1:{port}{listen_suffix};\n{server}\n  }}\n}}\n"
        );
        let path = dir.join(format!("{name}.conf"));
        std::fs::write(&path, conf)?;
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join(format!("{name}.error.log")))
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting nginx: {e}"))?;
        let nginx = Nginx { proc: Proc { name: "nginx", child }, port };
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if t.elapsed() > Duration::from_secs(10) {
                return Err(format!("nginx {name} not listening on {port} within 10 s").into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(nginx)
    }

    /// The master and its workers.
    fn pids(&self) -> Vec<Option<u32>> {
        let master = self.proc.pid();
        std::iter::once(master).chain(children(master)).map(Some).collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.proc.pid().to_string()]).status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.proc.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Requests the origin nginx has served so far (its stub_status counter, less this request).
fn origin_requests(port: u16) -> Result<u64, Error> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port))?;
    tcp.write_all(b"GET /status HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n")?;
    let mut reply = String::new();
    tcp.read_to_string(&mut reply)?;
    // "... server accepts handled requests\n A H R \n..."
    let numbers = reply.split("requests").nth(1).ok_or("stub_status: no counters")?;
    let requests: u64 = numbers.split_whitespace().nth(2).ok_or("stub_status: short")?.parse()?;
    Ok(requests - 1)
}

/// What one h2load (or wrk) run reported.
#[derive(Default, Clone, Copy)]
struct LoadRun {
    requests_per_s: f64,
    succeeded: u64,
    failed: u64,
    mean_latency_us: f64,
}

/// A duration as h2load and wrk print it ("512us", "1.02ms", "3.10s"), in microseconds.
fn parse_duration_us(s: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    Some(num.parse::<f64>().ok()? * scale)
}

/// h2load: `requests` requests over 4 connections × 16 streams (one thread), `extra` arguments
/// before the URL (the gRPC body and headers for callout).
fn h2load(url: &str, requests: u64, extra: &[&str]) -> Result<LoadRun, Error> {
    let out = Command::new("h2load")
        .args(["-n", &requests.to_string(), "-c", "4", "-m", "16", "-t", "1"])
        .args(extra)
        .arg(url)
        .output()
        .map_err(|e| format!("running h2load: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut run = LoadRun::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if line.starts_with("finished in") {
            run.requests_per_s = words.get(3).and_then(|w| w.parse().ok()).unwrap_or(f64::NAN);
        } else if line.starts_with("requests:") {
            // requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout
            run.succeeded = words.get(7).and_then(|w| w.parse().ok()).unwrap_or(0);
            run.failed = words.get(9).and_then(|w| w.parse().ok()).unwrap_or(0);
        } else if line.starts_with("time for request:") {
            run.mean_latency_us = words.get(5).and_then(|w| parse_duration_us(w)).unwrap_or(f64::NAN);
        }
    }
    if run.succeeded == 0 {
        return Err(format!(
            "h2load {url}: nothing succeeded:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(run)
}

/// wrk: one thread, 64 connections, for `duration`.
fn wrk(url: &str, duration: Duration) -> Result<LoadRun, Error> {
    let out = Command::new("wrk")
        .args(["-t", "1", "-c", "64", "-d", &format!("{}s", duration.as_secs().max(1)), url])
        .output()
        .map_err(|e| format!("running wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut run = LoadRun::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.first() {
            Some(&"Requests/sec:") => {
                run.requests_per_s = words.get(1).and_then(|w| w.parse().ok()).unwrap_or(f64::NAN)
            }
            Some(&"Latency") => {
                run.mean_latency_us = words.get(1).and_then(|w| parse_duration_us(w)).unwrap_or(f64::NAN)
            }
            _ if line.contains("requests in") => {
                run.succeeded = words.first().and_then(|w| w.parse().ok()).unwrap_or(0)
            }
            _ => {}
        }
    }
    if run.succeeded == 0 {
        return Err(format!("wrk {url}: nothing done:\n{text}").into());
    }
    Ok(run)
}

/// One proxy measured: what h2load saw, CPU per request of the proxy and of the origin, and
/// how many requests reached the origin (must equal the requests that succeeded).
struct ProxyRun {
    load: LoadRun,
    proxy_cpu_us: f64,
    /// The proxy's context switches (voluntary and not, every thread) per request: its wake-ups.
    proxy_switches: f64,
    origin_cpu_us: f64,
    origin_seen: u64,
}

/// Context switches so far of every thread of `pids` (`/proc/PID/task/*/status`).
fn switches_sum(pids: &[Option<u32>]) -> u64 {
    let mut sum = 0;
    for pid in pids.iter().flatten() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for task in tasks.flatten() {
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
            sum += status
                .lines()
                .filter(|l| {
                    l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:")
                })
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    sum
}

fn measure_proxy(
    proxy: &dyn Fn() -> Vec<Option<u32>>,
    origin: &Nginx,
    run: &dyn Fn(u64) -> Result<LoadRun, Error>,
    requests: u64,
) -> Result<ProxyRun, Error> {
    run(requests / 20 + 100)?; // warm-up: connections, pools, caches
    let (p0, o0, seen0) = (cpu_sum(&proxy()), cpu_sum(&origin.pids()), origin_requests(origin.port)?);
    let s0 = switches_sum(&proxy());
    let load = run(requests)?;
    let s1 = switches_sum(&proxy());
    let (p1, o1, seen1) = (cpu_sum(&proxy()), cpu_sum(&origin.pids()), origin_requests(origin.port)?);
    let per = |b: Option<Duration>, a: Option<Duration>| {
        b.zip(a).map_or(f64::NAN, |(b, a)| a.saturating_sub(b).as_secs_f64() * 1e6 / load.succeeded as f64)
    };
    Ok(ProxyRun {
        load,
        proxy_cpu_us: per(p0, p1),
        proxy_switches: s1.saturating_sub(s0) as f64 / load.succeeded.max(1) as f64,
        origin_cpu_us: per(o0, o1),
        origin_seen: seen1 - seen0 - 1,
    })
}

/// The old default layout (`--runtime work-stealing`), measured beside the per-core default.
const WORK_STEALING: &str = "callout, work-stealing (2 workers)";

/// h2load → callout `Execute` → nginx (1 KiB JSON) against h2load → nginx as an h2c reverse
/// proxy → the same nginx, and wrk → that nginx directly; each proxy's CPU per request from
/// /proc (utime + stime of every process and thread of it) over a fixed number of requests.
async fn nginx_mode(o: &Options) -> Result<(), Error> {
    let requests = o.count.unwrap_or(40_000);
    let reps = o.reps;
    let dir = std::env::temp_dir().join(format!("callout-loadgen-nginx-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("www/bytes"))?;
    // Nginx workers run as `nobody` when started by root: let them read the files.
    let _ = Command::new("chmod").args(["-R", "a+rX"]).arg(&dir).status();
    // The same document as bench_upstream's /bytes/1024: JSON of exactly 1,024 bytes.
    let prefix = "{\"data\":\"";
    let doc = format!("{prefix}{}\"}}", "x".repeat(1024 - prefix.len() - 2));
    std::fs::write(dir.join("www/bytes/1024"), &doc)?;
    let _ = Command::new("chmod").args(["-R", "a+rX"]).arg(&dir).status();
    let www = dir.join("www");
    let origin = Nginx::start(
        &dir,
        "origin",
        "1",
        "",
        "",
        &format!(
            "    location /bytes/ {{ root {}; default_type application/json; }}\n    location = /status {{ stub_status; }}",
            www.display()
        ),
    )?;
    let origin_url = format!("http://127.0.0.1:{}/bytes/1024", origin.port);
    let upstream_block = format!(
        "  upstream origin {{ server 127.0.0.1:{}; keepalive 64; keepalive_requests 100000000; }}",
        origin.port
    );
    let proxy_server = "    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; }";
    let nginx_1 = Nginx::start(&dir, "proxy1", "1", " http2", &upstream_block, proxy_server)?;
    let nginx_auto = Nginx::start(&dir, "proxy_auto", "auto", " http2", &upstream_block, proxy_server)?;

    // The gRPC request h2load sends to callout: one length-prefixed, uncompressed message.
    let action = action(Workload::Get1k, &origin_url, &Bytes::new());
    let message = prost::Message::encode_to_vec(&action);
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let frame_path = dir.join("execute.grpc");
    std::fs::write(&frame_path, &frame)?;
    let frame_arg = frame_path.to_string_lossy().into_owned();

    let mut sidecars = Vec::new();
    for (label, args) in [
        ("callout, 1 worker", &["--worker-threads", "1"][..]),
        ("callout, default (per-core, 2 cores)", &[][..]),
        (WORK_STEALING, &["--runtime", "work-stealing"][..]),
    ] {
        let listen = Listen::Tcp(format!("127.0.0.1:{}", free_port()?));
        let extra: Vec<&str> =
            args.iter().copied().chain(o.sidecar_args.iter().map(String::as_str)).collect();
        let t = Instant::now();
        let side = spawn_sidecar(&o.paths.callout, &listen, &extra)?;
        wait_serving(&listen, t, Duration::from_secs(10)).await?;
        // One call through the generated client first: the frame must be a succeeding action.
        let reply = sidecar_clients(&listen, 1).await?.remove(0).execute(action.clone()).await?.into_inner();
        if reply.outcome() != pb::Outcome::Succeeded {
            return Err(format!("{label}: the action does not succeed: {:?}", reply.error).into());
        }
        sidecars.push((label, listen, side));
    }
    println!(
        "origin nginx {origin_url} (1 worker); proxies: nginx h2c 1 worker, nginx h2c auto workers ({} here), callout 1 worker, callout default (per-core), callout work-stealing",
        nginx_auto.pids().len() - 1
    );
    println!("h2load -n {requests} -c 4 -m 16 -t 1 (after {} warm-up requests) per cell; {reps} interleaved rounds; wrk -t 1 -c 64 -d {:?} straight to the origin\n", requests / 20 + 100, o.duration);
    println!("| round | path | req/s | mean latency us | proxy cpu us/req | proxy switches/req | origin cpu us/req | origin saw / succeeded | failed |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut summary: Vec<(&str, Vec<f64>, Vec<f64>)> = Vec::new();
    let note = |summary: &mut Vec<(&str, Vec<f64>, Vec<f64>)>, label: &'static str, rps: f64, cpu: f64| {
        match summary.iter_mut().find(|(l, _, _)| *l == label) {
            Some((_, r, c)) => {
                r.push(rps);
                c.push(cpu);
            }
            None => summary.push((label, vec![rps], vec![cpu])),
        }
    };
    let grpc_args = ["-d", frame_arg.as_str(), "-H", "content-type: application/grpc", "-H", "te: trailers"];
    for round in 1..=reps {
        let mut cells: Vec<(&'static str, ProxyRun)> = Vec::new();
        // Interleaved: callout 1 worker, nginx 1 worker, callout default, nginx auto, callout
        // work-stealing.
        for (i, (label, listen, side)) in sidecars.iter().enumerate() {
            let url = format!("http://{}/callout.v1.HttpActionService/Execute", listen.arg());
            let pid = side.pid();
            let r = measure_proxy(&|| vec![Some(pid)], &origin, &|n| h2load(&url, n, &grpc_args), requests)?;
            cells.push((label, r));
            let (nlabel, nginx) = match i {
                0 => ("nginx h2c proxy, 1 worker", &nginx_1),
                1 => ("nginx h2c proxy, auto workers", &nginx_auto),
                _ => continue,
            };
            let url = format!("http://127.0.0.1:{}/bytes/1024", nginx.port);
            let r = measure_proxy(&|| nginx.pids(), &origin, &|n| h2load(&url, n, &[]), requests)?;
            cells.push((nlabel, r));
        }
        for (label, r) in &cells {
            println!(
                "| {round} | {label} | {:.0} | {:.0} | {:.1} | {:.3} | {:.1} | {} / {} | {} |",
                r.load.requests_per_s,
                r.load.mean_latency_us,
                r.proxy_cpu_us,
                r.proxy_switches,
                r.origin_cpu_us,
                r.origin_seen,
                r.load.succeeded,
                r.load.failed
            );
            note(&mut summary, label, r.load.requests_per_s, r.proxy_cpu_us);
        }
        let direct = wrk(&origin_url, o.duration)?;
        println!(
            "| {round} | wrk → origin direct | {:.0} | {:.0} | - | - | - | - | - |",
            direct.requests_per_s, direct.mean_latency_us
        );
        note(&mut summary, "wrk → origin direct", direct.requests_per_s, f64::NAN);
    }
    let get = |label: &str| summary.iter().find(|(l, _, _)| *l == label).cloned();
    let span = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    };
    println!("\n| ratio (per round: {reps} rounds) | values | min-max |\n|---|---|---|");
    let ratios = |num: &str, den: &str, cpu: bool| -> Option<(String, (f64, f64))> {
        let (n, d) = (get(num)?, get(den)?);
        let (a, b) = if cpu { (n.2, d.2) } else { (n.1, d.1) };
        let r: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x / y).collect();
        Some((r.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(" / "), span(&r)))
    };
    for (what, num, den, cpu) in [
        (
            "CPU per request: callout 1 worker / nginx 1 worker (target ≤ 1.0)",
            "callout, 1 worker",
            "nginx h2c proxy, 1 worker",
            true,
        ),
        (
            "CPU per request: callout default / nginx auto",
            "callout, default (per-core, 2 cores)",
            "nginx h2c proxy, auto workers",
            true,
        ),
        (
            "CPU per request: callout default / callout 1 worker",
            "callout, default (per-core, 2 cores)",
            "callout, 1 worker",
            true,
        ),
        (
            "CPU per request: callout work-stealing / callout 1 worker",
            WORK_STEALING,
            "callout, 1 worker",
            true,
        ),
        (
            "CPU per request: callout default / callout work-stealing",
            "callout, default (per-core, 2 cores)",
            WORK_STEALING,
            true,
        ),
        ("req/s: callout 1 worker / wrk direct", "callout, 1 worker", "wrk → origin direct", false),
        (
            "req/s: callout default / wrk direct",
            "callout, default (per-core, 2 cores)",
            "wrk → origin direct",
            false,
        ),
        ("req/s: nginx 1 worker / wrk direct", "nginx h2c proxy, 1 worker", "wrk → origin direct", false),
        (
            "req/s: callout default / callout 1 worker",
            "callout, default (per-core, 2 cores)",
            "callout, 1 worker",
            false,
        ),
    ] {
        if let Some((values, (lo, hi))) = ratios(num, den, cpu) {
            println!("| {what} | {values} | {lo:.2}-{hi:.2} |");
        }
    }
    if let Some((values, (lo, hi))) = ratios(WORK_STEALING, "callout, 1 worker", false) {
        println!("| req/s: callout work-stealing / callout 1 worker | {values} | {lo:.2}-{hi:.2} |");
    }
    drop(sidecars);
    drop((nginx_1, nginx_auto, origin));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

// ---------------------------------------------------------------- durable and fleet (issue 17, target 6)

/// A throwaway PostgreSQL cluster in a temp dir on a free loopback port (as tests/it/pg.rs
/// starts them: initdb, trust auth, run as `nobody` when we are root), stopped and removed
/// when dropped. fsync and synchronous_commit stay on, as a real store runs.
struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

impl Postgres {
    fn bin_dir() -> Option<PathBuf> {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .flatten()
            .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
            .filter(|(_, bin)| bin.join("initdb").exists())
            .collect();
        versions.sort();
        versions.pop().map(|(_, bin)| bin)
    }

    fn command(&self, program: &str) -> Command {
        let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        if root {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--"]).arg(self.bin.join(program));
            c
        } else {
            Command::new(self.bin.join(program))
        }
    }

    fn run(&self, mut c: Command, what: &str) -> Result<(), Error> {
        let out = c.output().map_err(|e| format!("{what}: {e}"))?;
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
            return Err(format!("{what} failed: {}{log}", String::from_utf8_lossy(&out.stderr)).into());
        }
        Ok(())
    }

    /// None when no PostgreSQL binaries are installed.
    fn start() -> Result<Option<Self>, Error> {
        let Some(bin) = Self::bin_dir() else { return Ok(None) };
        let dir = std::env::temp_dir().join(format!("callout-loadgen-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let _ = Command::new("chown").arg("nobody:").arg(&dir).status();
        let pg = Self { bin, dir, port: free_port()? };
        let mut init = pg.command("initdb");
        init.arg("-D").arg(pg.dir.join("data")).args([
            "-U",
            "callout",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        pg.run(init, "initdb")?;
        let mut start = pg.command("pg_ctl");
        start
            .arg("-D")
            .arg(pg.dir.join("data"))
            .arg("-l")
            .arg(pg.dir.join("log"))
            .args(["-w", "-t", "60", "-o"])
            .arg(format!(
                "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c max_connections=60",
                pg.port,
                pg.dir.display()
            ))
            .arg("start");
        pg.run(start, "pg_ctl start")?;
        let mut create = pg.command("createdb");
        create.args(["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "callout", "callout"]);
        pg.run(create, "createdb")?;
        Ok(Some(pg))
    }

    fn url(&self) -> String {
        format!("postgres://callout@127.0.0.1:{}/callout", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let mut stop = self.command("pg_ctl");
        stop.arg("-D").arg(self.dir.join("data")).args(["-w", "-m", "immediate", "stop"]);
        let _ = stop.output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `redis-server` on a free loopback port, no persistence; None when none is installed.
fn start_redis() -> Result<Option<(Proc, String)>, Error> {
    let port = free_port()?;
    let Ok(child) = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return Ok(None);
    };
    let proc = Proc { name: "redis-server", child };
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t.elapsed() > Duration::from_secs(10) {
            return Err("redis-server not listening within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(Some((proc, format!("redis://127.0.0.1:{port}"))))
}

/// Only the scale run's 10,000-in-flight burst, over `h1` (plain HTTP/1.1 upstream, a
/// connection each) or `h2` (HTTPS upstream speaking h2, one connection), against one sidecar
/// started under `--sidecar-wrap` when given (e.g. heaptrack) and stopped with SIGTERM, so the
/// wrapper writes its report. For repeated memory measurements (issue 17, target 4).
/// The argument that makes loadgen, run by itself, the bare client of `bare_client_burst`.
const BARE_BURST_FLAG: &str = "--bare-client-burst";

/// For scale beside the sidecar: `IN_FLIGHT` GETs of `url` at once from a bare client, in this
/// process alone (loadgen runs itself for it) on one current-thread runtime: hyper-util's legacy
/// pool (`pooled`: what callout sends plain http through), else a hyper HTTP/1.1 connection of
/// its own per request. Prints the process's VmHWM in KiB.
fn bare_client_burst(pooled: bool, url: &str) -> Result<(), Error> {
    let uri: http::Uri = url.parse()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let authority = uri.authority().ok_or("no authority")?.to_string();
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..IN_FLIGHT {
            let (client, uri, authority) = (client.clone(), uri.clone(), authority.clone());
            calls.spawn(async move {
                let response = if pooled {
                    client.get(uri).await?
                } else {
                    let tcp = tokio::net::TcpStream::connect(&authority).await?;
                    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                    tokio::spawn(conn);
                    let path = uri.path_and_query().map_or("/", |p| p.as_str());
                    let request = http::Request::get(path)
                        .header(http::header::HOST, authority)
                        .body(Full::<Bytes>::default())?;
                    sender.send_request(request).await?
                };
                let ok = response.status().is_success();
                response.into_body().collect().await?;
                Ok::<_, Error>(ok)
            });
        }
        let mut ok = 0;
        while let Some(call) = calls.join_next().await {
            ok += usize::from(call??);
        }
        let hwm = vm_kib(std::process::id(), "VmHWM").ok_or("no VmHWM")?;
        println!("{ok} {hwm}");
        Ok(())
    })
}

/// Runs `bare_client_burst` in a process of its own; returns its VmHWM in KiB.
fn bare_client_peak(pooled: bool, url: &str) -> Result<u64, Error> {
    let how = if pooled { "pool" } else { "conn" };
    let out = Command::new(std::env::current_exe()?).args([BARE_BURST_FLAG, how, url]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (ok, hwm) = text.trim().split_once(' ').ok_or_else(|| format!("the bare client said {text:?}"))?;
    if ok != IN_FLIGHT.to_string() {
        return Err(format!("the bare client got {ok} of {IN_FLIGHT} responses").into());
    }
    Ok(hwm.parse()?)
}

async fn burst_only(o: &Options, over: &str) -> Result<(), Error> {
    let tls_dir = std::env::temp_dir().join(format!("callout-loadgen-tls-{}", std::process::id()));
    let tls_dir_arg = tls_dir.to_string_lossy().into_owned();
    let h2 = match over {
        "h1" => false,
        "h2" => true,
        other => return Err(format!("--burst takes h1 or h2, not {other:?}").into()),
    };
    let upstream_args: &[&str] = if h2 { &["--tls-dir", &tls_dir_arg] } else { &[] };
    let (upstream, up) = spawn_upstream(&o.paths.upstream, upstream_args)?;
    let ca = tls_dir.join("ca.pem").to_string_lossy().into_owned();
    let mut args: Vec<&str> =
        vec!["--max-in-flight", "10000", "--max-in-flight-per-host", "10000", "--max-queued", "1000"];
    if h2 {
        args.extend(["--ca-file", &ca]);
    }
    args.extend(o.sidecar_args.iter().map(String::as_str));
    let tcp = Listen::Tcp(format!("127.0.0.1:{}", free_port()?));
    let t = Instant::now();
    let mut side = spawn_sidecar_wrapped(&o.sidecar_wrap, &o.paths.callout, &tcp, &args)?;
    wait_serving(&tcp, t, Duration::from_secs(120)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!("| measure | value |\n|---|---|");
    println!("| idle RSS | {} MiB |", mib(vm_kib(side.pid(), "VmRSS")));
    let label = if h2 { "h2 over TLS" } else { "HTTP/1.1" };
    let url = upstream_url(&up, Workload::Get1k, Some(HOLD_MS));
    let clients = in_flight_burst(&tcp, side.pid(), &url, label).await?;
    drop(clients);
    let upstream_peak = vm_kib(upstream.pid(), "VmHWM");
    println!("| upstream VmHWM, for comparison | {} MiB |", mib(upstream_peak));
    let stopped = stop_gracefully(&mut side, Duration::from_secs(120));
    if !h2 {
        // What the HTTP client library alone holds for the same requests: the floor under
        // callout's own peak (which adds the callers' gRPC streams and the actions).
        for (pooled, client) in
            [(true, "hyper-util's legacy pool"), (false, "a hyper connection per request")]
        {
            let bare = bare_client_peak(pooled, &url)?;
            let ratio = upstream_peak.map_or("?".into(), |up| format!("{:.2}", bare as f64 / up as f64));
            println!(
                "| a bare client ({client}), the same {IN_FLIGHT} GETs: VmHWM | {} MiB ({ratio}x the upstream's) |",
                mib(Some(bare))
            );
        }
    }
    let _ = std::fs::remove_dir_all(&tls_dir);
    stopped
}
