//! Accept loops, spawning and shutdown: `run(config, shutdown)`.
//!
//! In: a [`Config`] and a future that resolves when the broker should stop. Out: listeners
//! on the configured addresses, a task per connection, and a return once every connection
//! has closed or the grace period has passed.

use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::connect_info::IntoMakeServiceWithConnectInfo;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tower_service::Service as _;
use tracing::{debug, info, warn};

use crate::admin::Dashboard;
use crate::admission::{Busy, Ticket};
use crate::cluster::queues::QueueBus;
use crate::cluster::rooms::{RoomBus, RoomLimits};
use crate::cluster::users::UserBus;
use crate::cluster::{Cluster, Handlers};
use crate::config::Config;
use crate::connection::Transport;
use crate::connection::{self, Arrival};
use crate::error::SessionError;
use crate::http::{AppState, routes};
use crate::outbox::End;
use crate::sockjs::{self, Endpoint};
use crate::transport::sockjs::StompService;

use crate::state::Broker;
use crate::tls::Tls;
use crate::transport::tcp::{StreamTransport, TcpTransport};

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
    /// The stores or authentication could not be set up.
    #[error("{0}")]
    Open(#[from] crate::state::OpenError),
    /// Redis could not be reached (`--cluster`).
    #[error("{0}")]
    Cluster(#[from] crate::cluster::ClusterError),
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
    let cluster = config.cluster_settings();
    let mut broker = Broker::open(config)?;
    if let Some(settings) = cluster {
        broker = broker.with_cluster(Arc::new(Cluster::join(settings, 0).await?));
    }
    let broker = Arc::new(broker);
    let (stop_tx, stop_rx) = watch::channel(false);
    // The cluster's writes and heartbeat stop last: after the connections closed, so that
    // their leave notices are posted before the node leaves the list.
    let (last_tx, last_rx) = watch::channel(false);
    let mut cluster_tasks = Vec::new();
    if let Some(cluster) = broker.cluster.clone() {
        cluster_tasks = join_cluster(&broker, &cluster, &stop_rx, &last_rx).await;
    }
    let tracker = TaskTracker::new();

    let sockjs = Endpoint::new(
        sockjs_settings(&broker),
        Arc::new(StompService {
            broker: broker.clone(),
            shutdown: stop_rx.clone(),
            tracker: tracker.clone(),
        }),
    );
    let dashboard = Arc::new(Dashboard::default());
    tokio::spawn(dashboard.clone().run(broker.clone(), stop_rx.clone()));
    let app = routes(AppState {
        broker: broker.clone(),
        shutdown: stop_rx.clone(),
        tracker: tracker.clone(),
        sockjs,
        dashboard,
    });
    let http_task = tokio::spawn(serve_http(
        http,
        app,
        stop_rx.clone(),
        broker.shared.config.connect_timeout(),
        broker.tls.clone(),
    ));
    tokio::spawn(broker.auth.clone().watch_accounts(stop_rx.clone()));
    // Listening for SIGHUP from here on, before the `listening` line: a signal sent right
    // after it must not be lost (or, were SIGHUP's default action in force, end the broker).
    #[cfg(unix)]
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    #[cfg(unix)]
    match hangup {
        Ok(hangup) => {
            tokio::spawn(reload_on_hangup(broker.clone(), hangup, stop_rx.clone()));
        }
        Err(e) => warn!("cannot listen for SIGHUP: nothing will be reloaded: {e}"),
    }
    let pace_broker = broker.clone();
    let pace_stop = stop_rx.clone();
    tokio::spawn(async move {
        let max = pace_broker.shared.config.write_coalesce_max();
        pace_broker.pace.probe(max, pace_stop).await;
    });
    let tcp_task = tokio::spawn(accept_tcp(
        stomp,
        broker.clone(),
        stop_rx.clone(),
        tracker.clone(),
    ));

    match &broker.cluster {
        Some(cluster) => println!(
            "listening http={} stomp={} node={}",
            bound.http,
            bound.stomp,
            cluster.node()
        ),
        None => println!("listening http={} stomp={}", bound.http, bound.stomp),
    }
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
    // Leave notices posted, then out of the cluster's list at once, not when the heartbeat
    // expires.
    let _ = last_tx.send(true);
    for task in cluster_tasks {
        let _ = task.await;
    }
    // Upgraded WebSockets are done: the HTTP server has only idle keep-alives left.
    let _ = tokio::time::timeout(grace, http_task).await;
    let store_broker = broker.clone();
    let _ = tokio::task::spawn_blocking(move || store_broker.shared.router.flush_store()).await;
    Ok(())
}

/// Starts this node's part in the cluster: topics, rooms and user queues shared, this
/// node's previous life cleaned up after, dead nodes cleaned up after, the heartbeat.
/// Returns the tasks that must finish before the process exits (room and direct-message
/// writes, then leaving the list), which end once `last` changes. Called by [`run`], and by
/// tests that run several brokers in one process.
pub async fn join_cluster(
    broker: &Arc<Broker>,
    cluster: &Arc<Cluster>,
    stop: &watch::Receiver<bool>,
    last: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let router = &broker.shared.router;
    let config = &broker.shared.config;
    router.ids.join_cluster(cluster.incarnation());
    let topics = router.topics.clone();
    topics.attach(cluster.clone());
    let rooms = router.rooms.clone();
    let bus = Arc::new(RoomBus::new(
        cluster.clone(),
        RoomLimits {
            messages: config.room_history,
            bytes: config.room_history_bytes,
        },
    ));
    rooms.attach(bus.clone());
    let writes = tokio::spawn(bus.run(last.clone()));
    let user_bus = Arc::new(UserBus::new(
        cluster.clone(),
        (config.user_queue_limit, config.user_queue_bytes),
    ));
    router.users.attach(user_bus.clone());
    let sends = tokio::spawn(user_bus.run(last.clone()));
    let queue_bus = Arc::new(QueueBus::new(
        cluster.clone(),
        (config.queue_max_messages, config.queue_max_bytes),
    ));
    router.queues.attach(queue_bus.clone());
    let queue_writes = tokio::spawn(queue_bus.run(last.clone()));
    match router.queues.reap(cluster.node(), true).await {
        Ok(0) => {}
        Ok(n) => info!(
            messages = n,
            "handed back the queue messages this node's previous run held"
        ),
        Err(e) => warn!("could not hand back this node's previous run's queue messages: {e}"),
    }
    if let Err(e) = router.users.reap(cluster.node(), true).await {
        warn!("could not take this node's previous run's direct-message subscriptions out: {e}");
    }
    // Sessions this node had before it restarted under the same name are gone.
    match rooms.reap(cluster.node(), true).await {
        Ok(0) => {}
        Ok(n) => info!(
            leaves = n,
            "posted the leave notices of this node's previous run"
        ),
        Err(e) => warn!("could not clean up after this node's previous run: {e}"),
    }
    let (room_rooms, caught_up) = (rooms.clone(), rooms.clone());
    let users_broker = broker.clone();
    let (queues_broker, woken) = (broker.clone(), broker.clone());
    let handlers = Handlers {
        // What other nodes publish goes to this node's subscribers only.
        topic: Arc::new(move |key, glob, publish| topics.fan_out_from_cluster(key, glob, publish)),
        room: Arc::new(move |room, publish| room_rooms.from_cluster(room, publish)),
        user: Arc::new(move |queue, publish| {
            users_broker
                .shared
                .router
                .users
                .from_cluster(queue, publish)
        }),
        queue: Arc::new(move |queue| queues_broker.shared.router.queues.wake(queue)),
        relistened: Arc::new(move || {
            caught_up.catch_up();
            woken.shared.router.queues.wake_all();
        }),
    };
    tokio::spawn(cluster.clone().run_bus(handlers, stop.clone()));
    tokio::spawn(clean_up_after_dead_nodes(
        cluster.clone(),
        broker.clone(),
        stop.clone(),
    ));
    let mut fenced = cluster.fenced();
    let fencing = broker.clone();
    let mut fence_stop = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = fenced.changed() => if changed.is_err() { return },
                _ = fence_stop.changed() => return,
            }
            // Declared dead while frozen: what this node holds is stale.
            fencing.end_sessions(End::MembershipLost);
            fencing.shared.router.rooms.drop_copies();
        }
    });
    let counting = broker.clone();
    let connections = move || counting.shared.metrics.connections_open();
    let heartbeat = tokio::spawn(cluster.clone().run(connections, last.clone()));
    vec![writes, sends, queue_writes, heartbeat]
}

