//! `/topic/room.<room>`: chat rooms with sequence numbers, history, presence and recovery.
//!
//! In: joins (SUBSCRIBE, with `x-history` or `x-since`), leaves, and SENDs. Out: every kept
//! message numbered with the room's next `x-seq` and kept (in memory for replay, in the
//! store for restarts); join and leave notices when a user's first session arrives or last
//! one goes; replay before live with no gap and no duplicate: the replay is queued on the
//! joiner's outbox under the room's lock, ahead of every live message, and encoded a batch
//! at a time as the joiner's socket takes it ([`RoomReplay`]).
//!
//! History is bounded three ways, the oldest kept messages going first past any of them:
//! messages per room (`--room-history`), bytes per room (`--room-history-bytes`) and bytes
//! for all rooms (`--history-total-bytes`). A room with nothing kept and nobody in it is
//! forgotten, so that the number of rooms is bounded by what is kept.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use dashmap::DashMap;
use stomp_codec::Headers;

use crate::error::SessionError;
use crate::message::{KeptMessage, MessageIds, Publish, message_headers, now_millis};
use crate::outbox::{Backlog, Outgoing, fill_from};
use crate::service::{
    Fanout, PublishRequest, Published, Replay, Service, Stamp, SubscribeRequest, Subscriber,
    deliver,
};

use crate::services::Topics;

use crate::store::{HistoryLimits, Store, StoreError};

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
    /// Shared with the store until it is written, and with replays being read.
    message: Arc<KeptMessage>,
}

#[derive(Debug, Default)]
struct Room {
    last_seq: u64,
    history: VecDeque<Kept>,
    /// What `history` takes, as [`KeptMessage::size`] counts it.
    bytes: usize,
    subscribers: Vec<Subscriber>,
    /// Users present, with how many of their sessions are in the room.
    members: BTreeMap<Arc<str>, usize>,
    /// Taken out of the map (nothing kept, nobody in it): whoever still holds it looks the
    /// room up again.
    retired: bool,
}

impl Room {
    /// The oldest kept `x-seq`, or the next one when nothing is kept.
    fn first_kept(&self) -> u64 {
        self.history.front().map_or(self.last_seq + 1, |k| k.seq)
    }

    /// The `message-id` of the oldest kept message: ids grow in publish order, across rooms
    /// and restarts, so this orders rooms by the age of their oldest message.
    fn oldest_id(&self) -> Option<u64> {
        self.history.front().map(|k| k.message.message_id())
    }

    fn is_idle(&self) -> bool {
        self.history.is_empty() && self.subscribers.is_empty() && self.members.is_empty()
    }

    /// Drops the oldest kept message; its size.
    fn evict_oldest(&mut self) -> usize {
        let size = self.history.pop_front().map_or(0, |k| k.message.size());
        self.bytes -= size;
        size
    }
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
    /// By name: the store takes the name with each message, shared rather than copied.
    rooms: DashMap<Arc<str>, Arc<Mutex<Room>>>,
    topics: Arc<Topics>,
    store: Arc<dyn Store>,
    ids: Arc<MessageIds>,
    limits: HistoryLimits,
    /// What every room's history takes together.
    total_bytes: AtomicUsize,
    /// Held by the one thread evicting for `--history-total-bytes`.
    evicting: Mutex<()>,
}

