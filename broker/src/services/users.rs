//! User destinations: SEND to `/user/<user>/queue/<name>` reaches every session of `<user>`
//! subscribed to `/user/queue/<name>`; while none is, messages wait (durably, like a queue's)
//! and go, once, to the first such subscription.
//!
//! In: subscriptions (bound to the session's user) and SENDs. Out: MESSAGEs with
//! `destination:/user/queue/<name>`; waiting messages kept in the durable queue store, on
//! disk before the SEND's RECEIPT, until delivered.

use std::collections::VecDeque;
use std::sync::Arc;

use dashmap::DashMap;

use crate::durable::{KeptQueue, QueueStore};
use crate::error::SessionError;
use crate::message::Publish;
use crate::message::check_user_name;
use crate::outbox::{Backlog, Mark, Outgoing, fill_from};
use crate::receipts::Pending;
use crate::service::{
    Fanout, PublishRequest, Published, Service, Stamp, SubscribeRequest, Subscriber, deliver,
};

/// Store names of user queues start with this, which no queue name can (queue names have
/// no control characters).
const STORE_PREFIX: &str = "\u{1}user/";

/// The store's name for `user`'s queue `name`.
fn store_name(user: &str, name: &str) -> String {
    format!("{STORE_PREFIX}{user}/{name}")
}

/// Whether a kept queue belongs to user destinations.
pub fn is_user_queue(store_name: &str) -> bool {
    store_name.starts_with(STORE_PREFIX)
}

#[derive(Debug, Default)]
struct UserQueue {
    listeners: Vec<Subscriber>,
    waiting: VecDeque<Publish>,
    /// Bytes of the bodies in `waiting`.
    bytes: usize,
}

/// A user and one of their queue names.
type QueueKey = (String, String);

/// Every user queue.
#[derive(Debug)]
pub struct Users {
    queues: Arc<DashMap<QueueKey, UserQueue>>,
    store: Arc<QueueStore>,
    /// Most messages and most body bytes waiting per queue.
    limit: (usize, usize),
}

/// `queue/<name>`: the SUBSCRIBE side.
fn subscribe_queue(key: &str) -> Option<&str> {
    key.strip_prefix("queue/")
        .filter(|name| valid_queue_name(name))
}

/// `<user>/queue/<name>`: the SEND side.
fn send_target(key: &str) -> Option<(&str, &str)> {
    let (user, rest) = key.split_once('/')?;
    Some((user, subscribe_queue(rest)?))
}

fn valid_queue_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.contains('/')
        && !name.chars().any(char::is_control)
}

impl Users {
    /// User queues holding what the store kept for them (from [`is_user_queue`] names), at
    /// most `limit` (messages, body bytes) waiting per queue.
    pub fn new(store: Arc<QueueStore>, kept: Vec<KeptQueue>, limit: (usize, usize)) -> Users {
        let queues = DashMap::new();
        for (name, messages) in kept {
            let Some((user, queue)) = name
                .strip_prefix(STORE_PREFIX)
                .and_then(|rest| rest.split_once('/'))
            else {
                continue;
            };
            let waiting: VecDeque<Publish> =
                messages.into_iter().map(Publish::from_stored).collect();
            let bytes = waiting.iter().map(|p| p.body().len()).sum();
            queues.insert(
                (user.to_owned(), queue.to_owned()),
                UserQueue {
                    listeners: Vec::new(),
                    waiting,
                    bytes,
                },
            );
        }
        Users {
            queues: Arc::new(queues),
            store,
            limit,
        }
    }

    /// How many messages wait for `user`'s queue `name`.
    pub fn waiting(&self, user: &str, name: &str) -> usize {
        self.queues
            .get(&(user.to_owned(), name.to_owned()))
            .map_or(0, |q| q.waiting.len())
    }
}

/// The messages that waited for a user, going to their first subscription at the pace of
/// its socket. Each leaves the store as it is taken to be written; should the connection
/// end first, the rest wait again, ahead of anything that came meanwhile.
#[derive(Debug)]
struct WaitingMessages {
    messages: VecDeque<Publish>,
    stamp: Stamp,
    queue: QueueKey,
    queues: Arc<DashMap<QueueKey, UserQueue>>,
    store: Arc<QueueStore>,
}

impl Backlog for WaitingMessages {
    fn subscription(&self) -> u32 {
        self.stamp.key()
    }

