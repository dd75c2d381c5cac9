//! STOMP over SockJS: a SockJS session as a byte transport, and the service that opens a
//! STOMP connection for each new session under `/ws`.
//!
//! In: the session's client messages (each appended to the read buffer, so a frame may span
//! several messages and one message may hold several frames). Out: each outgoing frame as
//! one SockJS message.
//!
//! SockJS carries text only: a frame whose body is not UTF-8 goes out with its invalid bytes
//! replaced (U+FFFD), as through any text-only channel (docs/PROTOCOL.md).

use std::io;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::auth::Mode;
use crate::connection::{self, Arrival, CloseKind, Transport, TransportError, compose};
use crate::error::SessionError;
use crate::outbox::Outgoing;
use crate::sockjs::{Channel, Close, Opened, Service};
use crate::state::Broker;

/// A SockJS session under a STOMP connection.
pub struct SockJsTransport {
    channel: Channel,
    scratch: BytesMut,
}

impl SockJsTransport {
    /// Wraps the application's end of a session.
    pub fn new(channel: Channel) -> SockJsTransport {
        SockJsTransport {
            channel,
            scratch: BytesMut::new(),
        }
    }
}

/// An I/O error for a session that ended under a write.
fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the SockJS session is closed")
}

impl Transport for SockJsTransport {
    async fn read(&mut self, buf: &mut BytesMut) -> Result<bool, TransportError> {
        match self.channel.recv().await {
            Some(messages) => {
                for message in messages {
                    buf.extend_from_slice(message.as_bytes());
                }
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn write(&mut self, batch: &[Outgoing]) -> io::Result<()> {
        // Every frame into the one scratch buffer, then each read in place as text (a copy
        // only for the rare frame that is not UTF-8).
        let mut ends = Vec::with_capacity(batch.len());
        for item in batch {
            compose(item, &mut self.scratch);
            ends.push(self.scratch.len());
        }
        let bytes = self.scratch.split();
        let mut start = 0;
        let texts: Vec<std::borrow::Cow<'_, str>> = ends
            .into_iter()
            .map(|end| {
                let text = String::from_utf8_lossy(&bytes[start..end]);
                start = end;
                text
            })
            .collect();
        let texts: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        self.channel.send(&texts).await.map_err(|_| closed())
    }

    async fn write_discarding(&mut self, batch: &[Outgoing]) -> io::Result<()> {
        // The client's messages wait in the session, bounded: nothing to drain here.
        self.write(batch).await
    }

    async fn heart_beat(&mut self) -> io::Result<()> {
        self.channel.send(&["\n"]).await.map_err(|_| closed())
    }

    async fn close(&mut self, kind: CloseKind) {
        let close = match kind {
            CloseKind::Normal => Close::new(3000, "Go away!"),
            CloseKind::Error => Close::new(3001, "STOMP error"),
            CloseKind::Shutdown => Close::new(3002, "server shutting down"),
        };
        // Queued frames still go to the client before the close frame.
        self.channel.close(close);
    }

    fn shrink(&mut self) {
        self.scratch = BytesMut::new();
    }
}

/// Opens a STOMP connection for each SockJS session under `/ws`.
pub struct StompService {
    /// The broker.
    pub broker: Arc<Broker>,
    /// Fires once at shutdown.
    pub shutdown: watch::Receiver<bool>,
    /// Tracks sessions so shutdown can wait for them.
    pub tracker: TaskTracker,
}

impl Service for StompService {
    fn open(&self, channel: Channel, opened: Opened) {
        let broker = self.broker.clone();
        let shutdown = self.shutdown.clone();
        let ticket = broker.admission.admit(opened.peer.ip());
        // Only `--auth jwt` reads it: `access_token` in the query (a page cannot set headers
        // on SockJS requests) or `Authorization: Bearer`.
        let bearer = (broker.auth.mode() == Mode::Jwt)
            .then(|| crate::http::bearer_token(&opened.headers, &opened.uri))
            .flatten();
        self.tracker.spawn(async move {
            let transport = SockJsTransport::new(channel);
            let Ok(ticket) = ticket else {
                let timeout = broker.shared.config.write_timeout();
                connection::refuse(transport, SessionError::ServerBusy, timeout).await;
                return;
            };
            let arrival = Arrival {
                bearer,
                ticket,
                ..Arrival::new(opened.peer, opened.transport)
            };
            connection::serve(transport, broker, shutdown, arrival).await;
        });
    }
}