fn lock(room: &Mutex<Room>) -> MutexGuard<'_, Room> {
    // Every mutation of a room completes or panics before touching shared state, so a
    // poisoned room is still consistent enough to serve.
    room.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Rooms {
    /// Rooms with the history `store` kept, within `limits` (what is past them goes from
    /// the store too).
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn load(
        store: Arc<dyn Store>,
        topics: Arc<Topics>,
        ids: Arc<MessageIds>,
        limits: HistoryLimits,
    ) -> Result<Rooms, StoreError> {
        let rooms = Rooms {
            rooms: DashMap::new(),
            topics,
            store,
            ids,
            limits,
            total_bytes: AtomicUsize::new(0),
            evicting: Mutex::new(()),
        };
        for (name, messages) in rooms.store.load_rooms(limits)? {
            let name: Arc<str> = Arc::from(name);
            let mut room = Room::default();
            for m in messages {
                let seq = m.seq;
                room.last_seq = room.last_seq.max(seq);
                let message = Arc::new(Publish::from_stored(m).into_kept());
                room.bytes += message.size();
                room.history.push_back(Kept { seq, message });
            }
            rooms.total_bytes.fetch_add(room.bytes, Ordering::Relaxed);
            let trimmed = rooms.trim(&mut room);
            if trimmed {
                rooms.store.trim_room(&name, room.first_kept());
            }
            rooms.rooms.insert(name, Arc::new(Mutex::new(room)));
        }
        rooms.enforce_total();
        Ok(rooms)
    }

    /// The room called `name` (made empty on first use) and its name as the map keeps it.
    /// The common case, an existing room, takes only a read lock on the map's shard.
    fn entry(&self, name: &str) -> (Arc<str>, Arc<Mutex<Room>>) {
        if let Some(entry) = self.rooms.get(name) {
            return (entry.key().clone(), entry.value().clone());
        }
        let entry = self.rooms.entry(Arc::from(name)).or_default();
        (entry.key().clone(), entry.value().clone())
    }

    /// The room called `name`, locked (made empty on first use), passed to `f` with its
    /// name; then the history caps are enforced and an idle room is forgotten.
    fn with_room<R>(&self, name: &str, f: impl FnOnce(&Arc<str>, &mut Room) -> R) -> R {
        let result = loop {
            let (name, handle) = self.entry(name);
            let mut room = lock(&handle);
            if room.retired {
                // Forgotten between the lookup and the lock: look again.
                continue;
            }
            let result = f(&name, &mut room);
            if room.is_idle() {
                self.retire(&name, &handle, &mut room);
            }
            break result;
        };
        self.enforce_total();
        result
    }

    /// Takes an idle room out of the map, and its rows out of the store.
    fn retire(&self, name: &Arc<str>, handle: &Arc<Mutex<Room>>, room: &mut Room) {
        room.retired = true;
        self.rooms.remove_if(name, |_, v| Arc::ptr_eq(v, handle));
        if room.last_seq > 0 {
            self.store.forget_room(name);
        }
    }

    /// Drops a room's oldest messages past its own caps; whether any went.
    fn trim(&self, room: &mut Room) -> bool {
        let mut freed = 0;
        while room.history.len() > self.limits.messages || room.bytes > self.limits.room_bytes {
            freed += room.evict_oldest();
        }
        self.total_bytes.fetch_sub(freed, Ordering::Relaxed);
        freed > 0
    }

    /// Past `--history-total-bytes`, drops the oldest kept messages of all rooms, down to
    /// 15/16 of the cap: the rooms are ranked by their oldest message once per pass, not
    /// once per message.
    fn enforce_total(&self) {
        let cap = self.limits.total_bytes;
        if self.total_bytes.load(Ordering::Relaxed) <= cap {
            return;
        }
        // One thread evicts; the others go on (the cap is back within one pass).
        let Ok(_evicting) = self.evicting.try_lock() else {
            return;
        };
        let target = cap - cap / 16;
        let mut oldest: BinaryHeap<Reverse<(u64, Arc<str>)>> = self
            .rooms
            .iter()
            .filter_map(|e| {
                lock(e.value())
                    .oldest_id()
                    .map(|id| Reverse((id, e.key().clone())))
            })
            .collect();
        while self.total_bytes.load(Ordering::Relaxed) > target {
            let Some(Reverse((id, name))) = oldest.pop() else {
                break;
            };
            let Some(handle) = self.rooms.get(&name).map(|r| r.clone()) else {
                continue;
            };
            let mut room = lock(&handle);
            let Some(front) = room.oldest_id() else {
                continue;
            };
            if front > id {
                // It lost messages since it was ranked: rank it again.
                oldest.push(Reverse((front, name)));
                continue;
            }
            // This room's messages older than the next room's oldest, one at least.
            let next = oldest.peek().map(|Reverse((id, _))| *id);
            let mut freed = room.evict_oldest();
            while self.total_bytes.load(Ordering::Relaxed) - freed > target
                && room
                    .oldest_id()
                    .is_some_and(|id| next.is_none_or(|next| id < next))
            {
                freed += room.evict_oldest();
            }
            self.total_bytes.fetch_sub(freed, Ordering::Relaxed);
            match room.oldest_id() {
                Some(id) => {
                    self.store.trim_room(&name, room.first_kept());
                    oldest.push(Reverse((id, name)));
                }
                None if room.is_idle() => self.retire(&name, &handle, &mut room),
                None => self.store.trim_room(&name, room.first_kept()),
            }
        }
    }

    /// Rooms with members or kept history, by name.
    pub fn summaries(&self) -> Vec<RoomSummary> {
        let mut list: Vec<RoomSummary> = self
            .rooms
            .iter()
            .filter_map(|entry| {
                let room = lock(entry.value());
                (!room.members.is_empty() || !room.history.is_empty()).then(|| RoomSummary {
                    room: entry.key().to_string(),
                    members: room.members.len(),
                    last_seq: room.last_seq,
                })
            })
            .collect();
        list.sort_by(|a, b| a.room.cmp(&b.room));
        list
    }

    /// A room's members, or `None` for a room that never existed (or was forgotten).
    pub fn detail(&self, name: &str) -> Option<RoomDetail> {
        let room = self.rooms.get(name)?.clone();
        let room = lock(&room);
        Some(RoomDetail {
            room: name.to_owned(),
            members: room.members.keys().map(|m| m.to_string()).collect(),
            last_seq: room.last_seq,
        })
    }

    /// What all rooms keep, in bytes.
    pub fn kept_bytes(&self) -> usize {
        self.total_bytes.load(Ordering::Relaxed)
    }

    /// Numbers, keeps and delivers a message.
    fn keep_and_deliver(
        &self,
        name: &Arc<str>,
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
        let size = kept.size();
        room.bytes += size;
        self.total_bytes.fetch_add(size, Ordering::Relaxed);
        room.history.push_back(Kept {
            seq,
            message: kept.clone(),
        });
        self.trim(room);
        self.store.append_room(name, seq, &kept, room.first_kept());
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
    fn notice(&self, name: &Arc<str>, room: &mut Room, event: &str, user: &str) {
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

    /// Queues the replay `replay` asks for on the joiner's outbox, ahead of anything live.
    fn replay(&self, name: &str, room: &Room, subscriber: &Subscriber, replay: Replay) {
        let from = match replay {
            Replay::None => return,
            Replay::Last(n) => {
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                room.history.len().saturating_sub(n)
            }
            Replay::Since(since) => {
                let first_kept = room.first_kept();
                // Older than what is kept, or newer than anything this room ever numbered
                // (its history was reset): say so, then replay everything kept.
                if since.saturating_add(1) < first_kept || since > room.last_seq {
                    let gap = gap_notice(name, first_kept, &self.ids);
                    subscriber.offer(&gap, true);
                    0
                } else {
                    room.history.partition_point(|k| k.seq <= since)
                }
            }
        };
        if from < room.history.len() {
            // Refused only when the connection is ending: nothing to replay to.
            let _ = subscriber.outbox.offer_backlog(RoomReplay {
                messages: room
                    .history
                    .range(from..)
                    .map(|k| k.message.clone())
                    .collect(),
                stamp: subscriber.stamp(),
            });
        }
    }
}

/// An `x-event:gap` notice: what was asked for is no longer kept, the oldest kept is
/// `first_kept`. Not kept, no `x-seq`.
fn gap_notice(room: &str, first_kept: u64, ids: &MessageIds) -> Publish {
    let message_id = ids.next();
    let mut digits = itoa::Buffer::new();
    let mut headers = Headers::new();
    headers.push("destination", &format!("/topic/room.{room}"));
    headers.push("message-id", digits.format(message_id));
    headers.push("x-event", "gap");
    headers.push("x-first-seq", digits.format(first_kept));
    headers.push("x-timestamp", digits.format(now_millis()));
    Publish::new(message_id, headers, bytes::Bytes::new())
}

/// A room's kept messages replayed to one subscription as its socket takes them. It holds
/// the messages kept when the subscription was made (shared with the history, not copied),
/// so that what was kept then is delivered in full even if the room drops some of them
/// meanwhile; what it has not sent stays in memory until it is sent, at most
/// `--room-history-bytes` per replaying subscription.
#[derive(Debug)]
struct RoomReplay {
    messages: VecDeque<Arc<KeptMessage>>,
    stamp: Stamp,
}

impl Backlog for RoomReplay {
    fn subscription(&self) -> u32 {
        self.stamp.key()
    }

    fn fill(&mut self, batch: &mut Vec<Outgoing>, max_bytes: usize) -> bool {
        let stamp = &self.stamp;
        fill_from(&mut self.messages, batch, max_bytes, |kept| {
            stamp.kept(&kept)
        })
    }
}

impl Service for Rooms {
    fn check_send(&self, key: &str) -> Result<(), SessionError> {
        check_room_name(key)
    }

    fn subscribe(&self, request: SubscribeRequest<'_>) -> Result<(), SessionError> {
        let name = request.key;
        check_room_name(name)?;
        let subscriber = request.subscriber;
        self.with_room(name, |name, room| {
            // Under the room's lock: the replay is queued, then live messages, with nothing
            // in between.
            self.replay(name, room, &subscriber, request.replay);
            let user = subscriber.user.clone();
            room.subscribers.push(subscriber);
            let sessions = room.members.entry(user.clone()).or_insert(0);
            *sessions += 1;
            if *sessions == 1 {
                // The joiner's own join notice is its first live message.
                self.notice(name, room, "join", &user);
            }
        });
        Ok(())
    }

    fn unsubscribe(&self, key: &str, subscriber: &Subscriber) {
        if !self.rooms.contains_key(key) {
            return;
        }
        self.with_room(key, |name, room| {
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
                self.notice(name, room, "leave", user);
            }
        });
    }

    fn publish(&self, request: PublishRequest<'_>) -> Result<Published, SessionError> {
        let frame = request.frame;
        // 1.2 leaves header values untrimmed; `true` is the only value that means transient.
        let transient = frame.header("x-transient") == Some("true");
        Ok(self.with_room(request.key, |name, room| {
            if transient {
                let publish = request.message(request.destination, &[]);
                let fanout = self.deliver_live(name, room, &publish);
                return Published {
                    message_id: request.message_id,
                    seq: None,
                    fanout,
                    durable: false,
                };
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
            let (seq, fanout) =
                self.keep_and_deliver(name, room, request.message_id, headers, frame.body.clone());
            Published {
                message_id: request.message_id,
                seq: Some(seq),
                fanout,
                durable: false,
            }
        }))
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