/// Every third of the node time-out: nodes whose heartbeat expired are declared dead
/// (so that they fence themselves if they come back) and their sessions' leave notices
/// posted, once each, whichever node gets there first.
async fn clean_up_after_dead_nodes(
    cluster: Arc<Cluster>,
    broker: Arc<Broker>,
    mut stop: watch::Receiver<bool>,
) {
    let router = &broker.shared.router;
    let every = (cluster.node_timeout() / 3).max(Duration::from_millis(100));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        let Ok(dead) = cluster.dead_nodes().await else {
            continue;
        };
        for node in dead {
            match cluster.declare_dead(&node).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    debug!("declaring {node} dead: {e}");
                    continue;
                }
            }
            match router.queues.reap(&node, false).await {
                Ok(0) => {}
                Ok(n) => {
                    info!(%node, messages = n, "a node stopped answering: its consumers' unacknowledged messages go back to their queues")
                }
                Err(e) => {
                    debug!("cleaning up after {node}: {e}");
                    continue;
                }
            }
            if let Err(e) = router.users.reap(&node, false).await {
                debug!("cleaning up after {node}: {e}");
                continue;
            }
            match router.rooms.reap(&node, false).await {
                Ok(n) => {
                    info!(%node, leaves = n, "a node stopped answering: its sessions left their rooms");
                    let _ = cluster.forget_node(&node).await;
                }
                Err(e) => debug!("cleaning up after {node}: {e}"),
            }
        }
    }
}

