//! An async STOMP client for Stoa and any other STOMP 1.0-1.2 broker, over `ws://`, `wss://`,
//! `tcp://` and `tcp+tls://`.
//!
//! One background task owns the connection: it sends what the [`Client`] asks, hands
//! MESSAGEs to each [`Subscription`]'s stream, completes receipts, keeps heart-beats both
//! ways, notices a silent server, and (if asked) reconnects with exponential backoff and
//! jitter, subscribing everything again. For chat rooms (`/topic/room.<room>`) it resumes
//! after the last `x-seq` it delivered with `x-since`, so a dropped connection loses nothing
//! the room still keeps. Given several URLs ([`Client::connect_any`], the nodes of one
//! cluster behind no load balancer, say), it connects to the first that answers and, when
//! the connection is lost, tries the same one again and then the others in turn.
//!
//! ```no_run
//! use client::{Client, Options, SubscribeOptions};
//! use futures_util::StreamExt;
//!
//! # async fn run() -> Result<(), client::ClientError> {
//! let client = Client::connect("ws://127.0.0.1:8080/ws", Options::new().login("alice")).await?;
//! let mut room = client
//!     .subscribe("/topic/room.lobby", SubscribeOptions::new().header("x-history", "20"))
//!     .await?;
//! client.send_with_receipt("/topic/room.lobby", "hello, world").await?;
//! while let Some(message) = room.next().await {
//!     println!("{}: {}", message.header("x-sender").unwrap_or("?"), message.text());
//! }
//! client.disconnect().await?;
//! # Ok(())
//! # }
//! ```

mod driver;
mod transport;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use stomp_codec::{Command, Frame, HeartBeat, Version};
use tokio::sync::{mpsc, oneshot};

pub use transport::{Endpoint, TlsOptions};

/// What went wrong.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The URL is not one this client understands.
    #[error("invalid url {0}")]
    InvalidUrl(String),
    /// Nothing accepted the connection.
    #[error("connection refused: {0}")]
    ConnectionRefused(String),
    /// TLS failed.
    #[error("tls: {0}")]
    Tls(String),
    /// The broker sent an ERROR frame.
    #[error("broker error: {message}")]
    Broker {
        /// The ERROR's `message` header.
        message: String,
        /// The ERROR's body, as text.
        details: String,
    },
    /// Something did not happen in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// The broker broke the protocol (or nothing came from it for too long).
    #[error("protocol violation by the broker: {0}")]
    Protocol(String),
    /// The socket failed.
    #[error("i/o: {0}")]
    Io(Arc<std::io::Error>),
    /// The client is closed (after `disconnect`, or a failure without reconnection).
    #[error("the connection is closed")]
    Closed,
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> ClientError {
        ClientError::Io(Arc::new(e))
    }
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct Options {
    /// CONNECT's `login`.
    pub login: Option<String>,
    /// CONNECT's `passcode`.
    pub passcode: Option<String>,
    /// CONNECT's `host` (a virtual host); not sent when unset, as stomp.js and Spring do,
    /// because RabbitMQ reads it as a virtual host name (`/` by default).
    pub host: Option<String>,
    /// Versions offered in `accept-version`.
    pub versions: Vec<Version>,
    /// Heart-beats offered: send every `send_ms`, want one every `receive_ms`.
    pub heart_beat: HeartBeat,
    /// More CONNECT headers.
    pub headers: Vec<(String, String)>,
    /// Reconnect after a lost connection, and how.
    pub reconnect: Option<Backoff>,
    /// How long connecting and each receipt may take.
    pub timeout: Duration,
    /// TLS trust.
    pub tls: TlsOptions,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            login: None,
            passcode: None,
            host: None,
            versions: Version::ALL.to_vec(),
            heart_beat: HeartBeat {
                send_ms: 10_000,
                receive_ms: 10_000,
            },
            headers: Vec::new(),
            reconnect: None,
            timeout: Duration::from_secs(10),
            tls: TlsOptions::default(),
        }
    }
}

