//! `/topic/<key>`: publish/subscribe with `*` and `#` wildcards.
//!
//! In: subscriptions by key or pattern, publishes by key. Out: each publish offered to
//! exact subscribers and to every pattern that matches. With `--cluster`, publishes also go
//! to the other nodes, and this node listens to the keys and patterns its clients subscribe
//! to, for theirs ([`Topics::attach`]).

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use crate::cluster::Cluster;
use crate::destination::{
    TopicPattern, check_publish_key, check_subscribe_key, is_pattern, key_words,
};
use crate::error::SessionError;
use crate::message::Publish;
use crate::receipts::{Pending, pending};
use crate::service::{
    Fanout, PublishRequest, Published, Service, SubscribeRequest, Subscriber, deliver,
};

/// The subscribers of one pattern.
#[derive(Debug)]
struct Watchers {
    pattern: TopicPattern,
    subs: Vec<Subscriber>,
    /// With `--cluster`: the glob this node listens to for the pattern, made once.
    glob: Option<Box<str>>,
}

/// The topic subscription map.
#[derive(Debug, Default)]
pub struct Topics {
    exact: DashMap<Box<str>, Vec<Subscriber>>,
    patterns: DashMap<Box<str>, Watchers>,
    pattern_subscribers: AtomicUsize,
    /// The other nodes, with `--cluster`.
    cluster: OnceLock<Arc<Cluster>>,
}

impl Topics {
    /// No subscriptions.
    pub fn new() -> Topics {
        Topics::default()
    }

    /// Sends publishes to the other nodes of `cluster` too, and listens there for the keys
    /// and patterns subscribed here. Called once, before any client connects.
    pub fn attach(&self, cluster: Arc<Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    /// Starts or stops listening to other nodes for `key`. Called under the map's lock for
    /// `key`, so that the changes for one key reach the bus in the order they happened.
    fn listen(&self, key: &str, pattern: bool, on: bool) {
        if let Some(cluster) = self.cluster.get() {
            cluster.listen(key, pattern, on);
        }
    }

    /// Adds a subscriber for a key or a pattern (`room.*`, `room.#`).
    pub fn add(&self, key: &str, subscriber: Subscriber) {
        if is_pattern(key) {
            let mut entry = self.patterns.entry(key.into()).or_insert_with(|| Watchers {
                pattern: TopicPattern::new(key),
                subs: Vec::new(),
                glob: self.cluster.get().map(|c| c.glob_of(key).into()),
            });
            entry.subs.push(subscriber);
            if entry.subs.len() == 1 {
                self.listen(key, true, true);
            }
            self.pattern_subscribers.fetch_add(1, Ordering::Relaxed);
        } else {
            let mut subs = self.exact.entry(key.into()).or_default();
            subs.push(subscriber);
            if subs.len() == 1 {
                self.listen(key, false, true);
            }
        }
    }

    /// Removes one subscription; returns whether it was there.
    pub fn remove(&self, key: &str, target: &Subscriber) -> bool {
        let is_target = |s: &Subscriber| s.is(target.session, target.key);
        let mut removed = false;
        if is_pattern(key) {
            if let Some(mut entry) = self.patterns.get_mut(key) {
                let before = entry.subs.len();
                entry.subs.retain(|s| !is_target(s));
                removed = entry.subs.len() < before;
            }
            self.patterns.remove_if(key, |_, watchers| {
                let last = watchers.subs.is_empty();
                if last {
                    self.listen(key, true, false);
                }
                last
            });
            if removed {
                self.pattern_subscribers.fetch_sub(1, Ordering::Relaxed);
            }
        } else {
            if let Some(mut subs) = self.exact.get_mut(key) {
                let before = subs.len();
                subs.retain(|s| !is_target(s));
                removed = subs.len() < before;
            }
            self.exact.remove_if(key, |_, subs| {
                let last = subs.is_empty();
                if last {
                    self.listen(key, false, false);
                }
                last
            });
        }
        removed
    }

    /// Offers `publish` to the exact subscribers of `key` and to every matching pattern.
    pub fn fan_out(&self, key: &str, publish: &Publish) -> Fanout {
        let mut fanout = Fanout::default();
        // The shard guard is held only for this loop, which never waits: offers are
        // non-blocking pushes into bounded outboxes.
        if let Some(subs) = self.exact.get(key) {
            deliver(subs.iter(), publish, &mut fanout);
        }
        self.fan_out_to_patterns(key, publish, &mut fanout);
        fanout
    }

    /// Offers `publish` to the patterns matching `key` only (rooms use this for watchers).
    pub fn fan_out_to_patterns(&self, key: &str, publish: &Publish, fanout: &mut Fanout) {
        self.fan_out_to_watchers(key, publish, fanout, |_| true);
    }

    /// Offers `publish` to the patterns matching `key` among those `through` lets by.
    fn fan_out_to_watchers(
        &self,
        key: &str,
        publish: &Publish,
        fanout: &mut Fanout,
        through: impl Fn(&Watchers) -> bool,
    ) {
        if self.pattern_subscribers.load(Ordering::Relaxed) == 0 {
            return;
        }
        let words = key_words(key);
        // Made once, and only if some watcher's deliveries go through the ACL.
        let mut destination: Option<String> = None;
        for entry in &self.patterns {
            let watchers = entry.value();
            if !through(watchers) || !watchers.pattern.matches_words(&words) {
                continue;
            }
            let subs = &watchers.subs;
            if subs.iter().all(|s| s.viewer.is_none()) {
                deliver(subs.iter(), publish, fanout);
                continue;
            }
            // --acl: no watcher learns of a destination it may not subscribe to.
            let destination = destination.get_or_insert_with(|| format!("/topic/{key}"));
            let allowed = subs.iter().filter(|s| {
                s.viewer
                    .as_ref()
                    .is_none_or(|viewer| viewer.may_subscribe(destination))
            });
            deliver(allowed, publish, fanout);
        }
    }

    /// Offers a message another node published on `key` to this node's subscribers: the
    /// exact ones when it came on the key's channel (`glob` is `None`), else the patterns
    /// this node listens to through `glob`.
    pub fn fan_out_from_cluster(&self, key: &str, glob: Option<&str>, publish: &Publish) {
        let mut fanout = Fanout::default();
        match glob {
            None => {
                if let Some(subs) = self.exact.get(key) {
                    deliver(subs.iter(), publish, &mut fanout);
                }
            }
            Some(glob) => self.fan_out_to_watchers(key, publish, &mut fanout, |w| {
                w.glob.as_deref() == Some(glob)
            }),
        }
    }

    /// How many subscribers a key has exactly (not counting patterns).
    pub fn exact_subscribers(&self, key: &str) -> usize {
        self.exact.get(key).map_or(0, |s| s.len())
    }
}

impl Service for Topics {
    fn check_send(&self, key: &str) -> Result<(), SessionError> {
        Ok(check_publish_key(key)?)
    }

