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
use crate::router::{
    Fanout, Publish, PublishRequest, Published, Service, SubscribeRequest, Subscriber, deliver,
    message_headers,
};
use crate::session::{SessionError, check_user_name};

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
}

/// Every user queue.
#[derive(Debug)]
pub struct Users {
    queues: DashMap<(String, String), UserQueue>,
    store: Arc<QueueStore>,
    limit: usize,
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
    /// most `limit` waiting per queue.
    pub fn new(store: Arc<QueueStore>, kept: Vec<KeptQueue>, limit: usize) -> Users {
        let queues = DashMap::new();
        for (name, messages) in kept {
            let Some((user, queue)) = name
                .strip_prefix(STORE_PREFIX)
                .and_then(|rest| rest.split_once('/'))
            else {
                continue;
            };
            let waiting = messages.into_iter().map(Publish::from_stored).collect();
            queues.insert(
                (user.to_owned(), queue.to_owned()),
                UserQueue {
                    listeners: Vec::new(),
                    waiting,
                },
            );
        }
        Users {
            queues,
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

impl Service for Users {
    fn check_send(&self, key: &str) -> Result<(), SessionError> {
        let (user, _) = send_target(key)
            .ok_or_else(|| SessionError::InvalidUserDestination(format!("/user/{key}")))?;
        check_user_name(user).map(drop)
    }

    fn subscribe(&self, request: SubscribeRequest<'_>) -> Result<(), SessionError> {
        let name = subscribe_queue(request.key)
            .ok_or_else(|| SessionError::InvalidUserDestination(request.destination.to_owned()))?;
        let subscriber = request.subscriber;
        let mut queue = self
            .queues
            .entry((subscriber.user.to_string(), name.to_owned()))
            .or_default();
        // Under the queue's entry lock: messages that waited go to this first subscription,
        // once, before anything published after it.
        for publish in queue.waiting.drain(..) {
            subscriber.offer(&publish, false);
            self.store.remove(publish.message_id);
        }
        queue.listeners.push(subscriber);
        Ok(())
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
        let headers = message_headers(
            &delivered_as,
            request.message_id,
            &request.frame.headers,
            request.user,
            &[],
        );
        let publish = Publish::new(request.message_id, headers, request.frame.body.clone());
        let mut queue = self
            .queues
            .entry((user.to_owned(), name.to_owned()))
            .or_default();
        let mut fanout = Fanout::default();
        let mut durable = false;
        if queue.listeners.is_empty() {
            if queue.waiting.len() >= self.limit {
                return Err(SessionError::UserQueueFull {
                    destination: request.destination.to_owned(),
                    limit: self.limit,
                });
            }
            self.store.put(
                publish.message_id,
                &store_name(user, name),
                publish.to_stored(publish.message_id),
                None,
            );
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
