//! Write coalescing under load.
//!
//! Every write to a socket costs the same system call and, on loopback or a fast LAN, much of
//! the peer's TCP receive work, whether it carries one frame or twenty. When the broker's
//! threads are nearly always busy, a connection that wrote a moment ago may as well wait a
//! little: the frames that arrive meanwhile go out in the same write, and the time saved
//! goes to the connections still waiting their turn.
//!
//! The signal is how busy the runtime's worker threads are. Every [`PROBE_EVERY`] a probe
//! reads their busy time (tokio's runtime metrics) and smooths the fraction. Below
//! [`QUIET`] the window is zero and every frame goes out as soon as its connection runs;
//! from there it grows in proportion, reaching `--write-coalesce-max-ms` at [`SATURATED`].
//!
//! In: the workers' busy time. Out: [`Pace::window`], which connections read before each
//! write.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// How often the probe reads the workers' busy time.
pub const PROBE_EVERY: Duration = Duration::from_millis(50);

/// Busy fraction (per mille) up to which writes are never held back.
pub const QUIET: u64 = 600;

/// Busy fraction (per mille) from which the window is at its maximum.
pub const SATURATED: u64 = 900;

/// Smoothing: each measurement moves the average by 1/`SMOOTHING` of the difference.
const SMOOTHING: u64 = 4;

/// The shared coalescing window.
#[derive(Debug, Default)]
pub struct Pace {
    /// Smoothed busy fraction of the worker threads, per mille.
    busy_permille: AtomicU64,
    /// The current window, in microseconds.
    window_us: AtomicU64,
}

impl Pace {
    /// How long a connection that wrote less than this ago waits before writing again.
    pub fn window(&self) -> Duration {
        Duration::from_micros(self.window_us.load(Ordering::Relaxed))
    }

    /// The smoothed busy fraction (per mille) and the coalescing window (µs), for `/metrics`.
    pub fn readings(&self) -> (u64, u64) {
        (
            self.busy_permille.load(Ordering::Relaxed),
            self.window_us.load(Ordering::Relaxed),
        )
    }

    /// Takes one measured busy fraction (per mille) into the average and sets the window
    /// from it.
    pub fn record(&self, busy_permille: u64, max: Duration) {
        let measured = busy_permille.min(1000);
        let previous = self.busy_permille.load(Ordering::Relaxed);
        let smoothed = if measured >= previous {
            previous + (measured - previous).div_ceil(SMOOTHING)
        } else {
            previous - (previous - measured).div_ceil(SMOOTHING)
        };
        self.busy_permille.store(smoothed, Ordering::Relaxed);
        let max_us = u64::try_from(max.as_micros()).unwrap_or(u64::MAX);
        let over = smoothed.saturating_sub(QUIET).min(SATURATED - QUIET);
        let window = max_us.saturating_mul(over) / (SATURATED - QUIET);
        self.window_us.store(window, Ordering::Relaxed);
    }

    /// Reads the workers' busy time until `shutdown` changes. Does nothing when `max` is
    /// zero (coalescing off).
    pub async fn probe(&self, max: Duration, mut shutdown: watch::Receiver<bool>) {
        if max.is_zero() {
            return;
        }
        let metrics = tokio::runtime::Handle::current().metrics();
        let busy = || {
            (0..metrics.num_workers())
                .map(|worker| metrics.worker_total_busy_duration(worker))
                .sum::<Duration>()
        };
        let mut ticks = tokio::time::interval(PROBE_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut last_busy, mut last_at) = (busy(), Instant::now());
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = ticks.tick() => {}
            }
            let (now_busy, now) = (busy(), Instant::now());
            let workers = u128::try_from(metrics.num_workers()).unwrap_or(1);
            let capacity_us = now.duration_since(last_at).as_micros() * workers;
            let busy_us = now_busy.saturating_sub(last_busy).as_micros();
            if let Some(permille) = (busy_us * 1000).checked_div(capacity_us) {
                self.record(u64::try_from(permille).unwrap_or(1000), max);
            }
            (last_busy, last_at) = (now_busy, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_millis(10);

    #[test]
    fn a_runtime_that_is_not_saturated_never_holds_writes_back() {
        let pace = Pace::default();
        for _ in 0..50 {
            pace.record(QUIET, MAX);
        }
        assert_eq!(pace.window(), Duration::ZERO);
    }

    #[test]
    fn the_window_grows_with_the_load_up_to_the_maximum() {
        let pace = Pace::default();
        for _ in 0..50 {
            pace.record((QUIET + SATURATED) / 2, MAX);
        }
        assert_eq!(pace.window(), MAX / 2);
        for _ in 0..50 {
            pace.record(1000, MAX);
        }
        assert_eq!(pace.window(), MAX);
    }

    #[test]
    fn the_window_closes_again_when_the_load_goes() {
        let pace = Pace::default();
        for _ in 0..50 {
            pace.record(1000, MAX);
        }
        pace.record(100, MAX);
        assert!(
            pace.window() > Duration::ZERO,
            "one quiet sample is smoothed"
        );
        for _ in 0..50 {
            pace.record(100, MAX);
        }
        assert_eq!(pace.window(), Duration::ZERO);
    }

    #[test]
    fn the_readings_are_the_load_and_the_window() {
        let pace = Pace::default();
        for _ in 0..50 {
            pace.record(1000, MAX);
        }
        assert_eq!(pace.readings(), (1000, 10_000));
    }

    #[test]
    fn a_zero_maximum_keeps_coalescing_off() {
        let pace = Pace::default();
        pace.record(1000, Duration::ZERO);
        assert_eq!(pace.window(), Duration::ZERO);
    }

    #[tokio::test]
    async fn the_probe_runs_until_shutdown() {
        let pace = Pace::default();
        let (stop, shutdown) = watch::channel(false);
        let probe = pace.probe(MAX, shutdown);
        tokio::pin!(probe);
        let early = tokio::time::timeout(PROBE_EVERY * 4, &mut probe).await;
        assert!(early.is_err(), "the probe ended before shutdown");
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), probe)
            .await
            .expect("the probe ends at shutdown");
    }
}
