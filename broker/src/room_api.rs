//! Rooms over plain HTTP: polling and long polling (`GET /api/rooms/<room>/messages`),
//! Server-Sent Events (`GET /api/rooms/<room>/events`) and sending (`POST .../messages`).
//!
//! In: HTTP requests with the caller's identity. Out: JSON messages and SSE events.
//!
//! Each request is served by a *reader*: a STOMP [`Session`] inside the broker, with an
//! outbox of its own, that CONNECTs as the caller and SUBSCRIBEs to the room with `x-since`
//! or `x-history` as a reader (in the room without being a member: no presence, no join or
//! leave notice), or SENDs with a receipt. Identity, the ACL, the room rules, replay with no
//! gap and no duplicate, and the cluster all work as they do for STOMP, because it is STOMP.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Extension, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::BytesMut;
use futures_util::stream;
use serde_json::{Map, Value, json};
use stomp_codec::{Command, Decoder, Frame, Version};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::connection::compose;
use crate::error::SessionError;
use crate::http::{AppState, Caller};
use crate::outbox::{Outbox, Outgoing};
use crate::services::check_room_name;
use crate::session::Session;
use crate::sessions::SessionInfo;
use crate::state::Broker;

/// Messages a poll answers with when it does not say (`limit`).
const DEFAULT_LIMIT: usize = 100;
/// Most messages one poll answers with.
const MAX_LIMIT: usize = 1000;
/// Longest long poll (`wait`), in seconds.
const MAX_WAIT_SECS: u64 = 60;

/// An answer that is not the one asked for: a status and a reason, as JSON.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    reason: String,
}

impl Refusal {
    fn new(status: StatusCode, reason: impl Into<String>) -> Refusal {
        Refusal {
            status,
            reason: reason.into(),
        }
    }

    fn bad_request(reason: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::BAD_REQUEST, reason)
    }

    /// What the STOMP session said, as HTTP.
    fn from_session(error: &SessionError) -> Refusal {
        let status = match error {
            SessionError::AccessDenied(_) => StatusCode::FORBIDDEN,
            SessionError::ClusterUnavailable
            | SessionError::MembershipLost
            | SessionError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            SessionError::SessionRevoked => StatusCode::UNAUTHORIZED,
            _ => StatusCode::BAD_REQUEST,
        };
        Refusal::new(status, error.to_string())
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.reason }).to_string();
        (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}

/// A STOMP session inside the broker serving one HTTP request.
struct Reader {
    broker: Arc<Broker>,
    session: Session,
    outbox: Arc<Outbox>,
    decoder: Decoder,
    bytes: BytesMut,
    batch: Vec<Outgoing>,
    /// Frames taken from the outbox and not yet handled.
    frames: VecDeque<Frame>,
}

