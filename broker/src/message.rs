//! The message model: what every other part of the broker passes around, and nothing that
//! moves it. A [`Publish`] is a message as it is delivered live, a [`KeptMessage`] one a room
//! keeps, a [`StoredMessage`] one as storage writes it; [`SessionId`] names a connection and
//! [`MessageIds`] numbers messages. This module imports no other module of the broker
//! (docs/ARCHITECTURE.md, "What may import what").

use std::fmt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use stomp_codec::{Headers, SharedMessage, Version};

use crate::error::SessionError;

/// A connection's id, unique for the broker's lifetime; sent as CONNECTED's `session`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A published message: its shared headers and body, encoded lazily once per version.
///
/// Rooms (as [`KeptMessage`]s), durable queues and offline users' queues keep messages by
/// the thousand, so every byte here counts: the headers are packed, and the body has a
/// block of its own rather than pinning the read buffer it arrived in.
#[derive(Debug)]
pub struct Publish {
    /// The broker-assigned `message-id`, the same for every subscriber.
    pub message_id: u64,
    headers: PackedHeaders,
    body: Bytes,
    text: bool,
    tails: [OnceLock<Bytes>; 3],
}

impl Publish {
    /// A message with the headers every subscriber sees (`destination`, `message-id`, ...)
    /// and its body.
    pub fn new(message_id: u64, headers: Headers, body: Bytes) -> Publish {
        let text = std::str::from_utf8(&body).is_ok();
        Publish {
            message_id,
            headers: PackedHeaders::new(&headers),
            body: Bytes::copy_from_slice(&body),
            text,
            tails: Default::default(),
        }
    }

    /// The shared part as `version` writes it, encoded on first use.
    pub fn tail(&self, version: Version) -> Bytes {
        let slot = match version {
            Version::V1_0 => &self.tails[0],
            Version::V1_1 => &self.tails[1],
            Version::V1_2 => &self.tails[2],
        };
        slot.get_or_init(|| encode_tail(version, &self.headers, &self.body))
            .clone()
    }

    /// Whether the body is UTF-8 (the frame goes out as WebSocket text).
    pub fn is_text(&self) -> bool {
        self.text
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The `(name, value)` pairs in order.
    pub fn headers(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + '_ {
        self.headers.iter()
    }

    /// The message as a store keeps it, under `seq` (a room's sequence number, or the
    /// message id in the durable queue store).
    pub fn to_stored(&self, seq: u64) -> StoredMessage {
        self.headers.to_stored(seq, self.message_id, &self.body)
    }

    /// The message without its encoded copies, for a room's history to keep.
    pub fn into_kept(self) -> KeptMessage {
        KeptMessage {
            message_id: self.message_id,
            headers: self.headers,
            body: self.body,
            text: self.text,
        }
    }

    /// A message a store kept, as it was published.
    pub fn from_stored(stored: StoredMessage) -> Publish {
        let headers: Headers = stored
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        Publish::new(stored.message_id, headers, stored.body)
    }
}

/// A message as a room's history keeps it: the headers and body of a [`Publish`] without
/// the encoded copies made for its live delivery; a replay encodes it again
/// ([`Stamp::kept`](crate::service::Stamp::kept)). A room keeps up to `--room-history` of these (10,000 by
/// default); docs/PERFORMANCE.md has what leaving the copies out saved.
#[derive(Debug)]
pub struct KeptMessage {
    message_id: u64,
    headers: PackedHeaders,
    body: Bytes,
    text: bool,
}

impl KeptMessage {
    /// The broker-assigned `message-id`.
    pub fn message_id(&self) -> u64 {
        self.message_id
    }

    /// Whether the body is UTF-8 (a text WebSocket message can carry it).
    pub fn is_text(&self) -> bool {
        self.text
    }

    /// Its shared part (headers, body, NUL) as `version` writes it, encoded anew: a kept
    /// message keeps no encoded copy.
    pub fn tail(&self, version: Version) -> Bytes {
        encode_tail(version, &self.headers, &self.body)
    }

