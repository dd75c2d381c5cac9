//! Counters the broker keeps, exposed as Prometheus text at `/metrics`.
//!
//! In: increments from connections, sessions and the router. Out: a text page.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Broker-wide counters. Relaxed atomics: each is independent and only read for display.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Connections open now.
    pub connections_open: AtomicU64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// STOMP frames received.
    pub frames_received: AtomicU64,
    /// Messages published (SENDs that reached the router).
    pub messages_published: AtomicU64,
    /// MESSAGE frames queued for subscribers.
    pub messages_delivered: AtomicU64,
    /// Connections closed as slow consumers.
    pub slow_consumers: AtomicU64,
    /// ERROR frames sent.
    pub errors_sent: AtomicU64,
    /// Connections closed for missing heart-beats.
    pub heart_beat_timeouts: AtomicU64,
}

impl Metrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let rows: [(&str, &str, &str, &AtomicU64); 8] = [
            (
                "stoa_connections_open",
                "gauge",
                "Connections open now.",
                &self.connections_open,
            ),
            (
                "stoa_connections_total",
                "counter",
                "Connections accepted since start.",
                &self.connections_total,
            ),
            (
                "stoa_frames_received_total",
                "counter",
                "STOMP frames received.",
                &self.frames_received,
            ),
            (
                "stoa_messages_published_total",
                "counter",
                "Messages published.",
                &self.messages_published,
            ),
            (
                "stoa_messages_delivered_total",
                "counter",
                "MESSAGE frames queued for subscribers.",
                &self.messages_delivered,
            ),
            (
                "stoa_slow_consumers_total",
                "counter",
                "Connections closed as slow consumers.",
                &self.slow_consumers,
            ),
            (
                "stoa_errors_sent_total",
                "counter",
                "ERROR frames sent.",
                &self.errors_sent,
            ),
            (
                "stoa_heart_beat_timeouts_total",
                "counter",
                "Connections closed for missing heart-beats.",
                &self.heart_beat_timeouts,
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        out
    }
}
