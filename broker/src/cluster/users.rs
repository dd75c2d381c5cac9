//! Direct messages shared through Redis (`--cluster`): `/user/<user>/queue/<name>`.
//!
//! In: SENDs to a user's queue, and this node's subscriptions to `/user/queue/<name>`.
//! Out: a message published on the queue's channel when the user has a subscription on any
//! node (every node with one delivers it to its own), or kept in a Redis list while none
//! has; the list goes, once, to the first subscription on any node. One script decides
//! between the two, and one script notes a subscription and takes what waited, so that a
//! message is never both published and kept, nor kept after a subscription took the list.
//!
//! Keys, under the cluster prefix `P`: `P dm:<user>/<name>` (list of waiting messages, each
//! a STOMP 1.2 frame without its command line), `P dmbytes:<user>/<name>` (their bytes),
//! `P dmlisteners` (hash: `<user>/<name>` → subscriptions anywhere), `P dmsubs:<node>` (hash:
//! `<user>/<name>\n<session>\n<subscription>` → 1, one per subscription on that node).
//! Channel: `P user:<user>/<name>`.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use redis::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::warn;

use super::{Cluster, decode_bus_message};
use crate::message::Publish;

const DM_SCRIPT: &str = r"
local op = ARGV[1]
if op == 'send' then
  -- KEYS: listeners, list, bytes. ARGV: op, queue, frame, most messages, most bytes, channel, node
  if tonumber(redis.call('HGET', KEYS[1], ARGV[2]) or '0') > 0 then
    redis.call('PUBLISH', ARGV[6], ARGV[7] .. '\nMESSAGE\n' .. ARGV[3])
    return 1
  end
  local size = string.len(ARGV[3])
  if redis.call('LLEN', KEYS[2]) >= tonumber(ARGV[4])
     or tonumber(redis.call('GET', KEYS[3]) or '0') + size > tonumber(ARGV[5]) then
    return redis.error_reply('FULL the user queue is full')
  end
  redis.call('RPUSH', KEYS[2], ARGV[3])
  redis.call('INCRBY', KEYS[3], size)
  return 2
end
if op == 'listen' then
  -- KEYS: listeners, list, bytes, this node's subscriptions, member. ARGV: op, queue, field, incarnation
  if redis.call('GET', KEYS[5]) ~= ARGV[4] then
    return redis.error_reply('FENCED this node is no longer a member of the cluster')
  end
  if redis.call('HSETNX', KEYS[4], ARGV[3], 1) == 1 then
    redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
  end
  local waiting = redis.call('LRANGE', KEYS[2], 0, -1)
  redis.call('DEL', KEYS[2], KEYS[3])
  return waiting
end
if op == 'unlisten' then
  -- KEYS: listeners, this node's subscriptions. ARGV: op, queue, field
  if redis.call('HDEL', KEYS[2], ARGV[3]) == 1 then
    if redis.call('HINCRBY', KEYS[1], ARGV[2], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[2]) end
  end
  return 0
end
if op == 'giveback' then
  -- KEYS: list, bytes. ARGV: op, frames oldest first
  local size = 0
  for i = #ARGV, 2, -1 do
    redis.call('LPUSH', KEYS[1], ARGV[i])
    size = size + string.len(ARGV[i])
  end
  redis.call('INCRBY', KEYS[2], size)
  return 0
end
if op == 'reap' then
  -- KEYS: listeners, the node's subscriptions, its heartbeat. ARGV: op, force
  if ARGV[2] ~= 'force' and redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
  local subs = redis.call('HKEYS', KEYS[2])
  for _, field in ipairs(subs) do
    local queue = string.match(field, '^[^\n]*')
    if redis.call('HINCRBY', KEYS[1], queue, -1) <= 0 then redis.call('HDEL', KEYS[1], queue) end
  end
  redis.call('DEL', KEYS[2])
  return #subs
end
return redis.error_reply('ERR unknown user queue operation')
";

/// How a SEND to a user's queue went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Published to the user's subscriptions.
    Delivered,
    /// Kept until the user subscribes.
    Kept,
    /// The queue holds `--user-queue-limit` messages or `--user-queue-bytes` already.
    Full,
}

