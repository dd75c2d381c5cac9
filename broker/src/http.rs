//! The HTTP side: the chat page at `/`, STOMP over WebSocket at `/ws`, `/healthz`,
//! `/metrics`, and the JSON API under `/api/` (which takes the same identity as STOMP).
//!
//! In: HTTP requests. Out: responses, and upgraded WebSocket connections handed to
//! [`connection::serve`](crate::connection::serve) in their own task.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Extension, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{any, get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::acl::Viewer;
use crate::admin::{self, Dashboard};
use crate::admission::Busy;
use crate::auth::{Credentials, Identity, Mode, Refusal};
use crate::cluster::NodeInfo;
use crate::connection::{self, Arrival};
use crate::message::now_millis;
use crate::room_api;
use crate::services::check_room_name;
use crate::sockjs::Endpoint;
use crate::state::Broker;
use crate::transport::ws::{self, WsTransport};

/// The chat page and its assets, embedded in the binary: no files needed at run time.
const INDEX_HTML: &str = include_str!("../../web/index.html");
const CHAT_JS: &str = include_str!("../../web/chat.js");
const TRANSPORT_JS: &str = include_str!("../../web/transport.js");
const CHAT_CSS: &str = include_str!("../../web/chat.css");
const STOMP_JS: &str = include_str!("../../web/vendor/stomp.umd.min.js");
const STOMP_JS_LICENSE: &str = include_str!("../../web/vendor/stompjs-LICENSE");
const SOCKJS_JS: &str = include_str!("../../web/vendor/sockjs.min.js");
const SOCKJS_JS_LICENSE: &str = include_str!("../../web/vendor/sockjs-LICENSE");

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The broker.
    pub broker: Arc<Broker>,
    /// Fires once at shutdown.
    pub shutdown: watch::Receiver<bool>,
    /// Tracks WebSocket sessions so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// SockJS under `/ws`.
    pub sockjs: Arc<Endpoint>,
    /// The dashboard's last minutes (`/admin`).
    pub dashboard: Arc<Dashboard>,
}

/// The HTTP routes.
pub fn routes(state: AppState) -> Router {
    // Rooms over HTTP are a transport like the WebSocket: pages of other origins are refused.
    let room_transport = Router::new()
        .route(
            "/api/rooms/{room}/messages",
            get(room_api::get_messages).post(room_api::post_message),
        )
        .route("/api/rooms/{room}/events", get(room_api::events))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            refuse_other_origins,
        ));
    let api = Router::new()
        .route("/api/rooms", get(api_rooms))
        .route("/api/queues", get(api_queues))
        .route("/api/rooms/{room}", get(api_room))
        .route("/api/nodes", get(api_nodes))
        .merge(room_transport)
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    // The operator's: authenticated as the API, then only for operators (admin.rs).
    let operator = Router::new()
        .route("/admin", get(admin::page))
        .route("/admin/api/overview", get(admin::overview))
        .route("/admin/api/sessions/{id}/close", post(admin::close_session))
        .route("/admin/api/queues/{queue}/purge", post(admin::purge_queue))
        .route("/admin/api/rooms/{room}/clear", post(admin::clear_room))
        .route_layer(middleware::from_fn_with_state(state.clone(), admin::gate))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    // Open in `--auth none`; with accounts or tokens, group admin's (admin.rs).
    let scraped = Router::new()
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn(admin::metrics_gate))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/", get(index))
        .route(
            "/chat.js",
            get(|| asset("text/javascript; charset=utf-8", CHAT_JS)),
        )
        .route(
            "/transport.js",
            get(|| asset("text/javascript; charset=utf-8", TRANSPORT_JS)),
        )
        .route(
            "/chat.css",
            get(|| asset("text/css; charset=utf-8", CHAT_CSS)),
        )
        .route(
            "/vendor/stomp.umd.min.js",
            get(|| asset("text/javascript; charset=utf-8", STOMP_JS)),
        )
        .route(
            "/vendor/stompjs-LICENSE",
            get(|| asset("text/plain; charset=utf-8", STOMP_JS_LICENSE)),
        )
        .route(
            "/vendor/sockjs.min.js",
            get(|| asset("text/javascript; charset=utf-8", SOCKJS_JS)),
        )
        .route(
            "/vendor/sockjs-LICENSE",
            get(|| asset("text/plain; charset=utf-8", SOCKJS_JS_LICENSE)),
        )
        .route("/ws", any(websocket_or_sockjs))
        .route("/ws/websocket", any(websocket))
        .route("/ws/", any(sockjs))
        .route("/ws/{*rest}", any(sockjs))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/config", get(api_config))
        .route(
            "/admin.js",
            get(|| asset("text/javascript; charset=utf-8", admin::ADMIN_JS)),
        )
        .route(
            "/admin.css",
            get(|| asset("text/css; charset=utf-8", admin::ADMIN_CSS)),
        )
        .route(
            "/vendor/uPlot.iife.min.js",
            get(|| asset("text/javascript; charset=utf-8", admin::UPLOT_JS)),
        )
        .route(
            "/vendor/uPlot.min.css",
            get(|| asset("text/css; charset=utf-8", admin::UPLOT_CSS)),
        )
        .route(
            "/vendor/uplot-LICENSE",
            get(|| asset("text/plain; charset=utf-8", admin::UPLOT_LICENSE)),
        )
        .merge(api)
        .merge(operator)
        .merge(scraped)
        .layer(middleware::map_response_with_state(
            state.clone(),
            security_headers,
        ))
        .with_state(state)
}