    /// The `(name, value)` pairs in order.
    pub fn headers(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + '_ {
        self.headers.iter()
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The message as a store keeps it, under `seq`.
    pub fn to_stored(&self, seq: u64) -> StoredMessage {
        self.headers.to_stored(seq, self.message_id, &self.body)
    }

    /// Bytes it takes in memory: headers and body, their bookkeeping, and the message
    /// itself. What `--room-history-bytes` and `--history-total-bytes` count.
    pub fn size(&self) -> usize {
        std::mem::size_of::<KeptMessage>()
            + self.headers.text.len()
            + std::mem::size_of_val(&*self.headers.ends)
            + self.body.len()
    }
}

/// The shared part of a MESSAGE (headers, body, NUL) as `version` writes it.
fn encode_tail(version: Version, headers: &PackedHeaders, body: &[u8]) -> Bytes {
    SharedMessage::new(version, headers.iter(), body)
        .tail()
        .clone()
}

/// Headers as a [`Publish`] keeps them: names and values back to back in one string of
/// exactly their size, and where each name and value ends. (A [`Headers`] has room for ten
/// headers inline: 240 bytes before any text.)
#[derive(Debug)]
struct PackedHeaders {
    text: Box<str>,
    ends: Box<[(usize, usize)]>,
}

impl PackedHeaders {
    fn new(headers: &Headers) -> PackedHeaders {
        let len = headers.iter().map(|(n, v)| n.len() + v.len()).sum();
        let mut text = String::with_capacity(len);
        let mut ends = Vec::with_capacity(headers.len());
        for (name, value) in headers {
            text.push_str(name);
            let name_end = text.len();
            text.push_str(value);
            ends.push((name_end, text.len()));
        }
        PackedHeaders {
            text: text.into_boxed_str(),
            ends: ends.into_boxed_slice(),
        }
    }

    fn to_stored(&self, seq: u64, message_id: u64, body: &Bytes) -> StoredMessage {
        StoredMessage {
            seq,
            message_id,
            headers: self
                .iter()
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect(),
            body: body.clone(),
        }
    }

    /// The `(name, value)` pairs in order.
    fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + Clone + '_ {
        self.ends.iter().enumerate().map(|(i, &(name_end, end))| {
            // A header starts where the one before it ended.
            let start = i
                .checked_sub(1)
                .and_then(|before| self.ends.get(before))
                .map_or(0, |&(_, end)| end);
            // The offsets were taken between whole strings pushed above.
            let name = self.text.get(start..name_end).unwrap_or_default();
            let value = self.text.get(name_end..end).unwrap_or_default();
            (name, value)
        })
    }
}

/// The header of the word a cluster's nodes hear on a room's channel when an operator
/// cleared the room's history up to the `x-seq` it gives (`cluster::rooms`); never a
/// client's.
pub const CLEARED_HEADER: &str = "x-stoa-cleared";

/// Headers only the broker may set on a MESSAGE; a SEND's copies are dropped.
pub const BROKER_OWNED: [&str; 15] = [
    "destination",
    "message-id",
    "subscription",
    "ack",
    "receipt",
    "transaction",
    "content-length",
    "redelivered",
    "x-sender",
    "x-timestamp",
    "x-seq",
    "x-event",
    "x-replay",
    "x-first-seq",
    CLEARED_HEADER,
];

/// The shared headers of a MESSAGE made from a SEND: `destination` and `message-id`
/// first, the SEND's own headers in order (less the broker-owned ones), then `extra`, then
/// `x-sender` and `x-timestamp`.
pub fn message_headers(
    destination: &str,
    message_id: u64,
    send: &Headers,
    user: &str,
    extra: &[(&str, &str)],
) -> Headers {
    let mut digits = itoa::Buffer::new();
    let mut headers = Headers::new();
    headers.push("destination", destination);
    headers.push("message-id", digits.format(message_id));
    for (name, value) in send {
        if !BROKER_OWNED.contains(&name) {
            headers.push(name, value);
        }
    }
    for (name, value) in extra {
        headers.push(name, value);
    }
    headers.push("x-sender", user);
    headers.push("x-timestamp", digits.format(now_millis()));
    headers
}

/// Broker-wide message ids.
#[derive(Debug)]
pub struct MessageIds {
    next: AtomicU64,
    /// 1 on one node; with `--cluster`, [`MessageIds::NODE_SLOTS`]: each node's ids are
    /// its slot modulo that, so no two live nodes give the same id.
    step: AtomicU64,
}

impl MessageIds {
    /// How many nodes can give ids at once without two of them sharing a slot.
    pub const NODE_SLOTS: u64 = 1024;

    /// Ids starting at the current time in microseconds, so that they keep increasing across
    /// restarts (at fewer than a million publishes a second on average).
    pub fn new() -> MessageIds {
        MessageIds {
            next: AtomicU64::new(micros_now()),
            step: AtomicU64::new(1),
        }
    }

