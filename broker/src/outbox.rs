//! The bounded per-connection queue of frames waiting to be written.
//!
//! In: encoded frames offered by any task (the router fanning out a publish, the session
//! answering its own client), and [`Backlog`]s (replays) that make their frames when the
//! writer reaches them. Out: batches taken by the connection's writer, which writes them all
//! and flushes once. Never blocks a producer: when the queued bytes would pass the limit,
//! the offer is refused and the outbox turns *slow*, which closes the connection with ERROR
//! "slow consumer".

use std::collections::VecDeque;
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::error::SessionError;

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

/// Frames made on demand and written at the pace of the client's socket: a room's replay, the
/// direct messages that waited for their user. A backlog sits in the outbox in order with
/// the frames around it; the writer pulls a batch from it whenever it reaches it, so however
/// long it is, it never counts against the outbox's limit.
pub trait Backlog: Send + fmt::Debug {
    /// The connection-local number of the subscription it delivers to.
    fn subscription(&self) -> u32;

    /// Appends the next frames to `batch`, about `max_bytes` of them (at least one if any
    /// is left); `false` once nothing is left.
    fn fill(&mut self, batch: &mut Vec<Outgoing>, max_bytes: usize) -> bool;
}

/// Moves frames made from `items` into `batch` until about `max_bytes` were made (at least
/// one if any is left); whether any is left: the usual [`Backlog::fill`].
pub fn fill_from<T>(
    items: &mut VecDeque<T>,
    batch: &mut Vec<Outgoing>,
    max_bytes: usize,
    mut frame: impl FnMut(T) -> Outgoing,
) -> bool {
    let mut bytes = 0;
    while bytes < max_bytes {
        let Some(item) = items.pop_front() else {
            break;
        };
        let made = frame(item);
        bytes += made.len();
        batch.push(made);
    }
    !items.is_empty()
}

/// Why something outside the connection ends it (see [`Outbox::end`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum End {
    /// The user's account was removed or its password changed.
    Revoked = 1,
    /// A change this connection asked for could not reach the cluster's shared state in
    /// time (`--cluster-timeout-ms`).
    ClusterUnavailable = 2,
    /// This node was declared dead by the others (it froze) and closes its sessions.
    MembershipLost = 3,
    /// A direct message found its user's queue full (`--cluster`, where the answer comes
    /// from Redis after the SEND was handled).
    UserQueueFull = 4,
    /// A durable queue was full (`--cluster`, the answer coming from Redis).
    QueueFull = 5,
    /// An operator closed the session (`/admin`).
    ClosedByOperator = 6,
}

/// About how many bytes the writer pulls from a backlog per batch.
pub const BACKLOG_BATCH_BYTES: usize = 64 * 1024;

#[derive(Debug)]
enum Entry {
    Frame(Outgoing),
    Backlog(Box<dyn Backlog>),
}

#[derive(Debug, Default)]
struct Inner {
    queue: VecDeque<Entry>,
    /// Bytes of the frames in `queue` (backlogs count nothing).
    bytes: usize,
    /// Replies to the client's own frames among `queue`: never held for coalescing.
    replies: usize,
    /// Backlogs in `queue`, and the one the writer may be filling from.
    backlogs: usize,
    /// The subscription of the backlog the writer is filling from, outside the lock.
    filling: Option<u32>,
    /// Whether that backlog was cancelled meanwhile.
    filling_cancelled: bool,
    /// When the oldest MESSAGE queued since the last write was offered (its publish), for
    /// the delivery latency: one clock read per wake-up, not per frame.
    since: Option<Instant>,
    /// No more offers (the connection is ending); what is queued may still be written.
    sealed: bool,
    closed: bool,
}

/// A bounded queue of outgoing frames for one connection.
#[derive(Debug)]
pub struct Outbox {
    inner: Mutex<Inner>,
    notify: Notify,
    limit_bytes: usize,
    /// Set once an offer was refused: read without the lock before every frame handled.
    slow: AtomicBool,
    /// An [`End`] set from outside, or 0.
    end: AtomicU8,
}