    fn fill(&mut self, batch: &mut Vec<Outgoing>, max_bytes: usize) -> bool {
        let (stamp, store) = (&self.stamp, &self.store);
        fill_from(&mut self.messages, batch, max_bytes, |publish| {
            store.remove(publish.message_id);
            stamp.publish(&publish, Mark::None)
        })
    }
}

impl Drop for WaitingMessages {
    fn drop(&mut self) {
        if self.messages.is_empty() {
            return;
        }
        // Not written: they wait again, first in line.
        let mut queue = self.queues.entry(self.queue.clone()).or_default();
        for publish in self.messages.drain(..).rev() {
            queue.bytes += publish.body().len();
            queue.waiting.push_front(publish);
        }
    }
}

impl Service for Users {
    fn check_send(&self, key: &str) -> Result<(), SessionError> {
        let (user, _) = send_target(key)
            .ok_or_else(|| SessionError::InvalidUserDestination(format!("/user/{key}")))?;
        check_user_name(user).map(drop)
    }

    fn subscribe(&self, request: SubscribeRequest<'_>) -> Result<Option<Pending>, SessionError> {
        let name = subscribe_queue(request.key)
            .ok_or_else(|| SessionError::InvalidUserDestination(request.destination.to_owned()))?;
        let subscriber = request.subscriber;
        let key = (subscriber.user.to_string(), name.to_owned());
        let mut queue = self.queues.entry(key.clone()).or_default();
        // Under the queue's entry lock: messages that waited go to this first subscription,
        // once, before anything published after it.
        if !queue.waiting.is_empty() {
            let backlog = WaitingMessages {
                messages: std::mem::take(&mut queue.waiting),
                stamp: subscriber.stamp(),
                queue: key,
                queues: self.queues.clone(),
                store: self.store.clone(),
            };
            match subscriber.outbox.offer_backlog(backlog) {
                Ok(()) => queue.bytes = 0,
                // The connection is ending: they go on waiting (taken back here, under the
                // entry's lock, rather than by the backlog's drop, which would take it).
                Err(mut refused) => queue.waiting = std::mem::take(&mut refused.messages),
            }
        }
        queue.listeners.push(subscriber);
        Ok(None)
    }

    fn unsubscribe(&self, key: &str, subscriber: &Subscriber) {
        let Some(name) = subscribe_queue(key) else {
            return;
        };
        let id = (subscriber.user.to_string(), name.to_owned());
        if let Some(mut queue) = self.queues.get_mut(&id) {
            queue
                .listeners
                .retain(|s| !s.is(subscriber.session, subscriber.key));
        }
        self.queues
            .remove_if(&id, |_, q| q.listeners.is_empty() && q.waiting.is_empty());
    }

    fn publish(&self, request: PublishRequest<'_>) -> Result<Published, SessionError> {
        let (user, name) = send_target(request.key)
            .ok_or_else(|| SessionError::InvalidUserDestination(request.destination.to_owned()))?;
        let delivered_as = format!("/user/queue/{name}");
        let publish = request.message(&delivered_as, &[]);
        let mut queue = self
            .queues
            .entry((user.to_owned(), name.to_owned()))
            .or_default();
        let mut fanout = Fanout::default();
        let mut durable = false;
        if queue.listeners.is_empty() {
            let (messages, bytes) = self.limit;
            let size = publish.body().len();
            if queue.waiting.len() >= messages || queue.bytes + size > bytes {
                return Err(SessionError::UserQueueFull {
                    destination: request.destination.to_owned(),
                    messages,
                    bytes,
                });
            }
            self.store.put(
                publish.message_id,
                &store_name(user, name),
                publish.to_stored(publish.message_id),
            );
            queue.bytes += size;
            queue.waiting.push_back(publish);
            durable = true;
        } else {
            deliver(queue.listeners.iter(), &publish, &mut fanout);
        }
        Ok(Published {
            message_id: request.message_id,
            seq: None,
            fanout,
            durable,
            pending: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_destinations_parse() {
        assert_eq!(subscribe_queue("queue/dm"), Some("dm"));
        assert_eq!(subscribe_queue("queue/"), None);
        assert_eq!(subscribe_queue("queue/a/b"), None);
        assert_eq!(subscribe_queue("alice/queue/dm"), None);
        assert_eq!(send_target("alice/queue/dm"), Some(("alice", "dm")));
        assert_eq!(send_target("민수/queue/dm"), Some(("민수", "dm")));
        assert_eq!(send_target("queue/dm"), None);
        assert_eq!(send_target("alice/topic/dm"), None);
        assert!(is_user_queue(&store_name("alice", "dm")));
        assert!(!is_user_queue("dm"));
    }
}