impl Reader {
    /// A session CONNECTed as the caller: the authenticated identity, else (`--auth none`)
    /// the name the request gives (`?name=` or `X-Stoa-Name`), else a guest name.
    fn connect(
        broker: &Arc<Broker>,
        caller: &Caller,
        name: Option<&str>,
        info: SessionInfo,
    ) -> Result<Reader, Refusal> {
        let (mut session, outbox) = broker.open_session(broker.next_session_id(), info);
        session.set_reader();
        let config = &broker.shared.config;
        let mut reader = Reader {
            broker: broker.clone(),
            session,
            outbox,
            decoder: {
                let mut decoder = Decoder::new(config.limits());
                decoder.set_version(Version::V1_2);
                decoder
            },
            bytes: BytesMut::new(),
            batch: Vec::new(),
            frames: VecDeque::new(),
        };
        let mut connect = Frame::new(Command::Connect)
            .with_header("accept-version", "1.2")
            .with_header("host", "stoa");
        let handled = match &caller.0 {
            Some(identity) => reader
                .session
                .handle_authenticated(connect, identity.clone()),
            None => {
                if let Some(name) = name {
                    connect.headers.push("login", name);
                }
                reader.session.handle(connect)
            }
        };
        handled.map_err(|rejected| Refusal::from_session(&rejected.error))?;
        reader.take();
        match reader.frames.pop_front() {
            Some(frame) if frame.command == Command::Connected => Ok(reader),
            other => Err(Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("no CONNECTED for the reader: {other:?}"),
            )),
        }
    }

    /// Moves what the outbox holds into `frames`.
    fn take(&mut self) {
        while self.outbox.take_all(&mut self.batch) > 0 {
            for item in self.batch.drain(..) {
                compose(&item, &mut self.bytes);
            }
        }
        // The broker writes what it decodes: these frames are well formed.
        while let Ok(Some(frame)) = self.decoder.decode(&mut self.bytes) {
            self.frames.push_back(frame);
        }
        self.outbox.shrink();
    }

    /// Handles `frame` (which asks for `receipt`), and waits for that RECEIPT within the
    /// cluster timeout; frames before it stay in `frames`.
    async fn handle_until_receipt(
        &mut self,
        frame: Frame,
        receipt: &str,
    ) -> Result<Frame, Refusal> {
        let frame = frame.with_header("receipt", receipt);
        self.session
            .handle(frame)
            .map_err(|rejected| Refusal::from_session(&rejected.error))?;
        let deadline = Instant::now() + self.receipt_timeout();
        loop {
            self.take();
            if let Some(at) = self.frames.iter().position(|f| {
                f.command == Command::Receipt && f.header("receipt-id") == Some(receipt)
            }) {
                return Ok(self
                    .frames
                    .remove(at)
                    .unwrap_or_else(|| Frame::new(Command::Receipt)));
            }
            self.check_ended()?;
            if tokio::time::timeout_at(deadline, self.outbox.notified())
                .await
                .is_err()
            {
                return Err(Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cluster unavailable",
                ));
            }
        }
    }

    fn receipt_timeout(&self) -> Duration {
        match &self.broker.cluster {
            Some(cluster) => cluster.timeout() + Duration::from_secs(1),
            None => self.broker.shared.config.write_timeout(),
        }
    }

    /// An error once the session was asked to end, or its outbox overflowed (a reader that
    /// does not keep up).
    fn check_ended(&self) -> Result<(), Refusal> {
        if let Some(end) = self.outbox.ended() {
            return Err(Refusal::from_session(&SessionError::from(end)));
        }
        if self.outbox.is_slow() {
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "reader fell behind",
            ));
        }
        Ok(())
    }

    /// SUBSCRIBEs to `room` as a reader, with `replay` headers.
    async fn subscribe(
        &mut self,
        room: &str,
        since: Option<u64>,
        history: u64,
    ) -> Result<(), Refusal> {
        let replay = match since {
            Some(since) => ("x-since", since),
            None => ("x-history", history),
        };
        let subscribe = Frame::new(Command::Subscribe)
            .with_header("id", "0")
            .with_header("destination", &format!("/topic/room.{room}"))
            .with_header(replay.0, itoa::Buffer::new().format(replay.1));
        self.handle_until_receipt(subscribe, "subscribed").await?;
        Ok(())
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // Leaves the room (quietly: a reader) before the broker forgets the session.
        self.session.close();
        self.broker.close_session(self.session.id());
    }
}

/// A room message as the HTTP API shows it.
#[derive(Debug, Clone, PartialEq)]
enum Item {
    /// A kept message (chat, join, leave), with its `x-seq`.
    Kept(u64, Value),
    /// Messages up to `first_seq` are no longer kept.
    Gap(u64),
    /// A transient message (typing), not kept, no `x-seq`.
    Transient(Value),
}

/// Headers the JSON shape carries in fields of its own, or that belong to one delivery.
const OWN_HEADERS: &[&str] = &[
    "destination",
    "message-id",
    "subscription",
    "content-type",
    "content-length",
    "x-seq",
    "x-sender",
    "x-timestamp",
    "x-event",
    "x-replay",
    "ack",
];

/// A MESSAGE of room `room` as an [`Item`].
fn item(room: &str, frame: &Frame) -> Option<Item> {
    if frame.command != Command::Message {
        return None;
    }
    let event = frame.header("x-event").unwrap_or("message");
    if event == "gap" {
        let first = frame.header("x-first-seq")?.parse().ok()?;
        return Some(Item::Gap(first));
    }
    let seq = frame.header("x-seq").and_then(|s| s.parse::<u64>().ok());
    let mut message = Map::new();
    if let Some(seq) = seq {
        message.insert("seq".into(), json!(seq));
    }
    message.insert("room".into(), json!(room));
    message.insert("event".into(), json!(event));
    message.insert("sender".into(), json!(frame.header("x-sender")));
    let timestamp = frame
        .header("x-timestamp")
        .and_then(|t| t.parse::<u64>().ok());
    message.insert("timestamp".into(), json!(timestamp));
    message.insert("message_id".into(), json!(frame.header("message-id")));
    message.insert("content_type".into(), json!(frame.header("content-type")));
    match std::str::from_utf8(&frame.body) {
        Ok(text) => message.insert("body".into(), json!(text)),
        Err(_) => message.insert("body_base64".into(), json!(BASE64.encode(&frame.body))),
    };
    let headers: Map<String, Value> = frame
        .headers
        .iter()
        .filter(|(name, _)| !OWN_HEADERS.contains(name))
        .map(|(name, value)| (name.to_owned(), json!(value)))
        .collect();
    message.insert("headers".into(), Value::Object(headers));
    let message = Value::Object(message);
    Some(match seq {
        Some(seq) => Item::Kept(seq, message),
        None => Item::Transient(message),
    })
}

