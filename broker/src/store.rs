//! Chat history storage behind a trait: what rooms keep.
//!
//! In: messages to keep (written behind, in batches, by one writer thread) and removals.
//! Out: everything kept, loaded once at start. The broker's memory is the source of truth
//! while it runs; the store makes history survive a restart.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::{Connection, params};
use tracing::{error, warn};

use crate::message::{KeptMessage, StoredMessage};
use crate::writer::{Health, Pending, WriterThread, next_batch};
use rusqlite_migration::{M, Migrations};

mod chunk;

pub use chunk::ChunkError;
use chunk::{ChunkWriter, read_chunk};

/// Why the store could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused.
    #[error("database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// The operating system refused: creating the data directory, or starting the thread
    /// that writes a database.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The directory or database file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A stored run of room messages could not be read back.
    #[error("database {path}: corrupt messages of room {room}: {source}")]
    Chunk {
        /// The database file.
        path: PathBuf,
        /// The room.
        room: String,
        /// What was wrong.
        source: ChunkError,
    },
    /// The schema could not be brought up to date.
    #[error("database {path}: migrating the schema: {source}")]
    Migration {
        /// The database file.
        path: PathBuf,
        /// What the migration said.
        source: rusqlite_migration::Error,
    },
    /// Stored headers could not be read back.
    #[error("database {path}: corrupt headers in {table}: {source}")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// The table.
        table: &'static str,
        /// The JSON error.
        source: serde_json::Error,
    },
}

/// Starts thread `name`, which writes the database at `path` with `run`.
pub(crate) fn spawn_writer<Op: Send + 'static>(
    name: &str,
    path: &Path,
    run: impl FnOnce(Receiver<Op>) + Send + 'static,
) -> Result<WriterThread<Op>, StoreError> {
    WriterThread::spawn(name, run).map_err(|source| StoreError::Io {
        what: "starting the writer thread of",
        path: path.to_owned(),
        source,
    })
}

/// A kept row as a message.
pub(crate) fn stored_message(
    seq: i64,
    message_id: i64,
    headers: &str,
    body: Vec<u8>,
) -> Result<StoredMessage, serde_json::Error> {
    Ok(StoredMessage {
        seq: u64::try_from(seq).unwrap_or(0),
        message_id: u64::try_from(message_id).unwrap_or(0),
        headers: serde_json::from_str(headers)?,
        body: Bytes::from(body),
    })
}

/// A kept row as selected by both stores: its group's name (room or queue), its number,
/// `message-id`, headers as JSON, and body.
pub(crate) type KeptRow = (String, i64, i64, String, Vec<u8>);

/// Reads a [`KeptRow`] from the first five columns.
pub(crate) fn kept_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<KeptRow> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
    ))
}

/// Appends `message` to the last group if it has the same name (rows come ordered by
/// name), else starts a group.
pub(crate) fn push_grouped(
    groups: &mut Vec<(String, Vec<StoredMessage>)>,
    name: String,
    message: StoredMessage,
) {
    match groups.last_mut() {
        Some((last, messages)) if *last == name => messages.push(message),
        _ => groups.push((name, vec![message])),
    }
}

/// What rooms keep, at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Messages per room (`--room-history`).
    pub messages: usize,
    /// Bytes per room (`--room-history-bytes`), as [`KeptMessage::size`] counts them.
    pub room_bytes: usize,
    /// Bytes for all rooms together (`--history-total-bytes`).
    pub total_bytes: usize,
}

