//! What every connection shares: configuration, the router, counters and id sources.
//!
//! In: the validated [`Config`]. Out: one [`Broker`] behind an `Arc`, handed to each
//! connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::router::Router;
use crate::session::SessionId;

/// The broker's shared state.
#[derive(Debug)]
pub struct Broker {
    /// Settings.
    pub config: Config,
    /// Topic subscriptions.
    pub router: Router,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
    next_session: AtomicU64,
    next_message: AtomicU64,
}

impl Broker {
    /// Shared state for `config`.
    pub fn new(config: Config) -> Broker {
        // Message ids start at the current time in microseconds, so they keep increasing
        // across restarts (at fewer than a million publishes a second on average).
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2));
        Broker {
            config,
            router: Router::new(),
            metrics: Metrics::default(),
            next_session: AtomicU64::new(1),
            next_message: AtomicU64::new(start),
        }
    }

    /// A new session id.
    pub fn next_session_id(&self) -> SessionId {
        SessionId(self.next_session.fetch_add(1, Ordering::Relaxed))
    }

    /// A new, broker-wide unique message id.
    pub fn next_message_id(&self) -> u64 {
        self.next_message.fetch_add(1, Ordering::Relaxed)
    }
}

/// Milliseconds since the Unix epoch, for `x-timestamp`.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
