//! `/queue/<name>`: point to point and durable. Each message goes to one consumer, round
//! robin; messages wait while nobody listens; a message leaves the queue only when it is
//! acknowledged (or, for `ack:auto` consumers, delivered).
//!
//! In: SENDs (kept on disk by the [`QueueStore`] before their RECEIPT), consumers with an
//! ack mode and a `prefetch-count`, ACKs and NACKs (settled by the session), consumers
//! leaving. Out: MESSAGEs to consumers; NACKed and orphaned messages delivered again with
//! `redelivered:true`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use dashmap::DashMap;

use crate::cluster::queues::{Leased, Put, QueueBus};
use crate::durable::{KeptQueue, QueueStore};
use crate::error::SessionError;
use crate::message::{Publish, SessionId};
use crate::outbox::{End, Mark};
use crate::receipts::{Pending, pending};
use crate::service::{Fanout, PublishRequest, Published, Service, SubscribeRequest, Subscriber};

/// Queue limits.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Most messages (ready and unacknowledged) in one queue.
    pub max_messages: usize,
    /// Most body bytes in one queue.
    pub max_bytes: usize,
    /// Unacknowledged messages per client-ack consumer when SUBSCRIBE names no
    /// `prefetch-count`, and the most it may name.
    pub max_prefetch: usize,
}

#[derive(Debug, Clone)]
struct QueuedMessage {
    publish: Arc<Publish>,
    redelivered: bool,
}

impl QueuedMessage {
    fn id(&self) -> u64 {
        self.publish.message_id
    }

    fn size(&self) -> usize {
        self.publish.body().len()
    }
}

#[derive(Debug)]
struct Consumer {
    subscriber: Subscriber,
    prefetch: usize,
    in_flight: usize,
    /// With `--cluster`: asking Redis for messages now.
    pulling: bool,
    /// With `--cluster`: woken while asking (the answer may predate what woke it): ask
    /// again once the answer is in.
    again: bool,
}

impl Consumer {
    /// Whether one more message may go to it: under its prefetch, and its outbox not half
    /// full (so that a backlog paces itself to the socket instead of overflowing it).
    fn has_room(&self) -> bool {
        let outbox = &self.subscriber.outbox;
        self.in_flight < self.prefetch
            && (self.in_flight == 0 || outbox.queued_bytes() < outbox.limit() / 2)
    }
}

#[derive(Debug, Default)]
struct Queue {
    ready: VecDeque<QueuedMessage>,
    /// Delivered to a client-ack consumer, waiting for ACK or NACK.
    unacked: HashMap<u64, (QueuedMessage, SessionId, u32)>,
    consumers: Vec<Consumer>,
    next: usize,
    bytes: usize,
}

impl Queue {
    /// Takes message `id` out of those awaiting settlement, and frees its place in its
    /// consumer's prefetch; `None` if it was not awaiting it.
    fn settled(&mut self, id: u64) -> Option<(QueuedMessage, SessionId, u32)> {
        let (message, session, key) = self.unacked.remove(&id)?;
        if let Some(c) = self
            .consumers
            .iter_mut()
            .find(|c| c.subscriber.is(session, key))
        {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
        Some((message, session, key))
    }
}

/// A queue's figures for `GET /api/queues`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueueStats {
    /// The queue's name.
    pub queue: String,
    /// Messages waiting for a consumer.
    pub ready: usize,
    /// Messages delivered and not yet acknowledged.
    pub unacked: usize,
    /// Consumers subscribed.
    pub consumers: usize,
}

/// Every queue.
#[derive(Debug)]
pub struct Queues {
    queues: DashMap<String, Arc<Mutex<Queue>>>,
    store: Arc<QueueStore>,
    limits: QueueLimits,
    /// With `--cluster`: the queues' side of the cluster, which keeps the messages.
    bus: OnceLock<Arc<QueueBus>>,
}

fn lock(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    // Every mutation completes before another can look; a poisoned queue is still whole.
    queue
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Checks a queue name: 1 to 255 bytes, no control characters.
fn check_queue_name(name: &str) -> Result<(), SessionError> {
    if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
        return Err(SessionError::InvalidQueueName(
            name.chars().take(80).collect(),
        ));
    }
    Ok(())
}