/// Where kept messages go.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Every room's newest messages, oldest first: at most `limits.messages` a room, and
    /// about `limits.room_bytes` (whoever loads them applies the caps exactly).
    ///
    /// # Errors
    /// The store cannot be read.
    fn load_rooms(
        &self,
        limits: HistoryLimits,
    ) -> Result<Vec<(String, Vec<StoredMessage>)>, StoreError>;
    /// Keeps a room's message `seq` (its history's own copy, shared); messages before
    /// `first_kept`, the room's oldest kept now, go.
    fn append_room(&self, room: &Arc<str>, seq: u64, message: &Arc<KeptMessage>, first_kept: u64);
    /// Drops a room's messages before `first_kept`.
    fn trim_room(&self, room: &Arc<str>, first_kept: u64);
    /// Drops everything of a room that was forgotten (nothing kept, nobody in it): if it
    /// comes back, it numbers from 1 again.
    fn forget_room(&self, room: &Arc<str>);
    /// Returns once everything handed over so far is written.
    fn flush(&self);
    /// Bytes handed over and not yet taken by the writer: connections stop being read
    /// while it is over its limit.
    fn pending(&self) -> &Pending;
    /// Whether writes reach the disk: the writer runs and its last commit went through.
    fn is_healthy(&self) -> bool {
        true
    }
    /// How long its commits take (none for a store that does not write).
    fn commit_seconds(&self) -> Option<prometheus_client::metrics::histogram::Histogram> {
        None
    }
}

enum Op {
    Room {
        room: Arc<str>,
        seq: u64,
        message: Arc<KeptMessage>,
        first_kept: u64,
    },
    Trim {
        room: Arc<str>,
        first_kept: u64,
    },
    Forget(Arc<str>),
    Flush(SyncSender<()>),
}

impl Op {
    /// What it pins in memory until the writer takes it.
    fn pinned(&self) -> usize {
        match self {
            Op::Room { message, .. } => message.size(),
            _ => 0,
        }
    }

    /// What it weighs in a batch: a message the room no longer keeps weighs nothing (it
    /// will not be written).
    fn weight(&self) -> usize {
        match self {
            Op::Room { message, .. } if Arc::strong_count(message) > 1 => message.size(),
            _ => 0,
        }
    }
}

/// SQLite in WAL mode, written by one thread in batched transactions.
///
/// A room's messages are kept in chunks ([`chunk`]): each transaction writes one row per
/// room it has messages for, and drops a room's oldest rows once every message in them is
/// past `keep`.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    writer: WriterThread<Op>,
    pending: Arc<Pending>,
    health: Arc<Health>,
}

/// Version 1: one row per room message (and messages waiting for offline users).
const V1_ROOM_MESSAGES: &str = "CREATE TABLE room_messages (
            room TEXT NOT NULL,
            seq INTEGER NOT NULL,
            message_id INTEGER NOT NULL,
            headers TEXT NOT NULL,
            body BLOB NOT NULL,
            PRIMARY KEY (room, seq)
        ) WITHOUT ROWID;
        CREATE TABLE user_messages (
            id INTEGER PRIMARY KEY,
            user TEXT NOT NULL,
            queue TEXT NOT NULL,
            message_id INTEGER NOT NULL,
            headers TEXT NOT NULL,
            body BLOB NOT NULL
        );
        CREATE INDEX user_messages_by_queue ON user_messages (user, queue, id);";
/// Version 2: messages waiting for offline users moved to the durable queue store
/// (queues.db).
const V2_NO_USER_MESSAGES: &str = "DROP TABLE user_messages;";
/// Version 3: room messages in chunks, one row per room per transaction. Rows are appended
/// in id order, which is also each room's seq order; the writer finds a room's rows by id.
const V3_ROOM_CHUNKS: &str = "CREATE TABLE room_chunks (
            id INTEGER PRIMARY KEY,
            room TEXT NOT NULL,
            first_seq INTEGER NOT NULL,
            last_seq INTEGER NOT NULL,
            messages BLOB NOT NULL
        );";

/// Schema changes, applied in order on start (rusqlite_migration; `PRAGMA user_version`
/// counts those done). Version 4 moves every row of the one-message-per-row table into
/// chunks, a change SQL alone cannot make, in the same transaction as the version bump.
fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(V1_ROOM_MESSAGES),
        M::up(V2_NO_USER_MESSAGES),
        M::up(V3_ROOM_CHUNKS),
        M::up_with_hook("", |tx: &rusqlite::Transaction<'_>| {
            room_messages_into_chunks(tx)?;
            Ok(())
        }),
    ])
}

