//! STOMP over WebSocket: the upgrade (RFC 6455 handshake, subprotocol choice) and
//! tokio-tungstenite on the upgraded connection.
//!
//! In: an HTTP upgrade request, then the upgraded connection. Out: text and binary message
//! payloads appended to the read buffer; each outgoing frame sent as one message (text when
//! it is UTF-8, binary otherwise), flushed once per batch.
//!
//! The upgrade is done here rather than by axum's extractor so that the transport keeps the
//! raw connection under the WebSocket: after a read error (a text message that is not
//! UTF-8, an oversized message) tungstenite reads nothing more, and the broker must still
//! read and discard what the client sends after its ERROR, or the kernel resets the
//! connection and the client may lose the ERROR (DESIGN.md "Errors and limits").

use std::io;
use std::task::Poll;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use stomp_codec::Version;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};

use crate::connection::{CloseKind, LINGER, Transport, TransportError, compose};
use crate::error::SessionError;
use crate::outbox::Outgoing;

use crate::transport::tcp::discard_input;

/// Picks the highest STOMP version among the subprotocols a client offers.
pub fn choose_subprotocol<'a>(offered: impl Iterator<Item = &'a str>) -> Option<Version> {
    offered.filter_map(Version::from_subprotocol).max()
}

/// The subprotocols a request offers, each trimmed (`Sec-WebSocket-Protocol` may be
/// repeated and holds a comma-separated list).
fn offered_subprotocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// An accepted upgrade: the `101 Switching Protocols` to answer with, and the connection
/// that follows it.
pub struct Upgrade {
    /// The response to send.
    pub response: Response<Body>,
    /// Resolves to the upgraded connection once the response is sent.
    pub on_upgrade: OnUpgrade,
}

/// Why an upgrade request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The status to answer with.
    pub status: StatusCode,
    /// Why, for the response's body.
    pub reason: &'static str,
}

impl Refused {
    /// The HTTP answer (426 names the WebSocket version spoken).
    pub fn response(self) -> Response<Body> {
        let mut response = Response::new(Body::from(self.reason));
        *response.status_mut() = self.status;
        if self.status == StatusCode::UPGRADE_REQUIRED {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        response
    }
}

/// Checks a WebSocket upgrade request (RFC 6455 section 4.2.1) and answers it, echoing the
/// highest STOMP subprotocol offered (a browser that offered some and gets none back fails
/// the handshake; a client that offered none, Spring's default, is accepted without one).
///
/// # Errors
/// What to answer instead: 400 for a request that is no WebSocket upgrade, 405 for another
/// method, 426 for another WebSocket version.
pub fn accept<B>(request: &mut Request<B>) -> Result<Upgrade, Refused> {
    let refuse = |status: StatusCode, reason: &'static str| Refused { status, reason };
    let headers = request.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if request.method() != Method::GET {
        return Err(refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "a WebSocket upgrade is a GET\n",
        ));
    }
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "this is a WebSocket endpoint: send Connection: Upgrade and Upgrade: websocket\n",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(refuse(
            StatusCode::UPGRADE_REQUIRED,
            "only WebSocket version 13 is spoken here\n",
        ));
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "a WebSocket upgrade needs Sec-WebSocket-Key\n",
        ));
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let chosen = choose_subprotocol(offered_subprotocols(headers));
    let Some(on_upgrade) = request.extensions_mut().remove::<OnUpgrade>() else {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "this connection cannot be upgraded\n",
        ));
    };
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let out = response.headers_mut();
    out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    out.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        out.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(version) = chosen {
        out.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(version.subprotocol()),
        );
    }
    Ok(Upgrade {
        response,
        on_upgrade,
    })
}

/// The WebSocket settings of a STOMP connection: reads of `read_buffer_bytes`, messages
/// (and WebSocket frames) of at most `max_message_bytes`.
pub fn config(read_buffer_bytes: usize, max_message_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer_bytes)
        .write_buffer_size(64 * 1024)
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes))
}

