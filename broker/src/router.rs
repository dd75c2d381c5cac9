//! Destinations to services: the one place that knows which service serves a destination.
//!
//! In: SUBSCRIBE, UNSUBSCRIBE and SEND requests from sessions. Out: the request handed to
//! the [`Service`] for its destination (topics, rooms, user destinations, `/app` replies),
//! which offers [`Outgoing`](crate::outbox::Outgoing) frames to subscribers' outboxes. What
//! crosses to a service is in [`crate::service`]. It knows no transport and never waits.

use std::sync::Arc;

use crate::destination::{Destination, is_pattern};
use crate::durable::{Completion, KeptQueue, QueueStore};
use crate::error::SessionError;
use crate::message::MessageIds;
use crate::service::Service;
use crate::services::{
    App, HistoryLimits, QueueLimits, Queues, Rooms, Topics, Users, is_user_queue,
};
use crate::store::Store;

/// Settings the services need.
#[derive(Debug, Clone, Copy)]
pub struct RouterLimits {
    /// What rooms keep.
    pub history: HistoryLimits,
    /// Messages waiting per offline user queue.
    pub user_queue_limit: usize,
    /// Bytes of bodies waiting per offline user queue.
    pub user_queue_bytes: usize,
    /// Durable queue limits.
    pub queues: QueueLimits,
}

/// Every service, and the map from destinations to them.
#[derive(Debug)]
pub struct Router {
    /// Message ids for every service.
    pub ids: Arc<MessageIds>,
    /// `/topic/<key>`, wildcards included.
    pub topics: Arc<Topics>,
    /// `/topic/room.<room>`.
    pub rooms: Arc<Rooms>,
    /// `/user/...`.
    pub users: Users,
    /// `/app/...`.
    pub app: App,
    /// `/queue/<name>`.
    pub queues: Queues,
    store: Arc<dyn Store>,
}

impl Router {
    /// Services over `store`, with what it kept loaded.
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn open(
        store: Arc<dyn Store>,
        queue_store: QueueStore,
        kept_queues: Vec<KeptQueue>,
        limits: RouterLimits,
    ) -> Result<Router, crate::store::StoreError> {
        let ids = Arc::new(MessageIds::new());
        let topics = Arc::new(Topics::new());
        let rooms = Arc::new(Rooms::load(
            store.clone(),
            topics.clone(),
            ids.clone(),
            limits.history,
        )?);
        let queue_store = Arc::new(queue_store);
        // One durable store for both: user queues are the ones under their own prefix.
        let (user_queues, kept_queues): (Vec<KeptQueue>, Vec<KeptQueue>) = kept_queues
            .into_iter()
            .partition(|(name, _)| is_user_queue(name));
        let users = Users::new(
            queue_store.clone(),
            user_queues,
            (limits.user_queue_limit, limits.user_queue_bytes),
        );
        let app = App::new(rooms.clone(), ids.clone());
        let queues = Queues::new(queue_store, kept_queues, limits.queues);
        Ok(Router {
            ids,
            topics,
            rooms,
            users,
            app,
            queues,
            store,
        })
    }

    /// The service for `destination`, and the destination's key within it.
    ///
    /// # Errors
    /// No service serves that destination.
    pub fn resolve<'d>(
        &self,
        destination: &'d str,
    ) -> Result<(&dyn Service, &'d str), SessionError> {
        match Destination::parse(destination) {
            Destination::Topic(key) => match key.strip_prefix("room.") {
                // `/topic/room.*` watches rooms through the topic patterns.
                Some(room) if !is_pattern(key) => Ok((self.rooms.as_ref(), room)),
                _ => Ok((self.topics.as_ref(), key)),
            },
            Destination::User(rest) => Ok((&self.users, rest)),
            Destination::App(rest) => Ok((&self.app, rest)),
            Destination::Queue(name) => Ok((&self.queues, name)),
            Destination::Unknown => {
                Err(SessionError::UnsupportedDestination(destination.to_owned()))
            }
        }
    }

    /// Room messages handed to the history store and not yet taken by its writer.
    pub fn store_pending(&self) -> &crate::writer::Pending {
        self.store.pending()
    }

    /// Runs `then` once everything handed to durable storage so far is on disk (`true`), or
    /// could not be written (`false`): what a session's RECEIPT waits for after a durable
    /// SEND. Sessions reach storage through this, never directly.
    pub fn after_durable(&self, then: impl FnOnce(bool) + Send + 'static) {
        self.queues.store().after(Completion::new(then));
    }

    /// Waits (blocking) until everything handed to durable storage is on disk: a
    /// DISCONNECT's RECEIPT confirms every earlier frame.
    pub fn flush_durable(&self) {
        self.queues.store().flush();
    }

    /// How long the history store's and the queue store's commits take (`/metrics`).
    pub fn commit_seconds(
        &self,
    ) -> (
        Option<prometheus_client::metrics::histogram::Histogram>,
        prometheus_client::metrics::histogram::Histogram,
    ) {
        (
            self.store.commit_seconds(),
            self.queues.store().commit_seconds(),
        )
    }

    /// Whether both stores reach the disk (`/readyz`).
    pub fn stores_healthy(&self) -> bool {
        self.store.is_healthy() && self.queues.store().is_healthy()
    }

    /// Waits until everything handed to the store is written (at shutdown).
    pub fn flush_store(&self) {
        self.store.flush();
        self.queues.store().flush();
    }
}
