//! The bounded per-connection queue of frames waiting to be written.
//!
//! In: encoded frames offered by any task (the router fanning out a publish, the session
//! answering its own client). Out: batches taken by the connection's writer, which writes
//! them all and flushes once. Never blocks a producer: when the queued bytes would pass the
//! limit, the offer is refused and the outbox turns *slow*, which closes the connection with
//! ERROR "slow consumer".

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::Notify;

/// Marks a MESSAGE delivered to a subscription that must be acknowledged: the writer records
/// it as unacknowledged and writes the `ack` header for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckTag {
    /// The connection-local number of the subscription.
    pub subscription: u32,
    /// The broker-wide message id.
    pub message_id: u64,
}

/// One frame on its way out.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// A whole encoded frame (CONNECTED, RECEIPT, ERROR, ...). Always UTF-8.
    Frame(Bytes),
    /// A MESSAGE: the subscription's own head (`MESSAGE` and `subscription`), the `ack`
    /// header if the subscription needs one, then the publish's shared part.
    Message {
        /// `MESSAGE\nsubscription:<id>\n`, encoded once per subscription.
        head: Bytes,
        /// Set for client and client-individual subscriptions.
        ack: Option<AckTag>,
        /// Shared headers, body and NUL, encoded once per publish and version.
        tail: Bytes,
        /// Whether the whole frame is UTF-8 (goes out as a WebSocket text message).
        text: bool,
        /// A header this delivery adds: `x-replay:true` or `redelivered:true`.
        mark: Mark,
    },
}

impl Outgoing {
    /// Bytes this frame takes in the queue (close to its size on the wire).
    pub fn len(&self) -> usize {
        match self {
            Outgoing::Frame(bytes) => bytes.len(),
            Outgoing::Message {
                head,
                ack,
                tail,
                mark,
                ..
            } => head.len() + tail.len() + mark.header().len() + if ack.is_some() { 32 } else { 0 },
        }
    }

    /// Whether the frame is empty (never true for a real frame).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A header one delivery of a shared message adds to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Nothing.
    None,
    /// History replayed to a joining subscriber: `x-replay:true`.
    Replay,
    /// A queue message delivered again (after a NACK, a lost consumer or a restart):
    /// `redelivered:true`.
    Redelivered,
}

