//! What every connection shares: configuration, the router with its services, counters and
//! session ids.
//!
//! In: the validated [`Config`] and a [`Store`]. Out: one [`Broker`] behind an `Arc`,
//! handed to each connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::acl::{AclError, AclHandle};
use crate::admission::{Admission, OriginError, Origins};
use crate::auth::{Auth, AuthConfigError};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::durable::QueueStore;
use crate::message::SessionId;
use crate::metrics::Metrics;
use crate::outbox::{End, Outbox};
use crate::pace::Pace;
use crate::router::{Router, RouterLimits};
use crate::services::{HistoryLimits, QueueLimits};
use crate::session::{Session, Shared};
use crate::sessions::{SessionInfo, Sessions};

use crate::store::{SqliteStore, Store, StoreError};
use crate::tls::{Tls, TlsError};

/// Why the broker's state could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A store could not be opened or read.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// Authentication could not be set up (accounts, keys).
    #[error("{0}")]
    Auth(#[from] AuthConfigError),
    /// The ACL file cannot be used.
    #[error("{0}")]
    Acl(#[from] AclError),
    /// An allowed origin that is no origin.
    #[error("{0}")]
    Origin(#[from] OriginError),
    /// The TLS certificate and key cannot be used.
    #[error("{0}")]
    Tls(#[from] TlsError),
}

/// The broker's shared state.
#[derive(Debug)]
pub struct Broker {
    /// What every session shares: settings, the router, the ACL, the counters.
    pub shared: Arc<Shared>,
    /// Who may connect, and as whom.
    pub auth: Arc<Auth>,
    /// TLS on both listeners (`--tls-cert`, `--tls-key`).
    pub tls: Option<Arc<Tls>>,
    /// The origins browser pages may connect from.
    pub origins: Origins,
    /// Client connections, counted against `--max-connections` and its per-address limit.
    pub admission: Arc<Admission>,
    /// This node's place among several (`--cluster`).
    pub cluster: Option<Arc<Cluster>>,
    /// How long connections coalesce writes under load.
    pub pace: Pace,
    /// Every open session: for `/admin`, and to close them all when the node finds it was
    /// declared dead (`--cluster`).
    pub sessions: Sessions,
    next_session: AtomicU64,
}

impl Broker {
    /// Shared state for `config`, with its SQLite store in the data directory.
    ///
    /// # Errors
    /// The store cannot be opened or read.
    pub fn open(config: Config) -> Result<Broker, OpenError> {
        let store = Arc::new(SqliteStore::open(
            &config.data_dir,
            config.store_pending_bytes,
        )?);
        Broker::with_store(config, store)
    }

    /// Shared state for `config` over a given store.
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn with_store(config: Config, store: Arc<dyn Store>) -> Result<Broker, OpenError> {
        let limits = RouterLimits {
            history: HistoryLimits {
                messages: config.room_history,
                room_bytes: config.room_history_bytes,
                total_bytes: config.history_total_bytes,
            },
            user_queue_limit: config.user_queue_limit,
            user_queue_bytes: config.user_queue_bytes,
            queues: QueueLimits {
                max_messages: config.queue_max_messages,
                max_bytes: config.queue_max_bytes,
                max_prefetch: config.max_unacked,
            },
        };
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StoreError::Io {
            what: "creating the data directory",
            path: config.data_dir.clone(),
            source,
        })?;
        // Durable queues live in a database of their own: every commit there is an fsync.
        let (queue_store, kept_queues) = QueueStore::open(&config.data_dir)?;
        let auth = Arc::new(Auth::new(&config.auth_settings())?);
        let acl = match &config.acl {
            Some(path) => Some(Arc::new(AclHandle::open(path)?)),
            None => None,
        };
        let origins = Origins::parse(&config.allowed_origins)?;
        let tls = Tls::from_options(config.tls_cert.as_deref(), config.tls_key.as_deref())?;
        let admission = Arc::new(Admission::new(
            config.max_connections,
            config.max_connections_per_ip,
        ));
        let router = Router::open(store, queue_store, kept_queues, limits)?;
        Ok(Broker {
            shared: Arc::new(Shared {
                config,
                acl,
                router,
                metrics: Metrics::default(),
            }),
            auth,
            tls,
            origins,
            admission,
            cluster: None,
            pace: Pace::default(),
            sessions: Sessions::default(),
            next_session: AtomicU64::new(1),
        })
    }

    /// The same broker as one node of a cluster.
    #[must_use]
    pub fn with_cluster(mut self, cluster: Arc<Cluster>) -> Broker {
        self.cluster = Some(cluster);
        self
    }

    /// A new session `id` with its outbox, noted in the registry with `info` (which the
    /// session keeps current); [`Broker::close_session`] forgets it.
    pub fn open_session(&self, id: SessionId, info: SessionInfo) -> (Session, Arc<Outbox>) {
        let outbox = Arc::new(Outbox::new(self.shared.config.outbox_bytes));
        let mut session = Session::new(id, self.shared.clone(), outbox.clone());
        let info = Arc::new(info);
        session.set_info(info.clone());
        self.sessions.open(id, &outbox, info);
        (session, outbox)
    }

    /// Forgets a closed session.
    pub fn close_session(&self, id: SessionId) {
        self.sessions.close(id);
    }

    /// Ends every open session with `reason` (their connections send the ERROR).
    pub fn end_sessions(&self, reason: End) {
        self.sessions.end_all(reason);
    }

    /// The scheme of the HTTP listener (`https` with TLS), for same-origin checks.
    pub fn http_scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// A new session id.
    pub fn next_session_id(&self) -> SessionId {
        SessionId(self.next_session.fetch_add(1, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn a_data_dir_that_cannot_be_made_is_an_error_that_names_it() {
        let file = std::env::temp_dir().join(format!("stoa-not-a-dir-{}", std::process::id()));
        std::fs::write(&file, b"a file, not a directory").unwrap();
        let config =
            Config::try_parse_args(["stoa", "--data-dir", file.to_str().unwrap()]).unwrap();
        let err = Broker::with_store(config, Arc::new(MemoryStore::default())).unwrap_err();
        std::fs::remove_file(&file).unwrap();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("creating the data directory {}: ", file.display())),
            "{text}"
        );
    }
}
