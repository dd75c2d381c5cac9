//! Every open session of this node, for the operator: who, over what, from where, since
//! when, subscribed to what; and the one handle that ends it.
//!
//! In: sessions noting themselves when they open, connect, subscribe, unsubscribe and
//! close. Out: [`SessionRow`]s for `/admin`, and [`Sessions::end`] to close one or all.
//! Nothing here is on the path that carries messages: a session writes its own entry only
//! when it connects or changes its subscriptions.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use dashmap::DashMap;

use crate::message::{SessionId, now_millis};
use crate::outbox::{End, Outbox};

/// What the operator sees of one session; shared by the session, which keeps it current,
/// and the registry.
#[derive(Debug)]
pub struct SessionInfo {
    peer: SocketAddr,
    transport: &'static str,
    since_ms: u64,
    user: OnceLock<Arc<str>>,
    /// `(subscription key, destination)`, in the order they were made.
    subscriptions: Mutex<Vec<(u32, Arc<str>)>>,
}

impl SessionInfo {
    /// A session from `peer` over `transport`, opened now.
    pub fn new(peer: SocketAddr, transport: &'static str) -> SessionInfo {
        SessionInfo {
            peer,
            transport,
            since_ms: now_millis(),
            user: OnceLock::new(),
            subscriptions: Mutex::new(Vec::new()),
        }
    }

    fn subscriptions(&self) -> std::sync::MutexGuard<'_, Vec<(u32, Arc<str>)>> {
        // Every change is one push or retain: a poisoned list is still whole.
        self.subscriptions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The session's user, once CONNECT named one.
    pub fn connected_as(&self, user: &Arc<str>) {
        let _ = self.user.set(user.clone());
    }

    /// Subscription `key` to `destination` was made.
    pub fn subscribed(&self, key: u32, destination: &Arc<str>) {
        let mut list = self.subscriptions();
        // Most chat connections hold one subscription: room for one, not the usual four.
        list.reserve_exact(1);
        list.push((key, destination.clone()));
    }

    /// Subscription `key` ended.
    pub fn unsubscribed(&self, key: u32) {
        self.subscriptions().retain(|(k, _)| *k != key);
    }

    /// Every subscription ended.
    pub fn unsubscribed_all(&self) {
        self.subscriptions().clear();
    }
}

/// One session in `/admin`'s table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SessionRow {
    /// The session's id (the `session` header of its CONNECTED frame).
    pub id: u64,
    /// Its user; empty before CONNECT.
    pub user: String,
    /// `tcp`, `ws`, `sockjs-<transport>`, `http-poll`, `sse`, `http-post`.
    pub transport: &'static str,
    /// The client's address.
    pub address: String,
    /// When it opened, in ms since the epoch.
    pub since_ms: u64,
    /// The destinations it is subscribed to.
    pub subscriptions: Vec<String>,
}

#[derive(Debug)]
struct Entry {
    outbox: Weak<Outbox>,
    info: Arc<SessionInfo>,
}

/// The open sessions of this node.
#[derive(Debug, Default)]
pub struct Sessions {
    open: DashMap<SessionId, Entry>,
}

impl Sessions {
    /// Notes an open session.
    pub fn open(&self, id: SessionId, outbox: &Arc<Outbox>, info: Arc<SessionInfo>) {
        self.open.insert(
            id,
            Entry {
                outbox: Arc::downgrade(outbox),
                info,
            },
        );
    }

    /// Forgets a closed session.
    pub fn close(&self, id: SessionId) {
        self.open.remove(&id);
    }

    /// Ends session `id` with `reason` (its connection sends the ERROR and closes); whether
    /// it was open.
    pub fn end(&self, id: SessionId, reason: End) -> bool {
        let outbox = self.open.get(&id).and_then(|e| e.outbox.upgrade());
        match outbox {
            Some(outbox) => {
                outbox.end(reason);
                true
            }
            None => false,
        }
    }

    /// Ends every open session with `reason`.
    pub fn end_all(&self, reason: End) {
        for entry in &self.open {
            if let Some(outbox) = entry.outbox.upgrade() {
                outbox.end(reason);
            }
        }
    }

    /// At most `limit` sessions, the oldest first, and how many are open in all.
    pub fn rows(&self, limit: usize) -> (Vec<SessionRow>, usize) {
        let mut ids: Vec<(u64, SessionId)> = self
            .open
            .iter()
            .map(|e| (e.info.since_ms, *e.key()))
            .collect();
        let total = ids.len();
        ids.sort_unstable_by_key(|&(since, id)| (since, id.0));
        let rows = ids
            .into_iter()
            .filter_map(|(_, id)| {
                let entry = self.open.get(&id)?;
                let info = &entry.info;
                Some(SessionRow {
                    id: id.0,
                    user: info.user.get().map(ToString::to_string).unwrap_or_default(),
                    transport: info.transport,
                    address: info.peer.to_string(),
                    since_ms: info.since_ms,
                    subscriptions: info
                        .subscriptions()
                        .iter()
                        .map(|(_, d)| d.to_string())
                        .collect(),
                })
            })
            .take(limit)
            .collect();
        (rows, total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 4000))
    }

    #[test]
    fn a_session_shows_its_user_and_subscriptions_until_it_closes() {
        let sessions = Sessions::default();
        let outbox = Arc::new(Outbox::new(1024));
        let info = Arc::new(SessionInfo::new(peer(), "ws"));
        sessions.open(SessionId(7), &outbox, info.clone());
        info.connected_as(&Arc::from("ada"));
        info.subscribed(0, &Arc::from("/topic/room.a"));
        info.subscribed(1, &Arc::from("/queue/jobs"));
        info.unsubscribed(0);
        let (rows, total) = sessions.rows(10);
        assert_eq!(total, 1);
        assert_eq!(rows[0].id, 7);
        assert_eq!(rows[0].user, "ada");
        assert_eq!(rows[0].transport, "ws");
        assert_eq!(rows[0].address, "127.0.0.1:4000");
        assert_eq!(rows[0].subscriptions, vec!["/queue/jobs".to_owned()]);
        sessions.close(SessionId(7));
        assert_eq!(sessions.rows(10).1, 0);
    }

    #[test]
    fn ending_a_session_asks_its_connection_to_end_and_names_only_open_ones() {
        let sessions = Sessions::default();
        let outbox = Arc::new(Outbox::new(1024));
        sessions.open(
            SessionId(1),
            &outbox,
            Arc::new(SessionInfo::new(peer(), "tcp")),
        );
        assert!(sessions.end(SessionId(1), End::ClosedByOperator));
        assert_eq!(outbox.ended(), Some(End::ClosedByOperator));
        assert!(!sessions.end(SessionId(2), End::ClosedByOperator));
    }

    #[test]
    fn rows_are_limited_and_oldest_first() {
        let sessions = Sessions::default();
        let outbox = Arc::new(Outbox::new(1024));
        for id in [3, 1, 2] {
            sessions.open(
                SessionId(id),
                &outbox,
                Arc::new(SessionInfo::new(peer(), "ws")),
            );
        }
        let (rows, total) = sessions.rows(2);
        assert_eq!(total, 3);
        assert_eq!(rows.len(), 2);
        assert!(
            rows.windows(2)
                .all(|w| (w[0].since_ms, w[0].id) < (w[1].since_ms, w[1].id)),
            "{rows:?}"
        );
    }
}