/// Most operations written in one transaction: enough for a linger's worth at well over
/// 100,000 room messages per second.
const BATCH: usize = 8192;
/// Most bytes of messages written in one transaction (the one that passes it included):
/// what a batch holds in memory while it is written, and what one row may hold.
const BATCH_BYTES: usize = 16 << 20;
/// How long a busy writer collects messages before it commits them: at tens of thousands
/// of room messages per second, 20 transactions per second instead of thousands.
const LINGER: Duration = Duration::from_millis(50);
/// A batch at least this large means the broker is busy: the next one lingers.
const BUSY_BATCH: usize = 64;
/// Most messages per chunk when older rows are moved into chunks.
const MIGRATED_CHUNK: usize = 1024;

/// Where each room's rows are, oldest first: their ids and last seqs. The writer thread's
/// own, so that dropping a room's oldest rows needs no index in the database.
type ChunkIndex = HashMap<Arc<str>, VecDeque<(i64, u64)>>;

impl SqliteStore {
    /// Opens (creating and migrating) `stoa.db` in `dir`; connections stop being read
    /// while more than `pending_limit` bytes of messages wait for the writer.
    ///
    /// # Errors
    /// SQLite cannot open or migrate the file.
    pub fn open(dir: &Path, pending_limit: usize) -> Result<SqliteStore, StoreError> {
        let path = dir.join("stoa.db");
        let sqlite = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let mut conn = open_connection(&path).map_err(sqlite)?;
        migrate(&mut conn).map_err(|source| StoreError::Migration {
            path: path.clone(),
            source,
        })?;
        let index = chunk_index(&conn).map_err(sqlite)?;
        let writer_path = path.clone();
        let pending = Arc::new(Pending::new(pending_limit));
        let writer_pending = pending.clone();
        let health = Arc::new(Health::default());
        let writer_health = health.clone();
        let writer = spawn_writer("stoa-store", &path, move |rx| {
            write_loop(
                conn,
                index,
                rx,
                &writer_path,
                (&writer_pending, &writer_health),
            );
        })?;
        Ok(SqliteStore {
            path,
            writer,
            pending,
            health,
        })
    }

    fn send(&self, op: Op) {
        let pinned = op.pinned();
        self.pending.add(pinned);
        if !self.writer.send(op) {
            self.pending.sub(pinned);
            error!(path = %self.path.display(), "store writer has stopped; a message was not kept");
        }
    }

    fn reader(&self) -> Result<Connection, StoreError> {
        open_connection(&self.path).map_err(|source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }
}

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    // WAL: readers never block the writer; NORMAL: a commit survives a process crash, and
    // only the last commits before a power loss can be lost.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // Rows are appended at the table's end and the oldest deleted: keep those pages cached
    // (16 MiB). The log is copied back every 1,000 pages (SQLite's default): with chunks the
    // log no longer rewrites the same hot pages, and 8,000-page copies held the writer
    // thread, which shares the broker's cores, for tens of milliseconds each.
    conn.pragma_update(None, "cache_size", -16_384)?;
    // A large transaction grows the log; give the space back once it is copied.
    conn.pragma_update(None, "journal_size_limit", 64 << 20)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), rusqlite_migration::Error> {
    migrations().to_latest(conn)
}

/// Moves every row of the one-message-per-row table into chunks, room by room.
fn room_messages_into_chunks(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    let mut select = tx.prepare(
        "SELECT room, seq, message_id, headers, body FROM room_messages ORDER BY room, seq",
    )?;
    let mut insert = tx.prepare(
        "INSERT INTO room_chunks (room, first_seq, last_seq, messages) VALUES (?1, ?2, ?3, ?4)",
    )?;
    let mut current: Option<(String, ChunkWriter)> = None;
    let mut rows = select.query([])?;
    while let Some(row) = rows.next()? {
        let (room, seq, message_id, headers, body) = kept_row(row)?;
        let headers: Vec<(String, String)> = serde_json::from_str(&headers).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Text, Box::new(e))
        })?;
        let full = current
            .as_ref()
            .is_some_and(|(name, chunk)| *name != room || chunk.len() == MIGRATED_CHUNK);
        if full && let Some((name, chunk)) = current.take() {
            insert_chunk(&mut insert, &name, &chunk)?;
        }
        let (_, chunk) = current.get_or_insert_with(|| (room, ChunkWriter::new()));
        chunk.push(
            u64::try_from(seq).unwrap_or(0),
            u64::try_from(message_id).unwrap_or(0),
            headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            &body,
        );
    }
    if let Some((name, chunk)) = current {
        insert_chunk(&mut insert, &name, &chunk)?;
    }
    tx.execute_batch("DROP TABLE room_messages;")
}

