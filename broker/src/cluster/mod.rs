//! Several nodes through Redis (`../shared/design/cluster.md`): this node's membership and
//! the bus (docs/ARCHITECTURE.md, "Several nodes").
//!
//! In: `--cluster URL`, the node's name, prefix and time-outs, and the number of client
//! connections open now. Out: a heartbeat key per node (`<prefix>node:<name>`, holding its
//! name, connections and the time it was written, expiring after `--cluster-node-timeout-ms`)
//! listed in the set `<prefix>nodes`, written only while the node's incarnation still holds
//! `<prefix>member:<name>` (other nodes delete it when they declare the node dead; the node
//! then closes its sessions and joins again); the live and the dead nodes; whether Redis
//! answers, for `/healthz`. And the bus: what other nodes publish on the channels this node
//! listens to (topic keys and patterns, rooms, user queues its clients are subscribed to),
//! handed to the services. Rooms' and user queues' scripts are in [`rooms`] and [`users`].

pub mod queues;
pub mod rooms;
pub mod users;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use stomp_codec::{Command, Decoder, Frame, Headers, Limits, Version, encode};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::message::{Publish, now_millis};

/// What a node needs to join.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// `redis://...` or `rediss://...`.
    pub url: String,
    /// This node's name.
    pub node: String,
    /// What every key starts with.
    pub prefix: String,
    /// How long after its last heartbeat a node counts as gone.
    pub node_timeout: Duration,
    /// How long one Redis command may take.
    pub timeout: Duration,
}

/// Why a node could not join.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The URL is not a Redis URL.
    #[error("invalid --cluster URL {url}: {reason}")]
    Url {
        /// The URL, without its password.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// Redis did not answer.
    #[error("cannot reach Redis at {url}: {reason}")]
    Unreachable {
        /// The URL, without its password.
        url: String,
        /// What failed.
        reason: String,
    },
}

/// One node as `/api/nodes` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its name.
    pub name: String,
    /// Client connections open on it at its last heartbeat.
    pub connections: u64,
    /// When its last heartbeat was written (milliseconds since the Unix epoch).
    pub last_seen_ms: u64,
}

/// This node's place in the cluster.
pub struct Cluster {
    redis: ConnectionManager,
    client: redis::Client,
    settings: ClusterSettings,
    /// Whether the last exchange with Redis succeeded.
    reachable: AtomicBool,
    /// How long the last heartbeat took to come back from Redis, in microseconds (0: none
    /// yet).
    round_trip_us: AtomicU64,
    /// Why Redis refused the last heartbeat, when it answered with an error.
    refusal: Mutex<Option<String>>,
    /// This node's life in the cluster: a number Redis gave it when it joined, held in
    /// `<prefix>member:<node>` until other nodes declare it dead.
    incarnation: AtomicU64,
    /// Set when the node finds it was declared dead (it froze): it closes its sessions
    /// and joins again.
    fenced: watch::Sender<u64>,
    /// Topic messages to publish, in order, for the publishing task.
    outgoing: mpsc::UnboundedSender<(String, Bytes)>,
    outgoing_rx: Mutex<Option<mpsc::UnboundedReceiver<(String, Bytes)>>>,
    /// Changes to what this node listens to, for the listening task; and what it listens
    /// to now (channels, and patterns marked with a leading `p`), for resubscribing.
    interest: mpsc::UnboundedSender<Interest>,
    interest_rx: Mutex<Option<mpsc::UnboundedReceiver<Interest>>>,
}

/// A change to what this node listens to; a channel's change may ask to be told once
/// Redis confirmed it.
#[derive(Debug)]
enum Interest {
    Channel(String, bool, Option<oneshot::Sender<()>>),
    Pattern(String, bool),
    /// Answered once every change before it was made in Redis.
    Barrier(oneshot::Sender<()>),
}

