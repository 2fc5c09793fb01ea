//! Assembles the gRPC server: the action service (behind the optional bearer token), grpc.health.v1
//! and server reflection (v1 and v1alpha, so grpcurl works with no proto file), on a TCP or Unix
//! socket listener, optionally with TLS or mutual TLS.
use crate::{
    accept::{accept_next, AcceptBackoff},
    api::{auth::BearerAuth, ActionRoutes, Draining, HttpActionService},
    durable::{service::DurableService, Durable},
    exec::Executor,
    gathered_writes::GatheredWrites,
    pb::{
        self, durable_action_service_server::DurableActionServiceServer,
        http_action_service_server::HttpActionServiceServer,
    },
};
use std::{future::Future, io, path::PathBuf, time::Duration};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use tokio_stream::{wrappers::ReceiverStream, StreamExt as _};
use tonic::{
    body::Body,
    service::interceptor::InterceptedService,
    transport::{server::Connected, server::Router, Certificate, Identity, ServerTlsConfig},
};
use tower::layer::util::{Identity as NoLayer, Stack};
use tower::util::MapResponseLayer;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("building server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("starting core {index}'s runtime: {source}")]
    Core { index: usize, source: io::Error },
    #[error("core {index}'s runtime stopped unexpectedly")]
    CoreLost { index: usize },
    #[error("building core {index}'s upstream clients: {source}")]
    CoreClients { index: usize, source: crate::client::ClientBuildError },
}

/// Where the server accepts calls.
pub enum Listener {
    Tcp(TcpListener),
    /// A Unix domain socket; its file is removed when the server stops.
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
}

/// TLS for the gRPC listener, as PEM.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
    /// When set, clients must present a certificate signed by one of these CAs (mutual TLS).
    pub client_ca_pem: Option<String>,
}

/// How the listener is protected and how it stops.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Bearer token required on action calls (health and reflection stay open). Default none.
    pub auth_token: Option<String>,
    /// Default none.
    pub tls: Option<ServerTls>,
    /// After the shutdown signal, how long in-flight actions may finish; when it runs out the
    /// actions still running are cut off (each answered CANCELLED) and the server stops.
    /// Default 25 s.
    pub drain_timeout: Duration,
    /// Largest request message, bytes; a larger call gets INVALID_ARGUMENT. Default 4 MiB.
    pub max_request_bytes: usize,
    /// Actions one ExecuteBatch stream runs at once. Default 64.
    pub batch_max_in_flight: usize,
    /// Runtimes serving callers' connections, each dealt connections in turn: the calling
    /// runtime, plus `cores - 1` current-thread runtimes on threads of their own, each with its
    /// own upstream pools (`server.runtime = per-core`). Default 1: the calling runtime alone.
    pub cores: usize,
    /// Durable actions (DurableActionService) served beside the action service. Default none.
    pub durable: Option<Durable>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            auth_token: None,
            tls: None,
            drain_timeout: Duration::from_secs(25),
            max_request_bytes: 4 << 20,
            batch_max_in_flight: 64,
            cores: 1,
            durable: None,
        }
    }
}

/// The part of the drain timeout kept at its end for the replies of cut-off actions to be
/// written and flushed before the server stops: a fifth of it, at most a second.
fn reply_margin(drain_timeout: Duration) -> Duration {
    (drain_timeout / 5).min(Duration::from_secs(1))
}

impl Listener {
    /// Binds a Unix domain socket at `path` with file mode `mode` (e.g. 0o600). A stale socket
    /// left by an earlier run is replaced; any other file there is an error.
    pub fn bind_unix(path: PathBuf, mode: u32) -> std::io::Result<Self> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if !meta.file_type().is_socket() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        Ok(Self::Unix { listener, path })
    }
}

/// Serves on a TCP `listener`, unprotected, until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    executor: Executor,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_with(Listener::Tcp(listener), executor, ServerOptions::default(), shutdown).await
}

