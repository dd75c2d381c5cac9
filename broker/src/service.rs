//! What crosses between the router and a service: a [`Service`] serves one kind of
//! destination; a [`Subscriber`] is one subscription as services see it (where to put
//! messages and how to label them); [`SubscribeRequest`] and [`PublishRequest`] are what a
//! session asks; [`deliver`] offers a message to subscribers. The router holds the
//! services, the services implement [`Service`]; neither imports the other for these.

use std::sync::Arc;

use bytes::Bytes;
use stomp_codec::{Frame, Version};

use crate::acl::Viewer;
use crate::error::SessionError;
use crate::message::{KeptMessage, Publish, SessionId, message_headers};
use crate::outbox::{AckTag, Mark, Outbox, Outgoing};
use crate::receipts::Pending;

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
            publish.is_text(),
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
            (publish.message_id, publish.is_text(), tail),
            mark,
        )
    }

    /// A kept message replayed to this subscription (`x-replay:true`).
    pub fn kept(&self, kept: &KeptMessage) -> Outgoing {
        message_frame(
            self.key,
            &self.head,
            self.needs_ack,
            (kept.message_id(), kept.is_text(), kept.tail(self.version)),
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
        if sub.offer_tail(publish.message_id, publish.is_text(), tail, Mark::None) {
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
    /// Whether the subscriber is a member of a room it subscribes to (presence, join and
    /// leave notices): STOMP sessions are, readers of the HTTP API are not.
    pub presence: bool,
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
#[derive(Debug, Default)]
pub struct Published {
    /// The assigned `message-id`.
    pub message_id: u64,
    /// The room sequence number, for kept room messages.
    pub seq: Option<u64>,
    /// Who it reached.
    pub fanout: Fanout,
    /// Whether it went to durable storage: the RECEIPT must wait until it is on disk.
    pub durable: bool,
    /// An answer the RECEIPT must wait for (with `--cluster`, a room message being kept in
    /// Redis, which gives it its `x-seq`).
    pub pending: Option<Pending>,
}

/// What serves one kind of destination.
pub trait Service: Send + Sync {
    /// Checks a SEND's destination before the SEND is held in a transaction or published.
    ///
    /// # Errors
    /// The destination cannot take a SEND.
    fn check_send(&self, key: &str) -> Result<(), SessionError>;

    /// Adds a subscription (and replays or answers, where the service does that); a
    /// pending answer when the subscription is complete only later (with `--cluster`, a
    /// room once its state was read from Redis and the member noted there), which the
    /// SUBSCRIBE's RECEIPT waits for.
    ///
    /// # Errors
    /// The destination cannot be subscribed to.
    fn subscribe(&self, request: SubscribeRequest<'_>) -> Result<Option<Pending>, SessionError>;

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use stomp_codec::Headers;

    use super::*;

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
}
