//! Broker configuration: every option is a flag, a `STOA_*` environment variable and a key in
//! an optional TOML file (`--config`), in that order of precedence.
//!
//! In: command-line arguments, the environment, the TOML file. Out: a validated [`Config`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, parser::ValueSource};
use stomp_codec::{HeartBeat, Limits};

use crate::auth::{AuthSettings, Mode};
use crate::cluster::ClusterSettings;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line (tracing-subscriber's JSON format).
    Json,
}

/// Every setting of the broker. `stoa --help` lists them with their defaults.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "stoa",
    version,
    about = "Stoa: a STOMP 1.0-1.2 broker with chat rooms, over WebSocket and TCP"
)]
pub struct Config {
    /// A TOML file with any of these options as keys (kebab-case, e.g. `http-listen`).
    #[arg(long, env = "STOA_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address for HTTP: the chat page at `/`, STOMP over WebSocket at `/ws`, `/healthz`,
    /// `/metrics`. Port 0 picks a free port.
    #[arg(long, env = "STOA_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,

    /// Address for STOMP over TCP. Port 0 picks a free port.
    #[arg(long, env = "STOA_STOMP_LISTEN", default_value = "127.0.0.1:61613")]
    pub stomp_listen: SocketAddr,

    /// Directory for the broker's data, created on start.
    #[arg(long, env = "STOA_DATA_DIR", default_value = "./stoa-data")]
    pub data_dir: PathBuf,

    /// Largest STOMP frame (command, headers, body), in bytes.
    #[arg(long, env = "STOA_MAX_FRAME_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_frame_bytes: usize,

    /// Largest frame body, in bytes.
    #[arg(long, env = "STOA_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Most header lines in one frame.
    #[arg(long, env = "STOA_MAX_HEADERS", default_value_t = 64)]
    pub max_headers: usize,

    /// Longest command or header line, in bytes.
    #[arg(long, env = "STOA_MAX_HEADER_LINE_BYTES", default_value_t = 8 * 1024)]
    pub max_header_line_bytes: usize,

    /// Most subscriptions on one connection.
    #[arg(long, env = "STOA_MAX_SUBSCRIPTIONS", default_value_t = 1024)]
    pub max_subscriptions: usize,

    /// Bytes queued for one connection before it is a slow consumer: it gets ERROR
    /// "slow consumer" and is closed.
    #[arg(long, env = "STOA_OUTBOX_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub outbox_bytes: usize,

    /// Frames (SEND, ACK, NACK) one transaction may hold until COMMIT.
    #[arg(long, env = "STOA_MAX_TRANSACTION_FRAMES", default_value_t = 1024)]
    pub max_transaction_frames: usize,

    /// Open transactions on one connection.
    #[arg(long, env = "STOA_MAX_TRANSACTIONS", default_value_t = 64)]
    pub max_transactions: usize,

    /// Unacknowledged messages remembered per client-ack subscription on a topic; past it the
    /// oldest is forgotten (topics deliver at most once).
    #[arg(long, env = "STOA_MAX_UNACKED", default_value_t = 10_000)]
    pub max_unacked: usize,

    /// The server's heart-beat offer `sx,sy` in ms: it can send every sx, wants every sy.
    #[arg(long, env = "STOA_HEART_BEAT", default_value = "10000,10000", value_parser = parse_heart_beat)]
    pub heart_beat: HeartBeat,

    /// A connection silent for this many times its negotiated heart-beat interval is closed
    /// (browsers throttle timers in background tabs, so 1x would drop live users).
    #[arg(long, env = "STOA_HEART_BEAT_TOLERANCE", default_value_t = 3)]
    pub heart_beat_tolerance: u32,

    /// Milliseconds a new connection has to send CONNECT; on the HTTP port, also the time
    /// each request's head may take (a silent or idle HTTP connection is closed after it).
    #[arg(long, env = "STOA_CONNECT_TIMEOUT_MS", default_value_t = 30_000)]
    pub connect_timeout_ms: u64,

