//! A SockJS server (protocol 0.3.3, as the sockjs-protocol suite checks it): the URLs under
//! one base path, its transports, and the sessions behind them. What the messages mean is
//! the [`Service`]'s business: the broker mounts STOMP here, the conformance test server its
//! echo services.
//!
//! In: HTTP requests under the base path (the part after it) with the peer's address. Out:
//! responses (streaming ones for `xhr_streaming`, `eventsource`, `htmlfile`), upgraded
//! WebSockets, and for each new session a [`Channel`] handed to the service.
//!
//! Transports: `websocket`, `xhr` + `xhr_send`, `xhr_streaming`, `eventsource`, `htmlfile`,
//! `iframe.html` for the iframe variants, and the raw `/websocket`. JSONP is not served (as
//! in Spring, for its risks). Origins are the caller's business: a request that reaches
//! [`Endpoint::handle`] is allowed, and CORS headers name its origin.

pub mod frame;
pub mod session;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::Response;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use dashmap::DashMap;
use futures_util::{SinkExt, StreamExt, stream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

pub use frame::Close;
pub use session::{Channel, Closed};
use session::{Next, Receiver, Refusal, Session};

use crate::transport::ws;

/// How an endpoint behaves; the defaults are those of the protocol and of Spring.
#[derive(Debug, Clone)]
pub struct Settings {
    /// An `h` frame on a receiving request after this long without one (25 s).
    pub heart_beat: Duration,
    /// A session with no receiving request for this long is closed (5 s).
    pub disconnect_delay: Duration,
    /// A streaming response ends after this many bytes (128 KiB) so that proxies and
    /// browsers do not keep all of it.
    pub stream_bytes: usize,
    /// Bytes queued for a client between its requests before the application waits.
    pub queue_bytes: usize,
    /// Largest `xhr_send` body and WebSocket message, in bytes.
    pub max_request_bytes: usize,
    /// Whether the `websocket` transports are served (`/info` says so).
    pub websocket: bool,
    /// Whether session responses set a `JSESSIONID` cookie (for load balancers that route
    /// by it; `/info` says so).
    pub cookie_needed: bool,
    /// The sockjs-client script `iframe.html` loads.
    pub sockjs_url: String,
    /// The `frame-ancestors` of `iframe.html` and `htmlfile` (the pages that may frame
    /// them).
    pub frame_ancestors: String,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            heart_beat: Duration::from_secs(25),
            disconnect_delay: Duration::from_secs(5),
            stream_bytes: 128 * 1024,
            queue_bytes: 1024 * 1024,
            max_request_bytes: 1024 * 1024,
            websocket: true,
            cookie_needed: false,
            sockjs_url: "/vendor/sockjs.min.js".to_owned(),
            frame_ancestors: "'self'".to_owned(),
        }
    }
}

/// The request that opened a session.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The client's address.
    pub peer: SocketAddr,
    /// The request's URI (its query may carry a token).
    pub uri: Uri,
    /// The request's headers.
    pub headers: HeaderMap,
    /// `sockjs-xhr`, `sockjs-websocket`, ...: for the log.
    pub transport: &'static str,
}

/// What runs behind the sessions of an endpoint.
pub trait Service: Send + Sync + 'static {
    /// A session opened: serve it through `channel` (in a task of the service's own).
    fn open(&self, channel: Channel, opened: Opened);
}

/// A SockJS endpoint: settings, service and live sessions.
pub struct Endpoint {
    settings: Settings,
    service: Arc<dyn Service>,
    sessions: Arc<DashMap<String, Arc<Session>>>,
    iframe: Iframe,
}

/// The `iframe.html` page, built once.
struct Iframe {
    body: String,
    etag: String,
    policy: String,
}

/// The inline script of `iframe.html` (its hash goes into the page's CSP).
const IFRAME_SCRIPT: &str =
    "\n    document.domain = document.domain;\n    SockJS.bootstrap_iframe();\n  ";

