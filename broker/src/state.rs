//! What every connection shares: configuration, the router with its services, counters and
//! session ids.
//!
//! In: the validated [`Config`] and a [`Store`]. Out: one [`Broker`] behind an `Arc`,
//! handed to each connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::router::{Router, RouterLimits};
use crate::session::SessionId;
use crate::store::{SqliteStore, Store, StoreError};

/// The broker's shared state.
#[derive(Debug)]
pub struct Broker {
    /// Settings.
    pub config: Config,
    /// Destinations and the services behind them.
    pub router: Router,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
    next_session: AtomicU64,
}

impl Broker {
    /// Shared state for `config`, with its SQLite store in the data directory.
    ///
    /// # Errors
    /// The store cannot be opened or read.
    pub fn open(config: Config) -> Result<Broker, StoreError> {
        let store = Arc::new(SqliteStore::open(&config.data_dir)?);
        Broker::with_store(config, store)
    }

    /// Shared state for `config` over a given store.
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn with_store(config: Config, store: Arc<dyn Store>) -> Result<Broker, StoreError> {
        let limits = RouterLimits {
            room_history: config.room_history,
            user_queue_limit: config.user_queue_limit,
        };
        Ok(Broker {
            router: Router::open(store, limits)?,
            config,
            metrics: Metrics::default(),
            next_session: AtomicU64::new(1),
        })
    }

    /// A new session id.
    pub fn next_session_id(&self) -> SessionId {
        SessionId(self.next_session.fetch_add(1, Ordering::Relaxed))
    }
}

/// Milliseconds since the Unix epoch, for `x-timestamp`.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