impl Outbox {
    /// An empty outbox that holds at most `limit_bytes` of frames, or one frame of any size
    /// when it holds none (a message as large as the frame limit allows must not cut off
    /// every subscriber).
    pub fn new(limit_bytes: usize) -> Outbox {
        Outbox {
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            limit_bytes,
            slow: AtomicBool::new(false),
            end: AtomicU8::new(0),
        }
    }

    /// Asks the connection to end with `reason` (its writer is woken and sends the ERROR):
    /// the one handle on a connection that everyone reaching it holds.
    pub fn end(&self, reason: End) {
        self.end.store(reason as u8, Ordering::Release);
        self.notify.notify_one();
    }

    /// Why the connection was asked to end, if it was.
    pub fn ended(&self) -> Option<End> {
        match self.end.load(Ordering::Acquire) {
            1 => Some(End::Revoked),
            2 => Some(End::ClusterUnavailable),
            3 => Some(End::MembershipLost),
            4 => Some(End::UserQueueFull),
            5 => Some(End::QueueFull),
            6 => Some(End::ClosedByOperator),
            _ => None,
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
        if inner.sealed || inner.closed || self.is_slow() {
            return false;
        }
        if inner.bytes > 0 && inner.bytes + len > self.limit_bytes {
            self.slow.store(true, Ordering::Release);
            drop(inner);
            self.notify.notify_one();
            return false;
        }
        let was_empty = inner.queue.is_empty();
        let reply = matches!(frame, Outgoing::Frame(_));
        if !reply && inner.since.is_none() {
            inner.since = Some(Instant::now());
        }
        inner.bytes += len;
        inner.replies += usize::from(reply);
        inner.queue.push_back(Entry::Frame(frame));
        drop(inner);
        // One wake-up per batch: the writer takes everything queued when it runs. A reply
        // wakes it again, in case it is holding the batch back (see `may_hold`).
        if was_empty || reply {
            self.notify.notify_one();
        }
        true
    }

    /// Queues a backlog after everything queued so far; frames offered later follow it.
    /// Hands it back when it is refused (the connection is ending or slow), so that the
    /// caller can keep what it holds.
    ///
    /// A backlog is dropped outside this outbox's lock, whenever it goes: it may hand
    /// messages back to a service, whose lock is taken before this one when it offers.
    pub fn offer_backlog<B: Backlog + 'static>(&self, backlog: B) -> Result<(), B> {
        let mut inner = self.lock();
        if inner.sealed || inner.closed || self.is_slow() {
            return Err(backlog);
        }
        inner.backlogs += 1;
        inner.queue.push_back(Entry::Backlog(Box::new(backlog)));
        drop(inner);
        self.notify.notify_one();
        Ok(())
    }

    /// Moves the next batch into `batch` (appending) and returns how many frames it took:
    /// every queued frame up to the first backlog, or, when a backlog is first, a batch
    /// pulled from it.
    pub fn take_all(&self, batch: &mut Vec<Outgoing>) -> usize {
        self.take_timed(batch).0
    }

    /// [`Outbox::take_all`], and, when the batch empties the queue, when its oldest MESSAGE
    /// was queued (`None` when it holds none, or when some stay queued: then the next batch
    /// that empties it answers for them).
    pub fn take_timed(&self, batch: &mut Vec<Outgoing>) -> (usize, Option<Instant>) {
        let start = batch.len();
        let mut finished: Vec<Box<dyn Backlog>> = Vec::new();
        let mut inner = self.lock();
        loop {
            match inner.queue.pop_front() {
                None => break,
                Some(Entry::Frame(frame)) => {
                    inner.bytes -= frame.len();
                    inner.replies -= usize::from(matches!(frame, Outgoing::Frame(_)));
                    batch.push(frame);
                }
                Some(Entry::Backlog(backlog)) if batch.len() > start => {
                    inner.queue.push_front(Entry::Backlog(backlog));
                    break;
                }
                Some(Entry::Backlog(mut backlog)) => {
                    // Filled without the lock: a room's replay locks the room, and the
                    // room's publishers hold that lock when they offer here.
                    inner.filling = Some(backlog.subscription());
                    drop(inner);
                    let more = backlog.fill(batch, BACKLOG_BATCH_BYTES);
                    inner = self.lock();
                    inner.filling = None;
                    let cancelled = std::mem::take(&mut inner.filling_cancelled);
                    if more && !cancelled && !inner.closed {
                        inner.queue.push_front(Entry::Backlog(backlog));
                    } else {
                        inner.backlogs -= 1;
                        finished.push(backlog);
                    }
                    if batch.len() > start {
                        break;
                    }
                }
            }
        }
        let since = if inner.queue.is_empty() {
            inner.since.take()
        } else {
            None
        };
        drop(inner);
        drop(finished);
        (batch.len() - start, since)
    }

