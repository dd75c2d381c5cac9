//! Accounts for `--auth users`: names, Argon2id password hashes and groups, in
//! `<data-dir>/users.db` (SQLite), managed by `stoa users ...` while a broker may be running.
//!
//! In: account changes from the `stoa users` subcommands. Out: [`Accounts::load`], a snapshot
//! the broker verifies logins against, and [`Accounts::revision`], which every change bumps so
//! that a running broker notices (and revokes the sessions of accounts removed or whose
//! password changed).

use crate::message::check_user_name;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use rusqlite_migration::{M, Migrations};
use tracing::debug;

/// Schema changes of `users.db`, applied in order (`PRAGMA user_version` counts them).
const MIGRATIONS: &[M<'static>] = &[M::up(
    "CREATE TABLE users (
        name TEXT PRIMARY KEY,
        hash TEXT NOT NULL,
        groups TEXT NOT NULL,
        version INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO meta (key, value) VALUES ('revision', 0);",
)];

/// Why an account operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// SQLite refused.
    #[error("database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// The schema could not be brought up to date.
    #[error("database {path}: {source}")]
    Migration {
        /// The database file.
        path: PathBuf,
        /// What went wrong.
        source: rusqlite_migration::Error,
    },
    /// A name that cannot be a user name.
    #[error("{0}")]
    InvalidName(String),
    /// A group name that cannot be used.
    #[error("invalid group {0:?}: 1 to 64 letters, digits, '_', '-' or '.'")]
    InvalidGroup(String),
    /// `add` of a name that exists.
    #[error("user {0:?} already exists")]
    Exists(String),
    /// `passwd` or `remove` of a name that does not exist.
    #[error("no user {0:?}")]
    NoSuchUser(String),
    /// An empty password.
    #[error("the password is empty")]
    EmptyPassword,
    /// Hashing failed (never with the default parameters).
    #[error("hashing the password failed: {0}")]
    Hash(String),
    /// A stored groups column that is not a JSON list.
    #[error("database {path}: groups of user {user:?} are not a JSON list: {source}")]
    CorruptGroups {
        /// The database file.
        path: PathBuf,
        /// The user.
        user: String,
        /// The JSON error.
        source: serde_json::Error,
    },
}

/// One account as the broker verifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// The Argon2id PHC string.
    pub hash: String,
    /// Bumped by every password change: a session logged in with an older one is revoked.
    pub version: i64,
    /// The account's groups (for the ACL).
    pub groups: Vec<String>,
}

/// The accounts database in a data directory.
#[derive(Debug)]
pub struct Accounts {
    path: PathBuf,
    conn: Connection,
}

/// Checks a group name: 1 to 64 letters, digits, `_`, `-` or `.`.
///
/// # Errors
/// [`AccountError::InvalidGroup`].
pub fn check_group(group: &str) -> Result<(), AccountError> {
    let ok = !group.is_empty()
        && group.chars().count() <= 64
        && group
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(AccountError::InvalidGroup(group.chars().take(80).collect()))
    }
}

/// An Argon2id hash of `password` with the crate's default parameters (19 MiB, 2 passes)
/// and a random salt, as a PHC string.
///
/// # Errors
/// [`AccountError::Hash`] (the OS refused randomness).
pub fn hash_password(password: &str) -> Result<String, AccountError> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|e| AccountError::Hash(e.to_string()))
}

/// Whether `password` matches the PHC string `hash`. Costs what the hash's parameters
/// say: tens of milliseconds of one core and 19 MiB with the defaults.
pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// How long opening `users.db` keeps trying while other processes hold it (the broker and
/// `stoa users` share it): the same as SQLite's busy timeout.
const OPEN_PATIENCE: Duration = Duration::from_secs(5);