impl Options {
    /// The defaults: all versions, 10 s heart-beats both ways, no reconnection.
    pub fn new() -> Options {
        Options::default()
    }

    /// Sets `login`.
    #[must_use]
    pub fn login(mut self, login: impl Into<String>) -> Options {
        self.login = Some(login.into());
        self
    }

    /// Sets `passcode`.
    #[must_use]
    pub fn passcode(mut self, passcode: impl Into<String>) -> Options {
        self.passcode = Some(passcode.into());
        self
    }

    /// Sets `host`.
    #[must_use]
    pub fn host(mut self, host: impl Into<String>) -> Options {
        self.host = Some(host.into());
        self
    }

    /// Offers only these versions.
    #[must_use]
    pub fn versions(mut self, versions: &[Version]) -> Options {
        self.versions = versions.to_vec();
        self
    }

    /// Sets the heart-beats offered, in ms (0 for none).
    #[must_use]
    pub fn heart_beat(mut self, send_ms: u64, receive_ms: u64) -> Options {
        self.heart_beat = HeartBeat {
            send_ms,
            receive_ms,
        };
        self
    }

    /// Adds a CONNECT header.
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Options {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Reconnects after a lost connection.
    #[must_use]
    pub fn reconnect(mut self, backoff: Backoff) -> Options {
        self.reconnect = Some(backoff);
        self
    }

    /// Sets the connect and receipt timeout.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Options {
        self.timeout = timeout;
        self
    }

    /// Trusts a DER certificate (a private CA or a self-signed server) for TLS.
    #[must_use]
    pub fn trust_der(mut self, der: Vec<u8>) -> Options {
        self.tls.extra_roots.push(der);
        self
    }
}

/// Exponential backoff with jitter between reconnection attempts.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
    /// Attempts before giving up; `None` for never.
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(15),
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// The delay before attempt `n` (0-based): `initial * 2^n`, at most `max`, then a
    /// random part of up to a half of it added so that many clients do not return at once.
    pub fn delay(&self, attempt: u32, random: u64) -> Duration {
        let base = self
            .initial
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max);
        let half = u64::try_from(base.as_millis() / 2)
            .unwrap_or(u64::MAX)
            .max(1);
        base + Duration::from_millis(random % half)
    }
}

/// A SUBSCRIBE's settings.
#[derive(Debug, Clone, Default)]
pub struct SubscribeOptions {
    /// `auto` (unset), `client` or `client-individual`.
    pub ack: Option<String>,
    /// More SUBSCRIBE headers (`x-history`, `x-since`, `prefetch-count`, ...).
    pub headers: Vec<(String, String)>,
}

impl SubscribeOptions {
    /// Auto-acknowledged, no extra headers.
    pub fn new() -> SubscribeOptions {
        SubscribeOptions::default()
    }

    /// Sets the ack mode (`auto`, `client`, `client-individual`).
    #[must_use]
    pub fn ack(mut self, mode: impl Into<String>) -> SubscribeOptions {
        self.ack = Some(mode.into());
        self
    }

    /// Adds a SUBSCRIBE header.
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> SubscribeOptions {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// A received MESSAGE.
#[derive(Debug, Clone)]
pub struct Message {
    /// The whole frame.
    pub frame: Frame,
}

impl Message {
    /// A header's first value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.frame.header(name)
    }

    /// Every header, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.frame.headers.iter()
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.frame.body
    }

    /// The body as text (lossy for bodies that are not UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.frame.body).into_owned()
    }

    /// `destination`.
    pub fn destination(&self) -> &str {
        self.header("destination").unwrap_or_default()
    }
}