/// A server WebSocket on an upgraded connection.
pub type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// The server side of the WebSocket on an upgraded connection.
pub async fn open(upgraded: Upgraded, config: WebSocketConfig) -> Socket {
    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await
}

/// Messages read and dropped per poll while the last frames are written, before writing
/// gets its turn.
const DISCARD_MESSAGES_PER_POLL: usize = 16;

/// A WebSocket connection.
pub struct WsTransport {
    socket: Socket,
    scratch: BytesMut,
    max_message_bytes: usize,
    /// tungstenite stopped reading after an error: what comes next is read raw.
    broken: bool,
}

impl WsTransport {
    /// Wraps an upgraded socket whose messages are capped at `max_message_bytes`.
    pub fn new(socket: Socket, max_message_bytes: usize) -> WsTransport {
        WsTransport {
            socket,
            scratch: BytesMut::new(),
            max_message_bytes,
            broken: false,
        }
    }

    fn message(&mut self, item: &Outgoing) -> Message {
        let (payload, text) = match item {
            Outgoing::Frame(bytes) => (bytes.clone(), true),
            Outgoing::Message { text, .. } => {
                compose(item, &mut self.scratch);
                (self.scratch.split().freeze(), *text)
            }
        };
        as_message(payload, text)
    }
}

/// Text when the payload is UTF-8 (browsers hand text to stomp.js as a string), binary
/// otherwise: a non-UTF-8 body in a text message would break the browser's connection.
fn as_message(payload: Bytes, text: bool) -> Message {
    if text {
        match Utf8Bytes::try_from(payload.clone()) {
            Ok(text) => Message::Text(text),
            Err(_) => Message::Binary(payload),
        }
    } else {
        Message::Binary(payload)
    }
}

fn classify(error: tungstenite::Error, max_message_bytes: usize) -> TransportError {
    tracing::debug!("websocket read error: {error:?}");
    match error {
        tungstenite::Error::Capacity(_) => {
            TransportError::Protocol(SessionError::WebSocketMessageTooLarge(max_message_bytes))
        }
        tungstenite::Error::Utf8(_) => TransportError::Protocol(SessionError::WebSocketTextNotUtf8),
        tungstenite::Error::Io(io) => TransportError::Io(io),
        other => TransportError::Io(io::Error::other(other)),
    }
}

impl Transport for WsTransport {
    async fn read(&mut self, buf: &mut BytesMut) -> Result<bool, TransportError> {
        // next() is cancel safe: tungstenite keeps a partly read message in its own buffer.
        match self.socket.next().await {
            Some(Ok(Message::Text(text))) => buf.extend_from_slice(text.as_bytes()),
            Some(Ok(Message::Binary(bytes))) => buf.extend_from_slice(&bytes),
            // Pings are answered by tungstenite; like pongs they show the peer is alive.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Ok(Message::Close(_))) | None => return Ok(false),
            Some(Err(e)) => {
                self.broken = true;
                return Err(classify(e, self.max_message_bytes));
            }
        }
        Ok(true)
    }

    async fn write(&mut self, batch: &[Outgoing]) -> io::Result<()> {
        for item in batch {
            let message = self.message(item);
            self.socket.feed(message).await.map_err(io::Error::other)?;
        }
        self.socket.flush().await.map_err(io::Error::other)
    }