impl Iframe {
    fn new(settings: &Settings) -> Iframe {
        let url = settings.sockjs_url.replace('"', "%22");
        let body = format!(
            "<!DOCTYPE html>\n<html>\n<head>\n  \
             <meta http-equiv=\"X-UA-Compatible\" content=\"IE=edge\" />\n  \
             <meta http-equiv=\"Content-Type\" content=\"text/html; charset=UTF-8\" />\n  \
             <script src=\"{url}\"></script>\n  <script>{IFRAME_SCRIPT}</script>\n</head>\n\
             <body>\n  <h2>Don't panic!</h2>\n  \
             <p>This is a SockJS hidden iframe. It's used for cross domain magic.</p>\n\
             </body>\n</html>\n"
        );
        let digest = ring::digest::digest(&ring::digest::SHA256, body.as_bytes());
        let etag = format!("\"{}\"", hex(&digest.as_ref()[..16]));
        let script = ring::digest::digest(&ring::digest::SHA256, IFRAME_SCRIPT.as_bytes());
        let policy = format!(
            "default-src 'none'; script-src 'self' 'sha256-{}'; connect-src 'self'; frame-src 'self'; \
             frame-ancestors {}",
            BASE64.encode(script.as_ref()),
            settings.frame_ancestors
        );
        Iframe { body, etag, policy }
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// The receiving transports over plain HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Receiving {
    Xhr,
    XhrStreaming,
    EventSource,
    HtmlFile,
}

impl Receiving {
    fn name(self) -> &'static str {
        match self {
            Receiving::Xhr => "sockjs-xhr",
            Receiving::XhrStreaming => "sockjs-xhr-streaming",
            Receiving::EventSource => "sockjs-eventsource",
            Receiving::HtmlFile => "sockjs-htmlfile",
        }
    }
}

