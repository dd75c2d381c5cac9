//! User destinations: SEND to `/user/<user>/queue/<name>` reaches every session of `<user>`
//! subscribed to `/user/queue/<name>`; while none is, messages wait (durably, like a queue's)
//! and go, once, to the first such subscription.
//!
//! In: subscriptions (bound to the session's user) and SENDs. Out: MESSAGEs with
//! `destination:/user/queue/<name>`; waiting messages kept in the durable queue store, on
//! disk before the SEND's RECEIPT, until delivered.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::cluster::users::{Sent, UserBus, queue_key};
use crate::durable::{KeptQueue, QueueStore};
use crate::error::SessionError;
use crate::message::Publish;
use crate::message::check_user_name;
use crate::outbox::{Backlog, End, Mark, Outgoing, fill_from};
use crate::receipts::{Pending, pending};
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
    /// With `--cluster`: subscriptions waiting for Redis to take what waited for them,
    /// with the messages heard meanwhile (theirs after that).
    joining: Vec<(Subscriber, Vec<Arc<Publish>>)>,
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
    /// With `--cluster`: the user queues' side of the cluster, which keeps what waits.
    bus: OnceLock<Arc<UserBus>>,
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
                    waiting,
                    bytes,
                    ..UserQueue::default()
                },
            );
        }
        Users {
            queues: Arc::new(queues),
            store,
            limit,
            bus: OnceLock::new(),
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
    home: Home,
}

/// Where waiting messages go back to if they were not written.
#[derive(Debug)]
enum Home {
    /// This node's queue and durable store.
    Local {
        queue: QueueKey,
        queues: Arc<DashMap<QueueKey, UserQueue>>,
        store: Arc<QueueStore>,
    },
    /// The queue's list in Redis (`--cluster`).
    Shared { queue: String, bus: Arc<UserBus> },
}

impl Backlog for WaitingMessages {
    fn subscription(&self) -> u32 {
        self.stamp.key()
    }

    fn fill(&mut self, batch: &mut Vec<Outgoing>, max_bytes: usize) -> bool {
        let (stamp, home) = (&self.stamp, &self.home);
        fill_from(&mut self.messages, batch, max_bytes, |publish| {
            if let Home::Local { store, .. } = home {
                store.remove(publish.message_id);
            }
            stamp.publish(&publish, Mark::None)
        })
    }
}

impl Drop for WaitingMessages {
    fn drop(&mut self) {
        if self.messages.is_empty() {
            return;
        }
        match &self.home {
            Home::Local { queue, queues, .. } => {
                // Not written: they wait again, first in line.
                let mut queue = queues.entry(queue.clone()).or_default();
                for publish in self.messages.drain(..).rev() {
                    queue.bytes += publish.body().len();
                    queue.waiting.push_front(publish);
                }
            }
            Home::Shared { queue, bus } => {
                let messages: Vec<Publish> = self.messages.drain(..).collect();
                let (queue, bus) = (queue.clone(), bus.clone());
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move {
                        if let Err(e) = bus.give_back(&queue, &messages).await {
                            tracing::warn!(%queue, lost = messages.len(), "direct messages taken for a closed subscription could not be put back: {e}");
                        }
                    });
                }
            }
        }
    }
}

impl Users {
    /// Shares the user queues through `bus` from now on: what waits on this node's disk
    /// stays there, for when it runs alone again.
    pub fn attach(&self, bus: Arc<UserBus>) {
        if self.bus.set(bus).is_ok() {
            self.queues.clear();
        }
    }

    /// Takes a dead node's subscriptions out of the count, so that its users' messages wait.
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn reap(&self, node: &str, force: bool) -> redis::RedisResult<usize> {
        match self.bus.get() {
            Some(bus) => bus.reap(node, force).await,
            None => Ok(0),
        }
    }

    /// A direct message heard on queue `queue`'s channel (`<user>/<name>`).
    pub fn from_cluster(&self, queue: &str, publish: Publish) {
        let Some((user, name)) = queue.split_once('/') else {
            return;
        };
        let Some(mut entry) = self.queues.get_mut(&(user.to_owned(), name.to_owned())) else {
            return;
        };
        deliver(entry.listeners.iter(), &publish, &mut Fanout::default());
        if !entry.joining.is_empty() {
            let publish = Arc::new(publish);
            for (_, early) in &mut entry.joining {
                early.push(publish.clone());
            }
        }
    }

