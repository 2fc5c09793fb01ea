//! Assembles the gRPC server: the action service (behind the optional bearer token), grpc.health.v1
//! and server reflection (v1 and v1alpha, so grpcurl works with no proto file), on a TCP or Unix
//! socket listener, optionally with TLS or mutual TLS.
use crate::{
    api::{auth::BearerAuth, HttpActionService},
    exec::Executor,
    pb::{self, http_action_service_server::HttpActionServiceServer},
};
use std::{future::Future, path::PathBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

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

/// How the listener is protected. Default: no token, no TLS.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Bearer token required on action calls (health and reflection stay open).
    pub auth_token: Option<String>,
    pub tls: Option<ServerTls>,
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

/// Serves on `listener` with `options` until `shutdown` resolves.
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
    let actions = HttpActionServiceServer::with_interceptor(HttpActionService::new(executor), auth);

    let mut server = tonic::transport::Server::builder()
        // Many small calls from one engine: keep latency low.
        .tcp_nodelay(true);
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
        .add_service(actions);
    match listener {
        Listener::Tcp(listener) => {
            router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown).await?;
        }
        Listener::Unix { listener, path } => {
            let served =
                router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown).await;
            let _ = std::fs::remove_file(&path);
            served?;
        }
    }
    Ok(())
}