fn insert_chunk(
    insert: &mut rusqlite::Statement<'_>,
    room: &str,
    chunk: &ChunkWriter,
) -> rusqlite::Result<()> {
    let (first, last) = chunk.seqs();
    insert.execute(params![room, to_i64(first), to_i64(last), chunk.bytes()])?;
    Ok(())
}

fn chunk_index(conn: &Connection) -> rusqlite::Result<ChunkIndex> {
    let mut index = ChunkIndex::new();
    let mut stmt = conn.prepare("SELECT id, room, last_seq FROM room_chunks ORDER BY id")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let (id, room, last_seq): (i64, String, i64) = (row.get(0)?, row.get(1)?, row.get(2)?);
        index
            .entry(Arc::from(room))
            .or_default()
            .push_back((id, u64::try_from(last_seq).unwrap_or(0)));
    }
    Ok(index)
}

fn write_loop(
    mut conn: Connection,
    mut index: ChunkIndex,
    rx: Receiver<Op>,
    path: &Path,
    (pending, health): (&Pending, &Health),
) {
    let urgent = |op: &Op| matches!(op, Op::Flush(_));
    // Quiet rooms are committed at once; only a writer that keeps finding many messages
    // waiting (a busy broker) gathers them into fewer, larger transactions, one every
    // LINGER however long each takes to write.
    let mut gather_until = None;
    while let Some(batch) = next_batch(&rx, (BATCH, BATCH_BYTES), Op::weight, gather_until, urgent)
    {
        pending.sub(batch.iter().map(Op::pinned).sum());
        let busy = batch.len() >= BUSY_BATCH;
        gather_until = busy.then(|| Instant::now() + LINGER);
        let mut acks = Vec::new();
        let started = Instant::now();
        let written = write_batch(&mut conn, &mut index, batch, &mut acks);
        if let Err(e) = &written {
            error!(path = %path.display(), "store write failed: {e}");
        }
        health.record_commit(written.is_ok(), started.elapsed());
        for ack in acks {
            let _ = ack.send(());
        }
    }
}

/// What a batch does to one room, its operations taken in order.
#[derive(Default)]
struct RoomRun {
    /// Messages to write, in seq order.
    messages: Vec<(u64, Arc<KeptMessage>)>,
    /// Rows before the batch whose messages are all older than this go.
    first_kept: u64,
    /// The room was forgotten: every row from before goes.
    forgotten: bool,
}

