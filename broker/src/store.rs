//! Chat history storage behind a trait: what rooms keep.
//!
//! In: messages to keep (written behind, in batches, by one writer thread) and removals.
//! Out: everything kept, loaded once at start. The broker's memory is the source of truth
//! while it runs; the store makes history survive a restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{Connection, params};
use tracing::{error, warn};

use crate::writer::{WriterThread, next_batch};

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
    /// Keeps a room message; older ones past `keep` are dropped.
    fn append_room(&self, room: &str, message: StoredMessage, keep: usize);
    /// Returns once everything handed over so far is written.
    fn flush(&self);
}

enum Op {
    Room {
        room: String,
        message: StoredMessage,
        keep: usize,
    },
    Flush(SyncSender<()>),
}

/// SQLite in WAL mode, written by one thread in batched transactions.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    writer: WriterThread<Op>,
}

/// Schema changes, applied in order on start; `PRAGMA user_version` counts those done.
const MIGRATIONS: &[&str] = &[
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
    // Messages waiting for offline users moved to the durable queue store (queues.db).
    "DROP TABLE user_messages;",
];

/// Most operations written in one transaction.
const BATCH: usize = 1024;
/// How long a busy writer collects messages before it commits them: at tens of thousands
/// of room messages per second, 20 transactions per second instead of thousands.
const LINGER: Duration = Duration::from_millis(50);
/// A batch at least this large means the broker is busy: the next one lingers.
const BUSY_BATCH: usize = 64;

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
        let conn = open_connection(&path).map_err(sqlite)?;
        migrate(&conn).map_err(sqlite)?;
        let writer_path = path.clone();
        let writer = spawn_writer("stoa-store", &path, move |rx| {
            write_loop(conn, rx, &writer_path);
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

    fn corrupt(&self, table: &'static str) -> impl Fn(serde_json::Error) -> StoreError + '_ {
        move |source| StoreError::Corrupt {
            path: self.path.clone(),
            table,
            source,
        }
    }
}

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    // WAL: readers never block the writer; NORMAL: a commit survives a process crash, and
    // only the last commits before a power loss can be lost.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // Each room appends at its own end of the table: keep those pages cached (16 MiB), and
    // copy the log back less often, since the same hot pages are rewritten between copies.
    conn.pragma_update(None, "cache_size", -16_384)?;
    conn.pragma_update(None, "wal_autocheckpoint", 8_000)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let done: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let done = usize::try_from(done).unwrap_or(0);
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(done) {
        conn.execute_batch(&format!(
            "BEGIN; {sql}; PRAGMA user_version = {}; COMMIT;",
            i + 1
        ))?;
    }
    Ok(())
}

fn write_loop(mut conn: Connection, rx: Receiver<Op>, path: &Path) {
    let urgent = |op: &Op| matches!(op, Op::Flush(_));
    // Quiet rooms are committed at once; only a writer that keeps finding many messages
    // waiting (a busy broker) lingers to gather them into fewer, larger transactions.
    let mut busy = false;
    while let Some(batch) = next_batch(
        &rx,
        BATCH,
        if busy { LINGER } else { Duration::ZERO },
        urgent,
    ) {
        busy = batch.len() >= BUSY_BATCH;
        let mut acks = Vec::new();
        if let Err(e) = write_batch(&mut conn, batch, &mut acks) {
            error!(path = %path.display(), "store write failed: {e}");
        }
        for ack in acks {
            let _ = ack.send(());
        }
    }
}

fn write_batch(
    conn: &mut Connection,
    batch: Vec<Op>,
    acks: &mut Vec<SyncSender<()>>,
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    // Each room is trimmed once per batch, below the oldest message it still keeps.
    let mut trims: HashMap<String, u64> = HashMap::new();
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR REPLACE INTO room_messages (room, seq, message_id, headers, body) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for op in batch {
            match op {
                Op::Room {
                    room,
                    message,
                    keep,
                } => {
                    insert.execute(params![
                        room,
                        to_i64(message.seq),
                        to_i64(message.message_id),
                        headers_json(&message.headers),
                        &message.body[..]
                    ])?;
                    let below = message.seq.saturating_sub(keep as u64);
                    let oldest = trims.entry(room).or_insert(below);
                    *oldest = (*oldest).max(below);
                }
                Op::Flush(ack) => acks.push(ack),
            }
        }
        let mut trim =
            tx.prepare_cached("DELETE FROM room_messages WHERE room = ?1 AND seq <= ?2")?;
        for (room, below) in &trims {
            trim.execute(params![room, to_i64(*below)])?;
        }
    }
    tx.commit()
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn headers_json(headers: &[(String, String)]) -> String {
    // Serialising strings to JSON cannot fail.
    serde_json::to_string(headers).unwrap_or_else(|_| "[]".to_owned())
}

impl Store for SqliteStore {
    fn load_rooms(&self, keep: usize) -> Result<Vec<(String, Vec<StoredMessage>)>, StoreError> {
        let conn = self.reader()?;
        let sqlite = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let mut stmt = conn
            .prepare(
                "SELECT room, seq, message_id, headers, body FROM (
                   SELECT *, ROW_NUMBER() OVER (PARTITION BY room ORDER BY seq DESC) AS newest
                   FROM room_messages)
                 WHERE newest <= ?1 ORDER BY room, seq",
            )
            .map_err(sqlite)?;
        let rows = stmt
            .query_map(params![to_i64(keep as u64)], kept_row)
            .map_err(sqlite)?;
        let mut rooms: Vec<(String, Vec<StoredMessage>)> = Vec::new();
        for row in rows {
            let (room, seq, message_id, headers, body) = row.map_err(sqlite)?;
            let message = stored_message(seq, message_id, &headers, body)
                .map_err(self.corrupt("room_messages"))?;
            push_grouped(&mut rooms, room, message);
        }
        Ok(rooms)
    }

    fn append_room(&self, room: &str, message: StoredMessage, keep: usize) {
        self.send(Op::Room {
            room: room.to_owned(),
            message,
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

    fn append_room(&self, room: &str, message: StoredMessage, _keep: usize) {
        let mut rooms = self
            .rooms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        rooms.push((room.to_owned(), message));
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("stoa-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn room_history_survives_reopening_and_is_trimmed_to_keep() {
        let dir = temp_dir("rooms");
        {
            let store = SqliteStore::open(&dir).unwrap();
            for seq in 1..=5 {
                store.append_room("a", message(seq, &format!("m{seq}")), 3);
            }
            store.append_room("방", message(1, "안녕"), 3);
            store.flush();
        }
        let store = SqliteStore::open(&dir).unwrap();
        let rooms = store.load_rooms(10).unwrap();
        assert_eq!(rooms.len(), 2);
        let (name, kept) = &rooms[0];
        assert_eq!(name, "a");
        assert_eq!(kept.iter().map(|m| m.seq).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(kept[2], message(5, "m5"));
        assert_eq!(rooms[1].1[0].body, "안녕".as_bytes());
        // Loading fewer than kept takes the newest.
        assert_eq!(
            store.load_rooms(2).unwrap()[0]
                .1
                .iter()
                .map(|m| m.seq)
                .collect::<Vec<_>>(),
            [4, 5]
        );
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