/// What the handle asks of the driver.
#[derive(Debug)]
pub(crate) enum Request {
    Frame {
        frame: Box<Frame>,
        done: Option<oneshot::Sender<Result<Frame, ClientError>>>,
    },
    Subscribe {
        id: String,
        destination: String,
        options: SubscribeOptions,
        messages: mpsc::UnboundedSender<Message>,
        done: oneshot::Sender<Result<Frame, ClientError>>,
    },
    Unsubscribe {
        id: String,
        done: oneshot::Sender<Result<Frame, ClientError>>,
    },
    Disconnect {
        done: oneshot::Sender<Result<Frame, ClientError>>,
    },
}

/// A connected client. Cheap to clone; every clone drives the same connection.
#[derive(Debug, Clone)]
pub struct Client {
    requests: mpsc::UnboundedSender<Request>,
    next_id: Arc<AtomicU64>,
    timeout: Duration,
    info: Arc<ConnectedInfo>,
}

/// What CONNECTED said.
#[derive(Debug, Clone)]
pub struct ConnectedInfo {
    /// The negotiated version.
    pub version: Version,
    /// CONNECTED's headers.
    pub headers: HashMap<String, String>,
}

impl Client {
    /// Connects and waits for CONNECTED.
    ///
    /// # Errors
    /// The URL is wrong, nothing listens, TLS fails, the broker answers ERROR, or CONNECTED
    /// does not come within the timeout.
    pub async fn connect(url: &str, options: Options) -> Result<Client, ClientError> {
        Client::connect_any(&[url], options).await
    }