/// Query parameters, each a number or absent.
fn number(query: &[(String, String)], name: &str) -> Result<Option<u64>, Refusal> {
    match query.iter().find(|(n, _)| n == name) {
        None => Ok(None),
        Some((_, value)) => value
            .parse::<u64>()
            .map(Some)
            .map_err(|_| Refusal::bad_request(format!("{name} must be a number, not {value:?}"))),
    }
}

fn query_of(query: Option<&str>) -> Vec<(String, String)> {
    query
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// The sender's name in `--auth none`: `?name=`, else `X-Stoa-Name`.
fn asked_name(query: &[(String, String)], headers: &HeaderMap) -> Option<String> {
    query
        .iter()
        .find(|(n, _)| n == "name")
        .map(|(_, v)| v.clone())
        .or_else(|| {
            headers
                .get("x-stoa-name")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
}

fn checked_room(room: &str) -> Result<(), Refusal> {
    check_room_name(room).map_err(|e| Refusal::bad_request(e.to_string()))
}

/// `GET /api/rooms/<room>/messages?since=S&limit=N&wait=SECONDS`.
pub async fn get_messages(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    Path(room): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let query = query_of(query.as_deref());
    let info = SessionInfo::new(peer, "http-poll");
    match poll(&state, &caller, info, &room, query, &headers).await {
        Ok(body) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body.to_string(),
        )
            .into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

async fn poll(
    state: &AppState,
    caller: &Caller,
    info: SessionInfo,
    room: &str,
    query: Vec<(String, String)>,
    headers: &HeaderMap,
) -> Result<Value, Refusal> {
    checked_room(room)?;
    let since = number(&query, "since")?;
    let limit = match number(&query, "limit")? {
        None => DEFAULT_LIMIT,
        Some(0) => return Err(Refusal::bad_request("limit must be at least 1")),
        Some(n) => usize::try_from(n).unwrap_or(MAX_LIMIT).min(MAX_LIMIT),
    };
    let wait = number(&query, "wait")?.map(|s| Duration::from_secs(s.min(MAX_WAIT_SECS)));
    let name = asked_name(&query, headers);
    let mut reader = Reader::connect(&state.broker, caller, name.as_deref(), info)?;
    reader.subscribe(room, since, limit as u64).await?;
    let mut gap = None;
    let mut messages = Vec::new();
    let wanted = Wanted { room, since, limit };
    wanted.take(&mut reader, &mut gap, &mut messages);
    if let Some(wait) = wait.filter(|_| messages.is_empty()) {
        // Long polling: held until a kept message comes, or the time is up.
        let deadline = Instant::now() + wait;
        let mut shutdown = state.shutdown.clone();
        while messages.is_empty() {
            tokio::select! {
                timed_out = tokio::time::timeout_at(deadline, reader.outbox.notified()) => {
                    if timed_out.is_err() {
                        break;
                    }
                }
                _ = shutdown.changed() => break,
            }
            reader.check_ended()?;
            reader.take();
            wanted.take(&mut reader, &mut gap, &mut messages);
        }
    }
    let last_seq = match messages.last() {
        Some((seq, _)) => *seq,
        None => newest_seq(state, room).await.max(since.unwrap_or(0)),
    };
    let mut answer = json!({
        "room": room,
        "messages": messages.into_iter().map(|(_, m)| m).collect::<Vec<_>>(),
        "last_seq": last_seq,
    });
    if let Some(first) = gap {
        answer["gap"] = json!({ "first_seq": first });
    }
    Ok(answer)
}

/// What a poll asks for.
struct Wanted<'a> {
    room: &'a str,
    since: Option<u64>,
    limit: usize,
}

impl Wanted<'_> {
    /// Moves the reader's frames into the answer: the gap, and up to `limit` kept messages
    /// after `since` (transient ones are not kept: polls skip them).
    fn take(&self, reader: &mut Reader, gap: &mut Option<u64>, messages: &mut Vec<(u64, Value)>) {
        while let Some(frame) = reader.frames.pop_front() {
            match item(self.room, &frame) {
                Some(Item::Gap(first)) => *gap = Some(first),
                Some(Item::Kept(seq, message))
                    if self.since.is_none_or(|s| seq > s) && messages.len() < self.limit =>
                {
                    messages.push((seq, message));
                }
                _ => {}
            }
        }
    }
}

/// The room's newest `x-seq` (0 for a room with none).
async fn newest_seq(state: &AppState, room: &str) -> u64 {
    let app = &state.broker.shared.router.app;
    match app.detail_answer(room, None).await {
        Ok(Some(detail)) => detail.last_seq,
        _ => 0,
    }
}

/// `GET /api/rooms/<room>/events`: Server-Sent Events from `Last-Event-ID` (or `?since=`),
/// else from the last `?limit=` (100) kept messages, then live.
pub async fn events(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    Path(room): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let query = query_of(query.as_deref());
    let info = SessionInfo::new(peer, "sse");
    match open_events(&state, &caller, info, &room, query, &headers).await {
        Ok(body) => {
            let mut response = Response::new(body);
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            // nginx and friends: do not buffer the stream.
            headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
            response
        }
        Err(refusal) => refusal.into_response(),
    }
}

async fn open_events(
    state: &AppState,
    caller: &Caller,
    info: SessionInfo,
    room: &str,
    query: Vec<(String, String)>,
    headers: &HeaderMap,
) -> Result<Body, Refusal> {
    checked_room(room)?;
    let last_event = match headers.get("last-event-id") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| Refusal::bad_request("Last-Event-ID must be a number"))?,
        ),
    };
    let since = last_event.or(number(&query, "since")?);
    let limit = number(&query, "limit")?
        .unwrap_or(DEFAULT_LIMIT as u64)
        .min(MAX_LIMIT as u64);
    let name = asked_name(&query, headers);
    let mut reader = Reader::connect(&state.broker, caller, name.as_deref(), info)?;
    reader.subscribe(room, since, limit).await?;
    let keep_alive = Duration::from_millis(state.broker.shared.config.sse_keepalive_ms);
    let stream_state = Streaming {
        reader,
        room: room.to_owned(),
        since: since.unwrap_or(0),
        keep_alive,
        shutdown: state.shutdown.clone(),
        first: true,
    };
    let events = stream::unfold(stream_state, |mut s| async move {
        let chunk = s.next_chunk().await?;
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(chunk)), s))
    });
    Ok(Body::from_stream(events))
}

