//! `/admin`: the operator's dashboard. The page (charts of the last minutes, tables of rooms,
//! queues, sessions and nodes) and the JSON it reads; closing a session, purging a queue and
//! clearing a room's history, each written to the log (target `audit`).
//!
//! In: the broker's counters, read once a second into [`Dashboard`]; requests that passed
//! [`crate::http`]'s authentication. Out: the page, `GET /admin/api/overview`, and the
//! actions under `POST /admin/api/`. Open in `--auth none` only to loopback clients;
//! otherwise only to users of group `admin`. Actions come from this origin only.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{ConnectInfo, Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::auth::{Identity, Mode};
use crate::http::{AppState, Caller, node_list};
use crate::message::{SessionId, now_millis};
use crate::metrics::Reading;
use crate::outbox::End;
use crate::services::check_room_name;
use crate::state::Broker;

/// The dashboard page, embedded like the chat page.
pub const ADMIN_HTML: &str = include_str!("../../web/admin.html");
/// Its script.
pub const ADMIN_JS: &str = include_str!("../../web/admin.js");
/// Its styles.
pub const ADMIN_CSS: &str = include_str!("../../web/admin.css");
/// uPlot, the chart library (MIT), vendored.
pub const UPLOT_JS: &str = include_str!("../../web/vendor/uPlot.iife.min.js");
/// uPlot's styles.
pub const UPLOT_CSS: &str = include_str!("../../web/vendor/uPlot.min.css");
/// uPlot's licence.
pub const UPLOT_LICENSE: &str = include_str!("../../web/vendor/uplot-LICENSE");

/// Seconds of history the charts keep.
const KEEP_SAMPLES: usize = 300;
/// Sessions listed when the request does not say.
const DEFAULT_SESSIONS: usize = 200;
/// Most sessions one answer lists.
const MAX_SESSIONS: usize = 10_000;
/// Most rooms one answer lists (those with the most members first).
const MAX_ROOMS: usize = 500;

/// One second of the charts.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Sample {
    /// When, in ms since the epoch.
    pub t: u64,
    /// Connections open.
    pub connections: u64,
    /// Messages published per second.
    pub messages_in: f64,
    /// MESSAGE frames written per second.
    pub messages_out: f64,
    /// Delivery latency of the second's writes, median and 99th percentile, in ms.
    pub p50_ms: Option<f64>,
    /// See `p50_ms`.
    pub p99_ms: Option<f64>,
    /// Connections closed as slow consumers in the second.
    pub slow_consumers: u64,
    /// ERROR frames sent in the second.
    pub errors: u64,
}

/// The last minutes of readings, one a second.
#[derive(Debug, Default)]
pub struct Dashboard {
    samples: Mutex<VecDeque<Sample>>,
}

impl Dashboard {
    fn samples(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        // Each change is one push and pop: a poisoned deque is still whole.
        self.samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes what changed between two readings `elapsed` apart.
    fn record(&self, before: &Reading, now: &Reading, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64().max(1e-3);
        let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / seconds;
        let latency = now.latency.since(&before.latency);
        let ms = |q: f64| latency.quantile(q).map(|s| s * 1e3);
        let sample = Sample {
            t: now_millis(),
            connections: now.connections,
            messages_in: rate(before.published, now.published),
            messages_out: rate(before.written, now.written),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            slow_consumers: now.slow_consumers.saturating_sub(before.slow_consumers),
            errors: now.errors.saturating_sub(before.errors),
        };
        let mut samples = self.samples();
        if samples.len() == KEEP_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// Reads the broker's counters once a second until `stop` changes.
    pub async fn run(self: Arc<Self>, broker: Arc<Broker>, mut stop: watch::Receiver<bool>) {
        // The first tick a second from now (an interval's first is at once: a sample over
        // no time at all).
        let every = Duration::from_secs(1);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut before = broker.shared.metrics.reading();
        let mut at = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tick.tick() => {}
            }
            let now = broker.shared.metrics.reading();
            let now_at = tokio::time::Instant::now();
            self.record(&before, &now, now_at.duration_since(at));
            (before, at) = (now, now_at);
        }
    }
}

/// Headers a reverse proxy adds: a request that has one came from somewhere else, whatever
/// its loopback address says.
const PROXY_HEADERS: [&str; 3] = ["forwarded", "x-forwarded-for", "x-real-ip"];

/// Why `/admin` is refused to a caller.
fn refusal(
    mode: Mode,
    peer: SocketAddr,
    headers: &HeaderMap,
    caller: &Caller,
) -> Option<&'static str> {
    match (mode, &caller.0) {
        (Mode::None, _) if !peer.ip().to_canonical().is_loopback() => {
            Some("with --auth none the admin page is open to loopback clients only")
        }
        // A proxy on this machine would make every visitor a loopback client.
        (Mode::None, _) if PROXY_HEADERS.iter().any(|h| headers.contains_key(*h)) => {
            Some("with --auth none the admin page is not served through a proxy")
        }
        (Mode::None, _) => None,
        (_, Some(identity)) if is_operator(identity) => None,
        _ => Some("the admin page is open to group admin only"),
    }
}

