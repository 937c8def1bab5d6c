//! Logging setup shared by `rhizosd` and `rhizos`: `RUST_LOG` filters (default `info`), and
//! `--log-json` switches to one JSON object per line for log shippers.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; logs go to stderr so stdout stays clean for `--json` output.
pub fn init(default_level: &str, json: bool) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.compact().try_init()
    };
}

/// Ctrl-C and SIGTERM, listened for from the moment [`Shutdown::listen`] is called: a signal
/// that arrives while a daemon is still starting (connecting, loading plugins, opening its
/// ledger) is not lost — the daemon stops cleanly once it can, instead of missing it (a
/// listener made later never hears it) and running on until killed.
#[derive(Clone)]
pub struct Shutdown(tokio::sync::watch::Receiver<bool>);

impl Shutdown {
    /// Starts listening (inside a Tokio runtime).
    pub fn listen() -> std::io::Result<Self> {
        let (signalled, receiver) = tokio::sync::watch::channel(false);
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut interrupt = signal(SignalKind::interrupt())?;
            let mut terminate = signal(SignalKind::terminate())?;
            tokio::spawn(async move {
                tokio::select! {
                    _ = interrupt.recv() => {},
                    _ = terminate.recv() => {},
                }
                tracing::info!("shutting down");
                let _ = signalled.send(true);
            });
        }
        #[cfg(not(unix))]
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
            let _ = signalled.send(true);
        });
        Ok(Self(receiver))
    }

    /// Resolves once a signal came (at once if one already did).
    pub async fn signalled(&self) {
        let mut receiver = self.0.clone();
        let _ = receiver.wait_for(|signalled| *signalled).await;
    }
}

/// Resolves when the process gets Ctrl-C or SIGTERM (listening from the first poll: a daemon
/// listens from its start with [`Shutdown`]).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}