/// One SSE stream's state.
struct Streaming {
    reader: Reader,
    room: String,
    /// Kept messages up to this `x-seq` were sent (or were before `Last-Event-ID`).
    since: u64,
    keep_alive: Duration,
    shutdown: watch::Receiver<bool>,
    first: bool,
}

impl Streaming {
    /// The next events (or a keep-alive comment); `None` when the stream ends.
    async fn next_chunk(&mut self) -> Option<String> {
        if self.first {
            self.first = false;
            // EventSource reconnects after this many milliseconds (it sends Last-Event-ID).
            return Some("retry: 1000\n\n".to_owned());
        }
        loop {
            let mut chunk = String::new();
            while let Some(frame) = self.reader.frames.pop_front() {
                match item(&self.room, &frame) {
                    Some(Item::Gap(first)) => {
                        chunk.push_str(&format!(
                            "event: gap\ndata: {}\n\n",
                            json!({ "first_seq": first })
                        ));
                    }
                    Some(Item::Kept(seq, message)) if seq > self.since => {
                        self.since = seq;
                        let event = message["event"].as_str().unwrap_or("message").to_owned();
                        chunk.push_str(&format!("id: {seq}\nevent: {event}\ndata: {message}\n\n"));
                    }
                    Some(Item::Transient(message)) => {
                        chunk.push_str(&format!("event: transient\ndata: {message}\n\n"));
                    }
                    _ => {}
                }
            }
            if !chunk.is_empty() {
                return Some(chunk);
            }
            if self.reader.check_ended().is_err() || *self.shutdown.borrow() {
                // The client reconnects with Last-Event-ID and misses nothing.
                return None;
            }
            tokio::select! {
                () = self.reader.outbox.notified() => self.reader.take(),
                () = tokio::time::sleep(self.keep_alive) => return Some(": keep-alive\n\n".to_owned()),
                _ = self.shutdown.changed() => return None,
            }
        }
    }
}

/// SEND headers the API sets itself: a message's own would redirect it, hold it in a
/// transaction, or take the receipt the request waits for.
const SET_BY_THE_API: &[&str] = &["destination", "receipt", "transaction", "content-length"];