/// Whether `identity` is in group `admin`, which may use the operations endpoints.
fn is_operator(identity: &Identity) -> bool {
    identity.groups.iter().any(|g| g == "admin")
}

/// `/metrics`: open in `--auth none` (where it always was, for Prometheus), otherwise to
/// group `admin` only, with the API's credentials (Prometheus's `basic_auth` or
/// `authorization`).
pub async fn metrics_gate(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    request: Request,
    next: Next,
) -> Response {
    match &caller.0 {
        Some(identity) if !is_operator(identity) => {
            warn!(target: "audit", %peer, user = %identity.name, path = "/metrics", "admin access refused");
            error(
                StatusCode::FORBIDDEN,
                "/metrics is open to group admin only",
            )
        }
        _ => next.run(request).await,
    }
}

/// Who did it, for the log.
fn operator(caller: &Caller) -> &str {
    caller
        .0
        .as_ref()
        .map_or("(loopback)", |identity| &identity.name)
}

/// Lets only operators through (after [`crate::http`]'s authentication); actions (any
/// method but GET) only from this origin, whatever `--allowed-origins` admits for chat.
pub async fn gate(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    request: Request,
    next: Next,
) -> Response {
    let broker = &state.broker;
    if let Some(reason) = refusal(broker.auth.mode(), peer, request.headers(), &caller) {
        warn!(target: "audit", %peer, user = operator(&caller), path = request.uri().path(), "admin access refused");
        return error(StatusCode::FORBIDDEN, reason);
    }
    if request.method() != axum::http::Method::GET && !same_origin(broker, request.headers()) {
        warn!(target: "audit", %peer, user = operator(&caller), "admin action from another origin refused");
        return error(
            StatusCode::FORBIDDEN,
            "admin actions come from this origin only",
        );
    }
    next.run(request).await
}

/// No `Origin`, or this server's own.
fn same_origin(broker: &Broker, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    match (origin.to_str(), host) {
        (Ok(origin), Some(host)) => {
            origin
                .strip_prefix(broker.http_scheme())
                .and_then(|rest| rest.strip_prefix("://"))
                == Some(host)
        }
        _ => false,
    }
}

/// 503 for an action Redis did not answer (`--cluster`).
fn cluster_unavailable(e: &redis::RedisError) -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("cluster unavailable: {e}"),
    )
}

fn error(status: StatusCode, reason: &str) -> Response {
    answer(status, &json!({ "error": reason }))
}

fn answer(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}

/// `GET /admin`.
pub async fn page() -> Response {
    ([(header::CACHE_CONTROL, "no-store")], Html(ADMIN_HTML)).into_response()
}

/// The query of `GET /admin/api/overview`.
#[derive(Debug, serde::Deserialize)]
pub struct OverviewQuery {
    /// Most sessions to list.
    sessions: Option<usize>,
}

/// `GET /admin/api/overview`: the charts' samples and the four tables.
pub async fn overview(
    State(state): State<AppState>,
    Query(query): Query<OverviewQuery>,
) -> Response {
    let broker = &state.broker;
    let router = &broker.shared.router;
    let series: Vec<Sample> = state.dashboard.samples().iter().cloned().collect();
    let limit = query.sessions.unwrap_or(DEFAULT_SESSIONS).min(MAX_SESSIONS);
    let (sessions, sessions_total) = broker.sessions.rows(limit);
    // With `--cluster` these come from Redis: while it does not answer, the tables are
    // empty and the answer says why, and this node's own figures still come.
    let rooms = router.app.room_list().await;
    let queues = router.queues.stats_answer().await;
    let nodes = node_list(broker).await;
    let unreachable = rooms.is_err() || queues.is_err() || nodes.is_err();
    let mut rooms = rooms.unwrap_or_default();
    let rooms_total = rooms.len();
    rooms.sort_by_key(|r| std::cmp::Reverse(r.members));
    rooms.truncate(MAX_ROOMS);
    let (queues, nodes) = (queues.unwrap_or_default(), nodes.unwrap_or_default());
    answer(
        StatusCode::OK,
        &json!({
            "cluster": if unreachable { "unreachable" } else { "ok" },
            "node": broker.cluster.as_ref().map_or("local", |c| c.node()),
            "auth": broker.auth.mode().as_str(),
            "now_ms": now_millis(),
            "series": series,
            "rooms": rooms,
            "rooms_total": rooms_total,
            "queues": queues,
            "sessions": sessions,
            "sessions_total": sessions_total,
            "nodes": nodes,
        }),
    )
}

/// `POST /admin/api/sessions/{id}/close`: the session gets ERROR `session closed by an
/// operator` and is closed.
pub async fn close_session(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<u64>,
) -> Response {
    let closed = state
        .broker
        .sessions
        .end(SessionId(id), End::ClosedByOperator);
    info!(target: "audit", %peer, user = operator(&caller), action = "close-session", session = id, done = closed, "admin action");
    if closed {
        answer(StatusCode::OK, &json!({ "closed": id }))
    } else {
        error(StatusCode::NOT_FOUND, "no such session on this node")
    }
}