/// What to do with a send's outcome.
pub type Done = Box<dyn FnOnce(Result<Sent, ()>) + Send>;

struct Outgoing {
    queue: String,
    frame: Bytes,
    done: Done,
    deadline: Instant,
}

/// The user queues' side of the cluster.
pub struct UserBus {
    cluster: Arc<Cluster>,
    script: redis::Script,
    /// Most messages and bytes waiting per queue.
    limit: (usize, usize),
    sends: mpsc::UnboundedSender<Outgoing>,
    sends_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Outgoing>>>,
}

impl std::fmt::Debug for UserBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserBus").finish_non_exhaustive()
    }
}

/// `<user>/<name>`, the queue's name in keys.
pub fn queue_key(user: &str, name: &str) -> String {
    format!("{user}/{name}")
}

/// A waiting message from the list, or one heard on a channel after the node name.
fn decode(frame: &[u8]) -> Option<Publish> {
    let mut payload = Vec::with_capacity(frame.len() + 9);
    payload.extend_from_slice(b"\nMESSAGE\n");
    payload.extend_from_slice(frame);
    decode_bus_message(&payload).map(|(_, p)| p)
}

impl UserBus {
    /// The user queues' side of `cluster`, at most `limit` (messages, bytes) waiting per
    /// queue.
    pub fn new(cluster: Arc<Cluster>, limit: (usize, usize)) -> UserBus {
        let (sends, sends_rx) = mpsc::unbounded_channel();
        UserBus {
            cluster,
            script: redis::Script::new(DM_SCRIPT),
            limit,
            sends,
            sends_rx: std::sync::Mutex::new(Some(sends_rx)),
        }
    }

