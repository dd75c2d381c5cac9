//! Who is connecting: `--auth none | users | jwt` (`../shared/design/security.md`).
//!
//! In: the credentials a client presents (CONNECT `login` and `passcode`, the WebSocket
//! upgrade's `Authorization: Bearer` or `access_token`, HTTP `Authorization`) and the
//! address it comes from. Out: an [`Identity`] (the user's name, groups, and when the
//! session must end) or a [`Refusal`], the same for every wrong credential. In `users` mode
//! it also watches the accounts database and ends the sessions of accounts removed or whose
//! password changed.
//!
//! Argon2id costs tens of milliseconds of a core and 19 MiB per check, by design. So that a
//! crowd of clients coming back at once (a network blip) does not cost seconds of CPU per
//! thousand users, a login that succeeded is remembered for `--login-cache-seconds` under a
//! keyed hash (HMAC-SHA256 of name and password under a key made at start and never stored):
//! the same name and password, with the account unchanged, pass without Argon2. The record
//! holds no password and nothing that can be checked against one without the key, which
//! lives only in this process.

pub mod accounts;
pub mod jwt;

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use ring::hmac;
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};

use crate::message::SessionId;
use crate::outbox::{End, Outbox};

use accounts::{Account, AccountError, Accounts};
use jwt::{JwtConfigError, JwtVerifier};

/// How clients prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Anyone: the CONNECT `login` is the display name.
    None,
    /// Accounts in the data directory (`stoa users ...`).
    Users,
    /// A signed token (JWT) is the identity.
    Jwt,
}

impl Mode {
    /// The name `GET /api/config` gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Users => "users",
            Mode::Jwt => "jwt",
        }
    }
}

/// An authenticated user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user's name: `x-sender`, `user-name`, and the `{user}` of ACL patterns.
    pub name: Arc<str>,
    /// The user's groups (accounts' groups or the token's `groups`), for the ACL.
    pub groups: Arc<[String]>,
    /// When the session must end: a token's `exp` plus the leeway.
    pub expires_at: Option<SystemTime>,
    /// The account's password version: a session logged in with an older one is revoked.
    pub account_version: Option<i64>,
}

/// What a client presented.
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// CONNECT `login`, or the name of HTTP Basic.
    pub login: Option<&'a str>,
    /// CONNECT `passcode`, or the password of HTTP Basic.
    pub passcode: Option<&'a str>,
    /// A bearer token from the WebSocket upgrade (`Authorization: Bearer`, then
    /// `access_token` in the query) or from HTTP `Authorization: Bearer`.
    pub bearer: Option<&'a str>,
}

/// Why a login was refused: all the client learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Whatever was wrong: ERROR `authentication failed`.
    Failed,
    /// Too many failures from this address lately: ERROR `too many failed logins`.
    TooManyFailures,
}

/// Why the authentication settings could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// The accounts database.
    #[error("{0}")]
    Accounts(#[from] AccountError),
    /// The JWT key or claims settings.
    #[error("{0}")]
    Jwt(#[from] JwtConfigError),
}

/// The settings authentication takes.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// The mode.
    pub mode: Mode,
    /// The data directory (accounts live there).
    pub data_dir: PathBuf,
    /// `--jwt-secret-file`.
    pub jwt_secret_file: Option<PathBuf>,
    /// `--jwt-public-key-file`.
    pub jwt_public_key_file: Option<PathBuf>,
    /// `--jwt-issuer`.
    pub jwt_issuer: Option<String>,
    /// `--jwt-audience`.
    pub jwt_audience: Option<String>,
    /// `--auth-failure-delay-ms`.
    pub failure_delay: Duration,
    /// `--auth-max-failures`: failures from one address within [`FAILURE_WINDOW`].
    pub max_failures: usize,
    /// `--login-cache-seconds`: how long a verified login is remembered (zero: never).
    pub login_cache: Duration,
}

/// The window over which failed logins from one address are counted.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// How often the accounts database is looked at for changes (revocation within 5 s).
pub const ACCOUNTS_POLL: Duration = Duration::from_secs(1);

/// Everything authentication keeps.
pub struct Auth {
    mode: Mode,
    users: Option<Users>,
    jwt: Option<JwtVerifier>,
    failures: Failures,
    failure_delay: Duration,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never hashes, keys or cached records.
        f.debug_struct("Auth")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// Authentication as `settings` say: accounts opened, keys read.
    ///
    /// # Errors
    /// The accounts database cannot be opened, or the JWT key is missing or unreadable.
    pub fn new(settings: &AuthSettings) -> Result<Auth, AuthConfigError> {
        let users = match settings.mode {
            Mode::Users => Some(Users::open(&settings.data_dir, settings.login_cache)?),
            _ => None,
        };
        let jwt = match settings.mode {
            Mode::Jwt => Some(JwtVerifier::new(
                settings.jwt_secret_file.as_deref(),
                settings.jwt_public_key_file.as_deref(),
                settings.jwt_issuer.as_deref(),
                settings.jwt_audience.as_deref(),
            )?),
            _ => None,
        };
        Ok(Auth {
            mode: settings.mode,
            users,
            jwt,
            failures: Failures::new(settings.max_failures),
            failure_delay: settings.failure_delay,
        })
    }

