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

use crate::router::KeptMessage;
use crate::writer::{WriterThread, next_batch};

mod chunk;

pub use chunk::ChunkError;
use chunk::{ChunkWriter, read_chunk};

/// A message as kept: headers in order and the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// The room sequence number (the message id in the durable queue store).
    pub seq: u64,
    /// The broker-assigned `message-id`.
    pub message_id: u64,
    /// Shared headers in wire order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

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

/// Where kept messages go.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Every room's newest `keep` messages, oldest first.
    ///
    /// # Errors
    /// The store cannot be read.
    fn load_rooms(&self, keep: usize) -> Result<Vec<(String, Vec<StoredMessage>)>, StoreError>;
    /// Keeps a room's message `seq` (its history's own copy, shared); older ones past
    /// `keep` are dropped.
    fn append_room(&self, room: &Arc<str>, seq: u64, message: &Arc<KeptMessage>, keep: usize);
    /// Returns once everything handed over so far is written.
    fn flush(&self);
}

enum Op {
    Room {
        room: Arc<str>,
        seq: u64,
        message: Arc<KeptMessage>,
        keep: usize,
    },
    Flush(SyncSender<()>),
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
}

/// A schema change.
enum Migration {
    Sql(&'static str),
    /// A change SQL alone cannot make, run in the same transaction as the version bump.
    Code(fn(&rusqlite::Transaction<'_>) -> rusqlite::Result<()>),
}

/// Schema changes, applied in order on start; `PRAGMA user_version` counts those done.
const MIGRATIONS: &[Migration] = &[
    Migration::Sql(
        "CREATE TABLE room_messages (
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
        CREATE INDEX user_messages_by_queue ON user_messages (user, queue, id);",
    ),
    // Messages waiting for offline users moved to the durable queue store (queues.db).
    Migration::Sql("DROP TABLE user_messages;"),
    // Room messages in chunks, one row per room per transaction. Rows are appended in id
    // order, which is also each room's seq order; the writer finds a room's rows by id.
    Migration::Sql(
        "CREATE TABLE room_chunks (
            id INTEGER PRIMARY KEY,
            room TEXT NOT NULL,
            first_seq INTEGER NOT NULL,
            last_seq INTEGER NOT NULL,
            messages BLOB NOT NULL
        );",
    ),
    Migration::Code(room_messages_into_chunks),
];

/// Most operations written in one transaction: enough for a linger's worth at well over
/// 100,000 room messages per second.
const BATCH: usize = 8192;
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
    /// Opens (creating and migrating) `stoa.db` in `dir`.
    ///
    /// # Errors
    /// SQLite cannot open or migrate the file.
    pub fn open(dir: &Path) -> Result<SqliteStore, StoreError> {
        let path = dir.join("stoa.db");
        let sqlite = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let mut conn = open_connection(&path).map_err(sqlite)?;
        migrate(&mut conn).map_err(sqlite)?;
        let index = chunk_index(&conn).map_err(sqlite)?;
        let writer_path = path.clone();
        let writer = spawn_writer("stoa-store", &path, move |rx| {
            write_loop(conn, index, rx, &writer_path);
        })?;
        Ok(SqliteStore { path, writer })
    }

    fn send(&self, op: Op) {
        if !self.writer.send(op) {
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
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let done: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let done = usize::try_from(done).unwrap_or(0);
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(done) {
        let tx = conn.transaction()?;
        match migration {
            Migration::Sql(sql) => tx.execute_batch(sql)?,
            Migration::Code(run) => run(&tx)?,
        }
        tx.pragma_update(None, "user_version", to_i64(i as u64 + 1))?;
        tx.commit()?;
    }
    Ok(())
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

fn write_loop(mut conn: Connection, mut index: ChunkIndex, rx: Receiver<Op>, path: &Path) {
    let urgent = |op: &Op| matches!(op, Op::Flush(_));
    // Quiet rooms are committed at once; only a writer that keeps finding many messages
    // waiting (a busy broker) gathers them into fewer, larger transactions, one every
    // LINGER however long each takes to write.
    let mut gather_until = None;
    while let Some(batch) = next_batch(&rx, BATCH, gather_until, urgent) {
        let busy = batch.len() >= BUSY_BATCH;
        gather_until = busy.then(|| Instant::now() + LINGER);
        let mut acks = Vec::new();
        if let Err(e) = write_batch(&mut conn, &mut index, batch, &mut acks) {
            error!(path = %path.display(), "store write failed: {e}");
        }
        for ack in acks {
            let _ = ack.send(());
        }
    }
}

/// One room's messages in a batch.
struct RoomRun {
    chunk: ChunkWriter,
    keep: usize,
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
                keep,
            } => runs
                .entry(room)
                .or_insert_with(|| RoomRun {
                    chunk: ChunkWriter::new(),
                    keep,
                })
                .chunk
                .push(seq, message.message_id(), message.headers(), message.body()),
            Op::Flush(ack) => acks.push(ack),
        }
    }
    let tx = conn.transaction()?;
    // Per room: the new row's id and last seq, and how many of its oldest rows went.
    let mut written = Vec::with_capacity(runs.len());
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO room_chunks (room, first_seq, last_seq, messages) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut delete = tx.prepare_cached("DELETE FROM room_chunks WHERE id = ?1")?;
        for (room, run) in runs {
            insert_chunk(&mut insert, &room, &run.chunk)?;
            let (_, last) = run.chunk.seqs();
            let id = tx.last_insert_rowid();
            // A row goes once every message in it is older than the newest `keep`.
            let below = last.saturating_sub(run.keep as u64);
            let mut dropped = 0;
            for &(old, old_last) in index.get(&room).into_iter().flatten() {
                if old_last > below {
                    break;
                }
                delete.execute(params![old])?;
                dropped += 1;
            }
            written.push((room, id, last, dropped));
        }
    }
    tx.commit()?;
    // Committed: now the index may follow (on an error it still matches the database).
    for (room, id, last, dropped) in written {
        let rows = index.entry(room).or_default();
        rows.drain(..dropped);
        rows.push_back((id, last));
    }
    Ok(())
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Store for SqliteStore {
    fn load_rooms(&self, keep: usize) -> Result<Vec<(String, Vec<StoredMessage>)>, StoreError> {
        let conn = self.reader()?;
        let sqlite = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let mut stmt = conn
            .prepare("SELECT room, messages FROM room_chunks ORDER BY id")
            .map_err(sqlite)?;
        let mut rows = stmt.query([]).map_err(sqlite)?;
        let mut rooms: BTreeMap<String, VecDeque<StoredMessage>> = BTreeMap::new();
        while let Some(row) = rows.next().map_err(sqlite)? {
            let room: String = row.get(0).map_err(sqlite)?;
            let chunk: Vec<u8> = row.get(1).map_err(sqlite)?;
            let messages = read_chunk(&Bytes::from(chunk)).map_err(|source| StoreError::Chunk {
                path: self.path.clone(),
                room: room.clone(),
                source,
            })?;
            let kept = rooms.entry(room).or_default();
            for message in messages {
                // Seqs only grow; should a room ever have numbered again from lower, the
                // later messages are the room's history.
                while kept.back().is_some_and(|last| last.seq >= message.seq) {
                    kept.pop_back();
                }
                kept.push_back(message);
                if kept.len() > keep {
                    kept.pop_front();
                }
            }
        }
        Ok(rooms
            .into_iter()
            .map(|(room, kept)| (room, Vec::from(kept)))
            .collect())
    }

    fn append_room(&self, room: &Arc<str>, seq: u64, message: &Arc<KeptMessage>, keep: usize) {
        self.send(Op::Room {
            room: room.clone(),
            seq,
            message: message.clone(),
            keep,
        });
    }

    fn flush(&self) {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        self.send(Op::Flush(ack_tx));
        if ack_rx.recv().is_err() {
            warn!("store writer stopped before a flush");
        }
    }
}

/// A store that keeps nothing across restarts: for tests of everything above the store.
#[derive(Debug, Default)]
pub struct MemoryStore {
    rooms: Mutex<Vec<(String, StoredMessage)>>,
}

impl Store for MemoryStore {
    fn load_rooms(&self, keep: usize) -> Result<Vec<(String, Vec<StoredMessage>)>, StoreError> {
        let rooms = self
            .rooms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<(String, Vec<StoredMessage>)> = Vec::new();
        for (room, message) in rooms.iter() {
            match out.iter_mut().find(|(r, _)| r == room) {
                Some((_, list)) => list.push(message.clone()),
                None => out.push((room.clone(), vec![message.clone()])),
            }
        }
        for (_, list) in &mut out {
            let skip = list.len().saturating_sub(keep);
            list.drain(..skip);
        }
        Ok(out)
    }