/// Where messages from other nodes go: the topic key, the glob it came through (`None`
/// for the key's own channel: for exact subscribers; `Some`: for the patterns that glob
/// stands for, see [`Cluster::glob_of`]), and the message. Redis sends a message once per
/// channel or glob a node listens to, so each kind of subscriber hears it exactly once.
pub type Inbound = Arc<dyn Fn(&str, Option<&str>, &Publish) + Send + Sync>;

/// Where a room's messages go: the room and the message (numbered with its `x-seq`
/// header, unless it is transient).
pub type RoomInbound = Arc<dyn Fn(&str, Publish) + Send + Sync>;

/// What the bus hands on: topic messages, room messages, and word that the bus listened
/// again after losing Redis (messages may have been missed meanwhile).
#[derive(Clone)]
pub struct Handlers {
    /// Topic messages (and room messages heard through a topic pattern's glob).
    pub topic: Inbound,
    /// Room messages heard on a room's own channel.
    pub room: RoomInbound,
    /// Direct messages heard on a user queue's channel: the queue (`<user>/<name>`) and
    /// the message.
    pub user: RoomInbound,
    /// A durable queue's wake-up: it may have messages ready.
    pub queue: Arc<dyn Fn(&str) + Send + Sync>,
    /// Called after the bus listened again.
    pub relistened: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.settings.node)
            .field("redis", &redacted(&self.settings.url))
            .finish_non_exhaustive()
    }
}

/// `url` without its password, for errors and logs.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(None);
            }
            parsed.to_string()
        }
        Err(_) => "(an unparsable URL)".to_owned(),
    }
}

/// The default node name: the host name and a random suffix, so that two nodes on one
/// machine differ.
pub fn default_node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "stoa".to_owned());
    let mut suffix = [0u8; 2];
    let rng = ring::rand::SystemRandom::new();
    // Without randomness the process id still tells two nodes on one machine apart.
    if ring::rand::SecureRandom::fill(&rng, &mut suffix).is_err() {
        suffix = (std::process::id() as u16).to_be_bytes();
    }
    format!("{host}-{:02x}{:02x}", suffix[0], suffix[1])
}