impl Mark {
    /// The header line, EOL included; empty for [`Mark::None`].
    pub fn header(self) -> &'static [u8] {
        match self {
            Mark::None => b"",
            Mark::Replay => b"x-replay:true\n",
            Mark::Redelivered => b"redelivered:true\n",
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    queue: VecDeque<Outgoing>,
    bytes: usize,
    /// Replies to the client's own frames among `queue`: never held for coalescing.
    replies: usize,
    slow: bool,
    closed: bool,
}

/// A bounded queue of outgoing frames for one connection.
#[derive(Debug)]
pub struct Outbox {
    inner: Mutex<Inner>,
    notify: Notify,
    limit_bytes: usize,
}

impl Outbox {
    /// An empty outbox that holds at most `limit_bytes` of frames.
    pub fn new(limit_bytes: usize) -> Outbox {
        Outbox {
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            limit_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the queue inconsistent (every
        // mutation is a single push, pop or flag), so a poisoned lock is still usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `frame` unless that would pass the limit. Returns whether it was queued; a
    /// refusal marks the outbox slow and wakes the writer, which closes the connection.
    pub fn offer(&self, frame: Outgoing) -> bool {
        let len = frame.len();
        let mut inner = self.lock();
        if inner.slow || inner.closed {
            return false;
        }
        if inner.bytes + len > self.limit_bytes {
            inner.slow = true;
            drop(inner);
            self.notify.notify_one();
            return false;
        }
        let was_empty = inner.queue.is_empty();
        let reply = matches!(frame, Outgoing::Frame(_));
        inner.bytes += len;
        inner.replies += usize::from(reply);
        inner.queue.push_back(frame);
        drop(inner);
        // One wake-up per batch: the writer takes everything queued when it runs. A reply
        // wakes it again, in case it is holding the batch back (see `may_hold`).
        if was_empty || reply {
            self.notify.notify_one();
        }
        true
    }

    /// Moves every queued frame into `batch` (appending) and returns how many.
    pub fn take_all(&self, batch: &mut Vec<Outgoing>) -> usize {
        let mut inner = self.lock();
        let n = inner.queue.len();
        batch.extend(inner.queue.drain(..));
        inner.bytes = 0;
        inner.replies = 0;
        n
    }

    /// Gives the queue's memory back if nothing is queued.
    pub fn shrink(&self) {
        let mut inner = self.lock();
        if inner.queue.is_empty() {
            inner.queue = VecDeque::new();
        }
    }

    /// Waits until something is queued or the outbox turned slow.
    ///
    /// # Cancel safety
    /// Safe in `select!`: a wake-up that is not consumed stays stored as a permit.
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    /// Whether frames are waiting.
    pub fn has_queued(&self) -> bool {
        !self.lock().queue.is_empty()
    }

    /// Whether the writer may hold what is queued back to coalesce writes: not when a reply
    /// to the client's own frames (CONNECTED, RECEIPT, ERROR) waits, nor once slow.
    pub fn may_hold(&self) -> bool {
        let inner = self.lock();
        inner.replies == 0 && !inner.slow
    }

    /// Wakes the writer again (after it stopped with frames still queued).
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Whether a producer was refused because the limit was reached.
    pub fn is_slow(&self) -> bool {
        self.lock().slow
    }

    /// Refuses every later offer and drops what is queued (the connection is gone).
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.queue.clear();
        inner.bytes = 0;
        inner.replies = 0;
    }

    /// The most bytes it holds.
    pub fn limit(&self) -> usize {
        self.limit_bytes
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Outgoing {
        Outgoing::Frame(Bytes::from(vec![b'x'; n]))
    }

    #[test]
    fn offers_past_the_limit_are_refused_and_mark_the_outbox_slow() {
        let outbox = Outbox::new(100);
        assert!(outbox.offer(frame(60)));
        assert!(outbox.offer(frame(40)));
        assert!(!outbox.is_slow());
        assert!(!outbox.offer(frame(1)));
        assert!(outbox.is_slow());
        // Once slow, nothing more is taken even if it would fit.
        let mut batch = Vec::new();
        assert_eq!(outbox.take_all(&mut batch), 2);
        assert!(!outbox.offer(frame(1)));
    }

    #[test]
    fn a_queued_reply_forbids_holding_until_it_is_taken() {
        let outbox = Outbox::new(1000);
        let message = Outgoing::Message {
            head: Bytes::from_static(b"MESSAGE\nsubscription:0\n"),
            ack: None,
            tail: Bytes::from_static(b"\nhi\0"),
            text: true,
            mark: Mark::None,
        };
        assert!(outbox.offer(message.clone()));
        assert!(outbox.may_hold());
        assert!(outbox.offer(frame(10)));
        assert!(!outbox.may_hold());
        let mut batch = Vec::new();
        outbox.take_all(&mut batch);
        assert!(outbox.offer(message));
        assert!(outbox.may_hold());
    }

    #[test]
    fn take_all_empties_the_queue_and_frees_its_bytes() {
        let outbox = Outbox::new(100);
        assert!(outbox.offer(frame(70)));
        let mut batch = Vec::new();
        outbox.take_all(&mut batch);
        assert_eq!(outbox.queued_bytes(), 0);
        assert!(outbox.offer(frame(70)));
    }

    #[test]
    fn shrinking_frees_an_empty_queue_only() {
        let outbox = Outbox::new(1000);
        assert!(outbox.offer(frame(10)));
        outbox.shrink();
        assert!(outbox.has_queued(), "a queued frame survives shrinking");
        outbox.take_all(&mut Vec::new());
        assert!(outbox.lock().queue.capacity() > 0);
        outbox.shrink();
        assert_eq!(outbox.lock().queue.capacity(), 0);
    }

    #[test]
    fn a_closed_outbox_takes_nothing() {
        let outbox = Outbox::new(100);
        outbox.close();
        assert!(!outbox.offer(frame(1)));
    }
}
