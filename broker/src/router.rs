//! Destinations to services: the one place that knows which service serves a destination,
//! and the types every service shares.
//!
//! In: SUBSCRIBE, UNSUBSCRIBE and SEND requests from sessions. Out: the request handed to
//! the [`Service`] for its destination (topics, rooms, user destinations, `/app` replies),
//! which offers [`Outgoing`] frames to subscribers' outboxes. It knows no transport and
//! never waits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use stomp_codec::{Frame, Headers, SharedMessage, Version};

use crate::acl::Viewer;
use crate::destination::{Destination, is_pattern};
use crate::durable::{KeptQueue, QueueStore};
use crate::outbox::{AckTag, Mark, Outbox, Outgoing};
use crate::services::{
    App, HistoryLimits, QueueLimits, Queues, Rooms, Topics, Users, is_user_queue,
};
use crate::session::{SessionError, SessionId};
use crate::state::now_millis;
use crate::store::{Store, StoredMessage};

/// One subscription as services see it: where to put messages and how to label them.
#[derive(Debug, Clone)]
pub struct Subscriber {
    /// The subscribing connection.
    pub session: SessionId,
    /// The subscription's connection-local number.
    pub key: u32,
    /// The connection's user.
    pub user: Arc<str>,
    /// The connection's outbox.
    pub outbox: Arc<Outbox>,
    /// `MESSAGE\nsubscription:<id>\n`, encoded once for this subscription.
    pub head: Bytes,
    /// The connection's negotiated version (decides the shared part's escaping).
    pub version: Version,
    /// Whether deliveries must be acknowledged (client and client-individual modes).
    pub needs_ack: bool,
    /// Who subscribed, as the ACL sees them (with `--acl` only): a wildcard subscription's
    /// deliveries are checked against it one by one.
    pub viewer: Option<Arc<Viewer>>,
}

impl Subscriber {
    /// Offers `publish` to this subscriber; `replay` marks history (`x-replay:true`).
    /// Returns whether the outbox took it.
    pub fn offer(&self, publish: &Publish, replay: bool) -> bool {
        let mark = if replay { Mark::Replay } else { Mark::None };
        self.offer_marked(publish, mark)
    }

    /// Offers `publish` with a delivery header of its own (`redelivered:true`, ...).
    pub fn offer_marked(&self, publish: &Publish, mark: Mark) -> bool {
        self.offer_tail(
            publish.message_id,
            publish.text,
            publish.tail(self.version),
            mark,
        )
    }

    fn offer_tail(&self, message_id: u64, text: bool, tail: Bytes, mark: Mark) -> bool {
        self.outbox.offer(message_frame(
            self.key,
            &self.head,
            self.needs_ack,
            (message_id, text, tail),
            mark,
        ))
    }

    /// Whether this is subscription `key` of `session`.
    pub fn is(&self, session: SessionId, key: u32) -> bool {
        self.session == session && self.key == key
    }

    /// How its deliveries are labelled, for a [`Backlog`](crate::outbox::Backlog) that makes
    /// them later.
    pub fn stamp(&self) -> Stamp {
        Stamp {
            key: self.key,
            head: self.head.clone(),
            version: self.version,
            needs_ack: self.needs_ack,
        }
    }
}

/// A subscription's labels without its outbox: what a backlog keeps to make the frames it
/// delivers (holding the outbox itself would make a cycle, the backlog sitting in it).
#[derive(Debug, Clone)]
pub struct Stamp {
    key: u32,
    head: Bytes,
    version: Version,
    needs_ack: bool,
}

impl Stamp {
    /// The subscription's connection-local number.
    pub fn key(&self) -> u32 {
        self.key
    }

    /// `publish` as a MESSAGE of this subscription.
    pub fn publish(&self, publish: &Publish, mark: Mark) -> Outgoing {
        let tail = publish.tail(self.version);
        message_frame(
            self.key,
            &self.head,
            self.needs_ack,
            (publish.message_id, publish.text, tail),
            mark,
        )
    }

    /// A kept message replayed to this subscription (`x-replay:true`).
    pub fn kept(&self, kept: &KeptMessage) -> Outgoing {
        let tail = encode_tail(self.version, &kept.headers, &kept.body);
        message_frame(
            self.key,
            &self.head,
            self.needs_ack,
            (kept.message_id, kept.text, tail),
            Mark::Replay,
        )
    }
}