impl Endpoint {
    /// An endpoint serving `service`; sessions whose client is gone are swept while it
    /// lives.
    pub fn new(settings: Settings, service: Arc<dyn Service>) -> Arc<Endpoint> {
        let sessions = Arc::new(DashMap::new());
        tokio::spawn(sweep(Arc::downgrade(&sessions), settings.disconnect_delay));
        Arc::new(Endpoint {
            iframe: Iframe::new(&settings),
            settings,
            service,
            sessions,
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Sessions open over HTTP transports (WebSocket sessions are not kept here).
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Answers `request`, whose path below the base path is `rest` (empty, or starting
    /// with `/`).
    pub async fn handle(
        self: &Arc<Self>,
        rest: &str,
        request: Request,
        peer: SocketAddr,
    ) -> Response {
        let segments: Vec<&str> = match rest.strip_prefix('/') {
            None if rest.is_empty() => Vec::new(),
            None => return not_found(),
            Some("") => Vec::new(),
            Some(path) => path.split('/').collect(),
        };
        let method = request.method().clone();
        match segments.as_slice() {
            [] => greeting(&method),
            ["info"] => self.info(&request),
            [page] if is_iframe(page) => self.iframe(&request),
            ["websocket"] if self.settings.websocket => self.websocket(request, peer, Framing::Raw),
            [server, session, transport] if valid_segment(server) && valid_segment(session) => {
                let session = (*session).to_owned();
                match *transport {
                    "xhr" => self.receive(Receiving::Xhr, session, request, peer).await,
                    "xhr_streaming" => {
                        self.receive(Receiving::XhrStreaming, session, request, peer)
                            .await
                    }
                    "eventsource" => {
                        self.receive(Receiving::EventSource, session, request, peer)
                            .await
                    }
                    "htmlfile" => {
                        self.receive(Receiving::HtmlFile, session, request, peer)
                            .await
                    }
                    "xhr_send" => self.xhr_send(&session, request).await,
                    "websocket" if self.settings.websocket => {
                        self.websocket(request, peer, Framing::SockJs)
                    }
                    _ => not_found(),
                }
            }
            _ => not_found(),
        }
    }

    fn info(&self, request: &Request) -> Response {
        let headers = request.headers();
        match *request.method() {
            Method::GET => {
                let entropy = entropy();
                let body = serde_json::json!({
                    "websocket": self.settings.websocket,
                    "cookie_needed": self.settings.cookie_needed,
                    "origins": ["*:*"],
                    "entropy": entropy,
                });
                let mut response = text(
                    StatusCode::OK,
                    "application/json; charset=UTF-8",
                    body.to_string(),
                );
                no_cache(&mut response);
                cors(&mut response, headers);
                response
            }
            Method::OPTIONS => preflight(headers, "OPTIONS, GET"),
            _ => method_not_allowed("OPTIONS, GET"),
        }
    }

    fn iframe(&self, request: &Request) -> Response {
        if request.method() != Method::GET {
            return method_not_allowed("GET");
        }
        let iframe = &self.iframe;
        let matches = request
            .headers()
            .get(header::IF_NONE_MATCH)
            .is_some_and(|tag| tag.as_bytes() == iframe.etag.as_bytes());
        let mut response = if matches {
            let mut response = Response::new(Body::empty());
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            response
        } else {
            text(
                StatusCode::OK,
                "text/html; charset=UTF-8",
                iframe.body.clone(),
            )
        };
        cache_for_a_year(&mut response);
        let headers = response.headers_mut();
        if let Ok(etag) = HeaderValue::from_str(&iframe.etag) {
            headers.insert(header::ETAG, etag);
        }
        if let Ok(policy) = HeaderValue::from_str(&iframe.policy) {
            headers.insert(header::CONTENT_SECURITY_POLICY, policy);
        }
        response
    }

    /// Finds the session `id`, or opens it (only receiving requests open sessions); `true`
    /// when it was opened now.
    fn session(
        &self,
        id: String,
        request: &Request,
        peer: SocketAddr,
        transport: &'static str,
    ) -> (Arc<Session>, bool) {
        match self.sessions.entry(id) {
            dashmap::Entry::Occupied(entry) => (entry.get().clone(), false),
            dashmap::Entry::Vacant(entry) => {
                let (session, channel) = Session::new(self.settings.queue_bytes);
                entry.insert(session.clone());
                self.service.open(channel, opened(request, peer, transport));
                (session, true)
            }
        }
    }

    /// `xhr`, `xhr_streaming`, `eventsource` and `htmlfile`: the receiving requests.
    async fn receive(
        &self,
        kind: Receiving,
        id: String,
        request: Request,
        peer: SocketAddr,
    ) -> Response {
        let headers = request.headers();
        let expected = match kind {
            Receiving::Xhr | Receiving::XhrStreaming => Method::POST,
            Receiving::EventSource | Receiving::HtmlFile => Method::GET,
        };
        if *request.method() == Method::OPTIONS && expected == Method::POST {
            return preflight(headers, "OPTIONS, POST");
        }
        if *request.method() != expected {
            return method_not_allowed(if expected == Method::POST {
                "OPTIONS, POST"
            } else {
                "GET"
            });
        }
        let callback = if kind == Receiving::HtmlFile {
            match htmlfile_callback(request.uri()) {
                Ok(callback) => Some(callback),
                Err(reason) => return server_error(reason),
            }
        } else {
            None
        };
        let (session, created) = self.session(id, &request, peer, kind.name());
        let mut response = if kind == Receiving::Xhr {
            let body = if created {
                "o\n".to_owned()
            } else {
                poll(&session, self.settings.heart_beat).await + "\n"
            };
            text(
                StatusCode::OK,
                "application/javascript; charset=UTF-8",
                body,
            )
        } else {
            let (content_type, prelude) = match (kind, &callback) {
                (Receiving::EventSource, _) => ("text/event-stream", "\r\n".to_owned()),
                (Receiving::HtmlFile, Some(callback)) => {
                    ("text/html; charset=UTF-8", htmlfile_prelude(callback))
                }
                _ => {
                    let mut prelude = "h".repeat(2048);
                    prelude.push('\n');
                    ("application/javascript; charset=UTF-8", prelude)
                }
            };
            let body = streaming_body(kind, prelude, &session, created, &self.settings);
            let mut response = Response::new(body);
            if let Ok(value) = HeaderValue::from_str(content_type) {
                response.headers_mut().insert(header::CONTENT_TYPE, value);
            }
            if kind == Receiving::HtmlFile {
                let policy = format!(
                    "default-src 'none'; script-src 'unsafe-inline'; frame-ancestors {}",
                    self.settings.frame_ancestors
                );
                if let Ok(policy) = HeaderValue::from_str(&policy) {
                    response
                        .headers_mut()
                        .insert(header::CONTENT_SECURITY_POLICY, policy);
                }
            }
            response
        };
        no_cache(&mut response);
        cors(&mut response, request.headers());
        self.cookie(&mut response, request.headers());
        response
    }

    async fn xhr_send(&self, id: &str, request: Request) -> Response {
        let headers = request.headers().clone();
        if *request.method() == Method::OPTIONS {
            return preflight(&headers, "OPTIONS, POST");
        }
        if *request.method() != Method::POST {
            return method_not_allowed("OPTIONS, POST");
        }
        let Some(session) = self.sessions.get(id).map(|s| s.clone()) else {
            return not_found();
        };
        let limit = self.settings.max_request_bytes;
        let body = match axum::body::to_bytes(request.into_body(), limit).await {
            Ok(body) => body,
            Err(_) => {
                let body = serde_json::json!({
                    "error": format!("a message over {limit} bytes")
                });
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "application/json",
                    body.to_string(),
                );
            }
        };
        let messages = match frame::parse_payload(&body) {
            Ok(messages) => messages,
            Err(e) => return server_error(&e.to_string()),
        };
        if session.deliver(messages).await.is_err() {
            return not_found();
        }
        let mut response = text(StatusCode::NO_CONTENT, "text/plain; charset=UTF-8", "");
        no_cache(&mut response);
        cors(&mut response, &headers);
        self.cookie(&mut response, &headers);
        response
    }

    /// `/<server>/<session>/websocket` (SockJS framing) and `/websocket` (raw): one
    /// session per WebSocket.
    fn websocket(&self, mut request: Request, peer: SocketAddr, framing: Framing) -> Response {
        if request.method() != Method::GET {
            return method_not_allowed("GET");
        }
        let upgrade = match ws::accept(&mut request) {
            Ok(upgrade) => upgrade,
            Err(refused) => return refused.response(),
        };
        let (session, channel) = Session::new(self.settings.queue_bytes);
        let transport = match framing {
            Framing::SockJs => "sockjs-websocket",
            Framing::Raw => "sockjs-raw-websocket",
        };
        self.service
            .open(channel, opened(&request, peer, transport));
        let settings = self.settings.clone();
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.on_upgrade.await else {
                session.close(Close::interrupted());
                return;
            };
            let config = ws::config(64 * 1024, settings.max_request_bytes);
            let socket = ws::open(upgraded, config).await;
            pump(socket, session, &settings, framing).await;
        });
        upgrade.response
    }

    /// `JSESSIONID` for load balancers that route by it (`cookie_needed`): the client's own
    /// value, or `dummy`.
    fn cookie(&self, response: &mut Response, headers: &HeaderMap) {
        if !self.settings.cookie_needed {
            return;
        }
        let value = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(name, _)| *name == "JSESSIONID")
            .map_or("dummy", |(_, value)| value);
        if let Ok(cookie) = HeaderValue::from_str(&format!("JSESSIONID={value}; Path=/")) {
            response.headers_mut().insert(header::SET_COOKIE, cookie);
        }
    }
}