    async fn write_discarding(&mut self, batch: &[Outgoing]) -> io::Result<()> {
        let mut messages = batch
            .iter()
            .map(|item| self.message(item))
            .collect::<Vec<_>>()
            .into_iter();
        let mut next = messages.next();
        let mut sink = [0u8; 4096];
        let mut input_done = false;
        let (socket, broken) = (&mut self.socket, &mut self.broken);
        std::future::poll_fn(|cx| {
            let mut reads = 0;
            while !*broken && !input_done {
                if reads == DISCARD_MESSAGES_PER_POLL {
                    // More may be waiting, with no wake-up to come: poll again soon.
                    cx.waker().wake_by_ref();
                    break;
                }
                reads += 1;
                match socket.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(_))) => {}
                    // tungstenite reads no more after an error: the rest is read raw.
                    Poll::Ready(Some(Err(_))) => *broken = true,
                    Poll::Ready(None) => input_done = true,
                    Poll::Pending => break,
                }
            }
            if *broken {
                discard_input(socket.get_mut(), cx, &mut sink, &mut input_done);
            }
            while let Some(message) = next.take() {
                match socket.poll_ready_unpin(cx) {
                    Poll::Ready(Ok(())) => {
                        socket.start_send_unpin(message).map_err(io::Error::other)?;
                        next = messages.next();
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                    Poll::Pending => {
                        next = Some(message);
                        return Poll::Pending;
                    }
                }
            }
            socket.poll_flush_unpin(cx).map_err(io::Error::other)
        })
        .await
    }

    fn shrink(&mut self) {
        // What is left of the scratch block would otherwise stay allocated while idle.
        self.scratch = BytesMut::new();
    }

    async fn heart_beat(&mut self) -> io::Result<()> {
        self.socket
            .send(Message::Text(Utf8Bytes::from_static("\n")))
            .await
            .map_err(io::Error::other)
    }

    async fn close(&mut self, kind: CloseKind) {
        let (code, reason) = match kind {
            CloseKind::Normal => (CloseCode::Normal, ""),
            CloseKind::Error => (CloseCode::Protocol, "STOMP error"),
            CloseKind::Shutdown => (CloseCode::Away, "server shutting down"),
        };
        let close = Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }));
        if self.socket.send(close).await.is_err() {
            return;
        }
        let socket = &mut self.socket;
        let broken = self.broken;
        // Wait for the peer's Close so that the last frames are read before the TCP close;
        // meanwhile whatever the peer sends is read and dropped, so that the kernel does not
        // reset the connection over unread input.
        let _ = tokio::time::timeout(LINGER, async {
            if broken {
                // tungstenite reads nothing after an error: drain the connection under it
                // until the peer closes it.
                let mut sink = [0u8; 4096];
                while let Ok(n) = socket.get_mut().read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
                return;
            }
            while let Some(Ok(message)) = socket.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_highest_offered_version_wins_whatever_the_order() {
        let pick = |offer: &[&str]| choose_subprotocol(offer.iter().copied());
        assert_eq!(
            pick(&["v10.stomp", "v12.stomp", "v11.stomp"]),
            Some(Version::V1_2)
        );
        assert_eq!(pick(&["v11.stomp", "v10.stomp"]), Some(Version::V1_1));
        assert_eq!(pick(&["mqtt", "v10.stomp"]), Some(Version::V1_0));
        assert_eq!(pick(&["mqtt"]), None);
        assert_eq!(pick(&[]), None);
    }

    #[test]
    fn offered_subprotocols_are_split_and_trimmed_across_repeated_headers() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("mqtt, v11.stomp"),
        );
        headers.append(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("v10.stomp"),
        );
        let offered: Vec<&str> = offered_subprotocols(&headers).collect();
        assert_eq!(offered, ["mqtt", "v11.stomp", "v10.stomp"]);
    }

    #[test]
    fn bodies_that_are_not_utf8_go_out_as_binary() {
        assert!(matches!(
            as_message(Bytes::from_static(b"MESSAGE\n\nhi\0"), true),
            Message::Text(_)
        ));
        assert!(matches!(
            as_message(Bytes::from_static(b"MESSAGE\n\n\xff\0"), false),
            Message::Binary(_)
        ));
        assert!(matches!(
            as_message(Bytes::from_static(b"\xff"), true),
            Message::Binary(_)
        ));
    }
}