/// `POST /api/rooms/<room>/messages`: `{"body":"...","headers":{...}}` as JSON, or any other
/// body as the message body with its `Content-Type`; 201 `{"seq":N,"message_id":"..."}` once
/// the message is kept and delivered.
pub async fn post_message(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    Path(room): Path<String>,
    request: Request,
) -> Response {
    let info = SessionInfo::new(peer, "http-post");
    match send(&state, &caller, info, &room, request).await {
        Ok(body) => (
            StatusCode::CREATED,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

async fn send(
    state: &AppState,
    caller: &Caller,
    info: SessionInfo,
    room: &str,
    request: Request,
) -> Result<Value, Refusal> {
    checked_room(room)?;
    let query = query_of(request.uri().query());
    let name = asked_name(&query, request.headers());
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let limit = state.broker.shared.config.max_body_bytes;
    let body = axum::body::to_bytes(request.into_body(), limit.saturating_add(64 * 1024))
        .await
        .map_err(|_| {
            Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a body over {limit} bytes"),
            )
        })?;
    let mut frame =
        Frame::new(Command::Send).with_header("destination", &format!("/topic/room.{room}"));
    let is_json = content_type.as_deref().is_some_and(|t| {
        t.split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
    });
    let wrapped = is_json
        .then(|| serde_json::from_slice::<Value>(&body).ok())
        .flatten()
        .filter(|v| v.get("body").is_some_and(Value::is_string));
    match wrapped {
        Some(message) => {
            if let Some(headers) = message.get("headers").and_then(Value::as_object) {
                for (name, value) in headers {
                    let value = value.as_str().ok_or_else(|| {
                        Refusal::bad_request(format!("header {name:?} must be a string"))
                    })?;
                    if SET_BY_THE_API.contains(&name.as_str()) {
                        return Err(Refusal::bad_request(format!(
                            "header {name:?} is set by the API, not the message"
                        )));
                    }
                    frame.headers.push(name, value);
                }
            }
            if !frame.headers.contains("content-type") {
                frame
                    .headers
                    .push("content-type", "text/plain;charset=utf-8");
            }
            let text = message["body"].as_str().unwrap_or_default();
            frame.body = Bytes::copy_from_slice(text.as_bytes());
        }
        None => {
            if let Some(content_type) = &content_type {
                frame.headers.push("content-type", content_type);
            }
            frame.body = body;
        }
    }
    if frame.body.len() > limit {
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a body over {limit} bytes"),
        ));
    }
    let mut reader = Reader::connect(&state.broker, caller, name.as_deref(), info)?;
    let receipt = reader.handle_until_receipt(frame, "sent").await?;
    let seq = receipt.header("x-seq").and_then(|s| s.parse::<u64>().ok());
    Ok(json!({ "seq": seq, "message_id": receipt.header("message-id") }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(headers: &[(&str, &str)], body: &'static [u8]) -> Frame {
        let mut frame = Frame::new(Command::Message).with_body(Bytes::from_static(body));
        for (name, value) in headers {
            frame.headers.push(name, value);
        }
        frame
    }

    #[test]
    fn a_kept_message_has_the_one_json_shape() {
        let frame = message(
            &[
                ("subscription", "0"),
                ("destination", "/topic/room.lobby"),
                ("message-id", "77"),
                ("content-type", "text/plain"),
                ("x-custom", "v"),
                ("x-sender", "alice"),
                ("x-timestamp", "1733390000000"),
                ("x-seq", "42"),
            ],
            b"hello",
        );
        let expected = json!({
            "seq": 42, "room": "lobby", "event": "message", "sender": "alice",
            "timestamp": 1_733_390_000_000_u64, "message_id": "77", "content_type": "text/plain",
            "body": "hello", "headers": { "x-custom": "v" },
        });
        assert_eq!(item("lobby", &frame), Some(Item::Kept(42, expected)));
    }

    #[test]
    fn bodies_that_are_not_utf8_come_as_base64() {
        let frame = message(&[("x-seq", "1")], b"\xff\x00");
        let Some(Item::Kept(_, value)) = item("r", &frame) else {
            panic!("a kept message");
        };
        assert_eq!(value["body_base64"], "/wA=");
        assert!(value.get("body").is_none());
    }

    #[test]
    fn gaps_and_transients_are_told_apart() {
        let gap = message(&[("x-event", "gap"), ("x-first-seq", "5")], b"");
        assert_eq!(item("r", &gap), Some(Item::Gap(5)));
        let typing = message(&[("x-sender", "bob"), ("x-transient", "true")], b"typing");
        assert!(matches!(item("r", &typing), Some(Item::Transient(_))));
    }
}