fn write_batch(
    conn: &mut Connection,
    index: &mut ChunkIndex,
    batch: Vec<Op>,
    acks: &mut Vec<SyncSender<()>>,
) -> rusqlite::Result<()> {
    let mut runs: HashMap<Arc<str>, RoomRun> = HashMap::new();
    for op in batch {
        match op {
            Op::Room {
                room,
                seq,
                message,
                first_kept,
            } => {
                let run = runs.entry(room).or_default();
                run.first_kept = first_kept;
                // A message the room no longer keeps is not written (nor held any longer).
                if Arc::strong_count(&message) > 1 {
                    run.messages.push((seq, message));
                }
            }
            Op::Trim { room, first_kept } => runs.entry(room).or_default().first_kept = first_kept,
            Op::Forget(room) => {
                *runs.entry(room).or_default() = RoomRun {
                    forgotten: true,
                    ..RoomRun::default()
                };
            }
            Op::Flush(ack) => acks.push(ack),
        }
    }
    let tx = conn.transaction()?;
    // Per room: the new row's id and last seq (if any), and how many of its oldest rows went.
    let mut written = Vec::with_capacity(runs.len());
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO room_chunks (room, first_seq, last_seq, messages) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut delete = tx.prepare_cached("DELETE FROM room_chunks WHERE id = ?1")?;
        for (room, run) in runs {
            // A row goes once every message in it is older than the oldest kept.
            let mut dropped = 0;
            for &(old, old_last) in index.get(&room).into_iter().flatten() {
                if !run.forgotten && old_last >= run.first_kept {
                    break;
                }
                delete.execute(params![old])?;
                dropped += 1;
            }
            let mut chunk = ChunkWriter::new();
            for (seq, message) in &run.messages {
                if *seq >= run.first_kept {
                    chunk.push(
                        *seq,
                        message.message_id(),
                        message.headers(),
                        message.body(),
                    );
                }
            }
            let row = if chunk.is_empty() {
                None
            } else {
                insert_chunk(&mut insert, &room, &chunk)?;
                Some((tx.last_insert_rowid(), chunk.seqs().1))
            };
            written.push((room, row, dropped));
        }
    }
    tx.commit()?;
    // Committed: now the index may follow (on an error it still matches the database).
    for (room, row, dropped) in written {
        let rows = index.entry(room.clone()).or_default();
        rows.drain(..dropped);
        if let Some(row) = row {
            rows.push_back(row);
        }
        if rows.is_empty() {
            index.remove(&room);
        }
    }
    Ok(())
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Store for SqliteStore {
    fn load_rooms(
        &self,
        limits: HistoryLimits,
    ) -> Result<Vec<(String, Vec<StoredMessage>)>, StoreError> {
        let conn = self.reader()?;
        let sqlite = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let mut stmt = conn
            .prepare("SELECT room, messages FROM room_chunks ORDER BY id")
            .map_err(sqlite)?;
        let mut rows = stmt.query([]).map_err(sqlite)?;
        let mut rooms: BTreeMap<String, (VecDeque<StoredMessage>, usize)> = BTreeMap::new();
        while let Some(row) = rows.next().map_err(sqlite)? {
            let room: String = row.get(0).map_err(sqlite)?;
            let chunk: Vec<u8> = row.get(1).map_err(sqlite)?;
            let messages = read_chunk(&Bytes::from(chunk)).map_err(|source| StoreError::Chunk {
                path: self.path.clone(),
                room: room.clone(),
                source,
            })?;
            let (kept, bytes) = rooms.entry(room).or_default();
            for message in messages {
                // Seqs only grow; should a room ever have numbered again from lower, the
                // later messages are the room's history.
                while let Some(last) = kept.back()
                    && last.seq >= message.seq
                {
                    *bytes -= last.approximate_size();
                    kept.pop_back();
                }
                *bytes += message.approximate_size();
                kept.push_back(message);
                // Never more than the caps in memory while loading, whatever is on disk.
                while kept.len() > limits.messages || *bytes > limits.room_bytes {
                    let Some(first) = kept.pop_front() else {
                        break;
                    };
                    *bytes -= first.approximate_size();
                }
            }
        }
        Ok(rooms
            .into_iter()
            .filter(|(_, (kept, _))| !kept.is_empty())
            .map(|(room, (kept, _))| (room, Vec::from(kept)))
            .collect())
    }

    fn append_room(&self, room: &Arc<str>, seq: u64, message: &Arc<KeptMessage>, first_kept: u64) {
        self.send(Op::Room {
            room: room.clone(),
            seq,
            message: message.clone(),
            first_kept,
        });
    }

    fn trim_room(&self, room: &Arc<str>, first_kept: u64) {
        self.send(Op::Trim {
            room: room.clone(),
            first_kept,
        });
    }

    fn forget_room(&self, room: &Arc<str>) {
        self.send(Op::Forget(room.clone()));
    }

    fn flush(&self) {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        self.send(Op::Flush(ack_tx));
        if ack_rx.recv().is_err() {
            warn!("store writer stopped before a flush");
        }
    }

    fn pending(&self) -> &Pending {
        &self.pending
    }

    fn is_healthy(&self) -> bool {
        self.writer.is_running() && self.health.is_ok()
    }

    fn commit_seconds(&self) -> Option<prometheus_client::metrics::histogram::Histogram> {
        Some(self.health.commit_seconds())
    }
}

/// A store that keeps nothing across restarts: for tests of everything above the store.
#[derive(Debug)]
pub struct MemoryStore {
    rooms: Mutex<BTreeMap<String, VecDeque<StoredMessage>>>,
    pending: Pending,
}