/// Serves on `listener` with `options` until `shutdown` resolves, then drains: health turns
/// NOT_SERVING, new action calls get UNAVAILABLE, and in-flight actions run until they end or
/// `drain_timeout` nearly passes. Then the actions still running are cut off, each answered
/// (outcome FAILED, error CANCELLED, saying whether its request may have been sent), and the
/// server stops by `drain_timeout` after the signal.
pub async fn serve_with(
    listener: Listener,
    executor: Executor,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<HttpActionServiceServer<HttpActionService>>().await;
    let auth = BearerAuth::new(options.auth_token.as_deref());
    let draining = Draining::default();
    let durable = options.durable.clone();
    if let Some(durable) = &durable {
        set_durable_health(&health, durable.is_available()).await;
    }
    let mut tls = None;
    if let Some(server_tls) = &options.tls {
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(server_tls.cert_pem.clone(), server_tls.key_pem.clone()));
        if let Some(ca) = &server_tls.client_ca_pem {
            config = config.client_ca_root(Certificate::from_pem(ca.clone()));
        }
        tls = Some(config);
    }
    // Health is described too, so grpcurl can call it with no proto file, and google/rpc's
    // status and error details, so it can decode a status's details (BadRequest, RetryInfo).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection_v1, reflection_v1alpha) = (reflection().build_v1()?, reflection().build_v1alpha()?);
    let oversized: EdgeMap = crate::api::oversized_request;
    // One router per core, each on an executor of its own: core 0 on the one given, the others
    // on its limits and state with upstream pools of their own.
    let cores = options.cores.max(1);
    let mut routers = Vec::with_capacity(cores);
    for index in 0..cores {
        let executor = match index {
            0 => executor.clone(),
            _ => executor.for_another_core().map_err(|source| ServeError::CoreClients { index, source })?,
        };
        let service = HttpActionService::new(executor, draining.clone(), options.batch_max_in_flight);
        let actions =
            InterceptedService::new(ActionRoutes::new(service, options.max_request_bytes), auth.clone());
        let durable_actions = durable.clone().map(|d| {
            let service = DurableActionServiceServer::new(DurableService::new(d))
                .max_decoding_message_size(options.max_request_bytes);
            InterceptedService::new(service, auth.clone())
        });
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = &tls {
            server = server.tls_config(tls.clone())?;
        }
        let router = server
            // tonic answers an oversized request OUT_OF_RANGE; it is the caller's INVALID_ARGUMENT.
            .layer(MapResponseLayer::new(oversized))
            .add_service(health_service.clone())
            .add_service(reflection_v1.clone())
            .add_service(reflection_v1alpha.clone())
            .add_service(actions)
            .add_optional_service(durable_actions);
        routers.push(router);
    }
    crate::metrics::caller_cores(cores);

    // Some(deadline) once drained: every core then closes its connections gracefully (each
    // reply in flight is finished), and whatever is left at the deadline is dropped.
    let (stop_tx, stop) = watch::channel(None::<Instant>);
    let drain_timeout = options.drain_timeout;
    let drain = async move {
        shutdown.await;
        draining.begin();
        health.set_not_serving::<HttpActionServiceServer<HttpActionService>>().await;
        if let Some(durable) = &durable {
            // No new attempts; pending actions stay stored for the next start.
            durable.drain();
            set_durable_health(&health, false).await;
        }
        health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        let admitted = executor.limits().admitted();
        tracing::info!(in_flight = admitted, drain_timeout = ?drain_timeout, "draining: health is NOT_SERVING, new actions are refused");
        let deadline = Instant::now() + drain_timeout;
        let cut_at = deadline - reply_margin(drain_timeout);
        while executor.limits().admitted() > 0 && Instant::now() < cut_at {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match executor.limits().admitted() {
            0 => tracing::info!("drained: every action finished"),
            left => {
                tracing::warn!(
                    cut_off = left,
                    "drain timeout passed; cutting off the actions still running, each answered CANCELLED"
                );
                executor.cut_off();
                // Cut off, they end at once; their replies go out in the margin left.
                while executor.limits().admitted() > 0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        let _ = stop_tx.send(Some(deadline));
    };
    match listener {
        Listener::Tcp(listener) => {
            let accept = || async {
                let (tcp, _) = listener.accept().await?;
                // Many small calls from one engine: TCP_NODELAY on every accepted connection,
                // or Nagle and delayed ACKs hold small replies ~40 ms.
                tcp.set_nodelay(true)?;
                Ok::<_, io::Error>(tcp)
            };
            serve_cores(routers, accept, stop, drain).await
        }
        Listener::Unix { listener, path } => {
            let accept = || async { listener.accept().await.map(|(unix, _)| unix) };
            let served = serve_cores(routers, accept, stop, drain).await;
            let _ = std::fs::remove_file(&path);
            served
        }
    }
}

/// The responses' edge mapping, a plain function so a core's router has a type to name.
type EdgeMap = fn(http::Response<Body>) -> http::Response<Body>;
/// A core's router: the action, durable, health and reflection services behind the edge maps.
type CoreRouter = Router<Stack<MapResponseLayer<EdgeMap>, NoLayer>>;

/// Connections waiting for a core to take them: a core that stopped taking them holds up the
/// dealing here rather than piling accepted sockets up.
const DEALT_QUEUE: usize = 64;

/// A caller's connection that can move to another core: taken out of the accepting runtime's
/// reactor as a std socket and registered with the core's own, so its wake-ups happen there.
trait Movable: AsyncRead + AsyncWrite + Connected + Unpin + Send + Sized + 'static {
    type Std: Send + 'static;
    fn into_std(self) -> io::Result<Self::Std>;
    fn from_std(std: Self::Std) -> io::Result<Self>;
}

impl Movable for TcpStream {
    type Std = std::net::TcpStream;
    fn into_std(self) -> io::Result<Self::Std> {
        TcpStream::into_std(self)
    }
    fn from_std(std: Self::Std) -> io::Result<Self> {
        TcpStream::from_std(std)
    }
}

impl Movable for UnixStream {
    type Std = std::os::unix::net::UnixStream;
    fn into_std(self) -> io::Result<Self::Std> {
        UnixStream::into_std(self)
    }
    fn from_std(std: Self::Std) -> io::Result<Self> {
        UnixStream::from_std(std)
    }
}

/// Serves the routers, the first on the calling runtime and each other on a current-thread
/// runtime of its own thread, dealing the accepted connections out to them in turn, while
/// `drain` runs; returns once the first core has stopped and every other one with it.
async fn serve_cores<C, A, F>(
    routers: Vec<CoreRouter>,
    accept: A,
    stop: watch::Receiver<Option<Instant>>,
    drain: impl Future<Output = ()>,
) -> Result<(), ServeError>
where
    C: Movable,
    A: FnMut() -> F,
    F: Future<Output = io::Result<C>>,
{
    let mut routers = routers.into_iter();
    let Some(first) = routers.next() else {
        return Ok(());
    };
    let (first_dealt, first_connections) = mpsc::channel(DEALT_QUEUE);
    let mut dealt = vec![first_dealt];
    let mut others = Vec::new();
    for (index, router) in (1..).zip(routers) {
        let runtime = crate::runtime::core(index).map_err(|source| ServeError::Core { index, source })?;
        let (tx, connections) = mpsc::channel(DEALT_QUEUE);
        let (done_tx, done) = oneshot::channel();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name(format!("callout-core-{index}"))
            .spawn(move || {
                let _ = done_tx.send(runtime.block_on(serve_core::<C>(router, connections, stop)));
            })
            .map_err(|source| ServeError::Core { index, source })?;
        dealt.push(tx);
        others.push((index, done));
    }
    let dealing = deal(accept, dealt, stop.clone());
    let serving = serve_core::<C>(first, first_connections, stop);
    let work = async {
        tokio::pin!(serving, dealing);
        // Dealing stops once drained; the first core's serving ends last, at the latest at
        // the deadline. Then the senders are gone and the other cores' listeners end too.
        tokio::select! {
            served = &mut serving => served,
            () = &mut dealing => serving.await,
        }
    };
    tokio::pin!(work, drain);
    let served = tokio::select! {
        served = &mut work => served,
        () = &mut drain => work.await,
    };
    let mut outcome = served.map_err(ServeError::from);
    for (index, done) in others {
        let core = match done.await {
            Ok(served) => served.map_err(ServeError::from),
            Err(_) => Err(ServeError::CoreLost { index }),
        };
        if let (Ok(()), Err(e)) = (&outcome, core) {
            outcome = Err(e);
        }
    }
    outcome
}

/// Accepts connections and hands them to the cores in turn, until drained.
async fn deal<C, A, F>(
    mut accept: A,
    cores: Vec<mpsc::Sender<C::Std>>,
    mut stop: watch::Receiver<Option<Instant>>,
) where
    C: Movable,
    A: FnMut() -> F,
    F: Future<Output = io::Result<C>>,
{
    let mut backoff = AcceptBackoff::default();
    let mut next = 0;
    loop {
        let connection = tokio::select! {
            connection = accept_next("gRPC listener", &mut accept, &mut backoff) => connection,
            _ = stop.wait_for(Option::is_some) => return,
        };
        let core = next % cores.len();
        next = next.wrapping_add(1);
        let std = match connection.into_std() {
            Ok(std) => std,
            Err(e) => {
                tracing::debug!("a caller's connection could not be handed to core {core}: {e}");
                continue;
            }
        };
        crate::metrics::caller_connection(core);
        if cores[core].send(std).await.is_err() {
            // That core has stopped serving (it is draining, or failed): so does the server.
            return;
        }
    }
}

/// One core's server over the connections dealt to it: graceful once drained, dropped at the
/// deadline.
async fn serve_core<C: Movable>(
    router: CoreRouter,
    connections: mpsc::Receiver<C::Std>,
    stop: watch::Receiver<Option<Instant>>,
) -> Result<(), tonic::transport::Error> {
    // Registered with this core's reactor as tonic takes it: polled on this runtime.
    // While its rounds carry several replies, a connection gathers its small writes and sends
    // them once per round (`gathered_writes`).
    let incoming = ReceiverStream::new(connections).map(|std| C::from_std(std).map(GatheredWrites::new));
    let mut drained = stop.clone();
    let drained = async move {
        let _ = drained.wait_for(Option::is_some).await;
    };
    let mut stopped = stop;
    let stop_anyway = async move {
        let deadline = match stopped.wait_for(Option::is_some).await {
            Ok(deadline) => *deadline,
            Err(_) => None,
        };
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        served = router.serve_with_incoming_shutdown(incoming, drained) => served,
        () = stop_anyway => Ok(()),
    }
}

/// The durable service's health: SERVING while its store is usable and the server not draining.
async fn set_durable_health(health: &tonic_health::server::HealthReporter, serving: bool) {
    if serving {
        health.set_serving::<DurableActionServiceServer<DurableService>>().await;
    } else {
        health.set_not_serving::<DurableActionServiceServer<DurableService>>().await;
    }
}