impl Cluster {
    /// Connects to Redis and writes this node's first heartbeat.
    ///
    /// # Errors
    /// The URL is not a Redis URL, or Redis does not answer within the time-out.
    pub async fn join(
        settings: ClusterSettings,
        connections: u64,
    ) -> Result<Cluster, ClusterError> {
        let url = redacted(&settings.url);
        let client = redis::Client::open(settings.url.as_str()).map_err(|e| ClusterError::Url {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        let unreachable = |reason: String| ClusterError::Unreachable {
            url: url.clone(),
            reason,
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_max_delay(Duration::from_secs(2));
        let redis = tokio::time::timeout(
            settings.timeout,
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        .map_err(|_| {
            unreachable(format!(
                "no answer within {} ms",
                settings.timeout.as_millis()
            ))
        })?
        .map_err(|e| unreachable(e.to_string()))?;
        let (outgoing, outgoing_rx) = mpsc::unbounded_channel();
        let (interest, interest_rx) = mpsc::unbounded_channel();
        let cluster = Cluster {
            redis,
            client,
            settings,
            reachable: AtomicBool::new(false),
            round_trip_us: AtomicU64::new(0),
            refusal: Mutex::new(None),
            incarnation: AtomicU64::new(0),
            fenced: watch::Sender::new(0),
            outgoing,
            outgoing_rx: Mutex::new(Some(outgoing_rx)),
            interest,
            interest_rx: Mutex::new(Some(interest_rx)),
        };
        cluster
            .become_member()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        cluster
            .heartbeat(connections)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        info!(node = %cluster.settings.node, redis = %url, "joined the cluster");
        Ok(cluster)
    }

    /// How long after its last heartbeat a node counts as gone.
    pub fn node_timeout(&self) -> Duration {
        self.settings.node_timeout
    }

    /// How long one Redis command may take (`--cluster-timeout-ms`).
    pub fn timeout(&self) -> Duration {
        self.settings.timeout
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.settings.node
    }

    /// This node's current life in the cluster (see [`Cluster::fenced`]).
    pub fn incarnation(&self) -> u64 {
        self.incarnation.load(Ordering::Acquire)
    }

    /// Counts the times this node found itself declared dead and joined again: a
    /// receiver wakes on each.
    pub fn fenced(&self) -> watch::Receiver<u64> {
        self.fenced.subscribe()
    }

    fn member_key(&self) -> String {
        format!("{}member:{}", self.settings.prefix, self.settings.node)
    }

    /// Takes a new incarnation and writes it as this node's member key.
    async fn become_member(&self) -> redis::RedisResult<()> {
        let mut redis = self.redis.clone();
        let incarnation: u64 = redis
            .incr(format!("{}incarnations", self.settings.prefix), 1)
            .await?;
        let _: () = redis.set(self.member_key(), incarnation).await?;
        self.incarnation.store(incarnation, Ordering::Release);
        Ok(())
    }

    /// Why Redis refused the last heartbeat, if it answered with an error rather than not
    /// at all.
    pub fn refusal(&self) -> Option<String> {
        self.refusal.lock().ok().and_then(|r| r.clone())
    }

    /// How long the last heartbeat Redis answered took (its script included), if any did.
    pub fn round_trip(&self) -> Option<Duration> {
        match self.round_trip_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Whether Redis answered the last heartbeat.
    pub fn is_reachable(&self) -> bool {
        self.reachable.load(Ordering::Acquire)
    }

    fn nodes_key(&self) -> String {
        format!("{}nodes", self.settings.prefix)
    }

    fn node_key(&self, name: &str) -> String {
        format!("{}node:{name}", self.settings.prefix)
    }

    /// Writes this node's heartbeat: its record, expiring after the node time-out, and
    /// its name in the set of nodes; unless the node was declared dead meanwhile (its
    /// member key no longer holds its incarnation), which it answers `Ok(false)` to.
    async fn heartbeat(&self, connections: u64) -> redis::RedisResult<bool> {
        const BEAT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[4])
return 1
";
        let info = NodeInfo {
            name: self.settings.node.clone(),
            connections,
            last_seen_ms: now_millis(),
        };
        let record = serde_json::to_string(&info).unwrap_or_default();
        let ttl = u64::try_from(self.settings.node_timeout.as_millis()).unwrap_or(u64::MAX);
        let mut redis = self.redis.clone();
        let sent = std::time::Instant::now();
        let result: redis::RedisResult<bool> = redis::Script::new(BEAT)
            .key(self.member_key())
            .key(self.node_key(&self.settings.node))
            .key(self.nodes_key())
            .arg(self.incarnation())
            .arg(record)
            .arg(ttl.max(1))
            .arg(&self.settings.node)
            .invoke_async(&mut redis)
            .await;
        let ok = result.is_ok();
        if ok {
            let took = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.round_trip_us.store(took.max(1), Ordering::Relaxed);
        }
        let refusal = match &result {
            Err(e) if e.code().is_some() => Some(e.to_string()),
            _ => None,
        };
        if let Ok(mut last) = self.refusal.lock()
            && *last != refusal
        {
            if let Some(reason) = &refusal {
                warn!("Redis refuses this node's writes: {reason}");
            }
            *last = refusal;
        }
        if self.reachable.swap(ok, Ordering::AcqRel) != ok {
            if ok {
                info!("Redis answers again");
            } else if let Err(e) = &result {
                warn!("Redis unreachable: {e}");
            }
        }
        result
    }

    /// The nodes whose heartbeat expired but whose name is still listed: dead, and not yet
    /// (or not completely) cleaned up after.
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn dead_nodes(&self) -> redis::RedisResult<Vec<String>> {
        let mut redis = self.redis.clone();
        let names: Vec<String> = redis.smembers(self.nodes_key()).await?;
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = names.iter().map(|n| self.node_key(n)).collect();
        let records: Vec<Option<String>> = redis.mget(&keys).await?;
        Ok(names
            .into_iter()
            .zip(records)
            .filter(|(name, record)| record.is_none() && *name != self.settings.node)
            .map(|(name, _)| name)
            .collect())
    }

    /// Declares `node` dead if its heartbeat is still expired: its member key goes, so
    /// that it fences itself if it comes back. Whether it was declared (or already was).
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn declare_dead(&self, node: &str) -> redis::RedisResult<bool> {
        const DECLARE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
return 1
";
        let mut redis = self.redis.clone();
        redis::Script::new(DECLARE)
            .key(self.node_key(node))
            .key(format!("{}member:{node}", self.settings.prefix))
            .invoke_async(&mut redis)
            .await
    }

    /// Takes a dead node's name off the list once everything it left was cleaned up.
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn forget_node(&self, node: &str) -> redis::RedisResult<()> {
        const FORGET: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('HLEN', KEYS[2]) > 0 or redis.call('EXISTS', KEYS[4]) == 1
   or redis.call('EXISTS', KEYS[5]) == 1 or redis.call('EXISTS', KEYS[6]) == 1 then return 0 end
redis.call('SREM', KEYS[3], ARGV[1])
return 1
";
        let mut redis = self.redis.clone();
        let _: i64 = redis::Script::new(FORGET)
            .key(self.node_key(node))
            .key(format!("{}presence:{node}", self.settings.prefix))
            .key(self.nodes_key())
            .key(format!("{}dmsubs:{node}", self.settings.prefix))
            .key(format!("{}qleases:{node}", self.settings.prefix))
            .key(format!("{}qsubs:{node}", self.settings.prefix))
            .arg(node)
            .invoke_async(&mut redis)
            .await?;
        Ok(())
    }

    /// The nodes whose heartbeat has not expired, by name. (Names whose record is gone
    /// stay listed until a live node has cleaned up after them, see
    /// [`Cluster::dead_nodes`].)
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn nodes(&self) -> redis::RedisResult<Vec<NodeInfo>> {
        let mut redis = self.redis.clone();
        let mut names: Vec<String> = redis.smembers(self.nodes_key()).await?;
        names.sort();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = names.iter().map(|n| self.node_key(n)).collect();
        let records: Vec<Option<String>> = redis.mget(&keys).await?;
        Ok(records
            .into_iter()
            .flatten()
            .filter_map(|r| serde_json::from_str::<NodeInfo>(&r).ok())
            .collect())
    }

    /// After finding itself declared dead: tells the node (which closes its sessions),
    /// then joins again under a new incarnation.
    async fn rejoin(&self) {
        warn!(node = %self.settings.node, "this node was declared dead by the cluster (it stopped answering): closing its sessions and joining again");
        self.fenced.send_modify(|n| *n += 1);
        match self.become_member().await {
            Ok(()) => {
                info!(node = %self.settings.node, incarnation = self.incarnation(), "joined the cluster again")
            }
            Err(e) => warn!("could not join the cluster again: {e}"),
        }
    }

    /// Beats until `stop`, every third of the node time-out (at most every second, so that
    /// `/healthz` learns of an outage soon), then leaves the list at once.
    pub async fn run(
        self: Arc<Self>,
        connections: impl Fn() -> u64 + Send + 'static,
        mut stop: watch::Receiver<bool>,
    ) {
        let every = (self.settings.node_timeout / 3).min(Duration::from_secs(1));
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    if let Ok(false) = self.heartbeat(connections()).await {
                        self.rejoin().await;
                    }
                }
                _ = stop.changed() => break,
            }
        }
        let mut redis = self.redis.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(self.node_key(&self.settings.node))
            .ignore()
            .srem(self.nodes_key(), &self.settings.node)
            .ignore();
        let leave = pipe.query_async::<()>(&mut redis);
        match tokio::time::timeout(self.settings.timeout, leave).await {
            Ok(Ok(())) => info!(node = %self.settings.node, "left the cluster"),
            Ok(Err(e)) => warn!("could not leave the cluster list: {e}"),
            Err(_) => warn!("could not leave the cluster list: Redis did not answer"),
        }
    }
}

/// The channel of topic `key`.
fn topic_channel(prefix: &str, key: &str) -> String {
    format!("{prefix}topic:{key}")
}

/// The Redis glob that covers what a topic pattern matches: each `*` or `#` word becomes
/// `*` (which matches more, dots included; the topics service matches exactly).
fn topic_glob(prefix: &str, pattern: &str) -> String {
    let words: Vec<&str> = pattern
        .split('.')
        .map(|w| if w == "*" || w == "#" { "*" } else { w })
        .collect();
    // Glob metacharacters in a literal word are escaped.
    let escaped: Vec<String> = words
        .iter()
        .map(|w| {
            if *w == "*" {
                "*".to_owned()
            } else {
                w.chars()
                    .flat_map(|c| match c {
                        '*' | '?' | '[' | ']' | '\\' => vec!['\\', c],
                        c => vec![c],
                    })
                    .collect()
            }
        })
        .collect();
    format!("{prefix}topic:{}", escaped.join("."))
}

/// A message as a STOMP 1.2 MESSAGE frame.
fn encode_bus_frame(publish: &Publish) -> Bytes {
    let stored = publish.to_stored(0);
    let mut frame = Frame::new(Command::Message);
    for (name, value) in &stored.headers {
        frame.headers.push(name, value);
    }
    frame.body = stored.body;
    let mut buf = BytesMut::with_capacity(64 + frame.body.len());
    encode(&frame, Version::V1_2, &mut buf);
    buf.freeze()
}

/// A message on the bus: the sending node's name, a line end, then the message as a STOMP
/// 1.2 MESSAGE frame.
fn encode_bus_message(node: &str, publish: &Publish) -> Bytes {
    let frame = encode_bus_frame(publish);
    let mut buf = BytesMut::with_capacity(node.len() + 1 + frame.len());
    buf.extend_from_slice(node.as_bytes());
    buf.extend_from_slice(b"\n");
    buf.extend_from_slice(&frame);
    buf.freeze()
}

/// The sending node and the message, or `None` for a payload that is not one of ours.
fn decode_bus_message(payload: &[u8]) -> Option<(String, Publish)> {
    let at = payload.iter().position(|&b| b == b'\n')?;
    let node = std::str::from_utf8(&payload[..at]).ok()?.to_owned();
    let mut rest = BytesMut::from(&payload[at + 1..]);
    let limits = Limits {
        max_body_bytes: rest.len(),
        max_frame_bytes: rest.len() + 1,
        ..Limits::default()
    };
    let frame = Decoder::with_version(Version::V1_2, limits)
        .decode(&mut rest)
        .ok()??;
    let message_id = frame.header("message-id")?.parse().ok()?;
    let mut headers = Headers::new();
    for (name, value) in &frame.headers {
        headers.push(name, value);
    }
    Some((node, Publish::new(message_id, headers, frame.body)))
}

impl Cluster {
    /// Sends `publish` of topic `key` to the other nodes (in order with every other).
    pub fn publish_topic(&self, key: &str, publish: &Publish) {
        let payload = encode_bus_message(&self.settings.node, publish);
        let _ = self
            .outgoing
            .send((topic_channel(&self.settings.prefix, key), payload));
    }