/// SockJS under `/ws` as the flags set it: messages up to a frame (JSON-escaped, a frame may
/// take up to six times its bytes), framed by the broker's own pages and the allowed
/// origins'.
fn sockjs_settings(broker: &Broker) -> sockjs::Settings {
    let config = &broker.shared.config;
    let frame = config.max_frame_bytes.saturating_add(64 * 1024);
    sockjs::Settings {
        heart_beat: Duration::from_millis(config.sockjs_heartbeat_ms),
        disconnect_delay: Duration::from_millis(config.sockjs_disconnect_delay_ms),
        stream_bytes: config.sockjs_stream_bytes,
        queue_bytes: config.outbox_bytes,
        max_request_bytes: frame.saturating_mul(6),
        frame_ancestors: broker.origins.frame_ancestors(),
        ..sockjs::Settings::default()
    }
}

/// Serves HTTP/1.1 (the page, the API and WebSocket upgrades) until `stop` changes; then
/// each connection finishes the request in hand and closes. A connection has `head_timeout`
/// to send each request's head, its first included: a silent socket, a request that never
/// ends or an idle keep-alive does not hold a file descriptor for ever.
async fn serve_http(
    listener: TcpListener,
    app: Router,
    mut stop: watch::Receiver<bool>,
    head_timeout: std::time::Duration,
    tls: Option<Arc<Tls>>,
) {
    let mut make_service: IntoMakeServiceWithConnectInfo<Router, SocketAddr> =
        app.into_make_service_with_connect_info();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout);
    let connections = TaskTracker::new();
    while let Some((stream, peer)) = next_accepted(&listener, &mut stop).await {
        // Frames are written whole and in batches: Nagle's delay (with the peer's delayed
        // ACK, tens of milliseconds) would only add latency.
        let _ = stream.set_nodelay(true);
        // Infallible: the router with the peer's address for `ConnectInfo`.
        let Ok(service) = make_service.call(peer).await;
        let stop = stop.clone();
        let builder = builder.clone();
        let service = TowerToHyperService::new(service);
        match &tls {
            None => connections.spawn(serve_http_connection(builder, stream, service, stop, peer)),
            Some(tls) => {
                let acceptor = tls.acceptor().clone();
                connections.spawn(async move {
                    // The handshake in the connection's task, bounded like a request head.
                    match tokio::time::timeout(head_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            serve_http_connection(builder, stream, service, stop, peer).await;
                        }
                        Ok(Err(e)) => debug!(%peer, "tls handshake failed: {e}"),
                        Err(_) => debug!(%peer, "tls handshake timed out"),
                    }
                })
            }
        };
    }
    connections.close();
    connections.wait().await;
}