    /// No authentication: `--auth none`.
    pub fn none() -> Auth {
        Auth {
            mode: Mode::None,
            users: None,
            jwt: None,
            failures: Failures::new(usize::MAX),
            failure_delay: Duration::ZERO,
        }
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The least time between a refused CONNECT and its ERROR.
    pub fn failure_delay(&self) -> Duration {
        self.failure_delay
    }

    /// Checks `credentials` from `ip`. Only for `users` and `jwt` (in `none` mode the
    /// CONNECT `login` is the name, and the session checks it).
    pub async fn authenticate(
        &self,
        credentials: Credentials<'_>,
        ip: IpAddr,
    ) -> Result<Identity, Refusal> {
        if self.failures.is_blocked(ip) {
            return Err(Refusal::TooManyFailures);
        }
        let verified = match (&self.users, &self.jwt) {
            (Some(users), _) => users.verify(credentials).await,
            (None, Some(jwt)) => {
                let token = credentials.passcode.or(credentials.bearer);
                match token.map(|token| jwt.verify(token)) {
                    Some(Ok(verified)) => Ok(Identity {
                        name: Arc::from(verified.user),
                        groups: verified.groups.into(),
                        expires_at: Some(verified.expires_at),
                        account_version: None,
                    }),
                    Some(Err(reason)) => Err(reason),
                    None => Err("no token".to_owned()),
                }
            }
            (None, None) => Err("no authentication is configured".to_owned()),
        };
        verified.map_err(|reason| {
            // The reason is for the operator; the client learns only that it failed. No
            // credential is logged.
            // Once per failure, at warn: seen with the default RUST_LOG.
            warn!(%ip, login = credentials.login.unwrap_or(""), %reason, "authentication failed");
            self.failures.record(ip);
            Refusal::Failed
        })
    }

    /// Notes a live session of `identity`, so that a change of its account ends it.
    pub fn register(&self, identity: &Identity, session: SessionId, outbox: &Arc<Outbox>) {
        if let (Some(users), Some(version)) = (&self.users, identity.account_version) {
            users
                .sessions
                .entry(identity.name.clone())
                .or_default()
                .push((session, version, Arc::downgrade(outbox)));
        }
    }

    /// Forgets a session noted by [`Auth::register`].
    pub fn unregister(&self, user: &str, session: SessionId) {
        if let Some(users) = &self.users {
            if let Some(mut list) = users.sessions.get_mut(user) {
                list.retain(|(id, _, _)| *id != session);
            }
            users.sessions.remove_if(user, |_, list| list.is_empty());
        }
    }

    /// In `users` mode, looks at the accounts database every [`ACCOUNTS_POLL`] until `stop`
    /// changes, and ends (ERROR `session revoked`) the sessions of accounts removed or whose
    /// password changed.
    pub async fn watch_accounts(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        if self.users.is_none() {
            return;
        }
        let mut tick = tokio::time::interval(ACCOUNTS_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tick.tick() => {}
            }
            let auth = self.clone();
            let changed = tokio::task::spawn_blocking(move || {
                auth.users.as_ref().map(Users::reload_if_changed)
            })
            .await;
            match changed {
                Ok(Some(Ok(true))) => self.revoke_stale(),
                Ok(Some(Err(e))) => warn!("cannot read the accounts: {e}"),
                _ => {}
            }
            self.failures.sweep();
        }
    }

    fn revoke_stale(&self) {
        let Some(users) = &self.users else {
            return;
        };
        let snapshot = users.snapshot();
        for entry in users.sessions.iter() {
            let current = snapshot.accounts.get(&**entry.key()).map(|a| a.version);
            for (session, version, outbox) in entry.value() {
                if current != Some(*version) {
                    info!(user = %entry.key(), session = session.0, "revoking a session: its account changed");
                    if let Some(outbox) = outbox.upgrade() {
                        outbox.end(End::Revoked);
                    }
                }
            }
        }
    }
}

/// The accounts as the broker last read them.
#[derive(Debug, Default)]
struct Snapshot {
    revision: i64,
    accounts: HashMap<String, Account>,
}

/// `users` mode: the accounts, the login cache, and the live sessions by user.
struct Users {
    dir: PathBuf,
    snapshot: RwLock<Arc<Snapshot>>,
    cache: LoginCache,
    /// Argon2 checks at once: each takes a core and 19 MiB.
    hashing: Semaphore,
    /// Checked against when the name is unknown, so that an unknown name costs the same
    /// time as a wrong password.
    dummy_hash: String,
    #[allow(clippy::type_complexity)]
    sessions: DashMap<Arc<str>, Vec<(SessionId, i64, std::sync::Weak<Outbox>)>>,
}

