//! The HTTP side: the chat page at `/`, STOMP over WebSocket at `/ws`, `/healthz` and
//! `/metrics`.
//!
//! In: HTTP requests. Out: responses, and upgraded WebSocket connections handed to
//! [`connection::serve`](crate::connection::serve) in their own task.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::connection;
use crate::services::check_room_name;
use crate::state::Broker;
use crate::transport::ws::{self, WsTransport};

/// The chat page and its assets, embedded in the binary: no files needed at run time.
const INDEX_HTML: &str = include_str!("../../web/index.html");
const CHAT_JS: &str = include_str!("../../web/chat.js");
const CHAT_CSS: &str = include_str!("../../web/chat.css");
const STOMP_JS: &str = include_str!("../../web/vendor/stomp.umd.min.js");
const STOMP_JS_LICENSE: &str = include_str!("../../web/vendor/stompjs-LICENSE");

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The broker.
    pub broker: Arc<Broker>,
    /// Fires once at shutdown.
    pub shutdown: watch::Receiver<bool>,
    /// Tracks WebSocket sessions so shutdown can wait for them.
    pub tracker: TaskTracker,
}

/// The HTTP routes.
pub fn routes(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route(
            "/chat.js",
            get(|| asset("text/javascript; charset=utf-8", CHAT_JS)),
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
        .route("/ws", get(websocket))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/rooms", get(api_rooms))
        .route("/api/queues", get(api_queues))
        .route("/api/rooms/{room}", get(api_room))
        .with_state(state)
}

async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.broker.metrics.render() + &state.broker.pace.render(),
    )
        .into_response()
}

async fn api_rooms(State(state): State<AppState>) -> Response {
    json_response(StatusCode::OK, state.broker.router.app.rooms_json())
}

async fn api_queues(State(state): State<AppState>) -> Response {
    let body = serde_json::json!({ "queues": state.broker.router.queues.stats() }).to_string();
    json_response(StatusCode::OK, body)
}

async fn api_room(State(state): State<AppState>, Path(room): Path<String>) -> Response {
    if let Err(e) = check_room_name(&room) {
        let body = serde_json::json!({ "error": e.to_string() }).to_string();
        return json_response(StatusCode::BAD_REQUEST, body);
    }
    match state.broker.router.rooms.detail(&room) {
        Some(_) => json_response(StatusCode::OK, state.broker.router.app.members_json(&room)),
        None => {
            let body = serde_json::json!({ "error": format!("no room {room:?}") }).to_string();
            json_response(StatusCode::NOT_FOUND, body)
        }
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn websocket(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
) -> Response {
    let upgrade = match ws::accept(&mut request) {
        Ok(upgrade) => upgrade,
        Err(refused) => return refused.response(),
    };
    let config = &state.broker.config;
    // One STOMP frame may arrive in several messages, or several frames in one: the
    // decoder enforces the frame limit; a message may hold at most one frame's worth more.
    let max_message = config.max_frame_bytes.saturating_add(64 * 1024);
    let ws_config = ws::config(config.read_buffer_bytes, max_message);
    let AppState {
        broker,
        shutdown,
        tracker,
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
        connection::serve(
            WsTransport::new(ws::open(upgraded, ws_config).await, max_message),
            broker,
            shutdown,
            peer.to_string(),
            "ws",
        )
        .await;
    });
    upgrade.response
}