impl Accounts {
    /// Opens (creating and migrating) `users.db` in `dir`.
    ///
    /// # Errors
    /// SQLite cannot open or migrate the file.
    pub fn open(dir: &Path) -> Result<Accounts, AccountError> {
        let path = dir.join("users.db");
        let sqlite = at(&path);
        let mut conn = Connection::open(&path).map_err(&sqlite)?;
        // The broker and `stoa users` share the file: wait for each other's writes.
        conn.busy_timeout(OPEN_PATIENCE).map_err(&sqlite)?;
        // Two steps SQLite does not always wait for: switching a new file to WAL, and a
        // migration that read the schema version and then finds another process writing
        // (its lock cannot be upgraded, so SQLite answers "locked" at once). Processes that
        // open a new file at the same moment (two `stoa users add`, or one and a starting
        // broker) meet there; so they try again, briefly, until the file is up to date.
        let migrations = Migrations::from_slice(MIGRATIONS);
        let deadline = Instant::now() + OPEN_PATIENCE;
        let mut pause = Duration::from_millis(5);
        loop {
            let attempt = conn
                .pragma_update(None, "journal_mode", "WAL")
                .map_err(&sqlite)
                .and_then(|()| {
                    migrations
                        .to_latest(&mut conn)
                        .map_err(|source| AccountError::Migration {
                            path: path.clone(),
                            source,
                        })
                });
            match attempt {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline => {
                    debug!(path = %path.display(), error = %e, "opening users.db raced another process; trying again");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
        drop(sqlite);
        Ok(Accounts { path, conn })
    }

    fn sqlite(&self, source: rusqlite::Error) -> AccountError {
        at(&self.path)(source)
    }

    /// Adds an account.
    ///
    /// # Errors
    /// An invalid name or group, an empty password, a name that exists, or SQLite.
    pub fn add(
        &mut self,
        name: &str,
        password: &str,
        groups: &[String],
    ) -> Result<(), AccountError> {
        check_user_name(name).map_err(|e| AccountError::InvalidName(e.to_string()))?;
        for group in groups {
            check_group(group)?;
        }
        if password.is_empty() {
            return Err(AccountError::EmptyPassword);
        }
        let hash = hash_password(password)?;
        let groups = serde_json::json!(groups).to_string();
        let sqlite = at(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&sqlite)?;
        let inserted = tx
            .execute(
                "INSERT OR IGNORE INTO users (name, hash, groups, version) VALUES (?1, ?2, ?3, 1)",
                params![name, hash, groups],
            )
            .map_err(&sqlite)?;
        if inserted == 0 {
            return Err(AccountError::Exists(name.to_owned()));
        }
        bump_revision(&tx).map_err(&sqlite)?;
        tx.commit().map_err(sqlite)
    }

    /// Sets a new password (live sessions of the account are then revoked).
    ///
    /// # Errors
    /// An empty password, no such user, or SQLite.
    pub fn passwd(&mut self, name: &str, password: &str) -> Result<(), AccountError> {
        if password.is_empty() {
            return Err(AccountError::EmptyPassword);
        }
        let hash = hash_password(password)?;
        let sqlite = at(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&sqlite)?;
        let changed = tx
            .execute(
                "UPDATE users SET hash = ?2, version = version + 1 WHERE name = ?1",
                params![name, hash],
            )
            .map_err(&sqlite)?;
        if changed == 0 {
            return Err(AccountError::NoSuchUser(name.to_owned()));
        }
        bump_revision(&tx).map_err(&sqlite)?;
        tx.commit().map_err(sqlite)
    }

    /// Removes an account (its live sessions are then revoked).
    ///
    /// # Errors
    /// No such user, or SQLite.
    pub fn remove(&mut self, name: &str) -> Result<(), AccountError> {
        let sqlite = at(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&sqlite)?;
        let removed = tx
            .execute("DELETE FROM users WHERE name = ?1", params![name])
            .map_err(&sqlite)?;
        if removed == 0 {
            return Err(AccountError::NoSuchUser(name.to_owned()));
        }
        bump_revision(&tx).map_err(&sqlite)?;
        tx.commit().map_err(sqlite)
    }

    /// Every account's name and groups, by name (never a hash).
    ///
    /// # Errors
    /// SQLite, or a damaged groups column.
    pub fn list(&self) -> Result<Vec<(String, Vec<String>)>, AccountError> {
        let mut list: Vec<(String, Vec<String>)> = self
            .load()?
            .into_iter()
            .map(|(name, account)| (name, account.groups))
            .collect();
        list.sort();
        Ok(list)
    }

    /// Every account, by name.
    ///
    /// # Errors
    /// SQLite, or a damaged groups column.
    pub fn load(&self) -> Result<HashMap<String, Account>, AccountError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, hash, groups, version FROM users")
            .map_err(|e| self.sqlite(e))?;
        let mut rows = stmt.query([]).map_err(|e| self.sqlite(e))?;
        let mut accounts = HashMap::new();
        while let Some(row) = rows.next().map_err(|e| self.sqlite(e))? {
            let (name, hash, groups, version): (String, String, String, i64) = (
                row.get(0).map_err(|e| self.sqlite(e))?,
                row.get(1).map_err(|e| self.sqlite(e))?,
                row.get(2).map_err(|e| self.sqlite(e))?,
                row.get(3).map_err(|e| self.sqlite(e))?,
            );
            let groups =
                serde_json::from_str(&groups).map_err(|source| AccountError::CorruptGroups {
                    path: self.path.clone(),
                    user: name.clone(),
                    source,
                })?;
            accounts.insert(
                name,
                Account {
                    hash,
                    version,
                    groups,
                },
            );
        }
        Ok(accounts)
    }

    /// A number every change makes larger.
    ///
    /// # Errors
    /// SQLite.
    pub fn revision(&self) -> Result<i64, AccountError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = 'revision'", [], |row| {
                row.get(0)
            })
            .optional()
            .map(Option::unwrap_or_default)
            .map_err(|e| self.sqlite(e))
    }
}

