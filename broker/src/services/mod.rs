//! The services behind destinations, each a [`Service`](crate::router::Service).

mod app;
mod queues;
mod rooms;
mod topics;
mod users;

pub use app::App;
pub use queues::{QueueLimits, QueueStats, Queues};
pub use rooms::{RoomDetail, RoomSummary, Rooms, check_room_name};
pub use topics::Topics;
pub use users::{Users, is_user_queue};
