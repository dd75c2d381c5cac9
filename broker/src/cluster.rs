//! Several nodes through Redis (`../shared/design/cluster.md`): this node's membership.
//!
//! In: `--cluster URL`, the node's name, prefix and time-outs, and the number of client
//! connections open now. Out: a heartbeat key per node (`<prefix>node:<name>`, holding its
//! name, connections and the time it was written, expiring after `--cluster-node-timeout-ms`)
//! listed in the set `<prefix>nodes`; the list of live nodes; and whether Redis answers,
//! for `/healthz`. And the topic bus: a plain topic's messages published on one node reach
//! the subscribers of the others through Redis pub/sub (one channel per topic key; a node
//! listens only to keys and patterns its own clients subscribe to). Rooms, presence, queues
//! and direct messages are not shared yet (docs/ARCHITECTURE.md, "Next: the shared-state
//! and delivery seams").

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use stomp_codec::{Command, Decoder, Frame, Headers, Limits, Version, encode};
use tokio::sync::{mpsc, watch};
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
    /// Topic messages to publish, in order, for the publishing task.
    outgoing: mpsc::UnboundedSender<(String, Bytes)>,
    outgoing_rx: Mutex<Option<mpsc::UnboundedReceiver<(String, Bytes)>>>,
    /// Changes to what this node listens to, for the listening task; and what it listens
    /// to now (channels, and patterns marked with a leading `p`), for resubscribing.
    interest: mpsc::UnboundedSender<Interest>,
    interest_rx: Mutex<Option<mpsc::UnboundedReceiver<Interest>>>,
}

/// A change to what this node listens to.
#[derive(Debug)]
enum Interest {
    Channel(String, bool),
    Pattern(String, bool),
}

/// Where messages from other nodes go: the topic key, the glob it came through (`None`
/// for the key's own channel: for exact subscribers; `Some`: for the patterns that glob
/// stands for, see [`Cluster::glob_of`]), and the message. Redis sends a message once per
/// channel or glob a node listens to, so each kind of subscriber hears it exactly once.
pub type Inbound = Arc<dyn Fn(&str, Option<&str>, &Publish) + Send + Sync>;

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
            outgoing,
            outgoing_rx: Mutex::new(Some(outgoing_rx)),
            interest,
            interest_rx: Mutex::new(Some(interest_rx)),
        };
        cluster
            .heartbeat(connections)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        info!(node = %cluster.settings.node, redis = %url, "joined the cluster");
        Ok(cluster)
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.settings.node
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
    /// its name in the set of nodes.
    async fn heartbeat(&self, connections: u64) -> redis::RedisResult<()> {
        let info = NodeInfo {
            name: self.settings.node.clone(),
            connections,
            last_seen_ms: now_millis(),
        };
        let record = serde_json::to_string(&info).unwrap_or_default();
        let ttl = u64::try_from(self.settings.node_timeout.as_millis()).unwrap_or(u64::MAX);
        let mut redis = self.redis.clone();
        let result = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(self.node_key(&self.settings.node))
            .arg(record)
            .arg("PX")
            .arg(ttl.max(1))
            .ignore()
            .sadd(self.nodes_key(), &self.settings.node)
            .ignore()
            .query_async::<()>(&mut redis)
            .await;
        let ok = result.is_ok();
        if self.reachable.swap(ok, Ordering::AcqRel) != ok {
            if ok {
                info!("Redis answers again");
            } else if let Err(e) = &result {
                warn!("Redis unreachable: {e}");
            }
        }
        result
    }

    /// The nodes whose heartbeat has not expired, by name. Names whose record is gone are
    /// taken out of the set as they are found.
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
        let mut live = Vec::new();
        let mut gone = Vec::new();
        for (name, record) in names.into_iter().zip(records) {
            match record.and_then(|r| serde_json::from_str::<NodeInfo>(&r).ok()) {
                Some(info) => live.push(info),
                None => gone.push(name),
            }
        }
        if !gone.is_empty() {
            debug!(?gone, "forgetting nodes whose heartbeat expired");
            let _: redis::RedisResult<()> = redis.srem(self.nodes_key(), &gone).await;
        }
        Ok(live)
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
                    let _ = self.heartbeat(connections()).await;
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

/// A message on the bus: the sending node's name, a line end, then the message as a STOMP
/// 1.2 MESSAGE frame.
fn encode_bus_message(node: &str, publish: &Publish) -> Bytes {
    let stored = publish.to_stored(0);
    let mut frame = Frame::new(Command::Message);
    for (name, value) in &stored.headers {
        frame.headers.push(name, value);
    }
    frame.body = stored.body;
    let mut buf = BytesMut::with_capacity(node.len() + 1 + 64 + frame.body.len());
    buf.extend_from_slice(node.as_bytes());
    buf.extend_from_slice(b"\n");
    encode(&frame, Version::V1_2, &mut buf);
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
            Interest::Channel(topic_channel(&self.settings.prefix, key), on)
        };
        let _ = self.interest.send(change);
    }

    /// Runs the topic bus until `stop`: publishes what [`Cluster::publish_topic`] queued,
    /// pipelined in order, and hands what other nodes publish on listened channels to
    /// `inbound`. Reconnects (listening again to everything) when Redis comes back.
    pub async fn run_bus(self: Arc<Self>, inbound: Inbound, stop: watch::Receiver<bool>) {
        let outgoing = self.outgoing_rx.lock().ok().and_then(|mut o| o.take());
        let interest = self.interest_rx.lock().ok().and_then(|mut i| i.take());
        let (Some(outgoing), Some(interest)) = (outgoing, interest) else {
            return;
        };
        let publisher = tokio::spawn(self.clone().publish_loop(outgoing, stop.clone()));
        self.listen_loop(interest, inbound, stop).await;
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
        inbound: Inbound,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut channels: HashSet<String> = HashSet::new();
        let mut patterns: HashSet<String> = HashSet::new();
        let prefix_len = format!("{}topic:", self.settings.prefix).len();
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
            while ok {
                tokio::select! {
                    change = changes.recv() => {
                        let Some(change) = change else { return };
                        // Remembered first: a failure reconnects, and listens to it then.
                        let failed = match change {
                            Interest::Channel(c, true) => channels.insert(c.clone()) && sink.subscribe(c).await.is_err(),
                            Interest::Channel(c, false) => channels.remove(&c) && sink.unsubscribe(c).await.is_err(),
                            Interest::Pattern(p, true) => patterns.insert(p.clone()) && sink.psubscribe(p).await.is_err(),
                            Interest::Pattern(p, false) => patterns.remove(&p) && sink.punsubscribe(p).await.is_err(),
                        };
                        ok = !failed;
                    }
                    message = stream.next() => {
                        let Some(message) = message else { break };
                        let channel = message.get_channel_name();
                        let Some(key) = channel.get(prefix_len..) else { continue };
                        let glob: Option<String> = message.get_pattern().ok();
                        match decode_bus_message(message.get_payload_bytes()) {
                            Some((node, publish)) if node != self.settings.node => inbound(key, glob.as_deref(), &publish),
                            Some(_) => {}
                            None => warn!(%channel, "a message on the topic bus that is not Stoa's"),
                        }
                    }
                    _ = stop.changed() => return,
                }
            }
            debug!("topic bus: connection lost; listening again");
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