fn opened(request: &Request, peer: SocketAddr, transport: &'static str) -> Opened {
    Opened {
        peer,
        uri: request.uri().clone(),
        headers: request.headers().clone(),
        transport,
    }
}

/// Closes sessions whose client has been gone for the disconnect delay, and forgets closed
/// ones after it; ends with the endpoint.
async fn sweep(sessions: Weak<DashMap<String, Arc<Session>>>, delay: Duration) {
    let every = (delay / 5).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(sessions) = sessions.upgrade() else {
            return;
        };
        let now = Instant::now();
        sessions.retain(|_, session| {
            if !session.expired(now, delay) {
                return true;
            }
            // The client stopped asking: the application hears that the session ended.
            session.close(Close::interrupted());
            false
        });
    }
}

/// What one `xhr` poll answers on an existing session.
async fn poll(session: &Arc<Session>, heart_beat: Duration) -> String {
    match session.attach() {
        Err(Refusal::Busy) => Close::busy().to_frame(),
        Err(Refusal::Closed(close)) => close.to_frame(),
        Ok(mut receiver) => {
            let frame = match receiver.next(heart_beat).await {
                Next::Messages(messages) => frame::messages_frame(&messages),
                Next::Close(close) => close.to_frame(),
                Next::HeartBeat => "h".to_owned(),
            };
            receiver.finish();
            frame
        }
    }
}

/// A frame as the streaming transport `kind` writes it.
fn wrap(kind: Receiving, frame: &str) -> String {
    match kind {
        Receiving::EventSource => format!("data: {frame}\r\n\r\n"),
        Receiving::HtmlFile => frame::htmlfile_chunk(frame),
        Receiving::Xhr | Receiving::XhrStreaming => format!("{frame}\n"),
    }
}

