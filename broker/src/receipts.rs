//! RECEIPTs that wait, and the answers they wait for.
//!
//! A RECEIPT confirms its frame and every frame before it (STOMP 1.2 "RECEIPT"), so a
//! session's receipts go out in the order of the frames that asked for them, each once what
//! its frame handed elsewhere is done: a durable queue's write on disk, a room's message
//! kept in Redis (`--cluster`). [`Receipts`] holds them in that order; a [`Pending`] is one
//! answer still to come, which a service hands back with the publish and completes through
//! its [`Answer`] when the answer arrives.
//!
//! In: receipts with the number of answers each waits for, and the answers. Out: encoded
//! RECEIPTs on the session's outbox, in order. This module imports only leaves of its own
//! layer.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::BytesMut;
use stomp_codec::{Frame, Version, encode};
use tokio::sync::Notify;

use crate::outbox::{End, Outbox, Outgoing};

/// Why a question to the shared state (Redis) got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

/// An answer: the room sequence number the message was given, if it has one; or how the
/// session that asked must end (`cluster unavailable`, a full user queue).
pub type Settled = Result<Option<u64>, End>;

type Then = Box<dyn FnOnce(Settled) + Send>;

enum State {
    /// No answer yet; what to run when it comes.
    Waiting(Option<Then>),
    /// Answered before anyone asked.
    Done(Settled),
}

/// An answer still to come, held by the session that asked.
pub struct Pending(Arc<Mutex<State>>);

/// The other end of a [`Pending`]: whoever will know the answer completes it once.
pub struct Answer(Option<Arc<Mutex<State>>>);

impl fmt::Debug for Pending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pending")
    }
}

impl fmt::Debug for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Answer")
    }
}

fn lock_state(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every change is one assignment: a poisoned state is still whole.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A new pending answer and the handle that completes it.
pub fn pending() -> (Pending, Answer) {
    let state = Arc::new(Mutex::new(State::Waiting(None)));
    (Pending(state.clone()), Answer(Some(state)))
}

impl Pending {
    /// Runs `then` with the answer: at once if it came, otherwise when it comes (on the
    /// thread that completes it).
    pub fn then(self, then: impl FnOnce(Settled) + Send + 'static) {
        let mut state = lock_state(&self.0);
        match &mut *state {
            State::Done(settled) => {
                let settled = *settled;
                drop(state);
                then(settled);
            }
            State::Waiting(slot) => *slot = Some(Box::new(then)),
        }
    }
}

impl Answer {
    /// Completes the pending answer with `settled`.
    pub fn complete(mut self, settled: Settled) {
        self.finish(settled);
    }

    fn finish(&mut self, settled: Settled) {
        let Some(state) = self.0.take() else {
            return;
        };
        let mut state = lock_state(&state);
        let then = match &mut *state {
            State::Waiting(then) => then.take(),
            State::Done(_) => None,
        };
        *state = State::Done(settled);
        drop(state);
        if let Some(then) = then {
            then(settled);
        }
    }
}

impl Drop for Answer {
    /// An answer dropped without completing (its task ended) counts as a failure: nobody
    /// waits for ever.
    fn drop(&mut self) {
        self.finish(Err(End::ClusterUnavailable));
    }
}

/// A place in a session's order of receipts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

struct Slot {
    /// Answers still to come.
    waiting: usize,
    /// The RECEIPT, and the version it is encoded in; `None` once an answer failed (a
    /// failed write confirms nothing).
    receipt: Option<(Frame, Version)>,
}

#[derive(Default)]
struct Inner {
    /// The ticket of `slots[0]`.
    first: u64,
    slots: VecDeque<Slot>,
}

/// One session's RECEIPTs that wait, in order.
pub struct Receipts {
    inner: Mutex<Inner>,
    outbox: Arc<Outbox>,
    idle: Notify,
}

impl fmt::Debug for Receipts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receipts")
            .field("waiting", &self.lock().slots.len())
            .finish()
    }
}