    /// Drops the backlogs of subscription `key` that have not finished (after UNSUBSCRIBE).
    pub fn cancel(&self, key: u32) {
        let mut inner = self.lock();
        if inner.backlogs == 0 {
            return;
        }
        let before = inner.queue.len();
        let (kept, dropped): (VecDeque<Entry>, VecDeque<Entry>) = std::mem::take(&mut inner.queue)
            .into_iter()
            .partition(|e| !matches!(e, Entry::Backlog(b) if b.subscription() == key));
        inner.queue = kept;
        inner.backlogs -= before - inner.queue.len();
        if inner.filling == Some(key) {
            inner.filling_cancelled = true;
        }
        drop(inner);
        drop(dropped);
    }

    /// Drops every unfinished backlog (the connection ends on an error: what was queued
    /// behind them still goes out, then the ERROR).
    pub fn drop_backlogs(&self) {
        let mut inner = self.lock();
        if inner.backlogs == 0 {
            return;
        }
        let (kept, dropped): (VecDeque<Entry>, VecDeque<Entry>) = std::mem::take(&mut inner.queue)
            .into_iter()
            .partition(|e| matches!(e, Entry::Frame(_)));
        inner.queue = kept;
        inner.backlogs -= dropped.len();
        if inner.filling.is_some() {
            inner.filling_cancelled = true;
        }
        drop(inner);
        drop(dropped);
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

    /// Whether frames or backlogs are waiting.
    pub fn has_queued(&self) -> bool {
        !self.lock().queue.is_empty()
    }

    /// Whether the writer may hold what is queued back to coalesce writes: not when a reply
    /// to the client's own frames (CONNECTED, RECEIPT, ERROR) waits, nor while a backlog
    /// is being written, nor once slow.
    pub fn may_hold(&self) -> bool {
        let inner = self.lock();
        inner.replies == 0 && inner.backlogs == 0 && !self.is_slow()
    }

    /// Wakes the writer again (after it stopped with frames still queued).
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Whether a producer was refused because the limit was reached.
    pub fn is_slow(&self) -> bool {
        self.slow.load(Ordering::Acquire)
    }

    /// Refuses every later offer; what is queued may still be written (the connection is
    /// ending and its last frames go out).
    pub fn seal(&self) {
        self.lock().sealed = true;
    }

    /// Refuses every later offer and drops what is queued (the connection is gone).
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.since = None;
        let dropped = std::mem::take(&mut inner.queue);
        inner.bytes = 0;
        inner.replies = 0;
        inner.backlogs = 0;
        drop(inner);
        drop(dropped);
    }

    /// The most bytes it holds.
    pub fn limit(&self) -> usize {
        self.limit_bytes
    }

    /// Bytes queued now (frames; backlogs count nothing).
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }
}