    /// The glob this node listens to for topic pattern `pattern`.
    pub fn glob_of(&self, pattern: &str) -> String {
        topic_glob(&self.settings.prefix, pattern)
    }

    /// Starts (`on`) or stops listening to topic key or pattern `key`.
    pub fn listen(&self, key: &str, pattern: bool, on: bool) {
        let change = if pattern {
            Interest::Pattern(topic_glob(&self.settings.prefix, key), on)
        } else {
            Interest::Channel(topic_channel(&self.settings.prefix, key), on, None)
        };
        let _ = self.interest.send(change);
    }

    /// Answers once every change to what this node listens to asked so far was made in
    /// Redis (while Redis answers).
    pub fn listening(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = self.interest.send(Interest::Barrier(tx));
        rx
    }

    /// Starts (`on`) or stops listening to `channel` (a whole channel name, prefix
    /// included); the answer comes once Redis confirmed it (or never, if the bus stopped:
    /// the sender is dropped).
    fn listen_channel(&self, channel: String, on: bool) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = self.interest.send(Interest::Channel(channel, on, Some(tx)));
        rx
    }

    /// Runs the topic bus until `stop`: publishes what [`Cluster::publish_topic`] queued,
    /// pipelined in order, and hands what other nodes publish on listened channels to
    /// `inbound`. Reconnects (listening again to everything) when Redis comes back.
    pub async fn run_bus(self: Arc<Self>, handlers: Handlers, stop: watch::Receiver<bool>) {
        let outgoing = self.outgoing_rx.lock().ok().and_then(|mut o| o.take());
        let interest = self.interest_rx.lock().ok().and_then(|mut i| i.take());
        let (Some(outgoing), Some(interest)) = (outgoing, interest) else {
            return;
        };
        let publisher = tokio::spawn(self.clone().publish_loop(outgoing, stop.clone()));
        self.listen_loop(interest, handlers, stop).await;
        let _ = publisher.await;
    }