    /// Connects to the first of `urls` that accepts, in order, and waits for CONNECTED.
    /// Reconnecting (with [`Options::reconnect`]) tries the URL it was on first, then the
    /// next ones, round and round: attempt `n` goes to the `n`-th URL after it, and waits
    /// as the backoff says for round `n / urls.len()`.
    ///
    /// # Errors
    /// A URL is wrong, or none answered CONNECTED: the last one's failure. No URL at all is
    /// [`ClientError::InvalidUrl`].
    pub async fn connect_any(urls: &[&str], options: Options) -> Result<Client, ClientError> {
        let endpoints = urls
            .iter()
            .map(|url| Endpoint::parse(url))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(ClientError::InvalidUrl("no URL given".to_owned()));
        }
        let timeout = options.timeout;
        let (requests, info) = driver::start(endpoints, options).await?;
        Ok(Client {
            requests,
            next_id: Arc::new(AtomicU64::new(0)),
            timeout,
            info: Arc::new(info),
        })
    }

    /// The first CONNECTED's version and headers.
    pub fn connected(&self) -> &ConnectedInfo {
        &self.info
    }

    fn id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn request(&self, request: Request) -> Result<(), ClientError> {
        self.requests.send(request).map_err(|_| ClientError::Closed)
    }

    async fn wait(
        &self,
        what: &str,
        done: oneshot::Receiver<Result<Frame, ClientError>>,
    ) -> Result<Frame, ClientError> {
        match tokio::time::timeout(self.timeout, done).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout(what.to_owned())),
        }
    }

    /// Sends `frame` as it is; with `receipt`, waits for the RECEIPT.
    ///
    /// # Errors
    /// The client is closed; with a receipt, the broker's ERROR or a timeout.
    pub async fn send_frame(
        &self,
        mut frame: Frame,
        receipt: bool,
    ) -> Result<Option<Frame>, ClientError> {
        if !receipt {
            self.request(Request::Frame {
                frame: Box::new(frame),
                done: None,
            })?;
            return Ok(None);
        }
        let id = self.id("r");
        frame.headers.set("receipt", &id);
        let (done, wait) = oneshot::channel();
        self.request(Request::Frame {
            frame: Box::new(frame),
            done: Some(done),
        })?;
        self.wait(&format!("receipt {id}"), wait).await.map(Some)
    }

    /// SEND without waiting for anything.
    ///
    /// # Errors
    /// The client is closed.
    pub async fn send(&self, destination: &str, body: impl Into<Bytes>) -> Result<(), ClientError> {
        let frame = Frame::new(Command::Send)
            .with_header("destination", destination)
            .with_body(body);
        self.send_frame(frame, false).await.map(drop)
    }

    /// SEND and wait for its RECEIPT, which it returns (with `message-id`, and `x-seq` for
    /// Stoa's rooms).
    ///
    /// # Errors
    /// The broker's ERROR, a timeout, or a closed client.
    pub async fn send_with_receipt(
        &self,
        destination: &str,
        body: impl Into<Bytes>,
    ) -> Result<Frame, ClientError> {
        let frame = Frame::new(Command::Send)
            .with_header("destination", destination)
            .with_body(body);
        self.send_frame(frame, true)
            .await?
            .ok_or(ClientError::Closed)
    }

    /// SUBSCRIBE and wait until the broker confirms it (with a receipt), so that messages
    /// published after this returns are on the stream.
    ///
    /// # Errors
    /// The broker's ERROR, a timeout, or a closed client.
    pub async fn subscribe(
        &self,
        destination: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, ClientError> {
        let id = self.id("sub");
        // Unbounded: messages can arrive before the SUBSCRIBE's receipt (a queue's backlog),
        // and a full channel then would stop the driver from reading that receipt. The
        // broker protects itself from a client that reads slowly.
        let (messages, stream) = mpsc::unbounded_channel();
        let (done, wait) = oneshot::channel();
        self.request(Request::Subscribe {
            id: id.clone(),
            destination: destination.to_owned(),
            options,
            messages,
            done,
        })?;
        self.wait(&format!("the subscription to {destination}"), wait)
            .await?;
        Ok(Subscription {
            id,
            messages: stream,
            client: self.clone(),
        })
    }

    /// UNSUBSCRIBE by id and wait for the receipt.
    ///
    /// # Errors
    /// The broker's ERROR, a timeout, or a closed client.
    pub async fn unsubscribe(&self, id: &str) -> Result<(), ClientError> {
        let (done, wait) = oneshot::channel();
        self.request(Request::Unsubscribe {
            id: id.to_owned(),
            done,
        })?;
        self.wait(&format!("unsubscribing {id}"), wait)
            .await
            .map(drop)
    }

    fn ack_frame(&self, command: Command, message: &Message, transaction: Option<&str>) -> Frame {
        let mut frame = Frame::new(command);
        match self.info.version {
            Version::V1_2 => {
                if let Some(ack) = message.header("ack") {
                    frame.headers.push("id", ack);
                }
            }
            _ => {
                if let Some(id) = message.header("message-id") {
                    frame.headers.push("message-id", id);
                }
                if let Some(sub) = message.header("subscription") {
                    frame.headers.push("subscription", sub);
                }
            }
        }
        if let Some(tx) = transaction {
            frame.headers.push("transaction", tx);
        }
        frame
    }

    /// ACK a message (in `client` mode this acknowledges every earlier one too) and wait for
    /// the receipt.
    ///
    /// # Errors
    /// The broker's ERROR, a timeout, or a closed client.
    pub async fn ack(&self, message: &Message) -> Result<(), ClientError> {
        self.send_frame(self.ack_frame(Command::Ack, message, None), true)
            .await
            .map(drop)
    }

    /// NACK a message and wait for the receipt.
    ///
    /// # Errors
    /// The broker's ERROR, a timeout, or a closed client.
    pub async fn nack(&self, message: &Message) -> Result<(), ClientError> {
        self.send_frame(self.ack_frame(Command::Nack, message, None), true)
            .await
            .map(drop)
    }

    /// BEGIN a transaction.
    ///
    /// # Errors
    /// The broker's ERROR, a timeout, or a closed client.
    pub async fn begin(&self) -> Result<Transaction, ClientError> {
        let id = self.id("tx");
        self.send_frame(
            Frame::new(Command::Begin).with_header("transaction", &id),
            true,
        )
        .await?;
        Ok(Transaction {
            id,
            client: self.clone(),
        })
    }

    /// DISCONNECT with a receipt, then close.
    ///
    /// # Errors
    /// A timeout, or a client already closed.
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        let (done, wait) = oneshot::channel();
        self.request(Request::Disconnect { done })?;
        self.wait("the DISCONNECT receipt", wait).await.map(drop)
    }
}