/// The page's scripts, styles, images and connections come from the broker itself; it may
/// not be framed; no plugins, no `<base>`.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// Headers on every answer: the content security policy, no MIME sniffing, no referrer,
/// no framing; over TLS, HSTS.
async fn security_headers(State(state): State<AppState>, mut response: Response) -> Response {
    let headers = response.headers_mut();
    // SockJS's iframe page and htmlfile stream set their own policy: they run inline
    // scripts and are framed by the page that uses them.
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY) {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        );
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if state.broker.tls.is_some() {
        headers.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    response
}

/// Who is asking over HTTP: set on every request of the API (`None` in `--auth none`).
#[derive(Debug, Clone)]
pub struct Caller(pub Option<Identity>);

/// The API's requests carry the same identity as STOMP: `Authorization: Basic` in `--auth
/// users`, `Bearer` in `--auth jwt`. Without one the answer is 401; with a wrong one, 401
/// no sooner than `--auth-failure-delay-ms` after the request, as for a CONNECT.
async fn authenticate(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
    next: Next,
) -> Response {
    let auth = &state.broker.auth;
    let mode = auth.mode();
    if mode == Mode::None {
        request.extensions_mut().insert(Caller(None));
        return next.run(request).await;
    }
    let challenge = match mode {
        Mode::Users => "Basic realm=\"stoa\", charset=\"UTF-8\"",
        _ => "Bearer realm=\"stoa\"",
    };
    let unauthorized = |error: &str| {
        let body = serde_json::json!({ "error": error }).to_string();
        let mut response = json_response(StatusCode::UNAUTHORIZED, body);
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
        response
    };
    // EventSource cannot set headers: in `--auth jwt` the token may come as `access_token`
    // in the query, as on a WebSocket upgrade.
    let presented = http_credentials(request.headers(), mode).or_else(|| {
        (mode == Mode::Jwt)
            .then(|| bearer_token(request.headers(), request.uri()))
            .flatten()
            .map(|token| Presented {
                login: None,
                password: None,
                token: Some(token),
            })
    });
    let Some(presented) = presented else {
        return unauthorized("authentication required");
    };
    let started = tokio::time::Instant::now();
    match auth
        .authenticate(presented.as_credentials(), peer.ip())
        .await
    {
        Ok(identity) => {
            request.extensions_mut().insert(Caller(Some(identity)));
            next.run(request).await
        }
        Err(refusal) => {
            state.broker.shared.metrics.authentication_failures.inc();
            tokio::time::sleep_until(started + auth.failure_delay()).await;
            unauthorized(match refusal {
                Refusal::Failed => "authentication failed",
                Refusal::TooManyFailures => "too many failed logins",
            })
        }
    }
}

/// Credentials from an `Authorization` header, owned.
struct Presented {
    login: Option<String>,
    password: Option<String>,
    token: Option<String>,
}

impl Presented {
    fn as_credentials(&self) -> Credentials<'_> {
        Credentials {
            login: self.login.as_deref(),
            passcode: self.password.as_deref(),
            bearer: self.token.as_deref(),
        }
    }
}

