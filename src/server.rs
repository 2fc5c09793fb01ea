//! Assembles the gRPC server: the action service (behind the optional bearer token), grpc.health.v1
//! and server reflection (v1 and v1alpha, so grpcurl works with no proto file), on a TCP or Unix
//! socket listener, optionally with TLS or mutual TLS.
use crate::{
    api::{auth::BearerAuth, Draining, HttpActionService},
    durable::{service::DurableService, Durable},
    exec::Executor,
    pb::{
        self, durable_action_service_server::DurableActionServiceServer,
        http_action_service_server::HttpActionServiceServer,
    },
};
use std::{future::Future, path::PathBuf, time::Duration};
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{server::TcpIncoming, Certificate, Identity, ServerTlsConfig},
};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("building server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
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
    // Health is described too, so grpcurl can call it with no proto file, and google/rpc's
    // status and error details, so it can decode a status's details (BadRequest, RetryInfo).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let auth = BearerAuth::new(options.auth_token.as_deref());
    let draining = Draining::default();
    let service = HttpActionService::new(executor.clone(), draining.clone(), options.batch_max_in_flight);
    let actions = InterceptedService::new(
        HttpActionServiceServer::new(service).max_decoding_message_size(options.max_request_bytes),
        auth.clone(),
    );
    let durable = options.durable.clone();
    if let Some(durable) = &durable {
        set_durable_health(&health, durable.is_available()).await;
    }
    let durable_actions = durable.clone().map(|d| {
        let service = DurableActionServiceServer::new(DurableService::new(d))
            .max_decoding_message_size(options.max_request_bytes);
        InterceptedService::new(service, auth.clone())
    });
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<tokio::time::Instant>();
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
        let deadline = tokio::time::Instant::now() + drain_timeout;
        let cut_at = deadline - reply_margin(drain_timeout);
        while executor.limits().admitted() > 0 && tokio::time::Instant::now() < cut_at {
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
                while executor.limits().admitted() > 0 && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        let _ = drained_tx.send(deadline);
    };

    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = options.tls {
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(tls.cert_pem, tls.key_pem));
        if let Some(ca) = tls.client_ca_pem {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        server = server.tls_config(config)?;
    }
    let router = server
        // tonic answers an oversized request OUT_OF_RANGE; it is the caller's INVALID_ARGUMENT.
        .layer(tower::util::MapResponseLayer::new(crate::api::oversized_request))
        // An Execute reply's body keeps its memory budget until the reply went out.
        .layer(tower::util::MapResponseLayer::new(crate::api::reply_hold::hold_until_sent))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(actions)
        .add_optional_service(durable_actions);
    // After the drain the server closes its connections gracefully (each reply in flight is
    // finished); whatever is left at the drain deadline is dropped: the server stops then.
    let stop_anyway = async move {
        match drained_rx.await {
            Ok(deadline) => tokio::time::sleep_until(deadline).await,
            Err(_) => std::future::pending().await,
        }
    };
    let served = match listener {
        Listener::Tcp(listener) => {
            // Many small calls from one engine: TCP_NODELAY on every accepted connection, or
            // Nagle and delayed ACKs hold small replies ~40 ms. (The builder's `tcp_nodelay`
            // is ignored for a listener passed in, so it is set here.)
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            let serve = router.serve_with_incoming_shutdown(incoming, drain);
            tokio::select! { served = serve => served, _ = stop_anyway => Ok(()) }
        }
        Listener::Unix { listener, path } => {
            let serve = router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), drain);
            let served = tokio::select! { served = serve => served, _ = stop_anyway => Ok(()) };
            let _ = std::fs::remove_file(&path);
            served
        }
    };
    Ok(served?)
}

/// The durable service's health: SERVING while its store is usable and the server not draining.
async fn set_durable_health(health: &tonic_health::server::HealthReporter, serving: bool) {
    if serving {
        health.set_serving::<DurableActionServiceServer<DurableService>>().await;
    } else {
        health.set_not_serving::<DurableActionServiceServer<DurableService>>().await;
    }
}