/// An open transaction: its SENDs, ACKs and NACKs take effect at [`Transaction::commit`].
///
/// Frames inside a transaction are sent without waiting for receipts: some brokers
/// (RabbitMQ) hold those receipts until COMMIT. COMMIT's receipt confirms them all, since a
/// RECEIPT acknowledges every earlier frame of the connection.
#[derive(Debug)]
pub struct Transaction {
    id: String,
    client: Client,
}

impl Transaction {
    /// The transaction id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// SEND inside the transaction; it goes out at COMMIT.
    ///
    /// # Errors
    /// A closed client. The broker's verdict comes with [`Transaction::commit`].
    pub async fn send(&self, destination: &str, body: impl Into<Bytes>) -> Result<(), ClientError> {
        let frame = Frame::new(Command::Send)
            .with_header("destination", destination)
            .with_header("transaction", &self.id)
            .with_body(body);
        self.client.send_frame(frame, false).await.map(drop)
    }

    /// ACK inside the transaction.
    ///
    /// # Errors
    /// A closed client. The broker's verdict comes with [`Transaction::commit`].
    pub async fn ack(&self, message: &Message) -> Result<(), ClientError> {
        let frame = self.client.ack_frame(Command::Ack, message, Some(&self.id));
        self.client.send_frame(frame, false).await.map(drop)
    }

    /// NACK inside the transaction.
    ///
    /// # Errors
    /// A closed client. The broker's verdict comes with [`Transaction::commit`].
    pub async fn nack(&self, message: &Message) -> Result<(), ClientError> {
        let frame = self
            .client
            .ack_frame(Command::Nack, message, Some(&self.id));
        self.client.send_frame(frame, false).await.map(drop)
    }

    /// COMMIT.
    ///
    /// # Errors
    /// The broker's ERROR, a timeout, or a closed client.
    pub async fn commit(self) -> Result<(), ClientError> {
        let frame = Frame::new(Command::Commit).with_header("transaction", &self.id);
        self.client.send_frame(frame, true).await.map(drop)
    }

    /// ABORT.
    ///
    /// # Errors
    /// The broker's ERROR, a timeout, or a closed client.
    pub async fn abort(self) -> Result<(), ClientError> {
        let frame = Frame::new(Command::Abort).with_header("transaction", &self.id);
        self.client.send_frame(frame, true).await.map(drop)
    }
}

/// The messages of one subscription, as a stream. It ends when the client closes for good.
#[derive(Debug)]
pub struct Subscription {
    id: String,
    messages: mpsc::UnboundedReceiver<Message>,
    client: Client,
}

impl Subscription {
    /// The subscription id (for UNSUBSCRIBE).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// UNSUBSCRIBE and wait for the receipt.
    ///
    /// # Errors
    /// The broker's ERROR, a timeout, or a closed client.
    pub async fn unsubscribe(self) -> Result<(), ClientError> {
        self.client.unsubscribe(&self.id).await
    }

    /// The next message, or `None` once `wait` passes or the client is closed for good.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Message> {
        tokio::time::timeout(wait, self.messages.recv())
            .await
            .ok()
            .flatten()
    }
}

impl Stream for Subscription {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.messages.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            max_attempts: None,
        };
        assert_eq!(b.delay(0, 0), Duration::from_millis(100));
        assert_eq!(b.delay(1, 0), Duration::from_millis(200));
        assert_eq!(b.delay(3, 0), Duration::from_millis(800));
        assert_eq!(b.delay(10, 0), Duration::from_secs(1));
        assert_eq!(b.delay(0, 49), Duration::from_millis(149));
        assert!(b.delay(10, u64::MAX) < Duration::from_millis(1500));
    }
}
