//! The process edges the seeder, coordinator and node share, so all three log, stop, serve
//! HTTP and report IO errors alike.

pub mod config;

/// Log to stderr (stdout carries the `[READY]`-style lines scripts read), without module
/// targets, filtered by `RUST_LOG` or else by `default_filter`, each line timed.
pub fn init_logging(default_filter: &str) {
    init_logging_with(default_filter, LogTime::Shown);
}

/// Whether log lines carry their time: a service's do (its log is read later), a one-shot
/// command's need not (a person reads them as they come).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTime {
    Shown,
    Hidden,
}

/// [`init_logging`], choosing whether lines carry their time.
pub fn init_logging_with(default_filter: &str, time: LogTime) {
    let log = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false);
    match time {
        LogTime::Shown => log.init(),
        LogTime::Hidden => log.without_time().init(),
    }
}

/// Resolves on SIGINT or SIGTERM: the signals a terminal, systemd or a test harness stops us
/// with, and after which we shut down gracefully.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Bounds on what HTTP clients may take of a service: every service on an open network needs
/// them, so [`serve_http`] applies them to every route.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections open at once; further ones wait in the kernel's backlog until one closes.
    pub max_connections: usize,
    /// Request body bytes (larger bodies get 413).
    pub max_body: usize,
}

impl Default for HttpLimits {
    /// 1,024 connections, 1 MiB bodies (a 4,096-token prompt is well under 100 KiB).
    /// Headers are bounded by hyper: 100 of them, about 400 KiB in all (431 beyond).
    fn default() -> HttpLimits {
        HttpLimits {
            max_connections: 1024,
            max_body: 1 << 20,
        }
    }
}

/// Serve `app` on `listener` (with each request's peer address available to handlers), over
/// TLS when `tls` is given, until `stop` is cancelled, then finish the requests under way: the
/// HTTP side of every service.
pub fn serve_http(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    stop: tokio_util::sync::CancellationToken,
    limits: HttpLimits,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
) -> Result<tokio::task::JoinHandle<()>, IoError> {
    use axum::serve::ListenerExt;
    let listener = http::Capped::new(listener, limits.max_connections, tls)
        .map_err(|e| IoError::new("the listening address", e))?
        // tap_io gives handlers the peer address (ConnectInfo) for any listener.
        .tap_io(|_| {});
    let app = app.layer(axum::extract::DefaultBodyLimit::max(limits.max_body));
    Ok(tokio::spawn(async move {
        let serve = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(async move { stop.cancelled().await });
        if let Err(e) = serve.await {
            tracing::error!("HTTP server: {e}");
        }
    }))
}

/// An IO error with what was being done: every library's errors carry one, so a message
/// names the file, directory or address at fault.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct IoError {
    pub what: String,
    pub source: std::io::Error,
}

impl IoError {
    /// `source` happened while doing `what`.
    pub fn new(what: impl Into<String>, source: std::io::Error) -> IoError {
        IoError {
            what: what.into(),
            source,
        }
    }
}

mod http;
pub mod metrics;
pub mod secret;
pub mod tls;
