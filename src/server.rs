//! Assembles the gRPC server: the action service (behind the optional bearer token), grpc.health.v1
//! and server reflection (v1 and v1alpha, so grpcurl works with no proto file), on a TCP or Unix
//! socket listener, optionally with TLS or mutual TLS.
use crate::{
    api::{auth::BearerAuth, HttpActionService},
    durable::{service::DurableService, Durable},
    exec::Executor,
    pb::{
        self, durable_action_service_server::DurableActionServiceServer,
        http_action_service_server::HttpActionServiceServer,
    },
};
use std::{
    future::Future,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{server::TcpIncoming, Certificate, Identity, ServerTlsConfig};

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
    /// After the shutdown signal, how long in-flight actions may finish. Default 25 s.
    pub drain_timeout: Duration,
    /// Durable actions (DurableActionService) served beside the action service. Default none.
    pub durable: Option<Durable>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self { auth_token: None, tls: None, drain_timeout: Duration::from_secs(25), durable: None }
    }
}

/// After a drain, how long the server waits for connections to close before it stops anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

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
/// `drain_timeout` passes.
pub async fn serve_with(
    listener: Listener,
    executor: Executor,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<HttpActionServiceServer<HttpActionService>>().await;
    // Health is described too, so grpcurl can call it with no proto file.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let auth = BearerAuth::new(options.auth_token.as_deref());
    let draining = Arc::new(AtomicBool::new(false));
    let service = HttpActionService::new(executor.clone(), draining.clone());
    let actions = HttpActionServiceServer::with_interceptor(service, auth.clone());
    let durable = options.durable.clone();
    if let Some(durable) = &durable {
        set_durable_health(&health, durable.is_available()).await;
    }
    let durable_actions = durable
        .clone()
        .map(|d| DurableActionServiceServer::with_interceptor(DurableService::new(d), auth.clone()));
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let drain_timeout = options.drain_timeout;
    let drain = async move {
        shutdown.await;
        draining.store(true, Ordering::SeqCst);
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
        while executor.limits().admitted() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match executor.limits().admitted() {
            0 => tracing::info!("drained: every action finished"),
            left => {
                tracing::warn!(cut_off = left, "drain timeout passed; stopping with actions still running")
            }
        }
        let _ = drained_tx.send(());
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
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(actions)
        .add_optional_service(durable_actions);
    // Connections left open after the drain (a stream cut off, a client that keeps its
    // connection) get a short grace, then the server stops regardless.
    let stop_anyway = async move {
        let _ = drained_rx.await;
        tokio::time::sleep(CLOSE_GRACE).await;
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