    /// Milliseconds one batch of writes to a client may take before the client is dropped.
    #[arg(long, env = "STOA_WRITE_TIMEOUT_MS", default_value_t = 10_000)]
    pub write_timeout_ms: u64,

    /// SockJS (under `/ws`): milliseconds between `h` frames on a receiving request with
    /// nothing else to send.
    #[arg(long, env = "STOA_SOCKJS_HEARTBEAT_MS", default_value_t = 25_000)]
    pub sockjs_heartbeat_ms: u64,

    /// SockJS: milliseconds a session may go without a receiving request before it is
    /// closed (its client is gone).
    #[arg(long, env = "STOA_SOCKJS_DISCONNECT_DELAY_MS", default_value_t = 5_000)]
    pub sockjs_disconnect_delay_ms: u64,

    /// SockJS: bytes after which a streaming response (`xhr_streaming`, `eventsource`,
    /// `htmlfile`) ends and the client opens the next, so that neither proxies nor the
    /// browser keep all of it.
    #[arg(long, env = "STOA_SOCKJS_STREAM_BYTES", default_value_t = 128 * 1024)]
    pub sockjs_stream_bytes: usize,

    /// Milliseconds between keep-alive comments on an idle Server-Sent Events stream
    /// (`/api/rooms/<room>/events`), so that proxies do not drop it.
    #[arg(long, env = "STOA_SSE_KEEPALIVE_MS", default_value_t = 15_000)]
    pub sse_keepalive_ms: u64,

    /// How log lines look on standard error: `text` for people, `json` (one object a line,
    /// with the session's id, address, transport and user as fields) for log collectors.
    /// What is logged is set by RUST_LOG (default `warn`).
    #[arg(long, env = "STOA_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Milliseconds graceful shutdown waits for connections to flush and close.
    #[arg(long, env = "STOA_SHUTDOWN_GRACE_MS", default_value_t = 5_000)]
    pub shutdown_grace_ms: u64,

    /// Messages kept per chat room for history and recovery (`x-history`, `x-since`).
    #[arg(long, env = "STOA_ROOM_HISTORY", default_value_t = 10_000)]
    pub room_history: usize,

    /// Bytes of messages kept per chat room (as counted in memory: headers, body and a
    /// little bookkeeping); past it, the room's oldest kept messages go first.
    #[arg(long, env = "STOA_ROOM_HISTORY_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub room_history_bytes: usize,

    /// Bytes of messages kept by all chat rooms together; past it, the oldest kept messages
    /// of all rooms go first, down to 15/16 of it.
    #[arg(long, env = "STOA_HISTORY_TOTAL_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub history_total_bytes: usize,

    /// Bytes of room messages handed to the history store and not yet taken by its writer;
    /// past it, connections are not read until the store catches up (back-pressure).
    #[arg(long, env = "STOA_STORE_PENDING_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub store_pending_bytes: usize,

    /// Messages that may wait for one offline user's queue (`/user/<user>/queue/<name>`).
    #[arg(long, env = "STOA_USER_QUEUE_LIMIT", default_value_t = 10_000)]
    pub user_queue_limit: usize,

    /// Bytes of bodies that may wait for one offline user's queue; a SEND past it (or past
    /// --user-queue-limit) gets ERROR.
    #[arg(long, env = "STOA_USER_QUEUE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub user_queue_bytes: usize,

    /// Most messages (ready and unacknowledged) one durable queue holds; a SEND past it
    /// gets ERROR "queue ... is full".
    #[arg(long, env = "STOA_QUEUE_MAX_MESSAGES", default_value_t = 1_000_000)]
    pub queue_max_messages: usize,

    /// Most body bytes one durable queue holds.
    #[arg(long, env = "STOA_QUEUE_MAX_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub queue_max_bytes: usize,