    fn append_room(&self, room: &Arc<str>, seq: u64, message: &Arc<KeptMessage>, _keep: usize) {
        let mut rooms = self
            .rooms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        rooms.push((room.to_string(), message.to_stored(seq)));
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::Publish;

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
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("방"));
        {
            let store = SqliteStore::open(&dir).unwrap();
            for seq in 1..=5 {
                store.append_room(&a, seq, &kept(seq, &format!("m{seq}")), 3);
            }
            store.append_room(&b, 1, &kept(1, "안녕"), 3);
            store.flush();
        }
        let store = SqliteStore::open(&dir).unwrap();
        let rooms = store.load_rooms(3).unwrap();
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
        // Loading fewer than kept takes the newest.
        assert_eq!(seqs(&store.load_rooms(2).unwrap()[0].1), [4, 5]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_rooms_oldest_rows_go_once_all_their_messages_are_past_keep() {
        let dir = temp_dir("trim");
        let room: Arc<str> = Arc::from("a");
        let store = SqliteStore::open(&dir).unwrap();
        // A flush after each message: one row each, and the table never holds more than the
        // three kept.
        for seq in 1..=50 {
            store.append_room(&room, seq, &kept(seq, "x"), 3);
            store.flush();
            assert!(rows(&store) <= 3, "{} rows after seq {seq}", rows(&store));
        }
        // Many at once: a few rows, the newest three messages in them, the old rows gone.
        for seq in 51..=2000 {
            store.append_room(&room, seq, &kept(seq, "y"), 3);
        }
        store.flush();
        assert!(rows(&store) <= 4, "{} rows", rows(&store));
        drop(store);
        let store = SqliteStore::open(&dir).unwrap();
        assert_eq!(seqs(&store.load_rooms(3).unwrap()[0].1), [1998, 1999, 2000]);
        // The reopened writer knows the rows it found: it goes on dropping them.
        for seq in 2001..=2010 {
            store.append_room(&room, seq, &kept(seq, "z"), 3);
            store.flush();
        }
        assert!(rows(&store) <= 3, "{} rows", rows(&store));
        assert_eq!(seqs(&store.load_rooms(3).unwrap()[0].1), [2008, 2009, 2010]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A database of the schema as it was at version 2, holding `messages` (room, seq).
    fn version_2_database(dir: &Path, messages: impl IntoIterator<Item = (&'static str, i64)>) {
        let mut conn = open_connection(&dir.join("stoa.db")).unwrap();
        let tx = conn.transaction().unwrap();
        for migration in &MIGRATIONS[..2] {
            let Migration::Sql(sql) = migration else {
                panic!("versions 1 and 2 are SQL");
            };
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
        let store = SqliteStore::open(&dir).unwrap();
        let rooms = store.load_rooms(10).unwrap();
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
        let a: Arc<str> = Arc::from("a");
        store.append_room(&a, 4, &kept(4, "a4"), 1);
        store.flush();
        assert_eq!(rows(&store), 2, "a's moved row dropped, b's kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_long_history_moves_into_chunks_of_at_most_migrated_chunk() {
        let dir = temp_dir("long");
        let n = i64::try_from(MIGRATED_CHUNK).unwrap() + 5;
        version_2_database(&dir, (1..=n).map(|seq| ("c", seq)));
        let store = SqliteStore::open(&dir).unwrap();
        let conn = store.reader().unwrap();
        let spans: Vec<(i64, i64)> = conn
            .prepare("SELECT first_seq, last_seq FROM room_chunks ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(spans, [(1, n - 5), (n - 4, n)]);
        let rooms = store.load_rooms(usize::MAX).unwrap();
        assert_eq!(seqs(&rooms[0].1), (1..=n as u64).collect::<Vec<_>>());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_row_is_an_error_that_names_its_room() {
        let dir = temp_dir("damaged");
        let store = SqliteStore::open(&dir).unwrap();
        store.append_room(&Arc::from("lobby"), 1, &kept(1, "x"), 3);
        store.flush();
        let conn = store.reader().unwrap();
        conn.execute("UPDATE room_chunks SET messages = x'01ff'", [])
            .unwrap();
        let err = store.load_rooms(3).unwrap_err();
        assert!(
            matches!(&err, StoreError::Chunk { room, source: ChunkError::Truncated(0), .. } if room == "lobby"),
            "{err}"
        );
        assert!(err.to_string().contains("room lobby"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn migrations_run_once() {
        let dir = temp_dir("migrate");
        drop(SqliteStore::open(&dir).unwrap());
        let store = SqliteStore::open(&dir).unwrap();
        let conn = store.reader().unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
