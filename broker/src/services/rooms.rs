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
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use stomp_codec::Headers;

use crate::cluster::rooms::{RoomBus, RoomState, Synced, cleared_of, log_entry, seq_of};
use crate::error::SessionError;
use crate::message::{KeptMessage, MessageIds, Publish, message_headers, now_millis};
use crate::outbox::{Backlog, End, Outgoing, fill_from};
use crate::receipts::{Answer, Pending, pending};
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
    /// Readers that are not members (the HTTP API): messages, no presence.
    watchers: Vec<Subscriber>,
    /// Users present, with how many of their sessions are in the room.
    members: BTreeMap<Arc<str>, usize>,
    /// Taken out of the map (nothing kept, nobody in it): whoever still holds it looks the
    /// room up again.
    retired: bool,
    /// With `--cluster`, where this node's copy of the room stands.
    mirror: Mirror,
    /// With `--cluster`: an operator cleared the room's history up to this `x-seq`; the
    /// copy keeps nothing at or before it (what was still on its way is delivered, not kept).
    cleared_upto: u64,
}

/// Where this node's copy of a room stands. One node owns its rooms; with `--cluster`,
/// Redis does, and a node keeps a copy (the newest `x-seq`, the kept messages, who is
/// present) of the rooms its own clients are in, made from Redis when the first one joins
/// and kept up to date from the room's channel, in `x-seq` order.
#[derive(Debug, Default)]
enum Mirror {
    /// The room is this node's own (one node), or a copy not made yet.
    #[default]
    Own,
    /// Being read from Redis: joiners wait, messages heard meanwhile are held.
    Syncing {
        joiners: Vec<Joiner>,
        early: BTreeMap<u64, Publish>,
    },
    /// Up to date as of `last_seq`: messages heard ahead of a missing one wait in `ahead`
    /// while the missing ones are read from Redis (`filling`).
    Live {
        ahead: BTreeMap<u64, Publish>,
        filling: bool,
    },
}

/// A subscription waiting for its room's copy to be made.
#[derive(Debug)]
struct Joiner {
    subscriber: Subscriber,
    /// A member (noted present, join notice) rather than a reader.
    presence: bool,
    replay: Replay,
    answer: Answer,
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

    /// Everyone a message goes to: members' subscriptions, then readers.
    fn receivers(&self) -> impl Iterator<Item = &Subscriber> {
        self.subscribers.iter().chain(&self.watchers)
    }

    fn is_idle(&self) -> bool {
        match self.mirror {
            Mirror::Own => {
                self.history.is_empty()
                    && self.subscribers.is_empty()
                    && self.watchers.is_empty()
                    && self.members.is_empty()
            }
            // A copy is kept while this node's clients are in the room.
            Mirror::Syncing { .. } => false,
            Mirror::Live { .. } => self.subscribers.is_empty() && self.watchers.is_empty(),
        }
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
    /// With `--cluster`: the rooms' side of the cluster, which owns the rooms.
    bus: OnceLock<Arc<RoomBus>>,
    /// This service, for the tasks that read from Redis to find it again.
    me: OnceLock<Weak<Rooms>>,
}

/// The newest `x-seq` of a room in the map (0 if it is not there).
fn lock_seq(rooms: &DashMap<Arc<str>, Arc<Mutex<Room>>>, name: &str) -> u64 {
    rooms
        .get(name)
        .map(|r| r.clone())
        .map_or(0, |room| lock(&room).last_seq)
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
            bus: OnceLock::new(),
            me: OnceLock::new(),
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
        self.total_bytes.fetch_sub(room.bytes, Ordering::Relaxed);
        room.bytes = 0;
        match self.bus.get() {
            // The copy goes; the room stays in Redis.
            Some(bus) => drop(bus.listen(name, false)),
            None if room.last_seq > 0 => self.store.forget_room(name),
            None => {}
        }
    }