    /// From now on, ids unique among the nodes of a cluster: this node's are `slot` modulo
    /// [`MessageIds::NODE_SLOTS`], and larger than every id given so far (on one node or
    /// as a member), so they still grow across restarts.
    pub fn join_cluster(&self, slot: u64) {
        let start = micros_now()
            .saturating_mul(Self::NODE_SLOTS)
            .max(self.next.load(Ordering::Relaxed));
        let start = start - start % Self::NODE_SLOTS + Self::NODE_SLOTS + slot % Self::NODE_SLOTS;
        self.step.store(Self::NODE_SLOTS, Ordering::Relaxed);
        self.next.store(start, Ordering::Relaxed);
    }

    /// The next id.
    pub fn next(&self) -> u64 {
        let step = self.step.load(Ordering::Relaxed);
        self.next.fetch_add(step, Ordering::Relaxed)
    }
}

fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
}

impl Default for MessageIds {
    fn default() -> Self {
        MessageIds::new()
    }
}

/// A message as kept: headers in order and the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// The room sequence number (the message id in the durable queue store).
    pub seq: u64,
    /// The broker-assigned `message-id`.
    pub message_id: u64,
    /// Shared headers in wire order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

impl StoredMessage {
    /// About what it takes as a kept message: its headers' and body's bytes (no more than
    /// [`KeptMessage::size`] counts).
    pub fn approximate_size(&self) -> usize {
        self.headers
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .sum::<usize>()
            + self.body.len()
    }
}

/// Milliseconds since the Unix epoch, for `x-timestamp`.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Longest user name, in characters.
pub const MAX_USER_NAME_CHARS: usize = 32;

/// A CONNECT `login` as a display name: 1 to 32 characters, none of them control
/// characters, and no `/` (names appear in `/user/<name>/...` destinations).
///
/// # Errors
/// [`SessionError::InvalidLogin`] saying which rule was broken.
pub fn check_user_name(login: &str) -> Result<String, SessionError> {
    let invalid = |reason| SessionError::InvalidLogin {
        login: login.chars().take(64).collect(),
        reason,
    };
    let chars = login.chars().count();
    if chars == 0 {
        return Err(invalid("a name needs at least one character"));
    }
    if chars > MAX_USER_NAME_CHARS {
        return Err(invalid("a name has at most 32 characters"));
    }
    if login.chars().any(char::is_control) {
        return Err(invalid("a name cannot contain control characters"));
    }
    if login.contains('/') {
        return Err(invalid("a name cannot contain '/'"));
    }
    if login.trim().is_empty() {
        return Err(invalid("a name cannot be only spaces"));
    }
    Ok(login.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn cluster_ids_grow_past_one_node_ids_and_two_slots_never_meet() {
        let alone = MessageIds::new();
        let before = alone.next();
        let (a, b) = (MessageIds::new(), MessageIds::new());
        a.join_cluster(3);
        b.join_cluster(1027);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let (x, y) = (a.next(), b.next());
            assert!(x > before && y > before);
            assert_eq!(x % MessageIds::NODE_SLOTS, 3);
            assert!(seen.insert(x));
            // Slot 1027 is slot 3 again: the one case where two nodes could meet.
            assert_eq!(y % MessageIds::NODE_SLOTS, 3);
        }
        let c = MessageIds::new();
        c.join_cluster(4);
        for _ in 0..10_000 {
            assert!(!seen.contains(&c.next()), "slots 3 and 4 never give one id");
        }
        let first = a.next();
        assert!(a.next() > first, "still growing");
    }

    #[test]
    fn a_publish_keeps_its_headers_in_order_with_repeats_and_empty_values() {
        let mut headers = Headers::new();
        headers.push("destination", "/topic/room.방");
        headers.push("x-tag", "first");
        headers.push("x-empty", "");
        headers.push("x-tag", "second:with\ncolon");
        let publish = Publish::new(7, headers.clone(), Bytes::from_static(b"hi"));

        let kept: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(publish.to_stored(1).headers, kept);
        for version in [Version::V1_0, Version::V1_1, Version::V1_2] {
            let whole = SharedMessage::new(version, headers.iter(), b"hi");
            assert_eq!(&publish.tail(version), whole.tail(), "{version}");
        }
    }

    #[test]
    fn a_publish_without_headers_or_body_encodes_only_its_length() {
        let publish = Publish::new(1, Headers::new(), Bytes::new());
        assert_eq!(&publish.tail(Version::V1_2)[..], b"content-length:0\n\n\0");
    }
}