/// A streaming response's body: the prelude, the open frame for a new session (or the
/// refusal), then frames until the close or the byte limit.
fn streaming_body(
    kind: Receiving,
    prelude: String,
    session: &Arc<Session>,
    created: bool,
    settings: &Settings,
) -> Body {
    let mut first = vec![prelude];
    if created {
        // Even for a session its service closed at once: `o`, then the close frame.
        first.push(wrap(kind, "o"));
    }
    let receiver = match session.attach() {
        Ok(receiver) => Some(receiver),
        Err(Refusal::Busy) => {
            first.push(wrap(kind, &Close::busy().to_frame()));
            None
        }
        Err(Refusal::Closed(close)) => {
            first.push(wrap(kind, &close.to_frame()));
            None
        }
    };
    struct Streaming {
        first: std::vec::IntoIter<String>,
        receiver: Option<Receiver>,
        sent: usize,
        limit: usize,
        heart_beat: Duration,
        kind: Receiving,
    }
    let state = Streaming {
        first: first.into_iter(),
        receiver,
        sent: 0,
        limit: settings.stream_bytes,
        heart_beat: settings.heart_beat,
        kind,
    };
    let chunks = stream::unfold(state, |mut state| async move {
        if let Some(chunk) = state.first.next() {
            return Some((Ok::<_, Infallible>(Bytes::from(chunk)), state));
        }
        let receiver = state.receiver.as_mut()?;
        let (frame, last) = match receiver.next(state.heart_beat).await {
            Next::Messages(messages) => (frame::messages_frame(&messages), false),
            Next::HeartBeat => ("h".to_owned(), false),
            Next::Close(close) => (close.to_frame(), true),
        };
        let chunk = wrap(state.kind, &frame);
        state.sent += chunk.len();
        if last || state.sent >= state.limit {
            // Detached in good order before the last chunk goes: the next request goes on.
            if let Some(receiver) = state.receiver.take() {
                receiver.finish();
            }
        }
        Some((Ok(Bytes::from(chunk)), state))
    });
    Body::from_stream(chunks)
}

/// How a WebSocket carries the session's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// `o`, `a[...]`, `h`, `c[...]` frames; the client sends JSON arrays.
    SockJs,
    /// One WebSocket message per message, both ways.
    Raw,
}

/// Carries one session over a WebSocket until either side ends it.
async fn pump(
    mut socket: ws::Socket,
    session: Arc<Session>,
    settings: &Settings,
    framing: Framing,
) {
    if framing == Framing::SockJs && socket.send(Message::text("o")).await.is_err() {
        session.close(Close::interrupted());
        return;
    }
    let mut receiver = match session.attach() {
        Ok(receiver) => receiver,
        Err(Refusal::Closed(close)) => {
            // Its service closed the session at once.
            send_close(&mut socket, close, framing).await;
            return;
        }
        Err(Refusal::Busy) => return,
    };
    // A heart-beat frame only in SockJS framing; the raw socket's `Next::HeartBeat` is a
    // WebSocket ping.
    let heart_beat = settings.heart_beat;
    // Client messages the application has not taken yet: the socket is not read meanwhile,
    // while what the application sends still goes out (no deadlock both ways).
    let mut waiting: Option<Vec<String>> = None;
    loop {
        tokio::select! {
            permit = session.reserve(), if waiting.is_some() => match permit {
                Ok(permit) => permit.send(waiting.take().unwrap_or_default()),
                Err(Closed) => waiting = None,
            },
            message = socket.next(), if waiting.is_none() => {
                let payload = match message {
                    Some(Ok(Message::Text(text))) => text.as_str().to_owned(),
                    Some(Ok(Message::Binary(bytes))) => String::from_utf8_lossy(&bytes).into_owned(),
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        session.close(Close::new(1000, "Normal closure"));
                        receiver.finish();
                        return;
                    }
                };
                let messages = match framing {
                    Framing::Raw => vec![payload],
                    // sockjs-protocol: empty messages are ignored.
                    Framing::SockJs if payload.is_empty() => continue,
                    Framing::SockJs => match frame::parse_payload(payload.as_bytes()) {
                        Ok(messages) => messages,
                        Err(_) => {
                            // Broken JSON ends the connection at once, without a close frame.
                            session.close(Close::new(1002, "Broken JSON encoding."));
                            receiver.finish();
                            return;
                        }
                    },
                };
                if !messages.is_empty() {
                    waiting = Some(messages);
                }
            }
            next = receiver.next(heart_beat) => {
                let sent = match (next, framing) {
                    (Next::Messages(messages), Framing::SockJs) => {
                        socket.send(Message::text(frame::messages_frame(&messages))).await
                    }
                    (Next::Messages(messages), Framing::Raw) => {
                        let mut sent = Ok(());
                        for message in decode_queue(&messages) {
                            sent = socket.feed(Message::text(message)).await;
                            if sent.is_err() {
                                break;
                            }
                        }
                        match sent {
                            Ok(()) => socket.flush().await,
                            Err(e) => Err(e),
                        }
                    }
                    (Next::HeartBeat, Framing::SockJs) => socket.send(Message::text("h")).await,
                    (Next::HeartBeat, Framing::Raw) => socket.send(Message::Ping(Bytes::new())).await,
                    (Next::Close(close), framing) => {
                        send_close(&mut socket, close, framing).await;
                        receiver.finish();
                        return;
                    }
                };
                if sent.is_err() {
                    session.close(Close::interrupted());
                    receiver.finish();
                    return;
                }
            }
        }
    }
}