    async fn publish_loop(
        self: Arc<Self>,
        mut queued: mpsc::UnboundedReceiver<(String, Bytes)>,
        mut stop: watch::Receiver<bool>,
    ) {
        const BATCH: usize = 256;
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                n = queued.recv_many(&mut batch, BATCH) => if n == 0 { return },
                _ = stop.changed() => return,
            }
            let mut pipe = redis::pipe();
            for (channel, payload) in batch.drain(..) {
                pipe.publish(channel, payload.as_ref()).ignore();
            }
            let mut redis = self.redis.clone();
            if let Err(e) = pipe.query_async::<()>(&mut redis).await {
                // A topic promises no delivery to whom is not reachable: the local
                // subscribers had it; the other nodes' are told by /healthz.
                warn!("publishing topic messages to the other nodes failed: {e}");
            }
        }
    }

    async fn listen_loop(
        &self,
        mut changes: mpsc::UnboundedReceiver<Interest>,
        handlers: Handlers,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut channels: HashSet<String> = HashSet::new();
        let mut patterns: HashSet<String> = HashSet::new();
        let prefix_len = format!("{}topic:", self.settings.prefix).len();
        let user_prefix = format!("{}user:", self.settings.prefix);
        let queue_prefix = format!("{}queue:", self.settings.prefix);
        let mut first = true;
        loop {
            // (Re)connect, and listen again to everything wanted.
            let pubsub = match self.client.get_async_pubsub().await {
                Ok(p) => p,
                Err(e) => {
                    debug!("topic bus: cannot connect: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        _ = stop.changed() => return,
                    }
                }
            };
            let (mut sink, mut stream) = pubsub.split();
            let mut ok = true;
            for channel in &channels {
                ok &= sink.subscribe(channel).await.is_ok();
            }
            for pattern in &patterns {
                ok &= sink.psubscribe(pattern).await.is_ok();
            }
            if ok && !std::mem::take(&mut first) {
                (handlers.relistened)();
            }
            while ok {
                tokio::select! {
                    change = changes.recv() => {
                        let Some(change) = change else { return };
                        // Remembered first: a failure reconnects, and listens to it then.
                        let failed = match change {
                            Interest::Channel(c, true, confirm) => {
                                let failed = channels.insert(c.clone()) && sink.subscribe(c).await.is_err();
                                if let (false, Some(confirm)) = (failed, confirm) {
                                    let _ = confirm.send(());
                                }
                                failed
                            }
                            Interest::Channel(c, false, confirm) => {
                                let failed = channels.remove(&c) && sink.unsubscribe(c).await.is_err();
                                if let (false, Some(confirm)) = (failed, confirm) {
                                    let _ = confirm.send(());
                                }
                                failed
                            }
                            Interest::Barrier(done) => {
                                let _ = done.send(());
                                false
                            }
                            Interest::Pattern(p, true) => patterns.insert(p.clone()) && sink.psubscribe(p).await.is_err(),
                            Interest::Pattern(p, false) => patterns.remove(&p) && sink.punsubscribe(p).await.is_err(),
                        };
                        ok = !failed;
                    }
                    message = stream.next() => {
                        let Some(message) = message else { break };
                        let channel = message.get_channel_name();
                        if let Some(queue) = channel.strip_prefix(queue_prefix.as_str()) {
                            (handlers.queue)(queue);
                            continue;
                        }
                        if let Some(queue) = channel.strip_prefix(user_prefix.as_str()) {
                            match decode_bus_message(message.get_payload_bytes()) {
                                Some((_, publish)) => (handlers.user)(queue, publish),
                                None => warn!(%channel, "a message on a user queue's channel that is not Stoa's"),
                            }
                            continue;
                        }
                        let Some(key) = channel.get(prefix_len..) else { continue };
                        let glob: Option<String> = message.get_pattern().ok();
                        let Some((node, publish)) = decode_bus_message(message.get_payload_bytes()) else {
                            warn!(%channel, "a message on the topic bus that is not Stoa's");
                            continue;
                        };
                        // A room's messages come back to the node that sent them too: every
                        // node delivers them in `x-seq` order as Redis numbered them.
                        match (key.strip_prefix("room."), glob.as_deref()) {
                            (Some(room), None) => (handlers.room)(room, publish),
                            // A room's cleared word is for the rooms' copies only.
                            (Some(_), Some(_)) if rooms::cleared_of(&publish).is_some() => {}
                            (Some(_), Some(glob)) => (handlers.topic)(key, Some(glob), &publish),
                            (None, glob) if node != self.settings.node => (handlers.topic)(key, glob, &publish),
                            (None, _) => {}
                        }
                    }
                    _ = stop.changed() => return,
                }
            }
            debug!("topic bus: connection lost; listening again");
        }
    }
}