/// `Basic` (name and password) in `users` mode, `Bearer` in `jwt` mode; `None` without the
/// header or with the other scheme.
fn http_credentials(headers: &HeaderMap, mode: Mode) -> Option<Presented> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    match mode {
        Mode::Users if scheme.eq_ignore_ascii_case("basic") => {
            let decoded = BASE64.decode(rest).ok()?;
            let text = String::from_utf8(decoded).ok()?;
            let (login, password) = text.split_once(':')?;
            Some(Presented {
                login: Some(login.to_owned()),
                password: Some(password.to_owned()),
                token: None,
            })
        }
        Mode::Jwt if scheme.eq_ignore_ascii_case("bearer") => Some(Presented {
            login: None,
            password: None,
            token: Some(rest.to_owned()),
        }),
        _ => None,
    }
}

/// `{"auth":"none"|"users"|"jwt"}`: what the page asks before anyone logs in.
async fn api_config(State(state): State<AppState>) -> Response {
    let body = serde_json::json!({ "auth": state.broker.auth.mode().as_str() }).to_string();
    json_response(StatusCode::OK, body)
}

async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// `ok`, or 503 while Redis does not answer (`--cluster`).
async fn healthz(State(state): State<AppState>) -> Response {
    match &state.broker.cluster {
        Some(cluster) if !cluster.is_reachable() => {
            let mut body = serde_json::json!({ "status": "degraded", "cluster": "unreachable" });
            // Redis answered, with an error (out of memory, a read-only replica): say which.
            if let Some(reason) = cluster.refusal() {
                body["reason"] = serde_json::Value::String(reason);
            }
            json_response(StatusCode::SERVICE_UNAVAILABLE, body.to_string())
        }
        _ => (StatusCode::OK, "ok\n").into_response(),
    }
}

/// Whether this node should get traffic: 200 `{"status":"ready"}`, or 503 naming what is
/// not: `"stopping"` (shutting down), `"store":"failing"` (a store's writes do not reach the
/// disk), `"cluster":"unreachable"` (`--cluster` and Redis does not answer).
async fn readyz(State(state): State<AppState>) -> Response {
    let unready = |detail: serde_json::Value| {
        json_response(StatusCode::SERVICE_UNAVAILABLE, detail.to_string())
    };
    if *state.shutdown.borrow() {
        return unready(serde_json::json!({ "status": "stopping" }));
    }
    if !state.broker.shared.router.stores_healthy() {
        return unready(serde_json::json!({ "status": "unready", "store": "failing" }));
    }
    if let Some(cluster) = &state.broker.cluster
        && !cluster.is_reachable()
    {
        return unready(serde_json::json!({ "status": "unready", "cluster": "unreachable" }));
    }
    json_response(
        StatusCode::OK,
        serde_json::json!({ "status": "ready" }).to_string(),
    )
}

/// The nodes of the cluster with their connections; without `--cluster`, this one.
///
/// # Errors
/// Redis did not answer.
pub async fn node_list(broker: &Broker) -> Result<Vec<NodeInfo>, redis::RedisError> {
    match &broker.cluster {
        Some(cluster) => cluster.nodes().await,
        None => Ok(vec![NodeInfo {
            name: "local".to_owned(),
            connections: broker.shared.metrics.connections_open(),
            last_seen_ms: now_millis(),
        }]),
    }
}

/// [`node_list`] as JSON.
async fn api_nodes(State(state): State<AppState>) -> Response {
    let nodes = match node_list(&state.broker).await {
        Ok(nodes) => nodes,
        Err(e) => {
            let body = serde_json::json!({ "error": format!("cluster unavailable: {e}") });
            return json_response(StatusCode::SERVICE_UNAVAILABLE, body.to_string());
        }
    };
    json_response(
        StatusCode::OK,
        serde_json::json!({ "nodes": nodes }).to_string(),
    )
}