/// Ends a WebSocket session: the close frame (in SockJS framing), then a WebSocket close
/// with the code (application codes as they are, others as 1000) and reason.
async fn send_close(socket: &mut ws::Socket, close: Close, framing: Framing) {
    if framing == Framing::SockJs {
        let _ = socket.send(Message::text(close.to_frame())).await;
    }
    let code = if (3000..5000).contains(&close.code) {
        CloseCode::from(close.code)
    } else {
        CloseCode::Normal
    };
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(close.reason),
        })))
        .await;
}

/// The messages of a queue (JSON strings separated by commas), decoded.
fn decode_queue(messages: &str) -> Vec<String> {
    serde_json::from_str::<Vec<String>>(&format!("[{messages}]")).unwrap_or_default()
}

/// A fresh random number in `0..2^32` for `/info`.
fn entropy() -> u32 {
    let rng = ring::rand::SystemRandom::new();
    ring::rand::generate::<[u8; 4]>(&rng).map_or_else(
        |_| {
            // No system randomness: the clock's nanoseconds are still unpredictable enough
            // for the client's own generator seed.
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        },
        |bytes| u32::from_be_bytes(bytes.expose()),
    )
}

/// `iframe.html`, `iframe-<version>.html`.
fn is_iframe(segment: &str) -> bool {
    segment == "iframe.html"
        || segment
            .strip_prefix("iframe-")
            .and_then(|rest| rest.strip_suffix(".html"))
            .is_some()
}

/// A server or session segment: not empty, no dot.
fn valid_segment(segment: &str) -> bool {
    !segment.is_empty() && !segment.contains('.')
}

/// The `c` parameter of an htmlfile request.
fn htmlfile_callback(uri: &Uri) -> Result<String, &'static str> {
    let callback = uri
        .query()
        .and_then(|query| {
            form_urlencoded::parse(query.as_bytes())
                .find(|(name, _)| name == "c")
                .map(|(_, value)| value.into_owned())
        })
        .filter(|c| !c.is_empty())
        .ok_or("\"callback\" parameter required")?;
    if callback
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Ok(callback)
    } else {
        Err("invalid \"callback\" parameter")
    }
}

/// The htmlfile page head, padded past 1 KiB so that browsers start rendering it.
fn htmlfile_prelude(callback: &str) -> String {
    let mut page = format!(
        "<!doctype html>\n<html><head>\n  \
         <meta http-equiv=\"X-UA-Compatible\" content=\"IE=edge\" />\n  \
         <meta http-equiv=\"Content-Type\" content=\"text/html; charset=UTF-8\" />\n\
         </head><body><h2>Don't panic!</h2>\n  <script>\n    \
         document.domain = document.domain;\n    var c = parent.{callback};\n    \
         c.start();\n    function p(d) {{c.message(d);}};\n    \
         window.onload = function() {{c.stop();}};\n  </script>"
    );
    let padding = 1024usize.saturating_sub(page.len()) + 14;
    page.push_str(&" ".repeat(padding));
    page.push_str("\r\n\r\n");
    page
}