/// A MESSAGE for subscription `key`: its head, its `ack` header if it needs one, and the
/// shared part (`message_id`, whether UTF-8, and the encoded tail).
fn message_frame(
    key: u32,
    head: &Bytes,
    needs_ack: bool,
    (message_id, text, tail): (u64, bool, Bytes),
    mark: Mark,
) -> Outgoing {
    Outgoing::Message {
        head: head.clone(),
        ack: needs_ack.then_some(AckTag {
            subscription: key,
            message_id,
        }),
        tail,
        text,
        mark,
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
/// ([`Stamp::kept`]). A room keeps up to `--room-history` of these (10,000 by
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

/// Headers only the broker may set on a MESSAGE; a SEND's copies are dropped.
pub const BROKER_OWNED: [&str; 14] = [
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

/// Offers `publish` to every subscriber; one encoding per version.
pub fn deliver<'a>(
    subscribers: impl IntoIterator<Item = &'a Subscriber>,
    publish: &Publish,
    fanout: &mut Fanout,
) {
    // Most subscribers share a version: keep the last tail instead of asking again.
    let mut cached: Option<(Version, Bytes)> = None;
    for sub in subscribers {
        let tail = match &cached {
            Some((v, tail)) if *v == sub.version => tail.clone(),
            _ => {
                let tail = publish.tail(sub.version);
                cached = Some((sub.version, tail.clone()));
                tail
            }
        };
        if sub.offer_tail(publish.message_id, publish.text, tail, Mark::None) {
            fanout.delivered += 1;
        } else {
            fanout.refused += 1;
        }
    }
}

/// What one publish reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fanout {
    /// Subscribers whose outbox took the message.
    pub delivered: usize,
    /// Subscribers whose outbox was full (they are being closed as slow consumers).
    pub refused: usize,
}

/// What a SUBSCRIBE asked to be replayed first (`x-history`, `x-since`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Live messages only.
    None,
    /// The last N kept messages.
    Last(u64),
    /// Every kept message after this sequence number.
    Since(u64),
}

/// A SUBSCRIBE, as handed to a service.
#[derive(Debug)]
pub struct SubscribeRequest<'a> {
    /// The destination after its prefix (`lobby` for `/topic/room.lobby`).
    pub key: &'a str,
    /// The whole destination.
    pub destination: &'a str,
    /// Where messages go.
    pub subscriber: Subscriber,
    /// What to replay first.
    pub replay: Replay,
    /// The SUBSCRIBE's `prefetch-count`, if any.
    pub prefetch: Option<usize>,
}

/// A SEND, as handed to a service.
#[derive(Debug)]
pub struct PublishRequest<'a> {
    /// The destination after its prefix.
    pub key: &'a str,
    /// The whole destination.
    pub destination: &'a str,
    /// The SEND.
    pub frame: &'a Frame,
    /// The sending session's user.
    pub user: &'a str,
    /// The `message-id` to give it.
    pub message_id: u64,
}

impl PublishRequest<'_> {
    /// The SEND as a message delivered to `destination` (the SEND's own, or where a user
    /// destination delivers it), with `extra` headers before `x-sender` and `x-timestamp`.
    pub fn message(&self, destination: &str, extra: &[(&str, &str)]) -> Publish {
        let headers = message_headers(
            destination,
            self.message_id,
            &self.frame.headers,
            self.user,
            extra,
        );
        Publish::new(self.message_id, headers, self.frame.body.clone())
    }
}

/// What a SEND became, for its RECEIPT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Published {
    /// The assigned `message-id`.
    pub message_id: u64,
    /// The room sequence number, for kept room messages.
    pub seq: Option<u64>,
    /// Who it reached.
    pub fanout: Fanout,
    /// Whether it went to durable storage: the RECEIPT must wait until it is on disk.
    pub durable: bool,
}

/// What serves one kind of destination.
pub trait Service: Send + Sync {
    /// Checks a SEND's destination before the SEND is held in a transaction or published.
    ///
    /// # Errors
    /// The destination cannot take a SEND.
    fn check_send(&self, key: &str) -> Result<(), SessionError>;

    /// Adds a subscription (and replays or answers, where the service does that).
    ///
    /// # Errors
    /// The destination cannot be subscribed to.
    fn subscribe(&self, request: SubscribeRequest<'_>) -> Result<(), SessionError>;

    /// Removes a subscription that `subscribe` accepted.
    fn unsubscribe(&self, key: &str, subscriber: &Subscriber);

    /// Publishes a SEND that `check_send` accepted.
    ///
    /// # Errors
    /// The service refused it (a full user queue).
    fn publish(&self, request: PublishRequest<'_>) -> Result<Published, SessionError>;

    /// Settles messages with these ids that `subscriber` ACKed (`ack`) or NACKed. Only
    /// services that keep messages until they are acknowledged care.
    fn settle(&self, _key: &str, _subscriber: &Subscriber, _ids: &[u64], _ack: bool) {}
}

/// Broker-wide message ids.
#[derive(Debug)]
pub struct MessageIds(AtomicU64);

impl MessageIds {
    /// Ids starting at the current time in microseconds, so that they keep increasing across
    /// restarts (at fewer than a million publishes a second on average).
    pub fn new() -> MessageIds {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2));
        MessageIds(AtomicU64::new(start))
    }

