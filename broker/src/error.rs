//! The errors every part of the broker shares: [`SessionError`], why a frame or a
//! connection was refused, which the session turns into the one ERROR frame the client
//! gets. This module imports no other module of the broker (docs/ARCHITECTURE.md, "What
//! may import what").

use bytes::Bytes;
use stomp_codec::{Command, DecodeError, Frame, InvalidHeartBeat};

/// Why a topic key or pattern is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// `/topic/` with nothing after it.
    #[error("topic name is empty")]
    Empty,
    /// `a..b`, `.a` or `a.`.
    #[error("topic {0:?} has an empty word")]
    EmptyWord(String),
    /// A SEND to `room.*`.
    #[error("cannot send to a wildcard topic {0:?}")]
    WildcardSend(String),
    /// More words than a key may have (the limit).
    #[error("topic {0:?} has more than {1} words")]
    TooManyWords(String, usize),
}

/// Why a frame was refused. Each ends the connection with an ERROR frame.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The bytes were not a valid frame.
    #[error("malformed frame: {0}")]
    Decode(#[from] DecodeError),
    /// A frame other than CONNECT before CONNECT.
    #[error("not connected: send CONNECT before {0}")]
    NotConnected(Command),
    /// A second CONNECT.
    #[error("already connected")]
    AlreadyConnected,
    /// No version in common.
    #[error(
        "unsupported STOMP version: the client accepts {0:?}, this server speaks 1.0, 1.1 and 1.2"
    )]
    UnsupportedVersion(String),
    /// A bad `heart-beat` header.
    #[error("{0}")]
    HeartBeat(#[from] InvalidHeartBeat),
    /// A `login` that cannot be a user name.
    #[error("invalid login {login:?}: {reason}")]
    InvalidLogin {
        /// The login as sent (cut to 64 characters).
        login: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A client sent a server frame.
    #[error("{0} frames are sent by servers, not clients")]
    ServerCommand(Command),
    /// A required header is missing.
    #[error("{command} frame has no {header} header")]
    MissingHeader {
        /// The frame's command.
        command: Command,
        /// The missing header.
        header: &'static str,
    },
    /// A destination kind this broker does not serve (yet).
    #[error(
        "destination {0:?} is not supported: use /topic/<name>, /topic/room.<room> or /user/<user>/queue/<name>"
    )]
    UnsupportedDestination(String),
    /// A room name that cannot be used.
    #[error("invalid room name {room:?}: {reason}")]
    InvalidRoomName {
        /// The name as sent (cut to 80 characters).
        room: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A `/user/...` destination of the wrong shape.
    #[error(
        "invalid user destination {0:?}: subscribe to /user/queue/<name>, send to /user/<user>/queue/<name>"
    )]
    InvalidUserDestination(String),
    /// Too many messages (or bytes) waiting for an offline user.
    #[error(
        "{destination} is full: at most {messages} messages and {bytes} bytes wait for their user"
    )]
    UserQueueFull {
        /// The SEND's destination.
        destination: String,
        /// The configured message limit.
        messages: usize,
        /// The configured byte limit.
        bytes: usize,
    },
    /// Nothing answers this `/app` destination.
    #[error("no application handles {0:?}: subscribe to /app/rooms or /app/room.<room>.members")]
    NoApplicationHandler(String),
    /// A queue name that cannot be used.
    #[error("invalid queue name {0:?}: 1 to 255 bytes, no control characters")]
    InvalidQueueName(String),
    /// A queue at its limit.
    #[error("queue {queue:?} is full: it holds at most {messages} messages and {bytes} bytes")]
    QueueFull {
        /// The queue.
        queue: String,
        /// Its message limit.
        messages: usize,
        /// Its byte limit.
        bytes: usize,
    },
    /// A `prefetch-count` that is not a number.
    #[error("prefetch-count {0:?} is not a number")]
    InvalidPrefetch(String),
    /// `x-history` and `x-since` together, or a value that is not a number.
    #[error("{0}")]
    InvalidReplay(String),
    /// A topic name that cannot be used.
    #[error("{0}")]
    Topic(#[from] TopicError),
    /// A SUBSCRIBE `ack` value other than the three modes.
    #[error("unknown ack mode {0:?}: use auto, client or client-individual")]
    InvalidAckMode(String),
    /// A SUBSCRIBE id already in use on this connection.
    #[error("subscription id {0:?} is already in use on this connection")]
    DuplicateSubscription(String),
    /// Too many subscriptions on one connection.
    #[error("more than {0} subscriptions on one connection")]
    TooManySubscriptions(usize),
    /// UNSUBSCRIBE (or ACK) naming no subscription.
    #[error("no subscription with id {0:?}")]
    UnknownSubscription(String),
    /// ACK or NACK naming no unacknowledged message.
    #[error("no unacknowledged message with ack id {0:?}")]
    UnknownAck(String),
    /// BEGIN of an open transaction.
    #[error("transaction {0:?} is already open")]
    DuplicateTransaction(String),
    /// COMMIT, ABORT or a transactional frame naming no open transaction.
    #[error("transaction {0:?} is not open")]
    UnknownTransaction(String),
    /// Too many open transactions.
    #[error("more than {0} open transactions on one connection")]
    TooManyTransactions(usize),
    /// A transaction holding too many frames.
    #[error("transaction {transaction:?} holds more than {limit} frames")]
    TransactionTooLarge {
        /// The transaction.
        transaction: String,
        /// The configured limit.
        limit: usize,
    },
    /// The client did not read fast enough.
    #[error("slow consumer: more than {0} bytes waiting to be sent")]
    SlowConsumer(usize),
    /// The client read nothing while one batch of frames was being written to it.
    #[error("slow consumer: nothing could be written for {0} ms")]
    WriteTimeout(u64),
    /// No bytes for longer than the heart-beat tolerance.
    #[error("heart-beat timeout: nothing received for {0} ms")]
    HeartBeatTimeout(u64),
    /// No CONNECT in time.
    #[error("no CONNECT within {0} ms")]
    ConnectTimeout(u64),
    /// A WebSocket message over the limit.
    #[error("websocket message exceeds the limit of {0} bytes")]
    WebSocketMessageTooLarge(usize),
    /// A WebSocket text message that is not UTF-8 (RFC 6455 forbids it).
    #[error("websocket text message is not valid UTF-8: send binary data in binary messages")]
    WebSocketTextNotUtf8,
    /// The broker is stopping.
    #[error("server shutting down")]
    ShuttingDown,
    /// Wrong credentials, whatever was wrong (nothing is learned about which names exist).
    #[error("authentication failed")]
    AuthenticationFailed,
    /// Too many failed logins from this address lately.
    #[error("too many failed logins")]
    TooManyFailedLogins,
    /// The user's account was removed or its password changed.
    #[error("session revoked")]
    SessionRevoked,
    /// Redis did not take a change this session asked for within `--cluster-timeout-ms`.
    #[error("cluster unavailable")]
    ClusterUnavailable,
    /// A durable queue was full, as Redis answered (`--cluster`).
    #[error(
        "queue full: at most --queue-max-messages messages and --queue-max-bytes bytes wait in a queue"
    )]
    SharedQueueFull,
    /// A direct message found its user's queue full, as Redis answered (`--cluster`).
    #[error(
        "user queue full: at most --user-queue-limit messages and --user-queue-bytes bytes wait for their user"
    )]
    SharedUserQueueFull,
    /// This node was declared dead by the cluster (it froze) and closed its sessions.
    #[error("cluster membership lost")]
    MembershipLost,
    /// An operator closed the session (`/admin`).
    #[error("session closed by an operator")]
    ClosedByOperator,
    /// The token the session was opened with has expired.
    #[error("token expired")]
    TokenExpired,
    /// `--max-connections` (or its per-address limit) is reached.
    #[error("server busy")]
    ServerBusy,
    /// The ACL does not let this user SEND to or SUBSCRIBE to the destination.
    #[error("access denied: {0}")]
    AccessDenied(String),
}