impl Default for MemoryStore {
    fn default() -> MemoryStore {
        MemoryStore {
            rooms: Mutex::default(),
            pending: Pending::new(usize::MAX),
        }
    }
}

impl MemoryStore {
    fn rooms(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, VecDeque<StoredMessage>>> {
        self.rooms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Store for MemoryStore {
    fn load_rooms(
        &self,
        limits: HistoryLimits,
    ) -> Result<Vec<(String, Vec<StoredMessage>)>, StoreError> {
        Ok(self
            .rooms()
            .iter()
            .filter(|(_, kept)| !kept.is_empty())
            .map(|(room, kept)| {
                let skip = kept.len().saturating_sub(limits.messages);
                (room.clone(), kept.iter().skip(skip).cloned().collect())
            })
            .collect())
    }

    fn append_room(&self, room: &Arc<str>, seq: u64, message: &Arc<KeptMessage>, first_kept: u64) {
        let mut rooms = self.rooms();
        let kept = rooms.entry(room.to_string()).or_default();
        kept.push_back(message.to_stored(seq));
        while kept.front().is_some_and(|m| m.seq < first_kept) {
            kept.pop_front();
        }
    }

    fn trim_room(&self, room: &Arc<str>, first_kept: u64) {
        if let Some(kept) = self.rooms().get_mut(&**room) {
            while kept.front().is_some_and(|m| m.seq < first_kept) {
                kept.pop_front();
            }
        }
    }

    fn forget_room(&self, room: &Arc<str>) {
        self.rooms().remove(&**room);
    }

    fn flush(&self) {}

    fn pending(&self) -> &Pending {
        &self.pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Publish;

    fn message(seq: u64, body: &str) -> StoredMessage {
        StoredMessage {
            seq,
            message_id: 1000 + seq,
            headers: vec![
                ("destination".into(), "/topic/room.a".into()),
                ("x-note".into(), "a:b\nc".into()),
            ],
            body: Bytes::from(body.to_owned()),
        }
    }

    fn kept(seq: u64, body: &str) -> Arc<KeptMessage> {
        Arc::new(Publish::from_stored(message(seq, body)).into_kept())
    }

    fn limits(messages: usize) -> HistoryLimits {
        HistoryLimits {
            messages,
            room_bytes: usize::MAX,
            total_bytes: usize::MAX,
        }
    }

    /// A room's history as the store sees it: the newest `keep` messages, shared with the
    /// store until it writes them (one the room no longer holds is not written).
    struct History {
        room: Arc<str>,
        keep: usize,
        kept: VecDeque<(u64, Arc<KeptMessage>)>,
    }

    impl History {
        fn new(room: &str, keep: usize) -> History {
            History {
                room: Arc::from(room),
                keep,
                kept: VecDeque::new(),
            }
        }

        fn append(&mut self, store: &dyn Store, seq: u64, body: &str) {
            let message = kept(seq, body);
            self.kept.push_back((seq, message.clone()));
            while self.kept.len() > self.keep {
                self.kept.pop_front();
            }
            let first_kept = self.kept.front().map_or(seq + 1, |(s, _)| *s);
            store.append_room(&self.room, seq, &message, first_kept);
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("stoa-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn seqs(messages: &[StoredMessage]) -> Vec<u64> {
        messages.iter().map(|m| m.seq).collect()
    }

    fn rows(store: &SqliteStore) -> i64 {
        let conn = store.reader().unwrap();
        conn.query_row("SELECT count(*) FROM room_chunks", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn room_history_survives_reopening_newest_first_kept() {
        let dir = temp_dir("rooms");
        let (mut a, mut b) = (History::new("a", 3), History::new("방", 3));
        {
            let store = SqliteStore::open(&dir, usize::MAX).unwrap();
            for seq in 1..=5 {
                a.append(&store, seq, &format!("m{seq}"));
            }
            b.append(&store, 1, "안녕");
            store.flush();
        }
        let store = SqliteStore::open(&dir, usize::MAX).unwrap();
        let rooms = store.load_rooms(limits(3)).unwrap();
        assert_eq!(rooms.len(), 2);
        let (name, loaded) = &rooms[0];
        assert_eq!(name, "a");
        assert_eq!(seqs(loaded), [3, 4, 5]);
        assert_eq!(
            loaded[2],
            message(5, "m5"),
            "headers, id and body as published"
        );
        assert_eq!(rooms[1].0, "방");
        assert_eq!(rooms[1].1[0].body, "안녕".as_bytes());
        // Loading fewer than kept takes the newest, by count or by bytes.
        assert_eq!(seqs(&store.load_rooms(limits(2)).unwrap()[0].1), [4, 5]);
        let one = HistoryLimits {
            room_bytes: message(5, "m5").approximate_size(),
            ..limits(3)
        };
        assert_eq!(seqs(&store.load_rooms(one).unwrap()[0].1), [5]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_rooms_oldest_rows_go_once_all_their_messages_are_past_keep() {
        let dir = temp_dir("trim");
        let mut room = History::new("a", 3);
        let store = SqliteStore::open(&dir, usize::MAX).unwrap();
        // A flush after each message: one row each, and the table never holds more than the
        // three kept.
        for seq in 1..=50 {
            room.append(&store, seq, "x");
            store.flush();
            assert!(rows(&store) <= 3, "{} rows after seq {seq}", rows(&store));
        }
        // Many at once: a few rows, the newest three messages in them, the old rows gone.
        for seq in 51..=2000 {
            room.append(&store, seq, "y");
        }
        store.flush();
        assert!(rows(&store) <= 4, "{} rows", rows(&store));
        drop(store);
        let store = SqliteStore::open(&dir, usize::MAX).unwrap();
        assert_eq!(
            seqs(&store.load_rooms(limits(3)).unwrap()[0].1),
            [1998, 1999, 2000]
        );
        // The reopened writer knows the rows it found: it goes on dropping them.
        for seq in 2001..=2010 {
            room.append(&store, seq, "z");
            store.flush();
        }
        assert!(rows(&store) <= 3, "{} rows", rows(&store));
        assert_eq!(
            seqs(&store.load_rooms(limits(3)).unwrap()[0].1),
            [2008, 2009, 2010]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A database of the schema as it was at version 2, holding `messages` (room, seq).
    fn version_2_database(dir: &Path, messages: impl IntoIterator<Item = (&'static str, i64)>) {
        let mut conn = open_connection(&dir.join("stoa.db")).unwrap();
        let tx = conn.transaction().unwrap();
        for sql in [V1_ROOM_MESSAGES, V2_NO_USER_MESSAGES] {
            tx.execute_batch(sql).unwrap();
        }
        tx.pragma_update(None, "user_version", 2).unwrap();
        for (room, seq) in messages {
            let headers = r#"[["destination","/topic/room.x"],["x-seq","?"]]"#;
            tx.execute(
                "INSERT INTO room_messages VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    room,
                    seq,
                    100 + seq,
                    headers,
                    format!("{room}{seq}").as_bytes()
                ],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }

    #[test]
    fn rows_of_the_one_message_per_row_schema_move_into_chunks() {
        let dir = temp_dir("chunks");
        version_2_database(&dir, [("a", 1), ("a", 2), ("b", 7), ("a", 3)]);
        let store = SqliteStore::open(&dir, usize::MAX).unwrap();
        let rooms = store.load_rooms(limits(10)).unwrap();
        assert_eq!(rooms.len(), 2);
        assert_eq!(seqs(&rooms[0].1), [1, 2, 3]);
        assert_eq!(rooms[0].1[2].body, &b"a3"[..]);
        assert_eq!(rooms[0].1[2].message_id, 103);
        assert_eq!(rooms[0].1[2].headers[1], ("x-seq".into(), "?".into()));
        assert_eq!((rooms[1].0.as_str(), seqs(&rooms[1].1)), ("b", vec![7]));
        let conn = store.reader().unwrap();
        let old: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'room_messages'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old, 0, "the old table is gone");
        // The moved rows are the writer's to drop like any other.
        let mut a = History::new("a", 1);
        a.append(&store, 4, "a4");
        store.flush();
        assert_eq!(rows(&store), 2, "a's moved row dropped, b's kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_long_history_moves_into_chunks_of_at_most_migrated_chunk() {
        let dir = temp_dir("long");
        let n = i64::try_from(MIGRATED_CHUNK).unwrap() + 5;
        version_2_database(&dir, (1..=n).map(|seq| ("c", seq)));
        let store = SqliteStore::open(&dir, usize::MAX).unwrap();
        let conn = store.reader().unwrap();
        let spans: Vec<(i64, i64)> = conn
            .prepare("SELECT first_seq, last_seq FROM room_chunks ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(spans, [(1, n - 5), (n - 4, n)]);
        let rooms = store.load_rooms(limits(usize::MAX)).unwrap();
        assert_eq!(seqs(&rooms[0].1), (1..=n as u64).collect::<Vec<_>>());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_row_is_an_error_that_names_its_room() {
        let dir = temp_dir("damaged");
        let store = SqliteStore::open(&dir, usize::MAX).unwrap();
        let mut lobby = History::new("lobby", 3);
        lobby.append(&store, 1, "x");
        store.flush();
        let conn = store.reader().unwrap();
        conn.execute("UPDATE room_chunks SET messages = x'01ff'", [])
            .unwrap();
        let err = store.load_rooms(limits(3)).unwrap_err();
        assert!(
            matches!(&err, StoreError::Chunk { room, source: ChunkError::Truncated(0), .. } if room == "lobby"),
            "{err}"
        );
        assert!(err.to_string().contains("room lobby"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn trimmed_and_forgotten_rooms_leave_the_database() {
        let dir = temp_dir("forget");
        let store = SqliteStore::open(&dir, usize::MAX).unwrap();
        let (mut a, mut b) = (History::new("a", 10), History::new("b", 10));
        for seq in 1..=3 {
            a.append(&store, seq, "a");
            b.append(&store, seq, "b");
            store.flush();
        }
        // The total cap took a's two oldest; b was forgotten altogether.
        store.trim_room(&a.room, 3);
        store.forget_room(&b.room);
        store.flush();
        let rooms = store.load_rooms(limits(10)).unwrap();
        assert_eq!(rooms.len(), 1);
        assert_eq!((rooms[0].0.as_str(), seqs(&rooms[0].1)), ("a", vec![3]));
        assert_eq!(rows(&store), 1);
        // A forgotten room that comes back numbers from 1, in the same batch as its end.
        let mut b = History::new("b", 10);
        store.forget_room(&b.room);
        b.append(&store, 1, "again");
        store.flush();
        let rooms = store.load_rooms(limits(10)).unwrap();
        assert_eq!(rooms[1].1[0].body, &b"again"[..]);
        assert_eq!(seqs(&rooms[1].1), [1]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn messages_the_room_no_longer_keeps_are_not_written_and_weigh_nothing() {
        let dir = temp_dir("skip");
        let mut conn = open_connection(&dir.join("stoa.db")).unwrap();
        migrate(&mut conn).unwrap();
        let room: Arc<str> = Arc::from("a");
        let still = kept(2, "kept");
        // The room dropped message 1 (its caps) before the writer got to it: only the
        // operation holds it.
        let batch = vec![
            Op::Room {
                room: room.clone(),
                seq: 1,
                message: kept(1, "dropped"),
                first_kept: 1,
            },
            Op::Room {
                room,
                seq: 2,
                message: still.clone(),
                first_kept: 1,
            },
        ];
        assert_eq!(batch[0].weight(), 0);
        assert_eq!(batch[1].weight(), still.size());
        assert_eq!(
            batch[0].pinned(),
            batch[0].weight() + kept(1, "dropped").size()
        );
        let mut index = ChunkIndex::new();
        write_batch(&mut conn, &mut index, batch, &mut Vec::new()).unwrap();
        drop(conn);
        let store = SqliteStore::open(&dir, usize::MAX).unwrap();
        let rooms = store.load_rooms(limits(10)).unwrap();
        assert_eq!(seqs(&rooms[0].1), [2]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn migrations_run_once() {
        let dir = temp_dir("migrate");
        drop(SqliteStore::open(&dir, usize::MAX).unwrap());
        let store = SqliteStore::open(&dir, usize::MAX).unwrap();
        let conn = store.reader().unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, 4, "every migration applied");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_migrations_are_valid() {
        assert!(migrations().validate().is_ok());
    }
}
