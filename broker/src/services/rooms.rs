//! `/topic/room.<room>`: chat rooms with sequence numbers, history, presence and recovery.
//!
//! In: joins (SUBSCRIBE, with `x-history` or `x-since`), leaves, and SENDs. Out: every kept
//! message numbered with the room's next `x-seq` and kept (in memory for replay, in the
//! store for restarts); join and leave notices when a user's first session arrives or last
//! one goes; replay before live with no gap and no duplicate, because both happen under the
//! room's lock.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use dashmap::DashMap;
use stomp_codec::Headers;

use crate::router::{
    Fanout, KeptMessage, MessageIds, Publish, PublishRequest, Published, Replay, Service,
    SubscribeRequest, Subscriber, deliver, message_headers,
};
use crate::services::Topics;
use crate::session::SessionError;
use crate::state::now_millis;
use crate::store::{Store, StoreError};

/// Longest room name, in characters.
pub const MAX_ROOM_NAME_CHARS: usize = 64;

/// Checks a room name: 1 to 64 letters (any script), digits, `_` or `-`.
///
/// # Errors
/// [`SessionError::InvalidRoomName`] saying what is wrong.
pub fn check_room_name(room: &str) -> Result<(), SessionError> {
    let invalid = |reason| SessionError::InvalidRoomName {
        room: room.chars().take(80).collect(),
        reason,
    };
    let chars = room.chars().count();
    if chars == 0 {
        return Err(invalid("a room name needs at least one character"));
    }
    if chars > MAX_ROOM_NAME_CHARS {
        return Err(invalid("a room name has at most 64 characters"));
    }
    if !room
        .chars()
        .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
    {
        return Err(invalid("a room name has only letters, digits, '_' and '-'"));
    }
    Ok(())
}

/// A kept message.
#[derive(Debug)]
struct Kept {
    seq: u64,
    /// Shared with the store until it is written.
    message: Arc<KeptMessage>,
}

#[derive(Debug, Default)]
struct Room {
    /// The room's name as the store takes it with each message; set on the first.
    name: Arc<str>,
    last_seq: u64,
    history: VecDeque<Kept>,
    subscribers: Vec<Subscriber>,
    /// Users present, with how many of their sessions are in the room.
    members: BTreeMap<Arc<str>, usize>,
}

/// One room in the room list.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RoomSummary {
    /// The room's name.
    pub room: String,
    /// How many users are in it.
    pub members: usize,
    /// Its newest `x-seq`.
    pub last_seq: u64,
}

/// One room with its members.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RoomDetail {
    /// The room's name.
    pub room: String,
    /// The users in it, by name.
    pub members: Vec<String>,
    /// Its newest `x-seq`.
    pub last_seq: u64,
}

/// Every room.
#[derive(Debug)]
pub struct Rooms {
    rooms: DashMap<String, Arc<Mutex<Room>>>,
    topics: Arc<Topics>,
    store: Arc<dyn Store>,
    ids: Arc<MessageIds>,
    keep: usize,
}

fn lock(room: &Mutex<Room>) -> MutexGuard<'_, Room> {
    // Every mutation of a room completes or panics before touching shared state, so a
    // poisoned room is still consistent enough to serve.
    room.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Rooms {
    /// Rooms with the history `store` kept, `keep` messages each at most.
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn load(
        store: Arc<dyn Store>,
        topics: Arc<Topics>,
        ids: Arc<MessageIds>,
        keep: usize,
    ) -> Result<Rooms, StoreError> {
        let rooms = DashMap::new();
        for (name, messages) in store.load_rooms(keep)? {
            let mut room = Room::default();
            for m in messages {
                room.last_seq = room.last_seq.max(m.seq);
                room.history.push_back(Kept {
                    seq: m.seq,
                    message: Arc::new(Publish::from_stored(m).into_kept()),
                });
            }
            rooms.insert(name, Arc::new(Mutex::new(room)));
        }
        Ok(Rooms {
            rooms,
            topics,
            store,
            ids,
            keep,
        })
    }

    fn room(&self, name: &str) -> Arc<Mutex<Room>> {
        super::shared_entry(&self.rooms, name)
    }

    /// Rooms with members or kept history, by name.
    pub fn summaries(&self) -> Vec<RoomSummary> {
        let mut list: Vec<RoomSummary> = self
            .rooms
            .iter()
            .filter_map(|entry| {
                let room = lock(entry.value());
                (!room.members.is_empty() || !room.history.is_empty()).then(|| RoomSummary {
                    room: entry.key().clone(),
                    members: room.members.len(),
                    last_seq: room.last_seq,
                })
            })
            .collect();
        list.sort_by(|a, b| a.room.cmp(&b.room));
        list
    }

    /// A room's members, or `None` for a room that never existed.
    pub fn detail(&self, name: &str) -> Option<RoomDetail> {
        let room = self.rooms.get(name)?.clone();
        let room = lock(&room);
        Some(RoomDetail {
            room: name.to_owned(),
            members: room.members.keys().map(|m| m.to_string()).collect(),
            last_seq: room.last_seq,
        })
    }

    /// Numbers, keeps and delivers a message built by `headers(seq)`.
    fn keep_and_deliver(
        &self,
        name: &str,
        room: &mut Room,
        message_id: u64,
        headers: Headers,
        body: bytes::Bytes,
    ) -> (u64, Fanout) {
        room.last_seq += 1;
        let seq = room.last_seq;
        let publish = Publish::new(message_id, headers, body);
        let fanout = self.deliver_live(name, room, &publish);
        let kept = Arc::new(publish.into_kept());
        if room.name.is_empty() {
            room.name = Arc::from(name);
        }
        self.store.append_room(&room.name, seq, &kept, self.keep);
        room.history.push_back(Kept { seq, message: kept });
        while room.history.len() > self.keep {
            room.history.pop_front();
        }
        (seq, fanout)
    }

    fn deliver_live(&self, name: &str, room: &Room, publish: &Publish) -> Fanout {
        let mut fanout = Fanout::default();
        deliver(room.subscribers.iter(), publish, &mut fanout);
        self.topics
            .fan_out_to_patterns(&format!("room.{name}"), publish, &mut fanout);
        fanout
    }

    /// Posts an `x-event` notice (join, leave) from `user`.
    fn notice(&self, name: &str, room: &mut Room, event: &str, user: &str) {
        let message_id = self.ids.next();
        let mut digits = itoa::Buffer::new();
        let mut headers = Headers::new();
        headers.push("destination", &format!("/topic/room.{name}"));
        headers.push("message-id", digits.format(message_id));
        headers.push("x-event", event);
        headers.push("x-sender", user);
        headers.push("x-timestamp", digits.format(now_millis()));
        headers.push("x-seq", digits.format(room.last_seq + 1));
        self.keep_and_deliver(name, room, message_id, headers, bytes::Bytes::new());
    }

    /// Replays history to a joining subscriber, as `replay` asks.
    fn replay(&self, name: &str, room: &Room, subscriber: &Subscriber, replay: Replay) {
        let first_kept = room.history.front().map_or(room.last_seq + 1, |k| k.seq);
        let from = match replay {
            Replay::None => return,
            Replay::Last(n) => {
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                room.history.len().saturating_sub(n)
            }
            Replay::Since(since) => {
                // Older than what is kept, or newer than anything this room ever numbered
                // (its history was reset): say so, then replay everything kept.
                if since.saturating_add(1) < first_kept || since > room.last_seq {
                    self.gap_notice(name, subscriber, first_kept);
                    0
                } else {
                    room.history.partition_point(|k| k.seq <= since)
                }
            }
        };
        for kept in room.history.range(from..) {
            subscriber.offer_kept(&kept.message);
        }
    }

    fn gap_notice(&self, name: &str, subscriber: &Subscriber, first_kept: u64) {
        let message_id = self.ids.next();
        let mut digits = itoa::Buffer::new();
        let mut headers = Headers::new();
        headers.push("destination", &format!("/topic/room.{name}"));
        headers.push("message-id", digits.format(message_id));
        headers.push("x-event", "gap");
        headers.push("x-first-seq", digits.format(first_kept));
        headers.push("x-timestamp", digits.format(now_millis()));
        subscriber.offer(
            &Publish::new(message_id, headers, bytes::Bytes::new()),
            true,
        );
    }
}

