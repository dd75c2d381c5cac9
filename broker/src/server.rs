//! Accept loops, spawning and shutdown: `run(config, shutdown)`.
//!
//! In: a [`Config`] and a future that resolves when the broker should stop. Out: listeners
//! on the configured addresses, a task per connection, and a return once every connection
//! has closed or the grace period has passed.

use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::serve::ListenerExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::connection;
use crate::http::{AppState, routes};
use crate::state::Broker;
use crate::transport::tcp::TcpTransport;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The configured directory.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The addresses actually bound (port 0 resolved).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// HTTP and WebSocket.
    pub http: SocketAddr,
    /// STOMP over TCP.
    pub stomp: SocketAddr,
}

/// Runs the broker until `shutdown` resolves, then closes every connection gracefully.
/// Prints `listening http=ADDR stomp=ADDR` on stdout once both listeners are bound.
///
/// # Errors
/// A listener or the data directory could not be set up.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let http = bind(config.http_listen, config.listen_backlog)?;
    let stomp = bind(config.stomp_listen, config.listen_backlog)?;
    let bound = Bound {
        http: http.local_addr().map_err(|source| ServerError::Bind {
            addr: config.http_listen,
            source,
        })?,
        stomp: stomp.local_addr().map_err(|source| ServerError::Bind {
            addr: config.stomp_listen,
            source,
        })?,
    };
    let grace = config.shutdown_grace();
    let broker = Arc::new(Broker::open(config)?);
    let (stop_tx, stop_rx) = watch::channel(false);
    let tracker = TaskTracker::new();

    let app = routes(AppState {
        broker: broker.clone(),
        shutdown: stop_rx.clone(),
        tracker: tracker.clone(),
    });
    let mut http_stop = stop_rx.clone();
    let http_task = tokio::spawn(async move {
        let service = app.into_make_service_with_connect_info::<SocketAddr>();
        // Frames are written whole and in batches: Nagle's delay (with the peer's delayed
        // ACK, tens of milliseconds) would only add latency.
        let http = http.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let serve = axum::serve(http, service).with_graceful_shutdown(async move {
            let _ = http_stop.changed().await;
        });
        if let Err(e) = serve.await {
            warn!("http server stopped: {e}");
        }
    });
    let pace_broker = broker.clone();
    let pace_stop = stop_rx.clone();
    tokio::spawn(async move {
        let max = pace_broker.config.write_coalesce_max();
        pace_broker.pace.probe(max, pace_stop).await;
    });
    let tcp_task = tokio::spawn(accept_tcp(
        stomp,
        broker.clone(),
        stop_rx.clone(),
        tracker.clone(),
    ));

    println!("listening http={} stomp={}", bound.http, bound.stomp);
    let _ = std::io::stdout().flush();
    info!(http = %bound.http, stomp = %bound.stomp, "listening");

    shutdown.await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = tcp_task.await;
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!("shutdown grace period passed with connections still open");
    }
    // Upgraded WebSockets are done: the HTTP server has only idle keep-alives left.
    let _ = tokio::time::timeout(grace, http_task).await;
    let store_broker = broker.clone();
    let _ = tokio::task::spawn_blocking(move || store_broker.router.flush_store()).await;
    Ok(())
}

fn bind(addr: SocketAddr, backlog: u32) -> Result<TcpListener, ServerError> {
    let bound = || {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        // As std's listeners do: a restarted broker may bind while old sockets linger.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(backlog)
    };
    bound().map_err(|source| ServerError::Bind { addr, source })
}

async fn accept_tcp(
    listener: TcpListener,
    broker: Arc<Broker>,
    mut stop: watch::Receiver<bool>,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => spawn_tcp(stream, peer, &broker, &stop, &tracker),
            // Out of file descriptors and the like: keep serving the connections we have.
            Err(e) => {
                debug!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

fn spawn_tcp(
    stream: TcpStream,
    peer: SocketAddr,
    broker: &Arc<Broker>,
    stop: &watch::Receiver<bool>,
    tracker: &TaskTracker,
) {
    let transport = TcpTransport::new(stream, broker.config.read_buffer_bytes);
    tracker.spawn(connection::serve(
        transport,
        broker.clone(),
        stop.clone(),
        peer.to_string(),
        "tcp",
    ));
}