    /// Read size per connection, in bytes, for the STOMP read buffer and tungstenite's: small
    /// keeps idle connections cheap; large frames just take more reads. An empty buffer is
    /// given back between reads.
    #[arg(long, env = "STOA_READ_BUFFER_BYTES", default_value_t = 1024)]
    pub read_buffer_bytes: usize,

    /// Connections the kernel may hold for each listener before they are accepted (capped
    /// by the system's net.core.somaxconn); past it, new connections wait for a SYN
    /// retransmission, a second or more.
    #[arg(long, env = "STOA_LISTEN_BACKLOG", default_value_t = 4096)]
    pub listen_backlog: u32,

    /// Threads that serve connections; by default one per CPU this process may run on
    /// (what `taskset` or a container's cpuset allows when it starts). Give the broker's
    /// CPU count when its CPUs are limited only after it starts.
    #[arg(long, env = "STOA_WORKERS")]
    pub workers: Option<usize>,

    /// How clients prove who they are: `none` (the CONNECT `login` is the display name),
    /// `users` (accounts managed with `stoa users`, checked against `login`/`passcode`) or
    /// `jwt` (a signed token in `passcode`, `Authorization: Bearer` or `access_token`).
    #[arg(long, env = "STOA_AUTH", value_enum, default_value = "none")]
    pub auth: Mode,

    /// `--auth jwt`: a file holding the HMAC secret (HS256/384/512); trailing whitespace is
    /// trimmed.
    #[arg(long, env = "STOA_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,

    /// `--auth jwt`: a PEM file holding the public key (RS256/384/512, ES256/384, EdDSA).
    #[arg(long, env = "STOA_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,

    /// `--auth jwt`: the `iss` every token must carry.
    #[arg(long, env = "STOA_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// `--auth jwt`: the `aud` every token must carry.
    #[arg(long, env = "STOA_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Milliseconds between a refused CONNECT and its ERROR, at least.
    #[arg(long, env = "STOA_AUTH_FAILURE_DELAY_MS", default_value_t = 500)]
    pub auth_failure_delay_ms: u64,

    /// Failed logins from one address within 60 s after which its CONNECTs get ERROR "too
    /// many failed logins" without a check.
    #[arg(long, env = "STOA_AUTH_MAX_FAILURES", default_value_t = 10)]
    pub auth_max_failures: usize,

    /// `--auth users`: seconds a verified login is remembered (under a keyed hash, in this
    /// process only), so that the same name and password pass again without Argon2; 0 turns
    /// it off.
    #[arg(long, env = "STOA_LOGIN_CACHE_SECONDS", default_value_t = 300)]
    pub login_cache_seconds: u64,

    /// A TOML file of allow and deny rules for SEND and SUBSCRIBE (docs/SECURITY.md); read
    /// again on SIGHUP. Without it everything is allowed.
    #[arg(long, env = "STOA_ACL")]
    pub acl: Option<PathBuf>,

    /// Origins (comma-separated `scheme://host[:port]`, or `*`) whose browser pages may open
    /// a WebSocket or use the HTTP transports, besides the broker's own; any other `Origin`
    /// gets 403 (cross-site WebSocket hijacking). Requests without `Origin` are not from
    /// browsers and pass.
    #[arg(long, env = "STOA_ALLOWED_ORIGINS", default_value = "")]
    pub allowed_origins: String,

    /// Most client connections, all transports together (0: no limit but the process's file
    /// limit); past it a WebSocket upgrade gets 503 and a TCP connection ERROR "server busy".
    #[arg(long, env = "STOA_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,

    /// Most client connections from one address (0: no limit).
    #[arg(long, env = "STOA_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: usize,

    /// SENDs per second one connection may make (0: no limit); past it the connection is
    /// not read until it may send again (TCP back-pressure: nothing is dropped).
    #[arg(long, env = "STOA_MAX_SEND_RATE", default_value_t = 0)]
    pub max_send_rate: u32,

    /// SENDs one connection may make at once, beyond the rate (default: the rate).
    #[arg(long, env = "STOA_MAX_SEND_BURST")]
    pub max_send_burst: Option<u32>,