impl Queues {
    /// Queues holding what `kept` recovered from the store. Recovered messages may have been
    /// delivered before the restart, so they go out marked `redelivered:true`.
    pub fn new(store: Arc<QueueStore>, kept: Vec<KeptQueue>, limits: QueueLimits) -> Queues {
        let queues = DashMap::new();
        for (name, messages) in kept {
            let mut queue = Queue::default();
            for m in messages {
                let publish = Arc::new(Publish::from_stored(m));
                queue.bytes += publish.body().len();
                queue.ready.push_back(QueuedMessage {
                    publish,
                    redelivered: true,
                });
            }
            queues.insert(name, Arc::new(Mutex::new(queue)));
        }
        Queues {
            queues,
            store,
            limits,
            bus: OnceLock::new(),
        }
    }

    /// The store, for receipts that must wait behind durable work.
    pub fn store(&self) -> &QueueStore {
        &self.store
    }

    fn queue(&self, name: &str) -> Arc<Mutex<Queue>> {
        super::shared_entry(&self.queues, name)
    }

    /// Every queue's figures, by name.
    pub fn stats(&self) -> Vec<QueueStats> {
        let mut list: Vec<QueueStats> = self
            .queues
            .iter()
            .map(|entry| {
                let q = lock(entry.value());
                QueueStats {
                    queue: entry.key().clone(),
                    ready: q.ready.len(),
                    unacked: q.unacked.len(),
                    consumers: q.consumers.len(),
                }
            })
            .collect();
        list.sort_by(|a, b| a.queue.cmp(&b.queue));
        list
    }

    /// Drops the messages waiting in queue `name`, in memory and on disk, or in Redis with
    /// `--cluster` (`/admin`); those delivered and not yet acknowledged stay. How many went,
    /// or `None` for no such queue.
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn purge(&self, name: &str) -> redis::RedisResult<Option<usize>> {
        if let Some(bus) = self.bus.get() {
            return bus.purge(name).await;
        }
        let Some(queue) = self.queues.get(name).map(|q| q.clone()) else {
            return Ok(None);
        };
        let mut q = lock(&queue);
        let purged = std::mem::take(&mut q.ready);
        for message in &purged {
            q.bytes -= message.size();
            self.store.remove(message.id());
        }
        Ok(Some(purged.len()))
    }

    /// Hands ready messages to consumers with room, round robin.
    fn dispatch(&self, q: &mut Queue) {
        while !q.ready.is_empty() && !q.consumers.is_empty() {
            let n = q.consumers.len();
            let Some(index) = (0..n)
                .map(|i| (q.next + i) % n)
                .find(|&i| q.consumers[i].has_room())
            else {
                return;
            };
            let Some(message) = q.ready.pop_front() else {
                return;
            };
            let consumer = &mut q.consumers[index];
            let mark = if message.redelivered {
                Mark::Redelivered
            } else {
                Mark::None
            };
            if !consumer.subscriber.offer_marked(&message.publish, mark) {
                // A full outbox: that connection is closing as a slow consumer, and its
                // unsubscribe will dispatch again.
                q.ready.push_front(message);
                return;
            }
            q.next = (index + 1) % n;
            // Every delivery waits for settling: an ACK or NACK in client modes, the write to
            // the socket for ack:auto (the session settles those as it writes them).
            consumer.in_flight += 1;
            let (session, key) = (consumer.subscriber.session, consumer.subscriber.key);
            q.unacked.insert(message.id(), (message, session, key));
        }
    }

    /// Settles messages a consumer ACKed (`ack`) or NACKed: ACKed ones leave the queue,
    /// NACKed ones go back to its front to be delivered again.
    pub fn settle_ids(&self, name: &str, ids: &[u64], ack: bool) {
        if let Some(bus) = self.bus.get() {
            self.settle_shared(bus, name, ids, ack);
            return;
        }
        let Some(queue) = self.queues.get(name).map(|q| q.clone()) else {
            return;
        };
        let mut q = lock(&queue);
        let mut requeue = Vec::new();
        for id in ids {
            let Some((message, _, _)) = q.settled(*id) else {
                continue;
            };
            if ack {
                q.bytes -= message.size();
                self.store.remove(*id);
            } else {
                requeue.push(message);
            }
        }
        requeue_front(&mut q, requeue);
        self.dispatch(&mut q);
    }
}

