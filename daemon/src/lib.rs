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
    /// Connections open at once from one address (IPv6: one /64): past it a new connection
    /// from there is closed at once, so one client cannot take every place.
    pub max_per_address: usize,
    /// How long a client may take to send a request's headers, from the moment the
    /// connection waits for them (a new connection, or an idle kept-alive one): a connection
    /// that sends nothing is closed then. Responses (streams included) are not bounded.
    pub header_timeout: std::time::Duration,
    /// Request body bytes (larger bodies get 413).
    pub max_body: usize,
}

impl Default for HttpLimits {
    /// 1,024 connections, 256 from one address, 10 s for headers, 1 MiB bodies (a 4,096-token
    /// prompt is well under 100 KiB). Headers are bounded by hyper: 100 of them, about
    /// 400 KiB in all (431 beyond).
    fn default() -> HttpLimits {
        HttpLimits {
            max_connections: 1024,
            max_per_address: 256,
            header_timeout: std::time::Duration::from_secs(10),
            max_body: 1 << 20,
        }
    }
}

/// Serve `app` on `listener` (with each request's peer address available to handlers), over
/// TLS when `tls` is given, until `stop` is cancelled, then finish the requests under way: the
/// HTTP side of every service.
///
/// Our own accept loop over hyper rather than `axum::serve`, which gives no way to set a
/// header-read timeout: without one, idle connections could hold every place for ever.
pub fn serve_http(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    stop: tokio_util::sync::CancellationToken,
    limits: HttpLimits,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
) -> Result<tokio::task::JoinHandle<()>, IoError> {
    use axum::serve::Listener as _;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let mut listener = http::Capped::new(listener, &limits, tls)
        .map_err(|e| IoError::new("the listening address", e))?;
    let app = app.layer(axum::extract::DefaultBodyLimit::max(limits.max_body));
    // HTTP/1.1 only (our TLS offers no other by ALPN): sniffing for an HTTP/2 preface would
    // wait on a silent client before the header timeout starts.
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    Ok(tokio::spawn(async move {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        loop {
            let (io, addr) = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.cancelled() => break,
            };
            // Handlers read the peer address as axum's `ConnectInfo`.
            let service = tower::ServiceExt::map_request(
                app.clone(),
                move |mut request: axum::http::Request<hyper::body::Incoming>| {
                    request
                        .extensions_mut()
                        .insert(axum::extract::ConnectInfo(addr));
                    request
                },
            );
            let service = hyper_util::service::TowerToHyperService::new(service);
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .into_owned();
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::trace!("HTTP connection from {addr}: {e}");
                }
            });
        }
        graceful.shutdown().await;
    }))
}

/// What counts as one client of a service, for its per-client limits: an IPv4 address, or an
/// IPv6 /64 (one host is commonly given a whole /64, so per address it could take millions).
pub fn client_of(ip: std::net::IpAddr) -> std::net::IpAddr {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
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
pub use http::{AddressPlace, PerAddress};
pub mod metrics;
pub mod secret;
pub mod tls;

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn an_ipv6_client_is_its_slash_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_of(a), client_of(b));
        assert_ne!(client_of(a), client_of(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(client_of(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
        let v4: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(client_of(v4), v4);
    }
}