/// `/metrics`: the counters, then what is read now: rooms, queues, store commit times,
/// the runtime's pace and, with `--cluster`, the nodes.
async fn metrics(State(state): State<AppState>) -> Response {
    let broker = &state.broker;
    let router = &broker.shared.router;
    let mut now = Registry::with_prefix("stoa");
    let gauge = |value: u64| {
        let gauge = Gauge::<i64>::default();
        gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        gauge
    };
    let rooms = router.rooms.summaries();
    let members: usize = rooms.iter().map(|r| r.members).sum();
    now.register(
        "rooms",
        "Rooms with members or kept messages on this node",
        gauge(rooms.len() as u64),
    );
    now.register(
        "room_members",
        "Members of those rooms",
        gauge(members as u64),
    );
    now.register(
        "room_history_bytes",
        "Bytes of room messages kept in memory",
        gauge(router.rooms.kept_bytes() as u64),
    );
    if let Ok(queues) = router.queues.stats_answer().await {
        let ready = Family::<QueueLabel, Gauge>::default();
        let unacked = Family::<QueueLabel, Gauge>::default();
        let consumers = Family::<QueueLabel, Gauge>::default();
        for q in queues {
            let label = QueueLabel { queue: q.queue };
            let set = |family: &Family<QueueLabel, Gauge>, n: usize| {
                family
                    .get_or_create(&label)
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            };
            set(&ready, q.ready);
            set(&unacked, q.unacked);
            set(&consumers, q.consumers);
        }
        now.register(
            "queue_ready",
            "Messages waiting for a consumer, per durable queue",
            ready,
        );
        now.register(
            "queue_unacked",
            "Messages delivered and not acknowledged, per durable queue",
            unacked,
        );
        now.register("queue_consumers", "Consumers, per durable queue", consumers);
    }
    let (history, queues) = router.commit_seconds();
    if let Some(history) = history {
        now.register_with_unit(
            "store_commit",
            "Time to commit a batch of room messages to SQLite",
            Unit::Seconds,
            history,
        );
    }
    now.register_with_unit(
        "queue_store_commit",
        "Time to commit a batch of durable queue changes to SQLite",
        Unit::Seconds,
        queues,
    );
    let (busy, window_us) = broker.pace.readings();
    now.register(
        "workers_busy_permille",
        "Smoothed share of time the worker threads are busy",
        gauge(busy),
    );
    now.register(
        "write_coalesce_window_microseconds",
        "How long connections coalesce writes now",
        gauge(window_us),
    );
    if let Some(cluster) = &broker.cluster {
        now.register(
            "cluster_reachable",
            "1 while Redis answers, 0 otherwise",
            gauge(u64::from(cluster.is_reachable())),
        );
        if let Some(round_trip) = cluster.round_trip() {
            let seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
            seconds.set(round_trip.as_secs_f64());
            now.register_with_unit(
                "cluster_redis_round_trip",
                "How long this node's last heartbeat took to come back from Redis",
                Unit::Seconds,
                seconds,
            );
        }
        if let Ok(nodes) = cluster.nodes().await {
            now.register(
                "cluster_nodes",
                "Nodes in the cluster",
                gauge(nodes.len() as u64),
            );
        }
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        broker.shared.metrics.encode_with(&now),
    )
        .into_response()
}

/// The label of a durable queue (queues are made by operators and applications: bounded by
/// their use, unlike rooms and users, which are never labels).
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct QueueLabel {
    queue: String,
}

/// The caller as the ACL sees them (`None` without `--acl`). Anonymous callers (`--auth
/// none`) are nameless: only rules for `*` speak of them.
fn viewer(broker: &Broker, caller: &Caller) -> Option<Viewer> {
    let acl = broker.shared.acl.clone()?;
    let (name, groups) = match &caller.0 {
        Some(identity) => (identity.name.clone(), identity.groups.clone()),
        None => (Arc::from(""), Arc::from([])),
    };
    Some(Viewer { name, groups, acl })
}

