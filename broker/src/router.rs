//! Topic routing: destination keys to subscribers, and fan-out of each publish.
//!
//! In: subscribe and unsubscribe calls from sessions, and [`Publish`]es. Out: one
//! [`Outgoing::Message`] offered to each matching subscriber's [`Outbox`]. It knows no
//! transport and never waits: a full outbox refuses the message and its connection closes as
//! a slow consumer, while everyone else is served.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use dashmap::DashMap;
use stomp_codec::{Headers, SharedMessage, Version};

use crate::destination::{TopicPattern, is_pattern, key_words};
use crate::outbox::{AckTag, Outbox, Outgoing};
use crate::session::SessionId;

/// One subscription as the router sees it: where to put messages and how to label them.
#[derive(Debug, Clone)]
pub struct Subscriber {
    /// The subscribing connection.
    pub session: SessionId,
    /// The subscription's connection-local number.
    pub key: u32,
    /// The connection's outbox.
    pub outbox: Arc<Outbox>,
    /// `MESSAGE\nsubscription:<id>\n`, encoded once for this subscription.
    pub head: Bytes,
    /// The connection's negotiated version (decides the shared part's escaping).
    pub version: Version,
    /// Whether deliveries must be acknowledged (client and client-individual modes).
    pub needs_ack: bool,
}

/// A published message: its shared headers and body, encoded lazily once per version.
#[derive(Debug)]
pub struct Publish {
    /// The broker-assigned `message-id`, the same for every subscriber.
    pub message_id: u64,
    headers: Headers,
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
            headers,
            body,
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
        slot.get_or_init(|| {
            SharedMessage::new(version, self.headers.iter(), &self.body)
                .tail()
                .clone()
        })
        .clone()
    }

    /// Whether the body is UTF-8 (the frame goes out as WebSocket text).
    pub fn is_text(&self) -> bool {
        self.text
    }

    /// The shared headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.body
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

/// The topic subscription map.
#[derive(Debug, Default)]
pub struct Router {
    exact: DashMap<Box<str>, Vec<Subscriber>>,
    patterns: DashMap<Box<str>, (TopicPattern, Vec<Subscriber>)>,
    pattern_subscribers: AtomicUsize,
}

impl Router {
    /// An empty router.
    pub fn new() -> Router {
        Router::default()
    }

    /// Adds a subscriber for a topic key or pattern (`room.*`, `room.#`).
    pub fn subscribe(&self, key: &str, subscriber: Subscriber) {
        if is_pattern(key) {
            self.patterns
                .entry(key.into())
                .or_insert_with(|| (TopicPattern::new(key), Vec::new()))
                .1
                .push(subscriber);
            self.pattern_subscribers.fetch_add(1, Ordering::Relaxed);
        } else {
            self.exact.entry(key.into()).or_default().push(subscriber);
        }
    }

    /// Removes one subscription; returns whether it was there.
    pub fn unsubscribe(&self, key: &str, session: SessionId, sub_key: u32) -> bool {
        let is_target = |s: &Subscriber| s.session == session && s.key == sub_key;
        let mut removed = false;
        if is_pattern(key) {
            if let Some(mut entry) = self.patterns.get_mut(key) {
                let before = entry.1.len();
                entry.1.retain(|s| !is_target(s));
                removed = entry.1.len() < before;
            }
            self.patterns.remove_if(key, |_, (_, subs)| subs.is_empty());
            if removed {
                self.pattern_subscribers.fetch_sub(1, Ordering::Relaxed);
            }
        } else {
            if let Some(mut subs) = self.exact.get_mut(key) {
                let before = subs.len();
                subs.retain(|s| !is_target(s));
                removed = subs.len() < before;
            }
            self.exact.remove_if(key, |_, subs| subs.is_empty());
        }
        removed
    }

    /// Offers `publish` to every subscriber of `key`: exact subscribers, then patterns.
    pub fn publish(&self, key: &str, publish: &Publish) -> Fanout {
        let mut fanout = Fanout::default();
        // The shard guard is held only for this loop, which never waits: offers are
        // non-blocking pushes into bounded outboxes.
        if let Some(subs) = self.exact.get(key) {
            deliver(&subs, publish, &mut fanout);
        }
        if self.pattern_subscribers.load(Ordering::Relaxed) > 0 {
            let words = key_words(key);
            for entry in &self.patterns {
                let (pattern, subs) = entry.value();
                if pattern.matches_words(&words) {
                    deliver(subs, publish, &mut fanout);
                }
            }
        }
        fanout
    }