impl From<End> for SessionError {
    fn from(end: End) -> SessionError {
        match end {
            End::Revoked => SessionError::SessionRevoked,
            End::ClusterUnavailable => SessionError::ClusterUnavailable,
            End::MembershipLost => SessionError::MembershipLost,
            End::UserQueueFull => SessionError::SharedUserQueueFull,
            End::QueueFull => SessionError::SharedQueueFull,
            End::ClosedByOperator => SessionError::ClosedByOperator,
        }
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
    fn an_empty_outbox_takes_one_frame_of_any_size() {
        let outbox = Outbox::new(100);
        assert!(outbox.offer(frame(500)), "a frame over the limit, alone");
        assert!(!outbox.offer(frame(1)), "nothing more behind it");
        assert!(outbox.is_slow());
    }

    /// A backlog of `count` frames of `size` bytes, noting when it is dropped.
    #[derive(Debug)]
    struct Counting {
        key: u32,
        left: usize,
        size: usize,
        dropped: std::sync::Arc<AtomicBool>,
    }

    impl Backlog for Counting {
        fn subscription(&self) -> u32 {
            self.key
        }

        fn fill(&mut self, batch: &mut Vec<Outgoing>, max_bytes: usize) -> bool {
            let mut bytes = 0;
            while self.left > 0 && (bytes == 0 || bytes + self.size <= max_bytes) {
                batch.push(frame(self.size));
                bytes += self.size;
                self.left -= 1;
            }
            self.left > 0
        }
    }

    impl Drop for Counting {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    fn counting(key: u32, left: usize, size: usize) -> (Counting, std::sync::Arc<AtomicBool>) {
        let dropped = std::sync::Arc::new(AtomicBool::new(false));
        let backlog = Counting {
            key,
            left,
            size,
            dropped: dropped.clone(),
        };
        (backlog, dropped)
    }

    fn lens(batch: &[Outgoing]) -> Vec<usize> {
        batch.iter().map(Outgoing::len).collect()
    }

    #[test]
    fn a_backlog_goes_out_in_order_a_batch_at_a_time_and_counts_nothing() {
        let outbox = Outbox::new(100);
        assert!(outbox.offer(frame(10)));
        // Far more than the limit, made as the writer gets to it.
        let (backlog, dropped) = counting(0, 100, BACKLOG_BATCH_BYTES / 4);
        outbox.offer_backlog(backlog).unwrap();
        assert!(outbox.offer(frame(20)), "frames after it still count alone");
        assert!(!outbox.may_hold(), "no coalescing while a backlog waits");
        let mut batch = Vec::new();
        assert_eq!(outbox.take_all(&mut batch), 1, "the frame before it, alone");
        assert_eq!(lens(&batch), [10]);
        let mut taken = 0;
        loop {
            batch.clear();
            assert!(outbox.take_all(&mut batch) > 0);
            if lens(&batch) == [20] {
                break;
            }
            assert_eq!(batch.len(), 4, "a batch's worth from the backlog");
            taken += batch.len();
        }
        assert_eq!(taken, 100, "all of it, then the frame behind it");
        assert!(dropped.load(Ordering::SeqCst));
        assert!(!outbox.has_queued());
        assert!(!outbox.is_slow());
    }

    #[test]
    fn a_cancelled_backlog_goes_and_the_others_stay() {
        let outbox = Outbox::new(100);
        let (first, first_dropped) = counting(1, 3, 10);
        let (second, second_dropped) = counting(2, 3, 10);
        outbox.offer_backlog(first).unwrap();
        outbox.offer_backlog(second).unwrap();
        outbox.cancel(1);
        assert!(first_dropped.load(Ordering::SeqCst));
        assert!(!second_dropped.load(Ordering::SeqCst));
        let mut batch = Vec::new();
        assert_eq!(outbox.take_all(&mut batch), 3);
        outbox.drop_backlogs();
        assert!(second_dropped.load(Ordering::SeqCst));
    }

    #[test]
    fn a_sealed_outbox_refuses_offers_and_keeps_what_it_holds() {
        let outbox = Outbox::new(100);
        assert!(outbox.offer(frame(10)));
        outbox.seal();
        assert!(!outbox.offer(frame(10)));
        assert!(outbox.offer_backlog(counting(0, 1, 1).0).is_err());
        assert!(!outbox.is_slow(), "a refusal after the seal is no slowness");
        assert_eq!(outbox.take_all(&mut Vec::new()), 1);
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
