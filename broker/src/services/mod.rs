//! The services behind destinations, each a [`Service`](crate::service::Service).

mod app;
mod queues;
mod rooms;
mod topics;
mod users;

pub use crate::store::HistoryLimits;
pub use app::App;
pub use queues::{QueueLimits, QueueStats, Queues};
pub use rooms::{RoomDetail, RoomSummary, Rooms, check_room_name};
pub use topics::Topics;
pub use users::{Users, is_user_queue};

/// The shared state kept under `name`, made empty on first use. The common case, an
/// existing entry, takes only a read lock on the map's shard.
fn shared_entry<T: Default>(
    map: &dashmap::DashMap<String, std::sync::Arc<std::sync::Mutex<T>>>,
    name: &str,
) -> std::sync::Arc<std::sync::Mutex<T>> {
    if let Some(entry) = map.get(name) {
        return entry.clone();
    }
    map.entry(name.to_owned()).or_default().clone()
}