    /// The cluster this is part of.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    fn key(&self, what: &str) -> String {
        format!("{}{what}", self.cluster.settings.prefix)
    }

    /// The presence field of subscription `key` of `session` to queue `queue`.
    pub fn field(queue: &str, session: u64, key: u32) -> String {
        format!("{queue}\n{session}\n{key}")
    }

    /// Listens to the queue's channel; the answer comes once Redis confirmed it.
    pub fn listen_channel(&self, queue: &str, on: bool) -> oneshot::Receiver<()> {
        self.cluster
            .listen_channel(self.key(&format!("user:{queue}")), on)
    }

    /// Publishes `publish` to `queue`'s subscriptions anywhere, or keeps it while there are
    /// none; `done` gets the outcome (`Err` when Redis did not take it within
    /// `--cluster-timeout-ms`). Sends go to Redis in the order they are made.
    pub fn send(&self, queue: String, publish: &Publish, done: Done) {
        let _ = self.sends.send(Outgoing {
            queue,
            frame: super::rooms::log_entry(publish),
            done,
            deadline: Instant::now() + self.cluster.settings.timeout,
        });
    }

    /// Runs the sends until `stop`.
    pub async fn run(self: Arc<Self>, stop: watch::Receiver<bool>) {
        let Some(queued) = self.sends_rx.lock().ok().and_then(|mut w| w.take()) else {
            return;
        };
        let timeout = self.cluster.settings.timeout;
        super::run_writes(queued, stop, timeout, |mut batch: Vec<Outgoing>| {
            let me = self.clone();
            async move {
                let answered = me.send_batch(&mut batch).await;
                (batch, answered)
            }
        })
        .await;
    }

    /// One pipeline; keeps in `batch` what may be tried again; whether Redis answered.
    async fn send_batch(&self, batch: &mut Vec<Outgoing>) -> bool {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe.cmd("SCRIPT").arg("LOAD").arg(DM_SCRIPT);
        let listeners = self.key("dmlisteners");
        for send in batch.iter() {
            let queue = &send.queue;
            pipe.cmd("EVALSHA")
                .arg(self.script.get_hash())
                .arg(3)
                .arg(&listeners)
                .arg(self.key(&format!("dm:{queue}")))
                .arg(self.key(&format!("dmbytes:{queue}")))
                .arg("send")
                .arg(queue)
                .arg(send.frame.as_ref())
                .arg(self.limit.0)
                .arg(self.limit.1)
                .arg(self.key(&format!("user:{queue}")))
                .arg(self.cluster.node());
        }
        let mut redis = self.cluster.redis.clone();
        let answers: Vec<redis::RedisResult<Value>> = match pipe.query_async(&mut redis).await {
            Ok(answers) => answers,
            Err(e) => {
                // Tried again only while Redis surely did not get it.
                let again = e.is_connection_refusal();
                let now = Instant::now();
                for send in std::mem::take(batch) {
                    if again && now < send.deadline {
                        batch.push(send);
                    } else {
                        warn!(queue = %send.queue, "a direct message was not taken: {e}");
                        (send.done)(Err(()));
                    }
                }
                return false;
            }
        };
        let mut answers = answers.into_iter().skip(1);
        for send in batch.drain(..) {
            let outcome = match answers.next() {
                Some(Ok(Value::Int(1))) => Ok(Sent::Delivered),
                Some(Ok(Value::Int(_))) => Ok(Sent::Kept),
                Some(Err(e)) if e.code() == Some("FULL") => Ok(Sent::Full),
                other => {
                    warn!(queue = %send.queue, "Redis refused a direct message: {other:?}");
                    Err(())
                }
            };
            (send.done)(outcome);
        }
        true
    }

    /// Notes subscription `field` to `queue` and takes what waited for it, oldest first.
    ///
    /// # Errors
    /// Redis did not answer, or this node was declared dead.
    pub async fn listen(&self, queue: &str, field: &str) -> redis::RedisResult<Vec<Publish>> {
        let mut redis = self.cluster.redis.clone();
        let waiting: Vec<Vec<u8>> = self
            .script
            .key(self.key("dmlisteners"))
            .key(self.key(&format!("dm:{queue}")))
            .key(self.key(&format!("dmbytes:{queue}")))
            .key(self.key(&format!("dmsubs:{}", self.cluster.node())))
            .key(self.key(&format!("member:{}", self.cluster.node())))
            .arg("listen")
            .arg(queue)
            .arg(field)
            .arg(self.cluster.incarnation())
            .invoke_async(&mut redis)
            .await?;
        Ok(waiting
            .iter()
            .filter_map(|f| {
                let decoded = decode(f);
                if decoded.is_none() {
                    warn!(%queue, "a waiting direct message that is not a STOMP frame: dropped");
                }
                decoded
            })
            .collect())
    }

    /// Takes back subscription `field` to `queue`.
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn unlisten(&self, queue: &str, field: &str) -> redis::RedisResult<()> {
        let mut redis = self.cluster.redis.clone();
        let _: Value = self
            .script
            .key(self.key("dmlisteners"))
            .key(self.key(&format!("dmsubs:{}", self.cluster.node())))
            .arg("unlisten")
            .arg(queue)
            .arg(field)
            .invoke_async(&mut redis)
            .await?;
        Ok(())
    }

    /// Puts messages taken for a subscription that closed before they were written back
    /// at the head of `queue`, oldest first.
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn give_back(&self, queue: &str, messages: &[Publish]) -> redis::RedisResult<()> {
        let mut redis = self.cluster.redis.clone();
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(self.key(&format!("dm:{queue}")))
            .key(self.key(&format!("dmbytes:{queue}")))
            .arg("giveback");
        let frames: Vec<Bytes> = messages.iter().map(super::rooms::log_entry).collect();
        for frame in &frames {
            invocation.arg(frame.as_ref());
        }
        let _: Value = invocation.invoke_async(&mut redis).await?;
        Ok(())
    }

    /// Takes a dead node's subscriptions out of the count (or this node's previous life's,
    /// `force`), so that messages to their users wait instead of going to nobody.
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn reap(&self, node: &str, force: bool) -> redis::RedisResult<usize> {
        let mut redis = self.cluster.redis.clone();
        self.script
            .key(self.key("dmlisteners"))
            .key(self.key(&format!("dmsubs:{node}")))
            .key(self.key(&format!("node:{node}")))
            .arg("reap")
            .arg(if force { "force" } else { "-" })
            .invoke_async(&mut redis)
            .await
    }

    /// A message heard on a queue's channel, after the sending node's name.
    pub fn decode_heard(payload: &[u8]) -> Option<Publish> {
        decode_bus_message(payload).map(|(_, p)| p)
    }
}