    fn subscribe(&self, request: SubscribeRequest<'_>) -> Result<Option<Pending>, SessionError> {
        check_subscribe_key(request.key)?;
        self.add(request.key, request.subscriber);
        // With `--cluster`, the RECEIPT waits until this node listens to the key in Redis:
        // what is published anywhere after it reaches the subscriber.
        let Some(cluster) = self.cluster.get() else {
            return Ok(None);
        };
        let (pending, answer) = pending();
        let (listening, timeout) = (cluster.listening(), cluster.timeout());
        tokio::spawn(async move {
            // Without Redis, local subscribers are served meanwhile; the bus listens once
            // it is back.
            let _ = tokio::time::timeout(timeout, listening).await;
            answer.complete(Ok(None));
        });
        Ok(Some(pending))
    }

    fn unsubscribe(&self, key: &str, subscriber: &Subscriber) {
        self.remove(key, subscriber);
    }

    fn publish(&self, request: PublishRequest<'_>) -> Result<Published, SessionError> {
        let publish = request.message(request.destination, &[]);
        let fanout = self.fan_out(request.key, &publish);
        if let Some(cluster) = self.cluster.get() {
            cluster.publish_topic(request.key, &publish);
        }
        Ok(Published {
            message_id: request.message_id,
            seq: None,
            fanout,
            durable: false,
            pending: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use stomp_codec::{Headers, Version};

    use super::*;
    use crate::message::SessionId;
    use crate::outbox::Outbox;

    fn subscriber(session: u64, key: u32, outbox: &Arc<Outbox>) -> Subscriber {
        Subscriber {
            session: SessionId(session),
            key,
            user: Arc::from("u"),
            outbox: outbox.clone(),
            head: Bytes::from(format!("MESSAGE\nsubscription:{key}\n")),
            version: Version::V1_2,
            needs_ack: false,
            viewer: None,
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

    fn outbox() -> Arc<Outbox> {
        Arc::new(Outbox::new(1 << 20))
    }

    #[test]
    fn exact_and_wildcard_subscribers_get_what_they_match() {
        let topics = Topics::new();
        let (a, b, c, d) = (outbox(), outbox(), outbox(), outbox());
        topics.add("room.lobby", subscriber(1, 0, &a));
        topics.add("room.*", subscriber(2, 0, &b));
        topics.add("room.#", subscriber(3, 0, &c));
        topics.add("room.other", subscriber(4, 0, &d));
        assert_eq!(topics.fan_out("room.lobby", &publish(1)).delivered, 3);
        assert_eq!(
            topics.fan_out("room.lobby.thread", &publish(2)).delivered,
            1
        );
        assert_eq!(topics.fan_out("room", &publish(3)).delivered, 1);
        assert_eq!(
            (drained(&a), drained(&b), drained(&c), drained(&d)),
            (1, 1, 3, 0)
        );
    }

    #[test]
    fn remove_takes_out_only_that_subscription() {
        let topics = Topics::new();
        let a = outbox();
        topics.add("t", subscriber(1, 0, &a));
        topics.add("t", subscriber(1, 1, &a));
        topics.add("t.*", subscriber(1, 2, &a));
        assert!(topics.remove("t", &subscriber(1, 0, &a)));
        assert!(!topics.remove("t", &subscriber(1, 0, &a)));
        assert!(topics.remove("t.*", &subscriber(1, 2, &a)));
        assert_eq!(topics.fan_out("t", &publish(1)).delivered, 1);
        assert!(topics.remove("t", &subscriber(1, 1, &a)));
        assert_eq!(topics.exact_subscribers("t"), 0);
    }

    #[test]
    fn a_full_outbox_refuses_without_affecting_others() {
        let topics = Topics::new();
        let small = Arc::new(Outbox::new(10));
        let big = outbox();
        topics.add("t", subscriber(1, 0, &small));
        topics.add("t", subscriber(2, 0, &big));
        // An empty outbox takes one message whatever its size; the next does not fit.
        assert_eq!(topics.fan_out("t", &publish(1)).delivered, 2);
        let fanout = topics.fan_out("t", &publish(2));
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
