//! The process edges the seeder, coordinator and node share, so all three log and stop alike.

/// Log to stderr (stdout carries the `[READY]`-style lines scripts read), without module
/// targets, filtered by `RUST_LOG` or else by `default_filter`.
pub fn init_logging(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
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