    /// A PEM certificate (chain) for TLS on both listeners: HTTPS and wss:// on the HTTP
    /// one, STOMP over TLS on the STOMP one. Goes with --tls-key; both are read again on
    /// SIGHUP.
    #[arg(long, env = "STOA_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert.
    #[arg(long, env = "STOA_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Run as one node of several sharing Redis: `redis://[user:pass@]HOST:PORT[/DB]`
    /// (`rediss://` for TLS). Topics, rooms (numbering, history, presence), direct
    /// messages, durable queues and the room and queue queries are shared. A node that
    /// cannot reach Redis does not start. Run Redis with `appendonly yes` and `appendfsync
    /// always` (docs/CLUSTER.md).
    #[arg(long, env = "STOA_CLUSTER")]
    pub cluster: Option<String>,

    /// This node's name in the cluster [default: the host name and a random suffix].
    #[arg(long, env = "STOA_NODE_NAME")]
    pub node_name: Option<String>,

    /// What every Redis key and channel of this cluster starts with, so that several
    /// clusters can share one Redis.
    #[arg(long, env = "STOA_CLUSTER_PREFIX", default_value = "stoa:")]
    pub cluster_prefix: String,

    /// Milliseconds after its last heartbeat that a node counts as gone.
    #[arg(long, env = "STOA_CLUSTER_NODE_TIMEOUT_MS", default_value_t = 10_000)]
    pub cluster_node_timeout_ms: u64,

    /// Milliseconds a frame that needs Redis waits for it at most; also the limit for
    /// reaching Redis at start.
    #[arg(long, env = "STOA_CLUSTER_TIMEOUT_MS", default_value_t = 5_000)]
    pub cluster_timeout_ms: u64,

    /// Most milliseconds a connection that has just written waits before its next write
    /// when the broker is busy, so that one write carries what arrives meanwhile. The wait
    /// grows with the worker threads' busy time: none below 60% busy, this much at 90%.
    /// 0 turns coalescing off.
    #[arg(long, env = "STOA_WRITE_COALESCE_MAX_MS", default_value_t = 20)]
    pub write_coalesce_max_ms: u64,
}