fn greeting(method: &Method) -> Response {
    if *method != Method::GET {
        return method_not_allowed("GET");
    }
    text(
        StatusCode::OK,
        "text/plain; charset=UTF-8",
        "Welcome to SockJS!\n",
    )
}

fn text(status: StatusCode, content_type: &'static str, body: impl Into<Body>) -> Response {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn not_found() -> Response {
    text(
        StatusCode::NOT_FOUND,
        "text/plain; charset=UTF-8",
        "Not found\n",
    )
}

/// 500 with the protocol's reason (`Payload expected.`, `Broken JSON encoding.`, ...).
fn server_error(reason: &str) -> Response {
    text(
        StatusCode::INTERNAL_SERVER_ERROR,
        "text/plain; charset=UTF-8",
        reason.to_owned(),
    )
}

/// 405 with `Allow` and nothing else.
fn method_not_allowed(allow: &'static str) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

/// Session responses are never cached (iOS caches POSTs).
fn no_cache(response: &mut Response) {
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-cache, no-transform, must-revalidate, max-age=0"),
    );
}

const A_YEAR: Duration = Duration::from_secs(31_536_000);

fn cache_for_a_year(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000"),
    );
    let expires = httpdate::fmt_http_date(SystemTime::now() + A_YEAR);
    if let Ok(expires) = HeaderValue::from_str(&expires) {
        headers.insert(header::EXPIRES, expires);
    }
}

/// CORS as SockJS clients need it: the request's `Origin` (with credentials, for cookies),
/// else `*`.
fn cors(response: &mut Response, request: &HeaderMap) {
    let headers = response.headers_mut();
    match request.get(header::ORIGIN) {
        Some(origin) => {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
            headers.insert(header::VARY, HeaderValue::from_static("Origin"));
        }
        None => {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
        }
    }
}

/// The answer to a CORS preflight: cacheable for a year, the methods, and the headers the
/// browser asked for.
fn preflight(request: &HeaderMap, methods: &'static str) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    cache_for_a_year(&mut response);
    cors(&mut response, request);
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("31536000"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(methods),
    );
    if let Some(asked) = request
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .filter(|v| !v.is_empty())
    {
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iframe_pages_are_recognised_by_name() {
        for page in [
            "iframe.html",
            "iframe-a.html",
            "iframe-.html",
            "iframe-0.1.2abc-dirty.2144.html",
        ] {
            assert!(is_iframe(page), "{page}");
        }
        for page in [
            "iframe.htm",
            "iframe",
            "IFRAME.HTML",
            "iframe.HTML",
            "iframe.xml",
        ] {
            assert!(!is_iframe(page), "{page}");
        }
    }

    #[test]
    fn session_segments_are_non_empty_and_dotless() {
        assert!(valid_segment("abcdefgh_i-j%20"));
        assert!(!valid_segment(""));
        assert!(!valid_segment("a."));
    }

    #[test]
    fn htmlfile_callbacks_are_checked() {
        let uri = |q: &str| q.parse::<Uri>().unwrap_or_default();
        assert_eq!(
            htmlfile_callback(&uri("/x?c=%63allback")),
            Ok("callback".into())
        );
        assert_eq!(
            htmlfile_callback(&uri("/x")),
            Err("\"callback\" parameter required")
        );
        for bad in ["%20", "*", "abc(", "abc%28"] {
            assert_eq!(
                htmlfile_callback(&uri(&format!("/x?c={bad}"))),
                Err("invalid \"callback\" parameter")
            );
        }
    }

    #[test]
    fn the_htmlfile_prelude_is_longer_than_a_kibibyte() {
        let prelude = htmlfile_prelude("callback");
        assert!(prelude.len() > 1024);
        assert!(prelude.contains("var c = parent.callback;"));
    }

    #[test]
    fn a_raw_queue_decodes_to_its_messages() {
        let mut queue = String::new();
        frame::push_json_string(&mut queue, "a,\"b");
        queue.push(',');
        frame::push_json_string(&mut queue, "\u{2028}");
        assert_eq!(
            decode_queue(&queue),
            vec!["a,\"b".to_owned(), "\u{2028}".to_owned()]
        );
    }
}