async fn api_rooms(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Response {
    let viewer = viewer(&state.broker, &caller);
    match state
        .broker
        .shared
        .router
        .app
        .rooms_answer(viewer.as_ref())
        .await
    {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(_) => cluster_unavailable(),
    }
}

/// 503 for a question Redis did not answer (`--cluster`).
fn cluster_unavailable() -> Response {
    let body = serde_json::json!({ "error": "cluster unavailable" }).to_string();
    json_response(StatusCode::SERVICE_UNAVAILABLE, body)
}

async fn api_queues(State(state): State<AppState>) -> Response {
    match state.broker.shared.router.queues.stats_answer().await {
        Ok(queues) => json_response(
            StatusCode::OK,
            serde_json::json!({ "queues": queues }).to_string(),
        ),
        Err(_) => cluster_unavailable(),
    }
}

async fn api_room(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(room): Path<String>,
) -> Response {
    if let Err(e) = check_room_name(&room) {
        let body = serde_json::json!({ "error": e.to_string() }).to_string();
        return json_response(StatusCode::BAD_REQUEST, body);
    }
    let viewer = viewer(&state.broker, &caller);
    let app = &state.broker.shared.router.app;
    match app.detail_answer(&room, viewer.as_ref()).await {
        Err(_) => cluster_unavailable(),
        Ok(Some(detail)) => json_value(StatusCode::OK, &detail),
        Ok(None) => {
            let body = serde_json::json!({ "error": format!("no room {room:?}") }).to_string();
            json_response(StatusCode::NOT_FOUND, body)
        }
    }
}

/// `value` as JSON (a 500 naming the failure if it cannot be written, which the types
/// answered here never cause).
fn json_value(status: StatusCode, value: &impl serde::Serialize) -> Response {
    match serde_json::to_string(value) {
        Ok(body) => json_response(status, body),
        Err(e) => {
            let body = serde_json::json!({ "error": format!("cannot write the answer: {e}") });
            json_response(StatusCode::INTERNAL_SERVER_ERROR, body.to_string())
        }
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `/ws`: a WebSocket upgrade (STOMP), else SockJS's greeting.
async fn websocket_or_sockjs(
    state: State<AppState>,
    peer: ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    if request.headers().contains_key(header::UPGRADE) || request.method() != Method::GET {
        websocket(state, peer, request).await
    } else {
        sockjs(state, peer, request).await
    }
}

/// SockJS under `/ws/`, for the origins `--allowed-origins` admits.
async fn sockjs(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    if let Some(refused) = refuse_origin(&state.broker, request.headers()) {
        return refused;
    }
    let path = request.uri().path().to_owned();
    let rest = path.strip_prefix("/ws").unwrap_or_default();
    state.sockjs.handle(rest, request, peer).await
}

async fn websocket(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
) -> Response {
    let broker = &state.broker;
    if let Some(refused) = refuse_origin(broker, request.headers()) {
        return refused;
    }
    let ticket = match broker.admission.admit(peer.ip()) {
        Ok(ticket) => ticket,
        Err(Busy) => {
            let body = serde_json::json!({ "error": "server busy" }).to_string();
            return json_response(StatusCode::SERVICE_UNAVAILABLE, body);
        }
    };
    let upgrade = match ws::accept(&mut request) {
        Ok(upgrade) => upgrade,
        Err(refused) => return refused.response(),
    };
    // Only `--auth jwt` reads it; kept out of the connection's memory otherwise.
    let bearer = (state.broker.auth.mode() == Mode::Jwt)
        .then(|| bearer_token(request.headers(), request.uri()))
        .flatten();
    let config = &state.broker.shared.config;
    // One STOMP frame may arrive in several messages, or several frames in one: the
    // decoder enforces the frame limit; a message may hold at most one frame's worth more.
    let max_message = config.max_frame_bytes.saturating_add(64 * 1024);
    let ws_config = ws::config(config.read_buffer_bytes, max_message);
    let AppState {
        broker,
        shutdown,
        tracker,
        ..
    } = state;
    let on_upgrade = upgrade.on_upgrade;
    tracker.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(%peer, "websocket upgrade failed: {e}");
                return;
            }
        };
        let arrival = Arrival {
            bearer,
            ticket,
            ..Arrival::new(peer, "ws")
        };
        connection::serve(
            WsTransport::new(ws::open(upgraded, ws_config).await, max_message),
            broker,
            shutdown,
            arrival,
        )
        .await;
    });
    upgrade.response
}

/// [`refuse_origin`] as a layer.
async fn refuse_other_origins(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    match refuse_origin(&state.broker, request.headers()) {
        Some(refused) => refused,
        None => next.run(request).await,
    }
}

/// 403 for a browser page of an origin `--allowed-origins` does not name (cross-site
/// WebSocket hijacking: a page elsewhere using a visitor's cookies or address); `None` when
/// the request may go on.
pub fn refuse_origin(broker: &Broker, headers: &HeaderMap) -> Option<Response> {
    let origin = headers
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("\u{0}"));
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if broker.origins.allows(origin, broker.http_scheme(), host) {
        return None;
    }
    tracing::debug!(origin = origin.unwrap_or(""), "origin refused");
    let body = serde_json::json!({ "error": "origin not allowed" }).to_string();
    Some(json_response(StatusCode::FORBIDDEN, body))
}

/// A token on a request: `Authorization: Bearer <token>`, else `access_token` in the query
/// (browsers cannot set headers on a WebSocket upgrade or a SockJS request).
pub fn bearer_token(headers: &HeaderMap, uri: &Uri) -> Option<String> {
    let header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_owned())
        });
    header.or_else(|| {
        let query = uri.query()?;
        form_urlencoded::parse(query.as_bytes())
            .find(|(name, _)| name == "access_token")
            .map(|(_, token)| token.into_owned())
    })
}