impl SessionError {
    /// Whether the client was cut for not reading: what is queued for it goes, only the
    /// ERROR is sent.
    pub fn is_slow_consumer(&self) -> bool {
        matches!(
            self,
            SessionError::SlowConsumer(_) | SessionError::WriteTimeout(_)
        )
    }

    /// The ERROR frame sent just before the connection closes.
    pub fn to_error_frame(&self, receipt: Option<&str>) -> Frame {
        let message = self.to_string();
        let mut frame = Frame::new(Command::Error).with_header("message", &message);
        if let Some(id) = receipt {
            frame.headers.push("receipt-id", id);
        }
        if let SessionError::UnsupportedVersion(_) = self {
            // 1.2 "Protocol Negotiation": name the versions the server speaks.
            frame.headers.push("version", "1.0,1.1,1.2");
            frame.body = Bytes::from_static(b"Supported protocol versions are 1.0 1.1 1.2");
        } else {
            frame.body = Bytes::from(message);
        }
        frame
            .headers
            .push("content-type", "text/plain;charset=utf-8");
        frame
    }
}

/// A refused frame: the error and the `receipt` the frame asked for, if any.
#[derive(Debug)]
pub struct Rejected {
    /// What was wrong.
    pub error: SessionError,
    /// The refused frame's `receipt` header, echoed as `receipt-id`.
    pub receipt: Option<String>,
}

impl From<SessionError> for Rejected {
    fn from(error: SessionError) -> Rejected {
        Rejected {
            error,
            receipt: None,
        }
    }
}