impl Users {
    fn open(dir: &Path, cache_for: Duration) -> Result<Users, AccountError> {
        let accounts = Accounts::open(dir)?;
        let snapshot = Snapshot {
            revision: accounts.revision()?,
            accounts: accounts.load()?,
        };
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let cache = LoginCache::new(cache_for)
            .map_err(|_| AccountError::Hash("the OS gave no random bytes for a key".into()))?;
        Ok(Users {
            dir: dir.to_owned(),
            snapshot: RwLock::new(Arc::new(snapshot)),
            cache,
            hashing: Semaphore::new(cores),
            dummy_hash: accounts::hash_password("not a password anyone has")?,
            sessions: DashMap::new(),
        })
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reads the accounts again if they changed; whether they did.
    fn reload_if_changed(&self) -> Result<bool, AccountError> {
        let accounts = Accounts::open(&self.dir)?;
        let revision = accounts.revision()?;
        if revision == self.snapshot().revision {
            return Ok(false);
        }
        let snapshot = Snapshot {
            revision,
            accounts: accounts.load()?,
        };
        debug!(revision, "accounts changed");
        *self
            .snapshot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(snapshot);
        Ok(true)
    }

    async fn verify(&self, credentials: Credentials<'_>) -> Result<Identity, String> {
        let (Some(login), Some(password)) = (credentials.login, credentials.passcode) else {
            return Err("no login or no passcode".to_owned());
        };
        let account = self.snapshot().accounts.get(login).cloned();
        let key = self.cache.key(login, password);
        if let Some(account) = &account
            && self.cache.holds(&key, account.version)
        {
            return Ok(identity(login, account));
        }
        let hash = account
            .as_ref()
            .map_or_else(|| self.dummy_hash.clone(), |a| a.hash.clone());
        let password = password.to_owned();
        let matches = {
            let _permit = self.hashing.acquire().await.map_err(|e| e.to_string())?;
            tokio::task::spawn_blocking(move || accounts::verify_password(&hash, &password))
                .await
                .unwrap_or(false)
        };
        match account {
            Some(account) if matches => {
                self.cache.remember(key, account.version);
                Ok(identity(login, &account))
            }
            Some(_) => Err("wrong password".to_owned()),
            None => Err("no such account".to_owned()),
        }
    }
}

fn identity(login: &str, account: &Account) -> Identity {
    Identity {
        name: Arc::from(login),
        groups: account.groups.clone().into(),
        expires_at: None,
        account_version: Some(account.version),
    }
}

/// Logins verified lately, under a keyed hash of name and password.
struct LoginCache {
    key: hmac::Key,
    ttl: Duration,
    verified: DashMap<[u8; 32], (i64, Instant)>,
}

/// Entries past which the cache drops what has expired (and everything, if that is not
/// enough): memory stays bounded whatever clients try.
const LOGIN_CACHE_MAX: usize = 100_000;

impl LoginCache {
    fn new(ttl: Duration) -> Result<LoginCache, ring::error::Unspecified> {
        let rng = ring::rand::SystemRandom::new();
        // A fresh key per process: nothing cached outlives it or can be tried offline.
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)?;
        Ok(LoginCache {
            key,
            ttl,
            verified: DashMap::new(),
        })
    }

    fn key(&self, login: &str, password: &str) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.key);
        // The name's length first: no two name/password pairs hash the same input.
        ctx.update(&(login.len() as u64).to_le_bytes());
        ctx.update(login.as_bytes());
        ctx.update(password.as_bytes());
        let tag = ctx.sign();
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    fn holds(&self, key: &[u8; 32], version: i64) -> bool {
        self.verified
            .get(key)
            .is_some_and(|entry| entry.0 == version && entry.1 > Instant::now())
    }

    fn remember(&self, key: [u8; 32], version: i64) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        if self.verified.len() >= LOGIN_CACHE_MAX {
            self.verified.retain(|_, (_, until)| *until > now);
            if self.verified.len() >= LOGIN_CACHE_MAX {
                self.verified.clear();
            }
        }
        self.verified.insert(key, (version, now + self.ttl));
    }
}

/// Failed logins per address over the last [`FAILURE_WINDOW`].
struct Failures {
    max: usize,
    by_ip: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

impl Failures {
    fn new(max: usize) -> Failures {
        Failures {
            max,
            by_ip: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, VecDeque<Instant>>> {
        self.by_ip
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn is_blocked(&self, ip: IpAddr) -> bool {
        let mut by_ip = self.lock();
        let Some(times) = by_ip.get_mut(&ip) else {
            return false;
        };
        let since = Instant::now().checked_sub(FAILURE_WINDOW);
        while times.front().is_some_and(|t| since.is_some_and(|s| *t < s)) {
            times.pop_front();
        }
        times.len() >= self.max
    }

    fn record(&self, ip: IpAddr) {
        let mut by_ip = self.lock();
        let times = by_ip.entry(ip).or_default();
        times.push_back(Instant::now());
        // Never more than the limit kept: past it the address is refused without a check.
        while times.len() > self.max {
            times.pop_front();
        }
    }

    /// Forgets addresses whose failures are all older than the window.
    fn sweep(&self) {
        let since = Instant::now().checked_sub(FAILURE_WINDOW);
        self.lock()
            .retain(|_, times| times.back().is_some_and(|t| since.is_none_or(|s| *t >= s)));
    }
}