impl Receipts {
    /// No receipt waiting; released ones go to `outbox`.
    pub fn new(outbox: Arc<Outbox>) -> Receipts {
        Receipts {
            inner: Mutex::new(Inner::default()),
            outbox,
            idle: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every change completes before the lock is let go: a poisoned queue is whole.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether no receipt waits (a new one may go out at once).
    pub fn is_idle(&self) -> bool {
        self.lock().slots.is_empty()
    }

    /// Queues `receipt` behind every waiting one, to go once `answers` answers came.
    pub fn open(&self, receipt: Frame, version: Version, answers: usize) -> Ticket {
        let mut inner = self.lock();
        let ticket = Ticket(inner.first + inner.slots.len() as u64);
        inner.slots.push_back(Slot {
            waiting: answers,
            receipt: Some((receipt, version)),
        });
        if answers == 0 {
            self.release(inner);
        }
        ticket
    }

    /// One answer for `ticket`: `ok` or not, with a room sequence number for its
    /// `x-seq` header.
    pub fn settle(&self, ticket: Ticket, ok: bool, seq: Option<u64>) {
        let mut inner = self.lock();
        let Some(index) = ticket.0.checked_sub(inner.first) else {
            return;
        };
        let Some(slot) = usize::try_from(index)
            .ok()
            .and_then(|i| inner.slots.get_mut(i))
        else {
            return;
        };
        slot.waiting = slot.waiting.saturating_sub(1);
        if !ok {
            slot.receipt = None;
        } else if let (Some(seq), Some((frame, _))) = (seq, slot.receipt.as_mut()) {
            let mut digits = itoa::Buffer::new();
            frame.headers.push("x-seq", digits.format(seq));
        }
        self.release(inner);
    }

    /// Sends every receipt at the front whose answers all came.
    fn release(&self, mut inner: MutexGuard<'_, Inner>) {
        while inner.slots.front().is_some_and(|s| s.waiting == 0) {
            let Some(slot) = inner.slots.pop_front() else {
                break;
            };
            inner.first += 1;
            if let Some((frame, version)) = slot.receipt {
                let mut buf = BytesMut::new();
                encode(&frame, version, &mut buf);
                self.outbox.offer(Outgoing::Frame(buf.freeze()));
            }
        }
        let idle = inner.slots.is_empty();
        drop(inner);
        if idle {
            self.idle.notify_waiters();
        }
    }

    /// Waits until no receipt waits.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.is_idle() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use stomp_codec::Command;

    use super::*;

    fn receipt(id: &str) -> Frame {
        Frame::new(Command::Receipt).with_header("receipt-id", id)
    }

    fn sent(outbox: &Outbox) -> Vec<String> {
        let mut batch = Vec::new();
        outbox.take_all(&mut batch);
        batch
            .into_iter()
            .map(|o| match o {
                Outgoing::Frame(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn receipts_go_out_in_order_once_their_answers_came() {
        let outbox = Arc::new(Outbox::new(1 << 16));
        let receipts = Receipts::new(outbox.clone());
        let first = receipts.open(receipt("1"), Version::V1_2, 1);
        let _second = receipts.open(receipt("2"), Version::V1_2, 0);
        let third = receipts.open(receipt("3"), Version::V1_2, 1);
        assert!(sent(&outbox).is_empty(), "the first still waits");
        receipts.settle(third, true, Some(7));
        assert!(sent(&outbox).is_empty(), "the third waits behind the first");
        receipts.settle(first, true, None);
        let out = sent(&outbox);
        assert_eq!(out.len(), 3, "{out:?}");
        assert!(out[0].contains("receipt-id:1\n"));
        assert!(out[1].contains("receipt-id:2\n"));
        assert!(out[2].contains("receipt-id:3\nx-seq:7\n"), "{}", out[2]);
        assert!(receipts.is_idle());
    }

    #[test]
    fn a_failed_answer_sends_no_receipt_and_lets_later_ones_go() {
        let outbox = Arc::new(Outbox::new(1 << 16));
        let receipts = Receipts::new(outbox.clone());
        let first = receipts.open(receipt("1"), Version::V1_2, 1);
        let _second = receipts.open(receipt("2"), Version::V1_2, 0);
        receipts.settle(first, false, None);
        let out = sent(&outbox);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out[0].contains("receipt-id:2\n"));
    }

    #[test]
    fn an_answer_reaches_whoever_asks_before_or_after_it_came() {
        let (early, answer) = pending();
        answer.complete(Ok(Some(3)));
        let (tx, rx) = std::sync::mpsc::channel();
        let tx2 = tx.clone();
        early.then(move |s| tx.send(s).unwrap());
        let (late, answer) = pending();
        late.then(move |s| tx2.send(s).unwrap());
        drop(answer);
        assert_eq!(rx.recv().unwrap(), Ok(Some(3)));
        assert_eq!(
            rx.recv().unwrap(),
            Err(End::ClusterUnavailable),
            "a dropped answer fails"
        );
    }
}
