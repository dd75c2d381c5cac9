//! One background thread that owns a database connection and applies operations in order,
//! in batches: what the two stores share.
//!
//! In: operations sent from any thread. Out: the thread's `run` function sees them in order;
//! dropping the [`WriterThread`] lets it finish what was sent and joins it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Instant;

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::Notify;

/// Whether a writer thread's last commit reached the disk (`/readyz`), and how long its
/// commits take (`/metrics`).
#[derive(Debug)]
pub struct Health {
    failing: std::sync::atomic::AtomicBool,
    commit_seconds: Histogram,
}

impl Default for Health {
    fn default() -> Health {
        Health {
            failing: std::sync::atomic::AtomicBool::new(false),
            // 50 µs to about 3 s.
            commit_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
        }
    }
}

impl Health {
    /// Notes how the last commit went.
    pub fn record(&self, written: bool) {
        self.failing.store(!written, Ordering::Relaxed);
    }

    /// Notes a commit that took `took`.
    pub fn record_commit(&self, written: bool, took: std::time::Duration) {
        self.record(written);
        self.commit_seconds.observe(took.as_secs_f64());
    }

    /// How long commits took, for `/metrics` (the same histogram, shared).
    pub fn commit_seconds(&self) -> Histogram {
        self.commit_seconds.clone()
    }

    /// Whether the last commit (if any) was written.
    pub fn is_ok(&self) -> bool {
        !self.failing.load(Ordering::Relaxed)
    }
}

/// A writer thread and the channel to it.
pub struct WriterThread<Op> {
    ops: Mutex<Option<Sender<Op>>>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl<Op> std::fmt::Debug for WriterThread<Op> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let running = unpoisoned(&self.handle).is_some();
        f.debug_struct("WriterThread")
            .field("running", &running)
            .finish()
    }
}

fn unpoisoned<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each critical section is one take or one send: a poisoned lock is still consistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<Op: Send + 'static> WriterThread<Op> {
    /// Starts thread `name` running `run` over the operations sent to it.
    ///
    /// # Errors
    /// The OS refused the thread.
    pub fn spawn(
        name: &str,
        run: impl FnOnce(Receiver<Op>) + Send + 'static,
    ) -> std::io::Result<WriterThread<Op>> {
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(rx))?;
        Ok(WriterThread {
            ops: Mutex::new(Some(tx)),
            handle: Mutex::new(Some(handle)),
        })
    }

    /// Whether the thread still runs (it ends only when dropped, or by a panic).
    pub fn is_running(&self) -> bool {
        unpoisoned(&self.handle)
            .as_ref()
            .is_some_and(|handle| !handle.is_finished())
    }

    /// Hands `op` to the thread; `false` if it has stopped.
    pub fn send(&self, op: Op) -> bool {
        unpoisoned(&self.ops)
            .as_ref()
            .is_some_and(|tx| tx.send(op).is_ok())
    }
}

impl<Op> Drop for WriterThread<Op> {
    fn drop(&mut self) {
        // Closing the channel ends the thread after everything sent before.
        unpoisoned(&self.ops).take();
        if let Some(handle) = unpoisoned(&self.handle).take() {
            let _ = handle.join();
        }
    }
}