    /// How many subscribers a key has exactly (not counting patterns).
    pub fn exact_subscribers(&self, key: &str) -> usize {
        self.exact.get(key).map_or(0, |s| s.len())
    }
}

fn deliver(subscribers: &[Subscriber], publish: &Publish, fanout: &mut Fanout) {
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
        let message = Outgoing::Message {
            head: sub.head.clone(),
            ack: sub.needs_ack.then_some(AckTag {
                subscription: sub.key,
                message_id: publish.message_id,
            }),
            tail,
            text: publish.text,
        };
        if sub.outbox.offer(message) {
            fanout.delivered += 1;
        } else {
            fanout.refused += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscriber(session: u64, key: u32, outbox: &Arc<Outbox>) -> Subscriber {
        Subscriber {
            session: SessionId(session),
            key,
            outbox: outbox.clone(),
            head: Bytes::from(format!("MESSAGE\nsubscription:{key}\n")),
            version: Version::V1_2,
            needs_ack: false,
        }
    }

    fn publish(id: u64) -> Publish {
        let headers: Headers = [("destination", "/topic/x")].into_iter().collect();
        Publish::new(id, headers, Bytes::from_static(b"hi"))
    }

    fn drained(outbox: &Outbox) -> usize {
        let mut batch = Vec::new();
        outbox.take_all(&mut batch)
    }

    #[test]
    fn exact_and_wildcard_subscribers_get_what_they_match() {
        let router = Router::new();
        let (a, b, c, d) = (
            Arc::new(Outbox::new(1 << 20)),
            Arc::new(Outbox::new(1 << 20)),
            Arc::new(Outbox::new(1 << 20)),
            Arc::new(Outbox::new(1 << 20)),
        );
        router.subscribe("room.lobby", subscriber(1, 0, &a));
        router.subscribe("room.*", subscriber(2, 0, &b));
        router.subscribe("room.#", subscriber(3, 0, &c));
        router.subscribe("room.other", subscriber(4, 0, &d));
        assert_eq!(router.publish("room.lobby", &publish(1)).delivered, 3);
        assert_eq!(
            router.publish("room.lobby.thread", &publish(2)).delivered,
            1
        );
        assert_eq!(router.publish("room", &publish(3)).delivered, 1);
        assert_eq!(
            (drained(&a), drained(&b), drained(&c), drained(&d)),
            (1, 1, 3, 0)
        );
    }

    #[test]
    fn unsubscribe_removes_only_that_subscription() {
        let router = Router::new();
        let a = Arc::new(Outbox::new(1 << 20));
        router.subscribe("t", subscriber(1, 0, &a));
        router.subscribe("t", subscriber(1, 1, &a));
        router.subscribe("t.*", subscriber(1, 2, &a));
        assert!(router.unsubscribe("t", SessionId(1), 0));
        assert!(!router.unsubscribe("t", SessionId(1), 0));
        assert!(router.unsubscribe("t.*", SessionId(1), 2));
        assert_eq!(router.publish("t", &publish(1)).delivered, 1);
        assert!(router.unsubscribe("t", SessionId(1), 1));
        assert_eq!(router.exact_subscribers("t"), 0);
    }

    #[test]
    fn a_full_outbox_refuses_without_affecting_others() {
        let router = Router::new();
        let small = Arc::new(Outbox::new(10));
        let big = Arc::new(Outbox::new(1 << 20));
        router.subscribe("t", subscriber(1, 0, &small));
        router.subscribe("t", subscriber(2, 0, &big));
        let fanout = router.publish("t", &publish(1));
        assert_eq!(
            fanout,
            Fanout {
                delivered: 1,
                refused: 1
            }
        );
        assert!(small.is_slow());
    }

    #[test]
    fn the_shared_part_is_encoded_once_per_version() {
        let p = publish(7);
        let a = p.tail(Version::V1_2);
        let b = p.tail(Version::V1_2);
        assert_eq!(a.as_ptr(), b.as_ptr(), "same bytes, not a second encoding");
    }
}
