//! The durable queue store: messages on disk before their RECEIPT, many publishers sharing
//! one fsync.
//!
//! In: puts, removals, and [`Completion`]s that must wait behind earlier durable work (a
//! session's RECEIPT). Out: one SQLite commit (an fsync, with `synchronous=FULL`) per batch
//! of whatever arrived meanwhile (group commit), after which the batch's completions run.
//! At start, every message still kept. It knows nothing of sessions or outboxes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, SyncSender};

use rusqlite::{Connection, params};
use tracing::error;

use crate::message::StoredMessage;
use crate::store::{StoreError, kept_row, push_grouped, spawn_writer, stored_message};
use crate::writer::{Health, WriterThread, next_batch};

/// What to do once everything handed over before it is settled: called with `true` when it
/// is on disk, `false` when its commit failed (then nothing may be confirmed: the client
/// times out and sends again). A session's RECEIPT waits in one.
pub struct Completion(Box<dyn FnOnce(bool) + Send>);

impl Completion {
    /// A completion that runs `then`.
    pub fn new(then: impl FnOnce(bool) + Send + 'static) -> Completion {
        Completion(Box::new(then))
    }

    fn run(self, on_disk: bool) {
        (self.0)(on_disk);
    }
}

impl fmt::Debug for Completion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Completion")
    }
}

enum Op {
    Put {
        id: u64,
        queue: String,
        message: StoredMessage,
    },
    Remove(u64),
    Completion(Completion),
    Flush(SyncSender<()>),
}

/// Messages of one queue as kept, oldest first.
pub type KeptQueue = (String, Vec<StoredMessage>);

/// The durable queue store.
#[derive(Debug)]
pub struct QueueStore {
    path: PathBuf,
    writer: WriterThread<Op>,
    health: Arc<Health>,
}

/// Most operations in one commit.
const BATCH: usize = 4096;
/// Most bytes of bodies in one commit (the message that passes it included).
const BATCH_BYTES: usize = 16 << 20;

impl Op {
    /// What it weighs in a batch: its body.
    fn weight(&self) -> usize {
        match self {
            Op::Put { message, .. } => message.body.len(),
            _ => 0,
        }
    }
}

impl QueueStore {
    /// Opens (creating) `queues.db` in `dir` and returns it with every message kept there.
    ///
    /// # Errors
    /// SQLite cannot open, create or read the file.
    pub fn open(dir: &Path) -> Result<(QueueStore, Vec<KeptQueue>), StoreError> {
        let path = dir.join("queues.db");
        let sqlite = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(sqlite)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sqlite)?;
        // FULL: a commit returns after its WAL frames are fsynced, so a RECEIPT sent after it
        // survives kill -9 and power loss alike.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sqlite)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS queue_messages (
                id INTEGER PRIMARY KEY,
                queue TEXT NOT NULL,
                message_id INTEGER NOT NULL,
                headers TEXT NOT NULL,
                body BLOB NOT NULL
            )",
        )
        .map_err(sqlite)?;
        let kept = load(&conn, &path)?;
        let writer_path = path.clone();
        let health = Arc::new(Health::default());
        let writer_health = health.clone();
        let writer = spawn_writer("stoa-queues", &path, move |rx| {
            write_loop(conn, rx, &writer_path, &writer_health);
        })?;
        let store = QueueStore {
            path,
            writer,
            health,
        };
        Ok((store, kept))
    }

    /// Whether commits reach the disk: the writer runs and its last commit went through.
    pub fn is_healthy(&self) -> bool {
        self.writer.is_running() && self.health.is_ok()
    }

    /// How long its commits take.
    pub fn commit_seconds(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.health.commit_seconds()
    }

    fn send(&self, op: Op) {
        if !self.writer.send(op) {
            error!(path = %self.path.display(), "queue store writer has stopped");
        }
    }

    /// Keeps a message.
    pub fn put(&self, id: u64, queue: &str, message: StoredMessage) {
        self.send(Op::Put {
            id,
            queue: queue.to_owned(),
            message,
        });
    }

    /// Forgets a consumed message.
    pub fn remove(&self, id: u64) {
        self.send(Op::Remove(id));
    }

    /// Runs `completion` once everything handed over before it is on disk (or failed to be).
    pub fn after(&self, completion: Completion) {
        self.send(Op::Completion(completion));
    }

    /// Returns once everything handed over so far is on disk.
    pub fn flush(&self) {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        self.send(Op::Flush(ack_tx));
        let _ = ack_rx.recv();
    }
}

fn load(conn: &Connection, path: &Path) -> Result<Vec<KeptQueue>, StoreError> {
    let sqlite = |source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let mut stmt = conn
        .prepare(
            "SELECT queue, id, message_id, headers, body FROM queue_messages ORDER BY queue, id",
        )
        .map_err(sqlite)?;
    let rows = stmt.query_map([], kept_row).map_err(sqlite)?;
    let mut queues: Vec<KeptQueue> = Vec::new();
    for row in rows {
        let (queue, id, message_id, headers, body) = row.map_err(sqlite)?;
        let message = stored_message(id, message_id, &headers, body).map_err(|source| {
            StoreError::Corrupt {
                path: path.to_owned(),
                table: "queue_messages",
                source,
            }
        })?;
        push_grouped(&mut queues, queue, message);
    }
    Ok(queues)
}

fn write_loop(mut conn: Connection, rx: Receiver<Op>, path: &Path, health: &Health) {
    // Group commit needs no lingering: publishers waiting for receipts keep it busy.
    while let Some(batch) = next_batch(&rx, (BATCH, BATCH_BYTES), Op::weight, None, |_| false) {
        let mut completions = Vec::new();
        let mut flushes = Vec::new();
        // On disk: now, and only now, what waited for it may be confirmed.
        let started = std::time::Instant::now();
        let on_disk = match write_batch(&mut conn, batch, &mut completions, &mut flushes) {
            Ok(()) => true,
            Err(e) => {
                error!(path = %path.display(), "queue store commit failed, {} receipts withheld: {e}", completions.len());
                false
            }
        };
        health.record_commit(on_disk, started.elapsed());
        for completion in completions {
            completion.run(on_disk);
        }
        for ack in flushes {
            let _ = ack.send(());
        }
    }
}

fn write_batch(
    conn: &mut Connection,
    batch: Vec<Op>,
    completions: &mut Vec<Completion>,
    flushes: &mut Vec<SyncSender<()>>,
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR REPLACE INTO queue_messages (id, queue, message_id, headers, body) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut delete = tx.prepare_cached("DELETE FROM queue_messages WHERE id = ?1")?;
        for op in batch {
            match op {
                Op::Put { id, queue, message } => {
                    // Headers that cannot be written fail the commit (and withhold its
                    // receipts, logged), rather than being stored as none.
                    let headers = serde_json::to_string(&message.headers)
                        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
                    insert.execute(params![
                        i64::try_from(id).unwrap_or(i64::MAX),
                        queue,
                        i64::try_from(message.message_id).unwrap_or(i64::MAX),
                        headers,
                        &message.body[..]
                    ])?;
                }
                Op::Remove(id) => {
                    delete.execute(params![i64::try_from(id).unwrap_or(i64::MAX)])?;
                }
                Op::Completion(completion) => completions.push(completion),
                Op::Flush(ack) => flushes.push(ack),
            }
        }
    }
    tx.commit()
}
