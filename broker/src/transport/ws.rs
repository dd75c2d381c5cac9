//! STOMP over WebSocket (axum's upgrade on tokio-tungstenite).
//!
//! In: an upgraded [`WebSocket`]. Out: text and binary message payloads appended to the
//! read buffer; each outgoing frame sent as one message (text when it is UTF-8, binary
//! otherwise), flushed once per batch.

use std::io;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::{Bytes, BytesMut};
use futures_util::SinkExt;
use stomp_codec::Version;
use tokio_tungstenite::tungstenite;

use crate::connection::{CloseKind, LINGER, Transport, TransportError, compose};
use crate::outbox::Outgoing;
use crate::session::SessionError;

/// Picks the highest STOMP version among the subprotocols a client offers.
pub fn choose_subprotocol<'a>(offered: impl Iterator<Item = &'a str>) -> Option<Version> {
    offered.filter_map(Version::from_subprotocol).max()
}

/// A WebSocket connection.
pub struct WsTransport {
    socket: WebSocket,
    scratch: BytesMut,
    max_message_bytes: usize,
}

impl WsTransport {
    /// Wraps an upgraded socket whose messages are capped at `max_message_bytes`.
    pub fn new(socket: WebSocket, max_message_bytes: usize) -> WsTransport {
        WsTransport {
            socket,
            scratch: BytesMut::new(),
            max_message_bytes,
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

fn classify(error: axum::Error, max_message_bytes: usize) -> TransportError {
    tracing::debug!("websocket read error: {error:?}");
    match error.into_inner().downcast::<tungstenite::Error>() {
        Ok(e) => match *e {
            tungstenite::Error::Capacity(_) => {
                TransportError::Protocol(SessionError::WebSocketMessageTooLarge(max_message_bytes))
            }
            tungstenite::Error::Utf8(_) => {
                TransportError::Protocol(SessionError::WebSocketTextNotUtf8)
            }
            tungstenite::Error::Io(io) => TransportError::Io(io),
            other => TransportError::Io(io::Error::other(other)),
        },
        Err(other) => TransportError::Io(io::Error::other(other)),
    }
}

impl Transport for WsTransport {
    async fn read(&mut self, buf: &mut BytesMut) -> Result<bool, TransportError> {
        // recv is cancel safe: tungstenite keeps a partly read message in its own buffer.
        match self.socket.recv().await {
            Some(Ok(Message::Text(text))) => buf.extend_from_slice(text.as_bytes()),
            Some(Ok(Message::Binary(bytes))) => buf.extend_from_slice(&bytes),
            // Pings are answered by tungstenite; like pongs they show the peer is alive.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Close(_))) | None => return Ok(false),
            Some(Err(e)) => return Err(classify(e, self.max_message_bytes)),
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
            CloseKind::Normal => (1000, ""),
            CloseKind::Error => (1002, "STOMP error"),
            CloseKind::Shutdown => (1001, "server shutting down"),
        };
        let close = Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }));
        if self.socket.send(close).await.is_err() {
            return;
        }
        // Wait for the peer's Close so that the last frames are read before the TCP close.
        let _ = tokio::time::timeout(LINGER, async {
            while let Some(Ok(message)) = self.socket.recv().await {
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