impl Service for Rooms {
    fn check_send(&self, key: &str) -> Result<(), SessionError> {
        check_room_name(key)
    }

    fn subscribe(&self, request: SubscribeRequest<'_>) -> Result<(), SessionError> {
        let name = request.key;
        check_room_name(name)?;
        let room = self.room(name);
        let mut room = lock(&room);
        let subscriber = request.subscriber;
        // Under the room's lock: replay, then live, with nothing in between.
        self.replay(name, &room, &subscriber, request.replay);
        let user = subscriber.user.clone();
        room.subscribers.push(subscriber);
        let sessions = room.members.entry(user.clone()).or_insert(0);
        *sessions += 1;
        if *sessions == 1 {
            // The joiner's own join notice is its first live message.
            self.notice(name, &mut room, "join", &user);
        }
        Ok(())
    }

    fn unsubscribe(&self, key: &str, subscriber: &Subscriber) {
        let Some(room) = self.rooms.get(key).map(|r| r.clone()) else {
            return;
        };
        let mut room = lock(&room);
        let before = room.subscribers.len();
        room.subscribers
            .retain(|s| !s.is(subscriber.session, subscriber.key));
        if room.subscribers.len() == before {
            return;
        }
        let user = &subscriber.user;
        let last = match room.members.get_mut(user) {
            Some(sessions) => {
                *sessions = sessions.saturating_sub(1);
                *sessions == 0
            }
            None => false,
        };
        if last {
            room.members.remove(user);
            self.notice(key, &mut room, "leave", user);
        }
    }

    fn publish(&self, request: PublishRequest<'_>) -> Result<Published, SessionError> {
        let name = request.key;
        let frame = request.frame;
        let room = self.room(name);
        let mut room = lock(&room);
        // 1.2 leaves header values untrimmed; `true` is the only value that means transient.
        if frame.header("x-transient") == Some("true") {
            let headers = message_headers(
                request.destination,
                request.message_id,
                &frame.headers,
                request.user,
                &[],
            );
            let publish = Publish::new(request.message_id, headers, frame.body.clone());
            let fanout = self.deliver_live(name, &room, &publish);
            return Ok(Published {
                message_id: request.message_id,
                seq: None,
                fanout,
                durable: false,
            });
        }
        let mut digits = itoa::Buffer::new();
        let seq = room.last_seq + 1;
        let headers = message_headers(
            request.destination,
            request.message_id,
            &frame.headers,
            request.user,
            &[("x-seq", digits.format(seq))],
        );
        let (seq, fanout) = self.keep_and_deliver(
            name,
            &mut room,
            request.message_id,
            headers,
            frame.body.clone(),
        );
        Ok(Published {
            message_id: request.message_id,
            seq: Some(seq),
            fanout,
            durable: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names_of_any_script_with_digits_dash_and_underscore() {
        for ok in [
            "lobby",
            "방",
            "한국어-채팅",
            "room_2",
            "Ünïcödé",
            &"a".repeat(64),
        ] {
            assert!(check_room_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a.b", "a b", "a/b", "a:b", &"a".repeat(65), "tab\there"] {
            assert!(check_room_name(bad).is_err(), "{bad:?}");
        }
    }
}