    /// Writes to this node's store (one node): with `--cluster`, Redis keeps the rooms.
    fn store(&self) -> Option<&Arc<dyn Store>> {
        match self.bus.get() {
            Some(_) => None,
            None => Some(&self.store),
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
                    if let Some(store) = self.store() {
                        store.trim_room(&name, room.first_kept());
                    }
                    oldest.push(Reverse((id, name)));
                }
                None if room.is_idle() => self.retire(&name, &handle, &mut room),
                None => {
                    if let Some(store) = self.store() {
                        store.trim_room(&name, room.first_kept());
                    }
                }
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

    /// Drops every message room `name` keeps, in memory and on disk, or in Redis and every
    /// node's copy with `--cluster` (`/admin`): how many went, or `None` for a room that
    /// does not exist. Its numbering goes on (members recovering from before get a gap),
    /// unless, on one node, the room is left idle and forgotten.
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn clear_history(&self, name: &str) -> redis::RedisResult<Option<usize>> {
        if let Some(bus) = self.bus.get() {
            return bus.clear(name).await;
        }
        if !self.rooms.contains_key(name) {
            return Ok(None);
        }
        Ok(Some(self.with_room(name, |name, room| {
            let cleared = room.history.len();
            let mut freed = 0;
            while !room.history.is_empty() {
                freed += room.evict_oldest();
            }
            self.total_bytes.fetch_sub(freed, Ordering::Relaxed);
            self.store.trim_room(name, room.first_kept());
            cleared
        })))
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
        deliver(room.receivers(), publish, &mut fanout);
        self.topics
            .fan_out_to_patterns(&format!("room.{name}"), publish, &mut fanout);
        fanout
    }

    /// A new `x-event` notice's id and headers (join, leave) from `user`, without `x-seq`.
    fn notice_headers(&self, name: &str, event: &str, user: &str) -> (u64, Headers) {
        let message_id = self.ids.next();
        let mut digits = itoa::Buffer::new();
        let mut headers = Headers::new();
        headers.push("destination", &format!("/topic/room.{name}"));
        headers.push("message-id", digits.format(message_id));
        headers.push("x-event", event);
        headers.push("x-sender", user);
        headers.push("x-timestamp", digits.format(now_millis()));
        (message_id, headers)
    }

    /// Posts an `x-event` notice (join, leave) from `user`.
    fn notice(&self, name: &Arc<str>, room: &mut Room, event: &str, user: &str) {
        let (message_id, mut headers) = self.notice_headers(name, event, user);
        headers.push("x-seq", itoa::Buffer::new().format(room.last_seq + 1));
        self.keep_and_deliver(name, room, message_id, headers, bytes::Bytes::new());
    }

    /// An `x-event` notice (join, leave) from `user` as the room log keeps it, for Redis to
    /// number (`--cluster`).
    fn notice_entry(&self, name: &str, event: &str, user: &str) -> bytes::Bytes {
        let (message_id, headers) = self.notice_headers(name, event, user);
        log_entry(&Publish::new(message_id, headers, bytes::Bytes::new()))
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

/// With `--cluster`: Redis owns the rooms; this node keeps copies of the rooms its clients
/// are in (see [`Mirror`]).
impl Rooms {
    /// Shares the rooms through `bus` from now on: what this node kept on its own stays in
    /// its store, untouched, for when it runs alone again.
    pub fn attach(self: &Arc<Self>, bus: Arc<RoomBus>) {
        let _ = self.me.set(Arc::downgrade(self));
        if self.bus.set(bus).is_ok() {
            self.rooms.clear();
            self.total_bytes.store(0, Ordering::Relaxed);
        }
    }

    /// The rooms' side of the cluster, with `--cluster`.
    pub fn bus(&self) -> Option<&Arc<RoomBus>> {
        self.bus.get()
    }

    /// Every room, cluster-wide (`None` without `--cluster`).
    pub async fn cluster_rooms(&self) -> Option<Result<Vec<RoomState>, redis::RedisError>> {
        Some(self.bus.get()?.rooms().await)
    }

    /// One room, cluster-wide (`None` without `--cluster`).
    pub async fn cluster_room(
        &self,
        name: &str,
    ) -> Option<Result<Option<RoomState>, redis::RedisError>> {
        Some(self.bus.get()?.room(name).await)
    }

    fn subscribe_shared(&self, bus: &Arc<RoomBus>, request: SubscribeRequest<'_>) -> Pending {
        let (pending, answer) = pending();
        let joiner = Joiner {
            subscriber: request.subscriber,
            presence: request.presence,
            replay: request.replay,
            answer,
        };
        self.with_room(request.key, |name, room| match &mut room.mirror {
            Mirror::Own => {
                room.mirror = Mirror::Syncing {
                    joiners: vec![joiner],
                    early: BTreeMap::new(),
                };
                self.start_sync(bus, name.clone());
            }
            Mirror::Syncing { joiners, .. } => joiners.push(joiner),
            Mirror::Live { .. } => self.attach_joiner(bus, name, room, joiner),
        });
        pending
    }

    /// Replays to a joiner from the copy, adds it, and notes it present in Redis (which
    /// posts the join notice if it is the user's first session anywhere; the joiner hears
    /// it live, in order).
    fn attach_joiner(&self, bus: &RoomBus, name: &Arc<str>, room: &mut Room, joiner: Joiner) {
        let subscriber = joiner.subscriber;
        self.replay(name, room, &subscriber, joiner.replay);
        if !joiner.presence {
            room.watchers.push(subscriber);
            joiner.answer.complete(Ok(None));
            return;
        }
        let field = RoomBus::field(name, subscriber.session.0, subscriber.key);
        let notice = self.notice_entry(name, "join", &subscriber.user);
        bus.join(name.clone(), field, &subscriber.user, notice, joiner.answer);
        room.subscribers.push(subscriber);
    }

    /// Listens to the room's channel, then reads the room from Redis, trying again until
    /// `--cluster-timeout-ms` has passed.
    fn start_sync(&self, bus: &Arc<RoomBus>, name: Arc<str>) {
        let Some(me) = self.me.get().and_then(Weak::upgrade) else {
            return;
        };
        let bus = bus.clone();
        tokio::spawn(async move {
            let timeout = bus.cluster().timeout();
            let deadline = Instant::now() + timeout;
            // Confirmed, or the bus will listen to it when it reconnects (and say so).
            let _ = tokio::time::timeout(timeout, bus.listen(&name, true)).await;
            let mut backoff = Duration::from_millis(20);
            let synced = loop {
                match bus.sync(&name).await {
                    Ok(synced) => break Ok(synced),
                    Err(e) if Instant::now() + backoff >= deadline => break Err(e),
                    Err(_) => {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                    }
                }
            };
            me.synced(&bus, &name, synced);
        });
    }

    /// The room as Redis holds it: the copy is made, what was heard meanwhile applied, and
    /// the joiners added. If Redis could not be read, the joiners' sessions end.
    fn synced(&self, bus: &RoomBus, name: &str, synced: Result<Synced, redis::RedisError>) {
        if !self.rooms.contains_key(name) {
            return;
        }
        self.with_room(name, |name, room| {
            let Mirror::Syncing { joiners, early } = std::mem::take(&mut room.mirror) else {
                return;
            };
            let synced = match synced {
                Ok(synced) => synced,
                Err(e) => {
                    tracing::warn!(room = %name, "cannot read the room from Redis: {e}");
                    for joiner in joiners {
                        joiner.subscriber.outbox.end(End::ClusterUnavailable);
                        joiner.answer.complete(Err(End::ClusterUnavailable));
                    }
                    // Own and empty: idle, forgotten on the way out.
                    return;
                }
            };
            self.make_copy(room, synced, early);
            self.advance(name, room);
            for joiner in joiners {
                self.attach_joiner(bus, name, room, joiner);
            }
        });
    }

    /// Makes the copy what Redis holds: its newest `x-seq`, members and kept messages, with
    /// `ahead` (heard meanwhile) waiting to be delivered in order.
    fn make_copy(&self, room: &mut Room, synced: Synced, ahead: BTreeMap<u64, Publish>) {
        self.total_bytes.fetch_sub(room.bytes, Ordering::Relaxed);
        room.bytes = 0;
        room.history.clear();
        for numbered in synced.history {
            self.keep(room, numbered.seq, numbered.publish);
        }
        self.trim(room);
        room.last_seq = synced.seq;
        room.members = synced
            .members
            .into_iter()
            .map(|m| (Arc::from(m), 1))
            .collect();
        room.mirror = Mirror::Live {
            ahead,
            filling: false,
        };
    }

    /// Keeps a numbered message in the copy's history (unless an operator cleared it).
    fn keep(&self, room: &mut Room, seq: u64, publish: Publish) {
        if seq <= room.cleared_upto {
            return;
        }
        let kept = Arc::new(publish.into_kept());
        let size = kept.size();
        room.bytes += size;
        self.total_bytes.fetch_add(size, Ordering::Relaxed);
        room.history.push_back(Kept { seq, message: kept });
    }

    /// A message heard on room `name`'s channel (`x-seq` first; none when transient).
    pub fn from_cluster(&self, name: &str, publish: Publish) {
        if !self.rooms.contains_key(name) {
            return;
        }
        if let Some(upto) = cleared_of(&publish) {
            self.with_room(name, |_, room| {
                room.cleared_upto = room.cleared_upto.max(upto);
                let mut freed = 0;
                while room.history.front().is_some_and(|k| k.seq <= upto) {
                    freed += room.evict_oldest();
                }
                self.total_bytes.fetch_sub(freed, Ordering::Relaxed);
            });
            return;
        }
        let Some(seq) = seq_of(&publish) else {
            // Transient: to whoever is here now, in no particular order with the rest.
            if let Some(room) = self.rooms.get(name).map(|r| r.clone()) {
                let room = lock(&room);
                deliver(room.receivers(), &publish, &mut Fanout::default());
            }
            return;
        };
        self.with_room(name, |name, room| {
            if seq <= room.last_seq {
                return;
            }
            match &mut room.mirror {
                Mirror::Syncing { early, .. } => {
                    early.insert(seq, publish);
                }
                Mirror::Live { ahead, .. } => {
                    ahead.insert(seq, publish);
                    self.advance(name, room);
                }
                Mirror::Own => {}
            }
        });
    }

    /// Delivers the messages that follow `last_seq` without a gap; on a gap, reads the
    /// missing ones from Redis.
    fn advance(&self, name: &Arc<str>, room: &mut Room) {
        loop {
            let next = room.last_seq + 1;
            let Mirror::Live { ahead, filling } = &mut room.mirror else {
                return;
            };
            while ahead.first_key_value().is_some_and(|(s, _)| *s < next) {
                ahead.pop_first();
            }
            match ahead.first_key_value() {
                Some((s, _)) if *s == next => {
                    if let Some((seq, publish)) = ahead.pop_first() {
                        self.accept(room, seq, publish);
                    }
                }
                Some(_) if !*filling => {
                    *filling = true;
                    let after = room.last_seq;
                    self.start_fill(name.clone(), after);
                    return;
                }
                _ => return,
            }
        }
    }

    /// The next message in order: delivered to this node's members, kept in the copy, and
    /// the copy's members updated from join and leave notices.
    fn accept(&self, room: &mut Room, seq: u64, publish: Publish) {
        room.last_seq = seq;
        deliver(room.receivers(), &publish, &mut Fanout::default());
        let event = publish
            .headers()
            .find(|(n, _)| *n == "x-event")
            .map(|(_, v)| v == "join");
        if let Some(joined) = event
            && let Some((_, sender)) = publish.headers().find(|(n, _)| *n == "x-sender")
        {
            if joined {
                room.members.insert(Arc::from(sender), 1);
            } else {
                room.members.remove(sender);
            }
        }
        self.keep(room, seq, publish);
        self.trim(room);
    }

    /// Reads what follows `after` from Redis (messages missed while the bus reconnected,
    /// or lost on the way), then goes on in order. What Redis no longer keeps is skipped.
    fn start_fill(&self, name: Arc<str>, after: u64) {
        let (Some(me), Some(bus)) = (self.me.get().and_then(Weak::upgrade), self.bus.get()) else {
            return;
        };
        let bus = bus.clone();
        let limit = self.limits.messages.max(1);
        tokio::spawn(async move {
            let read = me.read_while_held(&name, "reading missed room messages", || {
                bus.range(&name, after, limit)
            });
            if let Some(read) = read.await {
                me.filled(&name, read);
            }
        });
    }

    /// Asks Redis with `read` until it answers, backing off, while this node still holds
    /// a copy of room `name`; `None` once it no longer does.
    async fn read_while_held<T, F, Fut>(&self, name: &str, what: &str, mut read: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let mut backoff = Duration::from_millis(20);
        loop {
            match read().await {
                Ok(answer) => return Some(answer),
                Err(e) => {
                    tracing::debug!(room = %name, "{what}: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    if !self.rooms.contains_key(name) {
                        return None;
                    }
                }
            }
        }
    }

    fn filled(&self, name: &str, read: Vec<crate::cluster::rooms::Numbered>) {
        if !self.rooms.contains_key(name) {
            return;
        }
        self.with_room(name, |name, room| {
            let last_seq = room.last_seq;
            let Mirror::Live { ahead, filling } = &mut room.mirror else {
                return;
            };
            *filling = false;
            for numbered in read {
                if numbered.seq > last_seq {
                    ahead.insert(numbered.seq, numbered.publish);
                }
            }
            // Redis keeps nothing between: skip to what it has (or to what was heard).
            if let Some((first, _)) = ahead.first_key_value()
                && *first > last_seq + 1
            {
                tracing::warn!(room = %name, from = last_seq + 1, to = *first - 1, "room messages no longer kept in Redis were skipped");
                room.last_seq = *first - 1;
            }
            self.advance(name, room);
        });
    }

    /// After the bus lost Redis and listened again: every copy reads the room again and
    /// delivers what it missed meanwhile.
    pub fn catch_up(&self) {
        let (Some(me), Some(bus)) = (self.me.get().and_then(Weak::upgrade), self.bus.get()) else {
            return;
        };
        let names: Vec<Arc<str>> = self
            .rooms
            .iter()
            .filter(|e| matches!(lock(e.value()).mirror, Mirror::Live { .. }))
            .map(|e| e.key().clone())
            .collect();
        for name in names {
            let (me, bus) = (me.clone(), bus.clone());
            tokio::spawn(async move {
                let synced =
                    me.read_while_held(&name, "reading the room again", || bus.sync(&name));
                if let Some(synced) = synced.await {
                    me.resynced(&name, synced);
                }
            });
        }
    }

    /// The room read again after an outage: what follows the copy is delivered; if Redis
    /// holds less than the copy (it lost its data: it ran without an append-only file),
    /// the copy starts again from what Redis holds.
    fn resynced(&self, name: &str, synced: Synced) {
        if !self.rooms.contains_key(name) {
            return;
        }
        if synced.seq >= lock_seq(&self.rooms, name) {
            self.filled(name, synced.history);
            return;
        }
        self.with_room(name, |name, room| {
            if !matches!(room.mirror, Mirror::Live { .. }) {
                return;
            }
            tracing::warn!(room = %name, kept = synced.seq, had = room.last_seq, "Redis lost this room's messages (run it with appendonly yes): numbering starts again from what it holds");
            self.make_copy(room, synced, BTreeMap::new());
        });
    }

    /// Forgets every copy (this node was declared dead: its sessions are closing and
    /// Redis has already taken them out of the rooms).
    pub fn drop_copies(&self) {
        let names: Vec<Arc<str>> = self.rooms.iter().map(|e| e.key().clone()).collect();
        for name in names {
            if let Some((name, handle)) = self.rooms.remove(&name) {
                let mut room = lock(&handle);
                room.retired = true;
                self.total_bytes.fetch_sub(room.bytes, Ordering::Relaxed);
                room.bytes = 0;
                if let Some(bus) = self.bus.get() {
                    drop(bus.listen(&name, false));
                }
            }
        }
    }

    /// Posts the leave notices of a dead node's sessions (or this node's previous life,
    /// `force`), once each cluster-wide.
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn reap(&self, node: &str, force: bool) -> redis::RedisResult<usize> {
        let Some(bus) = self.bus.get() else {
            return Ok(0);
        };
        bus.reap(node, force, |room, user| {
            self.notice_entry(room, "leave", user)
        })
        .await
    }

    fn publish_shared(
        &self,
        bus: &RoomBus,
        request: PublishRequest<'_>,
        transient: bool,
    ) -> Published {
        if transient {
            let publish = request.message(request.destination, &[]);
            bus.cluster()
                .publish_topic(&format!("room.{}", request.key), &publish);
            return Published {
                message_id: request.message_id,
                ..Published::default()
            };
        }
        let publish = request.message(request.destination, &[]);
        let (pending, answer) = pending();
        bus.append(Arc::from(request.key), log_entry(&publish), answer);
        Published {
            message_id: request.message_id,
            pending: Some(pending),
            ..Published::default()
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

    fn subscribe(&self, request: SubscribeRequest<'_>) -> Result<Option<Pending>, SessionError> {
        let name = request.key;
        check_room_name(name)?;
        if let Some(bus) = self.bus.get() {
            return Ok(Some(self.subscribe_shared(bus, request)));
        }
        let subscriber = request.subscriber;
        self.with_room(name, |name, room| {
            // Under the room's lock: the replay is queued, then live messages, with nothing
            // in between.
            self.replay(name, room, &subscriber, request.replay);
            if !request.presence {
                room.watchers.push(subscriber);
                return;
            }
            let user = subscriber.user.clone();
            room.subscribers.push(subscriber);
            let sessions = room.members.entry(user.clone()).or_insert(0);
            *sessions += 1;
            if *sessions == 1 {
                // The joiner's own join notice is its first live message.
                self.notice(name, room, "join", &user);
            }
        });
        Ok(None)
    }

    fn unsubscribe(&self, key: &str, subscriber: &Subscriber) {
        if !self.rooms.contains_key(key) {
            return;
        }
        self.with_room(key, |name, room| {
            if let Mirror::Syncing { joiners, .. } = &mut room.mirror {
                // Left before the copy was made: never added, never noted present.
                if let Some(at) = joiners
                    .iter()
                    .position(|j| j.subscriber.is(subscriber.session, subscriber.key))
                {
                    joiners.remove(at).answer.complete(Ok(None));
                    return;
                }
            }
            // A reader leaves without a word.
            room.watchers
                .retain(|s| !s.is(subscriber.session, subscriber.key));
            let before = room.subscribers.len();
            room.subscribers
                .retain(|s| !s.is(subscriber.session, subscriber.key));
            if room.subscribers.len() == before {
                return;
            }
            if let Some(bus) = self.bus.get() {
                let field = RoomBus::field(name, subscriber.session.0, subscriber.key);
                let notice = self.notice_entry(name, "leave", &subscriber.user);
                bus.leave(name.clone(), field, &subscriber.user, notice);
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
        if let Some(bus) = self.bus.get() {
            return Ok(self.publish_shared(bus, request, transient));
        }
        Ok(self.with_room(request.key, |name, room| {
            if transient {
                let publish = request.message(request.destination, &[]);
                let fanout = self.deliver_live(name, room, &publish);
                return Published {
                    message_id: request.message_id,
                    seq: None,
                    fanout,
                    durable: false,
                    pending: None,
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
                pending: None,
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