/// Serves one HTTP/1.1 connection (plain or TLS) until it ends, or until `stop` changes
/// and the request in hand is answered.
async fn serve_http_connection<S, V>(
    builder: http1::Builder,
    stream: S,
    service: V,
    mut stop: watch::Receiver<bool>,
    peer: SocketAddr,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    V: hyper::service::HttpService<hyper::body::Incoming> + Send,
    V::Future: Send + 'static,
    V::ResBody: Send + 'static,
    <V::ResBody as hyper::body::Body>::Data: Send,
    <V::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    V::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        _ = stop.changed() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = served {
        debug!(%peer, "http connection ended: {e}");
    }
}

/// On every SIGHUP until `stop`, reads the ACL file and the TLS pair again (a bad file
/// keeps what is in force, and says why in the log).
#[cfg(unix)]
async fn reload_on_hangup(
    broker: Arc<Broker>,
    mut hangup: tokio::signal::unix::Signal,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            received = hangup.recv() => if received.is_none() { return },
        }
        if let Some(acl) = &broker.shared.acl {
            match acl.reload() {
                Ok(()) => info!("ACL reloaded"),
                Err(e) => warn!("ACL not reloaded, the rules in force stay: {e}"),
            }
        }
        if let Some(tls) = &broker.tls {
            match tls.reload() {
                Ok(()) => info!("TLS certificate reloaded"),
                Err(e) => warn!("TLS certificate not reloaded, the one in force stays: {e}"),
            }
        }
    }
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
    while let Some((stream, peer)) = next_accepted(&listener, &mut stop).await {
        spawn_tcp(stream, peer, &broker, &stop, &tracker);
    }
}

/// The next accepted connection, or `None` once `stop` changes. A failed accept (out of
/// file descriptors and the like) is retried after 10 ms: the connections we have are
/// still served meanwhile.
async fn next_accepted(
    listener: &TcpListener,
    stop: &mut watch::Receiver<bool>,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = stop.changed() => return None,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => return Some(accepted),
                Err(e) => {
                    debug!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
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
    let admitted = broker.admission.admit(peer.ip());
    if admitted.is_err() {
        debug!(%peer, "connection refused: server busy");
    }
    let Some(tls) = &broker.tls else {
        let transport = TcpTransport::new(stream, broker.shared.config.read_buffer_bytes);
        tracker.spawn(serve_stomp(
            transport,
            admitted,
            broker.clone(),
            stop.clone(),
            peer,
            "tcp",
        ));
        return;
    };
    let _ = stream.set_nodelay(true);
    let acceptor = tls.acceptor().clone();
    let (broker, stop) = (broker.clone(), stop.clone());
    tracker.spawn(async move {
        // The handshake in the connection's task, bounded like the wait for CONNECT.
        let timeout = broker.shared.config.connect_timeout();
        match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => {
                let transport =
                    StreamTransport::over(stream, broker.shared.config.read_buffer_bytes);
                serve_stomp(transport, admitted, broker, stop, peer, "tcp+tls").await;
            }
            Ok(Err(e)) => debug!(%peer, "tls handshake failed: {e}"),
            Err(_) => debug!(%peer, "tls handshake timed out"),
        }
    });
}

/// Serves a STOMP connection over a byte stream, or refuses it with ERROR "server busy"
/// when it was not admitted.
async fn serve_stomp<T: Transport>(
    transport: T,
    admitted: Result<Option<Box<Ticket>>, Busy>,
    broker: Arc<Broker>,
    stop: watch::Receiver<bool>,
    peer: SocketAddr,
    kind: &'static str,
) {
    match admitted {
        Ok(ticket) => {
            let arrival = Arrival {
                ticket,
                ..Arrival::new(peer, kind)
            };
            connection::serve(transport, broker, stop, arrival).await;
        }
        Err(Busy) => {
            let timeout = broker.shared.config.write_timeout();
            connection::refuse(transport, SessionError::ServerBusy, timeout).await;
        }
    }
}