/// `POST /admin/api/queues/{name}/purge`: drops the messages waiting in a durable queue.
pub async fn purge_queue(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    Path(queue): Path<String>,
) -> Response {
    let purged = state.broker.shared.router.queues.purge(&queue).await;
    info!(target: "audit", %peer, user = operator(&caller), action = "purge-queue", %queue, ?purged, "admin action");
    match purged {
        Ok(Some(n)) => answer(StatusCode::OK, &json!({ "queue": queue, "purged": n })),
        Ok(None) => error(StatusCode::NOT_FOUND, "no such queue"),
        Err(e) => cluster_unavailable(&e),
    }
}

/// `POST /admin/api/rooms/{room}/clear`: drops the messages a room keeps.
pub async fn clear_room(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    Path(room): Path<String>,
) -> Response {
    if let Err(e) = check_room_name(&room) {
        return error(StatusCode::BAD_REQUEST, &e.to_string());
    }
    let cleared = state.broker.shared.router.rooms.clear_history(&room).await;
    info!(target: "audit", %peer, user = operator(&caller), action = "clear-room", %room, ?cleared, "admin action");
    match cleared {
        Ok(Some(n)) => answer(StatusCode::OK, &json!({ "room": room, "cleared": n })),
        Ok(None) => error(StatusCode::NOT_FOUND, "no such room"),
        Err(e) => cluster_unavailable(&e),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv6Addr};

    use super::*;

    fn caller(groups: &[&str]) -> Caller {
        Caller(Some(Identity {
            name: Arc::from("ops"),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            expires_at: None,
            account_version: None,
        }))
    }

    #[test]
    fn without_authentication_only_loopback_clients_may_enter() {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 9));
        let mapped = SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x7f00, 1)),
            9,
        );
        let lan = SocketAddr::from(([192, 168, 1, 20], 9));
        let direct = HeaderMap::new();
        assert_eq!(refusal(Mode::None, loopback, &direct, &Caller(None)), None);
        assert_eq!(refusal(Mode::None, mapped, &direct, &Caller(None)), None);
        assert!(refusal(Mode::None, lan, &direct, &Caller(None)).is_some());
        for header in PROXY_HEADERS {
            let mut proxied = HeaderMap::new();
            proxied.insert(header, axum::http::HeaderValue::from_static("203.0.113.9"));
            assert!(
                refusal(Mode::None, loopback, &proxied, &Caller(None)).is_some(),
                "{header}"
            );
        }
    }

    #[test]
    fn with_authentication_only_group_admin_may_enter_from_anywhere() {
        let lan = SocketAddr::from(([10, 0, 0, 7], 9));
        let mut proxied = HeaderMap::new();
        proxied.insert(
            "x-forwarded-for",
            axum::http::HeaderValue::from_static("203.0.113.9"),
        );
        for headers in [HeaderMap::new(), proxied] {
            let admin = caller(&["staff", "admin"]);
            assert_eq!(refusal(Mode::Users, lan, &headers, &admin), None);
            assert_eq!(refusal(Mode::Jwt, lan, &headers, &caller(&["admin"])), None);
            assert!(refusal(Mode::Users, lan, &headers, &caller(&["staff"])).is_some());
        }
        let loopback = SocketAddr::from(([127, 0, 0, 1], 9));
        let direct = HeaderMap::new();
        assert!(refusal(Mode::Users, loopback, &direct, &caller(&[])).is_some());
    }

    #[test]
    fn the_charts_get_rates_quantiles_and_at_most_their_minutes() {
        let dashboard = Dashboard::default();
        let metrics = crate::metrics::Metrics::new();
        let before = metrics.reading();
        metrics.messages_published.inc_by(50);
        metrics.frames_sent(stomp_codec::Command::Message, 400);
        metrics.slow_consumers.inc();
        for _ in 0..100 {
            metrics.delivery_latency.observe(Duration::from_micros(700));
        }
        let now = metrics.reading();
        dashboard.record(&before, &now, Duration::from_millis(500));
        let samples = dashboard.samples();
        let sample = &samples[0];
        assert!((sample.messages_in - 100.0).abs() < 1e-9);
        assert!((sample.messages_out - 800.0).abs() < 1e-9);
        assert_eq!(sample.slow_consumers, 1);
        let p50 = sample.p50_ms.unwrap_or_default();
        assert!((0.5..=1.0).contains(&p50), "{p50}");
        drop(samples);
        for _ in 0..KEEP_SAMPLES + 5 {
            dashboard.record(&now, &now, Duration::from_secs(1));
        }
        let samples = dashboard.samples();
        assert_eq!(samples.len(), KEEP_SAMPLES);
        assert_eq!(samples.back().map(|s| s.p50_ms), Some(None));
    }
}