/// Turns a SQLite error into one naming the database file.
fn at(path: &Path) -> impl Fn(rusqlite::Error) -> AccountError + '_ {
    move |source| AccountError::Sqlite {
        path: path.to_owned(),
        source,
    }
}

fn bump_revision(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE meta SET value = value + 1 WHERE key = 'revision'",
        [],
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("stoa-accounts-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn accounts_are_added_changed_listed_and_removed_with_a_revision_each_time() {
        let dir = temp_dir("crud");
        let mut accounts = Accounts::open(&dir).unwrap();
        let r0 = accounts.revision().unwrap();
        accounts
            .add("alice", "correct horse", &["staff".into(), "admin".into()])
            .unwrap();
        accounts.add("bob", "battery", &[]).unwrap();
        assert!(matches!(
            accounts.add("bob", "again", &[]),
            Err(AccountError::Exists(_))
        ));
        let loaded = accounts.load().unwrap();
        let alice = &loaded["alice"];
        assert!(alice.hash.starts_with("$argon2id$"), "{}", alice.hash);
        assert!(verify_password(&alice.hash, "correct horse"));
        assert!(!verify_password(&alice.hash, "correct horsE"));
        assert_eq!(alice.groups, ["staff", "admin"]);
        accounts.passwd("alice", "staple").unwrap();
        let after = accounts.load().unwrap();
        assert_eq!(after["alice"].version, alice.version + 1);
        assert!(verify_password(&after["alice"].hash, "staple"));
        accounts.remove("bob").unwrap();
        assert!(matches!(
            accounts.remove("bob"),
            Err(AccountError::NoSuchUser(_))
        ));
        assert_eq!(
            accounts.list().unwrap(),
            [(
                "alice".to_owned(),
                vec!["staff".to_owned(), "admin".to_owned()]
            )]
        );
        assert_eq!(accounts.revision().unwrap(), r0 + 4);
        // Another handle (the broker's) sees the same.
        let other = Accounts::open(&dir).unwrap();
        assert_eq!(other.revision().unwrap(), r0 + 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_names_groups_and_empty_passwords_are_refused() {
        let dir = temp_dir("bad");
        let mut accounts = Accounts::open(&dir).unwrap();
        assert!(matches!(
            accounts.add("a/b", "x", &[]),
            Err(AccountError::InvalidName(_))
        ));
        assert!(matches!(
            accounts.add("a", "x", &["no spaces".into()]),
            Err(AccountError::InvalidGroup(_))
        ));
        assert!(matches!(
            accounts.add("a", "", &[]),
            Err(AccountError::EmptyPassword)
        ));
        assert!(matches!(
            accounts.passwd("nobody", "x"),
            Err(AccountError::NoSuchUser(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
