//! Several nodes through Redis (`../shared/design/cluster.md`): this node's membership.
//!
//! In: `--cluster URL`, the node's name, prefix and time-outs, and the number of client
//! connections open now. Out: a heartbeat key per node (`<prefix>node:<name>`, holding its
//! name, connections and the time it was written, expiring after `--cluster-node-timeout-ms`)
//! listed in the set `<prefix>nodes`; the list of live nodes; and whether Redis answers,
//! for `/healthz`. Rooms, presence, queues and direct messages are not shared yet
//! (docs/ARCHITECTURE.md, "Next: the shared-state and delivery seams").

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::message::now_millis;

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
    settings: ClusterSettings,
    /// Whether the last exchange with Redis succeeded.
    reachable: AtomicBool,
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
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| {
            unreachable(format!(
                "no answer within {} ms",
                settings.timeout.as_millis()
            ))
        })?
        .map_err(|e| unreachable(e.to_string()))?;
        let cluster = Cluster {
            redis,
            settings,
            reachable: AtomicBool::new(false),
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