fn parse_heart_beat(value: &str) -> Result<HeartBeat, String> {
    HeartBeat::parse(value).map_err(|e| e.to_string())
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The `--config` file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file named by `--config`.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The `--config` file is not valid TOML for these options.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file named by `--config`.
        path: PathBuf,
        /// What was wrong.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("invalid setting: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads flags and environment, then takes from the `--config` file every option they
    /// left at its default.
    ///
    /// # Errors
    /// Bad arguments, an unreadable or invalid file, or out-of-range values.
    pub fn load() -> Result<Config, ConfigError> {
        Config::try_parse_args(std::env::args_os())
    }

    /// [`Config::load`] over given arguments (the first is the program name).
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn try_parse_args<I, T>(args: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        let matches = parse(&args)?;
        let config =
            Config::from_arg_matches(&matches).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let Some(path) = config.config.clone() else {
            config.validate()?;
            return Ok(config);
        };
        // Each file key whose option is still at its default becomes `--key=value`, so clap
        // checks file values exactly as it checks flags, and flags and variables still win.
        args.extend(file_args(&path, &matches)?.into_iter().map(Into::into));
        let config = Config::from_arg_matches(&parse(&args)?)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("max-frame-bytes", self.max_frame_bytes),
            ("max-body-bytes", self.max_body_bytes),
            ("max-headers", self.max_headers),
            ("max-header-line-bytes", self.max_header_line_bytes),
            ("max-subscriptions", self.max_subscriptions),
            ("outbox-bytes", self.outbox_bytes),
            ("read-buffer-bytes", self.read_buffer_bytes),
            ("listen-backlog", self.listen_backlog as usize),
            ("room-history", self.room_history),
            ("room-history-bytes", self.room_history_bytes),
            ("history-total-bytes", self.history_total_bytes),
            ("store-pending-bytes", self.store_pending_bytes),
            ("user-queue-limit", self.user_queue_limit),
            ("user-queue-bytes", self.user_queue_bytes),
            ("auth-max-failures", self.auth_max_failures),
            ("queue-max-messages", self.queue_max_messages),
            ("queue-max-bytes", self.queue_max_bytes),
            ("max-unacked", self.max_unacked),
            ("sockjs-stream-bytes", self.sockjs_stream_bytes),
            ("sse-keepalive-ms", self.sse_keepalive_ms as usize),
            ("sockjs-heartbeat-ms", self.sockjs_heartbeat_ms as usize),
            (
                "sockjs-disconnect-delay-ms",
                self.sockjs_disconnect_delay_ms as usize,
            ),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        if self.workers == Some(0) {
            return Err(ConfigError::Invalid("workers must be at least 1".into()));
        }
        if self.heart_beat_tolerance == 0 {
            return Err(ConfigError::Invalid(
                "heart-beat-tolerance must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// How to join the cluster (`--cluster`), if this node is one of several.
    pub fn cluster_settings(&self) -> Option<ClusterSettings> {
        let url = self.cluster.clone()?;
        Some(ClusterSettings {
            url,
            node: self
                .node_name
                .clone()
                .unwrap_or_else(crate::cluster::default_node_name),
            prefix: self.cluster_prefix.clone(),
            node_timeout: Duration::from_millis(self.cluster_node_timeout_ms.max(1)),
            timeout: Duration::from_millis(self.cluster_timeout_ms.max(1)),
        })
    }

    /// What authentication takes from these settings.
    pub fn auth_settings(&self) -> AuthSettings {
        AuthSettings {
            mode: self.auth,
            data_dir: self.data_dir.clone(),
            jwt_secret_file: self.jwt_secret_file.clone(),
            jwt_public_key_file: self.jwt_public_key_file.clone(),
            jwt_issuer: self.jwt_issuer.clone(),
            jwt_audience: self.jwt_audience.clone(),
            failure_delay: Duration::from_millis(self.auth_failure_delay_ms),
            max_failures: self.auth_max_failures,
            login_cache: Duration::from_secs(self.login_cache_seconds),
        }
    }

    /// The codec limits these settings describe.
    pub fn limits(&self) -> Limits {
        Limits {
            max_frame_bytes: self.max_frame_bytes,
            max_headers: self.max_headers,
            max_header_line_bytes: self.max_header_line_bytes,
            max_body_bytes: self.max_body_bytes,
        }
    }

    /// Time a client has to send CONNECT.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// The longest a busy broker lets a connection coalesce its writes.
    pub fn write_coalesce_max(&self) -> Duration {
        Duration::from_millis(self.write_coalesce_max_ms)
    }

    /// Time one batch of writes may take.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    /// Time shutdown waits for connections.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

fn parse(args: &[std::ffi::OsString]) -> Result<ArgMatches, ConfigError> {
    match Config::command().try_get_matches_from(args) {
        Ok(matches) => Ok(matches),
        // --help and --version are not failures: print and exit as clap does.
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            e.exit()
        }
        Err(e) => Err(ConfigError::Invalid(e.to_string())),
    }
}

/// Every option as commented TOML, in the order `stoa --help` lists them: its help, its
/// `STOA_*` variable, and the line to uncomment with its default (`stoa config`). A file of
/// these lines, uncommented as needed, is what `--config` reads.
pub fn reference_toml() -> String {
    let command = Config::command();
    let mut out = String::from(
        "# Stoa's options, as a --config file takes them. Each is also a flag (--name) and an\n\
         # environment variable (STOA_NAME); a flag wins over the variable, which wins over\n\
         # this file. Uncomment a line to change a default.\n",
    );
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        if matches!(id, "help" | "version" | "config") {
            continue;
        }
        let key = id.replace('_', "-");
        out.push('\n');
        let help = arg
            .get_long_help()
            .or_else(|| arg.get_help())
            .map(ToString::to_string)
            .unwrap_or_default();
        for line in help.lines() {
            for wrapped in wrap(line, 88) {
                out.push_str(format!("# {wrapped}").trim_end());
                out.push('\n');
            }
        }
        let values: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|v| !v.is_hide_set())
            .map(|v| v.get_name().to_owned())
            .collect();
        if !values.is_empty() {
            out.push_str(&format!("# One of: {}.\n", values.join(", ")));
        }
        if let Some(env) = arg.get_env() {
            out.push_str(&format!("# Environment: {}\n", env.to_string_lossy()));
        }
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        match defaults.first() {
            Some(value) => out.push_str(&format!("#{key} = {}\n", toml_value(value))),
            None => out.push_str(&format!("# (not set by default)\n#{key} = \"\"\n")),
        }
    }
    out
}

/// `text` in lines of at most `width` characters, broken between words.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let line = lines.last_mut().map_or(0, |l| l.chars().count());
        if line > 0 && line + 1 + word.chars().count() > width {
            lines.push(String::new());
        }
        if let Some(last) = lines.last_mut() {
            if !last.is_empty() {
                last.push(' ');
            }
            last.push_str(word);
        }
    }
    lines
}