/// With `--cluster`: Redis keeps the messages and leases them to consumers anywhere; this
/// node keeps its own consumers and what they hold.
impl Queues {
    /// Shares the queues through `bus` from now on: what this node kept on its own disk
    /// stays there, for when it runs alone again.
    pub fn attach(&self, bus: Arc<QueueBus>) {
        if self.bus.set(bus).is_ok() {
            self.queues.clear();
        }
    }

    /// Every queue's figures, cluster-wide with `--cluster` (read from Redis).
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn stats_answer(&self) -> Result<Vec<QueueStats>, redis::RedisError> {
        let Some(bus) = self.bus.get() else {
            return Ok(self.stats());
        };
        Ok(bus
            .stats()
            .await?
            .into_iter()
            .map(|s| QueueStats {
                queue: s.queue,
                ready: s.ready,
                unacked: s.unacked,
                consumers: s.consumers,
            })
            .collect())
    }

    /// Hands a dead node's leases back and takes its consumers out (or this node's
    /// previous run's, `force`).
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn reap(&self, node: &str, force: bool) -> redis::RedisResult<usize> {
        match self.bus.get() {
            Some(bus) => bus.reap(node, force).await,
            None => Ok(0),
        }
    }

    /// Queue `name` may have messages ready: this node's consumers with room ask.
    pub fn wake(&self, name: &str) {
        let (Some(bus), Some(handle)) = (self.bus.get(), self.queues.get(name).map(|q| q.clone()))
        else {
            return;
        };
        pull(bus, name, &handle, &mut lock(&handle));
    }

    /// After the bus lost Redis and listened again: every queue with consumers here asks.
    pub fn wake_all(&self) {
        let names: Vec<String> = self.queues.iter().map(|e| e.key().clone()).collect();
        for name in names {
            self.wake(&name);
        }
    }

    fn subscribe_shared(&self, bus: &Arc<QueueBus>, name: &str, consumer: Consumer) -> Pending {
        let handle = self.queue(name);
        let mut q = lock(&handle);
        let first = q.consumers.is_empty();
        let sub = &consumer.subscriber;
        bus.consumer(name, QueueBus::field(name, sub.session.0, sub.key), true);
        q.consumers.push(consumer);
        let (pending, answer) = pending();
        if !first {
            pull(bus, name, &handle, &mut q);
            answer.complete(Ok(None));
            return pending;
        }
        drop(q);
        // The first consumer here: listening to the queue's wake-ups before the first ask,
        // so that nothing put in between is missed.
        let listening = bus.listen(name, true);
        let (bus, name, timeout) = (bus.clone(), name.to_owned(), bus.cluster().timeout());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(timeout, listening).await;
            pull(&bus, &name, &handle, &mut lock(&handle));
            answer.complete(Ok(None));
        });
        pending
    }

    fn unsubscribe_shared(&self, bus: &Arc<QueueBus>, key: &str, subscriber: &Subscriber) {
        let Some(handle) = self.queues.get(key).map(|q| q.clone()) else {
            return;
        };
        let mut q = lock(&handle);
        let before = q.consumers.len();
        q.consumers
            .retain(|c| !c.subscriber.is(subscriber.session, subscriber.key));
        if q.consumers.len() == before {
            return;
        }
        bus.consumer(
            key,
            QueueBus::field(key, subscriber.session.0, subscriber.key),
            false,
        );
        // What it held goes back to the front, for any consumer anywhere.
        let mut held: Vec<u64> = q
            .unacked
            .iter()
            .filter(|(_, (_, session, sub))| subscriber.is(*session, *sub))
            .map(|(id, _)| *id)
            .collect();
        held.sort_unstable();
        for id in &held {
            q.unacked.remove(id);
        }
        let owner = bus.owner(subscriber.session.0, subscriber.key);
        bus.settle(key, owner, held, false);
        if q.consumers.is_empty() && q.unacked.is_empty() {
            drop(q);
            self.queues.remove_if(key, |_, h| {
                lock(h).consumers.is_empty() && Arc::ptr_eq(h, &handle)
            });
            drop(bus.listen(key, false));
        }
    }

    fn settle_shared(&self, bus: &Arc<QueueBus>, name: &str, ids: &[u64], ack: bool) {
        let Some(handle) = self.queues.get(name).map(|q| q.clone()) else {
            return;
        };
        let mut q = lock(&handle);
        let mut by_owner: HashMap<(SessionId, u32), Vec<u64>> = HashMap::new();
        for id in ids {
            if let Some((_, session, key)) = q.settled(*id) {
                by_owner.entry((session, key)).or_default().push(*id);
            }
        }
        for ((session, key), mut ids) in by_owner {
            ids.sort_unstable();
            bus.settle(name, bus.owner(session.0, key), ids, ack);
        }
        // After a NACK the next ask waits for the hand-back's wake-up: asking now could
        // reach Redis first and take the message behind the one handed back.
        if ack {
            pull(bus, name, &handle, &mut q);
        }
    }

    fn publish_shared(&self, bus: &QueueBus, request: &PublishRequest<'_>) -> Published {
        let publish = request.message(request.destination, &[]);
        let (pending, answer) = pending();
        bus.put(
            request.key,
            &publish,
            Box::new(move |put| {
                answer.complete(match put {
                    Ok(Put::Kept) => Ok(None),
                    Ok(Put::Full) => Err(End::QueueFull),
                    Err(()) => Err(End::ClusterUnavailable),
                });
            }),
        );
        Published {
            message_id: request.message_id,
            pending: Some(pending),
            ..Published::default()
        }
    }
}