/// Runs one of the cluster's ordered writers until `stop`: takes what is queued in batches
/// of up to 256, in order, and hands each to `send`, which answers what Redis answered,
/// gives back what must be tried again, and says whether Redis answered; while it does not,
/// waits with backoff (20 ms doubling to 500 ms). On `stop`, what is still queued gets one
/// last try within `timeout` (leave notices, hand-backs), then it returns.
pub(crate) async fn run_writes<W, F, Fut>(
    mut queued: mpsc::UnboundedReceiver<W>,
    mut stop: watch::Receiver<bool>,
    timeout: Duration,
    mut send: F,
) where
    F: FnMut(Vec<W>) -> Fut,
    Fut: std::future::Future<Output = (Vec<W>, bool)>,
{
    const BATCH: usize = 256;
    let mut batch: Vec<W> = Vec::with_capacity(BATCH);
    let mut backoff = Duration::from_millis(20);
    loop {
        if batch.is_empty() {
            tokio::select! {
                n = queued.recv_many(&mut batch, BATCH) => if n == 0 { return },
                _ = stop.changed() => {
                    while let Ok(w) = queued.try_recv() { batch.push(w); }
                    if !batch.is_empty() {
                        let _ = tokio::time::timeout(timeout, send(batch)).await;
                    }
                    return;
                }
            }
        } else {
            while batch.len() < BATCH {
                match queued.try_recv() {
                    Ok(w) => batch.push(w),
                    Err(_) => break,
                }
            }
        }
        let (kept, answered) = send(std::mem::take(&mut batch)).await;
        batch = kept;
        if answered {
            backoff = Duration::from_millis(20);
        } else {
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_loses_its_password_in_errors_and_logs() {
        assert_eq!(
            redacted("redis://user:secret@127.0.0.1:6379/2"),
            "redis://user@127.0.0.1:6379/2"
        );
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert!(!redacted("redis://:secret@host:1").contains("secret"));
    }

    #[test]
    fn a_default_name_is_the_host_and_a_suffix() {
        let a = default_node_name();
        assert!(a.rsplit_once('-').is_some_and(|(_, s)| s.len() == 4), "{a}");
    }
}