    fn subscribe_shared(
        &self,
        bus: &Arc<UserBus>,
        key: QueueKey,
        subscriber: Subscriber,
    ) -> Pending {
        let (pending, answer) = pending();
        let queue = queue_key(&key.0, &key.1);
        let field = UserBus::field(&queue, subscriber.session.0, subscriber.key);
        self.queues
            .entry(key.clone())
            .or_default()
            .joining
            .push((subscriber.clone(), Vec::new()));
        let (bus, queues) = (bus.clone(), self.queues.clone());
        tokio::spawn(async move {
            let timeout = bus.cluster().timeout();
            let deadline = Instant::now() + timeout;
            // Listening before taking what waited: what is sent after is heard.
            let _ = tokio::time::timeout(timeout, bus.listen_channel(&queue, true)).await;
            let mut backoff = Duration::from_millis(20);
            let taken = loop {
                match bus.listen(&queue, &field).await {
                    Ok(taken) => break Ok(taken),
                    Err(e)
                        if Instant::now() + backoff >= deadline || e.code() == Some("FENCED") =>
                    {
                        break Err(e);
                    }
                    Err(_) => {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                    }
                }
            };
            // What was taken for a subscription that left meanwhile waits again.
            let unclaimed = match queues.get_mut(&key) {
                None => {
                    answer.complete(Ok(None));
                    Some(taken)
                }
                Some(mut entry) => {
                    let at = entry
                        .joining
                        .iter()
                        .position(|(s, _)| s.is(subscriber.session, subscriber.key));
                    match at {
                        None => {
                            answer.complete(Ok(None));
                            Some(taken)
                        }
                        Some(at) => {
                            let (subscriber, early) = entry.joining.remove(at);
                            match taken {
                                Ok(taken) => {
                                    if !taken.is_empty() {
                                        let backlog = WaitingMessages {
                                            messages: taken.into(),
                                            stamp: subscriber.stamp(),
                                            home: Home::Shared {
                                                queue: queue.clone(),
                                                bus: bus.clone(),
                                            },
                                        };
                                        // Refused only when the connection is ending: the
                                        // backlog's drop puts them back.
                                        let _ = subscriber.outbox.offer_backlog(backlog);
                                    }
                                    for publish in early {
                                        subscriber.offer(&publish, false);
                                    }
                                    entry.listeners.push(subscriber);
                                    answer.complete(Ok(None));
                                }
                                Err(e) => {
                                    tracing::warn!(%queue, "cannot subscribe to a user queue in Redis: {e}");
                                    let end = if e.code() == Some("FENCED") {
                                        End::MembershipLost
                                    } else {
                                        End::ClusterUnavailable
                                    };
                                    subscriber.outbox.end(end);
                                    answer.complete(Err(end));
                                }
                            }
                            None
                        }
                    }
                }
            };
            if let Some(Ok(taken)) = unclaimed
                && !taken.is_empty()
            {
                let _ = bus.give_back(&queue, &taken).await;
            }
        });
        pending
    }

    fn unsubscribe_shared(&self, bus: &Arc<UserBus>, id: QueueKey, subscriber: &Subscriber) {
        let queue = queue_key(&id.0, &id.1);
        let last = match self.queues.get_mut(&id) {
            Some(mut entry) => {
                entry
                    .listeners
                    .retain(|s| !s.is(subscriber.session, subscriber.key));
                entry
                    .joining
                    .retain(|(s, _)| !s.is(subscriber.session, subscriber.key));
                entry.listeners.is_empty() && entry.joining.is_empty()
            }
            None => return,
        };
        if last {
            self.queues
                .remove_if(&id, |_, q| q.listeners.is_empty() && q.joining.is_empty());
            drop(bus.listen_channel(&queue, false));
        }
        let field = UserBus::field(&queue, subscriber.session.0, subscriber.key);
        let bus = bus.clone();
        tokio::spawn(async move {
            // Idempotent: tried until Redis takes it, or the node stops answering for good
            // (then the nodes that outlive it take it out).
            let mut backoff = Duration::from_millis(20);
            for _ in 0..40 {
                match bus.unlisten(&queue, &field).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::debug!(%queue, "taking back a user queue subscription: {e}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                }
            }
        });
    }

    fn publish_shared(
        &self,
        bus: &Arc<UserBus>,
        user: &str,
        name: &str,
        publish: Publish,
        message_id: u64,
    ) -> Published {
        let (pending, answer) = pending();
        bus.send(
            queue_key(user, name),
            &publish,
            Box::new(move |sent| {
                answer.complete(match sent {
                    Ok(Sent::Delivered | Sent::Kept) => Ok(None),
                    Ok(Sent::Full) => Err(End::UserQueueFull),
                    Err(()) => Err(End::ClusterUnavailable),
                });
            }),
        );
        Published {
            message_id,
            pending: Some(pending),
            ..Published::default()
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
        if let Some(bus) = self.bus.get() {
            return Ok(Some(self.subscribe_shared(bus, key, subscriber)));
        }
        let mut queue = self.queues.entry(key.clone()).or_default();
        // Under the queue's entry lock: messages that waited go to this first subscription,
        // once, before anything published after it.
        if !queue.waiting.is_empty() {
            let backlog = WaitingMessages {
                messages: std::mem::take(&mut queue.waiting),
                stamp: subscriber.stamp(),
                home: Home::Local {
                    queue: key,
                    queues: self.queues.clone(),
                    store: self.store.clone(),
                },
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
        if let Some(bus) = self.bus.get() {
            self.unsubscribe_shared(bus, id, subscriber);
            return;
        }
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
        if let Some(bus) = self.bus.get() {
            return Ok(self.publish_shared(bus, user, name, publish, request.message_id));
        }
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