/// The next operation and whatever else is waiting, at most `max` operations in all, and
/// no more once they weigh `max_bytes` (the one that passes it is taken: a batch always
/// holds at least one); `None` once every sender is gone.
///
/// With `gather_until` set, and unless the first operation is `urgent`, the thread sleeps
/// until then before taking the rest: a steady stream is then committed in a few large
/// transactions instead of many small ones, and the thread wakes once per batch rather than
/// once per operation. The caller sets it one linger after it took its previous batch, so the
/// time spent writing that batch counts towards the wait: however fast operations come, a
/// batch of `max` every linger is taken. An urgent operation arriving meanwhile waits until
/// `gather_until` at most.
pub fn next_batch<Op>(
    rx: &Receiver<Op>,
    (max, max_bytes): (usize, usize),
    weight: impl Fn(&Op) -> usize,
    gather_until: Option<Instant>,
    urgent: impl Fn(&Op) -> bool,
) -> Option<Vec<Op>> {
    let first = rx.recv().ok()?;
    if let Some(until) = gather_until
        && !urgent(&first)
    {
        let wait = until.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
    let mut bytes = weight(&first);
    let mut batch = vec![first];
    while batch.len() < max && bytes < max_bytes {
        match rx.try_recv() {
            Ok(op) => {
                bytes += weight(&op);
                batch.push(op);
            }
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Bytes handed to a writer thread and not yet taken by it, with a way for producers to wait
/// until they are under a limit again: back-pressure on whoever feeds the thread, so that a
/// disk slower than the network cannot make memory grow without bound.
#[derive(Debug)]
pub struct Pending {
    bytes: AtomicUsize,
    limit: usize,
    under: Notify,
}

impl Pending {
    /// Nothing pending; producers wait once more than `limit` bytes are.
    pub fn new(limit: usize) -> Pending {
        Pending {
            bytes: AtomicUsize::new(0),
            limit,
            under: Notify::new(),
        }
    }

    /// `n` more bytes handed over.
    pub fn add(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` bytes taken by the thread; wakes the waiting producers once under the limit.
    pub fn sub(&self, n: usize) {
        let before = self.bytes.fetch_sub(n, Ordering::Relaxed);
        if before > self.limit && before - n <= self.limit {
            self.under.notify_waiters();
        }
    }

    /// Whether more than the limit is pending.
    pub fn is_over(&self) -> bool {
        self.bytes.load(Ordering::Relaxed) > self.limit
    }

    /// Bytes pending now.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Returns once no more than the limit is pending.
    ///
    /// # Cancel safety
    /// Safe in `select!`: it holds nothing but a wait.
    pub async fn until_under(&self) {
        loop {
            let under = self.under.notified();
            tokio::pin!(under);
            // Registered before the check: a wake-up between the two is not lost.
            under.as_mut().enable();
            if !self.is_over() {
                return;
            }
            under.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_the_last_commit() {
        let health = Health::default();
        assert!(health.is_ok(), "nothing written yet is no failure");
        health.record(false);
        assert!(!health.is_ok());
        health.record(true);
        assert!(health.is_ok());
    }
    use std::time::Duration;

    #[test]
    fn a_batch_takes_what_waits_and_an_urgent_first_operation_does_not_linger() {
        let (tx, rx) = mpsc::channel();
        for n in [0, 1, 2] {
            tx.send(n).unwrap();
        }
        // 0 is urgent: no sleep, whatever the deadline (a broken rule would sleep 10 s).
        let started = Instant::now();
        let long = Duration::from_secs(10);
        let later = Some(started + long);
        assert_eq!(
            next_batch(&rx, (10, usize::MAX), |_| 0, later, |n| *n == 0),
            Some(vec![0, 1, 2])
        );
        assert!(started.elapsed() < long / 2);
        tx.send(3).unwrap();
        tx.send(4).unwrap();
        let soon = Some(Instant::now() + Duration::from_millis(1));
        assert_eq!(
            next_batch(&rx, (10, usize::MAX), |_| 0, soon, |n| *n == 0),
            Some(vec![3, 4])
        );
        drop(tx);
        assert_eq!(
            next_batch(&rx, (10, usize::MAX), |_| 0, soon, |n| *n == 0),
            None
        );
    }

    #[test]
    fn a_batch_gathers_until_its_deadline_and_not_after_it() {
        let (tx, rx) = mpsc::channel();
        let linger = Duration::from_millis(30);
        tx.send(1).unwrap();
        let started = Instant::now();
        assert_eq!(
            next_batch(
                &rx,
                (10, usize::MAX),
                |_| 0,
                Some(started + linger),
                |_| false
            ),
            Some(vec![1])
        );
        assert!(started.elapsed() >= linger, "gathered until the deadline");
        // A deadline already past (the previous batch took longer than a linger to write)
        // takes what waits at once: a fixed sleep per batch would cap the writer at `max`
        // operations per linger plus write time, and it would fall ever further behind.
        tx.send(2).unwrap();
        let long = Duration::from_secs(10);
        let started = Instant::now();
        let past = started.checked_sub(long);
        assert!(past.is_some());
        assert_eq!(
            next_batch(&rx, (10, usize::MAX), |_| 0, past, |_| false),
            Some(vec![2])
        );
        assert!(started.elapsed() < long / 2);
    }

    #[test]
    fn a_batch_stops_once_its_operations_weigh_max_bytes() {
        let (tx, rx) = mpsc::channel();
        for n in [5, 0, 7, 1, 1] {
            tx.send(n).unwrap();
        }
        // 5 + 0 + 7 passes 10 with the third: it is taken, the fourth is not.
        assert_eq!(
            next_batch(&rx, (10, 10), |n| *n, None, |_| false),
            Some(vec![5, 0, 7])
        );
        // One heavier than the limit still makes a batch of its own.
        tx.send(50).unwrap();
        assert_eq!(
            next_batch(&rx, (10, 10), |n| *n, None, |_| false),
            Some(vec![1, 1, 50])
        );
    }

    #[tokio::test]
    async fn producers_wait_while_more_than_the_limit_is_pending() {
        let pending = std::sync::Arc::new(Pending::new(100));
        pending.add(150);
        assert!(pending.is_over());
        let waiting = tokio::spawn({
            let pending = pending.clone();
            async move { pending.until_under().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        pending.sub(50);
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .unwrap()
            .unwrap();
        assert!(!pending.is_over());
    }

    #[test]
    fn a_lingering_batch_stops_at_max() {
        let (tx, rx) = mpsc::channel();
        for n in 1..=5 {
            tx.send(n).unwrap();
        }
        let soon = Some(Instant::now() + Duration::from_millis(1));
        assert_eq!(
            next_batch(&rx, (3, usize::MAX), |_| 0, soon, |_| false),
            Some(vec![1, 2, 3])
        );
    }
}