    /// The next id.
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

impl Default for MessageIds {
    fn default() -> Self {
        MessageIds::new()
    }
}

/// Settings the services need.
#[derive(Debug, Clone, Copy)]
pub struct RouterLimits {
    /// What rooms keep.
    pub history: HistoryLimits,
    /// Messages waiting per offline user queue.
    pub user_queue_limit: usize,
    /// Bytes of bodies waiting per offline user queue.
    pub user_queue_bytes: usize,
    /// Durable queue limits.
    pub queues: QueueLimits,
}

/// Every service, and the map from destinations to them.
#[derive(Debug)]
pub struct Router {
    /// Message ids for every service.
    pub ids: Arc<MessageIds>,
    /// `/topic/<key>`, wildcards included.
    pub topics: Arc<Topics>,
    /// `/topic/room.<room>`.
    pub rooms: Arc<Rooms>,
    /// `/user/...`.
    pub users: Users,
    /// `/app/...`.
    pub app: App,
    /// `/queue/<name>`.
    pub queues: Queues,
    store: Arc<dyn Store>,
}

impl Router {
    /// Services over `store`, with what it kept loaded.
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn open(
        store: Arc<dyn Store>,
        queue_store: QueueStore,
        kept_queues: Vec<KeptQueue>,
        limits: RouterLimits,
    ) -> Result<Router, crate::store::StoreError> {
        let ids = Arc::new(MessageIds::new());
        let topics = Arc::new(Topics::new());
        let rooms = Arc::new(Rooms::load(
            store.clone(),
            topics.clone(),
            ids.clone(),
            limits.history,
        )?);
        let queue_store = Arc::new(queue_store);
        // One durable store for both: user queues are the ones under their own prefix.
        let (user_queues, kept_queues): (Vec<KeptQueue>, Vec<KeptQueue>) = kept_queues
            .into_iter()
            .partition(|(name, _)| is_user_queue(name));
        let users = Users::new(
            queue_store.clone(),
            user_queues,
            (limits.user_queue_limit, limits.user_queue_bytes),
        );
        let app = App::new(rooms.clone(), ids.clone());
        let queues = Queues::new(queue_store, kept_queues, limits.queues);
        Ok(Router {
            ids,
            topics,
            rooms,
            users,
            app,
            queues,
            store,
        })
    }

    /// The service for `destination`, and the destination's key within it.
    ///
    /// # Errors
    /// No service serves that destination.
    pub fn resolve<'d>(
        &self,
        destination: &'d str,
    ) -> Result<(&dyn Service, &'d str), SessionError> {
        match Destination::parse(destination) {
            Destination::Topic(key) => match key.strip_prefix("room.") {
                // `/topic/room.*` watches rooms through the topic patterns.
                Some(room) if !is_pattern(key) => Ok((self.rooms.as_ref(), room)),
                _ => Ok((self.topics.as_ref(), key)),
            },
            Destination::User(rest) => Ok((&self.users, rest)),
            Destination::App(rest) => Ok((&self.app, rest)),
            Destination::Queue(name) => Ok((&self.queues, name)),
            Destination::Unknown => {
                Err(SessionError::UnsupportedDestination(destination.to_owned()))
            }
        }
    }

    /// Room messages handed to the history store and not yet taken by its writer.
    pub fn store_pending(&self) -> &crate::writer::Pending {
        self.store.pending()
    }

    /// Waits until everything handed to the store is written (at shutdown).
    pub fn flush_store(&self) {
        self.store.flush();
        self.queues.store().flush();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

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
    fn a_kept_message_is_replayed_as_it_was_published() {
        let mut headers = Headers::new();
        headers.push("destination", "/topic/room.lobby");
        headers.push("x-seq", "3");
        let live = Publish::new(9, headers, Bytes::from_static(b"\xffbinary"));
        let tail = live.tail(Version::V1_1);
        let kept = live.into_kept();

        let outbox = Arc::new(Outbox::new(1 << 16));
        let subscriber = Subscriber {
            session: SessionId(1),
            key: 4,
            user: Arc::from("reader"),
            outbox: outbox.clone(),
            head: Bytes::from_static(b"MESSAGE\nsubscription:s\n"),
            version: Version::V1_1,
            needs_ack: true,
            viewer: None,
        };
        assert!(outbox.offer(subscriber.stamp().kept(&kept)));
        let mut batch = Vec::new();
        outbox.take_all(&mut batch);
        let [
            Outgoing::Message {
                ack,
                tail: replayed,
                text,
                mark,
                ..
            },
        ] = &batch[..]
        else {
            panic!("one message queued: {batch:?}");
        };
        assert_eq!(replayed, &tail);
        assert!(!text, "a binary body stays binary");
        assert!(matches!(mark, Mark::Replay));
        assert_eq!(
            ack.as_ref().map(|a| (a.subscription, a.message_id)),
            Some((4, 9))
        );
    }

    #[test]
    fn a_publish_without_headers_or_body_encodes_only_its_length() {
        let publish = Publish::new(1, Headers::new(), Bytes::new());
        assert_eq!(&publish.tail(Version::V1_2)[..], b"content-length:0\n\n\0");
    }
}