/// This node's consumers of queue `name` with room ask Redis for messages, one request
/// each at a time.
fn pull(bus: &Arc<QueueBus>, name: &str, handle: &Arc<Mutex<Queue>>, q: &mut Queue) {
    for consumer in &mut q.consumers {
        if consumer.pulling {
            consumer.again = true;
            continue;
        }
        // Asking costs a round trip to Redis: a consumer with a large prefetch asks once
        // half of it is free, for up to 256 at a time, not once per settled message.
        if !consumer.has_room() || consumer.in_flight > consumer.prefetch / 2 {
            continue;
        }
        consumer.pulling = true;
        let most = (consumer.prefetch - consumer.in_flight).clamp(1, 256);
        let (session, key) = (consumer.subscriber.session, consumer.subscriber.key);
        let owner = bus.owner(session.0, key);
        let (bus, name, handle) = (bus.clone(), name.to_owned(), handle.clone());
        tokio::spawn(async move {
            let leased = bus.take(&name, &owner, most).await;
            if let Err(e) = &leased {
                tracing::debug!(queue = %name, "asking Redis for queue messages: {e}");
                // Asked again on the next wake-up, or once the bus is back.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            leased_to(&bus, &name, &handle, (session, key), owner, most, leased);
        });
    }
}

/// Delivers what Redis leased to consumer `who`; hands back what it can no longer take.
fn leased_to(
    bus: &Arc<QueueBus>,
    name: &str,
    handle: &Arc<Mutex<Queue>>,
    (session, key): (SessionId, u32),
    owner: String,
    most: usize,
    leased: redis::RedisResult<Vec<Leased>>,
) {
    let mut q = lock(handle);
    let index = q
        .consumers
        .iter()
        .position(|c| c.subscriber.is(session, key));
    let leased = leased.unwrap_or_default();
    let got = leased.len();
    let mut back = Vec::new();
    for message in leased {
        let Some(consumer) = index.map(|i| &mut q.consumers[i]) else {
            back.push(message.id);
            continue;
        };
        let mark = if message.redelivered {
            Mark::Redelivered
        } else {
            Mark::None
        };
        let publish = Arc::new(message.publish);
        if !back.is_empty() || !consumer.subscriber.offer_marked(&publish, mark) {
            back.push(message.id);
            continue;
        }
        consumer.in_flight += 1;
        let queued = QueuedMessage {
            publish,
            redelivered: message.redelivered,
        };
        q.unacked.insert(message.id, (queued, session, key));
    }
    bus.settle(name, owner, back, false);
    if let Some(i) = index {
        let consumer = &mut q.consumers[i];
        consumer.pulling = false;
        // There may be more: it took all it asked for, or was woken meanwhile.
        if got == most || std::mem::take(&mut consumer.again) {
            pull(bus, name, handle, &mut q);
        }
    }
}

/// Puts messages back at the front, oldest first, marked redelivered.
fn requeue_front(q: &mut Queue, mut messages: Vec<QueuedMessage>) {
    messages.sort_by_key(QueuedMessage::id);
    for mut m in messages.into_iter().rev() {
        m.redelivered = true;
        q.ready.push_front(m);
    }
}

impl Service for Queues {
    fn check_send(&self, key: &str) -> Result<(), SessionError> {
        check_queue_name(key)
    }

    fn subscribe(&self, request: SubscribeRequest<'_>) -> Result<Option<Pending>, SessionError> {
        check_queue_name(request.key)?;
        let max = self.limits.max_prefetch;
        let prefetch = match request.prefetch {
            Some(n) if n > 0 => n.min(max),
            _ => max,
        };
        let consumer = Consumer {
            subscriber: request.subscriber,
            prefetch,
            in_flight: 0,
            pulling: false,
            again: false,
        };
        if let Some(bus) = self.bus.get() {
            return Ok(Some(self.subscribe_shared(bus, request.key, consumer)));
        }
        let queue = self.queue(request.key);
        let mut q = lock(&queue);
        q.consumers.push(consumer);
        self.dispatch(&mut q);
        Ok(None)
    }

    fn unsubscribe(&self, key: &str, subscriber: &Subscriber) {
        if let Some(bus) = self.bus.get() {
            self.unsubscribe_shared(bus, key, subscriber);
            return;
        }
        let Some(queue) = self.queues.get(key).map(|q| q.clone()) else {
            return;
        };
        let mut q = lock(&queue);
        q.consumers
            .retain(|c| !c.subscriber.is(subscriber.session, subscriber.key));
        // What it held unacknowledged goes to the others (1.2 "SUBSCRIBE ack Header").
        let orphans: Vec<u64> = q
            .unacked
            .iter()
            .filter(|(_, (_, session, sub))| subscriber.is(*session, *sub))
            .map(|(id, _)| *id)
            .collect();
        let requeue: Vec<QueuedMessage> = orphans
            .iter()
            .filter_map(|id| q.unacked.remove(id))
            .map(|(m, _, _)| m)
            .collect();
        requeue_front(&mut q, requeue);
        if q.next >= q.consumers.len() {
            q.next = 0;
        }
        self.dispatch(&mut q);
    }

    fn publish(&self, request: PublishRequest<'_>) -> Result<Published, SessionError> {
        if let Some(bus) = self.bus.get() {
            return Ok(self.publish_shared(bus, &request));
        }
        let name = request.key;
        let frame = request.frame;
        let queue = self.queue(name);
        let mut q = lock(&queue);
        let held = q.ready.len() + q.unacked.len();
        if held >= self.limits.max_messages || q.bytes + frame.body.len() > self.limits.max_bytes {
            return Err(SessionError::QueueFull {
                queue: name.to_owned(),
                messages: self.limits.max_messages,
                bytes: self.limits.max_bytes,
            });
        }
        let publish = Arc::new(request.message(request.destination, &[]));
        self.store.put(
            request.message_id,
            name,
            publish.to_stored(request.message_id),
        );
        q.bytes += frame.body.len();
        q.ready.push_back(QueuedMessage {
            publish,
            redelivered: false,
        });
        self.dispatch(&mut q);
        Ok(Published {
            message_id: request.message_id,
            seq: None,
            fanout: Fanout::default(),
            durable: true,
            pending: None,
        })
    }

    fn settle(&self, key: &str, _subscriber: &Subscriber, ids: &[u64], ack: bool) {
        self.settle_ids(key, ids, ack);
    }
}