/// A default as TOML: numbers and booleans bare, anything else a string.
fn toml_value(value: &str) -> String {
    if value.parse::<i64>().is_ok() || value.parse::<f64>().is_ok_and(f64::is_finite) {
        return value.to_owned();
    }
    if value == "true" || value == "false" {
        return value.to_owned();
    }
    toml::Value::String(value.to_owned()).to_string()
}

/// docs/CONFIG.md: the reference, with a word on how to read it (`stoa config --markdown`).
pub fn reference_markdown() -> String {
    format!(
        "# Configuration reference\n\n\
         Generated by `stoa config --markdown > docs/CONFIG.md`; a test fails when this file and\n\
         the binary's options differ. `stoa config > stoa.toml` writes the same as a file for\n\
         `--config`, every option commented out at its default.\n\n\
         ```toml\n{}```\n",
        reference_toml()
    )
}

fn file_args(path: &PathBuf, matches: &ArgMatches) -> Result<Vec<String>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.clone(),
        source: Box::new(source),
    })?;
    let command = Config::command();
    let mut args = Vec::new();
    for (key, value) in table {
        let id = key.replace('-', "_");
        if id == "config" || !command.get_arguments().any(|a| a.get_id() == id.as_str()) {
            return Err(ConfigError::Invalid(format!(
                "unknown key {key:?} in {}",
                path.display()
            )));
        }
        if matches!(
            matches.value_source(&id),
            Some(ValueSource::DefaultValue) | None
        ) {
            let value = match value {
                toml::Value::String(s) => s,
                other => other.to_string(),
            };
            args.push(format!("--{key}={value}"));
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_design() {
        let c = Config::try_parse_args(["stoa"]).unwrap();
        assert_eq!(c.http_listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.stomp_listen.to_string(), "127.0.0.1:61613");
        assert_eq!(c.max_frame_bytes, 4 * 1024 * 1024);
        assert_eq!(c.max_headers, 64);
        assert_eq!(c.max_header_line_bytes, 8192);
        assert_eq!(c.max_subscriptions, 1024);
        assert_eq!(c.outbox_bytes, 4 * 1024 * 1024);
        assert_eq!(
            c.heart_beat,
            HeartBeat {
                send_ms: 10_000,
                receive_ms: 10_000
            }
        );
    }

    #[test]
    fn the_file_fills_what_flags_left_at_default() {
        let dir = std::env::temp_dir().join(format!("stoa-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stoa.toml");
        std::fs::write(
            &path,
            "max-headers = 10\nheart-beat = \"5000,0\"\nhttp-listen = \"127.0.0.1:9999\"\n",
        )
        .unwrap();
        let c = Config::try_parse_args([
            "stoa",
            "--config",
            path.to_str().unwrap(),
            "--max-headers",
            "20",
        ])
        .unwrap();
        assert_eq!(c.max_headers, 20, "a flag beats the file");
        assert_eq!(
            c.heart_beat,
            HeartBeat {
                send_ms: 5000,
                receive_ms: 0
            }
        );
        assert_eq!(c.http_listen.to_string(), "127.0.0.1:9999");
        std::fs::write(&path, "no-such-option = 1\n").unwrap();
        let err = Config::try_parse_args(["stoa", "--config", path.to_str().unwrap()]).unwrap_err();
        assert!(
            err.to_string().contains("unknown key \"no-such-option\""),
            "{err}"
        );
        std::fs::write(&path, "max-headers = \"many\"\n").unwrap();
        assert!(Config::try_parse_args(["stoa", "--config", path.to_str().unwrap()]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_reference_uncommented_is_a_config_file_of_the_defaults() {
        let reference = reference_toml();
        let file: String = reference
            .lines()
            .filter_map(|line| line.strip_prefix('#'))
            .filter(|line| {
                line.contains(" = ") && !line.starts_with(' ') && !line.ends_with("\"\"")
            })
            .map(|line| format!("{line}\n"))
            .collect();
        // Every option is in it, with its variable.
        for arg in Config::command().get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version" | "config") {
                continue;
            }
            let key = id.replace('_', "-");
            assert!(
                reference.contains(&format!("#{key} = ")),
                "{key} is missing"
            );
            if let Some(env) = arg.get_env() {
                assert!(reference.contains(&format!("# Environment: {}", env.to_string_lossy())));
            }
        }
        let dir = std::env::temp_dir().join(format!("stoa-config-ref-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stoa.toml");
        std::fs::write(&path, &file).unwrap();
        let mut from_file = Config::try_parse_args(["stoa", "--config", path.to_str().unwrap()])
            .unwrap_or_else(|e| panic!("{e}\n{file}"));
        from_file.config = None;
        let defaults = Config::try_parse_args(["stoa"]).unwrap();
        assert_eq!(format!("{from_file:?}"), format!("{defaults:?}"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn long_help_is_wrapped_between_words() {
        assert_eq!(wrap("aa bb cc", 5), vec!["aa bb", "cc"]);
        assert_eq!(
            wrap("averyveryverylongword x", 5),
            vec!["averyveryverylongword", "x"]
        );
    }

    #[test]
    fn zero_limits_are_refused() {
        let err = Config::try_parse_args(["stoa", "--max-headers", "0"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid setting: max-headers must be at least 1"
        );
        let err = Config::try_parse_args(["stoa", "--listen-backlog", "0"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid setting: listen-backlog must be at least 1"
        );
    }

    #[test]
    fn write_coalescing_is_up_to_20_ms_and_can_be_turned_off() {
        let c = Config::try_parse_args(["stoa"]).unwrap();
        assert_eq!(c.write_coalesce_max(), Duration::from_millis(20));
        let c = Config::try_parse_args(["stoa", "--write-coalesce-max-ms", "0"]).unwrap();
        assert_eq!(c.write_coalesce_max(), Duration::ZERO);
    }

    #[test]
    fn workers_follow_the_cpus_unless_set_and_zero_is_refused() {
        assert_eq!(Config::try_parse_args(["stoa"]).unwrap().workers, None);
        let c = Config::try_parse_args(["stoa", "--workers", "1"]).unwrap();
        assert_eq!(c.workers, Some(1));
        let err = Config::try_parse_args(["stoa", "--workers", "0"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid setting: workers must be at least 1"
        );
    }

    #[test]
    fn the_listen_backlog_defaults_to_4096_and_can_be_set() {
        assert_eq!(
            Config::try_parse_args(["stoa"]).unwrap().listen_backlog,
            4096
        );
        let c = Config::try_parse_args(["stoa", "--listen-backlog", "512"]).unwrap();
        assert_eq!(c.listen_backlog, 512);
    }
}
